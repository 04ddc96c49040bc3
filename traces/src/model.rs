//! The values a trace holds, independent of how they are encoded.
//!
//! `FORMAT.md` gives the byte layout of each; this module gives their meaning.

use std::fmt;

/// Index of a block in the trace's block table. Ids are dense: the n-th block the writer was given has id n.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The operand/address size a block's code was decoded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeMode {
    Bits16,
    Bits32,
    Bits64,
}

impl CodeMode {
    pub const ALL: [CodeMode; 3] = [CodeMode::Bits16, CodeMode::Bits32, CodeMode::Bits64];

    pub fn bitness(self) -> u32 {
        match self {
            CodeMode::Bits16 => 16,
            CodeMode::Bits32 => 32,
            CodeMode::Bits64 => 64,
        }
    }

    pub fn from_bitness(bits: u32) -> Option<CodeMode> {
        match bits {
            16 => Some(CodeMode::Bits16),
            32 => Some(CodeMode::Bits32),
            64 => Some(CodeMode::Bits64),
            _ => None,
        }
    }
}

/// How linear addresses were translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    Disabled,
    /// 32-bit paging, two levels.
    TwoLevel,
    /// PAE paging, three levels (32-bit protected mode).
    Pae,
    /// 4-level paging (IA-32e / long mode).
    FourLevel,
    /// 5-level paging (LA57).
    FiveLevel,
}

impl PagingMode {
    pub const ALL: [PagingMode; 5] =
        [PagingMode::Disabled, PagingMode::TwoLevel, PagingMode::Pae, PagingMode::FourLevel, PagingMode::FiveLevel];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<PagingMode> {
        PagingMode::ALL.get(code as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            PagingMode::Disabled => "none",
            PagingMode::TwoLevel => "2-level",
            PagingMode::Pae => "pae",
            PagingMode::FourLevel => "4-level",
            PagingMode::FiveLevel => "5-level",
        }
    }
}

/// The execution context engines key their decisions on. A `Context` event carries the whole of it whenever any
/// part changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Context {
    /// Current privilege level, 0–3. Level 3 is user mode; 0–2 count as kernel.
    pub cpl: u8,
    /// RFLAGS.IF.
    pub interrupts_enabled: bool,
    pub paging: PagingMode,
    /// The whole CR3 value, flag and PCID bits included: it names the address space.
    pub cr3: u64,
}

impl Context {
    pub fn is_user(&self) -> bool {
        self.cpl == 3
    }
}

/// Direction of a port or MMIO access, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// IN, or an MMIO load.
    Read,
    /// OUT, or an MMIO store.
    Write,
}

/// Which descriptor-table register an instruction loaded, and with what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescriptorLoad {
    Gdt { base: u64, limit: u16 },
    Idt { base: u64, limit: u16 },
    Ldt { selector: u16 },
    Tr { selector: u16 },
}

/// The kind of access that first touched a page in a TLB epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    Execute,
}

impl Access {
    pub const ALL: [Access; 3] = [Access::Read, Access::Write, Access::Execute];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// One record of the event stream, in execution order.
///
/// `Block` and `PartialBlock` are block executions. Every other event belongs to the most recent block execution
/// and says where in it it happened: `at` is the index of the instruction that caused it (0-based), or, for a
/// transfer between instructions (an interrupt, an exception that stopped instruction `at` from retiring), the
/// index of the next instruction that would have run; `at` equals the block's retired count when the event came
/// after its last instruction. A context change at `at = i` takes effect from instruction `i + 1` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The whole block ran.
    Block(BlockId),
    /// The block's first `executed` instructions retired, then an exception or interrupt cut it short.
    PartialBlock {
        block: BlockId,
        executed: u32,
    },
    Context {
        at: u32,
        context: Context,
    },
    /// A fault or abort delivered through the IDT. For a page fault, `walk` holds the tables the faulting walk
    /// read (empty otherwise).
    Exception {
        at: u32,
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
        walk: Walk,
    },
    /// An external interrupt delivered through the IDT.
    Interrupt {
        at: u32,
        vector: u8,
    },
    /// INT n, INT3, INTO.
    SoftwareInterrupt {
        at: u32,
        vector: u8,
    },
    Syscall {
        at: u32,
    },
    Sysret {
        at: u32,
    },
    Iret {
        at: u32,
    },
    CrWrite {
        at: u32,
        cr: u8,
        old: u64,
        new: u64,
    },
    MsrRead {
        at: u32,
        index: u32,
        value: u64,
    },
    MsrWrite {
        at: u32,
        index: u32,
        value: u64,
    },
    /// One port access; a string instruction gives one per element.
    Io {
        at: u32,
        port: u16,
        size: u8,
        direction: Direction,
        value: u32,
    },
    Cpuid {
        at: u32,
        leaf: u32,
        subleaf: u32,
    },
    Invlpg {
        at: u32,
        address: u64,
    },
    DescriptorLoad {
        at: u32,
        load: DescriptorLoad,
    },
    /// HLT; `idle` is the time the machine waited for an interrupt, in the recorder's time units.
    Hlt {
        at: u32,
        idle: u64,
    },
    /// A guest instruction wrote a page-table entry. `level` 1 is the last level (PTE), 4 the PML4.
    PageTableWrite {
        at: u32,
        gpa: u64,
        level: u8,
        old: u64,
        new: u64,
    },
    /// The first access to a virtual page in the current TLB epoch. `page` and `frame` are page-aligned addresses;
    /// `walk` holds the page-table pages the translation read.
    PageTouch {
        at: u32,
        page: u64,
        frame: u64,
        access: Access,
        user: bool,
        size: PageSize,
        walk: Walk,
    },
    Mmio {
        at: u32,
        gpa: u64,
        size: u8,
        direction: Direction,
        value: u64,
    },
    /// One execution of a REP-prefixed string instruction (MOVS, STOS, LODS, SCAS, CMPS, INS, OUTS) and the
    /// elements it processed: the work a single instruction stands for, which the processor pays per element.
    RepString {
        at: u32,
        elements: u64,
    },
}

/// The page-table pages one page walk read, top level first, as physical frame numbers (address / 4096): what a
/// shadow-paging monitor reads to fill a shadow entry or to tell a true page fault from a hidden one, and what a
/// nested walk multiplies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Walk {
    levels: u8,
    tables: [u32; Walk::MAX_LEVELS],
}

impl Walk {
    /// Five-level paging reads at most five tables.
    pub const MAX_LEVELS: usize = 5;

    /// A walk through `tables` (frame numbers, top level first); `None` for more than [`Walk::MAX_LEVELS`].
    pub fn new(tables: &[u32]) -> Option<Walk> {
        let mut walk = Walk::default();
        walk.tables.get_mut(..tables.len())?.copy_from_slice(tables);
        walk.levels = tables.len() as u8;
        Some(walk)
    }

    /// The walk through the first `levels` of `tables`, whose other entries the caller left zero (as
    /// [`Walk::new`] does, so that equal walks compare and hash equal). `levels` is at most
    /// [`Walk::MAX_LEVELS`].
    #[inline(always)]
    pub(crate) fn from_array(levels: u8, tables: [u32; Walk::MAX_LEVELS]) -> Walk {
        debug_assert!(usize::from(levels) <= Walk::MAX_LEVELS && tables[usize::from(levels)..].iter().all(|&t| t == 0));
        Walk { levels, tables }
    }

    /// The tables read, top level first.
    pub fn tables(&self) -> &[u32] {
        &self.tables[..usize::from(self.levels)]
    }

    pub fn levels(&self) -> u8 {
        self.levels
    }
}

/// The kinds of event, in their fixed order (the footer counts them in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Block,
    PartialBlock,
    Context,
    Exception,
    Interrupt,
    SoftwareInterrupt,
    Syscall,
    Sysret,
    Iret,
    CrWrite,
    MsrRead,
    MsrWrite,
    Io,
    Cpuid,
    Invlpg,
    DescriptorLoad,
    Hlt,
    PageTableWrite,
    PageTouch,
    Mmio,
    RepString,
}

impl EventKind {
    pub const COUNT: usize = 21;
    pub const ALL: [EventKind; EventKind::COUNT] = [
        EventKind::Block,
        EventKind::PartialBlock,
        EventKind::Context,
        EventKind::Exception,
        EventKind::Interrupt,
        EventKind::SoftwareInterrupt,
        EventKind::Syscall,
        EventKind::Sysret,
        EventKind::Iret,
        EventKind::CrWrite,
        EventKind::MsrRead,
        EventKind::MsrWrite,
        EventKind::Io,
        EventKind::Cpuid,
        EventKind::Invlpg,
        EventKind::DescriptorLoad,
        EventKind::Hlt,
        EventKind::PageTableWrite,
        EventKind::PageTouch,
        EventKind::Mmio,
        EventKind::RepString,
    ];

    /// Stable snake_case name, used in JSON output and dumps.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Block => "block",
            EventKind::PartialBlock => "partial_block",
            EventKind::Context => "context",
            EventKind::Exception => "exception",
            EventKind::Interrupt => "interrupt",
            EventKind::SoftwareInterrupt => "software_interrupt",
            EventKind::Syscall => "syscall",
            EventKind::Sysret => "sysret",
            EventKind::Iret => "iret",
            EventKind::CrWrite => "cr_write",
            EventKind::MsrRead => "msr_read",
            EventKind::MsrWrite => "msr_write",
            EventKind::Io => "io",
            EventKind::Cpuid => "cpuid",
            EventKind::Invlpg => "invlpg",
            EventKind::DescriptorLoad => "descriptor_load",
            EventKind::Hlt => "hlt",
            EventKind::PageTableWrite => "page_table_write",
            EventKind::PageTouch => "page_touch",
            EventKind::Mmio => "mmio",
            EventKind::RepString => "rep_string",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Block(_) => EventKind::Block,
            Event::PartialBlock { .. } => EventKind::PartialBlock,
            Event::Context { .. } => EventKind::Context,
            Event::Exception { .. } => EventKind::Exception,
            Event::Interrupt { .. } => EventKind::Interrupt,
            Event::SoftwareInterrupt { .. } => EventKind::SoftwareInterrupt,
            Event::Syscall { .. } => EventKind::Syscall,
            Event::Sysret { .. } => EventKind::Sysret,
            Event::Iret { .. } => EventKind::Iret,
            Event::CrWrite { .. } => EventKind::CrWrite,
            Event::MsrRead { .. } => EventKind::MsrRead,
            Event::MsrWrite { .. } => EventKind::MsrWrite,
            Event::Io { .. } => EventKind::Io,
            Event::Cpuid { .. } => EventKind::Cpuid,
            Event::Invlpg { .. } => EventKind::Invlpg,
            Event::DescriptorLoad { .. } => EventKind::DescriptorLoad,
            Event::Hlt { .. } => EventKind::Hlt,
            Event::PageTableWrite { .. } => EventKind::PageTableWrite,
            Event::PageTouch { .. } => EventKind::PageTouch,
            Event::Mmio { .. } => EventKind::Mmio,
            Event::RepString { .. } => EventKind::RepString,
        }
    }

    /// Where in the current block this event happened; `None` for block executions.
    #[inline]
    pub fn at(&self) -> Option<u32> {
        match *self {
            Event::Block(_) | Event::PartialBlock { .. } => None,
            Event::Context { at, .. }
            | Event::Exception { at, .. }
            | Event::Interrupt { at, .. }
            | Event::SoftwareInterrupt { at, .. }
            | Event::Syscall { at }
            | Event::Sysret { at }
            | Event::Iret { at }
            | Event::CrWrite { at, .. }
            | Event::MsrRead { at, .. }
            | Event::MsrWrite { at, .. }
            | Event::Io { at, .. }
            | Event::Cpuid { at, .. }
            | Event::Invlpg { at, .. }
            | Event::DescriptorLoad { at, .. }
            | Event::Hlt { at, .. }
            | Event::PageTableWrite { at, .. }
            | Event::PageTouch { at, .. }
            | Event::Mmio { at, .. }
            | Event::RepString { at, .. } => Some(at),
        }
    }
}

/// One unique basic block: what was fetched, where, in which mode and address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Linear address of the first instruction.
    pub address: u64,
    pub mode: CodeMode,
    /// Address-space tag: 0 for code in global (kernel) mappings, otherwise the CR3 the bytes were fetched under.
    pub tag: u64,
    /// Number of instructions; the bytes decode to exactly this many.
    pub instructions: u32,
    pub bytes: Vec<u8>,
}

/// A piece of guest-physical memory as it was when the guest started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub bytes: Vec<u8>,
}

/// The processor state at the first instruction (for a Multiboot image: 32-bit protected mode, flat segments,
/// paging off, EAX = 0x2BADB002, EBX = the info structure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    pub rip: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub mode: CodeMode,
    /// Bytes of RAM the machine had, from guest-physical 0.
    pub ram_bytes: u64,
}

/// Who made the trace, from what.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    pub workload: String,
    /// Workload parameters as given to the recorder, in the order given.
    pub params: Vec<(String, String)>,
    pub recorder: String,
    pub recorder_version: String,
    /// The guest's functions, from the image's assembler labels or symbol table (format 2.1; empty in 2.0 traces).
    pub symbols: SymbolMap,
}

/// A named range of guest code by linear address: a function of the guest's kernel or of a user program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The functions of a trace's guest, sorted by address and disjoint, so that tools can name the instruction at
/// an address (`dump`, the sweep's sites, the gate's blame) rather than show a bare number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SymbolMap {
    symbols: Vec<Symbol>,
}

/// Why a list of symbols is not a [`SymbolMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SymbolError(pub String);

impl SymbolMap {
    /// At most this many symbols; with names of at most [`SymbolMap::MAX_NAME_BYTES`], a map fits the header chunk.
    pub const MAX_SYMBOLS: usize = 16_384;
    pub const MAX_NAME_BYTES: usize = 200;

    /// Sorts `symbols` by address and checks that each has a name and some bytes and that none overlap.
    pub fn new(mut symbols: Vec<Symbol>) -> Result<Self, SymbolError> {
        if symbols.len() > Self::MAX_SYMBOLS {
            return Err(SymbolError(format!("{} symbols, at most {} fit a trace", symbols.len(), Self::MAX_SYMBOLS)));
        }
        symbols.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
        for (i, symbol) in symbols.iter().enumerate() {
            if symbol.name.is_empty() || symbol.name.len() > Self::MAX_NAME_BYTES {
                return Err(SymbolError(format!(
                    "the symbol at {:#x} has a name of {} bytes, expected 1 to {}",
                    symbol.start,
                    symbol.name.len(),
                    Self::MAX_NAME_BYTES
                )));
            }
            if symbol.end <= symbol.start {
                return Err(SymbolError(format!(
                    "symbol `{}` covers {:#x}..{:#x}, which holds no byte",
                    symbol.name, symbol.start, symbol.end
                )));
            }
            if let Some(previous) = i.checked_sub(1).map(|p| &symbols[p]) {
                if previous.end > symbol.start {
                    return Err(SymbolError(format!(
                        "symbol `{}` ({:#x}..{:#x}) overlaps `{}` ({:#x}..{:#x})",
                        symbol.name, symbol.start, symbol.end, previous.name, previous.start, previous.end
                    )));
                }
            }
        }
        Ok(SymbolMap { symbols })
    }

    /// Every symbol, by address.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The symbol whose range holds `address`.
    pub fn lookup(&self, address: u64) -> Option<&Symbol> {
        let after = self.symbols.partition_point(|s| s.start <= address);
        self.symbols[..after].last().filter(|s| address < s.end)
    }

    /// `name+0x1c` (or `name` at its first byte) for the function holding `address`.
    pub fn describe(&self, address: u64) -> Option<String> {
        self.lookup(address).map(|s| match address - s.start {
            0 => s.name.clone(),
            offset => format!("{}+{offset:#x}", s.name),
        })
    }
}

/// The code and paging modes a trace's guest ran in (bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestModes(pub u8);

impl GuestModes {
    fn code_bit(mode: CodeMode) -> u8 {
        match mode {
            CodeMode::Bits16 => 1,
            CodeMode::Bits32 => 1 << 1,
            CodeMode::Bits64 => 1 << 2,
        }
    }

    fn paging_bit(mode: PagingMode) -> u8 {
        1 << (3 + mode.code())
    }

    pub fn add_code(&mut self, mode: CodeMode) {
        self.0 |= Self::code_bit(mode);
    }

    pub fn add_paging(&mut self, mode: PagingMode) {
        self.0 |= Self::paging_bit(mode);
    }

    pub fn has_code(self, mode: CodeMode) -> bool {
        self.0 & Self::code_bit(mode) != 0
    }

    pub fn has_paging(self, mode: PagingMode) -> bool {
        self.0 & Self::paging_bit(mode) != 0
    }

    /// Names such as `["32-bit", "64-bit", "paging:none", "paging:4-level"]`.
    pub fn names(self) -> Vec<String> {
        let code = CodeMode::ALL.into_iter().filter(|m| self.has_code(*m)).map(|m| format!("{}-bit", m.bitness()));
        let paging =
            PagingMode::ALL.into_iter().filter(|m| self.has_paging(*m)).map(|m| format!("paging:{}", m.name()));
        code.chain(paging).collect()
    }
}

/// Why the recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The guest wrote its exit status to the exit device: the run is complete.
    GuestExit,
    /// The recorder's instruction budget ran out.
    InstructionLimit,
    /// The recorder's wall-clock budget ran out.
    Timeout,
    /// The guest triple-faulted (the machine would reset).
    TripleFault,
    /// The machine could not go on (for example an instruction it does not implement).
    MachineError,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::GuestExit,
        EndReason::InstructionLimit,
        EndReason::Timeout,
        EndReason::TripleFault,
        EndReason::MachineError,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<EndReason> {
        EndReason::ALL.get(code as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            EndReason::GuestExit => "guest_exit",
            EndReason::InstructionLimit => "instruction_limit",
            EndReason::Timeout => "timeout",
            EndReason::TripleFault => "triple_fault",
            EndReason::MachineError => "machine_error",
        }
    }
}

/// How the run ended, as the recorder tells the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub reason: EndReason,
    /// The value the guest wrote to the exit device; meaningful for `GuestExit` only.
    pub exit_status: u32,
    /// A human-readable explanation for endings other than `GuestExit` (last RIP, exception chain…).
    pub detail: String,
    /// Everything the guest wrote to its serial port.
    pub serial: Vec<u8>,
    /// Digest of the final machine state, as defined by the recorder.
    pub state_digest: [u8; 32],
}

/// Counts the writer derives from the events it was given; the footer stores them and the checker recounts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub instructions: u64,
    pub instructions_user: u64,
    pub instructions_kernel: u64,
    pub blocks: u64,
    pub events: [u64; EventKind::COUNT],
}

impl Totals {
    pub fn events_total(&self) -> u64 {
        self.events.iter().sum()
    }

    pub fn count(&self, kind: EventKind) -> u64 {
        self.events[kind.index()]
    }
}

/// The footer: how the run ended and what it added up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub totals: Totals,
    pub ending: Ending,
}

impl Footer {
    /// True when the guest ran to its own end rather than being stopped by the recorder.
    pub fn is_complete(&self) -> bool {
        self.ending.reason == EndReason::GuestExit
    }
}
