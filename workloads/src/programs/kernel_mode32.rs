//! Kernel-mode drivers (CPL 0) of the 32-bit kernel: the same benchmarks and self-checks as `kernel_mode.rs`,
//! in 32-bit code. Each loops `iterations` times with EBP as the counter and ends through `report_success` or a
//! failure path.

use iced_x86::code_asm::*;

use super::shared_drivers::*;
use super::{emit_register_probes_32, ProbeFailures};
use crate::asm32::{selector, MSR_SYSENTER_ESP};
use crate::catalog::ResolvedParams;
use crate::kernel::AsmResult;
use crate::kernel32::{gdt, Kernel32, PAGE_DIRECTORY, PAGE_TABLE_LOW, PTE_PRESENT_WRITABLE, VAR_TIMER_TICKS};
use crate::layout::BOOT_STACK_TOP;

/// The page-table entry `ptemod` rewrites: the last 4 KiB page of the first 4 MiB, which nothing touches, so the
/// hardware never sets its accessed bit.
const PTEMOD_ENTRY: u32 = PAGE_TABLE_LOW + 1023 * 4;
const PTEMOD_VALUE: u32 = 0x3F_F000 | PTE_PRESENT_WRITABLE;
/// The MSR of `rdmsr` and `wrmsr`. IA32_KERNEL_GS_BASE, the 64-bit kernel's, does not exist outside long mode;
/// IA32_SYSENTER_ESP is one a 32-bit kernel really writes (on every context switch, in Linux).
const MSR: u32 = MSR_SYSENTER_ESP;
/// What `rdmsr` expects to read back: a kernel stack top, as a 32-bit kernel would write.
const MSR_VALUE: u32 = BOOT_STACK_TOP as u32;
const EFLAGS_IF: u32 = 0x200;

/// Why a catalog workload cannot have a 32-bit build at all, if it cannot.
pub(crate) fn only_64_bit(name: &str) -> Option<&'static str> {
    matches!(name, "cr8wr" | "cr8rd").then_some(
        "CR8 exists only in 64-bit mode (a 32-bit kernel sets the task priority in the local APIC's TPR instead)",
    )
}

pub(crate) fn emit(k: &mut Kernel32, name: &str, params: &ResolvedParams) -> AsmResult {
    let iterations = params.get("iterations");
    match name {
        "in" => port_in(k, iterations),
        "callret" => call_return(k, iterations),
        "ptemod" => pte_modify(k, iterations),
        "cpuid" => cpuid(k, iterations),
        "rdmsr" => msr_read(k, iterations),
        "wrmsr" => msr_write(k, MSR, iterations),
        "inl" => port_in_dword(k, iterations),
        "outl" => port_out_dword(k, iterations),
        "hlt" => halt(k, iterations),
        "mmio" => mmio(k, iterations),
        "sensitive-kernel" => sensitive_kernel(k, iterations, params.get("segment-probes") == 1),
        "boot" => boot(k, iterations),
        _ => unreachable!("kernel-mode catalog entry `{name}` has no 32-bit driver"),
    }
}

fn call_return(k: &mut Kernel32, iterations: u64) -> AsmResult {
    let wrong = k.failure("stack pointer moved across call/ret");
    let mut empty_function = k.label();
    let mut after = k.label();
    k.a.mov(ebx, esp)?;
    k.counted_loop(iterations, |k| k.a.call(empty_function))?;
    k.a.cmp(esp, ebx)?;
    k.a.jne(wrong)?;
    k.a.jmp(after)?;
    k.bind(&mut empty_function)?;
    k.a.ret()?;
    k.bind(&mut after)?;
    k.a.jmp(k.r.report_success)
}

fn pte_modify(k: &mut Kernel32, iterations: u64) -> AsmResult {
    let wrong = k.failure("page-table entry changed");
    k.counted_loop(iterations, |k| {
        k.a.mov(eax, dword_ptr(PTEMOD_ENTRY))?;
        k.a.mov(dword_ptr(PTEMOD_ENTRY), eax)
    })?;
    k.a.cmp(dword_ptr(PTEMOD_ENTRY), PTEMOD_VALUE as i32)?;
    k.a.jne(wrong)?;
    k.a.jmp(k.r.report_success)
}

/// The vendor string (EBX, EDX, ECX of leaf 0) must not change between executions; the first is kept on the
/// stack, since CPUID overwrites every register it could live in.
fn cpuid(k: &mut Kernel32, iterations: u64) -> AsmResult {
    let wrong = k.failure("CPUID leaf 0 vendor changed between executions");
    k.a.xor(eax, eax)?;
    k.a.xor(ecx, ecx)?;
    k.a.cpuid()?;
    k.a.push(edx)?;
    k.a.push(ecx)?;
    k.a.push(ebx)?;
    k.counted_loop(iterations, |k| {
        k.a.xor(eax, eax)?;
        k.a.xor(ecx, ecx)?;
        k.a.cpuid()?;
        k.a.cmp(ebx, dword_ptr(esp))?;
        k.a.jne(wrong)?;
        k.a.cmp(ecx, dword_ptr(esp + 4))?;
        k.a.jne(wrong)?;
        k.a.cmp(edx, dword_ptr(esp + 8))?;
        k.a.jne(wrong)
    })?;
    k.a.add(esp, 12)?;
    k.a.jmp(k.r.report_success)
}

fn msr_read(k: &mut Kernel32, iterations: u64) -> AsmResult {
    let wrong = k.failure("RDMSR did not return the value written");
    k.a.mov(ecx, MSR)?;
    k.a.mov(eax, MSR_VALUE)?;
    k.a.xor(edx, edx)?;
    k.a.wrmsr()?;
    k.counted_loop(iterations, |k| {
        k.a.mov(ecx, MSR)?;
        k.a.rdmsr()?;
        k.a.cmp(eax, MSR_VALUE)?;
        k.a.jne(wrong)?;
        k.a.test(edx, edx)?;
        k.a.jnz(wrong)
    })?;
    k.a.jmp(k.r.report_success)
}

/// Each HLT is woken by an interrupt through a 32-bit interrupt gate, and only the timer is unmasked.
fn halt(k: &mut Kernel32, iterations: u64) -> AsmResult {
    let wrong = k.failure("fewer timer interrupts than HLTs");
    k.a.mov(ebx, dword_ptr(VAR_TIMER_TICKS))?;
    k.counted_loop(iterations, |k| {
        k.a.sti()?;
        k.a.hlt()?;
        k.a.cli()
    })?;
    k.a.mov(eax, dword_ptr(VAR_TIMER_TICKS))?;
    k.a.sub(eax, ebx)?;
    k.a.cmp(eax, iterations as u32)?;
    k.a.jb(wrong)?;
    k.a.jmp(k.r.report_success)
}

/// SGDT, SIDT (6-byte images in 32-bit code), SLDT, STR and SMSW against the kernel's own values, PUSHFD/POPFD
/// changing IF, LAR/LSL/VERR/VERW on the 32-bit descriptors, and MOV from CS/SS.
fn sensitive_kernel(k: &mut Kernel32, iterations: u64, segment_probes: bool) -> AsmResult {
    let probes = ProbeFailures::new(|message| k.failure(message));
    let wrong_if = k.failure("POPFD did not change IF in kernel mode");
    let segment_failures = segment_probes.then(|| {
        (
            k.failure("LAR did not return the kernel code segment's access rights"),
            k.failure("LSL did not return the flat data segment limit"),
            k.failure("VERR/VERW rejected a kernel segment"),
        )
    });
    let wrong_selectors = k.failure("MOV from CS/SS did not return the kernel selectors");
    // What LAR returns: the descriptor's high dword masked to the access byte and the flags nibble.
    let code_access_rights = (gdt()[usize::from(selector::KERNEL_CODE >> 3)] >> 32) as u32 & 0x00F0_FF00;
    k.a.sub(esp, 8)?;
    k.counted_loop(iterations, |k| {
        emit_register_probes_32(&mut k.a, &probes)?;
        // POPFD sets IF, then clears it again: each change must be visible to PUSHFD.
        for (set, expected_clear) in [(true, false), (false, true)] {
            k.a.pushfd()?;
            k.a.pop(eax)?;
            if set {
                k.a.or(eax, EFLAGS_IF)?;
            } else {
                k.a.and(eax, !EFLAGS_IF)?;
            }
            k.a.push(eax)?;
            k.a.popfd()?;
            k.a.pushfd()?;
            k.a.pop(ecx)?;
            k.a.test(ecx, EFLAGS_IF)?;
            if expected_clear {
                k.a.jnz(wrong_if)?;
            } else {
                k.a.jz(wrong_if)?;
            }
        }
        if let Some((wrong_lar, wrong_lsl, wrong_verify)) = segment_failures {
            emit_lar_check(&mut k.a, selector::KERNEL_CODE, code_access_rights, wrong_lar)?;
            emit_flat_lsl_check(&mut k.a, selector::KERNEL_DATA, wrong_lsl)?;
            k.a.verr(cx)?;
            k.a.jnz(wrong_verify)?;
            k.a.verw(cx)?;
            k.a.jnz(wrong_verify)?;
        }
        emit_selector_check(&mut k.a, selector::KERNEL_CODE, selector::KERNEL_DATA, wrong_selectors)
    })?;
    k.a.add(esp, 8)?;
    k.a.jmp(k.r.report_success)
}

/// Start-up ran once before the banner; run it `iterations - 1` more times, then check that the task register
/// and the page directory are the kernel's.
fn boot(k: &mut Kernel32, iterations: u64) -> AsmResult {
    let wrong_tr = k.failure("STR did not return the TSS selector after start-up");
    let wrong_cr3 = k.failure("CR3 is not the kernel's page directory after start-up");
    if iterations > 1 {
        k.counted_loop(iterations - 1, |k| k.a.call(k.r.kernel_init))?;
    }
    k.a.str(eax)?;
    k.a.cmp(ax, u32::from(selector::TSS))?;
    k.a.jne(wrong_tr)?;
    k.a.mov(eax, cr3)?;
    k.a.cmp(eax, PAGE_DIRECTORY)?;
    k.a.jne(wrong_cr3)?;
    k.a.jmp(k.r.report_success)
}
