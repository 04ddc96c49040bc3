//! `cargo xtask bench-wait`: what a user waits for. The release `virtlab` binary's own commands (`record`,
//! `check`, `replay --engine X` for each modelled engine, as a user runs it and held to one thread, `replay` of all
//! seven, `sweep`), timed from start to exit as a user runs them on large catalog traces, each beside what it
//! cannot do without: reading the file, and the work itself done in this process on the same bytes (decoding every
//! event for `check`; the engine's own replay, on one thread, for `replay --engine X`; the seven engines on the
//! command's threads for the others). The ratio of the two is the overhead a user waits for beyond reading the
//! trace and replaying it: process start, opening, checking and preparing the trace, printing. Everything in one
//! run, best of `--repeat` each.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use virtlab_engines::{engine, replay_many, Options, PreparedTrace, Profile};
use virtlab_traces::TraceView;

use crate::timing::fastest;

#[derive(clap::Args)]
pub struct Args {
    /// Workloads to record, each with `iterations` scaled toward `--target-instructions`.
    #[arg(long, value_delimiter = ',', default_values_t = ["syscall", "ctxswitch", "mmap"].map(String::from))]
    workloads: Vec<String>,
    /// Scale each workload's `iterations` (up to its maximum) so a run retires about this many instructions.
    #[arg(long, default_value_t = 50_000_000)]
    target_instructions: u64,
    /// Timed repetitions of each command; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Threads for `replay` of all engines and for `sweep` (and for the in-process work they are compared with).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Directory for the recorded traces and the sweep's output (relative paths start at the workspace root).
    #[arg(long, default_value = "target/virtlab-bench/wait", value_name = "DIR")]
    out: PathBuf,
    /// Time this `virtlab` binary (it records the traces too) instead of building the workspace's release one:
    /// an older build, to compare with. The work done in process is this workspace's, which reads older traces.
    #[arg(long, value_name = "PATH")]
    virtlab: Option<PathBuf>,
}

/// The seven modelled engines: what `virtlab sweep` runs under `all`. `virtlab replay --engine all` adds the
/// measured kvm engine, which boots the guest on this host's KVM: its wall time is its own table's subject.
const MODELLED: &str = "native,trap-emulate,hybrid,bt,paravirt,hw-ept,hw-shadow";

/// One timed command: its wall time and what it printed.
fn timed(repeat: u32, virtlab: &Path, dir: &Path, args: &[String]) -> anyhow::Result<(Duration, Vec<u8>)> {
    fastest(repeat, || {
        let output = Command::new(virtlab).current_dir(dir).args(args).output().context("cannot run virtlab")?;
        ensure!(
            output.status.success(),
            "virtlab {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(output.stdout)
    })
}

fn ms(time: Duration) -> String {
    format!("{:.1}", time.as_secs_f64() * 1e3)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Whether `replay --json` output names `engines` and counts the footer's instructions under each.
fn replay_counted(stdout: &[u8], engines: usize, instructions: u64) -> anyhow::Result<bool> {
    let objects: Vec<Value> = serde_json::from_slice(stdout).context("replay --json printed no JSON array")?;
    Ok(objects.len() == engines && objects.iter().all(|o| o["instructions"].as_u64() == Some(instructions)))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let out = crate::catalog_traces::under_root(&args.out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let virtlab = match &args.virtlab {
        Some(path) => path.clone(),
        None => crate::catalog_traces::release_virtlab()?,
    };
    let profile = Profile::load("p4-2006")?;
    let profiles: Vec<Profile> =
        virtlab_engines::profile::BUILT_IN.iter().map(|(name, _)| Profile::load(name)).collect::<Result<_, _>>()?;
    let mut options = Options::default();
    options.set("bt.lmsle", "true")?;
    let engines = engine::all();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let many = rayon::ThreadPoolBuilder::new().num_threads(args.threads).build()?;
    let threads = args.threads.to_string();

    println!("| trace | command | wall (ms) | raw read (ms) | its work, in this process | work (ms) | wall / (read + work) | correct |");
    println!("|---|---|---|---|---|---|---|---|");
    for name in &args.workloads {
        let iterations = crate::scale::iterations_toward(name, args.target_instructions)?;
        let file = format!("{name}.vlt");
        let record = strings(&["record", name, "--param", &format!("iterations={iterations}"), "-o", &file]);
        let (record_time, _) = timed(1, &virtlab, &out, &record)?;
        let bytes = std::fs::read(out.join(&file))?;
        let trace = PreparedTrace::new(TraceView::open(&bytes)?)?;
        let totals = trace.view.footer().totals;
        let (instructions, events) = (totals.instructions, totals.events_total());
        let label = format!(
            "{name} ({} M instructions, {} M events, {} KB)",
            instructions / 1_000_000,
            events / 1_000_000,
            bytes.len() / 1024
        );
        let (read, _) = fastest(args.repeat, || Ok(std::fs::read(out.join(&file))?))?;
        let row = |command: &str, wall: Duration, work: &str, work_time: Duration, correct: &str| {
            let ratio = wall.as_secs_f64() / (read + work_time).as_secs_f64();
            println!(
                "| {label} | `{command}` | {} | {} | {work} | {} | {ratio:.2} | {correct} |",
                ms(wall),
                ms(read),
                ms(work_time)
            );
        };
        let rate = instructions as f64 / record_time.as_secs_f64() / 1e6;
        println!(
            "| {label} | `virtlab record {name} --param iterations={iterations}` | {} | — | the guest, recorded at {rate:.0} M instructions/s | — | — | yes (exit 0) |",
            ms(record_time)
        );

        let (decode, decoded) = fastest(args.repeat, || {
            let view = TraceView::open(&bytes)?;
            let mut count = 0u64;
            view.for_each_event(|_| count += 1)?;
            Ok(count)
        })?;
        ensure!(decoded == events, "{name}: the view decoded {decoded} of {events} events");

        let (check_time, stdout) = timed(args.repeat, &virtlab, &out, &strings(&["check", &file, "--json"]))?;
        let report: Value = serde_json::from_slice(&stdout)?;
        let valid = report["valid"] == true && report["events"].as_u64() == Some(events);
        row(
            &format!("virtlab check {file}"),
            check_time,
            "decode every event",
            decode,
            if valid { "yes (valid, every event counted)" } else { "NO" },
        );

        for engine in &engines {
            let (own, _) = fastest(args.repeat, || Ok(one.install(|| engine.replay(&trace, &profile, &options))?))?;
            // As a user runs it (one thread per core: the checker reads ahead of the engine on another) and
            // held to one thread (the checker fused with the engine: one decoding pass).
            for threads in [None, Some("1")] {
                let mut command =
                    strings(&["replay", &file, "--engine", engine.name(), "--set", "bt.lmsle=true", "--json"]);
                command.extend(threads.map(|n| ["--threads".to_string(), n.to_string()]).into_iter().flatten());
                let (wall, stdout) = timed(args.repeat, &virtlab, &out, &command)?;
                let counted = replay_counted(&stdout, 1, instructions)?;
                let shown = threads.map(|n| format!(" --threads {n}")).unwrap_or_default();
                row(
                    &format!("virtlab replay {file} --engine {}{shown}", engine.name()),
                    wall,
                    &format!("{} replaying, 1 thread", engine.name()),
                    own,
                    if counted { "yes (every instruction counted)" } else { "NO" },
                );
            }
        }

        let (own, _) = fastest(args.repeat, || {
            let results = many.install(|| replay_many(&trace, &engines, &profile, &options));
            results.into_iter().collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::from)
        })?;
        let command = strings(&[
            "replay",
            &file,
            "--engine",
            MODELLED,
            "--set",
            "bt.lmsle=true",
            "--threads",
            &threads,
            "--json",
        ]);
        let (wall, stdout) = timed(args.repeat, &virtlab, &out, &command)?;
        let counted = replay_counted(&stdout, engines.len(), instructions)?;
        row(
            &format!("virtlab replay {file} --engine <the 7 modelled> --threads {threads}"),
            wall,
            &format!("the 7 engines replaying, {threads} threads"),
            own,
            if counted { "yes (every engine counted every instruction)" } else { "NO" },
        );

        let (own, _) = fastest(args.repeat, || {
            for profile in &profiles {
                let results = many.install(|| replay_many(&trace, &engines, profile, &options));
                results.into_iter().collect::<Result<Vec<_>, _>>()?;
            }
            Ok(())
        })?;
        let results = format!("sweep-{name}");
        let command = strings(&[
            "sweep",
            &file,
            "--profile",
            "all",
            "--set",
            "bt.lmsle=true",
            "--threads",
            &threads,
            "-o",
            &results,
        ]);
        let (wall, _) = timed(args.repeat, &virtlab, &out, &command)?;
        let manifest: Value = serde_json::from_slice(&std::fs::read(out.join(&results).join("manifest.json"))?)?;
        let jobs = manifest["jobs"]["total"].as_u64();
        row(
            &format!("virtlab sweep {file} --profile all --threads {threads}"),
            wall,
            &format!("7 engines × 3 profiles replaying, {threads} threads"),
            own,
            if jobs == Some(21) { "yes (21 jobs written)" } else { "NO" },
        );
    }
    Ok(())
}
