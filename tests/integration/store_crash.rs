//! Crash safety of the file store (issue #8): real `tether` processes writing to
//! an FsStore are killed with SIGKILL at random moments, 200 times, and after
//! every kill the store must be whole: it opens, every record parses, every
//! version file hashes to its name, every version a record lists (and its
//! Log-mode variant) exists, `keys()` and the webhook's index see exactly the
//! workloads with a record, and nothing but the store's own temporary files
//! lies beside them. At the end, the temporary files the kills left must be
//! swept by the next writers once they are stale, so they cannot pile up.
//!
//! The kills are drawn from a seeded RNG; the seed is printed, and
//! `TETHER_CRASH_SEED=<seed>` replays a failure.

use crate::common::{store_in, tether, tether_command};
use profile_store::store::{STALE_TEMP, is_temp, node_files};
use profile_store::{FsStore, ProfileStore, Version, WorkloadKey};
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use webhook::index::{Index, Lookup};

/// Processes killed.
const KILLS: usize = 200;
/// Workloads in one build: small, so that 200 builds take seconds, yet enough
/// that a build spends most of its time writing records and versions.
const GROUP: usize = 8;
/// Builds over one group of workloads before the next group: later builds of a
/// group add syscalls (new versions) and rewrite records; a new group creates
/// directories and first versions.
const BUILDS_PER_GROUP: usize = 12;

/// Syscalls the workloads are seen making, a few at random per build.
const SYSCALLS: &[&str] = &[
    "read",
    "write",
    "openat",
    "close",
    "fstat",
    "mmap",
    "mprotect",
    "munmap",
    "brk",
    "ioctl",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "access",
    "pipe",
    "select",
    "sched_yield",
    "mremap",
    "madvise",
    "dup",
    "dup2",
    "nanosleep",
    "getpid",
    "sendfile",
    "socket",
    "connect",
    "accept",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "bind",
    "listen",
    "getsockname",
    "getpeername",
    "setsockopt",
    "getsockopt",
    "wait4",
    "uname",
    "fcntl",
    "flock",
    "fsync",
    "fdatasync",
    "ftruncate",
    "getcwd",
    "chdir",
    "rename",
    "mkdir",
    "rmdir",
    "unlink",
    "readlink",
    "umask",
    "getrlimit",
    "getuid",
    "getgid",
    "epoll_wait",
    "epoll_ctl",
    "futex",
];

fn workload(group: usize, i: usize) -> String {
    format!("app{group}-{i}")
}

fn key_of(group: usize, i: usize) -> String {
    format!("crash/deployment/{}/c", workload(group, i))
}

/// A Tetragon export line: `name`'s pod made syscall `syscall`.
fn event(name: &str, syscall: &str, second: usize) -> String {
    format!(
        r#"{{"process_kprobe":{{"process":{{"pid":9,"pod":{{"namespace":"crash","name":"{name}-5d9c7b8f4-x2x9z","container":{{"name":"c"}},"pod_labels":{{"pod-template-hash":"5d9c7b8f4"}},"workload":"{name}","workload_kind":"Deployment"}}}},"function_name":"__x64_sys_{syscall}"}},"node_name":"n1","time":"2026-11-01T00:{:02}:{:02}Z"}}"#,
        second / 60 % 60,
        second % 60
    )
}

/// Events of every workload of `groups`, each making a few syscalls drawn from
/// `rng` (and, one in four, ptrace, which then waits for an approval).
fn events(path: &Path, groups: std::ops::Range<usize>, rng: &mut fastrand::Rng) {
    let mut lines = Vec::new();
    for g in groups {
        for i in 0..GROUP {
            let name = workload(g, i);
            let mut calls: Vec<&str> = (0..4).map(|_| SYSCALLS[rng.usize(..SYSCALLS.len())]).collect();
            if rng.usize(..4) == 0 {
                calls.push("ptrace");
            }
            for c in calls {
                lines.push(event(&name, c, lines.len()));
            }
        }
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// What [`check_whole`] found.
#[derive(Debug, Default)]
struct Whole {
    keys: usize,
    versions: usize,
    /// Temporary files (`.tmp-*`) lying in the store.
    temps: Vec<PathBuf>,
}

/// The directories `depth` levels below `dir`.
fn dirs_below(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut level = vec![dir.to_path_buf()];
    for _ in 0..depth {
        level = level
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap()))
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.path())
            .collect();
    }
    level
}

/// Temporary files anywhere under `dir`.
fn temps_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            temps_under(&entry.path(), out);
        } else if is_temp(&entry.file_name()) {
            out.push(entry.path());
        }
    }
}

/// Asserts the store at `root` is whole (see the module comment); `ctx` says
/// which kill left it so.
fn check_whole(root: &Path, ctx: &str) -> Whole {
    let store = FsStore::open(root).unwrap_or_else(|e| panic!("{ctx}: the store does not open: {e}"));
    if let Some(token) = store
        .generation()
        .unwrap_or_else(|e| panic!("{ctx}: the generation is unreadable: {e}"))
    {
        assert!(!token.trim().is_empty(), "{ctx}: the generation file is empty");
    }
    let mut whole = Whole::default();
    temps_under(root, &mut whole.temps);
    let mut with_record = BTreeSet::new();
    let workloads = root.join("workloads");
    let leaves = if workloads.exists() {
        dirs_below(&workloads, 4)
    } else {
        Vec::new()
    };
    for leaf in leaves {
        let rel: Vec<String> = leaf
            .strip_prefix(&workloads)
            .unwrap()
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let key = WorkloadKey::new(&rel[0], &rel[1], &rel[2], &rel[3])
            .unwrap_or_else(|e| panic!("{ctx}: {} is not a workload directory: {e}", leaf.display()));
        let mut has_record = false;
        for entry in std::fs::read_dir(&leaf).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.as_str() {
                "record.json" => has_record = true,
                ".lock" => {}
                "versions" => {
                    for v in std::fs::read_dir(entry.path()).unwrap() {
                        let v = v.unwrap();
                        if is_temp(&v.file_name()) {
                            continue;
                        }
                        let file = v.file_name().to_string_lossy().into_owned();
                        let version: Version = file
                            .strip_suffix(".json")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or_else(|| panic!("{ctx}: {} is not a version file", v.path().display()));
                        // The store's own check: the bytes hash to the name and parse.
                        store
                            .profile(&key, &version)
                            .unwrap_or_else(|e| panic!("{ctx}: version {version} of {key}: {e}"));
                        whole.versions += 1;
                    }
                }
                _ if is_temp(&entry.file_name()) => {}
                _ => panic!("{ctx}: unexpected file {}", entry.path().display()),
            }
        }
        if !has_record {
            // A writer killed before its first record: the directory holds no
            // workload yet, and must not be listed as one.
            continue;
        }
        let record = store
            .record(&key)
            .unwrap_or_else(|e| panic!("{ctx}: the record of {key}: {e}"))
            .unwrap_or_else(|| panic!("{ctx}: the record of {key} vanished"));
        for meta in &record.state.versions {
            let profile = store
                .profile(&key, &meta.version)
                .unwrap_or_else(|e| panic!("{ctx}: {key} lists version {}: {e}", meta.version));
            // The installer writes both files of a version to the nodes.
            let [_, log] = node_files(&key, &profile);
            store
                .profile(&key, &log.version)
                .unwrap_or_else(|e| panic!("{ctx}: the Log-mode variant of {key} {}: {e}", meta.version));
        }
        with_record.insert(key);
    }
    let keys: BTreeSet<WorkloadKey> = store.keys().unwrap().into_iter().collect();
    assert_eq!(
        keys, with_record,
        "{ctx}: keys() differs from the directories with a record"
    );
    let index = Index::load(&store, None).unwrap_or_else(|e| panic!("{ctx}: the webhook index does not load: {e}"));
    for key in &keys {
        assert!(index.entry(key).is_some(), "{ctx}: the index misses {key}");
    }
    whole.keys = keys.len();
    whole
}

/// Spawns `tether ARGS`, kills it with SIGKILL after `delay` (unless it is done
/// by then), and returns whether the kill ended it, with its stderr.
fn run_and_kill(args: &[&str], delay: Duration) -> (bool, std::process::ExitStatus, String) {
    let mut child = tether_command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // Killing a child that has exited but was not reaped yet is harmless.
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let killed = out.status.signal() == Some(9);
    (killed, out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn timed(args: &[&str]) -> Duration {
    let t = Instant::now();
    tether(args).expect_code(0);
    t.elapsed()
}

#[test]
fn sigkilled_writers_leave_the_store_whole() {
    let started = Instant::now();
    let seed = std::env::var("TETHER_CRASH_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("TETHER_CRASH_SEED: a number"))
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("store_crash: seed {seed} (replay with TETHER_CRASH_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let root = PathBuf::from(&store);
    let from = dir.path().join("events.jsonl");
    let from_s = from.to_str().unwrap().to_string();

    // How long uninterrupted runs take: the kills are spread over all of a run
    // (and a little past it, so some runs finish and are checked whole too).
    events(&from, 0..1, &mut rng);
    let build_time = timed(&["build", "--from", &from_s, "--store", &store])
        .max(timed(&["build", "--from", &from_s, "--store", &store]));
    let key0 = key_of(0, 0);
    let command_time = timed(&[
        "profiles", "fallback", "set", &key0, "--reason", "timing", "--store", &store,
    ])
    .max(timed(&["profiles", "fallback", "clear", &key0, "--store", &store]));
    eprintln!(
        "store_crash: an uninterrupted build of {GROUP} workloads takes {build_time:?}, a profiles command {command_time:?}"
    );

    // The spans follow how long runs really take on a machine whose load
    // changes under the test: a run that ends before its kill shortens its
    // kind's span, a killed one lengthens it, so about four kills in five land
    // while the process runs (0.8 x ln 1.02 = 0.2 x ln(1 / 0.93)).
    let mut spans = [build_time, command_time];
    let (mut killed, mut builds, mut max_temps) = (0, 0, 0);
    let mut groups = 1;
    for kill in 0..KILLS {
        let (args, kind): (Vec<String>, usize) = if kill % 4 == 3 {
            // Rewrite a record the way operators do: approve, pin, fall back.
            let fs = FsStore::open(&root).unwrap();
            let keys = fs.keys().unwrap();
            let key = &keys[rng.usize(..keys.len())];
            let record = fs.record(key).unwrap().unwrap();
            let k = key.to_string();
            let args: Vec<String> = match (rng.usize(..4), record.state.versions.len()) {
                (0, _) => vec!["profiles".into(), "approve".into(), k, "ptrace".into()],
                (1, n) if n > 0 => {
                    let v = &record.state.versions[rng.usize(..n)].version;
                    vec!["profiles".into(), "activate".into(), k, v.to_string()]
                }
                (2, _) => vec!["profiles".into(), "fallback".into(), "clear".into(), k],
                _ => vec![
                    "profiles".into(),
                    "fallback".into(),
                    "set".into(),
                    k,
                    "--reason".into(),
                    format!("kill {kill}"),
                ],
            };
            (args, 1)
        } else {
            let group = builds / BUILDS_PER_GROUP;
            builds += 1;
            groups = groups.max(group + 1);
            events(&from, group..group + 1, &mut rng);
            (vec!["build".into(), "--from".into(), from_s.clone()], 0)
        };
        let mut args = args;
        args.extend(["--store".to_string(), store.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let delay = spans[kind].mul_f64(rng.f64() * 1.2);
        let (was_killed, status, stderr) = run_and_kill(&args, delay);
        spans[kind] = spans[kind].mul_f64(if was_killed { 1.02 } else { 0.93 });
        let ctx = format!("kill {kill} (seed {seed}): `tether {}` after {delay:?}", args.join(" "));
        if was_killed {
            killed += 1;
        } else {
            // A run that finished must have found the store whole too: builds
            // succeed; profile commands may refuse (ptrace never seen, already
            // approved) but never because of what an earlier kill left.
            assert!(
                status.success() || (args[0] == "profiles" && status.code() == Some(1)),
                "{ctx}: {status}\n{stderr}"
            );
            for bad in ["corrupt", "does not hash", "not a tether", "No such file"] {
                assert!(!stderr.contains(bad), "{ctx}: {stderr}");
            }
        }
        let whole = check_whole(&root, &ctx);
        max_temps = max_temps.max(whole.temps.len());
    }
    let before = check_whole(&root, "after the kills");

    // The leftovers must not pile up: once stale (backdated here instead of
    // waiting a minute), the next writers of each directory remove them. A
    // build over every workload touches every workload directory; opening the
    // store sweeps the root.
    let stale = SystemTime::now() - STALE_TEMP - Duration::from_secs(1);
    for t in &before.temps {
        std::fs::File::options()
            .write(true)
            .open(t)
            .unwrap()
            .set_modified(stale)
            .unwrap();
    }
    events(&from, 0..groups, &mut rng);
    tether(&["build", "--from", &from_s, "--store", &store]).expect_code(0);
    let after = check_whole(&root, "after a complete build");
    assert!(
        after.temps.is_empty(),
        "stale temporary files survived a build over every workload: {:?}",
        after.temps
    );
    assert_eq!(after.keys, groups * GROUP);

    eprintln!(
        "store_crash: {KILLS} runs, {killed} ended by SIGKILL; {} workloads, {} version files; \
         at most {max_temps} temporary files left at once, {} before the sweep, 0 after; {:?} in all",
        after.keys,
        after.versions,
        before.temps.len(),
        started.elapsed()
    );
    // Most kills must land while the process runs, or the test proves little.
    assert!(
        killed >= KILLS / 2,
        "only {killed} of {KILLS} runs were killed before they ended"
    );
    assert!(
        !before.temps.is_empty(),
        "no kill interrupted a write (no temporary file left): the kills missed the write phase"
    );
}
