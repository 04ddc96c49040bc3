//! Architectural register state of the one modelled CPU.

/// Bits of RFLAGS the interpreter gives meaning to.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const RESERVED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const ID: u64 = 1 << 21;
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change at all; everything else reads as zero (bit 1 reads as one).
    pub const WRITABLE: u64 = STATUS | TF | IF | DF | IOPL | NT | RF | AC | ID;
}

pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
    pub const SUPPORTED: u64 = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG;
}

pub mod cr4 {
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const PGE: u64 = 1 << 7;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// Bits whose change flushes translations: they alter how a walk reads the tables.
    pub const PAGING_BITS: u64 = PSE | PAE | PGE;
    /// Everything else is #GP: the model CPU advertises no VME, PVI, TSD, DE, MCE, SMEP, ... .
    pub const SUPPORTED: u64 = PSE | PAE | PGE | OSFXSR | OSXMMEXCPT;
}

pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
    pub const WRITABLE: u64 = SCE | LME | NXE;
}

/// Index of a segment register in [`Cpu::segments`]; the order is the x86 encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentRegister {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

/// A segment register's visible selector and its hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Limit in bytes (granularity already applied).
    pub limit: u32,
    /// Descriptor bits 40..=55 (type, S, DPL, P, AVL, L, D/B, G) shifted down by 40.
    pub attributes: u16,
}

pub mod seg_attr {
    pub const ACCESSED: u16 = 1 << 0;
    pub const WRITABLE_OR_READABLE: u16 = 1 << 1;
    pub const EXPAND_DOWN_OR_CONFORMING: u16 = 1 << 2;
    pub const CODE: u16 = 1 << 3;
    pub const NOT_SYSTEM: u16 = 1 << 4;
    pub const DPL_SHIFT: u16 = 5;
    pub const PRESENT: u16 = 1 << 7;
    pub const LONG: u16 = 1 << 13;
    pub const DEFAULT_BIG: u16 = 1 << 14;
    pub const GRANULARITY: u16 = 1 << 15;
}

impl Segment {
    /// A flat 4 GiB segment as a loader hands it over: `code` selects an execute/read segment.
    pub fn flat(selector: u16, code: bool) -> Segment {
        use seg_attr::*;
        let kind = if code { CODE | WRITABLE_OR_READABLE | ACCESSED } else { WRITABLE_OR_READABLE | ACCESSED };
        Segment {
            selector,
            base: 0,
            limit: 0xFFFF_FFFF,
            attributes: kind | NOT_SYSTEM | PRESENT | DEFAULT_BIG | GRANULARITY,
        }
    }

    pub fn dpl(&self) -> u8 {
        ((self.attributes >> seg_attr::DPL_SHIFT) & 3) as u8
    }

    pub fn is_long_code(&self) -> bool {
        self.attributes & seg_attr::LONG != 0
    }

    pub fn is_default_big(&self) -> bool {
        self.attributes & seg_attr::DEFAULT_BIG != 0
    }

    pub fn is_usable(&self) -> bool {
        self.attributes & seg_attr::PRESENT != 0
    }
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTableRegister {
    pub base: u64,
    pub limit: u16,
}

/// Code size the decoder must use, from CS.L / CS.D and EFER.LMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodeMode {
    Bits16,
    Bits32,
    Bits64,
}

impl CodeMode {
    pub fn bitness(self) -> u32 {
        match self {
            CodeMode::Bits16 => 16,
            CodeMode::Bits32 => 32,
            CodeMode::Bits64 => 64,
        }
    }
}

impl std::fmt::Display for CodeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-bit", self.bitness())
    }
}

/// How linear addresses are translated, derived from CR0.PG, CR4.PAE and EFER.LMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    None,
    TwoLevel,
    Pae,
    FourLevel,
}

/// Model-specific registers the machine keeps (EFER lives in [`Cpu::efer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelSpecificRegisters {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub apic_base: u64,
    /// Added to the instruction-derived time stamp; written through IA32_TSC.
    pub tsc_offset: u64,
    pub pat: u64,
}

/// The register file.
#[derive(Clone, Debug)]
pub struct Cpu {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 in encoding order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub segments: [Segment; 6],
    pub gdtr: DescriptorTableRegister,
    pub idtr: DescriptorTableRegister,
    pub ldtr: Segment,
    pub tr: Segment,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub msr: ModelSpecificRegisters,
    /// Current privilege level; kept apart from CS.RPL because SYSRET and IRET set both together.
    pub cpl: u8,
    /// Set by STI (when IF was clear) and MOV SS: the next instruction runs before any interrupt.
    pub interrupt_shadow: bool,
}

pub const RSP: usize = 4;
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;
pub const R11: usize = 11;

impl Default for Cpu {
    fn default() -> Cpu {
        Cpu {
            gpr: [0; 16],
            rip: 0,
            rflags: rflags::RESERVED1,
            segments: [Segment::default(); 6],
            gdtr: DescriptorTableRegister::default(),
            idtr: DescriptorTableRegister::default(),
            ldtr: Segment::default(),
            tr: Segment::default(),
            cr0: cr0::ET,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            msr: ModelSpecificRegisters { apic_base: 0xFEE0_0900, pat: 0x0007_0406_0007_0406, ..Default::default() },
            cpl: 0,
            interrupt_shadow: false,
        }
    }
}

impl Cpu {
    pub fn segment(&self, register: SegmentRegister) -> &Segment {
        &self.segments[register as usize]
    }

    pub fn long_mode_active(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    pub fn code_mode(&self) -> CodeMode {
        let cs = &self.segments[SegmentRegister::Cs as usize];
        if self.long_mode_active() && cs.is_long_code() {
            CodeMode::Bits64
        } else if cs.is_default_big() {
            CodeMode::Bits32
        } else {
            CodeMode::Bits16
        }
    }

    pub fn paging_mode(&self) -> PagingMode {
        if self.cr0 & cr0::PG == 0 {
            PagingMode::None
        } else if self.efer & efer::LMA != 0 {
            PagingMode::FourLevel
        } else if self.cr4 & cr4::PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::TwoLevel
        }
    }

    pub fn iopl(&self) -> u8 {
        ((self.rflags >> 12) & 3) as u8
    }

    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & rflags::IF != 0
    }
}
