//! Physical page frames and process address spaces, managed as a Unix kernel manages them.
//!
//! - Free frames sit on a stack of frame addresses outside the frames (`FRAME_STACK`), and every pool frame has
//!   a reference count (`FRAME_REFCOUNTS`): a free frame is never written until it is handed out again.
//! - A process's user space is the 1 GiB behind PML4 slot 1: PML4[1] -> PDPT -> one page directory -> page
//!   tables, so the page directory alone describes every user page. Which addresses may be faulted in is kept
//!   apart from the page tables, as a real kernel's VMAs: the fixed stack range and the process's region table
//!   (`PROC_REGIONS`). mmap writes no page-table entry; a page is mapped when it is first touched.
//! - fork shares every present user page copy-on-write: both sides lose write access (the software bit
//!   `PTE_COPY_ON_WRITE` remembers it was writable) and the frame's reference count goes up. A write fault on
//!   such a page copies it, or, for its last sharer, makes it writable again.
//! - The kernel counts what it does (`VAR_COUNT_*`), so tests can check a trace's events against the guest.

use iced_x86::code_asm::*;

use super::interrupts::{pop_scratch, push_scratch, SCRATCH_REGISTERS};
use super::{AsmResult, Kernel};
use crate::layout::*;
use crate::machine::exit_code;

const PAGE: i32 = 4096;
const ENTRIES_PER_TABLE: i32 = 512;
/// Clears the flag bits of an entry; frames are below 4 GiB and NX is never set.
const FRAME_MASK: i32 = -4096;
const USER_TABLE: i32 = (PTE_PRESENT | PTE_WRITABLE | PTE_USER) as i32;
const USER_DATA_PAGE: i32 = USER_TABLE;
/// Page-fault error-code bits.
const PF_PRESENT: u32 = 1;
const PF_WRITE: u32 = 2;
const PF_USER: u32 = 4;

pub(crate) fn emit(k: &mut Kernel) -> AsmResult {
    emit_frame_pool(k)?;
    emit_user_pte_address(k)?;
    emit_create_address_space(k)?;
    emit_free_address_space(k)?;
    emit_share_user_pages(k)?;
    emit_user_region_lookup(k)?;
    emit_page_fault_handler(k)
}

/// Where push_scratch left `register`, from RSP.
fn saved_register_offset(register: AsmRegister64) -> i32 {
    let pushed = SCRATCH_REGISTERS.iter().position(|&r| r == register).expect("a scratch register");
    (SCRATCH_REGISTERS.len() - 1 - pushed) as i32 * 8
}

/// RAX = the reference-count slot of the frame in `frame` (an address inside the pool).
fn refcount_slot(k: &mut Kernel, frame: AsmRegister64) -> AsmResult {
    k.a.mov(rax, frame)?;
    k.a.sub(rax, FRAME_POOL_START as i32)?;
    k.a.shr(rax, 12)?;
    k.a.lea(rax, ptr(rax * 4 + FRAME_REFCOUNTS))
}

/// frame_pool_init: every pool frame on the free stack, the highest address on top.
/// alloc_frame_raw -> RAX: a frame with reference count 1, contents as it was left; preserves every other
/// register. Out of frames ends the run. alloc_frame -> RAX: the same, zeroed with REP STOSQ.
/// alloc_page_table -> RAX: a zeroed frame, counted as a page-table page.
/// free_frame(RDI): back on the stack; preserves every register but RAX.
/// put_frame(RDI): one mapping fewer; frees the frame with its last one. Preserves every register but RAX.
fn emit_frame_pool(k: &mut Kernel) -> AsmResult {
    let mut init = k.r.frame_pool_init;
    let mut next = k.label();
    k.bind(&mut init)?;
    k.a.xor(ecx, ecx)?;
    k.a.mov(eax, FRAME_POOL_START as u32)?;
    k.bind(&mut next)?;
    k.a.mov(dword_ptr(rcx * 4 + FRAME_STACK), eax)?;
    k.a.add(eax, PAGE)?;
    k.a.inc(ecx)?;
    k.a.cmp(ecx, FRAME_POOL_FRAMES as i32)?;
    k.a.jb(next)?;
    k.a.mov(qword_ptr(VAR_FREE_FRAMES), rcx)?;
    k.a.ret()?;

    let mut alloc_raw = k.r.alloc_frame_raw;
    k.bind(&mut alloc_raw)?;
    k.a.mov(rax, qword_ptr(VAR_FREE_FRAMES))?;
    k.a.test(rax, rax)?;
    k.a.jz(k.r.out_of_memory)?;
    k.a.dec(rax)?;
    k.a.mov(qword_ptr(VAR_FREE_FRAMES), rax)?;
    k.a.mov(eax, dword_ptr(rax * 4 + FRAME_STACK))?;
    k.a.push(rax)?;
    k.a.sub(eax, FRAME_POOL_START as i32)?;
    k.a.shr(eax, 12)?;
    k.a.mov(dword_ptr(rax * 4 + FRAME_REFCOUNTS), 1)?;
    k.a.pop(rax)?;
    k.a.ret()?;

    let mut alloc = k.r.alloc_frame;
    k.bind(&mut alloc)?;
    k.a.call(k.r.alloc_frame_raw)?;
    k.a.push(rdi)?;
    k.a.push(rcx)?;
    k.a.push(rax)?;
    k.a.mov(rdi, rax)?;
    k.a.xor(eax, eax)?;
    k.a.mov(ecx, PAGE / 8)?;
    k.a.rep().stosq()?;
    k.a.pop(rax)?;
    k.a.pop(rcx)?;
    k.a.pop(rdi)?;
    k.a.ret()?;

    let mut alloc_table = k.r.alloc_page_table;
    k.bind(&mut alloc_table)?;
    k.a.inc(qword_ptr(VAR_COUNT_PAGE_TABLES))?;
    k.a.jmp(k.r.alloc_frame)?;

    let mut put = k.r.put_frame;
    let mut still_mapped = k.label();
    k.bind(&mut put)?;
    refcount_slot(k, rdi)?;
    k.a.dec(dword_ptr(rax))?;
    k.a.jnz(still_mapped)?;
    k.a.jmp(k.r.free_frame)?;
    k.bind(&mut still_mapped)?;
    k.a.ret()?;

    let mut free = k.r.free_frame;
    k.bind(&mut free)?;
    refcount_slot(k, rdi)?;
    k.a.mov(dword_ptr(rax), 0)?;
    k.a.mov(rax, qword_ptr(VAR_FREE_FRAMES))?;
    k.a.mov(dword_ptr(rax * 4 + FRAME_STACK), edi)?;
    k.a.inc(qword_ptr(VAR_FREE_FRAMES))?;
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
    k.a.call(k.r.alloc_page_table)?;
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
    k.a.call(k.r.alloc_page_table)?;
    k.a.mov(rsi, rax)?; // PML4
    k.a.mov(rcx, qword_ptr(KERNEL_PML4))?;
    k.a.mov(qword_ptr(rsi), rcx)?;
    k.a.call(k.r.alloc_page_table)?;
    k.a.mov(rdi, rax)?; // PDPT
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(rsi + 8), rax)?;
    k.a.call(k.r.alloc_page_table)?;
    k.a.mov(rdx, rax)?; // page directory
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(rdi), rax)?;
    k.a.mov(rax, rsi)?;
    k.a.ret()
}

/// free_address_space(RDI = PML4): drops this address space's reference to every user page it maps (freeing
/// pages no other process shares), then frees its page tables, page directory, PDPT and PML4. It writes no
/// page-table entry, so a process may free the address space it runs on, as long as it allocates nothing before
/// it switches away (Linux's lazy TLB does the same).
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
    k.a.call(k.r.put_frame)?;
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

/// share_user_pages(RDI = source page directory, RSI = empty destination page directory): fork's copy of the
/// user address space. Each present page table gets a fresh (zeroed) twin; only present entries are written
/// into it; a writable page is write-protected on both sides and marked copy-on-write; every shared frame gets
/// one reference more. The caller flushes the source's TLB entries, which may still allow writes.
fn emit_share_user_pages(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.share_user_pages;
    let mut next_table = k.label();
    let mut next_entry = k.label();
    let mut shared = k.label();
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
    k.a.call(k.r.alloc_page_table)?;
    k.a.mov(r15, rax)?; // destination page table
    k.a.or(rax, USER_TABLE)?;
    k.a.mov(qword_ptr(r13 + r14 * 8), rax)?;
    k.a.xor(ebp, ebp)?;
    k.bind(&mut next_entry)?;
    k.a.mov(rdx, qword_ptr(rbx + rbp * 8))?;
    k.a.test(dl, PTE_PRESENT as u32)?;
    k.a.jz(entry_done)?;
    k.a.test(dl, PTE_WRITABLE as u32)?;
    k.a.jz(shared)?;
    k.a.and(rdx, !(PTE_WRITABLE as i32))?;
    k.a.or(edx, PTE_COPY_ON_WRITE as i32)?;
    k.a.mov(qword_ptr(rbx + rbp * 8), rdx)?;
    k.bind(&mut shared)?;
    k.a.mov(qword_ptr(r15 + rbp * 8), rdx)?;
    k.a.mov(rdi, rdx)?;
    k.a.and(rdi, FRAME_MASK)?;
    refcount_slot(k, rdi)?;
    k.a.inc(dword_ptr(rax))?;
    k.a.inc(qword_ptr(VAR_COUNT_PTES_SHARED))?;
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

/// user_region_lookup(RDI = process slot, RSI = user address) -> ZF set when the address may be faulted in:
/// inside the stack range or one of the process's regions. Clobbers RAX and RCX.
fn emit_user_region_lookup(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.user_region_lookup;
    let mut next_region = k.label();
    let mut region_done = k.label();
    let mut found = k.label();
    let mut scan = k.label();
    k.bind(&mut entry)?;
    k.a.mov(rax, USER_STACK_TOP - USER_STACK_PAGES * PAGE as u64)?;
    k.a.cmp(rsi, rax)?;
    k.a.jb(scan)?;
    k.a.mov(rax, USER_STACK_TOP)?;
    k.a.cmp(rsi, rax)?;
    k.a.jb(found)?;
    k.bind(&mut scan)?;
    k.a.xor(ecx, ecx)?;
    k.bind(&mut next_region)?;
    k.a.mov(rax, qword_ptr(rdi + rcx * 8 + PROC_REGIONS))?;
    k.a.test(rax, rax)?;
    k.a.jz(region_done)?;
    k.a.cmp(rsi, rax)?;
    k.a.jb(region_done)?;
    k.a.cmp(rsi, qword_ptr(rdi + rcx * 8 + (PROC_REGIONS + 8)))?;
    k.a.jb(found)?;
    k.bind(&mut region_done)?;
    k.a.add(ecx, 2)?;
    k.a.cmp(ecx, (MAX_REGIONS * 2) as i32)?;
    k.a.jb(next_region)?;
    // Clears ZF: ECX is not zero here.
    k.a.test(ecx, ecx)?;
    k.a.ret()?;
    k.bind(&mut found)?;
    k.a.xor(eax, eax)?;
    k.a.ret()
}

/// #PF. From user mode, or from the kernel touching user memory in a system call:
/// - a write to a present copy-on-write page: the last sharer gets write access back; otherwise the page is
///   copied into a fresh frame, which replaces it in this address space (with an INVLPG, since the old frame's
///   translation may still be cached);
/// - a not-present page inside the stack or a region: a fresh zeroed frame is mapped.
///
/// Anything else from user mode goes to the process's trap handler if it registered one (as a #DE does), and
/// otherwise joins the shared fault path, which kills the process (or, from the kernel, panics).
fn emit_page_fault_handler(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.page_fault_handler;
    let mut not_present = k.label();
    let mut copy = k.label();
    let mut resolved = k.label();
    let mut unresolved = k.label();
    let mut fatal = k.label();
    // After push_scratch: the error code, then the CPU's frame (RIP, CS, ...).
    let error_code = SCRATCH_REGISTERS.len() as i32 * 8;
    let saved_rdi = saved_register_offset(rdi);
    k.bind(&mut entry)?;
    push_scratch(k)?;
    // Exceptions keep the interrupted DF, and alloc_frame clears pages with REP STOSQ.
    k.a.cld()?;
    k.a.mov(rsi, cr2)?;
    k.a.mov(rax, USER_BASE)?;
    k.a.cmp(rsi, rax)?;
    k.a.jb(unresolved)?;
    k.a.mov(rax, USER_END)?;
    k.a.cmp(rsi, rax)?;
    k.a.jae(unresolved)?;
    k.a.mov(r9, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.test(r9, r9)?;
    k.a.jz(unresolved)?;
    k.a.mov(rdi, qword_ptr(r9 + PROC_USER_PD))?;
    k.a.test(byte_ptr(rsp + error_code), PF_PRESENT)?;
    k.a.jz(not_present)?;

    // A protection fault: only a write to a copy-on-write page is the kernel's to resolve.
    k.a.test(byte_ptr(rsp + error_code), PF_WRITE)?;
    k.a.jz(unresolved)?;
    k.a.xor(edx, edx)?;
    k.a.call(k.r.user_pte_address)?;
    k.a.test(rax, rax)?;
    k.a.jz(unresolved)?;
    k.a.mov(rdx, rax)?;
    k.a.mov(r10, qword_ptr(rdx))?;
    k.a.test(r10d, PTE_COPY_ON_WRITE as i32)?;
    k.a.jz(unresolved)?;
    k.a.inc(qword_ptr(VAR_COUNT_COW_FAULTS))?;
    k.a.mov(rdi, r10)?;
    k.a.and(rdi, FRAME_MASK)?;
    refcount_slot(k, rdi)?;
    k.a.cmp(dword_ptr(rax), 1)?;
    k.a.jne(copy)?;
    // The last sharer: the page is this process's alone again. The fault already dropped the read-only
    // translation, so no INVLPG is needed.
    k.a.and(r10, !(PTE_COPY_ON_WRITE as i32))?;
    k.a.or(r10, PTE_WRITABLE as i32)?;
    k.a.mov(qword_ptr(rdx), r10)?;
    k.a.jmp(resolved)?;
    k.bind(&mut copy)?;
    k.a.dec(dword_ptr(rax))?;
    k.a.inc(qword_ptr(VAR_COUNT_PAGES_COPIED))?;
    k.a.call(k.r.alloc_frame_raw)?;
    k.a.mov(r10, rsi)?; // the faulting address
    k.a.mov(rsi, rdi)?;
    k.a.mov(rdi, rax)?;
    k.a.mov(ecx, PAGE / 8)?;
    k.a.rep().movsq()?;
    k.a.or(rax, USER_DATA_PAGE)?;
    k.a.mov(qword_ptr(rdx), rax)?;
    k.a.invlpg(ptr(r10))?;
    k.a.jmp(resolved)?;

    // Not present: a page the process may use gets a zeroed frame.
    k.bind(&mut not_present)?;
    k.a.push(rdi)?;
    k.a.mov(rdi, r9)?;
    k.a.call(k.r.user_region_lookup)?;
    k.a.pop(rdi)?;
    k.a.jnz(unresolved)?;
    k.a.mov(edx, 1)?;
    k.a.call(k.r.user_pte_address)?;
    k.a.mov(rdx, rax)?;
    k.a.inc(qword_ptr(VAR_COUNT_ZERO_FILLS))?;
    k.a.call(k.r.alloc_frame)?;
    k.a.or(rax, USER_DATA_PAGE)?;
    k.a.mov(qword_ptr(rdx), rax)?;
    k.bind(&mut resolved)?;
    pop_scratch(k)?;
    k.a.add(rsp, 8)?; // error code
    k.a.iretq()?;

    // Not the kernel's to resolve: a user fault goes to the process's trap handler, if it has one.
    k.bind(&mut unresolved)?;
    k.a.test(byte_ptr(rsp + error_code), PF_USER)?;
    k.a.jz(fatal)?;
    k.a.mov(rax, qword_ptr(VAR_CURRENT_PROCESS))?;
    k.a.mov(rax, qword_ptr(rax + PROC_TRAP_HANDLER))?;
    k.a.test(rax, rax)?;
    k.a.jz(fatal)?;
    // The handler starts with RDI = the faulting instruction's address: it goes into the saved RDI, the
    // handler into the saved RIP.
    k.a.mov(rcx, qword_ptr(rsp + error_code + 8))?;
    k.a.mov(qword_ptr(rsp + saved_rdi), rcx)?;
    k.a.mov(qword_ptr(rsp + error_code + 8), rax)?;
    pop_scratch(k)?;
    k.a.add(rsp, 8)?; // error code
    k.a.iretq()?;
    k.bind(&mut fatal)?;
    pop_scratch(k)?;
    k.a.push(14)?;
    k.a.jmp(k.r.fault_common)
}
