//! The invariant checker: what a well-formed trace promises beyond its syntax. Readers already refuse what they
//! cannot decode (bad checksums, truncation, block ids out of range, partial blocks longer than their block); the
//! checker adds the semantic rules engines rely on, and recounts every total.

use std::fmt;
use std::io::Read;

use iced_x86::{Code, Decoder, DecoderOptions};

use crate::blocks::BlockTable;
use crate::codec::{BlockShape, Header};
use crate::error::TraceError;
use crate::model::{
    Block, BlockId, CodeMode, Context, Event, EventKind, Footer, GuestModes, PagingMode, Segment, Totals,
};
use crate::reader::{DecodeScratch, TraceReader, TraceView, Visit};

/// The revision of the rules below: bumped whenever a rule is added or accepts something else, so that a verdict
/// cached under an older revision is not trusted.
pub const RULES_REVISION: u32 = 1;

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

/// [`check`], calling `progress` with the bytes read so far before each events chunk is checked.
pub fn check_with_progress(input: impl Read, mut progress: impl FnMut(u64)) -> Result<CheckReport, CheckError> {
    let mut reader = TraceReader::new(input)?;
    check_image(reader.image(), reader.header())?;
    let mut pass = Pass::default();
    while let Some(info) = reader.next_events_chunk()? {
        pass.define_blocks(reader.blocks(), reader.blocks().len())?;
        progress(reader.bytes_read());
        let mut rules = pass.rules(info.offset);
        let checked = reader.visit_chunk(&info, &mut rules);
        pass.state = rules.state;
        checked?;
    }
    pass.define_blocks(reader.blocks(), reader.blocks().len())?;
    let Some(footer) = reader.footer() else {
        return Err(TraceError::ChunkOrder {
            offset: reader.bytes_read(),
            message: "the trace ends without a footer".into(),
        }
        .into());
    };
    pass.finish(reader.header(), footer, reader.chunks().len(), reader.bytes_read())
}

/// Checks a trace already open as a view, by the same rules and in the same order as [`check`]: a view has
/// already refused what its opening reads (the container, every chunk but the events, the footer), so a trace
/// broken in several places can report another first problem than the streaming checker does.
///
/// One decoding pass over the events, on the view a replay goes on to use, so that nothing decodes a trace twice
/// before replaying it. [`ViewChecker`] makes the same pass a chunk at a time.
pub fn check_view(view: &TraceView<'_>) -> Result<CheckReport, CheckError> {
    ViewChecker::new(view)?.finish()
}

/// [`check_view`] one events chunk at a time, so that a consumer can go on with each chunk as soon as it has
/// passed: `virtlab replay` replays a chunk while the checker reads the next (`virtlab_engines::
/// check_and_replay_many`). Every chunk passing is not the verdict: [`ViewChecker::finish`] still recounts the
/// totals. After an error the checker has nothing more to say; drop it.
pub struct ViewChecker<'v, 'a> {
    view: &'v TraceView<'a>,
    pass: Pass,
    scratch: DecodeScratch,
    next_chunk: usize,
}

impl<'v, 'a> ViewChecker<'v, 'a> {
    /// Checks what comes before the events (the image).
    pub fn new(view: &'v TraceView<'a>) -> Result<ViewChecker<'v, 'a>, CheckError> {
        check_image(view.image(), view.header())?;
        Ok(ViewChecker { view, pass: Pass::default(), scratch: DecodeScratch::default(), next_chunk: 0 })
    }

    /// Events chunks checked so far: the first `chunks_checked()` chunks obey every per-event rule.
    pub fn chunks_checked(&self) -> usize {
        self.next_chunk
    }

    /// Checks the next events chunk (and the blocks defined before it); false once there is none left.
    pub fn check_next_chunk(&mut self) -> Result<bool, CheckError> {
        self.check_next_chunk_into(&mut Unconsumed)
    }

    /// [`ViewChecker::check_next_chunk`], handing `consumer` every event of the chunk once it has passed the
    /// rules, in order, from the same decoding pass: a consumer fused with the checker this way never sees an event
    /// the rules refused, and the chunk is decoded once for both. When the chunk fails, `consumer` has seen the
    /// events before the one that broke a rule; whatever it made of them must be dropped with the error.
    #[inline]
    pub fn check_next_chunk_into(&mut self, consumer: &mut impl CheckedEvents) -> Result<bool, CheckError> {
        let index = self.next_chunk;
        if index == self.view.event_chunk_count() {
            return Ok(false);
        }
        let (info, blocks_defined) = self.view.event_chunk(index);
        self.pass.define_blocks(self.view.blocks(), blocks_defined)?;
        let mut checked = Checked { rules: self.pass.rules(info.offset), consumer };
        let outcome = self.view.visit_chunk(index, &mut self.scratch, &mut checked);
        self.pass.state = checked.rules.state;
        outcome?;
        self.next_chunk += 1;
        Ok(true)
    }

    /// Checks the chunks not yet checked, the blocks no event named, and the totals: the verdict.
    pub fn finish(mut self) -> Result<CheckReport, CheckError> {
        while self.check_next_chunk()? {}
        let view = self.view;
        self.pass.define_blocks(view.blocks(), view.blocks().len())?;
        self.pass.finish(view.header(), view.footer(), view.chunks().len(), view.file_len())
    }
}

fn violation(rule: Rule, site: Site, message: String) -> CheckError {
    CheckError::Violation(Violation { rule, site, message })
}

/// What the per-event rules know of a block.
#[derive(Debug, Clone)]
struct BlockRules {
    address: u64,
    /// The indices of its REP-prefixed string instructions.
    rep_sites: Vec<u32>,
}

/// One pass of the rules over the events in stream order: what they know of the blocks checked so far, what they
/// have counted, and the state that changes with every event.
#[derive(Default)]
struct Pass {
    /// Every block checked so far, by id (`counts.blocks` has the same ids).
    blocks: Vec<BlockRules>,
    counts: Counts,
    state: RuleState,
}

/// What the rules count, to recount the totals from at the end. A full block execution only adds one to its
/// block's count in the current mode; the instructions it retired are multiplied out once, by [`Counts::totals`].
#[derive(Default)]
struct Counts {
    /// Every block checked so far, by id, with its full executions.
    blocks: Vec<BlockCount>,
    /// Events of every kind but full block executions.
    others: [u64; EventKind::COUNT],
    /// Instructions retired by partial block executions: [kernel, user].
    partial: [u64; 2],
    /// Instructions a context change moved from the mode that counted them to the one they ran in: [out of
    /// kernel into user, out of user into kernel].
    moved: [u64; 2],
    /// Paging modes the contexts showed, and code modes of partial executions.
    modes: GuestModes,
}

/// What a full block execution reads and writes of its block, side by side: one bounds check, one place in memory.
#[derive(Clone, Copy)]
struct BlockCount {
    shape: BlockShape,
    /// Full executions: [in kernel mode, in user mode].
    runs: [u64; 2],
}

/// What changes with every event. `Copy` and small: each chunk's loop works on a local copy, stored back after
/// the chunk, rather than on fields behind a reference that every event would reload and store.
#[derive(Clone, Copy)]
struct RuleState {
    /// The code modes a block may run in now, as [`mode_bit`]s: none before the initial context, 64-bit only
    /// with long-mode paging. One test per block execution covers both rules.
    runnable: u8,
    /// Meaningless before the initial context.
    context: Context,
    user: bool,
    /// Whether a block has run: every other event belongs to the last block execution, `current`, which
    /// retired `retired` instructions (the limit for positions); `last_at` is the last position seen in it.
    in_block: bool,
    current: BlockId,
    retired: u32,
    last_at: u32,
}

impl Default for RuleState {
    fn default() -> Self {
        RuleState {
            runnable: 0,
            context: Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 },
            user: false,
            in_block: false,
            current: BlockId(0),
            retired: 0,
            last_at: 0,
        }
    }
}

impl Pass {
    /// Checks that the blocks of `table` up to `defined` (those not yet checked) decode, before any event names
    /// them.
    fn define_blocks(&mut self, table: &BlockTable, defined: usize) -> Result<(), CheckError> {
        for (id, block) in table.iter().take(defined).skip(self.blocks.len()) {
            let rep_sites = check_block_decodes(id, block)?;
            self.blocks.push(BlockRules { address: block.address, rep_sites });
            self.counts.blocks.push(BlockCount { shape: table.shapes()[id.index()], runs: [0; 2] });
        }
        Ok(())
    }

    /// The rules for the events chunk at `chunk_offset`, on a copy of the state: the caller stores it back once
    /// the chunk is done. The copy is a local of the decoding loop, which the compiler keeps in registers; the
    /// state itself, behind `&mut self`, would be reloaded and stored for every event.
    fn rules(&mut self, chunk_offset: u64) -> ChunkRules<'_> {
        ChunkRules { state: self.state, blocks: &self.blocks, counts: &mut self.counts, chunk_offset }
    }

    fn finish(
        &self,
        header: &Header,
        footer: &Footer,
        chunks: usize,
        file_bytes: u64,
    ) -> Result<CheckReport, CheckError> {
        let (totals, modes) = self.counts.totals();
        check_totals(&totals, modes, header, footer)?;
        Ok(CheckReport {
            events: totals.events_total(),
            blocks: self.blocks.len() as u64,
            instructions: footer.totals.instructions,
            chunks,
            file_bytes,
        })
    }
}

impl Counts {
    /// The totals the events add up to, and the guest modes they show.
    fn totals(&self) -> (Totals, GuestModes) {
        let mut totals = Totals { events: self.others, blocks: self.blocks.len() as u64, ..Totals::default() };
        let mut modes = self.modes;
        let mut by_mode = self.partial;
        for &BlockCount { shape, runs } in &self.blocks {
            for (sum, count) in by_mode.iter_mut().zip(runs) {
                *sum += count * u64::from(shape.instructions);
            }
            let executions = runs[0] + runs[1];
            totals.events[EventKind::Block.index()] += executions;
            if executions > 0 {
                modes.add_code(shape.mode);
            }
        }
        let [into_user, into_kernel] = self.moved;
        totals.instructions_kernel = by_mode[0].wrapping_sub(into_user).wrapping_add(into_kernel);
        totals.instructions_user = by_mode[1].wrapping_add(into_user).wrapping_sub(into_kernel);
        totals.instructions = by_mode[0] + by_mode[1];
        (totals, modes)
    }
}

/// The rules over one events chunk: the state, what they read of the blocks, and the counts.
struct ChunkRules<'p> {
    state: RuleState,
    blocks: &'p [BlockRules],
    counts: &'p mut Counts,
    chunk_offset: u64,
}

impl ChunkRules<'_> {
    /// The rules' state must not escape into a call that is not inlined, or it would live in memory: only values
    /// go to the cold path (and the counts, which live in memory anyway: the event's index is what they add up
    /// to).
    #[inline(always)]
    fn violation(&self, problem: (Rule, String)) -> CheckError {
        event_violation(problem, self.counts, self.chunk_offset)
    }

    /// An execution of block `id`, of this shape, that retired `retired` instructions: the rules on it, then
    /// the state it leaves.
    #[inline(always)]
    fn execution(&mut self, id: BlockId, shape: BlockShape, retired: u32) -> Result<(), CheckError> {
        if self.state.runnable & mode_bit(shape.mode) == 0 {
            return Err(self.cannot_run(id));
        }
        self.started(id, retired);
        Ok(())
    }

    /// The state a block execution that obeyed the rules leaves.
    #[inline(always)]
    fn started(&mut self, id: BlockId, retired: u32) {
        let state = &mut self.state;
        state.in_block = true;
        state.current = id;
        state.retired = retired;
        state.last_at = 0;
    }

    /// Why block `id` cannot run now: nothing can before the initial context, 64-bit code only in long mode.
    #[cold]
    fn cannot_run(&self, id: BlockId) -> CheckError {
        if self.state.runnable == 0 {
            return self.violation(initial_context(Event::Block(id)).expect_err("a block is not a context"));
        }
        self.violation(code_mode_mismatch(id, self.blocks[id.index()].address, self.state.context))
    }

    /// The rules every event but a block execution obeys: there is a current block execution, and the event's
    /// position lies in it, not before an earlier event's.
    #[inline(always)]
    fn position(&mut self, at: u32, event: Event) -> Result<BlockId, CheckError> {
        let state = &self.state;
        if !state.in_block {
            return Err(self.violation(before_any_block(event)));
        }
        if at > state.retired || at < state.last_at {
            let (id, retired, last_at) = (state.current, state.retired, state.last_at);
            return Err(self.violation(out_of_place(event, at, id, retired, last_at)));
        }
        self.state.last_at = at;
        Ok(self.state.current)
    }

    /// Counts an event that obeyed the rules, of a kind other than a full block execution.
    #[inline(always)]
    fn count(&mut self, kind: EventKind) {
        self.counts.others[kind.index()] += 1;
    }

    /// Enters `context`, which takes effect after instruction `at` of the current block execution: instructions
    /// after it ran in the new mode but were counted in the old one.
    #[inline(always)]
    fn enter(&mut self, at: u32, context: Context) {
        let state = &mut self.state;
        if context.is_user() != state.user {
            let moved = u64::from(state.retired.saturating_sub(at.saturating_add(1)));
            self.counts.moved[usize::from(state.user)] += moved;
            state.user = context.is_user();
        }
        self.counts.modes.add_paging(context.paging);
        state.context = context;
        let long_mode = matches!(context.paging, PagingMode::FourLevel | PagingMode::FiveLevel);
        state.runnable = mode_bit(CodeMode::Bits16) | mode_bit(CodeMode::Bits32);
        if long_mode {
            state.runnable |= mode_bit(CodeMode::Bits64);
        }
    }
}

impl Visit for ChunkRules<'_> {
    type Error = CheckError;
    const BLOCKS_APART: bool = true;

    #[inline(always)]
    fn block(&mut self, id: BlockId) -> Result<(), CheckError> {
        let block = &mut self.counts.blocks[id.index()];
        let shape = block.shape;
        if self.state.runnable & mode_bit(shape.mode) == 0 {
            return Err(self.cannot_run(id));
        }
        block.runs[usize::from(self.state.user)] += 1;
        self.started(id, shape.instructions);
        Ok(())
    }

    /// Each kind is taken apart here, so that only its fields travel on.
    #[inline(always)]
    fn event(&mut self, event: Event) -> Result<(), CheckError> {
        if self.state.runnable == 0 {
            let initial = initial_context(event).map_err(|problem| self.violation(problem))?;
            self.enter(0, initial);
            self.count(EventKind::Context);
            return Ok(());
        }
        match event {
            Event::Block(id) => return self.block(id),
            Event::PartialBlock { block, executed } => {
                let shape = self.counts.blocks[block.index()].shape;
                self.execution(block, shape, executed)?;
                self.counts.others[EventKind::PartialBlock.index()] += 1;
                self.counts.partial[usize::from(self.state.user)] += u64::from(executed);
                self.counts.modes.add_code(shape.mode);
                return Ok(());
            }
            Event::Context { at, context } => {
                self.position(at, event)?;
                if context == self.state.context {
                    return Err(self.violation(context_repeats(context)));
                }
                self.enter(at, context);
            }
            Event::RepString { at, .. } => {
                let id = self.position(at, event)?;
                let block = &self.blocks[id.index()];
                if !block.rep_sites.contains(&at) {
                    return Err(self.violation(not_a_rep_site(at, id, block.address)));
                }
            }
            other => {
                // Every event but a block execution (matched above) has a position.
                if let Some(at) = other.at() {
                    self.position(at, other)?;
                }
            }
        }
        self.count(event.kind());
        Ok(())
    }
}

/// What takes the events of a trace from the checker's own pass ([`ViewChecker::check_next_chunk_into`]), each
/// once it has passed the rules.
pub trait CheckedEvents {
    /// A full execution of block `id` named by the chunk's block dictionary: the bulk of every trace, apart so
    /// that the loop's common path stays short. Inline it.
    fn block(&mut self, id: BlockId);
    /// Any other event, full block executions named the long way included. Keep large work out of line: it
    /// shares the loop with the rules, whose state should stay in registers.
    fn event(&mut self, event: Event);
}

/// The checker alone.
struct Unconsumed;

impl CheckedEvents for Unconsumed {
    #[inline(always)]
    fn block(&mut self, _: BlockId) {}
    #[inline(always)]
    fn event(&mut self, _: Event) {}
}

/// The rules over one events chunk, then the consumer of each event that passed them.
struct Checked<'p, 'c, C> {
    rules: ChunkRules<'p>,
    consumer: &'c mut C,
}

impl<C: CheckedEvents> Visit for Checked<'_, '_, C> {
    type Error = CheckError;
    const BLOCKS_APART: bool = true;

    #[inline(always)]
    fn block(&mut self, id: BlockId) -> Result<(), CheckError> {
        self.rules.block(id)?;
        self.consumer.block(id);
        Ok(())
    }

    #[inline(always)]
    fn event(&mut self, event: Event) -> Result<(), CheckError> {
        self.rules.event(event)?;
        self.consumer.event(event);
        Ok(())
    }
}

/// The violation of the event that comes after the `counted` ones.
#[cold]
#[inline(never)]
fn event_violation((rule, message): (Rule, String), counted: &Counts, chunk_offset: u64) -> CheckError {
    let index = counted.blocks.iter().map(|b| b.runs[0] + b.runs[1]).sum::<u64>() + counted.others.iter().sum::<u64>();
    violation(rule, Site::Event { index, chunk_offset }, message)
}

/// A code mode as one bit, to test against a set of them.
#[inline(always)]
fn mode_bit(mode: CodeMode) -> u8 {
    1 << mode as u8
}

/// The initial context, which the first event must be.
#[cold]
fn initial_context(event: Event) -> Result<Context, (Rule, String)> {
    match event {
        Event::Context { at: 0, context } => Ok(context),
        other => Err((
            Rule::StartsWithContext,
            format!("the first event is {} where the initial context (at 0) must be", other.kind().name()),
        )),
    }
}

#[cold]
fn code_mode_mismatch(id: BlockId, address: u64, context: Context) -> (Rule, String) {
    (
        Rule::CodeModeMatchesPaging,
        format!(
            "64-bit block {id} at {address:#x} runs with paging {}, but long mode needs 4- or 5-level paging",
            context.paging.name()
        ),
    )
}

#[cold]
fn before_any_block(event: Event) -> (Rule, String) {
    (
        Rule::PositionInBlock,
        format!("{} event before any block ran (only the initial context may come first)", event.kind().name()),
    )
}

#[cold]
fn out_of_place(event: Event, at: u32, id: BlockId, retired: u32, last_at: u32) -> (Rule, String) {
    let kind = event.kind().name();
    if at > retired {
        let message =
            format!("{kind} event at instruction {at} of block {id}, which retired only {retired} instructions");
        (Rule::PositionInBlock, message)
    } else {
        (Rule::PositionsInOrder, format!("{kind} event at instruction {at} of block {id} comes after one at {last_at}"))
    }
}

#[cold]
fn not_a_rep_site(at: u32, id: BlockId, address: u64) -> (Rule, String) {
    (
        Rule::RepOnStringInstruction,
        format!(
            "rep_string event at instruction {at} of block {id} ({address:#x}), which is not a REP-prefixed string \
             instruction"
        ),
    )
}

#[cold]
fn context_repeats(context: Context) -> (Rule, String) {
    (Rule::ContextChanges, format!("context event repeats the current context {context:?}"))
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

fn check_totals(recount: &Totals, modes: GuestModes, header: &Header, footer: &Footer) -> Result<(), CheckError> {
    let stated = &footer.totals;
    let mismatch = |rule: Rule, what: String, stated: u64, counted: u64| {
        violation(rule, Site::Totals, format!("{what} is {stated} but the events add up to {counted}"))
    };
    let scalars = [
        ("footer instruction total", stated.instructions, recount.instructions),
        ("footer user instruction total", stated.instructions_user, recount.instructions_user),
        ("footer kernel instruction total", stated.instructions_kernel, recount.instructions_kernel),
        ("footer block total", stated.blocks, recount.blocks),
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
    if header.modes != modes {
        return Err(violation(
            Rule::HeaderTotals,
            Site::Totals,
            format!(
                "header guest modes {:?} differ from the modes the events show {:?}",
                header.modes.names(),
                modes.names()
            ),
        ));
    }
    Ok(())
}
