//! The x86-32 builds of the catalog (`arch=x86-32`), recorded on the reference machine: what the trace says
//! about the mode the kernel ran in, the paging it used, and where it did not go.

mod common;

use common::record_workload;
use virtlab_traces::{CodeMode, Event, PageSize, PagingMode, TraceView};

/// The lowest address of the top 64 MiB, which the 32-bit kernel must never touch (workloads/README.md).
const HYPERVISOR_HOLE: u64 = 0xFC00_0000;
const PAGE_DIRECTORY: u64 = 0x20_2000;

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
