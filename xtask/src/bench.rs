//! `cargo xtask bench`: the lab's main job. Records the workload catalog (traces cached by image digest and
//! recorder version), sweeps every engine × profile over the traces, runs the Adams & Agesen validation, and
//! writes the results table and the report, through the release `virtlab` binary's own subcommands.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the trace cache, the results and the report (relative paths start at the workspace root).
    #[arg(long, default_value = "target/virtlab-bench", value_name = "DIR")]
    out: PathBuf,
    /// Record every trace again even when the cache has it.
    #[arg(long)]
    fresh: bool,
    /// Workloads to record and sweep (default: the whole catalog, each with its default parameters).
    #[arg(long, value_delimiter = ',', value_name = "NAME,…")]
    workloads: Vec<String>,
}

/// The workspace root (xtask's parent directory).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the release `virtlab` binary (a no-op when it is up to date) and returns its path.
pub(crate) fn build_virtlab() -> anyhow::Result<PathBuf> {
    let status = cargo()
        .current_dir(root())
        .args(["build", "--release", "--quiet", "--package", "virtlab", "--bin", "virtlab"])
        .status()
        .context("cannot run cargo to build virtlab")?;
    ensure!(status.success(), "building virtlab failed ({status})");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    Ok(target.join("release").join(format!("virtlab{}", std::env::consts::EXE_SUFFIX)))
}

fn bar(length: u64, stage: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    let style = ProgressStyle::with_template("{msg:8} {bar:30} {pos}/{len} {elapsed}").expect("valid template");
    bar.set_style(style);
    bar.set_message(stage.to_string());
    bar
}

/// The recorder's identity in cache keys: what `virtlab --version` says and the trace format version, so a new
/// recorder or format records again.
fn recorder_version(virtlab: &Path) -> anyhow::Result<String> {
    let output = Command::new(virtlab).arg("--version").output().context("cannot run virtlab --version")?;
    let version = String::from_utf8_lossy(&output.stdout).trim().replace(' ', "-");
    let format = virtlab_traces::format::VERSION_MAJOR;
    Ok(format!("{version}-format{format}.{}", virtlab_traces::format::VERSION_MINOR))
}

/// `traces/<workload>-<first 16 hex digits of the image's BLAKE3>-<recorder>.vlt`, relative to the output.
fn cache_name(workload: &str, recorder: &str) -> anyhow::Result<String> {
    let image = virtlab_workloads::build(workload, &[])?;
    let digest = blake3::hash(&image.bytes).to_hex();
    Ok(format!("traces/{workload}-{}-{recorder}.vlt", &digest[..16]))
}

fn usable(trace: &Path) -> bool {
    std::fs::read(trace).is_ok_and(|bytes| virtlab_traces::TraceView::open(&bytes).is_ok())
}

/// Runs virtlab in `dir` with `args`, its progress bar and messages on the terminal.
fn virtlab_in(virtlab: &Path, dir: &Path, args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new(virtlab)
        .current_dir(dir)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", virtlab.display()))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = if args.out.is_absolute() { args.out.clone() } else { root().join(&args.out) };
    std::fs::create_dir_all(out.join("traces")).with_context(|| format!("cannot create {}", out.display()))?;
    let virtlab = build_virtlab()?;
    let workloads: Vec<String> = if args.workloads.is_empty() {
        virtlab_workloads::catalog().iter().map(|spec| spec.name.to_string()).collect()
    } else {
        args.workloads.clone()
    };

    let stage = Instant::now();
    let recorder = recorder_version(&virtlab)?;
    let traces: Vec<String> = workloads.iter().map(|w| cache_name(w, &recorder)).collect::<anyhow::Result<_>>()?;
    let progress = bar(workloads.len() as u64, "record");
    let recorded: Vec<bool> = workloads
        .par_iter()
        .zip(&traces)
        .map(|(workload, trace)| {
            let path = out.join(trace);
            let cached = !args.fresh && usable(&path);
            if !cached {
                let output = Command::new(&virtlab)
                    .args(["record", workload, "-o"])
                    .arg(&path)
                    .output()
                    .context("cannot run virtlab record")?;
                if !output.status.success() {
                    bail!("recording {workload} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
                }
            }
            progress.inc(1);
            Ok(!cached)
        })
        .collect::<anyhow::Result<_>>()?;
    progress.finish_and_clear();
    remove_stale(&out.join("traces"), &traces)?;
    let fresh = recorded.iter().filter(|r| **r).count();
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

/// Deletes cached traces that no current key names (an older image or recorder).
fn remove_stale(dir: &Path, current: &[String]) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = format!("traces/{}", path.file_name().unwrap_or_default().to_string_lossy());
        if path.extension().is_some_and(|e| e == "vlt") && !current.contains(&name) {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}
