//! Parsing one line of a Tetragon JSON export (Go protojson: snake_case keys,
//! camelCase accepted too; 64-bit numbers as numbers or strings; unknown keys and
//! unknown event kinds ignored).

use crate::abi::Abi;
use crate::key::{ObservedPod, WorkloadKey, key_from_observation};
use jiff::Timestamp;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::borrow::Cow;
use std::fmt;

/// Tetragon marks the syscall numbers of 32-bit (compat) tasks with this bit.
const COMPAT_MARKER: u64 = 0x8000_0000;

/// How observations are read.
#[derive(Debug, Clone, Copy)]
pub struct TetragonOptions {
    /// The ABI for syscall numbers that come without one (`size_arg`, `long_arg`).
    pub default_abi: Abi,
    /// Keep events of processes entered from outside the container (`in_init_tree:
    /// false`), which are left out by default.
    pub include_non_init: bool,
}

impl Default for TetragonOptions {
    fn default() -> Self {
        TetragonOptions {
            default_abi: Abi::host(),
            include_non_init: false,
        }
    }
}

/// Labels that tell which controller made a pod; all other labels are skipped
/// while parsing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
pub struct KnownLabels<'a> {
    /// `pod-template-hash`.
    #[serde(borrow, default, rename = "pod-template-hash")]
    pub pod_template_hash: Option<Cow<'a, str>>,
    /// `statefulset.kubernetes.io/pod-name`.
    #[serde(borrow, default, rename = "statefulset.kubernetes.io/pod-name")]
    pub statefulset_pod_name: Option<Cow<'a, str>>,
    /// `apps.kubernetes.io/pod-index`.
    #[serde(borrow, default, rename = "apps.kubernetes.io/pod-index")]
    pub pod_index: Option<Cow<'a, str>>,
    /// `pod-template-generation`.
    #[serde(borrow, default, rename = "pod-template-generation")]
    pub pod_template_generation: Option<Cow<'a, str>>,
    /// `batch.kubernetes.io/job-name`.
    #[serde(borrow, default, rename = "batch.kubernetes.io/job-name")]
    pub job_name: Option<Cow<'a, str>>,
    /// `job-name`.
    #[serde(borrow, default, rename = "job-name")]
    pub job_name_legacy: Option<Cow<'a, str>>,
}

impl KnownLabels<'_> {
    /// The value of label `key`, if it is one of the known ones and present.
    pub fn get(&self, key: &str) -> Option<&str> {
        use crate::key::labels;
        let v = match key {
            labels::POD_TEMPLATE_HASH => &self.pod_template_hash,
            labels::STATEFULSET_POD_NAME => &self.statefulset_pod_name,
            labels::POD_INDEX => &self.pod_index,
            labels::POD_TEMPLATE_GENERATION => &self.pod_template_generation,
            labels::JOB_NAME => &self.job_name,
            labels::JOB_NAME_LEGACY => &self.job_name_legacy,
            _ => return None,
        };
        v.as_deref()
    }
}

/// Who made an event: the pod and container as Tetragon reports them. Turning
/// this into a [`WorkloadKey`] ([`Who::key`]) validates and allocates, so callers
/// that see the same pod many times cache it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Who<'a> {
    /// The event kind, to name the field in errors.
    pub event: &'static str,
    /// `pod.namespace`.
    pub namespace: Cow<'a, str>,
    /// `pod.name`: the replica.
    pub pod: Cow<'a, str>,
    /// `pod.container.name`.
    pub container: Cow<'a, str>,
    /// `pod.workload`.
    pub workload: Option<Cow<'a, str>>,
    /// `pod.workload_kind`.
    pub workload_kind: Option<Cow<'a, str>>,
    /// The controller labels.
    pub labels: KnownLabels<'a>,
}

impl Who<'_> {
    /// The workload key, normalized as [`key_from_observation`] does; the error
    /// names the field.
    pub fn key(&self) -> Result<WorkloadKey, String> {
        key_from_observation(
            ObservedPod {
                namespace: &self.namespace,
                name: &self.pod,
                workload: self.workload.as_deref(),
                workload_kind: self.workload_kind.as_deref(),
            },
            |k| self.labels.get(k),
            &self.container,
        )
        .map_err(|e| format!("field `{}.process.pod`: {e}", self.event))
    }
}

/// The pod an event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source<'a> {
    /// Who.
    pub who: Who<'a>,
    /// Whether the process is an exec probe run from outside the init tree.
    pub exec_probe: bool,
}

/// What one line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TetragonEvent<'a> {
    /// A syscall made in a workload container.
    Syscall {
        /// Where.
        source: Source<'a>,
        /// Through which ABI.
        abi: Abi,
        /// Kernel name.
        name: &'static str,
    },
    /// A process started in a workload container.
    Exec(Source<'a>),
    /// A process exited in a workload container.
    Exit(Source<'a>),
    /// An event of a process entered from outside the container (`kubectl exec`):
    /// left out of the baseline.
    NotInInitTree(Who<'a>),
    /// A syscall number or syscall function the tables do not know.
    UnknownSyscall {
        /// Where.
        source: Source<'a>,
        /// What was seen, e.g. `x86_64 #999` or `__x64_sys_foo`.
        what: String,
    },
    /// A kprobe or tracepoint that is not a syscall (e.g. `security_file_permission`):
    /// evidence of activity but not of a syscall.
    NotASyscall(Source<'a>),
    /// An event of a process outside any pod.
    Host,
    /// Tetragon dropped events (`rate_limit_info`).
    Dropped(u64),
    /// Another event kind (`process_lsm`, `process_throttle`, ...).
    Other,
}

/// A parsed line: the event and where and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The event.
    pub event: TetragonEvent<'a>,
    /// `node_name`.
    pub node: Option<Cow<'a, str>>,
    /// `time`.
    pub time: Option<Timestamp>,
}

/// A number that protojson may write as a JSON number or a string.
#[derive(Debug, Clone, Copy)]
struct Num(i128);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string holding one")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                Ok(Num(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
                v.trim()
                    .parse::<i128>()
                    .map(Num)
                    .map_err(|_| E::custom(format!("`{v}` is not an integer")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow, default, alias = "processExec")]
    process_exec: Option<RawProcessHolder<'a>>,
    #[serde(borrow, default, alias = "processExit")]
    process_exit: Option<RawProcessHolder<'a>>,
    #[serde(borrow, default, alias = "processKprobe")]
    process_kprobe: Option<RawKprobe<'a>>,
    #[serde(borrow, default, alias = "processTracepoint")]
    process_tracepoint: Option<RawTracepoint<'a>>,
    #[serde(default, alias = "rateLimitInfo")]
    rate_limit_info: Option<RawRateLimit>,
    #[serde(borrow, default, alias = "nodeName")]
    node_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawProcessHolder<'a> {
    #[serde(borrow, default)]
    process: Option<RawProcess<'a>>,
}

#[derive(Deserialize)]
struct RawProcess<'a> {
    #[serde(borrow, default)]
    pod: Option<RawPod<'a>>,
    #[serde(default, alias = "inInitTree")]
    in_init_tree: Option<bool>,
}

#[derive(Deserialize)]
struct RawPod<'a> {
    #[serde(borrow, default)]
    namespace: Cow<'a, str>,
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    container: Option<RawContainer<'a>>,
    #[serde(borrow, default, alias = "podLabels")]
    pod_labels: Option<KnownLabels<'a>>,
    #[serde(borrow, default)]
    workload: Option<Cow<'a, str>>,
    #[serde(borrow, default, alias = "workloadKind")]
    workload_kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawContainer<'a> {
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(default, alias = "maybeExecProbe")]
    maybe_exec_probe: Option<bool>,
}

#[derive(Deserialize)]
struct RawKprobe<'a> {
    #[serde(borrow, default)]
    process: Option<RawProcess<'a>>,
    #[serde(borrow, default, alias = "functionName")]
    function_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawTracepoint<'a> {
    #[serde(borrow, default)]
    process: Option<RawProcess<'a>>,
    #[serde(borrow, default)]
    subsys: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    args: Vec<RawArg<'a>>,
}

#[derive(Deserialize)]
struct RawArg<'a> {
    #[serde(borrow, default, alias = "syscallId")]
    syscall_id: Option<RawSyscallId<'a>>,
    #[serde(default, alias = "sizeArg")]
    size_arg: Option<Num>,
    #[serde(default, alias = "longArg")]
    long_arg: Option<Num>,
}

#[derive(Deserialize)]
struct RawSyscallId<'a> {
    id: Num,
    #[serde(borrow, default)]
    abi: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawRateLimit {
    #[serde(default, alias = "numberOfDroppedProcessEvents")]
    number_of_dropped_process_events: Option<Num>,
}

/// Kprobe function-name prefixes of syscall entry points, with the ABI they imply;
/// `None` means the node's default ABI.
const SYSCALL_PREFIXES: [(&str, Option<Abi>); 8] = [
    ("__x64_sys_", Some(Abi::X86_64)),
    ("__x32_compat_sys_", Some(Abi::X86_64)),
    ("__ia32_compat_sys_", Some(Abi::I386)),
    ("__ia32_sys_", Some(Abi::I386)),
    ("__arm64_compat_sys_", Some(Abi::Arm)),
    ("__arm64_sys_", Some(Abi::Aarch64)),
    ("compat_sys_", None),
    ("sys_", None),
];

/// The syscall a kprobe's `function_name` is the entry point of.
///
/// `Ok(None)`: not a syscall function. `Err(name)`: a syscall prefix with a name the
/// tables do not know.
pub fn syscall_of_function(function: &str, default_abi: Abi) -> Result<Option<(Abi, &'static str)>, String> {
    let Some((rest, abi)) = SYSCALL_PREFIXES
        .iter()
        .find_map(|(prefix, abi)| function.strip_prefix(prefix).map(|rest| (rest, *abi)))
    else {
        return Ok(None);
    };
    let abi = match (abi, function.starts_with("compat_sys_")) {
        (Some(abi), _) => abi,
        (None, true) => default_abi.compat(),
        (None, false) => default_abi,
    };
    // The kernel names a few entry points after their newer struct layouts
    // (`__x64_sys_newuname` is `uname`).
    let name = abi
        .lookup(rest)
        .or_else(|| rest.strip_prefix("new").and_then(|r| abi.lookup(r)))
        .map(|(_, n)| n);
    match name {
        Some(n) => Ok(Some((abi, n))),
        None => Err(function.to_string()),
    }
}

/// Scratch space the JSON parser reuses from line to line.
pub struct Buffers(simd_json::Buffers);

impl std::fmt::Debug for Buffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Buffers")
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers(simd_json::Buffers::new(8 * 1024))
    }
}

/// Parses one line of a Tetragon export. The parser works in place: `line` is
/// changed (unescaped strings), and the result borrows from it.
///
/// Errors are the reason a line is malformed, naming the field; they never affect
/// other lines.
pub fn parse_line<'a>(line: &'a mut [u8], opts: &TetragonOptions, buffers: &mut Buffers) -> Result<Parsed<'a>, String> {
    let raw: RawLine<'a> =
        simd_json::serde::from_slice_with_buffers(line, &mut buffers.0).map_err(|e| e.to_string())?;
    let time = match raw.time.as_deref() {
        Some(t) => Some(
            t.parse::<Timestamp>()
                .map_err(|e| format!("field `time`: `{t}` is not an RFC 3339 time: {e}"))?,
        ),
        None => None,
    };
    let event = if let Some(rl) = raw.rate_limit_info {
        let n = rl.number_of_dropped_process_events.map_or(0, |n| n.0);
        let n = u64::try_from(n)
            .map_err(|_| format!("field `rate_limit_info.number_of_dropped_process_events`: {n} is out of range"))?;
        TetragonEvent::Dropped(n)
    } else if let Some(e) = raw.process_exec {
        with_source(e.process, opts, "process_exec", |s| Ok(TetragonEvent::Exec(s)))?
    } else if let Some(e) = raw.process_exit {
        with_source(e.process, opts, "process_exit", |s| Ok(TetragonEvent::Exit(s)))?
    } else if let Some(k) = raw.process_kprobe {
        let function = k.function_name;
        with_source(k.process, opts, "process_kprobe", |source| {
            let Some(function) = function.as_deref() else {
                return Ok(TetragonEvent::NotASyscall(source));
            };
            Ok(match syscall_of_function(function, opts.default_abi) {
                Ok(Some((abi, name))) => TetragonEvent::Syscall { source, abi, name },
                Ok(None) => TetragonEvent::NotASyscall(source),
                Err(what) => TetragonEvent::UnknownSyscall { source, what },
            })
        })?
    } else if let Some(t) = raw.process_tracepoint {
        let is_sys_enter = t.subsys.as_deref() == Some("raw_syscalls") && t.event.as_deref() == Some("sys_enter");
        let first = t.args.into_iter().next();
        with_source(t.process, opts, "process_tracepoint", |source| {
            if !is_sys_enter {
                return Ok(TetragonEvent::NotASyscall(source));
            }
            let (abi, nr) = syscall_number(first, opts.default_abi)?;
            Ok(match abi.name_of(nr) {
                Some(name) => TetragonEvent::Syscall { source, abi, name },
                None => TetragonEvent::UnknownSyscall {
                    source,
                    what: format!("{abi} #{nr}"),
                },
            })
        })?
    } else {
        TetragonEvent::Other
    };
    Ok(Parsed {
        event,
        node: raw.node_name,
        time,
    })
}

fn syscall_number(arg: Option<RawArg<'_>>, default_abi: Abi) -> Result<(Abi, u64), String> {
    const FIELD: &str = "field `process_tracepoint.args[0]`";
    let arg = arg.ok_or_else(|| {
        format!("{FIELD} is missing: raw_syscalls/sys_enter events carry the syscall id there (policy arg index 4)")
    })?;
    let (abi, n) = if let Some(id) = arg.syscall_id {
        let abi = match id.abi.as_deref() {
            Some(a) if !a.is_empty() => Abi::from_tetragon(a).ok_or_else(|| {
                format!("{FIELD}.syscall_id.abi: unknown ABI `{a}` (expected x64, i386, arm64 or arm32)")
            })?,
            _ => default_abi,
        };
        (abi, id.id.0)
    } else if let Some(n) = arg.size_arg.or(arg.long_arg) {
        (default_abi, n.0)
    } else {
        return Err(format!("{FIELD} has none of syscall_id, size_arg, long_arg"));
    };
    let n = u64::try_from(n).map_err(|_| format!("{FIELD}: syscall id {n} is negative"))?;
    if n & COMPAT_MARKER != 0 {
        Ok((abi.compat(), n & !COMPAT_MARKER))
    } else {
        Ok((abi, n))
    }
}

fn with_source<'a>(
    process: Option<RawProcess<'a>>,
    opts: &TetragonOptions,
    event: &'static str,
    f: impl FnOnce(Source<'a>) -> Result<TetragonEvent<'a>, String>,
) -> Result<TetragonEvent<'a>, String> {
    let Some(process) = process else {
        return Err(format!("field `{event}.process` is missing"));
    };
    let Some(pod) = process.pod else {
        return Ok(TetragonEvent::Host);
    };
    let (container, exec_probe) = match pod.container {
        Some(c) => (c.name, c.maybe_exec_probe.unwrap_or(false)),
        None => (Cow::Borrowed(""), false),
    };
    let who = Who {
        event,
        namespace: pod.namespace,
        pod: pod.name,
        container,
        workload: pod.workload,
        workload_kind: pod.workload_kind,
        labels: pod.pod_labels.unwrap_or_default(),
    };
    if process.in_init_tree == Some(false) && !exec_probe && !opts.include_non_init {
        return Ok(TetragonEvent::NotInInitTree(who));
    }
    f(Source {
        who,
        exec_probe: exec_probe && process.in_init_tree == Some(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a test line (the buffer is leaked: tests only).
    fn parse_line(line: &str, opts: &TetragonOptions) -> Result<Parsed<'static>, String> {
        let buf: &'static mut [u8] = Box::leak(line.as_bytes().to_vec().into_boxed_slice());
        super::parse_line(buf, opts, &mut Buffers::default())
    }

    fn opts() -> TetragonOptions {
        TetragonOptions {
            default_abi: Abi::X86_64,
            include_non_init: false,
        }
    }

    fn pod_process(extra: &str) -> String {
        format!(
            r#"{{"pid":7,"binary":"/app","pod":{{"namespace":"default","name":"xwing-7d8f9c5b6-abcde","container":{{"id":"containerd://1","name":"spaceship"{extra}}},"pod_labels":{{"pod-template-hash":"7d8f9c5b6"}},"workload":"xwing","workload_kind":"Deployment"}}}}"#
        )
    }

    fn tracepoint(arg: &str) -> String {
        format!(
            r#"{{"process_tracepoint":{{"process":{},"subsys":"raw_syscalls","event":"sys_enter","args":[{arg},{{"int_arg":3}}]}},"node_name":"n1","time":"2024-07-26T13:07:43.178407128Z"}}"#,
            pod_process("")
        )
    }

    fn syscall(line: &str) -> (Abi, &'static str) {
        match parse_line(line, &opts()).unwrap().event {
            TetragonEvent::Syscall { abi, name, source } => {
                assert_eq!(
                    source.who.key().unwrap().to_string(),
                    "default/deployment/xwing/spaceship"
                );
                (abi, name)
            }
            other => panic!("not a syscall: {other:?}"),
        }
    }

    #[test]
    fn tracepoint_syscall_id_shape() {
        assert_eq!(
            syscall(&tracepoint(r#"{"syscall_id":{"id":257,"abi":"x64"}}"#)),
            (Abi::X86_64, "openat")
        );
        assert_eq!(
            syscall(&tracepoint(r#"{"syscall_id":{"id":"5","abi":"i386"}}"#)),
            (Abi::I386, "open")
        );
        assert_eq!(
            syscall(&tracepoint(r#"{"syscall_id":{"id":56,"abi":"arm64"}}"#)),
            (Abi::Aarch64, "openat")
        );
        assert_eq!(
            syscall(&tracepoint(r#"{"syscallId":{"id":322,"abi":"arm32"}}"#)),
            (Abi::Arm, "openat")
        );
    }

    #[test]
    fn tracepoint_size_arg_and_long_arg_as_numbers_and_strings() {
        assert_eq!(syscall(&tracepoint(r#"{"size_arg":"0"}"#)), (Abi::X86_64, "read"));
        assert_eq!(syscall(&tracepoint(r#"{"size_arg":1}"#)), (Abi::X86_64, "write"));
        assert_eq!(syscall(&tracepoint(r#"{"long_arg":"435"}"#)), (Abi::X86_64, "clone3"));
        assert_eq!(syscall(&tracepoint(r#"{"long_arg":60}"#)), (Abi::X86_64, "exit"));
        // Tetragon's compat marker picks the 32-bit table.
        assert_eq!(
            syscall(&tracepoint(r#"{"size_arg":"2147483653"}"#)),
            (Abi::I386, "open")
        );
    }

    #[test]
    fn tracepoint_errors_name_the_field() {
        let err = parse_line(&tracepoint(r#"{"long_arg":"-3"}"#), &opts()).unwrap_err();
        assert!(err.contains("args[0]") && err.contains("negative"), "{err}");
        let err = parse_line(&tracepoint(r#"{"syscall_id":{"id":1,"abi":"mips"}}"#), &opts()).unwrap_err();
        assert!(err.contains("syscall_id.abi") && err.contains("mips"), "{err}");
        let err = parse_line(&tracepoint(r#"{"bytes_arg":"AA=="}"#), &opts()).unwrap_err();
        assert!(err.contains("none of syscall_id"), "{err}");
    }

    #[test]
    fn unknown_syscall_number_is_reported_not_guessed() {
        let line = tracepoint(r#"{"syscall_id":{"id":9999,"abi":"x64"}}"#);
        let e = parse_line(&line, &opts()).unwrap();
        assert!(matches!(e.event, TetragonEvent::UnknownSyscall { ref what, .. } if what == "x86_64 #9999"));
    }

    #[test]
    fn kprobe_function_prefixes() {
        assert_eq!(
            syscall_of_function("__x64_sys_openat", Abi::X86_64),
            Ok(Some((Abi::X86_64, "openat")))
        );
        assert_eq!(
            syscall_of_function("__ia32_sys_socketcall", Abi::X86_64),
            Ok(Some((Abi::I386, "socketcall")))
        );
        assert_eq!(
            syscall_of_function("__arm64_sys_read", Abi::X86_64),
            Ok(Some((Abi::Aarch64, "read")))
        );
        assert_eq!(
            syscall_of_function("sys_write", Abi::Aarch64),
            Ok(Some((Abi::Aarch64, "write")))
        );
        assert_eq!(
            syscall_of_function("__x64_sys_newuname", Abi::X86_64),
            Ok(Some((Abi::X86_64, "uname")))
        );
        assert_eq!(syscall_of_function("security_file_permission", Abi::X86_64), Ok(None));
        assert_eq!(
            syscall_of_function("__x64_sys_bogus", Abi::X86_64),
            Err("__x64_sys_bogus".to_string())
        );
    }

    #[test]
    fn process_not_in_init_tree_is_excluded_unless_it_is_an_exec_probe() {
        let exec = |p: String| format!(r#"{{"process_exec":{{"process":{p}}},"time":"2024-01-01T00:00:00Z"}}"#);
        let shell = exec(pod_process("").replace(r#""pid":7"#, r#""pid":7,"in_init_tree":false"#));
        assert!(matches!(
            parse_line(&shell, &opts()).unwrap().event,
            TetragonEvent::NotInInitTree(_)
        ));
        let include = TetragonOptions {
            include_non_init: true,
            ..opts()
        };
        assert!(matches!(
            parse_line(&shell, &include).unwrap().event,
            TetragonEvent::Exec(_)
        ));

        let probe =
            exec(pod_process(r#","maybe_exec_probe":true"#).replace(r#""pid":7"#, r#""pid":7,"inInitTree":false"#));
        match parse_line(&probe, &opts()).unwrap().event {
            TetragonEvent::Exec(s) => assert!(s.exec_probe),
            other => panic!("{other:?}"),
        }
        let init = exec(pod_process("").replace(r#""pid":7"#, r#""pid":7,"in_init_tree":true"#));
        match parse_line(&init, &opts()).unwrap().event {
            TetragonEvent::Exec(s) => assert!(!s.exec_probe),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rate_limit_info_as_number_or_string() {
        for n in [r#"12"#, r#""12""#] {
            let line = format!(
                r#"{{"rate_limit_info":{{"number_of_dropped_process_events":{n}}},"node_name":"n1","time":"2024-01-01T00:00:00Z"}}"#
            );
            let p = parse_line(&line, &opts()).unwrap();
            assert_eq!(p.event, TetragonEvent::Dropped(12));
            assert_eq!(p.node.as_deref(), Some("n1"));
        }
    }

    #[test]
    fn host_processes_and_unknown_kinds() {
        let host = r#"{"process_exec":{"process":{"pid":1,"binary":"/usr/bin/bash"}},"time":"2024-01-01T00:00:00Z"}"#;
        assert_eq!(parse_line(host, &opts()).unwrap().event, TetragonEvent::Host);
        let lsm = r#"{"process_lsm":{"process":{"pid":1}},"future_field":{"x":[1,2]}}"#;
        assert_eq!(parse_line(lsm, &opts()).unwrap().event, TetragonEvent::Other);
    }

    #[test]
    fn malformed_lines_say_why() {
        assert!(parse_line(r#"{"process_exec":"#, &opts()).is_err());
        let bad_time = r#"{"process_lsm":{},"time":"yesterday"}"#;
        assert!(parse_line(bad_time, &opts()).unwrap_err().contains("field `time`"));
        let bad_ns =
            r#"{"process_exec":{"process":{"pod":{"namespace":"Bad NS","name":"p","container":{"name":"c"}}}}}"#;
        let TetragonEvent::Exec(source) = parse_line(bad_ns, &opts()).unwrap().event else {
            panic!("not an exec")
        };
        let err = source.who.key().unwrap_err();
        assert!(
            err.contains("process_exec.process.pod") && err.contains("namespace"),
            "{err}"
        );
    }
}
