//! `tether profiles` over a store built by `tether build`.

use crate::common::{store_in, tether};
use std::path::Path;

fn event(function: &str, time: &str) -> String {
    format!(
        r#"{{"process_kprobe":{{"process":{{"pid":9,"pod":{{"namespace":"prod","name":"debugger-5d9c7b8f4-x2x9z","container":{{"name":"gdb"}},"pod_labels":{{"pod-template-hash":"5d9c7b8f4"}},"workload":"debugger","workload_kind":"Deployment"}}}},"function_name":"{function}"}},"node_name":"n1","time":"{time}"}}"#
    )
}

fn write_events(path: &Path, functions: &[&str]) {
    let lines: Vec<String> = functions
        .iter()
        .enumerate()
        .map(|(i, f)| event(f, &format!("2024-05-01T00:00:{:02}Z", i)))
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

const KEY: &str = "prod/deployment/debugger/gdb";

fn versions(store: &str) -> Vec<String> {
    let show = tether(&["profiles", "show", KEY, "--store", store, "--json"]).expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn review_gate_approve_diff_and_activate() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = dir.path().join("events.json");
    write_events(&events, &["__x64_sys_read", "__x64_sys_ptrace", "__x64_sys_write"]);
    let build = tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    let row = build.stdout.lines().find(|l| l.starts_with(KEY)).unwrap();
    assert!(row.contains("ptrace"), "needs review: {row}");

    let first = tether(&["profiles", "show", KEY, "--store", &store]).expect_code(0);
    assert!(!first.stdout.contains("\"ptrace\""));

    // Only dangerous calls take approvals, and only real names.
    let run = tether(&["profiles", "approve", KEY, "read", "--store", &store]).expect_code(1);
    assert!(run.stderr.contains("needs no approval"), "{}", run.stderr);
    let run = tether(&["profiles", "approve", KEY, "ptrace_me", "--store", &store]).expect_code(1);
    assert!(run.stderr.contains("not a syscall name"), "{}", run.stderr);

    let approve = tether(&["profiles", "approve", KEY, "ptrace", "--store", &store]).expect_code(0);
    assert!(approve.stdout.contains("new version"), "{}", approve.stdout);
    let v = versions(&store);
    assert_eq!(v.len(), 2);
    let diff = tether(&["profiles", "diff", KEY, &v[0], &v[1], "--store", &store]).expect_code(0);
    assert_eq!(diff.stdout.trim(), "+ ptrace");
    let diff = tether(&["profiles", "diff", KEY, &v[0], &v[1], "--store", &store, "--json"]).expect_code(0);
    let d: serde_json::Value = serde_json::from_str(&diff.stdout).unwrap();
    assert_eq!(d["added"], serde_json::json!(["ptrace"]));
    assert_eq!(d["removed"], serde_json::json!([]));

    // The newest is active until activate pins another; a later build keeps the pin.
    let shown = tether(&["profiles", "show", KEY, "--store", &store]).expect_code(0);
    assert!(shown.stdout.contains("\"ptrace\""));
    tether(&["profiles", "activate", KEY, &v[0], "--store", &store]).expect_code(0);
    let shown = tether(&["profiles", "show", KEY, "--store", &store]).expect_code(0);
    assert!(!shown.stdout.contains("\"ptrace\""));
    write_events(&events, &["__x64_sys_socket"]);
    tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    assert_eq!(versions(&store).len(), 3);
    let list = tether(&["profiles", "list", "--store", &store]).expect_code(0);
    let row = list.stdout.lines().find(|l| l.starts_with(KEY)).unwrap();
    assert!(row.contains(&format!("{} (pinned)", v[0])), "{row}");

    let run = tether(&["profiles", "activate", KEY, "0123456789ab", "--store", &store]).expect_code(1);
    assert!(run.stderr.contains("has no version 0123456789ab"), "{}", run.stderr);
    let run = tether(&["profiles", "show", "prod/deployment/other/gdb", "--store", &store]).expect_code(1);
    assert!(
        run.stderr.contains("no workload prod/deployment/other/gdb"),
        "{}",
        run.stderr
    );
}

#[test]
fn profiles_on_a_directory_that_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let run = tether(&["profiles", "list", "--store", dir.path().to_str().unwrap()]).expect_code(1);
    assert!(run.stderr.contains("not a tether store"), "{}", run.stderr);
}
