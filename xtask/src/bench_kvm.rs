//! `cargo xtask bench-kvm`: what the KVM engine's run loop adds to KVM itself. The same exit-heavy catalog guest
//! runs under the engine's loop (device model, exit counted at its guest RIP) and under a bare KVM_RUN loop (reads
//! answered with constants, nothing recorded), each at two iteration counts; the difference between the counts
//! divided by the difference in exits is the cost of one more exit, start-up cancelled out. Target: the engine's
//! cost per exit at most 1.15 times the bare loop's.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use virtlab_kvm::vm::Vm;
use virtlab_kvm::Probe;
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};

#[derive(clap::Args)]
pub struct Args {
    /// Exit-heavy workloads (each iteration exits to user space at least once).
    #[arg(long, value_delimiter = ',', default_values_t = ["outl", "inl", "mmio"].map(String::from))]
    workloads: Vec<String>,
    /// The two iteration counts.
    #[arg(long, num_args = 2, value_names = ["LOW", "HIGH"], default_values_t = [2_000u64, 22_000])]
    iterations: Vec<u64>,
    /// Timed runs of each loop at each count; the fastest is kept.
    #[arg(long, default_value_t = 5)]
    repeat: u32,
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// One guest image, booted by the reference machine's loader and ready to copy into VMs.
struct Guest {
    machine: Machine,
    /// What the reference machine printed: the engine's loop must print the same.
    serial: Vec<u8>,
}

fn guest(name: &str, iterations: u64) -> anyhow::Result<Guest> {
    let image = virtlab_workloads::build(name, &[("iterations".into(), iterations.to_string())])?.bytes;
    let machine = Machine::from_multiboot(&image, MachineConfig::default())?;
    let mut reference = Machine::from_multiboot(&image, MachineConfig::default())?;
    let outcome = reference.run(&mut NullObserver, RunLimits { max_instructions: 4_000_000_000 })?;
    ensure!(outcome.exit_status == 0, "{name} fails on the reference machine");
    Ok(Guest { machine, serial: outcome.serial })
}

/// Fastest run of each loop: (engine time, engine exits, bare time, bare exits); the two loops alternate so that
/// both see the same conditions. The engine's runs must reproduce the reference machine's output.
fn time_loops(guest: &Guest, repeat: u32) -> anyhow::Result<(Duration, u64, Duration, u64)> {
    let spec = virtlab_kvm::boot::from_machine(&guest.machine);
    let mut engine = None;
    let mut bare = None;
    for _ in 0..repeat.max(1) {
        let record = Vm::new(&spec)?.run(TIMEOUT)?;
        ensure!(record.exit_status == 0 && record.serial == guest.serial, "the engine's run did not reproduce");
        engine = keep_faster(engine, record.wall_time, record.exits_total());
        let mut vm = Vm::new(&spec)?;
        let start = Instant::now();
        let exits = vm.run_bare(TIMEOUT)?;
        bare = keep_faster(bare, start.elapsed(), exits);
    }
    let (engine, bare) = (engine.expect("ran"), bare.expect("ran"));
    Ok((engine.0, engine.1, bare.0, bare.1))
}

fn keep_faster(best: Option<(Duration, u64)>, time: Duration, exits: u64) -> Option<(Duration, u64)> {
    match best {
        Some(kept) if kept.0 <= time => Some(kept),
        _ => Some((time, exits)),
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let backend = match virtlab_kvm::probe() {
        Probe::Available(backend) => backend,
        Probe::Unavailable(reason) => anyhow::bail!("bench-kvm needs KVM: {reason}"),
    };
    let (low, high) = (args.iterations[0], args.iterations[1]);
    ensure!(low < high, "--iterations: LOW must be smaller than HIGH");
    println!(
        "KVM ({}): cost of one more exit to user space, engine loop against a bare KVM_RUN loop (iterations {low} and \
         {high}, fastest of {} runs each):\n",
        backend.name(),
        args.repeat
    );
    println!(
        "| workload | extra exits | bare loop µs/exit | engine loop µs/exit | ratio | engine adds ns/exit | correct |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in &args.workloads {
        let (low_guest, high_guest) = (guest(name, low)?, guest(name, high)?);
        let (engine_low, engine_exits_low, bare_low, bare_exits_low) =
            time_loops(&low_guest, args.repeat).with_context(|| format!("{name} at {low}"))?;
        let (engine_high, engine_exits_high, bare_high, bare_exits_high) =
            time_loops(&high_guest, args.repeat).with_context(|| format!("{name} at {high}"))?;
        let extra = engine_exits_high - engine_exits_low;
        // The bare loop counts the same exits; the engine's runs reproduced the reference output (checked above).
        let correct = bare_exits_high - bare_exits_low == extra && extra > 0;
        let per_exit = |high: Duration, low: Duration| (high.as_secs_f64() - low.as_secs_f64()) / extra as f64;
        let engine = per_exit(engine_high, engine_low);
        let bare = per_exit(bare_high, bare_low);
        println!(
            "| {name} | {extra} | {:.2} | {:.2} | {:.3} | {:.0} | {} |",
            bare * 1e6,
            engine * 1e6,
            engine / bare,
            (engine - bare) * 1e9,
            if correct { "yes (same exits; engine output = reference)" } else { "NO" }
        );
    }
    Ok(())
}
