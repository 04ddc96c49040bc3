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
//! Sysret@6, Context(CPL 3)@6; U1 with PageTouch(0x400000→0x9000, walked through the PML4 at frame 2, a PDPT at
//! 0x10, a page directory at 0x11 and the page table at frame 3)@0, Cpuid@1, Syscall@2, Context(CPL 0)@2; then K2
//! five times, each with PageTableWrite(0x3008, level 1, 0x5067→0x6067)@0, Invlpg(0x401000)@1, Hlt@2. The
//! written entry is entry 1 of the page table the touch walked through: the one that maps 0x401000.
//! Instructions: user 3, kernel 7 + 5 × 3 = 22.
//!
//! Shadow paging, in every engine that has it: the initial context builds the root of CR3 0x1000 (its table
//! traced); the CR3 write builds the root of 0x2000 (frame 2 traced: one `shadow_protect`); the user touch misses,
//! walks 4 levels and fills, tracing the PDPT, the page directory and the page table (3 × `shadow_protect`); each
//! write to the page table is traced and re-creates entry 1 (mapping 0x401000 to 0x6000) in the one root that
//! shadows the table, and the INVLPG after it drops that entry again.

use std::io::Cursor;

use virtlab_engines::{
    engine, CycleCause, Engine, EngineError, ExitReason, Hypercall, Metrics, Options, PreparedTrace, Primitive, Profile,
};
use virtlab_traces::{
    check, Access, Block, BootState, CodeMode, Context, Direction, EndReason, Ending, Event, Metadata, PageSize,
    PagingMode, TraceView, TraceWriter, Walk,
};

/// Round numbers, so that every total below can be checked by hand: `section.key = value`, written into a
/// profile whose every primitive says it is a round number.
const UNIT: &[(&str, &[(&str, f64)])] = &[
    (
        "native",
        &[
            ("cycles_per_instruction", 1.0),
            ("call_return", 0.0),
            ("divide", 20.0),
            ("multiply", 3.0),
            ("rep_startup", 10.0),
            ("rep_movs_bytes_per_cycle", 4.0),
            ("rep_stos_bytes_per_cycle", 8.0),
            ("rep_element", 2.0),
            ("syscall", 10.0),
            ("sysret", 10.0),
            ("exception", 20.0),
            ("iret", 10.0),
            ("mov_to_cr", 5.0),
            ("mov_from_cr", 0.0),
            ("cli_sti", 2.0),
            ("popf_pushf", 3.0),
            ("invlpg", 4.0),
            ("walk_reference", 1.0),
            ("tlb_entries", 64.0),
            ("port_io", 100.0),
            ("mmio", 50.0),
            ("cpuid", 7.0),
            ("rdtsc", 0.0),
            ("msr", 6.0),
            ("descriptor_load", 0.0),
            ("descriptor_store", 1.0),
            ("swapgs", 0.0),
            ("hlt", 0.0),
        ],
    ),
    (
        "monitor",
        &[
            ("trap", 1000.0),
            ("decode", 100.0),
            ("emulate", 10.0),
            ("reflect", 20.0),
            ("device", 30.0),
            ("interpret", 5.0),
            ("guest_walk_level", 2.0),
            ("shadow_fill", 200.0),
            ("shadow_switch", 40.0),
            ("shadow_invalidate", 8.0),
            ("shadow_update", 16.0),
            ("shadow_protect", 3.0),
            ("unsync_leaf_tables", 0.0),
            ("resync_table", 50.0),
            ("write_flood_threshold", 0.0),
        ],
    ),
    (
        "bt",
        &[
            ("translate_per_instruction", 1000.0),
            ("indirect_lookup", 9.0),
            ("callout", 500.0),
            ("continuation", 60.0),
            ("in_tc_helper", 70.0),
        ],
    ),
    ("paravirt", &[("hypercall", 300.0), ("update_validation", 11.0), ("upcall", 90.0)]),
    (
        "hw",
        &[
            ("exit", 400.0),
            ("entry", 600.0),
            ("vmread", 10.0),
            ("vmwrite", 5.0),
            ("vpid", 1.0),
            ("ept_violation", 250.0),
            ("nested_walk_cache", 1.0),
            ("user_space_exit", 2000.0),
        ],
    ),
];

fn unit_profile(overrides: &[(&str, f64)]) -> Profile {
    let mut text = String::from("name = \"unit\"\ndescription = \"round numbers for golden tests\"\nclock_ghz = 1.0\n");
    for (section, primitives) in UNIT {
        text += &format!("[{section}]\n");
        for (key, value) in *primitives {
            let value = overrides.iter().find(|(k, _)| *k == format!("{section}.{key}")).map_or(*value, |(_, v)| *v);
            text += &format!("{key} = {{ value = {value}, provenance = \"estimate\", source = \"a round number\" }}\n");
        }
    }
    Profile::parse(&text, "unit", &[]).unwrap()
}

fn context(cpl: u8, interrupts_enabled: bool, cr3: u64) -> Context {
    Context { cpl, interrupts_enabled, paging: PagingMode::FourLevel, cr3 }
}

/// How every handmade trace ends: the guest exited with status 0.
fn guest_exit() -> Ending {
    Ending {
        reason: EndReason::GuestExit,
        exit_status: 0,
        detail: String::new(),
        serial: Vec::new(),
        state_digest: [0; 32],
    }
}

/// A handmade trace's writer: a guest of the given width starting at `rip` with paging on, 64 MiB of RAM.
fn writer(workload: &str, mode: CodeMode, rip: u64) -> TraceWriter<Cursor<Vec<u8>>> {
    let boot = BootState { rip, rax: 0, rbx: 0, rsp: 0, rflags: 2, cr0: 0x8000_0011, mode, ram_bytes: 64 << 20 };
    let meta = Metadata { workload: workload.into(), recorder: "test".into(), ..Metadata::default() };
    TraceWriter::new(Cursor::new(Vec::new()), meta, boot, &[]).unwrap()
}

fn golden_trace() -> Vec<u8> {
    let mut w = writer("golden", CodeMode::Bits64, 0x10_0000);
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
            walk: Walk::new(&[2, 0x10, 0x11, 3]).unwrap(),
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
    w.finish(guest_exit()).unwrap().into_inner()
}

fn replay(name: &str, options: &Options) -> Result<Metrics, EngineError> {
    replay_trace(&golden_trace(), name, options)
}

fn replay_trace(bytes: &[u8], name: &str, options: &Options) -> Result<Metrics, EngineError> {
    check(Cursor::new(bytes)).expect("the golden trace is a valid trace");
    let trace = PreparedTrace::new(TraceView::open(bytes).unwrap()).unwrap();
    let profile = unit_profile(&[]);
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
    // TLB fill of a 4-level walk, 4 references × 1; CPUID 7; SYSCALL 10; 5 × INVLPG 4 = 20.
    // 25 + 8 + 1 + 5 + 100 + 10 + 4 + 7 + 10 + 20 = 190.
    assert_eq!(m.cycles(), 190);
    assert_eq!((m.mechanism.tlb_fills, m.mechanism.walk_references), (1, 4));
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
    let shadow = m.shadow;
    assert_eq!((shadow.hidden_faults, shadow.root_switches, shadow.traced_pages), (1, 1, 4));
    assert_eq!((shadow.shadow_updates, shadow.invalidations, shadow.untraced_writes), (5, 5, 0));
    assert_eq!(m.mechanism.guest_walk_references, 4);
    // Instructions 25. K1: cli and sti trap + decode + emulate = 2 × 1110, sgdt 1 and popfq 3 run directly;
    // U1: sgdt 1. CR3: 1110 + shadow switch 40 + protecting the new root's table 3 = 1153. IN: 1110 + device 30.
    // SYSRET: 1110. Touch: TLB fill 4 + trap 1000 + guest walk 4 × 2 + fill 200 + protecting 3 tables 9 = 1221.
    // CPUID natively 7. SYSCALL: trap 1000 + reflect 20. K2 × 5: write 1110 + shadow update 16, INVLPG 1110 +
    // invalidate 8, HLT 1110 = 3354 each. A 64-bit kernel runs in ring 3 beside user code: the monitor switches
    // page tables on the way to user mode and back (a CR3 load 5 each, which flushes the TLB: U1's and then K2's
    // code page are refilled, 4 references each).
    // 25 + 2224 + 1 + 1153 + 1140 + 1110 + 1221 + 7 + 1020 + 16770 + 2 × (5 + 4) = 24689.
    assert_eq!(m.cycles(), 24_689);
    assert_eq!((m.protection.kernel_ring, m.protection.page_table_switches), (Some(3), 2));
    assert_eq!(m.protection.monitor_base, None, "long mode ignores segment limits: paging guards the monitor");
    // 22 traps: cli, sti, mov cr3, in, sysret, the touch, the SYSCALL and 3 in each K2.
    assert_eq!(m.cycles_by(Primitive::Trap), 22 * 1000);
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
    // Kernel 22 × 5 = 110; user 3 + sgdt 1 = 4; CR3: shadow switch 40 + protect 3 = 43; IN device 30; touch 1221
    // (as trap-and-emulate); CPUID 7; SYSCALL 1020; K2 × 5: the interpreter sees the traced store (no trap) and
    // updates the shadow 16, INVLPG invalidates 8.
    // 110 + 4 + 43 + 30 + 1221 + 7 + 1020 + 120 = 2555.
    assert_eq!(m.cycles(), 2_555);
}

#[test]
fn paravirt_turns_privileged_operations_into_hypercalls_and_batches_page_table_updates() {
    let m = run("paravirt");
    assert_split(&m);
    let calls: Vec<_> =
        Hypercall::ALL.iter().filter(|h| m.hypercalls_by(**h) > 0).map(|h| (h.name(), m.hypercalls_by(*h))).collect();
    // mmuext_op: the CR3 switch and 5 INVLPGs; the CR3 switch also tells Xen the new kernel stack; each INVLPG
    // first flushes the one queued update (mmu_update); SYSRET of a 64-bit kernel is HYPERVISOR_iret; HLT is
    // sched_op. The POST-port IN disappears.
    assert_eq!(calls, [("mmu_update", 5), ("mmuext_op", 6), ("stack_switch", 1), ("sched_op", 5), ("iret", 1)]);
    assert_eq!(m.page_table_updates_batched, 5);
    assert_eq!(exits(&m), [("system_call", 1)], "a 64-bit guest's system call goes through the hypervisor");
    assert_eq!((m.mechanism.tlb_flushes, m.mechanism.tlb_refills), (2, 2));
    // A 64-bit hypercall is SYSCALL 10 + Xen's work 300 + SYSRET 10 = 320.
    // 25 instructions; sgdt 1 in K1 and in U1 (CLI, STI, POPF are shared memory); CR3: mmuext_op and
    // stack_switch 640; SYSRET: iret 320; to user: page-table switch (a CR3 load, 5) flushes the TLB: U1's code
    // page is refilled (4 references); the touch's own fill 4; CPUID 7; SYSCALL bounced through Xen: SYSCALL 10
    // + Xen 300 + bounce frame 20 + the return 10 = 340; to kernel: switch 5, K2's code page refilled 4; K2 × 5:
    // INVLPG's mmuext_op 320 and the flushed batch's mmu_update 320 + validating 1 entry 11, sched_op 320.
    // 25 + 2 + 640 + 320 + 5 + 4 + 4 + 7 + 340 + 5 + 4 + 5 × 971 = 6211.
    assert_eq!(m.cycles(), 6_211);

    let mut bits32 = Options::default();
    bits32.set("paravirt.guest_bits", "32").unwrap();
    let m32 = replay("paravirt", &bits32).unwrap();
    // A 32-bit PV kernel in ring 1: a native return; no page-table switches; its hypercalls are traps (exception
    // 20 + Xen 300 + IRET 10 = 330). Only INT 0x80 has the fast trap gate: SYSCALL enters ring 0, so Xen bounces it
    // (SYSCALL 10 + Xen 300 + bounce frame 20 + the return 10 = 340).
    assert_eq!(exits(&m32), [("system_call", 1)]);
    assert_eq!((m32.protection.fast_system_calls, m32.protection.page_table_switches), (0, 0));
    assert_eq!((m32.protection.kernel_ring, m32.protection.monitor_base), (Some(1), Some(0xfc00_0000)));
    assert_eq!(m32.hypercalls_by(Hypercall::Iret), 0);
    assert_eq!(m32.mechanism.tlb_flushes, 0);
    // 25 + 2 + CR3 660 + native SYSRET 10 + touch 4 + CPUID 7 + bounced SYSCALL 340 + 5 × (330 + 341 + 330) = 6053.
    assert_eq!(m32.cycles(), 6_053);
}

#[test]
fn hardware_assist_with_nested_paging_exits_on_io_cpuid_hlt_and_first_touches() {
    let m = run("hw-ept");
    assert_split(&m);
    assert_eq!(exits(&m), [("cpuid", 1), ("hlt", 5), ("io_instruction", 1), ("ept_violation", 1)]);
    // VMCS accesses (reads, writes): every round trip 4 + 3 reads and 6 writes; CPUID and HLT add 3 reads and 2
    // writes (skip the instruction), I/O 2 reads and 2 writes, the EPT violation 2 reads.
    assert_eq!((m.mechanism.vmcs_reads, m.mechanism.vmcs_writes), (10 + 5 * 10 + 9 + 9, 8 + 5 * 8 + 8 + 6));
    // Exit 400 + entry 600 + reads × 10 + writes × 5. 25 + K1 and U1 natively 9; CR3 5; IN: 1000 + 90 + 40 +
    // emulate 10 + device 30 + user space 2000 = 3170; SYSRET 10; touch: a 2-D walk with the nested walk cache,
    // 4 guest + 4 host references = 8, and the frame's first touch exits: 1000 + 90 + 30 + 250 = 1370; CPUID:
    // 1000 + 100 + 40 + 10 = 1150; SYSCALL 10; K2 × 5: INVLPG 4 + HLT 1000 + 100 + 40 = 1144.
    // 25 + 9 + 5 + 3170 + 10 + 1378 + 1150 + 10 + 5720 = 11477.
    assert_eq!(m.cycles(), 11_477);
    assert_eq!(m.mechanism.walk_references, 8);
    assert!(m.holes().is_empty() && m.detectable_events().is_empty());

    // Without the nested walk cache the same touch walks (4 + 1) × (4 + 1) - 1 = 24 references.
    let bytes = golden_trace();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let profile = unit_profile(&[("hw.nested_walk_cache", 0.0)]);
    let uncached = engine::by_name("hw-ept").unwrap().replay(&trace, &profile, &Options::default()).unwrap();
    assert_eq!((uncached.mechanism.walk_references, uncached.cycles()), (24, 11_477 + 16));
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
    // 34 as hw-ept; CR3: 1000 + 13 reads 130 + 8 writes 40 + emulate 10 + shadow switch 40 + protect 3 = 1223;
    // IN 3170; SYSRET 10; touch: fill 4 + exit 1000 + 12 reads 120 + 6 writes 30 + guest walk 8 + fill 200 +
    // protect 9 = 1371; CPUID 1150; SYSCALL 10; K2 × 5: the traced write exits and is fetched and decoded: 1000 +
    // 15 reads 150 + 8 writes 40 + fetch walk 8 + decode 100 + emulate 10 + shadow update 16 = 1324; INVLPG 1000 +
    // 10 reads 100 + 40 + 10 + invalidate 8 = 1158; HLT 1140.
    // 34 + 1223 + 3170 + 10 + 1371 + 1150 + 10 + 5 × 3622 = 25078.
    assert_eq!(m.cycles(), 25_078);

    // Without VPID every transition flushes the TLB: after each exit the guest refills the pages it touches
    // next, here the code page of the block that runs next (4 references each, at most once per exit).
    let bytes = golden_trace();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let no_vpid =
        engine::by_name("hw-shadow").unwrap().replay(&trace, &unit_profile(&[("hw.vpid", 0.0)]), &Options::default());
    let no_vpid = no_vpid.unwrap();
    assert_eq!(no_vpid.mechanism.tlb_flushes, no_vpid.exits_total());
    // Every refill is a page touched after an exit, at 4 references of 1 cycle each.
    assert!(no_vpid.mechanism.tlb_refills > 0);
    assert_eq!(no_vpid.cycles() - m.cycles(), 4 * no_vpid.mechanism.tlb_refills);
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
    // Callouts: mov cr3 and sysret (K1); invlpg and hlt in each of the 5 executions of K2.
    assert_eq!(t.callouts, 12);
    // In the TC: cli, sti, sgdt and popfq; helper calls: the POST-port IN, and the guilty write in K2's last 3
    // executions.
    assert_eq!((t.in_tc_emulations, t.helper_calls), (4, 4));
    // Exits: only the user SYSCALL, the user touch's hidden fault and the first two tracing faults.
    assert_eq!(exits(&m), [("system_call", 1), ("shadow_page_fault", 1), ("tracing_fault", 2)]);
    assert_eq!(m.cycles_for(CycleCause::Translation), 13 * 1000);
    assert_eq!(m.cycles_for(CycleCause::Callouts), 12 * 500);
    assert_eq!(m.cycles_by(Primitive::InTcHelper), 4 * 70);
    assert!(m.holes().is_empty(), "translated sensitive instructions see virtual values");
    assert_eq!(findings(m.detectable_events()).len(), 2, "user-mode SGDT and CPUID still run directly");
    // What the CCFs' code costs, per execution: K1 = cli 1 + mov cr3 (2 emitted + callout 500 + emulate 10) +
    // sti (6 emitted + PUSHF 3 + POPF 3) + in (2 emitted + helper 70) + sgdt 4 + popfq (11 emitted + 3 × 3) +
    // sysret 512 = 1133; K2 first = mov IDENT 1 + invlpg 512 + hlt 512 = 1025, twice; K2 retranslated = the write
    // helper call 2 + 70 = 72, + 1024 = 1096, three times.
    // Translation 13000; K1 1133; U1 3 + sgdt 1; CR3's shadow switch 40 + protect 3; touch 1221; CPUID 7;
    // SYSCALL 1020; K2 2050 + 3288; the two trapped writes 2 × 1110; 5 shadow updates 80; 5 invalidations 40.
    // 13000 + 1133 + 4 + 43 + 1221 + 7 + 1020 + 5338 + 2220 + 80 + 40 = 24106.
    assert_eq!(m.cycles(), 24_106);
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
    let mut w = writer("golden-memory", CodeMode::Bits64, 0x10_0200);
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
    w.finish(guest_exit()).unwrap().into_inner()
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

/// A 32-bit kernel block that loads DS and then reads a word in the top 4 MiB, where a segment-guarded monitor
/// lives: `mov ds, eax` @0x100000, `mov eax, [0xffc01000]` @0x100002, `hlt` @0x100007.
fn monitor_area_trace() -> Vec<u8> {
    let mut w = writer("monitor-area", CodeMode::Bits32, 0x10_0000);
    let bytes = vec![0x8e, 0xd8, 0xa1, 0x00, 0x10, 0xc0, 0xff, 0xf4];
    let k = w.add_block(&Block { address: 0x10_0000, mode: CodeMode::Bits32, tag: 0, instructions: 3, bytes }).unwrap();
    let two_level = Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::TwoLevel, cr3: 0x1000 };
    for event in [
        Event::Context { at: 0, context: two_level },
        Event::Block(k),
        Event::PageTouch {
            at: 1,
            page: 0xffc0_1000,
            frame: 0x5000,
            access: Access::Read,
            user: false,
            size: PageSize::Size4K,
            walk: Walk::new(&[1, 2]).unwrap(),
        },
        Event::Hlt { at: 2, idle: 0 },
    ] {
        w.push(&event).unwrap();
    }
    w.finish(guest_exit()).unwrap().into_inner()
}

#[test]
fn segment_guarded_monitors_fault_on_a_touch_of_their_area_and_count_segment_loads() {
    let bytes = monitor_area_trace();
    // VMware's monitor (top 4 MiB) and Xen's (top 64 MiB) both cover 0xffc01000; hardware assist has no monitor
    // in the guest's address space.
    for (name, base) in [("bt", 0xffc0_0000), ("trap-emulate", 0xffc0_0000), ("paravirt", 0xfc00_0000)] {
        let m = replay_trace(&bytes, name, &Options::default()).unwrap();
        assert_eq!((m.protection.kernel_ring, m.protection.monitor_base), (Some(1), Some(base)), "{name}");
        assert_eq!(m.protection.monitor_area_touches, 1, "{name}");
        assert_eq!(m.protection.shadow_descriptor_loads, 1, "{name}: mov ds");
        let beyond: Vec<_> = findings(m.detectable_events())
            .into_iter()
            .filter(|(kind, _, _)| *kind == "access_beyond_truncated_segment")
            .collect();
        assert_eq!(beyond, [("access_beyond_truncated_segment", 0x10_0002, 1)], "{name}");
        assert_eq!(m.exits_by(ExitReason::ExceptionNmi), 1, "{name}: the #GP the monitor takes");
    }
    let hw = replay_trace(&bytes, "hw-ept", &Options::default()).unwrap();
    assert_eq!((hw.protection.monitor_area_touches, hw.protection.shadow_descriptor_loads), (0, 0));
    assert!(hw.detectable_events().is_empty());
}
