//! `tether build`: observations in, baselines merged, versions rendered, a table out.

use crate::table::{Table, human_duration};
use crate::{JsonArgs, StoreArgs};
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use profile_store::ingest::Ingest;
use profile_store::store::{RenderOutcome, render_version};
use profile_store::tetragon::TetragonOptions;
use profile_store::{Abi, Arch, IngestOptions, IngestReport, ProfileStore, RuntimeBase, WorkloadKey};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(crate) struct BuildArgs {
    /// Inputs: Tetragon JSON exports or strace logs; files, directories of rotated
    /// files, `.gz` files, `-` for stdin, or the `F` of `strace -ff -o F` (reads F.<pid>).
    #[arg(long, required = true, num_args = 1.., env = "TETHER_FROM", value_delimiter = ',', value_name = "PATH")]
    from: Vec<PathBuf>,

    #[command(flatten)]
    store: StoreArgs,

    /// Container runtime whose base syscalls every profile allows: `runc`, `crun`
    /// (all known versions) or a version such as `runc@1.1`.
    #[arg(long, env = "TETHER_RUNTIME", default_value = "runc")]
    runtime: String,

    /// Node architecture the profiles are for (x86_64 or aarch64).
    #[arg(long, env = "TETHER_ARCH", default_value_t = Arch::host())]
    arch: Arch,

    /// ABI of syscall numbers that come without one (Tetragon `size_arg`/`long_arg`,
    /// strace logs): x86_64, i386, aarch64 or arm.
    #[arg(long, env = "TETHER_ABI", default_value_t = Abi::host())]
    abi: Abi,

    /// Workload key for strace inputs, which do not name their workload:
    /// namespace/kind/name/container.
    #[arg(long, env = "TETHER_STRACE_KEY", value_name = "KEY")]
    strace_key: Option<WorkloadKey>,

    /// Also learn from processes entered into containers from outside (`kubectl
    /// exec` shells, `in_init_tree: false`), which are left out by default.
    #[arg(long, env = "TETHER_INCLUDE_NON_INIT")]
    include_non_init: bool,

    /// Threads parsing Tetragon input (0: one per core). The result does not
    /// depend on it.
    #[arg(long, env = "TETHER_JOBS", default_value_t = 0)]
    jobs: usize,

    #[command(flatten)]
    json: JsonArgs,
}

/// One workload's line in the build output.
#[derive(Debug, Serialize)]
struct Row {
    key: String,
    events: u64,
    allowed: usize,
    added: Vec<String>,
    removed: Vec<String>,
    needs_review: Vec<String>,
    excluded: u64,
    exec_probe_events: u64,
    dropped_on_nodes: u64,
    pods: usize,
    nodes: usize,
    window_seconds: Option<i64>,
    quiet_seconds: Option<i64>,
    converged: Option<bool>,
    version: String,
    new_version: bool,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    workloads: Vec<Row>,
    report: &'a IngestReport,
}

pub(crate) fn run(args: BuildArgs) -> Result<()> {
    let runtime = RuntimeBase::select(&args.runtime)?;
    let mut ingest = Ingest::new(IngestOptions {
        tetragon: TetragonOptions {
            default_abi: args.abi,
            include_non_init: args.include_non_init,
        },
        strace_key: args.strace_key.clone(),
        jobs: args.jobs,
    });

    let mut files = Vec::new();
    for path in &args.from {
        files.extend(Ingest::expand(path)?);
    }
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = std::io::stdout().is_terminal() && !args.json.json;
    let progress = if bar {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {wide_bar} {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    // Every input is read before the store is touched: a missing file or a reading
    // error aborts the run with the store as it was.
    let mut done = 0u64;
    for file in &files {
        let before = ingest.lines();
        if let Some(pb) = &progress {
            pb.set_message(file.display().to_string());
        }
        let mut last = 0u64;
        ingest.read_file(file, &mut |read| {
            if let Some(pb) = &progress {
                pb.set_position(done + read);
            }
            last = read;
        })?;
        done += last;
        if progress.is_none() && !args.json.json {
            eprintln!("read {}: {} lines", file.display(), ingest.lines() - before);
        }
    }
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }

    let (baselines, report) = ingest.finish();
    let store = args.store.open_or_create()?;
    let now = jiff::Timestamp::now();
    // Workloads are independent (on disk, and as objects in the API server):
    // update them on several threads so that their fsyncs, or their requests,
    // overlap (a build touches hundreds of workloads).
    let threads = baselines.len().clamp(1, STORE_THREADS);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Vec<(usize, Result<Row>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(observed) = baselines.get(i) else { break };
                        done.push((i, update_one(store.as_ref(), observed, &runtime, &args, now)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("a store update thread panicked")))
            .collect::<Result<_>>()
    })?;
    let mut results: Vec<(usize, Result<Row>)> = results.into_iter().flatten().collect();
    results.sort_by_key(|(i, _)| *i);
    let rows = results.into_iter().map(|(_, r)| r).collect::<Result<Vec<Row>>>()?;

    if args.json.json {
        let out = Output {
            workloads: rows,
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&rows);
        print_report(&report);
    }
    Ok(())
}

/// Threads updating the store at the end of a build.
const STORE_THREADS: usize = 16;

/// Merges one workload's observations into the store and renders its version.
fn update_one(
    store: &dyn ProfileStore,
    observed: &profile_store::Baseline,
    runtime: &RuntimeBase,
    args: &BuildArgs,
    now: jiff::Timestamp,
) -> Result<Row> {
    let key = observed.key.clone();
    let mut outcome: Option<RenderOutcome> = None;
    let record = store
        .update(&key, &mut |record| {
            record.baseline.merge(observed);
            // A profile from no syscalls at all would only hold the runtime's set
            // and break the workload once enforced: render nothing until some
            // syscalls are seen.
            if !record.baseline.syscalls.is_empty() {
                outcome = Some(render_version(store, record, runtime, &args.runtime, args.arch, now)?);
            }
            Ok(())
        })
        .with_context(|| format!("updating {key} in {}", args.store.store))?;
    let b = &record.baseline;
    let conv = b.convergence();
    let (allowed, added, removed, needs_review, version, new_version) = match outcome {
        Some(o) => (
            o.rendered.profile.allowed().len(),
            o.added,
            o.removed,
            o.rendered.needs_review,
            o.rendered.version.to_string(),
            o.new_version,
        ),
        None => (0, Vec::new(), Vec::new(), Vec::new(), String::new(), false),
    };
    Ok(Row {
        key: key.to_string(),
        events: observed.events,
        allowed,
        added,
        removed,
        needs_review,
        excluded: b.excluded.not_in_init_tree,
        exec_probe_events: b.exec_probe_events,
        dropped_on_nodes: b.dropped_on_nodes,
        pods: b.pods.len(),
        nodes: b.nodes.len(),
        window_seconds: conv.map(|c| c.window.as_secs()),
        quiet_seconds: conv.map(|c| c.quiet.as_secs()),
        converged: conv.map(|c| c.converged),
        version,
        new_version,
    })
}

fn print_table(rows: &[Row]) {
    let mut t = Table::new(&[
        "WORKLOAD",
        "EVENTS",
        "ALLOWED",
        "NEW",
        "REVIEW",
        "EXCLUDED",
        "DROPPED",
        "WINDOW",
        "CONVERGED",
        "VERSION",
    ]);
    for r in rows {
        let window = match (r.window_seconds, r.quiet_seconds) {
            (Some(w), Some(q)) => format!(
                "{} (quiet {})",
                human_duration(jiff::SignedDuration::from_secs(w)),
                human_duration(jiff::SignedDuration::from_secs(q))
            ),
            _ => "-".to_string(),
        };
        t.row(vec![
            r.key.clone(),
            r.events.to_string(),
            r.allowed.to_string(),
            if r.added.is_empty() {
                "0".into()
            } else {
                format!("+{}", r.added.len())
            },
            if r.needs_review.is_empty() {
                "-".into()
            } else {
                r.needs_review.join(",")
            },
            r.excluded.to_string(),
            r.dropped_on_nodes.to_string(),
            window,
            match r.converged {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "unknown".into(),
            },
            if r.version.is_empty() {
                "- (no syscalls seen)".into()
            } else {
                format!("{}{}", r.version, if r.new_version { " (new)" } else { "" })
            },
        ]);
    }
    if rows.is_empty() {
        println!("no workload events in the input");
    } else {
        print!("{}", t.render());
    }
}

fn print_report(r: &IngestReport) {
    eprintln!(
        "{} lines from {} input(s): {} syscall events, {} process events; left out: {} host, {} not in init tree (kubectl exec); {} exec-probe events kept; {} non-syscall kprobes/tracepoints; {} other events",
        r.lines,
        r.inputs.len(),
        r.syscall_events,
        r.process_events,
        r.host_events,
        r.not_in_init_tree,
        r.exec_probe_events,
        r.not_a_syscall,
        r.other_events
    );
    for d in &r.dropped {
        let time = d.time.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
        eprintln!(
            "warning: Tetragon dropped {} events on node {} at {time}: baselines of workloads on that node may be incomplete",
            d.count,
            if d.node.is_empty() { "(unknown)" } else { &d.node }
        );
    }
    if !r.unknown_syscalls.is_empty() {
        let list: Vec<String> = r.unknown_syscalls.iter().map(|(k, v)| format!("{k} ({v}x)")).collect();
        eprintln!(
            "warning: syscalls not in the tables, left out of profiles: {}",
            list.join(", ")
        );
    }
    if r.malformed > 0 {
        eprintln!("warning: {} malformed line(s) skipped; first ones:", r.malformed);
        for m in &r.malformed_samples {
            eprintln!("  {}:{}: {}", m.source, m.line, m.reason);
        }
    }
}
