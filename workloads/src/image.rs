//! The guest image: a flat Multiboot 1 kernel with the a.out-kludge header.

use std::fmt::Write as _;

use crate::catalog::Arch;
use crate::kernel::boot;
use crate::layout;
use crate::symbols::Symbol;

/// A built workload, ready to be loaded at `load_address` and entered at `entry_point`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Workload name.
    pub workload: &'static str,
    /// Parameters the image was built with, in catalog order, as its banner shows them (a choice at its default,
    /// such as `arch=x86-64`, is left out).
    pub params: Vec<(&'static str, String)>,
    /// The instruction set of its kernel.
    pub arch: Arch,
    /// The file contents, loaded byte for byte at `load_address`.
    pub bytes: Vec<u8>,
    /// Guest-physical load address (1 MiB).
    pub load_address: u64,
    /// Guest-physical address of the 32-bit Multiboot entry point.
    pub entry_point: u64,
    /// The loader zeroes guest memory from the end of `bytes` up to here.
    pub bss_end: u64,
    /// The kernel's functions (the 32-bit `boot_stub` among them) and the user program's, by the linear address
    /// they run at, sorted; from the assembler's labels.
    pub symbols: Vec<Symbol>,
}

impl GuestImage {
    pub(crate) fn new(
        workload: &'static str,
        params: Vec<(&'static str, String)>,
        arch: Arch,
        first_page: Vec<u8>,
        kernel: Vec<u8>,
        mut symbols: Vec<Symbol>,
    ) -> Self {
        let load_end = layout::KERNEL_CODE_ADDRESS + kernel.len() as u64;
        let mut bytes = boot::multiboot_header(load_end);
        bytes.extend(first_page);
        bytes.extend(kernel);
        symbols.sort_by_key(|s| s.start);
        GuestImage {
            workload,
            params,
            arch,
            bytes,
            load_address: layout::LOAD_ADDRESS,
            entry_point: layout::BOOT_STUB_ADDRESS,
            bss_end: layout::BSS_END,
            symbols,
        }
    }

    /// Guest-physical address one past the last loaded byte.
    pub fn load_end(&self) -> u64 {
        self.load_address + self.bytes.len() as u64
    }

    /// A short human-readable summary.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        let params = self.params.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join(" ");
        let _ = writeln!(text, "workload:     {} {}", self.workload, params);
        let _ = writeln!(text, "format:       Multiboot 1, a.out kludge (flags {:#x})", boot::MULTIBOOT_FLAGS);
        let _ = writeln!(text, "size:         {} bytes", self.bytes.len());
        let _ = writeln!(text, "load:         {:#x}..{:#x}", self.load_address, self.load_end());
        let _ = writeln!(text, "bss end:      {:#x}", self.bss_end);
        let _ = writeln!(text, "entry:        {:#x} (32-bit protected mode)", self.entry_point);
        let kernel = match self.arch {
            Arch::X86_64 => "long mode at",
            Arch::X86_32 => "32-bit at   ",
        };
        let _ = write!(text, "{kernel}: {:#x}", layout::KERNEL_CODE_ADDRESS);
        text
    }
}
