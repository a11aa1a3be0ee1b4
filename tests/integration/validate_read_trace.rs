//! `tether validate --read-trace`: the staging Job's trace read back. The
//! container command `tether validate --pod` prints is run here for real (host
//! strace in place of the Job's copy), its stdout and stderr in one file as a
//! container log is, and that log is judged.

use crate::common::{store_in, tether, tether_stdin};
use crate::validate_under_filter::allow_list;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A program that prints on both streams (so the log mixes its output with the
/// trace), forks, pipes and makes a directory.
const SCRIPT: &str =
    "echo starting; echo 'a warning' >&2; printf 'b\\na\\n' | sort | wc -l; mkdir d && rmdir d; echo done";

fn pod(script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  namespace: shop\nspec:\n  containers:\n  - name: main\n    image: registry.example/app:1\n    command: [\"/bin/sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

/// The main container's command in the Job `tether validate --pod` prints.
fn job_command(dir: &Path, script: &str) -> Vec<String> {
    let pod_file = dir.join("pod.yaml");
    std::fs::write(&pod_file, pod(script)).unwrap();
    let run = tether(&[
        "validate",
        "--pod",
        pod_file.to_str().unwrap(),
        "--strace-image",
        "registry.example/strace:6.1",
    ])
    .expect_code(0);
    let job: Value = serde_json::from_str(&run.stdout).unwrap();
    serde_json::from_value(job["spec"]["template"]["spec"]["containers"][0]["command"].clone()).unwrap()
}

/// Runs the Job's container command here (`/probe/bin/strace` is the host's
/// strace), both streams into one file, as the kubelet keeps a container's log.
fn job_log(dir: &Path, name: &str, script: &str) -> PathBuf {
    let command = job_command(dir, script);
    assert_eq!(command[0], "/probe/bin/strace", "{command:?}");
    let log = dir.join(name);
    let file = std::fs::File::create(&log).unwrap();
    let work = dir.join(format!("{name}.work"));
    std::fs::create_dir_all(&work).unwrap();
    let status = Command::new("strace")
        .args(&command[1..])
        .current_dir(&work)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the traced program failed: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    log
}

/// How often `name` was called in a `strace -f` log: lines that start the call,
/// after the `[pid N] ` prefix of child processes.
fn calls(log: &Path, name: &str) -> u64 {
    let text = std::fs::read_to_string(log).unwrap();
    let start = format!("{name}(");
    text.lines()
        .map(|l| match l.strip_prefix("[pid ") {
            Some(rest) => rest.split_once("] ").map_or("", |(_, call)| call),
            None => l,
        })
        .filter(|call| call.starts_with(&start))
        .count() as u64
}

fn build(log: &Path, key: &str, store: &str) {
    tether(&[
        "build",
        "--from",
        log.to_str().unwrap(),
        "--strace-key",
        key,
        "--store",
        store,
    ])
    .expect_code(0);
}

fn listed(store: &str, key: &str) -> Value {
    let list = tether(&["profiles", "list", "--store", store, "--json"]).expect_code(0);
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .cloned()
        .unwrap_or_else(|| panic!("{key} not listed: {list}"))
}

/// The listed row's active version is marked Validated.
fn assert_active_validated(row: &Value) {
    assert_eq!(
        row["active"]["status"].as_str().map(str::to_lowercase).as_deref(),
        Some("validated"),
        "{row}"
    );
}

#[test]
fn read_trace_of_the_printed_jobs_log_passes_under_its_profile_and_marks_it_validated() {
    let dir = tempfile::tempdir().unwrap();
    let log = job_log(dir.path(), "main.log", SCRIPT);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("starting\n") && text.contains("a warning\n"),
        "the log holds the program's output too: {text}"
    );
    let store = store_in(dir.path());
    let key = "shop/pod/app/main";
    build(&log, key, &store);
    let run = tether(&[
        "validate",
        "--read-trace",
        log.to_str().unwrap(),
        "--key",
        key,
        "--store",
        &store,
    ])
    .expect_code(0);
    assert!(run.stdout.starts_with("PASS: trace"), "{}", run.stdout);
    assert!(run.stderr.contains("is Validated"), "{}", run.stderr);
    let row = listed(&store, key);
    assert_active_validated(&row);
}

#[test]
fn read_trace_names_a_syscall_the_profile_lacks_with_its_count_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let log = job_log(dir.path(), "main.log", SCRIPT);
    let store = store_in(dir.path());
    let key = "shop/pod/app/main";
    build(&log, key, &store);
    let shown = tether(&["profiles", "show", key, "--store", &store]).expect_code(0);
    let mut profile: Value = serde_json::from_str(&shown.stdout).unwrap();
    let mkdir = if calls(&log, "mkdir") > 0 { "mkdir" } else { "mkdirat" };
    let expected = calls(&log, mkdir);
    assert!(expected > 0, "the program made no {mkdir}");
    let names = allow_list(&mut profile);
    let before = names.len();
    names.retain(|n| n != mkdir);
    assert_eq!(names.len(), before - 1, "{mkdir} was not allowed");
    let lacking = dir.path().join("lacking.json");
    std::fs::write(&lacking, serde_json::to_vec(&profile).unwrap()).unwrap();

    let run = tether(&[
        "validate",
        "--read-trace",
        log.to_str().unwrap(),
        "--profile",
        lacking.to_str().unwrap(),
        "--json",
    ])
    .expect_code(1);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["pass"], false);
    assert_eq!(report["add"], serde_json::json!([mkdir]));
    assert_eq!(report["denied"][0]["name"], mkdir);
    assert_eq!(report["denied"][0]["count"], expected);
    assert!(report["other_lines"].as_u64().unwrap() >= 3, "{report}");

    // The same through stdin, as `kubectl logs ... | tether validate --read-trace -`.
    let bytes = std::fs::read(&log).unwrap();
    let run = tether_stdin(
        &["validate", "--read-trace", "-", "--profile", lacking.to_str().unwrap()],
        Some(&bytes),
    )
    .expect_code(1);
    assert!(run.stdout.starts_with("FAIL: trace -"), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("{mkdir:<18} {expected:>6}x -> EPERM")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("add to the profile: {mkdir}\n")),
        "{}",
        run.stdout
    );
}

#[test]
fn read_trace_update_learns_the_trace_into_a_new_draft_judged_against_it() {
    let dir = tempfile::tempdir().unwrap();
    let small = job_log(dir.path(), "small.log", "echo starting");
    let log = job_log(dir.path(), "main.log", SCRIPT);
    let store = store_in(dir.path());
    let key = "shop/pod/app/main";
    build(&small, key, &store);
    let first = listed(&store, key)["active"]["version"].as_str().unwrap().to_string();
    let args = [
        "validate",
        "--read-trace",
        log.to_str().unwrap(),
        "--key",
        key,
        "--store",
        &store,
    ];
    // Without --update a failing trace changes nothing.
    tether(&args).expect_code(1);
    assert_eq!(listed(&store, key)["versions"], 1);

    let mut update = args.to_vec();
    update.push("--update");
    let run = tether(&update).expect_code(0);
    assert!(run.stdout.starts_with("FAIL: trace"), "{}", run.stdout);
    assert!(run.stdout.contains("\nPASS: trace"), "{}", run.stdout);
    assert!(run.stderr.contains("new draft version"), "{}", run.stderr);
    let row = listed(&store, key);
    assert_eq!(row["versions"], 2, "{row}");
    assert_ne!(row["active"]["version"], first.as_str(), "{row}");
    assert_active_validated(&row);
}

#[test]
fn read_trace_of_output_without_a_trace_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],"syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
    )
    .unwrap();
    let run = tether_stdin(
        &["validate", "--read-trace", "-", "--profile", profile.to_str().unwrap()],
        Some(b"listening on :8080\nready\n"),
    )
    .expect_code(2);
    assert!(run.stderr.contains("no strace line in 2 line(s)"), "{}", run.stderr);
}
