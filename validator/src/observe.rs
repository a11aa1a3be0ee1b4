//! The observed enforce run: the workload under exactly its profile, with strace
//! watching from outside the filter, to see what the denied syscalls return.
//!
//! strace cannot run under the workload's profile (it needs `ptrace`, `wait4`, ...),
//! and a tracer outside the container (tracing `runc run` from the host) changed
//! the workload's behaviour. So strace is the container's process, under a
//! container filter widened by what strace and the wrapper need (measured, in
//! `data/observer`), and `tether __exec-confined` installs the exact profile on
//! itself before it execs the workload ([`crate::process::exec_confined`]).
//! Stacked filters give the most restrictive answer, so the widening never reaches
//! the workload.

use crate::ValidatorError;
use crate::process::EXEC_CONFINED;
use crate::runc::{RunOutcome, RunSpec, run_captured, run_in_runc};
use crate::trace::Returns;
use crate::validate::{Runtime, strace_path};
use profile_store::render::SyscallRule;
use profile_store::{Abi, SeccompProfile};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The measured set, for the strace version measured (see its README).
const EXTRA: &str = include_str!("../data/observer/strace-6.1.json");

/// Where the probe directory is mounted and the trace files go, in the container.
const PROBE: &str = "/probe";
/// Where the `tether` binary is mounted in the container.
const WRAPPER: &str = "/.tether/tether";
/// The `-ff` output prefix: files are `enforce-trace.<pid>`.
const TRACE: &str = "enforce-trace";

#[derive(Deserialize)]
struct ExtraFile {
    syscalls: Vec<String>,
}

/// The syscalls strace and the wrapper make under the container's filter.
pub fn extra_set() -> Result<BTreeSet<String>, ValidatorError> {
    let file: ExtraFile = serde_json::from_str(EXTRA)
        .map_err(|e| ValidatorError::Filter(format!("data/observer/strace-6.1.json: {e}")))?;
    Ok(file.syscalls.into_iter().collect())
}

/// The container's filter for the observed run: `profile` with `extra` allowed.
///
/// Names in `extra` leave the profile's errno rules too (a profile may deny
/// `ptrace` explicitly); the wrapper's filter still answers them for the workload.
pub fn container_profile(profile: &SeccompProfile, extra: &BTreeSet<String>) -> SeccompProfile {
    let mut wide = profile.clone();
    for rule in wide.syscalls.iter_mut().filter(|r| r.action != "SCMP_ACT_ALLOW") {
        rule.names.retain(|n| !extra.contains(n));
    }
    wide.syscalls.retain(|r| !r.names.is_empty());
    let allowed = profile.allowed();
    let missing: Vec<String> = extra
        .iter()
        .filter(|n| !allowed.contains(n.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        wide.syscalls.push(SyscallRule {
            names: missing,
            action: "SCMP_ACT_ALLOW".into(),
            errno_ret: None,
        });
    }
    wide
}

/// How the observed run went.
#[derive(Debug, Clone)]
pub struct Observation {
    /// How it ended; `None` when it was killed at the deadline.
    pub outcome: Option<RunOutcome>,
    /// What the denied syscalls returned.
    pub returns: Returns,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ValidatorError + '_ {
    move |source| ValidatorError::Io {
        what: what.to_string(),
        source,
    }
}

/// Runs `cmd` under exactly `profile`, traced from outside the filter; `exe` is a
/// `tether` binary (it provides the hidden `__exec-confined` subcommand).
pub fn observe(
    cmd: &[String],
    profile: &SeccompProfile,
    runtime: Runtime,
    timeout: Duration,
    exe: &Path,
) -> Result<Observation, ValidatorError> {
    // Refuse early what the wrapper would refuse inside the container, where the
    // reason would only be a line of stderr.
    crate::process::filters(profile)?;
    let strace = strace_path()?;
    let dir = tempfile::Builder::new()
        .prefix("tether-observe-")
        .tempdir()
        .map_err(io("creating the observation directory"))?;
    let profile_json =
        serde_json::to_vec(profile).map_err(|e| ValidatorError::Filter(format!("serializing the profile: {e}")))?;
    std::fs::write(dir.path().join("profile.json"), profile_json).map_err(io("writing the profile"))?;
    // -ff: one file per process, so no call is split into `<unfinished ...>` and
    // `<... resumed>` halves and every return stays on its call's line.
    let traced = |strace: &Path, out: &str, wrapper: &str, profile: &str, like_runc: bool| {
        let mut args = vec![
            strace.display().to_string(),
            "-ff".into(),
            "-o".into(),
            out.to_string(),
            "--".into(),
            wrapper.to_string(),
            EXEC_CONFINED.into(),
        ];
        if like_runc {
            args.push("--like-runc".into());
        }
        args.extend(["--profile".into(), profile.to_string(), "--".into()]);
        args.extend(cmd.iter().cloned());
        args
    };
    let outcome = match runtime {
        Runtime::Runc => {
            let args = traced(
                &strace,
                &format!("{PROBE}/{TRACE}"),
                WRAPPER,
                &format!("{PROBE}/profile.json"),
                true,
            );
            let mut spec = RunSpec::new(args);
            spec.profile = Some(container_profile(profile, &extra_set()?));
            spec.mounts.push((dir.path().to_path_buf(), PROBE.into()));
            spec.read_only_mounts.push((exe.to_path_buf(), WRAPPER.into()));
            spec.timeout = timeout;
            // No CAP_SYS_PTRACE: strace traces its own child, which needs none
            // (measured, data/observer/README.md), and the workload keeps the
            // plain run's capabilities.
            run_in_runc(&spec)
        }
        Runtime::Process => {
            let scratch = dir.path().join("work");
            std::fs::create_dir_all(&scratch).map_err(io("creating the scratch directory"))?;
            let args = traced(
                &strace,
                &dir.path().join(TRACE).display().to_string(),
                &exe.display().to_string(),
                &dir.path().join("profile.json").display().to_string(),
                false,
            );
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]).current_dir(&scratch);
            run_captured(c, timeout, |_| {})
        }
    };
    let outcome = match outcome {
        Ok(out) => Some(out),
        Err(ValidatorError::Timeout(_)) => None,
        Err(e) => return Err(e),
    };
    let prefix = format!("{TRACE}.");
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .map_err(io("listing the trace files"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    let allowed = profile.allowed();
    let returns = Returns::from_files(&files, Abi::host(), |name| !allowed.contains(name))
        .map_err(io("reading the observed trace"))?;
    Ok(Observation { outcome, returns })
}
