//! `cargo xtask gate`: the lab gates itself. Records every catalog workload at a small iteration count (traces
//! cached), and runs `virtlab gate budgets/catalog.toml` on them with the dev-profile binary `cargo test
//! --workspace` builds, so that CI, which has just run the tests, compiles nothing more.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::catalog_traces::{self, test_build_virtlab, under_root, virtlab_in, Job};

/// Each workload's `iterations` at most: enough for per-iteration counts to show, few enough to record the
/// whole catalog in seconds.
const MAX_ITERATIONS: u64 = 100;

#[derive(clap::Args)]
pub struct Args {
    /// The budget file (relative paths start at the workspace root).
    #[arg(long, default_value = "budgets/catalog.toml", value_name = "FILE")]
    budgets: PathBuf,
    /// Directory for the trace cache, the results, `gate.xml` (JUnit) and `gate.md` (Markdown).
    #[arg(long, default_value = "target/virtlab-gate", value_name = "DIR")]
    out: PathBuf,
    /// Record every trace again even when the cache has it.
    #[arg(long)]
    fresh: bool,
    /// An earlier run's results directory (for example main's `target/virtlab-gate/results`): blame lists the
    /// sites that are new or grew since.
    #[arg(long, value_name = "DIR")]
    baseline: Option<PathBuf>,
    /// Rewrite the budgets from this run's counts instead of checking them (comments and order kept).
    #[arg(long)]
    update: bool,
    /// With --update: how far above each count the budget is set, in percent.
    #[arg(long, default_value = "0%", value_name = "PERCENT", requires = "update")]
    headroom: String,
}

/// Every catalog workload at its default parameters, `iterations` capped at [`MAX_ITERATIONS`], on x86-64 and,
/// where it has an x86-32 build, on x86-32.
fn jobs() -> Vec<Job> {
    let wide = virtlab_workloads::catalog()
        .iter()
        .map(|spec| {
            let params = spec
                .params
                .iter()
                .filter(|p| p.name == "iterations")
                .map(|p| (p.name.to_string(), p.default.min(MAX_ITERATIONS).to_string()))
                .collect();
            Job { workload: spec.name.to_string(), params }
        })
        .collect();
    catalog_traces::with_32_bit_builds(wide)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = under_root(&args.out);
    let budgets = under_root(&args.budgets);
    let virtlab = test_build_virtlab()?;

    let stage = Instant::now();
    let jobs = jobs();
    let (traces, fresh) = catalog_traces::record(&virtlab, &out, &jobs, args.fresh)?;
    eprintln!("record   {:6.1} s  {fresh} recorded, {} cached", stage.elapsed().as_secs_f64(), traces.len() - fresh);

    let stage = Instant::now();
    let mut command: Vec<String> = vec!["gate".into(), budgets.display().to_string()];
    command.extend(traces);
    if args.update {
        command.extend(["--update".into(), "--headroom".into(), args.headroom.clone()]);
    } else {
        command.extend(["--save-results", "results", "--junit", "gate.xml", "--markdown", "gate.md"].map(String::from));
        if let Some(baseline) = &args.baseline {
            command.extend(["--baseline".into(), under_root(baseline).display().to_string()]);
        }
    }
    let output = virtlab_in(&virtlab, &out, &command)?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("gate     {:6.1} s", stage.elapsed().as_secs_f64());
    eprintln!("total    {:6.1} s", started.elapsed().as_secs_f64());
    let code = output.status.code().context("virtlab gate was killed by a signal")?;
    if code != 0 {
        // The gate's own status (6 over budget, 7 malformed budgets), for CI to see.
        std::process::exit(code);
    }
    Ok(())
}
