//! Multiboot 1 loading of flat (a.out-kludge) images, with the entry state QEMU's `-kernel` gives.
//!
//! Placement follows QEMU's `hw/i386/multiboot.c`: the image occupies `load_addr..bss_end_addr`,
//! and the information structure starts at the next 4 KiB boundary after it, followed by the
//! command line, the boot loader name, the memory map and a flat GDT for the entry segments.

use crate::cpu::{cr0, rflags, DescriptorTableRegister, Segment, SegmentRegister, RBX};
use crate::error::LoadError;
use crate::interp::{Machine, MachineConfig};

pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie, 4-byte aligned, within this many bytes from the image start.
pub const HEADER_SEARCH_LIMIT: usize = 8192;

const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;

const INFO_SIZE: u64 = 88;
const INFO_FLAG_MEMORY: u32 = 1 << 0;
const INFO_FLAG_CMDLINE: u32 = 1 << 2;
const INFO_FLAG_MMAP: u32 = 1 << 6;
const INFO_FLAG_LOADER_NAME: u32 = 1 << 9;
const LOADER_NAME: &[u8] = b"virtlab\0";

/// Entry selectors: the ones QEMU's multiboot option ROM leaves loaded.
pub const ENTRY_CODE_SELECTOR: u16 = 0x10;
pub const ENTRY_DATA_SELECTOR: u16 = 0x18;

/// Ranges no image may overlap: the real-mode interrupt table and BIOS data area, and the VGA
/// window plus BIOS ROMs, which are not RAM on a PC.
const RESERVED: [(u64, u64, &str); 2] =
    [(0, 0x1000, "the real-mode IVT and BIOS data area"), (0xA_0000, 0x10_0000, "the VGA window and BIOS ROMs")];

/// The fields of a Multiboot 1 header with address fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    pub offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

fn word(image: &[u8], offset: usize) -> Option<u32> {
    image.get(offset..).and_then(<[u8]>::first_chunk::<4>).map(|bytes| u32::from_le_bytes(*bytes))
}

/// Load address of [`flat_image`]: 1 MiB, where Multiboot kernels usually go.
pub const FLAT_IMAGE_LOAD: u32 = 0x10_0000;
/// Offset of the code in a [`flat_image`]: right after the 32-byte header.
pub const FLAT_IMAGE_CODE_OFFSET: u32 = 0x20;

/// The smallest bootable image: a Multiboot header (a.out kludge) loading the file at [`FLAT_IMAGE_LOAD`] and
/// entering `code`, 32-bit protected-mode code placed at [`FLAT_IMAGE_CODE_OFFSET`]. For tests and experiments
/// with hand-assembled guests; real guests come from the workload catalog.
pub fn flat_image(code: &[u8]) -> Vec<u8> {
    let load = FLAT_IMAGE_LOAD;
    let checksum = 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(FLAG_ADDRESS_FIELDS));
    let fields = [HEADER_MAGIC, FLAG_ADDRESS_FIELDS, checksum, load, load, 0, 0, load + FLAT_IMAGE_CODE_OFFSET];
    let mut image: Vec<u8> = fields.iter().flat_map(|field| field.to_le_bytes()).collect();
    image.resize(FLAT_IMAGE_CODE_OFFSET as usize, 0);
    image.extend_from_slice(code);
    image
}

/// Finds and checks the header.
pub fn parse_header(image: &[u8]) -> Result<MultibootHeader, LoadError> {
    let search_end = image.len().min(HEADER_SEARCH_LIMIT);
    let offset = (0..search_end.saturating_sub(11))
        .step_by(4)
        .find(|&offset| word(image, offset) == Some(HEADER_MAGIC))
        .ok_or(LoadError::NoMultibootHeader { image_len: image.len() })?;
    let flags = word(image, offset + 4).unwrap_or(0);
    let checksum = word(image, offset + 8).unwrap_or(0);
    let sum = HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum);
    if sum != 0 {
        return Err(LoadError::BadChecksum { offset, sum });
    }
    if flags & FLAG_ADDRESS_FIELDS == 0 {
        return Err(LoadError::NotAoutKludge { offset });
    }
    if flags & FLAG_VIDEO_MODE != 0 {
        return Err(LoadError::UnsupportedFlags { flags: flags & FLAG_VIDEO_MODE });
    }
    let field = |index: usize| {
        word(image, offset + 12 + 4 * index).ok_or_else(|| LoadError::InconsistentAddresses {
            reason: format!("the header at offset {offset:#x} is cut off by the end of the image"),
        })
    };
    Ok(MultibootHeader {
        offset,
        flags,
        header_addr: field(0)?,
        load_addr: field(1)?,
        load_end_addr: field(2)?,
        bss_end_addr: field(3)?,
        entry_addr: field(4)?,
    })
}

fn inconsistent(reason: String) -> LoadError {
    LoadError::InconsistentAddresses { reason }
}

impl Machine {
    /// Loads a Multiboot 1 flat image and sets the entry state of QEMU's `-kernel`: 32-bit protected
    /// mode, flat segments, paging off, interrupts off, EAX = 0x2BADB002, EBX = the information
    /// structure.
    pub fn from_multiboot(image: &[u8], config: MachineConfig) -> Result<Machine, LoadError> {
        let ram_size = config.ram_size;
        let mut machine = Machine::new(&config)?;
        let header = parse_header(image)?;
        let load_addr = header.load_addr as u64;
        let header_addr = header.header_addr as u64;
        if header_addr < load_addr {
            return Err(inconsistent(format!("header_addr {header_addr:#x} is below load_addr {load_addr:#x}")));
        }
        let file_start = header.offset.checked_sub((header_addr - load_addr) as usize).ok_or_else(|| {
            inconsistent(format!(
                "header_addr - load_addr = {:#x} exceeds the header's file offset {:#x}",
                header_addr - load_addr,
                header.offset
            ))
        })?;
        let load_end = if header.load_end_addr == 0 {
            load_addr + (image.len() - file_start) as u64
        } else {
            header.load_end_addr as u64
        };
        if load_end < load_addr {
            return Err(inconsistent(format!("load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")));
        }
        let file_bytes = (load_end - load_addr) as usize;
        if file_start + file_bytes > image.len() {
            return Err(inconsistent(format!(
                "load_addr..load_end_addr needs {file_bytes:#x} bytes from file offset {file_start:#x}, the image has {:#x}",
                image.len()
            )));
        }
        let bss_end = if header.bss_end_addr == 0 { load_end } else { header.bss_end_addr as u64 };
        if bss_end < load_end {
            return Err(inconsistent(format!("bss_end_addr {bss_end:#x} is below load_end_addr {load_end:#x}")));
        }
        let entry = header.entry_addr as u64;
        if !(load_addr..load_end).contains(&entry) {
            return Err(inconsistent(format!(
                "entry_addr {entry:#x} is outside the loaded range {load_addr:#x}..{load_end:#x}"
            )));
        }
        let info_addr = (bss_end + 4095) & !4095;
        let info_end = info_addr + 4096;
        if info_end > ram_size {
            return Err(LoadError::OutsideMemory { start: load_addr, end: info_end, ram_size });
        }
        for (start, end, what) in RESERVED {
            if load_addr < end && bss_end > start {
                return Err(LoadError::Overlap {
                    start: load_addr,
                    end: bss_end,
                    what,
                    other_start: start,
                    other_end: end,
                });
            }
        }

        let ram = &mut machine.memory.ram;
        ram[load_addr as usize..load_end as usize].copy_from_slice(&image[file_start..file_start + file_bytes]);

        // The information structure page: info, command line, loader name, memory map, GDT.
        let put32 = |ram: &mut Vec<u8>, at: u64, value: u32| {
            ram[at as usize..at as usize + 4].copy_from_slice(&value.to_le_bytes())
        };
        let put64 = |ram: &mut Vec<u8>, at: u64, value: u64| {
            ram[at as usize..at as usize + 8].copy_from_slice(&value.to_le_bytes())
        };
        let cmdline_addr = info_addr + INFO_SIZE;
        let cmdline = config.command_line.as_bytes();
        let cmdline_len = cmdline.len().min(1024);
        ram[cmdline_addr as usize..cmdline_addr as usize + cmdline_len].copy_from_slice(&cmdline[..cmdline_len]);
        ram[cmdline_addr as usize + cmdline_len] = 0;
        let name_addr = cmdline_addr + cmdline_len as u64 + 1;
        ram[name_addr as usize..name_addr as usize + LOADER_NAME.len()].copy_from_slice(LOADER_NAME);
        let mmap_addr = (name_addr + LOADER_NAME.len() as u64 + 7) & !7;
        let regions: [(u64, u64, u32); 4] =
            [(0, 0x9_FC00, 1), (0x9_FC00, 0x400, 2), (0xF_0000, 0x1_0000, 2), (0x10_0000, ram_size - 0x10_0000, 1)];
        for (i, (base, length, kind)) in regions.iter().enumerate() {
            let entry_addr = mmap_addr + i as u64 * 24;
            put32(ram, entry_addr, 20);
            put64(ram, entry_addr + 4, *base);
            put64(ram, entry_addr + 12, *length);
            put32(ram, entry_addr + 20, *kind);
        }
        let mmap_length = regions.len() as u64 * 24;
        let gdt_addr = (mmap_addr + mmap_length + 7) & !7;
        let gdt: [u64; 4] = [0, 0, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];
        for (i, descriptor) in gdt.iter().enumerate() {
            put64(ram, gdt_addr + 8 * i as u64, *descriptor);
        }
        put32(ram, info_addr, INFO_FLAG_MEMORY | INFO_FLAG_CMDLINE | INFO_FLAG_MMAP | INFO_FLAG_LOADER_NAME);
        put32(ram, info_addr + 4, 640);
        put32(ram, info_addr + 8, ((ram_size - 0x10_0000) / 1024) as u32);
        put32(ram, info_addr + 16, cmdline_addr as u32);
        put32(ram, info_addr + 44, mmap_length as u32);
        put32(ram, info_addr + 48, mmap_addr as u32);
        put32(ram, info_addr + 64, name_addr as u32);
        machine.memory.touch(load_addr..load_end);
        machine.memory.touch(info_addr..info_end);

        let cpu = &mut machine.cpu;
        cpu.cr0 = cr0::PE | cr0::ET;
        cpu.rflags = rflags::RESERVED1;
        cpu.rip = entry;
        cpu.gpr[0] = BOOTLOADER_MAGIC as u64;
        cpu.gpr[RBX] = info_addr;
        cpu.gdtr = DescriptorTableRegister { base: gdt_addr, limit: 31 };
        for segment in
            [SegmentRegister::Es, SegmentRegister::Ss, SegmentRegister::Ds, SegmentRegister::Fs, SegmentRegister::Gs]
        {
            cpu.segments[segment as usize] = Segment::flat(ENTRY_DATA_SELECTOR, false);
        }
        cpu.segments[SegmentRegister::Cs as usize] = Segment::flat(ENTRY_CODE_SELECTOR, true);
        cpu.tr = Segment { attributes: crate::cpu::seg_attr::PRESENT | 0x0B, limit: 0xFFFF, ..Segment::default() };
        machine.cpu_changed();
        Ok(machine)
    }
}
