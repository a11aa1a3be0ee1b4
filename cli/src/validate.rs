//! `tether validate`: replay a workload with its profile and tell whether the
//! profile would break it.

use anyhow::{Context, Result, bail};
use clap::Args;
use profile_store::store::{VersionStatus, localhost_profile, rerender};
use profile_store::{Abi, ProfileStore, SeccompProfile, Version, WorkloadKey};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use validator::ValidatorError;
use validator::validate::Runtime;

#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// The profile to check (OCI seccomp JSON).
    #[arg(long, env = "TETHER_PROFILE", value_name = "FILE", conflicts_with_all = ["key", "pod"])]
    profile: Option<PathBuf>,
    /// Check this workload's active profile from the store instead.
    #[arg(long, env = "TETHER_KEY", value_name = "KEY", requires = "store")]
    key: Option<WorkloadKey>,
    /// The profile store (with --key, --update or --pod): a directory, or
    /// `kube://` (see `tether build --help`).
    #[arg(long, env = "TETHER_STORE", value_name = "DIR|kube://")]
    store: Option<crate::StoreLocation>,
    /// Where to run: runc (a container, as a node would; the default when runc is
    /// installed) or process (this host, the filter installed before exec).
    #[arg(long, env = "TETHER_VALIDATE_RUNTIME")]
    runtime: Option<Runtime>,
    /// Print the report as JSON.
    #[arg(long, env = "TETHER_JSON")]
    json: bool,
    /// Kill a run after this many seconds.
    #[arg(long, env = "TETHER_TIMEOUT", default_value_t = 120)]
    timeout: u64,
    /// With --key: when the probe (or the --read-trace trace) shows syscalls the
    /// profile lacks, merge them into the baseline, render a new draft version, and
    /// validate that one.
    #[arg(long, env = "TETHER_UPDATE", requires = "key")]
    update: bool,
    /// Instead of running anything: print the Job that replays this pod's containers
    /// in a staging namespace (`kubectl apply -f -`); each container's log is its
    /// trace, for --read-trace.
    #[arg(long, value_name = "FILE.yaml", conflicts_with_all = ["profile", "key"])]
    pod: Option<PathBuf>,
    /// The staging namespace for --pod.
    #[arg(long, env = "TETHER_STAGING_NAMESPACE", default_value = "tether-staging")]
    namespace: String,
    /// For --pod: an image with a static strace at /strace.
    #[arg(long, env = "TETHER_STRACE_IMAGE", value_name = "IMAGE")]
    strace_image: Option<String>,
    /// Instead of running anything: judge the trace a staging Job wrote (the
    /// `strace -f` output of a container of the Job `--pod` printed, as
    /// `kubectl logs job/NAME -c CONTAINER` shows it; `-` for stdin) against
    /// --profile FILE or --key KEY's active version.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["pod", "command"])]
    read_trace: Option<PathBuf>,
    /// The command to replay, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `tether __exec-confined`. No `env` fallbacks: the workload's environment must
/// not steer the wrapper.
#[derive(Debug, Args)]
pub(crate) struct ExecConfinedArgs {
    /// The profile to install (OCI seccomp JSON).
    #[arg(long, value_name = "FILE")]
    profile: PathBuf,
    /// Answer ENOSYS for syscalls above the profile's highest, as runc 1.1 does.
    #[arg(long)]
    like_runc: bool,
    /// The command to exec under the profile.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Installs the profile and execs the command; returns only when that fails: with
/// runc's exit code 1 under `--like-runc` (so the traced run ends as the plain one
/// does), else with a shell's codes (127: not found, 126: could not run it).
pub(crate) fn exec_confined(args: ExecConfinedArgs) -> ExitCode {
    use validator::process::{Above, exec_confined};
    let above = if args.like_runc { Above::Enosys } else { Above::Default };
    let e = exec_confined(&args.profile, above, &args.command);
    eprintln!("tether {}: {e}", validator::process::EXEC_CONFINED);
    match e {
        _ if args.like_runc => ExitCode::from(1),
        ValidatorError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ExitCode::from(127),
        _ => ExitCode::from(126),
    }
}

const EXIT_BREAKS: u8 = 1;
const EXIT_USAGE: u8 = 2;

pub(crate) fn run(args: ValidateArgs) -> Result<ExitCode> {
    if let Some(pod) = &args.pod {
        return job(&args, pod).map(|()| ExitCode::SUCCESS);
    }
    let Some((profile, target)) = target(&args)? else {
        eprintln!("error: say which profile: --profile FILE, or --key KEY --store DIR");
        return Ok(ExitCode::from(EXIT_USAGE));
    };
    if let Some(source) = &args.read_trace {
        return read_trace(&args, source, &profile, target);
    }
    let runtime = match args.runtime {
        Some(r) => r,
        None if validator::runc_path().is_ok() => Runtime::Runc,
        None => Runtime::Process,
    };

    let timeout = Duration::from_secs(args.timeout.max(1));
    // This binary is the observer: it has the hidden `__exec-confined` subcommand.
    // Without a path to it, the report says returns were not observed.
    let exe = std::env::current_exe().ok();
    let outcome = validator::validate(&args.command, &profile, runtime, timeout, exe.as_deref());
    let (report, usage) = match outcome {
        Ok(r) => r,
        Err(e) => return Ok(environment_error(e)),
    };
    print(&report, args.json)?;
    conclude(target, report.pass, args.update, &usage, |new_profile| {
        let (second, _) = match validator::validate(&args.command, new_profile, runtime, timeout, exe.as_deref()) {
            Ok(r) => r,
            Err(e) => return Ok(Err(environment_error(e))),
        };
        print(&second, args.json)?;
        Ok(Ok(second.pass))
    })
}

/// What follows a check of a store's version: a pass marks it Validated; a
/// failure with `--update` teaches the baseline `usage`, renders a new draft and
/// checks it with `recheck` (which prints its report and says whether it passed,
/// or gives the exit code of a run that could not be made), marking it Validated
/// when it passes. Without a store, the verdict alone.
fn conclude(
    target: Option<Target>,
    pass: bool,
    update: bool,
    usage: &validator::trace::Usage,
    recheck: impl FnOnce(&SeccompProfile) -> Result<Result<bool, ExitCode>>,
) -> Result<ExitCode> {
    let Some((store, key, version)) = target else {
        return Ok(verdict(pass));
    };
    if pass {
        mark_validated(store.as_ref(), &key, &version)?;
        eprintln!("{key}: version {version} is Validated");
        return Ok(ExitCode::SUCCESS);
    }
    if !update {
        return Ok(ExitCode::from(EXIT_BREAKS));
    }
    let Some((new_profile, new)) = learn(store.as_ref(), &key, usage)? else {
        return Ok(ExitCode::from(EXIT_BREAKS));
    };
    let second = match recheck(&new_profile)? {
        Ok(pass) => pass,
        Err(code) => return Ok(code),
    };
    if second {
        mark_validated(store.as_ref(), &key, &new)?;
        eprintln!("{key}: version {new} is Validated");
    }
    Ok(verdict(second))
}

/// The baseline learns from staging: merges `usage` into `key`'s baseline and
/// renders a new draft version; returns it, or `None` when nothing was rendered.
fn learn(
    store: &dyn ProfileStore,
    key: &WorkloadKey,
    usage: &validator::trace::Usage,
) -> Result<Option<(SeccompProfile, Version)>> {
    let mut rendered = None;
    store.update(key, &mut |record| {
        record.baseline.merge(&usage.to_baseline(key.clone(), Abi::host()));
        rendered = Some(rerender(store, record, jiff::Timestamp::now())?);
        Ok(())
    })?;
    let Some(outcome) = rendered else {
        return Ok(None);
    };
    if !outcome.rendered.needs_review.is_empty() {
        eprintln!(
            "{key}: the probe made dangerous syscalls that need approval first: {} (`tether profiles approve {key} ...`)",
            outcome.rendered.needs_review.join(" ")
        );
    }
    let new = outcome.rendered.version.clone();
    eprintln!(
        "{key}: new draft version {new} (+{}); validating it",
        outcome.added.join(" +")
    );
    Ok(Some((outcome.rendered.profile, new)))
}

/// `--read-trace`: judges a staging Job's trace against the profile; with
/// `--update` and a store, a failing trace teaches the baseline and the new
/// draft is judged against the same trace. Exit codes as a local run's.
fn read_trace(
    args: &ValidateArgs,
    source: &std::path::Path,
    profile: &SeccompProfile,
    target: Option<Target>,
) -> Result<ExitCode> {
    let (name, text) = if source.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading the trace from stdin")?;
        ("-".to_string(), text)
    } else {
        let bytes = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        (
            source.display().to_string(),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    };
    // The node's ABI is taken to be this host's: strace names syscalls, so only
    // the baseline's ABI tag depends on it.
    let usage = validator::readback::usage_of(&text, Abi::host());
    let report = match validator::readback::judge_trace(&name, &usage, profile) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    print_trace(&report, args.json)?;
    conclude(target, report.pass, args.update, &usage, |new_profile| {
        let second = validator::readback::judge_trace(&name, &usage, new_profile)?;
        print_trace(&second, args.json)?;
        Ok(Ok(second.pass))
    })
}

fn print_trace(report: &validator::readback::TraceReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(())
}

/// A store, a workload in it, and the version checked.
type Target = (crate::DynStore, WorkloadKey, Version);

/// The profile to check, and where it came from when it is a store's; `None`
/// when the invocation names none.
fn target(args: &ValidateArgs) -> Result<Option<(SeccompProfile, Option<Target>)>> {
    Ok(match (&args.profile, &args.key) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some((
                parse_profile(&text).with_context(|| format!("{}", path.display()))?,
                None,
            ))
        }
        (None, Some(key)) => {
            let here = crate::StoreLocation::Dir(".".into());
            let store = args.store.as_ref().unwrap_or(&here).open(false)?;
            let record = store
                .record(key)?
                .ok_or_else(|| profile_store::StoreError::UnknownWorkload { key: key.clone() })?;
            let Some(active) = record.active() else {
                bail!("{key} has no version yet; run `tether build` first");
            };
            let version = active.version.clone();
            Some((store.profile(key, &version)?, Some((store, key.clone(), version))))
        }
        _ => None,
    })
}

fn verdict(pass: bool) -> ExitCode {
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BREAKS)
    }
}

fn environment_error(e: ValidatorError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_USAGE)
}

fn print(report: &validator::Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(())
}

/// Reads an OCI seccomp profile; refuses conditional rules, which a name-level
/// comparison would misjudge.
fn parse_profile(text: &str) -> Result<SeccompProfile> {
    let v: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    for (i, rule) in v["syscalls"].as_array().into_iter().flatten().enumerate() {
        for field in ["args", "includes", "excludes"] {
            let present = match &rule[field] {
                serde_json::Value::Null => false,
                serde_json::Value::Array(a) => !a.is_empty(),
                serde_json::Value::Object(o) => !o.is_empty(),
                _ => true,
            };
            if present {
                bail!(
                    "syscalls[{i}] has `{field}`: conditional rules are not supported; validate a profile rendered by tether"
                );
            }
        }
    }
    serde_json::from_value(v).context("not an OCI seccomp profile (defaultAction, architectures, syscalls)")
}

fn mark_validated(store: &dyn ProfileStore, key: &WorkloadKey, version: &Version) -> Result<()> {
    store.update(key, &mut |record| {
        for v in record.state.versions.iter_mut().filter(|v| &v.version == version) {
            v.status = VersionStatus::Validated;
        }
        Ok(())
    })?;
    Ok(())
}

fn job(args: &ValidateArgs, pod_path: &PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(pod_path).with_context(|| format!("reading {}", pod_path.display()))?;
    let pod = validator::job::read_pod(&text).with_context(|| format!("{}", pod_path.display()))?;
    let Some(strace_image) = args.strace_image.clone() else {
        bail!(
            "--pod needs --strace-image IMAGE: an image with a static strace at /strace (application images rarely have strace)"
        );
    };
    let mut profiles = Vec::new();
    match &args.store {
        Some(location) => {
            let store = location.open(false)?;
            let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let spec = pod.spec.clone().unwrap_or_default();
            let names = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .map(|c| c.name.clone());
            for name in names {
                let key = webhook::decide::container_key(&webhook::slim::PodView::of(&pod), &ns, &name)
                    .map_err(anyhow::Error::msg)?;
                let Some(record) = store.record(&key)? else {
                    eprintln!("warning: no profile for {key}; container {name} runs without one");
                    continue;
                };
                if let Some(active) = record.active() {
                    let log = store.profile(&key, &active.version)?.log_variant().version();
                    profiles.push((name, localhost_profile(&key, &log)));
                }
            }
        }
        None => eprintln!(
            "warning: without --store no profile is set in the Job; the containers run as the staging namespace's webhook decides"
        ),
    }
    let job = validator::job::replay_job(
        &pod,
        &validator::job::JobOptions {
            namespace: args.namespace.clone(),
            strace_image,
            profiles,
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&job)?);
    Ok(())
}
