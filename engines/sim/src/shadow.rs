//! Shadow page tables as a data structure: the entries a monitor has filled for each guest address space.
//!
//! The guest's page tables are never the ones the processor walks; the monitor keeps, per guest CR3, a cache of
//! shadow entries (guest virtual page -> machine frame). What the trace shows decides what happens:
//! - the first touch of a page in a TLB epoch (`PageTouch`) hits when the current root already maps the page to
//!   that frame, and is otherwise a *hidden fault*: the monitor walks the guest tables and fills the entry;
//! - a CR3 write switches to that address space's cached root (kept across switches, as VMware's and KVM's
//!   shadow MMUs keep them);
//! - INVLPG drops the entry for that page;
//! - a guest write to a page-table page traces (the page is write-protected): the monitor propagates it, dropping
//!   the entries that mapped the old frame and, when the new entry is present, filling the mapping eagerly so the
//!   guest's next touch of that frame hits;
//! - a CR0/CR4 write that changes paging bits drops every root.

use crate::fasthash::{FastMap, FastSet};

const FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;

#[derive(Debug, Default)]
struct Root {
    entries: FastMap<u64, u64>,
    pages_of_frame: FastMap<u64, Vec<u64>>,
    /// Frames a traced write made present; the next touch of each fills from the propagated entry.
    propagated: FastSet<u64>,
}

impl Root {
    fn insert(&mut self, page: u64, frame: u64) {
        if let Some(old) = self.entries.insert(page, frame) {
            if old != frame {
                self.unlink(old, page);
            } else {
                return;
            }
        }
        self.pages_of_frame.entry(frame).or_default().push(page);
    }

    fn unlink(&mut self, frame: u64, page: u64) {
        if let Some(pages) = self.pages_of_frame.get_mut(&frame) {
            pages.retain(|&p| p != page);
            if pages.is_empty() {
                self.pages_of_frame.remove(&frame);
            }
        }
    }

    fn drop_frame(&mut self, frame: u64) -> u64 {
        let pages = self.pages_of_frame.remove(&frame).unwrap_or_default();
        for page in &pages {
            self.entries.remove(page);
        }
        pages.len() as u64
    }
}

/// What a first touch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    Hit,
    /// Filled from an entry a traced write had propagated: no fault.
    Propagated,
    HiddenFault,
}

/// What a traced page-table write did to the shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Propagation {
    /// The write is the first one to this page-table page: the monitor starts tracing it.
    pub newly_traced: bool,
    /// Shadow entries dropped.
    pub invalidated: u64,
}

#[derive(Debug, Default)]
pub struct ShadowMmu {
    roots: FastMap<u64, Root>,
    current: u64,
    traced_pages: FastSet<u64>,
}

impl ShadowMmu {
    /// Switch to the root of `cr3`; true when it was already cached.
    pub fn switch(&mut self, cr3: u64) -> bool {
        if self.current == cr3 & FRAME_MASK && self.roots.contains_key(&self.current) {
            return true;
        }
        self.current = cr3 & FRAME_MASK;
        let cached = self.roots.contains_key(&self.current);
        self.roots.entry(self.current).or_default();
        cached
    }

    fn root(&mut self) -> &mut Root {
        self.roots.entry(self.current).or_default()
    }

    pub fn touch(&mut self, page: u64, frame: u64) -> Touch {
        let root = self.root();
        if root.entries.get(&page) == Some(&frame) {
            return Touch::Hit;
        }
        let outcome = if root.propagated.remove(&frame) { Touch::Propagated } else { Touch::HiddenFault };
        root.insert(page, frame);
        outcome
    }

    /// INVLPG: drop the entry for `page`; true when there was one.
    pub fn invlpg(&mut self, page: u64) -> bool {
        let root = self.root();
        match root.entries.remove(&(page & !0xfff)) {
            Some(frame) => {
                root.unlink(frame, page & !0xfff);
                true
            }
            None => false,
        }
    }

    /// A guest write to a page-table entry at `gpa` (level 1 = PTE).
    pub fn write(&mut self, gpa: u64, level: u8, old: u64, new: u64) -> Propagation {
        let newly_traced = self.traced_pages.insert(gpa & FRAME_MASK);
        let root = self.root();
        let mut invalidated = 0;
        if level == 1 {
            if old & PRESENT != 0 && (old ^ new) & (FRAME_MASK | 0x7) != 0 {
                invalidated = root.drop_frame(old & FRAME_MASK);
            }
            if new & PRESENT != 0 {
                root.propagated.insert(new & FRAME_MASK);
            }
        } else if old & PRESENT != 0 && old != new {
            // A whole subtree changed: drop the root's entries rather than find which ones it covered.
            invalidated = root.entries.len() as u64;
            *root = Root::default();
        }
        Propagation { newly_traced, invalidated }
    }

    /// Drop every root (paging-mode change); returns the entries dropped.
    pub fn flush(&mut self) -> u64 {
        let dropped = self.roots.values().map(|r| r.entries.len() as u64).sum();
        self.roots.clear();
        dropped
    }

    pub fn traced_pages(&self) -> u64 {
        self.traced_pages.len() as u64
    }
}

/// CR0 and CR4 bits whose change invalidates every shadow (PG, WP; PSE, PAE, PGE, PCIDE, LA57).
pub fn paging_bits_changed(cr: u8, old: u64, new: u64) -> bool {
    let mask = match cr {
        0 => (1 << 31) | (1 << 16),
        4 => (1 << 4) | (1 << 5) | (1 << 7) | (1 << 12) | (1 << 17),
        _ => 0,
    };
    (old ^ new) & mask != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_fill_once_per_root_and_survive_switches() {
        let mut mmu = ShadowMmu::default();
        assert!(!mmu.switch(0x1000));
        assert_eq!(mmu.touch(0x40_0000, 0x9000), Touch::HiddenFault);
        assert_eq!(mmu.touch(0x40_0000, 0x9000), Touch::Hit);
        assert!(!mmu.switch(0x2000));
        assert_eq!(mmu.touch(0x40_0000, 0x9000), Touch::HiddenFault, "another address space has its own root");
        assert!(mmu.switch(0x1000));
        assert_eq!(mmu.touch(0x40_0000, 0x9000), Touch::Hit, "the cached root kept its entry");
        assert!(mmu.invlpg(0x40_0123));
        assert!(!mmu.invlpg(0x40_0000));
        assert_eq!(mmu.touch(0x40_0000, 0x9000), Touch::HiddenFault);
    }

    #[test]
    fn traced_writes_invalidate_and_propagate() {
        let mut mmu = ShadowMmu::default();
        mmu.switch(0x1000);
        mmu.touch(0x40_0000, 0x9000);
        // Unmap: the entry for frame 0x9000 goes.
        let p = mmu.write(0x5008, 1, 0x9067, 0);
        assert_eq!(p, Propagation { newly_traced: true, invalidated: 1 });
        // Map a new frame: the next touch of it needs no fault.
        let p = mmu.write(0x5008, 1, 0, 0xa067);
        assert_eq!(p, Propagation { newly_traced: false, invalidated: 0 });
        assert_eq!(mmu.touch(0x40_0000, 0xa000), Touch::Propagated);
        assert_eq!(mmu.traced_pages(), 1);
        assert_eq!(mmu.flush(), 1);
        assert!(paging_bits_changed(4, 0x20, 0xa0) && !paging_bits_changed(0, 1, 3));
    }
}
