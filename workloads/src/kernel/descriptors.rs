//! Loading the GDT, building the IDT and loading the TSS. The GDT itself is static data in the
//! image's first page (see `boot`); the IDT is built at run time from the handlers' addresses.

use iced_x86::code_asm::*;

use super::{AsmResult, Kernel};
use crate::layout::*;

/// 64-bit interrupt gate, present, DPL 0: IF is cleared on entry, so the kernel never nests.
const INTERRUPT_GATE: u32 = 0x8E00;
/// Offset of the I/O-permission-bitmap base in the TSS; pointing it past the limit denies user I/O.
const TSS_IOPB_OFFSET: u64 = 102;
/// Byte of the TSS descriptor holding its type; bit 1 is the busy flag that LTR sets.
const TSS_DESCRIPTOR_TYPE_BYTE: u64 = GDT_ADDRESS + TSS_SELECTOR as u64 + 5;

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_set_interrupt_gate(k)?;
    emit_load_descriptor_tables(k)
}

/// set_interrupt_gate(EDI = vector, RSI = handler).
fn emit_set_interrupt_gate(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.set_interrupt_gate;
    k.bind(&mut entry)?;
    k.a.shl(edi, 4)?;
    k.a.add(rdi, IDT_ADDRESS as i32)?;
    k.a.mov(eax, esi)?;
    k.a.and(eax, 0xFFFF)?;
    k.a.or(eax, (KERNEL_CODE_SELECTOR as u32) << 16)?;
    k.a.mov(dword_ptr(rdi), eax)?;
    k.a.mov(eax, esi)?;
    k.a.and(eax, 0xFFFF_0000u32)?;
    k.a.or(eax, INTERRUPT_GATE)?;
    k.a.mov(dword_ptr(rdi + 4), eax)?;
    k.a.mov(rax, rsi)?;
    k.a.shr(rax, 32)?;
    k.a.mov(dword_ptr(rdi + 8), eax)?;
    k.a.mov(dword_ptr(rdi + 12), 0)?;
    k.a.ret()
}

/// Reloads the GDT, builds and loads the IDT, and loads the TSS (clearing its busy flag first so
/// the routine can run again, as the `boot` workload does).
fn emit_load_descriptor_tables(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.load_descriptor_tables;
    k.bind(&mut entry)?;
    k.a.lgdt(ptr(GDT_POINTER_ADDRESS))?;
    for vector in 0..IDT_ENTRIES as usize {
        let handler = match vector as u64 {
            0 => k.r.divide_error_handler,
            14 => k.r.page_fault_handler,
            32 => k.r.timer_handler,
            39 => k.r.spurious_irq_handler,
            _ => k.r.exception_stubs[vector],
        };
        k.a.mov(edi, vector as u32)?;
        k.a.lea(rsi, ptr(handler))?;
        k.a.call(k.r.set_interrupt_gate)?;
    }
    k.a.mov(word_ptr(VAR_IDT_POINTER), (IDT_ENTRIES * 16 - 1) as u32)?;
    k.a.mov(rax, IDT_ADDRESS)?;
    k.a.mov(qword_ptr(VAR_IDT_POINTER + 2), rax)?;
    k.a.lidt(ptr(VAR_IDT_POINTER))?;
    k.a.mov(word_ptr(TSS_ADDRESS + TSS_IOPB_OFFSET), TSS_BYTES as u32)?;
    k.a.and(byte_ptr(TSS_DESCRIPTOR_TYPE_BYTE), !2u32 & 0xFF)?;
    k.a.mov(ax, TSS_SELECTOR as u32)?;
    k.a.ltr(ax)?;
    k.a.ret()
}
