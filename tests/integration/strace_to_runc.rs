//! The whole loop on a real program: trace it with strace, build its profile with
//! `tether build`, and run it under that profile in runc.

use crate::common::{store_in, tether};
use profile_store::SeccompProfile;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use validator::{RunSpec, run_in_runc};

const KEY: &str = "staging/pod/lister/main";

/// Traces `args` with `strace -f -o PREFIX` (or `-ff`), returning the trace path.
fn strace(dir: &Path, ff: bool, args: &[&str]) -> std::path::PathBuf {
    let out = dir.join("trace");
    let mut cmd = Command::new("strace");
    cmd.arg("-f");
    if ff {
        cmd.arg("-ff");
    }
    let status = cmd
        .arg("-o")
        .arg(&out)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("strace is installed on every machine here (.ci/run installs it)");
    assert!(status.success(), "strace {args:?} failed");
    out
}

/// Syscall names in strace output, read independently of tether's parser: the word
/// before `(` after an optional pid, on lines that are calls.
fn traced_names(files: &[std::path::PathBuf]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let line = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
            if line.starts_with("+++") || line.starts_with("---") || line.starts_with("<...") {
                continue;
            }
            if let Some((name, _)) = line.split_once('(') {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn build_profile(dir: &Path, from: &Path) -> SeccompProfile {
    let store = store_in(dir);
    tether(&[
        "build",
        "--from",
        from.to_str().unwrap(),
        "--store",
        &store,
        "--strace-key",
        KEY,
    ])
    .expect_code(0);
    let shown = tether(&["profiles", "show", KEY, "--store", &store]).expect_code(0);
    serde_json::from_str(&shown.stdout).unwrap()
}

fn runtime_base() -> BTreeSet<String> {
    profile_store::RuntimeBase::select("runc").unwrap().syscalls
}

const PROGRAM: [&str; 4] = ["/bin/ls", "-l", "/usr/share/common-licenses", "/etc/hostname"];

#[test]
fn profile_from_strace_allows_every_traced_syscall_and_runs_the_program_under_runc() {
    let dir = tempfile::tempdir().unwrap();
    let trace = strace(dir.path(), false, &PROGRAM);
    let profile = build_profile(dir.path(), &trace);
    let allowed = profile.allowed();
    let traced = traced_names(&[trace]);
    assert!(traced.len() > 15, "suspiciously short trace: {traced:?}");
    for name in traced.iter().chain(runtime_base().iter()) {
        assert!(
            allowed.contains(name.as_str()),
            "{name} traced or needed by runc but not allowed"
        );
    }

    let host = Command::new(PROGRAM[0]).args(&PROGRAM[1..]).output().unwrap();
    // Kubernetes' default (no_new_privileges false) loads the filter earlier in runc
    // than allowPrivilegeEscalation: false does; both must work.
    for no_new_privileges in [false, true] {
        let mut spec = RunSpec::new(PROGRAM);
        spec.profile = Some(profile.clone());
        spec.no_new_privileges = no_new_privileges;
        let run = run_in_runc(&spec).unwrap();
        assert!(run.success(), "NNP={no_new_privileges}: {:?}\n{}", run.exit, run.stderr);
        assert_eq!(
            run.stdout,
            String::from_utf8_lossy(&host.stdout),
            "same output as on the host"
        );
    }
}

/// runc 1.1 checks that /proc/self/fd is on procfs after loading the filter: a base
/// set without `fstatfs` cannot start any container.
#[test]
fn runc_base_set_without_fstatfs_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let trace = strace(dir.path(), false, &["/bin/true"]);
    let mut profile = build_profile(dir.path(), &trace);
    assert!(profile.allowed().contains("fstatfs"));
    profile.syscalls[0].names.retain(|n| n != "fstatfs");
    let mut spec = RunSpec::new(["/bin/true"]);
    spec.profile = Some(profile);
    let run = run_in_runc(&spec).unwrap();
    assert!(!run.success());
    assert!(
        run.stderr.contains("ensure /proc/self/fd is on procfs"),
        "{}",
        run.stderr
    );
}

#[test]
fn ff_traces_give_the_same_profile_as_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["/bin/sh", "-c", "/bin/ls /usr >/dev/null; /bin/cat /etc/hostname"];
    let one = strace(&dir.path().join("one").tap_mkdir(), false, &args);
    let ff = strace(&dir.path().join("ff").tap_mkdir(), true, &args);
    let a = build_profile(&dir.path().join("one"), &one);
    let b = build_profile(&dir.path().join("ff"), &ff);
    assert_eq!(a.allowed(), b.allowed());
}

#[test]
fn a_profile_that_lacks_what_the_program_needs_breaks_it_under_runc() {
    let dir = tempfile::tempdir().unwrap();
    // Learn from `true`, then run `ls`: getdents64 and friends are not allowed.
    let trace = strace(dir.path(), false, &["/bin/true"]);
    let profile = build_profile(dir.path(), &trace);
    let ls_trace = strace(&dir.path().join("ls").tap_mkdir(), false, &PROGRAM);
    let allowed = profile.allowed();
    let lacking: Vec<String> = traced_names(&[ls_trace])
        .into_iter()
        .filter(|n| !allowed.contains(n.as_str()))
        .collect();
    assert!(!lacking.is_empty(), "ls needs nothing beyond what true does?");
    let mut spec = RunSpec::new(PROGRAM);
    spec.profile = Some(profile.clone());
    let run = run_in_runc(&spec).unwrap();
    assert!(!run.success(), "ls ran without {lacking:?}: {}", run.stdout);
    // And the same profile is enough for `true` itself.
    let mut spec = RunSpec::new(["/bin/true"]);
    spec.profile = Some(profile);
    let run = run_in_runc(&spec).unwrap();
    assert!(run.success(), "{:?} {}", run.exit, run.stderr);
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
