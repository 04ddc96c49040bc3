//! The first page of the image: the Multiboot header, the GDT, and the 32-bit boot stub that builds
//! the kernel page tables, turns on PAE, long mode and paging, and far-jumps into 64-bit code at
//! `layout::KERNEL_CODE_ADDRESS`.

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction};

use super::AsmResult;
use crate::layout::*;
use crate::symbols::{FunctionLabels, Symbol};

pub const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
/// Bit 16: the header carries the load addresses (the a.out kludge), so no ELF is needed.
pub const MULTIBOOT_FLAGS: u32 = 1 << 16;
const EFER_MSR: u32 = 0xC000_0080;
const EFER_SCE: u32 = 1 << 0;
const EFER_LME: u32 = 1 << 8;
/// Present, writable, and for directory entries the 2 MiB page-size bit.
const TABLE_ENTRY: u32 = (PTE_PRESENT | PTE_WRITABLE) as u32;
const LARGE_PAGE: u32 = TABLE_ENTRY | 0x80;
/// Cache-disabled, write-through: the MMIO test region must not be cached.
const UNCACHED: u32 = 0x18;

/// What LAR returns for the code descriptors below (bits 8..23 of the high dword, masked with
/// 0x00F0FF00), and LSL for the flat data descriptors.
pub const KERNEL_CODE_ACCESS_RIGHTS: u32 = 0x00A0_9B00;
pub const USER_CODE_ACCESS_RIGHTS: u32 = 0x00A0_FB00;
pub const FLAT_LIMIT: u32 = 0xFFFF_FFFF;

/// The Multiboot 1 header with the a.out-kludge address fields.
pub fn multiboot_header(load_end: u64) -> Vec<u8> {
    let fields = [
        MULTIBOOT_MAGIC,
        MULTIBOOT_FLAGS,
        0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(MULTIBOOT_FLAGS)),
        LOAD_ADDRESS as u32,
        LOAD_ADDRESS as u32,
        load_end as u32,
        BSS_END as u32,
        BOOT_STUB_ADDRESS as u32,
    ];
    fields.iter().flat_map(|field| field.to_le_bytes()).collect()
}

/// The GDT's descriptors. Accessed bits are preset so the CPU never writes them back, and the TSS
/// descriptor points at `TSS_ADDRESS`.
pub fn gdt() -> [u64; 8] {
    let tss_low =
        (TSS_BYTES - 1) | ((TSS_ADDRESS & 0xFF_FFFF) << 16) | (0x89 << 40) | (((TSS_ADDRESS >> 24) & 0xFF) << 56);
    [
        0,
        0x00AF_9B00_0000_FFFF, // kernel code: 64-bit, DPL 0
        0x00CF_9300_0000_FFFF, // kernel data
        0,                     // SYSRET's 32-bit user code slot: the kernel never returns to 32-bit code
        0x00CF_F300_0000_FFFF, // user data: DPL 3
        0x00AF_FB00_0000_FFFF, // user code: 64-bit, DPL 3
        tss_low,
        TSS_ADDRESS >> 32,
    ]
}

/// The first page of the image after the Multiboot header: GDT, GDTR and the boot stub, padded to
/// `KERNEL_CODE_ADDRESS`; and the stub's symbol, `boot_stub`.
pub fn first_page_after_header() -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    let mut bytes: Vec<u8> = gdt().iter().flat_map(|descriptor| descriptor.to_le_bytes()).collect();
    bytes.extend_from_slice(&((GDT_BYTES - 1) as u16).to_le_bytes());
    bytes.extend_from_slice(&GDT_ADDRESS.to_le_bytes());
    bytes.resize((BOOT_STUB_ADDRESS - GDT_ADDRESS) as usize, 0);
    let (stub, symbols) = assemble_stub()?;
    bytes.extend(stub);
    let page_end = (KERNEL_CODE_ADDRESS - GDT_ADDRESS) as usize;
    assert!(bytes.len() <= page_end, "boot stub overruns the first page");
    bytes.resize(page_end, 0);
    Ok((bytes, symbols))
}

fn assemble_stub() -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    let mut a = CodeAssembler::new(32)?;
    let mut functions = FunctionLabels::default();
    functions.begin(&mut a, "boot_stub")?;
    a.cli()?;
    a.cld()?;
    // First 2 MiB with 4 KiB pages, page 0 left unmapped.
    fill_entries(&mut a, KERNEL_PT_LOW + 8, 511, (0x1000 | TABLE_ENTRY as u64) as u32, 0x1000)?;
    // The rest of the first GiB with 2 MiB pages.
    fill_entries(&mut a, KERNEL_PD_LOW + 8, 511, 0x20_0000 | LARGE_PAGE, 0x20_0000)?;
    let mmio = crate::machine::MACHINE.mmio_test_base;
    let links: [(u64, u32); 5] = [
        (KERNEL_PD_LOW, KERNEL_PT_LOW as u32 | TABLE_ENTRY),
        (KERNEL_PD_MMIO + ((mmio >> 21) & 511) * 8, mmio as u32 | LARGE_PAGE | UNCACHED),
        (KERNEL_PDPT, KERNEL_PD_LOW as u32 | TABLE_ENTRY),
        (KERNEL_PDPT + ((mmio >> 30) & 511) * 8, KERNEL_PD_MMIO as u32 | TABLE_ENTRY),
        (KERNEL_PML4, KERNEL_PDPT as u32 | TABLE_ENTRY),
    ];
    for (entry, value) in links {
        a.mov(dword_ptr(entry as u32), value)?;
    }
    a.mov(eax, KERNEL_CR4)?;
    a.mov(cr4, eax)?;
    a.mov(eax, KERNEL_PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, EFER_MSR)?;
    a.rdmsr()?;
    a.or(eax, EFER_LME | EFER_SCE)?;
    a.wrmsr()?;
    a.mov(eax, KERNEL_CR0)?;
    a.mov(cr0, eax)?;
    a.lgdt(ptr(GDT_POINTER_ADDRESS as u32))?;
    a.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1632,
        KERNEL_CODE_SELECTOR,
        KERNEL_CODE_ADDRESS as u32,
    )?)?;
    functions.assemble(&mut a, BOOT_STUB_ADDRESS)
}

/// Writes `count` consecutive 64-bit entries starting at `first`, the low dword of each being
/// `value`, `value + step`, ...; high dwords stay zero from the loader's cleared BSS.
fn fill_entries(a: &mut CodeAssembler, first: u64, count: u32, value: u32, step: u32) -> AsmResult {
    let mut next = a.create_label();
    a.mov(edi, first as u32)?;
    a.mov(eax, value)?;
    a.mov(ecx, count)?;
    a.set_label(&mut next)?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(eax, step)?;
    a.add(edi, 8)?;
    a.dec(ecx)?;
    a.jnz(next)
}
