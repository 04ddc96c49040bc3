//! `paravirt`: the trace replayed as if its kernel had been ported to Xen (Barham et al., SOSP 2003). Each
//! privileged operation becomes the hypercall a Xen kernel makes instead; page-table writes queue in `mmu_update`
//! batches of up to 2048 entries, flushed before a CR3 switch, an INVLPG or a TLB flush and when the kernel
//! returns to user mode (a batch must be visible before the mappings are used); virtual IF lives in shared
//! memory. A 32-bit guest kernel runs in ring 1 with a fast system-call handler that bypasses Xen; a 64-bit one
//! runs in ring 3 with separate user and kernel page tables, so every kernel entry and exit goes through Xen and
//! switches page tables (shared refs §7).

use virtlab_traces::{DescriptorLoad, Event};

use super::{MonitorCosts, PAGE_FAULT};
use crate::classify::{Op, Priced};
use crate::engine::{Engine, EngineError, GuestBits, Options, Run};
use crate::metrics::{CycleCause, ExitReason, Hypercall};
use crate::profile::{mc, Profile};
use crate::replay::{exit_reason_of, user_detectable, Effect, NativeCosts, OpPolicy, Plans, Replay, Session, Strategy};
use crate::trace::PreparedTrace;

/// Xen's limit on updates in one `mmu_update` call when building an address space.
pub const MAX_BATCH: u64 = 2048;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const POST_PORT: u16 = 0x80;
const SERIAL_PORTS: std::ops::RangeInclusive<u16> = 0x3f8..=0x3ff;

pub struct Paravirt;

impl Engine for Paravirt {
    fn name(&self) -> &'static str {
        "paravirt"
    }

    fn summary(&self) -> &'static str {
        "Xen-style paravirtualized kernel: hypercalls, batched page-table updates, event channels"
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let bits64 = match options.paravirt_guest_bits {
            GuestBits::Auto => trace.has_64_bit_code(),
            GuestBits::Bits32 => false,
            GuestBits::Bits64 => true,
        };
        let native = NativeCosts::new(profile);
        let monitor = MonitorCosts::new(profile);
        let p = &profile.paravirt;
        let costs = ParavirtCosts {
            hypercall: mc(p.hypercall),
            update_validation: mc(p.update_validation),
            page_table_switch: mc(p.page_table_switch),
            upcall: mc(p.upcall),
        };
        let plans = Plans::build(trace, &Aware { native: &native, monitor: &monitor });
        let engine = ParavirtRun { native, monitor, costs, plans, bits64, pending: 0, last_update: 0 };
        Ok(Box::new(Session::new(trace, engine)))
    }
}

struct ParavirtCosts {
    hypercall: u64,
    update_validation: u64,
    page_table_switch: u64,
    upcall: u64,
}

/// A kernel that knows it is virtualized: interrupt-flag operations touch shared memory, it reads its own copies
/// of control and descriptor registers; what it still executes privileged traps into Xen, which emulates it.
struct Aware<'a> {
    native: &'a NativeCosts,
    monitor: &'a MonitorCosts,
}

impl OpPolicy for Aware<'_> {
    fn instruction(&self, _kernel: bool) -> (u64, CycleCause) {
        (self.native.instruction, CycleCause::GuestInstructions)
    }

    fn priced(&self, priced: Priced, _kernel: bool) -> u64 {
        self.native.priced(priced)
    }

    fn static_op(&self, op: Op, kernel: bool) -> ([(CycleCause, u64); 2], Effect) {
        let plain = [(CycleCause::GuestInstructions, 0), (CycleCause::Exits, 0)];
        let native = [(CycleCause::NativeTransitions, self.native.static_op(op)), (CycleCause::Exits, 0)];
        if op == Op::Rdtsc {
            return (native, Effect::Detectable("rdtsc_shows_hypervisor_time"));
        }
        if !kernel {
            return (native, user_detectable(op).map_or(Effect::Silent, Effect::Detectable));
        }
        match op {
            // The event mask and the kernel's own register copies live in memory shared with Xen.
            Op::Cli | Op::Sti | Op::Pushf | Op::Popf | Op::MovFromCr(_) | Op::Swapgs => (plain, Effect::Silent),
            _ if op.is_sensitive_unprivileged() => (plain, Effect::Silent),
            _ if op.is_privileged() => {
                let m = self.monitor;
                (
                    [(CycleCause::Exits, m.trap), (CycleCause::Emulation, m.decode + m.emulate)],
                    Effect::Trap(exit_reason_of(op)),
                )
            }
            _ => (native, Effect::Silent),
        }
    }
}

struct ParavirtRun {
    native: NativeCosts,
    monitor: MonitorCosts,
    costs: ParavirtCosts,
    plans: Plans,
    bits64: bool,
    /// Page-table updates queued for the next `mmu_update`.
    pending: u64,
    /// Guest address of the last queued update, which the batch flushed at the end of the trace is charged to.
    last_update: u64,
}

impl ParavirtRun {
    fn hypercall(&self, r: &mut Replay, kind: Hypercall, at: u32) {
        let site = r.site(at);
        self.hypercall_at(r, kind, site);
    }

    fn hypercall_at(&self, r: &mut Replay, kind: Hypercall, site: u64) {
        r.metrics.hypercall(kind);
        r.metrics.hypercall_site(kind, site);
        r.charge(CycleCause::Hypercalls, self.costs.hypercall);
    }

    fn flush(&mut self, r: &mut Replay, at: u32) {
        let site = r.site(at);
        self.flush_at(r, site);
    }

    /// Issue the queued updates as one `mmu_update`, charged to the guest instruction at `site`.
    fn flush_at(&mut self, r: &mut Replay, site: u64) {
        if self.pending > 0 {
            self.hypercall_at(r, Hypercall::MmuUpdate, site);
            r.charge(CycleCause::Hypercalls, self.pending * self.costs.update_validation);
            self.pending = 0;
        }
    }

    /// A trap into Xen that it bounces back into the guest kernel.
    fn bounce(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        self.monitor.reflect(r, reason, at, self.monitor.trap);
    }

    fn emulated(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        self.monitor.emulate(r, reason, at, self.monitor.trap);
    }
}

impl Strategy for ParavirtRun {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        self.plans.apply(r, block, executed, full);
    }

    // Out of line: the block path, which runs for most events, stays a tight loop.
    #[inline(never)]
    fn event(&mut self, r: &mut Replay, event: &Event) {
        match *event {
            Event::Block(_) | Event::PartialBlock { .. } => {}
            Event::Context { at, context } => {
                if context.is_user() != r.context.is_user() {
                    if context.is_user() {
                        self.flush(r, at);
                    }
                    if self.bits64 {
                        r.charge(CycleCause::PageTableSwitches, self.costs.page_table_switch);
                    }
                }
            }
            Event::Syscall { at } | Event::SoftwareInterrupt { at, .. } => {
                if self.bits64 {
                    self.bounce(r, ExitReason::SystemCall, at);
                } else {
                    // The fast system-call handler: the processor enters the guest kernel directly.
                    r.charge(CycleCause::NativeTransitions, self.native.event(event));
                }
            }
            Event::Sysret { at } | Event::Iret { at } => {
                if self.bits64 {
                    self.hypercall(r, Hypercall::Iret, at);
                } else {
                    r.charge(CycleCause::NativeTransitions, self.native.event(event));
                }
            }
            Event::Exception { at, vector, .. } => {
                if vector == PAGE_FAULT {
                    r.metrics.shadow.true_faults += 1;
                }
                // CR2 is readable in ring 0 only: every fault goes through Xen.
                self.bounce(r, ExitReason::ExceptionNmi, at);
            }
            Event::Interrupt { at, .. } => {
                let site = r.site(at);
                r.metrics.exit(ExitReason::ExternalInterrupt, site);
                r.charge(CycleCause::Exits, self.monitor.trap);
                r.charge(CycleCause::Reflection, self.costs.upcall);
            }
            Event::CrWrite { at, cr, .. } => match cr {
                3 => {
                    self.flush(r, at);
                    self.hypercall(r, Hypercall::MmuextOp, at);
                }
                0 => self.hypercall(r, Hypercall::FpuTaskswitch, at),
                // The TPR is the event mask in shared memory.
                8 => {}
                4 => {
                    self.flush(r, at);
                    self.emulated(r, ExitReason::CrAccess, at);
                }
                _ => self.emulated(r, ExitReason::CrAccess, at),
            },
            Event::MsrWrite { at, index, .. } => match index {
                MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE => self.hypercall(r, Hypercall::SetSegmentBase, at),
                MSR_STAR | MSR_LSTAR | MSR_CSTAR | MSR_SFMASK => self.hypercall(r, Hypercall::SetCallbacks, at),
                _ => self.emulated(r, ExitReason::MsrWrite, at),
            },
            Event::MsrRead { at, .. } => self.emulated(r, ExitReason::MsrRead, at),
            Event::Io { at, port, .. } => {
                if port == POST_PORT {
                    // A paravirtualized kernel has no I/O delay to make.
                } else if SERIAL_PORTS.contains(&port) {
                    self.hypercall(r, Hypercall::ConsoleIo, at);
                } else {
                    self.hypercall(r, Hypercall::PhysdevOp, at);
                }
            }
            Event::Mmio { at, .. } => {
                self.emulated(r, ExitReason::Mmio, at);
                r.charge(CycleCause::DeviceEmulation, self.monitor.device);
            }
            Event::Cpuid { at, .. } => super::host_cpuid(r, self.native.cpuid, at),
            Event::Invlpg { at, .. } => {
                self.flush(r, at);
                self.hypercall(r, Hypercall::MmuextOp, at);
            }
            Event::DescriptorLoad { at, load } => {
                let kind = match load {
                    DescriptorLoad::Gdt { .. } => Hypercall::SetGdt,
                    DescriptorLoad::Idt { .. } => Hypercall::SetTrapTable,
                    DescriptorLoad::Ldt { .. } => Hypercall::MmuextOp,
                    DescriptorLoad::Tr { .. } => Hypercall::StackSwitch,
                };
                self.hypercall(r, kind, at);
            }
            Event::Hlt { at, .. } => self.hypercall(r, Hypercall::SchedOp, at),
            Event::PageTableWrite { at, .. } => {
                if r.paging() {
                    self.pending += 1;
                    self.last_update = r.site(at);
                    r.metrics.page_table_updates_batched += 1;
                    if self.pending == MAX_BATCH {
                        self.flush(r, at);
                    }
                }
            }
            Event::RepString { at, elements } => self.native.charge_rep_string(r, at, elements),
            // The guest's own tables are the real ones (validated by Xen): a TLB fill is a native walk.
            Event::PageTouch { .. } => r.charge(CycleCause::TlbFills, self.native.tlb_fill),
        }
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        self.plans.settle(r);
        self.flush_at(r, self.last_update);
        Ok(())
    }
}
