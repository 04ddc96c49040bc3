//! Traces recorded from the real guests: every catalog workload records a trace that passes the checker and
//! agrees with an unobserved run, and recording is deterministic.

use std::io::Cursor;
use std::path::PathBuf;

use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_record::{record_to_file, RecordRequest};
use virtlab_traces::{check, EndReason, Metadata, TraceView};

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("virtlab-recording-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.vlt"))
}

fn record(name: &str, file: &str) -> Vec<u8> {
    let image = virtlab_workloads::build(name, &[]).unwrap();
    let path = temp_path(file);
    let request = RecordRequest {
        image: &image.bytes,
        metadata: Metadata { workload: name.into(), recorder: "tests".into(), ..Metadata::default() },
        machine: MachineConfig::default(),
        max_instructions: 100_000_000,
        timeout: None,
    };
    record_to_file(&path, request, |_| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

#[test]
fn every_workload_records_a_valid_trace_that_agrees_with_an_unobserved_run() {
    for spec in virtlab_workloads::catalog() {
        let trace = record(spec.name, spec.name);
        let report = check(Cursor::new(&trace)).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        let view = TraceView::open(&trace).unwrap();
        let footer = view.footer();

        let image = virtlab_workloads::build(spec.name, &[]).unwrap();
        let mut machine = Machine::from_multiboot(&image.bytes, MachineConfig::default()).unwrap();
        let plain = machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000_000 }).unwrap();

        assert_eq!(footer.ending.reason, EndReason::GuestExit, "{}", spec.name);
        assert_eq!(footer.ending.exit_status, plain.exit_status, "{}", spec.name);
        assert_eq!(footer.ending.serial, plain.serial, "{}", spec.name);
        assert_eq!(footer.ending.state_digest, plain.digest, "{}: observing changed the final state", spec.name);
        assert_eq!(footer.totals.instructions, machine.retired_instructions(), "{}", spec.name);
        assert_eq!(footer.totals.instructions_user, plain.retired_user, "{}", spec.name);
        assert_eq!(footer.totals.instructions_kernel, plain.retired_kernel, "{}", spec.name);
        eprintln!(
            "{:<18} {:>8} instructions {:>8} events {:>6} bytes ({:.3} bytes/instruction)",
            spec.name,
            report.instructions,
            report.events,
            trace.len(),
            trace.len() as f64 / report.instructions as f64
        );
        assert!(trace.len() as f64 / (report.instructions as f64) <= 1.5, "{}: over the size budget", spec.name);
    }
}

#[test]
fn two_recordings_of_the_same_workload_are_byte_identical() {
    for name in ["syscall", "hlt", "forkwait"] {
        assert!(record(name, &format!("{name}-a")) == record(name, &format!("{name}-b")), "{name}");
    }
}
