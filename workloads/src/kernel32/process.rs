//! User mode in the 32-bit kernel: process 1's address space and its entry to user mode, system calls through
//! `INT 0x80` (a DPL 3 trap gate) and SYSENTER/SYSEXIT, and user exceptions delivered to a trap handler.
//!
//! Process 1's program is copied into fixed frames and mapped read-only at `USER_CODE`, its stack
//! (`USER_STACK_PAGES` pages below `USER_STACK_TOP`) is mapped up front. Anonymous memory is `memory`'s, other
//! processes `sched`'s. Process 1's kernel entries land on the boot stack, which the kernel leaves for good when
//! it starts the process.

use iced_x86::code_asm::*;

use super::sched::{self, PID, TRAP_HANDLER, VAR_CURRENT};
use super::{memory, Kernel32, BOOT_STACK_TOP32, PAGE_DIRECTORY};
use crate::asm32::{selector, MSR_SYSENTER_CS, MSR_SYSENTER_EIP, MSR_SYSENTER_ESP};
use crate::kernel::syscalls::*;
use crate::kernel::AsmResult;
use crate::machine::exit_code;

/// Where process 1's program runs: the 4 MiB of linear space from here are the process's, one page table.
pub const USER_CODE: u32 = 0x4000_0000;
pub const USER_STACK_TOP: u32 = USER_CODE + 0x40_0000;
pub const USER_STACK_PAGES: u32 = 4;
pub(crate) const USER_PAGE_TABLE: u32 = 0x20_5000;
/// The frames the program is copied into, and the stack's frames (inside what the loader zeroes).
const PROGRAM_FRAMES: u32 = 0x22_0000;
pub const PROGRAM_MAX_BYTES: u32 = 0x1_0000;
pub(crate) const STACK_FRAMES: u32 = 0x23_0000;
const PTE_USER_READ_ONLY: u32 = 0x5;
pub(crate) const PTE_USER_WRITABLE: u32 = 0x7;
/// IF set, IOPL 0: the flags process 1 starts with.
const USER_EFLAGS: u32 = 0x202;
/// A process killed by an exception exits with this plus the vector, as the 64-bit kernel's do.
const KILLED_STATUS_BASE: u32 = 128;
const DIVIDE_ERROR: u32 = 0;
const PAGE_FAULT: u32 = 14;

/// The driver of a user-mode workload: copy the program (embedded in the image, `pages` pages) into its frames,
/// map it and the stack, set the SYSENTER MSRs, and IRETD to `USER_CODE` at CPL 3.
pub(crate) fn start_first_process(k: &mut Kernel32, program: Vec<u8>) -> AsmResult {
    let (label, pages) = k.embed_user_program(program);
    let address = k.address_of(label);
    k.a.mov(esi, address)?;
    k.a.mov(edi, PROGRAM_FRAMES)?;
    k.a.mov(ecx, pages * 1024)?;
    k.a.rep().movsd()?;
    for page in 0..pages {
        k.a.mov(dword_ptr(USER_PAGE_TABLE + 4 * page), (PROGRAM_FRAMES + 4096 * page) | PTE_USER_READ_ONLY)?;
    }
    for page in 0..USER_STACK_PAGES {
        let entry = USER_PAGE_TABLE + 4 * (1024 - USER_STACK_PAGES + page);
        k.a.mov(dword_ptr(entry), (STACK_FRAMES + 4096 * page) | PTE_USER_WRITABLE)?;
    }
    k.a.mov(dword_ptr(PAGE_DIRECTORY + (USER_CODE >> 22) * 4), USER_PAGE_TABLE | PTE_USER_WRITABLE)?;
    memory::emit_init(k)?;
    sched::emit_init(k)?;
    let sysenter_entry = k.address_of(k.r.sysenter_entry);
    for (msr, value) in [
        (MSR_SYSENTER_CS, u32::from(selector::KERNEL_CODE)),
        (MSR_SYSENTER_ESP, BOOT_STACK_TOP32),
        (MSR_SYSENTER_EIP, sysenter_entry),
    ] {
        k.a.mov(ecx, msr)?;
        k.a.mov(eax, value)?;
        k.a.xor(edx, edx)?;
        k.a.wrmsr()?;
    }
    k.a.mov(eax, u32::from(selector::USER_DATA))?;
    for segment in [ds, es, fs, gs] {
        k.a.mov(segment, ax)?;
    }
    for value in
        [u32::from(selector::USER_DATA), USER_STACK_TOP, USER_EFLAGS, u32::from(selector::USER_CODE), USER_CODE]
    {
        k.a.mov(eax, value)?;
        k.a.push(eax)?;
    }
    k.a.iretd()
}

pub(crate) fn emit(k: &mut Kernel32) -> AsmResult {
    emit_entries(k)?;
    emit_dispatch(k)?;
    emit_user_fault(k)?;
    memory::emit(k)?;
    sched::emit(k)
}

/// `syscall_int80` and `sysenter_entry`: save what the dispatcher may clobber, dispatch, and return the way the
/// call came. SYSEXIT returns to EDX with ESP = ECX, which hold what the user's stub left there; it does not
/// restore IF, so STI comes first (its one-instruction delay covers SYSEXIT).
fn emit_entries(k: &mut Kernel32) -> AsmResult {
    for (name, label, sysenter) in
        [("syscall_int80", k.r.syscall_int80, false), ("sysenter_entry", k.r.sysenter_entry, true)]
    {
        k.routine(name, label)?;
        for register in [ecx, edx, esi, edi] {
            k.a.push(register)?;
        }
        k.a.call(k.r.syscall_dispatch)?;
        for register in [edi, esi, edx, ecx] {
            k.a.pop(register)?;
        }
        if sysenter {
            k.a.sti()?;
            k.a.sysexit()?;
        } else {
            k.a.iretd()?;
        }
    }
    Ok(())
}

/// syscall_dispatch(EAX = number, EBX, ESI, EDI = arguments) → EAX; −1 for an unknown call or bad arguments.
/// `mmap` and `munmap` are in `memory`, `fork`, `wait`, `yield` and other processes' `exit` in `sched`.
fn emit_dispatch(k: &mut Kernel32) -> AsmResult {
    let dispatch = k.r.syscall_dispatch;
    k.routine("syscall_dispatch", dispatch)?;
    let (mut getpid, mut write, mut set_trap_handler, mut error) = (k.label(), k.label(), k.label(), k.label());
    for (number, target) in [
        (SYS_EXIT, k.r.sys_exit),
        (SYS_GETPID, getpid),
        (SYS_WRITE, write),
        (SYS_FORK, k.r.sys_fork),
        (SYS_WAIT, k.r.sys_wait),
        (SYS_YIELD, k.r.sys_yield),
        (SYS_MMAP, k.r.sys_mmap),
        (SYS_MUNMAP, k.r.sys_munmap),
        (SYS_SET_TRAP_HANDLER, set_trap_handler),
    ] {
        k.a.cmp(eax, number)?;
        k.a.je(target)?;
    }
    k.bind(&mut error)?;
    k.a.mov(eax, u32::MAX)?;
    k.a.ret()?;

    k.bind(&mut getpid)?;
    k.a.mov(eax, dword_ptr(VAR_CURRENT))?;
    k.a.mov(eax, dword_ptr(eax + PID))?;
    k.a.ret()?;

    // write(EBX = buffer, ESI = length ≤ 4096): the buffer must lie in the process's space.
    k.bind(&mut write)?;
    k.a.cmp(esi, 4096)?;
    k.a.ja(error)?;
    k.a.cmp(ebx, USER_CODE)?;
    k.a.jb(error)?;
    k.a.mov(eax, USER_STACK_TOP)?;
    k.a.sub(eax, esi)?;
    k.a.cmp(ebx, eax)?;
    k.a.ja(error)?;
    k.a.mov(ecx, esi)?;
    k.a.mov(esi, ebx)?;
    k.a.push(ecx)?;
    k.a.call(k.r.serial_write)?;
    k.a.pop(eax)?;
    k.a.ret()?;

    k.bind(&mut set_trap_handler)?;
    k.a.mov(eax, dword_ptr(VAR_CURRENT))?;
    k.a.mov(dword_ptr(eax + TRAP_HANDLER), ebx)?;
    k.a.xor(eax, eax)?;
    k.a.ret()?;

    // exit(EBX = status): process 1's exit ends the run; another process's is `exit_child`.
    let sys_exit = k.r.sys_exit;
    k.routine("sys_exit", sys_exit)?;
    let mut failed = k.label();
    k.a.cmp(dword_ptr(VAR_CURRENT), sched::PROCESS_TABLE)?;
    k.a.jne(k.r.exit_child)?;
    k.a.test(ebx, ebx)?;
    k.a.jnz(failed)?;
    k.a.jmp(k.r.report_success)?;
    k.bind(&mut failed)?;
    k.print("FAIL: first process exited with status ")?;
    k.a.mov(eax, ebx)?;
    k.print_number(10)?;
    k.print("\n")?;
    k.a.mov(eax, exit_code::CHECK_FAILED)?;
    k.a.jmp(k.r.exit_machine)
}

/// user_fault (stack: vector, error code, EIP, CS, EFLAGS, ESP, SS; from `fault_common` for CPL 3): a #PF the
/// mapping resolves is `user_page_fault`'s; any other #PF, or a #DE, goes to the process's trap handler, if it
/// registered one, entered with EDI = the faulting EIP and every other
/// register as it was; anything else kills the process with status 128 + vector.
fn emit_user_fault(k: &mut Kernel32) -> AsmResult {
    let user_fault = k.r.user_fault;
    k.routine("user_fault", user_fault)?;
    let mut kill = k.label();
    k.a.cmp(dword_ptr(esp), PAGE_FAULT)?;
    k.a.je(k.r.user_page_fault)?;
    k.a.cmp(dword_ptr(esp), DIVIDE_ERROR)?;
    k.a.jne(kill)?;
    let delivery = k.r.user_fault_delivery;
    k.routine("user_fault_delivery", delivery)?;
    k.a.push(eax)?;
    k.a.mov(eax, dword_ptr(VAR_CURRENT))?;
    k.a.mov(eax, dword_ptr(eax + TRAP_HANDLER))?;
    k.a.test(eax, eax)?;
    let mut no_handler = k.label();
    k.a.jz(no_handler)?;
    k.a.mov(edi, dword_ptr(esp + 12))?;
    k.a.mov(dword_ptr(esp + 12), eax)?;
    k.a.pop(eax)?;
    k.a.add(esp, 8)?;
    k.a.iretd()?;

    k.bind(&mut no_handler)?;
    k.a.pop(eax)?;
    k.bind(&mut kill)?;
    k.print("process ")?;
    k.a.mov(eax, dword_ptr(VAR_CURRENT))?;
    k.a.mov(eax, dword_ptr(eax + PID))?;
    k.print_number(10)?;
    k.print(" killed by vector ")?;
    k.a.mov(eax, dword_ptr(esp))?;
    k.print_number(10)?;
    k.print(" at eip 0x")?;
    k.a.mov(eax, dword_ptr(esp + 8))?;
    k.print_number(16)?;
    k.print("\n")?;
    k.a.mov(ebx, dword_ptr(esp))?;
    k.a.add(ebx, KILLED_STATUS_BASE)?;
    k.a.jmp(k.r.sys_exit)
}
