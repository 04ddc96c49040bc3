//! The kernel-mode drivers whose code is the same in 64-bit and 32-bit mode (port I/O and WRMSR use 8- and 32-bit
//! registers only), written once for both kernels, and the segment checks `sensitive-kernel` and `redpill` share.

use iced_x86::code_asm::*;

use crate::kernel::boot::FLAT_LIMIT;
use crate::kernel::{AsmResult, Kernel};
use crate::kernel32::Kernel32;
use crate::machine::MACHINE;

/// What a shared driver needs of a kernel.
pub(crate) trait DriverKernel {
    fn asm(&mut self) -> &mut CodeAssembler;
    /// A label that reports a failed self-check with `message` and ends the run.
    fn failure_path(&mut self, message: &str) -> CodeLabel;
    fn success_path(&self) -> CodeLabel;
    /// The low 32 bits of the loop counter, counting down from `iterations` to 1.
    fn counter32(&self) -> AsmRegister32;
    /// A register for a 32-bit pointer (kept by the kernel's routines) and the dword it points at.
    fn scratch(&self) -> (AsmRegister32, AsmMemoryOperand);
    /// Loads the counter with `iterations`; `body`; decrements it and loops while it is not 0.
    fn counted_loop(&mut self, iterations: u64, body: impl FnOnce(&mut Self) -> AsmResult) -> AsmResult;
}

/// Both kernels' implementations: they differ in the counter register (R12 with a 64-bit load, or EBP) and in
/// the scratch pointer register (R13 or EBX).
macro_rules! driver_kernel {
    ($kernel:ty, $counter:expr, $counter32:expr, $load:ty, $scratch32:expr, $scratch:expr) => {
        impl DriverKernel for $kernel {
            fn asm(&mut self) -> &mut CodeAssembler {
                &mut self.a
            }

            fn failure_path(&mut self, message: &str) -> CodeLabel {
                self.failure(message)
            }

            fn success_path(&self) -> CodeLabel {
                self.r.report_success
            }

            fn counter32(&self) -> AsmRegister32 {
                $counter32
            }

            fn scratch(&self) -> (AsmRegister32, AsmMemoryOperand) {
                ($scratch32, dword_ptr($scratch))
            }

            fn counted_loop(&mut self, iterations: u64, body: impl FnOnce(&mut Self) -> AsmResult) -> AsmResult {
                let mut top = self.label();
                self.a.mov($counter, iterations as $load)?;
                self.bind(&mut top)?;
                body(self)?;
                self.a.dec($counter)?;
                self.a.jnz(top)
            }
        }
    };
}

driver_kernel!(Kernel, r12, r12d, u64, r13d, r13);
driver_kernel!(Kernel32, ebp, ebp, u32, ebx, ebx);

pub(crate) fn port_in(k: &mut impl DriverKernel, iterations: u64) -> AsmResult {
    let wrong = k.failure_path("IN from the POST port did not read 0xff");
    k.counted_loop(iterations, |k| k.asm().in_(al, MACHINE.post_port as u32))?;
    let success = k.success_path();
    let a = k.asm();
    a.cmp(al, MACHINE.post_port_read_value as u32)?;
    a.jne(wrong)?;
    a.jmp(success)
}

pub(crate) fn port_in_dword(k: &mut impl DriverKernel, iterations: u64) -> AsmResult {
    let wrong = k.failure_path("IN from the unassigned port did not read all ones");
    k.asm().mov(dx, MACHINE.unassigned_test_port as u32)?;
    k.counted_loop(iterations, |k| k.asm().in_(eax, dx))?;
    let success = k.success_path();
    let a = k.asm();
    a.cmp(eax, MACHINE.unassigned_port_read_value)?;
    a.jne(wrong)?;
    a.jmp(success)
}

/// Writes the loop counter; nothing may latch it, so a read afterwards still sees all ones.
pub(crate) fn port_out_dword(k: &mut impl DriverKernel, iterations: u64) -> AsmResult {
    let wrong = k.failure_path("the unassigned port kept a written value");
    k.asm().mov(dx, MACHINE.unassigned_test_port as u32)?;
    k.counted_loop(iterations, |k| {
        let counter = k.counter32();
        k.asm().mov(eax, counter)?;
        k.asm().out(dx, eax)
    })?;
    let success = k.success_path();
    let a = k.asm();
    a.in_(eax, dx)?;
    a.cmp(eax, MACHINE.unassigned_port_read_value)?;
    a.jne(wrong)?;
    a.jmp(success)
}

/// WRMSR of `msr` with the loop counter each time, so the last value written is 1.
pub(crate) fn msr_write(k: &mut impl DriverKernel, msr: u32, iterations: u64) -> AsmResult {
    let wrong = k.failure_path("RDMSR did not return the last value written");
    k.asm().xor(edx, edx)?;
    k.counted_loop(iterations, |k| {
        let counter = k.counter32();
        let a = k.asm();
        a.mov(ecx, msr)?;
        a.mov(eax, counter)?;
        a.wrmsr()
    })?;
    let success = k.success_path();
    let a = k.asm();
    a.mov(ecx, msr)?;
    a.rdmsr()?;
    a.cmp(eax, 1)?;
    a.jne(wrong)?;
    a.test(edx, edx)?;
    a.jnz(wrong)?;
    a.jmp(success)
}

/// No device answers in the MMIO test region: writes are dropped and reads return 0.
pub(crate) fn mmio(k: &mut impl DriverKernel, iterations: u64) -> AsmResult {
    let wrong = k.failure_path("the MMIO test region did not read 0");
    let (pointer, dword) = k.scratch();
    k.asm().mov(pointer, MACHINE.mmio_test_base as u32)?;
    k.counted_loop(iterations, |k| {
        let counter = k.counter32();
        let a = k.asm();
        a.mov(dword, counter)?;
        a.mov(eax, dword)?;
        a.test(eax, eax)?;
        a.jnz(wrong)
    })?;
    let success = k.success_path();
    k.asm().jmp(success)
}

/// LAR of `selector` must succeed (ZF) and return `access_rights`; leaves the selector in ECX.
pub(crate) fn emit_lar_check(a: &mut CodeAssembler, selector: u16, access_rights: u32, wrong: CodeLabel) -> AsmResult {
    a.mov(ecx, u32::from(selector))?;
    a.lar(eax, ecx)?;
    a.jnz(wrong)?;
    a.cmp(eax, access_rights)?;
    a.jne(wrong)
}

/// LSL of `selector` must succeed and return the flat limit; leaves the selector in ECX.
pub(crate) fn emit_flat_lsl_check(a: &mut CodeAssembler, selector: u16, wrong: CodeLabel) -> AsmResult {
    a.mov(ecx, u32::from(selector))?;
    a.lsl(eax, ecx)?;
    a.jnz(wrong)?;
    a.cmp(eax, FLAT_LIMIT)?;
    a.jne(wrong)
}

/// MOV from CS and SS must return `code` and `data`.
pub(crate) fn emit_selector_check(a: &mut CodeAssembler, code: u16, data: u16, wrong: CodeLabel) -> AsmResult {
    a.mov(ax, cs)?;
    a.cmp(ax, u32::from(code))?;
    a.jne(wrong)?;
    a.mov(ax, ss)?;
    a.cmp(ax, u32::from(data))?;
    a.jne(wrong)
}
