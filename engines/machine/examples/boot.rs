//! Boots a Multiboot image on the reference machine and prints how the run ended.
//!
//! `cargo run --release --example boot -- IMAGE [max-instructions]`

use std::time::Instant;

use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: boot IMAGE [max-instructions]");
        std::process::exit(2);
    };
    let max_instructions =
        args.next().and_then(|arg| arg.parse().ok()).unwrap_or(RunLimits::default().max_instructions);
    let image = std::fs::read(&path).unwrap_or_else(|error| {
        eprintln!("cannot read {path}: {error}");
        std::process::exit(2);
    });
    let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap_or_else(|error| {
        eprintln!("cannot load {path}: {error}");
        std::process::exit(1);
    });
    let start = Instant::now();
    let result = machine.run(&mut NullObserver, RunLimits { max_instructions });
    let mut seconds = start.elapsed().as_secs_f64();
    // The outcome's digest hashes all of RAM once; time it again to report the interpreter alone.
    let digest_start = Instant::now();
    machine.state_digest();
    seconds = (seconds - digest_start.elapsed().as_secs_f64()).max(f64::MIN_POSITIVE);
    print!("{}", String::from_utf8_lossy(machine.serial_output()));
    match result {
        Ok(outcome) => {
            let total = outcome.retired_user + outcome.retired_kernel;
            println!(
                "exit status {} (QEMU: {}), {} user + {} kernel instructions, {} idle, {:.1} M instructions/s (excluding the digest), digest {}",
                outcome.exit_status,
                (outcome.exit_status << 1) | 1,
                outcome.retired_user,
                outcome.retired_kernel,
                outcome.idle_time,
                total as f64 / seconds / 1e6,
                outcome.digest.iter().map(|byte| format!("{byte:02x}")).collect::<String>()
            );
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
