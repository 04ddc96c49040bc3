//! Shadow page tables as shipping monitors keep them (KVM's `mmu.c`, VMware's trace-based coherency).
//!
//! The guest's page tables are never the ones the processor walks: the monitor keeps, per guest CR3, a root of
//! shadow entries (guest virtual page -> frame), each filled from a walk of the guest's tables. What the trace
//! shows decides everything:
//! - the first touch of a page in a TLB epoch hits when the current root maps the page to that frame through the
//!   same tables; otherwise it is a *hidden fault*: the monitor walks the guest's tables (the touch's walk, so the
//!   walk's length is known) and fills the entry;
//! - a guest page-table page is *traced* (write-protected) while some shadow is built from it: the root table of
//!   every cached root, and every table on the walk of a filled entry. A page becomes traced when the first shadow
//!   entry uses it and stops being traced when the last one is gone, so a new process's tables are not traced
//!   until its CR3 is loaded and its pages touched;
//! - a write to a traced page updates every shadow of it: a leaf write re-creates (or drops) the entry it covers
//!   in every root that shadows the table, a write above the leaf level drops the subtree it covers;
//! - optionally (`monitor.unsync_leaf_tables`, KVM since 2.6.28) a leaf table goes out of sync on its first traced
//!   write: further writes do not trap until the next CR3 load or INVLPG re-synchronizes it;
//! - optionally (`monitor.write_flood_threshold`, KVM's heuristic) a page written that many times in a row stops
//!   being shadowed altogether;
//! - a CR3 write switches to that address space's cached root; INVLPG drops the page's entry; a CR0/CR4 write
//!   that changes paging drops every shadow.

use virtlab_traces::{PagingMode, Walk};

use virtlab_traces::fasthash::{FastMap, FastSet};

const FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;

/// One shadow entry: the frame it maps and the guest tables it was filled from, top level first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    frame: u64,
    path: Walk,
}

#[derive(Debug, Default)]
struct Root {
    entries: FastMap<u64, Mapping>,
}

/// A guest page-table page some shadow uses.
#[derive(Debug, Default)]
struct GuestTable {
    /// Shadow entries filled through this table: the pages, by root. A leaf write needs one page per root, not
    /// all of a table's 512.
    mappings: FastMap<u64, FastSet<u64>>,
    /// Cached roots whose top-level table this is.
    roots: u32,
    /// Out of sync: writes do not trap until it is re-synchronized.
    unsync: bool,
}

impl GuestTable {
    fn in_use(&self) -> bool {
        self.roots > 0 || !self.mappings.is_empty()
    }
}

/// The monitor's choices that shipping monitors differ in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowPolicy {
    /// Leaf tables go out of sync on a write instead of trapping on every one.
    pub unsync_leaf_tables: bool,
    /// Writes in a row to one page after which it is no longer shadowed (0: never).
    pub write_flood_threshold: u64,
}

/// What a first touch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    Hit,
    /// A hidden fault: the monitor walked the guest's tables (`walk_levels` of them) and filled the entry; the
    /// fill write-protected `newly_traced` tables.
    HiddenFault {
        walk_levels: u8,
        newly_traced: u32,
    },
}

/// What a guest page-table write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Write {
    /// The write trapped: the page was traced and in sync.
    pub traced: bool,
    /// Shadow entries re-created from the new value of a leaf entry, one per root that shadows the table (the
    /// monitor drops the old entry and installs the new one: `monitor.shadow_update`).
    pub updates: u64,
    /// Shadow entries dropped with nothing installed in their place: a leaf entry cleared, one unlinked subtree per
    /// root for an upper-level entry changed, every entry of a flooded page (`monitor.shadow_invalidate`).
    pub invalidated: u64,
    /// The page went out of sync with this write.
    pub unsynced: bool,
    /// The page stopped being shadowed after a burst of writes.
    pub flooded: bool,
    /// Pages that stopped being traced.
    pub untraced: u32,
}

/// What a CR3 write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Switch {
    pub cached: bool,
    pub newly_traced: u32,
    pub resynced: u64,
}

#[derive(Debug, Default)]
pub struct ShadowMmu {
    policy: ShadowPolicy,
    paging: Paging,
    roots: FastMap<u64, Root>,
    current: u64,
    tables: FastMap<u32, GuestTable>,
    /// Tables that went out of sync since the last re-synchronization (some may have gone since): what a CR3
    /// load or INVLPG re-synchronizes, without a look at every traced table.
    out_of_sync: Vec<u32>,
    last_written: Option<u32>,
    writes_in_a_row: u64,
}

/// Entry size and index width of the guest's paging mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Paging {
    levels: u8,
    index_bits: u32,
    entry_bytes: u64,
}

impl Default for Paging {
    fn default() -> Paging {
        Paging::of(PagingMode::FourLevel)
    }
}

impl Paging {
    fn of(mode: PagingMode) -> Paging {
        match mode {
            PagingMode::TwoLevel => Paging { levels: 2, index_bits: 10, entry_bytes: 4 },
            PagingMode::Pae => Paging { levels: 3, index_bits: 9, entry_bytes: 8 },
            PagingMode::FiveLevel => Paging { levels: 5, index_bits: 9, entry_bytes: 8 },
            PagingMode::FourLevel | PagingMode::Disabled => Paging { levels: 4, index_bits: 9, entry_bytes: 8 },
        }
    }

    /// The index of `page` in a table of `level` (1 = the leaf table).
    fn index(self, page: u64, level: u8) -> u64 {
        let shift = 12 + self.index_bits * u32::from(level - 1);
        (page >> shift) & ((1 << self.index_bits) - 1)
    }

    /// The level of the table at position `position` of a walk (top first).
    fn level_at(self, position: usize) -> u8 {
        self.levels - position as u8
    }
}

impl ShadowMmu {
    pub fn new(policy: ShadowPolicy) -> ShadowMmu {
        ShadowMmu { policy, ..ShadowMmu::default() }
    }

    /// Follow the guest's paging mode (entry sizes, levels).
    pub fn set_paging(&mut self, mode: PagingMode) {
        self.paging = Paging::of(mode);
    }

    /// Switch to the root of `cr3`, building it (and tracing its top-level table) when it is not cached.
    /// A CR3 load re-synchronizes the out-of-sync tables.
    pub fn switch(&mut self, cr3: u64) -> Switch {
        let resynced = self.resync_all();
        self.current = cr3 & FRAME_MASK;
        let cached = self.roots.contains_key(&self.current);
        let newly_traced = self.ensure_root(self.current);
        Switch { cached, newly_traced, resynced }
    }

    /// The root of `root`, built (its top-level table traced) if missing; returns the tables newly traced.
    fn ensure_root(&mut self, root: u64) -> u32 {
        if self.roots.contains_key(&root) {
            return 0;
        }
        self.roots.insert(root, Root::default());
        let table = self.tables.entry(frame_number(root)).or_default();
        let newly_traced = u32::from(!table.in_use());
        table.roots += 1;
        newly_traced
    }

    /// Follow the current CR3 without the costs of a guest CR3 write (a context the trace reports).
    pub fn follow(&mut self, cr3: u64) {
        if cr3 & FRAME_MASK != self.current || !self.roots.contains_key(&(cr3 & FRAME_MASK)) {
            self.switch(cr3);
        }
    }

    /// A first touch of `page`, which the guest's tables (`walk`) map to `frame`.
    pub fn touch(&mut self, page: u64, frame: u64, walk: Walk) -> Touch {
        let root = self.current;
        let mapping = Mapping { frame, path: walk };
        if self.roots.get(&root).and_then(|r| r.entries.get(&page)) == Some(&mapping) {
            return Touch::Hit;
        }
        let mut untraced = 0;
        self.unmap(root, page, &mut untraced);
        let newly_traced = self.map(root, page, mapping);
        Touch::HiddenFault { walk_levels: walk.levels(), newly_traced }
    }

    /// A guest write to the page-table entry at `gpa` (level 1 = a leaf table).
    pub fn write(&mut self, gpa: u64, level: u8, old: u64, new: u64) -> Write {
        let table = frame_number(gpa);
        let Some(state) = self.tables.get(&table) else { return Write::default() };
        if !state.in_use() || state.unsync {
            return Write::default();
        }
        let mut outcome = Write { traced: true, ..Write::default() };
        if self.last_written == Some(table) {
            self.writes_in_a_row += 1;
        } else {
            self.last_written = Some(table);
            self.writes_in_a_row = 1;
        }
        let threshold = self.policy.write_flood_threshold;
        if threshold > 0 && self.writes_in_a_row >= threshold {
            outcome.flooded = true;
            outcome.invalidated = self.unshadow(table, &mut outcome.untraced);
            return outcome;
        }
        let index = (gpa & 0xfff) / self.paging.entry_bytes;
        if level == 1 {
            self.write_leaf(table, index, new, &mut outcome);
            if self.policy.unsync_leaf_tables {
                if let Some(state) = self.tables.get_mut(&table) {
                    state.unsync = true;
                    outcome.unsynced = true;
                    self.out_of_sync.push(table);
                }
            }
        } else if old & PRESENT != 0 && old != new {
            self.write_upper(table, level, index, &mut outcome);
        }
        // A non-present entry above the leaf level covers no shadow entry: the monitor only emulates the store
        // into the write-protected page.
        outcome
    }

    /// INVLPG: drop the current root's entry for the page; out-of-sync tables are re-synchronized.
    pub fn invlpg(&mut self, address: u64) -> (u64, u64, u32) {
        let resynced = self.resync_all();
        let mut untraced = 0;
        let dropped = u64::from(self.unmap(self.current, address & !0xfff, &mut untraced));
        (dropped, resynced, untraced)
    }

    /// Drop every root (a paging-mode change); returns the entries dropped and the pages untraced.
    pub fn flush(&mut self) -> (u64, u32) {
        let dropped = self.roots.values().map(|r| r.entries.len() as u64).sum();
        let untraced = self.tables.values().filter(|t| t.in_use()).count() as u32;
        self.roots.clear();
        self.tables.clear();
        self.out_of_sync.clear();
        (dropped, untraced)
    }

    /// Pages traced now.
    pub fn traced_now(&self) -> usize {
        self.tables.values().filter(|t| t.in_use() && !t.unsync).count()
    }

    fn map(&mut self, root: u64, page: u64, mapping: Mapping) -> u32 {
        let mut newly_traced = self.ensure_root(root);
        for &table in mapping.path.tables() {
            let state = self.tables.entry(table).or_default();
            newly_traced += u32::from(!state.in_use());
            state.mappings.entry(root).or_default().insert(page);
        }
        self.roots.entry(root).or_default().entries.insert(page, mapping);
        newly_traced
    }

    /// Remove one shadow entry; true when there was one. Tables nobody uses any more count in `untraced`.
    fn unmap(&mut self, root: u64, page: u64, untraced: &mut u32) -> bool {
        let Some(mapping) = self.roots.get_mut(&root).and_then(|r| r.entries.remove(&page)) else { return false };
        for table in mapping.path.tables() {
            if let Some(state) = self.tables.get_mut(table) {
                if let Some(pages) = state.mappings.get_mut(&root) {
                    pages.remove(&page);
                    if pages.is_empty() {
                        state.mappings.remove(&root);
                    }
                }
                if !state.in_use() {
                    self.tables.remove(table);
                    *untraced += 1;
                }
            }
        }
        true
    }

    /// A leaf write: in every root that shadows the table, the entry at `index` is re-created from the new value,
    /// or dropped when the new value is not present.
    fn write_leaf(&mut self, table: u32, index: u64, new: u64, outcome: &mut Write) {
        let Some(state) = self.tables.get(&table) else { return };
        // One mapping per root (its lowest page) tells where the table sits in that root's address space.
        let mut roots: Vec<(u64, u64, Walk)> = Vec::new();
        for (&root, pages) in &state.mappings {
            let Some(&page) = pages.iter().min() else { continue };
            if let Some(mapping) = self.roots.get(&root).and_then(|r| r.entries.get(&page)) {
                roots.push((root, page, mapping.path));
            }
        }
        roots.sort_unstable_by_key(|&(root, page, _)| (root, page));
        let leaf_span = self.paging.index_bits + 12;
        for (root, page, path) in roots {
            let target = (page & !((1u64 << leaf_span) - 1)) | (index << 12);
            let mut untraced = 0;
            if new & PRESENT != 0 {
                // The same tables map the new entry: whatever the drop untraced, the install traces again. An
                // entry rewritten as it was (a guest storing an unchanged value) ends as it began.
                let mapping = Mapping { frame: new & FRAME_MASK, path };
                if self.roots.get(&root).and_then(|r| r.entries.get(&target)) != Some(&mapping) {
                    self.unmap(root, target, &mut untraced);
                    self.map(root, target, mapping);
                }
                outcome.updates += 1;
            } else {
                let dropped = self.unmap(root, target, &mut untraced);
                outcome.untraced += untraced;
                outcome.invalidated += u64::from(dropped);
            }
        }
    }

    /// A write above the leaf level that changes a present entry: drop the subtree it covers in every root.
    fn write_upper(&mut self, table: u32, level: u8, index: u64, outcome: &mut Write) {
        let Some(state) = self.tables.get(&table) else { return };
        let mut covered: Vec<(u64, u64)> = mapped(state)
            .filter(|&(root, page)| {
                let mapping = self.roots.get(&root).and_then(|r| r.entries.get(&page));
                mapping.is_some_and(|m| {
                    m.path.tables().iter().position(|&t| t == table).is_some_and(|position| {
                        self.paging.level_at(position) == level && self.paging.index(page, level) == index
                    })
                })
            })
            .collect();
        covered.sort_unstable();
        // One unlinked subtree per root: the monitor clears the one shadow entry that pointed to it.
        let mut roots: FastSet<u64> = FastSet::default();
        for (root, page) in covered {
            if self.unmap(root, page, &mut outcome.untraced) {
                roots.insert(root);
            }
        }
        outcome.invalidated = roots.len() as u64;
    }

    /// Stop shadowing a page: drop every entry filled through it, and the root whose top it is (rebuilt, and
    /// traced again, when its address space is next used).
    fn unshadow(&mut self, table: u32, untraced: &mut u32) -> u64 {
        let Some(state) = self.tables.get(&table) else { return 0 };
        let mut mappings: Vec<(u64, u64)> = mapped(state).collect();
        mappings.sort_unstable();
        let mut dropped = 0;
        for (root, page) in mappings {
            dropped += u64::from(self.unmap(root, page, untraced));
        }
        self.roots.remove(&(u64::from(table) << 12));
        if self.tables.remove(&table).is_some() {
            *untraced += 1;
        }
        self.last_written = None;
        dropped
    }

    fn resync_all(&mut self) -> u64 {
        let mut resynced = 0;
        for table in self.out_of_sync.drain(..) {
            if let Some(state) = self.tables.get_mut(&table).filter(|t| t.unsync) {
                state.unsync = false;
                resynced += 1;
            }
        }
        resynced
    }
}

/// Every shadow entry filled through `table`, as (root, page).
fn mapped(table: &GuestTable) -> impl Iterator<Item = (u64, u64)> + '_ {
    table.mappings.iter().flat_map(|(&root, pages)| pages.iter().map(move |&page| (root, page)))
}

fn frame_number(address: u64) -> u32 {
    u32::try_from(address >> 12).unwrap_or(u32::MAX)
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

    /// A 4-level walk through PML4 `root`, PDPT 2, PD 3 and leaf table `leaf` (frame numbers).
    fn walk(root: u32, leaf: u32) -> Walk {
        Walk::new(&[root, 2, 3, leaf]).unwrap()
    }

    #[test]
    fn touches_fill_once_per_root_trace_the_walked_tables_and_survive_switches() {
        let mut mmu = ShadowMmu::new(ShadowPolicy::default());
        let first = mmu.switch(0x1000);
        assert_eq!((first.cached, first.newly_traced), (false, 1), "the root table is traced once shadowed");
        assert_eq!(mmu.touch(0x40_0000, 0x9000, walk(1, 4)), Touch::HiddenFault { walk_levels: 4, newly_traced: 3 });
        assert_eq!(mmu.touch(0x40_0000, 0x9000, walk(1, 4)), Touch::Hit);
        assert_eq!(mmu.traced_now(), 4);
        assert!(!mmu.switch(0x2000).cached);
        assert_eq!(
            mmu.touch(0x40_0000, 0x9000, walk(0x2, 4)),
            Touch::HiddenFault { walk_levels: 4, newly_traced: 0 },
            "another address space has its own root, over tables already traced"
        );
        assert!(mmu.switch(0x1000).cached);
        assert_eq!(mmu.touch(0x40_0000, 0x9000, walk(1, 4)), Touch::Hit, "the cached root kept its entry");
        assert_eq!(mmu.invlpg(0x40_0123).0, 1);
        assert_eq!(mmu.invlpg(0x40_0000).0, 0);
    }

    #[test]
    fn only_shadowed_tables_trace_and_a_leaf_write_updates_every_root_that_shadows_it() {
        let mut mmu = ShadowMmu::new(ShadowPolicy::default());
        // A table no shadow was built from: its writes do not trap (a new process's tables before its CR3 load).
        assert!(!mmu.write(0x7000, 1, 0, 0x9067).traced);
        mmu.switch(0x1000);
        mmu.touch(0x40_0000, 0x9000, walk(1, 4));
        mmu.switch(0x6000);
        mmu.touch(0x40_0000, 0x9000, walk(6, 4));
        // Unmap page 0x40_0000 (index 0 of leaf table 4): both roots drop their entry.
        let write = mmu.write(0x4000, 1, 0x9067, 0);
        assert_eq!((write.traced, write.updates, write.invalidated), (true, 0, 2));
        assert_eq!(write.untraced, 3, "the leaf table, the page directory and the PDPT: no shadow uses them now");
        assert!(!mmu.write(0x4000, 1, 0, 0xa067).traced, "so the leaf's next write does not trap");
        // Map it again through the walk: a write to another index of the shadowed leaf re-creates that entry.
        mmu.touch(0x40_0000, 0xa000, walk(6, 4));
        let write = mmu.write(0x4008, 1, 0, 0xb067);
        assert_eq!((write.traced, write.updates, write.invalidated, write.untraced), (true, 1, 0, 0));
        assert_eq!(mmu.touch(0x40_1000, 0xb000, walk(6, 4)), Touch::Hit, "propagated into the shadow");
    }

    #[test]
    fn an_upper_level_write_drops_only_the_subtree_it_covers() {
        let mut mmu = ShadowMmu::new(ShadowPolicy::default());
        mmu.switch(0x1000);
        // Two pages under PD 3 entry 2 (leaf table 4) and one under PD 3 entry 3 (leaf table 5).
        mmu.touch(0x40_0000, 0x9000, walk(1, 4));
        mmu.touch(0x40_1000, 0xa000, walk(1, 4));
        mmu.touch(0x60_0000, 0xb000, walk(1, 5));
        let write = mmu.write(0x3000 + 2 * 8, 2, 0x4067, 0);
        assert_eq!((write.traced, write.updates, write.invalidated), (true, 0, 1), "one subtree unlinked");
        assert_eq!(mmu.touch(0x60_0000, 0xb000, walk(1, 5)), Touch::Hit, "the other subtree stays");
    }

    #[test]
    fn out_of_sync_leaves_and_write_floods_stop_the_traps() {
        let mut mmu = ShadowMmu::new(ShadowPolicy { unsync_leaf_tables: true, write_flood_threshold: 0 });
        mmu.switch(0x1000);
        mmu.touch(0x40_0000, 0x9000, walk(1, 4));
        let first = mmu.write(0x4000, 1, 0x9067, 0x9065);
        assert!(first.traced && first.unsynced);
        assert!(!mmu.write(0x4008, 1, 0, 0x8067).traced, "out of sync: no trap");
        assert_eq!(mmu.switch(0x1000).resynced, 1, "a CR3 load re-synchronizes");
        assert!(mmu.write(0x4008, 1, 0x8067, 0).traced);

        let mut mmu = ShadowMmu::new(ShadowPolicy { unsync_leaf_tables: false, write_flood_threshold: 3 });
        mmu.switch(0x1000);
        mmu.touch(0x40_0000, 0x9000, walk(1, 4));
        assert!(mmu.write(0x4008, 1, 0, 0).traced);
        assert!(mmu.write(0x4010, 1, 0, 0).traced);
        let third = mmu.write(0x4018, 1, 0, 0);
        assert!(third.traced && third.flooded && third.invalidated == 1);
        assert!(!mmu.write(0x4020, 1, 0, 0).traced, "no longer shadowed");
        // The root's own table flooded: the root goes too, and the next touch refills a new one.
        for offset in [0, 8, 16] {
            mmu.write(0x1000 + offset, 4, 0, 0);
        }
        assert!(!mmu.write(0x1000, 4, 0, 0).traced);
    }

    #[test]
    fn a_paging_change_drops_everything() {
        let mut mmu = ShadowMmu::new(ShadowPolicy::default());
        mmu.switch(0x1000);
        mmu.touch(0x40_0000, 0x9000, walk(1, 4));
        assert_eq!(mmu.flush(), (1, 4));
        assert_eq!(mmu.traced_now(), 0);
        assert!(paging_bits_changed(4, 0x20, 0xa0) && !paging_bits_changed(0, 1, 3));
    }
}
