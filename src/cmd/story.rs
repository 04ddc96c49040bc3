//! `virtlab story`: why 64-bit long mode changed x86 virtualization, read off the lab's own results.

use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use virtlab_engines::{engine, EngineError, GuestWidth, Metrics, Options, PreparedTrace, Profile};

/// Show, for every engine and both guest widths, whether the strategy runs the guest, where it puts the guest
/// kernel and what guards its monitor, and what one iteration of the same workload costs.
///
/// The workload is built twice from the catalog, with `arch=x86-64` and `arch=x86-32`, and recorded at two
/// iteration counts; every figure is per iteration (the difference between the two recordings divided by the
/// difference in iterations), so start-up cancels out. Engines run with their default options: `bt` refuses the
/// 64-bit guest, as VMware's translator did on processors without long-mode segment limits, and the table adds
/// the row `bt (bt.lmsle=true)` with what it would cost on a processor that has them.
///
/// What to read in it (the seeds' argument): on x86-32 the software monitors run the kernel in ring 1 behind
/// segment limits, and paravirt's INT 0x80 goes straight to the guest kernel through the fast trap gate; on
/// x86-64 the processor ignores the limits, so trap-and-emulate and paravirt put the kernel in ring 3 beside
/// user code and switch page tables on every entry and return (`pt switches`), while hardware assist runs
/// both widths unchanged.
///
/// Exit status: 0; 2 for a workload without an x86-32 build or without `iterations`.
#[derive(clap::Args)]
pub struct Args {
    /// The catalog workload both guests run.
    #[arg(long, default_value = "syscall")]
    workload: String,
    /// More workload parameters for both builds, as key=value (not `arch` or `iterations`).
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = super::parse_param)]
    params: Vec<(String, String)>,
    /// Parameters for the x86-32 build only, as key=value (for example `sysenter=1`: system calls through
    /// SYSENTER instead of INT 0x80, which Xen's fast trap gate does not take).
    #[arg(long = "x86-32-param", value_name = "KEY=VALUE", value_parser = super::parse_param)]
    narrow_params: Vec<(String, String)>,
    /// Cost profile: a built-in name or a TOML file.
    #[arg(long, default_value = "p4-2006")]
    profile: String,
    /// The two iteration counts to record the workload at.
    #[arg(long, num_args = 2, value_names = ["LOW", "HIGH"], default_values_t = [200u64, 400])]
    iterations: Vec<u64>,
    /// Print a JSON object (keys: workload, params, x86_32_params, profile, iterations, rows [engine, arch, options, runs,
    /// refusal, kernel_ring, protection, cycles_per_iteration, relative_to_native, exits_per_iteration,
    /// page_table_switches_per_iteration, fast_system_calls_per_iteration, shadow_descriptor_loads_per_iteration,
    /// monitor_area_touches]).
    #[arg(long)]
    json: bool,
}

/// One engine on one guest width.
struct Row {
    engine: String,
    width: GuestWidth,
    options: &'static str,
    outcome: Result<PerIteration, String>,
    protection: Option<String>,
    kernel_ring: Option<u8>,
}

/// Figures per iteration: the difference of two recordings over the difference of their iterations.
struct PerIteration {
    cycles: f64,
    exits: f64,
    page_table_switches: f64,
    fast_system_calls: f64,
    shadow_descriptor_loads: f64,
    monitor_area_touches: u64,
}

impl PerIteration {
    fn between(low: &Metrics, high: &Metrics, iterations: u64) -> PerIteration {
        let per = |f: fn(&Metrics) -> u64| (f(high) as f64 - f(low) as f64) / iterations as f64;
        PerIteration {
            cycles: per(|m| m.cycles()),
            exits: per(|m| m.exits_total()),
            page_table_switches: per(|m| m.protection.page_table_switches),
            fast_system_calls: per(|m| m.protection.fast_system_calls),
            shadow_descriptor_loads: per(|m| m.protection.shadow_descriptor_loads),
            monitor_area_touches: high.protection.monitor_area_touches,
        }
    }
}

fn record(args: &Args, width: GuestWidth, iterations: u64) -> anyhow::Result<Vec<u8>> {
    let mut params = args.params.clone();
    if width == GuestWidth::Bits32 {
        params.extend(args.narrow_params.iter().cloned());
    }
    params.push(("arch".into(), width.arch().into()));
    params.push(("iterations".into(), iterations.to_string()));
    super::record::record_catalog_trace(&args.workload, &params)
}

fn rows_for(args: &Args, width: GuestWidth, profile: &Profile, progress: &ProgressBar) -> anyhow::Result<Vec<Row>> {
    let (low, high) = (args.iterations[0], args.iterations[1]);
    progress.set_message(format!("recording {} ({})", args.workload, width.arch()));
    let bytes = [record(args, width, low)?, record(args, width, high)?];
    // Checked and decoded once; every engine replays the same prepared traces.
    let name = |n: u64| format!("{} {} at {n} iterations", args.workload, width.arch());
    let traces = [super::replay::prepare(&bytes[0], &name(low))?, super::replay::prepare(&bytes[1], &name(high))?];
    let mut lmsle = Options::default();
    lmsle.set("bt.lmsle", "true")?;
    let mut rows = Vec::new();
    for engine in engine::all() {
        let mut variants = vec![("", Options::default())];
        if engine.name() == "bt" && width == GuestWidth::Bits64 {
            variants.push(("bt.lmsle=true", lmsle.clone()));
        }
        for (label, options) in variants {
            progress.set_message(format!("{} on {}", engine.name(), width.arch()));
            let run =
                |trace: &PreparedTrace| -> anyhow::Result<Metrics> { Ok(engine.replay(trace, profile, &options)?) };
            let outcome = match (run(&traces[0]), run(&traces[1])) {
                (Ok(a), Ok(b)) => Ok(PerIteration::between(&a, &b, high - low)),
                (Err(error), _) | (_, Err(error)) => match error.downcast_ref::<EngineError>() {
                    Some(EngineError::Unsupported(reason)) => Err(reason.clone()),
                    _ => return Err(error.context(format!("{} on {} {}", engine.name(), args.workload, width.arch()))),
                },
            };
            // A refused guest runs nowhere: its row carries the refusal, not a protection.
            let protection = outcome.is_ok().then(|| engine.protection(&options, width));
            rows.push(Row {
                engine: engine.name().to_string(),
                width,
                options: label,
                outcome,
                protection: protection.map(|p| p.describe()),
                kernel_ring: protection.and_then(|p| p.kernel_ring()),
            });
            progress.inc(1);
        }
    }
    Ok(rows)
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if args.params.iter().chain(&args.narrow_params).any(|(key, _)| key == "arch" || key == "iterations") {
        return Err(super::replay::UsageError(
            "`arch` and `iterations` are the story's own parameters: drop them from --param (use --iterations)".into(),
        )
        .into());
    }
    if args.iterations[0] >= args.iterations[1] {
        return Err(super::replay::UsageError("--iterations LOW HIGH needs LOW < HIGH".into()).into());
    }
    let profile = super::load_profile(&args.profile, &[])?;
    let progress = ProgressBar::new(2 * (engine::all().len() as u64 + 1));
    progress.set_style(ProgressStyle::with_template("{spinner} {pos}/{len} {msg}").context("progress template")?);
    if args.json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut rows = Vec::new();
    for width in GuestWidth::ALL {
        rows.extend(rows_for(args, width, &profile, &progress)?);
    }
    progress.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(args, &profile, &rows))?);
    } else {
        print!("{}", render(args, &profile, &rows));
    }
    Ok(ExitCode::SUCCESS)
}

fn native_cycles(rows: &[Row], width: GuestWidth) -> Option<f64> {
    rows.iter()
        .find(|r| r.engine == "native" && r.width == width)
        .and_then(|r| r.outcome.as_ref().ok())
        .map(|p| p.cycles)
}

fn to_json(args: &Args, profile: &Profile, rows: &[Row]) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            let native = native_cycles(rows, row.width);
            let mut object = json!({
                "engine": row.engine,
                "arch": row.width.arch(),
                "options": row.options,
                "runs": row.outcome.is_ok(),
                "refusal": row.outcome.as_ref().err(),
                "kernel_ring": row.kernel_ring,
                "protection": row.protection,
            });
            if let Ok(p) = &row.outcome {
                let figures = json!({
                    "cycles_per_iteration": p.cycles,
                    "relative_to_native": native.filter(|n| *n > 0.0).map(|n| p.cycles / n),
                    "exits_per_iteration": p.exits,
                    "page_table_switches_per_iteration": p.page_table_switches,
                    "fast_system_calls_per_iteration": p.fast_system_calls,
                    "shadow_descriptor_loads_per_iteration": p.shadow_descriptor_loads,
                    "monitor_area_touches": p.monitor_area_touches,
                });
                object.as_object_mut().expect("an object").extend(figures.as_object().expect("an object").clone());
            }
            object
        })
        .collect();
    json!({
        "workload": args.workload,
        "params": args.params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "x86_32_params": args.narrow_params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "profile": profile.name,
        "iterations": args.iterations,
        "rows": rows,
    })
}

fn render(args: &Args, profile: &Profile, rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: per iteration ({} and {} iterations), profile {}",
        args.workload, args.iterations[0], args.iterations[1], profile.name
    );
    let _ = writeln!(
        out,
        "{:<24} {:<7} {:>11} {:>9} {:>8} {:>11} {:>10}  where the kernel runs, what guards the monitor",
        "engine", "arch", "cycles", "x native", "exits", "pt switches", "fast traps"
    );
    for row in rows {
        let name = match row.options {
            "" => row.engine.clone(),
            options => format!("{} ({options})", row.engine),
        };
        match &row.outcome {
            Ok(p) => {
                let relative = native_cycles(rows, row.width)
                    .filter(|n| *n > 0.0)
                    .map_or("-".to_string(), |n| format!("{:.2}", p.cycles / n));
                let _ = writeln!(
                    out,
                    "{name:<24} {:<7} {:>11.1} {relative:>9} {:>8.2} {:>11.2} {:>10.2}  {}",
                    row.width.arch(),
                    p.cycles,
                    p.exits,
                    p.page_table_switches,
                    p.fast_system_calls,
                    row.protection.as_deref().unwrap_or_default()
                );
            }
            Err(reason) => {
                let _ =
                    writeln!(out, "{name:<24} {:<7} {:>11}  {}", row.width.arch(), "refuses", first_sentence(reason));
            }
        }
    }
    out
}

/// A refusal's first clause, for the table (the JSON carries the whole text).
fn first_sentence(reason: &str) -> &str {
    reason.split(", which").next().unwrap_or(reason)
}
