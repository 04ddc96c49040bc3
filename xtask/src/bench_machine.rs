//! `cargo xtask bench-machine`: how fast the reference machine interprets and records the workload catalog, and
//! how big the traces are, with a correctness column (both runs pass, agree, and the trace checks).

use std::io::Cursor;
use std::time::{Duration, Instant};

use crate::timing::{best_of, fastest};

use anyhow::ensure;
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_record::{record, RecordRequest};
use virtlab_traces::{check, Metadata};

#[derive(clap::Args)]
pub struct Args {
    /// Scale each workload's `iterations` (up to its maximum) so a run retires about this many instructions:
    /// long enough that booting the machine and writing the trace's image are a small part of the time.
    #[arg(long, default_value_t = 50_000_000)]
    target_instructions: u64,
    /// Only these workloads (default: the whole catalog).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Timed repetitions of each run; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

/// Boots `image` and runs it without observing; times the run alone (not the boot).
fn run_plain(image: &[u8]) -> anyhow::Result<(Duration, (virtlab_machine::RunOutcome, u64))> {
    let mut machine = Machine::from_multiboot(image, MachineConfig::default())?;
    let start = Instant::now();
    let outcome = machine.run(&mut NullObserver, RunLimits { max_instructions: 4_000_000_000 })?;
    Ok((start.elapsed(), (outcome, machine.retired_instructions())))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    println!("| workload | iterations | instructions | interpret (run only) | record (boot, run, write) | trace bytes | bytes/instr | correct |");
    println!("|---|---|---|---|---|---|---|---|");
    for spec in virtlab_workloads::catalog() {
        if !args.workloads.is_empty() && !args.workloads.iter().any(|w| w == spec.name) {
            continue;
        }
        let iterations = crate::scale::iterations_toward(spec.name, args.target_instructions)?;
        let image = virtlab_workloads::build(spec.name, &[("iterations".into(), iterations.to_string())])?;

        let (interpret_time, (plain, instructions)) = best_of(args.repeat, || run_plain(&image.bytes))?;
        let (record_time, (trace, summary)) = fastest(args.repeat, || {
            let request = RecordRequest {
                image: &image.bytes,
                metadata: Metadata {
                    workload: spec.name.into(),
                    recorder: "bench-machine".into(),
                    ..Metadata::default()
                },
                machine: MachineConfig::default(),
                max_instructions: 4_000_000_000,
                timeout: None,
            };
            let (out, summary) = record(Cursor::new(Vec::new()), request)?;
            Ok((out.into_inner(), summary))
        })?;
        let checked = check(Cursor::new(&trace))?;
        let correct = plain.exit_status == 0
            && summary.ending.exit_status == 0
            && summary.ending.serial == plain.serial
            && summary.ending.state_digest == plain.digest
            && checked.instructions == instructions;
        ensure!(correct, "{}: the recorded run disagrees with the plain one, or a run failed", spec.name);
        let rate = |time: Duration| format!("{:.0} M/s", instructions as f64 / time.as_secs_f64() / 1e6);
        println!(
            "| {} | {iterations} | {instructions} | {} | {} | {} | {:.4} | yes (status 0, same serial and digest, trace checks) |",
            spec.name,
            rate(interpret_time),
            rate(record_time),
            trace.len(),
            trace.len() as f64 / instructions as f64
        );
    }
    Ok(())
}
