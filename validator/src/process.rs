//! The `process` runtime: the filter installed in-process before exec, with
//! seccompiler, and `no_new_privs` set (seccompiler sets it).
//!
//! The same filters confine the workload of an observed enforce run: the hidden
//! `tether __exec-confined` ([`exec_confined`]) installs them on itself and execs
//! the command, so that a strace started before it (and outside the filter) shows
//! what the denied syscalls return.
//!
//! This module holds the crate's only `unsafe`: `CommandExt::pre_exec` is unsafe
//! because the closure runs between fork and exec, where only async-signal-safe
//! work is allowed. The closure only calls `prctl` and `seccomp` on a filter
//! compiled before the fork; it allocates nothing.
#![allow(unsafe_code)]

use crate::ValidatorError;
use profile_store::render::ENOSYS;
use profile_store::{Abi, SeccompProfile};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch, sock_filter};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// The hidden subcommand of the `tether` binary that runs [`exec_confined`].
pub const EXEC_CONFINED: &str = "__exec-confined";

/// What the filter answers for syscalls numbered above every one the profile names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Above {
    /// The profile's default errno, as the kernel would by the profile's letter
    /// (the `process` runtime).
    Default,
    /// ENOSYS, as runc 1.1 answers (measured, see
    /// profile-store/data/runtime-base/README.md: a profile naming nothing above
    /// `faccessat2` gets ENOSYS for `epoll_pwait2`, EPERM for `fanotify_init`).
    /// runc does it so that programs fall back from syscalls newer than the
    /// profile; the observed enforce run in runc must answer the same way.
    Enosys,
}

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

/// The filters for `profile`, in install order, answering as the kernel would by
/// the profile's letter. See [`filters_with`].
pub fn filters(profile: &SeccompProfile) -> Result<Vec<BpfProgram>, ValidatorError> {
    filters_with(profile, Above::Default)
}

/// The highest syscall number `profile` names for this host's ABI.
fn highest(profile: &SeccompProfile) -> Option<u32> {
    let abi = Abi::host();
    profile
        .syscalls
        .iter()
        .flat_map(|r| r.names.iter())
        .filter_map(|n| abi.lookup(n).map(|(nr, _)| nr))
        .max()
}

/// Puts `nr > highest -> action` right after seccompiler's architecture check, so
/// it is decided before any per-syscall rule.
fn answer_above(program: &mut BpfProgram, highest: u32, action: SeccompAction) -> Result<(), ValidatorError> {
    // seccompiler starts every program with: load arch; jeq arch (jt 1); ret kill.
    // Its later jumps are relative and stay inside its own code, so three
    // instructions can go in at index 3. A different layout is refused rather than
    // patched blindly (a test checks the answer on a real child).
    const LD_W_ABS: u16 = 0x20;
    const JMP_JGT_K: u16 = 0x25;
    const RET_K: u16 = 0x06;
    const NR_OFFSET: u32 = 0;
    let layout_known =
        program.len() > 3 && program[0].code == LD_W_ABS && program[1].jt == 1 && program[2].code == RET_K;
    if !layout_known {
        return Err(ValidatorError::Filter(
            "unexpected seccompiler program layout; cannot add runc's ENOSYS answer".into(),
        ));
    }
    let stub = [
        sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: NR_OFFSET,
        },
        sock_filter {
            code: JMP_JGT_K,
            jt: 0,
            jf: 1,
            k: highest,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: u32::from(action),
        },
    ];
    program.splice(3..3, stub);
    Ok(())
}

/// The filters for `profile`, in install order.
///
/// The kernel runs every installed filter and keeps the answer of highest
/// precedence (ERRNO beats ALLOW; between two ERRNOs, the most recent filter's).
/// So the ENOSYS rules go first, in a filter that allows everything else, and the
/// allow-list goes last, letting the ENOSYS names through to that first filter's
/// answer. This order also lets the second install happen at all: the first filter
/// allows the `seccomp` call that installs the second.
///
/// With [`Above::Enosys`], the allow-list answers ENOSYS for numbers above the
/// highest the profile names; the earlier filters allow them.
///
/// Profiles with rule actions other than allow and errno (kill, trap, log) are
/// refused: answering them with the default errno would misreport them.
pub fn filters_with(profile: &SeccompProfile, above: Above) -> Result<Vec<BpfProgram>, ValidatorError> {
    if let Some(rule) = profile
        .syscalls
        .iter()
        .find(|r| r.action != "SCMP_ACT_ALLOW" && r.action != "SCMP_ACT_ERRNO")
    {
        return Err(ValidatorError::Filter(format!(
            "the in-process filter reproduces allow and errno rules; this profile has {}",
            rule.action
        )));
    }
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
    let mut allow_list = compile(&passed, SeccompAction::Errno(errno), SeccompAction::Allow)?;
    if let (Above::Enosys, Some(top)) = (above, highest(profile)) {
        answer_above(&mut allow_list, top, SeccompAction::Errno(ENOSYS))?;
    }
    out.push(allow_list);
    Ok(out)
}

/// Installs `profile` (the file written by the validator) on this process and execs
/// `cmd`, searching `PATH` as runc does; returns only when that fails.
///
/// Everything before the install runs under whatever confines the caller (in the
/// observed runc run: the container's filter, which adds what strace and this
/// function need); everything from the exec on runs under exactly `profile`,
/// because stacked filters give the most restrictive answer and, among errno
/// answers, the most recently installed filter's.
pub fn exec_confined(profile: &Path, above: Above, cmd: &[String]) -> ValidatorError {
    let text = match std::fs::read_to_string(profile) {
        Ok(t) => t,
        Err(source) => {
            return ValidatorError::Io {
                what: format!("reading {}", profile.display()),
                source,
            };
        }
    };
    let profile: SeccompProfile = match serde_json::from_str(&text) {
        Ok(p) => p,
        Err(e) => return ValidatorError::Filter(format!("{}: {e}", profile.display())),
    };
    let filters = match filters_with(&profile, above) {
        Ok(f) => f,
        Err(e) => return e,
    };
    let Some((program, args)) = cmd.split_first() else {
        return ValidatorError::Usage("no command given after --".into());
    };
    let mut c = Command::new(program);
    c.args(args);
    // The filters go in through pre_exec, after std has reset the signal mask and
    // SIGPIPE: those resets stay outside the profile, as runc's are.
    confine(&mut c, filters);
    let source = c.exec();
    ValidatorError::Io {
        what: format!("executing {program}"),
        source,
    }
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

    #[test]
    fn like_runc_answers_enosys_above_the_highest_named_syscall() {
        // The rendered profile names faccessat2 (439) in its ENOSYS rule and nothing
        // higher; epoll_pwait2 (441 on x86_64, 441 on arm64) lies above it.
        let mut observed: Vec<&str> = TRUE.to_vec();
        observed.extend([
            "getrandom",
            "readlink",
            "ioctl",
            "lseek",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "rt_sigaction",
            "fcntl",
            "write",
            "futex",
            "fstat",
            "brk",
            "statx",
        ]);
        let p = profile(&observed);
        let errno_of = |above: Above| {
            let mut c = Command::new("/usr/bin/perl");
            c.args(["-e", "syscall(441, 0, 0, 0, 0, 0); print $!+0"]);
            confine(&mut c, filters_with(&p, above).unwrap());
            let out = c.output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(errno_of(Above::Enosys), "38", "runc's answer above the profile");
        assert_eq!(errno_of(Above::Default), "1", "the profile's default errno");
    }

    #[test]
    fn profiles_with_other_actions_are_refused() {
        let mut p = profile(&TRUE);
        p.syscalls.push(profile_store::render::SyscallRule {
            names: vec!["ptrace".into()],
            action: "SCMP_ACT_KILL".into(),
            errno_ret: None,
        });
        assert!(matches!(filters(&p), Err(ValidatorError::Filter(_))));
    }
}
