//! Golden results: every engine on one small handmade trace, with each count and cycle total derived by hand in
//! the comments from the trace below and the round-number profile `UNIT`.
//!
//! The trace (64-bit code, 4-level paging throughout, starting at CPL 0 with IF clear and CR3 0x1000):
//!
//! ```text
//! K1 @0x100000 (kernel, 7 instructions)     U1 @0x400000 (user, 3)       K2 @0x100100 (kernel, 3)
//!   0 0x100000 cli                            0 0x400000 sgdt [rax]        0 0x100100 mov [rdi],rax
//!   1 0x100001 mov cr3,rax                    1 0x400003 cpuid             1 0x100103 invlpg [rdi]
//!   2 0x100004 sti                            2 0x400005 syscall           2 0x100106 hlt
//!   3 0x100005 in al,0x80
//!   4 0x100007 sgdt [rax]
//!   5 0x10000a popfq
//!   6 0x10000b sysretq
//! ```
//!
//! Events: K1 with CrWrite(cr3 0x1000→0x2000)@1, Context(cr3 0x2000)@1, Context(IF=1)@2, Io(0x80 read)@3,
//! Sysret@6, Context(CPL 3)@6; U1 with PageTouch(0x400000→0x9000)@0, Cpuid@1, Syscall@2, Context(CPL 0)@2; then
//! K2 five times, each with PageTableWrite(0x3008, level 1, 0x5067→0x6067)@0, Invlpg(0x401000)@1, Hlt@2.
//! Instructions: user 3, kernel 7 + 5 × 3 = 22.

use std::io::Cursor;

use virtlab_engines::{
    engine, CycleCause, Engine, EngineError, ExitReason, Hypercall, Metrics, Options, PreparedTrace, Profile,
};
use virtlab_traces::{
    check, Access, Block, BootState, CodeMode, Context, Direction, EndReason, Ending, Event, Metadata, PageSize,
    PagingMode, TraceView, TraceWriter, Walk,
};

/// Round numbers, so that every total below can be checked by hand.
const UNIT: &str = r#"
name = "unit"
description = "round numbers for golden tests"
clock_ghz = 1.0
[native]
cycles_per_instruction = 1
call_return = 0
divide = 20
multiply = 3
rep_startup = 10
rep_movs_bytes_per_cycle = 4
rep_stos_bytes_per_cycle = 8
rep_element = 2
syscall = 10
sysret = 10
exception = 20
iret = 10
mov_to_cr = 5
mov_from_cr = 0
cli_sti = 2
popf_pushf = 3
invlpg = 4
tlb_fill = 1
port_io = 100
mmio = 50
cpuid = 7
rdtsc = 0
msr = 6
descriptor_load = 0
descriptor_store = 1
swapgs = 0
hlt = 0
[monitor]
trap = 1000
decode = 100
emulate = 10
reflect = 20
device = 30
interpret = 5
shadow_fill = 200
shadow_switch = 40
shadow_invalidate = 8
shadow_update = 16
[bt]
translate_per_instruction = 1000
indirect_lookup = 9
callout = 500
continuation = 60
in_tc_helper = 70
pending_interrupt_check = 3
[paravirt]
hypercall = 300
update_validation = 11
page_table_switch = 80
upcall = 90
[hw]
exit = 400
entry = 600
vmread = 10
vmreads_per_exit = 2
vmwrite = 5
vmwrites_per_injection = 2
ept_violation = 250
user_space_exit = 2000
"#;

fn context(cpl: u8, interrupts_enabled: bool, cr3: u64) -> Context {
    Context { cpl, interrupts_enabled, paging: PagingMode::FourLevel, cr3 }
}

fn golden_trace() -> Vec<u8> {
    let boot = BootState {
        rip: 0x10_0000,
        rax: 0,
        rbx: 0,
        rsp: 0,
        rflags: 2,
        cr0: 0x8000_0011,
        mode: CodeMode::Bits64,
        ram_bytes: 64 << 20,
    };
    let meta = Metadata { workload: "golden".into(), recorder: "test".into(), ..Metadata::default() };
    let mut w = TraceWriter::new(Cursor::new(Vec::new()), meta, boot, &[]).unwrap();
    let block = |address: u64, instructions: u32, bytes: &[u8]| Block {
        address,
        mode: CodeMode::Bits64,
        tag: 0,
        instructions,
        bytes: bytes.to_vec(),
    };
    let k1 = w
        .add_block(&block(
            0x10_0000,
            7,
            &[0xfa, 0x0f, 0x22, 0xd8, 0xfb, 0xe4, 0x80, 0x0f, 0x01, 0x00, 0x9d, 0x48, 0x0f, 0x07],
        ))
        .unwrap();
    let u1 = w
        .add_block(&Block { tag: 0x2000, ..block(0x40_0000, 3, &[0x0f, 0x01, 0x00, 0x0f, 0xa2, 0x0f, 0x05]) })
        .unwrap();
    let k2 = w.add_block(&block(0x10_0100, 3, &[0x48, 0x89, 0x07, 0x0f, 0x01, 0x3f, 0xf4])).unwrap();
    let events = [
        Event::Context { at: 0, context: context(0, false, 0x1000) },
        Event::Block(k1),
        Event::CrWrite { at: 1, cr: 3, old: 0x1000, new: 0x2000 },
        Event::Context { at: 1, context: context(0, false, 0x2000) },
        Event::Context { at: 2, context: context(0, true, 0x2000) },
        Event::Io { at: 3, port: 0x80, size: 1, direction: Direction::Read, value: 0xff },
        Event::Sysret { at: 6 },
        Event::Context { at: 6, context: context(3, true, 0x2000) },
        Event::Block(u1),
        Event::PageTouch {
            at: 0,
            page: 0x40_0000,
            frame: 0x9000,
            access: Access::Execute,
            user: true,
            size: PageSize::Size4K,
            walk: Walk::default(),
        },
        Event::Cpuid { at: 1, leaf: 0, subleaf: 0 },
        Event::Syscall { at: 2 },
        Event::Context { at: 2, context: context(0, false, 0x2000) },
    ];
    for event in &events {
        w.push(event).unwrap();
    }
    for _ in 0..5 {
        w.push(&Event::Block(k2)).unwrap();
        w.push(&Event::PageTableWrite { at: 0, gpa: 0x3008, level: 1, old: 0x5067, new: 0x6067 }).unwrap();
        w.push(&Event::Invlpg { at: 1, address: 0x40_1000 }).unwrap();
        w.push(&Event::Hlt { at: 2, idle: 0 }).unwrap();
    }
    let ending = Ending {
        reason: EndReason::GuestExit,
        exit_status: 0,
        detail: String::new(),
        serial: Vec::new(),
        state_digest: [0; 32],
    };
    w.finish(ending).unwrap().into_inner()
}

fn replay(name: &str, options: &Options) -> Result<Metrics, EngineError> {
    replay_trace(&golden_trace(), name, options)
}

fn replay_trace(bytes: &[u8], name: &str, options: &Options) -> Result<Metrics, EngineError> {
    check(Cursor::new(bytes)).expect("the golden trace is a valid trace");
    let trace = PreparedTrace::new(TraceView::open(bytes).unwrap()).unwrap();
    let profile = Profile::parse(UNIT, "unit", &[]).unwrap();
    let engine: Box<dyn Engine> = engine::by_name(name).unwrap();
    engine.replay(&trace, &profile, options)
}

fn run(name: &str) -> Metrics {
    replay(name, &Options::default()).unwrap()
}

/// The nonzero exit counts, by name.
fn exits(m: &Metrics) -> Vec<(&'static str, u64)> {
    ExitReason::ALL.iter().filter(|r| m.exits_by(**r) > 0).map(|r| (r.name(), m.exits_by(*r))).collect()
}

fn findings(list: Vec<virtlab_engines::Finding>) -> Vec<(&'static str, u64, u64)> {
    list.into_iter().map(|f| (f.kind, f.address, f.count)).collect()
}

fn assert_split(m: &Metrics) {
    assert_eq!((m.instructions_user, m.instructions_kernel), (3, 22));
    let sum: u64 = CycleCause::ALL.iter().map(|c| m.millicycles[*c as usize]).sum();
    assert_eq!(m.cycles(), sum.div_ceil(1000), "every cycle lands in a named cause");
}

#[test]
fn native_has_no_exits_and_costs_the_processor_only() {
    let m = run("native");
    assert_split(&m);
    assert_eq!(m.exits_total(), 0);
    // 25 instructions × 1; cli 2 + sti 2 + sgdt 1 + popfq 3 (K1); sgdt 1 (U1); CR3 write 5; IN 100; SYSRET 10;
    // TLB fill 1; CPUID 7; SYSCALL 10; 5 × INVLPG 4 = 20.  25 + 8 + 1 + 5 + 100 + 10 + 1 + 7 + 10 + 20 = 187.
    assert_eq!(m.cycles(), 187);
    assert!(m.holes().is_empty() && m.detectable_events().is_empty());
}

#[test]
fn trap_and_emulate_traps_privileged_instructions_and_falls_into_the_holes() {
    let m = run("trap-emulate");
    assert_split(&m);
    // cli, sti: interrupt_flag; mov cr3: cr_access; in: io_instruction; sysret and syscall: system_call; the user
    // touch misses the new address space's shadow: shadow_page_fault; K2 × 5: tracing_fault, invlpg, hlt.
    assert_eq!(
        exits(&m),
        [
            ("hlt", 5),
            ("invlpg", 5),
            ("cr_access", 1),
            ("io_instruction", 1),
            ("interrupt_flag", 2),
            ("system_call", 2),
            ("shadow_page_fault", 1),
            ("tracing_fault", 5)
        ]
    );
    // Trapped and emulated: cli, sti, mov cr3, in, sysret, and 5 × (mov [rdi], invlpg, hlt) = 20.
    assert_eq!(m.emulated_instructions, 20);
    assert_eq!(findings(m.holes()), [("popf_ignores_if", 0x10_000a, 1), ("sgdt_reveals_monitor_gdt", 0x10_0007, 1)]);
    assert_eq!(
        findings(m.detectable_events()),
        [("cpuid_reports_host", 0x40_0003, 1), ("sgdt_reveals_monitor_gdt", 0x40_0000, 1)]
    );
    assert_eq!((m.shadow.hidden_faults, m.shadow.root_switches, m.shadow.traced_pages), (1, 1, 1));
    // Instructions 25. K1: cli and sti trap + decode + emulate = 2 × 1110, sgdt 1 and popfq 3 run directly;
    // U1: sgdt 1. CR3: 1110 + shadow switch 40 = 1150. IN: 1110 + device 30 = 1140. SYSRET: 1110.
    // Touch: TLB fill 1 + trap 1000 + shadow fill 200 = 1201. CPUID natively 7. SYSCALL: trap 1000 + reflect
    // 20 = 1020. K2 × 5: write 1110 + shadow update 16, INVLPG 1110 + invalidate 8, HLT 1110 = 3354 each.
    // 25 + 2224 + 1 + 1150 + 1140 + 1110 + 1201 + 7 + 1020 + 16770 = 24648.
    assert_eq!(m.cycles(), 24_648);
    // Five exits each at 0x100100, 0x100103 and 0x100106: ties go by address.
    let top: Vec<_> = m.top_sites(3).iter().map(|s| (s.address, s.cause.name(), s.count)).collect();
    assert_eq!(
        top,
        [
            (0x10_0100, "exit:tracing_fault".to_string(), 5),
            (0x10_0103, "exit:invlpg".to_string(), 5),
            (0x10_0106, "exit:hlt".to_string(), 5)
        ]
    );
}

#[test]
fn hybrid_interprets_the_kernel_and_runs_user_code_directly() {
    let m = run("hybrid");
    assert_split(&m);
    // The user SYSCALL enters the monitor; the user touch misses the shadow; IN and HLT go to the device model.
    assert_eq!(exits(&m), [("hlt", 5), ("io_instruction", 1), ("system_call", 1), ("shadow_page_fault", 1)]);
    assert_eq!(m.emulated_instructions, 22, "every kernel instruction is interpreted");
    assert!(m.holes().is_empty());
    assert_eq!(findings(m.detectable_events()).len(), 2);
    // Kernel 22 × 5 = 110; user 3 + sgdt 1 = 4; CR3 shadow switch 40; IN device 30; touch 1 + 1000 + 200 =
    // 1201; CPUID 7; SYSCALL 1020; K2 × 5: shadow update 16 + invalidate 8 = 120.
    // 110 + 4 + 40 + 30 + 1201 + 7 + 1020 + 120 = 2532.
    assert_eq!(m.cycles(), 2_532);
}

#[test]
fn paravirt_turns_privileged_operations_into_hypercalls_and_batches_page_table_updates() {
    let m = run("paravirt");
    assert_split(&m);
    let calls: Vec<_> =
        Hypercall::ALL.iter().filter(|h| m.hypercalls_by(**h) > 0).map(|h| (h.name(), m.hypercalls_by(*h))).collect();
    // mmuext_op: the CR3 switch and 5 INVLPGs; each INVLPG first flushes the one queued update (mmu_update);
    // SYSRET of a 64-bit kernel is HYPERVISOR_iret; HLT is sched_op. The POST-port IN disappears.
    assert_eq!(calls, [("mmu_update", 5), ("mmuext_op", 6), ("sched_op", 5), ("iret", 1)]);
    assert_eq!(m.page_table_updates_batched, 5);
    assert_eq!(exits(&m), [("system_call", 1)], "a 64-bit guest's system call goes through the hypervisor");
    // 25 instructions; U1 sgdt 1; CR3 300; SYSRET 300; to user: page-table switch 80; touch 1; CPUID 7;
    // SYSCALL trap 1000 + reflect 20; to kernel: 80; K2 × 5: mmu_update 300 + 11, mmuext_op 300, sched_op 300.
    // 25 + 1 + 300 + 300 + 80 + 1 + 7 + 1020 + 80 + 4555 = 6369.
    assert_eq!(m.cycles(), 6_369);

    let mut bits32 = Options::default();
    bits32.set("paravirt.guest_bits", "32").unwrap();
    let m32 = replay("paravirt", &bits32).unwrap();
    // A 32-bit PV kernel: the fast system-call handler and a native return; no page-table switches.
    assert_eq!(m32.exits_total(), 0);
    assert_eq!(m32.hypercalls_by(Hypercall::Iret), 0);
    // 6369 - 300 (iret) - 160 (switches) - 1020 (trap) + 10 (native SYSRET) + 10 (native SYSCALL) = 4909.
    assert_eq!(m32.cycles(), 4_909);
}

#[test]
fn hardware_assist_with_nested_paging_exits_on_io_cpuid_hlt_and_first_touches() {
    let m = run("hw-ept");
    assert_split(&m);
    assert_eq!(exits(&m), [("cpuid", 1), ("hlt", 5), ("io_instruction", 1), ("ept_violation", 1)]);
    // Exit round trip 400 + 600 + 2 × 10 = 1020. 25 + K1 and U1 natively 9; CR3 5; IN 1020 + 10 + device 30 +
    // user space 2000 = 3060; SYSRET 10; touch 1 + 1020 + 250 = 1271; CPUID 1030; SYSCALL 10;
    // K2 × 5: INVLPG 4 + HLT 1030. 25 + 9 + 5 + 3060 + 10 + 1271 + 1030 + 10 + 5170 = 10590.
    assert_eq!(m.cycles(), 10_590);
    assert!(m.holes().is_empty() && m.detectable_events().is_empty());
}

#[test]
fn first_generation_hardware_assist_exits_for_shadow_paging_too() {
    let m = run("hw-shadow");
    assert_split(&m);
    assert_eq!(
        exits(&m),
        [
            ("cpuid", 1),
            ("hlt", 5),
            ("invlpg", 5),
            ("cr_access", 1),
            ("io_instruction", 1),
            ("shadow_page_fault", 1),
            ("tracing_fault", 5)
        ]
    );
    // 34 as hw-ept; CR3 1020 + 10 + 40 = 1070; IN 3060; SYSRET 10; touch 1 + 200 + 1020 = 1221; CPUID 1030;
    // SYSCALL 10; K2 × 5: write 1020 + 10 + 100 + 16 = 1146, INVLPG 1020 + 10 + 8 = 1038, HLT 1030.
    // 34 + 1070 + 3060 + 10 + 1221 + 1030 + 10 + 16070 = 22505.
    assert_eq!(m.cycles(), 22_505);
}

#[test]
fn binary_translation_refuses_64_bit_code_without_long_mode_segment_limits() {
    match replay("bt", &Options::default()) {
        Err(EngineError::Unsupported(reason)) => {
            assert!(reason.contains("bt.lmsle=true") && reason.contains("segment limits"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn binary_translation_translates_kernel_blocks_and_adapts_to_page_table_writers() {
    let mut options = Options::default();
    options.set("bt.lmsle", "true").unwrap();
    options.set("bt.adaptive_threshold", "2").unwrap();
    let m = replay("bt", &options).unwrap();
    assert_split(&m);
    let t = m.translation;
    // K1 and K2 translated, then K2 again once its mov [rdi] took 2 tracing faults: 3 CCFs, 7 + 3 + 3 guest
    // instructions, one retranslation.
    assert_eq!((t.blocks, t.instructions, t.retranslations), (3, 13, 1));
    // Callouts: mov cr3 and sysret (K1); 5 × invlpg and hlt (K2); the guilty write in its last 3 executions.
    assert_eq!(t.callouts, 15);
    // In the TC: cli, sti, sgdt, popfq and the POST-port IN.
    assert_eq!(t.in_tc_emulations, 5);
    // Exits: only the user SYSCALL, the user touch's hidden fault and the first two tracing faults.
    assert_eq!(exits(&m), [("system_call", 1), ("shadow_page_fault", 1), ("tracing_fault", 2)]);
    assert_eq!(m.cycles_for(CycleCause::Translation), 13 * 1000);
    // 12 callouts at 500 (cr3, sysret, 5 invlpg, 5 hlt) and 3 adaptive writes through the in-TC helper at 70.
    assert_eq!(m.cycles_for(CycleCause::Callouts), 12 * 500 + 3 * 70);
    assert!(m.holes().is_empty(), "translated sensitive instructions see virtual values");
    assert_eq!(findings(m.detectable_events()).len(), 2, "user-mode SGDT and CPUID still run directly");
}

#[test]
fn every_engine_counts_the_same_instructions() {
    let mut options = Options::default();
    options.set("bt.lmsle", "true").unwrap();
    for engine in engine::all() {
        let m = replay(engine.name(), &options).unwrap();
        assert_eq!(m.instructions(), 25, "{}", engine.name());
    }
}

/// A second trace for the bare processor's memory work: one kernel block, run twice in full,
///
/// ```text
/// K3 @0x100200 (kernel, 5 instructions)
///   0 0x100200 rep stosq        (512 elements: a page cleared)
///   1 0x100203 rep movsq        (512 elements: a page copied)
///   2 0x100206 div rcx
///   3 0x100209 rep movsb        (10 elements, byte-sized: one by one)
///   4 0x10020b imul rbx, rbx, 31
/// ```
///
/// then once cut short after 2 instructions (the copy faulted after 100 elements and did not retire).
fn memory_work_trace() -> Vec<u8> {
    let boot = BootState {
        rip: 0x10_0200,
        rax: 0,
        rbx: 0,
        rsp: 0,
        rflags: 2,
        cr0: 0x8000_0011,
        mode: CodeMode::Bits64,
        ram_bytes: 64 << 20,
    };
    let meta = Metadata { workload: "golden-memory".into(), recorder: "test".into(), ..Metadata::default() };
    let mut w = TraceWriter::new(Cursor::new(Vec::new()), meta, boot, &[]).unwrap();
    let bytes = [0xf3, 0x48, 0xab, 0xf3, 0x48, 0xa5, 0x48, 0xf7, 0xf1, 0xf3, 0xa4, 0x48, 0x6b, 0xdb, 0x1f];
    let k3 = w
        .add_block(&Block {
            address: 0x10_0200,
            mode: CodeMode::Bits64,
            tag: 0,
            instructions: 5,
            bytes: bytes.to_vec(),
        })
        .unwrap();
    w.push(&Event::Context { at: 0, context: context(0, false, 0x1000) }).unwrap();
    for _ in 0..2 {
        w.push(&Event::Block(k3)).unwrap();
        w.push(&Event::RepString { at: 0, elements: 512 }).unwrap();
        w.push(&Event::RepString { at: 1, elements: 512 }).unwrap();
        w.push(&Event::RepString { at: 3, elements: 10 }).unwrap();
    }
    w.push(&Event::PartialBlock { block: k3, executed: 1 }).unwrap();
    w.push(&Event::RepString { at: 0, elements: 512 }).unwrap();
    w.push(&Event::RepString { at: 1, elements: 100 }).unwrap();
    w.push(&Event::Exception { at: 1, vector: 14, error_code: Some(2), cr2: Some(0x5000), walk: Walk::default() })
        .unwrap();
    let ending = Ending {
        reason: EndReason::GuestExit,
        exit_status: 0,
        detail: String::new(),
        serial: Vec::new(),
        state_digest: [0; 32],
    };
    w.finish(ending).unwrap().into_inner()
}

#[test]
fn rep_string_work_is_priced_per_element_and_divides_and_multiplies_apart() {
    let bytes = memory_work_trace();
    let m = replay_trace(&bytes, "native", &Options::default()).unwrap();
    assert_eq!((m.instructions_user, m.instructions_kernel), (0, 11));
    // Per full execution: 5 instructions; DIV 20 and IMUL 3 beyond them; REP STOSQ 10 + 4096 bytes / 8 = 522;
    // REP MOVSQ 10 + 4096 / 4 = 1034; REP MOVSB (byte elements, one by one) 10 + 10 × 2 = 30.
    // 5 + 23 + 522 + 1034 + 30 = 1614, twice = 3228. The cut-short execution retired 1 instruction (1); its
    // STOSQ 522 and the 100 quadwords the MOVSQ moved before it faulted, 10 + 800 / 4 = 210; the #PF 20.
    // 3228 + 1 + 522 + 210 + 20 = 3981.
    assert_eq!(m.cycles(), 3_981);
    assert_eq!(m.cycles_for(CycleCause::StringOperations), 2 * (522 + 1034 + 30) + 522 + 210);

    // The hybrid monitor interprets the kernel: 5 per instruction, and each string element is a step of the
    // interpreter (5); DIV and IMUL still cost the host's own. Full: 25 + 23 + (512 + 512 + 10) × 5 = 5218,
    // twice 10436; cut short: 5 + (512 + 100) × 5 = 3065; the fault is reflected inside the interpreter (20).
    let h = replay_trace(&bytes, "hybrid", &Options::default()).unwrap();
    assert_eq!(h.cycles(), 10_436 + 3_065 + 20);
    assert_eq!(h.cycles_for(CycleCause::StringOperations), 0);
}
