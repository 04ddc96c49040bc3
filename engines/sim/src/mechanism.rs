//! Carrying out a disposition: every mechanism's charges from the profile, in one place, and the actions on the
//! monitor's state (shadow page tables, the hypercall batch, nested paging, the TLB refills a mechanism causes).

use virtlab_traces::{Context, Event};

use crate::classify::StringWork;
use crate::engines::hw::vmcs_accesses;
use crate::metrics::{CycleCause, ExitReason, Hypercall};
use crate::primitive::Primitive as P;
use crate::protection::Protection;
use crate::replay::{KernelCode, Replay};
use crate::shadow::{paging_bits_changed, ShadowMmu, ShadowPolicy, Touch};
use crate::strategy::{Action, Disposition, Handling, Mechanism, TraceHandling};
use crate::tlb::Refills;
use virtlab_traces::fasthash::FastSet;

/// Updates in one `mmu_update` hypercall at most (Barham et al., SOSP 2003).
pub const MAX_BATCH: u64 = 2048;

/// The monitor's state an engine keeps, and how its mechanisms reach the hardware.
pub(crate) struct Monitor {
    shadow: Option<ShadowMmu>,
    /// Guest-physical frames the host has mapped (nested paging).
    nested: Option<FastSet<u64>>,
    batch: Option<Batch>,
    /// A paravirtual guest kernel's width: its hypercalls are SYSCALLs (64-bit) or INT traps (32-bit).
    pv_bits64: bool,
    /// TLB refills after flushes the mechanisms add; `None` when none of them flushes.
    refills: Option<Refills>,
    /// Whether VM transitions keep the guest's translations (VPID).
    vpid: bool,
    user_space_devices: bool,
    protection: Protection,
}

#[derive(Debug, Default)]
struct Batch {
    pending: u64,
    /// Guest address of the last queued update, which the batch flushed at the end of the trace is charged to.
    last_update: u64,
}

/// Which parts of the monitor's state an engine has.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MonitorParts {
    pub shadow: bool,
    pub nested: bool,
    pub batch: bool,
    pub pv_bits64: bool,
    /// The engine's mechanisms flush the TLB (VM transitions without VPID, paravirt page-table switches).
    pub flushes: bool,
    pub user_space_devices: bool,
    /// Where the guest kernel runs and what guards the monitor.
    pub protection: Protection,
}

impl Monitor {
    pub fn new(parts: MonitorParts, profile: &crate::profile::Profile) -> Monitor {
        let policy = ShadowPolicy {
            unsync_leaf_tables: profile.flag(P::UnsyncLeafTables),
            write_flood_threshold: profile.count(P::WriteFloodThreshold),
        };
        let vpid = profile.flag(P::Vpid);
        Monitor {
            shadow: parts.shadow.then(|| ShadowMmu::new(policy)),
            nested: parts.nested.then(FastSet::default),
            batch: parts.batch.then(Batch::default),
            pv_bits64: parts.pv_bits64,
            refills: parts.flushes.then(|| Refills::new(profile.count(P::TlbEntries))),
            vpid,
            user_space_devices: parts.user_space_devices,
            protection: parts.protection,
        }
    }

    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// A block executed: the refill of its code page after a flush the mechanisms added.
    #[inline(always)]
    pub fn executed(&mut self, r: &mut Replay, block: usize) {
        if let Some(refills) = self.refills.as_mut() {
            let page = r.trace.facts[block].address & !0xfff;
            if let Some(levels) = refills.executed(page, r.paging_depth()) {
                refill(r, levels);
            }
        }
    }

    /// Follow the guest's context.
    pub fn context(&mut self, context: &Context) {
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.set_paging(context.paging);
            if context.paging != virtlab_traces::PagingMode::Disabled {
                shadow.follow(context.cr3);
            }
        }
    }

    /// After the last event: the batch still queued goes to Xen.
    pub fn finish(&mut self, r: &mut Replay) {
        if let Some(batch) = self.batch.as_mut() {
            let site = batch.last_update;
            flush_batch(r, batch, site, self.pv_bits64);
        }
    }

    // Inlined into the one call out of the event loop for every event but a block execution.
    #[inline(always)]
    pub fn apply(
        &mut self,
        r: &mut Replay,
        disposition: Disposition,
        event: &Event,
        kernel_code: &mut Option<Box<dyn KernelCode + '_>>,
    ) {
        let at = event.at().unwrap_or(0);
        // The trace's own TLB epoch ends at a CR3 load: the refills that follow are the native ones it records.
        if let (Event::CrWrite { cr: 3, .. }, Some(refills)) = (event, self.refills.as_mut()) {
            refills.native_flush();
        }
        match disposition.mechanism {
            Mechanism::Native | Mechanism::GuestMode | Mechanism::ShadowDescriptor => self.native(r, event),
            Mechanism::Detectable(kind) => {
                self.native(r, event);
                let site = r.site(at);
                r.metrics.detectable(kind, site, 1);
            }
            Mechanism::Hole(kind) => {
                self.native(r, event);
                let site = r.site(at);
                r.metrics.hole(kind, site, 1);
            }
            Mechanism::Trap(reason) => trap_emulate(r, reason, at),
            Mechanism::Reflect(reason) => {
                r.exit(reason, at);
                r.pay(CycleCause::Exits, P::Trap, 1);
                r.pay(CycleCause::Reflection, P::Reflect, 1);
            }
            Mechanism::Interpreted | Mechanism::Translated(_) | Mechanism::SharedMemory | Mechanism::Elided => {}
            Mechanism::InterpretedTransfer | Mechanism::TranslatedTransfer => {
                r.pay(CycleCause::Reflection, P::Reflect, 1)
            }
            Mechanism::InterpretedEmulate => r.pay(CycleCause::Emulation, P::Emulate, 1),
            Mechanism::InterpretedDevice(reason) => r.exit(reason, at),
            Mechanism::InterpretedString => {
                if let Event::RepString { elements, .. } = *event {
                    r.pay(CycleCause::Interpretation, P::Interpret, elements);
                }
            }
            Mechanism::NestedWalk => self.nested_touch(r, event),
            Mechanism::Traced(handling) => self.page_table_write(r, handling, event, kernel_code),
            Mechanism::ShadowTouch(handling) => self.shadow_touch(r, handling, event),
            Mechanism::Hypercall(kind) => {
                let site = r.site(at);
                hypercall(r, kind, site, self.pv_bits64)
            }
            Mechanism::Bounce(reason) => {
                r.exit(reason, at);
                let (enter, leave) = if matches!(event, Event::Syscall { .. }) {
                    (P::Syscall, P::Sysret)
                } else {
                    (P::Exception, P::Iret)
                };
                r.pay(CycleCause::Exits, enter, 1);
                r.pay(CycleCause::Exits, P::Hypercall, 1);
                r.pay(CycleCause::Reflection, P::Reflect, 1);
                r.pay(CycleCause::Exits, leave, 1);
            }
            Mechanism::Queued => self.queue(r, at),
            Mechanism::Upcall => {
                r.exit(ExitReason::ExternalInterrupt, at);
                r.pay(CycleCause::Exits, P::Exception, 1);
                r.pay(CycleCause::Reflection, P::Upcall, 1);
            }
            Mechanism::VmExit(reason, handling) => self.vm_exit(r, reason, handling, at),
        }
        for &action in disposition.actions {
            self.action(r, action, event, at);
        }
    }

    fn action(&mut self, r: &mut Replay, action: Action, event: &Event, at: u32) {
        match action {
            Action::ShadowSwitch => {
                if let (Some(shadow), Event::CrWrite { new, .. }) = (self.shadow.as_mut(), event) {
                    let switch = shadow.switch(*new);
                    r.metrics.shadow.root_switches += 1;
                    r.metrics.shadow.traced_pages += u64::from(switch.newly_traced);
                    r.metrics.shadow.resyncs += switch.resynced;
                    r.pay(CycleCause::ShadowPaging, P::ShadowSwitch, 1);
                    r.pay(CycleCause::ShadowPaging, P::ShadowProtect, u64::from(switch.newly_traced));
                    r.pay(CycleCause::ShadowPaging, P::ResyncTable, switch.resynced);
                }
            }
            Action::ShadowInvalidate => {
                if let (Some(shadow), Event::Invlpg { address, .. }) = (self.shadow.as_mut(), event) {
                    let (dropped, resynced, untraced) = shadow.invlpg(*address);
                    r.metrics.shadow.invalidations += dropped;
                    r.metrics.shadow.resyncs += resynced;
                    r.metrics.shadow.untraced_pages += u64::from(untraced);
                    r.pay(CycleCause::ShadowPaging, P::ShadowInvalidate, 1);
                    r.pay(CycleCause::ShadowPaging, P::ResyncTable, resynced);
                }
            }
            Action::ShadowRebuild => {
                if let (Some(shadow), Event::CrWrite { cr, old, new, .. }) = (self.shadow.as_mut(), event) {
                    if paging_bits_changed(*cr, *old, *new) {
                        let (dropped, untraced) = shadow.flush();
                        r.metrics.shadow.invalidations += dropped;
                        r.metrics.shadow.untraced_pages += u64::from(untraced);
                        r.pay(CycleCause::ShadowPaging, P::ShadowInvalidate, dropped);
                    }
                }
            }
            Action::ClassifyFault => {
                if let Event::Exception { walk, .. } = event {
                    let levels = u64::from(walk.levels());
                    r.metrics.mechanism.guest_walk_references += levels;
                    r.pay(CycleCause::ShadowPaging, P::GuestWalkLevel, levels);
                }
            }
            Action::TrueFault => r.metrics.shadow.true_faults += 1,
            Action::Device => r.pay(CycleCause::DeviceEmulation, P::Device, 1),
            Action::UserSpaceDevice => {
                if self.user_space_devices {
                    r.pay(CycleCause::DeviceEmulation, P::UserSpaceExit, 1);
                }
            }
            Action::FlushBatch => {
                let site = r.site(at);
                if let Some(batch) = self.batch.as_mut() {
                    flush_batch(r, batch, site, self.pv_bits64);
                }
            }
            Action::PageTableSwitch => {
                r.metrics.protection.page_table_switches += 1;
                r.pay(CycleCause::PageTableSwitches, P::MovToCr, 1);
                if let Some(refills) = self.refills.as_mut() {
                    refills.flush();
                    r.metrics.mechanism.tlb_flushes += 1;
                }
            }
            Action::StackSwitch => {
                let site = r.site(at);
                hypercall(r, Hypercall::StackSwitch, site, self.pv_bits64)
            }
            Action::GuardCheck => {
                if let (Some(base), Event::PageTouch { page, .. }) = (self.protection.monitor_base(), event) {
                    if *page >= base {
                        r.metrics.protection.monitor_area_touches += 1;
                        let site = r.site(at);
                        r.metrics.detectable("access_beyond_truncated_segment", site, 1);
                        trap_emulate(r, ExitReason::ExceptionNmi, at);
                    }
                }
            }
            Action::FastSystemCall => r.metrics.protection.fast_system_calls += 1,
        }
    }

    /// The processor's own cost of what an event records.
    #[inline(always)]
    fn native(&mut self, r: &mut Replay, event: &Event) {
        let (cause, primitive) = match *event {
            Event::Syscall { .. } => (CycleCause::NativeTransitions, P::Syscall),
            Event::Sysret { .. } => (CycleCause::NativeTransitions, P::Sysret),
            Event::Exception { .. } | Event::Interrupt { .. } | Event::SoftwareInterrupt { .. } => {
                (CycleCause::NativeTransitions, P::Exception)
            }
            Event::Iret { .. } => (CycleCause::NativeTransitions, P::Iret),
            Event::CrWrite { .. } => (CycleCause::NativeTransitions, P::MovToCr),
            Event::MsrRead { .. } | Event::MsrWrite { .. } => (CycleCause::NativeTransitions, P::Msr),
            Event::Io { .. } => (CycleCause::Devices, P::PortIo),
            Event::Mmio { .. } => (CycleCause::Devices, P::Mmio),
            Event::Cpuid { .. } => (CycleCause::NativeTransitions, P::Cpuid),
            Event::Invlpg { .. } => (CycleCause::NativeTransitions, P::Invlpg),
            Event::DescriptorLoad { .. } => (CycleCause::NativeTransitions, P::DescriptorLoad),
            Event::Hlt { .. } => (CycleCause::NativeTransitions, P::Hlt),
            Event::PageTouch { page, walk, .. } => {
                self.tlb_fill(r, page, walk.levels());
                return;
            }
            Event::RepString { at, elements } => {
                rep_string(r, at, elements);
                return;
            }
            Event::Block(_) | Event::PartialBlock { .. } | Event::Context { .. } | Event::PageTableWrite { .. } => {
                return
            }
        };
        r.pay(cause, primitive, 1);
    }

    /// The processor's TLB fill after a first touch: one reference per table of the walk; a refill too when a
    /// flush the mechanisms added is pending.
    fn tlb_fill(&mut self, r: &mut Replay, page: u64, levels: u8) {
        r.metrics.mechanism.tlb_fills += 1;
        r.metrics.mechanism.walk_references += u64::from(levels);
        r.pay(CycleCause::TlbFills, P::WalkReference, u64::from(levels));
        if let Some(refills) = self.refills.as_mut() {
            if let Some(levels) = refills.touched(page, levels) {
                refill(r, levels);
            }
        }
    }

    fn vm_exit(&mut self, r: &mut Replay, reason: ExitReason, handling: Handling, at: u32) {
        r.exit(reason, at);
        let (reads, writes) = vmcs_accesses(reason, handling);
        r.metrics.mechanism.vmcs_reads += reads;
        r.metrics.mechanism.vmcs_writes += writes;
        r.pay(CycleCause::Exits, P::Exit, 1);
        r.pay(CycleCause::Exits, P::Entry, 1);
        r.pay(CycleCause::Exits, P::Vmread, reads);
        r.pay(CycleCause::Exits, P::Vmwrite, writes);
        if !self.vpid {
            // The original VMX architecture flushed the TLBs on every transition: the guest refills what it
            // touches after the entry.
            if let Some(refills) = self.refills.as_mut() {
                refills.flush();
                r.metrics.mechanism.tlb_flushes += 1;
            }
        }
        match handling {
            Handling::Emulate => {
                r.pay(CycleCause::Emulation, P::Emulate, 1);
                r.metrics.emulated_instructions += 1;
            }
            Handling::FetchDecodeEmulate => {
                // The handler reads the guest instruction through a software walk of the guest's tables.
                let levels = u64::from(r.paging_depth());
                r.metrics.mechanism.guest_walk_references += levels;
                r.pay(CycleCause::Emulation, P::GuestWalkLevel, levels);
                r.pay(CycleCause::Emulation, P::Decode, 1);
                r.pay(CycleCause::Emulation, P::Emulate, 1);
                r.metrics.emulated_instructions += 1;
            }
            Handling::Inject => r.pay(CycleCause::Reflection, P::Exception, 1),
            Handling::MapGuestPage => r.pay(CycleCause::NestedPaging, P::EptViolation, 1),
            Handling::ShadowFill | Handling::Halt => {}
        }
    }

    fn page_table_write(
        &mut self,
        r: &mut Replay,
        handling: TraceHandling,
        event: &Event,
        kernel_code: &mut Option<Box<dyn KernelCode + '_>>,
    ) {
        let (Some(shadow), &Event::PageTableWrite { at, gpa, level, old, new }) = (self.shadow.as_mut(), event) else {
            return;
        };
        if !r.paging() {
            return;
        }
        let write = shadow.write(gpa, level, old, new);
        let stats = &mut r.metrics.shadow;
        stats.untraced_pages += u64::from(write.untraced);
        if !write.traced {
            stats.untraced_writes += 1;
            return;
        }
        stats.shadow_updates += write.updates;
        stats.invalidations += write.invalidated;
        stats.unsynced_tables += u64::from(write.unsynced);
        stats.write_floods += u64::from(write.flooded);
        match handling {
            TraceHandling::Trap => trap_emulate(r, ExitReason::TracingFault, at),
            TraceHandling::VmExit => self.vm_exit(r, ExitReason::TracingFault, Handling::FetchDecodeEmulate, at),
            TraceHandling::Interpreter => {}
            TraceHandling::Adaptive => {
                let handled = kernel_code.as_mut().is_some_and(|code| r.kernel() && code.traced_write(r, at));
                if !handled {
                    trap_emulate(r, ExitReason::TracingFault, at);
                }
            }
        }
        r.pay(CycleCause::ShadowPaging, P::ShadowUpdate, write.updates);
        r.pay(CycleCause::ShadowPaging, P::ShadowInvalidate, write.invalidated);
    }

    fn shadow_touch(&mut self, r: &mut Replay, handling: TraceHandling, event: &Event) {
        let &Event::PageTouch { at, page, frame, walk, .. } = event else { return };
        self.tlb_fill(r, page, walk.levels());
        let Some(shadow) = self.shadow.as_mut().filter(|_| r.paging()) else { return };
        let Touch::HiddenFault { walk_levels, newly_traced } = shadow.touch(page, frame, walk) else { return };
        r.metrics.shadow.hidden_faults += 1;
        r.metrics.shadow.traced_pages += u64::from(newly_traced);
        r.metrics.mechanism.guest_walk_references += u64::from(walk_levels);
        match handling {
            TraceHandling::VmExit => self.vm_exit(r, ExitReason::ShadowPageFault, Handling::ShadowFill, at),
            TraceHandling::Interpreter => {}
            TraceHandling::Trap | TraceHandling::Adaptive => {
                r.exit(ExitReason::ShadowPageFault, at);
                r.pay(CycleCause::Exits, P::Trap, 1);
            }
        }
        r.pay(CycleCause::ShadowPaging, P::GuestWalkLevel, u64::from(walk_levels));
        r.pay(CycleCause::ShadowPaging, P::ShadowFill, 1);
        r.pay(CycleCause::ShadowPaging, P::ShadowProtect, u64::from(newly_traced));
    }

    /// Nested paging: the processor's fill is a two-dimensional walk, and a guest-physical frame the host has not
    /// mapped yet exits.
    fn nested_touch(&mut self, r: &mut Replay, event: &Event) {
        let &Event::PageTouch { at, page, frame, walk, .. } = event else { return };
        let guest_levels = u64::from(walk.levels());
        // Bhargava et al. (ASPLOS 2008): with n guest and m host levels a walk makes up to (n+1)(m+1)-1
        // references; a nested page-walk cache keeps the host translations of the guest's tables, leaving the
        // guest's own n and the host walk of the final guest-physical address (m).
        let host_levels = u64::from(r.paging_depth().max(4));
        let references = if r.costs.flag(P::NestedWalkCache) {
            guest_levels + host_levels
        } else {
            (guest_levels + 1) * (host_levels + 1) - 1
        };
        r.metrics.mechanism.tlb_fills += 1;
        r.metrics.mechanism.walk_references += references;
        r.pay(CycleCause::TlbFills, P::WalkReference, references);
        if let Some(refills) = self.refills.as_mut() {
            if let Some(levels) = refills.touched(page, walk.levels()) {
                refill(r, levels);
            }
        }
        if self.nested.as_mut().is_some_and(|mapped| mapped.insert(frame)) {
            self.vm_exit(r, ExitReason::EptViolation, Handling::MapGuestPage, at);
        }
    }

    fn queue(&mut self, r: &mut Replay, at: u32) {
        let site = r.site(at);
        let Some(batch) = self.batch.as_mut().filter(|_| r.paging()) else { return };
        batch.pending += 1;
        batch.last_update = site;
        r.metrics.page_table_updates_batched += 1;
        if batch.pending == MAX_BATCH {
            flush_batch(r, batch, site, self.pv_bits64);
        }
    }
}

/// A software monitor's trap, decode and emulation of one instruction.
fn trap_emulate(r: &mut Replay, reason: ExitReason, at: u32) {
    r.exit(reason, at);
    r.pay(CycleCause::Exits, P::Trap, 1);
    r.pay(CycleCause::Emulation, P::Decode, 1);
    r.pay(CycleCause::Emulation, P::Emulate, 1);
    r.metrics.emulated_instructions += 1;
}

/// A hypercall: the transition into Xen and back (SYSCALL/SYSRET for a 64-bit guest, whose kernel runs in ring
/// 3; INT/IRET for a 32-bit one in ring 1) and Xen's own work.
fn hypercall(r: &mut Replay, kind: Hypercall, site: u64, bits64: bool) {
    r.metrics.hypercall(kind);
    r.metrics.hypercall_site(kind, site);
    let (enter, leave) = if bits64 { (P::Syscall, P::Sysret) } else { (P::Exception, P::Iret) };
    r.pay(CycleCause::Hypercalls, enter, 1);
    r.pay(CycleCause::Hypercalls, P::Hypercall, 1);
    r.pay(CycleCause::Hypercalls, leave, 1);
}

/// Issue the queued updates as one `mmu_update`, charged to the guest instruction at `site`.
fn flush_batch(r: &mut Replay, batch: &mut Batch, site: u64, bits64: bool) {
    if batch.pending > 0 {
        hypercall(r, Hypercall::MmuUpdate, site, bits64);
        r.pay(CycleCause::Hypercalls, P::UpdateValidation, batch.pending);
        batch.pending = 0;
    }
}

/// One page refilled after a flush the mechanisms added.
fn refill(r: &mut Replay, levels: u8) {
    r.metrics.mechanism.tlb_refills += 1;
    r.metrics.mechanism.walk_references += u64::from(levels);
    r.pay(CycleCause::TlbFills, P::WalkReference, u64::from(levels));
}

/// One execution of a REP string instruction, as the bare processor runs it: a start-up, then the elements at
/// its string bandwidth (doubleword and quadword MOVS and STOS) or one by one (everything else).
fn rep_string(r: &mut Replay, at: u32, elements: u64) {
    let Some(rep) = r.rep_string(at) else { return };
    r.pay(CycleCause::StringOperations, P::RepStartup, 1);
    let bytes = elements.saturating_mul(u64::from(rep.element_bytes));
    let (rate, mc) = match rep.work {
        StringWork::Copy if rep.element_bytes >= 4 => {
            (P::RepMovsBytesPerCycle, bytes.saturating_mul(r.costs.per_byte(P::RepMovsBytesPerCycle)))
        }
        StringWork::Fill if rep.element_bytes >= 4 => {
            (P::RepStosBytesPerCycle, bytes.saturating_mul(r.costs.per_byte(P::RepStosBytesPerCycle)))
        }
        _ => (P::RepElement, elements.saturating_mul(r.costs.mc(P::RepElement))),
    };
    r.metrics.charge(CycleCause::StringOperations, rate, mc);
}
