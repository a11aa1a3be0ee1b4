//! Reading back a staging Job's trace (`tether validate --read-trace`): the
//! containers of the Job printed by `tether validate --pod` run under
//! `strace -f`, which writes to the container's stderr, so `kubectl logs` holds
//! the trace. Judged against the profile as a local run's probe is.
//!
//! The Job runs its containers under the Log-mode variant of their profiles (so
//! strace itself can run), so nothing was enforced there: the verdict is the
//! syscall-level one (nothing the profile answers with EPERM was made, no process
//! died of SIGSYS), without the enforce run a local `tether validate` adds.

use crate::trace::Usage;
use crate::validate::{Denied, Judged, judge};
use profile_store::{Abi, SeccompProfile};
use serde::Serialize;
use std::collections::BTreeMap;

/// What a read-back trace shows against a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceReport {
    /// Where the trace came from (a file name, or `-`).
    pub source: String,
    /// How many distinct syscalls the trace shows.
    pub syscalls: usize,
    /// Syscalls the trace shows that the profile answers with an error.
    pub denied: Vec<Denied>,
    /// Syscalls the profile allows that the trace never shows (beyond the
    /// runtime's base set and the always-allowed ones).
    pub unused: Vec<String>,
    /// Processes killed by SIGSYS in the traced run.
    pub sigsys_kills: usize,
    /// Syscalls the tables do not know, by what strace printed.
    pub unknown: BTreeMap<String, u64>,
    /// Lines that are not strace's: in `kubectl logs`, the container's own
    /// output, which shares stderr with the trace.
    pub other_lines: u64,
    /// Whether the profile keeps the traced workload working at the syscall level.
    pub pass: bool,
    /// Syscalls to add to the profile (denied with EPERM).
    pub add: Vec<String>,
}

/// Why a trace cannot be judged.
#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    /// Nothing in the input is a strace line.
    #[error(
        "{input}: no strace line in {lines} line(s): read the replay container's logs (`kubectl logs job/NAME -c CONTAINER`, without --timestamps or --prefix) or the file `strace -f -o` wrote"
    )]
    NoTrace {
        /// The input's name.
        input: String,
        /// How many lines it had.
        lines: usize,
    },
}

/// Reads strace `-f` output (possibly mixed with the traced program's own
/// output) made on a node of ABI `abi`.
pub fn usage_of(text: &str, abi: Abi) -> Usage {
    let mut usage = Usage::default();
    usage.add(text, abi, None);
    usage
}

/// Judges `usage` (read from `source`) against `profile`.
pub fn judge_trace(source: &str, usage: &Usage, profile: &SeccompProfile) -> Result<TraceReport, ReadBackError> {
    if usage.syscalls.is_empty() {
        return Err(ReadBackError::NoTrace {
            input: source.to_string(),
            lines: usize::try_from(usage.malformed).unwrap_or(usize::MAX),
        });
    }
    let Judged { denied, unused, add } = judge(usage, profile);
    let pass = add.is_empty() && usage.sigsys_kills.is_empty();
    Ok(TraceReport {
        source: source.to_string(),
        syscalls: usage.syscalls.len(),
        denied,
        unused,
        sigsys_kills: usage.sigsys_kills.len(),
        unknown: usage.unknown.clone(),
        other_lines: usage.malformed,
        pass,
        add,
    })
}

impl TraceReport {
    /// The human summary, laid out as a local run's.
    pub fn human(&self) -> String {
        let mut s = format!(
            "{}: trace {} against the profile ({} syscalls seen; {} other line(s) ignored)\n",
            if self.pass { "PASS" } else { "FAIL" },
            self.source,
            self.syscalls,
            self.other_lines
        );
        if self.sigsys_kills > 0 {
            s.push_str(&format!(
                "  {} process(es) killed by SIGSYS in the traced run\n",
                self.sigsys_kills
            ));
        }
        if !self.denied.is_empty() {
            s.push_str("  the profile denies what the workload did:\n");
            for d in &self.denied {
                s.push_str(&format!(
                    "    {:<18} {:>6}x -> {}  first: [pid {}] {}\n",
                    d.name,
                    d.count,
                    d.answer,
                    d.first.pid.map_or("?".into(), |p| p.to_string()),
                    d.first.call
                ));
            }
        }
        if !self.unknown.is_empty() {
            let unknown: Vec<String> = self.unknown.iter().map(|(w, n)| format!("{w} ({n}x)")).collect();
            s.push_str(&format!("  syscalls the tables do not know: {}\n", unknown.join(", ")));
        }
        if !self.add.is_empty() {
            s.push_str(&format!("  add to the profile: {}\n", self.add.join(" ")));
        }
        if !self.unused.is_empty() {
            s.push_str(&format!(
                "  allowed but never used in this run: {}\n",
                self.unused.join(" ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `strace -f` to stderr, as `kubectl logs` shows it: the first process
    /// unprefixed, children as `[pid N]`, the program's own output between.
    const LOG: &str = r#"execve("/bin/sh", ["sh", "-c", "echo hi; kill -USR1 $$"], 0x7ffd /* 3 vars */) = 0
openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3
clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x7f) = 43
[pid    43] write(1, "hi\n", 3) = 3
hi
[pid    43] write(1, "hi\n", 3) = 3
[pid    43] +++ exited with 0 +++
a log line of the program itself
kill(42, SIGUSR1)                       = 0
+++ exited with 0 +++
"#;

    fn profile(allowed: &[&str]) -> SeccompProfile {
        serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": allowed, "action": "SCMP_ACT_ALLOW"}],
        }))
        .unwrap()
    }

    #[test]
    fn a_missing_syscall_is_named_with_its_count_and_other_lines_are_ignored() {
        let usage = usage_of(LOG, Abi::X86_64);
        let report = judge_trace("app.log", &usage, &profile(&["execve", "openat", "clone", "kill"])).unwrap();
        assert!(!report.pass);
        assert_eq!(report.add, ["write"]);
        assert_eq!(report.denied.len(), 1);
        assert_eq!((report.denied[0].count, report.denied[0].first.pid), (2, Some(43)));
        assert_eq!(report.other_lines, 2);
        assert!(
            report
                .human()
                .contains("write                   2x -> EPERM  first: [pid 43] write(1,"),
            "{}",
            report.human()
        );

        let all = profile(&["execve", "openat", "clone", "kill", "write", "mount"]);
        let report = judge_trace("app.log", &usage, &all).unwrap();
        assert!(report.pass, "{}", report.human());
        assert_eq!(report.unused, ["mount"]);
    }

    #[test]
    fn input_without_a_strace_line_is_an_error_not_a_pass() {
        let usage = usage_of("listening on :8080\nready\n", Abi::X86_64);
        let err = judge_trace("-", &usage, &profile(&["read"])).unwrap_err();
        assert!(err.to_string().contains("no strace line in 2 line(s)"), "{err}");
    }

    #[test]
    fn a_sigsys_kill_fails_even_when_every_syscall_is_allowed() {
        let text = "getpid() = 42\n--- SIGSYS {si_signo=SIGSYS, si_code=SYS_SECCOMP} ---\n+++ killed by SIGSYS (core dumped) +++\n";
        let usage = usage_of(text, Abi::X86_64);
        let report = judge_trace("t", &usage, &profile(&["getpid"])).unwrap();
        assert_eq!(report.sigsys_kills, 1);
        assert!(!report.pass);
    }
}
