//! The one instruction classification every engine uses.
//!
//! Popek & Goldberg (CACM 1974) split instructions into *innocuous* and *sensitive*; a machine is classically
//! virtualizable when every sensitive instruction is also *privileged*. x86 is not: Robin & Irvine (USENIX
//! Security 2000) list the sensitive-but-unprivileged ones, which iced-x86 does not flag, so the lab keeps that
//! list here ([`Op::is_sensitive_unprivileged`]). iced-x86 provides the privileged set
//! (`Instruction::is_privileged`, CPL 0 plus the IOPL-sensitive IN/OUT/INS/OUTS/CLI/STI).

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};
use virtlab_traces::{Block, CodeMode};

/// What an instruction means to a virtualization strategy. Everything that is not [`Op::Innocuous`] is an
/// operation at least one engine treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Innocuous,
    Cli,
    Sti,
    Pushf,
    Popf,
    /// MOV to CR0, CR2, CR3, CR4 or CR8 (the number), LMSW and CLTS count as writes of CR0.
    MovToCr(u8),
    MovFromCr(u8),
    MovDr,
    Lgdt,
    Lidt,
    Lldt,
    Ltr,
    Sgdt,
    Sidt,
    Sldt,
    Str,
    Smsw,
    Lar,
    Lsl,
    Verr,
    Verw,
    /// MOV from CS or SS, PUSH CS or SS: reveal the current privilege level in the selector's RPL.
    ReadCodeOrStackSelector,
    /// Far CALL, JMP or RET: may go through a gate, whose privilege checks a deprivileged kernel changes.
    FarTransfer,
    /// MOV or POP to a data or stack segment register, LDS/LES/LFS/LGS/LSS: checks the descriptor's privilege
    /// against the CPL and loads its limit, so a deprivileged kernel needs the monitor's copies of its
    /// descriptors (privilege raised, limit truncated below the monitor).
    SegmentLoad,
    Rdmsr,
    Wrmsr,
    /// IN or INS.
    PortIn,
    /// OUT or OUTS.
    PortOut,
    Hlt,
    Invlpg,
    Cpuid,
    Rdtsc,
    Rdpmc,
    Swapgs,
    Syscall,
    Sysret,
    Iret,
    /// INT n, INT3, INTO, INT1.
    SoftwareInterrupt,
    /// WBINVD, INVD.
    CacheFlush,
    Xsetbv,
    /// Any other instruction iced-x86 marks privileged (rare system instructions).
    OtherPrivileged,
}

impl Op {
    /// Popek & Goldberg's class of this operation on x86.
    pub fn class(self) -> Class {
        if self == Op::Innocuous {
            Class::Innocuous
        } else if self.is_sensitive_unprivileged() {
            Class::SensitiveUnprivileged
        } else if self.is_privileged() {
            Class::Privileged
        } else {
            // CPUID, RDTSC, SYSCALL, INT n: unprivileged and, on bare x86, not sensitive in the P&G sense, but every
            // hypervisor intercepts or observes them.
            Class::Transfer
        }
    }

    /// Traps (#GP or #UD) when the guest kernel runs deprivileged, at CPL 1 or 3.
    pub fn is_privileged(self) -> bool {
        matches!(
            self,
            Op::Cli
                | Op::Sti
                | Op::MovToCr(_)
                | Op::MovFromCr(_)
                | Op::MovDr
                | Op::Lgdt
                | Op::Lidt
                | Op::Lldt
                | Op::Ltr
                | Op::Rdmsr
                | Op::Wrmsr
                | Op::PortIn
                | Op::PortOut
                | Op::Hlt
                | Op::Invlpg
                | Op::Swapgs
                | Op::Sysret
                | Op::CacheFlush
                | Op::Xsetbv
                | Op::OtherPrivileged
        )
    }

    /// Robin & Irvine's sensitive-but-unprivileged instructions: they run at any CPL without trapping but read
    /// or silently ignore privileged state, so a deprivileged kernel sees wrong values.
    pub fn is_sensitive_unprivileged(self) -> bool {
        matches!(
            self,
            Op::Pushf
                | Op::Popf
                | Op::Sgdt
                | Op::Sidt
                | Op::Sldt
                | Op::Str
                | Op::Smsw
                | Op::Lar
                | Op::Lsl
                | Op::Verr
                | Op::Verw
                | Op::ReadCodeOrStackSelector
                | Op::FarTransfer
                | Op::SegmentLoad
        )
    }

    /// Reads the location or limit of a descriptor table or the task register: the "red pill" instructions.
    pub fn reveals_descriptor_tables(self) -> bool {
        matches!(self, Op::Sgdt | Op::Sidt | Op::Sldt | Op::Str | Op::Smsw)
    }

    /// Whether the trace records an event each time this operation runs (a CR write, a port access, a system
    /// call…). Engines charge such operations at the event, which carries the values; the others at the block.
    pub fn has_event(self) -> bool {
        matches!(
            self,
            Op::MovToCr(_)
                | Op::Lgdt
                | Op::Lidt
                | Op::Lldt
                | Op::Ltr
                | Op::Rdmsr
                | Op::Wrmsr
                | Op::PortIn
                | Op::PortOut
                | Op::Hlt
                | Op::Invlpg
                | Op::Cpuid
                | Op::Syscall
                | Op::Sysret
                | Op::Iret
                | Op::SoftwareInterrupt
        )
    }

    /// Stable snake_case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Innocuous => "innocuous",
            Op::Cli => "cli",
            Op::Sti => "sti",
            Op::Pushf => "pushf",
            Op::Popf => "popf",
            Op::MovToCr(0) => "mov_to_cr0",
            Op::MovToCr(2) => "mov_to_cr2",
            Op::MovToCr(3) => "mov_to_cr3",
            Op::MovToCr(4) => "mov_to_cr4",
            Op::MovToCr(8) => "mov_to_cr8",
            Op::MovToCr(_) => "mov_to_cr",
            Op::MovFromCr(0) => "mov_from_cr0",
            Op::MovFromCr(2) => "mov_from_cr2",
            Op::MovFromCr(3) => "mov_from_cr3",
            Op::MovFromCr(4) => "mov_from_cr4",
            Op::MovFromCr(8) => "mov_from_cr8",
            Op::MovFromCr(_) => "mov_from_cr",
            Op::MovDr => "mov_dr",
            Op::Lgdt => "lgdt",
            Op::Lidt => "lidt",
            Op::Lldt => "lldt",
            Op::Ltr => "ltr",
            Op::Sgdt => "sgdt",
            Op::Sidt => "sidt",
            Op::Sldt => "sldt",
            Op::Str => "str",
            Op::Smsw => "smsw",
            Op::Lar => "lar",
            Op::Lsl => "lsl",
            Op::Verr => "verr",
            Op::Verw => "verw",
            Op::ReadCodeOrStackSelector => "read_cs_ss",
            Op::FarTransfer => "far_transfer",
            Op::SegmentLoad => "segment_load",
            Op::Rdmsr => "rdmsr",
            Op::Wrmsr => "wrmsr",
            Op::PortIn => "in",
            Op::PortOut => "out",
            Op::Hlt => "hlt",
            Op::Invlpg => "invlpg",
            Op::Cpuid => "cpuid",
            Op::Rdtsc => "rdtsc",
            Op::Rdpmc => "rdpmc",
            Op::Swapgs => "swapgs",
            Op::Syscall => "syscall",
            Op::Sysret => "sysret",
            Op::Iret => "iret",
            Op::SoftwareInterrupt => "int",
            Op::CacheFlush => "wbinvd",
            Op::Xsetbv => "xsetbv",
            Op::OtherPrivileged => "other_privileged",
        }
    }
}

/// Popek & Goldberg's classes, with x86's unprivileged control transfers kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Innocuous,
    Privileged,
    SensitiveUnprivileged,
    /// Unprivileged instructions that enter the kernel or that hypervisors intercept (SYSCALL, INT n, CPUID,
    /// RDTSC, IRET).
    Transfer,
}

/// Classify one decoded instruction.
pub fn classify(instruction: &Instruction) -> Op {
    let control_register = |reg: Register| (reg.number() as u8).min(15);
    match instruction.mnemonic() {
        Mnemonic::Cli => Op::Cli,
        Mnemonic::Sti => Op::Sti,
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => Op::Pushf,
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => Op::Popf,
        Mnemonic::Mov if instruction.op0_kind() == OpKind::Register && instruction.op0_register().is_cr() => {
            Op::MovToCr(control_register(instruction.op0_register()))
        }
        Mnemonic::Mov
            if instruction.op_count() == 2
                && instruction.op1_kind() == OpKind::Register
                && instruction.op1_register().is_cr() =>
        {
            Op::MovFromCr(control_register(instruction.op1_register()))
        }
        Mnemonic::Mov | Mnemonic::Pop
            if instruction.op0_kind() == OpKind::Register && instruction.op0_register().is_segment_register() =>
        {
            Op::SegmentLoad
        }
        Mnemonic::Lds | Mnemonic::Les | Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss => Op::SegmentLoad,
        Mnemonic::Mov if instruction.op_count() == 2 && is_code_or_stack_selector_read(instruction) => {
            Op::ReadCodeOrStackSelector
        }
        Mnemonic::Mov
            if (instruction.op0_kind() == OpKind::Register && instruction.op0_register().is_dr())
                || (instruction.op_count() == 2
                    && instruction.op1_kind() == OpKind::Register
                    && instruction.op1_register().is_dr()) =>
        {
            Op::MovDr
        }
        Mnemonic::Lmsw | Mnemonic::Clts => Op::MovToCr(0),
        Mnemonic::Push
            if instruction.op0_kind() == OpKind::Register
                && matches!(instruction.op0_register(), Register::CS | Register::SS) =>
        {
            Op::ReadCodeOrStackSelector
        }
        Mnemonic::Lgdt => Op::Lgdt,
        Mnemonic::Lidt => Op::Lidt,
        Mnemonic::Lldt => Op::Lldt,
        Mnemonic::Ltr => Op::Ltr,
        Mnemonic::Sgdt => Op::Sgdt,
        Mnemonic::Sidt => Op::Sidt,
        Mnemonic::Sldt => Op::Sldt,
        Mnemonic::Str => Op::Str,
        Mnemonic::Smsw => Op::Smsw,
        Mnemonic::Lar => Op::Lar,
        Mnemonic::Lsl => Op::Lsl,
        Mnemonic::Verr => Op::Verr,
        Mnemonic::Verw => Op::Verw,
        Mnemonic::Rdmsr => Op::Rdmsr,
        Mnemonic::Wrmsr => Op::Wrmsr,
        Mnemonic::In | Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => Op::PortIn,
        Mnemonic::Out | Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => Op::PortOut,
        Mnemonic::Hlt => Op::Hlt,
        Mnemonic::Invlpg => Op::Invlpg,
        Mnemonic::Cpuid => Op::Cpuid,
        Mnemonic::Rdtsc | Mnemonic::Rdtscp => Op::Rdtsc,
        Mnemonic::Rdpmc => Op::Rdpmc,
        Mnemonic::Swapgs => Op::Swapgs,
        // The trace records SYSENTER and SYSEXIT as system call and return, as it does SYSCALL and SYSRET.
        Mnemonic::Syscall | Mnemonic::Sysenter => Op::Syscall,
        Mnemonic::Sysret | Mnemonic::Sysretq | Mnemonic::Sysexit | Mnemonic::Sysexitq => Op::Sysret,
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => Op::Iret,
        Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into | Mnemonic::Int1 => Op::SoftwareInterrupt,
        Mnemonic::Wbinvd | Mnemonic::Invd => Op::CacheFlush,
        Mnemonic::Xsetbv => Op::Xsetbv,
        Mnemonic::Call | Mnemonic::Jmp if is_far_branch(instruction) => Op::FarTransfer,
        Mnemonic::Retf => Op::FarTransfer,
        _ if instruction.is_privileged() => Op::OtherPrivileged,
        _ => Op::Innocuous,
    }
}

fn is_code_or_stack_selector_read(instruction: &Instruction) -> bool {
    instruction.op1_kind() == OpKind::Register && matches!(instruction.op1_register(), Register::CS | Register::SS)
}

fn is_far_branch(instruction: &Instruction) -> bool {
    matches!(instruction.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
        || matches!(
            instruction.code(),
            Code::Call_m1616
                | Code::Call_m1632
                | Code::Call_m1664
                | Code::Jmp_m1616
                | Code::Jmp_m1632
                | Code::Jmp_m1664
        )
}

/// How control leaves a block after its last instruction, which decides what a binary translator must do at
/// the block's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The block ended before a control transfer (the recorder cut it after a sensitive instruction or at a page
    /// boundary): execution continues at the next address.
    FallThrough,
    /// JMP rel or Jcc rel: targets known at translation time, so the translation can be chained.
    Direct,
    /// CALL rel: direct, but the return address pushed must be the guest's.
    DirectCall,
    /// RET, JMP or CALL through a register or memory: the target is only known at run time.
    Indirect,
    /// SYSCALL, SYSRET, IRET, INT n, HLT, far transfers: leaves the translated code through the monitor.
    System,
}

/// Instructions whose native cost is well above a simple ALU operation's, priced apart by the cost model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priced {
    /// A near CALL or RET (not a sensitive one).
    CallReturn,
    /// DIV or IDIV.
    Divide,
    /// MUL or IMUL.
    Multiply,
}

impl Priced {
    /// Every class, in discriminant order (plans index per-class costs by `class as usize`).
    pub const ALL: [Priced; 3] = [Priced::CallReturn, Priced::Divide, Priced::Multiply];
}

/// What a REP-prefixed string instruction does with each element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringWork {
    /// MOVS: a load and a store per element.
    Copy,
    /// STOS: a store per element.
    Fill,
    /// LODS, SCAS, CMPS, INS, OUTS.
    Other,
}

/// A REP-prefixed string instruction: the trace's `rep_string` events say how many elements each execution did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepString {
    pub work: StringWork,
    pub element_bytes: u32,
}

impl RepString {
    fn of(instruction: &Instruction) -> Option<RepString> {
        if !(instruction.is_string_instruction() && (instruction.has_rep_prefix() || instruction.has_repne_prefix())) {
            return None;
        }
        let work = match instruction.mnemonic() {
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => StringWork::Copy,
            Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => StringWork::Fill,
            _ => StringWork::Other,
        };
        let element_bytes = match instruction.mnemonic() {
            Mnemonic::Movsb | Mnemonic::Stosb | Mnemonic::Lodsb | Mnemonic::Scasb | Mnemonic::Cmpsb => 1,
            Mnemonic::Insb | Mnemonic::Outsb => 1,
            Mnemonic::Movsw | Mnemonic::Stosw | Mnemonic::Lodsw | Mnemonic::Scasw | Mnemonic::Cmpsw => 2,
            Mnemonic::Insw | Mnemonic::Outsw => 2,
            Mnemonic::Movsq | Mnemonic::Stosq | Mnemonic::Lodsq | Mnemonic::Scasq | Mnemonic::Cmpsq => 8,
            _ => 4,
        };
        Some(RepString { work, element_bytes })
    }
}

/// The static facts about one block that every engine needs, computed once per trace.
#[derive(Debug, Clone)]
pub struct BlockFacts {
    pub address: u64,
    pub mode: CodeMode,
    pub instructions: u32,
    /// Guest address of each instruction.
    pub addresses: Vec<u64>,
    /// Every instruction that is not innocuous, with its index in the block.
    pub ops: Vec<(u32, Op)>,
    /// Instructions the native cost model prices apart (near CALL and RET, DIV, MUL), with their indices.
    pub priced: Vec<(u32, Priced)>,
    /// The REP-prefixed string instructions, with their indices.
    pub rep_strings: Vec<(u32, RepString)>,
    pub exit: Exit,
}

impl BlockFacts {
    /// Decode a block. The trace checker has already established that the bytes decode to exactly
    /// `instructions` instructions; a block that does not is reported with its address.
    pub fn decode(block: &Block) -> Result<BlockFacts, ClassifyError> {
        let mut decoder = Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE);
        let mut facts = BlockFacts {
            address: block.address,
            mode: block.mode,
            instructions: block.instructions,
            addresses: Vec::with_capacity(block.instructions as usize),
            ops: Vec::new(),
            priced: Vec::new(),
            rep_strings: Vec::new(),
            exit: Exit::FallThrough,
        };
        let mut instruction = Instruction::default();
        for index in 0..block.instructions {
            if !decoder.can_decode() {
                return Err(ClassifyError { address: block.address, index });
            }
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() {
                return Err(ClassifyError { address: block.address, index });
            }
            facts.addresses.push(instruction.ip());
            let op = classify(&instruction);
            if op != Op::Innocuous {
                facts.ops.push((index, op));
            }
            let flow = instruction.flow_control();
            if let Some(priced) = priced(&instruction, op, flow) {
                facts.priced.push((index, priced));
            }
            if let Some(rep) = RepString::of(&instruction) {
                facts.rep_strings.push((index, rep));
            }
            if index + 1 == block.instructions {
                facts.exit = exit_of(op, flow);
            }
        }
        Ok(facts)
    }

    /// The REP string instruction at `index`, which the trace checker's `rep-on-string-instruction` rule promises
    /// for every `rep_string` event.
    pub fn rep_string_at(&self, index: u32) -> Option<RepString> {
        self.rep_strings.iter().find(|(i, _)| *i == index).map(|&(_, rep)| rep)
    }

    /// Guest address of instruction `index`. An event after the block's last instruction (`index ==
    /// instructions`) is that instruction's doing (a SYSRET's context change, an interrupt taken after it), so it
    /// gets the last instruction's address.
    pub fn address_of(&self, index: u32) -> u64 {
        let last = self.addresses.last().copied().unwrap_or(self.address);
        self.addresses.get(index as usize).copied().unwrap_or(last)
    }
}

fn priced(instruction: &Instruction, op: Op, flow: FlowControl) -> Option<Priced> {
    if op != Op::Innocuous {
        return None;
    }
    if matches!(flow, FlowControl::Call | FlowControl::Return | FlowControl::IndirectCall) {
        return Some(Priced::CallReturn);
    }
    match instruction.mnemonic() {
        Mnemonic::Div | Mnemonic::Idiv => Some(Priced::Divide),
        Mnemonic::Mul | Mnemonic::Imul => Some(Priced::Multiply),
        _ => None,
    }
}

fn exit_of(op: Op, flow: FlowControl) -> Exit {
    if op != Op::Innocuous && op.class() != Class::SensitiveUnprivileged || op == Op::FarTransfer {
        return match flow {
            FlowControl::Next => Exit::FallThrough,
            _ => Exit::System,
        };
    }
    match flow {
        FlowControl::Next => Exit::FallThrough,
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => Exit::Direct,
        FlowControl::Call => Exit::DirectCall,
        FlowControl::IndirectBranch | FlowControl::IndirectCall | FlowControl::Return => Exit::Indirect,
        FlowControl::Interrupt | FlowControl::XbeginXabortXend | FlowControl::Exception => Exit::System,
    }
}

/// A block whose bytes do not decode (the trace checker's `block-decodes` rule finds these first).
#[derive(Debug, Clone, thiserror::Error)]
#[error("block at {address:#x}: instruction {index} does not decode; run `virtlab check` on the trace")]
pub struct ClassifyError {
    pub address: u64,
    pub index: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_of(bitness: u32, bytes: &[u8]) -> Op {
        let mut decoder = Decoder::with_ip(bitness, bytes, 0x1000, DecoderOptions::NONE);
        classify(&decoder.decode())
    }

    #[test]
    fn privileged_and_sensitive_unprivileged_instructions_are_told_apart() {
        assert_eq!(op_of(64, &[0xfa]), Op::Cli);
        assert_eq!(op_of(64, &[0x9d]), Op::Popf);
        assert_eq!(op_of(64, &[0x0f, 0x22, 0xd8]), Op::MovToCr(3)); // mov cr3, rax
        assert_eq!(op_of(64, &[0x44, 0x0f, 0x22, 0xc0]), Op::MovToCr(8)); // mov cr8, rax
        assert_eq!(op_of(64, &[0x44, 0x0f, 0x20, 0xc0]), Op::MovFromCr(8)); // mov rax, cr8
        assert_eq!(op_of(64, &[0x0f, 0x01, 0x00]), Op::Sgdt); // sgdt [rax]
        assert_eq!(op_of(64, &[0x8c, 0xc8]), Op::ReadCodeOrStackSelector); // mov eax, cs
        assert_eq!(op_of(32, &[0x0e]), Op::ReadCodeOrStackSelector); // push cs
        assert_eq!(op_of(64, &[0xe4, 0x80]), Op::PortIn); // in al, 0x80
        assert_eq!(op_of(64, &[0x0f, 0x01, 0x38]), Op::Invlpg); // invlpg [rax]
        assert_eq!(op_of(64, &[0x48, 0x0f, 0x07]), Op::Sysret);
        assert_eq!(op_of(64, &[0x0f, 0x01, 0xf8]), Op::Swapgs);
        assert_eq!(op_of(64, &[0x48, 0x89, 0xd8]), Op::Innocuous); // mov rax, rbx
        assert_eq!(op_of(64, &[0xc3]), Op::Innocuous); // ret
        assert_eq!(op_of(32, &[0x8e, 0xd8]), Op::SegmentLoad); // mov ds, eax
        assert_eq!(op_of(32, &[0x1f]), Op::SegmentLoad); // pop ds
        assert_eq!(op_of(32, &[0x0f, 0x34]), Op::Syscall); // sysenter
        assert_eq!(op_of(32, &[0x0f, 0x35]), Op::Sysret); // sysexit
        assert_eq!(op_of(32, &[0x0f, 0xb2, 0x00]), Op::SegmentLoad); // lss eax, [eax]
        assert_eq!(op_of(32, &[0x8c, 0xd8]), Op::Innocuous, "mov eax, ds reads a data selector: no privilege shows");

        assert_eq!(Op::Popf.class(), Class::SensitiveUnprivileged);
        assert_eq!(Op::Cli.class(), Class::Privileged);
        assert_eq!(Op::Cpuid.class(), Class::Transfer);
        assert!(!Op::Sgdt.is_privileged() && Op::Sgdt.reveals_descriptor_tables());
    }

    #[test]
    fn divisions_multiplications_and_rep_strings_are_found_with_their_sizes() {
        // div rcx; imul rbx, rbx, 31; rep stosq; rep movsb; repne scasb; movsq (no REP); ret
        let bytes =
            vec![0x48, 0xf7, 0xf1, 0x48, 0x6b, 0xdb, 0x1f, 0xf3, 0x48, 0xab, 0xf3, 0xa4, 0xf2, 0xae, 0x48, 0xa5, 0xc3];
        let block = Block { address: 0x3000, mode: CodeMode::Bits64, tag: 0, instructions: 7, bytes };
        let facts = BlockFacts::decode(&block).unwrap();
        assert_eq!(facts.priced, vec![(0, Priced::Divide), (1, Priced::Multiply), (6, Priced::CallReturn)]);
        let fill = RepString { work: StringWork::Fill, element_bytes: 8 };
        let copy = RepString { work: StringWork::Copy, element_bytes: 1 };
        let scan = RepString { work: StringWork::Other, element_bytes: 1 };
        assert_eq!(facts.rep_strings, vec![(2, fill), (3, copy), (4, scan)]);
        assert_eq!(facts.rep_string_at(3), Some(copy));
        assert_eq!(facts.rep_string_at(5), None, "a MOVSQ without REP is one element, no event");
    }

    #[test]
    fn block_facts_list_the_sensitive_instructions_and_the_exit() {
        // cli; mov cr3, rax; call rel32 0; ... in 64-bit; the call is the last instruction.
        let bytes = vec![0xfa, 0x0f, 0x22, 0xd8, 0xe8, 0, 0, 0, 0];
        let block = Block { address: 0x2000, mode: CodeMode::Bits64, tag: 0, instructions: 3, bytes };
        let facts = BlockFacts::decode(&block).unwrap();
        assert_eq!(facts.ops, vec![(0, Op::Cli), (1, Op::MovToCr(3))]);
        assert_eq!(facts.addresses, vec![0x2000, 0x2001, 0x2004]);
        assert_eq!(facts.address_of(3), 0x2004, "after the block: the last instruction");
        assert_eq!(facts.exit, Exit::DirectCall);
        assert_eq!(facts.priced, vec![(2, Priced::CallReturn)]);
        assert!(facts.rep_strings.is_empty());
    }
}
