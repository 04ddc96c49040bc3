//! The catalog's promises, measured on the reference machine (which counts retired instructions exactly):
//! at its defaults every workload retires between 10^4 and 10^7 instructions, and `iterations` scales the
//! measured part linearly.

use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};

/// Instructions the workload retires with `iterations` (defaults for the rest), checking it passes.
fn retired(name: &str, iterations: Option<u64>) -> u64 {
    let params: Vec<(String, String)> =
        iterations.map(|n| vec![("iterations".into(), n.to_string())]).unwrap_or_default();
    let image = virtlab_workloads::build(name, &params).unwrap();
    let mut machine = Machine::from_multiboot(&image.bytes, MachineConfig::default()).unwrap();
    let outcome = machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000_000 }).unwrap();
    assert_eq!(outcome.exit_status, 0, "{name} failed: {}", String::from_utf8_lossy(&outcome.serial));
    machine.retired_instructions()
}

#[test]
fn every_workload_retires_between_ten_thousand_and_ten_million_instructions_at_its_defaults() {
    for spec in virtlab_workloads::catalog() {
        let count = retired(spec.name, None);
        eprintln!("{:<18} {count:>10} instructions at its defaults", spec.name);
        assert!((10_000..=10_000_000).contains(&count), "{}: {count} instructions", spec.name);
    }
}

#[test]
fn iterations_scale_the_measured_part_linearly() {
    for spec in virtlab_workloads::catalog() {
        let n = spec.param("iterations").expect("every workload takes iterations").default;
        let (once, twice, thrice) =
            (retired(spec.name, Some(n)), retired(spec.name, Some(2 * n)), retired(spec.name, Some(3 * n)));
        let (first, second) = (twice - once, thrice - twice);
        eprintln!("{:<18} +{first} then +{second} instructions per {n} iterations", spec.name);
        assert!(first > 0, "{}: more iterations retired no more instructions", spec.name);
        // Timer interrupts arrive by instruction count, so a longer run takes a few more of them; nothing else
        // may differ between the two increments.
        let tolerance = first / 50 + 200;
        assert!(first.abs_diff(second) <= tolerance, "{}: +{first} then +{second}", spec.name);
    }
}
