//! 32-bit protected mode: segment limits, 2-level paging with 4 KiB and 4 MiB pages, PAE paging
//! with NX, and event delivery through 32-bit gates with a TSS stack switch.

mod common;
use common::{assemble32, exit, write_bytes, write_u64};
use iced_x86::code_asm::*;
use virtlab_machine::cpu::{cr0, cr4, efer, rflags, DescriptorTableRegister, Segment, SegmentRegister};
use virtlab_machine::{CodeMode, Machine, MachineConfig, NullObserver, PagingMode, RunLimits};

const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
const PAGE_DIRECTORY: u64 = 0x4000;
const PAGE_TABLE: u64 = 0x5000;
const HANDLER: u64 = 0x6000;
const CODE: u64 = 0x10000;
const USER_CODE: u64 = 0x11000;
const PDPT: u64 = 0x7000;
const PAE_DIRECTORY: u64 = 0x8000;

fn write_u32(machine: &mut Machine, address: u64, value: u32) {
    write_bytes(machine, address, &value.to_le_bytes());
}

fn read_u32(machine: &Machine, address: u64) -> u32 {
    u32::from_le_bytes(machine.ram()[address as usize..address as usize + 4].try_into().unwrap())
}

/// Flat 32-bit protected mode at CPL 0, paging off, a 32-bit IDT and TSS.
fn protected_machine() -> Machine {
    let mut machine = Machine::new(&MachineConfig { ram_size: 8 << 20, command_line: String::new() }).unwrap();
    let tss_low = 0x67u64 | ((TSS & 0xFF_FFFF) << 16) | (0x89u64 << 40);
    let gdt: [u64; 7] = [
        0,
        0x00CF_9A00_0000_FFFF, // 0x08 code
        0x00CF_9200_0000_FFFF, // 0x10 data
        0x00CF_FA00_0000_FFFF, // 0x18 user code
        0x00CF_F200_0000_FFFF, // 0x20 user data
        tss_low,               // 0x28 TSS
        0x0040_9200_0000_0FFF, // 0x30 data, byte granular, limit 0xFFF
    ];
    for (i, descriptor) in gdt.iter().enumerate() {
        write_u64(&mut machine, GDT + 8 * i as u64, *descriptor);
    }
    write_u32(&mut machine, TSS + 4, 0x9_0000);
    write_u32(&mut machine, TSS + 8, 0x10);
    let cpu = machine.cpu_mut();
    cpu.cr0 = cr0::PE | cr0::ET;
    cpu.gdtr = DescriptorTableRegister { base: GDT, limit: (gdt.len() * 8 - 1) as u16 };
    cpu.idtr = DescriptorTableRegister { base: IDT, limit: 256 * 8 - 1 };
    cpu.segments[SegmentRegister::Cs as usize] = Segment::flat(0x08, true);
    for segment in
        [SegmentRegister::Ds, SegmentRegister::Es, SegmentRegister::Ss, SegmentRegister::Fs, SegmentRegister::Gs]
    {
        cpu.segments[segment as usize] = Segment::flat(0x10, false);
    }
    cpu.tr =
        Segment { selector: 0x28, base: TSS, limit: 0x67, attributes: virtlab_machine::cpu::seg_attr::PRESENT | 0x0B };
    cpu.rflags = rflags::RESERVED1;
    cpu.rip = CODE;
    cpu.gpr[4] = 0x8_0000;
    machine.cpu_changed();
    machine
}

fn set_gate32(machine: &mut Machine, vector: u8, handler: u32, dpl: u8) {
    let low = (handler as u64 & 0xFFFF)
        | (0x08 << 16)
        | (0x8Eu64 << 40)
        | ((dpl as u64) << 45)
        | (((handler >> 16) as u64) << 48);
    write_u64(machine, IDT + vector as u64 * 8, low);
}

/// A handler that stores ESP, [ESP] and CR2 at 0x500.. and exits with `vector`.
fn recording_handler32(machine: &mut Machine, vector: u8) {
    let code = assemble32(HANDLER, |a| {
        a.mov(dword_ptr(0x500), esp).unwrap();
        a.mov(eax, dword_ptr(esp)).unwrap();
        a.mov(dword_ptr(0x504), eax).unwrap();
        a.mov(eax, cr2).unwrap();
        a.mov(dword_ptr(0x508), eax).unwrap();
        exit(a, vector);
    });
    write_bytes(machine, HANDLER, &code);
    set_gate32(machine, vector, HANDLER as u32, 0);
}

fn run32(machine: &mut Machine, build: impl FnOnce(&mut CodeAssembler)) -> u32 {
    let code = assemble32(CODE, build);
    write_bytes(machine, CODE, &code);
    machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000 }).unwrap().exit_status
}

#[test]
fn segment_limit_violation_is_a_general_protection_fault() {
    let mut machine = protected_machine();
    recording_handler32(&mut machine, 13);
    let status = run32(&mut machine, |a| {
        a.mov(ax, 0x30).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(dword_ptr(0xFFC).es(), eax).unwrap();
        a.mov(dword_ptr(0xFFD).es(), eax).unwrap();
    });
    assert_eq!(status, 13);
    assert_eq!(read_u32(&machine, 0x504), 0, "error code 0 for a limit violation");
    assert_eq!(read_u32(&machine, 0x500), 0x8_0000 - 16, "same-privilege frame: EFLAGS, CS, EIP, error code");
}

#[test]
fn two_level_paging_with_4k_and_4m_pages() {
    let mut machine = protected_machine();
    recording_handler32(&mut machine, 14);
    // PDE 0: page table identity-mapping the first 4 MiB, except page 0x200000 left not present.
    write_u32(&mut machine, PAGE_DIRECTORY, PAGE_TABLE as u32 | 3);
    for i in 0..1024u32 {
        let present = if i == 0x200 { 0 } else { 3 };
        write_u32(&mut machine, PAGE_TABLE + i as u64 * 4, (i << 12) | present);
    }
    // PDE 512 (0x80000000): a 4 MiB page on physical 0x400000.
    write_u32(&mut machine, PAGE_DIRECTORY + 512 * 4, 0x40_0000 | 0x83);
    let status = run32(&mut machine, |a| {
        a.mov(eax, PAGE_DIRECTORY as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, cr4::PSE as u32).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.mov(dword_ptr(0x8000_1234u32), 0xCAFE).unwrap();
        a.mov(eax, dword_ptr(0x20_0010)).unwrap();
    });
    assert_eq!(status, 14);
    assert_eq!(machine.cpu().paging_mode(), PagingMode::TwoLevel);
    assert_eq!(read_u32(&machine, 0x40_1234), 0xCAFE, "the 4 MiB page maps 0x80000000 to 0x400000");
    assert_eq!(read_u32(&machine, PAGE_DIRECTORY + 512 * 4) & 0x60, 0x60, "accessed and dirty on the 4 MiB PDE");
    assert_eq!((read_u32(&machine, 0x504), read_u32(&machine, 0x508)), (0, 0x20_0010));
}

#[test]
fn pae_paging_with_no_execute() {
    let mut machine = protected_machine();
    recording_handler32(&mut machine, 14);
    write_u64(&mut machine, PDPT, PAE_DIRECTORY | 1);
    // 2 MiB pages: the first identity mapped, the second (0x200000) no-execute.
    write_u64(&mut machine, PAE_DIRECTORY, 0x83);
    write_u64(&mut machine, PAE_DIRECTORY + 8, 0x20_0000 | 0x83 | (1 << 63));
    machine.ram_mut()[0x20_0000] = 0xC3;
    let status = run32(&mut machine, |a| {
        a.mov(ecx, 0xC000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, efer::NXE as u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, PDPT as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, cr4::PAE as u32).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.mov(eax, dword_ptr(0x20_0000)).unwrap();
        a.mov(eax, 0x20_0000).unwrap();
        a.call(eax).unwrap();
    });
    assert_eq!(status, 14);
    assert_eq!(machine.cpu().paging_mode(), PagingMode::Pae);
    assert_eq!((read_u32(&machine, 0x504), read_u32(&machine, 0x508)), (0x11, 0x20_0000));
}

#[test]
fn interrupt_from_ring_3_switches_to_the_tss_stack() {
    let mut machine = protected_machine();
    recording_handler32(&mut machine, 0x80);
    set_gate32(&mut machine, 0x80, HANDLER as u32, 3);
    // IRETD to ring 3 nulls DS (DPL 0): the user code loads its own before the interrupt.
    let user = assemble32(USER_CODE, |a| {
        a.mov(eax, 0x23).unwrap();
        a.mov(ds, ax).unwrap();
        a.int(0x80).unwrap();
    });
    write_bytes(&mut machine, USER_CODE, &user);
    let status = run32(&mut machine, |a| {
        a.push(0x23).unwrap();
        a.push(0x7_0000).unwrap();
        a.push(0x202).unwrap();
        a.push(0x1B).unwrap();
        a.push(USER_CODE as u32).unwrap();
        a.iretd().unwrap();
    });
    assert_eq!(status, 0x80);
    assert_eq!(read_u32(&machine, 0x500), 0x9_0000 - 20, "SS, ESP, EFLAGS, CS, EIP on the ring-0 stack");
    assert_eq!(read_u32(&machine, 0x504), USER_CODE as u32 + 10, "INT n returns after itself");
    assert_eq!(read_u32(&machine, 0x9_0000 - 16), 0x1B);
    assert_eq!(read_u32(&machine, 0x9_0000 - 8), 0x7_0000);
    assert_eq!(read_u32(&machine, 0x9_0000 - 4), 0x23);
    assert_eq!(machine.cpu().code_mode(), CodeMode::Bits32);
    assert_eq!(machine.cpu().cpl, 0);
}
