//! The serial console (COM1), number printing, and the ways a run ends (isa-debug-exit).

use iced_x86::code_asm::*;

use super::{AsmResult, Kernel};
use crate::layout::{
    VAR_COUNT_COW_FAULTS, VAR_COUNT_PAGES_COPIED, VAR_COUNT_PAGE_TABLES, VAR_COUNT_PTES_SHARED, VAR_COUNT_ZERO_FILLS,
};
use crate::machine::{exit_code, MACHINE};

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_serial_init(k)?;
    emit_serial_write(k)?;
    emit_print_unsigned(k)?;
    emit_run_endings(k)
}

/// 115200 baud, 8N1, FIFOs on, no interrupts: the usual 16550 set-up, as (port, byte) writes (shared with the
/// 32-bit kernel).
pub(crate) fn serial_init_writes() -> [(u16, u8); 7] {
    let port = MACHINE.serial_port;
    [
        (port + 1, 0x00), // interrupts off
        (port + 3, 0x80), // DLAB on to reach the divisor latch
        (port, 0x01),     // divisor 1: 115200 baud
        (port + 1, 0x00),
        (port + 3, 0x03), // 8 data bits, no parity, one stop bit, DLAB off
        (port + 2, 0xC7), // FIFOs on and cleared
        (port + 4, 0x03), // DTR and RTS
    ]
}

fn emit_serial_init(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.serial_init;
    k.bind(&mut entry)?;
    for (register, value) in serial_init_writes() {
        k.a.mov(dx, register as u32)?;
        k.a.mov(al, value as u32)?;
        k.a.out(dx, al)?;
    }
    k.a.ret()
}

/// serial_write(RSI = bytes, RDX = length): writes the bytes to the transmit holding register.
/// The emulated UART accepts a byte at any time, so the line status register is not polled.
fn emit_serial_write(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.serial_write;
    let mut next_byte = k.label();
    let mut done = k.label();
    k.bind(&mut entry)?;
    k.a.mov(r8, rdx)?;
    k.a.test(r8, r8)?;
    k.a.jz(done)?;
    k.a.mov(dx, MACHINE.serial_port as u32)?;
    k.bind(&mut next_byte)?;
    k.a.mov(al, byte_ptr(rsi))?;
    k.a.out(dx, al)?;
    k.a.inc(rsi)?;
    k.a.dec(r8)?;
    k.a.jnz(next_byte)?;
    k.bind(&mut done)?;
    k.a.ret()
}

/// print_unsigned(RDI = value, RSI = base 10 or 16): digits built backwards in a stack buffer.
fn emit_print_unsigned(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.print_unsigned;
    let mut next_digit = k.label();
    let mut is_decimal_digit = k.label();
    k.bind(&mut entry)?;
    k.a.sub(rsp, 32)?;
    k.a.mov(rax, rdi)?;
    k.a.mov(rcx, rsi)?;
    k.a.lea(r9, ptr(rsp + 32))?;
    k.bind(&mut next_digit)?;
    k.a.xor(edx, edx)?;
    k.a.div(rcx)?;
    k.a.add(dl, b'0' as u32)?;
    k.a.cmp(dl, b'9' as u32)?;
    k.a.jbe(is_decimal_digit)?;
    k.a.add(dl, (b'a' - b'9' - 1) as u32)?;
    k.bind(&mut is_decimal_digit)?;
    k.a.dec(r9)?;
    k.a.mov(byte_ptr(r9), dl)?;
    k.a.test(rax, rax)?;
    k.a.jnz(next_digit)?;
    k.a.mov(rsi, r9)?;
    k.a.lea(rdx, ptr(rsp + 32))?;
    k.a.sub(rdx, r9)?;
    k.a.call(k.r.serial_write)?;
    k.a.add(rsp, 32)?;
    k.a.ret()
}

/// exit_machine(EDI = code), report_success, report_failure(RSI = message, RDX = length).
fn emit_run_endings(k: &mut Kernel) -> AsmResult {
    let mut exit_machine = k.r.exit_machine;
    let mut stopped = k.label();
    k.bind(&mut exit_machine)?;
    k.a.mov(eax, edi)?;
    k.a.out(MACHINE.debug_exit_port as u32, eax)?;
    // Only reached on a machine without the exit device: stop for good.
    k.a.cli()?;
    k.bind(&mut stopped)?;
    k.a.hlt()?;
    k.a.jmp(stopped)?;

    let mut success = k.r.report_success;
    k.bind(&mut success)?;
    if k.print_counters {
        let counters = [
            ("counters: page-tables=", VAR_COUNT_PAGE_TABLES),
            (" ptes-shared=", VAR_COUNT_PTES_SHARED),
            (" cow-faults=", VAR_COUNT_COW_FAULTS),
            (" pages-copied=", VAR_COUNT_PAGES_COPIED),
            (" zero-fills=", VAR_COUNT_ZERO_FILLS),
        ];
        for (label, variable) in counters {
            k.print(label)?;
            k.a.mov(rdi, qword_ptr(variable))?;
            k.print_number(10)?;
        }
        k.print("\n")?;
    }
    k.print("ok\n")?;
    k.a.mov(edi, exit_code::SUCCESS)?;
    k.a.jmp(k.r.exit_machine)?;

    let mut failure = k.r.report_failure;
    k.bind(&mut failure)?;
    k.a.push(rsi)?;
    k.a.push(rdx)?;
    k.print("FAIL: ")?;
    k.a.pop(rdx)?;
    k.a.pop(rsi)?;
    k.a.call(k.r.serial_write)?;
    k.print("\n")?;
    k.a.mov(edi, exit_code::CHECK_FAILED)?;
    k.a.jmp(k.r.exit_machine)
}
