//! Binary translation of guest kernel blocks into compiled code fragments.
//!
//! Adams & Agesen (ASPLOS 2006, §3.1) describe VMware's translator: on demand, one basic block at a time, it
//! writes a *compiled code fragment* (CCF) into the *translation cache* (TC). Most instructions are IDENT and are
//! copied unchanged; the others are rewritten. This module does that translation for real: it decodes the block
//! with iced-x86, builds the CCF as a list of instructions and encodes it with [`BlockEncoder`] at the CCF's TC
//! address (re-encoding an IDENT instruction at its new address is an identical copy). The engine charges its
//! costs from the counts in [`Translation`].
//!
//! The CCFs assume that the TC runs deprivileged (CPL 1, IOPL 0: POPF cannot change the real IF or IOPL) with the
//! real IF set, and that the monitor reserves `%gs` for its per-vCPU area, laid out in [`vcpu`]. Every way out of a
//! CCF hands the monitor a guest address in [`vcpu::SCRATCH`]. Some sequences use the guest stack just below its
//! pointer as scratch space (a callout's CALL, PUSH/POP copies, PUSHF/POPF around RDTSC), which a kernel stack
//! allows: it has no red zone, since interrupts write there too. Each guest instruction is translated by the first
//! rule that applies:
//!
//! - **HelperCall** (in-TC helpers, reached by a CALL through the vCPU area and running in the TC's context):
//!   instructions in `guilty` (adaptive BT, §3.2: innocuous instructions that keep taking tracing faults call
//!   [`vcpu::WRITE_HELPER`], which performs the store and propagates it into the shadows), and IN/OUT with an
//!   immediate port listed in `in_tc_ports` (emulated by [`vcpu::IO_HELPER`] against the device model). The CCF
//!   stores the instruction's guest address in SCRATCH first.
//! - **Callout**: uses of `%gs` itself (MOV/PUSH/POP GS, LGS, SWAPGS, RD/WRGSBASE), and the sensitive
//!   instructions no rule below handles: privileged ones, far transfers, LAR/LSL/VERR/VERW, CPUID, RDTSCP,
//!   SYSCALL/SYSRET, IRET, INT n, HLT, other port I/O. The CCF stores the instruction's guest address in SCRATCH
//!   and calls through [`vcpu::CALLOUT`] (the monitor emulates it and returns), or jumps through
//!   [`vcpu::CALLOUT_LEAVE`] when control does not come back to the next instruction (SYSCALL, SYSRET, IRET, INT n,
//!   HLT, far transfers, UD2). A rewrite that cannot be expressed (see below) falls back to a callout.
//! - **InTc** (§3.1: simple privileged operations run in the TC against the virtual CPU state): CLI/STI,
//!   PUSHF/POPF, MOV to/from CR8, MOV from CR0/CR2/CR3/CR4, SGDT/SIDT/SLDT/STR/SMSW, MOV from and PUSH of CS/SS
//!   and RDTSC are emulated by a few instructions against the vCPU area; [`vcpu`] gives each field's use. STI,
//!   POPF and a CR8 write can unmask a pending virtual interrupt: their sequence ends with a check of
//!   [`vcpu::PENDING`] (kept inside PUSHF/POPF, since the test clobbers the flags) that calls
//!   [`vcpu::INTERRUPT_HELPER`] when one is deliverable.
//! - **DirectBranch** (JMP, Jcc, LOOP, JrCXZ) and **DirectCall** (CALL rel, which pushes the *guest* return
//!   address): every exit is a continuation stub that stores the guest target in SCRATCH and jumps through
//!   [`vcpu::CONTINUATION`]. The monitor later patches a stub into a direct jump to the target's CCF (chaining), so
//!   each stub is a chain slot: two for a conditional branch (taken and fall-through), one for JMP and CALL.
//! - **IndirectBranch** (RET, JMP/CALL through a register or memory): the guest target goes to SCRATCH (RET pops
//!   it there, a memory target is copied with PUSH/POP, CALL then pushes the guest return address) and the CCF
//!   jumps through [`vcpu::IBL`], the indirect-branch lookup.
//! - **SegmentRewrite**: an access to memory through `%gs` uses a free register instead: save it in
//!   [`vcpu::REWRITE_SPILL`], load the guest gs base ([`vcpu::GS_BASE`]), fold the operand's base register in with
//!   LEA when it also has an index, run the instruction with `[scratch + …]`, restore (flags untouched). 64- and
//!   32-bit addressing only; 32-bit code is assumed to have flat DS and SS.
//! - **PcRelative** (64-bit code): a RIP-relative operand must keep addressing the guest location. BlockEncoder
//!   re-targets it when the guest address is within ±2 GiB of the TC or below 4 GiB (one instruction); an address
//!   in the top 2 GiB (a 64-bit kernel image) becomes an absolute `disp32` (one instruction); any other address is
//!   loaded into a free register saved in REWRITE_SPILL (four instructions).
//! - **IDENT**: everything else, segment-register loads included (the monitor's GDT holds copies of the guest's
//!   descriptors with their privilege raised and their limits truncated below the monitor, which the hardware
//!   loads).
//!
//! Control transfers and callouts that leave the CCF must be the block's last instruction (the recorder ends a
//! block after each). A block that ends otherwise, after a sensitive instruction or at a page boundary, gets a
//! continuation stub to the next guest address, one chain slot. 16- and 32-bit blocks are translated into code of
//! the same size: `tc_address` is then an offset in the TC's 16- or 32-bit code segment, the monitor reads the low
//! 2 or 4 bytes of the vCPU fields, and guest addresses are truncated to the code size.

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Encoder, FlowControl, IcedError, Instruction,
    InstructionBlock, InstructionInfoFactory, MemoryOperand, Mnemonic, OpKind, Register,
};
use virtlab_traces::Block;

use crate::classify::{classify, Op};
use crate::strategy::Emitted;

/// The monitor's per-vCPU area, reached through `%gs`: byte offsets of its fields. Every field is 8 bytes unless
/// noted; 16- and 32-bit code reads the low 2 or 4 bytes.
pub mod vcpu {
    /// The guest address an exit hands the monitor: the continuation target, the indirect-branch target, or the
    /// address of the instruction a callout emulates (2, 4 or 8 bytes as the code size).
    pub const SCRATCH: u32 = 0x00;
    /// Save slot for AL in the PUSHF and POPF sequences.
    pub const SPILL: u32 = 0x08;
    /// Save slot for the scratch register of a `%gs` or far RIP-relative rewrite (kept apart from [`SPILL`]
    /// because an in-TC sequence may contain a rewritten guest operand).
    pub const REWRITE_SPILL: u32 = 0x10;
    /// Virtual IF, one byte: 0x02 when set (IF's bit within the second byte of EFLAGS), 0 when clear.
    pub const IF: u32 = 0x18;
    /// Virtual TPR, read and written by MOV from/to CR8.
    pub const TPR: u32 = 0x20;
    /// Shadow CR0; SMSW reads its low word, the MSW.
    pub const CR0: u32 = 0x28;
    pub const CR2: u32 = 0x30;
    pub const CR3: u32 = 0x38;
    pub const CR4: u32 = 0x40;
    /// Virtual GDTR, 16 bytes laid out as SGDT stores it: limit (2 bytes), then base (8 bytes).
    pub const GDTR: u32 = 0x48;
    /// Virtual IDTR, laid out like [`GDTR`].
    pub const IDTR: u32 = 0x58;
    /// Virtual LDTR selector, zero-extended.
    pub const LDTR: u32 = 0x68;
    /// Virtual TR selector, zero-extended.
    pub const TR: u32 = 0x70;
    /// The CS selector as the guest expects to read it (its own RPL, not the TC's), zero-extended.
    pub const CS: u32 = 0x78;
    /// The SS selector as the guest expects to read it, zero-extended.
    pub const SS: u32 = 0x80;
    /// Guest TSC minus host TSC, added to the result of RDTSC.
    pub const TSC_OFFSET: u32 = 0x88;
    /// The guest's gs base, which the monitor's own `%gs` displaces.
    pub const GS_BASE: u32 = 0x90;
    /// The callout table, entry 0: emulate the instruction at SCRATCH and return to the CCF (reached by CALL).
    pub const CALLOUT: u32 = 0x98;
    /// The callout table, entry 1: emulate the instruction at SCRATCH and continue wherever it leads (reached by
    /// JMP; never returns).
    pub const CALLOUT_LEAVE: u32 = CALLOUT + 8;
    /// Indirect-branch lookup: find (or make) the CCF of the guest address in SCRATCH and jump to it.
    pub const IBL: u32 = 0xa8;
    /// Continuation (translator) entry: translate the guest address in SCRATCH if needed, chain the calling stub
    /// to its CCF, and jump there.
    pub const CONTINUATION: u32 = 0xb0;
    /// In-TC helper: emulate the port access at SCRATCH against the monitor's device model and return to the CCF
    /// (a call that stays in the translation cache's context, unlike a callout).
    pub const IO_HELPER: u32 = 0xb8;
    /// In-TC helper: perform the guest page-table store at SCRATCH and propagate it into the shadows (adaptive
    /// BT's retranslation of an instruction that kept taking tracing faults).
    pub const WRITE_HELPER: u32 = 0xc0;
    /// In-TC helper: deliver the virtual interrupt that unmasking made deliverable.
    pub const INTERRUPT_HELPER: u32 = 0xc8;
    /// Nonzero when a virtual interrupt is pending at a priority the virtual TPR would let through (one byte).
    pub const PENDING: u32 = 0xd0;
    /// Size of the area.
    pub const SIZE: u32 = 0xd8;
}

/// What the engine tells the translator beyond the block itself.
pub struct TranslateOptions<'a> {
    /// Ports the translator emulates through the in-TC I/O helper (the POST port 0x80). IN/OUT with an immediate
    /// port in this list call the helper; all other port I/O is a callout.
    pub in_tc_ports: &'a [u16],
    /// Indices (within the block) of instructions that adaptive BT has found guilty of repeated tracing faults
    /// (writes to write-protected guest page tables): translate each of them as a call to the page-table write
    /// helper even though they are innocuous (one that is also a control transfer becomes a callout). Indices
    /// past the block are ignored.
    pub guilty: &'a [u32],
}

/// How a non-IDENT guest instruction was translated (the module documentation gives the rules): the mechanism
/// its emitted code implements, which is what the engine charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    PcRelative,
    SegmentRewrite,
    /// Continuation stubs, chained once followed.
    DirectBranch,
    DirectCall,
    /// A jump through the indirect-branch lookup.
    IndirectBranch,
    /// A sequence against the vCPU area, in the translation cache.
    InTc,
    /// A call to a monitor helper that runs in the translation cache's context.
    HelperCall,
    /// A call or jump out of the translation cache into the monitor.
    Callout,
}

impl SiteKind {
    /// Whether code of this kind (`None`: an IDENT copy) is what a table row's [`Emitted`] says the translator
    /// emits.
    pub fn implements(kind: Option<SiteKind>, emitted: Emitted) -> bool {
        use SiteKind as K;
        match emitted {
            Emitted::Ident => matches!(
                kind,
                None | Some(K::PcRelative | K::SegmentRewrite | K::DirectBranch | K::DirectCall | K::IndirectBranch)
            ),
            Emitted::InTc => matches!(kind, Some(K::InTc | K::Callout)),
            Emitted::Callout => kind == Some(K::Callout),
            Emitted::PortIo => matches!(kind, Some(K::HelperCall | K::Callout)),
        }
    }
}

/// One non-IDENT guest instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Index of the instruction within the block.
    pub index: u32,
    pub kind: SiteKind,
    /// TC instructions emitted for this guest instruction, its exit stubs included.
    pub emitted: u16,
    /// The emitted instructions that cost the processor more than a simple one (PUSHF/POPF around a sequence,
    /// a real RDTSC), by the lab's classification.
    pub native_ops: Vec<Op>,
}

/// The CCF of one block, in the numbers the engine charges costs by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    pub guest_instructions: u32,
    /// Instructions copied unchanged (one TC instruction each).
    pub ident: u32,
    /// Equals `sites.len()`.
    pub non_ident: u32,
    /// One per non-IDENT guest instruction, in block order.
    pub sites: Vec<Site>,
    /// TC instructions in the CCF: `ident`, plus every site's `emitted`, plus the continuation stub (2 or 3
    /// instructions) of a block that does not end in a control transfer.
    pub emitted_instructions: u32,
    /// Encoded length of the CCF.
    pub tc_bytes: u32,
    /// Continuation stubs the monitor can later patch into a direct jump to another CCF (0, 1 or 2).
    pub chain_slots: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("block at {address:#x} has no instructions")]
    Empty { address: u64 },
    #[error("block at {address:#x}: instruction {index} (at {at:#x}, {bitness}-bit) is invalid or truncated")]
    Decode { address: u64, index: u32, at: u64, bitness: u32 },
    #[error("block at {address:#x}: the bytes decode to {decoded} instructions, the block says {expected}")]
    InstructionCount { address: u64, decoded: u32, expected: u32 },
    #[error("block at {address:#x}: instruction {index} (at {at:#x}) leaves the block before its last instruction")]
    ExitInsideBlock { address: u64, index: u32, at: u64 },
    #[error("block at {address:#x}: {what}: {message}")]
    Encode { address: u64, what: String, message: String },
}

/// Translate one guest kernel block into a CCF at `tc_address`.
pub fn translate(block: &Block, tc_address: u64, options: &TranslateOptions) -> Result<Translation, TranslateError> {
    translate_with_code(block, tc_address, options).map(|(translation, _)| translation)
}

/// Same as [`translate`] but also returns the encoded CCF bytes (for tests and inspection).
pub fn translate_with_code(
    block: &Block,
    tc_address: u64,
    options: &TranslateOptions,
) -> Result<(Translation, Vec<u8>), TranslateError> {
    let address = block.address;
    let instructions = decode(block)?;
    let last = instructions.len() - 1;
    let mut emitter = Emitter::new(block.mode.bitness(), tc_address);
    let mut sites = Vec::new();
    let mut ends_ccf = false;
    for (index, instruction) in instructions.iter().enumerate() {
        let index = index as u32;
        let plan = plan(instruction, options.guilty.contains(&index), options.in_tc_ports);
        ends_ccf = plan.ends_ccf();
        if ends_ccf && index as usize != last {
            return Err(TranslateError::ExitInsideBlock { address, index, at: instruction.ip() });
        }
        let start = emitter.code.len();
        emitter.spans.push((index, start));
        let kind = emitter.translate(instruction, plan).map_err(|error| TranslateError::Encode {
            address,
            what: format!("rewriting instruction {index} (at {:#x})", instruction.ip()),
            message: error.to_string(),
        })?;
        if let Some(kind) = kind {
            let emitted = &emitter.code[start..];
            let native_ops = emitted.iter().map(classify).filter(|op| *op != Op::Innocuous).collect();
            sites.push(Site { index, kind, emitted: emitted.len() as u16, native_ops });
        }
    }
    if !ends_ccf {
        let next = instructions[last].next_ip();
        emitter.continuation(next).map_err(|error| TranslateError::Encode {
            address,
            what: "writing the fall-through stub".to_string(),
            message: error.to_string(),
        })?;
    }
    let code = emitter.encode().map_err(|(index, error)| TranslateError::Encode {
        address,
        what: match index {
            Some(index) => format!("encoding instruction {index} at TC address {tc_address:#x}"),
            None => format!("encoding the CCF at TC address {tc_address:#x}"),
        },
        message: error,
    })?;
    let translation = Translation {
        guest_instructions: instructions.len() as u32,
        ident: (instructions.len() - sites.len()) as u32,
        non_ident: sites.len() as u32,
        sites,
        emitted_instructions: emitter.code.len() as u32,
        tc_bytes: code.len() as u32,
        chain_slots: emitter.chain_slots,
    };
    Ok((translation, code))
}

/// Decodes the whole block, as the trace checker's `block-decodes` rule does.
fn decode(block: &Block) -> Result<Vec<Instruction>, TranslateError> {
    let bitness = block.mode.bitness();
    let mut decoder = Decoder::with_ip(bitness, &block.bytes, block.address, DecoderOptions::NONE);
    let mut instructions = Vec::new();
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            let index = instructions.len() as u32;
            return Err(TranslateError::Decode { address: block.address, index, at: instruction.ip(), bitness });
        }
        instructions.push(instruction);
    }
    if instructions.len() != block.instructions as usize {
        let decoded = instructions.len() as u32;
        return Err(TranslateError::InstructionCount { address: block.address, decoded, expected: block.instructions });
    }
    if instructions.is_empty() {
        return Err(TranslateError::Empty { address: block.address });
    }
    Ok(instructions)
}

/// What a guest instruction needs, before any code is emitted.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Innocuous straight-line code: IDENT, or an operand rewrite.
    Copy,
    /// Emulated in the TC if a short sequence can, else a callout.
    Sensitive {
        op: Op,
        leaves: bool,
    },
    Direct,
    DirectCall,
    Indirect,
    Callout {
        leaves: bool,
    },
    /// A call to the in-TC helper at this vCPU field.
    Helper {
        entry: u32,
    },
}

impl Plan {
    fn ends_ccf(self) -> bool {
        match self {
            Plan::Copy | Plan::Helper { .. } => false,
            Plan::Direct | Plan::DirectCall | Plan::Indirect => true,
            Plan::Sensitive { leaves, .. } | Plan::Callout { leaves } => leaves,
        }
    }
}

fn plan(instruction: &Instruction, forced: bool, in_tc_ports: &[u16]) -> Plan {
    let op = classify(instruction);
    let flow = instruction.flow_control();
    let leaves = flow != FlowControl::Next || op == Op::Hlt;
    if uses_gs_register(instruction) {
        return Plan::Callout { leaves };
    }
    if forced && flow == FlowControl::Next && op == Op::Innocuous {
        return Plan::Helper { entry: vcpu::WRITE_HELPER };
    }
    if forced {
        return Plan::Callout { leaves };
    }
    match (op, flow) {
        // The monitor's GDT holds truncated copies of the guest's descriptors: the hardware does the rest.
        (Op::Innocuous | Op::SegmentLoad, FlowControl::Next) => Plan::Copy,
        (Op::Innocuous, FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch) => Plan::Direct,
        (Op::Innocuous, FlowControl::Call) => Plan::DirectCall,
        (Op::Innocuous, FlowControl::IndirectBranch | FlowControl::IndirectCall | FlowControl::Return) => {
            Plan::Indirect
        }
        // UD2, XBEGIN/XEND/XABORT: the TC cannot follow where they go.
        (Op::Innocuous, _) => Plan::Callout { leaves },
        (Op::PortIn | Op::PortOut, _) if in_tc_port(instruction, in_tc_ports) => {
            Plan::Helper { entry: vcpu::IO_HELPER }
        }
        (Op::PortIn | Op::PortOut, _) => Plan::Callout { leaves },
        (op, _) => Plan::Sensitive { op, leaves },
    }
}

/// The monitor owns `%gs`: the guest may not read or load its selector or base (such an instruction is a callout
/// whatever its class).
pub fn uses_gs_register(instruction: &Instruction) -> bool {
    matches!(instruction.mnemonic(), Mnemonic::Lgs | Mnemonic::Rdgsbase | Mnemonic::Wrgsbase | Mnemonic::Swapgs)
        || (0..instruction.op_count())
            .any(|n| instruction.op_kind(n) == OpKind::Register && instruction.op_register(n) == Register::GS)
}

fn in_tc_port(instruction: &Instruction, in_tc_ports: &[u16]) -> bool {
    matches!(
        instruction.code(),
        Code::In_AL_imm8
            | Code::In_AX_imm8
            | Code::In_EAX_imm8
            | Code::Out_imm8_AL
            | Code::Out_imm8_AX
            | Code::Out_imm8_EAX
    ) && in_tc_ports.contains(&u16::from(instruction.immediate8()))
}

/// How a guest memory operand ended up addressed in the TC.
enum Placement {
    Unchanged,
    PcRelative,
    Segment,
    /// No rewrite can express it; nothing was emitted.
    Impossible,
}

/// A RIP-relative operand is left to BlockEncoder when its guest address is this close to the CCF's start: 2 GiB
/// minus a margin (16 MiB) far larger than any CCF a block produces.
const RIP_REACH: u64 = (1 << 31) - (1 << 24);

const GPRS: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

struct Emitter {
    bitness: u32,
    tc_address: u64,
    code: Vec<Instruction>,
    /// Branches to instructions of the CCF: (position of the branch, position of its target).
    branches: Vec<(usize, usize)>,
    /// (guest instruction index, position of its first TC instruction), to name the culprit of an encoding error.
    spans: Vec<(u32, usize)>,
    chain_slots: u32,
    info: InstructionInfoFactory,
}

impl Emitter {
    fn new(bitness: u32, tc_address: u64) -> Emitter {
        Emitter {
            bitness,
            tc_address,
            code: Vec::new(),
            branches: Vec::new(),
            spans: Vec::new(),
            chain_slots: 0,
            info: InstructionInfoFactory::new(),
        }
    }

    /// Emits the translation of one guest instruction; `None` means IDENT.
    fn translate(&mut self, instruction: &Instruction, plan: Plan) -> Result<Option<SiteKind>, IcedError> {
        let mark = self.code.len();
        // Each arm either finishes or says whether its fallback callout leaves the CCF.
        let leaves = match plan {
            Plan::Copy => match self.place(*instruction)? {
                Placement::Unchanged => return Ok(None),
                Placement::PcRelative => return Ok(Some(SiteKind::PcRelative)),
                Placement::Segment => return Ok(Some(SiteKind::SegmentRewrite)),
                Placement::Impossible => false,
            },
            Plan::Sensitive { op, leaves } => {
                if self.in_tc(instruction, op)? {
                    return Ok(Some(SiteKind::InTc));
                }
                leaves
            }
            Plan::Direct => {
                self.direct(instruction)?;
                return Ok(Some(SiteKind::DirectBranch));
            }
            Plan::DirectCall => {
                self.push_guest_value(instruction.next_ip(), self.stack_size(instruction))?;
                self.continuation(instruction.near_branch_target())?;
                return Ok(Some(SiteKind::DirectCall));
            }
            Plan::Indirect => {
                if self.indirect(instruction)? {
                    return Ok(Some(SiteKind::IndirectBranch));
                }
                true
            }
            Plan::Callout { leaves } => leaves,
            Plan::Helper { entry } => {
                self.store_guest_address(vcpu::SCRATCH, instruction.ip())?;
                self.call_through(entry)?;
                return Ok(Some(SiteKind::HelperCall));
            }
        };
        self.code.truncate(mark);
        self.store_guest_address(vcpu::SCRATCH, instruction.ip())?;
        if leaves {
            self.jump_through(vcpu::CALLOUT_LEAVE)?;
        } else {
            self.call_through(vcpu::CALLOUT)?;
        }
        Ok(Some(SiteKind::Callout))
    }

    fn call_through(&mut self, field: u32) -> Result<(), IcedError> {
        let call = self.by_bitness([Code::Call_rm16, Code::Call_rm32, Code::Call_rm64]);
        self.emit(Instruction::with1(call, self.vcpu(field))?);
        Ok(())
    }

    /// After an instruction that can unmask a virtual interrupt (STI, POPF, a CR8 write): if one is now
    /// deliverable, call the helper that delivers it. The test clobbers the flags, so PUSHF/POPF keep the guest's.
    fn pending_interrupt_check(&mut self) -> Result<(), IcedError> {
        self.emit(Instruction::with(self.by_bitness([Code::Pushfw, Code::Pushfd, Code::Pushfq])));
        self.emit(Instruction::with2(Code::Test_rm8_imm8, self.vcpu(vcpu::PENDING), 0xffu32)?);
        let branch = self.code.len();
        let jz = match self.bitness {
            16 => Code::Je_rel16,
            32 => Code::Je_rel32_32,
            _ => Code::Je_rel32_64,
        };
        self.emit(Instruction::with_branch(jz, 0)?);
        self.call_through(vcpu::INTERRUPT_HELPER)?;
        self.branches.push((branch, self.code.len()));
        self.emit(Instruction::with(self.by_bitness([Code::Popfw, Code::Popfd, Code::Popfq])));
        Ok(())
    }

    fn jump_through(&mut self, field: u32) -> Result<(), IcedError> {
        let jmp = self.by_bitness([Code::Jmp_rm16, Code::Jmp_rm32, Code::Jmp_rm64]);
        self.emit(Instruction::with1(jmp, self.vcpu(field))?);
        Ok(())
    }

    fn emit(&mut self, instruction: Instruction) {
        self.code.push(instruction);
    }

    /// `%gs:[offset]`, a field of the vCPU area, with the code size's absolute addressing.
    fn vcpu(&self, offset: u32) -> MemoryOperand {
        MemoryOperand::new(Register::None, Register::None, 1, i64::from(offset), self.bitness / 8, false, Register::GS)
    }

    /// `[rsp + offset]`, or `[esp + offset]` in 16- and 32-bit code (16-bit addressing has no SP base).
    fn stack(&self, offset: i64) -> MemoryOperand {
        let sp = if self.bitness == 64 { Register::RSP } else { Register::ESP };
        MemoryOperand::with_base_displ(sp, offset)
    }

    fn by_bitness(&self, codes: [Code; 3]) -> Code {
        by_size(self.bitness as usize / 8, codes)
    }

    /// Bytes a push or call of this instruction moves the stack by.
    fn stack_size(&self, instruction: &Instruction) -> usize {
        instruction.stack_pointer_increment().unsigned_abs() as usize
    }

    /// Stores a guest address in a vCPU field, truncated to the code size.
    fn store_guest_address(&mut self, offset: u32, address: u64) -> Result<(), IcedError> {
        if self.bitness == 16 {
            self.emit(Instruction::with2(Code::Mov_rm16_imm16, self.vcpu(offset), u32::from(address as u16))?);
        } else if self.bitness == 32 {
            self.emit(Instruction::with2(Code::Mov_rm32_imm32, self.vcpu(offset), address as u32)?);
        } else if fits_i32(address) {
            self.emit(Instruction::with2(Code::Mov_rm64_imm32, self.vcpu(offset), address as i32)?);
        } else {
            self.emit(Instruction::with2(Code::Mov_rm32_imm32, self.vcpu(offset), address as u32)?);
            self.emit(Instruction::with2(Code::Mov_rm32_imm32, self.vcpu(offset + 4), (address >> 32) as u32)?);
        }
        Ok(())
    }

    /// Pushes a guest value (a return address) of `size` bytes without touching registers or flags.
    fn push_guest_value(&mut self, value: u64, size: usize) -> Result<(), IcedError> {
        match size {
            8 => {
                self.emit(Instruction::with1(Code::Pushq_imm32, value as u32 as i32)?);
                if !fits_i32(value) {
                    self.emit(Instruction::with2(Code::Mov_rm32_imm32, self.stack(4), (value >> 32) as u32)?);
                }
            }
            4 => self.emit(Instruction::with1(Code::Pushd_imm32, value as u32)?),
            _ => self.emit(Instruction::with1(Code::Push_imm16, u32::from(value as u16))?),
        }
        Ok(())
    }

    /// A continuation stub to a guest address: a chain slot.
    fn continuation(&mut self, target: u64) -> Result<(), IcedError> {
        self.store_guest_address(vcpu::SCRATCH, target)?;
        self.jump_through(vcpu::CONTINUATION)?;
        self.chain_slots += 1;
        Ok(())
    }

    fn direct(&mut self, instruction: &Instruction) -> Result<(), IcedError> {
        if instruction.flow_control() == FlowControl::UnconditionalBranch {
            return self.continuation(instruction.near_branch_target());
        }
        // The guest's own conditional branch, now to the taken stub placed after the fall-through stub.
        let branch = self.code.len();
        self.emit(*instruction);
        self.continuation(instruction.next_ip())?;
        self.branches.push((branch, self.code.len()));
        self.continuation(instruction.near_branch_target())
    }

    /// Returns false when a memory target cannot be addressed from the TC.
    fn indirect(&mut self, instruction: &Instruction) -> Result<bool, IcedError> {
        let pushes = [Code::Push_rm16, Code::Push_rm32, Code::Push_rm64];
        let pops = [Code::Pop_rm16, Code::Pop_rm32, Code::Pop_rm64];
        if instruction.flow_control() == FlowControl::Return {
            let release = if instruction.op_count() == 1 { instruction.immediate16() } else { 0 };
            let size = self.stack_size(instruction).saturating_sub(usize::from(release));
            self.emit(Instruction::with1(by_size(size, pops), self.vcpu(vcpu::SCRATCH))?);
            if release != 0 {
                let (sp, lea) = match self.bitness {
                    64 => (Register::RSP, Code::Lea_r64_m),
                    32 => (Register::ESP, Code::Lea_r32_m),
                    _ => (Register::SP, Code::Lea_r16_m),
                };
                self.emit(Instruction::with2(lea, sp, self.stack(i64::from(release)))?);
            }
        } else {
            let size = if instruction.op0_kind() == OpKind::Register {
                let target = instruction.op0_register();
                let mov = by_size(target.size(), [Code::Mov_rm16_r16, Code::Mov_rm32_r32, Code::Mov_rm64_r64]);
                self.emit(Instruction::with2(mov, self.vcpu(vcpu::SCRATCH), target)?);
                target.size()
            } else {
                // PUSH/POP copies memory to memory; PUSH computes an RSP-based address before it moves RSP.
                let size = instruction.memory_size().size();
                let copy = Instruction::with1(by_size(size, pushes), guest_memory(instruction, 0))?;
                if let Placement::Impossible = self.place(copy)? {
                    return Ok(false);
                }
                self.emit(Instruction::with1(by_size(size, pops), self.vcpu(vcpu::SCRATCH))?);
                size
            };
            if instruction.flow_control() == FlowControl::IndirectCall {
                self.push_guest_value(instruction.next_ip(), size)?;
            }
        }
        self.jump_through(vcpu::IBL)?;
        Ok(true)
    }

    /// Emits the in-TC emulation of a sensitive instruction; false when there is none (a callout instead).
    fn in_tc(&mut self, instruction: &Instruction, op: Op) -> Result<bool, IcedError> {
        match op {
            Op::Cli | Op::Sti => {
                let value = if op == Op::Sti { 0x02u32 } else { 0 };
                self.emit(Instruction::with2(Code::Mov_rm8_imm8, self.vcpu(vcpu::IF), value)?);
                if op == Op::Sti {
                    self.pending_interrupt_check()?;
                }
            }
            Op::Pushf => {
                // Replace the real IF in the pushed image by the virtual one. AND and OR clobber the live flags,
                // which the image still holds: reload them from a copy (POPF in the deprivileged TC cannot change
                // the real IF or IOPL).
                let size = self.stack_size(instruction);
                self.emit(*instruction);
                self.emit(Instruction::with2(Code::Mov_rm8_r8, self.vcpu(vcpu::SPILL), Register::AL)?);
                self.emit(Instruction::with2(Code::Mov_r8_rm8, Register::AL, self.vcpu(vcpu::IF))?);
                self.emit(Instruction::with2(Code::And_rm8_imm8, self.stack(1), 0xfdu32)?);
                self.emit(Instruction::with2(Code::Or_rm8_r8, self.stack(1), Register::AL)?);
                self.emit(Instruction::with2(Code::Mov_r8_rm8, Register::AL, self.vcpu(vcpu::SPILL))?);
                self.emit(Instruction::with1(
                    by_size(size, [Code::Push_rm16, Code::Push_rm32, Code::Push_rm64]),
                    self.stack(0),
                )?);
                self.emit(Instruction::with(by_size(size, [Code::Popfw, Code::Popfd, Code::Popfq])));
            }
            Op::Popf => {
                // The image's IF becomes the virtual IF; the real POPF then loads the other flags.
                self.emit(Instruction::with2(Code::Mov_rm8_r8, self.vcpu(vcpu::SPILL), Register::AL)?);
                self.emit(Instruction::with2(Code::Mov_r8_rm8, Register::AL, self.stack(1))?);
                self.emit(Instruction::with2(Code::And_AL_imm8, Register::AL, 0x02u32)?);
                self.emit(Instruction::with2(Code::Mov_rm8_r8, self.vcpu(vcpu::IF), Register::AL)?);
                self.emit(Instruction::with2(Code::Mov_r8_rm8, Register::AL, self.vcpu(vcpu::SPILL))?);
                self.emit(*instruction);
                self.pending_interrupt_check()?;
            }
            Op::MovToCr(8) => {
                let source = instruction.op1_register();
                let mov = by_size(source.size(), [Code::Mov_rm16_r16, Code::Mov_rm32_r32, Code::Mov_rm64_r64]);
                self.emit(Instruction::with2(mov, self.vcpu(vcpu::TPR), source)?);
                self.pending_interrupt_check()?;
            }
            Op::MovFromCr(n @ (0 | 2 | 3 | 4 | 8)) => {
                let field = match n {
                    0 => vcpu::CR0,
                    2 => vcpu::CR2,
                    3 => vcpu::CR3,
                    4 => vcpu::CR4,
                    _ => vcpu::TPR,
                };
                let target = instruction.op0_register();
                let mov = by_size(target.size(), [Code::Mov_r16_rm16, Code::Mov_r32_rm32, Code::Mov_r64_rm64]);
                self.emit(Instruction::with2(mov, target, self.vcpu(field))?);
            }
            Op::Sgdt | Op::Sidt => {
                let field = if op == Op::Sgdt { vcpu::GDTR } else { vcpu::IDTR };
                let base_size = if self.bitness == 64 { 8 } else { 4 };
                for (offset, size) in [(0, 2), (2, base_size)] {
                    let pushes = [Code::Push_rm16, Code::Push_rm32, Code::Push_rm64];
                    self.emit(Instruction::with1(by_size(size, pushes), self.vcpu(field + offset))?);
                    let pops = [Code::Pop_rm16, Code::Pop_rm32, Code::Pop_rm64];
                    let store = Instruction::with1(by_size(size, pops), guest_memory(instruction, u64::from(offset)))?;
                    if let Placement::Impossible = self.place(store)? {
                        return Ok(false);
                    }
                }
            }
            Op::Sldt => return self.store_selector(instruction, vcpu::LDTR),
            Op::Str => return self.store_selector(instruction, vcpu::TR),
            Op::Smsw => return self.store_selector(instruction, vcpu::CR0),
            Op::ReadCodeOrStackSelector => {
                let source = if instruction.mnemonic() == Mnemonic::Push {
                    instruction.op0_register()
                } else {
                    instruction.op1_register()
                };
                let field = if source == Register::CS { vcpu::CS } else { vcpu::SS };
                if instruction.mnemonic() != Mnemonic::Push {
                    return self.store_selector(instruction, field);
                }
                let push = by_size(self.stack_size(instruction), [Code::Push_rm16, Code::Push_rm32, Code::Push_rm64]);
                self.emit(Instruction::with1(push, self.vcpu(field))?);
            }
            // RDTSCP also loads TSC_AUX, which the monitor knows: a callout.
            Op::Rdtsc if instruction.mnemonic() == Mnemonic::Rdtsc => {
                // The 64-bit addition is ADD/ADC on EDX:EAX; PUSHF/POPF keep the guest's flags.
                self.emit(Instruction::with(self.by_bitness([Code::Pushfw, Code::Pushfd, Code::Pushfq])));
                self.emit(*instruction);
                self.emit(Instruction::with2(Code::Add_r32_rm32, Register::EAX, self.vcpu(vcpu::TSC_OFFSET))?);
                self.emit(Instruction::with2(Code::Adc_r32_rm32, Register::EDX, self.vcpu(vcpu::TSC_OFFSET + 4))?);
                self.emit(Instruction::with(self.by_bitness([Code::Popfw, Code::Popfd, Code::Popfq])));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// SLDT, STR, SMSW and MOV from CS/SS: a 16-bit field to a register (zero-extended) or to memory.
    fn store_selector(&mut self, instruction: &Instruction, field: u32) -> Result<bool, IcedError> {
        if instruction.op0_kind() == OpKind::Register {
            let target = instruction.op0_register();
            let mov = by_size(target.size(), [Code::Mov_r16_rm16, Code::Movzx_r32_rm16, Code::Movzx_r64_rm16]);
            self.emit(Instruction::with2(mov, target, self.vcpu(field))?);
            return Ok(true);
        }
        self.emit(Instruction::with1(Code::Push_rm16, self.vcpu(field))?);
        let store = Instruction::with1(Code::Pop_rm16, guest_memory(instruction, 0))?;
        Ok(!matches!(self.place(store)?, Placement::Impossible))
    }

    /// Emits an instruction that may carry a guest memory operand, so that the operand still addresses the guest
    /// location from the TC.
    fn place(&mut self, mut instruction: Instruction) -> Result<Placement, IcedError> {
        // LEA and NOP name memory without accessing it: iced lists no used memory for them.
        if self.info.info(&instruction).used_memory().iter().any(|memory| memory.segment() == Register::GS) {
            return self.place_segment(instruction);
        }
        if !instruction.is_ip_rel_memory_operand() {
            self.emit(instruction);
            return Ok(Placement::Unchanged);
        }
        let target = instruction.ip_rel_memory_address();
        if (target.wrapping_sub(self.tc_address) as i64).unsigned_abs() < RIP_REACH || target <= u64::from(u32::MAX) {
            self.emit(instruction);
        } else if fits_i32(target) {
            instruction.set_memory_base(Register::None);
            instruction.set_memory_displ_size(8);
            self.emit(instruction);
        } else {
            let Some(scratch) = self.free_register(&instruction) else { return Ok(Placement::Impossible) };
            self.emit(Instruction::with2(Code::Mov_rm64_r64, self.vcpu(vcpu::REWRITE_SPILL), scratch)?);
            self.emit(Instruction::with2(Code::Mov_r64_imm64, scratch, target)?);
            instruction.set_memory_base(scratch);
            instruction.set_memory_displacement64(0);
            instruction.set_memory_displ_size(0);
            self.emit(instruction);
            self.emit(Instruction::with2(Code::Mov_r64_rm64, scratch, self.vcpu(vcpu::REWRITE_SPILL))?);
        }
        Ok(Placement::PcRelative)
    }

    fn place_segment(&mut self, mut instruction: Instruction) -> Result<Placement, IcedError> {
        let base = instruction.memory_base();
        let index = instruction.memory_index();
        // XLAT's [rbx+al] is the one OpKind::Memory operand that is not a ModRM operand.
        let explicit = (0..instruction.op_count()).any(|n| instruction.op_kind(n) == OpKind::Memory)
            && instruction.mnemonic() != Mnemonic::Xlatb;
        let rip_relative = base != Register::None && !base.is_gpr();
        // A displacement beside a register is at most 32 bits (a 64-bit MOV moffs can have more).
        let reachable = self.bitness == 32 || fits_i32(instruction.memory_displacement64());
        if !explicit
            || self.bitness == 16
            || address_size(&instruction) != self.bitness as usize / 8
            || rip_relative
            || !reachable
        {
            return Ok(Placement::Impossible);
        }
        instruction.set_code(modrm_form(instruction.code()));
        let Some(scratch) = self.free_register(&instruction) else { return Ok(Placement::Impossible) };
        let (save, load) = if self.bitness == 64 {
            (Code::Mov_rm64_r64, Code::Mov_r64_rm64)
        } else {
            (Code::Mov_rm32_r32, Code::Mov_r32_rm32)
        };
        self.emit(Instruction::with2(save, self.vcpu(vcpu::REWRITE_SPILL), scratch)?);
        self.emit(Instruction::with2(load, scratch, self.vcpu(vcpu::GS_BASE))?);
        match (base, index) {
            (Register::None, _) => instruction.set_memory_base(scratch),
            (_, Register::None) => {
                instruction.set_memory_index(scratch);
                instruction.set_memory_index_scale(1);
            }
            _ => {
                let lea = if self.bitness == 64 { Code::Lea_r64_m } else { Code::Lea_r32_m };
                let sum = MemoryOperand::new(base, scratch, 1, 0, 0, false, Register::None);
                self.emit(Instruction::with2(lea, scratch, sum)?);
                instruction.set_memory_base(scratch);
            }
        }
        instruction.set_segment_prefix(Register::None);
        self.emit(instruction);
        self.emit(Instruction::with2(load, scratch, self.vcpu(vcpu::REWRITE_SPILL))?);
        Ok(Placement::Segment)
    }

    /// The first general register the instruction does not use at all, sized for the code.
    fn free_register(&mut self, instruction: &Instruction) -> Option<Register> {
        let used: Vec<Register> =
            self.info.info(instruction).used_registers().iter().map(|used| used.register().full_register()).collect();
        let count = if self.bitness == 64 { 16 } else { 8 };
        let free =
            GPRS[..count].iter().copied().find(|&register| register != Register::RSP && !used.contains(&register))?;
        Some(if self.bitness == 64 { free } else { free.full_register32() })
    }

    /// Encodes the CCF; on failure, names the guest instruction whose TC code does not encode, if one can be found.
    fn encode(&mut self) -> Result<Vec<u8>, (Option<u32>, String)> {
        let base = label_base(&self.code);
        if self.bitness == 16 && base + self.code.len() as u64 > u64::from(u16::MAX) {
            return Err((None, "the CCF does not fit a 16-bit code segment".to_string()));
        }
        for (position, instruction) in self.code.iter_mut().enumerate() {
            instruction.set_ip(base + position as u64);
        }
        for &(branch, target) in &self.branches {
            let label = base + target as u64;
            let instruction = &mut self.code[branch];
            match instruction.op0_kind() {
                OpKind::NearBranch16 => instruction.set_near_branch16(label as u16),
                OpKind::NearBranch32 => instruction.set_near_branch32(label as u32),
                _ => instruction.set_near_branch64(label),
            }
        }
        let block = InstructionBlock::new(&self.code, self.tc_address);
        match BlockEncoder::encode(self.bitness, block, BlockEncoderOptions::NONE) {
            Ok(result) => Ok(result.code_buffer),
            Err(error) => Err((self.culprit(), error.to_string())),
        }
    }

    fn culprit(&self) -> Option<u32> {
        let mut encoder = Encoder::try_new(self.bitness).ok()?;
        let position = self.code.iter().position(|instruction| {
            !instruction.is_ip_rel_memory_operand()
                && !matches!(instruction.op0_kind(), OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64)
                && encoder.encode(instruction, self.tc_address).is_err()
        })?;
        self.spans.iter().rev().find(|&&(_, start)| start <= position).map(|&(index, _)| index)
    }
}

/// BlockEncoder resolves branch targets and RIP-relative addresses against the addresses of the instructions it
/// encodes: the TC instructions are labelled with consecutive addresses that no RIP-relative operand names.
fn label_base(code: &[Instruction]) -> u64 {
    let targets: Vec<u64> =
        code.iter().filter(|i| i.is_ip_rel_memory_operand()).map(|i| i.ip_rel_memory_address()).collect();
    let span = code.len() as u64;
    let mut base = 1;
    while let Some(&hit) = targets.iter().find(|&&target| target >= base && target - base < span) {
        base = hit + 1;
    }
    base
}

/// A guest instruction's memory operand, `offset` bytes further on (wrapping at the address size).
fn guest_memory(instruction: &Instruction, offset: u64) -> MemoryOperand {
    let mask = match address_size(instruction) {
        2 => u64::from(u16::MAX),
        4 => u64::from(u32::MAX),
        _ => u64::MAX,
    };
    let displacement = instruction.memory_displacement64().wrapping_add(offset) & mask;
    let displ_size = match instruction.memory_displ_size() {
        0 if displacement != 0 => 1,
        size => size,
    };
    MemoryOperand::new(
        instruction.memory_base(),
        instruction.memory_index(),
        instruction.memory_index_scale(),
        displacement as i64,
        displ_size,
        false,
        instruction.segment_prefix(),
    )
}

/// The ModRM form of a MOV with an absolute address (moffs), which takes no base register.
fn modrm_form(code: Code) -> Code {
    match code {
        Code::Mov_AL_moffs8 => Code::Mov_r8_rm8,
        Code::Mov_AX_moffs16 => Code::Mov_r16_rm16,
        Code::Mov_EAX_moffs32 => Code::Mov_r32_rm32,
        Code::Mov_RAX_moffs64 => Code::Mov_r64_rm64,
        Code::Mov_moffs8_AL => Code::Mov_rm8_r8,
        Code::Mov_moffs16_AX => Code::Mov_rm16_r16,
        Code::Mov_moffs32_EAX => Code::Mov_rm32_r32,
        Code::Mov_moffs64_RAX => Code::Mov_rm64_r64,
        code => code,
    }
}

/// Address size in bytes of an instruction's memory operand.
fn address_size(instruction: &Instruction) -> usize {
    [instruction.memory_base(), instruction.memory_index()]
        .into_iter()
        .find(|register| register.is_gpr())
        .map_or(instruction.memory_displ_size() as usize, |register| register.size())
}

fn by_size(size: usize, codes: [Code; 3]) -> Code {
    match size {
        2 => codes[0],
        4 => codes[1],
        _ => codes[2],
    }
}

fn fits_i32(value: u64) -> bool {
    value as i64 == i64::from(value as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtlab_traces::CodeMode;

    const KERNEL: u64 = 0xffff_ffff_8100_0000;
    const TC: u64 = 0x7fff_f000_0000;
    const OPTIONS: TranslateOptions = TranslateOptions { in_tc_ports: &[0x80], guilty: &[] };

    fn block(mode: CodeMode, address: u64, bytes: &[u8]) -> Block {
        let instructions = Decoder::with_ip(mode.bitness(), bytes, address, DecoderOptions::NONE).into_iter().count();
        Block { address, mode, tag: 0, instructions: instructions as u32, bytes: bytes.to_vec() }
    }

    /// Translates and checks the invariants every translation keeps; returns the translation and the CCF decoded
    /// at its TC address.
    fn translate_checked(block: &Block, tc: u64, options: &TranslateOptions) -> (Translation, Vec<Instruction>) {
        let (translation, code) = translate_with_code(block, tc, options).unwrap();
        let decoded: Vec<Instruction> =
            Decoder::with_ip(block.mode.bitness(), &code, tc, DecoderOptions::NONE).into_iter().collect();
        assert!(decoded.iter().all(|i| !i.is_invalid()));
        assert_eq!(translation.tc_bytes as usize, code.len());
        assert_eq!(translation.emitted_instructions as usize, decoded.len());
        assert_eq!(translation.non_ident as usize, translation.sites.len());
        assert_eq!(translation.ident + translation.non_ident, translation.guest_instructions);
        let in_sites: u32 = translation.sites.iter().map(|site| u32::from(site.emitted)).sum();
        let end_stub = translation.emitted_instructions - translation.ident - in_sites;
        assert!(end_stub <= 3, "{translation:?}");
        assert_eq!(translate_with_code(block, tc, options).unwrap(), (translation.clone(), code));
        (translation, decoded)
    }

    /// The one site of a one-instruction block.
    fn site_of(bytes: &[u8], options: &TranslateOptions) -> (Site, Vec<Instruction>) {
        let (translation, decoded) = translate_checked(&block(CodeMode::Bits64, KERNEL, bytes), TC, options);
        assert_eq!(translation.sites.len(), 1, "{bytes:02x?}");
        (translation.sites[0].clone(), decoded)
    }

    fn is_vcpu(instruction: &Instruction, field: u32) -> bool {
        instruction.memory_segment() == Register::GS
            && instruction.memory_base() == Register::None
            && instruction.memory_displacement64() == u64::from(field)
    }

    #[test]
    fn ident_instructions_are_copied_and_a_conditional_branch_gets_two_chainable_exits() {
        // mov rax, rbx; add rax, 1; test rax, rax; jne +0x10 (to KERNEL + 0xc + 0x10)
        let bytes = [0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01, 0x48, 0x85, 0xc0, 0x75, 0x10];
        let guest = block(CodeMode::Bits64, KERNEL, &bytes);
        let (translation, decoded) = translate_checked(&guest, TC, &OPTIONS);
        // jne, then per exit `mov qword ptr gs:[SCRATCH], imm32` + `jmp qword ptr gs:[CONTINUATION]`: 5.
        assert_eq!(
            translation,
            Translation {
                guest_instructions: 4,
                ident: 3,
                non_ident: 1,
                sites: vec![Site { index: 3, kind: SiteKind::DirectBranch, emitted: 5, native_ops: Vec::new() }],
                emitted_instructions: 8,
                // 10 copied bytes, jne short (2), two stubs of 13 + 8 bytes.
                tc_bytes: 54,
                chain_slots: 2,
            }
        );
        let (_, code) = translate_with_code(&guest, TC, &OPTIONS).unwrap();
        assert_eq!(code[..10], bytes[..10]);
        // The jne goes to the taken stub, after the 21-byte fall-through stub.
        assert_eq!(decoded[3].code(), Code::Jne_rel8_64);
        assert_eq!(decoded[3].near_branch_target(), TC + 12 + 21);
        assert_eq!(decoded[4].immediate32to64() as u64, KERNEL + 0xc);
        assert_eq!(decoded[6].ip(), TC + 33);
        assert_eq!(decoded[6].immediate32to64() as u64, KERNEL + 0x1c);
        assert!(is_vcpu(&decoded[5], vcpu::CONTINUATION) && is_vcpu(&decoded[7], vcpu::CONTINUATION));
    }

    #[test]
    fn ret_jumps_through_the_indirect_branch_lookup() {
        let (translation, decoded) = translate_checked(&block(CodeMode::Bits64, KERNEL, &[0xc3]), TC, &OPTIONS);
        // pop qword ptr gs:[SCRATCH]; jmp qword ptr gs:[IBL]
        assert_eq!(
            translation.sites,
            vec![Site { index: 0, kind: SiteKind::IndirectBranch, emitted: 2, native_ops: Vec::new() }]
        );
        assert_eq!(translation.chain_slots, 0);
        assert_eq!(decoded[0].code(), Code::Pop_rm64);
        assert!(is_vcpu(&decoded[0], vcpu::SCRATCH));
        let last = decoded.last().unwrap();
        assert_eq!(last.code(), Code::Jmp_rm64);
        assert!(is_vcpu(last, vcpu::IBL));
    }

    #[test]
    fn indirect_calls_push_the_guest_return_address() {
        // call qword ptr [rax+8]: push [rax+8]; pop gs:[SCRATCH]; push imm32 (the guest return address); jmp IBL.
        let (site, decoded) = site_of(&[0xff, 0x50, 0x08], &OPTIONS);
        assert_eq!(site, Site { index: 0, kind: SiteKind::IndirectBranch, emitted: 4, native_ops: Vec::new() });
        assert_eq!(decoded[2].code(), Code::Pushq_imm32);
        assert_eq!(decoded[2].immediate32to64() as u64, KERNEL + 3);
        // ret 0x10 releases its operand bytes with a LEA, which leaves the flags alone.
        let (site, decoded) = site_of(&[0xc2, 0x10, 0x00], &OPTIONS);
        assert_eq!(site.emitted, 3);
        assert_eq!((decoded[1].code(), decoded[1].memory_displacement64()), (Code::Lea_r64_m, 0x10));
    }

    #[test]
    fn direct_calls_push_the_guest_return_address_and_chain_to_the_target() {
        // call rel32 0: push imm32; mov qword ptr gs:[SCRATCH], imm32; jmp qword ptr gs:[CONTINUATION]
        let (translation, decoded) =
            translate_checked(&block(CodeMode::Bits64, KERNEL, &[0xe8, 0, 0, 0, 0]), TC, &OPTIONS);
        assert_eq!(
            translation.sites,
            vec![Site { index: 0, kind: SiteKind::DirectCall, emitted: 3, native_ops: Vec::new() }]
        );
        assert_eq!(translation.chain_slots, 1);
        assert_eq!(decoded[0].immediate32to64() as u64, KERNEL + 5);
        assert_eq!(decoded[1].immediate32to64() as u64, KERNEL + 5);
    }

    #[test]
    fn sensitive_instructions_are_emulated_in_the_tc_or_called_out() {
        let guilty = TranslateOptions { in_tc_ports: &[0x80], guilty: &[0] };
        // The pending-interrupt check after STI, POPF and a CR8 write: pushf, test, jz, call, popf.
        let check = [Op::Pushf, Op::Popf];
        // Bytes, options, the site's kind, instructions emitted, costly instructions among them.
        type Case<'a> = (&'a [u8], &'a TranslateOptions<'a>, SiteKind, u16, &'a [Op]);
        let cases: [Case; 13] = [
            (&[0xfa], &OPTIONS, SiteKind::InTc, 1, &[]), // cli: mov byte ptr gs:[IF], 0
            (&[0xfb], &OPTIONS, SiteKind::InTc, 6, &check), // sti: mov byte ptr gs:[IF], 2 and the check
            (&[0x44, 0x0f, 0x22, 0xc0], &OPTIONS, SiteKind::InTc, 6, &check), // mov cr8, rax: mov gs:[TPR], rax
            (&[0x0f, 0x20, 0xd8], &OPTIONS, SiteKind::InTc, 1, &[]), // mov rax, cr3: mov rax, gs:[CR3]
            (&[0x0f, 0x01, 0x00], &OPTIONS, SiteKind::InTc, 4, &[]), // sgdt [rax]: two push/pop pairs
            (&[0x9c], &OPTIONS, SiteKind::InTc, 8, &[Op::Pushf, Op::Popf]), // pushfq, see Emitter::in_tc
            (&[0x9d], &OPTIONS, SiteKind::InTc, 11, &[Op::Popf, Op::Pushf, Op::Popf]), // popfq and the check
            (&[0x0f, 0x31], &OPTIONS, SiteKind::InTc, 5, &[Op::Pushf, Op::Rdtsc, Op::Popf]), // rdtsc
            // A helper call or a callout is `mov qword ptr gs:[SCRATCH], imm32` + `call qword ptr gs:[entry]`.
            (&[0xe4, 0x80], &OPTIONS, SiteKind::HelperCall, 2, &[]), // in al, 0x80: the I/O helper
            (&[0x48, 0x89, 0x18], &guilty, SiteKind::HelperCall, 2, &[]), // mov [rax], rbx, guilty
            (&[0x0f, 0x22, 0xd8], &OPTIONS, SiteKind::Callout, 2, &[]), // mov cr3, rax
            (&[0xe4, 0x71], &OPTIONS, SiteKind::Callout, 2, &[]),    // in al, 0x71
            (&[0x0f, 0xa2], &OPTIONS, SiteKind::Callout, 2, &[]),    // cpuid
        ];
        for (bytes, options, kind, emitted, native_ops) in cases {
            let (site, decoded) = site_of(bytes, options);
            assert_eq!((site.kind, site.emitted), (kind, emitted), "{bytes:02x?}");
            assert_eq!(site.native_ops, native_ops, "{bytes:02x?}");
            let entry = match (kind, bytes) {
                (SiteKind::Callout, _) => Some(vcpu::CALLOUT),
                (SiteKind::HelperCall, [0xe4, ..]) => Some(vcpu::IO_HELPER),
                (SiteKind::HelperCall, _) => Some(vcpu::WRITE_HELPER),
                _ => None,
            };
            if let Some(entry) = entry {
                assert_eq!(decoded[0].immediate32to64() as u64, KERNEL);
                assert_eq!(decoded[1].code(), Code::Call_rm64);
                assert!(is_vcpu(&decoded[1], entry), "{bytes:02x?}");
            }
        }
        // hlt leaves the CCF through the other callout entry, with no fall-through stub.
        let (translation, decoded) = translate_checked(&block(CodeMode::Bits64, KERNEL, &[0xf4]), TC, &OPTIONS);
        assert_eq!(
            (translation.sites[0].kind, translation.emitted_instructions, translation.chain_slots),
            (SiteKind::Callout, 2, 0)
        );
        assert!(is_vcpu(&decoded[1], vcpu::CALLOUT_LEAVE));
    }

    #[test]
    fn rip_relative_operands_keep_addressing_the_guest() {
        // mov rax, [rip+0x100]: 7 bytes, so the operand names guest address + 7 + 0x100.
        let bytes = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00];
        let (translation, decoded) = translate_checked(&block(CodeMode::Bits64, 0x101000, &bytes), TC, &OPTIONS);
        assert_eq!(
            translation.sites,
            vec![Site { index: 0, kind: SiteKind::PcRelative, emitted: 1, native_ops: Vec::new() }]
        );
        assert!(decoded[0].is_ip_rel_memory_operand());
        assert_eq!(decoded[0].ip_rel_memory_address(), 0x101000 + 7 + 0x100);
        // A kernel-image address, beyond ±2 GiB of the TC but in the top 2 GiB: an absolute disp32.
        let (site, decoded) = site_of(&bytes, &OPTIONS);
        assert_eq!((site.kind, site.emitted), (SiteKind::PcRelative, 1));
        assert_eq!((decoded[0].memory_base(), decoded[0].memory_displacement64()), (Register::None, KERNEL + 0x107));
        // Anywhere else: save rcx, mov rcx, imm64, mov rax, [rcx], restore rcx.
        let far = 0xffff_8881_0000_0000;
        let (translation, decoded) = translate_checked(&block(CodeMode::Bits64, far, &bytes), TC, &OPTIONS);
        assert_eq!(translation.sites[0].emitted, 4);
        assert_eq!((decoded[1].code(), decoded[1].immediate64()), (Code::Mov_r64_imm64, far + 0x107));
        assert_eq!(decoded[2].memory_base(), decoded[1].op0_register());
    }

    #[test]
    fn rip_relative_targets_never_resolve_to_tc_instructions() {
        // BlockEncoder resolves addresses against instruction labels (1, 2, 3 by default): a guest operand naming
        // address 2 (mov rax, [rip-0x15] at 0x10) must still name guest address 2.
        let bytes = [0x48, 0x8b, 0x05, 0xeb, 0xff, 0xff, 0xff];
        let (_, decoded) = translate_checked(&block(CodeMode::Bits64, 0x10, &bytes), TC, &OPTIONS);
        assert_eq!(decoded[0].ip_rel_memory_address(), 2);
    }

    #[test]
    fn gs_accesses_go_through_the_guest_gs_base() {
        // mov rax, gs:[0x28]: save rcx, load the guest gs base, mov rax, [rcx+0x28], restore rcx.
        let (site, decoded) = site_of(&[0x65, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0], &OPTIONS);
        assert_eq!((site.kind, site.emitted), (SiteKind::SegmentRewrite, 4));
        assert!(is_vcpu(&decoded[1], vcpu::GS_BASE));
        assert_eq!(decoded[2].segment_prefix(), Register::None);
        assert_eq!((decoded[2].memory_base(), decoded[2].memory_displacement64()), (Register::RCX, 0x28));
        // mov rax, gs:[rax+rbx*4+8] folds rax into the scratch register first (a LEA): 5.
        let (site, decoded) = site_of(&[0x65, 0x48, 0x8b, 0x44, 0x98, 0x08], &OPTIONS);
        assert_eq!((site.kind, site.emitted), (SiteKind::SegmentRewrite, 5));
        assert_eq!(decoded[2].code(), Code::Lea_r64_m);
        // Loading %gs itself is the monitor's business.
        let (site, _) = site_of(&[0x8e, 0xe8], &OPTIONS); // mov gs, eax
        assert_eq!(site.kind, SiteKind::Callout);
    }

    #[test]
    fn blocks_of_16_and_32_bit_code_translate() {
        // cli; mov eax, cr0; ret
        let guest = block(CodeMode::Bits32, 0xc010_0000, &[0xfa, 0x0f, 0x20, 0xc0, 0xc3]);
        let (translation, decoded) = translate_checked(&guest, 0x0800_0000, &OPTIONS);
        let kinds: Vec<(SiteKind, u16)> = translation.sites.iter().map(|site| (site.kind, site.emitted)).collect();
        assert_eq!(kinds, [(SiteKind::InTc, 1), (SiteKind::InTc, 1), (SiteKind::IndirectBranch, 2)]);
        assert_eq!((translation.emitted_instructions, translation.chain_slots), (4, 0));
        assert_eq!(decoded[1].code(), Code::Mov_r32_rm32);
        assert!(is_vcpu(&decoded[1], vcpu::CR0));
        assert_eq!(decoded[3].code(), Code::Jmp_rm32);
        // mov eax, gs:[0x14] (a stack-protector canary) through the guest gs base, then the fall-through stub.
        let guest = block(CodeMode::Bits32, 0xc010_0000, &[0x65, 0xa1, 0x14, 0, 0, 0]);
        let (translation, _) = translate_checked(&guest, 0x0800_0000, &OPTIONS);
        assert_eq!(translation.sites[0].kind, SiteKind::SegmentRewrite);
        // Real-mode code: pushf; popf; jne; every sequence encodes in 16-bit code.
        let guest = block(CodeMode::Bits16, 0x7c00, &[0x9c, 0x9d, 0x75, 0xfc]);
        let (translation, decoded) = translate_checked(&guest, 0x4000, &OPTIONS);
        assert_eq!(translation.chain_slots, 2);
        assert_eq!(decoded.last().unwrap().code(), Code::Jmp_rm16);
    }

    #[test]
    fn malformed_blocks_are_errors_that_name_the_block() {
        let mut truncated = block(CodeMode::Bits64, KERNEL, &[0x48, 0x89, 0xd8, 0x48, 0x8b]);
        truncated.instructions = 2;
        let error = translate(&truncated, TC, &OPTIONS).unwrap_err();
        assert!(matches!(error, TranslateError::Decode { index: 1, .. }));
        assert!(error.to_string().contains("0xffffffff81000000"), "{error}");
        let mut miscounted = block(CodeMode::Bits64, KERNEL, &[0x90, 0x90]);
        miscounted.instructions = 3;
        assert!(matches!(translate(&miscounted, TC, &OPTIONS), Err(TranslateError::InstructionCount { .. })));
        let jump_first = block(CodeMode::Bits64, KERNEL, &[0xc3, 0x90]);
        let error = translate(&jump_first, TC, &OPTIONS).unwrap_err();
        assert!(matches!(error, TranslateError::ExitInsideBlock { index: 0, .. }), "{error}");
    }

    #[test]
    fn every_decodable_instruction_translates() {
        // One-byte and 0F opcodes under common prefixes (gs, operand and address size, rep, REX.W), each with a
        // RIP-relative, SIB, register, plain and absolute ModRM operand, in every mode, at guest addresses that
        // take each RIP-relative case, with and without a forced callout.
        let prefixes: [&[u8]; 8] = [&[], &[0x65], &[0x66], &[0x67], &[0x65, 0x67], &[0xf3], &[0x48], &[0x65, 0x48]];
        let operands: [&[u8]; 5] =
            [&[0x05, 0x10, 0, 0, 0], &[0x44, 0x98, 0x08], &[0xc0], &[0x00], &[0x04, 0x25, 0x28, 0, 0, 0]];
        let mut sites = 0;
        for mode in CodeMode::ALL {
            for prefix in prefixes {
                for opcode in (0..=255u8).flat_map(|op| [vec![op], vec![0x0f, op]]) {
                    for operand in operands {
                        let mut bytes = [prefix, &opcode, operand, &[0x11; 8]].concat();
                        let first = Decoder::with_ip(mode.bitness(), &bytes, 0, DecoderOptions::NONE).decode();
                        if first.is_invalid() {
                            continue;
                        }
                        bytes.truncate(first.len());
                        for address in [KERNEL, 0x101000, 0xffff_8881_0000_0000] {
                            let forced = [u32::from(opcode[opcode.len() - 1] % 2)];
                            let options = TranslateOptions { in_tc_ports: &[0x80, 0x11], guilty: &forced };
                            let (translation, _) = translate_checked(&block(mode, address, &bytes), TC, &options);
                            sites += translation.sites.len();
                        }
                    }
                }
            }
        }
        assert!(sites > 100_000, "{sites}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // xorshift64*, so that the test is deterministic without a dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut translated = 0;
        for round in 0..50_000 {
            let mode = CodeMode::ALL[round % 3];
            let length = (next() % 40) as usize + 1;
            let mut bytes: Vec<u8> = (0..length).map(|_| next() as u8).collect();
            if round % 4 == 0 {
                bytes.insert(0, 0x65);
            }
            let address = [KERNEL, 0x101000, 0xffff_8881_0000_0000, next()][round % 4];
            let mut guest = block(mode, address, &bytes);
            if round % 5 == 0 {
                guest.instructions = (next() % 8) as u32;
            } else if round % 5 == 1 {
                guest.bytes.truncate(length / 2);
            }
            let forced = [(next() % 4) as u32];
            let options = TranslateOptions { in_tc_ports: &[0x80, 0x71], guilty: &forced };
            let tc = [TC, 0x1000, next()][round % 3];
            if let Ok((translation, code)) = translate_with_code(&guest, tc, &options) {
                let decoded = Decoder::with_ip(mode.bitness(), &code, tc, DecoderOptions::NONE).into_iter().count();
                assert_eq!(translation.emitted_instructions as usize, decoded, "{guest:?}");
                translated += 1;
            }
        }
        assert!(translated > 1000, "only {translated} blocks translated");
    }
}
