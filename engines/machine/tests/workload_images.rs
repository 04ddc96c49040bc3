//! Boots every Multiboot image in the directory named by `VIRTLAB_IMAGES` (for instance the
//! workload catalog exported with `cargo run --example export` in `workloads/`, at default
//! parameters) and expects each to print "ok" and exit with status 0, identically with and
//! without a recording observer, and the benchmark workloads to produce the events they exist
//! for. Without the variable there is nothing to boot and the test says so.

use std::collections::HashMap;

use virtlab_machine::{ExecutionObserver, Machine, MachineConfig, NullObserver, RunLimits, SideEvent, Transfer};

/// Counts reports by kind.
#[derive(Default)]
struct Tally {
    counts: HashMap<String, u64>,
}

impl Tally {
    fn add(&mut self, key: String) {
        *self.counts.entry(key).or_default() += 1;
    }

    fn get(&self, key: &str) -> u64 {
        self.counts.get(key).copied().unwrap_or(0)
    }
}

impl ExecutionObserver for Tally {
    fn transfer(&mut self, _index: u32, transfer: &Transfer) {
        let key = match transfer {
            Transfer::Exception { vector, .. } => format!("exception {vector}"),
            Transfer::ExternalInterrupt { .. } => "interrupt".into(),
            Transfer::Syscall { .. } => "syscall".into(),
            Transfer::Sysret { .. } => "sysret".into(),
            Transfer::SoftwareInterrupt { vector, .. } => format!("int {vector}"),
            Transfer::InterruptReturn { .. } => "iret".into(),
        };
        self.add(key);
    }

    fn side_event(&mut self, _index: u32, event: &SideEvent) {
        let key = match event {
            SideEvent::ControlRegisterWrite { cr, .. } => format!("cr{cr} write"),
            SideEvent::MsrRead { .. } => "msr read".into(),
            SideEvent::MsrWrite { .. } => "msr write".into(),
            SideEvent::Io { port, .. } => format!("io {port:#x}"),
            SideEvent::Cpuid { .. } => "cpuid".into(),
            SideEvent::Invlpg { .. } => "invlpg".into(),
            SideEvent::DescriptorTableLoad(_) => "table load".into(),
            SideEvent::Hlt { .. } => "hlt".into(),
            SideEvent::PageTableWrite { .. } => "page-table write".into(),
            SideEvent::PageTouch { .. } => "page touch".into(),
            SideEvent::Mmio { .. } => "mmio".into(),
        };
        self.add(key);
    }
}

/// (workload file stem, report kind, at least this many) for the default iteration counts.
const EXPECTED_EVENTS: &[(&str, &str, u64)] = &[
    ("syscall", "syscall", 2000),
    ("syscall", "sysret", 2000),
    ("in", "io 0x80", 2000),
    ("cr8wr", "cr8 write", 2000),
    ("pgfault", "exception 14", 512),
    ("divzero", "exception 0", 1000),
    ("ptemod", "page-table write", 10000),
    ("cpuid", "cpuid", 2000),
    ("rdmsr", "msr read", 2000),
    ("wrmsr", "msr write", 2000),
    ("hlt", "hlt", 50),
    ("hlt", "interrupt", 50),
    ("mmio", "mmio", 4000),
];

#[test]
fn exported_workload_images_boot_and_exit_zero() {
    let Some(directory) = std::env::var_os("VIRTLAB_IMAGES") else {
        eprintln!("VIRTLAB_IMAGES is not set: no workload images to boot");
        return;
    };
    let mut images: Vec<_> = std::fs::read_dir(&directory)
        .expect("VIRTLAB_IMAGES names a readable directory")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "bin"))
        .collect();
    images.sort();
    assert!(!images.is_empty(), "no .bin images in {directory:?}");
    let limits = RunLimits { max_instructions: 500_000_000 };
    for path in images {
        let image = std::fs::read(&path).unwrap();
        let boot = || {
            Machine::from_multiboot(&image, MachineConfig::default())
                .unwrap_or_else(|error| panic!("{path:?}: {error}"))
        };
        let mut machine = boot();
        let outcome = machine.run(&mut NullObserver, limits).unwrap_or_else(|error| {
            panic!("{path:?}: {error}\nserial so far: {}", String::from_utf8_lossy(machine.serial_output()))
        });
        let serial = String::from_utf8_lossy(&outcome.serial);
        assert_eq!(outcome.exit_status, 0, "{path:?}: {serial}");
        assert!(serial.ends_with("ok\n"), "{path:?}: {serial}");
        let mut tally = Tally::default();
        let recorded = boot().run(&mut tally, limits).unwrap();
        assert_eq!(recorded, outcome, "{path:?}: recording changed the run");
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        for (workload, kind, minimum) in EXPECTED_EVENTS {
            if stem == *workload {
                assert!(
                    tally.get(kind) >= *minimum,
                    "{stem}: {} {kind} reports, expected at least {minimum}",
                    tally.get(kind)
                );
            }
        }
    }
}
