//! What a TLB flush that the native execution did not have costs the guest: the refills of the pages it touches
//! afterwards.
//!
//! The trace records the first touch of each page per native TLB epoch; a mechanism that flushes the TLB inside
//! an epoch (a VM transition without VPID, a paravirtual page-table switch) makes the guest refill what it
//! touches next. [`Refills`] counts those pages: every code page a block executes from and every page a touch
//! event names, until the next flush, each at the cost of its walk (its levels from the last walk the trace
//! showed for it, else the paging mode's depth), at most the TLB's capacity per interval. Data pages the guest
//! had already touched earlier in the native epoch are not in the trace after a flush, so their refills are not
//! charged: the model undercounts, never invents.

use virtlab_traces::fasthash::{FastMap, FastSet};

#[derive(Debug, Default)]
pub struct Refills {
    /// Whether a flush happened and the pages touched since still need refilling.
    pending: bool,
    refilled: FastSet<u64>,
    last_code_page: Option<u64>,
    /// Walk levels last seen for each page.
    levels: FastMap<u64, u8>,
    capacity: u64,
}

impl Refills {
    pub fn new(tlb_entries: u64) -> Refills {
        Refills { capacity: tlb_entries, ..Refills::default() }
    }

    /// A flush: the pages touched from now on are refilled.
    pub fn flush(&mut self) {
        self.pending = true;
        self.refilled.clear();
        self.last_code_page = None;
    }

    /// The trace's own epoch ended (a CR3 load): what follows is refilled natively, as the trace records it.
    pub fn native_flush(&mut self) {
        self.pending = false;
        self.refilled.clear();
        self.last_code_page = None;
    }

    /// A page touch event: its walk's length, and a refill if a flush is pending. Returns the levels walked by
    /// the refill, if any.
    pub fn touched(&mut self, page: u64, levels: u8) -> Option<u8> {
        self.levels.insert(page, levels);
        self.refill(page, levels)
    }

    /// A block executed from `page`: a refill of its code page if a flush is pending.
    #[inline]
    pub fn executed(&mut self, page: u64, depth: u8) -> Option<u8> {
        if !self.pending || self.last_code_page == Some(page) {
            return None;
        }
        self.last_code_page = Some(page);
        let levels = self.levels.get(&page).copied().unwrap_or(depth);
        self.refill(page, levels)
    }

    fn refill(&mut self, page: u64, levels: u8) -> Option<u8> {
        if !self.pending || self.refilled.len() as u64 >= self.capacity || !self.refilled.insert(page) {
            return None;
        }
        Some(levels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_flush_each_page_is_refilled_once_up_to_the_capacity() {
        let mut refills = Refills::new(2);
        assert_eq!(refills.executed(0x1000, 4), None, "no flush, no refill");
        assert_eq!(refills.touched(0x2000, 3), None);
        refills.flush();
        assert_eq!(refills.executed(0x1000, 4), Some(4));
        assert_eq!(refills.executed(0x1000, 4), None);
        assert_eq!(refills.executed(0x2000, 4), Some(3), "the levels of its last walk");
        assert_eq!(refills.touched(0x3000, 4), None, "the TLB holds two entries");
        refills.flush();
        assert_eq!(refills.touched(0x3000, 4), Some(4));
    }
}
