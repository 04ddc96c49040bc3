//! Payload encodings: varints, strings, and the records of each chunk kind. See `FORMAT.md` for the layouts.
//!
//! Decoders take untrusted bytes: every length is checked against what remains before anything is allocated, and
//! every enumerated value is checked against its known range.

use crate::error::PayloadError;
use crate::format::{MAX_BLOCK_BYTES, MAX_BLOCK_INSTRUCTIONS, MAX_STRING_BYTES};
use crate::model::{
    Access, Block, BlockId, BootState, CodeMode, Context, DescriptorLoad, Direction, EndReason, Ending, Event,
    EventKind, Footer, GuestModes, Metadata, PageSize, PagingMode, Segment, Symbol, SymbolMap, Totals, Walk,
};

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads a payload front to back; positions in errors are byte offsets within the payload.
pub(crate) struct PayloadReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> PayloadReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        PayloadReader { buf, pos: 0 }
    }

    pub fn starting_at(buf: &'a [u8], pos: usize) -> Self {
        PayloadReader { buf, pos }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn error(&self, message: impl Into<String>) -> PayloadError {
        PayloadError::new(self.pos, message)
    }

    // The hot methods below are inlined into the event loops and hand only values to their cold error paths:
    // a reader whose address escaped into a call would live in memory, and every byte read would store and
    // reload its position.

    #[inline(always)]
    pub fn u8(&mut self, what: &str) -> Result<u8, PayloadError> {
        let Some(&byte) = self.buf.get(self.pos) else { return Err(ends_before(self.pos, what)) };
        self.pos += 1;
        Ok(byte)
    }

    pub fn u64_le(&mut self, what: &str) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], PayloadError> {
        let start = self.pos;
        let bytes = self.take(N, what)?;
        bytes.first_chunk::<N>().copied().ok_or_else(|| ends_before(start, what))
    }

    /// LEB128, at most 10 bytes, canonical (no redundant trailing zero groups).
    ///
    /// Values of one byte take one comparison; values of two to eight bytes (CR3s, page numbers, frames, most
    /// page-table entries) are read with one 8-byte load where eight bytes remain, their groups gathered with
    /// shifts instead of a loop. Everything else (nine or ten bytes, the payload's last bytes, every error) goes
    /// the byte-by-byte way.
    #[inline(always)]
    pub fn varint(&mut self, what: &str) -> Result<u64, PayloadError> {
        let pos = self.pos;
        if let Some(&byte) = self.buf.get(pos) {
            if byte < 0x80 {
                self.pos = pos + 1;
                return Ok(byte.into());
            }
        }
        if let Some(word) = self.buf.get(pos..).and_then(<[u8]>::first_chunk::<8>) {
            let word = u64::from_le_bytes(*word);
            let stops = !word & 0x8080_8080_8080_8080;
            if stops != 0 {
                // The first byte with its high bit clear ends the varint: bit 8k + 7 for byte k (k ≥ 1 here).
                let end_bit = stops.trailing_zeros();
                let last_group = (word >> (end_bit - 7)) & 0x7f;
                if last_group != 0 {
                    self.pos = pos + (end_bit as usize >> 3) + 1;
                    return Ok(gather_groups(word & (u64::MAX >> (63 - end_bit))));
                }
            }
        }
        let (value, end) = varint_bytewise(self.buf, pos, what)?;
        self.pos = end;
        Ok(value)
    }

    #[inline(always)]
    pub fn varint_max(&mut self, what: &str, max: u64) -> Result<u64, PayloadError> {
        let start = self.pos;
        let value = self.varint(what)?;
        if value > max {
            return Err(too_large(start, what, value, max));
        }
        Ok(value)
    }

    #[inline(always)]
    pub fn varint_u32(&mut self, what: &str) -> Result<u32, PayloadError> {
        Ok(self.varint_max(what, u32::MAX.into())? as u32)
    }

    #[inline(always)]
    pub fn varint_u16(&mut self, what: &str) -> Result<u16, PayloadError> {
        Ok(self.varint_max(what, u16::MAX.into())? as u16)
    }

    /// `len` bytes, refused when fewer remain (so a huge declared length allocates nothing).
    pub fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], PayloadError> {
        let remaining = self.buf.len() - self.pos;
        if len > remaining {
            return Err(self.error(format!("{what} needs {len} bytes but only {remaining} remain in the payload")));
        }
        let bytes = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    /// A varint length then that many bytes; errors point at the length.
    pub fn length_prefixed(&mut self, what: &str, max: usize) -> Result<&'a [u8], PayloadError> {
        let start = self.pos;
        let len = self.varint_max(&format!("length of {what}"), max as u64)?;
        self.take(len as usize, what).map_err(|e| PayloadError { position: start, ..e })
    }

    pub fn string(&mut self, what: &str) -> Result<String, PayloadError> {
        let start = self.pos;
        let bytes = self.length_prefixed(what, MAX_STRING_BYTES)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| PayloadError::new(start, format!("{what} is not UTF-8")))
    }

    #[inline(always)]
    pub fn expect_end(&self, what: &str) -> Result<(), PayloadError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(unexpected_bytes(self.pos, self.buf.len() - self.pos, what))
        }
    }
}

#[cold]
#[inline(never)]
fn ends_before(position: usize, what: &str) -> PayloadError {
    PayloadError::new(position, format!("payload ends before {what}"))
}

#[cold]
#[inline(never)]
fn unexpected_bytes(position: usize, count: usize, what: &str) -> PayloadError {
    PayloadError::new(position, format!("{count} unexpected bytes after the {what}"))
}

/// The varint at `start`, one byte at a time, and the position after it; every malformed varint ends here.
#[cold]
#[inline(never)]
fn varint_bytewise(buf: &[u8], start: usize, what: &str) -> Result<(u64, usize), PayloadError> {
    let mut value = 0u64;
    for (index, shift) in (0..70).step_by(7).enumerate() {
        let Some(&byte) = buf.get(start + index) else {
            return Err(PayloadError::new(start, format!("payload ends inside {what}")));
        };
        let group = u64::from(byte & 0x7f);
        if shift == 63 && group > 1 {
            return Err(PayloadError::new(start, format!("{what} overflows 64 bits")));
        }
        value |= group << shift;
        if byte & 0x80 == 0 {
            if byte == 0 && shift > 0 {
                return Err(PayloadError::new(start, format!("{what} is not minimally encoded")));
            }
            return Ok((value, start + index + 1));
        }
    }
    Err(PayloadError::new(start, format!("{what} is longer than 10 bytes")))
}

#[cold]
#[inline(never)]
fn too_large(start: usize, what: &str, value: u64, max: u64) -> PayloadError {
    PayloadError::new(start, format!("{what} is {value}, more than {max}"))
}

/// The value of a varint of at most eight bytes, given as the little-endian word of exactly its bytes: the
/// 7-bit groups packed together, pairs, then fours, then eights.
#[inline(always)]
fn gather_groups(bytes: u64) -> u64 {
    let x = bytes & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
    (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4)
}

fn code_mode(reader: &mut PayloadReader<'_>, what: &str) -> Result<CodeMode, PayloadError> {
    let start = reader.position();
    let bits = reader.u8(what)?;
    CodeMode::from_bitness(bits.into())
        .ok_or_else(|| PayloadError::new(start, format!("{what} is {bits}, expected 16, 32 or 64")))
}

// ---------------------------------------------------------------------------------------------------------------
// Header

/// Bytes at the start of the header payload that the writer rewrites when it finishes: instructions (u64 LE),
/// events (u64 LE), guest modes (u8).
pub(crate) const HEADER_PATCH_LEN: usize = 17;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub instructions: u64,
    pub events: u64,
    pub modes: GuestModes,
    pub metadata: Metadata,
    pub boot: BootState,
}

pub(crate) fn encode_header_patch(instructions: u64, events: u64, modes: GuestModes) -> [u8; HEADER_PATCH_LEN] {
    let mut out = [0u8; HEADER_PATCH_LEN];
    out[..8].copy_from_slice(&instructions.to_le_bytes());
    out[8..16].copy_from_slice(&events.to_le_bytes());
    out[16] = modes.0;
    out
}

pub(crate) fn encode_header(header: &Header) -> Vec<u8> {
    let mut out = encode_header_patch(header.instructions, header.events, header.modes).to_vec();
    let meta = &header.metadata;
    put_bytes(&mut out, meta.workload.as_bytes());
    put_varint(&mut out, meta.params.len() as u64);
    for (key, value) in &meta.params {
        put_bytes(&mut out, key.as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    put_bytes(&mut out, meta.recorder.as_bytes());
    put_bytes(&mut out, meta.recorder_version.as_bytes());
    let boot = &header.boot;
    for value in [boot.rip, boot.rax, boot.rbx, boot.rsp, boot.rflags, boot.cr0] {
        put_varint(&mut out, value);
    }
    out.push(boot.mode.bitness() as u8);
    put_varint(&mut out, boot.ram_bytes);
    let symbols = meta.symbols.symbols();
    put_varint(&mut out, symbols.len() as u64);
    for symbol in symbols {
        put_bytes(&mut out, symbol.name.as_bytes());
        put_varint(&mut out, symbol.start);
        put_varint(&mut out, symbol.end - symbol.start);
    }
    out
}

/// The symbol map that ends a 2.1 header; a header that ends before it (2.0) has none.
fn decode_symbols(r: &mut PayloadReader<'_>) -> Result<SymbolMap, PayloadError> {
    if r.is_empty() {
        return Ok(SymbolMap::default());
    }
    let start = r.position();
    let count = r.varint_max("symbol count", SymbolMap::MAX_SYMBOLS as u64)?;
    let mut symbols = Vec::new();
    for _ in 0..count {
        // Each symbol takes at least three bytes, so a count the payload cannot hold fails at its end.
        let name = r.string("symbol name")?;
        let address = r.varint("symbol address")?;
        let length = r.varint("symbol length")?;
        let end = address.checked_add(length).ok_or_else(|| {
            PayloadError::new(r.position(), format!("symbol `{name}` wraps around the address space"))
        })?;
        symbols.push(Symbol { name, start: address, end });
    }
    if symbols.windows(2).any(|pair| pair[0].start > pair[1].start) {
        return Err(PayloadError::new(start, "symbols are not sorted by address"));
    }
    SymbolMap::new(symbols).map_err(|e| PayloadError::new(start, format!("symbol map: {e}")))
}

/// `allow_trailing`: a file of a newer minor version may append header fields this reader does not know.
pub(crate) fn decode_header(payload: &[u8], allow_trailing: bool) -> Result<Header, PayloadError> {
    let mut r = PayloadReader::new(payload);
    let instructions = r.u64_le("instruction total")?;
    let events = r.u64_le("event total")?;
    let modes = r.u8("guest modes")?;
    let workload = r.string("workload name")?;
    let param_count = r.varint("parameter count")?;
    let mut params = Vec::new();
    for _ in 0..param_count {
        // Each parameter needs at least two bytes, so a huge count fails on the payload's end, not on memory.
        let key = r.string("parameter name")?;
        let value = r.string("parameter value")?;
        params.push((key, value));
    }
    let recorder = r.string("recorder name")?;
    let recorder_version = r.string("recorder version")?;
    let mut registers = [0u64; 6];
    for (value, what) in
        registers.iter_mut().zip(["boot RIP", "boot RAX", "boot RBX", "boot RSP", "boot RFLAGS", "boot CR0"])
    {
        *value = r.varint(what)?;
    }
    let mode = code_mode(&mut r, "boot code mode")?;
    let ram_bytes = r.varint("RAM size")?;
    let symbols = decode_symbols(&mut r)?;
    if !allow_trailing {
        r.expect_end("header")?;
    }
    let [rip, rax, rbx, rsp, rflags, cr0] = registers;
    Ok(Header {
        instructions,
        events,
        modes: GuestModes(modes),
        metadata: Metadata { workload, params, recorder, recorder_version, symbols },
        boot: BootState { rip, rax, rbx, rsp, rflags, cr0, mode, ram_bytes },
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Image

pub(crate) fn encode_segment(out: &mut Vec<u8>, gpa: u64, bytes: &[u8]) {
    put_varint(out, gpa);
    put_bytes(out, bytes);
}

pub(crate) fn decode_segment(r: &mut PayloadReader<'_>) -> Result<Segment, PayloadError> {
    let start = r.position();
    let gpa = r.varint("segment address")?;
    let bytes = r.length_prefixed("segment bytes", usize::MAX)?;
    if bytes.is_empty() {
        return Err(PayloadError::new(start, format!("segment at {gpa:#x} is empty")));
    }
    if gpa.checked_add(bytes.len() as u64).is_none() {
        return Err(PayloadError::new(start, format!("segment at {gpa:#x} wraps around the address space")));
    }
    Ok(Segment { gpa, bytes: bytes.to_vec() })
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks

/// What the hot loop needs of a block: how many instructions it retires and its code mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub instructions: u32,
    pub mode: CodeMode,
}

/// Checks a block against the format's limits; the writer and the decoder share it.
pub(crate) fn block_limits_problem(instructions: u32, byte_len: usize) -> Option<String> {
    if instructions == 0 || instructions > MAX_BLOCK_INSTRUCTIONS {
        return Some(format!("{instructions} instructions, expected 1 to {MAX_BLOCK_INSTRUCTIONS}"));
    }
    if byte_len < instructions as usize || byte_len > (instructions as usize * 15).min(MAX_BLOCK_BYTES) {
        return Some(format!(
            "{byte_len} bytes cannot hold {instructions} instructions (each is 1 to 15 bytes, a block at most {MAX_BLOCK_BYTES})"
        ));
    }
    None
}

pub(crate) fn encode_block(out: &mut Vec<u8>, block: &Block) {
    put_varint(out, block.address);
    out.push(block.mode.bitness() as u8);
    put_varint(out, block.tag);
    put_varint(out, block.instructions.into());
    put_bytes(out, &block.bytes);
}

pub(crate) fn decode_block(r: &mut PayloadReader<'_>) -> Result<Block, PayloadError> {
    let start = r.position();
    let address = r.varint("block address")?;
    let mode = code_mode(r, "block code mode")?;
    let tag = r.varint("block address-space tag")?;
    let instructions = r.varint_u32("block instruction count")?;
    let bytes = r.length_prefixed("block bytes", MAX_BLOCK_BYTES)?;
    if let Some(problem) = block_limits_problem(instructions, bytes.len()) {
        return Err(PayloadError::new(start, format!("block at {address:#x}: {problem}")));
    }
    Ok(Block { address, mode, tag, instructions, bytes: bytes.to_vec() })
}

// ---------------------------------------------------------------------------------------------------------------
// Events

/// Heads below this are block executions naming a one-byte local index into the chunk's dictionary; from it on,
/// the head is this plus the event kind (kind 0, the block execution itself, then takes a varint index ≥ 224).
pub(crate) const SHORT_BLOCK_HEADS: u8 = 0xe0;

/// The head of a repeated event (format 3.0 on): one byte follows, its index in the chunk's event dictionary.
pub(crate) const REPEAT_HEAD: u8 = head(EventKind::RepString) + 1;

/// An events chunk's event dictionary holds at most this many events: a one-byte index names each.
pub(crate) const MAX_REPEATED_EVENTS: usize = 256;

const fn head(kind: EventKind) -> u8 {
    SHORT_BLOCK_HEADS + kind as u8
}

/// How an events payload names blocks: by local index, resolved to global ids.
pub(crate) trait BlockNames {
    fn global(&self, local: u64) -> Option<BlockId>;
    fn len(&self) -> usize;
}

/// An events chunk's dictionary: local index n names global block `dictionary[n]`.
impl BlockNames for [u32] {
    #[inline(always)]
    fn global(&self, local: u64) -> Option<BlockId> {
        self.get(usize::try_from(local).ok()?).map(|&id| BlockId(id))
    }

    fn len(&self) -> usize {
        <[u32]>::len(self)
    }
}

pub(crate) fn encode_dictionary(out: &mut Vec<u8>, globals: &[u32]) {
    put_varint(out, globals.len() as u64);
    for &id in globals {
        put_varint(out, id.into());
    }
}

/// Reads an events chunk's dictionary into `dictionary`. Its ids must be blocks defined before the chunk.
fn decode_dictionary(r: &mut PayloadReader<'_>, defined: usize, dictionary: &mut Vec<u32>) -> Result<(), PayloadError> {
    dictionary.clear();
    let start = r.position();
    let count = r.varint("dictionary size")?;
    let remaining = (r.buf.len() - r.pos) as u64;
    if count > remaining {
        return Err(PayloadError::new(
            start,
            format!("dictionary of {count} blocks cannot fit the {remaining} bytes left in the payload"),
        ));
    }
    dictionary.reserve(count as usize);
    for _ in 0..count {
        let at = r.position();
        let id = r.varint("dictionary block id")?;
        if id >= defined as u64 {
            return Err(PayloadError::new(
                at,
                format!("block id {id} is out of range: {defined} blocks are defined before this chunk"),
            ));
        }
        dictionary.push(id as u32);
    }
    Ok(())
}

/// What an events chunk names by index before its events: its blocks (local index n is global block
/// `blocks[n]`) and, from format 3.0 on, the events it repeats (a repeat with index n is `events[n]`).
#[derive(Debug, Default, Clone)]
pub(crate) struct ChunkTables {
    pub blocks: Vec<u32>,
    pub events: Vec<Event>,
}

impl ChunkTables {
    /// Reads the dictionaries at the start of an events payload, leaving `r` at its first event. `defined` blocks
    /// are defined before the chunk; `repeats` says whether the format has an event dictionary (3.0 on).
    pub fn decode(
        &mut self,
        r: &mut PayloadReader<'_>,
        defined: usize,
        shapes: &[BlockShape],
        repeats: bool,
    ) -> Result<(), PayloadError> {
        decode_dictionary(r, defined, &mut self.blocks)?;
        self.events.clear();
        if repeats {
            decode_event_dictionary(r, &self.blocks, shapes, &mut self.events)?;
        }
        Ok(())
    }
}

/// Writes an event dictionary: its size, then each event as the stream would (none is a block execution).
pub(crate) fn encode_event_dictionary(out: &mut Vec<u8>, events: &[Event]) {
    put_varint(out, events.len() as u64);
    for event in events {
        // The writer repeats no block execution, so `local` is never asked for a block's index here.
        encode_event(out, event, |id| id.0);
    }
}

fn decode_event_dictionary(
    r: &mut PayloadReader<'_>,
    blocks: &[u32],
    shapes: &[BlockShape],
    events: &mut Vec<Event>,
) -> Result<(), PayloadError> {
    let start = r.position();
    let count = r.varint("event dictionary size")?;
    if count > MAX_REPEATED_EVENTS as u64 {
        return Err(PayloadError::new(
            start,
            format!("event dictionary of {count} events: a chunk repeats at most {MAX_REPEATED_EVENTS}"),
        ));
    }
    for index in 0..count {
        let at = r.position();
        let event = decode_event(r, blocks, &[], shapes)?;
        if matches!(event, Event::Block(_) | Event::PartialBlock { .. }) {
            return Err(PayloadError::new(
                at,
                format!(
                    "event dictionary entry {index} is a {} event: blocks are named by the block dictionary",
                    event.kind().name()
                ),
            ));
        }
        events.push(event);
    }
    Ok(())
}

fn size_direction_byte(size: u8, direction: Direction) -> u8 {
    size | if direction == Direction::Write { 0x80 } else { 0 }
}

fn put_walk(out: &mut Vec<u8>, walk: &Walk) {
    for &table in walk.tables() {
        put_varint(out, table.into());
    }
}

#[cold]
#[inline(never)]
fn walk_too_deep(position: usize, levels: u8) -> PayloadError {
    PayloadError::new(position, format!("a page walk of {levels} tables (at most 5)"))
}

/// The `levels` tables of a walk whose count a flags byte gave.
#[inline(always)]
fn walk(r: &mut PayloadReader<'_>, levels: u8) -> Result<Walk, PayloadError> {
    let mut tables = [0u32; Walk::MAX_LEVELS];
    let Some(slots) = tables.get_mut(..usize::from(levels)) else {
        return Err(walk_too_deep(r.position(), levels));
    };
    for slot in slots.iter_mut() {
        *slot = r.varint_u32("page-table frame of a walk")?;
    }
    Ok(Walk::from_array(levels, tables))
}

/// A block execution, whole or partial: the events that have no position in a block.
fn encode_block_execution(out: &mut Vec<u8>, event: &Event, local: impl Fn(BlockId) -> u32) {
    match *event {
        Event::Block(id) => {
            let index = local(id);
            if index < u32::from(SHORT_BLOCK_HEADS) {
                out.push(index as u8);
            } else {
                out.push(head(EventKind::Block));
                put_varint(out, u64::from(index - u32::from(SHORT_BLOCK_HEADS)));
            }
        }
        Event::PartialBlock { block, executed } => {
            out.push(head(EventKind::PartialBlock));
            put_varint(out, local(block).into());
            put_varint(out, executed.into());
        }
        _ => {}
    }
}

/// Bytes [`put_varint`] writes for `value`.
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes `encode_block_execution` writes for an execution of the block named by `index`: in full, or cut short
/// after `executed` instructions.
pub(crate) fn block_execution_len(index: u32, executed: Option<u32>) -> usize {
    match executed {
        None if index < u32::from(SHORT_BLOCK_HEADS) => 1,
        None => 1 + varint_len(u64::from(index - u32::from(SHORT_BLOCK_HEADS))),
        Some(executed) => 1 + varint_len(index.into()) + varint_len(executed.into()),
    }
}

/// Encodes one event, naming blocks by the local index `local` gives them.
pub(crate) fn encode_event(out: &mut Vec<u8>, event: &Event, local: impl Fn(BlockId) -> u32) {
    let Some(at) = event.at() else {
        encode_block_execution(out, event, local);
        return;
    };
    out.push(head(event.kind()));
    put_varint(out, at.into());
    match *event {
        // Written by `encode_block_execution`: a block execution has no position.
        Event::Block(_) | Event::PartialBlock { .. } => {}
        Event::Context { context, .. } => {
            out.push(context.cpl | u8::from(context.interrupts_enabled) << 2 | context.paging.code() << 3);
            put_varint(out, context.cr3);
        }
        Event::Exception { vector, error_code, cr2, walk, .. } => {
            out.push(vector);
            out.push(u8::from(error_code.is_some()) | u8::from(cr2.is_some()) << 1 | walk.levels() << 2);
            if let Some(code) = error_code {
                put_varint(out, code.into());
            }
            if let Some(cr2) = cr2 {
                put_varint(out, cr2);
            }
            put_walk(out, &walk);
        }
        Event::Interrupt { vector, .. } | Event::SoftwareInterrupt { vector, .. } => out.push(vector),
        Event::Syscall { .. } | Event::Sysret { .. } | Event::Iret { .. } => {}
        Event::CrWrite { cr, old, new, .. } => {
            out.push(cr);
            put_varint(out, old);
            put_varint(out, new);
        }
        Event::MsrRead { index, value, .. } | Event::MsrWrite { index, value, .. } => {
            put_varint(out, index.into());
            put_varint(out, value);
        }
        Event::Io { port, size, direction, value, .. } => {
            put_varint(out, port.into());
            out.push(size_direction_byte(size, direction));
            put_varint(out, value.into());
        }
        Event::Cpuid { leaf, subleaf, .. } => {
            put_varint(out, leaf.into());
            put_varint(out, subleaf.into());
        }
        Event::Invlpg { address, .. } => put_varint(out, address),
        Event::DescriptorLoad { load, .. } => match load {
            DescriptorLoad::Gdt { base, limit } | DescriptorLoad::Idt { base, limit } => {
                out.push(if matches!(load, DescriptorLoad::Gdt { .. }) { 0 } else { 1 });
                put_varint(out, base);
                put_varint(out, limit.into());
            }
            DescriptorLoad::Ldt { selector } | DescriptorLoad::Tr { selector } => {
                out.push(if matches!(load, DescriptorLoad::Ldt { .. }) { 2 } else { 3 });
                put_varint(out, selector.into());
            }
        },
        Event::Hlt { idle, .. } => put_varint(out, idle),
        Event::PageTableWrite { gpa, level, old, new, .. } => {
            put_varint(out, gpa);
            out.push(level);
            put_varint(out, old);
            put_varint(out, new);
        }
        Event::PageTouch { page, frame, access, user, size, walk, .. } => {
            put_varint(out, page >> 12);
            put_varint(out, frame >> 12);
            out.push(access as u8 | u8::from(user) << 2 | (size as u8) << 3 | walk.levels() << 5);
            put_walk(out, &walk);
        }
        Event::Mmio { gpa, size, direction, value, .. } => {
            put_varint(out, gpa);
            out.push(size_direction_byte(size, direction));
            put_varint(out, value);
        }
        Event::RepString { elements, .. } => put_varint(out, elements),
    }
}

#[cold]
#[inline(never)]
fn not_in_dictionary(position: usize, local: u64, dictionary: usize) -> PayloadError {
    PayloadError::new(
        position,
        format!("local block index {local} is not in this chunk's dictionary of {dictionary} blocks"),
    )
}

#[cold]
#[inline(never)]
fn not_repeated(position: usize, index: u8, dictionary: usize) -> PayloadError {
    PayloadError::new(
        position,
        format!("repeated event {index} is not in this chunk's event dictionary of {dictionary} events"),
    )
}

#[cold]
#[inline(never)]
fn unknown_head(position: usize, head_byte: u8) -> PayloadError {
    PayloadError::new(
        position,
        format!(
            "unknown event head {head_byte:#04x} (format {}.x uses {:#04x} to {REPEAT_HEAD:#04x})",
            crate::format::VERSION_MAJOR,
            SHORT_BLOCK_HEADS,
        ),
    )
}

#[cold]
#[inline(never)]
fn partial_too_long(position: usize, block: BlockId, executed: u32, instructions: u32) -> PayloadError {
    PayloadError::new(
        position,
        format!(
            "partial execution of block {block} retires {executed} instructions, but the block has {instructions}: \
             a partial block must stop before its end"
        ),
    )
}

#[cold]
#[inline(never)]
fn invalid_value(position: usize, what: &str, value: u8) -> PayloadError {
    PayloadError::new(position, format!("{what} {value:#04x} is not valid"))
}

#[cold]
#[inline(never)]
fn io_value_too_wide(position: usize, value: u32, size: u8) -> PayloadError {
    PayloadError::new(position, format!("I/O value {value:#x} does not fit {size} bytes"))
}

/// Decodes the event at the reader's position, resolving local block indices through `names` and repeats
/// through `repeated` (the chunk's event dictionary); partial executions are checked against their block's
/// length in `shapes`.
#[inline(always)]
pub(crate) fn decode_event<N: BlockNames + ?Sized>(
    r: &mut PayloadReader<'_>,
    names: &N,
    repeated: &[Event],
    shapes: &[BlockShape],
) -> Result<Event, PayloadError> {
    let start = r.position();
    let head_byte = r.u8("event")?;
    let resolve = |local: u64| match names.global(local) {
        Some(id) => Ok(id),
        None => Err(not_in_dictionary(start, local, names.len())),
    };
    if head_byte < SHORT_BLOCK_HEADS {
        return Ok(Event::Block(resolve(head_byte.into())?));
    }
    if head_byte == REPEAT_HEAD {
        let index = r.u8("repeated event index")?;
        return repeated.get(usize::from(index)).copied().ok_or_else(|| not_repeated(start, index, repeated.len()));
    }
    let Some(&kind) = EventKind::ALL.get(usize::from(head_byte - SHORT_BLOCK_HEADS)) else {
        return Err(unknown_head(start, head_byte));
    };
    match kind {
        EventKind::Block => {
            let local = r.varint("block index")?.saturating_add(u64::from(SHORT_BLOCK_HEADS));
            return Ok(Event::Block(resolve(local)?));
        }
        EventKind::PartialBlock => {
            let local = r.varint("partial block index")?;
            let block = resolve(local)?;
            let executed = r.varint_u32("partial block retired count")?;
            let instructions = shapes[block.index()].instructions;
            if executed >= instructions {
                return Err(partial_too_long(start, block, executed, instructions));
            }
            return Ok(Event::PartialBlock { block, executed });
        }
        _ => {}
    }
    let at = r.varint_u32("event position")?;
    let enum_error = |r: &PayloadReader<'_>, what: &str, value: u8| invalid_value(r.position() - 1, what, value);
    let size_direction =
        |r: &mut PayloadReader<'_>, what: &str, sizes: &[u8]| -> Result<(u8, Direction), PayloadError> {
            let byte = r.u8(what)?;
            let size = byte & 0x7f;
            if !sizes.contains(&size) {
                return Err(enum_error(r, what, byte));
            }
            Ok((size, if byte & 0x80 != 0 { Direction::Write } else { Direction::Read }))
        };
    Ok(match kind {
        // Returned above: a block execution has no position.
        EventKind::Block | EventKind::PartialBlock => return Err(unknown_head(start, head_byte)),
        EventKind::Context => {
            let flags = r.u8("context flags")?;
            let paging = PagingMode::from_code((flags >> 3) & 7).filter(|_| flags & 0xc0 == 0);
            let Some(paging) = paging else {
                return Err(enum_error(r, "context flags", flags));
            };
            let cr3 = r.varint("CR3")?;
            Event::Context { at, context: Context { cpl: flags & 3, interrupts_enabled: flags & 4 != 0, paging, cr3 } }
        }
        EventKind::Exception => {
            let vector = r.u8("exception vector")?;
            let flags = r.u8("exception flags")?;
            if flags & 0xe0 != 0 {
                return Err(enum_error(r, "exception flags", flags));
            }
            let error_code = if flags & 1 != 0 { Some(r.varint_u32("error code")?) } else { None };
            let cr2 = if flags & 2 != 0 { Some(r.varint("CR2")?) } else { None };
            let walk = walk(r, (flags >> 2) & 7)?;
            Event::Exception { at, vector, error_code, cr2, walk }
        }
        EventKind::Interrupt => Event::Interrupt { at, vector: r.u8("interrupt vector")? },
        EventKind::SoftwareInterrupt => Event::SoftwareInterrupt { at, vector: r.u8("interrupt vector")? },
        EventKind::Syscall => Event::Syscall { at },
        EventKind::Sysret => Event::Sysret { at },
        EventKind::Iret => Event::Iret { at },
        EventKind::CrWrite => {
            let cr = r.u8("control register")?;
            if !matches!(cr, 0 | 2 | 3 | 4 | 8) {
                return Err(enum_error(r, "control register", cr));
            }
            Event::CrWrite { at, cr, old: r.varint("old CR value")?, new: r.varint("new CR value")? }
        }
        EventKind::MsrRead => Event::MsrRead { at, index: r.varint_u32("MSR index")?, value: r.varint("MSR value")? },
        EventKind::MsrWrite => Event::MsrWrite { at, index: r.varint_u32("MSR index")?, value: r.varint("MSR value")? },
        EventKind::Io => {
            let port = r.varint_u16("I/O port")?;
            let (size, direction) = size_direction(r, "I/O size and direction", &[1, 2, 4])?;
            let value = r.varint_u32("I/O value")?;
            if size < 4 && value >> (8 * size) != 0 {
                return Err(io_value_too_wide(r.position(), value, size));
            }
            Event::Io { at, port, size, direction, value }
        }
        EventKind::Cpuid => {
            Event::Cpuid { at, leaf: r.varint_u32("CPUID leaf")?, subleaf: r.varint_u32("CPUID subleaf")? }
        }
        EventKind::Invlpg => Event::Invlpg { at, address: r.varint("INVLPG address")? },
        EventKind::DescriptorLoad => {
            let table = r.u8("descriptor table")?;
            let load = match table {
                0 | 1 => {
                    let base = r.varint("descriptor table base")?;
                    let limit = r.varint_u16("descriptor table limit")?;
                    if table == 0 {
                        DescriptorLoad::Gdt { base, limit }
                    } else {
                        DescriptorLoad::Idt { base, limit }
                    }
                }
                2 => DescriptorLoad::Ldt { selector: r.varint_u16("LDT selector")? },
                3 => DescriptorLoad::Tr { selector: r.varint_u16("TR selector")? },
                _ => return Err(enum_error(r, "descriptor table", table)),
            };
            Event::DescriptorLoad { at, load }
        }
        EventKind::Hlt => Event::Hlt { at, idle: r.varint("HLT idle time")? },
        EventKind::PageTableWrite => {
            let gpa = r.varint("page-table entry address")?;
            let level = r.u8("page-table level")?;
            if !(1..=5).contains(&level) {
                return Err(enum_error(r, "page-table level", level));
            }
            Event::PageTableWrite { at, gpa, level, old: r.varint("old entry")?, new: r.varint("new entry")? }
        }
        EventKind::PageTouch => {
            let page = r.varint_max("virtual page number", u64::MAX >> 12)? << 12;
            let frame = r.varint_max("physical frame number", u64::MAX >> 12)? << 12;
            let flags = r.u8("page touch flags")?;
            let access = Access::ALL.get(usize::from(flags & 3)).copied();
            let size = PageSize::ALL.get(usize::from((flags >> 3) & 3)).copied();
            let (Some(access), Some(size)) = (access, size) else {
                return Err(enum_error(r, "page touch flags", flags));
            };
            let walk = walk(r, flags >> 5)?;
            Event::PageTouch { at, page, frame, access, user: flags & 4 != 0, size, walk }
        }
        EventKind::Mmio => {
            let gpa = r.varint("MMIO address")?;
            let (size, direction) = size_direction(r, "MMIO size and direction", &[1, 2, 4, 8])?;
            let value = r.varint("MMIO value")?;
            Event::Mmio { at, gpa, size, direction, value }
        }
        EventKind::RepString => Event::RepString { at, elements: r.varint("REP element count")? },
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Footer

pub(crate) fn encode_footer(footer: &Footer) -> Vec<u8> {
    let mut out = Vec::new();
    let totals = &footer.totals;
    for value in [totals.instructions, totals.instructions_user, totals.instructions_kernel, totals.blocks] {
        put_varint(&mut out, value);
    }
    for count in totals.events {
        put_varint(&mut out, count);
    }
    let ending = &footer.ending;
    out.push(ending.reason.code());
    put_varint(&mut out, ending.exit_status.into());
    put_bytes(&mut out, ending.detail.as_bytes());
    put_bytes(&mut out, &ending.serial);
    out.extend_from_slice(&ending.state_digest);
    out
}

pub(crate) fn decode_footer(payload: &[u8], allow_trailing: bool) -> Result<Footer, PayloadError> {
    let mut r = PayloadReader::new(payload);
    let instructions = r.varint("instruction total")?;
    let instructions_user = r.varint("user instruction total")?;
    let instructions_kernel = r.varint("kernel instruction total")?;
    let blocks = r.varint("block total")?;
    let mut events = [0u64; EventKind::COUNT];
    for (count, kind) in events.iter_mut().zip(EventKind::ALL) {
        *count = r.varint(&format!("{} event count", kind.name()))?;
    }
    let reason_byte = r.u8("end reason")?;
    let reason = EndReason::from_code(reason_byte).ok_or_else(|| {
        PayloadError::new(r.position() - 1, format!("end reason {reason_byte} is not valid (0 to 4)"))
    })?;
    let exit_status = r.varint_u32("exit status")?;
    let detail = r.string("end detail")?;
    let serial = r.length_prefixed("serial output", usize::MAX)?.to_vec();
    let state_digest: [u8; 32] = r.array("state digest")?;
    if !allow_trailing {
        r.expect_end("footer")?;
    }
    Ok(Footer {
        totals: Totals { instructions, instructions_user, instructions_kernel, blocks, events },
        ending: Ending { reason, exit_status, detail, serial, state_digest },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_bytes(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, value);
        out
    }

    #[test]
    fn a_block_execution_takes_the_bytes_the_writer_counts_for_it() {
        let boundaries = [0, 1, 0x7f, 0x80, 0xdf, 0xe0, 0xe1, 0x3fff, 0x4000, 0x40df, 0x40e0, u32::MAX];
        for index in boundaries {
            for executed in [None, Some(0), Some(1), Some(0x7f), Some(0x80), Some(4095), Some(u32::MAX)] {
                let event = match executed {
                    None => Event::Block(BlockId(index)),
                    Some(executed) => Event::PartialBlock { block: BlockId(index), executed },
                };
                let mut out = Vec::new();
                encode_event(&mut out, &event, |id| id.0);
                assert_eq!(block_execution_len(index, executed), out.len(), "{event:?}");
            }
        }
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(u64::MAX), 10);
    }

    #[test]
    fn varints_round_trip_at_group_boundaries() {
        for value in [0, 1, 0x7f, 0x80, 0x3fff, 0x4000, u32::MAX.into(), u64::MAX - 1, u64::MAX] {
            let bytes = varint_bytes(value);
            let mut r = PayloadReader::new(&bytes);
            assert_eq!(r.varint("v").unwrap(), value);
            assert!(r.is_empty());
        }
        assert_eq!(varint_bytes(0x80), [0x80, 0x01]);
        assert_eq!(varint_bytes(u64::MAX).len(), 10);
    }

    #[test]
    fn varint_rejects_overlong_overflowing_and_truncated_encodings() {
        let cases: [(&[u8], &str); 4] = [
            (&[0x80, 0x00], "not minimally encoded"),
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], "overflows 64 bits"),
            (&[0xff; 11], "overflows 64 bits"),
            (&[0x80, 0x80], "payload ends inside"),
        ];
        for (bytes, expected) in cases {
            let err = PayloadReader::new(bytes).varint("x").unwrap_err();
            assert!(err.message.contains(expected), "{bytes:02x?}: {}", err.message);
            assert_eq!(err.position, 0);
        }
    }

    #[test]
    fn the_224_first_local_indices_take_one_byte_and_kinds_one_byte_heads() {
        let mut out = Vec::new();
        let local = |id: BlockId| id.0 + 1;
        encode_event(&mut out, &Event::Block(BlockId(222)), local);
        assert_eq!(out, [223]);
        out.clear();
        encode_event(&mut out, &Event::Block(BlockId(223)), local);
        assert_eq!(out, [0xe0, 0]);
        out.clear();
        encode_event(&mut out, &Event::Syscall { at: 4 }, local);
        assert_eq!(out, [0xe6, 4]);
        let dictionary: Vec<u32> = (0..300).collect();
        let shapes = vec![BlockShape { instructions: 1, mode: CodeMode::Bits64 }; 300];
        for id in [0, 1, 223, 224, 299] {
            out.clear();
            encode_event(&mut out, &Event::Block(BlockId(id)), |b| b.0);
            let decoded = decode_event(&mut PayloadReader::new(&out), dictionary.as_slice(), &[], &shapes).unwrap();
            assert_eq!(decoded, Event::Block(BlockId(id)));
        }
    }
}
