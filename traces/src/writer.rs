//! The streaming writer recorders use: bounded memory (one chunk of events and one of new blocks), deterministic
//! bytes (the same calls give the same file).

use std::collections::hash_map::Entry;
use std::fs::File;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use crate::codec::{self, BlockShape, Header};
use crate::error::WriteError;
use crate::fasthash::{FastHasher, FastMap};
use crate::format::{self, ChunkKind, Codec, MAX_CHUNK_BYTES, MAX_STRING_BYTES, PREAMBLE_LEN, TARGET_CHUNK_BYTES};
use crate::model::{Block, BlockId, BootState, Ending, Event, Footer, GuestModes, Metadata, Segment};
use crate::tally::Tally;

/// Serial output beyond this does not fit the footer chunk; recorders cap what they capture.
pub const MAX_SERIAL_BYTES: usize = 2 << 20;

/// Writes a trace to any seekable sink. The header is written first with zero totals and rewritten in place by
/// [`TraceWriter::finish`], so a reader can know the totals before it streams the events.
pub struct TraceWriter<W: Write + Seek> {
    out: W,
    header: Header,
    compressor: zstd::bulk::Compressor<'static>,
    shapes: Vec<BlockShape>,
    pending_blocks: Vec<u8>,
    pending_block_count: u32,
    /// Events of the chunk being built, in order (see `flush_events`), and the bytes they take staged with global
    /// block ids: what decides when the chunk is full.
    staged: Vec<Staged>,
    /// How many instructions each partial block execution of `staged` retired, in order.
    staged_partials: Vec<u32>,
    staged_bytes: usize,
    /// Executions per block in the pending chunk, by global id; `chunk_blocks` lists the non-zero ones.
    chunk_counts: Vec<u32>,
    chunk_blocks: Vec<u32>,
    /// The pending chunk's other events, for its event dictionary.
    repeats: Repeats,
    /// The pending chunk re-encoded for output, kept to reuse its allocation.
    chunk_payload: Vec<u8>,
    tally: Tally,
}

impl<W: Write + Seek> TraceWriter<W> {
    /// Starts a trace: preamble, header, and the guest image (segments are split into chunks as needed).
    pub fn new(mut out: W, metadata: Metadata, boot: BootState, image: &[Segment]) -> Result<Self, WriteError> {
        let header = Header { instructions: 0, events: 0, modes: GuestModes::default(), metadata, boot };
        let meta = &header.metadata;
        let strings = [
            ("workload name", &meta.workload),
            ("recorder name", &meta.recorder),
            ("recorder version", &meta.recorder_version),
        ]
        .into_iter()
        .map(|(what, s)| (what.to_string(), s.len()))
        .chain(
            meta.params
                .iter()
                .flat_map(|(k, v)| [(format!("parameter {k:?}"), k.len()), (format!("value of {k:?}"), v.len())]),
        );
        for (what, len) in strings {
            if len > MAX_STRING_BYTES {
                return Err(WriteError::TooLarge { what, value: len as u64, limit: MAX_STRING_BYTES as u64 });
            }
        }
        let header_payload = codec::encode_header(&header);
        if header_payload.len() > MAX_CHUNK_BYTES as usize {
            return Err(WriteError::TooLarge {
                what: "header".into(),
                value: header_payload.len() as u64,
                limit: MAX_CHUNK_BYTES.into(),
            });
        }
        let compressor = zstd::bulk::Compressor::new(format::ZSTD_LEVEL)?;
        out.write_all(&format::preamble())?;
        out.write_all(&stored_chunk(ChunkKind::Header, &header_payload))?;

        let mut writer = TraceWriter {
            out,
            header,
            compressor,
            shapes: Vec::new(),
            pending_blocks: Vec::new(),
            pending_block_count: 0,
            staged: Vec::new(),
            staged_partials: Vec::new(),
            staged_bytes: 0,
            chunk_counts: Vec::new(),
            chunk_blocks: Vec::new(),
            repeats: Repeats::default(),
            chunk_payload: Vec::new(),
            tally: Tally::default(),
        };
        writer.write_image(image)?;
        Ok(writer)
    }

    fn write_image(&mut self, image: &[Segment]) -> Result<(), WriteError> {
        let mut payload = Vec::new();
        let mut pieces = 0u32;
        for segment in image {
            if segment.bytes.is_empty() {
                return Err(WriteError::EmptySegment { gpa: segment.gpa });
            }
            for (index, piece) in segment.bytes.chunks(TARGET_CHUNK_BYTES / 2).enumerate() {
                let gpa = segment.gpa + (index * TARGET_CHUNK_BYTES / 2) as u64;
                codec::encode_segment(&mut payload, gpa, piece);
                pieces += 1;
                if payload.len() >= TARGET_CHUNK_BYTES / 2 {
                    self.write_chunk(ChunkKind::Image, pieces, &payload)?;
                    payload.clear();
                    pieces = 0;
                }
            }
        }
        if pieces > 0 {
            self.write_chunk(ChunkKind::Image, pieces, &payload)?;
        }
        Ok(())
    }

    /// Compresses `raw` and writes it as one chunk.
    fn write_chunk(&mut self, kind: ChunkKind, items: u32, raw: &[u8]) -> Result<(), WriteError> {
        let stored = self.compressor.compress(raw)?;
        self.out.write_all(&format::chunk_bytes(kind, Codec::Zstd, items, raw.len() as u32, &stored))?;
        Ok(())
    }

    /// Adds a block to the table and returns its id. Ids are given in order from 0; the writer does not
    /// deduplicate (the recorder knows which blocks it has seen).
    pub fn add_block(&mut self, block: &Block) -> Result<BlockId, WriteError> {
        if let Some(reason) = codec::block_limits_problem(block.instructions, block.bytes.len()) {
            return Err(WriteError::InvalidBlock { address: block.address, reason });
        }
        let id = BlockId(self.shapes.len() as u32);
        self.shapes.push(BlockShape { instructions: block.instructions, mode: block.mode });
        self.chunk_counts.push(0);
        codec::encode_block(&mut self.pending_blocks, block);
        self.pending_block_count += 1;
        if self.pending_blocks.len() >= TARGET_CHUNK_BYTES {
            self.flush_blocks()?;
        }
        Ok(id)
    }

    /// Number of blocks added so far.
    pub fn block_count(&self) -> u32 {
        self.shapes.len() as u32
    }

    /// Instruction count of a block added earlier.
    pub fn block_instructions(&self, id: BlockId) -> u32 {
        self.shapes[id.index()].instructions
    }

    /// Appends one event.
    pub fn push(&mut self, event: &Event) -> Result<(), WriteError> {
        match *event {
            Event::Block(id) => {
                self.check_block(id)?;
                self.count_execution(id);
                self.staged.push(Staged::Block(id.0));
                self.staged_bytes += codec::block_execution_len(id.0, None);
            }
            Event::PartialBlock { block, executed } => {
                self.check_block(block)?;
                let instructions = self.shapes[block.index()].instructions;
                if executed >= instructions {
                    return Err(WriteError::PartialTooLong { id: block.0, executed, instructions });
                }
                self.count_execution(block);
                self.staged.push(Staged::Partial(block.0));
                self.staged_partials.push(executed);
                self.staged_bytes += codec::block_execution_len(block.0, Some(executed));
            }
            _ => {
                if let Some(reason) = event_problem(event) {
                    return Err(WriteError::InvalidEvent { kind: event.kind().name(), reason });
                }
                let (number, bytes) = self.repeats.count(event);
                self.staged.push(Staged::Other(number));
                self.staged_bytes += bytes;
            }
        }
        self.tally.observe(event, &self.shapes);
        if self.staged_bytes >= TARGET_CHUNK_BYTES {
            self.flush_events()?;
        }
        Ok(())
    }

    fn check_block(&self, id: BlockId) -> Result<(), WriteError> {
        if id.index() >= self.shapes.len() {
            return Err(WriteError::UnknownBlock { id: id.0, defined: self.shapes.len() as u32 });
        }
        Ok(())
    }

    fn count_execution(&mut self, id: BlockId) {
        let count = &mut self.chunk_counts[id.index()];
        if *count == 0 {
            self.chunk_blocks.push(id.0);
        }
        *count += 1;
    }

    fn flush_blocks(&mut self) -> Result<(), WriteError> {
        if self.pending_block_count > 0 {
            let payload = std::mem::take(&mut self.pending_blocks);
            self.write_chunk(ChunkKind::Blocks, self.pending_block_count, &payload)?;
            self.pending_blocks = payload;
            self.pending_blocks.clear();
            self.pending_block_count = 0;
        }
        Ok(())
    }

    /// Writes pending events, after the blocks they may name. The chunk's block dictionary lists the blocks it
    /// executes, most executed first (ties by id), so the 224 hottest take one byte per execution; its event
    /// dictionary lists the other events it repeats, most repeated first, so that those take two bytes and
    /// decode by one lookup. The staged events are encoded with those local indices.
    fn flush_events(&mut self) -> Result<(), WriteError> {
        self.flush_blocks()?;
        if self.staged.is_empty() {
            return Ok(());
        }
        let counts = &self.chunk_counts;
        self.chunk_blocks.sort_unstable_by_key(|&id| (std::cmp::Reverse(counts[id as usize]), id));
        self.chunk_payload.clear();
        codec::encode_dictionary(&mut self.chunk_payload, &self.chunk_blocks);
        codec::encode_event_dictionary(&mut self.chunk_payload, &self.repeats.choose());
        // From here on `chunk_counts` holds each block's local index.
        for (local, &id) in self.chunk_blocks.iter().enumerate() {
            self.chunk_counts[id as usize] = local as u32;
        }
        let local = |id: BlockId| self.chunk_counts[id.index()];
        let mut partials = self.staged_partials.iter();
        for &staged in &self.staged {
            match staged {
                Staged::Block(id) => {
                    codec::encode_event(&mut self.chunk_payload, &Event::Block(BlockId(id)), local);
                }
                Staged::Partial(id) => {
                    let executed = *partials.next().expect("every partial execution's count was staged");
                    let event = Event::PartialBlock { block: BlockId(id), executed };
                    codec::encode_event(&mut self.chunk_payload, &event, local);
                }
                Staged::Other(number) => match self.repeats.slot[number as usize] {
                    Some(index) => self.chunk_payload.extend_from_slice(&[codec::REPEAT_HEAD, index]),
                    None => {
                        let event = &self.repeats.distinct[number as usize].event;
                        codec::encode_event(&mut self.chunk_payload, event, |_| unreachable!("names no block"));
                    }
                },
            }
        }
        if self.chunk_payload.len() > MAX_CHUNK_BYTES as usize {
            return Err(WriteError::TooLarge {
                what: "events chunk".into(),
                value: self.chunk_payload.len() as u64,
                limit: MAX_CHUNK_BYTES.into(),
            });
        }
        let payload = std::mem::take(&mut self.chunk_payload);
        self.write_chunk(ChunkKind::Events, self.staged.len() as u32, &payload)?;
        self.chunk_payload = payload;
        for &id in &self.chunk_blocks {
            self.chunk_counts[id as usize] = 0;
        }
        self.chunk_blocks.clear();
        self.repeats.clear();
        self.staged.clear();
        self.staged_partials.clear();
        self.staged_bytes = 0;
        Ok(())
    }

    /// Writes the footer, rewrites the header's totals, and returns the sink.
    pub fn finish(mut self, ending: Ending) -> Result<W, WriteError> {
        if ending.serial.len() > MAX_SERIAL_BYTES {
            return Err(WriteError::TooLarge {
                what: "serial output".into(),
                value: ending.serial.len() as u64,
                limit: MAX_SERIAL_BYTES as u64,
            });
        }
        if ending.detail.len() > MAX_STRING_BYTES {
            return Err(WriteError::TooLarge {
                what: "end detail".into(),
                value: ending.detail.len() as u64,
                limit: MAX_STRING_BYTES as u64,
            });
        }
        self.flush_events()?;
        let mut totals = self.tally.totals;
        totals.blocks = self.shapes.len() as u64;
        let footer = Footer { totals, ending };
        self.write_chunk(ChunkKind::Footer, 1, &codec::encode_footer(&footer))?;

        self.header.instructions = footer.totals.instructions;
        self.header.events = footer.totals.events_total();
        self.header.modes = self.tally.modes;
        let end = self.out.stream_position()?;
        self.out.seek(SeekFrom::Start(PREAMBLE_LEN as u64))?;
        self.out.write_all(&stored_chunk(ChunkKind::Header, &codec::encode_header(&self.header)))?;
        self.out.seek(SeekFrom::Start(end))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One event of the chunk being built: a block execution by the block's global id, or another event by its
/// number in [`Repeats`].
#[derive(Clone, Copy)]
enum Staged {
    Block(u32),
    /// A block execution cut short; how many instructions it retired is kept in order beside.
    Partial(u32),
    Other(u32),
}

/// The events other than block executions of the chunk being built, each distinct one numbered by its first
/// appearance, to choose the chunk's event dictionary from.
#[derive(Default)]
struct Repeats {
    /// Each distinct event's number by the event's hash. An entry is a quarter of an event's size, so a chunk of
    /// a hundred thousand distinct events (a port written with a new value each time) keeps its table small; the
    /// accesses to a table of whole events took about a quarter of such a recording's time.
    by_hash: FastMap<u64, u32>,
    /// The events whose hash an earlier distinct event already had.
    collided: FastMap<Event, u32>,
    distinct: Vec<Distinct>,
    /// After [`Repeats::choose`], each distinct event's index in the dictionary, if it has one.
    slot: Vec<Option<u8>>,
    /// Scratch for measuring an event's encoding.
    encoded: Vec<u8>,
}

struct Distinct {
    event: Event,
    count: u32,
    /// Bytes its encoding takes.
    bytes: usize,
}

impl Repeats {
    /// Counts one more `event`: its number, and the bytes its encoding takes.
    fn count(&mut self, event: &Event) -> (u32, usize) {
        let next = self.distinct.len() as u32;
        let number = match self.by_hash.entry(BuildHasherDefault::<FastHasher>::default().hash_one(event)) {
            Entry::Vacant(slot) => *slot.insert(next),
            Entry::Occupied(slot) if self.distinct[*slot.get() as usize].event == *event => *slot.get(),
            Entry::Occupied(_) => *self.collided.entry(*event).or_insert(next),
        };
        if number == next {
            self.encoded.clear();
            codec::encode_event(&mut self.encoded, event, |_| unreachable!("names no block"));
            self.distinct.push(Distinct { event: *event, count: 0, bytes: self.encoded.len() });
        }
        let distinct = &mut self.distinct[number as usize];
        distinct.count += 1;
        (number, distinct.bytes)
    }

    /// The event dictionary: events that come more than once, most often first (ties by first appearance), as
    /// many as one-byte indices can name.
    fn choose(&mut self) -> Vec<Event> {
        let mut chosen: Vec<u32> =
            (0..self.distinct.len() as u32).filter(|&n| self.distinct[n as usize].count > 1).collect();
        chosen.sort_unstable_by_key(|&n| (std::cmp::Reverse(self.distinct[n as usize].count), n));
        chosen.truncate(codec::MAX_REPEATED_EVENTS);
        self.slot = vec![None; self.distinct.len()];
        for (index, &n) in chosen.iter().enumerate() {
            self.slot[n as usize] = Some(index as u8);
        }
        chosen.iter().map(|&n| self.distinct[n as usize].event).collect()
    }

    fn clear(&mut self) {
        self.by_hash.clear();
        self.collided.clear();
        self.distinct.clear();
        self.slot.clear();
    }
}

/// The header is stored uncompressed so that `finish` can rewrite its fixed-width totals in place.
fn stored_chunk(kind: ChunkKind, raw: &[u8]) -> Vec<u8> {
    format::chunk_bytes(kind, Codec::Stored, 1, raw.len() as u32, raw)
}

/// Why the decoder would refuse this (non-block) event, if it would.
fn event_problem(event: &Event) -> Option<String> {
    match *event {
        Event::Context { context, .. } if context.cpl > 3 => Some(format!("CPL {} is not 0 to 3", context.cpl)),
        Event::CrWrite { cr, .. } if !matches!(cr, 0 | 2 | 3 | 4 | 8) => {
            Some(format!("CR{cr} is not a control register (0, 2, 3, 4, 8)"))
        }
        Event::Io { size, value, .. } => match size {
            1 | 2 | 4 if size == 4 || value >> (8 * size) == 0 => None,
            1 | 2 | 4 => Some(format!("value {value:#x} does not fit {size} bytes")),
            _ => Some(format!("size {size} is not 1, 2 or 4")),
        },
        Event::Mmio { size, .. } if !matches!(size, 1 | 2 | 4 | 8) => Some(format!("size {size} is not 1, 2, 4 or 8")),
        Event::PageTableWrite { level, .. } if !(1..=5).contains(&level) => {
            Some(format!("level {level} is not 1 to 5"))
        }
        Event::PageTouch { page, frame, .. } if (page | frame) & 0xfff != 0 => {
            Some(format!("page {page:#x} and frame {frame:#x} must be 4 KiB aligned"))
        }
        _ => None,
    }
}

/// A trace being written to `path` through a temporary file beside it; [`TraceFile::finish`] renames it into
/// place, so readers never see a half-written trace. Dropping it unfinished removes the temporary file.
pub struct TraceFile {
    writer: TraceWriter<BufWriter<File>>,
    pending: crate::atomic::PendingFile,
}

impl TraceFile {
    pub fn create(path: &Path, metadata: Metadata, boot: BootState, image: &[Segment]) -> Result<Self, WriteError> {
        let (pending, file) = crate::atomic::PendingFile::create(path)?;
        let writer = TraceWriter::new(BufWriter::new(file), metadata, boot, image)?;
        Ok(TraceFile { writer, pending })
    }

    pub fn writer(&mut self) -> &mut TraceWriter<BufWriter<File>> {
        &mut self.writer
    }

    pub fn finish(self, ending: Ending) -> Result<(), WriteError> {
        let file = self.writer.finish(ending)?.into_inner().map_err(|e| e.into_error())?;
        self.pending.commit(file)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_whose_hash_another_took_still_gets_its_own_number() {
        let (first, second) = (Event::Syscall { at: 0 }, Event::Sysret { at: 1 });
        let mut repeats = Repeats::default();
        assert_eq!(repeats.count(&first).0, 0);
        // As if `second` hashed to `first`'s value.
        let second_hash = BuildHasherDefault::<FastHasher>::default().hash_one(second);
        repeats.by_hash.insert(second_hash, 0);
        assert_eq!(repeats.count(&second).0, 1);
        assert_eq!(repeats.count(&second).0, 1);
        assert_eq!(repeats.count(&first).0, 0);
        let counts: Vec<(Event, u32)> = repeats.distinct.iter().map(|d| (d.event, d.count)).collect();
        assert_eq!(counts, [(first, 2), (second, 2)]);
        assert_eq!(repeats.choose(), [first, second]);
    }
}
