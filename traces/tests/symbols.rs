//! The symbol map (added by format 2.1, kept by 3.0): it round-trips through the writer and both readers, a 2.0
//! trace (whose header ends before it) still reads with an empty map, and a malformed map is refused with the byte that is wrong.

mod common;

use std::io::Cursor;

use common::*;
use virtlab_traces::format::{self, ChunkKind, Codec};
use virtlab_traces::*;

fn symbol(name: &str, start: u64, end: u64) -> Symbol {
    Symbol { name: name.into(), start, end }
}

/// A small trace whose metadata carries `symbols`.
fn trace_with(symbols: SymbolMap) -> Vec<u8> {
    let metadata = Metadata { symbols, ..metadata() };
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), metadata, boot(), &[]).unwrap();
    writer.add_block(&nop_block(0x10_0000, 4)).unwrap();
    writer.push(&Event::Context { at: 0, context: boot_context() }).unwrap();
    writer.push(&Event::Block(BlockId(0))).unwrap();
    writer.finish(ending()).unwrap().into_inner()
}

/// The trace with its header payload replaced by `payload` and the preamble's minor version set to `minor`.
fn with_header(trace: &[u8], payload: &[u8], minor: u16) -> Vec<u8> {
    let chunk = format::chunk_bytes(ChunkKind::Header, Codec::Stored, 1, payload.len() as u32, payload);
    let mut out = replace_chunk(trace, chunk_index(trace, ChunkKind::Header), &chunk);
    out[10..12].copy_from_slice(&minor.to_le_bytes());
    out
}

fn header_payload(trace: &[u8]) -> Vec<u8> {
    let (offset, len, _) = chunks(trace)[chunk_index(trace, ChunkKind::Header)];
    trace[offset + format::CHUNK_HEADER_LEN..offset + len].to_vec()
}

#[test]
fn symbols_round_trip_and_name_addresses() {
    let map =
        SymbolMap::new(vec![symbol("sys_getpid", 0x10_2000, 0x10_2040), symbol("kernel_entry", 0x10_1000, 0x10_1100)])
            .unwrap();
    let trace = trace_with(map.clone());
    assert_eq!(&trace[8..12], &[3, 0, 0, 0], "the writer writes 3.0");
    let view = TraceView::open(&trace).unwrap();
    let read = &view.metadata().symbols;
    assert_eq!(read, &map);
    assert_eq!(read.symbols()[0].name, "kernel_entry", "sorted by address");
    assert_eq!(read.describe(0x10_1000).as_deref(), Some("kernel_entry"));
    assert_eq!(read.describe(0x10_2013).as_deref(), Some("sys_getpid+0x13"));
    assert_eq!(read.describe(0x10_2040), None, "the end is exclusive");
    assert_eq!(read.describe(0x10_1800), None, "between functions");
    let reader = TraceReader::new(Cursor::new(&trace)).unwrap();
    assert_eq!(reader.header().metadata.symbols, map);
    check(Cursor::new(&trace)).unwrap();
}

#[test]
fn a_2_0_trace_without_a_symbol_map_still_reads() {
    let trace = trace_with(SymbolMap::default());
    let mut payload = header_payload(&trace);
    assert_eq!(payload.pop(), Some(0), "an empty map is one count byte at the header's end");
    let old = with_header(&as_format_2(&trace, 0), &payload, 0);
    let view = TraceView::open(&old).unwrap();
    assert_eq!(view.version().to_string(), "2.0");
    assert!(view.metadata().symbols.is_empty());
    assert_eq!(view.metadata().workload, "handmade");
    assert_eq!(read_all(&old).unwrap(), read_all(&trace).unwrap());
}

#[test]
fn malformed_symbol_maps_are_refused_with_the_position() {
    let trace = trace_with(SymbolMap::default());
    let mut base = header_payload(&trace);
    base.pop();
    let at = base.len();
    let with_symbols = |bytes: &[u8]| with_header(&trace, &[&base[..], bytes].concat(), 0);
    let cases: [(&[u8], &str); 5] = [
        (&[2, 1, b'a', 0x10, 4], "length of symbol name"),
        (&[1, 1, b'a', 0x10, 0], "holds no byte"),
        (&[2, 1, b'a', 0x10, 8, 1, b'b', 0x14, 4], "overlaps"),
        (&[2, 1, b'a', 0x20, 4, 1, b'b', 0x10, 4], "not sorted"),
        (&[0xff, 0xff, 0x04], "symbol count"),
    ];
    for (bytes, expected) in cases {
        let message = read_error(&with_symbols(bytes)).to_string();
        assert!(message.contains(expected), "{message}");
        assert!(message.contains("header chunk"), "{message}");
    }
    let message = read_error(&with_symbols(&[1, 1, b'a', 0x10, 4, 9])).to_string();
    assert!(message.contains(&format!("payload byte {}", at + 5)), "trailing bytes after the map: {message}");
}

#[test]
fn the_map_checks_what_it_is_given() {
    assert!(SymbolMap::new(vec![symbol("", 0, 1)]).unwrap_err().0.contains("name of 0 bytes"));
    assert!(SymbolMap::new(vec![symbol("f", 4, 4)]).unwrap_err().0.contains("holds no byte"));
    let overlap = SymbolMap::new(vec![symbol("f", 0, 8), symbol("g", 7, 9)]).unwrap_err();
    assert!(overlap.0.contains("`g` (0x7..0x9) overlaps `f` (0x0..0x8)"), "{overlap}");
    let too_many = (0..=SymbolMap::MAX_SYMBOLS as u64).map(|i| symbol("f", i, i + 1)).collect();
    assert!(SymbolMap::new(too_many).is_err());
}
