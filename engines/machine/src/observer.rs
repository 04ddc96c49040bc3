//! What the machine tells a recorder, in execution order.
//!
//! The machine is generic over its observer, so [`NullObserver`] (whose `ENABLED` is false) compiles
//! every report away and the interpret-only path pays nothing for recording.

use crate::cpu::{CodeMode, PagingMode};

/// One execution of a basic block from the block cache.
#[derive(Debug)]
pub struct BlockExecution<'a> {
    /// Stable for as long as the bytes are unchanged; a block whose bytes changed gets a new id.
    pub id: u64,
    /// Linear address of the first instruction.
    pub address: u64,
    pub mode: CodeMode,
    /// The block's machine code, every instruction in full.
    pub bytes: &'a [u8],
    /// CR3 for blocks on user pages, 0 for blocks on supervisor (kernel or global) pages.
    pub address_space: u64,
    /// Instructions in the block; fewer retire when the block is cut short.
    pub instruction_count: u32,
}

/// Why a block retired fewer instructions than it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutShortReason {
    /// An instruction faulted; it did not retire and the exception is reported next.
    Exception,
    /// The machine stopped the block early: timer deadline, instruction limit, guest exit or a write
    /// to the block's own code.
    Stopped,
}

/// Privilege and address-space context; reported whenever any field changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuContext {
    pub cpl: u8,
    pub paging: PagingMode,
    pub cr3: u64,
    pub interrupts_enabled: bool,
}

/// The page-table pages a page walk read, top level first: what a shadow-paging monitor reads to fill a shadow
/// entry or to classify a page fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageWalk {
    /// Tables read (0 with paging off; fewer than the paging mode's levels for large pages or a fault).
    pub levels: u8,
    /// Guest-physical address of each table page read (page aligned), `levels` of them.
    pub tables: [u64; 5],
}

impl PageWalk {
    pub(crate) fn push(&mut self, table: u64) {
        if let Some(slot) = self.tables.get_mut(usize::from(self.levels)) {
            *slot = table & !0xfff;
            self.levels += 1;
        }
    }
}

/// Control transfers that cross privilege or event boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    Syscall {
        from: u64,
        to: u64,
    },
    Sysret {
        from: u64,
        to: u64,
    },
    /// `walk`: for a page fault, the tables the faulting walk read.
    Exception {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
        rip: u64,
        walk: Option<PageWalk>,
    },
    ExternalInterrupt {
        vector: u8,
        rip: u64,
    },
    SoftwareInterrupt {
        vector: u8,
        rip: u64,
    },
    InterruptReturn {
        from: u64,
        to: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDirection {
    In,
    Out,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Execute,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorTable {
    Gdt { base: u64, limit: u16 },
    Idt { base: u64, limit: u16 },
    Ldt { selector: u16 },
    TaskRegister { selector: u16 },
}

/// Values an instruction produced that decide what a virtualization strategy does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideEvent {
    ControlRegisterWrite {
        cr: u8,
        old: u64,
        new: u64,
    },
    MsrRead {
        index: u32,
        value: u64,
    },
    MsrWrite {
        index: u32,
        value: u64,
    },
    /// One per element for string I/O.
    Io {
        port: u16,
        size: u8,
        direction: IoDirection,
        value: u32,
    },
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    Invlpg {
        address: u64,
    },
    DescriptorTableLoad(DescriptorTable),
    /// `idle` is in instruction-time units: how far time jumped while the CPU waited.
    Hlt {
        idle: u64,
    },
    /// A guest instruction wrote into a page-table page reachable from a loaded CR3.
    /// `level` 1 is the table holding 4 KiB leaves, 4 the PML4.
    PageTableWrite {
        gpa: u64,
        level: u8,
        old: u64,
        new: u64,
    },
    /// First access of one kind to a virtual page in this TLB epoch (an epoch ends on a CR3 load,
    /// a CR4 paging-bit change, or INVLPG of that page).
    PageTouch {
        virtual_page: u64,
        frame: u64,
        kind: AccessKind,
        user: bool,
        page_size: u64,
        walk: PageWalk,
    },
    Mmio {
        gpa: u64,
        size: u8,
        direction: IoDirection,
        value: u64,
    },
    /// A REP-prefixed string instruction ran (completely, or until a fault stopped it) over `elements` elements.
    RepString {
        elements: u64,
    },
}

/// Receives everything a trace recorder needs. Every method defaults to doing nothing.
///
/// `index` arguments are the position of the responsible instruction within the block most
/// recently reported through [`ExecutionObserver::block`] (0 = its first instruction). The
/// execute-access page touch made by fetching a block is reported right after that block, at 0.
/// Reports made after a block's instructions (context changes, external interrupts, an exception
/// raised by fetching the next block, in which case no block is reported) carry the number of
/// instructions the block retired.
pub trait ExecutionObserver {
    /// When false the machine skips building reports (and the bookkeeping behind page touches).
    const ENABLED: bool = true;

    fn block(&mut self, _block: &BlockExecution<'_>) {}
    fn block_cut_short(&mut self, _retired: u32, _reason: CutShortReason) {}
    fn context(&mut self, _index: u32, _context: &CpuContext) {}
    fn transfer(&mut self, _index: u32, _transfer: &Transfer) {}
    fn side_event(&mut self, _index: u32, _event: &SideEvent) {}
}

/// Observes nothing; the interpret-only path.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullObserver;

impl ExecutionObserver for NullObserver {
    const ENABLED: bool = false;
}
