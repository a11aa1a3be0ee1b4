//! Synthetic Tetragon exports for benchmarks and tests: lines shaped like the real
//! samples (process_exec and process_exit, syscall kprobes, raw_syscalls tracepoints
//! in each argument shape, rate-limit reports, host processes, `kubectl exec`
//! shells), with process objects as long as real ones.

use crate::abi::Abi;
use std::io::{self, Write};

/// Syscalls the generated workloads make, most frequent first.
const CALLS: [&str; 40] = [
    "read",
    "write",
    "futex",
    "epoll_wait",
    "recvfrom",
    "sendto",
    "openat",
    "close",
    "newfstatat",
    "mmap",
    "munmap",
    "mprotect",
    "brk",
    "rt_sigaction",
    "rt_sigprocmask",
    "getpid",
    "gettid",
    "clock_gettime",
    "nanosleep",
    "accept4",
    "socket",
    "connect",
    "bind",
    "listen",
    "setsockopt",
    "getsockopt",
    "ioctl",
    "fcntl",
    "lseek",
    "pread64",
    "pwrite64",
    "writev",
    "readv",
    "getdents64",
    "clone3",
    "execve",
    "wait4",
    "exit_group",
    "getrandom",
    "statx",
];

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SynthOptions {
    /// Distinct workloads.
    pub workloads: usize,
    /// Pods (replicas) per workload.
    pub pods_per_workload: usize,
    /// Seed, for reproducible files.
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            workloads: 300,
            pods_per_workload: 3,
            seed: 42,
        }
    }
}

struct Workload {
    namespace: String,
    pod_prefix: String,
    labels: String,
    workload: String,
    kind: &'static str,
    container: String,
    image: String,
}

fn workloads(opts: &SynthOptions, rng: &mut fastrand::Rng) -> Vec<Workload> {
    (0..opts.workloads)
        .map(|i| {
            let namespace = format!("team-{}", i % 17);
            let name = format!("svc-{i}");
            let hash = format!("{:010x}", rng.u64(..)).chars().take(10).collect::<String>();
            let (kind, pod_prefix, labels) = match i % 4 {
                0 | 1 => (
                    "Deployment",
                    format!("{name}-{hash}-"),
                    format!(r#""app":"{name}","pod-template-hash":"{hash}","version":"v{}","team":"team-{}""#, i % 5, i % 17),
                ),
                2 => ("DaemonSet", format!("{name}-"), format!(r#""app":"{name}","controller-revision-hash":"{hash}","pod-template-generation":"3""#)),
                _ => ("Pod", format!("{name}-"), format!(r#""app":"{name}","statefulset.kubernetes.io/pod-name":"POD","apps.kubernetes.io/pod-index":"IDX""#)),
            };
            Workload {
                namespace,
                pod_prefix,
                labels,
                workload: name.clone(),
                kind,
                container: format!("c{}", i % 3),
                image: format!("registry.example.com/team-{}/{name}", i % 17),
            }
        })
        .collect()
}

fn process(w: Option<(&Workload, usize)>, pid: u32, in_init: bool, rng: &mut fastrand::Rng) -> String {
    let exec_id: String = (0..48).map(|_| rng.alphanumeric()).collect();
    let parent_id: String = (0..48).map(|_| rng.alphanumeric()).collect();
    let pod = match w {
        None => String::new(),
        Some((w, replica)) => {
            let (name, labels, workload, kind) = if w.kind == "Pod" {
                let name = format!("{}{replica}", w.pod_prefix);
                let labels = w.labels.replace("POD", &name).replace("IDX", &replica.to_string());
                (name.clone(), labels, name, "Pod")
            } else {
                (
                    format!("{}{:05x}", w.pod_prefix, replica * 7919 % 0xfffff),
                    w.labels.clone(),
                    w.workload.clone(),
                    w.kind,
                )
            };
            format!(
                r#","pod":{{"namespace":"{ns}","name":"{name}","container":{{"id":"containerd://{cid:064x}","name":"{c}","image":{{"id":"{img}@sha256:{digest:064x}","name":"{img}:1.{v}"}},"start_time":"2024-05-01T10:00:00Z","pid":1{probe}}},"pod_labels":{{{labels}}},"workload":"{workload}","workload_kind":"{kind}"}}"#,
                ns = w.namespace,
                cid = u128::from(pid) * 31,
                c = w.container,
                img = w.image,
                digest = u128::from(pid) * 17,
                v = pid % 9,
                probe = if !in_init && pid.is_multiple_of(3) {
                    r#","maybe_exec_probe":true"#
                } else {
                    ""
                },
            )
        }
    };
    format!(
        r#"{{"exec_id":"{exec_id}","pid":{pid},"uid":1000,"cwd":"/app","binary":"/usr/local/bin/server","arguments":"--config /etc/app/config.yaml --listen :8080 --log-level info","flags":"execve rootcwd clone","start_time":"2024-05-01T10:00:01.123456789Z","auid":4294967295{pod},"docker":"{pid:031x}","parent_exec_id":"{parent_id}","refcnt":1,"tid":{pid}{init}}}"#,
        init = if in_init { "" } else { r#","in_init_tree":false"# },
    )
}

/// Writes about `bytes` bytes of Tetragon export lines to `out`; returns the bytes
/// written (whole lines, so slightly more than asked).
pub fn generate(out: &mut dyn Write, bytes: u64, opts: &SynthOptions) -> io::Result<u64> {
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let ws = workloads(opts, &mut rng);
    let mut written = 0u64;
    let mut t: u64 = 1_714_557_600_000_000_000; // 2024-05-01T10:00:00Z in ns
    let mut line = String::with_capacity(4096);
    while written < bytes {
        t += rng.u64(1_000..5_000_000);
        let (secs, nanos) = (t / 1_000_000_000, t % 1_000_000_000);
        let time = jiff::Timestamp::new(secs as i64, nanos as i32)
            .map(|ts| ts.to_string())
            .unwrap_or_default();
        let node = format!("node-{}", rng.usize(..40));
        let roll = rng.u32(..1000);
        let w = &ws[rng.usize(..ws.len())];
        let replica = rng.usize(..opts.pods_per_workload.max(1));
        let pid = rng.u32(100..4_000_000);
        let host = roll.is_multiple_of(50);
        let in_init = !roll.is_multiple_of(97);
        let who = if host { None } else { Some((w, replica)) };
        line.clear();
        if roll == 999 {
            line.push_str(&format!(
                r#"{{"rate_limit_info":{{"number_of_dropped_process_events":"{}"}},"node_name":"{node}","time":"{time}"}}"#,
                rng.u32(1..5000)
            ));
        } else if roll < 100 {
            let p = process(who, pid, in_init, &mut rng);
            let parent = process(who, pid.saturating_sub(1), true, &mut rng);
            line.push_str(&format!(
                r#"{{"process_exec":{{"process":{p},"parent":{parent}}},"node_name":"{node}","time":"{time}"}}"#
            ));
        } else if roll < 150 {
            let p = process(who, pid, in_init, &mut rng);
            line.push_str(&format!(r#"{{"process_exit":{{"process":{p},"signal":"","status":0,"time":"{time}"}},"node_name":"{node}","time":"{time}"}}"#));
        } else {
            // Skewed towards the first calls, as real workloads are.
            let call = CALLS[(rng.usize(..CALLS.len()) * rng.usize(..CALLS.len())) / CALLS.len()];
            let p = process(who, pid, in_init, &mut rng);
            let parent = process(who, pid.saturating_sub(1), true, &mut rng);
            if roll < 600 {
                line.push_str(&format!(
                    r#"{{"process_kprobe":{{"process":{p},"parent":{parent},"function_name":"__x64_sys_{call}","args":[{{"int_arg":3}},{{"size_arg":"4096"}}],"action":"KPROBE_ACTION_POST","policy_name":"syscalls"}},"node_name":"{node}","time":"{time}"}}"#
                ));
            } else {
                let nr = Abi::X86_64.lookup(call).map_or(0, |(n, _)| n);
                let arg = match roll % 7 {
                    0 | 1 => format!(r#"{{"size_arg":"{nr}"}}"#),
                    2 => format!(r#"{{"long_arg":"{nr}"}}"#),
                    _ => format!(r#"{{"syscall_id":{{"id":{nr},"abi":"x64"}}}}"#),
                };
                line.push_str(&format!(
                    r#"{{"process_tracepoint":{{"process":{p},"parent":{parent},"subsys":"raw_syscalls","event":"sys_enter","args":[{arg}],"policy_name":"raw-syscalls","action":"TRACEPOINT_ACTION_POST"}},"node_name":"{node}","time":"{time}"}}"#
                ));
            }
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Ingest, IngestOptions};

    #[test]
    fn generated_lines_parse_cleanly_and_cover_the_shapes() {
        let mut buf = Vec::new();
        generate(&mut buf, 2_000_000, &SynthOptions::default()).unwrap();
        let text = String::from_utf8(buf).unwrap();
        for shape in [
            "\"syscall_id\":",
            "\"size_arg\":\"",
            "\"long_arg\":\"",
            "__x64_sys_",
            "process_exec",
            "process_exit",
            "rate_limit_info",
            "\"in_init_tree\":false",
        ] {
            assert!(text.contains(shape), "{shape}");
        }
        let mut ingest = Ingest::new(IngestOptions::default());
        ingest.read_tetragon("synth", &mut text.as_bytes()).unwrap();
        let (baselines, report) = ingest.finish();
        assert_eq!(report.malformed, 0, "{:?}", report.malformed_samples);
        assert!(baselines.len() > 100);
        assert!(baselines.iter().any(|b| b.key.kind() == "statefulset"));
        assert!(report.host_events > 0 && report.not_in_init_tree > 0 && report.exec_probe_events > 0);
        let avg = text.len() / text.lines().count();
        assert!(avg > 1500, "lines as long as real ones: {avg}");
    }
}
