//! Traces recorded from the real guests: every catalog workload records a trace that passes the checker and
//! agrees with an unobserved run, and recording is deterministic.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::PathBuf;

use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_record::{record_to_file, RecordRequest};
use virtlab_traces::{check, check_view, Direction, EndReason, Event, Metadata, TraceReader, TraceView};

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
    record_to_file(&path, request).unwrap();
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
        assert_eq!(check_view(&view).unwrap(), report, "{}: the two checkers disagree", spec.name);
        let footer = view.footer();
        // The view's loop takes block executions and repeated events on its fast path; the cursor and the
        // streaming reader decode every event the general way.
        let mut looped = Vec::new();
        view.for_each_event(|event| looped.push(event)).unwrap();
        let pulled: Vec<Event> = view.events().collect::<Result<_, _>>().unwrap();
        let mut reader = TraceReader::new(Cursor::new(&trace)).unwrap();
        let mut streamed = Vec::new();
        while let Some(event) = reader.next_event().unwrap() {
            streamed.push(event);
        }
        assert!(looped == pulled && looped == streamed, "{}: the decoding paths disagree", spec.name);
        assert_eq!(looped.len() as u64, footer.totals.events_total(), "{}", spec.name);

        let image = virtlab_workloads::build(spec.name, &[]).unwrap();
        let mut machine = Machine::from_multiboot(&image.bytes, MachineConfig::default()).unwrap();
        let plain = machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000_000 }).unwrap();

        assert_eq!(footer.ending.reason, EndReason::GuestExit, "{}", spec.name);
        assert_eq!(footer.ending.exit_status, plain.exit_status, "{}", spec.name);
        assert_eq!(footer.ending.serial, plain.serial, "{}", spec.name);
        assert_eq!(footer.ending.state_digest, plain.digest, "{}: observing changed the final state", spec.name);
        // The digest reads only the pages the machine knows were written: they must be every page that is not
        // all zero, found here by reading all of RAM.
        let scanned = machine.ram().chunks(4096).enumerate().filter(|(_, page)| page.iter().any(|&b| b != 0));
        let scanned: Vec<(u64, &[u8])> = scanned.map(|(index, page)| (index as u64 * 4096, page)).collect();
        let known: Vec<(u64, &[u8])> = machine.nonzero_pages().collect();
        assert!(known == scanned, "{}: {} pages known written, {} not all zero", spec.name, known.len(), scanned.len());
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

/// What a benchmark's trace must show for each iteration: (workload, what is counted, events per iteration).
/// Each iteration does what the paper's (or kvm-unit-tests') does, so the trace holds at least that many.
const EVENTS_PER_ITERATION: &[(&str, &str, u64)] = &[
    ("syscall", "syscall", 1),
    ("syscall", "sysret", 1),
    ("in", "in 0x80", 1),
    ("inl", "in 0x1234", 1),
    ("outl", "out 0x1234", 1),
    ("cr8wr", "cr8 write", 1),
    ("pgfault", "exception 14", 1),
    ("demandzero", "exception 14", 1),
    ("cow", "exception 14", 16),
    ("divzero", "exception 0", 1),
    ("ptemod", "page_table_write", 1),
    ("cpuid", "cpuid", 1),
    ("rdmsr", "msr_read", 1),
    ("wrmsr", "msr_write", 1),
    ("hlt", "hlt", 1),
    ("hlt", "interrupt", 1),
    ("mmio", "mmio", 2),
    ("ctxswitch", "cr3 write", 1),
];

/// The name an event is counted under in [`EVENTS_PER_ITERATION`].
fn counted_as(event: &Event) -> String {
    match *event {
        Event::Exception { vector, .. } => format!("exception {vector}"),
        Event::CrWrite { cr, .. } => format!("cr{cr} write"),
        Event::Io { port, direction: Direction::Read, .. } => format!("in {port:#x}"),
        Event::Io { port, direction: Direction::Write, .. } => format!("out {port:#x}"),
        other => other.kind().name().to_string(),
    }
}

#[test]
fn each_benchmark_trace_holds_the_events_it_measures_once_per_iteration() {
    let mut workloads: Vec<&str> = EVENTS_PER_ITERATION.iter().map(|(name, _, _)| *name).collect();
    workloads.dedup();
    for name in workloads {
        let trace = record(name, &format!("{name}-events"));
        let view = TraceView::open(&trace).unwrap();
        let mut counts: HashMap<String, u64> = HashMap::new();
        view.for_each_event(|event| *counts.entry(counted_as(&event)).or_default() += 1).unwrap();
        let spec = virtlab_workloads::catalog().iter().find(|spec| spec.name == name).unwrap();
        let iterations = spec.param("iterations").unwrap().default;
        for (_, what, per_iteration) in EVENTS_PER_ITERATION.iter().filter(|(workload, _, _)| *workload == name) {
            let seen = counts.get(*what).copied().unwrap_or(0);
            assert!(seen >= per_iteration * iterations, "{name}: {seen} {what} events for {iterations} iterations");
        }
    }
}
