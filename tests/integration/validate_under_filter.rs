//! The observed enforce run: what the denied syscalls of a real program return
//! under its profile (strace in the container, the profile installed in-process by
//! the hidden `tether __exec-confined`), and that watching does not change what the
//! program does.

use crate::common::{run_probed, store_in, tether};
use serde_json::Value;
use std::path::Path;

/// Probes `args` in runc `rounds` times, builds a profile from the traces, and
/// returns it.
fn profile_from_probes(dir: &Path, key: &str, args: &[&str], rounds: usize) -> Value {
    let store = store_in(dir);
    for round in 0..rounds {
        let probe = dir.join(format!("probe{round}"));
        let out = run_probed(&probe, args);
        assert!(out.stderr.is_empty() || out.success(), "{args:?} probe: {}", out.stderr);
        let trace = probe.join("trace");
        tether(&[
            "build",
            "--from",
            trace.to_str().unwrap(),
            "--strace-key",
            key,
            "--store",
            &store,
        ])
        .expect_code(0);
    }
    let shown = tether(&["profiles", "show", key, "--store", &store]).expect_code(0);
    serde_json::from_str(&shown.stdout).unwrap()
}

/// The names of the profile's SCMP_ACT_ALLOW rule.
pub fn allow_list(profile: &mut Value) -> &mut Vec<Value> {
    profile["syscalls"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["action"] == "SCMP_ACT_ALLOW")
        .unwrap()["names"]
        .as_array_mut()
        .unwrap()
}

fn validate(dir: &Path, profile: &Value, runtime: &str, args: &[&str]) -> (i32, Value) {
    let file = dir.join(format!("profile-{}.json", rand_suffix()));
    std::fs::write(&file, serde_json::to_vec(profile).unwrap()).unwrap();
    let mut cmd = vec![
        "validate",
        "--json",
        "--timeout",
        "30",
        "--runtime",
        runtime,
        "--profile",
        file.to_str().unwrap(),
        "--",
    ];
    cmd.extend_from_slice(args);
    let run = tether(&cmd);
    let v = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr));
    (run.code, v)
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The returns of `name` under the filter, by errno.
fn returns<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["under_filter"]["returns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == name)
        .collect()
}

#[test]
fn denied_syscall_returns_are_observed_under_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let help = tether(&["--help"]).expect_code(0);
    assert!(!help.stdout.contains("exec-confined"), "hidden: {}", help.stdout);

    // uname(1) handles EPERM: it prints an error and exits 1. `uname` is also in
    // the set strace needs in the container, so this shows that set does not reach
    // the workload.
    let uname = ["/bin/uname", "-a"];
    let mut profile = profile_from_probes(&dir.path().join("uname"), "t/pod/uname/main", &uname, 1);
    allow_list(&mut profile).retain(|n| n != "uname");
    for runtime in ["runc", "process"] {
        let (code, report) = validate(dir.path(), &profile, runtime, &uname);
        assert_eq!(code, 1, "{runtime}: {report:#}");
        assert!(
            report["add"].as_array().unwrap().iter().any(|a| a == "uname"),
            "{report:#}"
        );
        let u = &report["under_filter"];
        assert_eq!(u["observed"], true, "{runtime}: {u:#}");
        assert_eq!(u["same_as_plain"], true, "{runtime}: {u:#}");
        let r = returns(&report, "uname");
        assert_eq!(r.len(), 1, "{runtime}: {u:#}");
        assert_eq!(r[0]["errno"], "EPERM", "{runtime}: {u:#}");
        assert!(r[0]["count"].as_u64().unwrap() >= 1);
        let call = r[0]["first"]["call"].as_str().unwrap();
        assert!(call.starts_with("uname(") && call.contains("EPERM"), "{call}");
        assert_eq!(u["run"]["exit_code"], 1, "{runtime}: {u:#}");
    }

    // xz with two threads: clone3 answered ENOSYS, glibc falls back to clone and
    // the pipeline works; the ENOSYS returns are seen under the filter.
    let xz = [
        "/bin/sh",
        "-c",
        "head -c 300000 /usr/bin/ls | xz -T2 -c | xz -dc | wc -c",
    ];
    let mut profile = profile_from_probes(&dir.path().join("xz"), "t/pod/xz/main", &xz, 2);
    let names = allow_list(&mut profile);
    assert!(
        names.iter().any(|n| n == "clone3"),
        "xz -T2 makes threads with clone3 here"
    );
    names.retain(|n| n != "clone3");
    let rules = profile["syscalls"].as_array_mut().unwrap();
    rules.retain(|r| r["action"] == "SCMP_ACT_ALLOW");
    rules.push(serde_json::json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}));
    let (code, report) = validate(dir.path(), &profile, "runc", &xz);
    assert_eq!(code, 0, "{report:#}");
    let r = returns(&report, "clone3");
    assert_eq!(r.len(), 1, "{:#}", report["under_filter"]);
    assert_eq!(r[0]["errno"], "ENOSYS");
    assert!(r[0]["count"].as_u64().unwrap() >= 1);
    assert_eq!(report["under_filter"]["same_as_plain"], true);
    let human = {
        let file = dir.path().join("xz-enosys.json");
        std::fs::write(&file, serde_json::to_vec(&profile).unwrap()).unwrap();
        let mut cmd = vec!["validate", "--timeout", "30", "--profile", file.to_str().unwrap(), "--"];
        cmd.extend_from_slice(&xz);
        tether(&cmd).expect_code(0).stdout
    };
    assert!(
        human.contains("under the filter (traced), denied syscalls returned:") && human.contains("clone3"),
        "{human}"
    );
}

/// A tracer outside the container once made `ls -l` hang under a lacking profile.
/// Traced inside, the workload must end as the plain run does: same exit status,
/// output and error messages, and no hang.
#[test]
fn ls_under_lacking_profiles_behaves_the_same_traced_and_plain() {
    let dir = tempfile::tempdir().unwrap();
    let ls = ["/bin/ls", "-l", "/usr", "/etc/passwd"];
    let full = profile_from_probes(&dir.path().join("ls"), "t/pod/ls/main", &ls, 1);
    let present: Vec<String> = full["syscalls"][0]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    // Calls ls handles (stat, xattrs, nss sockets, the terminal check) and one it
    // cannot survive (mmap: the loader dies). None is in runc's base set: without
    // those runc itself fails in the plain run (checked below).
    let lacking: Vec<&str> = ["statx", "lgetxattr", "getxattr", "socket", "ioctl", "mmap"]
        .into_iter()
        .filter(|n| present.iter().any(|p| p == n))
        .collect();
    assert!(lacking.len() >= 4, "ls -l made few of the expected calls: {present:?}");
    let mut summary = Vec::new();
    for name in lacking {
        let mut profile = full.clone();
        allow_list(&mut profile).retain(|n| n != name);
        let (code, report) = validate(dir.path(), &profile, "runc", &ls);
        assert_eq!(code, 1, "without {name}: {report:#}");
        let (plain, traced) = (&report["enforce"], &report["under_filter"]["run"]);
        assert_eq!(
            traced["timed_out"], false,
            "without {name}: the traced run hung: {report:#}"
        );
        assert_eq!(plain["timed_out"], false, "without {name}: {report:#}");
        assert_eq!(traced["exit_code"], plain["exit_code"], "without {name}: {report:#}");
        assert_eq!(
            traced["stdout_bytes"], plain["stdout_bytes"],
            "without {name}: {report:#}"
        );
        assert_eq!(
            traced["stderr_tail"], plain["stderr_tail"],
            "without {name}: {report:#}"
        );
        assert_eq!(
            report["under_filter"]["same_as_plain"], true,
            "without {name}: {report:#}"
        );
        assert_eq!(report["under_filter"]["observed"], true, "without {name}: {report:#}");
        let seen = returns(&report, name);
        assert!(
            seen.iter().any(|r| r["errno"] == "EPERM"),
            "without {name}: no EPERM seen: {:#}",
            report["under_filter"]
        );
        summary.push(format!("{name}: exit {} both", plain["exit_code"]));
    }
    eprintln!("{}", summary.join("\n"));

    // Without `openat`, which runc needs after loading the filter, the plain run
    // fails in runc; the traced run's wider container filter lets runc start, and
    // the report says why the runs differ.
    let mut profile = full.clone();
    allow_list(&mut profile).retain(|n| n != "openat");
    let (code, report) = validate(dir.path(), &profile, "runc", &ls);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["under_filter"]["same_as_plain"], false, "{report:#}");
    let note = report["under_filter"]["note"].as_str().unwrap_or_default();
    assert!(note.contains("runc itself failed under the profile"), "{note}");
}
