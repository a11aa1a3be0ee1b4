//! The `process` runtime: the filter installed in-process before exec, with
//! seccompiler, and `no_new_privs` set (seccompiler sets it).
//!
//! This module holds the crate's only `unsafe`: `CommandExt::pre_exec` is unsafe
//! because the closure runs between fork and exec, where only async-signal-safe
//! work is allowed. The closure only calls `prctl` and `seccomp` on a filter
//! compiled before the fork; it allocates nothing.
#![allow(unsafe_code)]

use crate::ValidatorError;
use profile_store::render::ENOSYS;
use profile_store::{Abi, SeccompProfile};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;

fn arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    }
}

fn compile(names: &[&str], mismatch: SeccompAction, matched: SeccompAction) -> Result<BpfProgram, ValidatorError> {
    let abi = Abi::host();
    let mut rules = BTreeMap::new();
    for name in names {
        // Names of other architectures (e.g. `open` on arm64) have no number here.
        if let Some((nr, _)) = abi.lookup(name) {
            rules.insert(i64::from(nr), Vec::new());
        }
    }
    let filter =
        SeccompFilter::new(rules, mismatch, matched, arch()).map_err(|e| ValidatorError::Filter(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| ValidatorError::Filter(e.to_string()))
}

/// The filters for `profile`, in install order.
///
/// The kernel runs every installed filter and keeps the answer of highest
/// precedence (ERRNO beats ALLOW; between two ERRNOs, the most recent filter's).
/// So the ENOSYS rules go first, in a filter that allows everything else, and the
/// allow-list goes last, letting the ENOSYS names through to that first filter's
/// answer. This order also lets the second install happen at all: the first filter
/// allows the `seccomp` call that installs the second.
pub fn filters(profile: &SeccompProfile) -> Result<Vec<BpfProgram>, ValidatorError> {
    if profile.default_action != "SCMP_ACT_ERRNO" {
        return Err(ValidatorError::Filter(format!(
            "the process runtime applies allow-list profiles (defaultAction SCMP_ACT_ERRNO); this one has {}",
            profile.default_action
        )));
    }
    let errno = profile.default_errno_ret.unwrap_or(1);
    let mut out = Vec::new();
    let mut passed: Vec<&str> = profile.allowed().into_iter().collect();
    for rule in profile.syscalls.iter().filter(|r| r.action == "SCMP_ACT_ERRNO") {
        let names: Vec<&str> = rule.names.iter().map(String::as_str).collect();
        let code = rule.errno_ret.unwrap_or(ENOSYS);
        out.push(compile(&names, SeccompAction::Allow, SeccompAction::Errno(code))?);
        passed.extend(names);
    }
    out.push(compile(&passed, SeccompAction::Errno(errno), SeccompAction::Allow)?);
    Ok(out)
}

/// Makes `cmd` install `filters` in the child just before exec.
pub fn confine(cmd: &mut Command, filters: Vec<BpfProgram>) {
    // SAFETY: the closure runs in the forked child before exec. It only calls
    // `seccompiler::apply_filter`, which makes the prctl and seccomp syscalls on
    // the already-compiled programs; nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(move || {
            for f in &filters {
                seccompiler::apply_filter(f).map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profile_store::{Arch, RenderOptions, RuntimeBase, render};

    fn profile(observed: &[&str]) -> SeccompProfile {
        render(
            observed.iter().copied(),
            &RenderOptions {
                runtime: RuntimeBase::select("runc@1.1").unwrap(),
                arch: Arch::host(),
                approvals: Default::default(),
            },
        )
        .profile
    }

    const TRUE: [&str; 17] = [
        "execve",
        "brk",
        "arch_prctl",
        "mmap",
        "access",
        "openat",
        "newfstatat",
        "close",
        "read",
        "pread64",
        "mprotect",
        "set_tid_address",
        "set_robust_list",
        "rseq",
        "prlimit64",
        "munmap",
        "exit_group",
    ];

    #[test]
    fn filters_install_in_the_child_and_enforce_the_allow_list() {
        let p = profile(&TRUE);
        let fs = filters(&p).unwrap();
        assert_eq!(
            fs.len(),
            2,
            "an ENOSYS filter (clone3 is not in the runc 1.1 set) and the allow-list"
        );
        let mut ok = Command::new("/bin/true");
        confine(&mut ok, fs.clone());
        assert!(ok.status().unwrap().success());
        // `uname` needs the uname syscall, which the profile does not allow.
        let mut denied = Command::new("/bin/uname");
        confine(&mut denied, fs);
        let out = denied.output().unwrap();
        assert!(!out.status.success(), "uname ran without the uname syscall");
    }
}
