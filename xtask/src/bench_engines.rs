//! `cargo xtask bench-engines`: how fast each engine replays recorded catalog traces, one core each, and how
//! `--engine all` scales from one thread to two, with a correctness column (each engine's instruction split
//! equals the trace's footer, repeated runs and both thread counts give identical results, native has no exits).

use std::io::Cursor;

use anyhow::{ensure, Context};
use virtlab_engines::{engine, replay_many, Metrics, Options, PreparedTrace, Profile};
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_record::{record, RecordRequest};
use virtlab_traces::{check, Metadata, TraceView};

use crate::timing::fastest;

#[derive(clap::Args)]
pub struct Args {
    /// Scale each workload's `iterations` (up to its maximum) so a run retires about this many instructions.
    #[arg(long, default_value_t = 50_000_000)]
    target_instructions: u64,
    /// Workloads to record and replay.
    #[arg(long, value_delimiter = ',', default_values_t = ["compute", "memtouch", "forkwait", "mmap", "ctxswitch", "syscall-mix"].map(String::from))]
    workloads: Vec<String>,
    /// Timed repetitions of each replay; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Cost profile.
    #[arg(long, default_value = "p4-2006")]
    profile: String,
}

fn record_scaled(name: &str, target: u64) -> anyhow::Result<Vec<u8>> {
    let spec = virtlab_workloads::catalog().iter().find(|s| s.name == name).context("no such workload")?;
    let param = spec.param("iterations").context("every workload takes iterations")?;
    let mut machine = Machine::from_multiboot(&virtlab_workloads::build(name, &[])?.bytes, MachineConfig::default())?;
    machine.run(&mut NullObserver, RunLimits { max_instructions: 4_000_000_000 })?;
    let scale = (target / machine.retired_instructions().max(1)).max(1);
    let iterations = param.default.saturating_mul(scale).min(param.max);
    let image = virtlab_workloads::build(name, &[("iterations".into(), iterations.to_string())])?;
    let request = RecordRequest {
        image: &image.bytes,
        metadata: Metadata { workload: name.into(), recorder: "bench-engines".into(), ..Metadata::default() },
        machine: MachineConfig::default(),
        max_instructions: 4_000_000_000,
        timeout: None,
    };
    let (out, summary) = record(Cursor::new(Vec::new()), request)?;
    ensure!(summary.ending.exit_status == 0, "{name} did not exit cleanly");
    Ok(out.into_inner())
}

fn pool(threads: usize) -> anyhow::Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new().num_threads(threads).build()?)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let profile = Profile::load(&args.profile)?;
    let mut options = Options::default();
    options.set("bt.lmsle", "true")?;
    let engines = engine::all();
    println!("Replay speed, one thread per engine (M guest instructions/s, best of {}):\n", args.repeat);
    let header: Vec<&str> = engines.iter().map(|e| e.name()).collect();
    println!("| workload | instructions | events | {} | all engines, 1 thread | all engines, 2 threads | speed-up | correct |", header.join(" | "));
    println!("|---|---|---|{}---|---|---|---|", "---|".repeat(engines.len()));
    for name in &args.workloads {
        let bytes = record_scaled(name, args.target_instructions)?;
        check(Cursor::new(&bytes))?;
        let trace = PreparedTrace::new(TraceView::open(&bytes)?)?;
        let totals = trace.view.footer().totals.clone();
        let instructions = totals.instructions;
        let mut cells = Vec::new();
        let mut reference: Vec<Metrics> = Vec::new();
        for engine in &engines {
            let single = pool(1)?;
            let (time, metrics) =
                fastest(args.repeat, || Ok(single.install(|| engine.replay(&trace, &profile, &options))?))?;
            let again = single.install(|| engine.replay(&trace, &profile, &options))?;
            ensure!(metrics == again, "{}: two replays of {name} differ", engine.name());
            ensure!(
                metrics.instructions_user == totals.instructions_user
                    && metrics.instructions_kernel == totals.instructions_kernel,
                "{}: the user/kernel split of {name} differs from the footer",
                engine.name()
            );
            cells.push(format!("{:.0}", instructions as f64 / time.as_secs_f64() / 1e6));
            reference.push(metrics);
        }
        ensure!(reference[0].exits_total() == 0, "native exits on {name}");
        let all = |threads: usize| -> anyhow::Result<(f64, Vec<Metrics>)> {
            let workers = pool(threads)?;
            let (time, results) = fastest(args.repeat, || {
                let results = workers.install(|| replay_many(&trace, &engines, &profile, &options));
                results.into_iter().collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::from)
            })?;
            Ok((time.as_secs_f64(), results))
        };
        let (one, results_one) = all(1)?;
        let (two, results_two) = all(2)?;
        ensure!(results_one == reference && results_two == reference, "{name}: results depend on the thread count");
        println!(
            "| {name} | {instructions} | {} | {} | {:.0} ms | {:.0} ms | {:.2}x | yes (split = footer, identical across repeats and 1/2 threads, native 0 exits) |",
            totals.events_total(),
            cells.join(" | "),
            one * 1e3,
            two * 1e3,
            one / two
        );
    }
    Ok(())
}
