//! `tether bench ...`: tools for the benchmarks in bench/.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Write synthetic Tetragon export lines shaped like the real samples
    /// (bench/ingest.sh uses it).
    GenTetragon {
        /// About how many bytes to write.
        #[arg(long, env = "TETHER_BENCH_BYTES")]
        bytes: u64,
        /// Output file (`-` for stdout).
        #[arg(long, env = "TETHER_BENCH_OUT", default_value = "-")]
        out: PathBuf,
        /// Distinct workloads.
        #[arg(long, env = "TETHER_BENCH_WORKLOADS", default_value_t = 300)]
        workloads: usize,
        /// Seed.
        #[arg(long, env = "TETHER_BENCH_SEED", default_value_t = 42)]
        seed: u64,
    },
}

pub(crate) fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::GenTetragon {
            bytes,
            out,
            workloads,
            seed,
        } => {
            let opts = profile_store::synth::SynthOptions {
                workloads,
                seed,
                ..Default::default()
            };
            let mut sink: Box<dyn Write> = if out.as_os_str() == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?)
            };
            let mut w = BufWriter::with_capacity(1 << 20, &mut sink);
            let n = profile_store::synth::generate(&mut w, bytes, &opts)?;
            w.flush()?;
            eprintln!("wrote {n} bytes");
            Ok(())
        }
    }
}
