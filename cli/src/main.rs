//! The `tether` command: wires the libraries together. No domain logic lives here.

mod bench;
mod build;
mod certs;
mod demo;
mod install;
mod jsonlog;
mod profiles;
mod serve;
mod table;
mod validate;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// tether: minimal seccomp profiles from the syscalls workloads really make.
///
/// tether reads Tetragon event exports and strace logs, builds a baseline of
/// syscalls per workload container, renders a minimal OCI seccomp profile from it,
/// and keeps content-addressed versions of those profiles in a store.
#[derive(Debug, Parser)]
#[command(name = "tether", version, max_term_width = 100)]
struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace, or a
    /// tracing filter such as `profile_store=debug`).
    #[arg(long, global = true, env = "TETHER_LOG_LEVEL", default_value = "warn")]
    log_level: String,

    /// Log format: `pretty` for people, `json` for log pipelines.
    #[arg(long, global = true, env = "TETHER_LOG_FORMAT", default_value = "pretty", value_parser = ["pretty", "json"])]
    log_format: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ingest observations, merge them into the stored baselines, and render a new
    /// profile version for every workload whose allowed set changed.
    Build(build::BuildArgs),
    /// Inspect and manage stored profiles.
    #[command(subcommand)]
    Profiles(profiles::ProfilesCommand),
    /// Replay a command traced and under its profile (in runc, or in-process), and
    /// say whether the profile would break it. Exit 0: it works; 1: it breaks (the
    /// syscalls to add are named); 2: usage or environment error.
    Validate(validate::ValidateArgs),
    /// Benchmark tools (synthetic inputs).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the admission webhook (HTTPS) with its metrics endpoint.
    Serve(serve::ServeArgs),
    /// Show the whole path on this machine: build profiles from bundled events,
    /// start the webhook on 127.0.0.1 with a development CA, send real
    /// AdmissionReviews over HTTP/2, print each decision and patch.
    Demo,
    /// Create the webhook's certificates and put its CA into the webhook
    /// configurations.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Run the node installer (a DaemonSet): write every active or recent profile
    /// version under <kubelet-root>/seccomp/tether/, remove versions no pod on the
    /// node uses, and report them in the node's ProfileInstallation.
    Install(install::InstallArgs),
    /// Print the CustomResourceDefinitions of the Kubernetes store (generated from
    /// the Rust types), or write them into `--out DIR` (deploy/base/crds).
    Crds(CrdsArgs),
    /// Internal to `validate`: install a profile on this process and exec a command,
    /// so a strace started outside the filter sees what the workload's denied
    /// syscalls return. Hidden: it is not an operator's tool.
    #[command(name = "__exec-confined", hide = true)]
    ExecConfined(validate::ExecConfinedArgs),
}

/// `tether crds`.
#[derive(Debug, Args, Clone)]
struct CrdsArgs {
    /// Write one file per CRD into this directory instead of printing them.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn crds(args: CrdsArgs) -> Result<()> {
    let files = profile_store::crd::crd_files().context("serializing the CRDs")?;
    match args.out {
        Some(dir) => {
            for (name, text) in files {
                let path = dir.join(name);
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        None => {
            let docs: Vec<String> = files.into_iter().map(|(_, text)| text).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

/// The store every command works on.
#[derive(Debug, Args, Clone)]
struct StoreArgs {
    /// The profile store: a directory (created by `build` when absent), or
    /// `kube://` for WorkloadProfile objects in the cluster of the current
    /// kubeconfig (or the pod's service account); `kube://?keep=N` keeps N
    /// versions per workload (default 10, plus a pinned one).
    #[arg(long, env = "TETHER_STORE", value_name = "DIR|kube://")]
    store: StoreLocation,
}

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreLocation {
    /// An FsStore directory.
    Dir(PathBuf),
    /// The KubeStore; `keep` versions per workload.
    Kube { keep: usize },
}

impl std::str::FromStr for StoreLocation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let Some(rest) = s.strip_prefix("kube://") else {
            return Ok(StoreLocation::Dir(PathBuf::from(s)));
        };
        let usage = || {
            format!(
                "`{s}` is not a Kubernetes store: write `kube://` or `kube://?keep=N` (the cluster comes from KUBECONFIG)"
            )
        };
        match rest {
            "" => Ok(StoreLocation::Kube {
                keep: profile_store::kube_store::DEFAULT_KEEP,
            }),
            _ => match rest.strip_prefix("?keep=").map(str::parse::<usize>) {
                Some(Ok(keep)) if keep > 0 => Ok(StoreLocation::Kube { keep }),
                _ => Err(usage()),
            },
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Dir(dir) => write!(f, "{}", dir.display()),
            StoreLocation::Kube { .. } => f.write_str("the Kubernetes store (kube://)"),
        }
    }
}

/// A store any command can use, shared by the threads of a build.
type DynStore = Box<dyn profile_store::ProfileStore + Send + Sync>;

impl StoreArgs {
    /// Opens an existing store.
    fn open(&self) -> Result<DynStore> {
        self.open_with(false)
    }

    /// Opens the store, creating a directory store when absent (a Kubernetes
    /// store exists once its CRDs are installed).
    fn open_or_create(&self) -> Result<DynStore> {
        self.open_with(true)
    }

    fn open_with(&self, create: bool) -> Result<DynStore> {
        self.store.open(create)
    }
}

impl StoreLocation {
    /// Opens the store; with `create`, a directory store is created when absent.
    fn open(&self, create: bool) -> Result<DynStore> {
        Ok(match self {
            StoreLocation::Dir(dir) if create => Box::new(profile_store::FsStore::open_or_create(dir)?),
            StoreLocation::Dir(dir) => Box::new(profile_store::FsStore::open(dir)?),
            StoreLocation::Kube { keep } => Box::new(profile_store::KubeStore::connect()?.with_keep(*keep)),
        })
    }
}

/// Machine-readable output.
#[derive(Debug, Args, Clone, Copy)]
struct JsonArgs {
    /// Print JSON for scripts: tables become arrays of objects, and `profiles show`
    /// wraps the profile with its version metadata.
    #[arg(long, env = "TETHER_JSON")]
    json: bool,
}

fn init_logging(level: &str, format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Straight to stderr, except on `tether serve`'s connection threads,
        // which write their admission lines in batches (webhook::logbuf).
        .with_writer(webhook::logbuf::LogWriter::make)
        // On a failed write tracing-subscriber would `eprintln!` the error, and
        // `eprintln!` panics when stderr is gone: a closed log pipe made every
        // task that logs panic (admissions answered 500, SIGTERM ignored
        // because its task had died). A log line that cannot be written is
        // dropped instead.
        .log_internal_errors(false);
    if format == "json" {
        builder
            .json()
            .event_format(jsonlog::FastJson::new(jsonlog::SecondCachedTime))
            .init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before logging is set up: every syscall made before the profile is installed
    // must be in the measured extra set the observed run's container allows
    // (validator/data/observer), so the wrapper does as little as it can.
    if let Command::ExecConfined(args) = cli.command {
        return validate::exec_confined(args);
    }
    init_logging(&cli.log_level, &cli.log_format);
    let result = match cli.command {
        Command::Build(args) => build::run(args).map(|()| ExitCode::SUCCESS),
        Command::Profiles(cmd) => profiles::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Certs(cmd) => certs::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::run(args).map(|()| ExitCode::SUCCESS),
        Command::Demo => demo::run().map(|()| ExitCode::SUCCESS),
        Command::Validate(args) => validate::run(args),
        Command::Bench(cmd) => bench::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Crds(args) => crds(args).map(|()| ExitCode::SUCCESS),
        Command::Install(args) => install::run(args).map(|()| ExitCode::SUCCESS),
        Command::ExecConfined(args) => Ok(validate::exec_confined(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StoreLocation;
    use std::path::PathBuf;

    #[test]
    fn store_locations_parse_directories_and_kube_urls() {
        assert_eq!(
            "./profiles".parse(),
            Ok(StoreLocation::Dir(PathBuf::from("./profiles")))
        );
        assert_eq!("kube://".parse(), Ok(StoreLocation::Kube { keep: 10 }));
        assert_eq!("kube://?keep=3".parse(), Ok(StoreLocation::Kube { keep: 3 }));
        for bad in [
            "kube://?keep=0",
            "kube://?keep=x",
            "kube://cluster",
            "kube://?namespace=a",
        ] {
            let err = bad.parse::<StoreLocation>().unwrap_err();
            assert!(err.contains("kube://?keep=N"), "{bad}: {err}");
        }
    }
}

/// mimalloc instead of glibc's malloc: an admission makes ~150 small
/// allocations, and under load glibc's malloc, free and consolidation were
/// ~13 % of the server's CPU. A/B in one run (4 x 16 streams, 3 rounds): server
/// CPU per admission 32.6/32.5/35.7 -> 28.2/28.2/31.6 µs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
