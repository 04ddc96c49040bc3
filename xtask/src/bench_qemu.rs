//! `cargo xtask bench-qemu`: the reference machine against QEMU's TCG JIT on the same guest images. Each workload
//! is built at two iteration counts and booted by `virtlab run` and by `qemu-system-x86_64 -kernel`; the table
//! gives each one's wall time for the larger image, and the time per million guest instructions from the
//! difference of the two runs (so that start-up — QEMU's firmware, allocating the machine — cancels), with the
//! ratio reference / QEMU. Correct = both machines printed the same serial output and exited with the same
//! status. QEMU missing is said and the task stops.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_workloads::qemu;

use crate::timing::fastest;

#[derive(clap::Args)]
pub struct Args {
    /// Workloads to boot.
    #[arg(long, value_delimiter = ',', default_values_t = ["syscall", "compute", "in", "outl", "hlt", "ctxswitch"].map(String::from))]
    workloads: Vec<String>,
    /// Scale each workload's `iterations` (up to its maximum) so the larger run retires about this many
    /// instructions; the smaller run has half the iterations.
    #[arg(long, default_value_t = 50_000_000)]
    target_instructions: u64,
    /// Timed repetitions of each boot; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

/// One image: its instructions on the reference machine and what it printed and exited with.
struct Image {
    bytes: Vec<u8>,
    instructions: u64,
    serial: String,
    status: u32,
}

/// Two runs whose wall times differ by less than this do not measure a rate.
const MIN_DIFFERENCE: Duration = Duration::from_millis(20);

fn image(name: &str, iterations: u64) -> anyhow::Result<Image> {
    let bytes = virtlab_workloads::build(name, &[("iterations".into(), iterations.to_string())])?.bytes;
    let mut machine = Machine::from_multiboot(&bytes, MachineConfig::default())?;
    let outcome = machine.run(&mut NullObserver, RunLimits { max_instructions: 4_000_000_000 })?;
    let serial = String::from_utf8_lossy(&outcome.serial).into_owned();
    Ok(Image { bytes, instructions: machine.retired_instructions(), serial, status: outcome.exit_status })
}

/// Wall time of `virtlab run` on the image, and whether it ended as the in-process run did.
fn reference(virtlab: &std::path::Path, image: &Image, repeat: u32) -> anyhow::Result<(Duration, bool)> {
    let path = std::env::temp_dir().join(format!("virtlab-bench-qemu-{}.bin", std::process::id()));
    std::fs::write(&path, &image.bytes)?;
    let timed = fastest(repeat, || {
        let output = Command::new(virtlab).arg("run").arg(&path).output().context("cannot run virtlab")?;
        let same = output.status.code() == Some(image.status as i32)
            && String::from_utf8_lossy(&output.stdout) == image.serial;
        Ok(same)
    });
    std::fs::remove_file(&path).ok();
    timed
}

/// Wall time of a QEMU boot of the image, and whether it ended as the reference machine did.
fn under_qemu(image: &Image, repeat: u32) -> anyhow::Result<(Duration, bool)> {
    fastest(repeat, || {
        let run = qemu::boot(&image.bytes, Duration::from_secs(600))?;
        Ok(run.exit_status == Some(image.status) && run.serial == image.serial)
    })
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Err(reason) = qemu::available() {
        bail!("skipping: {reason}");
    }
    let virtlab = crate::catalog_traces::release_virtlab()?;
    println!("| workload | iterations | instructions | reference machine, wall | QEMU TCG, wall | reference per M instructions | QEMU per M instructions | reference / QEMU | correct |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for name in &args.workloads {
        let large = crate::scale::iterations_toward(name, args.target_instructions)?;
        let small = (large / 2).max(1);
        ensure!(large > small, "{name}: one iteration cannot be halved");
        let (big, little) = (image(name, large)?, image(name, small)?);
        let (reference_big, reference_same) = reference(&virtlab, &big, args.repeat)?;
        let (reference_little, little_same) = reference(&virtlab, &little, args.repeat)?;
        let (qemu_big, qemu_same) = under_qemu(&big, args.repeat)?;
        let (qemu_little, qemu_little_same) = under_qemu(&little, args.repeat)?;
        let extra = (big.instructions - little.instructions) as f64 / 1e6;
        // A difference of a few milliseconds is timer noise: the rate it gives means nothing, so it is not shown.
        let per_million = |big: Duration, little: Duration| {
            let difference = big.as_secs_f64() - little.as_secs_f64();
            (difference > MIN_DIFFERENCE.as_secs_f64()).then(|| difference * 1e3 / extra)
        };
        let (reference_rate, qemu_rate) =
            (per_million(reference_big, reference_little), per_million(qemu_big, qemu_little));
        let shown = |rate: Option<f64>| rate.map_or("below resolution".to_string(), |r| format!("{r:.1} ms"));
        let ratio = match (reference_rate, qemu_rate) {
            (Some(reference), Some(qemu)) => format!("{:.2}", reference / qemu),
            _ => "—".to_string(),
        };
        let correct = reference_same && little_same && qemu_same && qemu_little_same;
        println!(
            "| {name} | {small}, {large} | {} | {:.2} s | {:.2} s | {} | {} | {ratio} | {} |",
            big.instructions,
            reference_big.as_secs_f64(),
            qemu_big.as_secs_f64(),
            shown(reference_rate),
            shown(qemu_rate),
            if correct { "yes (same serial output and exit status)" } else { "NO" }
        );
    }
    Ok(())
}
