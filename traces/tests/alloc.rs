//! Reading hostile traces never allocates more than the file's bytes justify: every claimed length and count is
//! checked against what is really there before memory is reserved for it.

mod common;

use std::alloc::System;
use std::io::Cursor;
use std::sync::Mutex;

use common::*;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use virtlab_traces::format::{self, ChunkHeader, ChunkKind, Codec, CHUNK_HEADER_LEN};
use virtlab_traces::*;

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Tests in this binary measure one at a time.
static MEASURING: Mutex<()> = Mutex::new(());

/// Takes the measuring lock and runs the readers once on a valid trace, so that one-time global set-up (iced-x86
/// builds its decoder tables on first use) is not counted against any file.
fn start_measuring() -> std::sync::MutexGuard<'static, ()> {
    let guard = MEASURING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    peak_while_reading(&small_trace());
    guard
}

/// Bytes allocated while reading `trace` every way there is: every allocation counted, none netted against a
/// free, so this bounds the peak from above.
fn peak_while_reading(trace: &[u8]) -> usize {
    let region = Region::new(ALLOCATOR);
    if let Ok(view) = TraceView::open(trace) {
        for event in view.events() {
            if event.is_err() {
                break;
            }
        }
        let _ = view.for_each_event(|_| {});
    }
    if let Ok(mut reader) = TraceReader::new(Cursor::new(trace)) {
        while let Ok(Some(_)) = reader.next_event() {}
    }
    let _ = check(Cursor::new(trace));
    let stats = region.change();
    stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize
}

/// What a file of `len` bytes may justify: its content decompressed (the format bounds the ratio at which a
/// reader reserves memory up front by 256) plus a fixed allowance for the readers' own bookkeeping.
fn justified(len: usize) -> usize {
    256 * len + (64 << 10)
}

fn edit_header(trace: &[u8], index: usize, edit: impl FnOnce(&mut ChunkHeader)) -> Vec<u8> {
    let view = TraceView::open(trace).unwrap();
    let info = view.chunks()[index];
    let mut header = info.header;
    edit(&mut header);
    let mut out = trace.to_vec();
    out[info.offset as usize..info.offset as usize + CHUNK_HEADER_LEN].copy_from_slice(&header.encode());
    out
}

#[test]
fn hostile_lengths_and_counts_allocate_nothing_unjustified() {
    let _guard = start_measuring();
    let trace = small_trace();
    let events = chunk_index(&trace, ChunkKind::Events);
    let blocks = chunk_index(&trace, ChunkKind::Blocks);
    // A zstd frame of 40 bytes that claims the largest raw size a chunk may have.
    let tiny_frame = zstd::bulk::compress(&[0u8; 16], 3).unwrap();
    let lying_chunk = format::chunk_bytes(ChunkKind::Blocks, Codec::Zstd, 1, format::MAX_CHUNK_BYTES, &tiny_frame);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("valid", trace.clone()),
        ("items = u32::MAX", edit_header(&trace, events, |h| h.items = u32::MAX)),
        ("block items = 2^30", edit_header(&trace, blocks, |h| h.items = 1 << 30)),
        ("stored length past the end", edit_header(&trace, events, |h| h.stored_len = format::MAX_CHUNK_BYTES)),
        ("raw length = 4 MiB on a tiny frame", replace_chunk(&trace, blocks, &lying_chunk)),
        ("huge segment length", {
            let raw = [0x80, 0x20, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0x90];
            replace_chunk(
                &trace,
                chunk_index(&trace, ChunkKind::Image),
                &format::chunk_bytes(ChunkKind::Image, Codec::Stored, 1, 9, &raw),
            )
        }),
    ];
    for (name, bytes) in cases {
        let peak = peak_while_reading(&bytes);
        assert!(peak <= justified(bytes.len()), "{name}: {peak} bytes allocated for a {}-byte file", bytes.len());
    }
}

#[test]
fn random_corruptions_allocate_nothing_unjustified() {
    let _guard = start_measuring();
    let trace = small_trace();
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..2000 {
        let mut bytes = trace.clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = next() as u8;
        }
        if round % 3 == 0 {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        }
        let peak = peak_while_reading(&bytes);
        assert!(
            peak <= justified(bytes.len()),
            "round {round}: {peak} bytes allocated for a {}-byte file",
            bytes.len()
        );
    }
}
