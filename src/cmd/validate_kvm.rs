//! `virtlab validate kvm`: the models against the real hypervisor at hand.
//!
//! On a PVM host KVM is a real hybrid VMM: every guest instruction at CPL 0 goes through its instruction emulator
//! and is counted in `insn_emulation`, so the `hybrid` model is checked against it directly — the emulated
//! instructions within 1 % of the trace's kernel-mode instructions, MMIO and HLT exits exactly. On a VMX or SVM
//! host, `hw-ept`'s exits are checked against KVM's counters of the same reasons, exactly.

use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use virtlab_engines::{engine, ExitReason, Metrics, Options, Profile};
use virtlab_kvm::{Backend, MeasureOptions, Measurement, Probe, Spread};
use virtlab_traces::TraceView;
use virtlab_workloads::Privilege;

use super::validate::EXIT_MISSED;

/// Each workload runs this many times; every run must meet the target.
const RUNS: u32 = 2;
/// How far the emulated-instruction count may be from the trace's kernel-mode instructions.
const EMULATION_TOLERANCE: f64 = 0.01;

/// One quantity, from the model (or the trace) and from KVM.
struct Check {
    quantity: &'static str,
    expected: u64,
    /// `None`: this kernel has no such statistic.
    measured: Option<Spread>,
    /// Relative tolerance; 0 means exact.
    tolerance: f64,
}

impl Check {
    fn deviation(&self, value: u64) -> f64 {
        if self.expected == 0 {
            if value == 0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (value as f64 - self.expected as f64).abs() / self.expected as f64
        }
    }

    /// Every run within the tolerance.
    fn passes(&self) -> bool {
        self.measured.is_some_and(|s| [s.min, s.max].iter().all(|v| self.deviation(*v) <= self.tolerance))
    }
}

/// What came of one workload.
enum Outcome {
    Checked(Vec<Check>),
    /// The backend cannot run it: not a failure, the reason is shown.
    Skipped(String),
    /// KVM could not run it although it should have, or did not reproduce the trace.
    Failed(String),
}

struct Case {
    workload: &'static str,
    params: Vec<(String, String)>,
    outcome: Outcome,
}

impl Case {
    fn passes(&self) -> bool {
        match &self.outcome {
            Outcome::Checked(checks) => checks.iter().all(Check::passes),
            Outcome::Skipped(_) => true,
            Outcome::Failed(_) => false,
        }
    }

    fn label(&self) -> String {
        let params: Vec<String> = self.params.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        format!("{}{}", self.workload, params.concat())
    }
}

/// The catalog cases: every workload at its defaults, and `sensitive-kernel` also without the segment probes
/// (which KVM's emulator lacks), so that its other probes are still compared on PVM.
fn cases(backend: Backend) -> Vec<(&'static str, Vec<(String, String)>)> {
    let mut cases = Vec::new();
    for spec in virtlab_workloads::catalog() {
        if backend == Backend::Pvm && spec.privilege == Privilege::User {
            continue;
        }
        cases.push((spec.name, Vec::new()));
        if spec.param("segment-probes").is_some() {
            cases.push((spec.name, vec![("segment-probes".to_string(), "0".to_string())]));
        }
    }
    cases
}

fn stat_check(m: &Measurement, quantity: &'static str, stat: &str, expected: u64, tolerance: f64) -> Check {
    let measured = m.stats.iter().find(|s| s.descriptor.name == stat).map(|s| s.spread);
    Check { quantity, expected, measured, tolerance }
}

fn checks(backend: Backend, view: &TraceView, model: &Metrics, m: &Measurement) -> Vec<Check> {
    if backend == Backend::Pvm {
        let kernel = view.footer().totals.instructions_kernel;
        vec![
            stat_check(m, "emulated instructions (insn_emulation)", "insn_emulation", kernel, EMULATION_TOLERANCE),
            stat_check(m, "MMIO exits (mmio_exits)", "mmio_exits", model.exits_by(ExitReason::Mmio), 0.0),
            stat_check(m, "HLT exits (halt_exits)", "halt_exits", model.exits_by(ExitReason::Hlt), 0.0),
        ]
    } else {
        vec![
            stat_check(m, "I/O exits (io_exits)", "io_exits", model.exits_by(ExitReason::IoInstruction), 0.0),
            stat_check(m, "MMIO exits (mmio_exits)", "mmio_exits", model.exits_by(ExitReason::EptMisconfig), 0.0),
            stat_check(m, "HLT exits (halt_exits)", "halt_exits", model.exits_by(ExitReason::Hlt), 0.0),
        ]
    }
}

/// The model KVM is compared with on this backend.
fn model_name(backend: Backend) -> &'static str {
    if backend == Backend::Pvm {
        "hybrid"
    } else {
        "hw-ept"
    }
}

fn run_case(backend: Backend, workload: &'static str, params: Vec<(String, String)>) -> anyhow::Result<Case> {
    let bytes = super::record::record_catalog_trace(workload, &params)?;
    let name = format!("{workload} {params:?}");
    let trace = super::replay::prepare(&bytes, &name)?;
    let outcome = if let Some(reason) = virtlab_kvm::refusal(&trace.view, backend) {
        Outcome::Skipped(reason)
    } else {
        match virtlab_kvm::measure(&trace.view, &MeasureOptions { runs: RUNS, ..MeasureOptions::default() }, |_| {}) {
            Err(error) => Outcome::Failed(error.to_string()),
            Ok(measurement) => {
                let model_engine = engine::by_name(model_name(backend)).expect("the model exists");
                let profile = Profile::load("p4-2006")?;
                let model = model_engine
                    .replay(&trace, &profile, &Options::default())
                    .with_context(|| format!("{} on {name}", model_name(backend)))?;
                Outcome::Checked(checks(backend, &trace.view, &model, &measurement))
            }
        }
    };
    Ok(Case { workload, params, outcome })
}

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let backend = match virtlab_kvm::probe() {
        Probe::Available(backend) => backend,
        Probe::Unavailable(reason) => {
            let text = if json {
                serde_json::to_string_pretty(&json!({ "study": "kvm", "skipped": reason }))?
            } else {
                format!("validate kvm: skipped: {reason}")
            };
            super::finish_output(super::print_line(&text))?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let plan = cases(backend);
    let progress = ProgressBar::new(plan.len() as u64);
    progress.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {elapsed}").expect("valid template"));
    progress.set_message("recording, running on KVM, replaying");
    let mut results = Vec::new();
    // One at a time: the KVM runs are timed, and the host has few cores.
    for (workload, params) in plan {
        results.push(run_case(backend, workload, params)?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let pass = results.iter().all(Case::passes);
    let text =
        if json { serde_json::to_string_pretty(&to_json(backend, &results, pass))? } else { render(backend, &results) };
    super::finish_output(super::print_line(&text))?;
    Ok(if pass { ExitCode::SUCCESS } else { ExitCode::from(EXIT_MISSED) })
}

fn to_json(backend: Backend, cases: &[Case], pass: bool) -> Value {
    let case_json = |case: &Case| {
        let mut object = json!({
            "workload": case.workload,
            "params": case.params.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "pass": case.passes(),
        });
        match &case.outcome {
            Outcome::Skipped(reason) => object["skipped"] = json!(reason),
            Outcome::Failed(reason) => object["failed"] = json!(reason),
            Outcome::Checked(checks) => {
                object["checks"] = checks
                    .iter()
                    .map(|c| {
                        json!({
                            "quantity": c.quantity,
                            "expected": c.expected,
                            "kvm": c.measured.map(|s| json!({ "min": s.min, "median": s.median, "max": s.max })),
                            "tolerance": c.tolerance,
                            "pass": c.passes(),
                        })
                    })
                    .collect()
            }
        }
        object
    };
    json!({
        "study": "kvm",
        "backend": backend.name(),
        "model": model_name(backend),
        "runs": RUNS,
        "cases": cases.iter().map(case_json).collect::<Vec<_>>(),
        "all_pass": pass,
    })
}

fn render(backend: Backend, cases: &[Case]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "KVM ({}) against the {} model: catalog workloads at their default parameters, {RUNS} runs each; every run \
         must meet the target",
        backend.name(),
        model_name(backend)
    );
    let _ = writeln!(
        out,
        "{:<34} {:<40} {:>12} {:>21} {:>7}",
        "workload", "quantity", "model/trace", "kvm min..max", "target"
    );
    for case in cases {
        match &case.outcome {
            Outcome::Skipped(reason) => {
                let _ = writeln!(out, "{:<34} skipped: {reason}", case.label());
            }
            Outcome::Failed(reason) => {
                let _ = writeln!(out, "{:<34} FAILED: {reason}", case.label());
            }
            Outcome::Checked(checks) => {
                for (index, check) in checks.iter().enumerate() {
                    let label = if index == 0 { case.label() } else { String::new() };
                    let measured =
                        check.measured.map_or("no such statistic".into(), |s| format!("{}..{}", s.min, s.max));
                    let target = if check.tolerance == 0.0 {
                        "exact".to_string()
                    } else {
                        format!("±{}%", check.tolerance * 100.0)
                    };
                    let verdict = if check.passes() { "" } else { "  MISSED" };
                    let _ = writeln!(
                        out,
                        "{label:<34} {:<40} {:>12} {measured:>21} {target:>7}{verdict}",
                        check.quantity, check.expected
                    );
                }
            }
        }
    }
    let missed = cases.iter().filter(|c| !c.passes()).count();
    let skipped = cases.iter().filter(|c| matches!(c.outcome, Outcome::Skipped(_))).count();
    let _ = write!(
        out,
        "{missed} of {} workloads missed a target; {skipped} skipped (the backend cannot run them)",
        cases.len()
    );
    out
}
