//! The guest's physical memory map and its user address-space layout. Physical memory is identity
//! mapped for the kernel, so every kernel address below is both physical and virtual.

/// Where the Multiboot header, and so the image, starts.
pub const LOAD_ADDRESS: u64 = crate::machine::MACHINE.load_address;
/// Size of the Multiboot header with the a.out-kludge address fields.
pub const MULTIBOOT_HEADER_BYTES: u64 = 32;
/// The GDT lives in the image, right after the header: the 32-bit stub loads it before paging.
pub const GDT_ADDRESS: u64 = LOAD_ADDRESS + MULTIBOOT_HEADER_BYTES;
/// Null, kernel code, kernel data, 32-bit user code slot (unused), user data, user code, TSS (2 slots).
pub const GDT_BYTES: u64 = 8 * 8;
/// GDTR image: 2-byte limit and 8-byte base, readable by both 32-bit and 64-bit LGDT.
pub const GDT_POINTER_ADDRESS: u64 = GDT_ADDRESS + GDT_BYTES;
/// Multiboot entry point: the 32-bit boot stub.
pub const BOOT_STUB_ADDRESS: u64 = GDT_POINTER_ADDRESS + 16;
/// The 64-bit kernel (code, then read-only data and user programs) starts on the next page.
pub const KERNEL_CODE_ADDRESS: u64 = 0x10_1000;
/// The loaded image must end below the kernel's fixed data structures.
pub const IMAGE_LIMIT: u64 = 0x20_0000;

/// Kernel page tables, built by the boot stub: one PML4, one PDPT, a page directory mapping the
/// first GiB with 2 MiB pages, a page table mapping the first 2 MiB with 4 KiB pages (page 0 is left
/// unmapped to catch null pointers), and a page directory for the MMIO test region.
pub const KERNEL_PML4: u64 = 0x20_0000;
pub const KERNEL_PDPT: u64 = 0x20_1000;
pub const KERNEL_PD_LOW: u64 = 0x20_2000;
pub const KERNEL_PT_LOW: u64 = 0x20_3000;
pub const KERNEL_PD_MMIO: u64 = 0x20_4000;

/// IDT: exceptions 0..31 and the remapped PIC vectors 32..47.
pub const IDT_ADDRESS: u64 = 0x20_5000;
pub const IDT_ENTRIES: u64 = 48;
pub const TSS_ADDRESS: u64 = 0x20_5400;
pub const TSS_BYTES: u64 = 104;

/// Kernel variables, one quadword each.
pub const KERNEL_VARIABLES: u64 = 0x20_5800;
/// Pointer to the running process's slot, 0 while no process exists.
pub const VAR_CURRENT_PROCESS: u64 = KERNEL_VARIABLES;
/// Top of the running process's kernel stack, read by the SYSCALL entry.
pub const VAR_KERNEL_STACK_TOP: u64 = KERNEL_VARIABLES + 8;
/// The user RSP, parked by the SYSCALL entry while it switches stacks.
pub const VAR_USER_RSP_SCRATCH: u64 = KERNEL_VARIABLES + 16;
/// Free page frames: how many entries of `FRAME_STACK` hold one.
pub const VAR_FREE_FRAMES: u64 = KERNEL_VARIABLES + 24;
/// Timer interrupts taken since start-up.
pub const VAR_TIMER_TICKS: u64 = KERNEL_VARIABLES + 32;
/// Process id the next fork hands out.
pub const VAR_NEXT_PID: u64 = KERNEL_VARIABLES + 40;
/// IDTR image (limit, base) for LIDT.
pub const VAR_IDT_POINTER: u64 = KERNEL_VARIABLES + 48;
/// The kernel's own memory-management counters (`counters=1` prints them when the run ends):
/// page-table pages allocated, present entries shared by fork, copy-on-write faults, pages those faults copied,
/// and pages zero-filled on demand.
pub const VAR_COUNT_PAGE_TABLES: u64 = KERNEL_VARIABLES + 64;
pub const VAR_COUNT_PTES_SHARED: u64 = KERNEL_VARIABLES + 72;
pub const VAR_COUNT_COW_FAULTS: u64 = KERNEL_VARIABLES + 80;
pub const VAR_COUNT_PAGES_COPIED: u64 = KERNEL_VARIABLES + 88;
pub const VAR_COUNT_ZERO_FILLS: u64 = KERNEL_VARIABLES + 96;
/// System-call table: one handler address per call number.
pub const SYSCALL_TABLE: u64 = 0x20_5C00;

/// Process table.
pub const PROCESS_TABLE: u64 = 0x20_6000;
pub const PROCESS_SLOTS: u64 = 8;
pub const PROCESS_SLOT_BYTES: u64 = 256;
pub const PROCESS_TABLE_END: u64 = PROCESS_TABLE + PROCESS_SLOTS * PROCESS_SLOT_BYTES;

/// Stack the kernel starts on and the kernel-mode workloads run on.
pub const BOOT_STACK_TOP: u64 = 0x20_C000;
/// One kernel stack per process slot.
pub const KERNEL_STACKS: u64 = 0x21_0000;
pub const KERNEL_STACK_BYTES: u64 = 0x4000;
/// The stack of free page frames: one 32-bit frame address per pool frame, like the free lists a real kernel keeps
/// outside the pages themselves (a free page is never written until it is handed out again).
pub const FRAME_STACK: u64 = KERNEL_STACKS + PROCESS_SLOTS * KERNEL_STACK_BYTES;
/// One 32-bit reference count per pool frame: the address spaces that map it (copy-on-write sharing).
pub const FRAME_REFCOUNTS: u64 = FRAME_STACK + FRAME_POOL_FRAMES * 4;
/// Everything from the end of the loaded image up to here is zeroed by the Multiboot loader.
pub const BSS_END: u64 = FRAME_REFCOUNTS + FRAME_POOL_FRAMES * 4;

/// Page frames handed out for process page tables and user pages.
pub const FRAME_POOL_START: u64 = 0x40_0000;
pub const FRAME_POOL_END: u64 = 0x240_0000;
pub const FRAME_POOL_FRAMES: u64 = (FRAME_POOL_END - FRAME_POOL_START) / 4096;

/// User address space: one GiB reached through PML4 slot 1, so the kernel's slot 0 is shared by all.
pub const USER_BASE: u64 = 0x80_0000_0000;
pub const USER_END: u64 = 0x80_4000_0000;
/// The user program is copied here, read-only.
pub const USER_CODE: u64 = USER_BASE;
/// The stack is demand-zero, USER_STACK_PAGES pages below USER_STACK_TOP.
pub const USER_STACK_TOP: u64 = USER_BASE + 0x40_0000;
pub const USER_STACK_PAGES: u64 = 16;
/// Anonymous mappings are placed upward from here.
pub const USER_MMAP_BASE: u64 = USER_BASE + 0x1000_0000;
/// Anonymous mappings a process can hold at once (its region table).
pub const MAX_REGIONS: u64 = 8;
/// Largest single mmap, in bytes.
pub const MMAP_MAX_BYTES: u64 = 16 << 20;
/// Largest single write, in bytes.
pub const WRITE_MAX_BYTES: u64 = 4096;

/// Page-table entry bits.
pub const PTE_PRESENT: u64 = 1;
pub const PTE_WRITABLE: u64 = 2;
pub const PTE_USER: u64 = 4;
/// Software bit (ignored by the hardware) of a present entry that fork write-protected: a write fault on it
/// copies the page, or makes it writable again for its last sharer.
pub const PTE_COPY_ON_WRITE: u64 = 1 << 9;

/// Process slot fields (byte offsets).
pub const PROC_STATE: i32 = 0;
pub const PROC_PID: i32 = 8;
pub const PROC_PARENT: i32 = 16;
pub const PROC_SAVED_RSP: i32 = 24;
pub const PROC_PML4: i32 = 32;
pub const PROC_USER_PD: i32 = 40;
pub const PROC_EXIT_STATUS: i32 = 48;
pub const PROC_MMAP_NEXT: i32 = 56;
pub const PROC_TRAP_HANDLER: i32 = 64;
pub const PROC_KERNEL_STACK_TOP: i32 = 72;
/// The region table: `MAX_REGIONS` pairs of (start, end) user addresses of anonymous mappings; start 0 is a free
/// slot. The stack's range is fixed and not in the table.
pub const PROC_REGIONS: i32 = 128;

/// Process states.
pub const STATE_FREE: i32 = 0;
pub const STATE_RUNNABLE: i32 = 1;
pub const STATE_WAITING: i32 = 2;
pub const STATE_ZOMBIE: i32 = 3;

/// Segment selectors.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// SYSRET derives the user selectors from this base: SS = base + 8, CS = base + 16 (RPL 3).
pub const SYSRET_SELECTOR_BASE: u16 = 0x18;
pub const USER_DATA_SELECTOR: u16 = 0x20 | 3;
pub const USER_CODE_SELECTOR: u16 = 0x28 | 3;
pub const TSS_SELECTOR: u16 = 0x30;

/// CR0 as the kernel runs: PG, WP, NE, ET, MP, PE.
pub const KERNEL_CR0: u32 = 0x8001_0033;
/// CR4 as the kernel runs: PAE only.
pub const KERNEL_CR4: u32 = 0x20;
