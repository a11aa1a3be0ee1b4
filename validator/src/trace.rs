//! What a probe run did, read from its strace output with the profile-store parser.

use profile_store::Abi;
use profile_store::strace::{StraceEvent, StraceParser};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Where a syscall was first made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallSite {
    /// The process.
    pub pid: Option<u32>,
    /// The call as strace printed it, cut short.
    pub call: String,
}

/// How often a syscall was made, and its first call site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Use {
    /// Calls.
    pub count: u64,
    /// The first one.
    pub first: CallSite,
}

/// Everything a traced run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Syscall name -> use.
    pub syscalls: BTreeMap<String, Use>,
    /// Processes killed by SIGSYS (a seccomp kill), by pid.
    pub sigsys_kills: Vec<Option<u32>>,
    /// Syscalls the tables do not know.
    pub unknown: BTreeMap<String, u64>,
    /// Lines that did not parse.
    pub malformed: u64,
}

/// The longest call text kept for a call site.
const CALL_TEXT: usize = 120;

fn cut(s: &str) -> String {
    match s.char_indices().nth(CALL_TEXT) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

impl Usage {
    /// The usage as a baseline of `key`: what staging taught about the workload.
    pub fn to_baseline(&self, key: profile_store::WorkloadKey, abi: Abi) -> profile_store::Baseline {
        let mut b = profile_store::Baseline::new(key);
        for (name, u) in &self.syscalls {
            b.record_syscall(name, abi, None);
            if let Some(stats) = b.syscalls.get_mut(name) {
                stats.count = u.count;
            }
            b.events += u.count.saturating_sub(1);
        }
        b
    }

    /// Reads strace output files (one, or the `-ff` files of one run).
    pub fn from_files(files: &[impl AsRef<Path>], abi: Abi) -> std::io::Result<Usage> {
        let mut usage = Usage::default();
        for f in files {
            let text = std::fs::read(f.as_ref())?;
            let pid = f
                .as_ref()
                .extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse().ok());
            usage.add(&String::from_utf8_lossy(&text), abi, pid);
        }
        Ok(usage)
    }

    /// Adds one strace output.
    pub fn add(&mut self, text: &str, abi: Abi, file_pid: Option<u32>) {
        let mut parser = StraceParser::new(abi, file_pid);
        for line in text.lines() {
            match parser.parse_line(line) {
                Ok(StraceEvent::Syscall { pid, name, .. }) => {
                    let entry = self.syscalls.entry(name.to_string()).or_insert_with(|| Use {
                        count: 0,
                        first: CallSite {
                            pid,
                            call: cut(line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ')),
                        },
                    });
                    entry.count += 1;
                }
                Ok(StraceEvent::Killed { pid, signal }) if signal == "SIGSYS" => self.sigsys_kills.push(pid),
                Ok(StraceEvent::UnknownSyscall { what, .. }) => *self.unknown.entry(what).or_default() += 1,
                Ok(_) => {}
                Err(_) => self.malformed += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_first_call_sites() {
        let mut u = Usage::default();
        u.add(
            "12 openat(AT_FDCWD, \"/etc/passwd\", O_RDONLY) = 3\n12 read(3, \"root\", 4096) = 4\n13 openat(AT_FDCWD, \"/x\", O_RDONLY) = -1 ENOENT (No such file)\n13 +++ killed by SIGSYS (core dumped) +++\n",
            Abi::X86_64,
            None,
        );
        let o = &u.syscalls["openat"];
        assert_eq!(o.count, 2);
        assert_eq!(o.first.pid, Some(12));
        assert!(
            o.first.call.starts_with("openat(AT_FDCWD, \"/etc/passwd\""),
            "{}",
            o.first.call
        );
        assert_eq!(u.sigsys_kills, vec![Some(13)]);
    }
}
