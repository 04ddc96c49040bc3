//! Each checker rule, broken on purpose by a trace the writer accepts (the writer checks syntax, not semantics).

mod common;

use std::io::Cursor;

use common::*;
use virtlab_traces::format::ChunkKind;
use virtlab_traces::*;

/// The violation the streaming checker finds, after checking that the view's checker finds the same one.
fn violation(trace: &[u8]) -> Violation {
    let viewed = check_view(&TraceView::open(trace).expect("the trace is well-formed"));
    match check(Cursor::new(trace)) {
        Err(CheckError::Violation(v)) => {
            assert!(matches!(&viewed, Err(CheckError::Violation(w)) if *w == v), "the view's checker gave {viewed:?}");
            v
        }
        other => panic!("expected a violation, got {other:?}"),
    }
}

fn start() -> Event {
    Event::Context { at: 0, context: boot_context() }
}

#[test]
fn the_stream_must_open_with_the_initial_context() {
    let v = violation(&write(&[nop_block(0x1000, 2)], &[Event::Block(BlockId(0))]));
    assert_eq!(v.rule, Rule::StartsWithContext);
    assert!(matches!(v.site, Site::Event { index: 0, .. }));
    assert!(v.message.contains("the first event is block"), "{v}");
}

#[test]
fn side_events_must_lie_inside_their_block() {
    let trace = write(&[nop_block(0x1000, 3)], &[start(), Event::Block(BlockId(0)), Event::Syscall { at: 4 }]);
    let v = violation(&trace);
    assert_eq!(v.rule, Rule::PositionInBlock);
    assert!(matches!(v.site, Site::Event { index: 2, .. }));
    assert!(v.message.contains("at instruction 4 of block #0, which retired only 3"), "{v}");

    // In a partial block the limit is what it retired.
    let partial = [start(), Event::PartialBlock { block: BlockId(0), executed: 1 }, Event::Iret { at: 2 }];
    assert_eq!(violation(&write(&[nop_block(0x1000, 3)], &partial)).rule, Rule::PositionInBlock);

    // And nothing but the initial context may come before the first block.
    let early = write(&[nop_block(0x1000, 3)], &[start(), Event::Hlt { at: 0, idle: 5 }]);
    assert!(violation(&early).message.contains("before any block ran"));
}

#[test]
fn positions_never_go_backwards_within_a_block() {
    let events = [
        start(),
        Event::Block(BlockId(0)),
        Event::Cpuid { at: 2, leaf: 0, subleaf: 0 },
        Event::Invlpg { at: 1, address: 0 },
    ];
    let v = violation(&write(&[nop_block(0x1000, 3)], &events));
    assert_eq!(v.rule, Rule::PositionsInOrder);
    assert!(matches!(v.site, Site::Event { index: 3, .. }));
}

#[test]
fn a_context_event_must_change_the_context() {
    let v = violation(&write(
        &[nop_block(0x1000, 3)],
        &[start(), Event::Block(BlockId(0)), Event::Context { at: 1, context: boot_context() }],
    ));
    assert_eq!(v.rule, Rule::ContextChanges);
}

#[test]
fn sixty_four_bit_code_needs_long_mode_paging() {
    let block = Block { mode: CodeMode::Bits64, ..nop_block(0x1000, 2) };
    let v = violation(&write(&[block], &[start(), Event::Block(BlockId(0))]));
    assert_eq!(v.rule, Rule::CodeModeMatchesPaging);
    assert!(v.message.contains("paging none"), "{v}");
}

#[test]
fn block_bytes_must_decode_to_the_stated_count() {
    // mov eax, imm32 cut short: B8 01 02 is a truncated instruction.
    let truncated = Block { address: 0x1000, mode: CodeMode::Bits32, tag: 0, instructions: 1, bytes: vec![0xb8, 1, 2] };
    let v = violation(&write(&[truncated], &[start(), Event::Block(BlockId(0))]));
    assert_eq!((v.rule, v.site.clone()), (Rule::BlockDecodes, Site::Block(BlockId(0))));
    assert!(v.message.contains("invalid or truncated instruction at 0x1000"), "{v}");

    // Two NOPs claimed as three instructions... no: three bytes of NOP claimed as two.
    let miscounted = Block { instructions: 2, ..nop_block(0x1000, 3) };
    let v = violation(&write(&[miscounted], &[start()]));
    assert!(v.message.contains("decode to 3 instructions, the table says 2"), "{v}");
}

#[test]
fn the_image_must_lie_in_ram_without_overlaps() {
    let outside = [Segment { gpa: (16 << 20) - 4, bytes: vec![0; 8] }];
    let v = violation(&write_with(&[], &[start()], &outside));
    assert_eq!(v.rule, Rule::ImageInRam);
    assert!(v.message.contains("past the end of RAM"), "{v}");

    let overlapping = [Segment { gpa: 0x1000, bytes: vec![0; 16] }, Segment { gpa: 0x1008, bytes: vec![0; 16] }];
    let v = violation(&write_with(&[], &[start()], &overlapping));
    assert_eq!(v.site, Site::Image { gpa: 0x1008 });
}

#[test]
fn footer_and_header_totals_must_match_the_events() {
    let table = [nop_block(0x1000, 3)];
    let base = [start(), Event::Block(BlockId(0))];
    let more = [start(), Event::Block(BlockId(0)), Event::Block(BlockId(0))];
    let (short, long) = (write(&table, &base), write(&table, &more));

    let footer = chunk_index(&short, ChunkKind::Footer);
    let (offset, len, _) = chunks(&long)[chunk_index(&long, ChunkKind::Footer)];
    let wrong_footer = replace_chunk(&short, footer, &long[offset..offset + len]);
    let v = violation(&wrong_footer);
    assert_eq!((v.rule, v.site.clone()), (Rule::FooterTotals, Site::Totals));
    assert!(v.message.contains("footer instruction total is 6 but the events add up to 3"), "{v}");

    let (offset, len, _) = chunks(&long)[0];
    let wrong_header = replace_chunk(&short, 0, &long[offset..offset + len]);
    let v = violation(&wrong_header);
    assert_eq!(v.rule, Rule::HeaderTotals);
    assert!(v.message.contains("header instruction total is 6"), "{v}");
}

#[test]
fn user_and_kernel_instructions_split_at_the_context_change() {
    // 6 instructions: a CPL change at instruction 1 puts instructions 2..5 (four of them) in user mode.
    let user = Context { cpl: 3, ..boot_context() };
    let trace =
        write(&[nop_block(0x1000, 6)], &[start(), Event::Block(BlockId(0)), Event::Context { at: 1, context: user }]);
    check(Cursor::new(&trace)).unwrap();
    let view = TraceView::open(&trace).unwrap();
    let totals = &view.footer().totals;
    assert_eq!((totals.instructions_kernel, totals.instructions_user), (2, 4));
}

#[test]
fn a_rep_string_event_must_name_a_rep_string_instruction() {
    // nop; rep stosd; rep movsb (32-bit code).
    let block = Block {
        address: 0x1000,
        mode: CodeMode::Bits32,
        tag: 0,
        instructions: 3,
        bytes: vec![0x90, 0xf3, 0xab, 0xf3, 0xa4],
    };
    let good = [
        start(),
        Event::Block(BlockId(0)),
        Event::RepString { at: 1, elements: 1024 },
        Event::RepString { at: 2, elements: 0 },
    ];
    check(Cursor::new(write(std::slice::from_ref(&block), &good))).unwrap();
    let bad = [start(), Event::Block(BlockId(0)), Event::RepString { at: 0, elements: 4 }];
    let v = violation(&write(&[block], &bad));
    assert_eq!(v.rule, Rule::RepOnStringInstruction);
    assert!(matches!(v.site, Site::Event { index: 2, .. }));
    assert!(v.message.contains("instruction 0 of block #0 (0x1000), which is not a REP-prefixed string"), "{v}");
}
