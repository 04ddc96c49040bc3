//! Exceptions and interrupts: per-vector entry stubs, the shared fault path (kill the process or
//! panic), the #DE handler with user trap delivery, the PIC and PIT set-up and the timer handler.

use iced_x86::code_asm::*;

use super::{AsmResult, Kernel};
use crate::layout::*;
use crate::machine::{exit_code, MACHINE};

/// Exceptions for which the CPU pushes an error code.
pub(crate) const VECTORS_WITH_ERROR_CODE: [u64; 8] = [8, 10, 11, 12, 13, 17, 21, 29];
/// A process killed by an exception exits with this plus the vector, like a shell's signal status.
pub const KILLED_STATUS_BASE: i32 = 128;
pub(crate) const END_OF_INTERRUPT: u32 = 0x20;
/// Caller-saved registers an interrupt handler saves before calling kernel routines.
pub(crate) const SCRATCH_REGISTERS: [AsmRegister64; 9] = [rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11];

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_exception_stubs(k)?;
    emit_fault_common(k)?;
    emit_divide_error(k)?;
    emit_timer(k)?;
    emit_interrupt_controller_init(k)
}

pub(crate) fn push_scratch(k: &mut Kernel) -> AsmResult {
    for register in SCRATCH_REGISTERS {
        k.a.push(register)?;
    }
    Ok(())
}

pub(crate) fn pop_scratch(k: &mut Kernel) -> AsmResult {
    for register in SCRATCH_REGISTERS.iter().rev() {
        k.a.pop(*register)?;
    }
    Ok(())
}

/// Every vector without a dedicated handler gets a stub that makes the stack uniform
/// (vector, error code, then the CPU's frame) and joins `fault_common`.
fn emit_exception_stubs(k: &mut Kernel) -> AsmResult {
    for vector in 0..IDT_ENTRIES {
        if matches!(vector, 0 | 14 | 32 | 39) {
            continue;
        }
        let mut stub = k.r.exception_stubs[vector as usize];
        k.bind(&mut stub)?;
        if !VECTORS_WITH_ERROR_CODE.contains(&vector) {
            k.a.push(0)?;
        }
        k.a.push(vector as i32)?;
        k.a.jmp(k.r.fault_common)?;
    }
    Ok(())
}

/// Stack on entry: vector, error code, RIP, CS, RFLAGS, RSP, SS. A fault in user mode kills the
/// process; anything else in kernel mode is a panic that ends the run.
fn emit_fault_common(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.fault_common;
    let mut in_kernel = k.label();
    k.bind(&mut entry)?;
    k.a.test(byte_ptr(rsp + 24), 3)?;
    k.a.jz(in_kernel)?;
    k.print("process ")?;
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(rdi, qword_ptr(rax + PROC_PID))?;
    k.print_number(10)?;
    k.print(" killed by vector ")?;
    k.a.mov(rdi, qword_ptr(rsp))?;
    k.print_number(10)?;
    k.print(" at rip 0x")?;
    k.a.mov(rdi, qword_ptr(rsp + 16))?;
    k.print_number(16)?;
    k.print("\n")?;
    k.a.mov(rdi, qword_ptr(rsp))?;
    k.a.add(rdi, KILLED_STATUS_BASE)?;
    k.a.jmp(k.r.exit_current)?;

    k.bind(&mut in_kernel)?;
    k.print("panic: vector ")?;
    k.a.mov(rdi, qword_ptr(rsp))?;
    k.print_number(10)?;
    k.print(" error 0x")?;
    k.a.mov(rdi, qword_ptr(rsp + 8))?;
    k.print_number(16)?;
    k.print(" rip 0x")?;
    k.a.mov(rdi, qword_ptr(rsp + 16))?;
    k.print_number(16)?;
    k.print(" cr2 0x")?;
    k.a.mov(rdi, cr2)?;
    k.print_number(16)?;
    k.print("\n")?;
    k.a.mov(edi, exit_code::KERNEL_PANIC)?;
    k.a.jmp(k.r.exit_machine)
}

/// #DE from user mode is delivered to the process's trap handler, if it registered one: the
/// handler starts with RDI = the faulting instruction's address and the interrupted RSP.
fn emit_divide_error(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.divide_error_handler;
    let mut no_handler = k.label();
    let mut fatal = k.label();
    k.bind(&mut entry)?;
    k.a.test(byte_ptr(rsp + 8), 3)?;
    k.a.jz(fatal)?;
    k.a.push(rax)?;
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(rax, qword_ptr(rax + PROC_TRAP_HANDLER))?;
    k.a.test(rax, rax)?;
    k.a.jz(no_handler)?;
    k.a.mov(rdi, qword_ptr(rsp + 8))?;
    k.a.mov(qword_ptr(rsp + 8), rax)?;
    k.a.pop(rax)?;
    k.a.iretq()?;
    k.bind(&mut no_handler)?;
    k.a.pop(rax)?;
    k.bind(&mut fatal)?;
    k.a.push(0)?;
    k.a.push(0)?;
    k.a.jmp(k.r.fault_common)
}

/// IRQ 0: count the tick, acknowledge it, and preempt a user process round-robin. A tick that
/// interrupts the kernel (only possible in `hlt` and the sensitive-instruction probe) just returns.
fn emit_timer(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.timer_handler;
    let mut done = k.label();
    k.bind(&mut entry)?;
    push_scratch(k)?;
    k.a.inc(qword_ptr(VAR_TIMER_TICKS))?;
    k.a.mov(al, END_OF_INTERRUPT)?;
    k.a.out(MACHINE.pic_master_ports.0 as u32, al)?;
    k.a.test(byte_ptr(rsp + (SCRATCH_REGISTERS.len() as i32 * 8 + 8)), 3)?;
    k.a.jz(done)?;
    k.a.call(k.r.schedule)?;
    k.bind(&mut done)?;
    pop_scratch(k)?;
    k.a.iretq()?;

    // A spurious IRQ 7 is not in service, so it must not be acknowledged.
    let mut spurious = k.r.spurious_irq_handler;
    k.bind(&mut spurious)?;
    k.a.iretq()
}

/// Remaps the PICs to vectors 0x20..0x2F, unmasks only IRQ 0, and starts the PIT at about 1 kHz: the (port,
/// byte) writes, shared with the 32-bit kernel.
pub(crate) fn interrupt_controller_writes() -> [(u16, u8); 13] {
    let m = MACHINE;
    let base = m.pic_vector_base;
    [
        (m.pic_master_ports.0, 0x11), // ICW1: edge, cascade, ICW4 follows
        (m.pic_slave_ports.0, 0x11),
        (m.pic_master_ports.1, base), // ICW2: vector base
        (m.pic_slave_ports.1, base + 8),
        (m.pic_master_ports.1, 0x04), // ICW3: slave on IRQ 2
        (m.pic_slave_ports.1, 0x02),
        (m.pic_master_ports.1, 0x01), // ICW4: 8086 mode
        (m.pic_slave_ports.1, 0x01),
        (m.pic_master_ports.1, m.pic_masks.0),
        (m.pic_slave_ports.1, m.pic_masks.1),
        (m.pit_command_port, m.pit_mode),
        (m.pit_channel0_port, (m.pit_divisor & 0xFF) as u8),
        (m.pit_channel0_port, (m.pit_divisor >> 8) as u8),
    ]
}

fn emit_interrupt_controller_init(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.interrupt_controller_init;
    k.bind(&mut entry)?;
    for (port, value) in interrupt_controller_writes() {
        k.a.mov(al, value as u32)?;
        k.a.out(port as u32, al)?;
    }
    k.a.ret()
}
