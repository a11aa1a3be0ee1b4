//! Parsing strace output (`strace -f`, `strace -f -o F`, `strace -ff -o F`), with or
//! without timestamps (`-t`, `-tt`, `-ttt`, `-r`).

use crate::abi::Abi;
use std::collections::HashMap;

/// What one strace line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StraceEvent {
    /// A syscall entry (a complete call, or the first half of an unfinished one).
    Syscall {
        /// The process.
        pid: Option<u32>,
        /// The ABI the process runs in.
        abi: Abi,
        /// Kernel name.
        name: &'static str,
        /// The errno name when the call failed (`EPERM`, `ENOSYS`, ...).
        error: Option<String>,
    },
    /// A syscall whose name or number the tables do not know.
    UnknownSyscall {
        /// The process.
        pid: Option<u32>,
        /// As strace printed it.
        what: String,
    },
    /// A signal was delivered; for `SIGSYS` from seccomp, `syscall` is the call the
    /// filter killed or trapped.
    Signal {
        /// The process.
        pid: Option<u32>,
        /// The signal name.
        signal: String,
        /// `si_syscall` when present.
        syscall: Option<String>,
    },
    /// `+++ exited with N +++`.
    Exited {
        /// The process.
        pid: Option<u32>,
        /// Exit code.
        code: i32,
    },
    /// `+++ killed by SIG... +++`.
    Killed {
        /// The process.
        pid: Option<u32>,
        /// The signal name.
        signal: String,
    },
    /// Lines without a syscall to learn: `<... resumed>` halves (counted at their
    /// start), strace's own messages, ABI switch notices.
    Noise,
}

/// Parses the lines of one strace output file. Keeps per-process state (which ABI
/// each process runs in), so use one parser per file.
#[derive(Debug)]
pub struct StraceParser {
    default_abi: Abi,
    file_pid: Option<u32>,
    pid_abi: HashMap<Option<u32>, Abi>,
    /// strace writing to stderr cuts a call's line in two with its own `strace:
    /// Process N attached` message; the next line is the rest of the call.
    continuation: bool,
}

impl StraceParser {
    /// A parser for a file whose calls default to `default_abi`. `file_pid` is the
    /// pid of an `strace -ff -o F` file `F.<pid>`, whose lines carry no pid.
    pub fn new(default_abi: Abi, file_pid: Option<u32>) -> Self {
        StraceParser {
            default_abi,
            file_pid,
            pid_abi: HashMap::new(),
            continuation: false,
        }
    }

    /// Parses one line. An error is the reason the line is malformed.
    pub fn parse_line(&mut self, line: &str) -> Result<StraceEvent, String> {
        let line = line.trim_end_matches(['\n', '\r']);
        let continued = std::mem::replace(&mut self.continuation, false);
        self.continuation = line.find("strace: Process ").is_some_and(|at| at > 0);
        if continued || line.trim_start().starts_with("<unfinished ...>") {
            return Ok(StraceEvent::Noise);
        }
        let (pid, rest) = split_pid(line);
        let pid = pid.or(self.file_pid);
        let rest = skip_timestamp(rest);
        if rest.is_empty() {
            return Ok(StraceEvent::Noise);
        }
        if rest.starts_with("<...") || rest.starts_with("strace: ") {
            return Ok(StraceEvent::Noise);
        }
        if let Some(notice) = rest.strip_prefix("[ Process PID=") {
            return Ok(self.personality(notice));
        }
        if let Some(sig) = rest.strip_prefix("--- ") {
            return parse_signal(pid, sig);
        }
        if let Some(status) = rest.strip_prefix("+++ ") {
            return parse_status(pid, status);
        }
        let Some(open) = rest.find('(') else {
            return Err(format!("expected `name(args) = result`, found `{}`", cut(rest)));
        };
        let name = &rest[..open];
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'?')
        {
            return Err(format!("`{}` is not a syscall name", cut(name)));
        }
        let abi = self.pid_abi.get(&pid).copied().unwrap_or(self.default_abi);
        let error = failure(rest);
        if let Some(nr) = name.strip_prefix("syscall_") {
            let nr = parse_number(nr).ok_or_else(|| format!("`{name}` is not a syscall number"))?;
            return Ok(match abi.name_of(nr) {
                Some(name) => StraceEvent::Syscall { pid, abi, name, error },
                None => StraceEvent::UnknownSyscall {
                    pid,
                    what: format!("{abi} #{nr}"),
                },
            });
        }
        Ok(match abi.lookup(name) {
            Some((_, name)) => StraceEvent::Syscall { pid, abi, name, error },
            None => StraceEvent::UnknownSyscall {
                pid,
                what: name.to_string(),
            },
        })
    }

    /// `[ Process PID=1234 runs in 32 bit mode. ]`
    fn personality(&mut self, notice: &str) -> StraceEvent {
        let digits: String = notice.chars().take_while(char::is_ascii_digit).collect();
        let pid = digits.parse::<u32>().ok();
        let abi = if notice.contains("32 bit mode") {
            self.default_abi.compat()
        } else {
            // "64 bit mode" and "x32 mode" use the native table.
            self.default_abi
        };
        self.pid_abi.insert(pid.or(self.file_pid), abi);
        StraceEvent::Noise
    }
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Splits `[pid  123] ` or `123  ` off the front.
fn split_pid(line: &str) -> (Option<u32>, &str) {
    if let Some(rest) = line.strip_prefix("[pid") {
        if let Some((Ok(pid), rest)) = rest.split_once(']').map(|(num, rest)| (num.trim().parse(), rest)) {
            return (Some(pid), rest.trim_start());
        }
        return (None, line);
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && line[digits..].starts_with(' ') {
        // `123 ` is a pid; `12:34:56 ` and `1712345678.123 ` are timestamps.
        if let Ok(pid) = line[..digits].parse() {
            return (Some(pid), line[digits..].trim_start());
        }
    }
    (None, line)
}

/// Skips `12:34:56 `, `12:34:56.123456 `, `1712345678.123456 ` or `     0.000123 `.
fn skip_timestamp(s: &str) -> &str {
    let t = s.trim_start();
    let len = t
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b':' || *b == b'.')
        .count();
    if len > 0 && t[..len].bytes().any(|b| b == b':' || b == b'.') && t[len..].starts_with(' ') {
        t[len..].trim_start()
    } else {
        t
    }
}

/// The errno name of a failed call: `) = -1 ENOENT (No such file or directory)`.
fn failure(rest: &str) -> Option<String> {
    let (_, result) = rest.rsplit_once(" = ")?;
    let errno = result.strip_prefix("-1 ")?;
    let name: String = errno
        .chars()
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        .collect();
    (!name.is_empty()).then_some(name)
}

/// `SIGSYS {si_signo=SIGSYS, si_code=SYS_SECCOMP, ..., si_syscall=__NR_clone3, ...} ---`
fn parse_signal(pid: Option<u32>, sig: &str) -> Result<StraceEvent, String> {
    let signal: String = sig.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
    if !signal.starts_with("SIG") {
        return Err(format!("expected a signal after `---`, found `{}`", cut(sig)));
    }
    let syscall = sig.split_once("si_syscall=").map(|(_, s)| {
        let s = s.strip_prefix("__NR_").unwrap_or(s);
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    });
    Ok(StraceEvent::Signal { pid, signal, syscall })
}

/// `exited with 0 +++` or `killed by SIGSYS (core dumped) +++`.
fn parse_status(pid: Option<u32>, status: &str) -> Result<StraceEvent, String> {
    if let Some(code) = status.strip_prefix("exited with ") {
        let code: String = code.chars().take_while(|c| c.is_ascii_digit() || *c == '-').collect();
        let code = code
            .parse()
            .map_err(|_| format!("bad exit status in `+++ {}`", cut(status)))?;
        return Ok(StraceEvent::Exited { pid, code });
    }
    if let Some(sig) = status.strip_prefix("killed by ") {
        let signal = sig.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        return Ok(StraceEvent::Killed { pid, signal });
    }
    Ok(StraceEvent::Noise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn parse(line: &str) -> StraceEvent {
        StraceParser::new(Abi::X86_64, None).parse_line(line).unwrap()
    }

    fn call(pid: Option<u32>, name: &'static str, error: Option<&str>) -> StraceEvent {
        StraceEvent::Syscall {
            pid,
            abi: Abi::X86_64,
            name,
            error: error.map(str::to_string),
        }
    }

    #[rstest]
    #[case(
        r#"openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3"#,
        call(None, "openat", None)
    )]
    #[case(r#"[pid  4242] read(3, "\177ELF", 832) = 832"#, call(Some(4242), "read", None))]
    #[case(r#"4242  write(1, "hi\n", 3)          = 3"#, call(Some(4242), "write", None))]
    #[case(r#"4242  12:34:56.123456 close(3) = 0"#, call(Some(4242), "close", None))]
    #[case(r#"1712345678.123456 getpid() = 7"#, call(None, "getpid", None))]
    #[case(r#"     0.000123 brk(NULL) = 0x55d"#, call(None, "brk", None))]
    #[case(
        r#"access("/etc/ld.so.preload", R_OK) = -1 ENOENT (No such file or directory)"#,
        call(None, "access", Some("ENOENT"))
    )]
    #[case(
        r#"clone3({flags=CLONE_VM, ...}, 88) = -1 ENOSYS (Function not implemented)"#,
        call(None, "clone3", Some("ENOSYS"))
    )]
    #[case(r#"[pid  10] wait4(-1,  <unfinished ...>"#, call(Some(10), "wait4", None))]
    #[case(
        r#"[pid  10] <... wait4 resumed>[{WIFEXITED(s) && WEXITSTATUS(s) == 0}], 0, NULL) = 11"#,
        StraceEvent::Noise
    )]
    #[case(r#"exit_group(0)                           = ?"#, call(None, "exit_group", None))]
    #[case(
        r#"syscall_0x1b3(0x1, 0x2) = -1 ENOSYS (Function not implemented)"#,
        call(None, "clone3", Some("ENOSYS"))
    )]
    #[case(r#"syscall_0xfff(0x1) = -1 ENOSYS (Function not implemented)"#, StraceEvent::UnknownSyscall { pid: None, what: "x86_64 #4095".into() })]
    #[case(r#"+++ exited with 3 +++"#, StraceEvent::Exited { pid: None, code: 3 })]
    #[case(r#"[pid 9] +++ killed by SIGSYS (core dumped) +++"#, StraceEvent::Killed { pid: Some(9), signal: "SIGSYS".into() })]
    #[case(r#"--- SIGSYS {si_signo=SIGSYS, si_code=SYS_SECCOMP, si_call_addr=0x7f, si_syscall=__NR_clone3, si_arch=AUDIT_ARCH_X86_64} ---"#,
           StraceEvent::Signal { pid: None, signal: "SIGSYS".into(), syscall: Some("clone3".into()) })]
    #[case(r#"--- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=11, si_uid=0, si_status=0} ---"#,
           StraceEvent::Signal { pid: None, signal: "SIGCHLD".into(), syscall: None })]
    #[case(r#"strace: Process 11 attached"#, StraceEvent::Noise)]
    #[case(
        r#"restart_syscall(<... resuming interrupted read ...>) = 0"#,
        call(None, "restart_syscall", None)
    )]
    fn line_shapes(#[case] line: &str, #[case] want: StraceEvent) {
        assert_eq!(parse(line), want);
    }

    #[test]
    fn malformed_lines_are_errors() {
        let mut p = StraceParser::new(Abi::X86_64, None);
        assert!(p.parse_line("this is not strace").unwrap_err().contains("expected"));
        assert!(
            p.parse_line("foo bar(1) = 0")
                .unwrap_err()
                .contains("not a syscall name")
        );
        assert!(p.parse_line("--- nothing ---").is_err());
    }

    /// strace on stderr interleaves its own messages into a call's line.
    #[test]
    fn attach_messages_that_split_a_line_are_not_malformed() {
        let mut p = StraceParser::new(Abi::X86_64, None);
        assert_eq!(
            p.parse_line("clone(child_stack=NULL, flags=SIGCHLDstrace: Process 1241 attached")
                .unwrap(),
            call(None, "clone", None)
        );
        assert_eq!(
            p.parse_line(", child_tidptr=0x7f08fff88a10) = 1241").unwrap(),
            StraceEvent::Noise
        );
        assert_eq!(
            p.parse_line("vfork(strace: Process 1240 attached").unwrap(),
            call(None, "vfork", None)
        );
        assert_eq!(p.parse_line(" <unfinished ...>").unwrap(), StraceEvent::Noise);
        // Only the one line after a split is a continuation.
        assert!(p.parse_line(", garbage").is_err());
    }

    #[test]
    fn ff_files_take_the_pid_from_the_file_name() {
        let mut p = StraceParser::new(Abi::X86_64, Some(77));
        assert_eq!(p.parse_line("close(3) = 0").unwrap(), call(Some(77), "close", None));
    }

    #[test]
    fn a_process_switching_to_32_bit_uses_the_i386_table() {
        let mut p = StraceParser::new(Abi::X86_64, None);
        assert_eq!(
            p.parse_line("[ Process PID=12 runs in 32 bit mode. ]").unwrap(),
            StraceEvent::Noise
        );
        match p.parse_line("[pid    12] _llseek(3, 0, [0], SEEK_SET) = 0").unwrap() {
            StraceEvent::Syscall { abi, name, .. } => assert_eq!((abi, name), (Abi::I386, "_llseek")),
            other => panic!("{other:?}"),
        }
        // Another process stays 64-bit.
        match p.parse_line("[pid    13] syscall_0x0(3) = 0").unwrap() {
            StraceEvent::Syscall { abi, name, .. } => assert_eq!((abi, name), (Abi::X86_64, "read")),
            other => panic!("{other:?}"),
        }
    }
}
