//! Workload drivers: what runs after start-up. Kernel-mode drivers are emitted straight after the
//! kernel's entry point; user-mode workloads are separate programs started as process 1.

mod kernel_mode;
mod kernel_mode32;
#[cfg(test)]
mod path_tests;
mod shared_drivers;
mod user_mode;
mod user_mode32;

use iced_x86::code_asm::*;

use crate::catalog::{Privilege, ResolvedParams, WorkloadError, WorkloadSpec};
use crate::kernel::{self, AsmResult, Kernel};
use crate::kernel32;
use crate::symbols::Symbol;

/// Assembles the 64-bit kernel with the driver for `spec`: its bytes, and the symbols of the kernel and of the
/// user program.
pub(crate) fn assemble(
    spec: &WorkloadSpec,
    params: &ResolvedParams,
    banner: &str,
) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    match spec.privilege {
        Privilege::Kernel => assemble_with_driver(banner, |k| kernel_mode::emit(k, spec.name, params)),
        Privilege::User => {
            let (program, symbols) = user_mode::assemble(spec.name, params)?;
            assemble_with_driver(banner, |k| {
                k.print_counters = params.get("counters") == 1;
                start_user_program(k, program, symbols)
            })
        }
    }
}

/// Assembles the 32-bit kernel with the driver for `spec` (for a user-mode workload, the kernel and its program:
/// both sets of symbols), or says why `spec` has no 32-bit build.
pub(crate) fn assemble_32(
    spec: &WorkloadSpec,
    params: &ResolvedParams,
    banner: &str,
) -> Result<(Vec<u8>, Vec<Symbol>), WorkloadError> {
    let workload = spec.name.to_string();
    let assembly_error = |error: iced_x86::IcedError| WorkloadError::Assembly {
        workload: spec.name.to_string(),
        message: error.to_string(),
    };
    if let Some(reason) = kernel_mode32::only_64_bit(spec.name) {
        return Err(WorkloadError::Only64Bit { workload, reason });
    }
    match spec.privilege {
        Privilege::Kernel => {
            kernel32::assemble(banner, |k| kernel_mode32::emit(k, spec.name, params)).map_err(assembly_error)
        }
        Privilege::User => {
            if params.get("counters") == 1 {
                return Err(WorkloadError::ParamNotBuiltFor32Bit {
                    workload,
                    param: "counters".into(),
                    hint: "the 32-bit kernel keeps none of the 64-bit kernel's memory-management counters; leave counters=0",
                });
            }
            let entry = match spec.param("sysenter").map(|_| params.get("sysenter")) {
                Some(1) => user_mode32::Entry::Sysenter,
                _ => user_mode32::Entry::Int80,
            };
            let (program, mut symbols) = user_mode32::assemble(spec.name, params, entry).map_err(assembly_error)?;
            assert!(
                program.len() <= kernel32::process::PROGRAM_MAX_BYTES as usize,
                "the user program outgrew its frames"
            );
            let (kernel, kernel_symbols) =
                kernel32::assemble(banner, |k| kernel32::process::start_first_process(k, program.clone()))
                    .map_err(assembly_error)?;
            symbols.extend(kernel_symbols);
            Ok((kernel, symbols))
        }
    }
}

/// Where a register probe jumps when the value it reads is not the guest's own.
pub(crate) struct ProbeFailures {
    pub gdt: CodeLabel,
    pub idt: CodeLabel,
    pub ldt: CodeLabel,
    pub tr: CodeLabel,
    pub msw: CodeLabel,
}

impl ProbeFailures {
    /// The failure paths of the probes, from the kernel's or the program's `failure`.
    pub fn new(mut failure: impl FnMut(&str) -> CodeLabel) -> Self {
        ProbeFailures {
            gdt: failure("SGDT did not return the guest's GDT"),
            idt: failure("SIDT did not return the guest's IDT"),
            ldt: failure("SLDT did not return the null selector"),
            tr: failure("STR did not return the TSS selector"),
            msw: failure("SMSW did not return the low bits of CR0"),
        }
    }
}

/// SGDT, SIDT, SLDT, STR and SMSW against the guest's own values (its GDT and IDT, a null LDT, the TSS
/// selector, CR0's low word): the same probes at CPL 0 (`sensitive-kernel`) and at CPL 3 (`redpill`). They
/// store to [RSP], where the caller reserves 10 bytes.
pub(crate) fn emit_register_probes(a: &mut CodeAssembler, failures: &ProbeFailures) -> AsmResult {
    use crate::layout::{GDT_ADDRESS, GDT_BYTES, IDT_ADDRESS, IDT_ENTRIES, KERNEL_CR0, TSS_SELECTOR};
    a.sgdt(ptr(rsp))?;
    a.cmp(word_ptr(rsp), (GDT_BYTES - 1) as u32)?;
    a.jne(failures.gdt)?;
    a.mov(rax, GDT_ADDRESS)?;
    a.cmp(qword_ptr(rsp + 2), rax)?;
    a.jne(failures.gdt)?;
    a.sidt(ptr(rsp))?;
    a.cmp(word_ptr(rsp), (IDT_ENTRIES * 16 - 1) as u32)?;
    a.jne(failures.idt)?;
    a.mov(rax, IDT_ADDRESS)?;
    a.cmp(qword_ptr(rsp + 2), rax)?;
    a.jne(failures.idt)?;
    a.sldt(eax)?;
    a.test(ax, ax)?;
    a.jnz(failures.ldt)?;
    a.str(eax)?;
    a.cmp(ax, TSS_SELECTOR as u32)?;
    a.jne(failures.tr)?;
    a.smsw(word_ptr(rsp))?;
    a.cmp(word_ptr(rsp), KERNEL_CR0 & 0xFFFF)?;
    a.jne(failures.msw)
}

/// The probes of `emit_register_probes` in 32-bit code, against the 32-bit kernel's tables (SGDT and SIDT store
/// 6 bytes): at CPL 0 (`sensitive-kernel`) and at CPL 3 (`redpill`). The caller reserves 8 bytes at [ESP].
pub(crate) fn emit_register_probes_32(a: &mut CodeAssembler, failures: &ProbeFailures) -> AsmResult {
    use crate::asm32::selector;
    use crate::kernel32::{GDT, GDT_ENTRIES, IDT, IDT_LIMIT};
    a.sgdt(ptr(esp))?;
    a.cmp(word_ptr(esp), 8 * GDT_ENTRIES - 1)?;
    a.jne(failures.gdt)?;
    a.cmp(dword_ptr(esp + 2), GDT)?;
    a.jne(failures.gdt)?;
    a.sidt(ptr(esp))?;
    a.cmp(word_ptr(esp), IDT_LIMIT)?;
    a.jne(failures.idt)?;
    a.cmp(dword_ptr(esp + 2), IDT)?;
    a.jne(failures.idt)?;
    a.sldt(eax)?;
    a.test(ax, ax)?;
    a.jnz(failures.ldt)?;
    a.str(eax)?;
    a.cmp(ax, u32::from(selector::TSS))?;
    a.jne(failures.tr)?;
    a.smsw(word_ptr(esp))?;
    a.cmp(word_ptr(esp), crate::layout::KERNEL_CR0 & 0xFFFF)?;
    a.jne(failures.msw)
}

/// The kernel: entry point, banner line, `driver` (the symbol `driver`), then the kernel's routines.
fn assemble_with_driver(
    banner: &str,
    driver: impl FnOnce(&mut Kernel) -> AsmResult,
) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    let mut k = Kernel::new()?;
    kernel::emit_entry(&mut k, &format!("{banner}\n"))?;
    k.function("driver")?;
    driver(&mut k)?;
    kernel::emit_routines(&mut k)?;
    k.finish()
}

/// The driver of a user-mode workload: embed the program and start it as process 1.
fn start_user_program(k: &mut Kernel, program: Vec<u8>, symbols: Vec<Symbol>) -> AsmResult {
    let (label, length) = k.embed_user_program(program, symbols);
    k.a.lea(rsi, ptr(label))?;
    k.a.mov(edx, length)?;
    k.a.jmp(k.r.start_first_process)
}
