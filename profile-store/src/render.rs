//! Rendering a baseline into an OCI seccomp profile, and the profile's version.

use crate::abi::Abi;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Syscalls every profile allows: a process must be able to exit and to return from
/// signal handlers, and the kernel restarts interrupted calls through
/// `restart_syscall`.
pub const ALWAYS_ALLOWED: [&str; 4] = ["exit", "exit_group", "restart_syscall", "rt_sigreturn"];

/// Syscalls that a baseline never grants on its own: seen in a baseline, they are
/// reported as needing review and allowed only after an explicit approval, so a
/// baseline recorded during a compromise does not whitelist it.
pub const DANGEROUS: [&str; 24] = [
    "acct",
    "add_key",
    "bpf",
    "delete_module",
    "finit_module",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "mount",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "ptrace",
    "reboot",
    "request_key",
    "setns",
    "swapoff",
    "swapon",
    "umount2",
    "unshare",
    "userfaultfd",
];

/// Newer syscalls that libc probes and falls back from when they fail with ENOSYS,
/// with the older call it falls back to. Denied with EPERM they make libc fail
/// instead (seen with `clone3`: "Cannot allocate memory").
pub const ENOSYS_FALLBACKS: [(&str, &str); 3] =
    [("clone3", "clone"), ("openat2", "openat"), ("faccessat2", "faccessat")];

/// `ENOSYS` on every Linux architecture tether targets.
pub const ENOSYS: u32 = 38;
/// `EPERM`: what a denied syscall returns.
pub const EPERM: u32 = 1;

/// Whether `name` is behind the review gate.
pub fn is_dangerous(name: &str) -> bool {
    DANGEROUS.binary_search(&name).is_ok()
}

/// The node architecture a profile is for; decides its `architectures` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// x86-64 nodes: native, 32-bit and x32 tasks.
    X86_64,
    /// arm64 nodes: native and 32-bit tasks.
    Aarch64,
}

impl Arch {
    /// The architecture of the machine this binary runs on.
    pub fn host() -> Arch {
        match Abi::host() {
            Abi::Aarch64 | Abi::Arm => Arch::Aarch64,
            Abi::X86_64 | Abi::I386 => Arch::X86_64,
        }
    }

    /// The libseccomp architecture names for the profile's `architectures`.
    pub fn scmp_arches(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            Arch::Aarch64 => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        }
    }

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => Err(format!("unknown architecture `{s}`: use x86_64 or aarch64")),
        }
    }
}

/// One rule of an OCI seccomp profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyscallRule {
    /// Syscall names, sorted.
    pub names: Vec<String>,
    /// `SCMP_ACT_ALLOW`, `SCMP_ACT_ERRNO`, ...
    pub action: String,
    /// The errno returned by an `SCMP_ACT_ERRNO` rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
}

/// An OCI runtime-spec `linux.seccomp` object, as tether writes it (Docker's format
/// is a superset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompProfile {
    /// What happens to syscalls no rule matches.
    pub default_action: String,
    /// The errno for a default `SCMP_ACT_ERRNO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    /// The libseccomp architectures the filter covers.
    pub architectures: Vec<String>,
    /// The rules.
    pub syscalls: Vec<SyscallRule>,
}

impl SeccompProfile {
    /// The names the profile allows, sorted.
    pub fn allowed(&self) -> BTreeSet<&str> {
        self.syscalls
            .iter()
            .filter(|r| r.action == "SCMP_ACT_ALLOW")
            .flat_map(|r| r.names.iter().map(String::as_str))
            .collect()
    }

    /// The canonical bytes the version hash is computed over: compact JSON with the
    /// fields in declaration order and every list sorted by construction.
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serializing plain structs of strings, numbers and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The content-addressed version of this profile.
    pub fn version(&self) -> Version {
        Version::of(&self.canonical_json())
    }

    /// The Log-mode variant: everything the profile would deny is allowed and logged
    /// by the kernel. The fallback where Pod Security forbids `Unconfined`.
    pub fn log_variant(&self) -> SeccompProfile {
        SeccompProfile {
            default_action: "SCMP_ACT_LOG".to_string(),
            default_errno_ret: None,
            ..self.clone()
        }
    }
}

/// A profile version: the first 12 hex digits of the SHA-256 of the canonical
/// profile JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version(String);

impl Version {
    /// The version of `canonical` profile bytes.
    pub fn of(canonical: &[u8]) -> Version {
        let digest = Sha256::digest(canonical);
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        Version(hex)
    }

    /// The 12 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Version(s.to_string()))
        } else {
            Err(format!(
                "`{s}` is not a profile version: a version is 12 lower-case hex digits (see `tether profiles list`)"
            ))
        }
    }
}

impl TryFrom<String> for Version {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.0
    }
}

/// The syscalls a container runtime makes in the container's process after it has
/// loaded the seccomp filter and before it execs the entrypoint: without them the
/// container never starts. Kept as versioned data in `data/runtime-base/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeBase {
    /// `runc` or `crun`.
    pub runtime: String,
    /// The runtime version range the set was taken for, e.g. `1.1`.
    pub version: String,
    /// Where the set comes from (measurement or source reading).
    pub source: String,
    /// The syscalls.
    pub syscalls: BTreeSet<String>,
}

const RUNTIME_DATA: [(&str, &str); 3] = [
    ("runc-1.1", include_str!("../data/runtime-base/runc-1.1.json")),
    ("runc-1.2", include_str!("../data/runtime-base/runc-1.2.json")),
    ("crun-1", include_str!("../data/runtime-base/crun-1.json")),
];

/// Why a runtime base set cannot be selected.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The name matches no runtime data.
    #[error("unknown runtime `{0}`: use runc, crun, or a versioned name such as runc@1.1 (known: {1})")]
    Unknown(String, String),
    /// An embedded data file does not parse (a build defect).
    #[error("embedded runtime data {file} is corrupt: {source}")]
    Corrupt {
        /// The data file.
        file: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
}

impl RuntimeBase {
    /// Every embedded runtime base set.
    pub fn all() -> Result<Vec<RuntimeBase>, RuntimeError> {
        RUNTIME_DATA
            .iter()
            .map(|(file, text)| serde_json::from_str(text).map_err(|source| RuntimeError::Corrupt { file, source }))
            .collect()
    }

    /// Selects a set: `runc` or `crun` is the union of every known version of that
    /// runtime (a profile that works whichever version a node runs); `runc@1.1` is
    /// exactly that version's set.
    pub fn select(spec: &str) -> Result<RuntimeBase, RuntimeError> {
        let all = Self::all()?;
        let known = || {
            all.iter()
                .map(|b| format!("{}@{}", b.runtime, b.version))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (runtime, version) = match spec.split_once('@') {
            Some((r, v)) => (r, Some(v)),
            None => (spec, None),
        };
        let matching: Vec<&RuntimeBase> = all
            .iter()
            .filter(|b| b.runtime == runtime && version.is_none_or(|v| b.version == v))
            .collect();
        if matching.is_empty() {
            return Err(RuntimeError::Unknown(spec.to_string(), known()));
        }
        Ok(RuntimeBase {
            runtime: runtime.to_string(),
            version: matching
                .iter()
                .map(|b| b.version.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            source: matching
                .iter()
                .map(|b| b.source.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            syscalls: matching.iter().flat_map(|b| b.syscalls.iter().cloned()).collect(),
        })
    }

    /// `runtime@version`, as recorded with each rendered version.
    pub fn label(&self) -> String {
        format!("{}@{}", self.runtime, self.version)
    }
}

/// What to render a baseline with.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// The runtime's base set.
    pub runtime: RuntimeBase,
    /// The node architecture.
    pub arch: Arch,
    /// Dangerous syscalls an operator approved for this workload.
    pub approvals: BTreeSet<String>,
}

/// A rendered profile with what the review gate held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The profile.
    pub profile: SeccompProfile,
    /// Its version.
    pub version: Version,
    /// Observed dangerous syscalls left out until approved.
    pub needs_review: Vec<String>,
}

/// Renders the profile for `observed` syscall names: allowed = observed (less
/// unapproved dangerous ones) ∪ runtime base set ∪ [`ALWAYS_ALLOWED`]; ENOSYS rules
/// for unobserved [`ENOSYS_FALLBACKS`]; everything else fails with EPERM.
///
/// Deterministic: the same inputs give byte-identical canonical JSON.
pub fn render<'a>(observed: impl IntoIterator<Item = &'a str>, opts: &RenderOptions) -> Rendered {
    let mut allowed: BTreeSet<String> = BTreeSet::new();
    let mut needs_review = BTreeSet::new();
    for name in observed {
        if is_dangerous(name) && !opts.approvals.contains(name) {
            needs_review.insert(name.to_string());
        } else {
            allowed.insert(name.to_string());
        }
    }
    // The runtime needs its set whatever the gate says: it runs before the workload.
    allowed.extend(opts.runtime.syscalls.iter().cloned());
    allowed.extend(ALWAYS_ALLOWED.iter().map(|s| s.to_string()));
    // What the runtime base set allows anyway is not held back.
    needs_review.retain(|n| !allowed.contains(n));

    let enosys: Vec<String> = ENOSYS_FALLBACKS
        .iter()
        .map(|(new, _)| new.to_string())
        .filter(|n| !allowed.contains(n))
        .collect();

    let mut syscalls = vec![SyscallRule {
        names: allowed.into_iter().collect(),
        action: "SCMP_ACT_ALLOW".to_string(),
        errno_ret: None,
    }];
    if !enosys.is_empty() {
        syscalls.push(SyscallRule {
            names: enosys,
            action: "SCMP_ACT_ERRNO".to_string(),
            errno_ret: Some(ENOSYS),
        });
    }
    let profile = SeccompProfile {
        default_action: "SCMP_ACT_ERRNO".to_string(),
        default_errno_ret: Some(EPERM),
        architectures: opts.arch.scmp_arches().iter().map(|s| s.to_string()).collect(),
        syscalls,
    };
    Rendered {
        version: profile.version(),
        profile,
        needs_review: needs_review.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn opts(runtime: &str, arch: Arch, approvals: &[&str]) -> RenderOptions {
        RenderOptions {
            runtime: RuntimeBase::select(runtime).unwrap(),
            arch,
            approvals: approvals.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn data(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data")
            .join(rel)
    }

    /// Compares with a golden file; `TETHER_UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, profile: &SeccompProfile) {
        let path = data(&format!("golden/{name}.json"));
        let mut text = serde_json::to_string_pretty(profile).unwrap();
        text.push('\n');
        if std::env::var_os("TETHER_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (TETHER_UPDATE_GOLDEN=1 creates it)", path.display()));
        assert_eq!(
            text,
            want,
            "{} differs; review, then TETHER_UPDATE_GOLDEN=1",
            path.display()
        );
    }

    const WEB: [&str; 12] = [
        "accept4",
        "bind",
        "close",
        "epoll_wait",
        "futex",
        "listen",
        "mmap",
        "openat",
        "read",
        "socket",
        "write",
        "clone",
    ];

    #[test]
    fn golden_web_server_runc_x86_64() {
        let r = render(WEB, &opts("runc@1.1", Arch::X86_64, &[]));
        golden("web-runc-1.1-x86_64", &r.profile);
        assert!(r.needs_review.is_empty());
    }

    #[test]
    fn golden_dangerous_observed_without_and_with_approval_aarch64() {
        let observed = ["read", "ptrace", "bpf", "write"];
        let held = render(observed, &opts("runc@1.1", Arch::Aarch64, &[]));
        golden("debugger-unapproved-aarch64", &held.profile);
        assert_eq!(held.needs_review, ["bpf", "ptrace"]);
        let approved = render(observed, &opts("runc@1.1", Arch::Aarch64, &["ptrace"]));
        golden("debugger-ptrace-approved-aarch64", &approved.profile);
        assert_eq!(approved.needs_review, ["bpf"]);
        assert!(approved.profile.allowed().contains("ptrace"));
        assert_ne!(held.version, approved.version);
    }

    #[test]
    fn allowed_is_observed_plus_runtime_plus_always_allowed() {
        let rt = opts("runc", Arch::X86_64, &[]);
        let r = render(["read", "write"], &rt);
        let allowed = r.profile.allowed();
        assert!(allowed.contains("read") && allowed.contains("write"));
        for s in ALWAYS_ALLOWED {
            assert!(allowed.contains(s), "{s}");
        }
        for s in &rt.runtime.syscalls {
            assert!(allowed.contains(s.as_str()), "{s}");
        }
        assert!(!allowed.contains("socket"));
        assert_eq!(r.profile.default_action, "SCMP_ACT_ERRNO");
        assert_eq!(r.profile.default_errno_ret, Some(EPERM));
        assert_eq!(
            r.profile.architectures,
            ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
        );
    }

    #[test]
    fn enosys_rules_only_for_unobserved_newer_calls() {
        let rt = opts("runc@1.1", Arch::X86_64, &[]);
        let enosys = |p: &SeccompProfile| -> Vec<String> {
            p.syscalls
                .iter()
                .filter(|r| r.errno_ret == Some(ENOSYS))
                .flat_map(|r| r.names.clone())
                .collect()
        };
        let without = render(["clone", "openat"], &rt);
        for (new, _) in ENOSYS_FALLBACKS {
            let allowed_by_runtime = rt.runtime.syscalls.contains(new);
            assert_eq!(
                enosys(&without.profile).contains(&new.to_string()),
                !allowed_by_runtime,
                "{new}"
            );
        }
        let with = render(["clone3", "openat2", "faccessat2"], &rt);
        assert!(enosys(&with.profile).is_empty());
        assert!(with.profile.syscalls.iter().all(|r| r.action == "SCMP_ACT_ALLOW"));
    }

    #[test]
    fn rendering_is_deterministic_whatever_the_input_order() {
        let rt = opts("runc", Arch::X86_64, &[]);
        let a = render(["write", "read", "mmap", "read"], &rt);
        let b = render(["mmap", "read", "write"], &rt);
        assert_eq!(a.profile.canonical_json(), b.profile.canonical_json());
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.as_str().len(), 12);
        assert_eq!(Version::of(&a.profile.canonical_json()), a.version);
    }

    #[test]
    fn runtime_base_sets_are_outside_the_review_gate() {
        let crun = opts("crun", Arch::X86_64, &[]);
        let r = render(["mount", "read"], &crun);
        assert!(r.profile.allowed().contains("mount"));
        assert!(r.needs_review.is_empty(), "{:?}", r.needs_review);
    }

    #[test]
    fn log_variant_allows_and_logs_what_the_profile_denies() {
        let r = render(["read"], &opts("runc", Arch::X86_64, &[]));
        let log = r.profile.log_variant();
        assert_eq!(log.default_action, "SCMP_ACT_LOG");
        assert_eq!(log.default_errno_ret, None);
        assert_eq!(log.syscalls, r.profile.syscalls);
        assert_ne!(log.version(), r.version);
    }

    #[test]
    fn runtime_selection() {
        let all = RuntimeBase::all().unwrap();
        assert!(all.iter().any(|b| b.runtime == "runc"));
        let union = RuntimeBase::select("runc").unwrap();
        for b in all.iter().filter(|b| b.runtime == "runc") {
            assert!(b.syscalls.is_subset(&union.syscalls));
        }
        assert_eq!(RuntimeBase::select("runc@1.1").unwrap().version, "1.1");
        let err = RuntimeBase::select("youki").unwrap_err().to_string();
        assert!(err.contains("youki") && err.contains("runc@1.1"), "{err}");
    }

    #[test]
    fn every_named_syscall_is_in_the_tables() {
        for b in RuntimeBase::all().unwrap() {
            for s in &b.syscalls {
                assert!(Abi::known_name(s).is_some(), "{}@{}: {s}", b.runtime, b.version);
            }
        }
        for s in DANGEROUS.iter().chain(ALWAYS_ALLOWED.iter()) {
            assert!(Abi::known_name(s).is_some(), "{s}");
        }
        let mut sorted = DANGEROUS;
        sorted.sort_unstable();
        assert_eq!(sorted, DANGEROUS, "DANGEROUS must stay sorted for binary_search");
    }

    /// Docker's default profile (tests/data/seccomp/docker-default.json) uses the same
    /// syscall names libseccomp resolves: every name it lists for our architectures
    /// must be one the tables know, or observations could never match it.
    #[test]
    fn docker_default_profile_names_are_known() {
        let text = std::fs::read_to_string(data("seccomp/docker-default.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut unknown = Vec::new();
        for rule in v["syscalls"].as_array().unwrap() {
            let arches: Vec<&str> = rule["includes"]["arches"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            let ours = arches.is_empty()
                || arches
                    .iter()
                    .any(|a| ["amd64", "x86", "x32", "arm64", "arm"].contains(a));
            for name in rule["names"].as_array().unwrap().iter().filter_map(|n| n.as_str()) {
                if ours && Abi::known_name(name).is_none() {
                    unknown.push(name.to_string());
                }
            }
        }
        // The known gaps: riscv64's own call (not one of our ABIs), and the ARM-private
        // calls (`__ARM_NR_*`) with libseccomp's alias for `arm_sync_file_range`,
        // which the `syscalls` crate's arm table leaves out. Anything else missing
        // would be a table regression.
        unknown.sort();
        unknown.dedup();
        assert_eq!(
            unknown,
            [
                "breakpoint",
                "cacheflush",
                "riscv_hwprobe",
                "set_tls",
                "sync_file_range2"
            ]
        );
        // Docker answers clone3 with ENOSYS too, for the same libc fallback.
        assert!(text.contains("\"errnoRet\": 38") || text.contains("\"errnoRet\":38"));
    }
}
