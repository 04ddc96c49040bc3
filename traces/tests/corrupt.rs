//! Hand-made corrupt traces: each must give a typed error naming what is wrong and where, from both readers,
//! without panicking.

mod common;

use common::*;
use virtlab_traces::format::{ChunkHeader, ChunkKind, Codec, CHUNK_HEADER_LEN, PREAMBLE_LEN};
use virtlab_traces::*;

/// The trace with chunk `index`'s header edited (its header checksum recomputed, so the edit is what is tested).
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
fn the_small_trace_is_valid() {
    let trace = small_trace();
    assert_eq!(read_all(&trace).unwrap().len(), 7);
    check(std::io::Cursor::new(&trace)).unwrap();
}

#[test]
fn wrong_magic_is_refused_at_offset_zero() {
    let mut trace = small_trace();
    trace[0] = b'X';
    let err = read_error(&trace);
    assert!(matches!(err, TraceError::BadMagic { .. }), "{err}");
    assert_eq!(err.offset(), Some(0));
    assert!(err.to_string().contains("not a virtlab trace"));
}

#[test]
fn unknown_major_version_is_refused_by_name() {
    let mut trace = small_trace();
    trace[8] = 4;
    trace[10] = 0; // minor version 0
    let err = read_error(&trace);
    assert!(matches!(err, TraceError::UnsupportedVersion { major: 4, minor: 0 }), "{err}");
    assert!(err.to_string().contains("version 4.0 cannot be read: this virtlab reads 2.x to 3.x"), "{err}");
}

#[test]
fn a_version_1_trace_is_refused_with_the_advice_to_re_record() {
    let mut trace = small_trace();
    trace[8] = 1;
    trace[10] = 0; // minor version 0
    let err = read_error(&trace);
    assert!(matches!(err, TraceError::UnsupportedVersion { major: 1, minor: 0 }), "{err}");
    let text = err.to_string();
    assert!(text.contains("version 1.0") && text.contains("re-record"), "{text}");
}

#[test]
fn every_truncation_is_a_truncation_error_at_or_before_the_cut() {
    let trace = small_trace();
    let boundaries: Vec<usize> = chunks(&trace).iter().map(|c| c.0).collect();
    for len in 0..trace.len() {
        let err = read_error(&trace[..len]);
        assert!(matches!(err, TraceError::Truncated { .. }), "cut at {len}: {err}");
        let offset = err.offset().unwrap() as usize;
        assert!(offset <= len, "cut at {len}: error offset {offset}");
        if boundaries.contains(&len) {
            // Cut exactly between chunks: the error names the missing chunk at the cut.
            assert_eq!(offset, len, "cut at boundary {len}: {err}");
            assert!(err.to_string().contains("ends without a footer"), "{err}");
        }
    }
    assert_eq!(boundaries[0], PREAMBLE_LEN);
}

#[test]
fn a_payload_length_past_the_end_is_named_with_the_chunk_offset() {
    let trace = small_trace();
    let index = chunk_index(&trace, ChunkKind::Footer);
    let edited = edit_header(&trace, index, |h| h.stored_len += 100);
    let err = read_error(&edited);
    let offset = chunks(&trace)[index].0 as u64;
    assert!(matches!(err, TraceError::Truncated { what: "chunk payload", .. }), "{err}");
    assert_eq!(err.offset(), Some(offset));
}

#[test]
fn a_chunk_larger_than_the_format_allows_is_refused_before_reading_it() {
    let trace = small_trace();
    let edited = edit_header(&trace, 1, |h| h.raw_len = u32::MAX);
    let err = read_error(&edited);
    assert!(matches!(err, TraceError::BadChunkHeader { field: "raw length", .. }), "{err}");
}

#[test]
fn bad_checksums_are_caught_in_headers_and_payloads() {
    let trace = small_trace();
    let (offset, len, kind) = chunks(&trace)[chunk_index(&trace, ChunkKind::Events)];
    let mut payload_flip = trace.clone();
    payload_flip[offset + len - 1] ^= 0x40;
    let err = read_error(&payload_flip);
    assert!(matches!(err, TraceError::ChunkPayloadChecksum { kind: k, .. } if k == kind), "{err}");
    assert_eq!(err.offset(), Some(offset as u64));

    let mut header_flip = trace.clone();
    header_flip[offset + 9] ^= 1;
    let err = read_error(&header_flip);
    assert!(matches!(err, TraceError::ChunkHeaderChecksum { .. }), "{err}");
    assert_eq!(err.offset(), Some(offset as u64));
}

#[test]
fn event_counts_far_beyond_the_payload_fail_on_the_payload_end() {
    let trace = small_trace();
    let index = chunk_index(&trace, ChunkKind::Events);
    let edited = edit_header(&trace, index, |h| h.items = u32::MAX);
    let err = read_error(&edited);
    assert!(matches!(err, TraceError::Malformed { kind: ChunkKind::Events, .. }), "{err}");
    assert!(err.to_string().contains("payload ends"), "{err}");
}

#[test]
fn block_counts_far_beyond_the_payload_fail_on_the_payload_end() {
    let trace = small_trace();
    let index = chunk_index(&trace, ChunkKind::Blocks);
    let edited = edit_header(&trace, index, |h| h.items = 1 << 30);
    let err = read_error(&edited);
    assert!(matches!(err, TraceError::Malformed { kind: ChunkKind::Blocks, .. }), "{err}");
}

#[test]
fn a_huge_declared_length_inside_a_payload_is_refused() {
    // An image chunk whose one segment claims 2^40 bytes: gpa 0x1000, then the length varint.
    let trace = small_trace();
    let mut raw = vec![0x80, 0x20]; // gpa 0x1000
    raw.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x20]); // 2^40
    raw.push(0x90);
    let edited = replace_chunk(
        &trace,
        chunk_index(&trace, ChunkKind::Image),
        &format::chunk_bytes(ChunkKind::Image, Codec::Stored, 1, raw.len() as u32, &raw),
    );
    let err = read_error(&edited);
    assert!(matches!(err, TraceError::Malformed { kind: ChunkKind::Image, position: 2, .. }), "{err}");
    assert!(err.to_string().contains("needs 1099511627776 bytes"), "{err}");
}

#[test]
fn a_block_id_out_of_range_names_the_id_and_the_defined_count() {
    let trace = small_trace();
    // Events chunk whose dictionary names block 9 (the trace defines 2), then executes it (local index 0).
    let footer = chunk_index(&trace, ChunkKind::Footer);
    let err = read_error(&insert_stored_chunk(&trace, footer, ChunkKind::Events, 1, &[1, 9, 0, 0]));
    assert!(matches!(err, TraceError::Malformed { kind: ChunkKind::Events, position: 1, .. }), "{err}");
    assert!(err.to_string().contains("block id 9 is out of range: 2 blocks are defined"), "{err}");
    // A local index past the dictionary: one entry, no repeated events, index 5.
    let err = read_error(&insert_stored_chunk(&trace, footer, ChunkKind::Events, 1, &[1, 0, 0, 5]));
    assert!(matches!(err, TraceError::Malformed { position: 3, .. }), "{err}");
    assert!(err.to_string().contains("local block index 5 is not in this chunk's dictionary of 1 blocks"), "{err}");
}

#[test]
fn a_partial_block_longer_than_its_block_is_refused() {
    let trace = small_trace();
    // Dictionary [block 1 (2 instructions)], no repeated events, then a partial block (head 0xe1) of local 0
    // retiring 5.
    let payload = [1, 1, 0, 0xe1, 0, 5];
    let edited = insert_stored_chunk(&trace, chunk_index(&trace, ChunkKind::Footer), ChunkKind::Events, 1, &payload);
    let err = read_error(&edited);
    assert!(err.to_string().contains("retires 5 instructions, but the block has 2"), "{err}");
}

#[test]
fn a_block_used_before_its_definition_is_out_of_range_there() {
    // The events chunk comes before the blocks chunk that defines its id.
    let trace = small_trace();
    let blocks_at = chunk_index(&trace, ChunkKind::Blocks);
    let edited = insert_stored_chunk(&trace, blocks_at, ChunkKind::Events, 1, &[1, 0, 0, 0]);
    let err = read_error(&edited);
    assert!(err.to_string().contains("block id 0 is out of range: 0 blocks are defined"), "{err}");
}

#[test]
fn chunks_out_of_order_are_refused() {
    let trace = small_trace();
    let image = chunk_index(&trace, ChunkKind::Image);
    let (offset, len, _) = chunks(&trace)[image];
    let image_chunk = trace[offset..offset + len].to_vec();
    // An image chunk after the events.
    let footer = chunk_index(&trace, ChunkKind::Footer);
    let (footer_offset, _, _) = chunks(&trace)[footer];
    let late = [&trace[..footer_offset], &image_chunk[..], &trace[footer_offset..]].concat();
    let err = read_error(&late);
    assert!(matches!(err, TraceError::ChunkOrder { .. }), "{err}");
    assert_eq!(err.offset(), Some(footer_offset as u64));
    // The header missing entirely.
    let (header_offset, header_len, _) = chunks(&trace)[0];
    let headless = [&trace[..header_offset], &trace[header_offset + header_len..]].concat();
    assert!(read_error(&headless).to_string().contains("expected the header chunk first"));
}

#[test]
fn an_unknown_required_chunk_kind_asks_for_a_newer_virtlab() {
    let trace = small_trace();
    let edited = edit_header(&trace, chunk_index(&trace, ChunkKind::Events), |h| h.kind = ChunkKind::Optional(0x80));
    // 0x80 is optional, so that one is skipped; a required unknown kind (7) is refused.
    assert_eq!(read_all(&edited).unwrap().len(), 0);
    let mut raw_kind = trace.clone();
    let (offset, _, _) = chunks(&trace)[chunk_index(&trace, ChunkKind::Events)];
    let mut header: [u8; CHUNK_HEADER_LEN] = trace[offset..offset + CHUNK_HEADER_LEN].try_into().unwrap();
    header[0] = 7;
    let crc = crc32(&header[..20]);
    header[20..].copy_from_slice(&crc.to_le_bytes());
    raw_kind[offset..offset + CHUNK_HEADER_LEN].copy_from_slice(&header);
    let err = read_error(&raw_kind);
    assert!(matches!(err, TraceError::BadChunkHeader { field: "kind", value: 7, .. }), "{err}");
    assert!(err.to_string().contains("newer virtlab"), "{err}");
}

#[test]
fn optional_chunks_are_skipped_by_both_readers() {
    let trace = small_trace();
    let expected = read_all(&trace).unwrap();
    let with_optional = insert_stored_chunk(
        &trace,
        chunk_index(&trace, ChunkKind::Events),
        ChunkKind::Optional(0x90),
        3,
        b"future data",
    );
    assert_eq!(read_all(&with_optional).unwrap(), expected);
}

#[test]
fn bytes_after_the_footer_are_refused() {
    let mut trace = small_trace();
    trace.push(0);
    let err = read_error(&trace);
    assert!(matches!(err, TraceError::Trailing { .. }), "{err}");
}

#[test]
fn a_zstd_payload_that_does_not_decompress_is_named() {
    let trace = small_trace();
    let garbage = b"definitely not a zstd frame";
    let chunk = format::chunk_bytes(ChunkKind::Blocks, Codec::Zstd, 1, 100, garbage);
    let edited = replace_chunk(&trace, chunk_index(&trace, ChunkKind::Blocks), &chunk);
    let err = read_error(&edited);
    assert!(matches!(err, TraceError::Decompress { kind: ChunkKind::Blocks, .. }), "{err}");
}

#[test]
fn invalid_enumerations_inside_events_are_named_with_their_position() {
    let trace = small_trace();
    let footer = chunk_index(&trace, ChunkKind::Footer);
    // Dictionary [block 0], no repeated events, block 0, then an I/O event (kind 12: head 0xec) at 0, port
    // 0x3f8, size byte 3 (not 1, 2 or 4).
    let payload = [1, 0, 0, 0, 0xec, 0, 0xf8, 0x07, 3, 0];
    let err = read_error(&insert_stored_chunk(&trace, footer, ChunkKind::Events, 2, &payload));
    assert!(matches!(err, TraceError::Malformed { position: 8, .. }), "{err}");
    assert!(err.to_string().contains("I/O size and direction 0x03 is not valid"), "{err}");
    // A head beyond the 3.x heads (the 21 kinds from 0xe0, then the repeat 0xf5).
    let err = read_error(&insert_stored_chunk(&trace, footer, ChunkKind::Events, 1, &[0, 0, 0xf6]));
    assert!(err.to_string().contains("unknown event head 0xf6 (format 3.x uses 0xe0 to 0xf5)"), "{err}");
}

#[test]
fn event_dictionaries_are_bounded_and_hold_no_block_executions() {
    let trace = small_trace();
    let footer = chunk_index(&trace, ChunkKind::Footer);
    let insert = |payload: &[u8], items| insert_stored_chunk(&trace, footer, ChunkKind::Events, items, payload);
    // No blocks; 257 repeated events (varint 0x81 0x02).
    let err = read_error(&insert(&[0, 0x81, 0x02], 0));
    assert!(matches!(err, TraceError::Malformed { position: 1, .. }), "{err}");
    assert!(err.to_string().contains("event dictionary of 257 events: a chunk repeats at most 256"), "{err}");
    // A dictionary entry that is a block execution (local index 0 of a one-block dictionary).
    let err = read_error(&insert(&[1, 0, 1, 0], 0));
    assert!(matches!(err, TraceError::Malformed { position: 3, .. }), "{err}");
    assert!(err.to_string().contains("event dictionary entry 0 is a block event"), "{err}");
    // A repeat of an entry the dictionary does not have: one entry (a syscall at 0), repeat 1.
    let err = read_error(&insert(&[0, 1, 0xe6, 0, 0xf5, 1], 1));
    assert!(matches!(err, TraceError::Malformed { position: 4, .. }), "{err}");
    assert!(err.to_string().contains("repeated event 1 is not in this chunk's event dictionary of 1 events"), "{err}");
    // A repeat cut off before its index.
    let err = read_error(&insert(&[0, 1, 0xe6, 0, 0xf5], 1));
    assert!(err.to_string().contains("payload ends before repeated event index"), "{err}");
}

/// CRC-32 (IEEE), bitwise: the tests check the format's checksum independently of the crate's implementation.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn chunk_header_checksums_are_plain_crc32() {
    let trace = small_trace();
    for (offset, _, _) in chunks(&trace) {
        let header = &trace[offset..offset + CHUNK_HEADER_LEN];
        assert_eq!(u32::from_le_bytes(header[20..24].try_into().unwrap()), crc32(&header[..20]));
    }
}

#[test]
fn a_trace_taken_apart_and_stored_reads_back_the_same_events() {
    let trace = small_trace();
    let (preamble, chunks) = format::split_chunks(&trace).unwrap();
    let kinds: Vec<u8> = chunks.iter().map(|c| c.kind).collect();
    assert_eq!(kinds.first(), Some(&ChunkKind::Header.code()));
    assert_eq!(kinds.last(), Some(&ChunkKind::Footer.code()));
    let stored = format::join_stored(&preamble, &chunks);
    let view = TraceView::open(&stored).unwrap();
    assert!(view.chunks().iter().all(|c| c.header.codec == Codec::Stored));
    assert_eq!(read_all(&stored).unwrap(), read_all(&trace).unwrap());
    assert_eq!(format::reseal(&stored), stored, "a valid stored trace is already sealed");
}

#[test]
fn resealing_lets_damage_past_the_checksums_to_the_decoders() {
    let (preamble, chunks) = format::split_chunks(&small_trace()).unwrap();
    let stored = format::join_stored(&preamble, &chunks);
    let footer = TraceView::open(&stored).unwrap().chunks().last().unwrap().offset as usize;
    // The footer's first payload byte, then a stored length far past the end of the file.
    let mut damaged = stored.clone();
    damaged[footer + CHUNK_HEADER_LEN] ^= 0xFF;
    assert!(matches!(read_error(&damaged), TraceError::ChunkPayloadChecksum { .. }));
    let err = read_error(&format::reseal(&damaged));
    assert!(!matches!(err, TraceError::ChunkPayloadChecksum { .. } | TraceError::ChunkHeaderChecksum { .. }), "{err}");

    let mut cut = stored.clone();
    cut[footer + 12..footer + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    let resealed = format::reseal(&cut);
    let header = ChunkHeader::decode(resealed[footer..].first_chunk().unwrap(), footer as u64).unwrap();
    assert_eq!(header.stored_len as usize, stored.len() - footer - CHUNK_HEADER_LEN, "cut to the bytes there are");
    assert_eq!(resealed, stored);
}
