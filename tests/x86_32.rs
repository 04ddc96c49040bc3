//! The x86-32 builds of the catalog (`arch=x86-32`), recorded on the reference machine: what the trace says
//! about the mode the kernel ran in, the paging it used, and where it did not go.

mod common;

use std::io::Cursor;

use common::record_workload;
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_traces::{check, CodeMode, EndReason, Event, PageSize, PagingMode, TraceView};

/// The lowest address of the top 64 MiB, which the 32-bit kernel must never touch (workloads/README.md).
const HYPERVISOR_HOLE: u64 = 0xFC00_0000;
const PAGE_DIRECTORY: u64 = 0x20_2000;
/// The kernel page through which a copy-on-write fault fills its new frame.
const KMAP: u64 = 0x3F_E000;

/// `hlt arch=x86-32`: every block is 32-bit code, the kernel runs at CPL 0 under two-level paging with the
/// kernel's page directory, each HLT is woken by the timer through the IDT and left with IRETD, every page the
/// kernel touches was translated by a two-level walk starting at that page directory, and nothing runs or is
/// touched in the top 64 MiB.
#[test]
fn a_32_bit_kernel_mode_workload_runs_32_bit_code_under_two_level_paging() {
    let iterations = 5;
    let trace = record_workload("hlt", &[("arch", "x86-32"), ("iterations", "5")]);
    let view = TraceView::open(&trace).unwrap();
    let blocks = view.blocks();
    assert!(blocks.len() > 10, "{} blocks", blocks.len());
    for (_, block) in blocks.iter() {
        assert_eq!(block.mode, CodeMode::Bits32, "block at {:#x}", block.address);
        assert!(block.address < HYPERVISOR_HOLE, "block at {:#x}", block.address);
    }

    let mut last_context = None;
    let (mut timer_interrupts, mut irets) = (0, 0);
    let mut touched = std::collections::BTreeSet::new();
    view.for_each_event(|event| match event {
        Event::Context { context, .. } => last_context = Some(context),
        Event::Interrupt { vector: 32, .. } => timer_interrupts += 1,
        Event::Iret { .. } => irets += 1,
        Event::PageTouch { page, .. } if last_context.is_none_or(|c| c.paging == PagingMode::Disabled) => {
            assert!(page < HYPERVISOR_HOLE, "{event:?}")
        }
        Event::PageTouch { page, size, walk, user, .. } => {
            touched.insert(page);
            assert!(page < HYPERVISOR_HOLE, "{event:?}");
            assert!(!user, "{event:?}");
            assert_eq!(size, PageSize::Size4K, "{event:?}");
            assert_eq!(walk.levels(), 2, "{event:?}");
            assert_eq!(u64::from(walk.tables()[0]) << 12, PAGE_DIRECTORY, "{event:?}");
        }
        _ => {}
    })
    .unwrap();
    let context = last_context.expect("the trace records contexts");
    assert_eq!(context.cpl, 0);
    assert_eq!(context.paging, PagingMode::TwoLevel);
    assert_eq!(context.cr3, PAGE_DIRECTORY);
    assert!(timer_interrupts >= iterations, "{timer_interrupts} timer interrupts for {iterations} HLTs");
    assert_eq!(irets, timer_interrupts, "every timer interrupt returns with IRETD");
    // The kernel's code, its variables (the tick count), the IDT the timer's delivery reads, and the boot stack.
    for page in [0x10_1000, 0x20_0000, 0x20_1000, 0x20_B000] {
        assert!(touched.contains(&page), "{page:#x} not among the pages touched under paging: {touched:x?}");
    }
}

/// What a recorded user-mode run of the 32-bit kernel shows.
#[derive(Debug, Default)]
struct UserRun {
    int80: u64,
    syscalls: u64,
    sysrets: u64,
    user_contexts: u64,
    /// The address spaces user code ran in.
    user_cr3s: std::collections::BTreeSet<u64>,
    cr3_writes: u64,
    page_faults: Vec<(Option<u32>, Option<u64>)>,
    invlpgs: Vec<u64>,
}

fn record_user_run(name: &str, params: &[(&str, &str)]) -> UserRun {
    let mut all = vec![("arch", "x86-32")];
    all.extend_from_slice(params);
    let trace = record_workload(name, &all);
    let view = TraceView::open(&trace).unwrap();
    for (_, block) in view.blocks().iter() {
        assert_eq!(block.mode, CodeMode::Bits32, "{name}: block at {:#x}", block.address);
        assert!(block.address < HYPERVISOR_HOLE, "{name}: block at {:#x}", block.address);
    }
    let mut run = UserRun::default();
    view.for_each_event(|event| match event {
        Event::SoftwareInterrupt { vector: 0x80, .. } => run.int80 += 1,
        Event::Syscall { .. } => run.syscalls += 1,
        Event::Sysret { .. } => run.sysrets += 1,
        Event::Context { context, .. } if context.cpl == 3 => {
            assert_eq!(context.paging, PagingMode::TwoLevel, "{name}: {event:?}");
            run.user_cr3s.insert(context.cr3);
            run.user_contexts += 1;
        }
        Event::Exception { vector: 14, error_code, cr2, .. } => run.page_faults.push((error_code, cr2)),
        Event::Invlpg { address, .. } => run.invlpgs.push(address),
        Event::CrWrite { cr: 3, .. } => run.cr3_writes += 1,
        _ => {}
    })
    .unwrap();
    run
}

/// `syscall arch=x86-32`: process 1 runs at CPL 3 under two-level paging and makes each getpid, and its exit,
/// with `INT 0x80`; with `sysenter=1` with SYSENTER instead, each getpid returning with SYSEXIT.
#[test]
fn the_32_bit_null_system_call_enters_through_int_0x80_or_sysenter() {
    let int80 = record_user_run("syscall", &[("iterations", "20")]);
    assert_eq!((int80.int80, int80.syscalls, int80.sysrets), (21, 0, 0), "{int80:?}");
    assert!(int80.user_contexts >= 21, "{int80:?}");
    assert_eq!(int80.user_cr3s, [PAGE_DIRECTORY].into(), "{int80:?}");

    let sysenter = record_user_run("syscall", &[("iterations", "20"), ("sysenter", "1")]);
    assert_eq!((sysenter.int80, sysenter.syscalls, sysenter.sysrets), (0, 21, 20), "{sysenter:?}");
    assert!(sysenter.user_contexts >= 21, "{sysenter:?}");
}

/// `pgfault arch=x86-32`: each iteration is a user read of 0x60000000, a not-present page fault with error code
/// 4 (user, read) and CR2 the address read; the user's trap handler skips it.
#[test]
fn the_32_bit_page_fault_is_a_user_read_of_an_unmapped_address() {
    let run = record_user_run("pgfault", &[("iterations", "7")]);
    assert_eq!(run.page_faults, vec![(Some(4), Some(0x6000_0000)); 7], "{run:?}");
}

/// `demandzero arch=x86-32`: each page of a chunk is faulted in by a user read (error code 4, CR2 the page's
/// address in the mmap window from 0x48000000), and munmap invalidates each of them with INVLPG; the next chunk
/// reuses the same addresses.
#[test]
fn the_32_bit_demand_zero_faults_pages_in_and_unmaps_them() {
    let run = record_user_run("demandzero", &[("iterations", "70")]);
    let pages: Vec<u64> = (0..64).chain(0..6).map(|page| 0x4800_0000 + page * 4096).collect();
    let expected: Vec<(Option<u32>, Option<u64>)> = pages.iter().map(|page| (Some(4), Some(*page))).collect();
    assert_eq!(run.page_faults, expected, "{run:?}");
    assert_eq!(run.invlpgs, pages, "{run:?}");
}

/// Every workload built for x86-32 records a trace the checker accepts, ending in `ok` with the state an
/// unobserved run ends in; no page at or above 0xFC000000 is touched, and the page directory has no entry for the
/// top 64 MiB when the run ends.
#[test]
fn every_x86_32_workload_records_a_valid_trace_and_leaves_the_top_64_mib_alone() {
    let arch = [("arch".to_string(), "x86-32".to_string())];
    let mut built = Vec::new();
    for spec in virtlab_workloads::catalog() {
        let Ok(image) = virtlab_workloads::build(spec.name, &arch) else { continue };
        built.push(spec.name);
        let trace = record_workload(spec.name, &[("arch", "x86-32")]);
        check(Cursor::new(&trace)).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        let view = TraceView::open(&trace).unwrap();
        let ending = &view.footer().ending;
        assert_eq!((ending.reason, ending.exit_status), (EndReason::GuestExit, 0), "{}", spec.name);
        assert!(ending.serial.ends_with(b"ok\n"), "{}", spec.name);

        let mut machine = Machine::from_multiboot(&image.bytes, MachineConfig::default()).unwrap();
        let plain = machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000_000 }).unwrap();
        assert_eq!(ending.state_digest, plain.digest, "{}: observing changed the final state", spec.name);
        let directory = &machine.ram()[PAGE_DIRECTORY as usize..PAGE_DIRECTORY as usize + 4096];
        let top = (HYPERVISOR_HOLE >> 22) as usize * 4;
        assert!(directory[top..].iter().all(|&b| b == 0), "{}: the top 64 MiB is mapped", spec.name);
        view.for_each_event(|event| {
            if let Event::PageTouch { page, .. } = event {
                assert!(page < HYPERVISOR_HOLE, "{}: {event:?}", spec.name);
            }
        })
        .unwrap();
    }
    assert_eq!(built.len(), 24, "{built:?}");
}

/// `ctxswitch arch=x86-32`: parent and child run in two address spaces (process 1's page directory and slot 1's
/// at 0x260000), and each of the 2 × 10 yields switches CR3 to the other one.
#[test]
fn the_32_bit_context_switch_alternates_between_two_address_spaces() {
    let run = record_user_run("ctxswitch", &[("iterations", "10")]);
    assert_eq!(run.user_cr3s, [PAGE_DIRECTORY, 0x26_0000].into(), "{run:?}");
    // Start-up loads CR3 once; each of the 20 yields switches; after the child's last yield the parent waits while
    // the child is still runnable (a switch to it), and the child's exit switches back.
    assert_eq!(run.cr3_writes, 1 + 20 + 2, "{run:?}");
}

/// `cow arch=x86-32 pages=2 iterations=2`: the parent's two pages are faulted in by writes (error code 6); in each
/// iteration the child's writes to the shared pages are copy-on-write faults (error code 7) that copy (through the
/// kernel's KMAP page, invalidated first), each followed by an INVLPG of the page, its exit unmaps both pages (two more INVLPGs), and the parent's writes are
/// copy-on-write faults of the last sharer: no copy, no INVLPG.
#[test]
fn the_32_bit_copy_on_write_fork_copies_for_the_child_and_not_for_the_last_sharer() {
    let run = record_user_run("cow", &[("iterations", "2"), ("pages", "2")]);
    let (first, second) = (0x4800_0000u64, 0x4800_1000u64);
    let write = |code, page| (Some(code), Some(page));
    let mut faults = vec![write(6, first), write(6, second)];
    let mut invlpgs = Vec::new();
    for _ in 0..2 {
        faults.extend([write(7, first), write(7, second), write(7, first), write(7, second)]);
        // Each copy maps its new frame at the kernel's KMAP page (0x3FE000) first.
        invlpgs.extend([KMAP, first, KMAP, second, first, second]);
    }
    assert_eq!(run.page_faults, faults, "{run:?}");
    assert_eq!(run.invlpgs, invlpgs, "{run:?}");
}
