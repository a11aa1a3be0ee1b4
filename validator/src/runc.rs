//! Running one command in a runc container with an optional seccomp profile.

use crate::ValidatorError;
use profile_store::SeccompProfile;
use serde_json::{Value, json};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ValidatorError {
    let what = what.into();
    move |source| ValidatorError::Io { what, source }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The command and its arguments (the container's entrypoint).
    pub args: Vec<String>,
    /// The seccomp profile to apply; `None` runs unconfined.
    pub profile: Option<SeccompProfile>,
    /// `process.noNewPrivileges`. Kubernetes leaves it false unless
    /// `allowPrivilegeEscalation: false`; runc then loads the filter earlier, so more
    /// of runc's own calls run under it.
    pub no_new_privileges: bool,
    /// Extra capabilities, e.g. `CAP_SYS_PTRACE` for strace inside the container.
    pub extra_capabilities: Vec<String>,
    /// Kill the container after this long.
    pub timeout: Duration,
    /// Host directories bind-mounted read-write into the container, as (host
    /// path, container path): how a probe's trace gets out.
    pub mounts: Vec<(PathBuf, String)>,
    /// Host files or directories bind-mounted read-only, as (host path, container
    /// path): how the observed enforce run gets the `tether` binary in.
    pub read_only_mounts: Vec<(PathBuf, String)>,
}

impl RunSpec {
    /// Runs `args` unconfined, with `noNewPrivileges: false` and a 60 s deadline.
    pub fn new<S: Into<String>>(args: impl IntoIterator<Item = S>) -> RunSpec {
        RunSpec {
            args: args.into_iter().map(Into::into).collect(),
            profile: None,
            no_new_privileges: false,
            extra_capabilities: Vec::new(),
            timeout: Duration::from_secs(60),
            mounts: Vec::new(),
            read_only_mounts: Vec::new(),
        }
    }
}

/// How the container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The entrypoint exited with this code (runc reports a death by signal N as
    /// 128+N, e.g. 159 for SIGSYS).
    Code(i32),
    /// runc itself was killed by this signal.
    Signal(i32),
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Exit status of `runc run` (the container's).
    pub exit: Exit,
    /// The container's stdout.
    pub stdout: String,
    /// The container's stderr, runc's own messages included.
    pub stderr: String,
}

impl RunOutcome {
    /// Whether the container exited 0.
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// Whether the entrypoint was killed by SIGSYS (a seccomp kill).
    pub fn killed_by_sigsys(&self) -> bool {
        self.exit == Exit::Code(128 + 31)
    }
}

/// The path of the runc binary.
pub fn runc_path() -> Result<PathBuf, ValidatorError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .ok_or(ValidatorError::RuncMissing)
}

const CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// The OCI runtime config for `spec`, over a rootfs at `rootfs`.
pub fn oci_config(spec: &RunSpec, rootfs: &Path) -> Value {
    let mut caps: Vec<String> = CAPS.iter().map(|c| c.to_string()).collect();
    caps.extend(spec.extra_capabilities.iter().cloned());
    let bind_ro = |dir: &str| json!({"destination": dir, "type": "bind", "source": dir, "options": ["rbind", "ro", "nosuid", "nodev"]});
    let mut linux = json!({
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    });
    if let Some(profile) = &spec.profile {
        linux["seccomp"] = json!(profile);
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        bind_ro("/usr"),
        bind_ro("/etc"),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]}),
    ];
    for (host, dest) in &spec.mounts {
        mounts.push(
            json!({"destination": dest, "type": "bind", "source": host, "options": ["rbind", "rw", "nosuid", "nodev"]}),
        );
    }
    for (host, dest) in &spec.read_only_mounts {
        mounts.push(
            json!({"destination": dest, "type": "bind", "source": host, "options": ["rbind", "ro", "nosuid", "nodev"]}),
        );
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/tmp"],
            "cwd": "/tmp",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": spec.no_new_privileges,
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "tether-validate",
        "mounts": mounts,
        "linux": linux,
    })
}

/// Creates the rootfs skeleton: mount points and the merged-`/usr` symlinks.
fn make_rootfs(rootfs: &Path) -> Result<(), ValidatorError> {
    for dir in ["usr", "etc", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).map_err(io(format!("creating {}", rootfs.join(dir).display())))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        // Only where the host has the directory: /usr/lib64 is absent on some.
        if Path::new("/").join(target).exists() {
            std::os::unix::fs::symlink(target, rootfs.join(link)).map_err(io(format!("linking /{link}")))?;
        }
    }
    Ok(())
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs `spec` in a fresh runc container and waits for it.
///
/// Needs root (runc creates namespaces and mounts). The bundle and runc's state
/// live in a temporary directory removed afterwards.
pub fn run_in_runc(spec: &RunSpec) -> Result<RunOutcome, ValidatorError> {
    let runc = runc_path()?;
    let work = tempfile::Builder::new()
        .prefix("tether-runc-")
        .tempdir()
        .map_err(io("creating the bundle directory"))?;
    let bundle = work.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    make_rootfs(&rootfs)?;
    let config = oci_config(spec, &rootfs);
    std::fs::write(bundle.join("config.json"), config.to_string()).map_err(io("writing config.json"))?;
    let state = work.path().join("state");
    let id = format!(
        "tether-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );

    let mut cmd = Command::new(&runc);
    cmd.arg("--root")
        .arg(&state)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id);
    run_captured(cmd, spec.timeout, |_| {
        let _ = Command::new(&runc)
            .arg("--root")
            .arg(&state)
            .args(["kill", &id, "KILL"])
            .status();
    })
    .inspect_err(|e| {
        if matches!(e, ValidatorError::Timeout(_)) {
            let _ = Command::new(&runc)
                .arg("--root")
                .arg(&state)
                .args(["delete", "--force", &id])
                .status();
        }
    })
}

/// Runs `cmd` with stdin closed and its output captured, killing it after
/// `timeout` (`on_timeout` runs first, to stop what the child started).
pub(crate) fn run_captured(
    mut cmd: Command,
    timeout: Duration,
    on_timeout: impl FnOnce(&mut std::process::Child),
) -> Result<RunOutcome, ValidatorError> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {}", cmd.get_program().to_string_lossy())))?;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io("waiting for the child"))? {
            break status;
        }
        if Instant::now() >= deadline {
            on_timeout(&mut child);
            let _ = child.kill();
            let _ = child.wait();
            return Err(ValidatorError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Code(-1),
    };
    Ok(RunOutcome {
        exit,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
