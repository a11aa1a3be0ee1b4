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
                            call: cut(call_text(line)),
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

/// A strace line without its pid prefix: `N ` (`-o FILE`) or `[pid N] `
/// (`-f` to stderr, as a staging Job's log has it).
fn call_text(line: &str) -> &str {
    let line = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
    match line.strip_prefix("[pid ") {
        Some(rest) => rest.split_once("] ").map_or(line, |(_, call)| call),
        None => line,
    }
}

/// What a workload's denied syscalls returned in an observed enforce run: the
/// `strace -ff` files of `strace ... -- tether __exec-confined ... -- CMD`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Returns {
    /// (syscall, errno name) -> how often and where first.
    pub errors: BTreeMap<(String, String), Use>,
    /// Denied syscalls that returned without an error: the filter was not in force.
    pub succeeded: BTreeMap<String, u64>,
    /// Processes killed by SIGSYS.
    pub sigsys_kills: u64,
    /// Whether the wrapper's exec into the workload was found: without it, nothing
    /// in the trace is known to have run under the profile.
    pub workload_seen: bool,
}

impl Returns {
    /// Reads the `-ff` files (`PREFIX.<pid>`), keeping the calls of syscalls for
    /// which `denied` holds.
    ///
    /// The wrapper's own calls, up to its exec into the workload, ran before the
    /// profile was installed and are skipped: the wrapper's file starts with the
    /// exec of `tether __exec-confined`, and its workload part with the first
    /// `execve` after its `seccomp` calls. Every other file is a process the
    /// workload started, under the profile from its first line.
    pub fn from_files(files: &[impl AsRef<Path>], abi: Abi, denied: impl Fn(&str) -> bool) -> std::io::Result<Returns> {
        let mut r = Returns::default();
        // By pid, so the first call site is the earliest process's.
        let mut files: Vec<(Option<u32>, &Path)> = files
            .iter()
            .map(|f| {
                let f = f.as_ref();
                (f.extension().and_then(|e| e.to_str()).and_then(|e| e.parse().ok()), f)
            })
            .collect();
        files.sort();
        for (pid, f) in files {
            let text = std::fs::read(f)?;
            r.add(&String::from_utf8_lossy(&text), abi, pid, &denied);
        }
        Ok(r)
    }

    /// Adds one `-ff` file of process `pid`.
    pub fn add(&mut self, text: &str, abi: Abi, pid: Option<u32>, denied: &impl Fn(&str) -> bool) {
        let mut lines = text.lines().peekable();
        let wrapper = lines
            .peek()
            .is_some_and(|l| l.starts_with("execve(") && l.contains(crate::process::EXEC_CONFINED));
        if wrapper {
            let mut installed = false;
            while let Some(line) = lines.peek() {
                installed |= line.starts_with("seccomp(");
                if installed && line.starts_with("execve(") {
                    break;
                }
                lines.next();
            }
            if lines.peek().is_none() {
                return;
            }
        }
        let rest: Vec<&str> = lines.collect();
        // When no exec succeeded, the wrapper's own exit path (Rust's std, under the
        // profile) follows the failed attempts; only the attempts are the workload's.
        let exec_failed = wrapper
            && !rest
                .iter()
                .any(|l| l.starts_with("execve(") && l.trim_end().ends_with("= 0"));
        self.workload_seen |= wrapper;
        let mut parser = StraceParser::new(abi, pid);
        for line in rest {
            if exec_failed && !line.starts_with("execve(") {
                continue;
            }
            match parser.parse_line(line) {
                Ok(StraceEvent::Syscall { pid, name, error, .. }) if denied(name) => match error {
                    Some(errno) => {
                        self.errors
                            .entry((name.to_string(), errno))
                            .or_insert_with(|| Use {
                                count: 0,
                                first: CallSite { pid, call: cut(line) },
                            })
                            .count += 1;
                    }
                    None => *self.succeeded.entry(name.to_string()).or_default() += 1,
                },
                Ok(StraceEvent::Killed { signal, .. }) if signal == "SIGSYS" => self.sigsys_kills += 1,
                _ => {}
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

    #[test]
    fn returns_skip_the_wrapper_until_its_exec_and_keep_denied_errors() {
        let wrapper = "execve(\"/.tether/tether\", [\"/.tether/tether\", \"__exec-confined\", \"--profile\"], 0x7ff /* 2 vars */) = 0\n\
uname({sysname=\"Linux\", ...}) = 0\n\
prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  = 0\n\
seccomp(SECCOMP_SET_MODE_FILTER, 0, {len=238, filter=0x5649}) = 0\n\
execve(\"/bin/uname\", [\"/bin/uname\"], 0x7ffd /* 2 vars */) = 0\n\
uname(0x7ffc) = -1 EPERM (Operation not permitted)\n\
uname(0x7ffc) = -1 EPERM (Operation not permitted)\n\
clone3({flags=CLONE_VM, ...}, 88) = -1 ENOSYS (Function not implemented)\n\
exit_group(1) = ?\n\
+++ exited with 1 +++\n";
        let child = "statx(AT_FDCWD, \"/usr\", AT_STATX_SYNC_AS_STAT, STATX_MODE, 0x7ff) = 0\n+++ killed by SIGSYS (core dumped) +++\n";
        let denied = |n: &str| ["uname", "clone3", "statx"].contains(&n);
        let mut r = Returns::default();
        r.add(wrapper, Abi::X86_64, Some(2), &denied);
        r.add(child, Abi::X86_64, Some(3), &denied);
        assert!(r.workload_seen);
        let uname = &r.errors[&("uname".to_string(), "EPERM".to_string())];
        assert_eq!(uname.count, 2, "the wrapper's own uname ran before the filter");
        assert_eq!(uname.first.pid, Some(2));
        assert!(
            uname.first.call.starts_with("uname(0x7ffc) = -1 EPERM"),
            "{}",
            uname.first.call
        );
        assert_eq!(r.errors[&("clone3".to_string(), "ENOSYS".to_string())].count, 1);
        assert_eq!(r.succeeded["statx"], 1);
        assert_eq!(r.sigsys_kills, 1);

        let mut denied_exec = Returns::default();
        denied_exec.add(
            "execve(\"/.tether/tether\", [\"/.tether/tether\", \"__exec-confined\"], 0x7ff) = 0\n\
seccomp(SECCOMP_SET_MODE_FILTER, 0, {len=238, filter=0x5649}) = 0\n\
execve(\"/bin/ls\", [\"/bin/ls\"], 0x7ffd /* 2 vars */) = -1 EPERM (Operation not permitted)\n\
sigaltstack({ss_sp=NULL, ss_flags=SS_DISABLE, ss_size=8192}, NULL) = -1 EPERM (Operation not permitted)\n\
exit_group(1) = ?\n",
            Abi::X86_64,
            Some(2),
            &|n: &str| n == "execve" || n == "sigaltstack",
        );
        assert!(denied_exec.workload_seen);
        assert_eq!(
            denied_exec.errors.keys().collect::<Vec<_>>(),
            [&("execve".to_string(), "EPERM".to_string())],
            "after a failed exec, the calls are the wrapper's"
        );

        let mut never = Returns::default();
        never.add(
            "execve(\"/.tether/tether\", [\"/.tether/tether\", \"__exec-confined\"], 0x7ff) = 0\nuname({}) = 0\nexit_group(126) = ?\n",
            Abi::X86_64,
            Some(2),
            &denied,
        );
        assert!(!never.workload_seen && never.errors.is_empty() && never.succeeded.is_empty());
    }
}
