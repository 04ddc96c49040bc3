//! Records hand-assembled guests and checks the traces: valid by the checker, with the counts the code implies.

use std::io::Cursor;
use std::path::PathBuf;

use virtlab_machine::multiboot::{flat_image, FLAT_IMAGE_CODE_OFFSET, FLAT_IMAGE_LOAD};
use virtlab_machine::MachineConfig;
use virtlab_record::{record_to_file, RecordRequest};
use virtlab_traces::{check, Direction, EndReason, Event, EventKind, Metadata, TraceView};

const LOAD: u32 = FLAT_IMAGE_LOAD;
const CODE_OFFSET: usize = FLAT_IMAGE_CODE_OFFSET as usize;

fn record(name: &str, code: &[u8], max_instructions: u64) -> (Vec<u8>, virtlab_record::RecordSummary) {
    let dir = std::env::temp_dir().join(format!("virtlab-record-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("t.vlt");
    let request = RecordRequest {
        image: &flat_image(code),
        metadata: Metadata { workload: name.into(), recorder: "tests".into(), ..Metadata::default() },
        machine: MachineConfig::default(),
        max_instructions,
        timeout: None,
    };
    let summary = record_to_file(&path, request).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (bytes, summary)
}

/// Nine instructions: a serial write, a POST-port read, CPUID leaf 0, an MMIO store, the exit-port write (7).
const PROBE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'R', 0xee, // mov al, 'R'; out dx, al
    0xe4, 0x80, // in al, 0x80
    0x31, 0xc0, // xor eax, eax
    0x0f, 0xa2, // cpuid
    0xa3, 0x00, 0x00, 0x00, 0xd0, // mov [0xd0000000], eax
    0xb0, 0x07, 0xe6, 0xf4, // mov al, 7; out 0xf4, al
    0xeb, 0xfe, // jmp $
];

#[test]
fn a_recorded_guest_gives_a_valid_trace_with_the_counts_its_code_implies() {
    let (trace, summary) = record("probe", PROBE, 1_000_000);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    let footer = view.footer();
    assert_eq!(footer.ending.reason, EndReason::GuestExit);
    assert_eq!(footer.ending.exit_status, 7);
    assert_eq!(footer.ending.serial, b"R");
    assert_eq!(footer.totals.instructions, 9);
    assert_eq!(summary.instructions, 9);
    assert_eq!(footer.totals.instructions_kernel, 9);
    assert_eq!(footer.totals.count(EventKind::Io), 3, "serial out, POST in, exit out");
    assert_eq!(footer.totals.count(EventKind::Cpuid), 1);
    assert_eq!(footer.totals.count(EventKind::Mmio), 1);
    let mut events = Vec::new();
    view.for_each_event(|event| events.push(event)).unwrap();
    // The machine ends a block after every port access, so the code runs as three blocks: [mov, mov, out],
    // [in], [xor, cpuid, mov, mov, out].
    assert_eq!(footer.totals.count(EventKind::Block), 3);
    let post_read = Event::Io { at: 0, port: 0x80, size: 1, direction: Direction::Read, value: 0xff };
    assert!(events.contains(&post_read), "{events:?}");
    assert!(events.contains(&Event::Cpuid { at: 1, leaf: 0, subleaf: 0 }), "{events:?}");
    assert_eq!(view.boot().rax, 0x2bad_b002);
    assert_eq!(view.boot().rip, u64::from(LOAD) + CODE_OFFSET as u64);
    // The image holds the loaded kernel (the Multiboot header at 1 MiB is part of it).
    assert!(view
        .image()
        .iter()
        .any(|s| s.gpa == u64::from(LOAD) && s.bytes.starts_with(&0x1bad_b002u32.to_le_bytes())));
}

#[test]
fn a_guest_that_never_stops_gives_a_valid_incomplete_trace() {
    let (trace, _) = record("loop", &[0xeb, 0xfe], 1000);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    assert_eq!(view.footer().ending.reason, EndReason::InstructionLimit);
    assert!(!view.footer().is_complete());
    assert_eq!(view.footer().totals.instructions, 1000);
    assert!(view.footer().ending.detail.contains("instruction limit"), "{}", view.footer().ending.detail);
}

#[test]
fn a_guest_flooding_the_serial_port_ends_a_valid_incomplete_trace_naming_the_out() {
    // mov dx, 0x3f8; mov al, 'x'; again: out dx, al; jmp again
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfd];
    let (trace, _) = record("flood", &code, 10_000_000);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    assert_eq!(view.footer().ending.reason, EndReason::MachineError);
    assert!(!view.footer().is_complete());
    let out = u64::from(LOAD) + CODE_OFFSET as u64 + 6;
    let detail = &view.footer().ending.detail;
    assert!(detail.contains("serial port") && detail.contains(&format!("{out:#x}")), "{detail}");
    // Two instructions before the loop, then OUT and JMP per byte; the OUT of byte 2^20 + 1 is stopped.
    assert_eq!(view.footer().totals.instructions, 2 + 2 * (1 << 20));
}

#[test]
fn a_triple_fault_ends_the_trace_with_its_chain() {
    // lidt [limit 0]; mov ax, 0xfff8; mov ds, ax -> #GP -> #DF -> triple fault.
    let descriptor = LOAD + CODE_OFFSET as u32 + 16;
    let mut code = vec![0x0f, 0x01, 0x1d];
    code.extend_from_slice(&descriptor.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xb8, 0xf8, 0xff, 0x8e, 0xd8, 0xeb, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let (trace, _) = record("triple", &code, 1000);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    assert_eq!(view.footer().ending.reason, EndReason::TripleFault);
    // lidt and mov ax retired; mov ds faulted.
    assert_eq!(view.footer().totals.instructions, 2);
    assert_eq!(view.footer().totals.count(EventKind::DescriptorLoad), 1);
}

#[test]
fn a_guest_writing_outside_ram_ends_a_valid_incomplete_trace_naming_the_address() {
    // xor eax, eax; mov [0xe0000000], eax; jmp $ — neither RAM nor the MMIO test region.
    let code = [0x31, 0xc0, 0xa3, 0x00, 0x00, 0x00, 0xe0, 0xeb, 0xfe];
    let (trace, _) = record("outside-ram", &code, 1000);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    assert_eq!(view.footer().ending.reason, EndReason::MachineError);
    assert!(!view.footer().is_complete());
    let store = u64::from(LOAD) + CODE_OFFSET as u64 + 2;
    let detail = &view.footer().ending.detail;
    assert!(detail.contains("0xe0000000") && detail.contains(&format!("RIP {store:#x}")), "{detail}");
    assert_eq!(view.footer().totals.instructions, 1, "the XOR retired, the store did not");
}

#[test]
fn a_guest_meeting_an_unmodelled_instruction_ends_a_valid_incomplete_trace_naming_it() {
    // nop; fninit (x87, not modelled); jmp $
    let code = [0x90, 0xdb, 0xe3, 0xeb, 0xfe];
    let (trace, _) = record("unmodelled", &code, 1000);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    assert_eq!(view.footer().ending.reason, EndReason::MachineError);
    assert!(!view.footer().is_complete());
    let fninit = u64::from(LOAD) + CODE_OFFSET as u64 + 1;
    let detail = &view.footer().ending.detail;
    assert!(detail.contains(&format!("fninit at {fninit:#x} (32-bit")), "{detail}");
    assert_eq!(view.footer().totals.instructions, 1, "the NOP retired");
}
