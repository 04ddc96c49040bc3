//! Where each strategy runs the guest kernel, by the guest's width, on recorded traces: the 32-bit tour (rings 0,
//! 1 and 3, INT 0x80, SYSENTER, segment loads) and a 64-bit catalog workload. The engines' protection counts are
//! checked against the trace's own events, walked here without the engines' machinery.

mod common;

use common::record_workload;
use virtlab_engines::classify::Op;
use virtlab_engines::{engine, ExitReason, Metrics, Options, PreparedTrace, Profile};
use virtlab_traces::{Event, Metadata, TraceView};

fn record_tour() -> Vec<u8> {
    let image = virtlab_workloads::tour32::protected_mode_tour();
    let metadata = Metadata { workload: "tour32".into(), recorder: "tests".into(), ..Metadata::default() };
    virtlab_record::record_in_memory(&image.bytes, metadata, 10_000_000).unwrap()
}

fn replay(trace: &PreparedTrace, name: &str) -> Metrics {
    let profile = Profile::load("p4-2006").unwrap();
    engine::by_name(name).unwrap().replay(trace, &profile, &Options::default()).unwrap()
}

/// What the trace itself says, counted event by event.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counted {
    /// Segment-register loads retired at CPL 0–2 and at CPL 3 (by the context the block started in).
    segment_loads: [u64; 2],
    /// INT 0x80 executed at CPL 3.
    user_int80: u64,
    /// SYSENTER/SYSCALL events.
    fast_entries: u64,
    /// INT n with another vector than 0x80, in any mode.
    other_software_interrupts: u64,
    /// Switches between CPL 3 and a kernel ring.
    mode_switches: u64,
}

fn count(trace: &PreparedTrace) -> Counted {
    let mut counted = Counted::default();
    let mut user = false;
    let ran = |block: usize, executed: u32, user: bool, counted: &mut Counted| {
        let facts = &trace.facts[block];
        let loads = facts.ops.iter().filter(|&&(i, op)| op == Op::SegmentLoad && i < executed).count() as u64;
        counted.segment_loads[usize::from(user)] += loads;
    };
    for event in trace.view.events() {
        match event.unwrap() {
            Event::Block(id) => ran(id.index(), trace.facts[id.index()].instructions, user, &mut counted),
            Event::PartialBlock { block, executed } => ran(block.index(), executed, user, &mut counted),
            Event::SoftwareInterrupt { vector: 0x80, .. } if user => counted.user_int80 += 1,
            Event::SoftwareInterrupt { vector, .. } if vector != 0x80 => counted.other_software_interrupts += 1,
            Event::Syscall { .. } => counted.fast_entries += 1,
            Event::Context { context, .. } => {
                if context.is_user() != user {
                    counted.mode_switches += 1;
                }
                user = context.is_user();
            }
            _ => {}
        }
    }
    counted
}

#[test]
fn a_32_bit_kernel_runs_in_ring_1_behind_segment_limits() {
    let bytes = record_tour();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    assert!(!trace.has_64_bit_code());
    let counted = count(&trace);
    assert!(counted.segment_loads[0] > 0 && counted.user_int80 > 0 && counted.fast_entries > 0, "{counted:?}");

    // VMware's translator runs a 32-bit guest without long-mode segment limits: its monitor sits in the top 4 MiB.
    let bt = replay(&trace, "bt");
    assert_eq!((bt.protection.kernel_ring, bt.protection.monitor_base), (Some(1), Some(0xffc0_0000)));
    assert_eq!(bt.protection.shadow_descriptor_loads, counted.segment_loads[0] + counted.segment_loads[1]);
    assert_eq!((bt.protection.page_table_switches, bt.protection.monitor_area_touches), (0, 0));

    // The classic monitor: ring 1 too, and U/S paging still separates ring 1 from ring 3, so no page-table switch.
    let trap = replay(&trace, "trap-emulate");
    assert_eq!((trap.protection.kernel_ring, trap.protection.page_table_switches), (Some(1), 0));
    assert_eq!(trap.protection.shadow_descriptor_loads, counted.segment_loads[0] + counted.segment_loads[1]);
    let selector_holes: Vec<_> = trap.holes().into_iter().filter(|h| h.kind.starts_with("selector_")).collect();
    assert!(
        !selector_holes.is_empty() && selector_holes.iter().all(|h| h.kind == "selector_shows_rpl_1"),
        "{selector_holes:?}"
    );

    // Xen on x86-32: INT 0x80 from user mode through the fast trap gate, SYSENTER through Xen.
    let pv = replay(&trace, "paravirt");
    assert_eq!((pv.protection.kernel_ring, pv.protection.monitor_base), (Some(1), Some(0xfc00_0000)));
    assert_eq!(pv.protection.fast_system_calls, counted.user_int80);
    assert_eq!(pv.protection.page_table_switches, 0);
    assert_eq!(pv.exits_by(ExitReason::SystemCall), counted.fast_entries + counted.other_software_interrupts);

    // Hardware assist runs the kernel in ring 0 of guest mode; the monitor is not in the guest's address space.
    let hw = replay(&trace, "hw-ept");
    assert_eq!(
        (hw.protection.kernel_ring, hw.protection.monitor_base, hw.protection.shadow_descriptor_loads),
        (Some(0), None, 0)
    );
}

#[test]
fn a_64_bit_kernel_shares_ring_3_with_user_code_and_switches_page_tables() {
    let bytes = record_workload("syscall", &[("iterations", "50")]);
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let counted = count(&trace);
    assert!(counted.mode_switches >= 100, "{counted:?}");
    for name in ["trap-emulate", "paravirt"] {
        let m = replay(&trace, name);
        assert_eq!((m.protection.kernel_ring, m.protection.monitor_base), (Some(3), None), "{name}");
        assert_eq!(m.protection.page_table_switches, counted.mode_switches, "{name}");
        assert_eq!(m.protection.fast_system_calls, 0, "{name}: no fast trap gate on x86-64");
    }
    // The hybrid monitor interprets the kernel: nothing to switch.
    let hybrid = replay(&trace, "hybrid");
    assert_eq!((hybrid.protection.kernel_ring, hybrid.protection.page_table_switches), (None, 0));
}

fn story(args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_virtlab"))
        .args(["story", "--json"])
        .args(args)
        .output()
        .expect("virtlab runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn row<'a>(story: &'a serde_json::Value, engine: &str, arch: &str, options: &str) -> &'a serde_json::Value {
    story["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["engine"] == engine && r["arch"] == arch && r["options"] == options)
        .unwrap_or_else(|| panic!("no row {engine} {arch} {options:?}"))
}

#[test]
fn the_story_shows_which_strategy_runs_which_width_and_where_it_puts_the_kernel() {
    let story = story(&["--workload", "in", "--iterations", "10", "20"]);
    assert_eq!(story["rows"].as_array().unwrap().len(), 2 * 7 + 1, "seven engines on two widths, and bt with LMSLE");
    let bt64 = row(&story, "bt", "x86-64", "");
    assert_eq!(bt64["runs"], false);
    assert!(bt64["refusal"].as_str().unwrap().contains("bt.lmsle=true"), "{bt64}");
    assert!(bt64["protection"].is_null() && bt64["kernel_ring"].is_null(), "{bt64}");
    let bt32 = row(&story, "bt", "x86-32", "");
    assert_eq!((bt32["runs"].as_bool(), bt32["kernel_ring"].as_u64()), (Some(true), Some(1)));
    assert!(bt32["protection"].as_str().unwrap().contains("top 4 MiB"), "{bt32}");
    assert_eq!(row(&story, "bt", "x86-64", "bt.lmsle=true")["runs"], true);
    assert_eq!(row(&story, "trap-emulate", "x86-64", "")["kernel_ring"], 3);
    assert_eq!(row(&story, "trap-emulate", "x86-32", "")["kernel_ring"], 1);
    // IN from the POST port: native pays the bus cycle on both widths; hardware assist exits once per iteration.
    for arch in ["x86-64", "x86-32"] {
        assert_eq!(row(&story, "native", arch, "")["relative_to_native"], 1.0);
        assert_eq!(row(&story, "hw-ept", arch, "")["exits_per_iteration"], 1.0, "{arch}");
    }
}

#[test]
fn the_story_of_a_system_call_fast_trap_on_x86_32_two_page_tables_on_x86_64() {
    let int80 = story(&["--iterations", "10", "20"]);
    let pv32 = row(&int80, "paravirt", "x86-32", "");
    assert_eq!(
        (pv32["fast_system_calls_per_iteration"].as_f64(), pv32["exits_per_iteration"].as_f64()),
        (Some(1.0), Some(0.0))
    );
    for engine in ["paravirt", "trap-emulate"] {
        let wide = row(&int80, engine, "x86-64", "");
        assert_eq!(wide["page_table_switches_per_iteration"], 2.0, "{engine}: one switch each way");
        assert_eq!(row(&int80, engine, "x86-32", "")["page_table_switches_per_iteration"], 0.0, "{engine}");
    }
    // SYSENTER always enters ring 0, which under Xen is Xen's: no fast trap.
    let sysenter = story(&["--iterations", "10", "20", "--x86-32-param", "sysenter=1"]);
    let pv32 = row(&sysenter, "paravirt", "x86-32", "");
    assert_eq!(
        (pv32["fast_system_calls_per_iteration"].as_f64(), pv32["exits_per_iteration"].as_f64()),
        (Some(0.0), Some(1.0))
    );
    assert_eq!(sysenter["x86_32_params"][0], "sysenter=1");
}
