//! `cargo xtask synth-trace`: write a synthetic trace file, to try the trace tools on before a recorder exists.

use std::path::PathBuf;

use anyhow::Context;
use virtlab_traces::synth::{self, SynthConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the trace.
    #[arg(short, long)]
    output: PathBuf,
    /// Instructions to generate.
    #[arg(long, default_value_t = 1_000_000)]
    instructions: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let config = SynthConfig { seed: args.seed, instructions: args.instructions };
    let (cursor, summary) = synth::write_trace(std::io::Cursor::new(Vec::new()), &config)?;
    virtlab_traces::atomic::write_atomic(&args.output, &cursor.into_inner())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("{}: {} instructions, {} events", args.output.display(), summary.instructions, summary.events);
    Ok(())
}
