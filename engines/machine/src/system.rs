//! System instructions: control registers, segments and descriptor tables, MSRs, CPUID, time,
//! TLB control, port I/O, HLT.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::alu::mask;
use crate::cpu::rflags::{self, ZF};
use crate::cpu::{cr0, cr4, efer, seg_attr, CodeMode, Segment, SegmentRegister, RAX, RCX, RDX};
use crate::error::MachineError;
use crate::exec::{register_bytes, segment_of, ud};
use crate::interp::{Fault, Interp};
use crate::memory::{gp0, is_canonical};
use crate::observer::{DescriptorTable, ExecutionObserver, IoDirection, SideEvent};

pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1B;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xC000_0080;
    pub const STAR: u32 = 0xC000_0081;
    pub const LSTAR: u32 = 0xC000_0082;
    pub const CSTAR: u32 = 0xC000_0083;
    pub const FMASK: u32 = 0xC000_0084;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
}

/// The fixed CPUID model. See README.md ("CPUID model") for what each bit promises.
pub fn cpuid(leaf: u32, _subleaf: u32) -> [u32; 4] {
    const MAX_BASIC: u32 = 1;
    const MAX_EXTENDED: u32 = 0x8000_0008;
    const BRAND: &[u8; 48] = b"virtlab reference machine (deterministic x86)\0\0\0";
    let brand = |part: usize| {
        let chunk = &BRAND[part * 16..part * 16 + 16];
        let word = |i: usize| u32::from_le_bytes(chunk[i * 4..i * 4 + 4].try_into().unwrap());
        [word(0), word(1), word(2), word(3)]
    };
    let leaf = if leaf > MAX_EXTENDED || (leaf > MAX_BASIC && leaf < 0x8000_0000) { MAX_BASIC } else { leaf };
    match leaf {
        // "GenuineIntel": the model follows the Intel SDM wherever vendors differ (SYSRET, CPUID).
        0 => [MAX_BASIC, 0x756E_6547, 0x6C65_746E, 0x4965_6E69],
        // Family 6, model 15, stepping 11. EDX: PSE, TSC, MSR, PAE, CX8, PGE, CMOV, PAT.
        1 => [
            0x0000_06FB,
            0,
            0,
            (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 13) | (1 << 15) | (1 << 16),
        ],
        0x8000_0000 => [MAX_EXTENDED, 0, 0, 0],
        // ECX: LAHF/SAHF in 64-bit mode. EDX: SYSCALL/SYSRET, NX, long mode.
        0x8000_0001 => [0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)],
        0x8000_0002 => brand(0),
        0x8000_0003 => brand(1),
        0x8000_0004 => brand(2),
        // 39 physical address bits, 48 linear.
        0x8000_0008 => [0x3027, 0, 0, 0],
        _ => [0, 0, 0, 0],
    }
}

/// System-descriptor type of a 32-bit call gate.
const CALL_GATE_32: u64 = 0x0C;

/// What a call gate says: where it leads and how many parameter dwords a CALL through it copies.
struct CallGate {
    code_selector: u16,
    offset: u64,
    parameters: u32,
}

fn gp(selector: u16) -> Fault {
    Fault::Exception { vector: crate::interrupts::GP, error_code: Some((selector & 0xFFFC) as u32), address: None }
}

fn not_present(selector: u16) -> Fault {
    Fault::Exception { vector: crate::interrupts::NP, error_code: Some((selector & 0xFFFC) as u32), address: None }
}

fn stack_fault(selector: u16) -> Fault {
    Fault::Exception { vector: crate::interrupts::SS, error_code: Some((selector & 0xFFFC) as u32), address: None }
}

/// Decodes the hidden part of a segment register from an 8-byte descriptor.
pub(crate) fn segment_from_descriptor(selector: u16, descriptor: u64) -> Segment {
    let base = ((descriptor >> 16) & 0xFF_FFFF) | (((descriptor >> 56) & 0xFF) << 24);
    let raw_limit = ((descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16)) as u32;
    let attributes = ((descriptor >> 40) & 0xF0FF) as u16;
    let limit = if attributes & seg_attr::GRANULARITY != 0 { (raw_limit << 12) | 0xFFF } else { raw_limit };
    Segment { selector, base, limit, attributes }
}

impl<O: ExecutionObserver> Interp<'_, O> {
    pub(crate) fn require_cpl0(&self) -> Result<(), Fault> {
        if self.cpu.cpl != 0 {
            return Err(gp0());
        }
        Ok(())
    }

    /// Time at the current instruction: retired instructions (including those of this block so far)
    /// plus time spent halted.
    pub(crate) fn instruction_time(&self) -> u64 {
        self.now() + self.index_in_block as u64
    }

    fn side_event(&mut self, event: SideEvent) {
        let index = self.index_in_block;
        self.obs.side_event(index, &event);
    }

    pub(crate) fn mov(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let kind0 = instruction.op0_kind();
        let kind1 = instruction.op1_kind();
        if kind0 == OpKind::Register && kind1 == OpKind::Register {
            let destination = instruction.op0_register();
            let source = instruction.op1_register();
            if destination.is_gpr() && source.is_gpr() {
                let value = self.read_register(source);
                self.write_register(destination, value);
                return Ok(());
            }
            if destination.is_cr() {
                self.require_cpl0()?;
                let value = self.read_register(source);
                return self.write_control_register(destination, value);
            }
            if source.is_cr() {
                self.require_cpl0()?;
                let value = match source {
                    Register::CR0 => self.cpu.cr0,
                    Register::CR2 => self.cpu.cr2,
                    Register::CR3 => self.cpu.cr3,
                    Register::CR4 => self.cpu.cr4,
                    Register::CR8 => self.cpu.cr8,
                    _ => return Err(ud()),
                };
                self.write_register(destination, value & mask(register_bytes(destination)));
                return Ok(());
            }
            if destination.is_dr() || source.is_dr() {
                return Err(self.unimplemented(instruction));
            }
        }
        if kind0 == OpKind::Register && instruction.op0_register().is_segment_register() {
            let segment = segment_of(instruction.op0_register());
            if segment == SegmentRegister::Cs {
                return Err(ud());
            }
            let selector = self.read_operand(instruction, 1, 2)? as u16;
            self.load_data_segment(segment, selector)?;
            if segment == SegmentRegister::Ss {
                self.cpu.interrupt_shadow = true;
            }
            return Ok(());
        }
        if kind1 == OpKind::Register && instruction.op1_register().is_segment_register() {
            let selector = self.cpu.segments[segment_of(instruction.op1_register()) as usize].selector as u64;
            let bytes = if kind0 == OpKind::Register { register_bytes(instruction.op0_register()) } else { 2 };
            return self.write_operand(instruction, 0, bytes, selector);
        }
        let bytes = if kind0 == OpKind::Register {
            register_bytes(instruction.op0_register())
        } else {
            instruction.memory_size().size() as u32
        };
        let value = self.read_operand(instruction, 1, bytes)?;
        self.write_operand(instruction, 0, bytes, value)
    }

    fn write_control_register(&mut self, register: Register, value: u64) -> Result<(), Fault> {
        let long_mode = self.cpu.long_mode_active();
        let (number, old) = match register {
            Register::CR0 => {
                let value = value & 0xFFFF_FFFF | cr0::ET;
                if value & !cr0::SUPPORTED != 0
                    || (value & cr0::PG != 0 && value & cr0::PE == 0)
                    || (value & cr0::NW != 0 && value & cr0::CD == 0)
                {
                    return Err(gp0());
                }
                let old = self.cpu.cr0;
                let enabling_paging = value & cr0::PG != 0 && old & cr0::PG == 0;
                if enabling_paging && self.cpu.efer & efer::LME != 0 {
                    if self.cpu.cr4 & cr4::PAE == 0 {
                        return Err(gp0());
                    }
                    self.cpu.efer |= efer::LMA;
                }
                if value & cr0::PG == 0 && old & cr0::PG != 0 {
                    if long_mode && self.mode == CodeMode::Bits64 {
                        return Err(gp0());
                    }
                    self.cpu.efer &= !efer::LMA;
                }
                self.cpu.cr0 = value;
                if (old ^ value) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
                    self.end_tlb_epoch();
                    self.page_table_map_valid = false;
                }
                self.mode = self.cpu.code_mode();
                (0, old)
            }
            Register::CR2 => {
                let old = self.cpu.cr2;
                self.cpu.cr2 = value;
                (2, old)
            }
            Register::CR3 => {
                if long_mode && value >> 52 != 0 {
                    return Err(gp0());
                }
                let old = self.cpu.cr3;
                self.cpu.cr3 = if long_mode { value } else { value & 0xFFFF_FFFF };
                self.end_tlb_epoch();
                let cr3 = self.cpu.cr3;
                self.note_page_table_root(cr3);
                (3, old)
            }
            Register::CR4 => {
                if value & !cr4::SUPPORTED != 0 || (long_mode && value & cr4::PAE == 0) {
                    return Err(gp0());
                }
                let old = self.cpu.cr4;
                self.cpu.cr4 = value;
                if (old ^ value) & cr4::PAGING_BITS != 0 {
                    self.end_tlb_epoch();
                    self.page_table_map_valid = false;
                }
                (4, old)
            }
            Register::CR8 => {
                if value & !0xF != 0 {
                    return Err(gp0());
                }
                let old = self.cpu.cr8;
                self.cpu.cr8 = value;
                (8, old)
            }
            _ => return Err(ud()),
        };
        if O::ENABLED {
            let new = match number {
                0 => self.cpu.cr0,
                2 => self.cpu.cr2,
                3 => self.cpu.cr3,
                4 => self.cpu.cr4,
                _ => self.cpu.cr8,
            };
            self.side_event(SideEvent::ControlRegisterWrite { cr: number, old, new });
        }
        Ok(())
    }

    /// Flushes every cached translation and starts a new first-touch epoch.
    pub(crate) fn end_tlb_epoch(&mut self) {
        self.tlb.flush();
        self.touched_pages.clear();
    }

    /// Reads the 8-byte descriptor a selector names, from the GDT or LDT.
    pub(crate) fn read_descriptor(&mut self, selector: u16) -> Result<u64, Fault> {
        let (base, limit) = if selector & 4 != 0 {
            if !self.cpu.ldtr.is_usable() {
                return Err(gp(selector));
            }
            (self.cpu.ldtr.base, self.cpu.ldtr.limit as u64)
        } else {
            (self.cpu.gdtr.base, self.cpu.gdtr.limit as u64)
        };
        let offset = (selector & !7) as u64;
        if offset + 7 > limit {
            return Err(gp(selector));
        }
        self.read_linear(base + offset, 8, false)
    }

    /// Upper half of a 16-byte system descriptor (long mode LDT and TSS descriptors).
    fn read_descriptor_high(&mut self, selector: u16) -> Result<u64, Fault> {
        let offset = (selector & !7) as u64;
        if offset + 15 > self.cpu.gdtr.limit as u64 {
            return Err(gp(selector));
        }
        self.read_linear(self.cpu.gdtr.base + offset + 8, 8, false)
    }

    pub(crate) fn set_descriptor_bits(&mut self, selector: u16, descriptor: u64, bits: u64) -> Result<(), Fault> {
        if descriptor & bits == bits {
            return Ok(());
        }
        let base = if selector & 4 != 0 { self.cpu.ldtr.base } else { self.cpu.gdtr.base };
        let address = base + (selector & !7) as u64;
        let pa = self.translate(address, crate::observer::AccessKind::Write, false)?;
        self.write_physical(pa, 8, descriptor | bits)
    }

    /// MOV/POP to DS, ES, FS, GS or SS with the protected-mode checks.
    pub(crate) fn load_data_segment(&mut self, segment: SegmentRegister, selector: u16) -> Result<(), Fault> {
        let cpl = self.cpu.cpl;
        let rpl = (selector & 3) as u8;
        if selector & !3 == 0 {
            let null_stack_allowed = self.mode == CodeMode::Bits64 && cpl < 3 && rpl == cpl;
            if segment == SegmentRegister::Ss && !null_stack_allowed {
                return Err(gp0());
            }
            let slot = &mut self.cpu.segments[segment as usize];
            // A null selector clears the base, FS and GS included (Intel behaviour).
            *slot = Segment { selector, base: 0, limit: 0, attributes: 0 };
            if segment == SegmentRegister::Ss {
                // A null SS in 64-bit mode stays usable for stack accesses.
                slot.attributes = seg_attr::PRESENT
                    | seg_attr::WRITABLE_OR_READABLE
                    | seg_attr::NOT_SYSTEM
                    | ((cpl as u16) << seg_attr::DPL_SHIFT);
                slot.limit = 0xFFFF_FFFF;
            }
            return Ok(());
        }
        let descriptor = self.read_descriptor(selector)?;
        let loaded = segment_from_descriptor(selector, descriptor);
        let attributes = loaded.attributes;
        let dpl = loaded.dpl();
        let is_system = attributes & seg_attr::NOT_SYSTEM == 0;
        let is_code = attributes & seg_attr::CODE != 0;
        let readable_or_writable = attributes & seg_attr::WRITABLE_OR_READABLE != 0;
        if segment == SegmentRegister::Ss {
            if rpl != cpl || dpl != cpl || is_system || is_code || !readable_or_writable {
                return Err(gp(selector));
            }
            if attributes & seg_attr::PRESENT == 0 {
                return Err(stack_fault(selector));
            }
        } else {
            let conforming_code = is_code && attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
            if is_system || (is_code && !readable_or_writable) || (!conforming_code && rpl.max(cpl) > dpl) {
                return Err(gp(selector));
            }
            if attributes & seg_attr::PRESENT == 0 {
                return Err(not_present(selector));
            }
        }
        self.set_descriptor_bits(selector, descriptor, 1 << 40)?;
        let mut loaded = loaded;
        loaded.attributes |= seg_attr::ACCESSED;
        if matches!(segment, SegmentRegister::Fs | SegmentRegister::Gs) && self.mode == CodeMode::Bits64 {
            // In 64-bit mode a selector load sets the base from the descriptor's 32-bit base.
            loaded.base &= 0xFFFF_FFFF;
        }
        self.cpu.segments[segment as usize] = loaded;
        Ok(())
    }

    /// Loads CS for a far JMP/CALL/RET: code descriptors only; gates are not modelled.
    pub(crate) fn code_segment_for_transfer(
        &mut self,
        selector: u16,
        new_cpl: u8,
        returning: bool,
    ) -> Result<Segment, Fault> {
        if selector & !3 == 0 {
            return Err(gp0());
        }
        let descriptor = self.read_descriptor(selector)?;
        let loaded = segment_from_descriptor(selector, descriptor);
        let attributes = loaded.attributes;
        if attributes & seg_attr::NOT_SYSTEM == 0 {
            return Err(Fault::Stop(Box::new(MachineError::Unimplemented {
                mnemonic: "far transfer through a gate or task descriptor".into(),
                address: self.code_linear(self.cpu.rip),
                mode: self.mode,
                cpl: self.cpu.cpl,
            })));
        }
        if attributes & seg_attr::CODE == 0 {
            return Err(gp(selector));
        }
        let rpl = (selector & 3) as u8;
        let dpl = loaded.dpl();
        let conforming = attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
        let allowed = if returning {
            if conforming {
                dpl <= rpl
            } else {
                dpl == rpl
            }
        } else if conforming {
            dpl <= self.cpu.cpl
        } else {
            rpl <= self.cpu.cpl && dpl == self.cpu.cpl
        };
        if !allowed {
            return Err(gp(selector));
        }
        if attributes & seg_attr::PRESENT == 0 {
            return Err(not_present(selector));
        }
        if self.cpu.long_mode_active() && loaded.is_long_code() && loaded.is_default_big() {
            return Err(gp(selector));
        }
        self.set_descriptor_bits(selector, descriptor, 1 << 40)?;
        let mut loaded = loaded;
        loaded.attributes |= seg_attr::ACCESSED;
        loaded.selector = (selector & !3) | new_cpl as u16;
        Ok(loaded)
    }

    /// Commits a new CS and RIP, checking the offset against the new mode.
    fn commit_far_target(&mut self, code: Segment, new_cpl: u8, offset: u64) -> Result<(), Fault> {
        let long_code = self.cpu.long_mode_active() && code.is_long_code();
        let offset = if long_code {
            if !is_canonical(offset) {
                return Err(gp0());
            }
            offset
        } else {
            let offset = if code.is_default_big() { offset & 0xFFFF_FFFF } else { offset & 0xFFFF };
            if offset > code.limit as u64 {
                return Err(gp0());
            }
            offset
        };
        self.cpu.segments[SegmentRegister::Cs as usize] = code;
        self.cpu.cpl = new_cpl;
        self.cpu.rip = offset;
        self.mode = self.cpu.code_mode();
        Ok(())
    }

    pub(crate) fn far_jump(&mut self, selector: u16, offset: u64) -> Result<(), Fault> {
        let cpl = self.cpu.cpl;
        if let Some(gate) = self.call_gate(selector)? {
            let (code, new_cpl) = self.code_segment_through_gate(gate.code_selector, true)?;
            return self.commit_far_target(code, new_cpl, gate.offset);
        }
        let code = self.code_segment_for_transfer(selector, cpl, false)?;
        self.commit_far_target(code, cpl, offset)
    }

    pub(crate) fn far_call(&mut self, selector: u16, offset: u64, bytes: u32) -> Result<(), Fault> {
        let cpl = self.cpu.cpl;
        if let Some(gate) = self.call_gate(selector)? {
            let (code, new_cpl) = self.code_segment_through_gate(gate.code_selector, false)?;
            if new_cpl < cpl {
                return self.call_to_inner_ring(code, new_cpl, &gate);
            }
            return self.push_return_and_commit(code, cpl, gate.offset, 4);
        }
        let code = self.code_segment_for_transfer(selector, cpl, false)?;
        self.push_return_and_commit(code, cpl, offset, bytes)
    }

    /// A 32-bit call gate named by a far CALL or JMP, after the gate's own checks (DPL against CPL and RPL,
    /// present); `None` when the selector names anything else, which the code-segment path then judges.
    fn call_gate(&mut self, selector: u16) -> Result<Option<CallGate>, Fault> {
        if selector & !3 == 0 || self.cpu.long_mode_active() {
            return Ok(None);
        }
        let descriptor = self.read_descriptor(selector)?;
        if (descriptor >> 40) & 0x1F != CALL_GATE_32 {
            return Ok(None);
        }
        let gate_dpl = ((descriptor >> 45) & 3) as u8;
        if gate_dpl < self.cpu.cpl.max((selector & 3) as u8) {
            return Err(gp(selector));
        }
        if descriptor & (1 << 47) == 0 {
            return Err(not_present(selector));
        }
        Ok(Some(CallGate {
            code_selector: ((descriptor >> 16) & 0xFFFF) as u16,
            offset: (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xFFFF_0000),
            parameters: ((descriptor >> 32) & 0x1F) as u32,
        }))
    }

    /// The code segment a call gate leads to and the CPL it runs at: a non-conforming segment of a more
    /// privileged ring raises the CPL to its DPL (CALL only; a JMP through a gate never changes privilege).
    fn code_segment_through_gate(&mut self, selector: u16, jump: bool) -> Result<(Segment, u8), Fault> {
        if selector & !3 == 0 {
            return Err(gp0());
        }
        let descriptor = self.read_descriptor(selector)?;
        let mut code = segment_from_descriptor(selector, descriptor);
        let cpl = self.cpu.cpl;
        let conforming = code.attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
        let is_code =
            code.attributes & (seg_attr::NOT_SYSTEM | seg_attr::CODE) == seg_attr::NOT_SYSTEM | seg_attr::CODE;
        if !is_code || code.dpl() > cpl || (jump && !conforming && code.dpl() != cpl) {
            return Err(gp(selector));
        }
        if code.attributes & seg_attr::PRESENT == 0 {
            return Err(not_present(selector));
        }
        self.set_descriptor_bits(selector, descriptor, 1 << 40)?;
        let new_cpl = if conforming { cpl } else { code.dpl() };
        code.attributes |= seg_attr::ACCESSED;
        code.selector = (selector & !3) | new_cpl as u16;
        Ok((code, new_cpl))
    }

    /// A CALL through a gate into an inner ring: the TSS's stack for the new ring receives the caller's SS and
    /// ESP, the gate's count of parameter dwords copied from the caller's stack, then CS and EIP. Nothing
    /// changes unless every read and write succeeds.
    fn call_to_inner_ring(&mut self, code: Segment, new_cpl: u8, gate: &CallGate) -> Result<(), Fault> {
        let (stack, mut esp) = self.legacy_inner_stack(new_cpl, 0)?;
        let old_ss = self.cpu.segments[SegmentRegister::Ss as usize].selector as u64;
        let old_esp = self.cpu.gpr[crate::cpu::RSP] & 0xFFFF_FFFF;
        let mut frame = vec![old_ss, old_esp];
        for index in (0..gate.parameters).rev() {
            frame.push(self.peek_stack(4 * index as u64, 4)?);
        }
        frame.push(self.cpu.segments[SegmentRegister::Cs as usize].selector as u64);
        frame.push(self.cpu.rip & 0xFFFF_FFFF);
        let stack_mask: u64 = if stack.is_default_big() { 0xFFFF_FFFF } else { 0xFFFF };
        for value in frame {
            esp = esp.wrapping_sub(4) & stack_mask;
            self.write_linear((stack.base + esp) & 0xFFFF_FFFF, 4, value, new_cpl == 3)?;
        }
        let previous = (self.cpu.segments, self.cpu.cpl, self.cpu.rip, self.mode);
        if let Err(fault) = self.commit_far_target(code, new_cpl, gate.offset) {
            (self.cpu.segments, self.cpu.cpl, self.cpu.rip, self.mode) = previous;
            return Err(fault);
        }
        self.cpu.segments[SegmentRegister::Ss as usize] = stack;
        self.cpu.gpr[crate::cpu::RSP] = esp;
        Ok(())
    }

    /// Pushes the return CS:RIP and transfers to `code:offset` at the same privilege level.
    fn push_return_and_commit(&mut self, code: Segment, cpl: u8, offset: u64, bytes: u32) -> Result<(), Fault> {
        let old_rsp = self.cpu.gpr[crate::cpu::RSP];
        let return_cs = self.cpu.segments[SegmentRegister::Cs as usize].selector as u64;
        let return_rip = self.cpu.rip;
        let pushed = self.push(return_cs, bytes).and_then(|_| self.push(return_rip, bytes));
        if let Err(fault) = pushed.and_then(|_| self.commit_far_target(code, cpl, offset)) {
            self.cpu.gpr[crate::cpu::RSP] = old_rsp;
            return Err(fault);
        }
        Ok(())
    }

    pub(crate) fn far_return(&mut self, bytes: u32, release: u64) -> Result<(), Fault> {
        let offset = self.peek_stack(0, bytes)?;
        let selector = self.peek_stack(bytes as u64, bytes)? as u16;
        let rpl = (selector & 3) as u8;
        if rpl < self.cpu.cpl {
            return Err(gp(selector));
        }
        let code = self.code_segment_for_transfer(selector, rpl, true)?;
        if rpl == self.cpu.cpl {
            let old_rsp = self.cpu.gpr[crate::cpu::RSP];
            self.commit_far_target(code, rpl, offset)?;
            let stack_mask = self.stack_mask();
            self.cpu.gpr[crate::cpu::RSP] =
                (old_rsp & !stack_mask) | (old_rsp.wrapping_add(2 * bytes as u64 + release) & stack_mask);
            return Ok(());
        }
        // Return to an outer privilege level: SS:RSP follow on the stack.
        let depth = 2 * bytes as u64 + release;
        let new_rsp = self.peek_stack(depth, bytes)?;
        let new_ss = self.peek_stack(depth + bytes as u64, bytes)? as u16;
        let previous = (self.cpu.segments, self.cpu.cpl, self.cpu.rip, self.mode);
        self.commit_far_target(code, rpl, offset)?;
        if let Err(fault) = self.load_data_segment(SegmentRegister::Ss, new_ss) {
            (self.cpu.segments, self.cpu.cpl, self.cpu.rip, self.mode) = previous;
            return Err(fault);
        }
        self.cpu.gpr[crate::cpu::RSP] = new_rsp.wrapping_add(release);
        self.null_inaccessible_data_segments();
        Ok(())
    }

    /// After a return to an outer ring, data segments more privileged than the new CPL are nulled.
    pub(crate) fn null_inaccessible_data_segments(&mut self) {
        let cpl = self.cpu.cpl;
        for segment in [SegmentRegister::Es, SegmentRegister::Ds, SegmentRegister::Fs, SegmentRegister::Gs] {
            let slot = &mut self.cpu.segments[segment as usize];
            let attributes = slot.attributes;
            let conforming_code =
                attributes & seg_attr::CODE != 0 && attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
            if attributes & seg_attr::PRESENT != 0 && !conforming_code && slot.dpl() < cpl {
                slot.selector = 0;
                slot.attributes = 0;
            }
        }
    }

    /// POPF/IRET flag update with the CPL/IOPL rules: IOPL changes only at CPL 0, IF only when
    /// CPL <= IOPL; VM and RF are never set this way.
    pub(crate) fn write_rflags_checked(&mut self, value: u64, bytes: u32) {
        let mut changeable = rflags::STATUS | rflags::TF | rflags::DF | rflags::NT | rflags::AC | rflags::ID;
        if self.cpu.cpl == 0 {
            changeable |= rflags::IOPL | rflags::IF;
        } else if self.cpu.cpl <= self.cpu.iopl() {
            changeable |= rflags::IF;
        }
        if bytes == 2 {
            changeable &= 0xFFFF;
        }
        self.cpu.rflags = ((self.cpu.rflags & !changeable) | (value & changeable) | rflags::RESERVED1) & !rflags::RF;
    }

    /// CPL > IOPL consults the TSS I/O permission bitmap.
    pub(crate) fn check_io_permission(&mut self, port: u16, bytes: u32) -> Result<(), Fault> {
        if self.cpu.cpl <= self.cpu.iopl() {
            return Ok(());
        }
        let tr = self.cpu.tr;
        if !tr.is_usable() || tr.limit < 0x67 {
            return Err(gp0());
        }
        let bitmap_offset = self.read_linear(tr.base + 0x66, 2, false)?;
        let byte_offset = bitmap_offset + (port / 8) as u64;
        if byte_offset + 1 > tr.limit as u64 {
            return Err(gp0());
        }
        let bits = self.read_linear(tr.base + byte_offset, 2, false)?;
        let wanted = ((1u64 << bytes) - 1) << (port & 7);
        if bits & wanted != 0 {
            return Err(gp0());
        }
        Ok(())
    }

    pub(crate) fn port_read(&mut self, port: u16, bytes: u32) -> u32 {
        let now = self.instruction_time();
        let value = self.devices.port_in(port, bytes, now);
        if O::ENABLED {
            self.side_event(SideEvent::Io { port, size: bytes as u8, direction: IoDirection::In, value });
        }
        value
    }

    /// An OUT by the instruction at `ip`; a guest flooding the serial port is stopped there.
    pub(crate) fn port_write(&mut self, ip: u64, port: u16, bytes: u32, value: u32) -> Result<(), Fault> {
        let value = value & mask(bytes) as u32;
        let now = self.instruction_time();
        if O::ENABLED {
            self.side_event(SideEvent::Io { port, size: bytes as u8, direction: IoDirection::Out, value });
        }
        self.devices.port_out(port, bytes, value, now);
        if let Some(status) = self.devices.exit_request {
            self.exit_status = Some(status);
            self.end_block = true;
        }
        if self.devices.serial.flooded() {
            return Err(Fault::Stop(Box::new(MachineError::SerialFlood {
                limit: crate::devices::MAX_SERIAL_BYTES,
                address: self.code_linear(ip),
            })));
        }
        Ok(())
    }

    fn read_msr(&mut self, index: u32) -> Result<u64, Fault> {
        let m = &self.cpu.msr;
        Ok(match index {
            msr::TSC => self.instruction_time().wrapping_add(m.tsc_offset),
            msr::APIC_BASE => m.apic_base,
            msr::SYSENTER_CS => m.sysenter_cs,
            msr::SYSENTER_ESP => m.sysenter_esp,
            msr::SYSENTER_EIP => m.sysenter_eip,
            msr::PAT => m.pat,
            msr::EFER => self.cpu.efer,
            msr::STAR => m.star,
            msr::LSTAR => m.lstar,
            msr::CSTAR => m.cstar,
            msr::FMASK => m.fmask,
            msr::FS_BASE => self.cpu.segments[SegmentRegister::Fs as usize].base,
            msr::GS_BASE => self.cpu.segments[SegmentRegister::Gs as usize].base,
            msr::KERNEL_GS_BASE => m.kernel_gs_base,
            _ => return Err(gp0()),
        })
    }

    fn write_msr(&mut self, index: u32, value: u64) -> Result<(), Fault> {
        let canonical = || if is_canonical(value) { Ok(()) } else { Err(gp0()) };
        match index {
            msr::TSC => self.cpu.msr.tsc_offset = value.wrapping_sub(self.instruction_time()),
            msr::APIC_BASE => {
                // Only the architectural base-address and enable bits; the APIC itself is not modelled.
                if value & !0x0000_007F_FFFF_F900 != 0 {
                    return Err(gp0());
                }
                self.cpu.msr.apic_base = value;
            }
            msr::SYSENTER_CS => self.cpu.msr.sysenter_cs = value & 0xFFFF,
            msr::SYSENTER_ESP => {
                canonical()?;
                self.cpu.msr.sysenter_esp = value;
            }
            msr::SYSENTER_EIP => {
                canonical()?;
                self.cpu.msr.sysenter_eip = value;
            }
            msr::PAT => self.cpu.msr.pat = value,
            msr::EFER => {
                if value & !(efer::WRITABLE | efer::LMA) != 0 {
                    return Err(gp0());
                }
                let old = self.cpu.efer;
                if (old ^ value) & efer::LME != 0 && self.cpu.cr0 & cr0::PG != 0 {
                    return Err(gp0());
                }
                // LMA is read-only: it follows CR0.PG.
                self.cpu.efer = (value & efer::WRITABLE) | (old & efer::LMA);
                if (old ^ value) & efer::NXE != 0 {
                    self.end_tlb_epoch();
                }
            }
            msr::STAR => self.cpu.msr.star = value,
            msr::LSTAR => {
                canonical()?;
                self.cpu.msr.lstar = value;
            }
            msr::CSTAR => {
                canonical()?;
                self.cpu.msr.cstar = value;
            }
            msr::FMASK => self.cpu.msr.fmask = value & 0xFFFF_FFFF,
            msr::FS_BASE => {
                canonical()?;
                self.cpu.segments[SegmentRegister::Fs as usize].base = value;
            }
            msr::GS_BASE => {
                canonical()?;
                self.cpu.segments[SegmentRegister::Gs as usize].base = value;
            }
            msr::KERNEL_GS_BASE => {
                canonical()?;
                self.cpu.msr.kernel_gs_base = value;
            }
            _ => return Err(gp0()),
        }
        Ok(())
    }

    /// Instructions not handled in `exec.rs`; anything unknown ends the run with an error.
    pub(crate) fn execute_system(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        match instruction.mnemonic() {
            M::Cli | M::Sti => {
                if self.cpu.cpl > self.cpu.iopl() {
                    return Err(gp0());
                }
                if instruction.mnemonic() == M::Cli {
                    self.cpu.rflags &= !rflags::IF;
                } else {
                    if !self.cpu.interrupts_enabled() {
                        self.cpu.interrupt_shadow = true;
                    }
                    self.cpu.rflags |= rflags::IF;
                }
                Ok(())
            }
            M::Hlt => {
                self.require_cpl0()?;
                self.halt(instruction.ip())
            }
            M::Cpuid => {
                let leaf = self.cpu.gpr[RAX] as u32;
                let subleaf = self.cpu.gpr[RCX] as u32;
                let [a, b, c, d] = cpuid(leaf, subleaf);
                self.cpu.gpr[RAX] = a as u64;
                self.cpu.gpr[crate::cpu::RBX] = b as u64;
                self.cpu.gpr[RCX] = c as u64;
                self.cpu.gpr[RDX] = d as u64;
                if O::ENABLED {
                    self.side_event(SideEvent::Cpuid { leaf, subleaf });
                }
                Ok(())
            }
            M::Rdtsc => {
                let tsc = self.instruction_time().wrapping_add(self.cpu.msr.tsc_offset);
                self.cpu.gpr[RAX] = tsc & 0xFFFF_FFFF;
                self.cpu.gpr[RDX] = tsc >> 32;
                Ok(())
            }
            M::Rdmsr => {
                self.require_cpl0()?;
                let index = self.cpu.gpr[RCX] as u32;
                let value = self.read_msr(index)?;
                self.cpu.gpr[RAX] = value & 0xFFFF_FFFF;
                self.cpu.gpr[RDX] = value >> 32;
                if O::ENABLED {
                    self.side_event(SideEvent::MsrRead { index, value });
                }
                Ok(())
            }
            M::Wrmsr => {
                self.require_cpl0()?;
                let index = self.cpu.gpr[RCX] as u32;
                let value = (self.cpu.gpr[RAX] & 0xFFFF_FFFF) | (self.cpu.gpr[RDX] << 32);
                self.write_msr(index, value)?;
                if O::ENABLED {
                    self.side_event(SideEvent::MsrWrite { index, value });
                }
                Ok(())
            }
            M::Invlpg => {
                self.require_cpl0()?;
                let offset = self.effective_address(instruction);
                let segment = segment_of(instruction.memory_segment());
                let address = if self.mode == CodeMode::Bits64 {
                    match segment {
                        SegmentRegister::Fs | SegmentRegister::Gs => {
                            offset.wrapping_add(self.cpu.segments[segment as usize].base)
                        }
                        _ => offset,
                    }
                } else {
                    (self.cpu.segments[segment as usize].base + offset) & 0xFFFF_FFFF
                };
                self.tlb.flush_page(address);
                if O::ENABLED {
                    for page_size in [4u64 << 10, 2 << 20, 4 << 20, 1 << 30] {
                        let base = address & !(page_size - 1);
                        for permission in [1u64, 2, 4, 8, 16, 32] {
                            self.touched_pages.remove(&(base | permission));
                        }
                    }
                    self.side_event(SideEvent::Invlpg { address });
                }
                Ok(())
            }
            M::Wbinvd | M::Invd => self.require_cpl0(),
            M::Lgdt | M::Lidt => {
                self.require_cpl0()?;
                let offset = self.effective_address(instruction);
                let segment = segment_of(instruction.memory_segment());
                let limit = self.read_memory(segment, offset, 2)? as u16;
                let base = if self.mode == CodeMode::Bits64 {
                    self.read_memory(segment, offset + 2, 8)?
                } else {
                    self.read_memory(segment, offset + 2, 4)?
                };
                if self.mode == CodeMode::Bits64 && !is_canonical(base) {
                    return Err(gp0());
                }
                let table = crate::cpu::DescriptorTableRegister { base, limit };
                let event = if instruction.mnemonic() == M::Lgdt {
                    self.cpu.gdtr = table;
                    DescriptorTable::Gdt { base, limit }
                } else {
                    self.cpu.idtr = table;
                    DescriptorTable::Idt { base, limit }
                };
                if O::ENABLED {
                    self.side_event(SideEvent::DescriptorTableLoad(event));
                }
                Ok(())
            }
            M::Sgdt | M::Sidt => {
                let table = if instruction.mnemonic() == M::Sgdt { self.cpu.gdtr } else { self.cpu.idtr };
                let offset = self.effective_address(instruction);
                let segment = segment_of(instruction.memory_segment());
                self.write_memory(segment, offset, 2, table.limit as u64)?;
                let base_bytes = if self.mode == CodeMode::Bits64 { 8 } else { 4 };
                self.write_memory(segment, offset + 2, base_bytes, table.base)
            }
            M::Lldt | M::Ltr => {
                self.require_cpl0()?;
                let selector = self.read_operand(instruction, 0, 2)? as u16;
                self.load_system_segment(instruction.mnemonic() == M::Ltr, selector)
            }
            M::Sldt | M::Str | M::Smsw => {
                let value = match instruction.mnemonic() {
                    M::Sldt => self.cpu.ldtr.selector as u64,
                    M::Str => self.cpu.tr.selector as u64,
                    _ => self.cpu.cr0,
                };
                let bytes = if instruction.op0_kind() == OpKind::Register {
                    register_bytes(instruction.op0_register())
                } else {
                    2
                };
                self.write_operand(instruction, 0, bytes, value & mask(bytes))
            }
            M::Lmsw => {
                self.require_cpl0()?;
                let source = self.read_operand(instruction, 0, 2)?;
                // LMSW can set PE but never clear it.
                let value = (self.cpu.cr0 & !0xE) | (source & 0xF) | (self.cpu.cr0 & cr0::PE);
                self.write_control_register(Register::CR0, value)
            }
            M::Clts => {
                self.require_cpl0()?;
                let value = self.cpu.cr0 & !cr0::TS;
                self.write_control_register(Register::CR0, value)
            }
            M::Lar | M::Lsl | M::Verr | M::Verw => self.descriptor_query(instruction),
            M::Swapgs => {
                if self.mode != CodeMode::Bits64 {
                    return Err(ud());
                }
                self.require_cpl0()?;
                let cpu = &mut self.machine.cpu;
                std::mem::swap(&mut cpu.segments[SegmentRegister::Gs as usize].base, &mut cpu.msr.kernel_gs_base);
                Ok(())
            }
            M::In => {
                let bytes = register_bytes(instruction.op0_register());
                let port = if instruction.op1_kind() == OpKind::Register {
                    self.cpu.gpr[RDX] as u16
                } else {
                    instruction.immediate8() as u16
                };
                self.check_io_permission(port, bytes)?;
                let value = self.port_read(port, bytes);
                self.write_register(instruction.op0_register(), value as u64);
                Ok(())
            }
            M::Out => {
                let bytes = register_bytes(instruction.op1_register());
                let port = if instruction.op0_kind() == OpKind::Register {
                    self.cpu.gpr[RDX] as u16
                } else {
                    instruction.immediate8() as u16
                };
                self.check_io_permission(port, bytes)?;
                let value = self.read_register(instruction.op1_register()) as u32;
                self.port_write(instruction.ip(), port, bytes, value)
            }
            M::Int | M::Int3 | M::Into | M::Int1 => self.software_interrupt(instruction),
            M::Iret | M::Iretd | M::Iretq => self.interrupt_return(instruction),
            M::Syscall => self.syscall(),
            M::Sysret | M::Sysretq => self.sysret(instruction),
            M::Sysenter => self.sysenter(),
            M::Sysexit | M::Sysexitq => self.sysexit(instruction),
            _ => Err(self.unimplemented(instruction)),
        }
    }

    fn load_system_segment(&mut self, task_register: bool, selector: u16) -> Result<(), Fault> {
        if selector & !3 == 0 {
            if task_register {
                return Err(gp0());
            }
            self.cpu.ldtr = Segment { selector, ..Segment::default() };
        } else {
            if selector & 4 != 0 {
                return Err(gp(selector));
            }
            let descriptor = self.read_descriptor(selector)?;
            let mut loaded = segment_from_descriptor(selector, descriptor);
            let kind = loaded.attributes & 0x1F;
            let valid = if task_register {
                kind == 0x09 || (kind == 0x01 && !self.cpu.long_mode_active())
            } else {
                kind == 0x02
            };
            if !valid {
                return Err(gp(selector));
            }
            if loaded.attributes & seg_attr::PRESENT == 0 {
                return Err(not_present(selector));
            }
            if self.cpu.long_mode_active() {
                let high = self.read_descriptor_high(selector)?;
                loaded.base |= (high & 0xFFFF_FFFF) << 32;
            }
            if task_register {
                // Mark the TSS busy in the GDT, as LTR does.
                self.set_descriptor_bits(selector, descriptor, 2 << 40)?;
                loaded.attributes |= 2;
                self.cpu.tr = loaded;
            } else {
                self.cpu.ldtr = loaded;
            }
        }
        if O::ENABLED {
            let table = if task_register {
                DescriptorTable::TaskRegister { selector }
            } else {
                DescriptorTable::Ldt { selector }
            };
            self.side_event(SideEvent::DescriptorTableLoad(table));
        }
        Ok(())
    }

    /// LAR, LSL, VERR, VERW: report through ZF whether the selector is usable, never fault on it.
    fn descriptor_query(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let mnemonic = instruction.mnemonic();
        let source_operand = if matches!(mnemonic, M::Lar | M::Lsl) { 1 } else { 0 };
        let selector = self.read_operand(instruction, source_operand, 2)? as u16;
        let descriptor = if selector & !3 == 0 { None } else { self.try_read_descriptor(selector)? };
        let answer = descriptor.and_then(|descriptor| {
            let segment = segment_from_descriptor(selector, descriptor);
            let attributes = segment.attributes;
            let is_system = attributes & seg_attr::NOT_SYSTEM == 0;
            let is_code = attributes & seg_attr::CODE != 0;
            let conforming_code = is_code && attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
            let privileged_enough = conforming_code || segment.dpl() >= self.cpu.cpl.max((selector & 3) as u8);
            if !privileged_enough {
                return None;
            }
            let long_mode = self.cpu.long_mode_active();
            let kind = attributes & 0xF;
            match mnemonic {
                M::Lar => {
                    let valid_system = if long_mode {
                        matches!(kind, 2 | 9 | 0xB | 0xC)
                    } else {
                        matches!(kind, 1..=5 | 9 | 0xB | 0xC)
                    };
                    (!is_system || valid_system).then_some(descriptor >> 32 & 0x00F0_FF00)
                }
                M::Lsl => {
                    let valid_system =
                        if long_mode { matches!(kind, 2 | 9 | 0xB) } else { matches!(kind, 1..=3 | 9 | 0xB) };
                    (!is_system || valid_system).then_some(segment.limit as u64)
                }
                M::Verr => (!is_system && (!is_code || attributes & seg_attr::WRITABLE_OR_READABLE != 0)).then_some(0),
                _ => (!is_system && !is_code && attributes & seg_attr::WRITABLE_OR_READABLE != 0).then_some(0),
            }
        });
        match answer {
            Some(value) => {
                self.cpu.rflags |= ZF;
                if matches!(mnemonic, M::Lar | M::Lsl) {
                    let register = instruction.op0_register();
                    self.write_register(register, value & mask(register_bytes(register)));
                }
            }
            None => self.cpu.rflags &= !ZF,
        }
        Ok(())
    }

    /// Like `read_descriptor` but a selector beyond the table limit is an answer, not a fault.
    fn try_read_descriptor(&mut self, selector: u16) -> Result<Option<u64>, Fault> {
        let (base, limit, usable) = if selector & 4 != 0 {
            (self.cpu.ldtr.base, self.cpu.ldtr.limit as u64, self.cpu.ldtr.is_usable())
        } else {
            (self.cpu.gdtr.base, self.cpu.gdtr.limit as u64, true)
        };
        let offset = (selector & !7) as u64;
        if !usable || offset + 7 > limit {
            return Ok(None);
        }
        Ok(Some(self.read_linear(base + offset, 8, false)?))
    }

    /// HLT waits, in instruction time, for the next interrupt the PIC would deliver.
    fn halt(&mut self, rip: u64) -> Result<(), Fault> {
        let forever = || Fault::Stop(Box::new(MachineError::HaltedForever { rip }));
        if !self.cpu.interrupts_enabled() {
            return Err(forever());
        }
        let mut idle = 0;
        if !self.devices.pic.has_pending() {
            let now = self.instruction_time() + 1;
            let Some(deadline) = self.devices.next_event_time() else {
                return Err(forever());
            };
            idle = deadline.saturating_sub(now);
            self.idle_time += idle;
            self.devices.advance_time(now + idle);
            if !self.devices.pic.has_pending() {
                return Err(forever());
            }
        }
        if O::ENABLED {
            self.side_event(SideEvent::Hlt { idle });
        }
        Ok(())
    }
}
