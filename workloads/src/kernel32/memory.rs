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
const PAGE_NOT_PRESENT_MASK: u32 = 1;

const _: () = assert!(MMAP_BASE >> 22 == 288 && MMAP_PAGE_TABLE_COUNT == 4);
const _: () = assert!(FREE_STACK + (MMAP_WINDOW_BYTES >> 12) * 4 <= 0x40_0000, "the free stack is identity mapped");

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
    emit_demand_zero(k)
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
    k.a.test(eax, PAGE_NOT_PRESENT_MASK)?;
    k.a.jz(absent)?;
    k.a.mov(dword_ptr(ecx), 0)?;
    k.a.invlpg(ptr(edx))?;
    k.a.and(eax, !4095u32 as i32)?;
    k.a.mov(edi, dword_ptr(VAR_FREE_COUNT))?;
    k.a.mov(dword_ptr(edi * 4 + FREE_STACK as i32), eax)?;
    k.a.inc(dword_ptr(VAR_FREE_COUNT))?;
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

/// demand_zero (from `user_fault` for a user #PF; stack: vector, error code, EIP, …): a not-present fault inside
/// the mapping gets a fresh frame, mapped writable and cleared, and the access is retried. Any other fault
/// returns to `user_fault`'s delivery. Preserves every register.
fn emit_demand_zero(k: &mut Kernel32) -> AsmResult {
    let demand_zero = k.r.demand_zero;
    k.routine("demand_zero", demand_zero)?;
    let (mut not_ours, mut from_stack, mut have_frame) = (k.label(), k.label(), k.label());
    k.a.test(dword_ptr(esp + 4), PAGE_NOT_PRESENT_MASK)?;
    k.a.jnz(not_ours)?;
    k.a.pushad()?;
    k.a.mov(edx, cr2)?;
    k.a.sub(edx, MMAP_BASE)?;
    k.a.mov(esi, dword_ptr(VAR_CURRENT))?;
    k.a.cmp(edx, dword_ptr(esi + MAPPING))?;
    let mut outside = k.label();
    k.a.jae(outside)?;
    // A frame: the free stack's top, else the next never-used one.
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
    k.a.shr(edx, 12)?;
    k.a.or(eax, PTE_USER_WRITABLE)?;
    k.a.mov(ebx, dword_ptr(esi + MMAP_TABLES))?;
    k.a.mov(dword_ptr(ebx + edx * 4), eax)?;
    k.a.mov(edi, cr2)?;
    k.a.and(edi, !4095u32 as i32)?;
    k.a.xor(eax, eax)?;
    k.a.mov(ecx, 1024)?;
    k.a.rep().stosd()?;
    k.a.popad()?;
    k.a.add(esp, 8)?;
    k.a.iretd()?;
    k.bind(&mut outside)?;
    k.a.popad()?;
    k.bind(&mut not_ours)?;
    k.a.jmp(k.r.user_fault_delivery)?;

    let out_of_memory = k.r.out_of_memory;
    k.routine("out_of_memory", out_of_memory)?;
    k.print("panic: out of page frames\n")?;
    k.a.mov(eax, exit_code::OUT_OF_MEMORY)?;
    k.a.jmp(k.r.exit_machine)
}
