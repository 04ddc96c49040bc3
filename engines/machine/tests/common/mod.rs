//! A bare long-mode harness: identity-mapped page tables, a GDT with kernel and user segments, a
//! TSS and an IDT, code assembled with iced-x86 at [`CODE`].
#![allow(dead_code)]

use iced_x86::code_asm::*;
use virtlab_machine::cpu::{cr0, cr4, efer, rflags, seg_attr, DescriptorTableRegister, Segment, SegmentRegister};
use virtlab_machine::{ExecutionObserver, Machine, MachineConfig, MachineError, NullObserver, RunLimits, RunOutcome};

pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
pub const PD_HIGH: u64 = 0x7000;
pub const GDT: u64 = 0x4000;
pub const TSS: u64 = 0x5000;
pub const IDT: u64 = 0x6000;
pub const CODE: u64 = 0x10000;
pub const HANDLERS: u64 = 0x20000;
pub const USER_CODE: u64 = 0x30000;
pub const DATA: u64 = 0x40000;
pub const STACK_TOP: u64 = 0x80000;
pub const KERNEL_STACK_TOP: u64 = 0x90000;
pub const IST_STACK_TOP: u64 = 0xA0000;
/// Page table for the first 2 MiB when a test wants 4 KiB pages there.
pub const PT_LOW: u64 = 0x8000;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x1B;
pub const USER_CS: u16 = 0x23;
pub const TSS_SELECTOR: u16 = 0x28;
pub const CODE32_SELECTOR: u16 = 0x38;

pub const PRESENT: u64 = 1;
pub const WRITABLE: u64 = 2;
pub const USER: u64 = 4;
pub const LARGE: u64 = 0x80;
pub const NX: u64 = 1 << 63;

pub fn write_u64(machine: &mut Machine, address: u64, value: u64) {
    machine.ram_mut()[address as usize..address as usize + 8].copy_from_slice(&value.to_le_bytes());
}

pub fn read_u64(machine: &Machine, address: u64) -> u64 {
    u64::from_le_bytes(machine.ram()[address as usize..address as usize + 8].try_into().unwrap())
}

pub fn write_bytes(machine: &mut Machine, address: u64, bytes: &[u8]) {
    machine.ram_mut()[address as usize..address as usize + bytes.len()].copy_from_slice(bytes);
}

pub fn assemble(address: u64, build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut assembler = CodeAssembler::new(64).unwrap();
    build(&mut assembler);
    assembler.assemble(address).unwrap()
}

pub fn assemble32(address: u64, build: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut assembler = CodeAssembler::new(32).unwrap();
    build(&mut assembler);
    assembler.assemble(address).unwrap()
}

/// Sets an IDT gate (interrupt gate unless `trap`) to `handler` in the kernel code segment.
pub fn set_gate(machine: &mut Machine, vector: u8, handler: u64, dpl: u8, ist: u8, trap: bool) {
    let kind: u64 = if trap { 0xF } else { 0xE };
    let low = (handler & 0xFFFF)
        | ((KERNEL_CS as u64) << 16)
        | ((ist as u64) << 32)
        | (kind << 40)
        | ((dpl as u64) << 45)
        | (1 << 47)
        | (((handler >> 16) & 0xFFFF) << 48);
    let high = handler >> 32;
    let at = IDT + vector as u64 * 16;
    write_u64(machine, at, low);
    write_u64(machine, at + 8, high);
}

/// Long mode, CPL 0, identity mapping of the first 1 GiB with 2 MiB pages (user, writable) plus
/// the MMIO test region; NXE, SCE and WP on; interrupts off.
pub fn long_mode_machine() -> Machine {
    let mut machine = Machine::new(&MachineConfig { ram_size: 8 << 20, command_line: String::new() }).unwrap();
    write_u64(&mut machine, PML4, PDPT | PRESENT | WRITABLE | USER);
    write_u64(&mut machine, PDPT, PD | PRESENT | WRITABLE | USER);
    write_u64(&mut machine, PDPT + 3 * 8, PD_HIGH | PRESENT | WRITABLE | USER);
    for i in 0..512u64 {
        write_u64(&mut machine, PD + i * 8, (i << 21) | PRESENT | WRITABLE | USER | LARGE);
    }
    // 0xD0000000 is 3 GiB + 256 MiB: entry 128 of the fourth PD.
    write_u64(&mut machine, PD_HIGH + 128 * 8, 0xD000_0000 | PRESENT | WRITABLE | LARGE);
    let gdt: [u64; 9] = [
        0,
        0x00AF_9A00_0000_FFFF, // 0x08 kernel code 64
        0x00CF_9200_0000_FFFF, // 0x10 kernel data
        0x00CF_F200_0000_FFFF, // 0x18 user data (DPL 3)
        0x00AF_FA00_0000_FFFF, // 0x20 user code 64 (DPL 3)
        0,                     // 0x28 TSS, filled below
        0,
        0x00CF_9A00_0000_FFFF, // 0x38 kernel code 32
        0,
    ];
    for (i, descriptor) in gdt.iter().enumerate() {
        write_u64(&mut machine, GDT + 8 * i as u64, *descriptor);
    }
    let tss_limit = 0x67u64 + 0x2000 / 8 + 1;
    let tss_low = (tss_limit & 0xFFFF) | ((TSS & 0xFF_FFFF) << 16) | (0x89u64 << 40) | (((TSS >> 24) & 0xFF) << 56);
    write_u64(&mut machine, GDT + 0x28, tss_low);
    write_u64(&mut machine, GDT + 0x30, TSS >> 32);
    write_u64(&mut machine, TSS + 4, KERNEL_STACK_TOP);
    write_u64(&mut machine, TSS + 0x24, IST_STACK_TOP);
    // I/O bitmap right after the TSS, all ports denied unless a test clears bits.
    machine.ram_mut()[(TSS + 0x66) as usize..(TSS + 0x68) as usize].copy_from_slice(&0x68u16.to_le_bytes());
    for byte in &mut machine.ram_mut()[(TSS + 0x68) as usize..(TSS + 0x68 + 0x2000 / 8) as usize] {
        *byte = 0xFF;
    }
    {
        let cpu = machine.cpu_mut();
        cpu.cr0 = cr0::PE | cr0::ET | cr0::PG | cr0::WP;
        cpu.cr4 = cr4::PAE;
        cpu.cr3 = PML4;
        cpu.efer = efer::LME | efer::LMA | efer::NXE | efer::SCE;
        cpu.gdtr = DescriptorTableRegister { base: GDT, limit: (gdt.len() * 8 - 1) as u16 };
        cpu.idtr = DescriptorTableRegister { base: IDT, limit: 256 * 16 - 1 };
        let mut code = Segment::flat(KERNEL_CS, true);
        code.attributes = (code.attributes & !seg_attr::DEFAULT_BIG) | seg_attr::LONG;
        cpu.segments[SegmentRegister::Cs as usize] = code;
        for segment in
            [SegmentRegister::Ds, SegmentRegister::Es, SegmentRegister::Ss, SegmentRegister::Fs, SegmentRegister::Gs]
        {
            cpu.segments[segment as usize] = Segment::flat(KERNEL_DS, false);
        }
        cpu.tr = Segment {
            selector: TSS_SELECTOR,
            base: TSS,
            limit: tss_limit as u32,
            attributes: seg_attr::PRESENT | 0x0B,
        };
        cpu.rflags = rflags::RESERVED1;
        cpu.rip = CODE;
        cpu.gpr[4] = STACK_TOP;
        cpu.msr.star = ((0x10u64) << 48) | ((KERNEL_CS as u64) << 32);
    }
    machine.cpu_changed();
    machine
}

pub fn limits() -> RunLimits {
    RunLimits { max_instructions: 1_000_000 }
}

/// Assembles `build` at CODE, appends the exit sequence (`out 0xF4, al` with AL = 0 is *not*
/// added: tests end with `exit(a)` themselves), and runs.
pub fn run_code(build: impl FnOnce(&mut CodeAssembler)) -> (Machine, Result<RunOutcome, MachineError>) {
    let mut machine = long_mode_machine();
    let code = assemble(CODE, build);
    write_bytes(&mut machine, CODE, &code);
    let result = machine.run(&mut NullObserver, limits());
    (machine, result)
}

pub fn run_code_observed<O: ExecutionObserver>(
    machine: &mut Machine,
    observer: &mut O,
    build: impl FnOnce(&mut CodeAssembler),
) -> Result<RunOutcome, MachineError> {
    let code = assemble(CODE, build);
    write_bytes(machine, CODE, &code);
    machine.run(observer, limits())
}

/// `out 0xF4, al` with AL = `status`, preserving nothing else.
pub fn exit(a: &mut CodeAssembler, status: u8) {
    a.mov(al, status as i32).unwrap();
    a.out(0xF4, al).unwrap();
}

/// Saves RFLAGS into R15 (PUSHFQ; POP R15) and RAX into R14 (the exit sequence clobbers AL),
/// then exits 0.
pub fn save_flags_and_exit(a: &mut CodeAssembler) {
    a.pushfq().unwrap();
    a.pop(r15).unwrap();
    a.mov(r14, rax).unwrap();
    exit(a, 0);
}

/// The six status flags of a saved RFLAGS.
pub fn status(flags: u64) -> u64 {
    flags & 0x8D5
}

pub const USER_STACK_TOP: u64 = 0x70000;

/// From CPL 0, IRETQ to USER_CODE at CPL 3 with the given RFLAGS.
pub fn enter_user(a: &mut CodeAssembler, flags: u64) {
    a.push(USER_DS as i32).unwrap();
    a.mov(rax, USER_STACK_TOP).unwrap();
    a.push(rax).unwrap();
    a.mov(rax, flags).unwrap();
    a.push(rax).unwrap();
    a.push(USER_CS as i32).unwrap();
    a.mov(rax, USER_CODE).unwrap();
    a.push(rax).unwrap();
    a.iretq().unwrap();
}

/// Maps the first 2 MiB with 4 KiB pages (PT at PT_LOW), all present, writable, user.
pub fn use_small_pages(machine: &mut Machine) {
    write_u64(machine, PD, PT_LOW | PRESENT | WRITABLE | USER);
    for i in 0..512u64 {
        write_u64(machine, PT_LOW + i * 8, (i << 12) | PRESENT | WRITABLE | USER);
    }
}

pub fn set_pte(machine: &mut Machine, page: u64, flags: u64) {
    write_u64(machine, PT_LOW + (page >> 12) * 8, (page & !0xFFF) | flags);
}

pub fn pte(machine: &Machine, page: u64) -> u64 {
    read_u64(machine, PT_LOW + (page >> 12) * 8)
}

/// Places code assembled by `build` at `address`.
pub fn place(machine: &mut Machine, address: u64, build: impl FnOnce(&mut CodeAssembler)) {
    let code = assemble(address, build);
    write_bytes(machine, address, &code);
}

/// A handler that saves RSP in R12, the first frame word in R13 and CR2 in R11, then exits with
/// status `vector`.
pub fn recording_handler(machine: &mut Machine, vector: u8, address: u64) {
    place(machine, address, |a| {
        a.mov(r12, rsp).unwrap();
        a.mov(r13, qword_ptr(rsp)).unwrap();
        a.mov(r11, cr2).unwrap();
        exit(a, vector);
    });
    set_gate(machine, vector, address, 0, 0, false);
}

/// Runs a prepared machine without observer.
pub fn run_prepared(machine: &mut Machine) -> Result<RunOutcome, MachineError> {
    machine.run(&mut NullObserver, limits())
}
