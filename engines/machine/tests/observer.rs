//! What the machine reports to a recorder, and the block cache's handling of self-modifying code.

mod common;
use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::*;

#[derive(Debug, Clone, PartialEq)]
enum Report {
    Block { id: u64, address: u64, bytes: Vec<u8>, address_space: u64, count: u32 },
    CutShort(u32, CutShortReason),
    Context(u32, CpuContext),
    Transfer(u32, Transfer),
    Side(u32, SideEvent),
}

#[derive(Default)]
struct Recorder {
    reports: Vec<Report>,
}

impl ExecutionObserver for Recorder {
    fn block(&mut self, block: &BlockExecution<'_>) {
        self.reports.push(Report::Block {
            id: block.id,
            address: block.address,
            bytes: block.bytes.to_vec(),
            address_space: block.address_space,
            count: block.instruction_count,
        });
    }
    fn block_cut_short(&mut self, retired: u32, reason: CutShortReason) {
        self.reports.push(Report::CutShort(retired, reason));
    }
    fn context(&mut self, index: u32, context: &CpuContext) {
        self.reports.push(Report::Context(index, *context));
    }
    fn transfer(&mut self, index: u32, transfer: &Transfer) {
        self.reports.push(Report::Transfer(index, *transfer));
    }
    fn side_event(&mut self, index: u32, event: &SideEvent) {
        self.reports.push(Report::Side(index, *event));
    }
}

impl Recorder {
    fn side_events(&self) -> Vec<SideEvent> {
        self.reports
            .iter()
            .filter_map(|report| if let Report::Side(_, event) = report { Some(*event) } else { None })
            .collect()
    }
    fn transfers(&self) -> Vec<Transfer> {
        self.reports
            .iter()
            .filter_map(|report| if let Report::Transfer(_, t) = report { Some(*t) } else { None })
            .collect()
    }
    fn blocks_at(&self, address: u64) -> Vec<u64> {
        self.reports
            .iter()
            .filter_map(|report| match report {
                Report::Block { id, address: at, .. } if *at == address => Some(*id),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn self_modifying_code_is_re_decoded_with_a_new_block_id() {
    // Block at PATCHED: `mov eax, imm32; ret`. The caller runs it, patches the immediate, runs it again.
    const PATCHED: u64 = CODE + 0x800;
    let mut machine = long_mode_machine();
    let mut recorder = Recorder::default();
    place(&mut machine, PATCHED, |a| {
        a.mov(eax, 5).unwrap();
        a.ret().unwrap();
    });
    place(&mut machine, CODE + 0x100, |a| exit(a, 9));
    let outcome = run_code_observed(&mut machine, &mut recorder, |a| {
        a.mov(rbx, PATCHED).unwrap();
        a.call(rbx).unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(dword_ptr(PATCHED + 1), 7).unwrap();
        a.call(rbx).unwrap();
        a.mov(r9, rax).unwrap();
        a.jmp(CODE + 0x100).unwrap();
    })
    .unwrap();
    assert_eq!(outcome.exit_status, 9);
    assert_eq!((machine.cpu().gpr[8], machine.cpu().gpr[9]), (5, 7));
    let ids = recorder.blocks_at(PATCHED);
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "changed bytes, new block id");
}

#[test]
fn a_write_to_the_running_block_takes_effect_at_the_next_instruction() {
    let mut machine = long_mode_machine();
    // The immediate of the `mov ecx, 1` right after the store is rewritten to 2 before it runs.
    let code = assemble(CODE, |a| {
        a.mov(rdi, CODE + 0x20).unwrap();
        a.mov(dword_ptr(rdi + 1), 2).unwrap();
        a.nop().unwrap();
        while a.instructions().len() < 3 {
            a.nop().unwrap();
        }
    });
    write_bytes(&mut machine, CODE, &code);
    let padding = 0x20 - code.len();
    write_bytes(&mut machine, CODE + code.len() as u64, &vec![0x90; padding]);
    place(&mut machine, CODE + 0x20, |a| {
        a.mov(ecx, 1).unwrap();
        a.mov(rax, rcx).unwrap();
        a.out(0xF4, al).unwrap();
    });
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 2);
}

#[test]
fn recorder_sees_blocks_system_values_and_memory_events() {
    let mut machine = long_mode_machine();
    use_small_pages(&mut machine);
    let mut recorder = Recorder::default();
    place(&mut machine, HANDLERS, |a| {
        a.mov(al, 0x20).unwrap();
        a.out(0x20, al).unwrap();
        a.iretq().unwrap();
    });
    set_gate(&mut machine, 0x08, HANDLERS, 0, 0, false);
    let outcome = run_code_observed(&mut machine, &mut recorder, |a| {
        a.mov(rax, qword_ptr(DATA)).unwrap();
        a.mov(rax, qword_ptr(DATA + 8)).unwrap();
        a.mov(qword_ptr(DATA), rax).unwrap();
        a.invlpg(byte_ptr(DATA)).unwrap();
        a.mov(rax, qword_ptr(DATA)).unwrap();
        a.mov(eax, 0x8000_0001u32).unwrap();
        a.cpuid().unwrap();
        a.mov(ecx, 0xC000_0081u32).unwrap();
        a.rdmsr().unwrap();
        a.wrmsr().unwrap();
        // A PTE write: PT_LOW is reachable from CR3.
        a.mov(rax, (DATA + 0x5000) | 7).unwrap();
        a.mov(qword_ptr(PT_LOW + ((DATA + 0x5000) >> 12) * 8), rax).unwrap();
        a.mov(rax, cr3).unwrap();
        a.mov(cr3, rax).unwrap();
        a.mov(rsi, DATA).unwrap();
        a.mov(dx, 0x3F8).unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.rep().outsb().unwrap();
        a.mov(rdi, MMIO_TEST_BASE).unwrap();
        a.mov(dword_ptr(rdi), 0x1234).unwrap();
        // One timer interrupt while halted.
        a.mov(al, 0xFE).unwrap();
        a.out(0x21, al).unwrap();
        a.mov(al, 0x30).unwrap();
        a.out(0x43, al).unwrap();
        a.mov(al, 100).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(al, 0).unwrap();
        a.out(0x40, al).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cli().unwrap();
        exit(a, 0);
    })
    .unwrap();
    assert_eq!(outcome.exit_status, 0);
    let events = recorder.side_events();
    let touches: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            SideEvent::PageTouch { virtual_page, kind, .. } if *virtual_page == DATA => Some(*kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        touches,
        vec![AccessKind::Read, AccessKind::Write, AccessKind::Read, AccessKind::Read],
        "first read, first write, read again after INVLPG, and again after the CR3 load"
    );
    assert!(events.contains(&SideEvent::Invlpg { address: DATA }));
    assert!(events.contains(&SideEvent::Cpuid { leaf: 0x8000_0001, subleaf: 0 }));
    assert!(events.iter().any(|event| matches!(event, SideEvent::MsrRead { index: 0xC000_0081, .. })));
    assert!(events.iter().any(|event| matches!(event, SideEvent::MsrWrite { index: 0xC000_0081, .. })));
    let pte_address = PT_LOW + ((DATA + 0x5000) >> 12) * 8;
    assert!(events.contains(&SideEvent::PageTableWrite {
        gpa: pte_address,
        level: 1,
        old: (DATA + 0x5000) | 7,
        new: (DATA + 0x5000) | 7
    }));
    assert!(events.contains(&SideEvent::ControlRegisterWrite { cr: 3, old: PML4, new: PML4 }));
    let serial_out: Vec<_> = events
        .iter()
        .filter(|event| matches!(event, SideEvent::Io { port: 0x3F8, direction: IoDirection::Out, .. }))
        .collect();
    assert_eq!(serial_out.len(), 2, "one I/O event per string element");
    assert!(events.contains(&SideEvent::Mmio {
        gpa: MMIO_TEST_BASE,
        size: 4,
        direction: IoDirection::Out,
        value: 0x1234
    }));
    let idle =
        events.iter().find_map(|event| if let SideEvent::Hlt { idle } = event { Some(*idle) } else { None }).unwrap();
    assert!(idle > 0 && idle < 100 * 838);
    assert!(recorder.transfers().iter().any(|t| matches!(t, Transfer::ExternalInterrupt { vector: 8, .. })));
    assert!(recorder.transfers().iter().any(|t| matches!(t, Transfer::InterruptReturn { .. })));
    match &recorder.reports[0] {
        Report::Context(0, context) => {
            assert_eq!(
                (context.cpl, context.paging, context.cr3, context.interrupts_enabled),
                (0, PagingMode::FourLevel, PML4, false)
            )
        }
        other => panic!("the first report is the initial context, got {other:?}"),
    }
    // The fetch's first-touch report (execute) belongs to the block it fetched: it follows the block, at 0.
    assert!(matches!(
        recorder.reports[2],
        Report::Side(0, SideEvent::PageTouch { kind: AccessKind::Execute, virtual_page: CODE, .. })
    ));
    match &recorder.reports[1] {
        Report::Block { address, bytes, address_space, count, .. } => {
            assert_eq!(*address, CODE);
            assert_eq!(&bytes[..], &machine.ram()[CODE as usize..CODE as usize + bytes.len()]);
            assert_eq!(*address_space, PML4, "kernel code on a user page is tagged with CR3");
            assert!(*count > 1);
        }
        other => panic!("expected a block, got {other:?}"),
    }
    assert!(recorder.reports.iter().any(|r| matches!(r, Report::Context(_, c) if c.interrupts_enabled)));
}

#[test]
fn exceptions_cut_blocks_short_and_report_context_and_transfers() {
    let mut machine = long_mode_machine();
    let mut recorder = Recorder::default();
    recording_handler(&mut machine, 14, HANDLERS);
    machine.cpu_mut().msr.lstar = HANDLERS + 0x100;
    place(&mut machine, USER_CODE, |a| {
        a.nop().unwrap();
        a.nop().unwrap();
        a.mov(rax, qword_ptr(0x3000_0000_0000u64)).unwrap();
    });
    let outcome = run_code_observed(&mut machine, &mut recorder, |a| enter_user(a, 0x202)).unwrap();
    assert_eq!(outcome.exit_status, 14);
    let user_block = recorder
        .reports
        .iter()
        .position(|r| matches!(r, Report::Block { address, .. } if *address == USER_CODE))
        .unwrap();
    assert!(
        // The block runs on into the zero bytes after the code (ADD [RAX], AL), up to the block limit.
        matches!(&recorder.reports[user_block], Report::Block { address_space, count: 64, .. } if *address_space == PML4),
        "{:?}",
        recorder.reports[user_block]
    );
    // The fetch's first execute touch of the user page, then the fault that cut the block short.
    assert!(matches!(
        recorder.reports[user_block + 1],
        Report::Side(0, SideEvent::PageTouch { kind: AccessKind::Execute, user: true, .. })
    ));
    assert_eq!(recorder.reports[user_block + 2], Report::CutShort(2, CutShortReason::Exception));
    match &recorder.reports[user_block + 3] {
        Report::Transfer(2, Transfer::Exception { vector: 14, error_code: Some(4), cr2: Some(_), rip, walk }) => {
            assert_eq!(*rip, USER_CODE + 2);
            // The walk starts at the PML4 and stops at the first non-present entry, which is in that table.
            let walk = walk.expect("a page fault carries its walk");
            assert_eq!((walk.levels, walk.tables[0]), (1, PML4), "{walk:?}");
        }
        other => panic!("expected the #PF transfer, got {other:?}"),
    }
    let contexts: Vec<u8> = recorder
        .reports
        .iter()
        .filter_map(|r| if let Report::Context(_, c) = r { Some(c.cpl) } else { None })
        .collect();
    assert_eq!(contexts, vec![0, 3, 0]);
    assert!(recorder.transfers().iter().any(|t| matches!(t, Transfer::InterruptReturn { to, .. } if *to == USER_CODE)));
}

#[test]
fn recording_does_not_change_the_execution() {
    let build = |a: &mut CodeAssembler| {
        let mut top = a.create_label();
        a.mov(rcx, 1000u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(qword_ptr(rcx * 8 + DATA), rcx).unwrap();
        a.add(rax, qword_ptr(rcx * 8 + DATA)).unwrap();
        a.loop_(top).unwrap();
        exit(a, 0);
    };
    let mut plain = long_mode_machine();
    place(&mut plain, CODE, build);
    let first = run_prepared(&mut plain).unwrap();
    let mut recorded = long_mode_machine();
    let mut recorder = Recorder::default();
    let second = run_code_observed(&mut recorded, &mut recorder, build).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.digest, plain.state_digest());
    assert_eq!(first.retired_kernel, 1 + 3 * 1000 + 2);
}

#[test]
fn linking_a_new_table_makes_its_entries_reported_at_once() {
    const NEW_TABLE: u64 = 0xB000;
    let mut machine = long_mode_machine();
    let mut recorder = Recorder::default();
    run_code_observed(&mut machine, &mut recorder, |a| {
        // PD entry 1 (2..4 MiB) becomes a pointer to a fresh page table, then the code fills it.
        a.mov(rax, NEW_TABLE | 7).unwrap();
        a.mov(qword_ptr(PD + 8), rax).unwrap();
        a.mov(rax, 0x20_0000u64 | 7).unwrap();
        a.mov(qword_ptr(NEW_TABLE), rax).unwrap();
        exit(a, 0);
    })
    .unwrap();
    let writes: Vec<(u64, u8)> = recorder
        .side_events()
        .iter()
        .filter_map(|event| match event {
            SideEvent::PageTableWrite { gpa, level, .. } => Some((*gpa, *level)),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![(PD + 8, 2), (NEW_TABLE, 1)]);
}

#[test]
fn rep_stos_over_later_code_in_the_same_block_retires_once() {
    let mut machine = long_mode_machine();
    let code = assemble(CODE, |a| {
        let mut patched = a.create_label();
        a.lea(rdi, ptr(patched)).unwrap();
        a.mov(al, 0x90).unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.rep().stosb().unwrap();
        a.set_label(&mut patched).unwrap();
        a.ud2().unwrap();
        exit(a, 0x21);
    });
    write_bytes(&mut machine, CODE, &code);
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 0x21, "the UD2 became two NOPs before it ran");
    assert_eq!(outcome.retired_kernel, 4 + 2 + 2);
}
