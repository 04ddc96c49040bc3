//! Processes: the table, the round-robin scheduler, context switching, fork, exit, wait, yield,
//! and the start of the first user process.
//!
//! Each slot owns a kernel stack. A process that is not running is suspended inside `switch_to`,
//! with its callee-saved registers and return address on that stack. Every system call and
//! interrupt runs with IF clear, so the scheduler never races with itself.

use iced_x86::code_asm::*;

use super::syscalls::SYSCALL_FRAME_BYTES;
use super::{AsmResult, Kernel};
use crate::layout::*;
use crate::machine::exit_code;

/// Registers `switch_to` saves on the outgoing kernel stack, in push order.
const SWITCH_SAVED: [AsmRegister64; 6] = [rbx, rbp, r12, r13, r14, r15];
/// RFLAGS a process starts with: IF set, so the timer can preempt it.
const USER_START_FLAGS: i32 = 0x202;
const ERROR: i64 = -1;

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_schedule(k)?;
    emit_switch_to(k)?;
    emit_exit(k)?;
    emit_fork(k)?;
    emit_wait_and_yield(k)?;
    emit_start_first_process(k)
}

/// schedule: runs the next runnable slot after the current one, wrapping around and ending with
/// the current one itself; returns when that is the current process.
fn emit_schedule(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.schedule;
    let mut next_slot = k.label();
    let mut check_slot = k.label();
    let mut found = k.label();
    let mut stay = k.label();
    k.bind(&mut entry)?;
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(rdx, rax)?;
    k.a.mov(ecx, PROCESS_SLOTS as u32)?;
    k.bind(&mut next_slot)?;
    k.a.add(rdx, PROCESS_SLOT_BYTES as i32)?;
    k.a.cmp(rdx, PROCESS_TABLE_END as i32)?;
    k.a.jb(check_slot)?;
    k.a.mov(edx, PROCESS_TABLE as u32)?;
    k.bind(&mut check_slot)?;
    k.a.cmp(qword_ptr(rdx + PROC_STATE), STATE_RUNNABLE)?;
    k.a.je(found)?;
    k.a.dec(ecx)?;
    k.a.jnz(next_slot)?;
    k.print("panic: no runnable process\n")?;
    k.a.mov(edi, exit_code::DEADLOCK)?;
    k.a.jmp(k.r.exit_machine)?;
    k.bind(&mut found)?;
    k.a.cmp(rdx, rax)?;
    k.a.je(stay)?;
    k.a.mov(rdi, rdx)?;
    k.a.jmp(k.r.switch_to)?;
    k.bind(&mut stay)?;
    k.a.ret()
}

/// switch_to(RDI = slot): suspends the current process and resumes the one in RDI on its kernel
/// stack and address space.
fn emit_switch_to(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.switch_to;
    k.bind(&mut entry)?;
    for register in SWITCH_SAVED {
        k.a.push(register)?;
    }
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(qword_ptr(rax + PROC_SAVED_RSP), rsp)?;
    k.a.mov(qword_ptr(VAR_CURRENT_PROCESS), rdi)?;
    k.a.mov(rsp, qword_ptr(rdi + PROC_SAVED_RSP))?;
    k.a.mov(rax, qword_ptr(rdi + PROC_PML4))?;
    k.a.mov(cr3, rax)?;
    k.a.mov(rax, qword_ptr(rdi + PROC_KERNEL_STACK_TOP))?;
    k.a.mov(qword_ptr(VAR_KERNEL_STACK_TOP), rax)?;
    k.a.mov(qword_ptr(TSS_ADDRESS + 4), rax)?;
    for register in SWITCH_SAVED.iter().rev() {
        k.a.pop(*register)?;
    }
    k.a.ret()
}

/// exit_current(RDI = status): the first process's exit ends the run (status 0 is success); any
/// other process frees its address space, becomes a zombie, wakes a waiting parent and never
/// runs again.
fn emit_exit(k: &mut Kernel) -> AsmResult {
    let mut sys_exit = k.r.sys_exit;
    k.bind(&mut sys_exit)?;
    k.a.jmp(k.r.exit_current)?;

    let mut entry = k.r.exit_current;
    let mut first_process = k.label();
    let mut parent_not_waiting = k.label();
    k.bind(&mut entry)?;
    k.a.mov(rbx, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(qword_ptr(rbx + PROC_EXIT_STATUS), rdi)?;
    k.a.cmp(qword_ptr(rbx + PROC_PID), 1)?;
    k.a.je(first_process)?;
    // Still running on the tables it frees: freeing writes none of them, and the switch away comes next.
    k.a.mov(rdi, qword_ptr(rbx + PROC_PML4))?;
    k.a.call(k.r.free_address_space)?;
    k.a.mov(qword_ptr(rbx + PROC_STATE), STATE_ZOMBIE)?;
    k.a.mov(rax, qword_ptr(rbx + PROC_PARENT))?;
    k.a.cmp(qword_ptr(rax + PROC_STATE), STATE_WAITING)?;
    k.a.jne(parent_not_waiting)?;
    k.a.mov(qword_ptr(rax + PROC_STATE), STATE_RUNNABLE)?;
    k.bind(&mut parent_not_waiting)?;
    // A zombie is never runnable, so this does not return.
    k.a.call(k.r.schedule)?;

    k.bind(&mut first_process)?;
    k.a.test(rdi, rdi)?;
    k.a.jz(k.r.report_success)?;
    k.print("FAIL: first process exited with status ")?;
    k.a.mov(rdi, qword_ptr(rbx + PROC_EXIT_STATUS))?;
    k.print_number(10)?;
    k.print("\n")?;
    k.a.mov(edi, exit_code::CHECK_FAILED)?;
    k.a.jmp(k.r.exit_machine)
}

/// fork -> child pid in the parent, 0 in the child, -1 when the process table is full. The child
/// shares the parent's user pages copy-on-write, gets a copy of its region table and system-call frame, and
/// starts in `fork_child_return`. The parent's TLB may still hold writable translations of pages fork just
/// write-protected: a CR3 reload flushes them (Linux's flush_tlb_mm after copying the page tables).
fn emit_fork(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.sys_fork;
    let mut next_slot = k.label();
    let mut found = k.label();
    k.bind(&mut entry)?;
    k.a.mov(ebx, PROCESS_TABLE as u32)?;
    k.bind(&mut next_slot)?;
    k.a.cmp(qword_ptr(rbx + PROC_STATE), STATE_FREE)?;
    k.a.je(found)?;
    k.a.add(rbx, PROCESS_SLOT_BYTES as i32)?;
    k.a.cmp(rbx, PROCESS_TABLE_END as i32)?;
    k.a.jb(next_slot)?;
    k.a.mov(rax, ERROR)?;
    k.a.ret()?;

    k.bind(&mut found)?;
    k.a.mov(r12, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.call(k.r.create_address_space)?;
    k.a.mov(qword_ptr(rbx + PROC_PML4), rax)?;
    k.a.mov(qword_ptr(rbx + PROC_USER_PD), rdx)?;
    k.a.mov(rdi, qword_ptr(r12 + PROC_USER_PD))?;
    k.a.mov(rsi, rdx)?;
    k.a.call(k.r.share_user_pages)?;
    k.a.mov(rax, cr3)?;
    k.a.mov(cr3, rax)?;
    k.a.mov(rax, qword_ptr(VAR_NEXT_PID))?;
    k.a.mov(qword_ptr(rbx + PROC_PID), rax)?;
    k.a.inc(qword_ptr(VAR_NEXT_PID))?;
    k.a.mov(qword_ptr(rbx + PROC_PARENT), r12)?;
    k.a.mov(qword_ptr(rbx + PROC_EXIT_STATUS), 0)?;
    for field in [PROC_MMAP_NEXT, PROC_TRAP_HANDLER] {
        k.a.mov(rax, qword_ptr(r12 + field))?;
        k.a.mov(qword_ptr(rbx + field), rax)?;
    }
    k.a.lea(rsi, ptr(r12 + PROC_REGIONS))?;
    k.a.lea(rdi, ptr(rbx + PROC_REGIONS))?;
    k.a.mov(ecx, (MAX_REGIONS * 2) as u32)?;
    k.a.rep().movsq()?;
    // The parent's frame, copied to the top of the child's kernel stack.
    k.a.mov(rsi, qword_ptr(r12 + PROC_KERNEL_STACK_TOP))?;
    k.a.sub(rsi, SYSCALL_FRAME_BYTES)?;
    k.a.mov(rdi, qword_ptr(rbx + PROC_KERNEL_STACK_TOP))?;
    k.a.sub(rdi, SYSCALL_FRAME_BYTES)?;
    k.a.mov(rdx, rdi)?;
    k.a.mov(ecx, (SYSCALL_FRAME_BYTES / 8) as u32)?;
    k.a.rep().movsq()?;
    // Below it, what switch_to pops: zeroed callee-saved registers and the return address.
    k.a.lea(rax, ptr(k.r.fork_child_return))?;
    k.a.mov(qword_ptr(rdx - 8), rax)?;
    let saved = SWITCH_SAVED.len() as i32;
    for index in 0..saved {
        k.a.mov(qword_ptr(rdx - 16 - index * 8), 0)?;
    }
    k.a.sub(rdx, 8 + saved * 8)?;
    k.a.mov(qword_ptr(rbx + PROC_SAVED_RSP), rdx)?;
    k.a.mov(qword_ptr(rbx + PROC_STATE), STATE_RUNNABLE)?;
    k.a.mov(rax, qword_ptr(rbx + PROC_PID))?;
    k.a.ret()?;

    let mut child_return = k.r.fork_child_return;
    k.bind(&mut child_return)?;
    k.a.xor(eax, eax)?;
    k.a.jmp(k.r.syscall_return)
}

/// wait -> exit status of a child that has exited (reaping it), blocking while children run;
/// -1 when the process has no children. yield -> 0, after the other runnable processes had a turn.
fn emit_wait_and_yield(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.sys_wait;
    let mut scan = k.label();
    let mut next_slot = k.label();
    let mut slot_done = k.label();
    let mut reap = k.label();
    let mut no_children = k.label();
    k.bind(&mut entry)?;
    k.a.mov(r12, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.bind(&mut scan)?;
    k.a.mov(ebx, PROCESS_TABLE as u32)?;
    k.a.xor(r13d, r13d)?; // whether any child exists
    k.bind(&mut next_slot)?;
    k.a.cmp(qword_ptr(rbx + PROC_STATE), STATE_FREE)?;
    k.a.je(slot_done)?;
    k.a.cmp(qword_ptr(rbx + PROC_PARENT), r12)?;
    k.a.jne(slot_done)?;
    k.a.mov(r13d, 1)?;
    k.a.cmp(qword_ptr(rbx + PROC_STATE), STATE_ZOMBIE)?;
    k.a.je(reap)?;
    k.bind(&mut slot_done)?;
    k.a.add(rbx, PROCESS_SLOT_BYTES as i32)?;
    k.a.cmp(rbx, PROCESS_TABLE_END as i32)?;
    k.a.jb(next_slot)?;
    k.a.test(r13d, r13d)?;
    k.a.jz(no_children)?;
    k.a.mov(qword_ptr(r12 + PROC_STATE), STATE_WAITING)?;
    k.a.call(k.r.schedule)?;
    k.a.jmp(scan)?;
    k.bind(&mut reap)?;
    k.a.mov(qword_ptr(rbx + PROC_STATE), STATE_FREE)?;
    k.a.mov(rax, qword_ptr(rbx + PROC_EXIT_STATUS))?;
    k.a.ret()?;
    k.bind(&mut no_children)?;
    k.a.mov(rax, ERROR)?;
    k.a.ret()?;

    let mut yield_entry = k.r.sys_yield;
    k.bind(&mut yield_entry)?;
    k.a.call(k.r.schedule)?;
    k.a.xor(eax, eax)?;
    k.a.ret()
}

/// start_first_process(RSI = program, RDX = program bytes, a multiple of the page size): builds
/// pid 1 in slot 0 with the program copied to `USER_CODE` (read-only); its stack is faulted in page by page as
/// it is used. Enters user mode through the system-call return path.
fn emit_start_first_process(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.start_first_process;
    let mut copy_next = k.label();
    k.bind(&mut entry)?;
    k.a.mov(r12, rsi)?;
    k.a.mov(r13, rdx)?;
    k.a.mov(ebx, PROCESS_TABLE as u32)?;
    k.a.call(k.r.create_address_space)?;
    k.a.mov(qword_ptr(rbx + PROC_PML4), rax)?;
    k.a.mov(qword_ptr(rbx + PROC_USER_PD), rdx)?;
    k.a.xor(r14d, r14d)?;
    k.bind(&mut copy_next)?;
    k.a.call(k.r.alloc_frame_raw)?;
    k.a.mov(r15, rax)?;
    k.a.mov(rdi, rax)?;
    k.a.lea(rsi, ptr(r12 + r14))?;
    k.a.mov(ecx, 512)?;
    k.a.rep().movsq()?;
    k.a.mov(rdi, qword_ptr(rbx + PROC_USER_PD))?;
    k.a.mov(rsi, USER_CODE)?;
    k.a.add(rsi, r14)?;
    k.a.mov(edx, 1)?;
    k.a.call(k.r.user_pte_address)?;
    k.a.or(r15, (PTE_PRESENT | PTE_USER) as i32)?;
    k.a.mov(qword_ptr(rax), r15)?;
    k.a.add(r14, 4096)?;
    k.a.cmp(r14, r13)?;
    k.a.jb(copy_next)?;

    k.a.mov(qword_ptr(rbx + PROC_STATE), STATE_RUNNABLE)?;
    k.a.mov(qword_ptr(rbx + PROC_PID), 1)?;
    k.a.mov(qword_ptr(VAR_NEXT_PID), 2)?;
    k.a.mov(rax, USER_MMAP_BASE)?;
    k.a.mov(qword_ptr(rbx + PROC_MMAP_NEXT), rax)?;
    k.a.mov(qword_ptr(VAR_CURRENT_PROCESS), rbx)?;
    k.a.mov(rax, qword_ptr(rbx + PROC_KERNEL_STACK_TOP))?;
    k.a.mov(qword_ptr(VAR_KERNEL_STACK_TOP), rax)?;
    k.a.mov(qword_ptr(TSS_ADDRESS + 4), rax)?;
    k.a.mov(rcx, qword_ptr(rbx + PROC_PML4))?;
    k.a.mov(cr3, rcx)?;
    k.a.mov(rsp, rax)?;
    // The frame syscall_return expects: user RSP, RIP, RFLAGS, then the saved registers, all zero.
    k.a.mov(rax, USER_STACK_TOP)?;
    k.a.push(rax)?;
    k.a.mov(rax, USER_CODE)?;
    k.a.push(rax)?;
    k.a.push(USER_START_FLAGS)?;
    for _ in 0..super::syscalls::SAVED_USER_REGISTERS.len() {
        k.a.push(0)?;
    }
    k.a.xor(eax, eax)?;
    k.a.jmp(k.r.syscall_return)
}
