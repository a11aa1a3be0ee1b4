//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `tests/data/<rel>`.
pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(rel)
}

/// The result of running `tether`.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with both streams unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

fn finish(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `tether ARGS` with a clean `TETHER_*` environment.
pub fn tether(args: &[&str]) -> Run {
    tether_stdin(args, None)
}

/// Runs `tether ARGS` with extra environment variables.
pub fn tether_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_tether(args, None, env)
}

/// Runs `tether ARGS` feeding `stdin`.
pub fn tether_stdin(args: &[&str], stdin: Option<&[u8]>) -> Run {
    run_tether(args, stdin, &[])
}

/// `tether ARGS` with a clean `TETHER_*` environment, not started yet (for
/// tests that need the child itself, e.g. to kill it).
pub fn tether_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn run_tether(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Run {
    let mut cmd = tether_command(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn tether");
    if let Some(bytes) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    finish(child.wait_with_output().unwrap())
}

/// A fresh store directory path (not yet created) inside `dir`.
pub fn store_in(dir: &Path) -> String {
    dir.join("store").display().to_string()
}

/// Runs `args` in runc under `strace -f -o /probe/trace`, with `probe` (created
/// if absent) mounted at `/probe`: the probe run of `tether validate`, by hand.
pub fn run_probed(probe: &Path, args: &[&str]) -> validator::RunOutcome {
    std::fs::create_dir_all(probe).unwrap();
    let mut cmd = vec!["/usr/bin/strace", "-f", "-o", "/probe/trace"];
    cmd.extend_from_slice(args);
    let mut spec = validator::RunSpec::new(cmd);
    spec.extra_capabilities.push("CAP_SYS_PTRACE".into());
    spec.mounts.push((probe.to_path_buf(), "/probe".into()));
    validator::run_in_runc(&spec).unwrap()
}
