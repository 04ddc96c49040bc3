//! Reading traces: [`TraceView`], a zero-copy view over a whole trace in memory, for engines that replay it (as
//! many times and on as many threads as they like); and [`TraceReader`], a one-pass streaming reader over any
//! `Read`, whose memory is one chunk plus the block table, for tools that handle traces of any size.
//!
//! Both enforce the same rules through the same code: the chunk sequence, the chunk checksums and limits, and the
//! payload syntax, including that every block id names a block defined earlier in the file.

use std::io::Read;

use crate::blocks::BlockTable;
use crate::codec::{self, BlockShape, ChunkTables, Header, PayloadReader};
use crate::error::TraceError;
use crate::format::{self, ChunkHeader, ChunkKind, Version, CHUNK_HEADER_LEN, PREAMBLE_LEN};
use crate::model::{BlockId, BootState, Event, Footer, Metadata, Segment};

/// Where a chunk is and what its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    pub offset: u64,
    pub header: ChunkHeader,
}

impl ChunkInfo {
    pub fn total_len(&self) -> u64 {
        CHUNK_HEADER_LEN as u64 + u64::from(self.header.stored_len)
    }
}

/// The order chunks must come in: header, image chunks, then blocks and events in any mix, then the footer, then
/// nothing. Optional chunks may sit anywhere between header and footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    ExpectHeader,
    Image,
    Stream,
    Done,
}

struct ChunkSequence {
    stage: Stage,
    allow_trailing_fields: bool,
}

impl ChunkSequence {
    fn new(version: Version) -> Self {
        let allow_trailing_fields = version.minor > format::newest_known_minor(version.major);
        ChunkSequence { stage: Stage::ExpectHeader, allow_trailing_fields }
    }

    fn accept(&mut self, kind: ChunkKind, offset: u64) -> Result<(), TraceError> {
        let order_error = |message: String| TraceError::ChunkOrder { offset, message };
        self.stage = match (self.stage, kind) {
            (Stage::ExpectHeader, ChunkKind::Header) => Stage::Image,
            (Stage::ExpectHeader, other) => {
                return Err(order_error(format!("expected the header chunk first, found a {other} chunk")))
            }
            (Stage::Done, other) => return Err(order_error(format!("a {other} chunk after the footer"))),
            (_, ChunkKind::Header) => return Err(order_error("a second header chunk".into())),
            (Stage::Image, ChunkKind::Image) => Stage::Image,
            (Stage::Stream, ChunkKind::Image) => {
                return Err(order_error(
                    "an image chunk after blocks or events: the image must follow the header".into(),
                ))
            }
            (_, ChunkKind::Blocks | ChunkKind::Events) => Stage::Stream,
            (stage, ChunkKind::Optional(_)) => stage,
            (_, ChunkKind::Footer) => Stage::Done,
        };
        Ok(())
    }
}

/// Decodes the records of an image chunk.
fn decode_image(payload: &[u8], info: &ChunkInfo, image: &mut Vec<Segment>) -> Result<(), TraceError> {
    let mut r = PayloadReader::new(payload);
    for _ in 0..info.header.items {
        image.push(codec::decode_segment(&mut r).map_err(|e| e.in_chunk(info.header.kind, info.offset))?);
    }
    r.expect_end("image segments").map_err(|e| e.in_chunk(info.header.kind, info.offset))
}

fn decode_blocks(payload: &[u8], info: &ChunkInfo, table: &mut BlockTable) -> Result<(), TraceError> {
    let mut r = PayloadReader::new(payload);
    for _ in 0..info.header.items {
        table.push(codec::decode_block(&mut r).map_err(|e| e.in_chunk(info.header.kind, info.offset))?);
    }
    r.expect_end("blocks").map_err(|e| e.in_chunk(info.header.kind, info.offset))
}

fn decode_header_chunk(payload: &[u8], info: &ChunkInfo, sequence: &ChunkSequence) -> Result<Header, TraceError> {
    codec::decode_header(payload, sequence.allow_trailing_fields).map_err(|e| e.in_chunk(info.header.kind, info.offset))
}

fn decode_footer_chunk(payload: &[u8], info: &ChunkInfo, sequence: &ChunkSequence) -> Result<Footer, TraceError> {
    codec::decode_footer(payload, sequence.allow_trailing_fields).map_err(|e| e.in_chunk(info.header.kind, info.offset))
}

/// What a decoding pass hands the events of a chunk to; it may stop the pass with its own error.
pub(crate) trait Visit {
    type Error: From<TraceError>;
    /// Whether block executions named by a one-byte head (the bulk of every trace) should come through
    /// [`Visit::block`], sparing the consumer an [`Event`] to take apart; otherwise every event comes through
    /// [`Visit::event`], from one place in the loop, which lets the compiler inline a closure into it.
    const BLOCKS_APART: bool;
    fn block(&mut self, id: BlockId) -> Result<(), Self::Error>;
    fn event(&mut self, event: Event) -> Result<(), Self::Error>;
}

/// A closure that takes every event.
struct EachEvent<F>(F);

impl<F: FnMut(Event)> Visit for EachEvent<F> {
    type Error = TraceError;
    const BLOCKS_APART: bool = false;

    fn block(&mut self, id: BlockId) -> Result<(), TraceError> {
        self.event(Event::Block(id))
    }

    #[inline(always)]
    fn event(&mut self, event: Event) -> Result<(), TraceError> {
        (self.0)(event);
        Ok(())
    }
}

/// The events chunk `info`'s dictionaries, read into `tables`, and the position of its first event.
fn decode_chunk_tables(
    payload: &[u8],
    info: &ChunkInfo,
    version: Version,
    shapes: &[BlockShape],
    defined: usize,
    tables: &mut ChunkTables,
) -> Result<usize, TraceError> {
    let mut r = PayloadReader::new(payload);
    tables
        .decode(&mut r, defined, shapes, version.has_event_dictionary())
        .map_err(|e| e.in_chunk(ChunkKind::Events, info.offset))?;
    Ok(r.position())
}

/// Decodes every event of one events chunk, handing each to `visitor`. `defined` is the number of blocks defined
/// before the chunk; `tables` is a buffer reused across chunks.
#[inline(always)]
fn decode_event_chunk<V: Visit>(
    payload: &[u8],
    info: &ChunkInfo,
    version: Version,
    shapes: &[BlockShape],
    defined: usize,
    tables: &mut ChunkTables,
    visitor: &mut V,
) -> Result<(), V::Error> {
    let in_chunk = |e: crate::error::PayloadError| e.in_chunk(ChunkKind::Events, info.offset);
    let mut position = decode_chunk_tables(payload, info, version, shapes, defined, tables)?;
    let names = tables.blocks.as_slice();
    let repeated = tables.events.as_slice();
    for _ in 0..info.header.items {
        // Most events are executions of one of the chunk's 224 most frequent blocks: one byte, one lookup; most
        // of the others are repeats of the chunk's event dictionary: two bytes, one lookup. The reader of the
        // rest is a fresh one each time, never lent to a call that is not inlined, so that the position stays
        // in a register.
        let short = match payload.get(position) {
            Some(&head) if head < codec::SHORT_BLOCK_HEADS => names.get(usize::from(head)).map(|&id| BlockId(id)),
            _ => None,
        };
        if let (true, Some(id)) = (V::BLOCKS_APART, short) {
            position += 1;
            visitor.block(id)?;
            continue;
        }
        let event = match short {
            Some(id) => {
                position += 1;
                Event::Block(id)
            }
            None => match repeat_at(payload, position, repeated) {
                Some(event) => {
                    position += 2;
                    event
                }
                None => {
                    let mut r = PayloadReader::starting_at(payload, position);
                    let event = codec::decode_event(&mut r, names, repeated, shapes).map_err(in_chunk)?;
                    position = r.position();
                    event
                }
            },
        };
        visitor.event(event)?;
    }
    Ok(PayloadReader::starting_at(payload, position).expect_end("events").map_err(in_chunk)?)
}

/// The repeated event at `position`, when a well-formed repeat is there (anything else takes the general path,
/// which also names what is wrong).
#[inline(always)]
fn repeat_at(payload: &[u8], position: usize, repeated: &[Event]) -> Option<Event> {
    match payload.get(position..position + 2)? {
        &[codec::REPEAT_HEAD, index] => repeated.get(usize::from(index)).copied(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------------

/// Buffers reused across the chunks one consumer decodes: the decompressed payload and the chunk's dictionaries.
#[derive(Debug, Default)]
pub struct DecodeScratch {
    payload: Vec<u8>,
    tables: ChunkTables,
}

/// An events chunk and the number of blocks defined before it (the ids it may use).
#[derive(Debug, Clone, Copy)]
struct EventChunkRef {
    info: ChunkInfo,
    blocks_defined: usize,
}

/// A whole trace in memory, validated on open: container, checksums, header, image, block table and footer. Events
/// are decoded on demand, straight from the borrowed bytes when a chunk is stored, or from one reusable buffer
/// per pass when it is compressed.
///
/// The bytes can come from anywhere: a `Vec` read from a file, or a memory map the caller owns.
pub struct TraceView<'a> {
    bytes: &'a [u8],
    version: Version,
    header: Header,
    image: Vec<Segment>,
    blocks: BlockTable,
    footer: Footer,
    chunks: Vec<ChunkInfo>,
    event_chunks: Vec<EventChunkRef>,
}

impl<'a> TraceView<'a> {
    pub fn open(bytes: &'a [u8]) -> Result<TraceView<'a>, TraceError> {
        let version = format::parse_preamble(bytes)?;
        let mut sequence = ChunkSequence::new(version);
        let mut offset = PREAMBLE_LEN as u64;
        let mut scratch = Vec::new();
        let mut header = None;
        let mut image = Vec::new();
        let mut blocks = BlockTable::default();
        let mut chunks = Vec::new();
        let mut event_chunks = Vec::new();
        let footer = loop {
            let (info, stored) = chunk_at(bytes, offset)?;
            sequence.accept(info.header.kind, offset)?;
            chunks.push(info);
            offset += info.total_len();
            match info.header.kind {
                ChunkKind::Events => {
                    event_chunks.push(EventChunkRef { info, blocks_defined: blocks.len() });
                    continue;
                }
                ChunkKind::Optional(_) => continue,
                _ => {}
            }
            let payload = info.header.raw_payload(stored, &mut scratch, info.offset)?;
            match info.header.kind {
                ChunkKind::Header => header = Some(decode_header_chunk(payload, &info, &sequence)?),
                ChunkKind::Image => decode_image(payload, &info, &mut image)?,
                ChunkKind::Blocks => decode_blocks(payload, &info, &mut blocks)?,
                ChunkKind::Footer => break decode_footer_chunk(payload, &info, &sequence)?,
                // Listed above, decoded when an engine or the checker reads them.
                ChunkKind::Events | ChunkKind::Optional(_) => {}
            }
        };
        if offset < bytes.len() as u64 {
            return Err(trailing_error(chunks.last().map_or(0, |c| c.offset), bytes.len() as u64 - offset));
        }
        let Some(header) = header else {
            return Err(TraceError::ChunkOrder { offset: 0, message: "the trace has no header chunk".into() });
        };
        Ok(TraceView { bytes, version, header, image, blocks, footer, chunks, event_chunks })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn boot(&self) -> &BootState {
        &self.header.boot
    }

    pub fn image(&self) -> &[Segment] {
        &self.image
    }

    pub fn blocks(&self) -> &BlockTable {
        &self.blocks
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Calls `visit` with every event in order. This is the fast path: events are decoded in a tight loop, one
    /// chunk at a time, into a buffer reused across chunks.
    pub fn for_each_event(&self, mut visit: impl FnMut(Event)) -> Result<(), TraceError> {
        let mut scratch = DecodeScratch::default();
        for index in 0..self.event_chunks.len() {
            self.for_each_event_in_chunk(index, &mut scratch, &mut visit)?;
        }
        Ok(())
    }

    /// How many events chunks the trace has: the units [`TraceView::for_each_event_in_chunk`] decodes.
    pub fn event_chunk_count(&self) -> usize {
        self.event_chunks.len()
    }

    /// Calls `visit` with every event of events chunk `index` (0-based, in stream order), so that a consumer can
    /// replay a trace a chunk at a time and be scheduled between chunks. Visiting chunks 0, 1, … in order gives
    /// exactly [`TraceView::for_each_event`]'s sequence.
    pub fn for_each_event_in_chunk(
        &self,
        index: usize,
        scratch: &mut DecodeScratch,
        visit: impl FnMut(Event),
    ) -> Result<(), TraceError> {
        self.visit_chunk(index, scratch, &mut EachEvent(visit))
    }

    /// Decodes events chunk `index`, handing its events to `visitor`.
    #[inline(always)]
    pub(crate) fn visit_chunk<V: Visit>(
        &self,
        index: usize,
        scratch: &mut DecodeScratch,
        visitor: &mut V,
    ) -> Result<(), V::Error> {
        let Some(chunk) = self.event_chunks.get(index) else { return Ok(()) };
        let payload = self.event_payload(chunk, &mut scratch.payload)?;
        decode_event_chunk(
            payload,
            &chunk.info,
            self.version,
            self.blocks.shapes(),
            chunk.blocks_defined,
            &mut scratch.tables,
            visitor,
        )
    }

    /// Where events chunk `index` is, and how many blocks are defined before it.
    pub(crate) fn event_chunk(&self, index: usize) -> (ChunkInfo, usize) {
        let chunk = &self.event_chunks[index];
        (chunk.info, chunk.blocks_defined)
    }

    /// A pull iterator over the events, for consumers that stop early or interleave passes.
    pub fn events(&self) -> EventCursor<'_, 'a> {
        EventCursor { view: self, next_chunk: 0, scratch: Vec::new(), current: None, failed: false }
    }

    fn stored_payload(&self, info: &ChunkInfo) -> &'a [u8] {
        let start = info.offset as usize + CHUNK_HEADER_LEN;
        &self.bytes[start..start + info.header.stored_len as usize]
    }

    fn event_payload<'s>(&self, chunk: &EventChunkRef, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], TraceError>
    where
        'a: 's,
    {
        chunk.info.header.raw_payload(self.stored_payload(&chunk.info), scratch, chunk.info.offset)
    }
}

/// Reads the chunk at `offset` of an in-memory trace, checking its header, bounds and payload checksum.
fn chunk_at(bytes: &[u8], offset: u64) -> Result<(ChunkInfo, &[u8]), TraceError> {
    let available = (bytes.len() as u64).saturating_sub(offset);
    if available == 0 {
        return Err(TraceError::Truncated {
            what: "the next chunk (the trace ends without a footer)",
            offset,
            needed: CHUNK_HEADER_LEN as u64,
            available,
        });
    }
    if available < CHUNK_HEADER_LEN as u64 {
        return Err(TraceError::Truncated { what: "chunk header", offset, needed: CHUNK_HEADER_LEN as u64, available });
    }
    let start = offset as usize;
    let Some(header_bytes) = bytes.get(start..).and_then(<[u8]>::first_chunk::<CHUNK_HEADER_LEN>) else {
        return Err(TraceError::Truncated { what: "chunk header", offset, needed: CHUNK_HEADER_LEN as u64, available });
    };
    let header = ChunkHeader::decode(header_bytes, offset)?;
    let payload_available = available - CHUNK_HEADER_LEN as u64;
    if u64::from(header.stored_len) > payload_available {
        return Err(TraceError::Truncated {
            what: "chunk payload",
            offset,
            needed: header.stored_len.into(),
            available: payload_available,
        });
    }
    let stored = &bytes[start + CHUNK_HEADER_LEN..start + CHUNK_HEADER_LEN + header.stored_len as usize];
    header.verify_payload(stored, offset)?;
    Ok((ChunkInfo { offset, header }, stored))
}

/// Where a pull reader stands inside one events chunk. The payload lives elsewhere (the view's bytes, or a
/// buffer), so the cursor is handed it on every step; the chunk's dictionaries are the cursor's own.
#[derive(Debug, Clone)]
struct ChunkCursor {
    info: ChunkInfo,
    tables: ChunkTables,
    position: usize,
    left: u32,
}

impl ChunkCursor {
    /// Starts reading `payload`, the chunk's raw payload, whose blocks must be among the `defined` first.
    fn new(
        info: ChunkInfo,
        payload: &[u8],
        version: Version,
        shapes: &[BlockShape],
        defined: usize,
    ) -> Result<Self, TraceError> {
        let mut tables = ChunkTables::default();
        let position = decode_chunk_tables(payload, &info, version, shapes, defined, &mut tables)?;
        Ok(ChunkCursor { info, tables, position, left: info.header.items })
    }

    /// The next event, or `None` once the chunk's events are used up (and nothing else is left in it).
    fn next(&mut self, payload: &[u8], shapes: &[BlockShape]) -> Result<Option<Event>, TraceError> {
        let mut r = PayloadReader::starting_at(payload, self.position);
        let in_chunk = |e: crate::error::PayloadError| e.in_chunk(ChunkKind::Events, self.info.offset);
        if self.left == 0 {
            r.expect_end("events").map_err(in_chunk)?;
            return Ok(None);
        }
        let tables = &self.tables;
        let event = codec::decode_event(&mut r, tables.blocks.as_slice(), &tables.events, shapes).map_err(in_chunk)?;
        self.position = r.position();
        self.left -= 1;
        Ok(Some(event))
    }
}

/// One pass over a view's events; see [`TraceView::events`].
pub struct EventCursor<'v, 'a> {
    view: &'v TraceView<'a>,
    next_chunk: usize,
    scratch: Vec<u8>,
    current: Option<ChunkCursor>,
    failed: bool,
}

impl EventCursor<'_, '_> {
    fn advance(&mut self) -> Result<Option<Event>, TraceError> {
        loop {
            let Some(cursor) = self.current.as_mut() else {
                let Some(chunk) = self.view.event_chunks.get(self.next_chunk) else { return Ok(None) };
                self.next_chunk += 1;
                let payload = self.view.event_payload(chunk, &mut self.scratch)?;
                let (version, shapes) = (self.view.version, self.view.blocks.shapes());
                self.current = Some(ChunkCursor::new(chunk.info, payload, version, shapes, chunk.blocks_defined)?);
                continue;
            };
            let payload: &[u8] = if cursor.info.header.codec == format::Codec::Stored {
                self.view.stored_payload(&cursor.info)
            } else {
                &self.scratch
            };
            match cursor.next(payload, self.view.blocks.shapes())? {
                Some(event) => return Ok(Some(event)),
                None => self.current = None,
            }
        }
    }
}

impl Iterator for EventCursor<'_, '_> {
    type Item = Result<Event, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let result = self.advance();
        self.failed = result.is_err();
        result.transpose()
    }
}

// ---------------------------------------------------------------------------------------------------------------

/// Chunks read one after another from a stream, with their order checked.
struct ChunkStream<R: Read> {
    input: R,
    offset: u64,
    sequence: ChunkSequence,
    /// The stored payload of the last chunk read.
    stored: Vec<u8>,
    chunks: Vec<ChunkInfo>,
}

impl<R: Read> ChunkStream<R> {
    /// Reads the next chunk's header and stored payload into `self.stored`, checking order, bounds and checksum.
    fn read_chunk(&mut self) -> Result<ChunkInfo, TraceError> {
        let offset = self.offset;
        let mut header_bytes = [0u8; CHUNK_HEADER_LEN];
        let got = read_up_to(&mut self.input, &mut header_bytes)?;
        if got < CHUNK_HEADER_LEN {
            let what = if got == 0 { "the next chunk (the trace ends without a footer)" } else { "chunk header" };
            return Err(TraceError::Truncated { what, offset, needed: CHUNK_HEADER_LEN as u64, available: got as u64 });
        }
        let header = ChunkHeader::decode(&header_bytes, offset)?;
        self.sequence.accept(header.kind, offset)?;
        self.stored.clear();
        // Grows with the bytes actually present, so a lying length allocates nothing it cannot fill.
        (&mut self.input).take(header.stored_len.into()).read_to_end(&mut self.stored)?;
        if self.stored.len() < header.stored_len as usize {
            return Err(TraceError::Truncated {
                what: "chunk payload",
                offset,
                needed: header.stored_len.into(),
                available: self.stored.len() as u64,
            });
        }
        header.verify_payload(&self.stored, offset)?;
        let info = ChunkInfo { offset, header };
        self.offset += info.total_len();
        self.chunks.push(info);
        Ok(info)
    }
}

/// A one-pass reader over any byte stream. The header and image are read on construction; blocks are added to
/// [`TraceReader::blocks`] as their chunks go by; the footer is available once [`TraceReader::next_event`] has
/// returned `None`. Memory: one chunk (stored and decompressed), the image and the block table.
pub struct TraceReader<R: Read> {
    stream: ChunkStream<R>,
    version: Version,
    header: Header,
    image: Vec<Segment>,
    blocks: BlockTable,
    footer: Option<Footer>,
    /// A chunk read ahead while looking for the end of the image; its payload is in `stream.stored`.
    lookahead: Option<ChunkInfo>,
    scratch: Vec<u8>,
    current: Option<ChunkCursor>,
    /// The dictionaries of the chunk being decoded whole.
    tables: ChunkTables,
}

impl<R: Read> TraceReader<R> {
    pub fn new(mut input: R) -> Result<Self, TraceError> {
        let mut preamble = Vec::with_capacity(PREAMBLE_LEN);
        (&mut input).take(PREAMBLE_LEN as u64).read_to_end(&mut preamble)?;
        let version = format::parse_preamble(&preamble)?;
        let mut stream = ChunkStream {
            input,
            offset: PREAMBLE_LEN as u64,
            sequence: ChunkSequence::new(version),
            stored: Vec::new(),
            chunks: Vec::new(),
        };
        let mut scratch = Vec::new();
        let first = stream.read_chunk()?;
        let payload = first.header.raw_payload(&stream.stored, &mut scratch, first.offset)?;
        let header = decode_header_chunk(payload, &first, &stream.sequence)?;
        let mut image = Vec::new();
        let lookahead = loop {
            let info = stream.read_chunk()?;
            match info.header.kind {
                ChunkKind::Image => {
                    let payload = info.header.raw_payload(&stream.stored, &mut scratch, info.offset)?;
                    decode_image(payload, &info, &mut image)?;
                }
                ChunkKind::Optional(_) => {}
                _ => break info,
            }
        };
        Ok(TraceReader {
            stream,
            version,
            header,
            image,
            blocks: BlockTable::default(),
            footer: None,
            lookahead: Some(lookahead),
            scratch,
            current: None,
            tables: ChunkTables::default(),
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn image(&self) -> &[Segment] {
        &self.image
    }

    /// Blocks defined so far (all of them once the events are exhausted).
    pub fn blocks(&self) -> &BlockTable {
        &self.blocks
    }

    /// The footer, once the last event has been read.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// Chunks read so far.
    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.stream.chunks
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.stream.offset
    }

    pub fn next_event(&mut self) -> Result<Option<Event>, TraceError> {
        loop {
            if let Some(cursor) = self.current.as_mut() {
                let payload = self.stream.payload(&cursor.info, &self.scratch);
                match cursor.next(payload, self.blocks.shapes())? {
                    Some(event) => return Ok(Some(event)),
                    None => self.current = None,
                }
            }
            let Some(info) = self.next_events_chunk()? else { return Ok(None) };
            let payload = self.stream.payload(&info, &self.scratch);
            let (shapes, defined) = (self.blocks.shapes(), self.blocks.len());
            self.current = Some(ChunkCursor::new(info, payload, self.version, shapes, defined)?);
        }
    }

    /// Reads on to the next events chunk, decoding the blocks chunks on the way and the footer at the end, and
    /// leaves its raw payload in the reader's buffers; `None` once the footer has been read. Callers either pull
    /// events with [`TraceReader::next_event`] or take whole chunks this way, never both.
    pub(crate) fn next_events_chunk(&mut self) -> Result<Option<ChunkInfo>, TraceError> {
        loop {
            if self.footer.is_some() {
                return Ok(None);
            }
            let info = match self.lookahead.take() {
                Some(info) => info,
                None => self.stream.read_chunk()?,
            };
            if let ChunkKind::Optional(_) = info.header.kind {
                continue;
            }
            let payload = info.header.raw_payload(&self.stream.stored, &mut self.scratch, info.offset)?;
            match info.header.kind {
                ChunkKind::Blocks => decode_blocks(payload, &info, &mut self.blocks)?,
                ChunkKind::Events => return Ok(Some(info)),
                ChunkKind::Footer => {
                    self.footer = Some(decode_footer_chunk(payload, &info, &self.stream.sequence)?);
                    let trailing = std::io::copy(&mut self.stream.input, &mut std::io::sink())?;
                    if trailing > 0 {
                        return Err(trailing_error(info.offset, trailing));
                    }
                }
                kind @ (ChunkKind::Header | ChunkKind::Image | ChunkKind::Optional(_)) => {
                    return Err(TraceError::ChunkOrder {
                        offset: info.offset,
                        message: format!("a {kind} chunk among the events chunks"),
                    });
                }
            }
        }
    }

    /// Decodes every event of the events chunk [`TraceReader::next_events_chunk`] just returned, handing each
    /// to `visitor`.
    #[inline(always)]
    pub(crate) fn visit_chunk<V: Visit>(&mut self, info: &ChunkInfo, visitor: &mut V) -> Result<(), V::Error> {
        let payload = self.stream.payload(info, &self.scratch);
        let (shapes, defined) = (self.blocks.shapes(), self.blocks.len());
        decode_event_chunk(payload, info, self.version, shapes, defined, &mut self.tables, visitor)
    }
}

impl<R: Read> ChunkStream<R> {
    /// The raw payload of the chunk just read: its stored bytes, or `decompressed` for a compressed one.
    fn payload<'s>(&'s self, info: &ChunkInfo, decompressed: &'s [u8]) -> &'s [u8] {
        if info.header.codec == format::Codec::Stored {
            &self.stored
        } else {
            decompressed
        }
    }
}

fn trailing_error(footer_offset: u64, bytes: u64) -> TraceError {
    TraceError::Trailing { offset: footer_offset, message: format!("{bytes} bytes follow the footer") }
}

fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
