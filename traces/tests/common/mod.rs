//! Helpers shared by the trace tests: small traces built by hand, and chunk surgery for corrupting them.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Cursor;

use virtlab_traces::format::{self, ChunkKind, Codec};
use virtlab_traces::*;

pub fn boot() -> BootState {
    BootState {
        rip: 0x10_0000,
        rax: 0x2bad_b002,
        rbx: 0x9500,
        rsp: 0,
        rflags: 2,
        cr0: 0x11,
        mode: CodeMode::Bits32,
        ram_bytes: 16 << 20,
    }
}

pub fn metadata() -> Metadata {
    Metadata {
        workload: "handmade".into(),
        params: vec![("iterations".into(), "3".into())],
        recorder: "tests".into(),
        recorder_version: "1".into(),
        ..Metadata::default()
    }
}

pub fn ending() -> Ending {
    Ending {
        reason: EndReason::GuestExit,
        exit_status: 0,
        detail: String::new(),
        serial: b"ok\n".to_vec(),
        state_digest: [7; 32],
    }
}

/// `count` one-byte NOPs in 32-bit mode at `address`.
pub fn nop_block(address: u64, count: u32) -> Block {
    Block { address, mode: CodeMode::Bits32, tag: 0, instructions: count, bytes: vec![0x90; count as usize] }
}

pub fn boot_context() -> Context {
    Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 }
}

/// Writes a trace from blocks and events; panics if the writer refuses them.
pub fn write(blocks: &[Block], events: &[Event]) -> Vec<u8> {
    write_with(blocks, events, &[])
}

pub fn write_with(blocks: &[Block], events: &[Event], image: &[Segment]) -> Vec<u8> {
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), metadata(), boot(), image).expect("writer starts");
    for block in blocks {
        writer.add_block(block).expect("block accepted");
    }
    for event in events {
        writer.push(event).expect("event accepted");
    }
    writer.finish(ending()).expect("writer finishes").into_inner()
}

/// A small valid trace: two blocks, a context, side events, a partial block and an exception, with an image.
pub fn small_trace() -> Vec<u8> {
    let blocks = [nop_block(0x10_0000, 4), nop_block(0x10_0010, 2)];
    let events = [
        Event::Context { at: 0, context: boot_context() },
        Event::Block(BlockId(0)),
        Event::Io { at: 1, port: 0x3f8, size: 1, direction: Direction::Write, value: b'o'.into() },
        Event::Block(BlockId(1)),
        Event::PartialBlock { block: BlockId(0), executed: 2 },
        Event::Exception { at: 2, vector: 13, error_code: Some(0), cr2: None, walk: Walk::default() },
        Event::Block(BlockId(1)),
    ];
    let image = [Segment { gpa: 0x10_0000, bytes: vec![0x90; 32] }];
    write_with(&blocks, &events, &image)
}

/// Every chunk of a trace: (offset, length, kind).
pub fn chunks(trace: &[u8]) -> Vec<(usize, usize, ChunkKind)> {
    let view = TraceView::open(trace).expect("valid trace");
    view.chunks().iter().map(|c| (c.offset as usize, c.total_len() as usize, c.header.kind)).collect()
}

/// The trace with chunk `index` replaced by `replacement`.
pub fn replace_chunk(trace: &[u8], index: usize, replacement: &[u8]) -> Vec<u8> {
    let (offset, len, _) = chunks(trace)[index];
    [&trace[..offset], replacement, &trace[offset + len..]].concat()
}

/// The trace with a stored chunk of `kind` holding `raw` inserted before chunk `index`.
pub fn insert_stored_chunk(trace: &[u8], index: usize, kind: ChunkKind, items: u32, raw: &[u8]) -> Vec<u8> {
    let (offset, _, _) = chunks(trace)[index];
    let chunk = format::chunk_bytes(kind, Codec::Stored, items, raw.len() as u32, raw);
    [&trace[..offset], &chunk[..], &trace[offset..]].concat()
}

/// Index of the first chunk of `kind`.
pub fn chunk_index(trace: &[u8], kind: ChunkKind) -> usize {
    chunks(trace).iter().position(|c| c.2 == kind).expect("chunk present")
}

/// Reads every event through all three paths (view loop, view cursor, streaming reader), checking they agree.
pub fn read_all(trace: &[u8]) -> Result<Vec<Event>, TraceError> {
    let view = TraceView::open(trace)?;
    let mut looped = Vec::new();
    view.for_each_event(|e| looped.push(e))?;
    let pulled: Vec<Event> = view.events().collect::<Result<_, _>>()?;
    assert_eq!(looped, pulled, "for_each_event and the cursor disagree");
    let mut reader = TraceReader::new(Cursor::new(trace))?;
    let mut streamed = Vec::new();
    while let Some(event) = reader.next_event()? {
        streamed.push(event);
    }
    assert_eq!(looped, streamed, "the view and the streaming reader disagree");
    assert_eq!(reader.footer(), Some(view.footer()));
    Ok(looped)
}

/// The error both readers give, checking they give the same one.
pub fn read_error(trace: &[u8]) -> TraceError {
    let from_view = match TraceView::open(trace) {
        Err(e) => e,
        Ok(view) => {
            let mut failure = None;
            for item in view.events() {
                if let Err(e) = item {
                    failure = Some(e);
                    break;
                }
            }
            failure.expect("the view read the whole trace without error")
        }
    };
    let from_stream = (|| {
        let mut reader = TraceReader::new(Cursor::new(trace))?;
        while reader.next_event()?.is_some() {}
        Ok::<(), TraceError>(())
    })()
    .expect_err("the streaming reader read the whole trace without error");
    assert_eq!(from_view.to_string(), from_stream.to_string(), "the readers report different errors");
    let mut looped = None;
    if let Ok(view) = TraceView::open(trace) {
        looped = view.for_each_event(|_| {}).err();
    }
    let looped = looped.unwrap_or_else(|| TraceView::open(trace).err().expect("the view's loop read the whole trace"));
    assert_eq!(looped.to_string(), from_view.to_string(), "the view's loop and its cursor report different errors");
    // Both checkers refuse it as malformed, with the readers' words.
    let checked = check(Cursor::new(trace)).expect_err("the streaming checker accepted a malformed trace");
    assert_eq!(checked.to_string(), from_view.to_string(), "the streaming checker reports another error");
    let viewed = TraceView::open(trace).map_err(CheckError::from).and_then(|view| check_view(&view));
    let viewed = viewed.expect_err("the view's checker accepted a malformed trace");
    assert_eq!(viewed.to_string(), from_view.to_string(), "the view's checker reports another error");
    from_view
}

/// `trace` (written by this crate, with no repeated event: every events chunk's event dictionary is empty) as
/// format 2.`minor` wrote it: no event dictionary after each block dictionary, version 2.`minor` in the preamble.
/// (2.0 and 2.1 differ only by 2.1's symbol map at the end of the header, which this leaves as it is.)
pub fn as_format_2(trace: &[u8], minor: u16) -> Vec<u8> {
    let varint_len = |bytes: &[u8]| bytes.iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    let view = TraceView::open(trace).unwrap();
    let mut out = trace[..format::PREAMBLE_LEN].to_vec();
    out[8..10].copy_from_slice(&2u16.to_le_bytes());
    out[10..12].copy_from_slice(&minor.to_le_bytes());
    for info in view.chunks() {
        let start = info.offset as usize;
        let end = start + info.total_len() as usize;
        if info.header.kind != ChunkKind::Events {
            out.extend_from_slice(&trace[start..end]);
            continue;
        }
        let stored = &trace[start + format::CHUNK_HEADER_LEN..end];
        let mut raw = zstd::bulk::decompress(stored, info.header.raw_len as usize).unwrap();
        let mut at = varint_len(&raw);
        let blocks = raw[..at].iter().fold((0u64, 0), |(v, s), b| (v | u64::from(b & 0x7f) << s, s + 7)).0;
        for _ in 0..blocks {
            at += varint_len(&raw[at..]);
        }
        assert_eq!(raw.remove(at), 0, "this trace repeats no event");
        let chunk =
            format::chunk_bytes(ChunkKind::Events, format::Codec::Stored, info.header.items, raw.len() as u32, &raw);
        out.extend_from_slice(&chunk);
    }
    out
}
