//! `virtlab validate`: reproduce a published result with the lab and compare cell by cell.

use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;
use virtlab_engines::{engine, Metrics, Options, Primitive, Profile, Provenance};

/// Exit status when a cell misses the tolerance or an ordering differs from the paper's.
pub const EXIT_MISSED: u8 = 5;

/// Adams & Agesen, ASPLOS 2006, raw-data appendix: cycles per iteration on a Pentium 4 672 (shared refs §3), for
/// native, the binary-translating VMM and the first-generation VT-x VMM.
const ADAMS_AGESEN: [(&str, [f64; 3]); 7] = [
    ("syscall", [242.0, 2308.0, 246.0]),
    ("in", [3209.0, 216.0, 15826.0]),
    ("cr8wr", [150.0, 35.0, 177.0]),
    ("callret", [11.0, 51.0, 11.0]),
    ("pgfault", [1093.0, 3927.0, 11242.0]),
    ("divzero", [889.0, 3223.0, 1014.0]),
    ("ptemod", [1.0, 391.0, 12733.0]),
];

/// The lab's engines for the paper's three columns.
const COLUMNS: [(&str, &str); 3] = [("native", "Native"), ("bt", "BT"), ("hw-shadow", "VT")];

/// Relative deviation a cell may have.
const TOLERANCE: f64 = 0.25;

/// Reproduce a published table and compare each cell with the paper.
///
/// `adams-agesen`: Adams & Agesen, "A Comparison of Software and Hardware Techniques for x86 Virtualization"
/// (ASPLOS 2006), nanobenchmark table. The seven nanobenchmark workloads (syscall, in, cr8wr, callret,
/// pgfault, divzero, ptemod) are recorded at two iteration counts on the reference machine, replayed with
/// profile p4-2006 on native, bt and hw-shadow (first-generation VT-x had no nested paging), and each cell is the
/// cycle difference divided by the iteration difference, so that start-up and shutdown cancel out. The goal:
/// every cell within 25% of the paper, and in every row the three columns in the paper's order.
///
/// The guests are 32-bit by default (`--arch x86-32`), as the paper's were on a Pentium 4, which had no long-mode
/// segment limits: bt runs them as VMware did, its monitor in the top 4 MiB behind truncated segments. cr8wr
/// has no 32-bit form (CR8 exists only in 64-bit mode), so its row replays the 64-bit build with bt.lmsle=true,
/// and says so; the 32-bit syscall enters the kernel with SYSENTER, as a 2006 Linux guest did through its vDSO. `--arch x86-64` replays every row's 64-bit build with bt.lmsle=true: a processor no 2006 BT ran
/// on, kept to show what the guest's width changes.
///
/// `kvm`: the models against this host's KVM (see `virtlab replay --engine kvm`). On a PVM host,
/// `hybrid` against KVM: emulated instructions within 1% of the trace's kernel-mode instructions,
/// MMIO and HLT exits exact; on VMX or SVM, `hw-ept`'s I/O, MMIO and HLT exits exact. Every
/// catalog workload the backend runs, at its defaults; skipped, with the reason, without a usable
/// /dev/kvm. `--iterations` applies to `adams-agesen` only.
///
/// Exit status: 0 when every cell and ordering meets the goal; 5 when one misses (the table says which).
#[derive(clap::Args)]
pub struct Args {
    /// The published result to reproduce.
    #[arg(value_parser = ["adams-agesen", "kvm"])]
    study: String,
    /// Print a JSON object (keys: study, profile, iterations, cells [benchmark, engine, column, lab, paper,
    /// deviation, within_tolerance, carriers [primitive, cycles, share, provenance], by_primitive, basis, counts_as_validated],
    /// orderings [benchmark, paper, lab, same], all_within_tolerance, all_orderings_match, validated_cells).
    #[arg(long)]
    json: bool,
    /// The two iteration counts to record each benchmark at.
    #[arg(long, num_args = 2, value_names = ["LOW", "HIGH"], default_values_t = [1000u64, 2000])]
    iterations: Vec<u64>,
    /// The guests' width: x86-32 as in the paper, or x86-64 (bt then needs long-mode segment limits).
    #[arg(long, value_parser = ["x86-32", "x86-64"], default_value = "x86-32")]
    arch: String,
}

/// Benchmarks without a 32-bit form, and why: their row always replays the 64-bit build.
const LONG_MODE_ONLY: [(&str, &str); 1] = [("cr8wr", "CR8 exists only in 64-bit mode")];

/// How the 32-bit builds enter the kernel, and why: a 2006 Linux guest on a Pentium 4 made its system calls with
/// SYSENTER through the vDSO (Linux 2.5.53 on; INT 0x80 remained for old binaries), so the x86-32 `syscall`
/// row uses SYSENTER/SYSEXIT.
const X86_32_PARAMS: [(&str, &str, &str); 1] = [("syscall", "sysenter", "1")];

/// The width a benchmark's row is recorded at under `--arch`.
fn arch_of(benchmark: &str, arch: &str) -> &'static str {
    if arch == "x86-32" && LONG_MODE_ONLY.iter().all(|(name, _)| *name != benchmark) {
        "x86-32"
    } else {
        "x86-64"
    }
}

struct Cell {
    benchmark: &'static str,
    column: usize,
    lab: f64,
    paper: f64,
    /// Cycles per iteration by profile primitive, dearest first (primitives that cost nothing per iteration left
    /// out), with each primitive's provenance in the profile.
    carried_by: Vec<(Primitive, f64, Provenance)>,
}

/// What most of a cell's cycles rest on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// Primitives set from the paper's own native column carry more than half: agreement is by construction.
    Calibrated,
    /// Estimates carry more than half: the cell tests the estimates as much as the mechanism.
    Estimate,
    /// Published, derived or measured figures carry more than half.
    Sourced,
    /// No kind carries a majority.
    Mixed,
}

impl Basis {
    fn name(self) -> &'static str {
        match self {
            Basis::Calibrated => "calibrated",
            Basis::Estimate => "estimate",
            Basis::Sourced => "sourced",
            Basis::Mixed => "mixed",
        }
    }
}

impl Cell {
    fn deviation(&self) -> f64 {
        (self.lab - self.paper) / self.paper
    }

    fn within_tolerance(&self) -> bool {
        self.deviation().abs() <= TOLERANCE
    }

    fn share(&self, cycles: f64) -> f64 {
        if self.lab > 0.0 {
            cycles / self.lab
        } else {
            0.0
        }
    }

    /// The dearest primitives that together carry more than half of the cell's cycles.
    fn carriers(&self) -> &[(Primitive, f64, Provenance)] {
        let mut sum = 0.0;
        let count = self
            .carried_by
            .iter()
            .position(|(_, cycles, _)| {
                sum += cycles;
                sum > self.lab / 2.0
            })
            .map_or(self.carried_by.len(), |i| i + 1);
        &self.carried_by[..count]
    }

    fn basis(&self) -> Basis {
        let share = |kinds: &[Provenance]| {
            self.share(self.carried_by.iter().filter(|(_, _, p)| kinds.contains(p)).map(|(_, c, _)| c).sum())
        };
        if share(&[Provenance::Calibrated]) > 0.5 {
            Basis::Calibrated
        } else if share(&[Provenance::Estimate]) > 0.5 {
            Basis::Estimate
        } else if share(&[Provenance::Published, Provenance::Derived, Provenance::Measured]) > 0.5 {
            Basis::Sourced
        } else {
            Basis::Mixed
        }
    }

    /// A cell is evidence for the lab when it is within tolerance and not carried by calibrated primitives.
    fn counts_as_validated(&self) -> bool {
        self.within_tolerance() && self.basis() != Basis::Calibrated
    }
}

fn record_at(benchmark: &str, arch: &str, iterations: u64) -> anyhow::Result<Vec<u8>> {
    let mut params = vec![("arch".into(), arch.to_string()), ("iterations".into(), iterations.to_string())];
    let narrow = X86_32_PARAMS.iter().filter(|(name, _, _)| arch == "x86-32" && *name == benchmark);
    params.extend(narrow.map(|(_, key, value)| (key.to_string(), value.to_string())));
    super::record::record_catalog_trace(benchmark, &params)
}

/// Each column's engine's metrics on one trace.
fn column_metrics(bytes: &[u8], name: &str, profile: &Profile, options: &Options) -> anyhow::Result<[Metrics; 3]> {
    let trace = super::replay::prepare(bytes, name)?;
    let replay = |engine_name: &str| {
        let engine = engine::by_name(engine_name).expect("the validation's engines exist");
        engine.replay(&trace, profile, options).with_context(|| format!("{engine_name} on {name}"))
    };
    Ok([replay(COLUMNS[0].0)?, replay(COLUMNS[1].0)?, replay(COLUMNS[2].0)?])
}

/// One cell's cycles per iteration, whole and by primitive, from the runs at the two iteration counts.
fn per_iteration(
    low: &Metrics,
    high: &Metrics,
    iterations: u64,
    profile: &Profile,
) -> (f64, Vec<(Primitive, f64, Provenance)>) {
    let per = |a: u64, b: u64| (b as f64 - a as f64) / iterations as f64;
    let mut carried_by: Vec<(Primitive, f64, Provenance)> = Primitive::ALL
        .iter()
        .map(|&p| {
            let millicycles = per(low.by_primitive[p as usize], high.by_primitive[p as usize]);
            (p, millicycles / 1000.0, profile.entry(p).provenance)
        })
        .filter(|(_, cycles, _)| *cycles >= 0.05)
        .collect();
    carried_by.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    (per(low.cycles(), high.cycles()), carried_by)
}

/// Indices of the three columns from cheapest to dearest.
fn ordering(values: [f64; 3]) -> [usize; 3] {
    let mut order = [0, 1, 2];
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order
}

fn names(order: [usize; 3]) -> String {
    order.iter().map(|&i| COLUMNS[i].1).collect::<Vec<_>>().join(" < ")
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.study == "kvm" {
        return super::validate_kvm::run(args.json);
    }
    let (low, high) = (args.iterations[0], args.iterations[1]);
    anyhow::ensure!(low < high, "--iterations: LOW must be smaller than HIGH");
    let profile = Profile::load("p4-2006")?;
    let mut options = Options::default();
    options.set("bt.lmsle", "true")?;
    let progress = ProgressBar::new(ADAMS_AGESEN.len() as u64);
    progress.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {elapsed}").expect("valid template"));
    progress.set_message("recording and replaying");
    type Row = [(f64, Vec<(Primitive, f64, Provenance)>); 3];
    let rows: Vec<anyhow::Result<Row>> = ADAMS_AGESEN
        .par_iter()
        .map(|(benchmark, _)| {
            let arch = arch_of(benchmark, &args.arch);
            let run = |n: u64| {
                column_metrics(&record_at(benchmark, arch, n)?, &format!("{benchmark} {arch}@{n}"), &profile, &options)
            };
            let (a, b) = (run(low)?, run(high)?);
            progress.inc(1);
            Ok(std::array::from_fn(|slot| per_iteration(&a[slot], &b[slot], high - low, &profile)))
        })
        .collect();
    progress.finish_and_clear();
    let mut cells = Vec::new();
    let mut orderings = Vec::new();
    for ((benchmark, paper), row) in ADAMS_AGESEN.iter().zip(rows) {
        let row = row?;
        let lab: [f64; 3] = std::array::from_fn(|column| row[column].0);
        for (column, (cycles, carried_by)) in row.into_iter().enumerate() {
            cells.push(Cell { benchmark, column, lab: cycles, paper: paper[column], carried_by });
        }
        orderings.push((*benchmark, ordering(*paper), ordering(lab)));
    }
    let within = cells.iter().all(Cell::within_tolerance);
    let ordered = orderings.iter().all(|(_, paper, lab)| paper == lab);
    let text = if args.json {
        serde_json::to_string_pretty(&json!({
            "study": "adams-agesen",
            "profile": profile.name,
            "iterations": [low, high],
            "arch": args.arch,
            "long_mode_only": LONG_MODE_ONLY.iter()
                .map(|(benchmark, why)| json!({"benchmark": benchmark, "why": why}))
                .collect::<Vec<_>>(),
            "cells": cells.iter().map(|c| json!({
                "benchmark": c.benchmark,
                "arch": arch_of(c.benchmark, &args.arch),
                "engine": COLUMNS[c.column].0,
                "column": COLUMNS[c.column].1,
                "lab": (c.lab * 10.0).round() / 10.0,
                "paper": c.paper,
                "deviation": (c.deviation() * 1000.0).round() / 1000.0,
                "within_tolerance": c.within_tolerance(),
                "carriers": c.carriers().iter().map(|(p, cycles, provenance)| json!({
                    "primitive": p.key(),
                    "cycles": (cycles * 10.0).round() / 10.0,
                    "share": (c.share(*cycles) * 1000.0).round() / 1000.0,
                    "provenance": provenance.name(),
                })).collect::<Vec<_>>(),
                "by_primitive": c.carried_by.iter()
                    .map(|(p, cycles, _)| (p.key().to_string(), json!((cycles * 10.0).round() / 10.0)))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
                "basis": c.basis().name(),
                "counts_as_validated": c.counts_as_validated(),
            })).collect::<Vec<_>>(),
            "orderings": orderings.iter().map(|(b, paper, lab)| json!({
                "benchmark": b, "paper": names(*paper), "lab": names(*lab), "same": paper == lab,
            })).collect::<Vec<_>>(),
            "all_within_tolerance": within,
            "all_orderings_match": ordered,
            "validated_cells": cells.iter().filter(|c| c.counts_as_validated()).count(),
        }))?
    } else {
        render(&cells, &orderings, low, high, &args.arch)
    };
    super::finish_output(super::print_line(&text))?;
    Ok(if within && ordered { ExitCode::SUCCESS } else { ExitCode::from(EXIT_MISSED) })
}

fn render(cells: &[Cell], orderings: &[(&str, [usize; 3], [usize; 3])], low: u64, high: u64, arch: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Adams & Agesen 2006, cycles per iteration on a Pentium 4 672 (profile p4-2006; iterations {low} and {high}; \
         {arch} guests)"
    );
    for (benchmark, why) in LONG_MODE_ONLY.iter().filter(|_| arch == "x86-32") {
        let _ = writeln!(out, "{benchmark}: the x86-64 build, with bt.lmsle=true ({why})");
    }
    for (benchmark, key, value) in X86_32_PARAMS.iter().filter(|_| arch == "x86-32") {
        let _ = writeln!(out, "{benchmark}: {key}={value}");
    }
    let bt = if arch == "x86-32" { "BT (bt)" } else { "BT (bt, lmsle)" };
    let _ = writeln!(out, "{:<9} {:>24} {:>24} {:>24}  ordering", "", "Native", bt, "VT (hw-shadow)");
    let _ = writeln!(out, "{:<9} {:>24} {:>24} {:>24}", "", "lab/paper/dev", "lab/paper/dev", "lab/paper/dev");
    for (row, (benchmark, paper, lab)) in cells.chunks(3).zip(orderings) {
        let _ = write!(out, "{benchmark:<9}");
        for cell in row {
            let mark = if cell.within_tolerance() { ' ' } else { '!' };
            let entry = format!("{:.0}/{:.0}/{:+.0}%{mark}", cell.lab, cell.paper, cell.deviation() * 100.0);
            let _ = write!(out, " {entry:>24}");
        }
        let verdict = if paper == lab { "same".to_string() } else { format!("differs: lab {}", names(*lab)) };
        let _ = writeln!(out, "  {verdict}");
    }
    let _ = writeln!(out, "\nWhat carries each cell: the dearest primitives that make up more than half its cycles");
    for cell in cells {
        let carriers: Vec<String> = cell
            .carriers()
            .iter()
            .map(|(p, cycles, provenance)| {
                format!("{} {cycles:.0} ({:.0}%, {})", p.key(), cell.share(*cycles) * 100.0, provenance.name())
            })
            .collect();
        let note = match cell.basis() {
            Basis::Calibrated => "  [calibrated: not evidence]",
            Basis::Estimate => "  [rests on estimates]",
            Basis::Sourced | Basis::Mixed => "",
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<6} {:>6.0}  {}{note}",
            cell.benchmark,
            COLUMNS[cell.column].1,
            cell.lab,
            carriers.join(", ")
        );
    }
    let within = cells.iter().filter(|c| c.within_tolerance()).count();
    let calibrated = cells.iter().filter(|c| c.within_tolerance() && c.basis() == Basis::Calibrated).count();
    let estimated = cells.iter().filter(|c| c.counts_as_validated() && c.basis() == Basis::Estimate).count();
    let _ = write!(
        out,
        "\n{} of {} cells outside ±25% (marked !). Of the {within} within it, {calibrated} are carried by calibrated \
         primitives and are not evidence; {} count as validated, {estimated} of them resting on estimates.",
        cells.len() - within,
        cells.len(),
        within - calibrated,
    );
    out
}
