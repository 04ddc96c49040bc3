//! Kernel-mode drivers (CPL 0), for the benchmarks the literature runs in kernel mode. Each loops
//! `iterations` times with R12 as the counter, checks its result, and ends through
//! `report_success` or a failure path.

use iced_x86::code_asm::*;

use super::shared_drivers::*;
use super::{emit_register_probes, ProbeFailures};
use crate::catalog::ResolvedParams;
use crate::kernel::boot::KERNEL_CODE_ACCESS_RIGHTS;
use crate::kernel::{AsmResult, Kernel};
use crate::layout::*;

const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;
/// What `rdmsr` expects to read back: any canonical address works.
const KERNEL_GS_BASE_VALUE: u64 = 0x0000_1234_5678_9ABC;
/// The page-table entry `ptemod` rewrites: the last 4 KiB page of the first 2 MiB, which nothing
/// touches, so the hardware never sets its accessed bit.
const PTEMOD_ENTRY: u64 = KERNEL_PT_LOW + 511 * 8;
const PTEMOD_VALUE: i32 = (0x1F_F000 | PTE_PRESENT | PTE_WRITABLE) as i32;
const RFLAGS_IF: u32 = 0x200;

pub(crate) fn emit(k: &mut Kernel, name: &str, params: &ResolvedParams) -> AsmResult {
    let iterations = params.get("iterations");
    match name {
        "in" => port_in(k, iterations),
        "cr8wr" => cr8_write(k, iterations),
        "callret" => call_return(k, iterations),
        "ptemod" => pte_modify(k, iterations),
        "cpuid" => cpuid(k, iterations),
        "cr8rd" => cr8_read(k, iterations),
        "rdmsr" => msr_read(k, iterations),
        "wrmsr" => msr_write(k, MSR_KERNEL_GS_BASE, iterations),
        "inl" => port_in_dword(k, iterations),
        "outl" => port_out_dword(k, iterations),
        "hlt" => halt(k, iterations),
        "mmio" => mmio(k, iterations),
        "sensitive-kernel" => sensitive_kernel(k, iterations, params.get("segment-probes") == 1),
        "boot" => boot(k, iterations),
        _ => unreachable!("kernel-mode catalog entry `{name}` has no driver"),
    }
}

fn cr8_write(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("CR8 does not read back as written");
    k.a.xor(eax, eax)?;
    k.counted_loop(iterations, |k| k.a.mov(cr8, rax))?;
    k.a.mov(rax, cr8)?;
    k.a.test(rax, rax)?;
    k.a.jnz(wrong)?;
    k.a.jmp(k.r.report_success)
}

fn call_return(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("stack pointer moved across call/ret");
    let mut empty_function = k.label();
    let mut after = k.label();
    k.a.mov(r13, rsp)?;
    k.counted_loop(iterations, |k| k.a.call(empty_function))?;
    k.a.cmp(rsp, r13)?;
    k.a.jne(wrong)?;
    k.a.jmp(after)?;
    k.bind(&mut empty_function)?;
    k.a.ret()?;
    k.bind(&mut after)?;
    k.a.jmp(k.r.report_success)
}

fn pte_modify(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("page-table entry changed");
    k.counted_loop(iterations, |k| {
        k.a.mov(rax, qword_ptr(PTEMOD_ENTRY))?;
        k.a.mov(qword_ptr(PTEMOD_ENTRY), rax)
    })?;
    k.a.cmp(qword_ptr(PTEMOD_ENTRY), PTEMOD_VALUE)?;
    k.a.jne(wrong)?;
    k.a.jmp(k.r.report_success)
}

/// The vendor string (EBX, EDX, ECX of leaf 0) must not change between executions.
fn cpuid(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("CPUID leaf 0 vendor changed between executions");
    k.a.xor(eax, eax)?;
    k.a.xor(ecx, ecx)?;
    k.a.cpuid()?;
    k.a.mov(r13d, ebx)?;
    k.a.mov(r14d, ecx)?;
    k.a.mov(r15d, edx)?;
    k.counted_loop(iterations, |k| {
        k.a.xor(eax, eax)?;
        k.a.xor(ecx, ecx)?;
        k.a.cpuid()?;
        k.a.cmp(ebx, r13d)?;
        k.a.jne(wrong)?;
        k.a.cmp(ecx, r14d)?;
        k.a.jne(wrong)?;
        k.a.cmp(edx, r15d)?;
        k.a.jne(wrong)
    })?;
    k.a.jmp(k.r.report_success)
}

fn cr8_read(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("CR8 is not 0");
    k.counted_loop(iterations, |k| {
        k.a.mov(rax, cr8)?;
        k.a.test(rax, rax)?;
        k.a.jnz(wrong)
    })?;
    k.a.jmp(k.r.report_success)
}

fn write_kernel_gs_base(k: &mut Kernel, value: u64) -> AsmResult {
    k.a.mov(ecx, MSR_KERNEL_GS_BASE)?;
    k.a.mov(eax, value as u32)?;
    k.a.mov(edx, (value >> 32) as u32)?;
    k.a.wrmsr()
}

fn msr_read(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("RDMSR did not return the value written");
    write_kernel_gs_base(k, KERNEL_GS_BASE_VALUE)?;
    k.counted_loop(iterations, |k| {
        k.a.mov(ecx, MSR_KERNEL_GS_BASE)?;
        k.a.rdmsr()?;
        k.a.cmp(eax, KERNEL_GS_BASE_VALUE as u32)?;
        k.a.jne(wrong)?;
        k.a.cmp(edx, (KERNEL_GS_BASE_VALUE >> 32) as u32)?;
        k.a.jne(wrong)
    })?;
    k.a.jmp(k.r.report_success)
}

/// Each HLT is woken by an interrupt, and only the timer is unmasked.
fn halt(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong = k.failure("fewer timer interrupts than HLTs");
    k.a.mov(r13, qword_ptr(VAR_TIMER_TICKS))?;
    k.counted_loop(iterations, |k| {
        k.a.sti()?;
        k.a.hlt()?;
        k.a.cli()
    })?;
    k.a.mov(rax, qword_ptr(VAR_TIMER_TICKS))?;
    k.a.sub(rax, r13)?;
    k.a.mov(rcx, iterations)?;
    k.a.cmp(rax, rcx)?;
    k.a.jb(wrong)?;
    k.a.jmp(k.r.report_success)
}

fn sensitive_kernel(k: &mut Kernel, iterations: u64, segment_probes: bool) -> AsmResult {
    let probe_failures = ProbeFailures::new(|message| k.failure(message));
    let wrong_if = k.failure("POPF did not change IF in kernel mode");
    let segment_failures = segment_probes.then(|| {
        (
            k.failure("LAR did not return the kernel code segment's access rights"),
            k.failure("LSL did not return the flat data segment limit"),
            k.failure("VERR/VERW rejected a kernel segment"),
        )
    });
    let wrong_selectors = k.failure("MOV from CS/SS did not return the kernel selectors");
    k.a.sub(rsp, 16)?;
    k.counted_loop(iterations, |k| {
        emit_register_probes(&mut k.a, &probe_failures)?;
        // POPF sets IF, then clears it again: each change must be visible to PUSHF.
        k.a.pushfq()?;
        k.a.pop(rax)?;
        k.a.or(eax, RFLAGS_IF)?;
        k.a.push(rax)?;
        k.a.popfq()?;
        k.a.pushfq()?;
        k.a.pop(rcx)?;
        k.a.test(ecx, RFLAGS_IF)?;
        k.a.jz(wrong_if)?;
        k.a.and(eax, !RFLAGS_IF)?;
        k.a.push(rax)?;
        k.a.popfq()?;
        k.a.pushfq()?;
        k.a.pop(rcx)?;
        k.a.test(ecx, RFLAGS_IF)?;
        k.a.jnz(wrong_if)?;
        if let Some((wrong_lar, wrong_lsl, wrong_verify)) = segment_failures {
            emit_lar_check(&mut k.a, KERNEL_CODE_SELECTOR, KERNEL_CODE_ACCESS_RIGHTS, wrong_lar)?;
            emit_flat_lsl_check(&mut k.a, KERNEL_DATA_SELECTOR, wrong_lsl)?;
            k.a.verr(cx)?;
            k.a.jnz(wrong_verify)?;
            k.a.verw(cx)?;
            k.a.jnz(wrong_verify)?;
        }
        emit_selector_check(&mut k.a, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, wrong_selectors)
    })?;
    k.a.add(rsp, 16)?;
    k.a.jmp(k.r.report_success)
}

/// Start-up ran once before the banner; run it `iterations - 1` more times, then check that the
/// tables are loaded and the frame pool is whole again.
fn boot(k: &mut Kernel, iterations: u64) -> AsmResult {
    let wrong_tr = k.failure("STR did not return the TSS selector after start-up");
    let wrong_pool = k.failure("the page-frame pool is not intact after start-up");
    if iterations > 1 {
        k.counted_loop(iterations - 1, |k| k.a.call(k.r.kernel_init))?;
    }
    k.a.str(eax)?;
    k.a.cmp(ax, TSS_SELECTOR as u32)?;
    k.a.jne(wrong_tr)?;
    k.a.cmp(qword_ptr(VAR_FREE_FRAMES), FRAME_POOL_FRAMES as i32)?;
    k.a.jne(wrong_pool)?;
    k.a.cmp(dword_ptr((FRAME_POOL_FRAMES - 1) * 4 + FRAME_STACK), (FRAME_POOL_END - 4096) as i32)?;
    k.a.jne(wrong_pool)?;
    k.a.jmp(k.r.report_success)
}
