//! SYSCALL/SYSRET: the MSR set-up, the entry and return paths, the call table and the calls that
//! do not involve the scheduler (the process calls live in `process`).
//!
//! ABI: RAX = call number, arguments in RDI, RSI, RDX; the result comes back in RAX (-1 on error).
//! RCX and R11 are clobbered by the instructions themselves; every other register is preserved.

use iced_x86::code_asm::*;

use super::{AsmResult, Kernel};
use crate::layout::*;

pub const SYS_EXIT: u32 = 0;
pub const SYS_GETPID: u32 = 1;
pub const SYS_WRITE: u32 = 2;
pub const SYS_FORK: u32 = 3;
pub const SYS_WAIT: u32 = 4;
pub const SYS_YIELD: u32 = 5;
pub const SYS_MMAP: u32 = 6;
pub const SYS_MUNMAP: u32 = 7;
pub const SYS_SET_TRAP_HANDLER: u32 = 8;
pub const SYSCALL_COUNT: u32 = 9;

const MSR_STAR: u32 = 0xC000_0081;
const MSR_LSTAR: u32 = 0xC000_0082;
const MSR_SFMASK: u32 = 0xC000_0084;
/// SYSCALL clears TF, IF and DF: the kernel runs with interrupts off.
const SYSCALL_FLAGS_MASK: u32 = 0x700;
/// User registers the entry path saves below the user RSP, RIP (RCX) and RFLAGS (R11), in push order.
pub const SAVED_USER_REGISTERS: [AsmRegister64; 12] = [rbx, rbp, rdi, rsi, rdx, r8, r9, r10, r12, r13, r14, r15];
/// Bytes of the frame the entry path builds at the top of the kernel stack.
pub const SYSCALL_FRAME_BYTES: i32 = (3 + SAVED_USER_REGISTERS.len() as i32) * 8;
const ERROR: i32 = -1;

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_syscall_init(k)?;
    emit_entry_and_return(k)?;
    emit_simple_calls(k)?;
    emit_memory_calls(k)
}

fn emit_syscall_init(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.syscall_init;
    k.bind(&mut entry)?;
    k.a.mov(ecx, MSR_STAR)?;
    k.a.xor(eax, eax)?;
    k.a.mov(edx, ((SYSRET_SELECTOR_BASE as u32) << 16) | KERNEL_CODE_SELECTOR as u32)?;
    k.a.wrmsr()?;
    k.a.mov(ecx, MSR_LSTAR)?;
    k.a.lea(rax, ptr(k.r.syscall_entry))?;
    k.a.mov(rdx, rax)?;
    k.a.shr(rdx, 32)?;
    k.a.wrmsr()?;
    k.a.mov(ecx, MSR_SFMASK)?;
    k.a.mov(eax, SYSCALL_FLAGS_MASK)?;
    k.a.xor(edx, edx)?;
    k.a.wrmsr()?;
    let handlers = [
        (SYS_EXIT, k.r.sys_exit),
        (SYS_GETPID, k.r.sys_getpid),
        (SYS_WRITE, k.r.sys_write),
        (SYS_FORK, k.r.sys_fork),
        (SYS_WAIT, k.r.sys_wait),
        (SYS_YIELD, k.r.sys_yield),
        (SYS_MMAP, k.r.sys_mmap),
        (SYS_MUNMAP, k.r.sys_munmap),
        (SYS_SET_TRAP_HANDLER, k.r.sys_set_trap_handler),
    ];
    for (number, handler) in handlers {
        k.a.lea(rax, ptr(handler))?;
        k.a.mov(qword_ptr(SYSCALL_TABLE + number as u64 * 8), rax)?;
    }
    k.a.ret()
}

/// The entry switches to the process's kernel stack, saves the user context as a frame at its top
/// (fork copies that frame), and calls the handler with the user's RDI, RSI and RDX untouched.
fn emit_entry_and_return(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.syscall_entry;
    let mut bad_number = k.label();
    let mut return_path = k.r.syscall_return;
    k.bind(&mut entry)?;
    k.a.mov(qword_ptr(VAR_USER_RSP_SCRATCH), rsp)?;
    k.a.mov(rsp, qword_ptr(VAR_KERNEL_STACK_TOP))?;
    k.a.push(qword_ptr(VAR_USER_RSP_SCRATCH))?;
    k.a.push(rcx)?;
    k.a.push(r11)?;
    for register in SAVED_USER_REGISTERS {
        k.a.push(register)?;
    }
    k.a.cmp(rax, SYSCALL_COUNT as i32)?;
    k.a.jae(bad_number)?;
    k.a.call(qword_ptr(rax * 8 + SYSCALL_TABLE))?;
    k.a.jmp(return_path)?;
    k.bind(&mut bad_number)?;
    k.a.mov(rax, ERROR as i64)?;

    // RSP points at the saved frame; RAX holds the result.
    k.bind(&mut return_path)?;
    for register in SAVED_USER_REGISTERS.iter().rev() {
        k.a.pop(*register)?;
    }
    k.a.pop(r11)?;
    k.a.pop(rcx)?;
    k.a.pop(rsp)?;
    k.a.sysretq()
}

/// getpid (the null call), write to the serial console, set_trap_handler.
fn emit_simple_calls(k: &mut Kernel) -> AsmResult {
    let mut getpid = k.r.sys_getpid;
    k.bind(&mut getpid)?;
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(rax, qword_ptr(rax + PROC_PID))?;
    k.a.ret()?;

    // write(RDI = buffer, RSI = length) -> length; the buffer must lie in user space.
    let mut write = k.r.sys_write;
    let mut invalid = k.label();
    k.bind(&mut write)?;
    k.a.cmp(rsi, WRITE_MAX_BYTES as i32)?;
    k.a.ja(invalid)?;
    k.a.mov(rax, USER_BASE)?;
    k.a.cmp(rdi, rax)?;
    k.a.jb(invalid)?;
    k.a.lea(rcx, ptr(rdi + rsi))?;
    k.a.mov(rax, USER_END)?;
    k.a.cmp(rcx, rax)?;
    k.a.ja(invalid)?;
    k.a.push(rsi)?;
    k.a.mov(rdx, rsi)?;
    k.a.mov(rsi, rdi)?;
    k.a.call(k.r.serial_write)?;
    k.a.pop(rax)?;
    k.a.ret()?;
    k.bind(&mut invalid)?;
    k.a.mov(rax, ERROR as i64)?;
    k.a.ret()?;

    // set_trap_handler(RDI = user address, 0 to remove) -> 0.
    let mut set_trap_handler = k.r.sys_set_trap_handler;
    k.bind(&mut set_trap_handler)?;
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(qword_ptr(rax + PROC_TRAP_HANDLER), rdi)?;
    k.a.xor(eax, eax)?;
    k.a.ret()
}

/// mmap(RDI = length) -> address of fresh demand-zero pages, or -1 (bad length, address space or region table
/// full). It only records the region: no page-table entry is written until a page is touched.
/// munmap(RDI = address, RSI = length) -> 0, or -1 unless the range is exactly one region. Clears the present
/// entries of the range (with an INVLPG each) and drops their frames; unmapping the topmost region returns its
/// address range for reuse.
fn emit_memory_calls(k: &mut Kernel) -> AsmResult {
    let mut mmap = k.r.sys_mmap;
    let mut mmap_invalid = k.label();
    let mut find_slot = k.label();
    let mut slot_found = k.label();
    k.bind(&mut mmap)?;
    k.a.test(rdi, rdi)?;
    k.a.jz(mmap_invalid)?;
    k.a.cmp(rdi, MMAP_MAX_BYTES as i32)?;
    k.a.ja(mmap_invalid)?;
    k.a.add(rdi, 4095)?;
    k.a.and(rdi, -4096)?;
    k.a.mov(r12, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(rbx, qword_ptr(r12 + PROC_MMAP_NEXT))?;
    k.a.lea(r13, ptr(rbx + rdi))?;
    k.a.mov(rax, USER_END)?;
    k.a.cmp(r13, rax)?;
    k.a.ja(mmap_invalid)?;
    k.a.xor(ecx, ecx)?;
    k.bind(&mut find_slot)?;
    k.a.cmp(qword_ptr(r12 + rcx * 8 + PROC_REGIONS), 0)?;
    k.a.je(slot_found)?;
    k.a.add(ecx, 2)?;
    k.a.cmp(ecx, (MAX_REGIONS * 2) as i32)?;
    k.a.jb(find_slot)?;
    k.a.jmp(mmap_invalid)?;
    k.bind(&mut slot_found)?;
    k.a.mov(qword_ptr(r12 + rcx * 8 + PROC_REGIONS), rbx)?;
    k.a.mov(qword_ptr(r12 + rcx * 8 + (PROC_REGIONS + 8)), r13)?;
    k.a.mov(qword_ptr(r12 + PROC_MMAP_NEXT), r13)?;
    k.a.mov(rax, rbx)?;
    k.a.ret()?;
    k.bind(&mut mmap_invalid)?;
    k.a.mov(rax, ERROR as i64)?;
    k.a.ret()?;

    let mut munmap = k.r.sys_munmap;
    let mut munmap_invalid = k.label();
    let mut find_region = k.label();
    let mut next_region = k.label();
    let mut region_found = k.label();
    let mut release_next = k.label();
    let mut page_done = k.label();
    let mut done = k.label();
    k.bind(&mut munmap)?;
    k.a.test(rdi, rdi)?;
    k.a.jz(munmap_invalid)?;
    k.a.add(rsi, 4095)?;
    k.a.and(rsi, -4096)?;
    k.a.lea(r13, ptr(rdi + rsi))?;
    k.a.mov(r12, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.xor(ecx, ecx)?;
    k.bind(&mut find_region)?;
    k.a.cmp(qword_ptr(r12 + rcx * 8 + PROC_REGIONS), rdi)?;
    k.a.jne(next_region)?;
    k.a.cmp(qword_ptr(r12 + rcx * 8 + (PROC_REGIONS + 8)), r13)?;
    k.a.je(region_found)?;
    k.bind(&mut next_region)?;
    k.a.add(ecx, 2)?;
    k.a.cmp(ecx, (MAX_REGIONS * 2) as i32)?;
    k.a.jb(find_region)?;
    k.a.jmp(munmap_invalid)?;
    k.bind(&mut region_found)?;
    k.a.mov(qword_ptr(r12 + rcx * 8 + PROC_REGIONS), 0)?;
    k.a.mov(qword_ptr(r12 + rcx * 8 + (PROC_REGIONS + 8)), 0)?;
    k.a.mov(rbx, rdi)?;
    k.a.mov(r14, rdi)?;
    k.bind(&mut release_next)?;
    k.a.mov(rdi, qword_ptr(r12 + PROC_USER_PD))?;
    k.a.mov(rsi, r14)?;
    k.a.xor(edx, edx)?;
    k.a.call(k.r.user_pte_address)?;
    k.a.test(rax, rax)?;
    k.a.jz(page_done)?;
    k.a.mov(rdi, qword_ptr(rax))?;
    k.a.test(dil, PTE_PRESENT as u32)?;
    k.a.jz(page_done)?;
    k.a.mov(qword_ptr(rax), 0)?;
    k.a.invlpg(ptr(r14))?;
    k.a.and(rdi, -4096)?;
    k.a.call(k.r.put_frame)?;
    k.bind(&mut page_done)?;
    k.a.add(r14, 4096)?;
    k.a.cmp(r14, r13)?;
    k.a.jb(release_next)?;
    k.a.cmp(r13, qword_ptr(r12 + PROC_MMAP_NEXT))?;
    k.a.jne(done)?;
    k.a.mov(qword_ptr(r12 + PROC_MMAP_NEXT), rbx)?;
    k.bind(&mut done)?;
    k.a.xor(eax, eax)?;
    k.a.ret()?;
    k.bind(&mut munmap_invalid)?;
    k.a.mov(rax, ERROR as i64)?;
    k.a.ret()
}
