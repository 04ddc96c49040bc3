//! Guest-physical memory, linear-address translation (paging and its software TLB), and the
//! bookkeeping writes need: code pages (block-cache invalidation) and page-table pages (reports).

use crate::cpu::{cr0, efer, CodeMode, PagingMode, SegmentRegister};
use crate::error::MachineError;
use crate::interp::{Fault, Interp};
use crate::observer::{AccessKind, ExecutionObserver, IoDirection, PageWalk, SideEvent};

/// The one MMIO test region: reads return 0, writes are dropped, both are reported.
pub const MMIO_TEST_BASE: u64 = virtlab_machine_facts::MACHINE.mmio_test_base;
pub const MMIO_TEST_SIZE: u64 = virtlab_machine_facts::MACHINE.mmio_test_size;

pub const PAGE_SIZE: u64 = 4096;
const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// Per-frame flags in [`Memory::frame_flags`]. A frame with any of them set takes the watched write path.
pub const FRAME_CODE: u8 = 1;
/// Page-table level L (1..=4) of a frame reachable from a loaded CR3 sets bit `1 << L`.
pub const FRAME_PAGE_TABLE_LEVELS: u8 = 0b1_1110;
/// Nothing has written the frame since the machine started: it is all zero. The first write clears it on the
/// watched path, so the plain write path pays nothing for knowing which frames the guest used; the final state
/// digest and the recorder's image scan read only the others instead of every byte of RAM.
pub const FRAME_UNTOUCHED: u8 = 0b10_0000;

/// Physical address bits in page-table entries (MAXPHYADDR 39 in the CPUID model is a property of
/// the addresses we accept; entry masks follow the architectural 52 bits).
const ENTRY_ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;

pub mod pf_error {
    pub const PRESENT: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const USER: u32 = 4;
    pub const RESERVED: u32 = 8;
    pub const FETCH: u32 = 16;
}

pub struct Memory {
    pub ram: Vec<u8>,
    pub frame_flags: Vec<u8>,
}

impl Memory {
    pub fn new(ram_size: u64) -> Memory {
        let frames = (ram_size / PAGE_SIZE) as usize;
        Memory { ram: vec![0; ram_size as usize], frame_flags: vec![FRAME_UNTOUCHED; frames] }
    }

    /// Notes that the bytes at `range` may have been written other than through the watched write path.
    pub fn touch(&mut self, range: std::ops::Range<u64>) {
        if range.is_empty() {
            return;
        }
        let frames = (range.start / PAGE_SIZE) as usize..=((range.end - 1) / PAGE_SIZE) as usize;
        for flags in &mut self.frame_flags[frames] {
            *flags &= !FRAME_UNTOUCHED;
        }
    }

    /// Every frame that is not all zero, in address order, as (frame number, its bytes).
    pub fn nonzero_frames(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let frames = self.ram.chunks_exact(PAGE_SIZE as usize).zip(&self.frame_flags).enumerate();
        frames
            .filter(|(_, (bytes, &flags))| flags & FRAME_UNTOUCHED == 0 && bytes.iter().any(|&b| b != 0))
            .map(|(frame, (bytes, _))| (frame as u64, bytes))
    }

    pub fn ram_size(&self) -> u64 {
        self.ram.len() as u64
    }

    #[inline(always)]
    pub fn read_ram(&self, pa: u64, bytes: u32) -> u64 {
        let p = pa as usize;
        match bytes {
            1 => self.ram[p] as u64,
            2 => u16::from_le_bytes(self.ram[p..p + 2].try_into().unwrap()) as u64,
            4 => u32::from_le_bytes(self.ram[p..p + 4].try_into().unwrap()) as u64,
            _ => u64::from_le_bytes(self.ram[p..p + 8].try_into().unwrap()),
        }
    }

    #[inline(always)]
    pub fn write_ram(&mut self, pa: u64, bytes: u32, value: u64) {
        let p = pa as usize;
        match bytes {
            1 => self.ram[p] = value as u8,
            2 => self.ram[p..p + 2].copy_from_slice(&(value as u16).to_le_bytes()),
            4 => self.ram[p..p + 4].copy_from_slice(&(value as u32).to_le_bytes()),
            _ => self.ram[p..p + 8].copy_from_slice(&value.to_le_bytes()),
        }
    }
}

/// Permission bits a TLB entry has been validated for, one per (access kind, privilege).
mod tlb_perm {
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const EXECUTE: u8 = 4;
    /// Shift applied to the three bits above for user-mode accesses.
    pub const USER_SHIFT: u8 = 3;
    /// The page itself is a user page (U/S = 1 at every level).
    pub const USER_PAGE: u8 = 0x40;
}

const TLB_ENTRIES: usize = 4096;

#[derive(Clone, Copy)]
struct TlbEntry {
    virtual_page: u64,
    frame: u64,
    permissions: u8,
}

const EMPTY_TLB_ENTRY: TlbEntry = TlbEntry { virtual_page: u64::MAX, frame: 0, permissions: 0 };

/// A direct-mapped software TLB, one entry per 4 KiB page (large pages fill one entry per 4 KiB
/// piece touched). Entries only grant the (kind, privilege) pairs a walk has validated, so A and D
/// bits and first-touch reports happen exactly when a walk for that access would.
pub struct Tlb {
    entries: Box<[TlbEntry]>,
    /// Slots filled since the last flush: a flush clears only these, so guests that reload CR3
    /// often pay for the entries they used, not for the whole table.
    filled: Vec<u16>,
    /// INVLPG of a large page must drop all its 4 KiB pieces; with any large page cached it flushes all.
    holds_large_pages: bool,
}

impl Tlb {
    pub fn new() -> Tlb {
        Tlb {
            entries: vec![EMPTY_TLB_ENTRY; TLB_ENTRIES].into_boxed_slice(),
            filled: Vec::with_capacity(TLB_ENTRIES),
            holds_large_pages: false,
        }
    }

    pub fn flush(&mut self) {
        for &slot in &self.filled {
            self.entries[slot as usize] = EMPTY_TLB_ENTRY;
        }
        self.filled.clear();
        self.holds_large_pages = false;
    }

    pub fn flush_page(&mut self, linear: u64) {
        if self.holds_large_pages {
            self.flush();
            return;
        }
        let page = linear >> 12;
        let entry = &mut self.entries[page as usize % TLB_ENTRIES];
        if entry.virtual_page == page {
            *entry = EMPTY_TLB_ENTRY;
        }
    }

    #[inline(always)]
    fn lookup(&self, linear: u64, needed: u8) -> Option<u64> {
        let page = linear >> 12;
        let entry = &self.entries[page as usize % TLB_ENTRIES];
        if entry.virtual_page == page && entry.permissions & needed != 0 {
            Some(entry.frame | (linear & PAGE_MASK))
        } else {
            None
        }
    }

    /// The entry for `page`, emptied and recorded for the next flush if it held another page.
    fn entry_for(&mut self, page: u64, frame: u64) -> &mut TlbEntry {
        let slot = page as usize % TLB_ENTRIES;
        let entry = &mut self.entries[slot];
        if entry.virtual_page != page || entry.frame != frame {
            if entry.virtual_page == u64::MAX {
                self.filled.push(slot as u16);
            }
            *entry = TlbEntry { virtual_page: page, frame, permissions: 0 };
        }
        entry
    }
}

impl Default for Tlb {
    fn default() -> Tlb {
        Tlb::new()
    }
}

/// Result of a successful page walk.
pub(crate) struct Translation {
    pub frame: u64,
    pub user_page: bool,
    pub page_size: u64,
    /// The tables read (only filled when the observer is enabled).
    pub walk: PageWalk,
}

#[inline(always)]
fn permission_bit(kind: AccessKind, user: bool) -> u8 {
    let bit = match kind {
        AccessKind::Read => tlb_perm::READ,
        AccessKind::Write => tlb_perm::WRITE,
        AccessKind::Execute => tlb_perm::EXECUTE,
    };
    if user {
        bit << tlb_perm::USER_SHIFT
    } else {
        bit
    }
}

pub(crate) fn page_fault(address: u64, code: u32) -> Fault {
    Fault::Exception { vector: crate::interrupts::PF, error_code: Some(code), address: Some(address) }
}

pub(crate) fn gp0() -> Fault {
    Fault::Exception { vector: crate::interrupts::GP, error_code: Some(0), address: None }
}

impl<O: ExecutionObserver> Interp<'_, O> {
    /// Translates a linear address for an access, walking the tables on a TLB miss.
    #[inline(always)]
    pub(crate) fn translate(&mut self, linear: u64, kind: AccessKind, user: bool) -> Result<u64, Fault> {
        if let Some(pa) = self.tlb.lookup(linear, permission_bit(kind, user)) {
            return Ok(pa);
        }
        self.translate_miss(linear, kind, user)
    }

    #[inline(never)]
    fn translate_miss(&mut self, linear: u64, kind: AccessKind, user: bool) -> Result<u64, Fault> {
        let translation = self.walk(linear, kind, user)?;
        let entry = self.tlb.entry_for(linear >> 12, translation.frame);
        entry.permissions |= permission_bit(kind, user);
        if translation.user_page {
            entry.permissions |= tlb_perm::USER_PAGE;
        }
        if translation.page_size > PAGE_SIZE {
            self.tlb.holds_large_pages = true;
        }
        if O::ENABLED {
            let page_base = linear & !(translation.page_size - 1);
            let key = (page_base & !PAGE_MASK) | (permission_bit(kind, user) as u64);
            if self.touched_pages.insert(key) {
                let frame = (translation.frame | (linear & PAGE_MASK)) & !(translation.page_size - 1);
                let event = SideEvent::PageTouch {
                    virtual_page: page_base,
                    frame,
                    kind,
                    user,
                    page_size: translation.page_size,
                    walk: translation.walk,
                };
                if self.fetching {
                    self.fetch_touches.push(event);
                } else {
                    let index = self.index_in_block;
                    self.obs.side_event(index, &event);
                }
            }
        }
        Ok(translation.frame | (linear & PAGE_MASK))
    }

    /// Whether the page holding `linear` is a user page; only valid right after an execute translation.
    pub(crate) fn is_user_page(&self, linear: u64) -> bool {
        let page = linear >> 12;
        let entry = &self.tlb.entries[page as usize % TLB_ENTRIES];
        entry.virtual_page == page && entry.permissions & tlb_perm::USER_PAGE != 0
    }

    fn read_table_entry(&mut self, pa: u64, bytes: u32) -> Result<u64, Fault> {
        if pa + bytes as u64 > self.memory.ram_size() {
            return Err(self.unbacked(pa));
        }
        Ok(self.memory.read_ram(pa, bytes))
    }

    pub(crate) fn unbacked(&self, address: u64) -> Fault {
        Fault::Stop(Box::new(MachineError::UnbackedPhysicalAddress {
            address,
            rip: self.cpu.rip,
            ram_size: self.memory.ram_size(),
        }))
    }

    fn walk(&mut self, linear: u64, kind: AccessKind, user: bool) -> Result<Translation, Fault> {
        let mode = self.cpu.paging_mode();
        if mode == PagingMode::None {
            return Ok(Translation {
                frame: linear & 0xFFFF_F000,
                user_page: false,
                page_size: PAGE_SIZE,
                walk: PageWalk::default(),
            });
        }
        let nxe = self.cpu.efer & efer::NXE != 0;
        let write = kind == AccessKind::Write;
        let mut code = if write { pf_error::WRITE } else { 0 };
        if user {
            code |= pf_error::USER;
        }
        if kind == AccessKind::Execute && nxe {
            code |= pf_error::FETCH;
        }
        // (entry address, entry size) of every entry used, so A/D bits are set only on success.
        let mut used: [(u64, u32); 4] = [(0, 0); 4];
        let mut used_count = 0;
        let mut writable = true;
        let mut user_ok = true;
        let mut no_execute = false;
        let mut tables = PageWalk::default();
        let (mut table, mut level, entry_bytes) = match mode {
            PagingMode::TwoLevel => (self.cpu.cr3 & 0xFFFF_F000, 2u32, 4u32),
            PagingMode::Pae => {
                let pdpte_address = (self.cpu.cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8;
                if O::ENABLED {
                    tables.push(pdpte_address);
                }
                let pdpte = self.read_table_entry(pdpte_address, 8)?;
                if pdpte & PRESENT == 0 {
                    return Err(self.walk_fault(tables, page_fault(linear, code)));
                }
                if pdpte & 0x1E6 != 0 || (pdpte & NO_EXECUTE != 0) {
                    return Err(
                        self.walk_fault(tables, page_fault(linear, code | pf_error::RESERVED | pf_error::PRESENT))
                    );
                }
                (pdpte & ENTRY_ADDRESS, 2u32, 8u32)
            }
            PagingMode::FourLevel => (self.cpu.cr3 & ENTRY_ADDRESS, 4u32, 8u32),
            PagingMode::None => unreachable!("handled above"),
        };
        loop {
            let index_bits = if entry_bytes == 4 { 10 } else { 9 };
            let shift = 12 + index_bits * (level - 1);
            let index = (linear >> shift) & ((1 << index_bits) - 1);
            let entry_address = table + index * entry_bytes as u64;
            if O::ENABLED {
                tables.push(table);
            }
            let entry = self.read_table_entry(entry_address, entry_bytes)?;
            if entry & PRESENT == 0 {
                return Err(self.walk_fault(tables, page_fault(linear, code)));
            }
            let reserved = (entry_bytes == 8 && !nxe && entry & NO_EXECUTE != 0)
                || (level == 4 && entry & LARGE != 0)
                || (level == 3 && entry & LARGE != 0);
            if reserved {
                return Err(self.walk_fault(tables, page_fault(linear, code | pf_error::RESERVED | pf_error::PRESENT)));
            }
            used[used_count] = (entry_address, entry_bytes);
            used_count += 1;
            writable &= entry & WRITABLE != 0;
            user_ok &= entry & USER != 0;
            no_execute |= nxe && entry & NO_EXECUTE != 0;
            let large_allowed = level == 2 && (entry_bytes == 8 || self.cpu.cr4 & crate::cpu::cr4::PSE != 0);
            if level == 1 || (large_allowed && entry & LARGE != 0) {
                let page_size = 1u64 << shift;
                let base = if entry_bytes == 4 && level == 2 {
                    entry & 0xFFC0_0000
                } else {
                    entry & ENTRY_ADDRESS & !(page_size - 1)
                };
                let denied = (user && !user_ok)
                    || (write && !writable && (user || self.cpu.cr0 & cr0::WP != 0))
                    || (kind == AccessKind::Execute && no_execute);
                if denied {
                    return Err(self.walk_fault(tables, page_fault(linear, code | pf_error::PRESENT)));
                }
                for (i, &(address, bytes)) in used[..used_count].iter().enumerate() {
                    let old = self.memory.read_ram(address, bytes);
                    let mut new = old | ACCESSED;
                    if write && i == used_count - 1 {
                        new |= DIRTY;
                    }
                    if new != old {
                        // A table with a present entry was written before; the walker does not rely on it.
                        self.memory.touch(address..address + u64::from(bytes));
                        self.memory.write_ram(address, bytes, new);
                    }
                }
                let frame = base + (linear & (page_size - 1) & !PAGE_MASK);
                return Ok(Translation { frame, user_page: user_ok, page_size, walk: tables });
            }
            table = if entry_bytes == 4 { entry & 0xFFFF_F000 } else { entry & ENTRY_ADDRESS };
            level -= 1;
        }
    }

    /// A page fault raised by a walk: the tables it read go with the exception's report.
    fn walk_fault(&mut self, tables: PageWalk, fault: Fault) -> Fault {
        if O::ENABLED {
            self.fault_walk = Some(tables);
        }
        fault
    }

    /// Applies segmentation: returns the linear address of `offset` in `segment` after base, limit
    /// and (in 64-bit mode) canonical checks.
    #[inline(always)]
    pub(crate) fn linear_address(
        &self,
        segment: SegmentRegister,
        offset: u64,
        bytes: u32,
        write: bool,
    ) -> Result<u64, Fault> {
        if self.mode == CodeMode::Bits64 {
            let linear = match segment {
                SegmentRegister::Fs | SegmentRegister::Gs => {
                    offset.wrapping_add(self.cpu.segments[segment as usize].base)
                }
                _ => offset,
            };
            let end = linear.wrapping_add(bytes as u64 - 1);
            if !is_canonical(linear) || !is_canonical(end) {
                return Err(segment_fault(segment));
            }
            return Ok(linear);
        }
        self.legacy_linear_address(segment, offset, bytes, write)
    }

    fn legacy_linear_address(
        &self,
        segment: SegmentRegister,
        offset: u64,
        bytes: u32,
        write: bool,
    ) -> Result<u64, Fault> {
        use crate::cpu::seg_attr::*;
        let descriptor = &self.cpu.segments[segment as usize];
        if descriptor.attributes & PRESENT == 0 {
            return Err(segment_fault(segment));
        }
        let attributes = descriptor.attributes;
        let is_code = attributes & CODE != 0;
        if write && (is_code || attributes & WRITABLE_OR_READABLE == 0) {
            return Err(segment_fault(segment));
        }
        if !write && is_code && attributes & WRITABLE_OR_READABLE == 0 {
            return Err(segment_fault(segment));
        }
        let last = offset + bytes as u64 - 1;
        let limit = descriptor.limit as u64;
        let within = if !is_code && attributes & EXPAND_DOWN_OR_CONFORMING != 0 {
            let upper = if attributes & DEFAULT_BIG != 0 { 0xFFFF_FFFF } else { 0xFFFF };
            offset > limit && last <= upper
        } else {
            last <= limit
        };
        if !within {
            return Err(segment_fault(segment));
        }
        Ok((descriptor.base + offset) & 0xFFFF_FFFF)
    }

    /// Reads `bytes` at a linear address with the privilege of the current CPL.
    #[inline(always)]
    pub(crate) fn read_linear(&mut self, linear: u64, bytes: u32, user: bool) -> Result<u64, Fault> {
        if (linear & PAGE_MASK) + bytes as u64 <= PAGE_SIZE {
            let pa = self.translate(linear, AccessKind::Read, user)?;
            if pa + bytes as u64 <= self.memory.ram_size() {
                return Ok(self.memory.read_ram(pa, bytes));
            }
            return self.read_unbacked(pa, bytes);
        }
        let mut value = 0u64;
        for i in 0..bytes as u64 {
            let pa = self.translate(linear.wrapping_add(i), AccessKind::Read, user)?;
            let byte = if pa < self.memory.ram_size() {
                self.memory.ram[pa as usize] as u64
            } else {
                self.read_unbacked(pa, 1)?
            };
            value |= byte << (8 * i);
        }
        Ok(value)
    }

    #[inline(always)]
    pub(crate) fn write_linear(&mut self, linear: u64, bytes: u32, value: u64, user: bool) -> Result<(), Fault> {
        if (linear & PAGE_MASK) + bytes as u64 <= PAGE_SIZE {
            let pa = self.translate(linear, AccessKind::Write, user)?;
            return self.write_physical(pa, bytes, value);
        }
        // Translate every page before writing anything so a fault leaves memory untouched.
        let second = (linear | PAGE_MASK).wrapping_add(1);
        self.translate(linear, AccessKind::Write, user)?;
        self.translate(second, AccessKind::Write, user)?;
        for i in 0..bytes as u64 {
            let pa = self.translate(linear.wrapping_add(i), AccessKind::Write, user)?;
            self.write_physical(pa, 1, value >> (8 * i))?;
        }
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn write_physical(&mut self, pa: u64, bytes: u32, value: u64) -> Result<(), Fault> {
        if pa + bytes as u64 <= self.memory.ram_size() {
            if self.memory.frame_flags[(pa >> 12) as usize] != 0 {
                return self.write_watched_frame(pa, bytes, value);
            }
            self.memory.write_ram(pa, bytes, value);
            return Ok(());
        }
        self.write_unbacked(pa, bytes, value)
    }

    #[inline(never)]
    fn read_unbacked(&mut self, pa: u64, bytes: u32) -> Result<u64, Fault> {
        if (MMIO_TEST_BASE..MMIO_TEST_BASE + MMIO_TEST_SIZE).contains(&pa) {
            if O::ENABLED {
                let event = SideEvent::Mmio { gpa: pa, size: bytes as u8, direction: IoDirection::In, value: 0 };
                let index = self.index_in_block;
                self.obs.side_event(index, &event);
            }
            return Ok(0);
        }
        Err(self.unbacked(pa))
    }

    #[inline(never)]
    fn write_unbacked(&mut self, pa: u64, bytes: u32, value: u64) -> Result<(), Fault> {
        if (MMIO_TEST_BASE..MMIO_TEST_BASE + MMIO_TEST_SIZE).contains(&pa) {
            if O::ENABLED {
                let value = value & crate::alu::mask(bytes);
                let event = SideEvent::Mmio { gpa: pa, size: bytes as u8, direction: IoDirection::Out, value };
                let index = self.index_in_block;
                self.obs.side_event(index, &event);
            }
            return Ok(());
        }
        Err(self.unbacked(pa))
    }

    /// A write to a frame holding cached code or a page table, or to one nothing has written yet.
    #[inline(never)]
    fn write_watched_frame(&mut self, pa: u64, bytes: u32, value: u64) -> Result<(), Fault> {
        let frame = pa >> 12;
        let flags = self.memory.frame_flags[frame as usize];
        if flags & FRAME_UNTOUCHED != 0 {
            // A write may straddle into the next frame (its bounds were checked against RAM).
            self.memory.touch(pa..pa + u64::from(bytes));
        }
        let mut tree_changed = false;
        if flags & FRAME_PAGE_TABLE_LEVELS != 0 && O::ENABLED {
            let entry_bytes: u64 = if self.cpu.paging_mode() == PagingMode::TwoLevel { 4 } else { 8 };
            let first = pa & !(entry_bytes - 1);
            let last = (pa + bytes as u64 - 1) & !(entry_bytes - 1);
            let mut olds = [0u64; 2];
            for (slot, entry) in (first..=last).step_by(entry_bytes as usize).enumerate() {
                olds[slot] = self.memory.read_ram(entry, entry_bytes as u32);
            }
            self.memory.write_ram(pa, bytes, value);
            for (slot, entry) in (first..=last).step_by(entry_bytes as usize).enumerate() {
                let new = self.memory.read_ram(entry, entry_bytes as u32);
                for level in 1..=4u8 {
                    if flags & (1 << level) != 0 {
                        let event = SideEvent::PageTableWrite { gpa: entry, level, old: olds[slot], new };
                        let index = self.index_in_block;
                        self.obs.side_event(index, &event);
                        tree_changed |= level > 1 && new != olds[slot];
                    }
                }
            }
        } else {
            self.memory.write_ram(pa, bytes, value);
        }
        if tree_changed {
            // Rebuilt at once (not at the end of the block) so the very next write into a newly
            // linked table is reported, without cutting the block: recording must not change
            // how execution proceeds.
            self.rebuild_page_table_map();
        }
        if flags & FRAME_CODE != 0 {
            self.invalidate_code_frame(frame);
        }
        Ok(())
    }

    /// Recomputes which frames are page tables: everything reachable from every CR3 loaded so far.
    pub(crate) fn rebuild_page_table_map(&mut self) {
        let machine = &mut *self.machine;
        for frame in machine.page_table_frames.drain(..) {
            machine.memory.frame_flags[frame as usize] &= !FRAME_PAGE_TABLE_LEVELS;
        }
        let mode = self.cpu.paging_mode();
        let roots = self.page_table_roots.clone();
        let mut frames = Vec::new();
        for root in roots {
            match mode {
                PagingMode::None => {}
                PagingMode::TwoLevel => self.mark_table(root & 0xFFFF_F000, 2, 4, &mut frames),
                PagingMode::Pae => {
                    let pdpt = root & 0xFFFF_FFE0;
                    if pdpt + 32 <= self.memory.ram_size() {
                        frames.push((pdpt >> 12, 3));
                        for i in 0..4 {
                            let pdpte = self.memory.read_ram(pdpt + i * 8, 8);
                            if pdpte & PRESENT != 0 {
                                self.mark_table(pdpte & ENTRY_ADDRESS, 2, 8, &mut frames);
                            }
                        }
                    }
                }
                PagingMode::FourLevel => self.mark_table(root & ENTRY_ADDRESS, 4, 8, &mut frames),
            }
        }
        let machine = &mut *self.machine;
        for (frame, level) in frames {
            let flags = &mut machine.memory.frame_flags[frame as usize];
            if *flags & FRAME_PAGE_TABLE_LEVELS == 0 {
                machine.page_table_frames.push(frame);
            }
            *flags |= 1 << level;
        }
        self.page_table_map_valid = true;
    }

    fn mark_table(&self, table: u64, level: u8, entry_bytes: u64, frames: &mut Vec<(u64, u8)>) {
        if table + PAGE_SIZE > self.memory.ram_size() || frames.contains(&(table >> 12, level)) {
            return;
        }
        frames.push((table >> 12, level));
        if level == 1 {
            return;
        }
        let large_allowed = level == 2 && (entry_bytes == 8 || self.cpu.cr4 & crate::cpu::cr4::PSE != 0);
        for i in 0..PAGE_SIZE / entry_bytes {
            let entry = self.memory.read_ram(table + i * entry_bytes, entry_bytes as u32);
            if entry & PRESENT == 0 || (large_allowed && entry & LARGE != 0) || (level == 3 && entry & LARGE != 0) {
                continue;
            }
            let next = if entry_bytes == 4 { entry & 0xFFFF_F000 } else { entry & ENTRY_ADDRESS };
            self.mark_table(next, level - 1, entry_bytes, frames);
        }
    }
}

#[inline(always)]
pub fn is_canonical(address: u64) -> bool {
    ((address as i64) << 16 >> 16) as u64 == address
}

fn segment_fault(segment: SegmentRegister) -> Fault {
    let vector = if segment == SegmentRegister::Ss { crate::interrupts::SS } else { crate::interrupts::GP };
    Fault::Exception { vector, error_code: Some(0), address: None }
}
