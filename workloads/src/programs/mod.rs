//! Workload drivers: what runs after start-up. Kernel-mode drivers are emitted straight after the
//! kernel's entry point; user-mode workloads are separate programs started as process 1.

mod kernel_mode;
#[cfg(test)]
mod path_tests;
mod user_mode;

use iced_x86::code_asm::*;

use crate::catalog::{Privilege, ResolvedParams, WorkloadSpec};
use crate::kernel::{self, AsmResult, Kernel};

/// Assembles the 64-bit kernel with the driver for `spec`.
pub(crate) fn assemble(spec: &WorkloadSpec, params: &ResolvedParams) -> AsmResult<Vec<u8>> {
    let banner = crate::banner(spec.name, &params.0);
    match spec.privilege {
        Privilege::Kernel => assemble_with_driver(&banner, |k| kernel_mode::emit(k, spec.name, params)),
        Privilege::User => {
            let program = user_mode::assemble(spec.name, params)?;
            assemble_with_driver(&banner, |k| start_user_program(k, program))
        }
    }
}

/// The kernel: entry point, banner line, `driver`, then the kernel's routines.
fn assemble_with_driver(banner: &str, driver: impl FnOnce(&mut Kernel) -> AsmResult) -> AsmResult<Vec<u8>> {
    let mut k = Kernel::new()?;
    kernel::emit_entry(&mut k, &format!("{banner}\n"))?;
    driver(&mut k)?;
    kernel::emit_routines(&mut k)?;
    k.finish()
}

/// The driver of a user-mode workload: embed the program and start it as process 1.
fn start_user_program(k: &mut Kernel, program: Vec<u8>) -> AsmResult {
    let (label, length) = k.embed_user_program(program);
    k.a.lea(rsi, ptr(label))?;
    k.a.mov(edx, length)?;
    k.a.jmp(k.r.start_first_process)
}
