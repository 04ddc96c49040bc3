//! Event delivery through the IDT (exceptions, external and software interrupts), IRET, and
//! SYSCALL/SYSRET, with the double- and triple-fault rules.

use iced_x86::{Code, Instruction, Mnemonic};

use crate::cpu::rflags::{self, OF};
use crate::cpu::{seg_attr, CodeMode, Segment, SegmentRegister, R11, RCX, RDX, RSP};
use crate::error::{ExceptionChain, MachineError};
use crate::interp::{Fault, Interp};
use crate::memory::{gp0, is_canonical};
use crate::observer::{ExecutionObserver, Transfer};
use crate::system::segment_from_descriptor;

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const BP: u8 = 3;
pub const OVERFLOW: u8 = 4;
pub const UD: u8 = 6;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;

pub fn exception_name(vector: u8) -> String {
    let name = match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => return format!("vector {vector}"),
    };
    name.to_string()
}

fn is_contributory(vector: u8) -> bool {
    matches!(vector, DE | TS | NP | SS | GP)
}

/// SDM table 6-5: which second exception during delivery of a first one becomes #DF.
fn escalates_to_double_fault(first: u8, second: u8) -> bool {
    (is_contributory(first) && is_contributory(second)) || (first == PF && (second == PF || is_contributory(second)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EventSource {
    Exception,
    External,
    /// INT n, INT3, INTO: the gate's DPL is checked against the CPL.
    Software,
    /// INT1 (ICEBP): delivered like a hardware #DB, no DPL check.
    Icebp,
}

fn flat_segment(selector: u16, dpl: u8, code: bool, long: bool) -> Segment {
    let mut segment = Segment::flat(selector, code);
    segment.attributes |= (dpl as u16) << seg_attr::DPL_SHIFT;
    if long {
        segment.attributes = (segment.attributes & !seg_attr::DEFAULT_BIG) | seg_attr::LONG;
    }
    segment
}

impl<O: ExecutionObserver> Interp<'_, O> {
    /// Delivers an exception raised by the instruction at RIP, escalating to #DF and to a triple
    /// fault (an error) when delivery itself faults.
    pub(crate) fn deliver_exception(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        address: Option<u64>,
    ) -> Result<(), MachineError> {
        let rip = self.cpu.rip;
        let mut chain = vec![(vector, error_code)];
        let mut pending = (vector, error_code, address);
        loop {
            let (vector, error_code, address) = pending;
            if let Some(address) = address {
                self.cpu.cr2 = address;
            }
            if O::ENABLED {
                let walk = if vector == PF { self.fault_walk.take() } else { None };
                let transfer =
                    Transfer::Exception { vector, error_code, cr2: address, rip: self.code_linear(rip), walk };
                let index = self.index_in_block;
                self.obs.transfer(index, &transfer);
            }
            match self.deliver(vector, error_code, EventSource::Exception, rip) {
                Ok(()) => return Ok(()),
                Err(Fault::Stop(error)) => return Err(*error),
                Err(Fault::Exception { vector: second, error_code: second_code, address: second_address }) => {
                    chain.push((second, second_code));
                    if vector == DF || chain.len() > 16 {
                        return Err(MachineError::TripleFault { rip, mode: self.mode, chain: ExceptionChain(chain) });
                    }
                    pending = if escalates_to_double_fault(vector, second) {
                        chain.push((DF, Some(0)));
                        (DF, Some(0), None)
                    } else {
                        (second, second_code, second_address)
                    };
                }
            }
        }
    }

    pub(crate) fn deliver_external_interrupt(&mut self, vector: u8) -> Result<(), MachineError> {
        let rip = self.cpu.rip;
        self.notify_transfer(Transfer::ExternalInterrupt { vector, rip: self.code_linear(rip) });
        match self.deliver(vector, None, EventSource::External, rip) {
            Ok(()) => Ok(()),
            Err(Fault::Stop(error)) => Err(*error),
            Err(Fault::Exception { vector, error_code, address }) => {
                self.deliver_exception(vector, error_code, address)
            }
        }
    }

    pub(crate) fn software_interrupt(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let (vector, source) = match instruction.mnemonic() {
            Mnemonic::Int => (instruction.immediate8(), EventSource::Software),
            Mnemonic::Int3 => (BP, EventSource::Software),
            Mnemonic::Int1 => (DB, EventSource::Icebp),
            _ => {
                if self.mode == CodeMode::Bits64 {
                    return Err(crate::exec::ud());
                }
                if self.cpu.rflags & OF == 0 {
                    return Ok(());
                }
                (OVERFLOW, EventSource::Software)
            }
        };
        self.notify_transfer(Transfer::SoftwareInterrupt { vector, rip: self.code_linear(instruction.ip()) });
        let return_rip = self.cpu.rip;
        self.deliver(vector, None, source, return_rip)
    }

    /// The stack a 32-bit TSS gives privilege level `new_cpl` (an interrupt or a call gate into an inner ring),
    /// with the checks of that switch: #TS naming the stack selector when it is null, of another privilege, or
    /// not a writable data segment, #SS when it is not present. `external` is the error code's EXT bit.
    pub(crate) fn legacy_inner_stack(&mut self, new_cpl: u8, external: u32) -> Result<(Segment, u64), Fault> {
        let stack_pointer = self.read_tss(4 + 8 * new_cpl as u64, 4)?;
        let stack_selector = self.read_tss(8 + 8 * new_cpl as u64, 2)? as u16;
        let ts_fault = Fault::Exception {
            vector: TS,
            error_code: Some((stack_selector as u32 & 0xFFFC) | external),
            address: None,
        };
        if stack_selector & !3 == 0 {
            return Err(ts_fault);
        }
        let stack_descriptor = self.read_descriptor(stack_selector)?;
        let segment = segment_from_descriptor(stack_selector, stack_descriptor);
        let writable_data = segment.attributes
            & (seg_attr::NOT_SYSTEM | seg_attr::CODE | seg_attr::WRITABLE_OR_READABLE)
            == seg_attr::NOT_SYSTEM | seg_attr::WRITABLE_OR_READABLE;
        if (stack_selector & 3) as u8 != new_cpl || segment.dpl() != new_cpl || !writable_data {
            return Err(ts_fault);
        }
        if segment.attributes & seg_attr::PRESENT == 0 {
            return Err(Fault::Exception {
                vector: SS,
                error_code: Some(stack_selector as u32 & 0xFFFC),
                address: None,
            });
        }
        Ok((segment, stack_pointer))
    }

    fn read_tss(&mut self, offset: u64, bytes: u32) -> Result<u64, Fault> {
        let tr = self.cpu.tr;
        if !tr.is_usable() || offset + bytes as u64 - 1 > tr.limit as u64 {
            let code = (tr.selector & 0xFFFC) as u32;
            return Err(Fault::Exception { vector: TS, error_code: Some(code), address: None });
        }
        self.read_linear(tr.base + offset, bytes, false)
    }

    /// Reads the gate, switches stacks if needed, pushes the frame, and commits CS:RIP.
    fn deliver(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        source: EventSource,
        return_rip: u64,
    ) -> Result<(), Fault> {
        let external = (source == EventSource::External) as u32;
        let idt_error = (vector as u32) * 8 + 2 + external;
        let idt_fault = |vector_of_fault: u8| Fault::Exception {
            vector: vector_of_fault,
            error_code: Some(idt_error),
            address: None,
        };
        let long_mode = self.cpu.long_mode_active();
        let gate_bytes: u64 = if long_mode { 16 } else { 8 };
        if (vector as u64) * gate_bytes + gate_bytes - 1 > self.cpu.idtr.limit as u64 {
            return Err(idt_fault(GP));
        }
        let gate_address = self.cpu.idtr.base + vector as u64 * gate_bytes;
        let low = self.read_linear(gate_address, 8, false)?;
        let high = if long_mode { self.read_linear(gate_address + 8, 8, false)? } else { 0 };
        let gate_type = ((low >> 40) & 0x1F) as u8;
        let gate_dpl = ((low >> 45) & 3) as u8;
        let present = low & (1 << 47) != 0;
        let trap_gate = match gate_type {
            0x0E => false,
            0x0F => true,
            0x05..=0x07 if !long_mode => {
                return Err(Fault::Stop(Box::new(MachineError::Unimplemented {
                    mnemonic: format!("delivery of vector {vector} through a task gate or 16-bit gate"),
                    address: self.code_linear(return_rip),
                    mode: self.mode,
                    cpl: self.cpu.cpl,
                })))
            }
            _ => return Err(idt_fault(GP)),
        };
        if matches!(source, EventSource::Software) && gate_dpl < self.cpu.cpl {
            return Err(idt_fault(GP));
        }
        if !present {
            return Err(idt_fault(NP));
        }
        let selector = ((low >> 16) & 0xFFFF) as u16;
        let mut offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000);
        if long_mode {
            offset |= (high & 0xFFFF_FFFF) << 32;
        }
        let ist = if long_mode { (low >> 32) & 7 } else { 0 };
        if selector & !3 == 0 {
            return Err(Fault::Exception { vector: GP, error_code: Some(external), address: None });
        }
        let descriptor = self.read_descriptor(selector)?;
        let mut code = segment_from_descriptor(selector, descriptor);
        let code_fault =
            Fault::Exception { vector: GP, error_code: Some((selector as u32 & 0xFFFC) | external), address: None };
        if code.attributes & seg_attr::NOT_SYSTEM == 0
            || code.attributes & seg_attr::CODE == 0
            || code.dpl() > self.cpu.cpl
        {
            return Err(code_fault);
        }
        if long_mode && (!code.is_long_code() || code.is_default_big()) {
            return Err(code_fault);
        }
        if code.attributes & seg_attr::PRESENT == 0 {
            return Err(Fault::Exception {
                vector: NP,
                error_code: Some((selector as u32 & 0xFFFC) | external),
                address: None,
            });
        }
        let old_cpl = self.cpu.cpl;
        let conforming = code.attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
        let new_cpl = if conforming { old_cpl } else { code.dpl() };
        code.selector = (selector & !3) | new_cpl as u16;
        let old_ss = self.cpu.segments[SegmentRegister::Ss as usize];
        let old_rsp = self.cpu.gpr[RSP];
        let old_cs = self.cpu.segments[SegmentRegister::Cs as usize].selector as u64;
        let old_rflags = self.cpu.rflags;
        let user = new_cpl == 3;

        let new_ss;
        let mut rsp;
        if long_mode {
            rsp = if new_cpl < old_cpl { self.read_tss(4 + 8 * new_cpl as u64, 8)? } else { old_rsp };
            if ist != 0 {
                rsp = self.read_tss(0x24 + 8 * (ist - 1), 8)?;
            }
            rsp &= !0xF;
            let mut frame = vec![old_ss.selector as u64, old_rsp, old_rflags, old_cs, return_rip];
            frame.extend(error_code.map(u64::from));
            for value in frame {
                rsp = rsp.wrapping_sub(8);
                if !is_canonical(rsp) {
                    return Err(Fault::Exception { vector: SS, error_code: Some(0), address: None });
                }
                self.write_linear(rsp, 8, value, user)?;
            }
            new_ss = if new_cpl < old_cpl {
                let mut null = flat_segment(new_cpl as u16, new_cpl, false, false);
                null.selector = new_cpl as u16;
                null
            } else {
                old_ss
            };
        } else {
            let (stack_segment, mut esp, mut frame) = if new_cpl < old_cpl {
                let (segment, stack_pointer) = self.legacy_inner_stack(new_cpl, external)?;
                (segment, stack_pointer, vec![old_ss.selector as u64, old_rsp & 0xFFFF_FFFF])
            } else {
                (old_ss, old_rsp, Vec::new())
            };
            frame.extend([old_rflags & 0xFFFF_FFFF, old_cs, return_rip & 0xFFFF_FFFF]);
            frame.extend(error_code.map(u64::from));
            let stack_mask: u64 = if stack_segment.is_default_big() { 0xFFFF_FFFF } else { 0xFFFF };
            for value in frame {
                esp = esp.wrapping_sub(4) & stack_mask;
                let linear = (stack_segment.base + esp) & 0xFFFF_FFFF;
                self.write_linear(linear, 4, value, user)?;
            }
            rsp = (old_rsp & !stack_mask & if new_cpl < old_cpl { 0 } else { u64::MAX }) | esp;
            new_ss = stack_segment;
        }

        self.cpu.segments[SegmentRegister::Cs as usize] = code;
        self.cpu.segments[SegmentRegister::Ss as usize] = new_ss;
        self.cpu.gpr[RSP] = rsp;
        self.cpu.cpl = new_cpl;
        self.cpu.rip = offset;
        self.cpu.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
        if !trap_gate {
            self.cpu.rflags &= !rflags::IF;
        }
        self.mode = self.cpu.code_mode();
        if new_cpl < old_cpl && !long_mode {
            self.null_inaccessible_data_segments();
        }
        Ok(())
    }

    pub(crate) fn interrupt_return(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let bytes = match instruction.code() {
            Code::Iretq => 8,
            Code::Iretd => 4,
            _ => 2,
        };
        let from = self.code_linear(instruction.ip());
        let long_mode = self.cpu.long_mode_active();
        if self.cpu.rflags & rflags::NT != 0 {
            if long_mode {
                return Err(gp0());
            }
            return Err(self.unimplemented(instruction));
        }
        let new_rip = self.peek_stack(0, bytes)?;
        let selector = self.peek_stack(bytes as u64, bytes)? as u16;
        let new_flags = self.peek_stack(2 * bytes as u64, bytes)?;
        let old_cpl = self.cpu.cpl;
        let new_cpl = (selector & 3) as u8;
        if new_cpl < old_cpl {
            return Err(Fault::Exception { vector: GP, error_code: Some(selector as u32 & 0xFFFC), address: None });
        }
        let pops_stack = self.mode == CodeMode::Bits64 || new_cpl != old_cpl;
        let (new_rsp, new_ss) = if pops_stack {
            (self.peek_stack(3 * bytes as u64, bytes)?, self.peek_stack(4 * bytes as u64, bytes)? as u16)
        } else {
            (0, 0)
        };
        let saved = (self.cpu.segments, self.cpu.cpl, self.cpu.rip, self.cpu.rflags, self.mode, self.cpu.gpr[RSP]);
        let result = (|| {
            let code = self.code_segment_for_iret(selector, new_cpl)?;
            // Flags follow the privilege of the IRET itself, before the CPL changes.
            self.write_rflags_checked(new_flags, bytes);
            self.commit_iret_target(code, new_cpl, new_rip)?;
            if pops_stack {
                self.load_data_segment(SegmentRegister::Ss, new_ss)?;
                self.cpu.gpr[RSP] = if bytes == 8 { new_rsp } else { new_rsp & 0xFFFF_FFFF };
            } else {
                let stack_mask = self.stack_mask();
                let rsp = self.cpu.gpr[RSP];
                self.cpu.gpr[RSP] = (rsp & !stack_mask) | (rsp.wrapping_add(3 * bytes as u64) & stack_mask);
            }
            Ok(())
        })();
        if let Err(fault) = result {
            (self.cpu.segments, self.cpu.cpl, self.cpu.rip, self.cpu.rflags, self.mode, self.cpu.gpr[RSP]) = saved;
            return Err(fault);
        }
        if new_cpl > old_cpl {
            self.null_inaccessible_data_segments();
        }
        self.notify_transfer(Transfer::InterruptReturn { from, to: self.code_linear(self.cpu.rip) });
        Ok(())
    }

    fn code_segment_for_iret(&mut self, selector: u16, new_cpl: u8) -> Result<Segment, Fault> {
        let selector_fault = Fault::Exception { vector: GP, error_code: Some(selector as u32 & 0xFFFC), address: None };
        if selector & !3 == 0 {
            return Err(gp0());
        }
        let descriptor = self.read_descriptor(selector)?;
        let mut code = segment_from_descriptor(selector, descriptor);
        let attributes = code.attributes;
        if attributes & seg_attr::NOT_SYSTEM == 0 || attributes & seg_attr::CODE == 0 {
            return Err(selector_fault);
        }
        let conforming = attributes & seg_attr::EXPAND_DOWN_OR_CONFORMING != 0;
        if (conforming && code.dpl() > new_cpl) || (!conforming && code.dpl() != new_cpl) {
            return Err(selector_fault);
        }
        if attributes & seg_attr::PRESENT == 0 {
            return Err(Fault::Exception { vector: NP, error_code: Some(selector as u32 & 0xFFFC), address: None });
        }
        if self.cpu.long_mode_active() && code.is_long_code() && code.is_default_big() {
            return Err(selector_fault);
        }
        self.set_descriptor_bits(selector, descriptor, 1 << 40)?;
        code.attributes |= seg_attr::ACCESSED;
        code.selector = (selector & !3) | new_cpl as u16;
        Ok(code)
    }

    fn commit_iret_target(&mut self, code: Segment, new_cpl: u8, offset: u64) -> Result<(), Fault> {
        let long_code = self.cpu.long_mode_active() && code.is_long_code();
        let offset = if long_code { offset } else { offset & 0xFFFF_FFFF };
        if (long_code && !is_canonical(offset)) || (!long_code && offset > code.limit as u64) {
            return Err(gp0());
        }
        self.cpu.segments[SegmentRegister::Cs as usize] = code;
        self.cpu.cpl = new_cpl;
        self.cpu.rip = offset;
        self.mode = self.cpu.code_mode();
        Ok(())
    }

    pub(crate) fn syscall(&mut self) -> Result<(), Fault> {
        if self.cpu.efer & crate::cpu::efer::SCE == 0 || self.mode != CodeMode::Bits64 {
            return Err(crate::exec::ud());
        }
        let from = self.cpu.rip;
        let selector = ((self.cpu.msr.star >> 32) & 0xFFFC) as u16;
        self.cpu.gpr[RCX] = self.cpu.rip;
        self.cpu.gpr[R11] = self.cpu.rflags & !rflags::RF;
        self.cpu.segments[SegmentRegister::Cs as usize] = flat_segment(selector, 0, true, true);
        self.cpu.segments[SegmentRegister::Ss as usize] = flat_segment(selector + 8, 0, false, false);
        self.cpu.rflags &= !(self.cpu.msr.fmask | rflags::RF);
        self.cpu.rflags |= rflags::RESERVED1;
        self.cpu.cpl = 0;
        self.cpu.rip = self.cpu.msr.lstar;
        self.mode = self.cpu.code_mode();
        self.notify_transfer(Transfer::Syscall { from: from.wrapping_sub(2), to: self.cpu.rip });
        Ok(())
    }

    /// Tells the observer about a privilege transfer (compiled out when nothing observes).
    fn notify_transfer(&mut self, transfer: Transfer) {
        if O::ENABLED {
            let index = self.index_in_block;
            self.obs.transfer(index, &transfer);
        }
    }

    /// SYSENTER: the fast system call of 32-bit kernels. CS and SS come from IA32_SYSENTER_CS (flat, DPL 0;
    /// 64-bit code when long mode is active), ESP and EIP from the other two MSRs; VM, IF and RF are cleared.
    /// Recorded as a system call, as SYSCALL is: the engines see the same privilege transition.
    pub(crate) fn sysenter(&mut self) -> Result<(), Fault> {
        let selector = (self.cpu.msr.sysenter_cs & 0xFFFC) as u16;
        if self.cpu.cr0 & crate::cpu::cr0::PE == 0 || selector == 0 {
            return Err(gp0());
        }
        let from = self.cpu.rip.wrapping_sub(2);
        let long_mode = self.cpu.long_mode_active();
        let mask = if long_mode { u64::MAX } else { 0xFFFF_FFFF };
        self.cpu.segments[SegmentRegister::Cs as usize] = flat_segment(selector, 0, true, long_mode);
        self.cpu.segments[SegmentRegister::Ss as usize] = flat_segment(selector + 8, 0, false, false);
        self.cpu.rflags &= !(rflags::VM | rflags::IF | rflags::RF);
        self.cpu.cpl = 0;
        self.cpu.gpr[RSP] = self.cpu.msr.sysenter_esp & mask;
        self.cpu.rip = self.cpu.msr.sysenter_eip & mask;
        self.mode = self.cpu.code_mode();
        self.notify_transfer(Transfer::Syscall { from, to: self.cpu.rip });
        Ok(())
    }

    /// SYSEXIT: back to CPL 3 at EDX with ESP from ECX, CS and SS at fixed offsets from IA32_SYSENTER_CS
    /// (+16/+24, or +32/+40 for the 64-bit form). Flags are left as they are, so a kernel sets IF itself.
    pub(crate) fn sysexit(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        let base = (self.cpu.msr.sysenter_cs & 0xFFFC) as u16;
        if self.cpu.cr0 & crate::cpu::cr0::PE == 0 || base == 0 || self.cpu.cpl != 0 {
            return Err(gp0());
        }
        let from = instruction.ip();
        let to_64_bit = instruction.code() == Code::Sysexitq;
        let (code_selector, target, stack) = if to_64_bit {
            let (target, stack) = (self.cpu.gpr[RDX], self.cpu.gpr[RCX]);
            if !is_canonical(target) || !is_canonical(stack) {
                return Err(gp0());
            }
            (base.wrapping_add(32), target, stack)
        } else {
            (base.wrapping_add(16), self.cpu.gpr[RDX] & 0xFFFF_FFFF, self.cpu.gpr[RCX] & 0xFFFF_FFFF)
        };
        self.cpu.segments[SegmentRegister::Cs as usize] = flat_segment(code_selector | 3, 3, true, to_64_bit);
        self.cpu.segments[SegmentRegister::Ss as usize] =
            flat_segment(code_selector.wrapping_add(8) | 3, 3, false, false);
        self.cpu.cpl = 3;
        self.cpu.gpr[RSP] = stack;
        self.cpu.rip = target;
        self.mode = self.cpu.code_mode();
        self.notify_transfer(Transfer::Sysret { from, to: target });
        Ok(())
    }

    pub(crate) fn sysret(&mut self, instruction: &Instruction) -> Result<(), Fault> {
        if self.cpu.efer & crate::cpu::efer::SCE == 0 || self.mode != CodeMode::Bits64 {
            return Err(crate::exec::ud());
        }
        self.require_cpl0()?;
        let from = instruction.ip();
        let base = ((self.cpu.msr.star >> 48) & 0xFFFF) as u16;
        let to_64_bit = instruction.code() == Code::Sysretq;
        let target = self.cpu.gpr[RCX];
        if to_64_bit && !is_canonical(target) {
            return Err(gp0());
        }
        let (code_selector, target) =
            if to_64_bit { (base.wrapping_add(16) | 3, target) } else { (base | 3, target & 0xFFFF_FFFF) };
        self.cpu.segments[SegmentRegister::Cs as usize] = flat_segment(code_selector, 3, true, to_64_bit);
        self.cpu.segments[SegmentRegister::Ss as usize] = flat_segment(base.wrapping_add(8) | 3, 3, false, false);
        self.cpu.rflags = (self.cpu.gpr[R11] & rflags::WRITABLE & !(rflags::RF | rflags::VM)) | rflags::RESERVED1;
        self.cpu.cpl = 3;
        self.cpu.rip = target;
        self.mode = self.cpu.code_mode();
        self.notify_transfer(Transfer::Sysret { from, to: target });
        Ok(())
    }
}
