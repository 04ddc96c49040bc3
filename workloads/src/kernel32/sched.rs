//! Processes of the 32-bit kernel: a table of eight slots, fork, wait, yield, exit, and the switch between
//! processes (CR3, the TSS's ESP0 and IA32_SYSENTER_ESP follow the process, as in a 32-bit Linux of the SYSENTER
//! era). No timer preemption: a process runs until it yields, waits or exits.
//!
//! Every slot's memory is fixed and identity mapped in the kernel's 4 MiB: its page directory, the page table of
//! its 4 MiB of program and stack, the four page tables of its mmap window, its four stack frames and its kernel
//! stack. Slot 0 is process 1, which keeps the kernel's page directory and the boot stack. `fork` gives the child
//! the parent's program pages (read-only, shared), a copy of its stack, and its mapping shared copy-on-write
//! (`memory::share_mapping`).

use iced_x86::code_asm::*;

use super::memory::{MMAP_BASE, MMAP_PAGE_TABLES, MMAP_PAGE_TABLE_COUNT};
use super::process::{PTE_USER_WRITABLE, STACK_FRAMES, USER_CODE, USER_PAGE_TABLE, USER_STACK_PAGES};
use super::{
    Kernel32, BOOT_STACK_TOP32, GDT, PAGE_DIRECTORY, PAGE_TABLE_LOW, PAGE_TABLE_MMIO, PTE_PRESENT_WRITABLE, TSS,
};
use crate::asm32::MSR_SYSENTER_ESP;
use crate::kernel::AsmResult;
use crate::machine::{exit_code, MACHINE};

pub const PROCESS_TABLE: u32 = 0x25_0000;
const SLOT_BYTES: u32 = 64;
const SLOTS: u32 = 8;
const TABLE_END: u32 = PROCESS_TABLE + SLOTS * SLOT_BYTES;
/// The memory of slots 1–7, 64 KiB each (slot 0's is the kernel's own).
const SLOT_MEMORY: u32 = 0x26_0000;
const SLOT_MEMORY_BYTES: u32 = 0x1_0000;
const _: () = assert!(SLOT_MEMORY + (SLOTS - 1) * SLOT_MEMORY_BYTES <= 0x40_0000, "slots are identity mapped");

// A slot's fields.
pub const STATE: i32 = 0;
pub const PID: i32 = 4;
const PARENT: i32 = 8;
const STATUS: i32 = 12;
const SAVED_ESP: i32 = 16;
const DIRECTORY: i32 = 20;
const KERNEL_STACK_TOP: i32 = 24;
/// The anonymous mapping's length (0: none) and its window's first page table.
pub const MAPPING: i32 = 28;
pub const MMAP_TABLES: i32 = 32;
const USER_TABLE: i32 = 36;
const STACK: i32 = 40;
/// The user trap handler (0: none); a child inherits its parent's.
pub const TRAP_HANDLER: i32 = 44;

const FREE: u32 = 0;
const RUNNABLE: u32 = 1;
const WAITING: u32 = 2;
const ZOMBIE: u32 = 3;

/// The running process's slot.
pub const VAR_CURRENT: u32 = GDT + 0x124;
const VAR_NEXT_PID: u32 = GDT + 0x128;

/// A slot's fixed memory: page directory, user page table, mmap page tables, stack frames, kernel stack top.
fn slot_memory(slot: u32) -> [(i32, u32); 5] {
    if slot == 0 {
        return [
            (DIRECTORY, PAGE_DIRECTORY),
            (USER_TABLE, USER_PAGE_TABLE),
            (MMAP_TABLES, MMAP_PAGE_TABLES),
            (STACK, STACK_FRAMES),
            (KERNEL_STACK_TOP, BOOT_STACK_TOP32),
        ];
    }
    let base = SLOT_MEMORY + (slot - 1) * SLOT_MEMORY_BYTES;
    [
        (DIRECTORY, base),
        (USER_TABLE, base + 0x1000),
        (MMAP_TABLES, base + 0x2000),
        (STACK, base + 0x6000),
        (KERNEL_STACK_TOP, base + SLOT_MEMORY_BYTES),
    ]
}

/// At process start: every slot free with its memory recorded, then slot 0 running as process 1.
pub(crate) fn emit_init(k: &mut Kernel32) -> AsmResult {
    for slot in 0..SLOTS {
        let address = PROCESS_TABLE + slot * SLOT_BYTES;
        k.a.mov(dword_ptr(address + STATE as u32), FREE)?;
        k.a.mov(dword_ptr(address + MAPPING as u32), 0)?;
        k.a.mov(dword_ptr(address + TRAP_HANDLER as u32), 0)?;
        for (field, value) in slot_memory(slot) {
            k.a.mov(dword_ptr(address + field as u32), value)?;
        }
    }
    k.a.mov(dword_ptr(PROCESS_TABLE + STATE as u32), RUNNABLE)?;
    k.a.mov(dword_ptr(PROCESS_TABLE + PID as u32), 1)?;
    k.a.mov(dword_ptr(PROCESS_TABLE + PARENT as u32), 0)?;
    k.a.mov(dword_ptr(VAR_CURRENT), PROCESS_TABLE)?;
    k.a.mov(dword_ptr(VAR_NEXT_PID), 2)
}

pub(crate) fn emit(k: &mut Kernel32) -> AsmResult {
    emit_fork(k)?;
    emit_wait(k)?;
    emit_yield_and_schedule(k)?;
    emit_exit_child(k)
}

/// Clears `dwords` dwords at EDI (clobbers EAX, ECX, EDI).
fn clear(k: &mut Kernel32, dwords: u32) -> AsmResult {
    k.a.xor(eax, eax)?;
    k.a.mov(ecx, dwords)?;
    k.a.rep().stosd()
}

/// sys_fork → the child's pid in the parent, 0 in the child; −1 when no slot is free.
/// The child's kernel stack is the parent's from the return into the system-call entry up, under a switch frame
/// that resumes at `fork_child_return` with the parent's EBX and EBP (the user's, which the dispatcher keeps).
fn emit_fork(k: &mut Kernel32) -> AsmResult {
    let sys_fork = k.r.sys_fork;
    k.routine("sys_fork", sys_fork)?;
    let (mut refused, mut next_slot, mut found) = (k.label(), k.label(), k.label());
    k.a.mov(esi, dword_ptr(VAR_CURRENT))?;
    k.a.mov(edx, PROCESS_TABLE + SLOT_BYTES)?;
    k.bind(&mut next_slot)?;
    k.a.cmp(dword_ptr(edx + STATE), FREE)?;
    k.a.je(found)?;
    k.a.add(edx, SLOT_BYTES)?;
    k.a.cmp(edx, TABLE_END)?;
    k.a.jb(next_slot)?;
    k.bind(&mut refused)?;
    k.a.mov(eax, u32::MAX)?;
    k.a.ret()?;

    // ESI = the parent's slot, EDX = the child's.
    k.bind(&mut found)?;
    k.a.mov(dword_ptr(edx + STATE), RUNNABLE)?;
    k.a.mov(eax, dword_ptr(VAR_NEXT_PID))?;
    k.a.mov(dword_ptr(edx + PID), eax)?;
    k.a.inc(dword_ptr(VAR_NEXT_PID))?;
    k.a.mov(dword_ptr(edx + PARENT), esi)?;
    k.a.mov(eax, dword_ptr(esi + TRAP_HANDLER))?;
    k.a.mov(dword_ptr(edx + TRAP_HANDLER), eax)?;

    // The page directory: the kernel's entries, the child's own user and mmap-window tables.
    k.a.mov(edi, dword_ptr(edx + DIRECTORY))?;
    clear(k, 1024)?;
    k.a.mov(edi, dword_ptr(edx + DIRECTORY))?;
    let mmio = MACHINE.mmio_test_base as u32;
    k.a.mov(dword_ptr(edi), PAGE_TABLE_LOW | PTE_PRESENT_WRITABLE)?;
    k.a.mov(dword_ptr(edi + ((mmio >> 22) * 4) as i32), PAGE_TABLE_MMIO | PTE_PRESENT_WRITABLE)?;
    k.a.mov(eax, dword_ptr(edx + USER_TABLE))?;
    k.a.or(eax, PTE_USER_WRITABLE)?;
    k.a.mov(dword_ptr(edi + ((USER_CODE >> 22) * 4) as i32), eax)?;
    for table in 0..MMAP_PAGE_TABLE_COUNT {
        k.a.mov(eax, dword_ptr(edx + MMAP_TABLES))?;
        k.a.add(eax, (table * 4096) | PTE_USER_WRITABLE)?;
        k.a.mov(dword_ptr(edi + (((MMAP_BASE >> 22) + table) * 4) as i32), eax)?;
    }
    k.a.mov(edi, dword_ptr(edx + MMAP_TABLES))?;
    clear(k, MMAP_PAGE_TABLE_COUNT * 1024)?;
    k.a.call(k.r.share_mapping)?;

    // The user page table: the parent's (the program's read-only entries), then the stack's entries replaced by
    // the child's frames, filled with a copy of the parent's stack.
    k.a.push(esi)?;
    k.a.mov(esi, dword_ptr(esi + USER_TABLE))?;
    k.a.mov(edi, dword_ptr(edx + USER_TABLE))?;
    k.a.mov(ecx, 1024)?;
    k.a.rep().movsd()?;
    k.a.mov(esi, dword_ptr(esp))?;
    k.a.mov(esi, dword_ptr(esi + STACK))?;
    k.a.mov(edi, dword_ptr(edx + STACK))?;
    k.a.mov(ecx, USER_STACK_PAGES * 1024)?;
    k.a.rep().movsd()?;
    k.a.mov(edi, dword_ptr(edx + USER_TABLE))?;
    k.a.mov(eax, dword_ptr(edx + STACK))?;
    k.a.or(eax, PTE_USER_WRITABLE)?;
    for page in 0..USER_STACK_PAGES {
        let entry = ((1024 - USER_STACK_PAGES + page) * 4) as i32;
        k.a.mov(dword_ptr(edi + entry), eax)?;
        k.a.add(eax, 4096)?;
    }
    k.a.pop(esi)?;

    // The kernel stack: from [ESP] (the dispatcher jumped here, so this is the return into the entry) to the
    // parent's stack top.
    k.a.mov(ecx, dword_ptr(esi + KERNEL_STACK_TOP))?;
    k.a.mov(esi, esp)?;
    k.a.sub(ecx, esi)?;
    k.a.mov(edi, dword_ptr(edx + KERNEL_STACK_TOP))?;
    k.a.sub(edi, ecx)?;
    k.a.push(edi)?;
    k.a.shr(ecx, 2)?;
    k.a.rep().movsd()?;
    k.a.pop(edi)?;
    // The switch frame under it: EDI, ESI, EBP, EBX popped by `switch_to`, then its return.
    let child_return = k.address_of(k.r.fork_child_return);
    k.a.mov(dword_ptr(edi - 4), child_return)?;
    k.a.mov(dword_ptr(edi - 8), ebx)?;
    k.a.mov(dword_ptr(edi - 12), ebp)?;
    k.a.sub(edi, 20)?;
    k.a.mov(dword_ptr(edx + SAVED_ESP), edi)?;
    k.a.mov(eax, dword_ptr(edx + PID))?;
    k.a.ret()?;

    let fork_child_return = k.r.fork_child_return;
    k.routine("fork_child_return", fork_child_return)?;
    k.a.xor(eax, eax)?;
    k.a.ret()
}

/// sys_wait → the exit status of a child that exited (its slot is freed); blocks while children run; −1 with no
/// children.
fn emit_wait(k: &mut Kernel32) -> AsmResult {
    let sys_wait = k.r.sys_wait;
    k.routine("sys_wait", sys_wait)?;
    let (mut scan, mut skip, mut reap, mut none) = (k.label(), k.label(), k.label(), k.label());
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.a.xor(edx, edx)?;
    k.a.mov(eax, PROCESS_TABLE)?;
    k.bind(&mut scan)?;
    k.a.cmp(dword_ptr(eax + STATE), FREE)?;
    k.a.je(skip)?;
    k.a.cmp(dword_ptr(eax + PARENT), ecx)?;
    k.a.jne(skip)?;
    k.a.inc(edx)?;
    k.a.cmp(dword_ptr(eax + STATE), ZOMBIE)?;
    k.a.je(reap)?;
    k.bind(&mut skip)?;
    k.a.add(eax, SLOT_BYTES)?;
    k.a.cmp(eax, TABLE_END)?;
    k.a.jb(scan)?;
    k.a.test(edx, edx)?;
    k.a.jz(none)?;
    k.a.mov(dword_ptr(ecx + STATE), WAITING)?;
    k.a.call(k.r.schedule)?;
    k.a.jmp(k.r.sys_wait)?;
    k.bind(&mut reap)?;
    k.a.mov(dword_ptr(eax + STATE), FREE)?;
    k.a.mov(eax, dword_ptr(eax + STATUS))?;
    k.a.ret()?;
    k.bind(&mut none)?;
    k.a.mov(eax, u32::MAX)?;
    k.a.ret()
}

/// sys_yield → 0 after the other runnable processes had their turn; `schedule`: the next runnable slot after the
/// current one, round robin (the current one last); `switch_to(EAX = slot)`.
fn emit_yield_and_schedule(k: &mut Kernel32) -> AsmResult {
    let sys_yield = k.r.sys_yield;
    k.routine("sys_yield", sys_yield)?;
    k.a.call(k.r.schedule)?;
    k.a.xor(eax, eax)?;
    k.a.ret()?;

    let schedule = k.r.schedule;
    k.routine("schedule", schedule)?;
    let (mut next, mut in_table, mut found, mut same) = (k.label(), k.label(), k.label(), k.label());
    k.a.cli()?;
    k.a.mov(eax, dword_ptr(VAR_CURRENT))?;
    k.a.mov(ecx, SLOTS)?;
    k.bind(&mut next)?;
    k.a.add(eax, SLOT_BYTES)?;
    k.a.cmp(eax, TABLE_END)?;
    k.a.jb(in_table)?;
    k.a.mov(eax, PROCESS_TABLE)?;
    k.bind(&mut in_table)?;
    k.a.cmp(dword_ptr(eax + STATE), RUNNABLE)?;
    k.a.je(found)?;
    k.a.dec(ecx)?;
    k.a.jnz(next)?;
    k.print("panic: no runnable process\n")?;
    k.a.mov(eax, exit_code::DEADLOCK)?;
    k.a.jmp(k.r.exit_machine)?;
    k.bind(&mut found)?;
    k.a.cmp(eax, dword_ptr(VAR_CURRENT))?;
    k.a.je(same)?;
    k.a.jmp(k.r.switch_to)?;
    k.bind(&mut same)?;
    k.a.ret()?;

    let switch_to = k.r.switch_to;
    k.routine("switch_to", switch_to)?;
    for register in [ebx, ebp, esi, edi] {
        k.a.push(register)?;
    }
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.a.mov(dword_ptr(ecx + SAVED_ESP), esp)?;
    k.a.mov(dword_ptr(VAR_CURRENT), eax)?;
    k.a.mov(edx, dword_ptr(eax + DIRECTORY))?;
    k.a.mov(cr3, edx)?;
    k.a.mov(edx, dword_ptr(eax + KERNEL_STACK_TOP))?;
    k.a.mov(dword_ptr(TSS + 4), edx)?;
    k.a.mov(esp, dword_ptr(eax + SAVED_ESP))?;
    k.a.mov(ecx, MSR_SYSENTER_ESP)?;
    k.a.mov(eax, edx)?;
    k.a.xor(edx, edx)?;
    k.a.wrmsr()?;
    for register in [edi, esi, ebp, ebx] {
        k.a.pop(register)?;
    }
    k.a.ret()
}

/// exit_child(EBX = status): a process other than process 1 ends: its mapping is unmapped, it becomes a zombie
/// for its parent's `wait` (woken if it waits), and the next process runs.
fn emit_exit_child(k: &mut Kernel32) -> AsmResult {
    let exit_child = k.r.exit_child;
    k.routine("exit_child", exit_child)?;
    let (mut unmapped, mut parent_runs) = (k.label(), k.label());
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.a.mov(esi, dword_ptr(ecx + MAPPING))?;
    k.a.test(esi, esi)?;
    k.a.jz(unmapped)?;
    k.a.push(ebx)?;
    k.a.mov(ebx, MMAP_BASE)?;
    k.a.call(k.r.sys_munmap)?;
    k.a.pop(ebx)?;
    k.a.mov(ecx, dword_ptr(VAR_CURRENT))?;
    k.bind(&mut unmapped)?;
    k.a.mov(dword_ptr(ecx + STATUS), ebx)?;
    k.a.mov(dword_ptr(ecx + STATE), ZOMBIE)?;
    k.a.mov(eax, dword_ptr(ecx + PARENT))?;
    k.a.cmp(dword_ptr(eax + STATE), WAITING)?;
    k.a.jne(parent_runs)?;
    k.a.mov(dword_ptr(eax + STATE), RUNNABLE)?;
    k.bind(&mut parent_runs)?;
    // A zombie is never scheduled again, so this does not return.
    k.a.jmp(k.r.schedule)
}
