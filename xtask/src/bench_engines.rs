//! `cargo xtask bench-engines`: how fast each engine replays recorded catalog traces, one core each, and how
//! `--engine all` scales from one thread to two, beside how fast the same trace decodes and checks, with a
//! correctness column (each engine's instruction split equals the trace's footer, repeated runs and both thread
//! counts give identical results, native has no exits, the checker counts the footer's events).

use std::io::Cursor;

use anyhow::ensure;
use virtlab_engines::{engine, replay_many, Metrics, Options, PreparedTrace, Profile};
use virtlab_machine::MachineConfig;
use virtlab_record::{record, RecordRequest};
use virtlab_traces::{check_view, Metadata, TraceView};

use crate::timing::fastest;

#[derive(clap::Args)]
pub struct Args {
    /// Scale each workload's `iterations` (up to its maximum) so a run retires about this many instructions.
    #[arg(long, default_value_t = 50_000_000)]
    target_instructions: u64,
    /// Workloads to record and replay (default: the whole catalog).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Timed repetitions of each replay; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Cost profile.
    #[arg(long, default_value = "p4-2006")]
    profile: String,
}

fn record_scaled(name: &str, target: u64) -> anyhow::Result<Vec<u8>> {
    let iterations = crate::scale::iterations_toward(name, target)?;
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
    println!(
        "Replay speed, one thread per engine (M guest instructions/s), beside the trace's decoding and checking \
         (M events/s), best of {}:\n",
        args.repeat
    );
    let header: Vec<&str> = engines.iter().map(|e| e.name()).collect();
    println!("| workload | instructions | events | decode | check | {} | all engines, 1 thread | all engines, 2 threads | speed-up | correct |", header.join(" | "));
    println!("|---|---|---|---|---|{}---|---|---|---|", "---|".repeat(engines.len()));
    let workloads: Vec<String> = if args.workloads.is_empty() {
        virtlab_workloads::catalog().iter().map(|spec| spec.name.to_string()).collect()
    } else {
        args.workloads.clone()
    };
    for name in &workloads {
        let bytes = record_scaled(name, args.target_instructions)?;
        let trace = PreparedTrace::new(TraceView::open(&bytes)?)?;
        let totals = trace.view.footer().totals;
        let events = totals.events_total();
        let (decode_time, decoded) = fastest(args.repeat, || {
            let mut count = 0u64;
            trace.view.for_each_event(|_| count += 1)?;
            Ok(count)
        })?;
        let (check_time, report) = fastest(args.repeat, || Ok(check_view(&trace.view)?))?;
        ensure!(decoded == events && report.events == events, "{name}: the decoder or the checker miscounted");
        let per_second = |time: std::time::Duration| format!("{:.0}", events as f64 / time.as_secs_f64() / 1e6);
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
            "| {name} | {instructions} | {events} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.2}x | yes (split = footer, identical across repeats and 1/2 threads, native 0 exits, checker counts every event) |",
            per_second(decode_time),
            per_second(check_time),
            cells.join(" | "),
            one * 1e3,
            two * 1e3,
            one / two
        );
    }
    Ok(())
}
