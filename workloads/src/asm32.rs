//! 32-bit code at `layout::KERNEL_CODE_ADDRESS` with iced-x86's `CodeAssembler`, and the descriptors it builds:
//! what the x86-32 tour and the x86-32 kernel share.
//!
//! In 32-bit code iced's `ptr(label)` is not an absolute address, so a program that takes the address of its own
//! labels is assembled twice: the first pass learns the addresses, the second uses them. An address is only ever
//! an operand with a 32-bit immediate (`mov r32, imm32`, `mov m32, imm32`), so the second pass lays the code out
//! exactly as the first.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use crate::kernel::AsmResult;
use crate::layout::{BOOT_STUB_ADDRESS, GDT_ADDRESS, KERNEL_CODE_ADDRESS};

/// Selectors of the 32-bit GDTs (the tour's and the kernel's). `SYSENTER`/`SYSEXIT` fix the order of the first
/// four.
pub mod selector {
    pub const KERNEL_CODE: u16 = 0x08;
    pub const KERNEL_DATA: u16 = 0x10;
    pub const USER_CODE: u16 = 0x18 | 3;
    pub const USER_DATA: u16 = 0x20 | 3;
    pub const TSS: u16 = 0x28;
}

/// G = 1 (4 KiB granularity), D/B = 1 (32-bit): the flags nibble of a flat 32-bit segment.
pub const FLAT_4K_32: u32 = 0xC;
/// A 32-bit TSS's size less one: no I/O permission bitmap.
pub const TSS_LIMIT: u32 = 103;
pub const INTERRUPT_GATE_DPL0: u32 = 0x8E;
pub const TRAP_GATE_DPL3: u32 = 0xEF;
pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_ESP: u32 = 0x175;
pub const MSR_SYSENTER_EIP: u32 = 0x176;

/// A segment descriptor.
pub fn descriptor(base: u32, limit: u32, access: u32, flags: u32) -> u64 {
    let low = (limit & 0xFFFF) | ((base & 0xFFFF) << 16);
    let high = ((base >> 16) & 0xFF) | (access << 8) | (limit & 0xF_0000) | (flags << 20) | (base & 0xFF00_0000);
    (high as u64) << 32 | low as u64
}

/// An interrupt, trap or call gate to `offset` in the kernel code segment; `access` is the type byte, and for a
/// call gate its low bits the parameter count.
pub fn gate(offset: u32, access: u32) -> u64 {
    let low = (offset & 0xFFFF) | (u32::from(selector::KERNEL_CODE) << 16);
    let high = (offset & 0xFFFF_0000) | (access << 8);
    (high as u64) << 32 | low as u64
}

/// The first page after the Multiboot header for a 32-bit program: nothing but a jump from the Multiboot entry to
/// the program at `KERNEL_CODE_ADDRESS`, which builds its own tables.
pub fn first_page() -> AsmResult<Vec<u8>> {
    let mut a = CodeAssembler::new(32)?;
    a.jmp(KERNEL_CODE_ADDRESS)?;
    let mut page = vec![0u8; (BOOT_STUB_ADDRESS - GDT_ADDRESS) as usize];
    page.extend(a.assemble(BOOT_STUB_ADDRESS)?);
    page.resize((KERNEL_CODE_ADDRESS - GDT_ADDRESS) as usize, 0);
    Ok(page)
}

/// One pass's bookkeeping of the labels whose address a 32-bit program takes.
pub struct LabelAddresses {
    /// Labels whose address the code takes, in the order it takes them.
    taken: Vec<CodeLabel>,
    /// Every label as bound to its instruction (a `CodeLabel` is a value: copies made earlier stay unbound).
    bound: Vec<CodeLabel>,
    /// Their addresses from the previous pass (empty on the first).
    known: Vec<u32>,
}

impl LabelAddresses {
    pub fn new(known: Vec<u32>) -> Self {
        LabelAddresses { taken: Vec::new(), bound: Vec::new(), known }
    }

    /// Binds `label` to the next instruction of `a`.
    pub fn bind(&mut self, a: &mut CodeAssembler, label: &mut CodeLabel) -> AsmResult {
        a.set_label(label)?;
        self.bound.push(*label);
        Ok(())
    }

    /// The address of `label` as a 32-bit immediate (0 in the first pass).
    pub fn address_of(&mut self, label: CodeLabel) -> u32 {
        let value = self.known.get(self.taken.len()).copied().unwrap_or(0);
        self.taken.push(label);
        value
    }

    /// Assembles `a` at `origin`: the assembler's result and the addresses of the labels the code took.
    pub fn assemble(&self, a: &mut CodeAssembler, origin: u64) -> AsmResult<(CodeAssemblerResult, Vec<u32>)> {
        let result = a.assemble_options(origin, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let bound = |label: &CodeLabel| self.bound.iter().find(|b| *b == label).copied().unwrap_or(*label);
        let addresses = self
            .taken
            .iter()
            .map(|label| result.label_ip(&bound(label)).map(|ip| ip as u32))
            .collect::<Result<_, _>>()?;
        Ok((result, addresses))
    }
}

/// What one pass built, with the addresses of the labels it took.
pub type Pass<T> = AsmResult<(T, Vec<u32>)>;

/// Runs `pass` twice, the second time with the label addresses the first returned; returns what the second
/// pass built.
pub fn assemble_twice<T>(pass: impl Fn(Vec<u32>) -> Pass<T>) -> AsmResult<T> {
    let (_, addresses) = pass(Vec::new())?;
    let (built, resolved) = pass(addresses.clone())?;
    assert_eq!(resolved, addresses, "the second pass moved a label");
    Ok(built)
}
