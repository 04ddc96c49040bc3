//! Instruction dispatch and the general-purpose instructions: operands, ALU, data movement, stack,
//! branches, strings. System instructions live in `system.rs`, event delivery in `interrupts.rs`.

use iced_x86::{Code, ConditionCode, Instruction, MemorySize, Mnemonic as M, OpKind, Register};

use crate::alu::{self, mask, sign_extend};
use crate::cpu::rflags::{self, AF, CF, DF, OF, PF, SF, STATUS, ZF};
use crate::cpu::{CodeMode, SegmentRegister, RAX, RBP, RBX, RCX, RDI, RDX, RSI, RSP};
use crate::error::MachineError;
use crate::interp::{Fault, Interp};
use crate::observer::{ExecutionObserver, SideEvent};

pub(crate) fn ud() -> Fault {
    Fault::Exception { vector: crate::interrupts::UD, error_code: None, address: None }
}

fn de() -> Fault {
    Fault::Exception { vector: crate::interrupts::DE, error_code: None, address: None }
}

/// Operand width in bytes of a general-purpose register.
#[inline(always)]
pub(crate) fn register_bytes(register: Register) -> u32 {
    match register as u32 {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 => 4,
        _ => 8,
    }
}

/// Condition number (the low opcode nibble of Jcc) of an instruction's condition code.
#[inline(always)]
fn condition_number(code: ConditionCode) -> u32 {
    code as u32 - 1
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StringOp {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
    Ins,
    Outs,
}

impl<O: ExecutionObserver> Interp<'_, O> {
    #[inline(always)]
    pub(crate) fn read_register(&self, register: Register) -> u64 {
        let r = register as usize;
        match r {
            1..=4 => self.cpu.gpr[r - 1] & 0xFF,
            5..=8 => (self.cpu.gpr[r - 5] >> 8) & 0xFF,
            9..=20 => self.cpu.gpr[r - 5] & 0xFF,
            21..=36 => self.cpu.gpr[r - 21] & 0xFFFF,
            37..=52 => self.cpu.gpr[r - 37] & 0xFFFF_FFFF,
            53..=68 => self.cpu.gpr[r - 53],
            _ => unreachable!("not a general-purpose register: {register:?}"),
        }
    }

    #[inline(always)]
    pub(crate) fn write_register(&mut self, register: Register, value: u64) {
        let r = register as usize;
        match r {
            1..=4 => self.cpu.gpr[r - 1] = (self.cpu.gpr[r - 1] & !0xFF) | (value & 0xFF),
            5..=8 => self.cpu.gpr[r - 5] = (self.cpu.gpr[r - 5] & !0xFF00) | ((value & 0xFF) << 8),
            9..=20 => self.cpu.gpr[r - 5] = (self.cpu.gpr[r - 5] & !0xFF) | (value & 0xFF),
            21..=36 => self.cpu.gpr[r - 21] = (self.cpu.gpr[r - 21] & !0xFFFF) | (value & 0xFFFF),
            37..=52 => self.cpu.gpr[r - 37] = value & 0xFFFF_FFFF,
            53..=68 => self.cpu.gpr[r - 53] = value,
            _ => unreachable!("not a general-purpose register: {register:?}"),
        }
    }

    /// Writes a full-width GPR by index with the operand size's merge/zero-extend rule.
    #[inline(always)]
    fn write_gpr_sized(&mut self, index: usize, bytes: u32, value: u64) {
        self.cpu.gpr[index] = match bytes {
            1 => (self.cpu.gpr[index] & !0xFF) | (value & 0xFF),
            2 => (self.cpu.gpr[index] & !0xFFFF) | (value & 0xFFFF),
            4 => value & 0xFFFF_FFFF,
            _ => value,
        };
    }

    /// Offset (effective address) of the memory operand, wrapped to the address size.
    #[inline(always)]
    pub(crate) fn effective_address(&self, instruction: &Instruction) -> u64 {
        let mut address = instruction.memory_displacement64();
        let base = instruction.memory_base();
        let index = instruction.memory_index();
        let mut width = 0u32;
        if base != Register::None {
            if base == Register::RIP {
                return address;
            }
            if base == Register::EIP {
                return address & 0xFFFF_FFFF;
            }
            address = address.wrapping_add(self.read_register(base));
            width = register_bytes(base);
        }
        if index != Register::None {
            address =
                address.wrapping_add(self.read_register(index) << instruction.memory_index_scale().trailing_zeros());
            width = register_bytes(index);
        }
        match (self.mode, width) {
            (CodeMode::Bits64, 4) => address & 0xFFFF_FFFF,
            (CodeMode::Bits64, _) => address,
            (_, 2) => address & 0xFFFF,
            (CodeMode::Bits16, 0) => address & 0xFFFF,
            _ => address & 0xFFFF_FFFF,
        }
    }

    #[inline(always)]
    fn memory_segment(instruction: &Instruction) -> SegmentRegister {
        segment_of(instruction.memory_segment())
    }

    #[inline(always)]
    pub(crate) fn user_access(&self) -> bool {
        self.cpu.cpl == 3
    }

    #[inline(always)]
    pub(crate) fn read_memory(&mut self, segment: SegmentRegister, offset: u64, bytes: u32) -> Result<u64, Fault> {
        let linear = self.linear_address(segment, offset, bytes, false)?;
        let user = self.user_access();
        self.read_linear(linear, bytes, user)
    }

    #[inline(always)]
    pub(crate) fn write_memory(
        &mut self,
        segment: SegmentRegister,
        offset: u64,
        bytes: u32,
        value: u64,
    ) -> Result<(), Fault> {
        let linear = self.linear_address(segment, offset, bytes, true)?;
        let user = self.user_access();
        self.write_linear(linear, bytes, value & mask(bytes), user)
    }

    #[inline(always)]
    fn operand_bytes(&self, instruction: &Instruction, operand: u32) -> u32 {
        match instruction.op_kind(operand) {
            OpKind::Register => register_bytes(instruction.op_register(operand)),
            OpKind::Memory => instruction.memory_size().size() as u32,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    #[inline(always)]
    pub(crate) fn read_operand(&mut self, instruction: &Instruction, operand: u32, bytes: u32) -> Result<u64, Fault> {
        match instruction.op_kind(operand) {
            OpKind::Register => Ok(self.read_register(instruction.op_register(operand))),
            OpKind::Memory => {
                let offset = self.effective_address(instruction);
                self.read_memory(Self::memory_segment(instruction), offset, bytes)
            }
            _ => Ok(instruction.immediate(operand) & mask(bytes)),
        }
    }

    #[inline(always)]
    pub(crate) fn write_operand(
        &mut self,
        instruction: &Instruction,
        operand: u32,
        bytes: u32,
        value: u64,
    ) -> Result<(), Fault> {
        match instruction.op_kind(operand) {
            OpKind::Register => {
                self.write_register(instruction.op_register(operand), value);
                Ok(())
            }
            _ => {
                let offset = self.effective_address(instruction);
                self.write_memory(Self::memory_segment(instruction), offset, bytes, value)
            }
        }
    }

    #[inline(always)]
    fn set_status(&mut self, flags: u64, affected: u64) {
        self.cpu.rflags = (self.cpu.rflags & !affected) | (flags & affected);
    }

    // ---- stack -------------------------------------------------------------------------------

    /// Stack pointer width: 64 bits in 64-bit mode, else SS.B (the cached mode avoids re-deriving
    /// it from CS and EFER on every push).
    #[inline(always)]
    pub(crate) fn stack_mask(&self) -> u64 {
        if self.mode == CodeMode::Bits64 {
            u64::MAX
        } else if self.cpu.segments[SegmentRegister::Ss as usize].is_default_big() {
            0xFFFF_FFFF
        } else {
            0xFFFF
        }
    }

    #[inline(always)]
    pub(crate) fn push(&mut self, value: u64, bytes: u32) -> Result<(), Fault> {
        if self.mode == CodeMode::Bits64 {
            let new_rsp = self.cpu.gpr[RSP].wrapping_sub(bytes as u64);
            if !crate::memory::is_canonical(new_rsp)
                || !crate::memory::is_canonical(new_rsp.wrapping_add(bytes as u64 - 1))
            {
                return Err(Fault::Exception { vector: crate::interrupts::SS, error_code: Some(0), address: None });
            }
            let user = self.user_access();
            self.write_linear(new_rsp, bytes, value & mask(bytes), user)?;
            self.cpu.gpr[RSP] = new_rsp;
            return Ok(());
        }
        let stack_mask = self.stack_mask();
        let rsp = self.cpu.gpr[RSP];
        let new_rsp = rsp.wrapping_sub(bytes as u64) & stack_mask;
        self.write_memory(SegmentRegister::Ss, new_rsp, bytes, value)?;
        self.cpu.gpr[RSP] = (rsp & !stack_mask) | new_rsp;
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn pop(&mut self, bytes: u32) -> Result<u64, Fault> {
        let stack_mask = self.stack_mask();
        let rsp = self.cpu.gpr[RSP];
        let value = self.read_memory(SegmentRegister::Ss, rsp & stack_mask, bytes)?;
        self.cpu.gpr[RSP] = (rsp & !stack_mask) | (rsp.wrapping_add(bytes as u64) & stack_mask);
        Ok(value)
    }

    /// Reads the stack `depth` bytes above RSP without popping.
    #[inline(always)]
    pub(crate) fn peek_stack(&mut self, depth: u64, bytes: u32) -> Result<u64, Fault> {
        let stack_mask = self.stack_mask();
        let address = self.cpu.gpr[RSP].wrapping_add(depth) & stack_mask;
        self.read_memory(SegmentRegister::Ss, address, bytes)
    }

    /// Sets RIP for a near transfer; the target is already wrapped to the operand size.
    #[inline(always)]
    pub(crate) fn jump_near(&mut self, target: u64) -> Result<(), Fault> {
        if self.mode == CodeMode::Bits64 {
            if !crate::memory::is_canonical(target) {
                return Err(crate::memory::gp0());
            }
        } else if target > self.cpu.segments[SegmentRegister::Cs as usize].limit as u64 {
            return Err(crate::memory::gp0());
        }
        self.cpu.rip = target;
        Ok(())
    }

    pub(crate) fn unimplemented(&self, instruction: &Instruction) -> Fault {
        Fault::Stop(Box::new(MachineError::Unimplemented {
            mnemonic: format!("{:?}", instruction.mnemonic()).to_lowercase(),
            address: self.code_linear(instruction.ip()),
            mode: self.mode,
            cpl: self.cpu.cpl,
        }))
    }

    // ---- dispatch ----------------------------------------------------------------------------

    /// Executes one instruction; the caller has already pointed RIP past it.
    #[inline(always)]
    pub(crate) fn execute(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        match instruction.mnemonic() {
            M::Mov => self.mov(instruction),
            M::Add => self.binary(instruction, |a, b, _, n| alu::add(a, b, 0, n), true),
            M::Or => self.binary(instruction, |a, b, _, n| ((a | b), alu::logic(a | b, n)), true),
            M::Adc => self.binary(instruction, |a, b, f, n| alu::add(a, b, f & CF, n), true),
            M::Sbb => self.binary(instruction, |a, b, f, n| alu::sub(a, b, f & CF, n), true),
            M::And => self.binary(instruction, |a, b, _, n| ((a & b), alu::logic(a & b, n)), true),
            M::Sub => self.binary(instruction, |a, b, _, n| alu::sub(a, b, 0, n), true),
            M::Xor => self.binary(instruction, |a, b, _, n| ((a ^ b), alu::logic(a ^ b, n)), true),
            M::Cmp => self.binary(instruction, |a, b, _, n| alu::sub(a, b, 0, n), false),
            M::Test => self.binary(instruction, |a, b, _, n| ((a & b), alu::logic(a & b, n)), false),
            M::Inc | M::Dec => {
                let bytes = self.operand_bytes(instruction, 0);
                let value = self.read_operand(instruction, 0, bytes)?;
                let (result, flags) = if instruction.mnemonic() == M::Inc {
                    alu::add(value, 1, 0, bytes)
                } else {
                    alu::sub(value, 1, 0, bytes)
                };
                self.write_operand(instruction, 0, bytes, result)?;
                self.set_status(flags, alu::ALL_BUT_CF);
                Ok(())
            }
            M::Neg => {
                let bytes = self.operand_bytes(instruction, 0);
                let value = self.read_operand(instruction, 0, bytes)?;
                let (result, flags) = alu::sub(0, value, 0, bytes);
                self.write_operand(instruction, 0, bytes, result)?;
                self.set_status(flags, STATUS);
                Ok(())
            }
            M::Not => {
                let bytes = self.operand_bytes(instruction, 0);
                let value = self.read_operand(instruction, 0, bytes)?;
                self.write_operand(instruction, 0, bytes, !value & mask(bytes))
            }
            M::Lea => {
                let offset = self.effective_address(instruction);
                let bytes = register_bytes(instruction.op0_register());
                self.write_register(instruction.op0_register(), offset & mask(bytes));
                Ok(())
            }
            M::Movzx => {
                let bytes = self.operand_bytes(instruction, 1);
                let value = self.read_operand(instruction, 1, bytes)?;
                self.write_register(instruction.op0_register(), value);
                Ok(())
            }
            M::Movsx | M::Movsxd => {
                let source_bytes = self.operand_bytes(instruction, 1);
                let value = self.read_operand(instruction, 1, source_bytes)?;
                let dest_bytes = register_bytes(instruction.op0_register());
                self.write_register(instruction.op0_register(), sign_extend(value, source_bytes) & mask(dest_bytes));
                Ok(())
            }
            M::Xchg => {
                let bytes = self.operand_bytes(instruction, 0);
                let first = self.read_operand(instruction, 0, bytes)?;
                let second = self.read_operand(instruction, 1, bytes)?;
                // Memory (if any) first, so a fault leaves the register unchanged.
                if instruction.op0_kind() == OpKind::Memory {
                    self.write_operand(instruction, 0, bytes, second)?;
                    self.write_operand(instruction, 1, bytes, first)
                } else {
                    self.write_operand(instruction, 1, bytes, first)?;
                    self.write_operand(instruction, 0, bytes, second)
                }
            }
            M::Xadd => {
                let bytes = self.operand_bytes(instruction, 0);
                let dest = self.read_operand(instruction, 0, bytes)?;
                let source = self.read_operand(instruction, 1, bytes)?;
                let (sum, flags) = alu::add(dest, source, 0, bytes);
                self.write_operand(instruction, 0, bytes, sum)?;
                self.write_register(instruction.op1_register(), dest);
                self.set_status(flags, STATUS);
                Ok(())
            }
            M::Cmpxchg => {
                let bytes = self.operand_bytes(instruction, 0);
                let dest = self.read_operand(instruction, 0, bytes)?;
                let accumulator = self.cpu.gpr[RAX] & mask(bytes);
                let (_, flags) = alu::sub(accumulator, dest, 0, bytes);
                if flags & ZF != 0 {
                    let source = self.read_operand(instruction, 1, bytes)?;
                    self.write_operand(instruction, 0, bytes, source)?;
                } else {
                    // The destination is written back unchanged, as the processor does.
                    self.write_operand(instruction, 0, bytes, dest)?;
                    self.write_gpr_sized(RAX, bytes, dest);
                }
                self.set_status(flags, STATUS);
                Ok(())
            }
            M::Cmpxchg8b => {
                let offset = self.effective_address(instruction);
                let segment = Self::memory_segment(instruction);
                let current = self.read_memory(segment, offset, 8)?;
                let expected = (self.cpu.gpr[RAX] & 0xFFFF_FFFF) | (self.cpu.gpr[RDX] << 32);
                if current == expected {
                    let replacement = (self.cpu.gpr[crate::cpu::RBX] & 0xFFFF_FFFF) | (self.cpu.gpr[RCX] << 32);
                    self.write_memory(segment, offset, 8, replacement)?;
                    self.cpu.rflags |= ZF;
                } else {
                    self.write_memory(segment, offset, 8, current)?;
                    self.cpu.gpr[RAX] = current & 0xFFFF_FFFF;
                    self.cpu.gpr[RDX] = current >> 32;
                    self.cpu.rflags &= !ZF;
                }
                Ok(())
            }
            M::Bswap => {
                let register = instruction.op0_register();
                let value = self.read_register(register);
                let swapped = match register_bytes(register) {
                    4 => (value as u32).swap_bytes() as u64,
                    8 => value.swap_bytes(),
                    // BSWAP of a 16-bit register is undefined; it reads as zero on current CPUs.
                    _ => 0,
                };
                self.write_register(register, swapped);
                Ok(())
            }
            M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => self.shift(instruction),
            M::Shld | M::Shrd => {
                let bytes = self.operand_bytes(instruction, 0);
                let dest = self.read_operand(instruction, 0, bytes)?;
                let source = self.read_register(instruction.op1_register());
                let count_mask = if bytes == 8 { 63 } else { 31 };
                let count = (self.read_operand(instruction, 2, 1)? & count_mask) as u32;
                let outcome = if instruction.mnemonic() == M::Shld {
                    alu::shld(dest, source, count, bytes)
                } else {
                    alu::shrd(dest, source, count, bytes)
                };
                if let Some((result, flags)) = outcome {
                    self.write_operand(instruction, 0, bytes, result)?;
                    self.set_status(flags, STATUS);
                }
                Ok(())
            }
            M::Mul | M::Imul | M::Div | M::Idiv => self.multiply_divide(instruction),
            M::Bt | M::Bts | M::Btr | M::Btc => self.bit_test(instruction),
            M::Bsf | M::Bsr => {
                let bytes = self.operand_bytes(instruction, 0);
                let source = self.read_operand(instruction, 1, bytes)?;
                if source == 0 {
                    self.cpu.rflags |= ZF;
                } else {
                    let index = if instruction.mnemonic() == M::Bsf {
                        source.trailing_zeros()
                    } else {
                        63 - source.leading_zeros()
                    };
                    self.write_register(instruction.op0_register(), index as u64);
                    self.cpu.rflags &= !ZF;
                }
                Ok(())
            }
            M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg => {
                let bytes = self.operand_bytes(instruction, 0);
                // The source is read (and may fault) whether or not the condition holds.
                let source = self.read_operand(instruction, 1, bytes)?;
                let register = instruction.op0_register();
                if alu::condition(condition_number(instruction.condition_code()), self.cpu.rflags) {
                    self.write_register(register, source);
                } else if bytes == 4 {
                    // A 32-bit CMOV zero-extends its destination even when the condition fails.
                    let value = self.read_register(register);
                    self.write_register(register, value);
                }
                Ok(())
            }
            M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg => {
                let value = alu::condition(condition_number(instruction.condition_code()), self.cpu.rflags) as u64;
                self.write_operand(instruction, 0, 1, value)
            }
            M::Jo
            | M::Jno
            | M::Jb
            | M::Jae
            | M::Je
            | M::Jne
            | M::Jbe
            | M::Ja
            | M::Js
            | M::Jns
            | M::Jp
            | M::Jnp
            | M::Jl
            | M::Jge
            | M::Jle
            | M::Jg => {
                if alu::condition(condition_number(instruction.condition_code()), self.cpu.rflags) {
                    self.jump_near(instruction.near_branch_target())?;
                }
                Ok(())
            }
            M::Jmp => match instruction.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    self.jump_near(instruction.near_branch_target())
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    self.far_jump(instruction.far_branch_selector(), instruction.far_branch32() as u64)
                }
                _ if is_far_pointer(instruction.memory_size()) => {
                    let (selector, offset) = self.read_far_pointer(instruction)?;
                    self.far_jump(selector, offset)
                }
                _ => {
                    let bytes = self.operand_bytes(instruction, 0);
                    let target = self.read_operand(instruction, 0, bytes)?;
                    self.jump_near(target)
                }
            },
            M::Call => match instruction.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    let bytes = instruction.stack_pointer_increment().unsigned_abs();
                    let return_address = self.cpu.rip;
                    let target = instruction.near_branch_target();
                    self.push(return_address, bytes)?;
                    self.jump_near(target)
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let bytes = instruction.stack_pointer_increment().unsigned_abs() / 2;
                    self.far_call(instruction.far_branch_selector(), instruction.far_branch32() as u64, bytes)
                }
                _ if is_far_pointer(instruction.memory_size()) => {
                    let (selector, offset) = self.read_far_pointer(instruction)?;
                    let bytes = instruction.stack_pointer_increment().unsigned_abs() / 2;
                    self.far_call(selector, offset, bytes)
                }
                _ => {
                    let bytes = self.operand_bytes(instruction, 0);
                    let target = self.read_operand(instruction, 0, bytes)?;
                    let return_address = self.cpu.rip;
                    let old_rsp = self.cpu.gpr[RSP];
                    self.push(return_address, bytes)?;
                    self.jump_near(target).inspect_err(|_| self.cpu.gpr[RSP] = old_rsp)
                }
            },
            M::Ret => {
                let bytes = match instruction.code() {
                    Code::Retnw | Code::Retnw_imm16 => 2,
                    Code::Retnd | Code::Retnd_imm16 => 4,
                    _ => 8,
                };
                let target = self.peek_stack(0, bytes)?;
                self.jump_near(target)?;
                let release =
                    bytes as u64 + if instruction.op_count() == 1 { instruction.immediate16() as u64 } else { 0 };
                self.adjust_rsp(release);
                Ok(())
            }
            M::Retf => {
                let bytes = match instruction.code() {
                    Code::Retfw | Code::Retfw_imm16 => 2,
                    Code::Retfd | Code::Retfd_imm16 => 4,
                    _ => 8,
                };
                let release = if instruction.op_count() == 1 { instruction.immediate16() as u64 } else { 0 };
                self.far_return(bytes, release)
            }
            M::Loop | M::Loope | M::Loopne => {
                let counter_bytes = loop_counter_bytes(instruction.code());
                let count = self.cpu.gpr[RCX].wrapping_sub(1) & mask(counter_bytes);
                self.write_gpr_sized(RCX, counter_bytes, count);
                let zf = self.cpu.rflags & ZF != 0;
                let taken = count != 0
                    && match instruction.mnemonic() {
                        M::Loope => zf,
                        M::Loopne => !zf,
                        _ => true,
                    };
                if taken {
                    self.jump_near(instruction.near_branch_target())?;
                }
                Ok(())
            }
            M::Jcxz | M::Jecxz | M::Jrcxz => {
                let counter_bytes = match instruction.mnemonic() {
                    M::Jcxz => 2,
                    M::Jecxz => 4,
                    _ => 8,
                };
                if self.cpu.gpr[RCX] & mask(counter_bytes) == 0 {
                    self.jump_near(instruction.near_branch_target())?;
                }
                Ok(())
            }
            M::Push => {
                let bytes = instruction.stack_pointer_increment().unsigned_abs();
                let value = match instruction.op0_kind() {
                    OpKind::Register if instruction.op0_register().is_segment_register() => {
                        self.cpu.segments[segment_of(instruction.op0_register()) as usize].selector as u64
                    }
                    OpKind::Register | OpKind::Memory => self.read_operand(instruction, 0, bytes)?,
                    _ => instruction.immediate(0) & mask(bytes),
                };
                self.push(value, bytes)
            }
            M::Pop => {
                let bytes = instruction.stack_pointer_increment().unsigned_abs();
                let value = self.peek_stack(0, bytes)?;
                if instruction.op0_kind() == OpKind::Register && instruction.op0_register().is_segment_register() {
                    let segment = segment_of(instruction.op0_register());
                    self.load_data_segment(segment, value as u16)?;
                    self.adjust_rsp(bytes as u64);
                    if segment == SegmentRegister::Ss {
                        self.cpu.interrupt_shadow = true;
                    }
                    return Ok(());
                }
                // POP computes a memory destination with the already incremented RSP.
                let old_rsp = self.cpu.gpr[RSP];
                self.adjust_rsp(bytes as u64);
                self.write_operand(instruction, 0, bytes, value).inspect_err(|_| self.cpu.gpr[RSP] = old_rsp)
            }
            M::Pushf | M::Pushfd | M::Pushfq => {
                let bytes = instruction.stack_pointer_increment().unsigned_abs();
                let flags = self.cpu.rflags & !(rflags::VM | rflags::RF);
                self.push(flags, bytes)
            }
            M::Popf | M::Popfd | M::Popfq => {
                let bytes = instruction.stack_pointer_increment().unsigned_abs();
                let value = self.pop(bytes)?;
                self.write_rflags_checked(value, bytes);
                Ok(())
            }
            M::Pusha | M::Pushad => self.push_all(if instruction.code() == Code::Pushad { 4 } else { 2 }),
            M::Popa | M::Popad => self.pop_all(if instruction.code() == Code::Popad { 4 } else { 2 }),
            M::Enter => self.enter(instruction),
            M::Leave => {
                let frame_bytes = match instruction.code() {
                    Code::Leavew => 2,
                    Code::Leaved => 4,
                    _ => 8,
                };
                let stack_mask = self.stack_mask();
                let rbp = self.cpu.gpr[crate::cpu::RBP];
                let value = self.read_memory(SegmentRegister::Ss, rbp & stack_mask, frame_bytes)?;
                self.cpu.gpr[RSP] =
                    (self.cpu.gpr[RSP] & !stack_mask) | (rbp.wrapping_add(frame_bytes as u64) & stack_mask);
                self.write_gpr_sized(crate::cpu::RBP, frame_bytes, value);
                Ok(())
            }
            M::Cbw => {
                let value = sign_extend(self.cpu.gpr[RAX] & 0xFF, 1);
                self.write_gpr_sized(RAX, 2, value);
                Ok(())
            }
            M::Cwde => {
                let value = sign_extend(self.cpu.gpr[RAX] & 0xFFFF, 2);
                self.write_gpr_sized(RAX, 4, value);
                Ok(())
            }
            M::Cdqe => {
                self.cpu.gpr[RAX] = sign_extend(self.cpu.gpr[RAX] & 0xFFFF_FFFF, 4);
                Ok(())
            }
            M::Cwd | M::Cdq | M::Cqo => {
                let bytes = match instruction.mnemonic() {
                    M::Cwd => 2,
                    M::Cdq => 4,
                    _ => 8,
                };
                let negative = self.cpu.gpr[RAX] & alu::sign_bit(bytes) != 0;
                self.write_gpr_sized(RDX, bytes, if negative { u64::MAX } else { 0 });
                Ok(())
            }
            M::Lahf => {
                let ah = (self.cpu.rflags & (SF | ZF | AF | PF | CF)) | rflags::RESERVED1;
                self.write_register(Register::AH, ah);
                Ok(())
            }
            M::Sahf => {
                let ah = self.read_register(Register::AH);
                self.set_status(ah, SF | ZF | AF | PF | CF);
                Ok(())
            }
            M::Clc => {
                self.cpu.rflags &= !CF;
                Ok(())
            }
            M::Stc => {
                self.cpu.rflags |= CF;
                Ok(())
            }
            M::Cmc => {
                self.cpu.rflags ^= CF;
                Ok(())
            }
            M::Cld => {
                self.cpu.rflags &= !DF;
                Ok(())
            }
            M::Std => {
                self.cpu.rflags |= DF;
                Ok(())
            }
            M::Nop
            | M::Pause
            | M::Lfence
            | M::Sfence
            | M::Mfence
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2 => Ok(()),
            M::Ud2 | M::Ud0 | M::Ud1 => Err(ud()),
            M::Movsb | M::Movsw | M::Movsq => self.string(instruction, StringOp::Movs),
            M::Movsd if instruction.code() == Code::Movsd_m32_m32 => self.string(instruction, StringOp::Movs),
            M::Stosb | M::Stosw | M::Stosd | M::Stosq => self.string(instruction, StringOp::Stos),
            M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => self.string(instruction, StringOp::Lods),
            M::Cmpsb | M::Cmpsw | M::Cmpsq => self.string(instruction, StringOp::Cmps),
            M::Cmpsd if instruction.code() == Code::Cmpsd_m32_m32 => self.string(instruction, StringOp::Cmps),
            M::Scasb | M::Scasw | M::Scasd | M::Scasq => self.string(instruction, StringOp::Scas),
            M::Insb | M::Insw | M::Insd => self.string(instruction, StringOp::Ins),
            M::Outsb | M::Outsw | M::Outsd => self.string(instruction, StringOp::Outs),
            _ => self.execute_system(instruction),
        }
    }

    #[inline(always)]
    /// PUSHA/PUSHAD: the eight general registers in encoding order, with the stack pointer as it was
    /// before the first push. A fault part-way leaves RSP as it was, as the instruction is restartable.
    fn push_all(&mut self, bytes: u32) -> Result<(), Fault> {
        let old_rsp = self.cpu.gpr[RSP];
        for index in [RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI] {
            let value = if index == RSP { old_rsp } else { self.cpu.gpr[index] };
            if let Err(fault) = self.push(value & mask(bytes), bytes) {
                self.cpu.gpr[RSP] = old_rsp;
                return Err(fault);
            }
        }
        Ok(())
    }

    /// POPA/POPAD: the reverse of `push_all`; the saved stack pointer is read and discarded. Every slot is
    /// read before any register changes, so a fault leaves the registers untouched.
    fn pop_all(&mut self, bytes: u32) -> Result<(), Fault> {
        let order = [RDI, RSI, RBP, RSP, RBX, RDX, RCX, RAX];
        let mut values = [0u64; 8];
        for (slot, value) in values.iter_mut().enumerate() {
            *value = self.peek_stack(slot as u64 * bytes as u64, bytes)?;
        }
        for (index, value) in order.into_iter().zip(values) {
            if index != RSP {
                self.write_gpr_sized(index, bytes, value);
            }
        }
        self.adjust_rsp(8 * bytes as u64);
        Ok(())
    }

    pub(crate) fn adjust_rsp(&mut self, amount: u64) {
        let stack_mask = self.stack_mask();
        let rsp = self.cpu.gpr[RSP];
        self.cpu.gpr[RSP] = (rsp & !stack_mask) | (rsp.wrapping_add(amount) & stack_mask);
    }

    /// Two-operand ALU instruction; `store` is false for CMP and TEST.
    #[inline(always)]
    fn binary(
        &mut self,
        instruction: &Instruction,
        operation: impl Fn(u64, u64, u64, u32) -> (u64, u64),
        store: bool,
    ) -> Result<(), Fault> {
        let bytes = self.operand_bytes(instruction, 0);
        let (a, b) = if instruction.op0_kind() == OpKind::Register && instruction.op1_kind() == OpKind::Register {
            (self.read_register(instruction.op0_register()), self.read_register(instruction.op1_register()))
        } else {
            let a = self.read_operand(instruction, 0, bytes)?;
            let b = self.read_operand(instruction, 1, bytes)?;
            (a, b)
        };
        let (result, flags) = operation(a, b, self.cpu.rflags, bytes);
        if store {
            self.write_operand(instruction, 0, bytes, result)?;
        }
        self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
        Ok(())
    }

    fn shift(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let bytes = self.operand_bytes(instruction, 0);
        let value = self.read_operand(instruction, 0, bytes)?;
        let raw_count = if instruction.op_count() == 1 { 1 } else { self.read_operand(instruction, 1, 1)? };
        let count = (raw_count & if bytes == 8 { 63 } else { 31 }) as u32;
        let carry = self.cpu.rflags & CF;
        let (outcome, affected) = match instruction.mnemonic() {
            M::Shl | M::Sal => (alu::shl(value, count, bytes), STATUS),
            M::Shr => (alu::shr(value, count, bytes), STATUS),
            M::Sar => (alu::sar(value, count, bytes), STATUS),
            M::Rol => (alu::rol(value, count, bytes), CF | OF),
            M::Ror => (alu::ror(value, count, bytes), CF | OF),
            M::Rcl => (alu::rcl(value, count, carry, bytes), CF | OF),
            _ => (alu::rcr(value, count, carry, bytes), CF | OF),
        };
        if let Some((result, flags)) = outcome {
            self.write_operand(instruction, 0, bytes, result)?;
            self.set_status(flags, affected);
        }
        Ok(())
    }

    fn multiply_divide(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let mnemonic = instruction.mnemonic();
        if mnemonic == M::Imul && instruction.op_count() > 1 {
            let bytes = self.operand_bytes(instruction, 0);
            let (a, b) = if instruction.op_count() == 2 {
                (self.read_operand(instruction, 0, bytes)?, self.read_operand(instruction, 1, bytes)?)
            } else {
                (self.read_operand(instruction, 1, bytes)?, instruction.immediate(2) & mask(bytes))
            };
            let product = (sign_extend(a, bytes) as i64 as i128) * (sign_extend(b, bytes) as i64 as i128);
            let result = (product as u64) & mask(bytes);
            let overflow = sign_extend(result, bytes) as i64 as i128 != product;
            self.write_register(instruction.op0_register(), result);
            self.cpu.rflags = (self.cpu.rflags & !STATUS) | alu::mul_flags(result, overflow, bytes);
            return Ok(());
        }
        let bytes = self.operand_bytes(instruction, 0);
        let source = self.read_operand(instruction, 0, bytes)?;
        let bits = bytes * 8;
        // The double-width accumulator: AX for bytes, DX:AX, EDX:EAX, RDX:RAX otherwise.
        let (low, high) = if bytes == 1 {
            (self.cpu.gpr[RAX] & 0xFF, (self.cpu.gpr[RAX] >> 8) & 0xFF)
        } else {
            (self.cpu.gpr[RAX] & mask(bytes), self.cpu.gpr[RDX] & mask(bytes))
        };
        let write_pair = |this: &mut Self, low: u64, high: u64| {
            if bytes == 1 {
                this.write_gpr_sized(RAX, 2, (low & 0xFF) | ((high & 0xFF) << 8));
            } else {
                this.write_gpr_sized(RAX, bytes, low);
                this.write_gpr_sized(RDX, bytes, high);
            }
        };
        match mnemonic {
            M::Mul => {
                let product = (low as u128) * (source as u128);
                let result_low = (product as u64) & mask(bytes);
                let result_high = ((product >> bits) as u64) & mask(bytes);
                write_pair(self, result_low, result_high);
                self.cpu.rflags = (self.cpu.rflags & !STATUS) | alu::mul_flags(result_low, result_high != 0, bytes);
            }
            M::Imul => {
                let product = (sign_extend(low, bytes) as i64 as i128) * (sign_extend(source, bytes) as i64 as i128);
                let result_low = (product as u64) & mask(bytes);
                let result_high = ((product >> bits) as u64) & mask(bytes);
                let overflow = sign_extend(result_low, bytes) as i64 as i128 != product;
                write_pair(self, result_low, result_high);
                self.cpu.rflags = (self.cpu.rflags & !STATUS) | alu::mul_flags(result_low, overflow, bytes);
            }
            M::Div => {
                if source == 0 {
                    return Err(de());
                }
                let dividend = ((high as u128) << bits) | low as u128;
                let quotient = dividend / source as u128;
                if quotient > mask(bytes) as u128 {
                    return Err(de());
                }
                let remainder = dividend % source as u128;
                write_pair(self, quotient as u64, remainder as u64);
            }
            _ => {
                if source == 0 {
                    return Err(de());
                }
                let dividend =
                    ((((high as u128) << bits) | low as u128) << (128 - 2 * bits)) as i128 >> (128 - 2 * bits);
                let divisor = sign_extend(source, bytes) as i64 as i128;
                let quotient = dividend.wrapping_div(divisor);
                let limit = 1i128 << (bits - 1);
                if quotient >= limit || quotient < -limit || (dividend == i128::MIN) {
                    return Err(de());
                }
                let remainder = dividend.wrapping_rem(divisor);
                write_pair(self, (quotient as u64) & mask(bytes), (remainder as u64) & mask(bytes));
            }
        }
        Ok(())
    }

    fn bit_test(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let bytes = self.operand_bytes(instruction, 0);
        let bits = bytes as u64 * 8;
        let (value, bit, memory_offset) = if instruction.op0_kind() == OpKind::Memory {
            let mut offset = self.effective_address(instruction);
            let bit = if instruction.op1_kind() == OpKind::Register {
                // A register bit offset addresses a bit string: it may reach outside the operand.
                let index = sign_extend(self.read_register(instruction.op1_register()), bytes) as i64;
                offset = offset.wrapping_add(((index >> bits.trailing_zeros()) * bytes as i64) as u64);
                (index as u64) & (bits - 1)
            } else {
                instruction.immediate(1) & (bits - 1)
            };
            (self.read_memory(Self::memory_segment(instruction), offset, bytes)?, bit, Some(offset))
        } else {
            let bit = self.read_operand(instruction, 1, bytes)? & (bits - 1);
            (self.read_register(instruction.op0_register()), bit, None)
        };
        let selected = 1u64 << bit;
        if value & selected != 0 {
            self.cpu.rflags |= CF;
        } else {
            self.cpu.rflags &= !CF;
        }
        let result = match instruction.mnemonic() {
            M::Bts => value | selected,
            M::Btr => value & !selected,
            M::Btc => value ^ selected,
            _ => return Ok(()),
        };
        match memory_offset {
            Some(offset) => self.write_memory(Self::memory_segment(instruction), offset, bytes, result),
            None => {
                self.write_register(instruction.op0_register(), result);
                Ok(())
            }
        }
    }

    fn enter(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let bytes = match instruction.code() {
            Code::Enterw_imm16_imm8 => 2,
            Code::Enterd_imm16_imm8 => 4,
            _ => 8,
        };
        let size = instruction.immediate16() as u64;
        let level = instruction.immediate8_2nd() as u64 & 31;
        let rbp = self.cpu.gpr[crate::cpu::RBP];
        self.push(rbp, bytes)?;
        let frame = self.cpu.gpr[RSP];
        if level > 0 {
            let stack_mask = self.stack_mask();
            let mut pointer = rbp;
            for _ in 1..level {
                pointer = pointer.wrapping_sub(bytes as u64) & stack_mask;
                let value = self.read_memory(SegmentRegister::Ss, pointer, bytes)?;
                self.push(value, bytes)?;
            }
            self.push(frame, bytes)?;
        }
        self.write_gpr_sized(crate::cpu::RBP, bytes, frame);
        let stack_mask = self.stack_mask();
        let rsp = self.cpu.gpr[RSP];
        self.cpu.gpr[RSP] = (rsp & !stack_mask) | (rsp.wrapping_sub(size) & stack_mask);
        Ok(())
    }

    fn read_far_pointer(&mut self, instruction: &Instruction) -> Result<(u16, u64), Fault> {
        let offset_bytes = match instruction.memory_size() {
            MemorySize::SegPtr16 => 2,
            MemorySize::SegPtr32 => 4,
            _ => 8,
        };
        let address = self.effective_address(instruction);
        let segment = Self::memory_segment(instruction);
        let offset = self.read_memory(segment, address, offset_bytes)?;
        let selector = self.read_memory(segment, address.wrapping_add(offset_bytes as u64), 2)? as u16;
        Ok((selector, offset))
    }

    /// A string instruction; a REP-prefixed one is reported with the elements it processed, also when a fault
    /// stops it part-way (RCX then says how far it got).
    fn string(&mut self, instruction: &Instruction, operation: StringOp) -> Result<(), Fault> {
        let repeated = instruction.has_rep_prefix() || instruction.has_repne_prefix();
        if !(O::ENABLED && repeated) {
            return self.string_elements(instruction, operation);
        }
        let address_mask = mask(string_address_bytes(instruction));
        let count_before = self.cpu.gpr[RCX] & address_mask;
        let result = self.string_elements(instruction, operation);
        let elements = count_before.wrapping_sub(self.cpu.gpr[RCX]) & address_mask;
        let index = self.index_in_block;
        self.obs.side_event(index, &SideEvent::RepString { elements });
        result
    }

    fn string_elements(&mut self, instruction: &Instruction, operation: StringOp) -> Result<(), Fault> {
        let element = string_element_bytes(instruction.mnemonic());
        let address_bytes = string_address_bytes(instruction);
        let address_mask = mask(address_bytes);
        let repeated = instruction.has_rep_prefix() || instruction.has_repne_prefix();
        let step = if self.cpu.rflags & DF != 0 { (element as u64).wrapping_neg() } else { element as u64 };
        let source_segment = if matches!(operation, StringOp::Movs | StringOp::Lods | StringOp::Cmps | StringOp::Outs) {
            Self::memory_segment(instruction)
        } else {
            SegmentRegister::Ds
        };
        if matches!(operation, StringOp::Ins | StringOp::Outs) {
            let port = self.cpu.gpr[RDX] as u16;
            self.check_io_permission(port, element)?;
        }
        let bulk = repeated && step == element as u64 && matches!(operation, StringOp::Movs | StringOp::Stos);
        loop {
            if repeated && self.cpu.gpr[RCX] & address_mask == 0 {
                return Ok(());
            }
            if bulk && self.bulk_string_chunk(operation, source_segment, element, address_bytes)? {
                continue;
            }
            let rsi = self.cpu.gpr[RSI] & address_mask;
            let rdi = self.cpu.gpr[RDI] & address_mask;
            let mut compare = None;
            match operation {
                StringOp::Movs => {
                    let value = self.read_memory(source_segment, rsi, element)?;
                    self.write_memory(SegmentRegister::Es, rdi, element, value)?;
                }
                StringOp::Stos => self.write_memory(SegmentRegister::Es, rdi, element, self.cpu.gpr[RAX])?,
                StringOp::Lods => {
                    let value = self.read_memory(source_segment, rsi, element)?;
                    self.write_gpr_sized(RAX, element, value);
                }
                StringOp::Cmps => {
                    let first = self.read_memory(source_segment, rsi, element)?;
                    let second = self.read_memory(SegmentRegister::Es, rdi, element)?;
                    compare = Some(alu::sub(first, second, 0, element).1);
                }
                StringOp::Scas => {
                    let value = self.read_memory(SegmentRegister::Es, rdi, element)?;
                    compare = Some(alu::sub(self.cpu.gpr[RAX] & mask(element), value, 0, element).1);
                }
                StringOp::Ins => {
                    let port = self.cpu.gpr[RDX] as u16;
                    // Probe the destination first so a fault does not consume device input.
                    self.linear_address(SegmentRegister::Es, rdi, element, true)?;
                    let value = self.port_read(port, element);
                    self.write_memory(SegmentRegister::Es, rdi, element, value as u64)?;
                }
                StringOp::Outs => {
                    let port = self.cpu.gpr[RDX] as u16;
                    let value = self.read_memory(source_segment, rsi, element)?;
                    self.port_write(instruction.ip(), port, element, value as u32)?;
                }
            }
            let advances_source =
                matches!(operation, StringOp::Movs | StringOp::Lods | StringOp::Cmps | StringOp::Outs);
            let advances_destination = !matches!(operation, StringOp::Lods | StringOp::Outs);
            if advances_source {
                self.write_gpr_sized(RSI, address_bytes, rsi.wrapping_add(step));
            }
            if advances_destination {
                self.write_gpr_sized(RDI, address_bytes, rdi.wrapping_add(step));
            }
            if let Some(flags) = compare {
                self.cpu.rflags = (self.cpu.rflags & !STATUS) | flags;
            }
            if !repeated {
                return Ok(());
            }
            let count = self.cpu.gpr[RCX].wrapping_sub(1) & address_mask;
            self.write_gpr_sized(RCX, address_bytes, count);
            if let Some(flags) = compare {
                let zero = flags & ZF != 0;
                if (instruction.has_repe_prefix() && !zero) || (instruction.has_repne_prefix() && zero) {
                    return Ok(());
                }
            }
            if self.exit_status.is_some() {
                // The guest exited through a string OUT: no element after that write happens.
                // RIP stays on the instruction, as after any interrupted REP.
                if count != 0 {
                    self.cpu.rip = instruction.ip();
                }
                return Ok(());
            }
        }
    }
}

impl<O: ExecutionObserver> Interp<'_, O> {
    /// REP MOVS/STOS forward over plain RAM: moves the elements up to the next page boundary of
    /// either operand in one go. Returns false (nothing done) whenever the element-wise path must
    /// decide instead: page or segment crossing, MMIO, frames with cached code or page tables,
    /// overlapping copies; that path then also raises any fault at the exact element.
    fn bulk_string_chunk(
        &mut self,
        operation: StringOp,
        source_segment: SegmentRegister,
        element: u32,
        address_bytes: u32,
    ) -> Result<bool, Fault> {
        let address_mask = mask(address_bytes);
        let count = self.cpu.gpr[RCX] & address_mask;
        let rsi = self.cpu.gpr[RSI] & address_mask;
        let rdi = self.cpu.gpr[RDI] & address_mask;
        let room =
            |offset: u64| (crate::memory::PAGE_SIZE - (offset & (crate::memory::PAGE_SIZE - 1))) / element as u64;
        let mut elements = count.min(room(rdi)).min((address_mask - rdi) / element as u64 + 1);
        if operation == StringOp::Movs {
            elements = elements.min(room(rsi)).min((address_mask - rsi) / element as u64 + 1);
        }
        if elements < 2 {
            return Ok(false);
        }
        let bytes = elements * element as u64;
        let Ok(destination) = self.linear_address(SegmentRegister::Es, rdi, bytes as u32, true) else {
            return Ok(false);
        };
        if destination & (crate::memory::PAGE_SIZE - 1) != rdi & (crate::memory::PAGE_SIZE - 1) {
            // A segment base that is not page aligned moves the page boundary: leave it to the slow path.
            return Ok(false);
        }
        let source = if operation == StringOp::Movs {
            let Ok(source) = self.linear_address(source_segment, rsi, bytes as u32, false) else {
                return Ok(false);
            };
            if source & (crate::memory::PAGE_SIZE - 1) != rsi & (crate::memory::PAGE_SIZE - 1) {
                return Ok(false);
            }
            Some(source)
        } else {
            None
        };
        let user = self.user_access();
        // Same translation order as the element-wise path: source read, then destination write.
        let source_physical = match source {
            Some(linear) => Some(self.translate(linear, crate::observer::AccessKind::Read, user)?),
            None => None,
        };
        let destination_physical = self.translate(destination, crate::observer::AccessKind::Write, user)?;
        let ram_size = self.memory.ram_size();
        let plain = |pa: u64| pa + bytes <= ram_size && self.memory.frame_flags[(pa >> 12) as usize] == 0;
        if !plain(destination_physical) || source_physical.is_some_and(|pa| pa + bytes > ram_size) {
            return Ok(false);
        }
        let start = destination_physical as usize;
        match source_physical {
            Some(from) => {
                let overlapping = from < destination_physical + bytes && destination_physical < from + bytes;
                if overlapping {
                    return Ok(false);
                }
                self.memory.ram.copy_within(from as usize..(from + bytes) as usize, start);
            }
            None => {
                let pattern = self.cpu.gpr[RAX].to_le_bytes();
                for chunk in self.memory.ram[start..start + bytes as usize].chunks_exact_mut(element as usize) {
                    chunk.copy_from_slice(&pattern[..element as usize]);
                }
            }
        }
        if operation == StringOp::Movs {
            self.write_gpr_sized(RSI, address_bytes, rsi.wrapping_add(bytes));
        }
        self.write_gpr_sized(RDI, address_bytes, rdi.wrapping_add(bytes));
        self.write_gpr_sized(RCX, address_bytes, count - elements);
        Ok(true)
    }
}

pub(crate) fn segment_of(register: Register) -> SegmentRegister {
    match register {
        Register::ES => SegmentRegister::Es,
        Register::CS => SegmentRegister::Cs,
        Register::SS => SegmentRegister::Ss,
        Register::FS => SegmentRegister::Fs,
        Register::GS => SegmentRegister::Gs,
        _ => SegmentRegister::Ds,
    }
}

fn is_far_pointer(size: MemorySize) -> bool {
    matches!(size, MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64)
}

fn loop_counter_bytes(code: Code) -> u32 {
    match code {
        Code::Loop_rel8_16_CX
        | Code::Loop_rel8_32_CX
        | Code::Loope_rel8_16_CX
        | Code::Loope_rel8_32_CX
        | Code::Loopne_rel8_16_CX
        | Code::Loopne_rel8_32_CX => 2,
        Code::Loop_rel8_16_ECX
        | Code::Loop_rel8_32_ECX
        | Code::Loop_rel8_64_ECX
        | Code::Loope_rel8_16_ECX
        | Code::Loope_rel8_32_ECX
        | Code::Loope_rel8_64_ECX
        | Code::Loopne_rel8_16_ECX
        | Code::Loopne_rel8_32_ECX
        | Code::Loopne_rel8_64_ECX => 4,
        _ => 8,
    }
}

fn string_element_bytes(mnemonic: M) -> u32 {
    match mnemonic {
        M::Movsb | M::Stosb | M::Lodsb | M::Cmpsb | M::Scasb | M::Insb | M::Outsb => 1,
        M::Movsw | M::Stosw | M::Lodsw | M::Cmpsw | M::Scasw | M::Insw | M::Outsw => 2,
        M::Movsq | M::Stosq | M::Lodsq | M::Cmpsq | M::Scasq => 8,
        _ => 4,
    }
}

fn string_address_bytes(instruction: &Instruction) -> u32 {
    for operand in 0..instruction.op_count() {
        match instruction.op_kind(operand) {
            OpKind::MemorySegSI | OpKind::MemoryESDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI => return 8,
            _ => {}
        }
    }
    8
}
