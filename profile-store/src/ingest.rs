//! Reading observation inputs (files, directories of rotated files, `.gz`, stdin)
//! into per-workload baselines, with an exact account of every line that did not
//! contribute and why.

use crate::baseline::Baseline;
use crate::key::WorkloadKey;
use crate::strace::{StraceEvent, StraceParser};
use crate::tetragon::{self, Source, TetragonEvent, TetragonOptions};
use flate2::read::MultiGzDecoder;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How many malformed lines are kept with their reason; the rest are only counted.
pub const MALFORMED_SAMPLES: usize = 20;

/// Options for an ingest run.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// Tetragon options (default ABI, non-init processes).
    pub tetragon: TetragonOptions,
    /// The key strace inputs are recorded under; strace logs do not say which
    /// workload they are.
    pub strace_key: Option<WorkloadKey>,
}

/// Why an input could not be read at all (bad lines are not errors: they are
/// counted in the report).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Opening or reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The input.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// An strace log was given without a key to record it under.
    #[error(
        "{path} looks like strace output (its first line is not JSON); pass --strace-key namespace/kind/name/container to say which workload it traced"
    )]
    StraceWithoutKey {
        /// The input.
        path: String,
    },
}

/// A line that could not be used, with where it is and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Malformed {
    /// The input (file path, `file.gz`, or `-` for stdin).
    pub source: String,
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Events Tetragon reported dropped on one node at one time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// `node_name` (empty when absent).
    pub node: String,
    /// `time`.
    pub time: Option<Timestamp>,
    /// `number_of_dropped_process_events`.
    pub count: u64,
}

/// Everything an ingest run saw, beyond the baselines themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestReport {
    /// Inputs read (files after expanding directories).
    pub inputs: Vec<String>,
    /// Lines read, blank ones included.
    pub lines: u64,
    /// Syscall events that went into baselines.
    pub syscall_events: u64,
    /// Process exec/exit events that went into baselines.
    pub process_events: u64,
    /// Events of processes outside any pod (left out).
    pub host_events: u64,
    /// Events of processes entered from outside their container (left out).
    pub not_in_init_tree: u64,
    /// Exec-probe events kept although outside the init tree.
    pub exec_probe_events: u64,
    /// Kprobes and tracepoints on non-syscall functions (nothing to learn).
    pub not_a_syscall: u64,
    /// Other event kinds (`process_lsm`, `process_throttle`, ...).
    pub other_events: u64,
    /// Syscalls the tables do not know, by what was seen: not put in profiles.
    pub unknown_syscalls: BTreeMap<String, u64>,
    /// Dropped-event reports, per node and time.
    pub dropped: Vec<Dropped>,
    /// Malformed lines in all.
    pub malformed: u64,
    /// The first [`MALFORMED_SAMPLES`] malformed lines.
    pub malformed_samples: Vec<Malformed>,
}

impl IngestReport {
    /// Events Tetragon dropped, in all.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|d| d.count).sum()
    }

    fn malformed(&mut self, source: &str, line: u64, reason: String) {
        self.malformed += 1;
        if self.malformed_samples.len() < MALFORMED_SAMPLES {
            self.malformed_samples.push(Malformed {
                source: source.to_string(),
                line,
                reason,
            });
        }
    }
}

/// Accumulates baselines from any number of inputs.
#[derive(Debug, Default)]
pub struct Ingest {
    opts: IngestOptions,
    baselines: HashMap<WorkloadKey, Baseline>,
    report: IngestReport,
}

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One Tetragon JSON event per line.
    Tetragon,
    /// strace output.
    Strace,
}

impl Ingest {
    /// A new, empty run.
    pub fn new(opts: IngestOptions) -> Self {
        Ingest {
            opts,
            ..Ingest::default()
        }
    }

    /// The files behind `path`: the file itself; a directory's regular files in name
    /// order (rotated logs); `-` for stdin; or, for `strace -ff -o F`, the files
    /// `F.<pid>` when `F` itself does not exist.
    pub fn expand(path: &Path) -> Result<Vec<PathBuf>, IngestError> {
        let io_err = |source| IngestError::Io {
            path: path.display().to_string(),
            source,
        };
        if path == Path::new("-") {
            return Ok(vec![path.to_path_buf()]);
        }
        if path.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io_err)? {
                let entry = entry.map_err(io_err)?;
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if !hidden && entry.file_type().map_err(io_err)?.is_file() {
                    files.push(entry.path());
                }
            }
            files.sort();
            return Ok(files);
        }
        if !path.exists() {
            let ff = ff_files(path);
            if !ff.is_empty() {
                return Ok(ff);
            }
        }
        // Let opening report a missing file with its name.
        Ok(vec![path.to_path_buf()])
    }

    /// Lines read so far.
    pub fn lines(&self) -> u64 {
        self.report.lines
    }

    /// Reads one file (or `-`), detecting gzip and the format. `progress` is called
    /// with the number of raw bytes read so far from this input.
    pub fn read_file(&mut self, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<(), IngestError> {
        let name = path.display().to_string();
        let io_err = |source| IngestError::Io {
            path: name.clone(),
            source,
        };
        let raw: Box<dyn Read> = if path == Path::new("-") {
            Box::new(io::stdin().lock())
        } else {
            Box::new(File::open(path).map_err(io_err)?)
        };
        let mut counted = CountingReader {
            inner: raw,
            read: 0,
            progress,
        };
        let mut head = BufReader::with_capacity(1 << 16, &mut counted);
        let is_gzip = head.fill_buf().map_err(io_err)?.starts_with(&[0x1f, 0x8b]);
        let mut reader: Box<dyn BufRead + '_> = if is_gzip {
            Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(head)))
        } else {
            Box::new(head)
        };
        let format = detect(&mut reader).map_err(io_err)?;
        self.report.inputs.push(name.clone());
        match format {
            Format::Tetragon => self.read_tetragon(&name, &mut reader),
            Format::Strace => {
                let key = self
                    .opts
                    .strace_key
                    .clone()
                    .ok_or_else(|| IngestError::StraceWithoutKey { path: name.clone() })?;
                self.read_strace(&name, &mut reader, key, ff_pid(path))
            }
        }
        .map_err(io_err)
    }

    /// Reads Tetragon lines from `reader`, naming them `source` in reports.
    pub fn read_tetragon(&mut self, source: &str, reader: &mut dyn BufRead) -> io::Result<()> {
        let opts = self.opts.tetragon;
        for_each_line(
            reader,
            &mut self.report,
            source,
            |report, line_no, line| match tetragon::parse_line(line, &opts) {
                Ok(p) => apply_tetragon(&mut self.baselines, report, p),
                Err(reason) => report.malformed(source, line_no, reason),
            },
        )
    }

    /// Reads strace lines from `reader` into `key`'s baseline; `file_pid` is the pid
    /// of an `strace -ff` file.
    pub fn read_strace(
        &mut self,
        source: &str,
        reader: &mut dyn BufRead,
        key: WorkloadKey,
        file_pid: Option<u32>,
    ) -> io::Result<()> {
        let mut parser = StraceParser::new(self.opts.tetragon.default_abi, file_pid);
        let baseline = self.baselines.entry(key.clone()).or_insert_with(|| Baseline::new(key));
        // Processes are counted by pid; a log without pids is one process.
        let mut pids = std::collections::HashSet::new();
        for_each_line(reader, &mut self.report, source, |report, line_no, line| {
            match parser.parse_line(line) {
                Ok(StraceEvent::Syscall { pid, abi, name, .. }) => {
                    if pids.insert(pid) {
                        baseline.processes += 1;
                    }
                    report.syscall_events += 1;
                    baseline.record_syscall(name, abi, None);
                }
                Ok(StraceEvent::UnknownSyscall { what, .. }) => {
                    *report.unknown_syscalls.entry(what).or_default() += 1;
                }
                Ok(StraceEvent::Exited { .. } | StraceEvent::Killed { .. }) => {
                    baseline.exits += 1;
                    report.process_events += 1;
                }
                Ok(StraceEvent::Signal { .. } | StraceEvent::Noise) => {}
                Err(reason) => report.malformed(source, line_no, reason),
            }
        })
    }

    /// Ends the run: the baselines, sorted by key, each charged with the events
    /// Tetragon dropped on the nodes it ran on; and the report.
    pub fn finish(self) -> (Vec<Baseline>, IngestReport) {
        let mut dropped_per_node: HashMap<&str, u64> = HashMap::new();
        for d in &self.report.dropped {
            *dropped_per_node.entry(d.node.as_str()).or_default() += d.count;
        }
        let mut baselines: Vec<Baseline> = self.baselines.into_values().collect();
        for b in &mut baselines {
            b.dropped_on_nodes += b
                .nodes
                .iter()
                .filter_map(|n| dropped_per_node.get(n.as_str()))
                .sum::<u64>();
        }
        baselines.sort_by(|a, b| a.key.cmp(&b.key));
        (baselines, self.report)
    }
}

fn baseline_for<'m>(map: &'m mut HashMap<WorkloadKey, Baseline>, key: &WorkloadKey) -> &'m mut Baseline {
    if !map.contains_key(key) {
        map.insert(key.clone(), Baseline::new(key.clone()));
    }
    // Inserted just above when absent.
    map.get_mut(key).unwrap_or_else(|| unreachable!())
}

fn apply_tetragon(map: &mut HashMap<WorkloadKey, Baseline>, report: &mut IngestReport, p: tetragon::Parsed<'_>) {
    let node = p.node.as_deref();
    let t = p.time;
    match p.event {
        TetragonEvent::Syscall { source, abi, name } => {
            touch(map, report, &source, node, t).record_syscall(name, abi, t);
            report.syscall_events += 1;
        }
        TetragonEvent::Exec(source) => {
            touch(map, report, &source, node, t).processes += 1;
            report.process_events += 1;
        }
        TetragonEvent::Exit(source) => {
            touch(map, report, &source, node, t).exits += 1;
            report.process_events += 1;
        }
        TetragonEvent::NotInInitTree(key) => {
            baseline_for(map, &key).excluded.not_in_init_tree += 1;
            report.not_in_init_tree += 1;
        }
        TetragonEvent::UnknownSyscall { source, what } => {
            touch(map, report, &source, node, t);
            *report.unknown_syscalls.entry(what).or_default() += 1;
        }
        TetragonEvent::NotASyscall(source) => {
            touch(map, report, &source, node, t);
            report.not_a_syscall += 1;
        }
        TetragonEvent::Host => report.host_events += 1,
        TetragonEvent::Dropped(count) => report.dropped.push(Dropped {
            node: node.unwrap_or_default().to_string(),
            time: t,
            count,
        }),
        TetragonEvent::Other => report.other_events += 1,
    }
}

/// The baseline `source` contributes to, with its pod, node and time recorded.
fn touch<'m>(
    map: &'m mut HashMap<WorkloadKey, Baseline>,
    report: &mut IngestReport,
    source: &Source<'_>,
    node: Option<&str>,
    t: Option<Timestamp>,
) -> &'m mut Baseline {
    let b = baseline_for(map, &source.key);
    b.record_source(Some(&source.pod), node);
    b.see_time(t);
    if source.exec_probe {
        b.exec_probe_events += 1;
        report.exec_probe_events += 1;
    }
    b
}

/// Calls `f` with each line's number and text; lines that are not UTF-8 are
/// reported malformed. Reads bytes, so one bad line never hides the next.
fn for_each_line(
    reader: &mut dyn BufRead,
    report: &mut IngestReport,
    source: &str,
    mut f: impl FnMut(&mut IngestReport, u64, &str),
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        line_no += 1;
        report.lines += 1;
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim_end_matches(['\n', '\r']),
            Err(e) => {
                report.malformed(source, line_no, format!("not UTF-8 (byte {})", e.valid_up_to()));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        f(report, line_no, text);
    }
}

/// Tetragon exports are JSON objects, one per line; anything else is taken for strace.
fn detect(reader: &mut dyn BufRead) -> io::Result<Format> {
    let head = reader.fill_buf()?;
    let first = head.iter().find(|b| !b.is_ascii_whitespace());
    Ok(match first {
        Some(b'{') | None => Format::Tetragon,
        Some(_) => Format::Strace,
    })
}

/// The pid of an `strace -ff -o F` output file `F.<pid>`.
fn ff_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let (_, suffix) = name.rsplit_once('.')?;
    suffix.parse().ok()
}

fn ff_files(prefix: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (prefix.parent(), prefix.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(stem))
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    files.sort();
    files
}

struct CountingReader<'p, R> {
    inner: R,
    read: u64,
    progress: &'p mut dyn FnMut(u64),
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        (self.progress)(self.read);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn data(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data")
            .join(rel)
    }

    fn run(opts: IngestOptions, paths: &[&Path]) -> (Vec<Baseline>, IngestReport) {
        let mut ingest = Ingest::new(opts);
        for p in paths {
            for f in Ingest::expand(p).unwrap() {
                ingest.read_file(&f, &mut |_| {}).unwrap();
            }
        }
        ingest.finish()
    }

    fn find<'b>(baselines: &'b [Baseline], key: &str) -> &'b Baseline {
        baselines
            .iter()
            .find(|b| b.key.to_string() == key)
            .unwrap_or_else(|| panic!("no baseline {key}"))
    }

    fn x86() -> IngestOptions {
        IngestOptions {
            tetragon: TetragonOptions {
                default_abi: crate::Abi::X86_64,
                include_non_init: false,
            },
            strace_key: None,
        }
    }

    #[test]
    fn tetragon_docs_samples_parse_without_a_malformed_line() {
        let (baselines, report) = run(x86(), &[&data("tetragon/docs-events.jsonl")]);
        assert_eq!(report.lines, 63);
        assert_eq!(report.malformed, 0, "{:?}", report.malformed_samples);
        let xwing = find(&baselines, "default/pod/xwing/spaceship");
        assert_eq!(xwing.syscall_names().collect::<Vec<_>>(), ["setgid", "setns", "setuid"]);
        assert_eq!(xwing.nodes.len(), 3, "the docs samples come from three clusters");
        let es = find(
            &baselines,
            "tenant-jobs/pod/elasticsearch-56f8fc6988-sh8rm/elasticsearch",
        );
        assert_eq!(es.syscall_names().collect::<Vec<_>>(), ["write"]);
        // pod-template-hash label + generated name: the Deployment, not the pod.
        let deathstar = find(&baselines, "default/deployment/deathstar/deathstar");
        assert_eq!(deathstar.pods.len(), 2, "{:?}", deathstar.pods);
        assert!(deathstar.processes >= 2);
        assert_eq!(report.syscall_events, 5);
        assert!(report.host_events > 0);
        assert!(report.not_a_syscall > 0, "security_* kprobes are not syscalls");
        // process_throttle, process_connect, ... are other kinds.
        assert!(report.other_events > 0);
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    const GOOD: &str = r#"{"process_kprobe":{"process":{"pod":{"namespace":"ns","name":"web-0","container":{"name":"c"},"workload":"web-0","workload_kind":"Pod"}},"function_name":"__x64_sys_read"},"node_name":"n1","time":"2024-01-01T00:00:00Z"}"#;

    #[test]
    fn malformed_lines_are_counted_with_line_numbers_and_lose_nothing_around_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("events.json");
        let mut bytes = Vec::new();
        bytes.extend_from_slice(GOOD.as_bytes());
        bytes.extend_from_slice(b"\n{\"process_kprobe\": {truncated\n");
        bytes.extend_from_slice(b"\xff\xfe not utf-8\n\n");
        bytes.extend_from_slice(GOOD.replace("__x64_sys_read", "__x64_sys_write").as_bytes());
        std::fs::write(&f, bytes).unwrap();
        let (baselines, report) = run(x86(), &[&f]);
        assert_eq!(report.malformed, 2);
        let lines: Vec<u64> = report.malformed_samples.iter().map(|m| m.line).collect();
        assert_eq!(lines, [2, 3]);
        assert!(report.malformed_samples[1].reason.contains("UTF-8"));
        assert!(report.malformed_samples[0].source.ends_with("events.json"));
        assert_eq!(baselines[0].syscall_names().collect::<Vec<_>>(), ["read", "write"]);
    }

    #[test]
    fn directories_of_rotated_files_and_gzip_are_read() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("tetragon.log"), GOOD);
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(GOOD.replace("__x64_sys_read", "__x64_sys_openat").as_bytes())
            .unwrap();
        std::fs::write(dir.path().join("tetragon.log.1.gz"), gz.finish().unwrap()).unwrap();
        write(&dir.path().join(".hidden"), "junk");
        let (baselines, report) = run(x86(), &[dir.path()]);
        assert_eq!(report.inputs.len(), 2);
        assert_eq!(report.malformed, 0);
        assert_eq!(baselines[0].syscall_names().collect::<Vec<_>>(), ["openat", "read"]);
    }

    #[test]
    fn dropped_events_are_reported_per_node_and_charged_to_baselines_on_that_node() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("e.json");
        let drop = |node: &str, n: &str| {
            format!(
                r#"{{"rate_limit_info":{{"number_of_dropped_process_events":{n}}},"node_name":"{node}","time":"2024-01-01T00:00:05Z"}}"#
            )
        };
        write(&f, &[GOOD.to_string(), drop("n1", "\"7\""), drop("n2", "3")].join("\n"));
        let (baselines, report) = run(x86(), &[&f]);
        assert_eq!(report.dropped_total(), 10);
        assert_eq!(report.dropped.len(), 2);
        assert_eq!(baselines[0].dropped_on_nodes, 7);
    }

    #[test]
    fn strace_needs_a_key_and_ff_files_are_found_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("trace.100"),
            "execve(\"/bin/true\", [\"true\"], 0x7ff) = 0\nbrk(NULL) = 0x1\n+++ exited with 0 +++\n",
        );
        write(&dir.path().join("trace.101"), "read(0, \"\", 1) = 0\n");
        write(&dir.path().join("trace.notes"), "not a pid file\n");
        let prefix = dir.path().join("trace");
        let files = Ingest::expand(&prefix).unwrap();
        assert_eq!(files.len(), 2);
        let mut ingest = Ingest::new(x86());
        let err = ingest.read_file(&files[0], &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("--strace-key"), "{err}");

        let key: WorkloadKey = "ns/pod/tool/main".parse().unwrap();
        let (baselines, report) = run(
            IngestOptions {
                strace_key: Some(key.clone()),
                ..x86()
            },
            &[&prefix],
        );
        assert_eq!(report.malformed, 0);
        assert_eq!(baselines[0].key, key);
        assert_eq!(
            baselines[0].syscall_names().collect::<Vec<_>>(),
            ["brk", "execve", "read"]
        );
        assert_eq!(baselines[0].processes, 2);
    }

    #[test]
    fn a_missing_input_is_an_error_naming_it() {
        let mut ingest = Ingest::new(x86());
        let err = ingest
            .read_file(Path::new("/nonexistent/tetragon.log"), &mut |_| {})
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tetragon.log"));
    }
}

#[cfg(test)]
mod strace_samples {
    use super::*;

    fn names_of(path: &Path) -> (Vec<String>, IngestReport) {
        let key: WorkloadKey = "ns/pod/sh/main".parse().unwrap();
        let mut ingest = Ingest::new(IngestOptions {
            tetragon: TetragonOptions {
                default_abi: crate::Abi::X86_64,
                include_non_init: false,
            },
            strace_key: Some(key),
        });
        for f in Ingest::expand(path).unwrap() {
            ingest.read_file(&f, &mut |_| {}).unwrap();
        }
        let (baselines, report) = ingest.finish();
        (baselines[0].syscall_names().map(str::to_string).collect(), report)
    }

    /// The same shell pipeline traced four ways (tests/data/strace/SOURCES.txt):
    /// every line parses, and every way yields the same syscalls.
    #[test]
    fn real_strace_outputs_parse_cleanly_and_agree() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/strace");
        let (plain, report) = names_of(&dir.join("sh-pipeline.trace"));
        assert_eq!(report.malformed, 0, "{:?}", report.malformed_samples);
        for name in ["execve", "getdents64", "pipe2", "wait4", "dup2", "exit_group"] {
            assert!(plain.iter().any(|n| n == name), "{name} missing from {plain:?}");
        }
        for other in ["sh-pipeline-tt.trace", "sh-pipeline-stderr.trace", "ff/trace"] {
            let (names, report) = names_of(&dir.join(other));
            assert_eq!(report.malformed, 0, "{other}: {:?}", report.malformed_samples);
            assert_eq!(names, plain, "{other}");
        }
    }
}
