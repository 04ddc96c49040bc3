//! The guest kernel manages memory as a Unix kernel does, and its traces show it: each workload runs with the
//! kernel's own counters printed (`counters=1`), and the trace's events are checked against them — page clears
//! and copies as REP string events with their element counts, copy-on-write faults as write faults on present
//! pages, fork writing only present entries, no page-table write in `pgfault`'s loop.

mod common;

use common::record_workload;
use virtlab_traces::{Event, TraceView};

/// The kernel's counters, as `counters: page-tables=… ptes-shared=… cow-faults=… pages-copied=… zero-fills=…`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counters {
    page_tables: u64,
    ptes_shared: u64,
    cow_faults: u64,
    pages_copied: u64,
    zero_fills: u64,
}

impl Counters {
    fn from_serial(serial: &str) -> Counters {
        let line = serial.lines().find_map(|l| l.strip_prefix("counters: ")).expect("the guest printed its counters");
        let mut counters = Counters::default();
        for field in line.split(' ') {
            let (name, value) = field.split_once('=').unwrap();
            let value: u64 = value.parse().unwrap();
            match name {
                "page-tables" => counters.page_tables = value,
                "ptes-shared" => counters.ptes_shared = value,
                "cow-faults" => counters.cow_faults = value,
                "pages-copied" => counters.pages_copied = value,
                "zero-fills" => counters.zero_fills = value,
                other => panic!("unknown counter {other}"),
            }
        }
        counters
    }
}

/// What the trace shows of the same work.
#[derive(Debug, Default)]
struct Seen {
    /// REP executions of a whole page: STOSQ clears, MOVSQ copies once user mode has begun (before it, the kernel
    /// copies the program into its first process).
    page_clears: u64,
    page_copies: u64,
    program_page_copies: u64,
    /// #PF on a present page for a write.
    write_faults_on_present_pages: u64,
    page_faults: u64,
    /// Page-table writes that made a present, writable leaf entry read-only (fork's copy-on-write protection),
    /// and any page-table write that stored a non-present entry over a non-present one (a "marker" no real kernel
    /// writes).
    write_protections: u64,
    marker_writes: u64,
    page_table_writes: u64,
}

const PAGE_QWORDS: u64 = 512;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const PF_PRESENT_WRITE: u32 = 3;

fn scan(trace: &[u8]) -> (Seen, String) {
    let view = TraceView::open(trace).unwrap();
    let mut seen = Seen::default();
    let mut user_mode_began = false;
    let mut rep_instruction = Vec::new();
    for (_, block) in view.blocks().iter() {
        rep_instruction.push(page_sized_rep_kinds(block));
    }
    let mut current = 0usize;
    view.for_each_event(|event| match event {
        Event::Block(id) | Event::PartialBlock { block: id, .. } => current = id.index(),
        Event::Context { context, .. } => user_mode_began |= context.is_user(),
        Event::RepString { at, elements: PAGE_QWORDS } => {
            match rep_instruction[current].iter().find(|(index, _)| *index == at).map(|(_, kind)| *kind) {
                Some("stosq") => seen.page_clears += 1,
                Some("movsq") if user_mode_began => seen.page_copies += 1,
                Some("movsq") => seen.program_page_copies += 1,
                _ => {}
            }
        }
        Event::Exception { vector: 14, error_code, .. } => {
            seen.page_faults += 1;
            if error_code.is_some_and(|code| code & PF_PRESENT_WRITE == PF_PRESENT_WRITE) {
                seen.write_faults_on_present_pages += 1;
            }
        }
        Event::PageTableWrite { level, old, new, .. } => {
            seen.page_table_writes += 1;
            let protected = old & (PRESENT | WRITABLE) == PRESENT | WRITABLE && new & (PRESENT | WRITABLE) == PRESENT;
            if level == 1 && protected {
                seen.write_protections += 1;
            }
            if old & PRESENT == 0 && new & PRESENT == 0 && new != 0 {
                seen.marker_writes += 1;
            }
        }
        _ => {}
    })
    .unwrap();
    (seen, String::from_utf8_lossy(&view.footer().ending.serial).into_owned())
}

/// Indices of a block's REP STOSQ and REP MOVSQ instructions.
fn page_sized_rep_kinds(block: &virtlab_traces::Block) -> Vec<(u32, &'static str)> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let mut decoder = Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE);
    let mut kinds = Vec::new();
    for index in 0..block.instructions {
        let instruction = decoder.decode();
        if instruction.has_rep_prefix() {
            match instruction.mnemonic() {
                Mnemonic::Stosq => kinds.push((index, "stosq")),
                Mnemonic::Movsq => kinds.push((index, "movsq")),
                _ => {}
            }
        }
    }
    kinds
}

fn run(name: &str, params: &[(&str, &str)]) -> (Seen, Counters) {
    let mut params = params.to_vec();
    params.push(("counters", "1"));
    let trace = record_workload(name, &params);
    let (seen, serial) = scan(&trace);
    assert!(serial.ends_with("ok\n"), "{name}: {serial}");
    (seen, Counters::from_serial(&serial))
}

/// Every page the kernel clears is a page table or a demand-zero fill, every page it copies is a copy-on-write
/// copy, and every copy-on-write fault is a write fault on a present page.
fn assert_events_match_counters(name: &str, seen: &Seen, counters: &Counters) {
    assert_eq!(seen.page_clears, counters.page_tables + counters.zero_fills, "{name}: {seen:?} {counters:?}");
    assert_eq!(seen.page_copies, counters.pages_copied, "{name}: {seen:?} {counters:?}");
    assert_eq!(seen.write_faults_on_present_pages, counters.cow_faults, "{name}: {seen:?} {counters:?}");
    assert_eq!(seen.marker_writes, 0, "{name}: a non-present entry was written over a non-present one");
}

#[test]
fn fork_shares_present_pages_copy_on_write_and_copies_nothing_until_a_write() {
    let iterations = 20;
    let (seen, counters) = run("forkwait", &[("iterations", "20")]);
    assert_events_match_counters("forkwait", &seen, &counters);
    // forkwait's processes only make system calls: nothing is ever written to a shared page.
    assert_eq!((counters.cow_faults, counters.pages_copied), (0, 0), "{counters:?}");
    // Each fork gives the child a PML4, PDPT, page directory and one page table (the program's).
    assert_eq!(counters.page_tables, 3 + 1 + iterations * 4, "{counters:?}");
    // Fork writes the entries it shares and nothing else: the program's pages are read-only, so no entry
    // needs write-protecting, and it shares each of them once per fork.
    assert_eq!(seen.write_protections, 0, "{seen:?}");
    assert_eq!(counters.ptes_shared % iterations, 0, "{counters:?}");
    assert!(seen.program_page_copies > 0 && counters.ptes_shared == iterations * seen.program_page_copies);
}

#[test]
fn copy_on_write_copies_for_the_child_and_reuses_for_the_last_sharer() {
    let (iterations, pages) = (6, 5);
    let (seen, counters) = run("cow", &[("iterations", "6"), ("pages", "5")]);
    assert_events_match_counters("cow", &seen, &counters);
    // The child's writes copy (the parent still shares); the parent's, after the child exited, do not.
    assert_eq!(counters.pages_copied, iterations * pages, "{counters:?}");
    assert_eq!(counters.cow_faults, 2 * iterations * pages, "{counters:?}");
    // Each fork write-protects the parent's writable pages: the filled pages (its stack is never touched).
    assert_eq!(seen.write_protections, iterations * pages, "{seen:?}");
    assert_eq!(counters.zero_fills, pages, "{counters:?}");
}

#[test]
fn mmap_writes_no_entry_and_pages_fault_in_zeroed() {
    let iterations = 10;
    let (seen, counters) = run("mmap", &[("iterations", "10")]);
    assert_events_match_counters("mmap", &seen, &counters);
    // Four pages per iteration fault in; munmap clears exactly those four present entries.
    assert_eq!(counters.zero_fills, 4 * iterations, "{counters:?}");
    assert_eq!(seen.page_faults, 4 * iterations, "{seen:?}");
    let (demand, demand_counters) = run("demandzero", &[("iterations", "100")]);
    assert_events_match_counters("demandzero", &demand, &demand_counters);
    assert_eq!(demand_counters.zero_fills, 100, "{demand_counters:?}");
}

#[test]
fn pgfault_is_a_true_fault_with_no_page_table_write() {
    let iterations = 50;
    let (seen, counters) = run("pgfault", &[("iterations", "50")]);
    assert_events_match_counters("pgfault", &seen, &counters);
    assert_eq!(seen.page_faults, iterations, "{seen:?}");
    assert_eq!(seen.write_faults_on_present_pages, 0, "{seen:?}");
    assert_eq!(seen.page_table_writes, 0, "{seen:?}");
    assert_eq!((counters.zero_fills, counters.cow_faults), (0, 0), "{counters:?}");
}

/// Every page touch under 4-level paging carries the walk that translated it: four tables for a 4 KiB page, two
/// for the kernel's 2 MiB pages, and the first is always the current address space's PML4.
#[test]
fn page_touches_and_page_faults_carry_their_walks() {
    use virtlab_traces::{PageSize, PagingMode};
    let trace = record_workload("cow", &[("iterations", "2"), ("pages", "2")]);
    let view = TraceView::open(&trace).unwrap();
    let mut cr3 = 0;
    let mut paging = PagingMode::Disabled;
    let (mut touches, mut faults) = (0, 0);
    view.for_each_event(|event| match event {
        Event::Context { context, .. } => (cr3, paging) = (context.cr3, context.paging),
        Event::PageTouch { size, walk, .. } if paging == PagingMode::FourLevel => {
            touches += 1;
            let expected = match size {
                PageSize::Size4K => 4,
                PageSize::Size2M => 3,
                PageSize::Size1G => 2,
            };
            assert_eq!(walk.levels(), expected, "{event:?}");
            assert_eq!(u64::from(walk.tables()[0]) << 12, cr3 & !0xfff, "{event:?}");
        }
        Event::Exception { vector: 14, walk, error_code, .. } => {
            faults += 1;
            assert_eq!(u64::from(walk.tables()[0]) << 12, cr3 & !0xfff, "{event:?}");
            // A fault on a present page (copy-on-write) walked all four levels; a not-present one stopped early.
            if error_code.is_some_and(|code| code & 1 != 0) {
                assert_eq!(walk.levels(), 4, "{event:?}");
            }
        }
        Event::Exception { walk, .. } => assert_eq!(walk.levels(), 0),
        _ => {}
    })
    .unwrap();
    assert!(touches > 50 && faults >= 8, "{touches} touches, {faults} faults");
}
