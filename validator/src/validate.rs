//! Replaying a command twice — traced and unconfined (the probe), then under the
//! profile (enforce) — and judging whether the profile would break it.

use crate::ValidatorError;
use crate::observe::{Observation, observe};
use crate::process;
use crate::runc::{Exit, RunOutcome, RunSpec, run_in_runc};
use crate::trace::{CallSite, Usage};
use profile_store::render::ALWAYS_ALLOWED;
use profile_store::{Abi, RuntimeBase, SeccompProfile};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where the workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// In a runc container, as a node would run it.
    Runc,
    /// As a process of this host, with the filter installed before exec.
    Process,
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "runc" => Ok(Runtime::Runc),
            "process" => Ok(Runtime::Process),
            _ => Err(format!("unknown runtime `{s}`: use runc or process")),
        }
    }
}

/// A syscall the profile would deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denied {
    /// The syscall.
    pub name: String,
    /// How often the probe made it.
    pub count: u64,
    /// Its first call site.
    pub first: CallSite,
    /// What the profile answers: `EPERM` (default) or `ENOSYS` (libc falls back).
    pub answer: String,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    /// Exit code (a death by signal N is 128+N).
    pub exit_code: i32,
    /// Killed by SIGSYS (seccomp).
    pub sigsys: bool,
    /// Bytes of stdout.
    pub stdout_bytes: usize,
    /// The last lines of stderr, for the report.
    pub stderr_tail: String,
    /// Killed at the deadline (a workload that hangs under its profile is broken).
    pub timed_out: bool,
}

/// What a denied syscall returned under the filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeniedReturn {
    /// The syscall.
    pub name: String,
    /// The errno name strace showed (`EPERM`, `ENOSYS`, ...).
    pub errno: String,
    /// How often.
    pub count: u64,
    /// The first such call.
    pub first: CallSite,
}

/// The observed enforce run: the workload under exactly its profile, strace
/// watching from outside the filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnderFilter {
    /// Whether returns were observed; when not, `note` says why.
    pub observed: bool,
    /// How they were observed.
    pub method: String,
    /// Returns of syscalls the profile denies, by syscall and errno.
    pub returns: Vec<DeniedReturn>,
    /// Denied syscalls that returned without an error (the filter was not in
    /// force: the observation is void).
    pub succeeded: Vec<String>,
    /// Processes of the workload killed by SIGSYS.
    pub sigsys_kills: u64,
    /// How the traced run ended.
    pub run: Option<RunSummary>,
    /// Whether it ended as the plain enforce run did (exit status, SIGSYS, stdout).
    /// When not, strace or the wrapper changed the workload, and the returns are
    /// those of the traced run.
    pub same_as_plain: bool,
    /// What to keep in mind.
    pub note: Option<String>,
}

impl UnderFilter {
    fn not_observed(method: &str, note: String) -> UnderFilter {
        UnderFilter {
            observed: false,
            method: method.into(),
            returns: Vec::new(),
            succeeded: Vec::new(),
            sigsys_kills: 0,
            run: None,
            same_as_plain: false,
            note: Some(note),
        }
    }
}

/// The validation result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The runtime used.
    pub runtime: Runtime,
    /// The command.
    pub command: Vec<String>,
    /// Syscalls the probe made that the profile answers with an error.
    pub denied: Vec<Denied>,
    /// Syscalls the profile allows that the run never made (beyond the runtime's
    /// base set and the always-allowed ones).
    pub unused: Vec<String>,
    /// The probe run.
    pub probe: RunSummary,
    /// The run under the profile, as a node runs it (no tracer): the verdict's.
    pub enforce: RunSummary,
    /// What the denied syscalls returned under the filter, from a second, traced
    /// run under the profile.
    pub under_filter: UnderFilter,
    /// Whether both runs printed the same stdout.
    pub same_output: bool,
    /// Whether the profile keeps the workload working.
    pub pass: bool,
    /// Syscalls to add to the profile (denied with EPERM).
    pub add: Vec<String>,
}

fn summary(out: &RunOutcome) -> RunSummary {
    let code = match out.exit {
        Exit::Code(c) => c,
        Exit::Signal(s) => 128 + s,
    };
    let tail: Vec<&str> = out.stderr.lines().rev().take(5).collect();
    RunSummary {
        exit_code: code,
        sigsys: out.killed_by_sigsys(),
        stdout_bytes: out.stdout.len(),
        stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        timed_out: false,
    }
}

/// The strace binary.
pub fn strace_path() -> Result<PathBuf, ValidatorError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("strace"))
        .find(|p| p.is_file())
        .ok_or(ValidatorError::StraceMissing)
}

/// Runs `cmd` traced (unconfined) and returns its outcome and usage.
fn probe(cmd: &[String], runtime: Runtime, timeout: Duration) -> Result<(RunOutcome, Usage), ValidatorError> {
    let strace = strace_path()?;
    let dir = tempfile::Builder::new()
        .prefix("tether-probe-")
        .tempdir()
        .map_err(|source| ValidatorError::Io {
            what: "creating the probe directory".into(),
            source,
        })?;
    let outcome = match runtime {
        Runtime::Runc => {
            let mut args = vec![
                strace.display().to_string(),
                "-f".into(),
                "-o".into(),
                "/probe/trace".into(),
            ];
            args.extend(cmd.iter().cloned());
            let mut spec = RunSpec::new(args);
            spec.extra_capabilities.push("CAP_SYS_PTRACE".into());
            spec.mounts.push((dir.path().to_path_buf(), "/probe".into()));
            spec.timeout = timeout;
            run_in_runc(&spec)?
        }
        Runtime::Process => {
            let scratch = dir.path().join("work");
            std::fs::create_dir_all(&scratch).map_err(|source| ValidatorError::Io {
                what: "creating the scratch directory".into(),
                source,
            })?;
            let mut c = Command::new(&strace);
            c.arg("-f")
                .arg("-o")
                .arg(dir.path().join("trace"))
                .args(cmd)
                .current_dir(&scratch);
            run_process(c, timeout)?
        }
    };
    let trace = dir.path().join("trace");
    let usage = Usage::from_files(&[&trace], Abi::host()).map_err(|source| ValidatorError::Io {
        what: format!("reading the probe trace {}", trace.display()),
        source,
    })?;
    Ok((outcome, usage))
}

fn run_process(cmd: Command, timeout: Duration) -> Result<RunOutcome, ValidatorError> {
    crate::runc::run_captured(cmd, timeout, |_| {})
}

/// Runs `cmd` under `profile`.
fn enforce(
    cmd: &[String],
    profile: &SeccompProfile,
    runtime: Runtime,
    timeout: Duration,
) -> Result<RunOutcome, ValidatorError> {
    match runtime {
        Runtime::Runc => {
            let mut spec = RunSpec::new(cmd.iter().cloned());
            spec.profile = Some(profile.clone());
            spec.timeout = timeout;
            run_in_runc(&spec)
        }
        Runtime::Process => {
            let scratch = tempfile::Builder::new()
                .prefix("tether-enforce-")
                .tempdir()
                .map_err(|source| ValidatorError::Io {
                    what: "creating the scratch directory".into(),
                    source,
                })?;
            let Some((program, args)) = cmd.split_first() else {
                return Err(ValidatorError::Usage("no command given".into()));
            };
            let mut c = Command::new(program);
            c.args(args).current_dir(scratch.path());
            process::confine(&mut c, process::filters(profile)?);
            run_process(c, timeout)
        }
    }
}

/// Probes `cmd`, runs it under `profile`, and judges.
///
/// `observer` is a `tether` binary (it has the hidden `__exec-confined`
/// subcommand): with it, a third run under the profile shows what the denied
/// syscalls return ([`crate::observe`]); without it, the report says they were not
/// observed.
///
/// Passes when the run under the profile ends as the probe did (exit status,
/// stdout, no SIGSYS) and the probe made no syscall the profile answers with EPERM.
/// Syscalls answered with ENOSYS by the profile's fallback rules are reported but
/// do not fail it: libc falls back from them.
pub fn validate(
    cmd: &[String],
    profile: &SeccompProfile,
    runtime: Runtime,
    timeout: Duration,
    observer: Option<&Path>,
) -> Result<(Report, Usage), ValidatorError> {
    if cmd.is_empty() {
        return Err(ValidatorError::Usage("no command given after --".into()));
    }
    let (probe_out, usage) = probe(cmd, runtime, timeout)?;
    // Hanging under the profile is an outcome, not an error: the profile breaks it.
    let (enforce_out, timed_out) = match enforce(cmd, profile, runtime, timeout) {
        Ok(out) => (out, false),
        Err(ValidatorError::Timeout(_)) => (
            RunOutcome {
                exit: Exit::Signal(9),
                stdout: String::new(),
                stderr: format!("killed after {timeout:?}: hung under the profile"),
            },
            true,
        ),
        Err(e) => return Err(e),
    };
    let Judged { denied, unused, add } = judge(&usage, profile);
    let (p, mut e) = (summary(&probe_out), summary(&enforce_out));
    e.timed_out = timed_out;
    // The plain run above stays the verdict's, and the traced run only reports:
    // strace stops the workload at every call (timing, signals and races change),
    // the wrapper sets no_new_privs (setuid and file capabilities stop working),
    // the workload is not the container's pid 1 (signal defaults, reaping), and the
    // container's filter is wider. What a node runs is the plain run; the traced
    // one is compared with it, and a difference is said, not judged.
    let under_filter = under_filter(cmd, profile, runtime, timeout, observer, &enforce_out, &e);
    let same_output = probe_out.stdout == enforce_out.stdout;
    let pass = add.is_empty() && p.exit_code == e.exit_code && same_output && !e.sigsys && !timed_out;
    Ok((
        Report {
            runtime,
            command: cmd.to_vec(),
            denied,
            unused,
            probe: p,
            enforce: e,
            same_output,
            pass,
            add,
            under_filter,
        },
        usage,
    ))
}

/// The syscall-level half of a verdict: what `profile` denies of what `usage`
/// made, what it allows that was never made, and what to add.
pub(crate) struct Judged {
    pub(crate) denied: Vec<Denied>,
    pub(crate) unused: Vec<String>,
    pub(crate) add: Vec<String>,
}

pub(crate) fn judge(usage: &Usage, profile: &SeccompProfile) -> Judged {
    let allowed = profile.allowed();
    let enosys: BTreeSet<&str> = profile
        .syscalls
        .iter()
        .filter(|r| r.action == "SCMP_ACT_ERRNO" && r.errno_ret == Some(profile_store::render::ENOSYS))
        .flat_map(|r| r.names.iter().map(String::as_str))
        .collect();
    let denied: Vec<Denied> = usage
        .syscalls
        .iter()
        .filter(|(name, _)| !allowed.contains(name.as_str()))
        .map(|(name, u)| Denied {
            name: name.clone(),
            count: u.count,
            first: u.first.clone(),
            answer: if enosys.contains(name.as_str()) {
                "ENOSYS"
            } else {
                "EPERM"
            }
            .into(),
        })
        .collect();
    let base: BTreeSet<String> = RuntimeBase::select("runc").map(|b| b.syscalls).unwrap_or_default();
    let unused = allowed
        .iter()
        .filter(|n| !usage.syscalls.contains_key(**n) && !base.contains(**n) && !ALWAYS_ALLOWED.contains(n))
        .map(|n| n.to_string())
        .collect();
    let add: Vec<String> = denied
        .iter()
        .filter(|d| d.answer == "EPERM")
        .map(|d| d.name.clone())
        .collect();
    Judged { denied, unused, add }
}

/// Runs the observed enforce run and summarizes it against the plain one.
fn under_filter(
    cmd: &[String],
    profile: &SeccompProfile,
    runtime: Runtime,
    timeout: Duration,
    observer: Option<&Path>,
    plain: &RunOutcome,
    plain_summary: &RunSummary,
) -> UnderFilter {
    let method = match runtime {
        Runtime::Runc => {
            "strace -ff as the container's process (its needs added to the container's filter); the exact profile installed in-process by `tether __exec-confined` before exec, answering ENOSYS above the profile's highest syscall as runc 1.1 does"
        }
        Runtime::Process => "strace -ff of `tether __exec-confined`, which installs the exact profile before exec",
    };
    let Some(exe) = observer else {
        return UnderFilter::not_observed(
            method,
            "not observed: no tether binary was given to install the profile under strace".into(),
        );
    };
    // The verdict does not depend on this run, so its failures become a note.
    let Observation { outcome, returns } = match observe(cmd, profile, runtime, timeout, exe) {
        Ok(o) => o,
        Err(e) => return UnderFilter::not_observed(method, format!("not observed: {e}")),
    };
    let run = match &outcome {
        Some(out) => summary(out),
        None => RunSummary {
            exit_code: 128 + 9,
            sigsys: false,
            stdout_bytes: 0,
            stderr_tail: format!("killed after {timeout:?}"),
            timed_out: true,
        },
    };
    let same_as_plain = outcome.as_ref().is_some_and(|out| {
        run.exit_code == plain_summary.exit_code
            && run.sigsys == plain_summary.sigsys
            && out.stdout == plain.stdout
            && !plain_summary.timed_out
    }) || (run.timed_out && plain_summary.timed_out);
    let mut notes = Vec::new();
    if !returns.workload_seen {
        notes.push(format!(
            "the workload was never exec'd under the profile (traced run: exit {}; {})",
            run.exit_code,
            run.stderr_tail.lines().last().unwrap_or("")
        ));
    }
    if !same_as_plain && plain.stderr.contains("runc run failed") {
        // The container's filter of the traced run also holds strace's needs, and
        // many of them are runc's too (openat, write, close, ...): runc got further.
        notes.push(format!(
            "runc itself failed under the profile in the plain run (exit {}); the traced run's container filter is wider, so it got further (exit {}): the profile lacks what runc needs after loading it",
            plain_summary.exit_code, run.exit_code
        ));
    } else if !same_as_plain {
        notes.push(format!(
            "the traced run ended differently from the plain run (exit {} vs {}{}): strace or the wrapper changed the workload; the returns are the traced run's",
            run.exit_code,
            plain_summary.exit_code,
            if run.timed_out { ", traced run hung" } else { "" }
        ));
    }
    if !returns.succeeded.is_empty() {
        notes.push(format!(
            "denied syscalls succeeded, so the profile was not in force: {}",
            returns.succeeded.keys().cloned().collect::<Vec<_>>().join(" ")
        ));
    }
    if matches!(runtime, Runtime::Runc) && !strace_is_measured() {
        notes.push("strace is not the version whose needs were measured (6.1): if the traced run differs from the plain one, measure again (validator/data/observer/README.md)".into());
    }
    UnderFilter {
        observed: returns.workload_seen && returns.succeeded.is_empty(),
        method: method.into(),
        returns: returns
            .errors
            .into_iter()
            .map(|((name, errno), u)| DeniedReturn {
                name,
                errno,
                count: u.count,
                first: u.first,
            })
            .collect(),
        succeeded: returns.succeeded.into_keys().collect(),
        sigsys_kills: returns.sigsys_kills,
        run: Some(run),
        same_as_plain,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

/// Whether the installed strace is the version `data/observer` was measured with.
fn strace_is_measured() -> bool {
    let Ok(strace) = strace_path() else { return false };
    Command::new(strace)
        .arg("-V")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("version 6.1\n"))
}

impl Report {
    /// The human summary.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        s.push_str(&format!(
            "{verdict}: `{}` under the profile ({:?})\n",
            self.command.join(" "),
            self.runtime
        ));
        s.push_str(&format!(
            "  probe:   exit {}{}\n  enforce: exit {}{}{}\n",
            self.probe.exit_code,
            if self.probe.sigsys { " (SIGSYS)" } else { "" },
            self.enforce.exit_code,
            if self.enforce.sigsys {
                " (killed by SIGSYS: seccomp)"
            } else if self.enforce.timed_out {
                " (hung: killed at the deadline)"
            } else {
                ""
            },
            if self.same_output {
                ", same output"
            } else {
                ", DIFFERENT output"
            },
        ));
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
        let u = &self.under_filter;
        if u.observed && u.returns.is_empty() {
            s.push_str("  under the filter (traced): no denied syscall was called\n");
        } else if !u.returns.is_empty() {
            s.push_str("  under the filter (traced), denied syscalls returned:\n");
            for r in &u.returns {
                s.push_str(&format!(
                    "    {:<18} {:>6}x {:<7} first: [pid {}] {}\n",
                    r.name,
                    r.count,
                    r.errno,
                    r.first.pid.map_or("?".into(), |p| p.to_string()),
                    r.first.call
                ));
            }
        }
        if u.sigsys_kills > 0 {
            s.push_str(&format!(
                "  under the filter (traced): {} process(es) killed by SIGSYS\n",
                u.sigsys_kills
            ));
        }
        if let Some(note) = &u.note {
            s.push_str(&format!("  under the filter: {note}\n"));
        }
        if !self.add.is_empty() {
            s.push_str(&format!("  add to the profile: {}\n", self.add.join(" ")));
        }
        if !self.pass && !self.enforce.stderr_tail.is_empty() {
            s.push_str(&format!(
                "  stderr under the profile:\n    {}\n",
                self.enforce.stderr_tail.replace('\n', "\n    ")
            ));
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
