//! The KVM engine: a trace's guest run on the host's KVM, several times, each run checked against the trace and
//! measured — exits seen by this process with their guest RIPs, KVM's binary statistics as deltas, wall time and
//! time-stamp-counter cycles.

use std::collections::HashMap;
use std::time::Duration;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use virtlab_traces::{EndReason, EventKind, TraceView};

use crate::stats::{StatDescriptor, StatsFile};
use crate::vm::{RunRecord, UserExit, Vm};
use crate::{boot, probe, Backend, KvmError, Probe};

#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// How many times the guest runs (each in a fresh VM).
    pub runs: u32,
    /// Wall-clock budget of one run.
    pub timeout: Duration,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions { runs: 5, timeout: Duration::from_secs(60) }
    }
}

/// Minimum, median and maximum of one quantity over the runs (for an even number of runs the median is the
/// lower of the two middle values, so it is always a value some run had).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub min: u64,
    pub median: u64,
    pub max: u64,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: &[u64]) -> Option<Spread> {
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        Some(Spread { min: *sorted.first()?, median: sorted[(sorted.len() - 1) / 2], max: *sorted.last()? })
    }
}

/// Which statistics file a statistic comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatScope {
    Vm,
    Vcpu,
}

/// One of KVM's statistics over the runs: for cumulative counters and histograms the change during a run (a
/// histogram's is its number of samples), for gauges and peaks the value at the end of a run. Raw values; the
/// descriptor's unit, base and exponent say what they are.
#[derive(Debug, Clone, PartialEq)]
pub struct StatMeasurement {
    pub scope: StatScope,
    pub descriptor: StatDescriptor,
    pub spread: Spread,
}

/// One guest instruction address where exits reached this process, in the first run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitSite {
    pub kind: UserExit,
    /// The guest instruction that caused the exits (KVM reports some exits with the RIP already past it; see
    /// `reported_after`).
    pub rip: u64,
    pub count: u64,
}

/// What one run took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFigures {
    pub wall_ns: u64,
    /// Time-stamp-counter cycles from the first KVM_RUN to the exit port.
    pub tsc_cycles: u64,
    /// The part of `tsc_cycles` this process spent outside KVM_RUN, handling exits.
    pub vmm_tsc_cycles: u64,
    /// Exits that reached this process.
    pub user_space_exits: u64,
}

#[derive(Debug, Clone)]
pub struct Measurement {
    pub backend: Backend,
    /// The host's time-stamp-counter rate, as KVM reports it for the vCPU.
    pub tsc_khz: Option<u32>,
    /// Each run, in the order they ran.
    pub runs: Vec<RunFigures>,
    /// The first run's user-space exits by kind and guest address, most first.
    pub sites: Vec<ExitSite>,
    pub stats: Vec<StatMeasurement>,
}

fn spread_of(runs: &[RunFigures], figure: impl Fn(&RunFigures) -> u64) -> Spread {
    Spread::of(&runs.iter().map(figure).collect::<Vec<_>>()).expect("a measurement has at least one run")
}

impl Measurement {
    pub fn wall_ns(&self) -> Spread {
        spread_of(&self.runs, |r| r.wall_ns)
    }

    pub fn tsc_cycles(&self) -> Spread {
        spread_of(&self.runs, |r| r.tsc_cycles)
    }

    pub fn vmm_tsc_cycles(&self) -> Spread {
        spread_of(&self.runs, |r| r.vmm_tsc_cycles)
    }

    pub fn user_space_exits(&self) -> Spread {
        spread_of(&self.runs, |r| r.user_space_exits)
    }

    /// A statistic's median by name (vCPU statistics first), if the kernel has it.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let find = |scope| self.stats.iter().find(|s| s.scope == scope && s.descriptor.name == name);
        find(StatScope::Vcpu).or_else(|| find(StatScope::Vm)).map(|s| s.spread.median)
    }

    pub fn user_exits_of(&self, kind: UserExit) -> u64 {
        self.sites.iter().filter(|s| s.kind == kind).map(|s| s.count).sum()
    }
}

/// Kernel-mode instructions KVM's instruction emulator does not implement: on PVM, where the emulator runs all
/// guest code at CPL 0, a kernel using them stops with an emulation failure.
const NOT_EMULATED: [(Mnemonic, &str); 7] = [
    (Mnemonic::Lar, "LAR"),
    (Mnemonic::Lsl, "LSL"),
    (Mnemonic::Verr, "VERR"),
    (Mnemonic::Verw, "VERW"),
    (Mnemonic::Rdtscp, "RDTSCP"),
    (Mnemonic::Iretd, "32-bit IRET"),
    (Mnemonic::Iret, "16-bit IRET"),
];

/// Why this host's KVM cannot run the trace's guest, if it cannot: read from the trace alone, before a VM is
/// made.
pub fn refusal(view: &TraceView, backend: Backend) -> Option<String> {
    let footer = view.footer();
    if footer.ending.reason != EndReason::GuestExit {
        return Some(format!(
            "the recorded run did not end with a guest exit ({}): there is no ending to reproduce",
            footer.ending.reason.name()
        ));
    }
    if backend != Backend::Pvm {
        return None;
    }
    let totals = &footer.totals;
    let user_entries = totals.count(EventKind::Syscall) + totals.count(EventKind::SoftwareInterrupt);
    if totals.instructions_user > 0 && user_entries > 0 {
        return Some(format!(
            "user mode under PVM: the guest enters its kernel from CPL 3 by SYSCALL or INT n ({user_entries} times), \
             which on a PVM host does not reach an unmodified guest kernel"
        ));
    }
    // Kernel code lives in pages user mode cannot reach, which the trace tags 0.
    for (_, block) in view.blocks().iter().filter(|(_, b)| b.tag == 0) {
        let mut decoder = Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE);
        for instruction in &mut decoder {
            if let Some((_, name)) = NOT_EMULATED.iter().find(|(m, _)| *m == instruction.mnemonic()) {
                return Some(format!(
                    "the kernel runs {name} at {:#x}, which KVM's instruction emulator (which runs all CPL 0 code on \
                     PVM) does not implement",
                    instruction.ip()
                ));
            }
        }
    }
    None
}

/// Reads both statistics files: one value per descriptor (a histogram's buckets summed).
fn read_stats(files: &[(StatScope, &StatsFile)]) -> Result<Vec<u64>, KvmError> {
    let mut values = Vec::new();
    for (_, file) in files {
        let read = file.read().map_err(|e| KvmError::Stats(e.to_string()))?;
        values.extend(read.iter().map(|buckets| buckets.iter().fold(0u64, |sum, v| sum.wrapping_add(*v))));
    }
    Ok(values)
}

fn describe(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let tail: String = text.chars().rev().take(120).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{} bytes ending {tail:?}", bytes.len())
}

/// Runs the trace's guest `options.runs` times on this host's KVM and measures each run.
///
/// `progress` is called after each run with its number (from 1). A run that does not end the way the trace
/// ends (exit status and serial output) is an error: it is never reported as a measurement.
pub fn measure(
    view: &TraceView,
    options: &MeasureOptions,
    mut progress: impl FnMut(u32),
) -> Result<Measurement, KvmError> {
    let backend = match probe() {
        Probe::Available(backend) => backend,
        Probe::Unavailable(reason) => return Err(KvmError::Unavailable(reason)),
    };
    if let Some(reason) = refusal(view, backend) {
        return Err(KvmError::Unrunnable(reason));
    }
    if options.runs == 0 {
        return Err(KvmError::Unrunnable("kvm.runs must be at least 1".into()));
    }
    let spec = boot::from_trace(view)?;
    let expected = &view.footer().ending;
    let mut records: Vec<RunRecord> = Vec::new();
    let mut deltas: Vec<Vec<u64>> = Vec::new();
    let mut schema: Vec<(StatScope, StatDescriptor)> = Vec::new();
    let mut tsc_khz = None;
    for run in 1..=options.runs {
        let mut vm = Vm::new(&spec)?;
        let (vm_stats, vcpu_stats) = vm.stats()?;
        let files = [(StatScope::Vm, &vm_stats), (StatScope::Vcpu, &vcpu_stats)];
        let layout: Vec<(StatScope, StatDescriptor)> = files
            .iter()
            .flat_map(|(scope, file)| file.schema.descriptors.iter().map(|d| (*scope, d.clone())))
            .collect();
        if run == 1 {
            schema = layout;
            tsc_khz = vm.tsc_khz();
        } else if layout != schema {
            return Err(KvmError::Stats(format!("KVM statistics: run {run} has other descriptors than run 1")));
        }
        let before = read_stats(&files)?;
        let record = vm.run(options.timeout)?;
        let after = read_stats(&files)?;
        if record.exit_status != expected.exit_status || record.serial != expected.serial {
            return Err(KvmError::Diverged(format!(
                "run {run} ended with status {} and serial output of {}; the trace recorded status {} and {}",
                record.exit_status,
                describe(&record.serial),
                expected.exit_status,
                describe(&expected.serial)
            )));
        }
        let delta = schema
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((_, d), (b, a))| if d.kind.is_additive() { a.wrapping_sub(*b) } else { *a })
            .collect();
        deltas.push(delta);
        records.push(record);
        progress(run);
    }
    let spread = |values: Vec<u64>| Spread::of(&values).expect("at least one run");
    let stats = schema
        .into_iter()
        .enumerate()
        .map(|(index, (scope, descriptor))| StatMeasurement {
            scope,
            descriptor,
            spread: spread(deltas.iter().map(|run| run[index]).collect()),
        })
        .collect();
    let runs = records
        .iter()
        .map(|r| RunFigures {
            wall_ns: r.wall_time.as_nanos() as u64,
            tsc_cycles: r.tsc_cycles,
            vmm_tsc_cycles: r.vmm_tsc_cycles,
            user_space_exits: r.exits_total(),
        })
        .collect();
    Ok(Measurement { backend, tsc_khz, runs, sites: sites(view, backend, &records[0].exits), stats })
}

/// Whether KVM reports this exit with the RIP already past the instruction. KVM's instruction emulator
/// completes a write before it hands the write to user space, and leaves a read unfinished until user space has
/// answered; on PVM every guest instruction at CPL 0 goes through the emulator, on VMX and SVM MMIO does, while
/// port I/O takes a fast path that exits with the RIP still on the instruction.
fn reported_after(kind: UserExit, backend: Backend) -> bool {
    match kind {
        UserExit::IoIn | UserExit::MmioRead => false,
        UserExit::MmioWrite => true,
        UserExit::IoOut => backend == Backend::Pvm,
    }
}

/// Maps the end address of every instruction in the trace's code to its start.
fn instruction_starts_by_end(view: &TraceView) -> HashMap<u64, u64> {
    let mut starts = HashMap::new();
    for (_, block) in view.blocks().iter() {
        let decoder = Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE);
        for instruction in decoder {
            starts.insert(instruction.next_ip(), instruction.ip());
        }
    }
    starts
}

/// The exits of one run as sites at guest instruction addresses, most first: a RIP KVM reports past the
/// instruction is moved back to the start of the trace's instruction that ends there.
fn sites(view: &TraceView, backend: Backend, exits: &HashMap<(UserExit, u64), u64>) -> Vec<ExitSite> {
    let starts = instruction_starts_by_end(view);
    let mut merged: HashMap<(UserExit, u64), u64> = HashMap::new();
    for (&(kind, rip), &count) in exits {
        let address = if reported_after(kind, backend) { starts.get(&rip).copied().unwrap_or(rip) } else { rip };
        *merged.entry((kind, address)).or_insert(0) += count;
    }
    let mut sites: Vec<ExitSite> =
        merged.into_iter().map(|((kind, rip), count)| ExitSite { kind, rip, count }).collect();
    sites.sort_by(|a, b| b.count.cmp(&a.count).then(a.rip.cmp(&b.rip)).then(a.kind.cmp(&b.kind)));
    sites
}
