//! The `kvm` engine beside the models: its options (`--set kvm.runs=5`), its measurement in the models' metrics
//! schema, and the lines the replay table adds for it.
//!
//! The schema's fields are filled where KVM observes the same thing a model counts, and `null` where it
//! observes nothing of the kind (cycles by cause, translations, hypercalls, shadow paging, holes): a measured
//! zero and "not measured" must not look alike. What KVM measures beyond the schema goes under `measured`.

use std::time::Duration;

use serde_json::{json, Map, Value};
use virtlab_engines::{ExitReason, Metrics, Profile};
use virtlab_kvm::{Backend, MeasureOptions, Measurement, Spread, StatMeasurement, StatScope, UserExit};
use virtlab_traces::TraceView;

use super::replay::UsageError;

pub const ENGINE: &str = "kvm";

/// `--set` keys of the kvm engine, with their help.
pub const OPTIONS: [(&str, &str); 2] =
    [("kvm.runs", "runs of the guest, each in a fresh VM"), ("kvm.timeout", "seconds one run may take")];

pub fn has_key(key: &str) -> bool {
    OPTIONS.iter().any(|(name, _)| *name == key)
}

pub fn set_option(options: &mut MeasureOptions, key: &str, value: &str) -> Result<(), UsageError> {
    let bad = |expected: &str| UsageError(format!("--set {key}={value}: expected {expected}"));
    match key {
        "kvm.runs" => {
            options.runs = value.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| bad("1 to 1000"))?
        }
        "kvm.timeout" => {
            let seconds: f64 = value.parse().map_err(|_| bad("a number of seconds"))?;
            if !(seconds > 0.0 && seconds <= 86_400.0) {
                return Err(bad("more than 0 and at most 86400 seconds"));
            }
            options.timeout = Duration::from_secs_f64(seconds);
        }
        _ => return Err(UsageError(format!("--set {key}: the kvm engine has no such option"))),
    }
    Ok(())
}

/// The schema's name for an MMIO exit: nested paging reports it as an EPT misconfiguration (KVM marks MMIO
/// entries so on purpose), the PVM backend's shadow paging as an MMIO access.
fn mmio_reason(backend: Backend) -> ExitReason {
    match backend {
        Backend::Vmx | Backend::Svm => ExitReason::EptMisconfig,
        Backend::Pvm | Backend::Unknown => ExitReason::Mmio,
    }
}

fn exit_reason(kind: UserExit, backend: Backend) -> ExitReason {
    if kind.is_port_io() {
        ExitReason::IoInstruction
    } else {
        mmio_reason(backend)
    }
}

/// The measurement in the models' schema.
///
/// - Exits that reached this process are counted at their guest addresses (so `top_sites` works as for the
///   models).
/// - MMIO and HLT exits are KVM's own counters (`mmio_exits`, `halt_exits`: a HLT never leaves the kernel).
/// - Port I/O: on VMX and SVM `io_exits` counts every I/O exit, in-kernel devices included; the PVM backend runs
///   port I/O inside its instruction emulator and leaves `io_exits` at 0, so there the count is the exits that
///   reached user space.
/// - Emulated instructions are `insn_emulation`.
pub fn metrics(view: &TraceView, m: &Measurement) -> Metrics {
    let totals = &view.footer().totals;
    let mut metrics = Metrics::default();
    metrics.instructions_user = totals.instructions_user;
    metrics.instructions_kernel = totals.instructions_kernel;
    metrics.emulated_instructions = m.stat("insn_emulation").unwrap_or(0);
    for site in &m.sites {
        metrics.exits_at(exit_reason(site.kind, m.backend), site.rip, site.count);
    }
    let mut set_from_stat = |reason: ExitReason, stat: &str| {
        if let Some(count) = m.stat(stat) {
            metrics.exits[reason as usize] = count;
        }
    };
    set_from_stat(mmio_reason(m.backend), "mmio_exits");
    set_from_stat(ExitReason::Hlt, "halt_exits");
    if m.backend != Backend::Pvm {
        set_from_stat(ExitReason::IoInstruction, "io_exits");
    }
    metrics
}

fn spread_json(spread: &Spread, scale: impl Fn(u64) -> Value) -> Value {
    json!({ "min": scale(spread.min), "median": scale(spread.median), "max": scale(spread.max) })
}

fn stat_json(stat: &StatMeasurement) -> Value {
    let d = &stat.descriptor;
    // Counts stay integers; a statistic with an exponent (nanoseconds…) is given in its unit.
    let value = |raw: u64| if d.exponent == 0 { json!(raw) } else { json!(d.scale(raw as f64)) };
    let mut object = spread_json(&stat.spread, value);
    object["kind"] = json!(d.kind.name());
    object["unit"] = json!(d.unit.name());
    object
}

fn stats_json(m: &Measurement, scope: StatScope) -> Value {
    let stats: Map<String, Value> =
        m.stats.iter().filter(|s| s.scope == scope).map(|s| (s.descriptor.name.clone(), stat_json(s))).collect();
    Value::Object(stats)
}

/// The `measured` section: what KVM measured beyond the schema.
fn measured_json(m: &Measurement) -> Value {
    let by_kind: Map<String, Value> =
        UserExit::ALL.iter().map(|k| (k.name().to_string(), json!(m.user_exits_of(*k)))).collect();
    json!({
        "runs": m.runs.len(),
        "tsc_khz": m.tsc_khz,
        "wall_seconds": spread_json(&m.wall_ns(), |ns| json!(ns as f64 * 1e-9)),
        "tsc_cycles": spread_json(&m.tsc_cycles(), |n| json!(n)),
        "vmm_tsc_cycles": spread_json(&m.vmm_tsc_cycles(), |n| json!(n)),
        "user_space_exits": spread_json(&m.user_space_exits(), |n| json!(n)),
        "user_space_exits_by_kind": by_kind,
        "vm_stats": stats_json(m, StatScope::Vm),
        "vcpu_stats": stats_json(m, StatScope::Vcpu),
    })
}

/// The JSON object of the kvm engine's result: the models' keys, then `backend` and `measured`.
pub fn result_json(view: &TraceView, profile: &Profile, m: &Measurement, top: usize) -> Value {
    let mut object = super::replay::metrics_json(ENGINE, profile, view.metadata(), &metrics(view, m), top);
    object["profile"] = Value::Null;
    object["cycles"] = json!(m.tsc_cycles().median);
    for key in [
        "cycles_by_cause",
        "translations",
        "hypercalls",
        "page_table_updates_batched",
        "page_table_update_batches",
        "shadow",
        "holes",
        "detectable",
    ] {
        object[key] = Value::Null;
    }
    if m.stat("insn_emulation").is_none() {
        object["emulated_instructions"] = Value::Null;
    }
    object["backend"] = json!(m.backend.name());
    object["measured"] = measured_json(m);
    object
}

/// The replay table's extra lines for a measured result (nothing for a model's).
pub fn render_measured(object: &Value) -> String {
    let measured = &object["measured"];
    if measured.is_null() {
        return String::new();
    }
    let vcpu = &measured["vcpu_stats"];
    let median = |stats: &Value, name: &str| stats[name]["median"].as_u64().map(|n| format!("{name} {n}"));
    let counters: Vec<String> =
        ["exits", "insn_emulation", "mmio_exits", "halt_exits", "io_exits", "pf_fixed", "pf_guest", "tlb_flush"]
            .iter()
            .filter_map(|name| median(vcpu, name))
            .collect();
    let wall = &measured["wall_seconds"];
    let ms = |v: &Value| v.as_f64().map_or("-".into(), |s| format!("{:.2}", s * 1e3));
    format!(
        "  measured    backend {}, {} runs: wall ms {} (min {}, max {}), TSC cycles median {}\n  kvm stats   \
         {} (medians per run)\n",
        object["backend"].as_str().unwrap_or("?"),
        measured["runs"],
        ms(&wall["median"]),
        ms(&wall["min"]),
        ms(&wall["max"]),
        measured["tsc_cycles"]["median"],
        counters.join(", ")
    )
}

/// The kvm engine's entry in `virtlab replay`: its result, or `unsupported` with the reason when KVM is not
/// usable here, cannot run this guest, or a run did not end as the trace does (never reported as measured).
pub fn replay_entry(view: &TraceView, profile: &Profile, options: &MeasureOptions, top: usize) -> Value {
    let progress = indicatif::ProgressBar::new(u64::from(options.runs));
    let style =
        indicatif::ProgressStyle::with_template("kvm: run {pos}/{len} {bar:30} {elapsed}").expect("valid template");
    progress.set_style(style);
    let result = virtlab_kvm::measure(view, options, |run| progress.set_position(u64::from(run)));
    progress.finish_and_clear();
    match result {
        Ok(measurement) => result_json(view, profile, &measurement, top),
        Err(error) => json!({ "engine": ENGINE, "unsupported": error.to_string() }),
    }
}
