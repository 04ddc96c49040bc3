//! Pre-classified forms of the most frequent instructions (register and immediate operands only),
//! chosen once when a block is decoded so the hot path skips operand-kind dispatch. Every other
//! instruction takes the general path in `exec.rs`; both give identical results.

use iced_x86::{Code, FlowControl, Instruction, Mnemonic as M, OpKind, Register};

use crate::alu::{self, mask};
use crate::cpu::rflags::STATUS;
use crate::cpu::CodeMode;
use crate::interp::{Fault, Interp};
use crate::memory::is_canonical;
use crate::observer::ExecutionObserver;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AluOp {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Cmp,
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShiftOp {
    Shl,
    Shr,
    Sar,
}

/// A 64-bit-mode memory operand with 64-bit base/index registers and a DS or SS segment (no FS/GS
/// base): effective address = displacement + base + (index << scale).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryOperand {
    pub displacement: u64,
    /// GPR index, or NO_REGISTER.
    pub base: u8,
    pub index: u8,
    pub scale_shift: u8,
    /// Addressed through SS: a non-canonical address is #SS rather than #GP.
    pub stack: bool,
}

const NO_REGISTER: u8 = 0xFF;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FastForm {
    General,
    MovLoad {
        destination: u8,
        bytes: u8,
        memory: MemoryOperand,
    },
    MovStore {
        source: u8,
        bytes: u8,
        memory: MemoryOperand,
    },
    AluLoad {
        op: AluOp,
        destination: u8,
        bytes: u8,
        memory: MemoryOperand,
    },
    AluStore {
        op: AluOp,
        source: u8,
        bytes: u8,
        memory: MemoryOperand,
    },
    AluRegReg {
        op: AluOp,
        destination: u8,
        source: u8,
        bytes: u8,
    },
    AluRegImm {
        op: AluOp,
        destination: u8,
        bytes: u8,
        immediate: u64,
    },
    MovRegReg {
        destination: u8,
        source: u8,
        bytes: u8,
    },
    MovRegImm {
        destination: u8,
        bytes: u8,
        immediate: u64,
    },
    ShiftRegImm {
        op: ShiftOp,
        destination: u8,
        bytes: u8,
        count: u8,
    },
    IncDec {
        destination: u8,
        bytes: u8,
        decrement: bool,
    },
    /// An ALU operation on memory with an immediate, sign-extended to the operand's width as encoded.
    AluMemImm {
        op: AluOp,
        bytes: u8,
        memory: MemoryOperand,
        immediate: i32,
    },
    /// MOV m, imm, the immediate sign-extended to the operand's width as encoded.
    MovMemImm {
        bytes: u8,
        memory: MemoryOperand,
        immediate: i32,
    },
    /// INC m and DEC m.
    IncDecMem {
        bytes: u8,
        memory: MemoryOperand,
        decrement: bool,
    },
    /// IMUL r, r/imm (two-operand) and IMUL r, r, imm (three-operand), register sources only.
    ImulRegReg {
        destination: u8,
        source: u8,
        bytes: u8,
    },
    ImulRegRegImm {
        destination: u8,
        source: u8,
        bytes: u8,
        immediate: u64,
    },
    Jcc {
        condition: u8,
        target: u64,
    },
    Jmp {
        target: u64,
    },
    /// PUSH r64 in 64-bit mode, PUSH r32 in 32-bit mode: `bytes` is the operand size.
    Push {
        source: u8,
        bytes: u8,
    },
    /// POP r64 in 64-bit mode, POP r32 in 32-bit mode.
    Pop {
        destination: u8,
        bytes: u8,
    },
    /// Near CALL rel32, pushing a return address of `bytes`.
    CallNear {
        target: u64,
        bytes: u8,
    },
    /// Near RET without an immediate, popping a return address of `bytes`.
    Ret {
        bytes: u8,
    },
    /// LEA r64, m with a 64-bit address (64-bit base or index register, or RIP).
    Lea {
        destination: u8,
        memory: MemoryOperand,
    },
}

// A decoded block holds one form per instruction beside the instruction itself: a new form must not make every
// instruction of every block larger.
const _: () = assert!(std::mem::size_of::<FastForm>() <= 24);

/// GPR index and width of a register usable by the fast forms (no AH..BH, which live in bits 8..15).
fn plain_gpr(register: Register) -> Option<(u8, u8)> {
    let r = register as u32;
    match r {
        1..=4 => Some(((r - 1) as u8, 1)),
        9..=20 => Some(((r - 5) as u8, 1)),
        21..=36 => Some(((r - 21) as u8, 2)),
        37..=52 => Some(((r - 37) as u8, 4)),
        53..=68 => Some(((r - 53) as u8, 8)),
        _ => None,
    }
}

fn alu_op(mnemonic: M) -> Option<AluOp> {
    Some(match mnemonic {
        M::Add => AluOp::Add,
        M::Or => AluOp::Or,
        M::Adc => AluOp::Adc,
        M::Sbb => AluOp::Sbb,
        M::And => AluOp::And,
        M::Sub => AluOp::Sub,
        M::Xor => AluOp::Xor,
        M::Cmp => AluOp::Cmp,
        M::Test => AluOp::Test,
        _ => return None,
    })
}

fn is_immediate(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

fn memory_operand(instruction: &Instruction) -> Option<MemoryOperand> {
    let register = |register: Register| match register {
        Register::None => Some(NO_REGISTER),
        _ => match plain_gpr(register) {
            Some((index, 8)) => Some(index),
            _ => None,
        },
    };
    let segment = instruction.memory_segment();
    if !matches!(segment, Register::DS | Register::SS | Register::ES | Register::CS) {
        return None;
    }
    let base = instruction.memory_base();
    if base == Register::EIP {
        return None;
    }
    Some(MemoryOperand {
        displacement: instruction.memory_displacement64(),
        base: if base == Register::RIP { NO_REGISTER } else { register(base)? },
        index: register(instruction.memory_index())?,
        scale_shift: instruction.memory_index_scale().trailing_zeros() as u8,
        stack: segment == Register::SS,
    })
}

/// Fast forms with one memory operand and one register operand of the same width, or a memory destination
/// and an immediate (ALU operations, MOV, INC and DEC).
fn classify_memory(instruction: &Instruction, mnemonic: M) -> FastForm {
    if instruction.has_lock_prefix() {
        return FastForm::General;
    }
    if instruction.op0_kind() == OpKind::Memory && (instruction.op_count() == 1 || is_immediate(instruction.op1_kind()))
    {
        return classify_memory_immediate(instruction, mnemonic).unwrap_or(FastForm::General);
    }
    if instruction.op_count() != 2 {
        return FastForm::General;
    }
    let (register_operand, load) = match (instruction.op0_kind(), instruction.op1_kind()) {
        (OpKind::Register, OpKind::Memory) => (instruction.op0_register(), true),
        (OpKind::Memory, OpKind::Register) => (instruction.op1_register(), false),
        _ => return FastForm::General,
    };
    let Some((register, bytes)) = plain_gpr(register_operand) else {
        return FastForm::General;
    };
    if instruction.memory_size().size() != bytes as usize {
        return FastForm::General;
    }
    let Some(memory) = memory_operand(instruction) else {
        return FastForm::General;
    };
    match (mnemonic, load) {
        (M::Mov, true) => FastForm::MovLoad { destination: register, bytes, memory },
        (M::Mov, false) => FastForm::MovStore { source: register, bytes, memory },
        (_, true) => alu_op(mnemonic).map_or(FastForm::General, |op| FastForm::AluLoad {
            op,
            destination: register,
            bytes,
            memory,
        }),
        (_, false) => {
            alu_op(mnemonic).map_or(FastForm::General, |op| FastForm::AluStore { op, source: register, bytes, memory })
        }
    }
}

/// `op m, imm`, `MOV m, imm`, `INC m` and `DEC m`.
fn classify_memory_immediate(instruction: &Instruction, mnemonic: M) -> Option<FastForm> {
    let bytes = u8::try_from(instruction.memory_size().size()).ok().filter(|b| matches!(b, 1 | 2 | 4 | 8))?;
    let memory = memory_operand(instruction)?;
    if instruction.op_count() == 1 {
        return match mnemonic {
            M::Inc | M::Dec => Some(FastForm::IncDecMem { bytes, memory, decrement: mnemonic == M::Dec }),
            _ => None,
        };
    }
    // The decoder gives the immediate already extended to the operand's width; every encoding of these
    // instructions carries at most 32 bits of it, sign-extended beyond.
    let width_mask = mask(u32::from(bytes));
    let extended = instruction.immediate(1) & width_mask;
    let immediate = extended as i32;
    if immediate as i64 as u64 & width_mask != extended {
        return None;
    }
    match mnemonic {
        M::Mov => Some(FastForm::MovMemImm { bytes, memory, immediate }),
        _ => alu_op(mnemonic).map(|op| FastForm::AluMemImm { op, bytes, memory, immediate }),
    }
}

/// The stack instructions of kernel entry paths and function calls, and LEA: most of what a system-call-heavy
/// guest runs besides the forms above.
fn classify_stack(instruction: &Instruction, mode: CodeMode) -> Option<FastForm> {
    let bytes = match mode {
        CodeMode::Bits64 => 8,
        CodeMode::Bits32 => 4,
        CodeMode::Bits16 => return None,
    };
    let register =
        || plain_gpr(instruction.op0_register()).filter(|&(_, width)| width == bytes).map(|(index, _)| index);
    Some(match (instruction.code(), bytes) {
        (Code::Push_r64, 8) | (Code::Push_r32, 4) => FastForm::Push { source: register()?, bytes },
        (Code::Pop_r64, 8) | (Code::Pop_r32, 4) => FastForm::Pop { destination: register()?, bytes },
        (Code::Call_rel32_64, 8) | (Code::Call_rel32_32, 4) => {
            FastForm::CallNear { target: instruction.near_branch_target(), bytes }
        }
        (Code::Retnq, 8) | (Code::Retnd, 4) => FastForm::Ret { bytes },
        (Code::Lea_r64_m, 8) if instruction.memory_base().size() == 8 || instruction.memory_index().size() == 8 => {
            FastForm::Lea { destination: register()?, memory: memory_operand(instruction)? }
        }
        _ => return None,
    })
}

/// Picks the fast form of an instruction decoded in `mode`, or `General`.
pub(crate) fn classify(instruction: &Instruction, mode: CodeMode) -> FastForm {
    let mnemonic = instruction.mnemonic();
    if let Some(form) = classify_stack(instruction, mode) {
        return form;
    }
    if mode == CodeMode::Bits64
        && (instruction.op0_kind() == OpKind::Memory || instruction.op1_kind() == OpKind::Memory)
    {
        return classify_memory(instruction, mnemonic);
    }
    if mode == CodeMode::Bits64 && instruction.op_count() == 1 {
        if let OpKind::NearBranch64 = instruction.op0_kind() {
            let target = instruction.near_branch_target();
            if instruction.flow_control() == FlowControl::ConditionalBranch
                && instruction.condition_code() != iced_x86::ConditionCode::None
                && !matches!(mnemonic, M::Loop | M::Loope | M::Loopne | M::Jrcxz | M::Jecxz)
            {
                return FastForm::Jcc { condition: (instruction.condition_code() as u32 - 1) as u8, target };
            }
            if mnemonic == M::Jmp {
                return FastForm::Jmp { target };
            }
        }
    }
    if instruction.op_count() == 0 || instruction.op0_kind() != OpKind::Register || instruction.has_lock_prefix() {
        return FastForm::General;
    }
    let Some((destination, bytes)) = plain_gpr(instruction.op0_register()) else {
        return FastForm::General;
    };
    match (mnemonic, instruction.op_count()) {
        (M::Imul, 2) if instruction.op1_kind() == OpKind::Register => match plain_gpr(instruction.op1_register()) {
            Some((source, source_bytes)) if source_bytes == bytes => {
                FastForm::ImulRegReg { destination, source, bytes }
            }
            _ => FastForm::General,
        },
        (M::Imul, 3) if instruction.op1_kind() == OpKind::Register => match plain_gpr(instruction.op1_register()) {
            Some((source, source_bytes)) if source_bytes == bytes => FastForm::ImulRegRegImm {
                destination,
                source,
                bytes,
                immediate: instruction.immediate(2) & mask(bytes as u32),
            },
            _ => FastForm::General,
        },
        (M::Inc | M::Dec, 1) => FastForm::IncDec { destination, bytes, decrement: mnemonic == M::Dec },
        (M::Mov, 2) if instruction.op1_kind() == OpKind::Register => match plain_gpr(instruction.op1_register()) {
            Some((source, source_bytes)) if source_bytes == bytes => FastForm::MovRegReg { destination, source, bytes },
            _ => FastForm::General,
        },
        (M::Mov, 2) if is_immediate(instruction.op1_kind()) => {
            FastForm::MovRegImm { destination, bytes, immediate: instruction.immediate(1) & mask(bytes as u32) }
        }
        (M::Shl | M::Sal | M::Shr | M::Sar, 2) if instruction.op1_kind() == OpKind::Immediate8 => {
            let count = instruction.immediate8() & if bytes == 8 { 63 } else { 31 };
            if count == 0 {
                return FastForm::General;
            }
            let op = match mnemonic {
                M::Shr => ShiftOp::Shr,
                M::Sar => ShiftOp::Sar,
                _ => ShiftOp::Shl,
            };
            FastForm::ShiftRegImm { op, destination, bytes, count }
        }
        (_, 2) => {
            let Some(op) = alu_op(mnemonic) else {
                return FastForm::General;
            };
            match instruction.op1_kind() {
                OpKind::Register => match plain_gpr(instruction.op1_register()) {
                    Some((source, source_bytes)) if source_bytes == bytes => {
                        FastForm::AluRegReg { op, destination, source, bytes }
                    }
                    _ => FastForm::General,
                },
                kind if is_immediate(kind) => FastForm::AluRegImm {
                    op,
                    destination,
                    bytes,
                    immediate: instruction.immediate(1) & mask(bytes as u32),
                },
                _ => FastForm::General,
            }
        }
        _ => FastForm::General,
    }
}

#[inline(always)]
fn alu(op: AluOp, a: u64, b: u64, flags: u64, bytes: u32) -> (u64, u64) {
    match op {
        AluOp::Add => alu::add(a, b, 0, bytes),
        AluOp::Adc => alu::add(a, b, flags & 1, bytes),
        AluOp::Sub | AluOp::Cmp => alu::sub(a, b, 0, bytes),
        AluOp::Sbb => alu::sub(a, b, flags & 1, bytes),
        AluOp::And | AluOp::Test => (a & b, alu::logic(a & b, bytes)),
        AluOp::Or => (a | b, alu::logic(a | b, bytes)),
        AluOp::Xor => (a ^ b, alu::logic(a ^ b, bytes)),
    }
}

/// INC or DEC: the result, and flags of which the caller keeps all but CF.
#[inline(always)]
fn inc_dec(value: u64, bytes: u8, decrement: bool) -> (u64, u64) {
    if decrement {
        alu::sub(value, 1, 0, bytes as u32)
    } else {
        alu::add(value, 1, 0, bytes as u32)
    }
}

impl<O: ExecutionObserver> Interp<'_, O> {
    #[inline(always)]
    fn write_sized(&mut self, index: u8, bytes: u8, value: u64) {
        let slot = &mut self.machine.cpu.gpr[index as usize];
        *slot = match bytes {
            1 => (*slot & !0xFF) | (value & 0xFF),
            2 => (*slot & !0xFFFF) | (value & 0xFFFF),
            4 => value & 0xFFFF_FFFF,
            _ => value,
        };
    }

    /// Displacement + base + (index << scale), wrapping: LEA's result, and the address a memory form accesses.
    #[inline(always)]
    fn fast_effective_address(&self, memory: &MemoryOperand) -> u64 {
        let gpr = &self.cpu.gpr;
        let mut address = memory.displacement;
        if memory.base != NO_REGISTER {
            address = address.wrapping_add(gpr[memory.base as usize]);
        }
        if memory.index != NO_REGISTER {
            address = address.wrapping_add(gpr[memory.index as usize] << memory.scale_shift);
        }
        address
    }

    #[inline(always)]
    fn fast_linear(&self, memory: &MemoryOperand, bytes: u8) -> Result<u64, Fault> {
        let address = self.fast_effective_address(memory);
        if !is_canonical(address) || !is_canonical(address.wrapping_add(bytes as u64 - 1)) {
            let vector = if memory.stack { crate::interrupts::SS } else { crate::interrupts::GP };
            return Err(Fault::Exception { vector, error_code: Some(0), address: None });
        }
        Ok(address)
    }

    /// `op` on the memory operand and the source `b` gives: the result written back unless the operation only
    /// compares. The source is taken once the memory operand is read: taken before it, it cost `virtlab run` of
    /// `syscall` 2.3 M more instructions in 704 M (callgrind).
    #[inline(always)]
    fn alu_to_memory(
        &mut self,
        op: AluOp,
        memory: &MemoryOperand,
        bytes: u8,
        b: impl FnOnce(&Self) -> u64,
    ) -> Result<(), Fault> {
        let linear = self.fast_linear(memory, bytes)?;
        let user = self.cpu.cpl == 3;
        let a = self.read_linear(linear, bytes as u32, user)?;
        let b = b(self) & mask(bytes as u32);
        let (result, flags) = alu(op, a, b, self.cpu.rflags, bytes as u32);
        if !matches!(op, AluOp::Cmp | AluOp::Test) {
            self.write_linear(linear, bytes as u32, result, user)?;
        }
        self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
        Ok(())
    }

    /// The forms with a memory destination and an immediate, out of line: inlined into the run loop with the
    /// others, they cost the loop's other forms about 1 M instructions in 707 M on `syscall` (callgrind).
    #[inline(never)]
    fn execute_memory_immediate(&mut self, form: FastForm) -> Result<(), Fault> {
        match form {
            FastForm::AluMemImm { op, bytes, memory, immediate } => {
                self.alu_to_memory(op, &memory, bytes, |_| immediate as i64 as u64)?;
            }
            FastForm::MovMemImm { bytes, memory, immediate } => {
                let linear = self.fast_linear(&memory, bytes)?;
                let user = self.cpu.cpl == 3;
                self.write_linear(linear, bytes as u32, immediate as i64 as u64 & mask(bytes as u32), user)?;
            }
            FastForm::IncDecMem { bytes, memory, decrement } => {
                let linear = self.fast_linear(&memory, bytes)?;
                let user = self.cpu.cpl == 3;
                let value = self.read_linear(linear, bytes as u32, user)?;
                let (result, flags) = inc_dec(value, bytes, decrement);
                self.write_linear(linear, bytes as u32, result, user)?;
                self.cpu.rflags = (self.cpu.rflags & !alu::ALL_BUT_CF) | (flags & alu::ALL_BUT_CF);
            }
            _ => unreachable!("only the memory-immediate forms come here"),
        }
        Ok(())
    }

    /// Truncating signed multiply with IMUL's flags: CF = OF = the product does not fit.
    #[inline(always)]
    fn signed_multiply(&mut self, destination: u8, bytes: u8, a: u64, b: u64) {
        let width = bytes as u32;
        let product = (alu::sign_extend(a & mask(width), width) as i64 as i128)
            * (alu::sign_extend(b & mask(width), width) as i64 as i128);
        let result = (product as u64) & mask(width);
        let overflow = alu::sign_extend(result, width) as i64 as i128 != product;
        self.write_sized(destination, bytes, result);
        self.cpu.rflags = (self.cpu.rflags & !STATUS) | alu::mul_flags(result, overflow, width);
    }

    /// Executes a non-`General` fast form; RIP already points past the instruction.
    #[inline(always)]
    pub(crate) fn execute_fast(&mut self, form: FastForm) -> Result<(), Fault> {
        match form {
            // The stack forms do what the general path does for the same instruction, minus its operand decoding.
            FastForm::Push { source, bytes } => {
                let value = self.cpu.gpr[source as usize] & mask(bytes as u32);
                self.push(value, bytes as u32)?;
            }
            FastForm::Pop { destination, bytes } => {
                let value = self.peek_stack(0, bytes as u32)?;
                self.adjust_rsp(bytes as u64);
                self.cpu.gpr[destination as usize] = value;
            }
            FastForm::CallNear { target, bytes } => {
                let return_address = self.cpu.rip;
                self.push(return_address, bytes as u32)?;
                self.jump_near(target)?;
            }
            FastForm::Ret { bytes } => {
                let target = self.peek_stack(0, bytes as u32)?;
                self.jump_near(target)?;
                self.adjust_rsp(bytes as u64);
            }
            FastForm::Lea { destination, memory } => {
                self.cpu.gpr[destination as usize] = self.fast_effective_address(&memory);
            }
            FastForm::MovLoad { destination, bytes, memory } => {
                let linear = self.fast_linear(&memory, bytes)?;
                let user = self.cpu.cpl == 3;
                let value = self.read_linear(linear, bytes as u32, user)?;
                self.write_sized(destination, bytes, value);
            }
            FastForm::MovStore { source, bytes, memory } => {
                let linear = self.fast_linear(&memory, bytes)?;
                let user = self.cpu.cpl == 3;
                let value = self.cpu.gpr[source as usize] & mask(bytes as u32);
                self.write_linear(linear, bytes as u32, value, user)?;
            }
            FastForm::AluLoad { op, destination, bytes, memory } => {
                let linear = self.fast_linear(&memory, bytes)?;
                let user = self.cpu.cpl == 3;
                let b = self.read_linear(linear, bytes as u32, user)?;
                let a = self.cpu.gpr[destination as usize] & mask(bytes as u32);
                let (result, flags) = alu(op, a, b, self.cpu.rflags, bytes as u32);
                if !matches!(op, AluOp::Cmp | AluOp::Test) {
                    self.write_sized(destination, bytes, result);
                }
                self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
            }
            FastForm::AluStore { op, source, bytes, memory } => {
                self.alu_to_memory(op, &memory, bytes, |interp| interp.cpu.gpr[source as usize])?;
            }
            FastForm::AluMemImm { .. } | FastForm::MovMemImm { .. } | FastForm::IncDecMem { .. } => {
                self.execute_memory_immediate(form)?
            }
            FastForm::AluRegReg { op, destination, source, bytes } => {
                let m = mask(bytes as u32);
                let a = self.cpu.gpr[destination as usize] & m;
                let b = self.cpu.gpr[source as usize] & m;
                let (result, flags) = alu(op, a, b, self.cpu.rflags, bytes as u32);
                if !matches!(op, AluOp::Cmp | AluOp::Test) {
                    self.write_sized(destination, bytes, result);
                }
                self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
            }
            FastForm::AluRegImm { op, destination, bytes, immediate } => {
                let a = self.cpu.gpr[destination as usize] & mask(bytes as u32);
                let (result, flags) = alu(op, a, immediate, self.cpu.rflags, bytes as u32);
                if !matches!(op, AluOp::Cmp | AluOp::Test) {
                    self.write_sized(destination, bytes, result);
                }
                self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
            }
            FastForm::MovRegReg { destination, source, bytes } => {
                let value = self.cpu.gpr[source as usize];
                self.write_sized(destination, bytes, value);
            }
            FastForm::MovRegImm { destination, bytes, immediate } => self.write_sized(destination, bytes, immediate),
            FastForm::ShiftRegImm { op, destination, bytes, count } => {
                let value = self.cpu.gpr[destination as usize] & mask(bytes as u32);
                let shifted = match op {
                    ShiftOp::Shl => alu::shl(value, count as u32, bytes as u32),
                    ShiftOp::Shr => alu::shr(value, count as u32, bytes as u32),
                    ShiftOp::Sar => alu::sar(value, count as u32, bytes as u32),
                };
                if let Some((result, flags)) = shifted {
                    self.write_sized(destination, bytes, result);
                    self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
                }
            }
            FastForm::IncDec { destination, bytes, decrement } => {
                let value = self.cpu.gpr[destination as usize] & mask(bytes as u32);
                let (result, flags) = inc_dec(value, bytes, decrement);
                self.write_sized(destination, bytes, result);
                self.cpu.rflags = (self.cpu.rflags & !alu::ALL_BUT_CF) | (flags & alu::ALL_BUT_CF);
            }
            FastForm::ImulRegReg { destination, source, bytes } => {
                let (a, b) = (self.cpu.gpr[destination as usize], self.cpu.gpr[source as usize]);
                self.signed_multiply(destination, bytes, a, b);
            }
            FastForm::ImulRegRegImm { destination, source, bytes, immediate } => {
                let a = self.cpu.gpr[source as usize];
                self.signed_multiply(destination, bytes, a, immediate);
            }
            FastForm::Jcc { condition, target } => {
                if alu::condition(condition as u32, self.cpu.rflags) {
                    self.jump_near(target)?;
                }
            }
            FastForm::Jmp { target } => self.jump_near(target)?,
            FastForm::General => unreachable!("general instructions go through execute"),
        }
        Ok(())
    }
}
