//! Kernel paths no catalog workload reaches, booted under QEMU with programs written for the
//! purpose: a user fault kills the process, a kernel fault panics, failed checks and exhausted
//! memory end the run with their documented exit codes, and timer preemption between two
//! compute-bound processes preserves their registers. Skipped, saying why, when QEMU is not
//! installed.

use std::time::Duration;

use iced_x86::code_asm::*;

use super::user_mode::{compute, UserProgram};
use super::{assemble_with_driver, start_user_program};
use crate::catalog::Arch;
use crate::image::GuestImage;
use crate::kernel::syscalls::*;
use crate::kernel::{boot, AsmResult, Kernel};
use crate::layout::*;
use crate::machine::exit_code;
use crate::qemu;
use crate::symbols::Symbol;

const BANNER: &str = "virtlab: fault-test";

/// QEMU's exit status for a debug-exit value.
fn status_for(code: u32) -> i32 {
    ((code << 1) | 1) as i32
}

fn boot_kernel((kernel, symbols): (Vec<u8>, Vec<Symbol>)) -> Option<(String, i32)> {
    if let Err(reason) = qemu::available() {
        eprintln!("skipping: {reason}");
        return None;
    }
    eprintln!("booting a test kernel under {}", qemu::QEMU);
    let image = GuestImage::new(
        "fault-test",
        Vec::new(),
        Arch::X86_64,
        boot::first_page_after_header().unwrap().0,
        kernel,
        symbols,
    );
    let run = qemu::boot(&image.bytes, Duration::from_secs(60)).unwrap();
    let banner_at = run.serial.find(BANNER).expect("the guest printed its banner");
    Some((run.serial[banner_at..].to_string(), run.qemu_status))
}

fn run_user(program: impl FnOnce(&mut UserProgram) -> AsmResult) -> Option<(String, i32)> {
    let mut p = UserProgram::new().unwrap();
    program(&mut p).unwrap();
    let (bytes, symbols) = p.finish().unwrap();
    boot_kernel(assemble_with_driver(BANNER, |k| start_user_program(k, bytes, symbols)).unwrap())
}

fn run_kernel(driver: impl FnOnce(&mut Kernel) -> AsmResult) -> Option<(String, i32)> {
    boot_kernel(assemble_with_driver(BANNER, driver).unwrap())
}

/// Reads a user address nothing reserved: the instruction after the 10-byte MOV faults.
fn touch_unreserved(p: &mut UserProgram) -> AsmResult {
    p.a.mov(rax, USER_MMAP_BASE)?;
    p.a.mov(rax, qword_ptr(rax))
}

#[test]
fn user_page_fault_kills_the_process() {
    let Some((serial, status)) = run_user(touch_unreserved) else { return };
    assert_eq!(
        serial,
        format!(
            "{BANNER}\nprocess 1 killed by vector 14 at rip 0x{:x}\nFAIL: first process exited with status 142\n",
            USER_CODE + 10
        )
    );
    assert_eq!(status, status_for(exit_code::CHECK_FAILED));
}

#[test]
fn divide_error_without_a_handler_kills_the_process() {
    let Some((serial, status)) = run_user(|p| {
        p.a.xor(ecx, ecx)?;
        p.a.div(ecx)
    }) else {
        return;
    };
    assert_eq!(
        serial,
        format!(
            "{BANNER}\nprocess 1 killed by vector 0 at rip 0x{:x}\nFAIL: first process exited with status 128\n",
            USER_CODE + 2
        )
    );
    assert_eq!(status, status_for(exit_code::CHECK_FAILED));
}

#[test]
fn parent_reaps_the_status_of_a_killed_child() {
    let Some((serial, status)) = run_user(|p| {
        let mut child = p.label();
        p.syscall(SYS_FORK)?;
        p.a.test(rax, rax)?;
        p.a.jz(child)?;
        p.syscall(SYS_WAIT)?;
        p.a.mov(rdi, rax)?;
        p.syscall(SYS_EXIT)?;
        p.bind(&mut child)?;
        touch_unreserved(p)
    }) else {
        return;
    };
    assert!(serial.starts_with(&format!("{BANNER}\nprocess 2 killed by vector 14 at rip 0x")), "{serial}");
    assert!(serial.ends_with("\nFAIL: first process exited with status 142\n"), "{serial}");
    assert_eq!(status, status_for(exit_code::CHECK_FAILED));
}

#[test]
fn failed_user_check_reports_and_exits_with_status_1() {
    let Some((serial, status)) = run_user(|p| {
        let wrong = p.failure("deliberate");
        p.a.jmp(wrong)
    }) else {
        return;
    };
    assert_eq!(serial, format!("{BANNER}\ncheck failed: deliberate\nFAIL: first process exited with status 1\n"));
    assert_eq!(status, status_for(exit_code::CHECK_FAILED));
}

#[test]
fn system_calls_reject_bad_arguments() {
    let Some((serial, status)) = run_user(|p| {
        let accepted = p.failure("a bad call was accepted");
        let checks: [(u32, u64, u64); 5] = [
            (SYS_WRITE, LOAD_ADDRESS, 4),                // kernel memory
            (SYS_WRITE, USER_CODE, WRITE_MAX_BYTES + 1), // too long
            (SYS_MMAP, 0, 0),                            // empty
            (SYS_MUNMAP, USER_MMAP_BASE + 1, 4096),      // unaligned
            (SYSCALL_COUNT, 0, 0),                       // no such call
        ];
        for (number, first, second) in checks {
            p.a.mov(rdi, first)?;
            p.a.mov(rsi, second)?;
            p.syscall(number)?;
            p.a.cmp(rax, -1)?;
            p.a.jne(accepted)?;
        }
        p.exit(0)
    }) else {
        return;
    };
    assert_eq!(serial, format!("{BANNER}\nok\n"));
    assert_eq!(status, status_for(exit_code::SUCCESS));
}

#[test]
fn exhausting_the_frame_pool_ends_the_run() {
    let Some((serial, status)) = run_user(|p| {
        let mut touch = p.label();
        p.a.mov(r13d, 3)?;
        let mut map = p.label();
        p.bind(&mut map)?;
        p.a.mov(edi, MMAP_MAX_BYTES as u32)?;
        p.syscall(SYS_MMAP)?;
        p.a.mov(ecx, (MMAP_MAX_BYTES / 4096) as u32)?;
        p.bind(&mut touch)?;
        p.a.mov(qword_ptr(rax), rax)?;
        p.a.add(rax, 4096)?;
        p.a.dec(ecx)?;
        p.a.jnz(touch)?;
        p.a.dec(r13d)?;
        p.a.jnz(map)?;
        p.exit(0)
    }) else {
        return;
    };
    assert_eq!(serial, format!("{BANNER}\npanic: out of page frames\n"));
    assert_eq!(status, status_for(exit_code::OUT_OF_MEMORY));
}

#[test]
fn kernel_null_dereference_panics() {
    let Some((serial, status)) = run_kernel(|k| {
        k.a.xor(eax, eax)?;
        k.a.mov(rax, qword_ptr(rax))
    }) else {
        return;
    };
    assert!(serial.starts_with(&format!("{BANNER}\npanic: vector 14 error 0x0 rip 0x")), "{serial}");
    assert!(serial.ends_with(" cr2 0x0\n"), "{serial}");
    assert_eq!(status, status_for(exit_code::KERNEL_PANIC));
}

#[test]
fn failed_kernel_check_reports_and_exits_with_code_1() {
    let Some((serial, status)) = run_kernel(|k| {
        let wrong = k.failure("deliberate");
        k.a.jmp(wrong)
    }) else {
        return;
    };
    assert_eq!(serial, format!("{BANNER}\nFAIL: deliberate\n"));
    assert_eq!(status, status_for(exit_code::CHECK_FAILED));
}

/// Two processes that never yield share the CPU only through the timer; each checks its own
/// register-only checksum, so a context switch that lost a register would show.
#[test]
fn timer_preemption_preserves_both_processes() {
    const ITERATIONS: u64 = 2_000_000;
    let Some((serial, status)) = run_user(|p| {
        let wrong_status = p.failure("the child's checksum was wrong");
        let mut child = p.label();
        p.syscall(SYS_FORK)?;
        p.a.test(rax, rax)?;
        p.a.jz(child)?;
        compute(p, ITERATIONS)?;
        p.syscall(SYS_WAIT)?;
        p.a.test(rax, rax)?;
        p.a.jnz(wrong_status)?;
        p.exit(0)?;
        p.bind(&mut child)?;
        compute(p, ITERATIONS)?;
        p.exit(0)
    }) else {
        return;
    };
    assert_eq!(serial, format!("{BANNER}\nok\n"));
    assert_eq!(status, status_for(exit_code::SUCCESS));
}
