//! What `bench` and `gate` share: building the `virtlab` binary, and the catalog's traces recorded with it into
//! a cache keyed by image digest and recorder version (a cached trace that still opens is not recorded again;
//! stale ones are deleted).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

/// `path` relative to the workspace root unless absolute.
pub fn under_root(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        root().join(path)
    }
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root())
        .args(args)
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "cargo {} failed ({status})", args.join(" "));
    Ok(())
}

fn binary(profile: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join(profile).join(format!("virtlab{}", std::env::consts::EXE_SUFFIX))
}

/// Builds the release `virtlab` binary (a no-op when it is up to date) and returns its path.
pub fn release_virtlab() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "--quiet", "--package", "virtlab", "--bin", "virtlab"])?;
    Ok(binary("release"))
}

/// The `virtlab` binary exactly as `cargo test --workspace` builds it, and its path. Building it any other way
/// (`cargo build --bin virtlab`) resolves dependency features without the workspace's dev-dependencies, and
/// so compiles polars a second time; after `cargo test --workspace` (CI runs it first) this is a no-op.
pub fn test_build_virtlab() -> anyhow::Result<PathBuf> {
    cargo(&["test", "--workspace", "--no-run", "--quiet"])?;
    Ok(binary("debug"))
}

/// A bar for one stage of a job.
pub fn bar(length: u64, stage: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    let style = ProgressStyle::with_template("{msg:8} {bar:30} {pos}/{len} {elapsed}").expect("valid template");
    bar.set_style(style);
    bar.set_message(stage.to_string());
    bar
}

/// The recorder's identity in cache keys: what `virtlab --version` says, the trace format version, and the
/// binary itself (its size and modification time), so that a new recorder, format or build records again: a
/// change to the reference machine does not change the version, and a gate on traces it did not record would
/// check the wrong counts.
fn recorder_version(virtlab: &Path) -> anyhow::Result<String> {
    let output = Command::new(virtlab).arg("--version").output().context("cannot run virtlab --version")?;
    let version = String::from_utf8_lossy(&output.stdout).trim().replace(' ', "-");
    let format = virtlab_traces::format::VERSION_MAJOR;
    let file = std::fs::metadata(virtlab).with_context(|| format!("cannot read {}", virtlab.display()))?;
    let built = file.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let build = blake3::hash(format!("{}-{built}", file.len()).as_bytes()).to_hex();
    Ok(format!("{version}-format{format}.{}-{}", virtlab_traces::format::VERSION_MINOR, &build[..8]))
}

/// `traces/<workload>-<first 16 hex digits of the image's BLAKE3>-<recorder>.vlt`, relative to the output.
fn cache_name(workload: &str, params: &[(String, String)], recorder: &str) -> anyhow::Result<String> {
    let image = virtlab_workloads::build(workload, params)?;
    let digest = blake3::hash(&image.bytes).to_hex();
    Ok(format!("traces/{workload}-{}-{recorder}.vlt", &digest[..16]))
}

fn usable(trace: &Path) -> bool {
    std::fs::read(trace).is_ok_and(|bytes| virtlab_traces::TraceView::open(&bytes).is_ok())
}

/// One catalog workload to record, with the parameters it is recorded at.
pub struct Job {
    pub workload: String,
    pub params: Vec<(String, String)>,
}

/// `jobs`, then the x86-32 build (`arch=x86-32`) of each workload that has one, with the same parameters.
pub fn with_32_bit_builds(jobs: Vec<Job>) -> Vec<Job> {
    let narrow: Vec<Job> = jobs
        .iter()
        .filter_map(|job| {
            let mut params = job.params.clone();
            params.push(("arch".into(), "x86-32".into()));
            virtlab_workloads::build(&job.workload, &params)
                .ok()
                .map(|_| Job { workload: job.workload.clone(), params })
        })
        .collect();
    jobs.into_iter().chain(narrow).collect()
}

/// The traces of `jobs` under `out/traces/`, recorded with `virtlab` where the cache has none that opens (all
/// of them with `fresh`); traces no job names any more are deleted. Returns their paths relative to `out`, in
/// the jobs' order, and how many were recorded.
pub fn record(virtlab: &Path, out: &Path, jobs: &[Job], fresh: bool) -> anyhow::Result<(Vec<String>, usize)> {
    std::fs::create_dir_all(out.join("traces")).with_context(|| format!("cannot create {}", out.display()))?;
    let recorder = recorder_version(virtlab)?;
    let traces: Vec<String> =
        jobs.iter().map(|job| cache_name(&job.workload, &job.params, &recorder)).collect::<anyhow::Result<_>>()?;
    let progress = bar(jobs.len() as u64, "record");
    let recorded: Vec<bool> = jobs
        .par_iter()
        .zip(&traces)
        .map(|(job, trace)| {
            let path = out.join(trace);
            let cached = !fresh && usable(&path);
            if !cached {
                let mut command = Command::new(virtlab);
                command.args(["record", &job.workload]);
                for (key, value) in &job.params {
                    command.args(["--param", &format!("{key}={value}")]);
                }
                let output = command.arg("-o").arg(&path).output().context("cannot run virtlab record")?;
                if !output.status.success() {
                    bail!("recording {} failed: {}", job.workload, String::from_utf8_lossy(&output.stderr).trim());
                }
            }
            progress.inc(1);
            Ok(!cached)
        })
        .collect::<anyhow::Result<_>>()?;
    progress.finish_and_clear();
    remove_stale(&out.join("traces"), &traces)?;
    Ok((traces, recorded.iter().filter(|r| **r).count()))
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

/// Runs virtlab in `dir` with `args`, its progress bar and messages on the terminal.
pub fn virtlab_in(virtlab: &Path, dir: &Path, args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new(virtlab)
        .current_dir(dir)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", virtlab.display()))
}
