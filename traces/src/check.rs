//! The invariant checker: what a well-formed trace promises beyond its syntax. Readers already refuse what they
//! cannot decode (bad checksums, truncation, block ids out of range, partial blocks longer than their block); the
//! checker adds the semantic rules engines rely on, and recounts every total.

use std::fmt;
use std::io::Read;

use iced_x86::{Code, Decoder, DecoderOptions};

use crate::blocks::BlockTable;
use crate::codec::Header;
use crate::error::TraceError;
use crate::model::{Block, BlockId, CodeMode, Context, Event, EventKind, Footer, PagingMode, Segment};
use crate::reader::TraceReader;
use crate::tally::Tally;

/// The rule a trace broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The stream must open with the initial context, before any block runs.
    StartsWithContext,
    /// A context event must change something.
    ContextChanges,
    /// An event's position must lie within the block execution it belongs to.
    PositionInBlock,
    /// Positions within one block execution never go backwards.
    PositionsInOrder,
    /// 64-bit code runs only in long mode, which has 4- or 5-level paging.
    CodeModeMatchesPaging,
    /// A block's bytes decode to exactly its instruction count, with no invalid instruction.
    BlockDecodes,
    /// The image lies within RAM, without overlaps.
    ImageInRam,
    /// The footer's totals equal the recounted events.
    FooterTotals,
    /// The header's totals equal the footer's.
    HeaderTotals,
    /// A `rep_string` event names a REP-prefixed string instruction.
    RepOnStringInstruction,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::StartsWithContext => "starts-with-context",
            Rule::ContextChanges => "context-changes",
            Rule::PositionInBlock => "position-in-block",
            Rule::PositionsInOrder => "positions-in-order",
            Rule::CodeModeMatchesPaging => "code-mode-matches-paging",
            Rule::BlockDecodes => "block-decodes",
            Rule::ImageInRam => "image-in-ram",
            Rule::FooterTotals => "footer-totals",
            Rule::HeaderTotals => "header-totals",
            Rule::RepOnStringInstruction => "rep-on-string-instruction",
        }
    }
}

/// Where a violation was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Site {
    /// The n-th event (0-based), in the events chunk at this file offset.
    Event {
        index: u64,
        chunk_offset: u64,
    },
    Block(BlockId),
    Image {
        gpa: u64,
    },
    Totals,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Event { index, chunk_offset } => write!(f, "event {index} (events chunk at offset {chunk_offset})"),
            Site::Block(id) => write!(f, "block {id}"),
            Site::Image { gpa } => write!(f, "image segment at {gpa:#x}"),
            Site::Totals => f.write_str("totals"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub site: Site,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [rule {}]", self.site, self.message, self.rule.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Malformed(#[from] TraceError),
    #[error("{0}")]
    Violation(Violation),
}

/// What a valid trace held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub events: u64,
    pub blocks: u64,
    pub instructions: u64,
    pub chunks: usize,
    pub file_bytes: u64,
}

/// Checks a whole trace read from `input`, streaming (memory: one chunk plus the block table). Returns the first
/// problem found.
pub fn check(input: impl Read) -> Result<CheckReport, CheckError> {
    check_with_progress(input, |_| {})
}

/// [`check`], calling `progress` with the bytes read so far after each events chunk.
pub fn check_with_progress(input: impl Read, mut progress: impl FnMut(u64)) -> Result<CheckReport, CheckError> {
    let mut reader = TraceReader::new(input)?;
    let header = reader.header().clone();
    check_image(reader.image(), &header)?;
    let mut stream = StreamRules::default();
    let mut index = 0u64;
    let mut last_chunk = 0;
    while let Some(event) = reader.next_event()? {
        while stream.rep_sites.len() < reader.blocks().len() {
            let id = BlockId(stream.rep_sites.len() as u32);
            stream.rep_sites.push(check_block_decodes(id, reader.blocks().get(id))?);
        }
        let chunk_offset = reader.chunks().last().map_or(0, |c| c.offset);
        if chunk_offset != last_chunk {
            progress(reader.bytes_read());
            last_chunk = chunk_offset;
        }
        stream
            .observe(&event, reader.blocks())
            .map_err(|(rule, message)| violation(rule, Site::Event { index, chunk_offset }, message))?;
        index += 1;
    }
    for (id, block) in reader.blocks().iter().skip(stream.rep_sites.len()) {
        check_block_decodes(id, block)?;
    }
    let footer = reader.footer().expect("the stream ended at the footer").clone();
    check_totals(&stream.tally, reader.blocks(), &header, &footer)?;
    Ok(CheckReport {
        events: index,
        blocks: reader.blocks().len() as u64,
        instructions: footer.totals.instructions,
        chunks: reader.chunks().len(),
        file_bytes: reader.bytes_read(),
    })
}

fn violation(rule: Rule, site: Site, message: String) -> CheckError {
    CheckError::Violation(Violation { rule, site, message })
}

/// The per-event rules, with the state they need.
#[derive(Default)]
struct StreamRules {
    tally: Tally,
    context: Option<Context>,
    /// Instructions the current block execution retired (its limit for positions), and the last position seen.
    current: Option<(BlockId, u32)>,
    last_at: u32,
    /// Per block checked so far, the indices of its REP-prefixed string instructions.
    rep_sites: Vec<Vec<u32>>,
}

impl StreamRules {
    fn observe(&mut self, event: &Event, blocks: &BlockTable) -> Result<(), (Rule, String)> {
        let Some(context) = self.context else {
            return match event {
                Event::Context { at: 0, context } => {
                    self.context = Some(*context);
                    self.tally.observe(event, blocks.shapes());
                    Ok(())
                }
                other => Err((
                    Rule::StartsWithContext,
                    format!("the first event is {} where the initial context (at 0) must be", other.kind().name()),
                )),
            };
        };
        match *event {
            Event::Block(id) | Event::PartialBlock { block: id, .. } => {
                let block = blocks.get(id);
                if block.mode == CodeMode::Bits64
                    && !matches!(context.paging, PagingMode::FourLevel | PagingMode::FiveLevel)
                {
                    return Err((
                        Rule::CodeModeMatchesPaging,
                        format!(
                            "64-bit block {id} at {:#x} runs with paging {}, but long mode needs 4- or 5-level paging",
                            block.address,
                            context.paging.name()
                        ),
                    ));
                }
                let retired = match *event {
                    Event::PartialBlock { executed, .. } => executed,
                    _ => block.instructions,
                };
                self.current = Some((id, retired));
                self.last_at = 0;
            }
            _ => {
                let at = event.at().expect("non-block events have a position");
                let Some((id, retired)) = self.current else {
                    return Err((
                        Rule::PositionInBlock,
                        format!(
                            "{} event before any block ran (only the initial context may come first)",
                            event.kind().name()
                        ),
                    ));
                };
                if at > retired {
                    return Err((
                        Rule::PositionInBlock,
                        format!(
                            "{} event at instruction {at} of block {id}, which retired only {retired} instructions",
                            event.kind().name()
                        ),
                    ));
                }
                if at < self.last_at {
                    return Err((
                        Rule::PositionsInOrder,
                        format!(
                            "{} event at instruction {at} of block {id} comes after one at {}",
                            event.kind().name(),
                            self.last_at
                        ),
                    ));
                }
                self.last_at = at;
                if matches!(event, Event::RepString { .. })
                    && !self.rep_sites.get(id.index()).is_some_and(|s| s.contains(&at))
                {
                    return Err((
                        Rule::RepOnStringInstruction,
                        format!(
                            "rep_string event at instruction {at} of block {id} ({:#x}), which is not a REP-prefixed \
                             string instruction",
                            blocks.get(id).address
                        ),
                    ));
                }
                if let Event::Context { context: new, .. } = *event {
                    if new == context {
                        return Err((
                            Rule::ContextChanges,
                            format!("context event repeats the current context {context:?}"),
                        ));
                    }
                    self.context = Some(new);
                }
            }
        }
        self.tally.observe(event, blocks.shapes());
        Ok(())
    }
}

/// Checks that a block decodes; returns the indices of its REP-prefixed string instructions.
fn check_block_decodes(id: BlockId, block: &Block) -> Result<Vec<u32>, CheckError> {
    let mut decoder = Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE);
    let mut count = 0u32;
    let mut rep_sites = Vec::new();
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_string_instruction() && (instruction.has_rep_prefix() || instruction.has_repne_prefix()) {
            rep_sites.push(count);
        }
        if instruction.code() == Code::INVALID {
            return Err(violation(
                Rule::BlockDecodes,
                Site::Block(id),
                format!(
                    "invalid or truncated instruction at {:#x} (byte {} of the block at {:#x}, {}-bit)",
                    instruction.ip(),
                    instruction.ip().wrapping_sub(block.address),
                    block.address,
                    block.mode.bitness()
                ),
            ));
        }
        count += 1;
    }
    if count != block.instructions {
        return Err(violation(
            Rule::BlockDecodes,
            Site::Block(id),
            format!(
                "the bytes at {:#x} decode to {count} instructions, the table says {}",
                block.address, block.instructions
            ),
        ));
    }
    Ok(rep_sites)
}

fn check_image(image: &[Segment], header: &Header) -> Result<(), CheckError> {
    let ram = header.boot.ram_bytes;
    let mut ranges: Vec<(u64, u64)> = image.iter().map(|s| (s.gpa, s.gpa + s.bytes.len() as u64)).collect();
    for &(start, end) in &ranges {
        if end > ram {
            return Err(violation(
                Rule::ImageInRam,
                Site::Image { gpa: start },
                format!("segment [{start:#x}, {end:#x}) extends past the end of RAM at {ram:#x}"),
            ));
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(violation(
                Rule::ImageInRam,
                Site::Image { gpa: pair[1].0 },
                format!(
                    "segment at {:#x} overlaps the one at {:#x} (which ends at {:#x})",
                    pair[1].0, pair[0].0, pair[0].1
                ),
            ));
        }
    }
    Ok(())
}

fn check_totals(tally: &Tally, blocks: &BlockTable, header: &Header, footer: &Footer) -> Result<(), CheckError> {
    let recount = &tally.totals;
    let stated = &footer.totals;
    let mismatch = |rule: Rule, what: String, stated: u64, counted: u64| {
        violation(rule, Site::Totals, format!("{what} is {stated} but the events add up to {counted}"))
    };
    let scalars = [
        ("footer instruction total", stated.instructions, recount.instructions),
        ("footer user instruction total", stated.instructions_user, recount.instructions_user),
        ("footer kernel instruction total", stated.instructions_kernel, recount.instructions_kernel),
        ("footer block total", stated.blocks, blocks.len() as u64),
    ];
    for (what, stated, counted) in scalars {
        if stated != counted {
            return Err(mismatch(Rule::FooterTotals, what.into(), stated, counted));
        }
    }
    for kind in EventKind::ALL {
        if stated.count(kind) != recount.count(kind) {
            return Err(mismatch(
                Rule::FooterTotals,
                format!("footer count of {} events", kind.name()),
                stated.count(kind),
                recount.count(kind),
            ));
        }
    }
    if header.instructions != recount.instructions {
        return Err(mismatch(
            Rule::HeaderTotals,
            "header instruction total".into(),
            header.instructions,
            recount.instructions,
        ));
    }
    if header.events != recount.events_total() {
        return Err(mismatch(Rule::HeaderTotals, "header event total".into(), header.events, recount.events_total()));
    }
    if header.modes != tally.modes {
        return Err(violation(
            Rule::HeaderTotals,
            Site::Totals,
            format!(
                "header guest modes {:?} differ from the modes the events show {:?}",
                header.modes.names(),
                tally.modes.names()
            ),
        ));
    }
    Ok(())
}
