//! Physical page frames and process address spaces.
//!
//! Free frames form a singly linked list threaded through their first quadword. A process's user
//! space is the 1 GiB behind PML4 slot 1: PML4[1] -> PDPT -> one page directory -> page tables, so
//! the page directory alone describes every user page. Non-present entries equal to
//! `PTE_DEMAND_ZERO` are reserved pages that the page-fault handler fills with a zeroed frame.

use iced_x86::code_asm::*;

use super::interrupts::{pop_scratch, push_scratch};
use super::{AsmResult, Kernel};
use crate::layout::*;
use crate::machine::exit_code;

const PAGE: i32 = 4096;
const ENTRIES_PER_TABLE: i32 = 512;
/// Clears the flag bits of an entry; frames are below 4 GiB and NX is never set.
const FRAME_MASK: i32 = -4096;
const USER_TABLE: i32 = (PTE_PRESENT | PTE_WRITABLE | PTE_USER) as i32;

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_frame_pool(k)?;
    emit_user_pte_address(k)?;
    emit_create_address_space(k)?;
    emit_free_address_space(k)?;
    emit_copy_user_pages(k)?;
    emit_page_fault_handler(k)
}

/// frame_pool_init: threads every pool frame onto the free list, highest address first out.
/// alloc_frame -> RAX: a zeroed frame; preserves every other register. Out of frames ends the run.
/// free_frame(RDI): preserves every register but RAX.
fn emit_frame_pool(k: &mut Kernel) -> AsmResult {
    let mut init = k.r.frame_pool_init;
    let mut next = k.label();
    k.bind(&mut init)?;
    k.a.xor(eax, eax)?;
    k.a.mov(edi, FRAME_POOL_START as u32)?;
    k.bind(&mut next)?;
    k.a.mov(qword_ptr(rdi), rax)?;
    k.a.mov(rax, rdi)?;
    k.a.add(rdi, PAGE)?;
    k.a.cmp(rdi, FRAME_POOL_END as i32)?;
    k.a.jb(next)?;
    k.a.mov(qword_ptr(VAR_FREE_FRAME_LIST), rax)?;
    k.a.ret()?;

    let mut alloc = k.r.alloc_frame;
    k.bind(&mut alloc)?;
    k.a.mov(rax, qword_ptr(VAR_FREE_FRAME_LIST))?;
    k.a.test(rax, rax)?;
    k.a.jz(k.r.out_of_memory)?;
    k.a.push(rdi)?;
    k.a.push(rcx)?;
    k.a.mov(rcx, qword_ptr(rax))?;
    k.a.mov(qword_ptr(VAR_FREE_FRAME_LIST), rcx)?;
    k.a.mov(rdi, rax)?;
    k.a.push(rax)?;
    k.a.xor(eax, eax)?;
    k.a.mov(ecx, PAGE / 8)?;
    k.a.rep().stosq()?;
    k.a.pop(rax)?;
    k.a.pop(rcx)?;
    k.a.pop(rdi)?;
    k.a.ret()?;

    let mut free = k.r.free_frame;
    k.bind(&mut free)?;
    k.a.mov(rax, qword_ptr(VAR_FREE_FRAME_LIST))?;
    k.a.mov(qword_ptr(rdi), rax)?;
    k.a.mov(qword_ptr(VAR_FREE_FRAME_LIST), rdi)?;
    k.a.ret()?;

    let mut out_of_memory = k.r.out_of_memory;
    k.bind(&mut out_of_memory)?;
    k.print("panic: out of page frames\n")?;
    k.a.mov(edi, exit_code::OUT_OF_MEMORY)?;
    k.a.jmp(k.r.exit_machine)
}

/// user_pte_address(RDI = user page directory, RSI = user address, EDX = create) -> RAX: the
/// address of the page-table entry for RSI, or 0 when its page table is missing and EDX = 0.
/// With EDX != 0 a missing page table is allocated. Clobbers RCX and R8 only.
fn emit_user_pte_address(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.user_pte_address;
    let mut have_table = k.label();
    let mut missing = k.label();
    k.bind(&mut entry)?;
    k.a.mov(rax, rsi)?;
    k.a.shr(rax, 21)?;
    k.a.and(eax, ENTRIES_PER_TABLE - 1)?;
    k.a.lea(r8, ptr(rdi + rax * 8))?;
    k.a.mov(rax, qword_ptr(r8))?;
    k.a.test(al, PTE_PRESENT as u32)?;
    k.a.jnz(have_table)?;
    k.a.test(edx, edx)?;
    k.a.jz(missing)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(r8), rax)?;
    k.bind(&mut have_table)?;
    k.a.and(rax, FRAME_MASK)?;
    k.a.mov(rcx, rsi)?;
    k.a.shr(rcx, 12)?;
    k.a.and(ecx, ENTRIES_PER_TABLE - 1)?;
    k.a.lea(rax, ptr(rax + rcx * 8))?;
    k.a.ret()?;
    k.bind(&mut missing)?;
    k.a.xor(eax, eax)?;
    k.a.ret()
}

/// create_address_space -> RAX = PML4, RDX = user page directory. The kernel half (PML4[0]) is
/// shared with every process.
fn emit_create_address_space(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.create_address_space;
    k.bind(&mut entry)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.mov(rsi, rax)?; // PML4
    k.a.mov(rcx, qword_ptr(KERNEL_PML4))?;
    k.a.mov(qword_ptr(rsi), rcx)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.mov(rdi, rax)?; // PDPT
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(rsi + 8), rax)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.mov(rdx, rax)?; // page directory
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(rdi), rax)?;
    k.a.mov(rax, rsi)?;
    k.a.ret()
}

/// free_address_space(RDI = PML4): frees every user page, page table, the page directory, the
/// PDPT and the PML4. The caller must not be running on that address space.
fn emit_free_address_space(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.free_address_space;
    let mut next_table = k.label();
    let mut next_page = k.label();
    let mut page_done = k.label();
    let mut table_done = k.label();
    k.bind(&mut entry)?;
    for register in [rbx, r12, r13, r14, r15] {
        k.a.push(register)?;
    }
    k.a.mov(r12, rdi)?;
    k.a.mov(r13, qword_ptr(r12 + 8))?;
    k.a.and(r13, FRAME_MASK)?; // PDPT
    k.a.mov(r14, qword_ptr(r13))?;
    k.a.and(r14, FRAME_MASK)?; // page directory
    k.a.xor(ebx, ebx)?;
    k.bind(&mut next_table)?;
    k.a.mov(r15, qword_ptr(r14 + rbx * 8))?;
    k.a.test(r15b, PTE_PRESENT as u32)?;
    k.a.jz(table_done)?;
    k.a.and(r15, FRAME_MASK)?;
    k.a.xor(ecx, ecx)?;
    k.bind(&mut next_page)?;
    k.a.mov(rdi, qword_ptr(r15 + rcx * 8))?;
    k.a.test(dil, PTE_PRESENT as u32)?;
    k.a.jz(page_done)?;
    k.a.and(rdi, FRAME_MASK)?;
    k.a.call(k.r.free_frame)?;
    k.bind(&mut page_done)?;
    k.a.inc(ecx)?;
    k.a.cmp(ecx, ENTRIES_PER_TABLE)?;
    k.a.jb(next_page)?;
    k.a.mov(rdi, r15)?;
    k.a.call(k.r.free_frame)?;
    k.bind(&mut table_done)?;
    k.a.inc(ebx)?;
    k.a.cmp(ebx, ENTRIES_PER_TABLE)?;
    k.a.jb(next_table)?;
    for table in [r14, r13, r12] {
        k.a.mov(rdi, table)?;
        k.a.call(k.r.free_frame)?;
    }
    for register in [r15, r14, r13, r12, rbx] {
        k.a.pop(register)?;
    }
    k.a.ret()
}

/// copy_user_pages(RDI = source page directory, RSI = empty destination page directory): an eager
/// copy of every present user page; reserved demand-zero entries are copied as they are.
fn emit_copy_user_pages(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.copy_user_pages;
    let mut next_table = k.label();
    let mut next_entry = k.label();
    let mut copy_page = k.label();
    let mut entry_done = k.label();
    let mut table_done = k.label();
    k.bind(&mut entry)?;
    for register in [rbx, rbp, r12, r13, r14, r15] {
        k.a.push(register)?;
    }
    k.a.mov(r12, rdi)?;
    k.a.mov(r13, rsi)?;
    k.a.xor(r14d, r14d)?;
    k.bind(&mut next_table)?;
    k.a.mov(rbx, qword_ptr(r12 + r14 * 8))?;
    k.a.test(bl, PTE_PRESENT as u32)?;
    k.a.jz(table_done)?;
    k.a.and(rbx, FRAME_MASK)?; // source page table
    k.a.call(k.r.alloc_frame)?;
    k.a.mov(r15, rax)?; // destination page table
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(r13 + r14 * 8), rax)?;
    k.a.xor(ebp, ebp)?;
    k.bind(&mut next_entry)?;
    k.a.mov(rax, qword_ptr(rbx + rbp * 8))?;
    k.a.test(al, PTE_PRESENT as u32)?;
    k.a.jnz(copy_page)?;
    k.a.mov(qword_ptr(r15 + rbp * 8), rax)?;
    k.a.jmp(entry_done)?;
    k.bind(&mut copy_page)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.mov(rdi, rax)?;
    k.a.mov(rsi, qword_ptr(rbx + rbp * 8))?;
    k.a.and(rsi, FRAME_MASK)?;
    k.a.mov(ecx, PAGE / 8)?;
    k.a.rep().movsq()?;
    k.a.mov(rcx, qword_ptr(rbx + rbp * 8))?;
    k.a.and(ecx, !FRAME_MASK)?;
    k.a.or(rax, rcx)?;
    k.a.mov(qword_ptr(r15 + rbp * 8), rax)?;
    k.bind(&mut entry_done)?;
    k.a.inc(ebp)?;
    k.a.cmp(ebp, ENTRIES_PER_TABLE)?;
    k.a.jb(next_entry)?;
    k.bind(&mut table_done)?;
    k.a.inc(r14d)?;
    k.a.cmp(r14d, ENTRIES_PER_TABLE)?;
    k.a.jb(next_table)?;
    for register in [r15, r14, r13, r12, rbp, rbx] {
        k.a.pop(register)?;
    }
    k.a.ret()
}

/// #PF: a not-present fault on a reserved demand-zero user page (from user mode, or from the
/// kernel touching user memory in a system call) gets a zeroed frame; every other fault joins the
/// shared fault path.
fn emit_page_fault_handler(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.page_fault_handler;
    let mut fatal = k.label();
    k.bind(&mut entry)?;
    push_scratch(k)?;
    // Exceptions keep the interrupted DF, and alloc_frame clears pages with REP STOSQ.
    k.a.cld()?;
    k.a.mov(rsi, cr2)?;
    k.a.mov(rax, USER_BASE)?;
    k.a.cmp(rsi, rax)?;
    k.a.jb(fatal)?;
    k.a.mov(rax, USER_END)?;
    k.a.cmp(rsi, rax)?;
    k.a.jae(fatal)?;
    k.a.mov(rdi, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.test(rdi, rdi)?;
    k.a.jz(fatal)?;
    k.a.mov(rdi, qword_ptr(rdi + PROC_USER_PD))?;
    k.a.xor(edx, edx)?;
    k.a.call(k.r.user_pte_address)?;
    k.a.test(rax, rax)?;
    k.a.jz(fatal)?;
    k.a.cmp(qword_ptr(rax), PTE_DEMAND_ZERO as i32)?;
    k.a.jne(fatal)?;
    k.a.mov(rdx, rax)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(rdx), rax)?;
    pop_scratch(k)?;
    k.a.add(rsp, 8)?; // error code
    k.a.iretq()?;
    k.bind(&mut fatal)?;
    pop_scratch(k)?;
    k.a.push(14)?;
    k.a.jmp(k.r.fault_common)
}
