//! Recording: the reference machine runs a guest and [`TraceRecorder`] turns what it observes into a trace
//! (`traces/FORMAT.md`). The machine knows nothing of the trace format and the format nothing of the machine; this crate is
//! the only place the two meet.

use std::io::{Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use virtlab_machine::observer::{
    AccessKind, BlockExecution, CpuContext, CutShortReason, DescriptorTable, ExecutionObserver, IoDirection, PageWalk,
    SideEvent, Transfer,
};
use virtlab_machine::{LoadError, Machine, MachineConfig, MachineError, RunLimits};
use virtlab_traces::fasthash::FastMap;
use virtlab_traces::{
    Access, Block, BlockId, BootState, CodeMode, Context, DescriptorLoad, Direction, EndReason, Ending, Event,
    Metadata, PageSize, PagingMode, Segment, TraceWriter, Walk, WriteError,
};

/// The observer that writes a trace. A block execution is written once the machine says whether it was cut
/// short, so the events inside it wait in a small buffer until then.
pub struct TraceRecorder<'w, W: Write + Seek> {
    writer: &'w mut TraceWriter<W>,
    ids: BlockIds,
    current: Option<CurrentBlock>,
    /// Events of the current block execution, in order.
    inside: Vec<Event>,
    /// The first write error: observer callbacks cannot fail, so it is reported when recording ends.
    error: Option<WriteError>,
}

/// Trace ids of the machine's blocks, by the machine's id and where the block ran (its address, and the address
/// space of a user block). The machine numbers blocks from 0 as it decodes them, so a block's first place is
/// found by index, with no hashing per execution; the same machine block run elsewhere (code shared by two
/// processes) is another trace block, kept in `elsewhere`.
#[derive(Default)]
struct BlockIds {
    first: Vec<Option<(u64, u64, BlockId)>>,
    elsewhere: FastMap<(u64, u64, u64), BlockId>,
}

impl BlockIds {
    #[inline]
    fn get(&self, machine_id: u64, address: u64, space: u64) -> Option<BlockId> {
        match usize::try_from(machine_id).ok().and_then(|index| self.first.get(index)) {
            Some(&Some((a, s, id))) if a == address && s == space => Some(id),
            _ => self.elsewhere.get(&(machine_id, address, space)).copied(),
        }
    }

    fn insert(&mut self, machine_id: u64, address: u64, space: u64, id: BlockId) {
        let index = usize::try_from(machine_id).unwrap_or(usize::MAX);
        // Only the next index or a free one below it: ids from elsewhere than the machine's dense numbering
        // cannot make the table grow without bound.
        if index == self.first.len() {
            self.first.push(Some((address, space, id)));
        } else if let Some(slot @ None) = self.first.get_mut(index) {
            *slot = Some((address, space, id));
        } else {
            self.elsewhere.insert((machine_id, address, space), id);
        }
    }
}

struct CurrentBlock {
    id: BlockId,
    /// Set when the block was cut short.
    retired: Option<u32>,
}

impl<'w, W: Write + Seek> TraceRecorder<'w, W> {
    pub fn new(writer: &'w mut TraceWriter<W>) -> Self {
        TraceRecorder { writer, ids: BlockIds::default(), current: None, inside: Vec::new(), error: None }
    }

    fn keep(&mut self, result: Result<(), WriteError>) {
        if let Err(error) = result {
            self.error.get_or_insert(error);
        }
    }

    /// Writes the current block execution and the events inside it.
    fn close_block(&mut self) {
        let Some(block) = self.current.take() else { return };
        let execution = match block.retired {
            Some(executed) => Event::PartialBlock { block: block.id, executed },
            None => Event::Block(block.id),
        };
        let result = self.writer.push(&execution);
        self.keep(result);
        // Drained in place: the buffer keeps its allocation for the next block.
        for event in &self.inside {
            if let Err(error) = self.writer.push(event) {
                self.error.get_or_insert(error);
            }
        }
        self.inside.clear();
    }

    fn record(&mut self, event: Event) {
        match (&self.current, event) {
            (Some(_), event) => self.inside.push(event),
            // Before the first block only the initial context goes straight out; anything else (the fetch of
            // the first block touching its page, reported at index 0) waits for that block.
            (None, Event::Context { .. }) => {
                let result = self.writer.push(&event);
                self.keep(result);
            }
            (None, event) => self.inside.push(event),
        }
    }

    /// Writes the last block execution and reports the first write error, if any. The caller then finishes
    /// the writer with the run's ending.
    pub fn close(mut self) -> Result<(), WriteError> {
        self.close_block();
        self.error.map_or(Ok(()), Err)
    }
}

fn code_mode(mode: virtlab_machine::CodeMode) -> CodeMode {
    match mode {
        virtlab_machine::CodeMode::Bits16 => CodeMode::Bits16,
        virtlab_machine::CodeMode::Bits32 => CodeMode::Bits32,
        virtlab_machine::CodeMode::Bits64 => CodeMode::Bits64,
    }
}

fn paging_mode(mode: virtlab_machine::PagingMode) -> PagingMode {
    use virtlab_machine::PagingMode as Machine;
    match mode {
        Machine::None => PagingMode::Disabled,
        Machine::TwoLevel => PagingMode::TwoLevel,
        Machine::Pae => PagingMode::Pae,
        Machine::FourLevel => PagingMode::FourLevel,
    }
}

fn direction(direction: IoDirection) -> Direction {
    match direction {
        IoDirection::In => Direction::Read,
        IoDirection::Out => Direction::Write,
    }
}

fn page_size(bytes: u64) -> PageSize {
    match bytes {
        0x20_0000 => PageSize::Size2M,
        0x4000_0000 => PageSize::Size1G,
        _ => PageSize::Size4K,
    }
}

impl<W: Write + Seek> ExecutionObserver for TraceRecorder<'_, W> {
    fn block(&mut self, block: &BlockExecution<'_>) {
        self.close_block();
        let id = match self.ids.get(block.id, block.address, block.address_space) {
            Some(id) => id,
            None => {
                let definition = Block {
                    address: block.address,
                    mode: code_mode(block.mode),
                    tag: block.address_space,
                    instructions: block.instruction_count,
                    bytes: block.bytes.to_vec(),
                };
                match self.writer.add_block(&definition) {
                    Ok(id) => {
                        self.ids.insert(block.id, block.address, block.address_space, id);
                        id
                    }
                    Err(error) => {
                        self.error.get_or_insert(error);
                        return;
                    }
                }
            }
        };
        self.current = Some(CurrentBlock { id, retired: None });
    }

    fn block_cut_short(&mut self, retired: u32, _reason: CutShortReason) {
        if let Some(block) = self.current.as_mut() {
            block.retired = Some(retired);
        }
    }

    fn context(&mut self, index: u32, context: &CpuContext) {
        let context = Context {
            cpl: context.cpl,
            interrupts_enabled: context.interrupts_enabled,
            paging: paging_mode(context.paging),
            cr3: context.cr3,
        };
        self.record(Event::Context { at: index, context });
    }

    fn transfer(&mut self, index: u32, transfer: &Transfer) {
        let at = index;
        self.record(match *transfer {
            Transfer::Syscall { .. } => Event::Syscall { at },
            Transfer::Sysret { .. } => Event::Sysret { at },
            Transfer::Exception { vector, error_code, cr2, walk, .. } => Event::Exception {
                at,
                vector,
                error_code,
                cr2,
                walk: walk.as_ref().map(trace_walk).unwrap_or_default(),
            },
            Transfer::ExternalInterrupt { vector, .. } => Event::Interrupt { at, vector },
            Transfer::SoftwareInterrupt { vector, .. } => Event::SoftwareInterrupt { at, vector },
            Transfer::InterruptReturn { .. } => Event::Iret { at },
        });
    }

    fn side_event(&mut self, index: u32, event: &SideEvent) {
        let at = index;
        self.record(match *event {
            SideEvent::ControlRegisterWrite { cr, old, new } => Event::CrWrite { at, cr, old, new },
            SideEvent::MsrRead { index, value } => Event::MsrRead { at, index, value },
            SideEvent::MsrWrite { index, value } => Event::MsrWrite { at, index, value },
            SideEvent::Io { port, size, direction: dir, value } => {
                Event::Io { at, port, size, direction: direction(dir), value }
            }
            SideEvent::Cpuid { leaf, subleaf } => Event::Cpuid { at, leaf, subleaf },
            SideEvent::Invlpg { address } => Event::Invlpg { at, address },
            SideEvent::DescriptorTableLoad(table) => Event::DescriptorLoad {
                at,
                load: match table {
                    DescriptorTable::Gdt { base, limit } => DescriptorLoad::Gdt { base, limit },
                    DescriptorTable::Idt { base, limit } => DescriptorLoad::Idt { base, limit },
                    DescriptorTable::Ldt { selector } => DescriptorLoad::Ldt { selector },
                    DescriptorTable::TaskRegister { selector } => DescriptorLoad::Tr { selector },
                },
            },
            SideEvent::Hlt { idle } => Event::Hlt { at, idle },
            SideEvent::PageTableWrite { gpa, level, old, new } => Event::PageTableWrite { at, gpa, level, old, new },
            SideEvent::PageTouch { virtual_page, frame, kind, user, page_size: size, walk } => Event::PageTouch {
                at,
                page: virtual_page,
                frame,
                access: match kind {
                    AccessKind::Read => Access::Read,
                    AccessKind::Write => Access::Write,
                    AccessKind::Execute => Access::Execute,
                },
                user,
                size: page_size(size),
                walk: trace_walk(&walk),
            },
            SideEvent::Mmio { gpa, size, direction: dir, value } => {
                Event::Mmio { at, gpa, size, direction: direction(dir), value }
            }
            SideEvent::RepString { elements } => Event::RepString { at, elements },
        });
    }
}

/// The tables a walk read, as the trace's frame numbers. Guest RAM ends far below 2^44 bytes, so every frame
/// number fits 32 bits.
fn trace_walk(walk: &PageWalk) -> Walk {
    let levels = usize::from(walk.levels).min(Walk::MAX_LEVELS);
    let mut frames = [0u32; Walk::MAX_LEVELS];
    for (frame, &table) in frames.iter_mut().zip(&walk.tables[..levels]) {
        *frame = u32::try_from(table >> 12).unwrap_or(u32::MAX);
    }
    Walk::new(&frames[..levels]).unwrap_or_default()
}

/// What to record.
pub struct RecordRequest<'a> {
    pub image: &'a [u8],
    pub metadata: Metadata,
    pub machine: MachineConfig,
    /// Stop (with a valid, incomplete trace) after this many instructions.
    pub max_instructions: u64,
    /// Stop (with a valid, incomplete trace) at the first block boundary after this much wall-clock time.
    pub timeout: Option<Duration>,
}

/// What was recorded.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub ending: Ending,
    pub instructions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot write the trace: {0}")]
    Write(#[from] WriteError),
    #[error(
        "{workload} did not run to a clean exit on the reference machine ({reason:?}, exit status {status}): \
         {detail}; `virtlab run` on the same image shows where it stops"
    )]
    UncleanExit { workload: String, reason: EndReason, status: u32, detail: String },
}

impl From<std::io::Error> for RecordError {
    fn from(error: std::io::Error) -> Self {
        RecordError::Write(WriteError::Io(error))
    }
}

/// Records `image` in memory on the default reference machine, as `virtlab record` would, and insists that the
/// guest ran to a clean exit: what validation, calibration, benchmarks and tests replay.
pub fn record_in_memory(image: &[u8], metadata: Metadata, max_instructions: u64) -> Result<Vec<u8>, RecordError> {
    let workload = metadata.workload.clone();
    let request = RecordRequest { image, metadata, machine: MachineConfig::default(), max_instructions, timeout: None };
    let (out, summary) = record(std::io::Cursor::new(Vec::new()), request)?;
    let ending = summary.ending;
    if ending.reason != EndReason::GuestExit || ending.exit_status != 0 {
        return Err(RecordError::UncleanExit {
            workload,
            reason: ending.reason,
            status: ending.exit_status,
            detail: ending.detail,
        });
    }
    Ok(out.into_inner())
}

/// Boots `request.image` on the reference machine, records its run into the trace at `path` (written
/// atomically: a temporary file beside it, renamed at the end), and says how it ended. A guest that
/// triple-faults, loops past the limits or meets an instruction the machine does not model still gives a
/// valid trace, marked incomplete, whose footer says why.
pub fn record_to_file(path: &Path, request: RecordRequest<'_>) -> Result<RecordSummary, RecordError> {
    virtlab_traces::atomic::write_with(path, |out| Ok(record(out, request)?.1))
}

/// [`record_to_file`] into any seekable sink, which it returns with the summary.
pub fn record<W: Write + Seek>(out: W, request: RecordRequest<'_>) -> Result<(W, RecordSummary), RecordError> {
    let mut machine = Machine::from_multiboot(request.image, request.machine.clone())?;
    let boot = boot_state(&machine);
    let image = initial_memory(&machine);
    let mut writer = TraceWriter::new(out, request.metadata, boot, &image)?;
    let mut recorder = TraceRecorder::new(&mut writer);
    machine.set_deadline(request.timeout.map(|timeout| Instant::now() + timeout));
    let outcome =
        machine.run(&mut recorder, RunLimits { max_instructions: request.max_instructions }).map_err(|error| {
            let reason = match error {
                MachineError::InstructionLimit { .. } => EndReason::InstructionLimit,
                MachineError::Deadline { .. } => EndReason::Timeout,
                MachineError::TripleFault { .. } => EndReason::TripleFault,
                _ => EndReason::MachineError,
            };
            (reason, error.to_string())
        });
    let ending = match outcome {
        Ok(outcome) => Ending {
            reason: EndReason::GuestExit,
            exit_status: outcome.exit_status,
            detail: String::new(),
            serial: outcome.serial,
            state_digest: outcome.digest,
        },
        Err((reason, detail)) => Ending {
            reason,
            exit_status: 0,
            detail,
            serial: machine.serial_output().to_vec(),
            state_digest: machine.state_digest(),
        },
    };
    recorder.close()?;
    let out = writer.finish(ending.clone())?;
    Ok((out, RecordSummary { ending, instructions: machine.retired_instructions() }))
}

/// The processor state the machine starts from, as the trace records it.
fn boot_state(machine: &Machine) -> BootState {
    let cpu = machine.cpu();
    BootState {
        rip: cpu.rip,
        rax: cpu.gpr[0],
        rbx: cpu.gpr[3],
        rsp: cpu.gpr[4],
        rflags: cpu.rflags,
        cr0: cpu.cr0,
        mode: code_mode(cpu.code_mode()),
        ram_bytes: machine.ram().len() as u64,
    }
}

/// The loaded RAM as segments: runs of pages that are not all zero (all other RAM starts zero).
fn initial_memory(machine: &Machine) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for (gpa, page) in machine.nonzero_pages() {
        match segments.last_mut() {
            Some(last) if last.gpa + last.bytes.len() as u64 == gpa => last.bytes.extend_from_slice(page),
            _ => segments.push(Segment { gpa, bytes: page.to_vec() }),
        }
    }
    segments
}
