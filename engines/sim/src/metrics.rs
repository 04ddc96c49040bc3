//! The one metrics schema every engine fills.
//!
//! Cycles are kept in millicycles (1/1000 cycle) so that fractional primitive costs (a cycles-per-instruction of
//! 0.25) add up exactly and identically on every run; [`Metrics::cycles`] converts at the end.

use std::collections::BTreeMap;

use crate::primitive::Primitive;
use virtlab_traces::fasthash::FastMap;

/// Why control left the guest (a VM exit, a trap into a software monitor, a fault into the hypervisor).
///
/// Reasons that hardware virtualization also has carry KVM's VMX name in lower case; the others are the software
/// monitors' own traps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitReason {
    /// A guest exception the monitor intercepts and reflects (#DE, a true #PF, …).
    ExceptionNmi,
    ExternalInterrupt,
    Cpuid,
    Hlt,
    Invlpg,
    Rdtsc,
    Rdpmc,
    CrAccess,
    DrAccess,
    IoInstruction,
    MsrRead,
    MsrWrite,
    GdtrIdtr,
    LdtrTr,
    Wbinvd,
    Xsetbv,
    /// Nested paging: the first touch of a guest-physical page the host has not mapped yet.
    EptViolation,
    /// Nested paging: an access to an MMIO region (KVM marks those EPT entries misconfigured on purpose).
    EptMisconfig,
    /// CLI or STI trapping in a deprivileged kernel.
    InterruptFlag,
    /// SYSCALL, SYSRET or INT n entering the monitor instead of the guest kernel.
    SystemCall,
    /// IRET entering the monitor.
    Iret,
    Swapgs,
    /// A shadow page-table miss the guest never sees (a hidden fault).
    ShadowPageFault,
    /// A write to a write-protected (traced) guest page-table page.
    TracingFault,
    /// A load or store to a device region that software monitors protect.
    Mmio,
    /// A privileged instruction outside the lab's named list; the catalog never produces one.
    PrivilegedInstruction,
}

impl ExitReason {
    pub const COUNT: usize = 26;
    pub const ALL: [ExitReason; ExitReason::COUNT] = [
        ExitReason::ExceptionNmi,
        ExitReason::ExternalInterrupt,
        ExitReason::Cpuid,
        ExitReason::Hlt,
        ExitReason::Invlpg,
        ExitReason::Rdtsc,
        ExitReason::Rdpmc,
        ExitReason::CrAccess,
        ExitReason::DrAccess,
        ExitReason::IoInstruction,
        ExitReason::MsrRead,
        ExitReason::MsrWrite,
        ExitReason::GdtrIdtr,
        ExitReason::LdtrTr,
        ExitReason::Wbinvd,
        ExitReason::Xsetbv,
        ExitReason::EptViolation,
        ExitReason::EptMisconfig,
        ExitReason::InterruptFlag,
        ExitReason::SystemCall,
        ExitReason::Iret,
        ExitReason::Swapgs,
        ExitReason::ShadowPageFault,
        ExitReason::TracingFault,
        ExitReason::Mmio,
        ExitReason::PrivilegedInstruction,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::ExceptionNmi => "exception_nmi",
            ExitReason::ExternalInterrupt => "external_interrupt",
            ExitReason::Cpuid => "cpuid",
            ExitReason::Hlt => "hlt",
            ExitReason::Invlpg => "invlpg",
            ExitReason::Rdtsc => "rdtsc",
            ExitReason::Rdpmc => "rdpmc",
            ExitReason::CrAccess => "cr_access",
            ExitReason::DrAccess => "dr_access",
            ExitReason::IoInstruction => "io_instruction",
            ExitReason::MsrRead => "msr_read",
            ExitReason::MsrWrite => "msr_write",
            ExitReason::GdtrIdtr => "gdtr_idtr",
            ExitReason::LdtrTr => "ldtr_tr",
            ExitReason::Wbinvd => "wbinvd",
            ExitReason::Xsetbv => "xsetbv",
            ExitReason::EptViolation => "ept_violation",
            ExitReason::EptMisconfig => "ept_misconfig",
            ExitReason::InterruptFlag => "interrupt_flag",
            ExitReason::SystemCall => "system_call",
            ExitReason::Iret => "iret",
            ExitReason::Swapgs => "swapgs",
            ExitReason::ShadowPageFault => "shadow_page_fault",
            ExitReason::TracingFault => "tracing_fault",
            ExitReason::Mmio => "mmio",
            ExitReason::PrivilegedInstruction => "privileged_instruction",
        }
    }
}

/// What the cycles were spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CycleCause {
    /// Guest instructions at native speed (directly executed or IDENT-translated).
    GuestInstructions,
    /// The hardware's own cost of native transitions and slow instructions: SYSCALL, exception delivery, IRET,
    /// serializing control-register writes, TLB fills.
    NativeTransitions,
    /// Time a device access takes on the bus (the POST port, MMIO registers).
    Devices,
    /// Entering and leaving the monitor: software traps, VM exits and entries, VMCS accesses.
    Exits,
    /// Decoding and emulating instructions in the monitor after an exit.
    Emulation,
    /// Device emulation in the monitor, and exits to a user-space device model.
    DeviceEmulation,
    /// Reflecting exceptions, interrupts and system calls into the guest (building its frames, injecting).
    Reflection,
    /// The hybrid monitor's interpreter.
    Interpretation,
    /// The binary translator.
    Translation,
    /// Running translated code beyond its IDENT instructions: indirect-branch lookups, in-TC emulation,
    /// continuations.
    TranslatedCode,
    /// Callouts from translated code into the monitor.
    Callouts,
    /// Shadow page tables: fills, root switches, invalidations, propagation of traced writes.
    ShadowPaging,
    /// Nested paging: EPT violation handling.
    NestedPaging,
    /// Paravirtual hypercalls and the hypervisor's validation of page-table updates.
    Hypercalls,
    /// Paravirtual page-table switches between the guest's user and kernel tables (x86-64).
    PageTableSwitches,
    /// The per-element work of REP string instructions (page copies and clears).
    StringOperations,
    /// Page walks that refill the TLB after a first touch in a TLB epoch.
    TlbFills,
}

impl CycleCause {
    pub const COUNT: usize = 17;
    pub const ALL: [CycleCause; CycleCause::COUNT] = [
        CycleCause::GuestInstructions,
        CycleCause::NativeTransitions,
        CycleCause::Devices,
        CycleCause::Exits,
        CycleCause::Emulation,
        CycleCause::DeviceEmulation,
        CycleCause::Reflection,
        CycleCause::Interpretation,
        CycleCause::Translation,
        CycleCause::TranslatedCode,
        CycleCause::Callouts,
        CycleCause::ShadowPaging,
        CycleCause::NestedPaging,
        CycleCause::Hypercalls,
        CycleCause::PageTableSwitches,
        CycleCause::StringOperations,
        CycleCause::TlbFills,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CycleCause::GuestInstructions => "guest_instructions",
            CycleCause::NativeTransitions => "native_transitions",
            CycleCause::Devices => "devices",
            CycleCause::Exits => "exits",
            CycleCause::Emulation => "emulation",
            CycleCause::DeviceEmulation => "device_emulation",
            CycleCause::Reflection => "reflection",
            CycleCause::Interpretation => "interpretation",
            CycleCause::Translation => "translation",
            CycleCause::TranslatedCode => "translated_code",
            CycleCause::Callouts => "callouts",
            CycleCause::ShadowPaging => "shadow_paging",
            CycleCause::NestedPaging => "nested_paging",
            CycleCause::Hypercalls => "hypercalls",
            CycleCause::PageTableSwitches => "page_table_switches",
            CycleCause::StringOperations => "string_operations",
            CycleCause::TlbFills => "tlb_fills",
        }
    }
}

/// Xen's hypercalls (Barham et al., SOSP 2003; Xen's public `xen.h` names), as the paravirt engine issues them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hypercall {
    /// Batched page-table updates, validated entry by entry.
    MmuUpdate,
    /// Extended MMU operations: new page-table base, INVLPG, TLB flush, LDT.
    MmuextOp,
    SetTrapTable,
    SetGdt,
    /// The kernel stack for ring transitions (what LTR and the TSS give a native kernel).
    StackSwitch,
    SetSegmentBase,
    /// Registering the system-call entry points (what the STAR/LSTAR/SFMASK MSRs give a native kernel).
    SetCallbacks,
    FpuTaskswitch,
    /// Block until an event arrives (HLT).
    SchedOp,
    ConsoleIo,
    PhysdevOp,
    /// Return from the kernel to user mode or from an exception (x86-64 guests).
    Iret,
}

impl Hypercall {
    pub const COUNT: usize = 12;
    pub const ALL: [Hypercall; Hypercall::COUNT] = [
        Hypercall::MmuUpdate,
        Hypercall::MmuextOp,
        Hypercall::SetTrapTable,
        Hypercall::SetGdt,
        Hypercall::StackSwitch,
        Hypercall::SetSegmentBase,
        Hypercall::SetCallbacks,
        Hypercall::FpuTaskswitch,
        Hypercall::SchedOp,
        Hypercall::ConsoleIo,
        Hypercall::PhysdevOp,
        Hypercall::Iret,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hypercall::MmuUpdate => "mmu_update",
            Hypercall::MmuextOp => "mmuext_op",
            Hypercall::SetTrapTable => "set_trap_table",
            Hypercall::SetGdt => "set_gdt",
            Hypercall::StackSwitch => "stack_switch",
            Hypercall::SetSegmentBase => "set_segment_base",
            Hypercall::SetCallbacks => "set_callbacks",
            Hypercall::FpuTaskswitch => "fpu_taskswitch",
            Hypercall::SchedOp => "sched_op",
            Hypercall::ConsoleIo => "console_io",
            Hypercall::PhysdevOp => "physdev_op",
            Hypercall::Iret => "iret",
        }
    }
}

/// What the binary translator did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TranslationStats {
    /// Translation units (CCFs) created, retranslations included.
    pub blocks: u64,
    pub instructions: u64,
    pub ident: u64,
    pub non_ident: u64,
    /// Bytes of translated code in the translation cache.
    pub tc_bytes: u64,
    /// Continuations patched into direct jumps.
    pub chain_links: u64,
    /// Executions that went through the indirect-branch lookup.
    pub indirect_lookups: u64,
    /// Executions that called out of the translation cache into the monitor.
    pub callouts: u64,
    /// Executions of privileged or sensitive instructions emulated inside the translation cache.
    pub in_tc_emulations: u64,
    /// Executions of calls from translated code to an in-TC monitor helper (port I/O, page-table writes).
    pub helper_calls: u64,
    /// CCFs translated again because adaptive BT found an instruction guilty of repeated tracing faults.
    pub retranslations: u64,
}

/// The shadow page tables' work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Shadow misses the monitor filled without the guest seeing them.
    pub hidden_faults: u64,
    /// Page faults the guest's own tables cause, forwarded to the guest.
    pub true_faults: u64,
    /// Shadow roots switched on a guest CR3 write.
    pub root_switches: u64,
    /// Shadow entries dropped (INVLPG, writes to traced page tables, flushes).
    pub invalidations: u64,
    /// Guest page-table pages write-protected when a shadow was first built from them (each time one was).
    pub traced_pages: u64,
    /// Guest page-table pages that stopped being traced because no shadow used them any more.
    pub untraced_pages: u64,
    /// Page-table writes that did not trap: no shadow used the page (or it was out of sync).
    pub untraced_writes: u64,
    /// Traced writes propagated into a shadow (one per shadow of the page the write covered).
    pub shadow_updates: u64,
    /// Leaf tables that went out of sync (`monitor.unsync_leaf_tables`), and re-synchronizations of them.
    pub unsynced_tables: u64,
    pub resyncs: u64,
    /// Pages the monitor stopped shadowing after a burst of writes (`monitor.write_flood_threshold`).
    pub write_floods: u64,
}

/// The mechanisms' own counts, beneath the exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MechanismStats {
    /// VMCS fields read and written by the exit handlers (first-generation VT-x exit handling).
    pub vmcs_reads: u64,
    pub vmcs_writes: u64,
    /// Guest page-table entries the monitor read in software (shadow fills, classifying page faults, fetching
    /// an exiting instruction).
    pub guest_walk_references: u64,
    /// Memory references of the processor's own page walks: TLB fills (nested ones two-dimensional).
    pub walk_references: u64,
    /// TLB fills after first touches, as the trace records them.
    pub tlb_fills: u64,
    /// TLB flushes a mechanism adds (VM transitions without VPID, paravirt page-table switches), and the pages
    /// refilled after them.
    pub tlb_flushes: u64,
    pub tlb_refills: u64,
}

/// Where the guest kernel ran and what the monitor's self-protection cost (`crate::protection`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtectionStats {
    /// The ring the guest kernel ran in; `None` when the monitor interpreted it.
    pub kernel_ring: Option<u8>,
    /// The lowest address of the monitor's area when segment limits guard it.
    pub monitor_base: Option<u64>,
    /// Segment-register loads that went through the monitor's copies of the guest's descriptors.
    pub shadow_descriptor_loads: u64,
    /// First touches (one per page per TLB epoch, what the trace records) of pages in the monitor's area: accesses
    /// beyond a truncated segment limit, each a #GP the monitor emulates.
    pub monitor_area_touches: u64,
    /// Switches between the guest kernel's and guest user's page tables (a ring-3 kernel).
    pub page_table_switches: u64,
    /// System calls that went through the fast trap gate without entering the monitor.
    pub fast_system_calls: u64,
}

/// A place where the guest would see something a native machine would not show it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Finding {
    /// What goes wrong, for example `popf_ignores_if` or `sgdt_reveals_monitor`.
    pub kind: &'static str,
    /// Guest address of the instruction.
    pub address: u64,
    pub count: u64,
}

/// How a guest instruction handed control to the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteCause {
    Exit(ExitReason),
    /// Translated code called out to the monitor for an instruction that would exit for this reason.
    Callout(ExitReason),
    Hypercall(Hypercall),
}

impl SiteCause {
    /// `exit:cr_access`, `callout:io_instruction`, `hypercall:mmu_update`.
    pub fn name(self) -> String {
        match self {
            SiteCause::Exit(reason) => format!("exit:{}", reason.name()),
            SiteCause::Callout(reason) => format!("callout:{}", reason.name()),
            SiteCause::Hypercall(kind) => format!("hypercall:{}", kind.name()),
        }
    }
}

/// Exits, callouts and hypercalls attributed to one guest instruction address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub address: u64,
    pub cause: SiteCause,
    pub count: u64,
}

/// Everything one engine measured on one trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub instructions_user: u64,
    pub instructions_kernel: u64,
    pub exits: [u64; ExitReason::COUNT],
    /// Guest instructions the monitor emulated (after a trap) or interpreted.
    pub emulated_instructions: u64,
    pub translation: TranslationStats,
    pub hypercalls: [u64; Hypercall::COUNT],
    /// Page-table updates that travelled in `mmu_update` batches (one batch per `mmu_update` hypercall).
    pub page_table_updates_batched: u64,
    pub shadow: ShadowStats,
    pub mechanism: MechanismStats,
    pub protection: ProtectionStats,
    pub millicycles: [u64; CycleCause::COUNT],
    /// The same millicycles, by the profile primitive that priced them.
    pub by_primitive: [u64; Primitive::COUNT],
    holes: BTreeMap<(&'static str, u64), u64>,
    detectable: BTreeMap<(&'static str, u64), u64>,
    sites: FastMap<(u64, SiteCause), u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            instructions_user: 0,
            instructions_kernel: 0,
            exits: [0; ExitReason::COUNT],
            emulated_instructions: 0,
            translation: TranslationStats::default(),
            hypercalls: [0; Hypercall::COUNT],
            page_table_updates_batched: 0,
            shadow: ShadowStats::default(),
            mechanism: MechanismStats::default(),
            protection: ProtectionStats::default(),
            millicycles: [0; CycleCause::COUNT],
            by_primitive: [0; Primitive::COUNT],
            holes: BTreeMap::new(),
            detectable: BTreeMap::new(),
            sites: FastMap::default(),
        }
    }
}

impl Metrics {
    pub fn instructions(&self) -> u64 {
        self.instructions_user + self.instructions_kernel
    }

    /// Record one exit at a guest address.
    pub fn exit(&mut self, reason: ExitReason, address: u64) {
        self.exits_at(reason, address, 1);
    }

    /// Record `count` exits at a guest address.
    pub fn exits_at(&mut self, reason: ExitReason, address: u64, count: u64) {
        self.exits[reason as usize] += count;
        *self.sites.entry((address, SiteCause::Exit(reason))).or_insert(0) += count;
    }

    /// Record one callout from translated code at a guest address.
    pub fn callout(&mut self, reason: ExitReason, address: u64) {
        self.callouts_at(reason, address, 1);
    }

    /// Record `count` callouts at a guest address.
    pub fn callouts_at(&mut self, reason: ExitReason, address: u64, count: u64) {
        self.translation.callouts += count;
        *self.sites.entry((address, SiteCause::Callout(reason))).or_insert(0) += count;
    }

    /// Attribute one hypercall (already counted with [`Metrics::hypercall`]) to a guest address.
    pub fn hypercall_site(&mut self, kind: Hypercall, address: u64) {
        *self.sites.entry((address, SiteCause::Hypercall(kind))).or_insert(0) += 1;
    }

    pub fn exits_by(&self, reason: ExitReason) -> u64 {
        self.exits[reason as usize]
    }

    pub fn exits_total(&self) -> u64 {
        self.exits.iter().sum()
    }

    pub fn hypercall(&mut self, kind: Hypercall) {
        self.hypercalls[kind as usize] += 1;
    }

    pub fn hypercalls_by(&self, kind: Hypercall) -> u64 {
        self.hypercalls[kind as usize]
    }

    /// Charge `millicycles` to `cause`, priced by `primitive`.
    pub fn charge(&mut self, cause: CycleCause, primitive: Primitive, millicycles: u64) {
        self.millicycles[cause as usize] += millicycles;
        self.by_primitive[primitive as usize] += millicycles;
    }

    /// Cycles priced by one primitive, rounded.
    pub fn cycles_by(&self, primitive: Primitive) -> u64 {
        (self.by_primitive[primitive as usize] + 500) / 1000
    }

    pub fn hole(&mut self, kind: &'static str, address: u64, count: u64) {
        *self.holes.entry((kind, address)).or_insert(0) += count;
    }

    pub fn detectable(&mut self, kind: &'static str, address: u64, count: u64) {
        *self.detectable.entry((kind, address)).or_insert(0) += count;
    }

    /// Cycles in total, rounded to the nearest cycle.
    pub fn cycles(&self) -> u64 {
        (self.millicycles.iter().sum::<u64>() + 500) / 1000
    }

    /// Cycles spent on one cause, rounded.
    pub fn cycles_for(&self, cause: CycleCause) -> u64 {
        (self.millicycles[cause as usize] + 500) / 1000
    }

    pub fn holes(&self) -> Vec<Finding> {
        findings(&self.holes)
    }

    pub fn detectable_events(&self) -> Vec<Finding> {
        findings(&self.detectable)
    }

    /// The `limit` guest addresses with the most exits, callouts and hypercalls, most first; ties by address.
    pub fn top_sites(&self, limit: usize) -> Vec<Site> {
        let mut sites: Vec<Site> =
            self.sites.iter().map(|(&(address, cause), &count)| Site { address, cause, count }).collect();
        sites.sort_by(|a, b| b.count.cmp(&a.count).then(a.address.cmp(&b.address)).then(a.cause.cmp(&b.cause)));
        sites.truncate(limit);
        sites
    }
}

fn findings(map: &BTreeMap<(&'static str, u64), u64>) -> Vec<Finding> {
    map.iter().map(|(&(kind, address), &count)| Finding { kind, address, count }).collect()
}
