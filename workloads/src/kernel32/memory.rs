//! Anonymous memory in the 32-bit kernel: `mmap`, `munmap` and demand-zero page faults, the way the 64-bit kernel
//! does them but smaller: one mapping per process at a time, in a 16 MiB window at `MMAP_BASE` whose four page
//! tables are the process's, fixed (their directory entries are written when the process is made; `mmap` writes
//! no entry).
//!
//! Frames come from a pool above the kernel's 4 MiB, which the kernel does not map: a frame is cleared through
//! the user mapping that the fault has just installed (`REP STOSD`), and freeing one only pushes its address on
//! the free stack. A frame is taken from the free stack first, then from the never-used rest of the pool.

use iced_x86::code_asm::*;

use super::process::PTE_USER_WRITABLE;
use super::sched::{MAPPING, MMAP_TABLES, VAR_CURRENT};
use super::{Kernel32, PAGE_DIRECTORY};
use crate::kernel::AsmResult;
use crate::layout::MMAP_MAX_BYTES;
use crate::machine::exit_code;

/// The window anonymous mappings are made in (page-directory entries 288–291).
pub const MMAP_BASE: u32 = 0x4800_0000;
const MMAP_WINDOW_BYTES: u32 = MMAP_MAX_BYTES as u32;
/// The window's page tables, one per 4 MiB (inside what the loader zeroes).
pub(crate) const MMAP_PAGE_TABLES: u32 = 0x20_C000;
pub(crate) const MMAP_PAGE_TABLE_COUNT: u32 = MMAP_WINDOW_BYTES >> 22;
/// The frame pool: 16 MiB from 4 MiB, one frame per page of the window.
const POOL_START: u32 = 0x40_0000;
const POOL_END: u32 = POOL_START + MMAP_WINDOW_BYTES;
/// The free-frame stack (one 32-bit frame address per freed frame), identity mapped in the kernel's 4 MiB.
const FREE_STACK: u32 = 0x24_0000;
// Kernel variables, after the ones in `kernel32`.
const VAR_FREE_COUNT: u32 = super::GDT + 0x118;
/// The next never-used frame of the pool.
const VAR_POOL_NEXT: u32 = super::GDT + 0x11C;
const PAGE_PRESENT: u32 = 1;
/// Error-code bit of a write fault, and the page-table bits: writable, and the software bit of a
/// copy-on-write page (bit 9, as in the 64-bit kernel).
const PAGE_WRITE: u32 = 2;
const PTE_WRITABLE: u32 = 2;
const PTE_COPY_ON_WRITE: u32 = 1 << 9;
const PTE_KERNEL_WRITABLE: u32 = 3;
/// One 32-bit reference count per pool frame: the address spaces that map it.
const REFERENCE_COUNTS: u32 = 0x24_4000;
/// A kernel page through which a copy-on-write fault fills its new frame (the pool is not mapped in the kernel):
/// the entry of 0x3FE000 in the kernel's page table, which nothing else uses.
const KMAP: u32 = 0x3F_E000;
const KMAP_ENTRY: u32 = super::PAGE_TABLE_LOW + (KMAP >> 12) * 4;

const _: () = assert!(MMAP_BASE >> 22 == 288 && MMAP_PAGE_TABLE_COUNT == 4);
const _: () = assert!(FREE_STACK + (MMAP_WINDOW_BYTES >> 12) * 4 <= REFERENCE_COUNTS, "the free stack");
const _: () = assert!(REFERENCE_COUNTS + (MMAP_WINDOW_BYTES >> 12) * 4 <= super::sched::PROCESS_TABLE);

/// At process start: process 1's window directory entries and an empty pool.
pub(crate) fn emit_init(k: &mut Kernel32) -> AsmResult {
    for table in 0..MMAP_PAGE_TABLE_COUNT {
        let entry = PAGE_DIRECTORY + ((MMAP_BASE >> 22) + table) * 4;
        k.a.mov(dword_ptr(entry), (MMAP_PAGE_TABLES + 4096 * table) | PTE_USER_WRITABLE)?;
    }
    k.a.mov(dword_ptr(VAR_POOL_NEXT), POOL_START)?;
    k.a.mov(dword_ptr(VAR_FREE_COUNT), 0)
}

pub(crate) fn emit(k: &mut Kernel32) -> AsmResult {
    emit_mmap(k)?;
    emit_munmap(k)?;
    emit_alloc_frame(k)?;
    emit_user_page_fault(k)?;
    emit_share_mapping(k)
}

/// sys_mmap(EBX = length ≤ 16 MiB) → `MMAP_BASE`, or −1 when a mapping exists or the length is 0 or too large.
fn emit_mmap(k: &mut Kernel32) -> AsmResult {
    let sys_mmap = k.r.sys_mmap;
    k.routine("sys_mmap", sys_mmap)?;
    let mut refused = k.label();
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.a.cmp(dword_ptr(ecx + MAPPING), 0)?;
    k.a.jne(refused)?;
    k.a.test(ebx, ebx)?;
    k.a.jz(refused)?;
    k.a.cmp(ebx, MMAP_WINDOW_BYTES)?;
    k.a.ja(refused)?;
    k.a.lea(eax, ptr(ebx + 4095))?;
    k.a.and(eax, !4095u32 as i32)?;
    k.a.mov(dword_ptr(ecx + MAPPING), eax)?;
    k.a.mov(eax, MMAP_BASE)?;
    k.a.ret()?;
    k.bind(&mut refused)?;
    k.a.mov(eax, u32::MAX)?;
    k.a.ret()
}

/// sys_munmap(EBX = address, ESI = length) of exactly the mapping → 0 (−1 otherwise): every present entry is
/// cleared, its translation invalidated with INVLPG and its frame pushed on the free stack.
fn emit_munmap(k: &mut Kernel32) -> AsmResult {
    let sys_munmap = k.r.sys_munmap;
    k.routine("sys_munmap", sys_munmap)?;
    let (mut refused, mut next, mut absent) = (k.label(), k.label(), k.label());
    k.a.cmp(ebx, MMAP_BASE)?;
    k.a.jne(refused)?;
    k.a.lea(eax, ptr(esi + 4095))?;
    k.a.and(eax, !4095u32 as i32)?;
    k.a.test(eax, eax)?;
    k.a.jz(refused)?;
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.a.cmp(eax, dword_ptr(ecx + MAPPING))?;
    k.a.jne(refused)?;
    // ECX = the page's entry, EDX = its address, ESI = the pages left.
    k.a.mov(esi, eax)?;
    k.a.shr(esi, 12)?;
    k.a.mov(ecx, dword_ptr(ecx + MMAP_TABLES))?;
    k.a.mov(edx, MMAP_BASE)?;
    k.bind(&mut next)?;
    k.a.mov(eax, dword_ptr(ecx))?;
    k.a.test(eax, PAGE_PRESENT)?;
    k.a.jz(absent)?;
    k.a.mov(dword_ptr(ecx), 0)?;
    k.a.invlpg(ptr(edx))?;
    k.a.and(eax, !4095u32 as i32)?;
    k.a.call(k.r.put_frame)?;
    k.bind(&mut absent)?;
    k.a.add(ecx, 4)?;
    k.a.add(edx, 4096)?;
    k.a.dec(esi)?;
    k.a.jnz(next)?;
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.a.mov(dword_ptr(ecx + MAPPING), 0)?;
    k.a.xor(eax, eax)?;
    k.a.ret()?;
    k.bind(&mut refused)?;
    k.a.mov(eax, u32::MAX)?;
    k.a.ret()
}

/// alloc_frame → EAX = a frame with one reference: the free stack's top, else the next never-used frame, else
/// the run ends (`panic: out of page frames`). Preserves every other register.
fn emit_alloc_frame(k: &mut Kernel32) -> AsmResult {
    let alloc_frame = k.r.alloc_frame;
    k.routine("alloc_frame", alloc_frame)?;
    let (mut from_stack, mut have_frame) = (k.label(), k.label());
    k.a.mov(eax, dword_ptr(VAR_FREE_COUNT))?;
    k.a.test(eax, eax)?;
    k.a.jnz(from_stack)?;
    k.a.mov(eax, dword_ptr(VAR_POOL_NEXT))?;
    k.a.cmp(eax, POOL_END)?;
    k.a.jae(k.r.out_of_memory)?;
    k.a.add(dword_ptr(VAR_POOL_NEXT), 4096)?;
    k.a.jmp(have_frame)?;
    k.bind(&mut from_stack)?;
    k.a.dec(eax)?;
    k.a.mov(dword_ptr(VAR_FREE_COUNT), eax)?;
    k.a.mov(eax, dword_ptr(eax * 4 + FREE_STACK as i32))?;
    k.bind(&mut have_frame)?;
    k.a.push(eax)?;
    frame_index(k)?;
    k.a.mov(dword_ptr(eax * 4 + REFERENCE_COUNTS as i32), 1)?;
    k.a.pop(eax)?;
    k.a.ret()?;

    // put_frame(EAX = frame): drops a reference; a frame nobody maps goes on the free stack. Preserves every
    // register.
    let put_frame = k.r.put_frame;
    k.routine("put_frame", put_frame)?;
    let mut still_mapped = k.label();
    k.a.push(eax)?;
    k.a.push(ecx)?;
    k.a.mov(ecx, eax)?;
    frame_index(k)?;
    k.a.dec(dword_ptr(eax * 4 + REFERENCE_COUNTS as i32))?;
    k.a.jnz(still_mapped)?;
    k.a.mov(eax, dword_ptr(VAR_FREE_COUNT))?;
    k.a.mov(dword_ptr(eax * 4 + FREE_STACK as i32), ecx)?;
    k.a.inc(dword_ptr(VAR_FREE_COUNT))?;
    k.bind(&mut still_mapped)?;
    k.a.pop(ecx)?;
    k.a.pop(eax)?;
    k.a.ret()
}

/// EAX = the pool index of the frame (or entry) in EAX.
fn frame_index(k: &mut Kernel32) -> AsmResult {
    k.a.sub(eax, POOL_START)?;
    k.a.shr(eax, 12)
}

/// user_page_fault (from `user_fault` for a user #PF; stack: vector, error code, EIP, …), inside the mapping:
/// a not-present page gets a fresh frame, mapped writable and cleared (demand zero); a write to a copy-on-write
/// page either makes it writable again (its last sharer: the fault dropped the stale translation, so no INVLPG)
/// or copies it into a fresh frame through the `KMAP` window and installs that with an INVLPG. The access is then
/// retried. Any other fault goes on to `user_fault_delivery`. Preserves every register.
fn emit_user_page_fault(k: &mut Kernel32) -> AsmResult {
    let user_page_fault = k.r.user_page_fault;
    k.routine("user_page_fault", user_page_fault)?;
    let (mut present, mut outside, mut retry, mut copy) = (k.label(), k.label(), k.label(), k.label());
    k.a.pushad()?;
    // EBX = the page's entry, EDX = its page number in the window.
    k.a.mov(edx, cr2)?;
    k.a.sub(edx, MMAP_BASE)?;
    k.a.mov(esi, dword_ptr(VAR_CURRENT))?;
    k.a.cmp(edx, dword_ptr(esi + MAPPING))?;
    k.a.jae(outside)?;
    k.a.shr(edx, 12)?;
    k.a.mov(ebx, dword_ptr(esi + MMAP_TABLES))?;
    k.a.lea(ebx, ptr(ebx + edx * 4))?;
    // pushad's 32 bytes, then the vector: the error code is at [ESP + 36].
    k.a.test(dword_ptr(esp + 36), PAGE_PRESENT)?;
    k.a.jnz(present)?;

    // Demand zero.
    k.a.call(k.r.alloc_frame)?;
    k.a.or(eax, PTE_USER_WRITABLE)?;
    k.a.mov(dword_ptr(ebx), eax)?;
    k.a.mov(edi, cr2)?;
    k.a.and(edi, !4095u32 as i32)?;
    k.a.xor(eax, eax)?;
    k.a.mov(ecx, 1024)?;
    k.a.rep().stosd()?;
    k.bind(&mut retry)?;
    k.a.popad()?;
    k.a.add(esp, 8)?;
    k.a.iretd()?;

    // Copy on write: a write to a present page marked copy-on-write.
    k.bind(&mut present)?;
    k.a.test(dword_ptr(esp + 36), PAGE_WRITE)?;
    k.a.jz(outside)?;
    k.a.mov(eax, dword_ptr(ebx))?;
    k.a.test(eax, PTE_COPY_ON_WRITE)?;
    k.a.jz(outside)?;
    frame_index(k)?;
    k.a.cmp(dword_ptr(eax * 4 + REFERENCE_COUNTS as i32), 1)?;
    k.a.jne(copy)?;
    k.a.mov(eax, dword_ptr(ebx))?;
    k.a.and(eax, !PTE_COPY_ON_WRITE as i32)?;
    k.a.or(eax, PTE_WRITABLE)?;
    k.a.mov(dword_ptr(ebx), eax)?;
    k.a.jmp(retry)?;
    k.bind(&mut copy)?;
    k.a.call(k.r.alloc_frame)?;
    k.a.mov(edx, eax)?;
    k.a.or(eax, PTE_KERNEL_WRITABLE)?;
    k.a.mov(dword_ptr(KMAP_ENTRY), eax)?;
    k.a.invlpg(ptr(KMAP))?;
    k.a.mov(esi, cr2)?;
    k.a.and(esi, !4095u32 as i32)?;
    k.a.mov(edi, KMAP)?;
    k.a.mov(ecx, 1024)?;
    k.a.rep().movsd()?;
    k.a.mov(eax, dword_ptr(ebx))?;
    k.a.and(eax, !4095u32 as i32)?;
    k.a.call(k.r.put_frame)?;
    k.a.or(edx, PTE_USER_WRITABLE)?;
    k.a.mov(dword_ptr(ebx), edx)?;
    k.a.sub(esi, 4096)?;
    k.a.invlpg(ptr(esi))?;
    k.a.jmp(retry)?;

    k.bind(&mut outside)?;
    k.a.popad()?;
    k.a.jmp(k.r.user_fault_delivery)?;

    let out_of_memory = k.r.out_of_memory;
    k.routine("out_of_memory", out_of_memory)?;
    k.print("panic: out of page frames\n")?;
    k.a.mov(eax, exit_code::OUT_OF_MEMORY)?;
    k.a.jmp(k.r.exit_machine)
}

/// share_mapping(ESI = parent slot, EDX = child slot), for fork: every present page of the parent's mapping is
/// entered in the child's tables too, one more reference to its frame; a writable one loses write access on both
/// sides and is marked copy-on-write. The parent's TLB may still allow writes to the pages just protected, so CR3
/// is reloaded once. Preserves ESI, EDX, EBX and EBP.
fn emit_share_mapping(k: &mut Kernel32) -> AsmResult {
    let share_mapping = k.r.share_mapping;
    k.routine("share_mapping", share_mapping)?;
    let (mut next, mut absent, mut shared) = (k.label(), k.label(), k.label());
    k.a.push(ebx)?;
    k.a.mov(eax, dword_ptr(esi + MAPPING))?;
    k.a.mov(dword_ptr(edx + MAPPING), eax)?;
    k.a.mov(ecx, eax)?;
    k.a.shr(ecx, 12)?;
    k.a.jz(absent)?;
    k.a.mov(edi, dword_ptr(esi + MMAP_TABLES))?;
    k.a.mov(ebx, dword_ptr(edx + MMAP_TABLES))?;
    k.bind(&mut next)?;
    k.a.mov(eax, dword_ptr(edi))?;
    k.a.test(eax, PAGE_PRESENT)?;
    let mut skip = k.label();
    k.a.jz(skip)?;
    k.a.test(eax, PTE_WRITABLE)?;
    k.a.jz(shared)?;
    k.a.and(eax, !PTE_WRITABLE as i32)?;
    k.a.or(eax, PTE_COPY_ON_WRITE)?;
    k.a.mov(dword_ptr(edi), eax)?;
    k.bind(&mut shared)?;
    k.a.mov(dword_ptr(ebx), eax)?;
    frame_index(k)?;
    k.a.inc(dword_ptr(eax * 4 + REFERENCE_COUNTS as i32))?;
    k.bind(&mut skip)?;
    k.a.add(edi, 4)?;
    k.a.add(ebx, 4)?;
    k.a.dec(ecx)?;
    k.a.jnz(next)?;
    k.a.mov(eax, cr3)?;
    k.a.mov(cr3, eax)?;
    k.bind(&mut absent)?;
    k.a.pop(ebx)?;
    k.a.ret()
}
