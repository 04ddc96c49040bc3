//! Multiboot 1 loading: a hand-assembled image that goes from the entry state to long mode, and
//! the loader's errors for bad images.

mod common;
use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::multiboot::{BOOTLOADER_MAGIC, HEADER_MAGIC};
use virtlab_machine::{CodeMode, LoadError, Machine, MachineConfig, NullObserver, PagingMode, RunLimits};

const LOAD: u32 = 0x10_0000;
const ENTRY: u32 = LOAD + 0x40;
const GDT_AT: u32 = LOAD + 0x300;
const GDT_POINTER: u32 = LOAD + 0x320;
const INFO_POINTER_SLOT: u32 = LOAD + 0x200;
const LONG_ENTRY: u32 = LOAD + 0x400;
const PAGE_TABLES: u32 = 0x11_0000;

fn header(flags: u32, load_end: u32, bss_end: u32, entry: u32, load: u32) -> Vec<u8> {
    let checksum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
    [HEADER_MAGIC, flags, checksum, load, load, load_end, bss_end, entry].iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn put(image: &mut Vec<u8>, offset: u32, bytes: &[u8]) {
    let offset = offset as usize;
    if image.len() < offset + bytes.len() {
        image.resize(offset + bytes.len(), 0);
    }
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// A kernel that checks the Multiboot magic, builds identity page tables (2 MiB pages), enables
/// PAE + long mode + paging, far-jumps to 64-bit code, prints "OK\n" and exits 0.
fn long_mode_kernel() -> Vec<u8> {
    let mut image = header(0x0001_0002, 0, PAGE_TABLES + 0x3000, ENTRY, LOAD);
    let boot = assemble32(ENTRY as u64, |a| {
        let mut fail = a.create_label();
        let mut fill = a.create_label();
        a.cmp(eax, BOOTLOADER_MAGIC).unwrap();
        a.jne(fail).unwrap();
        a.mov(dword_ptr(INFO_POINTER_SLOT), ebx).unwrap();
        a.mov(esp, 0x9_0000).unwrap();
        a.mov(dword_ptr(PAGE_TABLES), PAGE_TABLES + 0x1003).unwrap();
        a.mov(dword_ptr(PAGE_TABLES + 0x1000), PAGE_TABLES + 0x2003).unwrap();
        a.mov(ecx, 0).unwrap();
        a.set_label(&mut fill).unwrap();
        a.mov(eax, ecx).unwrap();
        a.shl(eax, 21).unwrap();
        a.or(eax, 0x83).unwrap();
        a.mov(dword_ptr(ecx * 8 + PAGE_TABLES + 0x2000), eax).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 512).unwrap();
        a.jb(fill).unwrap();
        a.mov(eax, PAGE_TABLES).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(ecx, 0xC000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.lgdt(ptr(GDT_POINTER)).unwrap();
        // jmp far 0x08:LONG_ENTRY
        a.db(&[0xEA]).unwrap();
        a.dd(&[LONG_ENTRY]).unwrap();
        a.dw(&[0x08]).unwrap();
        a.set_label(&mut fail).unwrap();
        a.mov(al, 0xEE).unwrap();
        a.out(0xF4, al).unwrap();
    });
    put(&mut image, ENTRY - LOAD, &boot);
    let gdt: [u64; 3] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];
    put(&mut image, GDT_AT - LOAD, &gdt.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<_>>());
    let mut pointer = 23u16.to_le_bytes().to_vec();
    pointer.extend_from_slice(&GDT_AT.to_le_bytes());
    put(&mut image, GDT_POINTER - LOAD, &pointer);
    let long = assemble(LONG_ENTRY as u64, |a| {
        a.mov(ax, 0x10).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(rsp, 0x20_0000u64).unwrap();
        a.mov(dx, 0x3F8).unwrap();
        for byte in b"OK\n" {
            a.mov(al, *byte as u32).unwrap();
            a.out(dx, al).unwrap();
        }
        a.mov(ebx, dword_ptr(INFO_POINTER_SLOT as u64)).unwrap();
        a.mov(r8d, dword_ptr(rbx)).unwrap();
        a.mov(r9d, dword_ptr(rbx + 8)).unwrap();
        a.mov(r10d, dword_ptr(rbx + 64)).unwrap();
        a.xor(eax, eax).unwrap();
        a.out(0xF4, al).unwrap();
    });
    put(&mut image, LONG_ENTRY - LOAD, &long);
    image
}

#[test]
fn boots_from_multiboot_entry_state_into_long_mode() {
    let image = long_mode_kernel();
    let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
    let cpu = machine.cpu();
    assert_eq!(
        (cpu.gpr[0], cpu.rip, cpu.code_mode(), cpu.paging_mode()),
        (0x2BAD_B002, ENTRY as u64, CodeMode::Bits32, PagingMode::None)
    );
    let info = cpu.gpr[3];
    assert_eq!(
        info,
        (PAGE_TABLES as u64 + 0x3000 + 0xFFF) & !0xFFF,
        "info at the page after bss_end, as QEMU places it"
    );
    let outcome = machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000 }).unwrap();
    assert_eq!(outcome.exit_status, 0);
    assert_eq!(outcome.serial, b"OK\n");
    let cpu = machine.cpu();
    assert_eq!(cpu.code_mode(), CodeMode::Bits64);
    assert_eq!(cpu.paging_mode(), PagingMode::FourLevel);
    assert_eq!(cpu.gpr[8] & 1, 1, "mem_lower/mem_upper valid");
    assert_eq!(cpu.gpr[9], (128 * 1024) - 1024);
    let name_at = cpu.gpr[10] as usize;
    assert_eq!(&machine.ram()[name_at..name_at + 8], b"virtlab\0");
}

#[test]
fn same_image_same_digest() {
    let image = long_mode_kernel();
    let run = || {
        let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
        machine.run(&mut NullObserver, RunLimits::default()).unwrap()
    };
    assert_eq!(run().digest, run().digest);
}

#[test]
fn image_without_header_is_refused() {
    let error = Machine::from_multiboot(&[0x90; 100], MachineConfig::default()).err().unwrap();
    assert_eq!(error, LoadError::NoMultibootHeader { image_len: 100 });
    assert!(error.to_string().contains("0x1BADB002"));
}

#[test]
fn bad_checksum_is_refused() {
    let mut image = long_mode_kernel();
    image[8] ^= 1;
    assert!(matches!(
        Machine::from_multiboot(&image, MachineConfig::default()).err().unwrap(),
        LoadError::BadChecksum { offset: 0, .. }
    ));
}

#[test]
fn elf_style_header_without_address_fields_is_refused() {
    let mut image = header(0x0000_0002, 0, 0, ENTRY, LOAD);
    image.resize(0x100, 0);
    assert_eq!(
        Machine::from_multiboot(&image, MachineConfig::default()).err().unwrap(),
        LoadError::NotAoutKludge { offset: 0 }
    );
}

#[test]
fn load_outside_memory_is_refused() {
    let load = 0x7FF_0000;
    let mut image = header(0x0001_0000, 0, load + 0x2_0000, load + 0x40, load);
    image.resize(0x100, 0);
    let error = Machine::from_multiboot(&image, MachineConfig::default()).err().unwrap();
    assert!(matches!(error, LoadError::OutsideMemory { ram_size: 0x800_0000, .. }), "{error}");
}

#[test]
fn load_over_the_vga_window_is_refused() {
    let load = 0xA_0000;
    let mut image = header(0x0001_0000, 0, 0, load + 0x40, load);
    image.resize(0x100, 0);
    let error = Machine::from_multiboot(&image, MachineConfig::default()).err().unwrap();
    assert!(matches!(error, LoadError::Overlap { other_start: 0xA_0000, .. }), "{error}");
}

#[test]
fn inconsistent_addresses_are_refused() {
    // load_end beyond the file.
    let mut image = header(0x0001_0000, LOAD + 0x1000, 0, ENTRY, LOAD);
    image.resize(0x100, 0);
    assert!(matches!(
        Machine::from_multiboot(&image, MachineConfig::default()).err().unwrap(),
        LoadError::InconsistentAddresses { .. }
    ));
    // Entry outside the loaded bytes.
    let mut image = header(0x0001_0000, 0, 0, LOAD + 0x10_0000, LOAD);
    image.resize(0x100, 0);
    assert!(matches!(
        Machine::from_multiboot(&image, MachineConfig::default()).err().unwrap(),
        LoadError::InconsistentAddresses { .. }
    ));
}

#[test]
fn memory_size_is_validated() {
    let config = MachineConfig { ram_size: 12345, command_line: String::new() };
    assert_eq!(Machine::new(&config).err().unwrap(), LoadError::BadMemorySize { ram_size: 12345 });
}
