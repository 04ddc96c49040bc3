//! The KVM engine on handmade traces: what it refuses from the trace alone (no KVM needed), and, where KVM is
//! usable, what it measures and how it fails — a run that ends differently from the trace, a guest that hangs,
//! a guest that triple-faults, a boot state it cannot set up. Prints whether the KVM side ran or why not.

use std::io::Cursor;
use std::time::Duration;

use virtlab_kvm::{measure, probe, refusal, Backend, KvmError, MeasureOptions, Probe, UserExit};
use virtlab_traces::{
    Block, BootState, CodeMode, Context, EndReason, Ending, Event, Metadata, PagingMode, Segment, TraceView,
    TraceWriter,
};

const LOAD: u64 = 0x10_0000;

/// Prints "K\n" on COM1, reads the MMIO test region, and exits with 5 plus what it read (0).
const HELLO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // 0x100000 mov dx, 0x3f8
    0xb0, b'K', // 0x100004 mov al, 'K'
    0xee, // 0x100006 out dx, al
    0xb0, b'\n', // 0x100007 mov al, '\n'
    0xee,  // 0x100009 out dx, al
    0xa1, 0x00, 0x00, 0x00, 0xd0, // 0x10000a mov eax, [0xd0000000]
    0x04, 0x05, // 0x10000f add al, 5
    0xe6, 0xf4, // 0x100011 out 0xf4, al
];
const HELLO_INSTRUCTIONS: u32 = 8;

fn boot() -> BootState {
    BootState {
        rip: LOAD,
        rax: 0x2bad_b002,
        rbx: 0,
        rsp: 0,
        rflags: 2,
        cr0: 0x11,
        mode: CodeMode::Bits32,
        ram_bytes: 16 << 20,
    }
}

fn kernel() -> Context {
    Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 }
}

/// A trace of `code` (one kernel block of `instructions` run once) whose recorded ending is `ending`.
fn trace(boot: BootState, code: &[u8], instructions: u32, ending: Ending) -> Vec<u8> {
    let metadata = Metadata { workload: "handmade".into(), recorder: "tests".into(), ..Metadata::default() };
    let image = [Segment { gpa: LOAD, bytes: code.to_vec() }];
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), metadata, boot, &image).unwrap();
    let block = Block { address: LOAD, mode: CodeMode::Bits32, tag: 0, instructions, bytes: code.to_vec() };
    let id = writer.add_block(&block).unwrap();
    writer.push(&Event::Context { at: 0, context: kernel() }).unwrap();
    writer.push(&Event::Block(id)).unwrap();
    writer.finish(ending).unwrap().into_inner()
}

fn guest_exit(status: u32, serial: &[u8]) -> Ending {
    Ending {
        reason: EndReason::GuestExit,
        exit_status: status,
        detail: String::new(),
        serial: serial.to_vec(),
        state_digest: [0; 32],
    }
}

fn hello(serial: &[u8]) -> Vec<u8> {
    trace(boot(), HELLO, HELLO_INSTRUCTIONS, guest_exit(5, serial))
}

fn options(runs: u32, timeout: Duration) -> MeasureOptions {
    MeasureOptions { runs, timeout }
}

fn kvm_here() -> Option<Backend> {
    match probe() {
        Probe::Available(backend) => {
            eprintln!("KVM available (backend {}): running the KVM side", backend.name());
            Some(backend)
        }
        Probe::Unavailable(reason) => {
            eprintln!("skipping the KVM side: {reason}");
            None
        }
    }
}

#[test]
fn an_incomplete_recording_is_refused_on_every_backend() {
    let mut ending = guest_exit(0, b"");
    ending.reason = EndReason::InstructionLimit;
    let bytes = trace(boot(), HELLO, HELLO_INSTRUCTIONS, ending);
    let view = TraceView::open(&bytes).unwrap();
    for backend in [Backend::Pvm, Backend::Vmx, Backend::Svm] {
        let reason = refusal(&view, backend).expect("refused");
        assert!(reason.contains("instruction_limit"), "{reason}");
    }
}

#[test]
fn pvm_refuses_kernel_instructions_its_emulator_lacks_and_user_mode_system_calls() {
    // lar eax, ecx at 0x100000, then the exit.
    let lar = [0x0f, 0x02, 0xc1, 0xe6, 0xf4];
    let bytes = trace(boot(), &lar, 2, guest_exit(0, b""));
    let view = TraceView::open(&bytes).unwrap();
    let reason = refusal(&view, Backend::Pvm).expect("refused on PVM");
    assert!(reason.contains("LAR at 0x100000"), "{reason}");
    assert_eq!(refusal(&view, Backend::Vmx), None);

    // A kernel block, then a user block that makes a system call.
    let metadata = Metadata { workload: "user".into(), recorder: "tests".into(), ..Metadata::default() };
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), metadata, boot(), &[]).unwrap();
    let nop =
        |address: u64, tag: u64| Block { address, mode: CodeMode::Bits64, tag, instructions: 1, bytes: vec![0x90] };
    let syscall = Block {
        address: 0x80_0000_0000,
        mode: CodeMode::Bits64,
        tag: 0x20_0000,
        instructions: 1,
        bytes: vec![0x0f, 0x05],
    };
    let kernel_block = writer.add_block(&nop(LOAD, 0)).unwrap();
    let user_block = writer.add_block(&syscall).unwrap();
    let user = Context { cpl: 3, interrupts_enabled: true, paging: PagingMode::FourLevel, cr3: 0x20_0000 };
    writer.push(&Event::Context { at: 0, context: kernel() }).unwrap();
    writer.push(&Event::Block(kernel_block)).unwrap();
    writer.push(&Event::Context { at: 1, context: user }).unwrap();
    writer.push(&Event::Block(user_block)).unwrap();
    writer.push(&Event::Syscall { at: 1 }).unwrap();
    let bytes = writer.finish(guest_exit(0, b"")).unwrap().into_inner();
    let view = TraceView::open(&bytes).unwrap();
    let reason = refusal(&view, Backend::Pvm).expect("refused on PVM");
    assert!(reason.contains("user mode under PVM") && reason.contains("(1 times)"), "{reason}");
    assert_eq!(refusal(&view, Backend::Svm), None);
}

#[test]
fn a_run_is_measured_with_exits_at_their_instructions_and_kvm_statistics() {
    let bytes = hello(b"K\n");
    let view = TraceView::open(&bytes).unwrap();
    let Some(backend) = kvm_here() else {
        let err = measure(&view, &MeasureOptions::default(), |_| {}).unwrap_err();
        assert!(matches!(err, KvmError::Unavailable(_)), "{err}");
        return;
    };
    let mut progress = Vec::new();
    let m = measure(&view, &options(2, Duration::from_secs(20)), |run| progress.push(run)).unwrap();
    assert_eq!(progress, [1, 2]);
    assert_eq!(m.backend, backend);
    assert_eq!(m.runs.len(), 2);
    assert!(m.runs.iter().all(|r| r.user_space_exits == 4 && r.wall_ns > 0), "{:?}", m.runs);
    // Handling the exits in this process is part of the run, and not all of it.
    assert!(m.runs.iter().all(|r| 0 < r.vmm_tsc_cycles && r.vmm_tsc_cycles < r.tsc_cycles), "{:?}", m.runs);
    // The two serial writes and the exit-port write are OUTs, the MMIO load a read; each at its instruction.
    let mut sites: Vec<(UserExit, u64, u64)> = m.sites.iter().map(|s| (s.kind, s.rip, s.count)).collect();
    sites.sort();
    assert_eq!(
        sites,
        [
            (UserExit::IoOut, 0x100006, 1),
            (UserExit::IoOut, 0x100009, 1),
            (UserExit::IoOut, 0x100011, 1),
            (UserExit::MmioRead, 0x10000a, 1)
        ]
    );
    assert_eq!(m.stat("mmio_exits"), Some(1));
    if backend == Backend::Pvm {
        // PVM runs every CPL 0 instruction in KVM's emulator.
        assert_eq!(m.stat("insn_emulation"), Some(u64::from(HELLO_INSTRUCTIONS)));
    }
    let exits = m.stats.iter().find(|s| s.descriptor.name == "exits").expect("vCPU exits statistic");
    assert!(exits.spread.min >= 4, "at least the four user-space exits: {:?}", exits.spread);
}

#[test]
fn a_run_that_ends_differently_from_the_trace_is_not_a_measurement() {
    if kvm_here().is_none() {
        return;
    }
    let bytes = hello(b"X\n");
    let view = TraceView::open(&bytes).unwrap();
    match measure(&view, &options(3, Duration::from_secs(20)), |_| {}) {
        Err(KvmError::Diverged(message)) => {
            assert!(
                message.contains("run 1") && message.contains("\"K\\n\"") && message.contains("\"X\\n\""),
                "{message}"
            )
        }
        other => panic!("expected a divergence, got {other:?}"),
    }
}

#[test]
fn a_hanging_guest_is_stopped_by_the_watchdog_with_its_rip() {
    if kvm_here().is_none() {
        return;
    }
    let bytes = trace(boot(), &[0xeb, 0xfe], 1, guest_exit(0, b""));
    let view = TraceView::open(&bytes).unwrap();
    match measure(&view, &options(1, Duration::from_millis(300)), |_| {}) {
        Err(error @ KvmError::Timeout { rip, .. }) => {
            assert_eq!(rip, LOAD);
            assert!(error.to_string().contains("RIP 0x100000"), "{error}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn a_triple_fault_is_an_error_naming_the_rip() {
    if kvm_here().is_none() {
        return;
    }
    // mov ax, 0xfff8; mov ds, ax: the GDT is empty (Multiboot leaves GDTR undefined), so #GP, which cannot be
    // delivered without an IDT: #DF, then shutdown.
    let code = [0x66, 0xb8, 0xf8, 0xff, 0x8e, 0xd8, 0xeb, 0xfe];
    let bytes = trace(boot(), &code, 3, guest_exit(0, b""));
    let view = TraceView::open(&bytes).unwrap();
    match measure(&view, &options(1, Duration::from_secs(20)), |_| {}) {
        Err(KvmError::TripleFault { rip }) => assert_eq!(rip, LOAD + 4),
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
fn boot_states_the_engine_cannot_set_up_are_refused_with_the_reason() {
    let backend = kvm_here();
    let long_mode = BootState { mode: CodeMode::Bits64, cr0: 0x8000_0011, ..boot() };
    let huge = BootState { ram_bytes: 1 << 40, ..boot() };
    // The image at 1 MiB does not fit in 1 MiB of RAM.
    let small = BootState { ram_bytes: 1 << 20, ..boot() };
    for (state, expected) in [
        (long_mode, "Multiboot entry state"),
        (huge, "at most 0xd0000000 bytes"),
        (small, "guest memory at 0x100000 (19 bytes) lies outside the 1048576 bytes of RAM"),
    ] {
        let bytes = trace(state, HELLO, HELLO_INSTRUCTIONS, guest_exit(5, b"K\n"));
        let view = TraceView::open(&bytes).unwrap();
        let err = measure(&view, &options(1, Duration::from_secs(20)), |_| {}).unwrap_err();
        if backend.is_some() {
            assert!(matches!(err, KvmError::Unrunnable(_)) && err.to_string().contains(expected), "{err}");
        } else {
            assert!(matches!(err, KvmError::Unavailable(_)), "{err}");
        }
    }
}
