//! `tether build` over real Tetragon samples.

use crate::common::{data, store_in, tether, tether_stdin};

#[test]
fn build_prints_a_baseline_for_each_workload_in_the_docs_samples() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("tetragon/docs-events.jsonl");
    let run = tether(&["build", "--from", events.to_str().unwrap(), "--store", &store]).expect_code(0);
    for key in [
        "default/pod/xwing/spaceship",
        "default/deployment/deathstar/deathstar",
        "default/pod/tiefighter/spaceship",
        "tenant-jobs/pod/elasticsearch-56f8fc6988-sh8rm/elasticsearch",
    ] {
        assert!(run.stdout.contains(key), "{key} missing from:\n{}", run.stdout);
    }
    // setns is dangerous: held for review, not allowed.
    let xwing = run
        .stdout
        .lines()
        .find(|l| l.starts_with("default/pod/xwing/spaceship"))
        .unwrap();
    assert!(xwing.contains("setns"), "{xwing}");
    assert!(run.stderr.contains("63 lines"), "{}", run.stderr);

    let profile = tether(&["profiles", "show", "default/pod/xwing/spaceship", "--store", &store]).expect_code(0);
    let p: serde_json::Value = serde_json::from_str(&profile.stdout).unwrap();
    let allowed: Vec<&str> = p["syscalls"][0]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(allowed.contains(&"setuid") && allowed.contains(&"setgid"));
    assert!(!allowed.contains(&"setns"));
}

#[test]
fn build_twice_with_the_same_input_keeps_the_version_and_doubles_the_counts() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("tetragon/docs-events.jsonl");
    let args = ["build", "--from", events.to_str().unwrap(), "--store", &store, "--json"];
    let first: serde_json::Value = serde_json::from_str(&tether(&args).expect_code(0).stdout).unwrap();
    let second: serde_json::Value = serde_json::from_str(&tether(&args).expect_code(0).stdout).unwrap();
    let row = |v: &serde_json::Value| {
        v["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["key"] == "default/pod/xwing/spaceship")
            .cloned()
            .unwrap()
    };
    assert_eq!(row(&first)["new_version"], true);
    assert_eq!(row(&second)["new_version"], false);
    assert_eq!(row(&first)["version"], row(&second)["version"]);
    assert_eq!(first["report"]["malformed"], 0);
    let list = tether(&["profiles", "list", "--store", &store, "--json"]).expect_code(0);
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let xwing = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["key"] == "default/pod/xwing/spaceship")
        .unwrap();
    assert_eq!(xwing["versions"], 1);
}

#[test]
fn stdin_input_and_malformed_line_summary() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let good = std::fs::read_to_string(data("tetragon/docs-events.jsonl")).unwrap();
    let mut input = String::from("{\"broken\": \n");
    input.push_str(&good);
    input.push_str("not json at all\n");
    let run = tether_stdin(&["build", "--from", "-", "--store", &store], Some(input.as_bytes())).expect_code(0);
    assert!(run.stderr.contains("2 malformed line(s)"), "{}", run.stderr);
    assert!(run.stderr.contains("-:1:"), "{}", run.stderr);
    assert!(run.stderr.contains("-:65:"), "{}", run.stderr);
    assert!(run.stdout.contains("default/pod/xwing/spaceship"));
}

#[test]
fn a_missing_input_fails_before_the_store_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("tetragon/docs-events.jsonl");
    let run = tether(&[
        "build",
        "--from",
        events.to_str().unwrap(),
        "--from",
        "/nonexistent/tetragon.log",
        "--store",
        &store,
    ])
    .expect_code(1);
    assert!(run.stderr.contains("/nonexistent/tetragon.log"), "{}", run.stderr);
    assert!(!std::path::Path::new(&store).exists(), "the store was created anyway");
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let run = tether(&[
        "build",
        "--from",
        "x",
        "--store",
        "y",
        "--strace-key",
        "default/deployment/Bad",
    ])
    .expect_code(2);
    assert!(run.stderr.contains("namespace/kind/name/container"), "{}", run.stderr);
    let run = tether(&["build", "--from", "x", "--store", "y", "--runtime", "youki"]).expect_code(1);
    assert!(run.stderr.contains("unknown runtime `youki`"), "{}", run.stderr);
    tether(&["profiles", "frobnicate"]).expect_code(2);
}

#[test]
fn every_flag_reads_its_env_var() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let events = data("tetragon/docs-events.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["build"])
        .env("TETHER_FROM", &events)
        .env("TETHER_STORE", &store)
        .env("TETHER_JSON", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["workloads"].as_array().unwrap().len() >= 5);
}
