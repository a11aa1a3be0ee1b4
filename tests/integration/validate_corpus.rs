//! The validator on real programs nobody here wrote, in runc: probe, build the
//! profile from the probe, validate it (passes with the same output), then remove
//! one syscall the program needs and watch `tether validate` fail naming it.

use crate::common::{run_probed, store_in, tether};
use std::path::Path;

struct Program {
    name: &'static str,
    args: &'static [&'static str],
    /// Syscalls the program needs, in order of preference: the first one the probe
    /// shows is the one removed.
    needs: &'static [&'static str],
}

const PY_HTTP: &str = "import http.server as h, threading, urllib.request\n\
s = h.HTTPServer(('127.0.0.1', 0), h.SimpleHTTPRequestHandler)\n\
t = threading.Thread(target=s.handle_request); t.start()\n\
print(urllib.request.urlopen(f'http://127.0.0.1:{s.server_port}/').status)\n\
t.join()";

const CURL: &str = "import http.server as h, threading, subprocess\n\
s = h.HTTPServer(('127.0.0.1', 0), h.SimpleHTTPRequestHandler)\n\
threading.Thread(target=s.handle_request).start()\n\
r = subprocess.run(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', f'http://127.0.0.1:{s.server_port}/'], capture_output=True, text=True)\n\
print('curl', r.stdout)";

const PROGRAMS: &[Program] = &[
    Program {
        name: "python-threads-http",
        args: &["/usr/bin/python3", "-c", PY_HTTP],
        needs: &["socket", "bind"],
    },
    Program {
        name: "perl-files-signals",
        args: &[
            "/usr/bin/perl",
            "-e",
            "open(my $f, '>', '/tmp/x') or die; print $f \"hi\\n\"; close $f; open($f, '<', '/tmp/x') or die; print <$f>; $SIG{USR1} = sub { print \"got USR1\\n\" }; kill 'USR1', $$; print \"done\\n\";",
        ],
        needs: &["kill", "rt_sigaction"],
    },
    Program {
        name: "sh-tar-gzip-pipeline",
        args: &[
            "/bin/sh",
            "-c",
            "mkdir -p /tmp/d && echo hello > /tmp/d/a && tar -C /tmp -cf - d | gzip -c | gzip -dc | tar -tvf - | wc -l",
        ],
        needs: &["pipe2", "pipe", "wait4"],
    },
    Program {
        name: "git-init-commit",
        args: &[
            "/bin/sh",
            "-c",
            "cd /tmp && git init -q r && cd r && echo x > f && git add f && git -c user.name=t -c user.email=t@example.com commit -qm first && git log --format=%s",
        ],
        needs: &["rename", "renameat", "mkdir"],
    },
    Program {
        name: "openssl-digest",
        args: &["/bin/sh", "-c", "echo tether | openssl dgst -sha256 -r"],
        needs: &["pipe2", "pipe", "wait4"],
    },
    Program {
        name: "sqlite3",
        args: &[
            "/usr/bin/sqlite3",
            "/tmp/t.db",
            "create table t(x); insert into t values (1), (2), (39); select sum(x) from t;",
        ],
        needs: &["pwrite64", "fsync", "fdatasync", "unlink"],
    },
    Program {
        name: "jq",
        args: &["/bin/sh", "-c", "echo '{\"a\":[1,2,3]}' | jq -c '.a | map(. * 2)'"],
        needs: &["pipe2", "pipe", "wait4"],
    },
    Program {
        name: "curl-local-server",
        args: &["/usr/bin/python3", "-c", CURL],
        needs: &["connect", "socket"],
    },
    Program {
        name: "xz-threads",
        args: &[
            "/bin/sh",
            "-c",
            "head -c 300000 /usr/bin/ls | xz -T2 -c | xz -dc | wc -c",
        ],
        needs: &["pipe2", "pipe", "futex"],
    },
];

fn traced(dir: &Path, args: &[&str]) -> (String, std::path::PathBuf) {
    let probe = dir.join("probe");
    let out = run_probed(&probe, args);
    assert!(out.success(), "{args:?} failed when probed: {}", out.stderr);
    (out.stdout, probe.join("trace"))
}

fn validate_json(args: &[&str]) -> (i32, serde_json::Value) {
    let run = tether(args);
    let v = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr));
    (run.code, v)
}

#[test]
fn corpus_of_real_programs_passes_under_its_profile_and_fails_naming_a_removed_syscall() {
    let mut summary = Vec::new();
    for p in PROGRAMS {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        let key = format!("corpus/pod/{}/main", p.name);
        // Two probes, as a baseline gathers many observations: threads make some
        // calls (futex waits, polls) only in some runs.
        for round in 0..2 {
            let (probe_out, trace) = traced(&dir.path().join(format!("probe{round}")), p.args);
            assert!(!probe_out.is_empty(), "{} printed nothing", p.name);
            tether(&[
                "build",
                "--from",
                trace.to_str().unwrap(),
                "--strace-key",
                &key,
                "--store",
                &store,
            ])
            .expect_code(0);
        }

        let mut args = vec![
            "validate",
            "--json",
            "--timeout",
            "30",
            "--key",
            &key,
            "--store",
            &store,
            "--",
        ];
        args.extend_from_slice(p.args);
        let (code, report) = validate_json(&args);
        assert_eq!(code, 0, "{}: {report:#}", p.name);
        assert_eq!(report["same_output"], true, "{}", p.name);
        assert_eq!(report["under_filter"]["observed"], true, "{}: {report:#}", p.name);
        let list = tether(&["profiles", "list", "--store", &store]).expect_code(0);
        assert!(list.stdout.contains("validated"), "{}: {}", p.name, list.stdout);

        // Remove one syscall the program needs.
        let shown = tether(&["profiles", "show", &key, "--store", &store]).expect_code(0);
        let mut profile: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
        let names = profile["syscalls"][0]["names"].as_array_mut().unwrap();
        let removed = p
            .needs
            .iter()
            .find(|n| names.iter().any(|x| x == **n))
            .unwrap_or_else(|| panic!("{}: none of {:?} in its profile", p.name, p.needs));
        names.retain(|x| x != *removed);
        let file = dir.path().join("lacking.json");
        std::fs::write(&file, serde_json::to_vec(&profile).unwrap()).unwrap();
        let mut args = vec![
            "validate",
            "--json",
            "--timeout",
            "30",
            "--profile",
            file.to_str().unwrap(),
            "--",
        ];
        args.extend_from_slice(p.args);
        let (code, report) = validate_json(&args);
        assert_eq!(code, 1, "{} without {removed}: {report:#}", p.name);
        assert!(
            report["add"].as_array().unwrap().iter().any(|a| a == *removed),
            "{} without {removed}: {report:#}",
            p.name
        );
        // The removed syscall's EPERM returns are seen under the filter.
        assert!(
            report["under_filter"]["returns"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == *removed && r["errno"] == "EPERM"),
            "{} without {removed}: {:#}",
            p.name,
            report["under_filter"]
        );
        summary.push(format!(
            "{}: pass with {} syscalls; without {removed}: exit 1, enforce exit {}",
            p.name,
            profile["syscalls"][0]["names"].as_array().unwrap().len() + 1,
            report["enforce"]["exit_code"]
        ));
    }
    eprintln!("{}", summary.join("\n"));
}
