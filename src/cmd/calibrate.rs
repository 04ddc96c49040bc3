//! `virtlab calibrate host`: a cost profile whose primitives are measured on this host's KVM.
//!
//! Each measured primitive comes from one or more probes: a guest run at a low and a high iteration count, several
//! times each; run i at the high count minus run i at the low count cancels start-up and shutdown, and the
//! remainder divided by what the extra iterations did (emulated instructions from KVM's `insn_emulation`,
//! exits that reached user space, iterations) is one estimate. The primitive is the median estimate; the file
//! says, for every value, how it was obtained (command, backend, runs, median and spread), or, for a primitive
//! this host cannot measure, which built-in profile it comes from and why: measured primitives carry provenance
//! `measured` and their probes as the source; the others keep their base profile's provenance.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use iced_x86::code_asm::*;
use indicatif::{ProgressBar, ProgressStyle};
use virtlab_engines::profile::Entry;
use virtlab_engines::{Primitive, Profile, Provenance};
use virtlab_kvm::vm::{BootSpec, EntryState};
use virtlab_kvm::{Backend, MeasureOptions, Measurement, Probe};
use virtlab_machine::cpu::Segment;
use virtlab_traces::TraceView;

/// Measure this host's primitive costs on its KVM and write them as a cost profile.
///
/// `host`: runs kernel-mode catalog guests (callret, in, outl, mmio) at two iteration
/// counts on KVM, and a compute loop at CPL 3, and derives, in TSC cycles (clock_ghz is
/// the TSC rate):
///   native.cycles_per_instruction  the compute loop, at CPL 3 (native on every backend)
///   monitor.interpret  callret: per instruction KVM's emulator runs (PVM: all of CPL 0)
///   monitor.device     in, outl, mmio: an exit to this process's device model and back,
///                      beyond interpreting the instruction (median of the three)
/// Every other primitive comes from --base, with the reason this host cannot measure it
/// (on PVM: no VMCS, no binary translator, no Xen, no user-mode traps, extras within the
/// emulator's noise). Every value carries its provenance (`measured`, with the probes, runs,
/// median and spread as its source). The result loads wherever a profile does:
/// `virtlab replay TRACE --profile host.toml`.
///
/// Derivations exist for the PVM backend (this lab's hosts); on VMX or SVM the command
/// says so and stops. With the default runs it takes about half a minute.
///
/// Example: `virtlab calibrate host -o host.toml`
///
/// Exit status: 0 when the profile was written; 3 when it could not be written; 1 when
/// KVM is not usable here, a run failed, or the backend has no derivations.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// What to calibrate: the host at hand.
    #[arg(value_parser = ["host"])]
    target: String,
    /// Where to write the profile (TOML), atomically.
    #[arg(short, long)]
    output: PathBuf,
    /// Runs of each probe at each iteration count (each in a fresh VM).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// The built-in profile that supplies the primitives this host cannot measure.
    #[arg(long, default_value = "sandybridge-2011", value_name = "NAME")]
    base: String,
}

/// A catalog workload at two iteration counts.
struct CatalogProbe {
    workload: &'static str,
    low: u64,
    high: u64,
}

const fn probe(workload: &'static str, low: u64, high: u64) -> CatalogProbe {
    CatalogProbe { workload, low, high }
}

/// Kernel-mode probes, with enough extra iterations that their work outweighs the run-to-run noise of start-up.
const INTERPRET: CatalogProbe = probe("callret", 2_000, 42_000);
/// Each iteration exits to user space once (`mmio`: twice).
const DEVICE: [CatalogProbe; 3] = [probe("in", 500, 10_500), probe("outl", 500, 10_500), probe("mmio", 500, 5_500)];

/// The CPL 3 compute loop's two iteration counts.
const COMPUTE: (u64, u64) = (1_000_000, 41_000_000);

/// One derived quantity: its estimates (one per pair of runs), and how they were obtained.
struct Estimate {
    values: Vec<f64>,
    how: String,
}

impl Estimate {
    fn median(&self) -> f64 {
        median(&self.values)
    }

    fn range(&self) -> (f64, f64) {
        let min = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }

    fn describe(&self) -> String {
        let (min, max) = self.range();
        format!(
            "{}: median {:.2}, spread {:.2}..{:.2} over {} run pairs",
            self.how,
            self.median(),
            min,
            max,
            self.values.len()
        )
    }
}

/// The lower middle value for an even count, like the engine's medians.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(sorted.len() - 1) / 2]
}

/// A primitive's measured value and its provenance comment.
struct Measured {
    key: &'static str,
    value: f64,
    provenance: Vec<String>,
}

/// Both ends of a catalog probe, measured.
struct ProbeRuns {
    probe: &'static CatalogProbe,
    low: Measurement,
    high: Measurement,
}

impl ProbeRuns {
    /// Extra TSC cycles of the high count, pairing run i with run i.
    fn extra_cycles(&self) -> Vec<f64> {
        self.low.runs.iter().zip(&self.high.runs).map(|(l, h)| h.tsc_cycles as f64 - l.tsc_cycles as f64).collect()
    }

    fn extra_stat(&self, name: &str) -> anyhow::Result<f64> {
        let value = |m: &Measurement| m.stat(name).with_context(|| format!("this kernel has no `{name}` statistic"));
        Ok(value(&self.high)? as f64 - value(&self.low)? as f64)
    }

    fn extra_user_exits(&self) -> f64 {
        self.high.user_space_exits().median as f64 - self.low.user_space_exits().median as f64
    }

    fn label(&self) -> String {
        format!("{} at {} and {} iterations", self.probe.workload, self.probe.low, self.probe.high)
    }

    /// Per exit to user space (one estimate per run pair), after taking away the interpreted instructions at
    /// `interpret` cycles each.
    fn per_user_exit_beyond_interpretation(&self, interpret: f64) -> anyhow::Result<Estimate> {
        let (per, unit) = (self.extra_user_exits(), "exits to user space");
        let instructions = self.extra_stat("insn_emulation")?;
        anyhow::ensure!(per > 0.0, "{}: no extra {unit} between the two counts", self.label());
        Ok(Estimate {
            values: self.extra_cycles().iter().map(|c| (c - instructions * interpret) / per).collect(),
            how: format!(
                "{}: (extra TSC cycles - {instructions} extra insn_emulation x monitor.interpret) / {per} extra {unit}",
                self.label()
            ),
        })
    }
}

fn measure_probe(probe: &'static CatalogProbe, options: &MeasureOptions) -> anyhow::Result<ProbeRuns> {
    let at = |iterations: u64| -> anyhow::Result<Measurement> {
        let params = vec![("iterations".to_string(), iterations.to_string())];
        let bytes = super::record::record_catalog_trace(probe.workload, &params)?;
        let view = TraceView::open(&bytes).context("reading the recorded trace")?;
        virtlab_kvm::measure(&view, options, |_| {})
            .with_context(|| format!("{} at {iterations} iterations on KVM", probe.workload))
    };
    Ok(ProbeRuns { probe, low: at(probe.low)?, high: at(probe.high)? })
}

/// Many estimates of one primitive (one per probe) combined: their medians' median, all their values kept.
fn combined(key: &'static str, estimates: &[Estimate], what: &str) -> Measured {
    let medians: Vec<f64> = estimates.iter().map(Estimate::median).collect();
    let mut provenance = vec![format!("[measured] {what}: the median of the probes' medians")];
    provenance.extend(estimates.iter().map(|e| format!("  {}", e.describe())));
    Measured { key, value: median(&medians), provenance }
}

fn single(key: &'static str, estimate: &Estimate, what: &str) -> Measured {
    Measured {
        key,
        value: estimate.median(),
        provenance: vec![format!("[measured] {what}"), format!("  {}", estimate.describe())],
    }
}

/// A primitive cannot be negative; an estimate below zero means the cost is below the noise.
fn clamp(mut measured: Measured) -> Measured {
    if measured.value < 0.0 {
        measured.provenance.push(format!("  measured {:.2}, below the noise: set to 0", measured.value));
        measured.value = 0.0;
    }
    measured
}

// ---- the CPL 3 compute loop ----

/// Where the compute guest lives: page tables at 0x1000–0x3fff (one 2 MiB user page at 0), code at 0x10000.
const PML4: u64 = 0x1000;
const CODE: u64 = 0x1_0000;
const GUEST_RAM: u64 = 2 << 20;
/// Present, writable, user; and the page-size bit for a 2 MiB page.
const PAGE_FLAGS: u64 = 0x7;
const LARGE_PAGE: u64 = 0x80;
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The catalog `compute` workload's loop (xorshift and multiply-accumulate, 13 instructions per iteration),
/// started directly at CPL 3 in long mode with IOPL 3, so that its end is an OUT to the exit port and no kernel
/// is involved: on PVM, CPL 3 runs natively and the catalog's own kernel could not be left by SYSCALL.
fn compute_code(iterations: u64) -> anyhow::Result<Vec<u8>> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.mov(rax, SEED)?;
    a.xor(ebx, ebx)?;
    a.mov(r12, iterations)?;
    a.set_label(&mut top)?;
    for (shift_left, amount) in [(true, 13), (false, 7), (true, 17)] {
        a.mov(rdx, rax)?;
        if shift_left {
            a.shl(rdx, amount)?;
        } else {
            a.shr(rdx, amount)?;
        }
        a.xor(rax, rdx)?;
    }
    a.imul_3(rbx, rbx, 31)?;
    a.add(rbx, rax)?;
    a.dec(r12)?;
    a.jnz(top)?;
    a.xor(eax, eax)?;
    a.out(0xF4, eax)?;
    Ok(a.assemble(CODE)?)
}

const COMPUTE_INSTRUCTIONS_PER_ITERATION: u64 = 13;

/// PML4, PDPT and page directory, one page each from [`PML4`] on; their first entries map the first 2 MiB.
fn page_tables() -> Vec<u8> {
    const PAGE: u64 = 0x1000;
    let (pdpt, directory) = (PML4 + PAGE, PML4 + 2 * PAGE);
    let entries = [(PML4, pdpt | PAGE_FLAGS), (pdpt, directory | PAGE_FLAGS), (directory, PAGE_FLAGS | LARGE_PAGE)];
    let mut tables = vec![0u8; 3 * PAGE as usize];
    for (table, entry) in entries {
        let offset = (table - PML4) as usize;
        tables[offset..offset + 8].copy_from_slice(&entry.to_le_bytes());
    }
    tables
}

fn compute_entry() -> EntryState {
    // Descriptor bits 40–55 as the reference machine keeps them: type, S, DPL 3, P, then L (code) or D/B, and G.
    let user_code =
        Segment { selector: 0x1B, base: 0, limit: 0xFFFF_FFFF, attributes: 0xB | 0x10 | 0x60 | 0x80 | 0x2000 | 0x8000 };
    let user_data =
        Segment { selector: 0x23, base: 0, limit: 0xFFFF_FFFF, attributes: 0x3 | 0x10 | 0x60 | 0x80 | 0x4000 | 0x8000 };
    EntryState {
        gpr: [0; 8],
        rip: CODE,
        rflags: 0x3002,
        cr0: 0x8001_0033,
        cr3: PML4,
        cr4: 0x20,
        efer: 0x500,
        segments: [user_data, user_code, user_data, user_data, user_data, user_data],
        gdtr: (0, 0),
        idtr: (0, 0),
    }
}

/// TSC cycles of each run of the compute loop at `iterations`.
fn compute_runs(iterations: u64, runs: u32) -> anyhow::Result<Vec<f64>> {
    let code = compute_code(iterations)?;
    let tables = page_tables();
    let spec = BootSpec { ram_size: GUEST_RAM, memory: vec![(PML4, &tables), (CODE, &code)], entry: compute_entry() };
    (0..runs)
        .map(|_| {
            let record = virtlab_kvm::run_boot(&spec, Duration::from_secs(60))?;
            anyhow::ensure!(record.exit_status == 0, "the compute loop exited with status {}", record.exit_status);
            Ok(record.tsc_cycles as f64)
        })
        .collect()
}

fn native_cpi(runs: u32) -> anyhow::Result<Estimate> {
    let (low, high) = COMPUTE;
    let low_runs = compute_runs(low, runs)?;
    let high_runs = compute_runs(high, runs)?;
    let instructions = ((high - low) * COMPUTE_INSTRUCTIONS_PER_ITERATION) as f64;
    Ok(Estimate {
        values: low_runs.iter().zip(&high_runs).map(|(l, h)| (h - l) / instructions).collect(),
        how: format!(
            "the compute loop at CPL 3 ({COMPUTE_INSTRUCTIONS_PER_ITERATION} instructions per iteration) at {low} and \
             {high} iterations: extra TSC cycles / {instructions} extra instructions"
        ),
    })
}

// ---- the profile file ----

/// Why this host cannot measure a primitive the measured set leaves out.
fn unmeasured_reason(key: &str) -> &'static str {
    let section = key.split('.').next().unwrap_or("");
    match section {
        "hw" => "PVM has no VT-x or AMD-V: no VMCS, no hardware VM exits to time",
        "bt" => "this host runs no binary translator",
        "paravirt" => "this host runs no paravirtual hypervisor (Xen)",
        "monitor" if matches!(key, "monitor.emulate" | "monitor.shadow_update" | "monitor.decode") => {
            "on PVM this work is part of the emulator's cost per instruction; what cpuid, rdmsr, wrmsr or ptemod add \
             beyond monitor.interpret is smaller than the run-to-run noise of interpreting their loops, so it is \
             not claimed (BENCHMARKS.md)"
        }
        "monitor" => {
            "the catalog cannot drive it on PVM (user-mode traps and system calls do not reach an unmodified guest \
             kernel there; shadow fills, switches and invalidations are not isolated by a kernel-mode workload)"
        }
        _ => "no probe on this host isolates this single native event",
    }
}

/// The host profile: the base profile with every measured primitive replaced (provenance `measured`, the probes
/// as its source) and every other one kept with its provenance, its source prefixed by where it comes from and
/// why this host did not measure it.
fn host_profile(base: &Profile, base_name: &str, measured: &[Measured]) -> anyhow::Result<Profile> {
    let mut profile = base.clone();
    for (primitive, entry) in base.entries() {
        let reason = unmeasured_reason(primitive.key());
        let source = format!("[base {base_name}] not measured here: {reason}. {}", entry.source);
        profile.set(primitive, Entry { value: entry.value, provenance: entry.provenance, source });
    }
    for m in measured {
        if m.key == "clock_ghz" {
            profile.clock_ghz = m.value;
            continue;
        }
        let primitive = Primitive::ALL
            .iter()
            .copied()
            .find(|p| p.key() == m.key)
            .with_context(|| format!("{} is not a profile primitive (a bug: please report it)", m.key))?;
        let source = m.provenance.iter().map(|line| line.trim()).collect::<Vec<_>>().join("; ");
        profile.set(primitive, Entry { value: m.value, provenance: Provenance::Measured, source });
    }
    Ok(profile)
}

fn toml_number(value: f64) -> String {
    let rounded = (value * 1000.0).round() / 1000.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.1}")
    } else {
        format!("{rounded}")
    }
}

/// Runs every probe and derives the measured primitives, `clock_ghz` first.
fn measure_primitives(runs: u32) -> anyhow::Result<Vec<Measured>> {
    let options = MeasureOptions { runs, ..MeasureOptions::default() };
    let steps = 1 + DEVICE.len() + 1;
    let progress = ProgressBar::new(steps as u64);
    progress.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {elapsed}").expect("valid template"));
    progress.set_message("measuring on KVM");
    let step = |probe: &'static CatalogProbe| -> anyhow::Result<ProbeRuns> {
        progress.set_message(format!("measuring {} on KVM", probe.workload));
        let runs = measure_probe(probe, &options)?;
        progress.inc(1);
        Ok(runs)
    };

    let callret = step(&INTERPRET)?;
    let emulated = callret.extra_stat("insn_emulation")?;
    let interpret = Estimate {
        values: callret.extra_cycles().iter().map(|c| c / emulated).collect(),
        how: format!("{}: extra TSC cycles / {emulated} extra insn_emulation", callret.label()),
    };
    let interpret_cycles = interpret.median();
    let device: Vec<Estimate> = DEVICE
        .iter()
        .map(|probe| step(probe)?.per_user_exit_beyond_interpretation(interpret_cycles))
        .collect::<anyhow::Result<_>>()?;
    progress.set_message("measuring the compute loop on KVM");
    let cpi = native_cpi(runs)?;
    progress.inc(1);
    progress.finish_and_clear();

    let tsc_khz = callret.low.tsc_khz.context("KVM does not report the TSC rate (KVM_GET_TSC_KHZ): no stable TSC")?;
    let clock_ghz = f64::from(tsc_khz) / 1e6;
    Ok(vec![
        Measured {
            key: "clock_ghz",
            value: clock_ghz,
            provenance: vec![format!(
                "[measured] the TSC rate KVM reports for the vCPU (KVM_GET_TSC_KHZ): {tsc_khz} kHz"
            )],
        },
        clamp(single("native.cycles_per_instruction", &cpi, "CPL 3 code runs natively under PVM")),
        clamp(single(
            "monitor.interpret",
            &interpret,
            "KVM's instruction emulator runs every CPL 0 instruction on PVM",
        )),
        clamp(combined(
            "monitor.device",
            &device,
            "a device exit to this process and back (port read, port write, MMIO)",
        )),
    ])
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let backend = match virtlab_kvm::probe() {
        Probe::Available(backend) => backend,
        Probe::Unavailable(reason) => bail!("calibrate host needs KVM: {reason}"),
    };
    if backend != Backend::Pvm {
        bail!(
            "calibrate host derives primitives for the PVM backend (this lab's hosts); this host's backend is {}, for \
             which no derivation exists yet",
            backend.name()
        );
    }
    let base = Profile::load(&args.base).with_context(|| format!("--base {}: not a built-in profile", args.base))?;
    let measured = measure_primitives(args.runs)?;
    let command = format!("virtlab calibrate host --runs {} --base {}", args.runs, args.base);
    let header = vec![
        format!("The host at hand, measured by `{command}` (virtlab {}).", env!("CARGO_PKG_VERSION")),
        format!("KVM backend {}: CPL 0 runs in KVM's instruction emulator, CPL 3 natively.", backend.name()),
        "Cycles are time-stamp-counter cycles; clock_ghz is the TSC rate.".to_string(),
        format!(
            "Each measured value: a probe at two iteration counts, {} runs each in fresh VMs; run i at the high count",
            args.runs
        ),
        "minus run i at the low count is one estimate; the value is the median, the spread is min..max.".to_string(),
    ];
    let mut profile = host_profile(&base, &args.base, &measured)?;
    profile.name = "host".to_string();
    profile.description = format!("this host, measured on KVM ({}) with {} runs per probe", backend.name(), args.runs);
    let text = profile.to_toml(&header);
    let origin = args.output.display().to_string();
    Profile::parse(&text, &origin, &[]).context("the calibrated profile does not load (a bug: please report it)")?;
    virtlab_traces::atomic::write_atomic(&args.output, text.as_bytes())
        .with_context(|| format!("cannot write {origin}"))?;
    let mut summary = format!("{origin}: profile `host` on KVM ({}), {} runs per probe\n", backend.name(), args.runs);
    for m in &measured {
        let _ = writeln!(summary, "  {:<32} {:>10}   {}", m.key, toml_number(m.value), m.provenance[0]);
    }
    super::finish_output(super::print_line(summary.trim_end()))?;
    Ok(ExitCode::SUCCESS)
}
