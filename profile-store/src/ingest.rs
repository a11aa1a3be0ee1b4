//! Reading observation inputs (files, directories of rotated files, `.gz`, stdin)
//! into per-workload baselines, with an exact account of every line that did not
//! contribute and why.

use crate::baseline::Baseline;
use crate::key::WorkloadKey;
use crate::strace::{StraceEvent, StraceParser};
use crate::tetragon::{self, Source, TetragonEvent, TetragonOptions};
use flate2::read::MultiGzDecoder;
use jiff::Timestamp;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::borrow::Cow;
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
    /// Threads parsing Tetragon input (0: one per core). The result is the same
    /// whatever the number.
    pub jobs: usize,
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
    tally: Tally,
}

/// How much input a parsing thread takes at a time.
pub const BLOCK: usize = 4 << 20;

/// What one stretch of input adds up to: the baselines and the report, plus a cache
/// from pod identities to workload keys (deriving a key validates and allocates;
/// the same pods come back on every line).
#[derive(Debug, Default)]
struct Tally {
    baselines: FxHashMap<WorkloadKey, Baseline>,
    report: IngestReport,
    keys: FxHashMap<u64, (tetragon::Who<'static>, WorkloadKey)>,
    buffers: tetragon::Buffers,
}

fn who_hash(who: &tetragon::Who<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    who.hash(&mut h);
    h.finish()
}

impl Tally {
    /// The baseline `who` contributes to, deriving (and caching) its key.
    fn baseline(&mut self, who: &tetragon::Who<'_>) -> Result<&mut Baseline, String> {
        let h = who_hash(who);
        let cached = matches!(self.keys.get(&h), Some((w, _)) if w == who);
        if !cached {
            let key = who.key()?;
            let owned = tetragon::Who {
                event: who.event,
                namespace: Cow::Owned(who.namespace.to_string()),
                pod: Cow::Owned(who.pod.to_string()),
                container: Cow::Owned(who.container.to_string()),
                workload: who.workload.as_ref().map(|w| Cow::Owned(w.to_string())),
                workload_kind: who.workload_kind.as_ref().map(|w| Cow::Owned(w.to_string())),
                labels: owned_labels(&who.labels),
            };
            // A rare hash collision just replaces the entry.
            self.keys.insert(h, (owned, key));
        }
        let Some((_, key)) = self.keys.get(&h) else {
            return Err("internal: key cache miss".into());
        };
        if !self.baselines.contains_key(key) {
            self.baselines.insert(key.clone(), Baseline::new(key.clone()));
        }
        self.baselines
            .get_mut(key)
            .ok_or_else(|| "internal: baseline missing".into())
    }

    /// Adds another tally's baselines and counters (not its ordered parts:
    /// malformed samples, dropped reports, line count, which the caller orders).
    fn absorb(&mut self, other: Tally) {
        for (key, b) in other.baselines {
            match self.baselines.get_mut(&key) {
                Some(mine) => mine.merge(&b),
                None => {
                    self.baselines.insert(key, b);
                }
            }
        }
        let (r, o) = (&mut self.report, other.report);
        r.syscall_events += o.syscall_events;
        r.process_events += o.process_events;
        r.host_events += o.host_events;
        r.not_in_init_tree += o.not_in_init_tree;
        r.exec_probe_events += o.exec_probe_events;
        r.not_a_syscall += o.not_a_syscall;
        r.other_events += o.other_events;
        for (k, v) in o.unknown_syscalls {
            *r.unknown_syscalls.entry(k).or_default() += v;
        }
        r.malformed += o.malformed;
    }

    /// One Tetragon line.
    fn tetragon_line(&mut self, opts: &TetragonOptions, source: &str, line_no: u64, line: &mut [u8]) {
        match tetragon::parse_line(line, opts, &mut self.buffers) {
            Ok(p) => {
                if let Err(reason) = self.apply(p) {
                    self.report.malformed(source, line_no, reason);
                }
            }
            Err(reason) => {
                // The parser rejects invalid UTF-8 before it writes into the line, so
                // the bytes are still the input's here.
                let reason = match std::str::from_utf8(line) {
                    Err(e) => not_utf8(e),
                    Ok(_) => reason,
                };
                self.report.malformed(source, line_no, reason)
            }
        }
    }

    fn apply(&mut self, p: tetragon::Parsed<'_>) -> Result<(), String> {
        let node = p.node.as_deref();
        let t = p.time;
        match p.event {
            TetragonEvent::Syscall { source, abi, name } => {
                self.touch(&source, node, t)?.record_syscall(name, abi, t);
                self.report.syscall_events += 1;
            }
            TetragonEvent::Exec(source) => {
                self.touch(&source, node, t)?.processes += 1;
                self.report.process_events += 1;
            }
            TetragonEvent::Exit(source) => {
                self.touch(&source, node, t)?.exits += 1;
                self.report.process_events += 1;
            }
            TetragonEvent::NotInInitTree(who) => {
                self.baseline(&who)?.excluded.not_in_init_tree += 1;
                self.report.not_in_init_tree += 1;
            }
            TetragonEvent::UnknownSyscall { source, what } => {
                self.touch(&source, node, t)?;
                *self.report.unknown_syscalls.entry(what).or_default() += 1;
            }
            TetragonEvent::NotASyscall(source) => {
                self.touch(&source, node, t)?;
                self.report.not_a_syscall += 1;
            }
            TetragonEvent::Host => self.report.host_events += 1,
            TetragonEvent::Dropped(count) => self.report.dropped.push(Dropped {
                node: node.unwrap_or_default().to_string(),
                time: t,
                count,
            }),
            TetragonEvent::Other => self.report.other_events += 1,
        }
        Ok(())
    }

    /// The baseline `source` contributes to, with its pod, node and time recorded.
    fn touch(
        &mut self,
        source: &Source<'_>,
        node: Option<&str>,
        t: Option<Timestamp>,
    ) -> Result<&mut Baseline, String> {
        let probe = source.exec_probe;
        if probe {
            self.report.exec_probe_events += 1;
        }
        let b = self.baseline(&source.who)?;
        b.record_source(Some(&source.who.pod), node);
        b.see_time(t);
        if probe {
            b.exec_probe_events += 1;
        }
        Ok(b)
    }
}

/// The parts of one block's outcome whose order matters.
#[derive(Debug)]
struct BlockOrdered {
    idx: usize,
    lines: u64,
    malformed_samples: Vec<Malformed>,
    dropped: Vec<Dropped>,
}

fn owned_labels(l: &tetragon::KnownLabels<'_>) -> tetragon::KnownLabels<'static> {
    let own = |v: &Option<Cow<'_, str>>| v.as_ref().map(|s| Cow::Owned(s.to_string()));
    tetragon::KnownLabels {
        pod_template_hash: own(&l.pod_template_hash),
        statefulset_pod_name: own(&l.statefulset_pod_name),
        pod_index: own(&l.pod_index),
        pod_template_generation: own(&l.pod_template_generation),
        job_name: own(&l.job_name),
        job_name_legacy: own(&l.job_name_legacy),
    }
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
        self.tally.report.lines
    }

    fn jobs(&self) -> usize {
        match self.opts.jobs {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
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
        self.tally.report.inputs.push(name.clone());
        let jobs = self.jobs();
        match format {
            Format::Tetragon if jobs > 1 => self.read_tetragon_parallel(&name, &mut reader, jobs, BLOCK),
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
        let tally = &mut self.tally;
        let lines = for_each_line(reader, |n, line| tally.tetragon_line(&opts, source, n, line))?;
        tally.report.lines += lines;
        Ok(())
    }

    /// [`Ingest::read_tetragon`] on `jobs` threads: this thread reads `block`-sized,
    /// newline-aligned chunks (decompressing, if the reader does) and the workers
    /// parse them. Memory stays at a few blocks per thread whatever the input size,
    /// and the result is exactly the single-threaded one: counts add up, baselines
    /// merge (commutative and associative), and malformed lines keep their numbers
    /// and order.
    pub fn read_tetragon_parallel(
        &mut self,
        source: &str,
        reader: &mut dyn Read,
        jobs: usize,
        block: usize,
    ) -> io::Result<()> {
        let opts = self.opts.tetragon;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>, usize)>(jobs);
        let rx = std::sync::Mutex::new(rx);
        // Parsed blocks come back to the reader to be filled again: fresh 4 MiB
        // buffers would cost a page fault per 4 KiB.
        let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        // Each worker keeps one running tally (baselines and counters merge in any
        // order); what has an order — malformed lines, dropped-event reports — is
        // kept per block and put back in block order at the end.
        let results = std::thread::scope(|scope| -> io::Result<Vec<(Tally, Vec<BlockOrdered>)>> {
            let workers: Vec<_> = (0..jobs.max(1))
                .map(|_| {
                    let rx = &rx;
                    let give_back = give_back.clone();
                    scope.spawn(move || {
                        let mut acc = Tally::default();
                        let mut blocks = Vec::new();
                        loop {
                            let next = rx.lock().map_err(|_| ()).and_then(|r| r.recv().map_err(|_| ()));
                            let Ok((idx, mut bytes, len)) = next else { break };
                            let lines = for_each_line_in(&mut bytes[..len], |n, line| {
                                acc.tetragon_line(&opts, source, n, line)
                            });
                            blocks.push(BlockOrdered {
                                idx,
                                lines,
                                malformed_samples: std::mem::take(&mut acc.report.malformed_samples),
                                dropped: std::mem::take(&mut acc.report.dropped),
                            });
                            let _ = give_back.send(bytes);
                        }
                        (acc, blocks)
                    })
                })
                .collect();
            let read = split_blocks(
                reader,
                block,
                || spare.try_recv().ok(),
                |idx, bytes, len| tx.send((idx, bytes, len)).is_ok(),
            );
            drop(tx);
            let mut all = Vec::new();
            for w in workers {
                all.push(w.join().map_err(|_| io::Error::other("a parsing thread panicked"))?);
            }
            read?;
            Ok(all)
        })?;
        let mut ordered = Vec::new();
        for (acc, blocks) in results {
            self.tally.absorb(acc);
            ordered.extend(blocks);
        }
        ordered.sort_by_key(|b| b.idx);
        // Line numbers count from the start of this input.
        let mut before = 0;
        for b in ordered {
            let report = &mut self.tally.report;
            for mut m in b.malformed_samples {
                if report.malformed_samples.len() >= MALFORMED_SAMPLES {
                    break;
                }
                m.line += before;
                report.malformed_samples.push(m);
            }
            report.dropped.extend(b.dropped);
            report.lines += b.lines;
            before += b.lines;
        }
        Ok(())
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
        let Tally { baselines, report, .. } = &mut self.tally;
        let baseline = baselines.entry(key.clone()).or_insert_with(|| Baseline::new(key));
        // Processes are counted by pid; a log without pids is one process.
        let mut pids = std::collections::HashSet::new();
        let lines = for_each_line(reader, |line_no, line| {
            let line = match std::str::from_utf8(line) {
                Ok(text) => text,
                Err(e) => return report.malformed(source, line_no, not_utf8(e)),
            };
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
        })?;
        report.lines += lines;
        Ok(())
    }

    /// Ends the run: the baselines, sorted by key, each charged with the events
    /// Tetragon dropped on the nodes it ran on; and the report.
    pub fn finish(self) -> (Vec<Baseline>, IngestReport) {
        let Tally { baselines, report, .. } = self.tally;
        let mut dropped_per_node: HashMap<&str, u64> = HashMap::new();
        for d in &report.dropped {
            *dropped_per_node.entry(d.node.as_str()).or_default() += d.count;
        }
        let mut baselines: Vec<Baseline> = baselines.into_values().collect();
        for b in &mut baselines {
            b.dropped_on_nodes += b
                .nodes
                .iter()
                .filter_map(|n| dropped_per_node.get(n.as_str()))
                .sum::<u64>();
        }
        baselines.sort_by(|a, b| a.key.cmp(&b.key));
        (baselines, report)
    }
}

/// Calls `f` with each line's number (1-based within `reader`) and bytes, and
/// returns how many lines there were. Blank lines are counted but not passed on.
/// Reads bytes, so one bad line never hides the next.
fn for_each_line(reader: &mut dyn BufRead, mut f: impl FnMut(u64, &mut [u8])) -> io::Result<u64> {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(line_no);
        }
        line_no += 1;
        one_line(line_no, &mut buf, &mut f);
    }
}

/// The reason given for a line that is not UTF-8.
fn not_utf8(e: std::str::Utf8Error) -> String {
    format!("not UTF-8 (byte {})", e.valid_up_to())
}

/// Hands one line (with its newline) on without the line end; blank lines are
/// skipped. UTF-8 is not checked here: the JSON parser validates it anyway, and a
/// second pass over every byte cost ~2% of ingest. A line that fails to parse is
/// checked then, so the reason still says "not UTF-8" when that is why.
fn one_line(line_no: u64, line: &mut [u8], f: &mut impl FnMut(u64, &mut [u8])) {
    let mut len = line.len();
    while len > 0 && matches!(line[len - 1], b'\n' | b'\r') {
        len -= 1;
    }
    if !line[..len].trim_ascii().is_empty() {
        f(line_no, &mut line[..len]);
    }
}

/// [`for_each_line`] over bytes in memory, without copying them.
fn for_each_line_in(bytes: &mut [u8], mut f: impl FnMut(u64, &mut [u8])) -> u64 {
    let mut line_no = 0u64;
    let mut rest = bytes;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let (line, next) = std::mem::take(&mut rest).split_at_mut(end);
        rest = next;
        line_no += 1;
        one_line(line_no, line, &mut f);
    }
    line_no
}

/// Cuts `reader` into chunks of about `block` bytes that end at a newline (a line
/// longer than `block` makes its chunk longer) and hands each to `send` with its
/// index and its length (the buffer may be longer), filling buffers from
/// `recycled` when it has one; stops early when `send` returns false.
///
/// Reads go straight into memory the buffer has already initialized: reading
/// through `read_to_end` zeroed each 4 MiB block before the kernel overwrote it.
fn split_blocks(
    reader: &mut dyn Read,
    block: usize,
    mut recycled: impl FnMut() -> Option<Vec<u8>>,
    mut send: impl FnMut(usize, Vec<u8>, usize) -> bool,
) -> io::Result<()> {
    let mut carry: Vec<u8> = Vec::new();
    let mut idx = 0;
    loop {
        let mut buf = recycled().unwrap_or_default();
        if buf.len() < carry.len() {
            buf.resize(carry.len(), 0);
        }
        buf[..carry.len()].copy_from_slice(&carry);
        let mut filled = carry.len();
        carry.clear();
        let mut eof = false;
        // Fill to `block`, then keep reading `block`-sized pieces until one holds a
        // newline; only the new piece is searched.
        let mut searched = 0;
        loop {
            let want = if filled < block { block - filled } else { block };
            if buf.len() < filled + want {
                buf.resize(filled + want, 0);
            }
            let n = read_full(reader, &mut buf[filled..filled + want])?;
            filled += n;
            if n == 0 {
                eof = true;
                break;
            }
            if filled >= block {
                if let Some(pos) = memchr_last(&buf[searched..filled]) {
                    let end = searched + pos + 1;
                    carry.extend_from_slice(&buf[end..filled]);
                    filled = end;
                    break;
                }
                searched = filled;
            }
            if n < want {
                eof = true;
                break;
            }
        }
        if filled == 0 {
            return Ok(());
        }
        if !send(idx, buf, filled) {
            return Ok(());
        }
        idx += 1;
        if eof && carry.is_empty() {
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn memchr_last(buf: &[u8]) -> Option<usize> {
    memchr::memrchr(b'\n', buf)
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
            jobs: 1,
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

    /// Synthetic input with every kind of bad line, so the parallel reader has
    /// something to get wrong: broken JSON, invalid UTF-8, blank lines, CRLF, a
    /// line far longer than a block, and no newline at the end.
    fn messy_input() -> Vec<u8> {
        let mut clean = Vec::new();
        crate::synth::generate(&mut clean, 3_000_000, &crate::synth::SynthOptions::default()).unwrap();
        let mut out = Vec::new();
        for (i, line) in clean.split_inclusive(|b| *b == b'\n').enumerate() {
            match i % 97 {
                5 => out.extend_from_slice(b"{\"process_kprobe\": {\"truncated\n"),
                11 => out.extend_from_slice(b"\xff\xfe\n"),
                17 => out.extend_from_slice(b"\n   \n"),
                23 => {
                    out.extend_from_slice(&line[..line.len() - 1]);
                    out.extend_from_slice(b"\r\n");
                    continue;
                }
                _ => {}
            }
            if i == 300 {
                out.extend_from_slice(b"{\"other\":\"");
                out.extend(std::iter::repeat_n(b'x', 200_000));
                out.extend_from_slice(b"\"}\n");
            }
            out.extend_from_slice(line);
        }
        out.extend_from_slice(b"{\"process_exec\":");
        out
    }

    #[test]
    fn parallel_ingest_equals_single_threaded_exactly() {
        let input = messy_input();
        let serial = {
            let mut i = Ingest::new(x86());
            i.read_tetragon("in", &mut &input[..]).unwrap();
            i.finish()
        };
        assert!(
            serial.1.malformed > 20,
            "the input has bad lines: {}",
            serial.1.malformed
        );
        for (jobs, block) in [(2, 64 << 10), (3, 100_000), (4, 1 << 20), (2, BLOCK)] {
            let mut i = Ingest::new(x86());
            i.read_tetragon_parallel("in", &mut &input[..], jobs, block).unwrap();
            let parallel = i.finish();
            assert_eq!(parallel.1, serial.1, "report, jobs {jobs}, block {block}");
            assert_eq!(parallel.0, serial.0, "baselines, jobs {jobs}, block {block}");
        }
    }

    #[test]
    fn line_numbers_restart_per_input_in_both_readers() {
        let bad = b"{\n".to_vec();
        for jobs in [1, 2] {
            let mut i = Ingest::new(IngestOptions { jobs, ..x86() });
            let dir = tempfile::tempdir().unwrap();
            for name in ["a.json", "b.json"] {
                let f = dir.path().join(name);
                std::fs::write(&f, [GOOD.as_bytes(), b"\n", &bad].concat()).unwrap();
                i.read_file(&f, &mut |_| {}).unwrap();
            }
            let (_, report) = i.finish();
            let where_: Vec<(bool, u64)> = report
                .malformed_samples
                .iter()
                .map(|m| (m.source.ends_with("b.json"), m.line))
                .collect();
            assert_eq!(where_, [(false, 2), (true, 2)], "jobs {jobs}");
            assert_eq!(report.lines, 4);
        }
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
            jobs: 1,
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
