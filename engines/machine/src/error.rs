//! Errors: loading an image, and the ways a run ends other than the guest's own exit.

use crate::cpu::CodeMode;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("no Multiboot 1 header (magic 0x1BADB002, 4-byte aligned) in the first 8192 bytes of the {image_len}-byte image; build the kernel with a Multiboot header near its start")]
    NoMultibootHeader { image_len: usize },
    #[error(
        "Multiboot header at offset {offset:#x} has a bad checksum: magic + flags + checksum = {sum:#x}, must be 0"
    )]
    BadChecksum { offset: usize, sum: u32 },
    #[error("Multiboot header at offset {offset:#x} does not set flag bit 16 (address fields): only a.out-kludge flat images are loaded; set bit 16 and fill header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr")]
    NotAoutKludge { offset: usize },
    #[error("Multiboot header requests flag bits {flags:#x} this loader does not honour (video mode); clear bit 2")]
    UnsupportedFlags { flags: u32 },
    #[error("inconsistent Multiboot addresses: {reason}; fix the header fields")]
    InconsistentAddresses { reason: String },
    #[error("image range {start:#x}..{end:#x} falls outside guest RAM (0..{ram_size:#x}); link the kernel lower or configure more memory")]
    OutsideMemory { start: u64, end: u64, ram_size: u64 },
    #[error("image range {start:#x}..{end:#x} overlaps {what} at {other_start:#x}..{other_end:#x}; load the kernel at or above 1 MiB (0x100000)")]
    Overlap { start: u64, end: u64, what: &'static str, other_start: u64, other_end: u64 },
    #[error("guest RAM of {ram_size:#x} bytes is unusable: it must be a multiple of 4 KiB between 2 MiB and 3 GiB (below the MMIO test region)")]
    BadMemorySize { ram_size: u64 },
}

/// The chain of exceptions that ended in a triple fault, innermost last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionChain(pub Vec<(u8, Option<u32>)>);

impl std::fmt::Display for ExceptionChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (vector, code)) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, " -> ")?;
            }
            write!(f, "{}", crate::interrupts::exception_name(*vector))?;
            if let Some(code) = code {
                write!(f, "({code:#x})")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MachineError {
    #[error("instruction limit of {limit} reached at RIP {rip:#x} without the guest exiting; raise the limit or check the guest for an endless loop")]
    InstructionLimit { limit: u64, rip: u64 },
    #[error("triple fault at RIP {rip:#x} ({mode}): {chain}; the guest's IDT, TSS or stacks are broken")]
    TripleFault { rip: u64, mode: CodeMode, chain: ExceptionChain },
    #[error("unimplemented instruction {mnemonic} at {address:#x} ({mode}, CPL {cpl}); the reference machine does not model it, keep it out of the guest or implement it in the machine")]
    Unimplemented { mnemonic: String, address: u64, mode: CodeMode, cpl: u8 },
    #[error("wall-clock deadline passed at RIP {rip:#x} with the guest still running; allow more time or check the guest for an endless loop")]
    Deadline { rip: u64 },
    #[error("HLT at RIP {rip:#x} with interrupts disabled or no timer armed: the guest would wait forever; enable interrupts and program the PIT, or exit through port 0xF4")]
    HaltedForever { rip: u64 },
    #[error("the guest wrote more than {limit} bytes to the serial port (stopped at {address:#x}); a guest of the lab prints a few kilobytes: check it for a print loop")]
    SerialFlood { limit: usize, address: u64 },
    #[error("guest accessed physical address {address:#x} at RIP {rip:#x}, which is neither RAM (0..{ram_size:#x}) nor the MMIO test region at 0xD0000000; map only backed memory")]
    UnbackedPhysicalAddress { address: u64, rip: u64, ram_size: u64 },
}
