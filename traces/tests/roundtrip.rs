//! What is written is what is read: random event streams, multi-chunk synthetic traces, and byte-identical output.

mod common;

use std::io::Cursor;

use common::*;
use proptest::prelude::*;
use virtlab_traces::format::{self, ChunkKind};
use virtlab_traces::synth::{self, EventHasher, SynthConfig};
use virtlab_traces::*;

fn walk() -> impl Strategy<Value = Walk> {
    prop::collection::vec(any::<u32>(), 0..=Walk::MAX_LEVELS).prop_map(|tables| Walk::new(&tables).unwrap())
}

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Read), Just(Direction::Write)]
}

fn context() -> impl Strategy<Value = Context> {
    (0u8..4, any::<bool>(), 0usize..5, any::<u64>()).prop_map(|(cpl, interrupts_enabled, paging, cr3)| Context {
        cpl,
        interrupts_enabled,
        paging: PagingMode::ALL[paging],
        cr3,
    })
}

/// Any event the writer accepts, for a table of `blocks` blocks of `instructions` each.
fn event(blocks: u32, instructions: u32) -> impl Strategy<Value = Event> {
    let at = any::<u32>();
    let descriptor = prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(base, limit)| DescriptorLoad::Gdt { base, limit }),
        (any::<u64>(), any::<u16>()).prop_map(|(base, limit)| DescriptorLoad::Idt { base, limit }),
        any::<u16>().prop_map(|selector| DescriptorLoad::Ldt { selector }),
        any::<u16>().prop_map(|selector| DescriptorLoad::Tr { selector }),
    ];
    prop_oneof![
        8 => (0..blocks).prop_map(|id| Event::Block(BlockId(id))),
        1 => (0..blocks, 0..instructions).prop_map(|(id, executed)| Event::PartialBlock { block: BlockId(id), executed }),
        1 => (at, context()).prop_map(|(at, context)| Event::Context { at, context }),
        1 => (at, any::<u8>(), any::<Option<u32>>(), any::<Option<u64>>(), walk())
            .prop_map(|(at, vector, error_code, cr2, walk)| Event::Exception { at, vector, error_code, cr2, walk }),
        1 => (at, any::<u8>()).prop_map(|(at, vector)| Event::Interrupt { at, vector }),
        1 => (at, any::<u8>()).prop_map(|(at, vector)| Event::SoftwareInterrupt { at, vector }),
        1 => at.prop_map(|at| Event::Syscall { at }),
        1 => at.prop_map(|at| Event::Sysret { at }),
        1 => at.prop_map(|at| Event::Iret { at }),
        1 => (at, prop::sample::select(vec![0u8, 2, 3, 4, 8]), any::<u64>(), any::<u64>())
            .prop_map(|(at, cr, old, new)| Event::CrWrite { at, cr, old, new }),
        1 => (at, any::<u32>(), any::<u64>()).prop_map(|(at, index, value)| Event::MsrRead { at, index, value }),
        1 => (at, any::<u32>(), any::<u64>()).prop_map(|(at, index, value)| Event::MsrWrite { at, index, value }),
        1 => (at, any::<u16>(), prop::sample::select(vec![1u8, 2, 4]), direction(), any::<u32>()).prop_map(
            |(at, port, size, direction, value)| {
                let value = if size == 4 { value } else { value & ((1 << (8 * size)) - 1) };
                Event::Io { at, port, size, direction, value }
            }
        ),
        1 => (at, any::<u32>(), any::<u32>()).prop_map(|(at, leaf, subleaf)| Event::Cpuid { at, leaf, subleaf }),
        1 => (at, any::<u64>()).prop_map(|(at, address)| Event::Invlpg { at, address }),
        1 => (at, descriptor).prop_map(|(at, load)| Event::DescriptorLoad { at, load }),
        1 => (at, any::<u64>()).prop_map(|(at, idle)| Event::Hlt { at, idle }),
        1 => (at, any::<u64>(), 1u8..=5, any::<u64>(), any::<u64>())
            .prop_map(|(at, gpa, level, old, new)| Event::PageTableWrite { at, gpa, level, old, new }),
        1 => (at, any::<u64>(), any::<u64>(), 0usize..3, any::<bool>(), 0usize..3, walk()).prop_map(
            |(at, page, frame, access, user, size, walk)| Event::PageTouch {
                at,
                page: page & !0xfff,
                frame: frame & !0xfff,
                access: Access::ALL[access],
                user,
                size: PageSize::ALL[size],
                walk,
            }
        ),
        1 => (at, any::<u64>(), prop::sample::select(vec![1u8, 2, 4, 8]), direction(), any::<u64>())
            .prop_map(|(at, gpa, size, direction, value)| Event::Mmio { at, gpa, size, direction, value }),
    ]
}

fn stream() -> impl Strategy<Value = (u32, Vec<Event>)> {
    (1u32..400, 2u32..6)
        .prop_flat_map(|(blocks, instructions)| {
            (Just(blocks), Just(instructions), prop::collection::vec(event(blocks, instructions), 0..400))
        })
        .prop_map(|(blocks, _, events)| (blocks, events))
}

/// Streams drawn from a pool of events, so that most events repeat; pools larger than a chunk's event dictionary
/// (256 events) leave some repeated events written out in full.
fn repeating_stream() -> impl Strategy<Value = (u32, Vec<Event>)> {
    (1u32..300, 2u32..6, 1usize..400)
        .prop_flat_map(|(blocks, instructions, pool)| {
            let pool = prop::collection::vec(event(blocks, instructions), pool);
            (Just(blocks), pool, prop::collection::vec(any::<prop::sample::Index>(), 0..2000))
        })
        .prop_map(|(blocks, pool, picks)| (blocks, picks.iter().map(|pick| pool[pick.index(pool.len())]).collect()))
}

fn blocks(count: u32) -> Vec<Block> {
    // Above 224 distinct blocks in a chunk, local indices take the two-byte form; every block has 5 instructions, so partials up to 4 fit.
    (0..count).map(|i| nop_block(0x10_0000 + u64::from(i) * 8, 5)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_read_back_identical((count, events) in stream()) {
        let table = blocks(count);
        let trace = write(&table, &events);
        prop_assert_eq!(read_all(&trace).unwrap(), events.clone());
        let view = TraceView::open(&trace).unwrap();
        prop_assert_eq!(view.blocks().len(), table.len());
        for (id, block) in view.blocks().iter() {
            prop_assert_eq!(block, &table[id.index()]);
        }
        let totals = &view.footer().totals;
        for kind in EventKind::ALL {
            prop_assert_eq!(totals.count(kind), events.iter().filter(|e| e.kind() == kind).count() as u64);
        }
        prop_assert_eq!(view.header().events, events.len() as u64);
        // Same events, same bytes.
        prop_assert_eq!(write(&table, &events), trace);
    }

    #[test]
    fn streams_of_repeated_events_read_back_identical((count, events) in repeating_stream()) {
        let trace = write(&blocks(count), &events);
        // `read_all` compares the view's loop (which takes repeats on its fast path) with the cursor and the
        // streaming reader (which decode every event one at a time).
        prop_assert_eq!(read_all(&trace).unwrap(), events.clone());
        prop_assert_eq!(write(&blocks(count), &events), trace);
    }

    #[test]
    fn random_mutations_never_panic_either_reader(flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
        let mut trace = small_trace();
        for (index, mask) in flips {
            let at = index.index(trace.len());
            trace[at] ^= mask;
        }
        // Either reader may refuse; neither may panic, and neither checker either.
        let _ = TraceView::open(&trace).map(|view| (view.events().count(), check_view(&view).is_ok()));
        let _ = check(Cursor::new(&trace));
    }
}

#[test]
fn a_multi_chunk_synthetic_trace_reads_back_exactly_and_passes_the_checker() {
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 7, instructions: 5_000_000 }).unwrap();
    let trace = cursor.into_inner();
    let view = TraceView::open(&trace).unwrap();
    let event_chunks = view.chunks().iter().filter(|c| c.header.kind == ChunkKind::Events).count();
    assert!(event_chunks >= 2, "expected several event chunks, got {event_chunks}");

    let mut hasher = EventHasher::default();
    let mut count = 0u64;
    view.for_each_event(|event| {
        hasher.add(&event);
        count += 1;
    })
    .unwrap();
    assert_eq!(count, summary.events);
    assert_eq!(hasher.finish(), summary.event_hash);

    // Chunk by chunk, with one scratch reused, gives the same sequence.
    assert_eq!(view.event_chunk_count(), event_chunks);
    let mut by_chunk = EventHasher::default();
    let mut scratch = DecodeScratch::default();
    for index in 0..view.event_chunk_count() {
        view.for_each_event_in_chunk(index, &mut scratch, |event| by_chunk.add(&event)).unwrap();
    }
    assert_eq!(by_chunk.finish(), summary.event_hash);
    assert_eq!(view.footer().totals.instructions, summary.instructions);
    assert_eq!(view.header().instructions, summary.instructions);
    let totals = &view.footer().totals;
    assert_eq!(totals.instructions_user + totals.instructions_kernel, totals.instructions);
    assert!(totals.instructions_user > totals.instructions_kernel, "the model is mostly user code");
    assert!(view.header().modes.has_code(CodeMode::Bits64));
    assert!(view.header().modes.has_paging(PagingMode::FourLevel));

    let report = check(Cursor::new(&trace)).unwrap();
    assert_eq!(report.events, summary.events);
    assert_eq!(report.file_bytes, trace.len() as u64);

    let (again, _) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 7, instructions: 5_000_000 }).unwrap();
    assert!(again.into_inner() == trace, "two writes of the same stream differ");
}

#[test]
fn trace_files_appear_only_when_finished() {
    let dir = std::env::temp_dir().join(format!("virtlab-tracefile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.vlt");
    let mut file = TraceFile::create(&path, metadata(), boot(), &[]).unwrap();
    let id = file.writer().add_block(&nop_block(0x1000, 2)).unwrap();
    file.writer().push(&Event::Context { at: 0, context: boot_context() }).unwrap();
    file.writer().push(&Event::Block(id)).unwrap();
    assert!(!path.exists(), "the destination must not exist before finish");
    file.finish(ending()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(TraceView::open(&bytes).unwrap().footer().totals.instructions, 2);

    let abandoned = dir.join("abandoned.vlt");
    drop(TraceFile::create(&abandoned, metadata(), boot(), &[]).unwrap());
    assert!(!abandoned.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("t.vlt")], "temporary files left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_writer_refuses_what_the_reader_would_refuse() {
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), metadata(), boot(), &[]).unwrap();
    let id = writer.add_block(&nop_block(0x1000, 3)).unwrap();
    let cases = [
        (Event::Block(BlockId(1)), "block 1 does not exist: only 1 blocks were added"),
        (Event::PartialBlock { block: id, executed: 3 }, "retires 3 instructions but the block has only 3"),
        (Event::Io { at: 0, port: 0x80, size: 1, direction: Direction::Write, value: 0x100 }, "does not fit 1 bytes"),
        (Event::CrWrite { at: 0, cr: 1, old: 0, new: 0 }, "CR1 is not a control register"),
        (
            Event::PageTouch {
                at: 0,
                page: 0x1234,
                frame: 0,
                access: Access::Read,
                user: false,
                size: PageSize::Size4K,
                walk: Walk::default(),
            },
            "must be 4 KiB aligned",
        ),
    ];
    for (event, expected) in cases {
        let err = writer.push(&event).unwrap_err();
        assert!(err.to_string().contains(expected), "{event:?}: {err}");
    }
    let err = writer.add_block(&Block { instructions: 2, ..nop_block(0x2000, 1) }).unwrap_err();
    assert!(err.to_string().contains("1 bytes cannot hold 2 instructions"), "{err}");
}

#[test]
fn one_view_serves_many_threads_with_identical_results() {
    fn shareable<T: Send + Sync>(_: &T) {}
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 11, instructions: 400_000 }).unwrap();
    let trace = cursor.into_inner();
    let view = TraceView::open(&trace).unwrap();
    shareable(&view);
    let hashes: Vec<u64> = std::thread::scope(|scope| {
        let passes: Vec<_> = (0..4)
            .map(|pass| {
                let view = &view;
                scope.spawn(move || {
                    let mut hasher = EventHasher::default();
                    if pass % 2 == 0 {
                        view.for_each_event(|event| hasher.add(&event)).unwrap();
                    } else {
                        view.events().for_each(|event| hasher.add(&event.unwrap()));
                    }
                    hasher.finish()
                })
            })
            .collect();
        passes.into_iter().map(|pass| pass.join().unwrap()).collect()
    });
    assert!(hashes.iter().all(|hash| *hash == summary.event_hash), "{hashes:x?}");
}

#[test]
fn format_2_traces_still_read_and_check() {
    let trace = small_trace();
    let old = as_format_2(&trace, 0);
    assert_eq!(TraceView::open(&old).unwrap().version(), format::Version { major: 2, minor: 0 });
    assert_eq!(read_all(&old).unwrap(), read_all(&trace).unwrap());
    let report = check(Cursor::new(&old)).unwrap();
    assert_eq!(report.events, 7);
    assert_eq!(
        check_view(&TraceView::open(&old).unwrap()).unwrap(),
        CheckReport { file_bytes: old.len() as u64, ..report }
    );
    // In 2.x the byte after the block dictionary is the first event, and no chunk has repeats.
    let footer = chunk_index(&old, ChunkKind::Footer);
    let err = read_error(&insert_stored_chunk(&old, footer, ChunkKind::Events, 1, &[1, 0, 0xf5, 0]));
    assert!(matches!(err, TraceError::Malformed { position: 2, .. }), "{err}");
    assert!(err.to_string().contains("repeated event 0 is not in this chunk's event dictionary of 0 events"), "{err}");
}
