//! Replaying a command twice — traced and unconfined (the probe), then under the
//! profile (enforce) — and judging whether the profile would break it.

use crate::ValidatorError;
use crate::process;
use crate::runc::{Exit, RunOutcome, RunSpec, run_in_runc};
use crate::trace::{CallSite, Usage};
use profile_store::render::ALWAYS_ALLOWED;
use profile_store::{Abi, RuntimeBase, SeccompProfile};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::PathBuf;
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
    /// The run under the profile.
    pub enforce: RunSummary,
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
/// Passes when the run under the profile ends as the probe did (exit status,
/// stdout, no SIGSYS) and the probe made no syscall the profile answers with EPERM.
/// Syscalls answered with ENOSYS by the profile's fallback rules are reported but
/// do not fail it: libc falls back from them.
pub fn validate(
    cmd: &[String],
    profile: &SeccompProfile,
    runtime: Runtime,
    timeout: Duration,
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
    let (p, mut e) = (summary(&probe_out), summary(&enforce_out));
    e.timed_out = timed_out;
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
        },
        usage,
    ))
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
