//! `cargo xtask ratios`: every catalog workload recorded on the reference machine at two iteration counts (its
//! default and twice that) and replayed under every engine with one profile; each engine's cycles per
//! iteration (the difference of the two runs over the difference of iterations, so start-up, the banner on the
//! serial port and shutdown cancel out) relative to native's: the table README and BENCHMARKS.md carry. A
//! correctness column says each engine counted the trace's own instructions on both runs.

use std::io::Cursor;

use anyhow::Context;
use rayon::prelude::*;
use virtlab_engines::{engine, replay_many, EngineError, Options, PreparedTrace, Profile};
use virtlab_record::record_in_memory;
use virtlab_traces::{check, Metadata, TraceView};

#[derive(clap::Args)]
pub struct Args {
    /// Cost profile.
    #[arg(long, default_value = "p4-2006")]
    profile: String,
    /// The guests' width: x86-64, or x86-32 (the workloads that have an x86-32 build).
    #[arg(long, value_parser = ["x86-64", "x86-32"], default_value = "x86-64")]
    arch: String,
}

fn params(arch: &str, iterations: u64) -> Vec<(String, String)> {
    vec![("iterations".into(), iterations.to_string()), ("arch".into(), arch.into())]
}

fn record_at(name: &str, arch: &str, iterations: u64) -> anyhow::Result<Vec<u8>> {
    let image = virtlab_workloads::build(name, &params(arch, iterations))?;
    let metadata = Metadata { workload: name.into(), recorder: "xtask ratios".into(), ..Metadata::default() };
    record_in_memory(&image.bytes, metadata, 1_000_000_000).with_context(|| format!("recording {name}"))
}

/// Each engine's cycles on one recording (an error names an engine that refused), and whether every engine
/// counted the trace's own instructions.
fn replay_all(
    name: &str,
    arch: &str,
    iterations: u64,
    profile: &Profile,
    options: &Options,
) -> anyhow::Result<(Vec<Option<u64>>, bool)> {
    let bytes = record_at(name, arch, iterations)?;
    check(Cursor::new(&bytes)).with_context(|| format!("{name}'s trace"))?;
    let trace = PreparedTrace::new(TraceView::open(&bytes)?)?;
    let totals = trace.view.footer().totals;
    let mut correct = true;
    let mut cycles = Vec::new();
    for (engine, result) in engine::all().iter().zip(replay_many(&trace, &engine::all(), profile, options)) {
        match result {
            Ok(metrics) => {
                correct &= (metrics.instructions_user, metrics.instructions_kernel)
                    == (totals.instructions_user, totals.instructions_kernel);
                cycles.push(Some(metrics.cycles()));
            }
            Err(EngineError::Unsupported(_)) => cycles.push(None),
            Err(error) => anyhow::bail!("{} on {name}: {error}", engine.name()),
        }
    }
    Ok((cycles, correct))
}

/// One workload's row: native cycles per iteration, then each engine's per-iteration cycles over native's.
fn row(name: &str, arch: &str, profile: &Profile, options: &Options) -> anyhow::Result<String> {
    let spec = virtlab_workloads::catalog().iter().find(|s| s.name == name).context("no such workload")?;
    let param = spec.param("iterations").context("every workload takes iterations")?;
    let high = (param.default * 2).min(param.max);
    let low = if high > param.default { param.default } else { (param.default / 2).max(1) };
    let (a, correct_a) = replay_all(name, arch, low, profile, options)?;
    let (b, correct_b) = replay_all(name, arch, high, profile, options)?;
    let per_iteration: Vec<Option<f64>> =
        a.iter().zip(&b).map(|(a, b)| Some((b.as_ref()? - a.as_ref()?) as f64 / (high - low) as f64)).collect();
    let native = per_iteration[0].context("native never refuses")?;
    let mut cells = vec![name.to_string(), format!("{low}, {high}"), format!("{native:.0}")];
    for engine in &per_iteration[1..] {
        cells.push(engine.map_or("refuses".into(), |cycles| format!("{:.2}", cycles / native)));
    }
    cells.push(if correct_a && correct_b { "yes" } else { "NO" }.into());
    Ok(format!("| {} |", cells.join(" | ")))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let profile = Profile::load(&args.profile)?;
    let mut options = Options::default();
    options.set("bt.lmsle", "true")?;
    let arch = args.arch.as_str();
    let (names, unbuilt): (Vec<&str>, Vec<&str>) = virtlab_workloads::catalog()
        .iter()
        .map(|spec| spec.name)
        .partition(|name| virtlab_workloads::build(name, &params(arch, 1)).is_ok());
    let rows: Vec<anyhow::Result<String>> = names.par_iter().map(|name| row(name, arch, &profile, &options)).collect();
    let engines: Vec<&str> = engine::all().iter().skip(1).map(|e| e.name()).collect();
    let bt = if arch == "x86-64" { "bt with bt.lmsle=true" } else { "bt needs no long-mode segment limits" };
    println!("Cycles per iteration relative to native, profile {}, {arch} guests ({bt}):\n", profile.name);
    println!("| workload | iterations | native cycles/iteration | {} | correct |", engines.join(" | "));
    println!("|---|---|---|{}---|", "---|".repeat(engines.len()));
    for row in rows {
        println!("{}", row?);
    }
    if !unbuilt.is_empty() {
        println!("\nNo {arch} build: {}.", unbuilt.join(", "));
    }
    Ok(())
}
