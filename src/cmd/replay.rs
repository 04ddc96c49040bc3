//! `virtlab replay`: one trace through one or all engines, in parallel.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use virtlab_engines::{
    engine, CycleCause, Engine, EngineError, ExitReason, Finding, Hypercall, Metrics, Options, PreparedTrace,
    Primitive, Profile,
};
use virtlab_traces::{CheckReport, Metadata, SymbolMap, TraceView};

use super::kvm_engine;

/// Exit status when at least one engine refused the trace (the others' results are still printed).
pub const EXIT_REFUSED: u8 = 4;

/// Replay a trace under virtualization strategies and report what each costs.
///
/// Each engine carries out its strategy's mechanism on the recorded execution: which
/// instructions trap, what the translator emits, which hypercalls replace what, where the
/// shadow page tables miss. It counts exits and traps by reason (KVM's names where KVM has
/// one), translations, hypercalls, shadow faults, holes (wrong results the guest would
/// silently get) and detectable events, and it attributes them to guest addresses. Cycles
/// are those counts times a profile's primitive costs.
///
/// Engines: native, trap-emulate, hybrid, bt, paravirt, hw-ept, hw-shadow, kvm (or `all`).
/// `kvm` is not a model: it boots the trace's guest on this host's KVM, checks each run
/// ends as the trace does, and reports what it measured (exits, KVM's statistics, wall
/// time and TSC cycles; its `cycles` are the median run's TSC cycles). Where /dev/kvm is
/// unusable, or the backend cannot run the guest, its entry says why.
/// Profiles: p4-2006 (default), core2-2006, sandybridge-2011, or a TOML file in their form
/// (`virtlab calibrate host -o host.toml` measures one for this host).
///
/// `--set` takes engine options and profile primitives. Options:
///   bt.lmsle=false              the host has long-mode segment limits
///                               (without them bt refuses 64-bit traces)
///   bt.adaptive_threshold=4     tracing faults before adaptive BT retranslates the writer
///   bt.in_tc_ports=0x80         ports emulated inside the translation cache
///   paravirt.guest_bits=auto    32 or 64: the paravirtualized kernel's width
///   hw.tpr_shadow=true          CR8 accesses do not exit
///   hw.msr_bitmap=true          FS_BASE, GS_BASE and KERNEL_GS_BASE do not exit
///   hw.user_space_devices=true  device exits continue to a user-space device model
///   kvm.runs=5                  runs of the guest on KVM, each in a fresh VM
///   kvm.timeout=60              seconds one KVM run may take
/// Profile primitives are `section.key` as in the profile files: `--set hw.exit=1000`.
///
/// Example: `virtlab replay syscall.vlt --engine all --set bt.lmsle=true`
///
/// Exit status: 0 when every engine ran; 4 when an engine refused the trace (its result
/// says why); 1 for an invalid trace; 2 for a bad engine, profile or --set; 3 for an
/// unreadable file.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The trace file.
    trace: PathBuf,
    /// An engine name, a comma-separated list, or `all`.
    #[arg(long, default_value = "all")]
    engine: String,
    /// A built-in profile name or a profile TOML file.
    #[arg(long, default_value = "p4-2006", value_name = "NAME|FILE")]
    profile: String,
    /// An engine option or profile primitive as key=value; repeat for several.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = super::parse_param)]
    settings: Vec<(String, String)>,
    /// Print a JSON array, one object per engine (keys: engine, profile, workload, instructions,
    /// instructions_user, instructions_kernel, cycles, cycles_by_cause, cycles_by_primitive (profile key ->
    /// cycles), exits, exits_total, emulated_instructions, translations, hypercalls, page_table_updates_batched,
    /// page_table_update_batches, shadow (faults, traced and untraced pages, updates, resyncs), mechanism (vmcs
    /// reads and writes, guest and hardware walk references, TLB fills, flushes and refills), holes, detectable,
    /// top_sites (records of address, kind or cause, count, and function where the trace names the guest's
    /// functions); a refusing engine gives engine and unsupported; kvm adds
    /// backend and measured, and gives null for what it does not observe).
    #[arg(long)]
    json: bool,
    /// Worker threads (default: one per core). Results do not depend on it. The invariant checker (`virtlab
    /// check`'s rules) runs on them too, a chunk of events ahead of the engines (with one thread, in the same
    /// decoding pass as the first engine): an engine replays only what it has passed, and an invalid trace gives no
    /// results.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// How many guest addresses to list under top_sites.
    #[arg(long, default_value_t = 10, value_name = "N")]
    top: usize,
}

/// Engines, profile and options from the command line's names and `--set` pairs.
pub struct Setup {
    pub engines: Vec<Box<dyn Engine>>,
    pub profile: Profile,
    pub options: Options,
    /// Run the kvm engine too, with these options.
    pub kvm: Option<virtlab_kvm::MeasureOptions>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn setup(engines: &str, profile: &str, settings: &[(String, String)]) -> anyhow::Result<Setup> {
    let all = engines == "all";
    let mut kvm = (all || engines.split(',').any(|name| name.trim() == kvm_engine::ENGINE))
        .then(virtlab_kvm::MeasureOptions::default);
    let engines: Vec<Box<dyn Engine>> = if all {
        engine::all()
    } else {
        engines
            .split(',')
            .filter(|name| name.trim() != kvm_engine::ENGINE)
            .map(|name| {
                engine::by_name(name.trim()).ok_or_else(|| {
                    UsageError(format!(
                        "no engine named `{name}`; engines: native, trap-emulate, hybrid, bt, paravirt, hw-ept, \
                         hw-shadow, kvm, or all"
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let mut options = Options::default();
    let mut overrides = Vec::new();
    for (key, value) in settings {
        if Options::has_key(key) {
            options.set(key, value).map_err(|e| UsageError(e.to_string()))?;
        } else if kvm_engine::has_key(key) {
            if let Some(kvm) = kvm.as_mut() {
                kvm_engine::set_option(kvm, key, value)?;
            }
        } else if Profile::has_key(key) {
            overrides.push((key.clone(), value.clone()));
        } else {
            return Err(UsageError(format!(
                "--set {key}: neither an engine option nor a profile primitive; see `virtlab replay --help`"
            ))
            .into());
        }
    }
    let profile = super::load_profile(profile, &overrides)?;
    Ok(Setup { engines, profile, options, kvm })
}

/// Open, check and prepare a trace held in memory: the view the engines replay is the one the checker read, in
/// one pass over the events.
pub fn prepare<'a>(bytes: &'a [u8], name: &str) -> anyhow::Result<PreparedTrace<'a>> {
    Ok(check_and_prepare(open_view(bytes, name)?, name)?.0)
}

/// Opens a trace held in memory (the container, checksums, header, block table and footer).
pub fn open_view<'a>(bytes: &'a [u8], name: &str) -> anyhow::Result<TraceView<'a>> {
    TraceView::open(bytes).with_context(|| format!("{name} is not a valid trace"))
}

/// Checks an open trace and prepares it for the engines; returns what the checker found too.
pub fn check_and_prepare<'a>(view: TraceView<'a>, name: &str) -> anyhow::Result<(PreparedTrace<'a>, CheckReport)> {
    let report = virtlab_traces::check_view(&view).with_context(|| format!("{name} is not a valid trace"))?;
    let trace = PreparedTrace::new(view).with_context(|| format!("{name}: a block does not decode"))?;
    Ok((trace, report))
}

/// Prepares a trace held in memory for the engines before the checker has read its events: the caller checks it
/// as the engines replay it ([`virtlab_engines::check_and_replay_many`]). A block the engines cannot decode is
/// refused here, by the checker's rule when the checker has one for it.
fn prepare_before_checking<'a>(bytes: &'a [u8], name: &str) -> anyhow::Result<PreparedTrace<'a>> {
    match PreparedTrace::new(open_view(bytes, name)?) {
        Ok(trace) => Ok(trace),
        // Checking first names the block's problem by the checker's rule, where it has one.
        Err(_) => Ok(check_and_prepare(open_view(bytes, name)?, name)?.0),
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let setup = setup(&args.engine, &args.profile, &args.settings)?;
    let bytes = super::read_file(&args.trace)?;
    let name = args.trace.display().to_string();
    let progress = super::spinner(&format!("replaying {name}"));
    let trace = prepare_before_checking(&bytes, &name)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(args.threads.unwrap_or(0)).build()?;
    let (results, _) = pool
        .install(|| virtlab_engines::check_and_replay_many(&trace, &setup.engines, &setup.profile, &setup.options))
        .with_context(|| format!("{name} is not a valid trace"))?;
    progress.finish_and_clear();
    let metadata = trace.view.metadata();
    let mut refused = false;
    let mut objects = Vec::new();
    for (engine, result) in setup.engines.iter().zip(results) {
        match result {
            Ok(metrics) => objects.push(metrics_json(engine.name(), &setup.profile, metadata, &metrics, args.top)),
            Err(EngineError::Unsupported(reason)) => {
                refused = true;
                objects.push(json!({ "engine": engine.name(), "unsupported": reason }));
            }
            Err(other) => bail!(anyhow::Error::new(other).context(format!("engine {} on {name}", engine.name()))),
        }
    }
    // After the models, so that the measured runs have the host to themselves.
    if let Some(kvm) = &setup.kvm {
        let entry = kvm_engine::replay_entry(&trace.view, &setup.profile, kvm, args.top);
        refused |= !entry["unsupported"].is_null();
        objects.push(entry);
    }
    let text =
        if args.json { serde_json::to_string_pretty(&objects)? } else { render(&name, &setup.profile, &objects) };
    super::finish_output(super::print_line(&text))?;
    Ok(if refused { ExitCode::from(EXIT_REFUSED) } else { ExitCode::SUCCESS })
}

fn hex(address: u64) -> String {
    format!("{address:#x}")
}

/// A guest address's record: `{address, <label>: …, count}`, with `function` (`sys_getpid+0x12`) when the trace's
/// symbol map names it.
fn site(symbols: &SymbolMap, address: u64, label: (&str, String), count: u64) -> Value {
    let mut record = json!({ "address": hex(address), label.0: label.1, "count": count });
    if let Some(name) = symbols.describe(address) {
        record["function"] = json!(name);
    }
    record
}

fn findings(symbols: &SymbolMap, list: &[Finding]) -> Value {
    list.iter().map(|f| site(symbols, f.address, ("kind", f.kind.to_string()), f.count)).collect()
}

/// The JSON object of one engine's result on the trace described by `metadata`.
pub fn metrics_json(engine: &str, profile: &Profile, metadata: &Metadata, m: &Metrics, top: usize) -> Value {
    let symbols = &metadata.symbols;
    let exits: Map<String, Value> = ExitReason::ALL.iter().map(|r| (r.name().into(), json!(m.exits_by(*r)))).collect();
    let hypercalls: Map<String, Value> =
        Hypercall::ALL.iter().map(|h| (h.name().into(), json!(m.hypercalls_by(*h)))).collect();
    let causes: Map<String, Value> =
        CycleCause::ALL.iter().map(|c| (c.name().into(), json!(m.cycles_for(*c)))).collect();
    // Where the cycles came from, by profile primitive: what `validate` attributes a cell's cost to.
    let primitives: Map<String, Value> = Primitive::ALL
        .iter()
        .filter(|p| m.cycles_by(**p) > 0)
        .map(|p| (p.key().into(), json!(m.cycles_by(*p))))
        .collect();
    let t = &m.translation;
    let s = &m.shadow;
    let k = &m.mechanism;
    let p = &m.protection;
    json!({
        "engine": engine,
        "profile": profile.name,
        "workload": metadata.workload,
        "instructions": m.instructions(),
        "instructions_user": m.instructions_user,
        "instructions_kernel": m.instructions_kernel,
        "cycles": m.cycles(),
        "cycles_by_cause": causes,
        "cycles_by_primitive": primitives,
        "exits": exits,
        "exits_total": m.exits_total(),
        "emulated_instructions": m.emulated_instructions,
        "translations": {
            "blocks": t.blocks, "instructions": t.instructions, "ident": t.ident, "non_ident": t.non_ident,
            "tc_bytes": t.tc_bytes, "chain_links": t.chain_links, "indirect_lookups": t.indirect_lookups,
            "callouts": t.callouts, "in_tc_emulations": t.in_tc_emulations, "helper_calls": t.helper_calls,
            "retranslations": t.retranslations,
        },
        "hypercalls": hypercalls,
        "page_table_updates_batched": m.page_table_updates_batched,
        "page_table_update_batches": m.hypercalls_by(Hypercall::MmuUpdate),
        "shadow": {
            "hidden_faults": s.hidden_faults, "true_faults": s.true_faults, "root_switches": s.root_switches,
            "invalidations": s.invalidations, "traced_pages": s.traced_pages, "untraced_pages": s.untraced_pages,
            "untraced_writes": s.untraced_writes, "shadow_updates": s.shadow_updates,
            "unsynced_tables": s.unsynced_tables, "resyncs": s.resyncs, "write_floods": s.write_floods,
        },
        "mechanism": {
            "vmcs_reads": k.vmcs_reads, "vmcs_writes": k.vmcs_writes,
            "guest_walk_references": k.guest_walk_references, "walk_references": k.walk_references,
            "tlb_fills": k.tlb_fills, "tlb_flushes": k.tlb_flushes, "tlb_refills": k.tlb_refills,
        },
        "protection": {
            "kernel_ring": p.kernel_ring, "monitor_base": p.monitor_base.map(|base| format!("{base:#x}")),
            "shadow_descriptor_loads": p.shadow_descriptor_loads, "monitor_area_touches": p.monitor_area_touches,
            "page_table_switches": p.page_table_switches, "fast_system_calls": p.fast_system_calls,
        },
        "holes": findings(symbols, &m.holes()),
        "detectable": findings(symbols, &m.detectable_events()),
        "top_sites": m.top_sites(top).iter()
            .map(|s| site(symbols, s.address, ("cause", s.cause.name()), s.count))
            .collect::<Vec<_>>(),
    })
}

fn nonzero(object: &Value) -> Vec<(String, u64)> {
    let mut pairs: Vec<(String, u64)> = object
        .as_object()
        .map(|map| map.iter().filter_map(|(k, v)| v.as_u64().filter(|n| *n > 0).map(|n| (k.clone(), n))).collect())
        .unwrap_or_default();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    pairs
}

fn count_of(list: &Value) -> u64 {
    list.as_array().map_or(0, |items| items.iter().filter_map(|i| i["count"].as_u64()).sum())
}

fn render(name: &str, profile: &Profile, objects: &[Value]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let native = objects.iter().find(|o| o["engine"] == "native").and_then(|o| o["cycles"].as_u64());
    let _ = writeln!(out, "{name}: profile {} ({})", profile.name, profile.description);
    let _ = writeln!(
        out,
        "{:<13} {:>15} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>10}",
        "engine", "cycles", "x native", "exits", "callouts", "hypercalls", "hidden pf", "holes", "detectable"
    );
    for o in objects {
        if let Some(reason) = o["unsupported"].as_str() {
            let _ = writeln!(out, "{:<13} refused: {reason}", o["engine"].as_str().unwrap_or(""));
            continue;
        }
        let cycles = o["cycles"].as_u64().unwrap_or(0);
        let ratio = native.filter(|n| *n > 0).map_or("-".to_string(), |n| format!("{:.2}", cycles as f64 / n as f64));
        let hypercalls: u64 = nonzero(&o["hypercalls"]).iter().map(|(_, n)| n).sum();
        // A measured engine leaves what it cannot observe null: shown as "-", not as a zero.
        let observed = |value: &Value, text: String| if value.is_null() { "-".to_string() } else { text };
        let _ = writeln!(
            out,
            "{:<13} {:>15} {:>8} {:>10} {:>10} {:>10} {:>10} {:>7} {:>10}",
            o["engine"].as_str().unwrap_or(""),
            cycles,
            ratio,
            o["exits_total"].as_u64().unwrap_or(0),
            observed(&o["translations"], o["translations"]["callouts"].as_u64().unwrap_or(0).to_string()),
            observed(&o["hypercalls"], hypercalls.to_string()),
            observed(&o["shadow"], o["shadow"]["hidden_faults"].as_u64().unwrap_or(0).to_string()),
            observed(&o["holes"], count_of(&o["holes"]).to_string()),
            observed(&o["detectable"], count_of(&o["detectable"]).to_string()),
        );
    }
    for o in objects.iter().filter(|o| o["unsupported"].is_null()) {
        let _ = writeln!(out, "\n{}:", o["engine"].as_str().unwrap_or(""));
        let line = |label: &str, pairs: Vec<(String, u64)>| {
            let items: Vec<String> = pairs.iter().take(8).map(|(k, n)| format!("{k} {n}")).collect();
            if items.is_empty() {
                String::new()
            } else {
                format!("  {label:<11} {}\n", items.join(", "))
            }
        };
        out += &line("cycles", nonzero(&o["cycles_by_cause"]));
        out += &line("primitives", nonzero(&o["cycles_by_primitive"]));
        out += &line("exits", nonzero(&o["exits"]));
        out += &line("hypercalls", nonzero(&o["hypercalls"]));
        out += &kvm_engine::render_measured(o);
        if o["translations"]["blocks"].as_u64().unwrap_or(0) > 0 {
            out += &line("translated", nonzero(&o["translations"]));
        }
        for (label, key) in [("holes", "holes"), ("detectable", "detectable"), ("top sites", "top_sites")] {
            let items: Vec<String> = o[key]
                .as_array()
                .into_iter()
                .flatten()
                .take(5)
                .map(|i| {
                    let what = i.get("kind").or_else(|| i.get("cause")).and_then(|v| v.as_str()).unwrap_or("");
                    let function = i["function"].as_str().map_or(String::new(), |f| format!(" <{f}>"));
                    format!("{what} @{}{function} x{}", i["address"].as_str().unwrap_or(""), i["count"])
                })
                .collect();
            if !items.is_empty() {
                let _ = writeln!(out, "  {label:<11} {}", items.join(", "));
            }
        }
    }
    out.trim_end().to_string()
}
