//! `cargo xtask bench`: the lab's main job. Records the workload catalog (traces cached by image digest and
//! recorder version), sweeps every engine × profile over the traces, runs the Adams & Agesen validation, and
//! writes the results table and the report, through the release `virtlab` binary's own subcommands.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context};

use crate::catalog_traces::{self, release_virtlab, under_root, virtlab_in, Job};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the trace cache, the results and the report (relative paths start at the workspace root).
    #[arg(long, default_value = "target/virtlab-bench", value_name = "DIR")]
    out: PathBuf,
    /// Record every trace again even when the cache has it.
    #[arg(long)]
    fresh: bool,
    /// Workloads to record and sweep (default: the whole catalog, each with its default parameters), each on
    /// x86-64 and, where it has an x86-32 build, on x86-32.
    #[arg(long, value_delimiter = ',', value_name = "NAME,…")]
    workloads: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = under_root(&args.out);
    let virtlab = release_virtlab()?;
    let workloads: Vec<String> = if args.workloads.is_empty() {
        virtlab_workloads::catalog().iter().map(|spec| spec.name.to_string()).collect()
    } else {
        args.workloads.clone()
    };

    let stage = Instant::now();
    let jobs: Vec<Job> = workloads.into_iter().map(|workload| Job { workload, params: Vec::new() }).collect();
    let jobs = catalog_traces::with_32_bit_builds(jobs);
    let (traces, fresh) = catalog_traces::record(&virtlab, &out, &jobs, args.fresh)?;
    eprintln!("record   {:6.1} s  {fresh} recorded, {} cached", stage.elapsed().as_secs_f64(), traces.len() - fresh);

    let stage = Instant::now();
    let mut sweep: Vec<String> = vec!["sweep".into()];
    sweep.extend(traces.iter().cloned());
    // The traces are cached, and so are their verdicts: a trace checked by an earlier run is not checked again.
    let settings = ["--engine", "all", "--profile", "all", "--set", "bt.lmsle=true", "--verdicts", "verdicts.json"];
    sweep.extend(settings.map(String::from));
    sweep.extend(["-o", "results"].map(String::from));
    let output = virtlab_in(&virtlab, &out, &sweep)?;
    ensure!(output.status.success(), "virtlab sweep failed ({})", output.status);
    eprintln!("sweep    {:6.1} s", stage.elapsed().as_secs_f64());

    let stage = Instant::now();
    let output = virtlab_in(&virtlab, &out, &["validate", "adams-agesen", "--json"].map(String::from))?;
    // 5: a cell missed the paper; the report shows which, so the bench goes on.
    ensure!(matches!(output.status.code(), Some(0 | 5)), "virtlab validate failed ({})", output.status);
    let validation = out.join("results").join("validation.json");
    virtlab_traces::atomic::write_atomic(&validation, &output.stdout)
        .with_context(|| format!("cannot write {}", validation.display()))?;
    eprintln!("validate {:6.1} s", stage.elapsed().as_secs_f64());

    let stage = Instant::now();
    let output = virtlab_in(&virtlab, &out, &["report", "results", "-o", "report"].map(String::from))?;
    ensure!(output.status.success(), "virtlab report failed ({})", output.status);
    eprintln!("report   {:6.1} s", stage.elapsed().as_secs_f64());
    eprintln!("total    {:6.1} s", started.elapsed().as_secs_f64());
    println!("{}", out.join("report").join("index.html").display());
    Ok(())
}
