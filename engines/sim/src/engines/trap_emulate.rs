//! `trap-and-emulate`: the classic VMM (Popek & Goldberg's Theorem 1 construction) applied to x86 as if it were
//! virtualizable. The guest kernel runs deprivileged and directly; every privileged instruction traps and is
//! emulated; the shadow page tables trace guest page-table writes. x86 breaks the theorem's premise: the
//! sensitive-unprivileged instructions (Robin & Irvine 2000) run without trapping and give wrong results, which
//! this engine reports as holes with their addresses; CPUID and RDTSC run natively and are detectable.

use virtlab_traces::Event;

use super::{descriptor_reason, MonitorCosts, Shadowing, PAGE_FAULT};
use crate::classify::{Op, Priced};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::metrics::{CycleCause, ExitReason};
use crate::profile::Profile;
use crate::replay::{
    exit_reason_of, kernel_hole, user_detectable, Effect, NativeCosts, OpPolicy, Plans, Replay, Session, Strategy,
};
use crate::trace::PreparedTrace;

pub struct TrapEmulate;

impl Engine for TrapEmulate {
    fn name(&self) -> &'static str {
        "trap-emulate"
    }

    fn summary(&self) -> &'static str {
        "deprivileged kernel run directly; privileged instructions trap; POPF, SGDT and friends are holes"
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        _options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let native = NativeCosts::new(profile);
        let monitor = MonitorCosts::new(profile);
        let plans = Plans::build(trace, &Deprivileged { native: &native, monitor: &monitor });
        let engine = TrapRun { native, monitor, plans, shadow: Shadowing::default() };
        Ok(Box::new(Session::new(trace, engine)))
    }
}

/// A deprivileged kernel running directly: what trap-and-emulate does with event-less operations.
pub(crate) struct Deprivileged<'a> {
    pub native: &'a NativeCosts,
    pub monitor: &'a MonitorCosts,
}

impl OpPolicy for Deprivileged<'_> {
    fn instruction(&self, _kernel: bool) -> (u64, CycleCause) {
        (self.native.instruction, CycleCause::GuestInstructions)
    }

    fn priced(&self, priced: Priced, _kernel: bool) -> u64 {
        self.native.priced(priced)
    }

    fn static_op(&self, op: Op, kernel: bool) -> ([(CycleCause, u64); 2], Effect) {
        let native = [(CycleCause::NativeTransitions, self.native.static_op(op)), (CycleCause::Exits, 0)];
        if op == Op::Rdtsc {
            return (native, Effect::Detectable("rdtsc_shows_monitor_time"));
        }
        if !kernel {
            return (native, user_detectable(op).map_or(Effect::Silent, Effect::Detectable));
        }
        if op.is_privileged() {
            let m = self.monitor;
            return (
                [(CycleCause::Exits, m.trap), (CycleCause::Emulation, m.decode + m.emulate)],
                Effect::Trap(exit_reason_of(op)),
            );
        }
        if op.is_sensitive_unprivileged() {
            return (native, Effect::Hole(kernel_hole(op)));
        }
        (native, Effect::Silent)
    }
}

struct TrapRun {
    native: NativeCosts,
    monitor: MonitorCosts,
    plans: Plans,
    shadow: Shadowing,
}

impl Strategy for TrapRun {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        self.plans.apply(r, block, executed, full);
    }

    // Out of line: the block path, which runs for most events, stays a tight loop.
    #[inline(never)]
    fn event(&mut self, r: &mut Replay, event: &Event) {
        let m = &self.monitor;
        let trap = m.trap;
        match *event {
            Event::Block(_) | Event::PartialBlock { .. } => {}
            Event::Context { context, .. } => self.shadow.context(&context),
            Event::Syscall { at } | Event::SoftwareInterrupt { at, .. } => {
                m.reflect(r, ExitReason::SystemCall, at, trap)
            }
            Event::Sysret { at } => m.emulate(r, ExitReason::SystemCall, at, trap),
            Event::Iret { at } => m.emulate(r, ExitReason::Iret, at, trap),
            Event::Exception { at, vector, .. } => {
                if vector == PAGE_FAULT {
                    r.metrics.shadow.true_faults += 1;
                }
                m.reflect(r, ExitReason::ExceptionNmi, at, trap);
            }
            Event::Interrupt { at, .. } => m.reflect(r, ExitReason::ExternalInterrupt, at, trap),
            Event::CrWrite { at, cr, old, new } => {
                m.emulate(r, ExitReason::CrAccess, at, trap);
                self.shadow.cr_write(r, m, cr, old, new);
            }
            Event::MsrRead { at, .. } => m.emulate(r, ExitReason::MsrRead, at, trap),
            Event::MsrWrite { at, .. } => m.emulate(r, ExitReason::MsrWrite, at, trap),
            Event::Io { at, .. } => {
                m.emulate(r, ExitReason::IoInstruction, at, trap);
                r.charge(CycleCause::DeviceEmulation, m.device);
            }
            Event::Mmio { at, .. } => {
                m.emulate(r, ExitReason::Mmio, at, trap);
                r.charge(CycleCause::DeviceEmulation, m.device);
            }
            Event::Cpuid { at, .. } => super::host_cpuid(r, self.native.cpuid, at),
            Event::Invlpg { at, address } => {
                m.emulate(r, ExitReason::Invlpg, at, trap);
                self.shadow.invlpg(r, m, address);
            }
            Event::DescriptorLoad { at, load } => m.emulate(r, descriptor_reason(&load), at, trap),
            Event::Hlt { at, .. } => m.emulate(r, ExitReason::Hlt, at, trap),
            Event::PageTableWrite { at, gpa, level, old, new } => {
                if r.paging() {
                    m.emulate(r, ExitReason::TracingFault, at, trap);
                    self.shadow.write(r, m, gpa, level, old, new);
                }
            }
            Event::RepString { at, elements } => self.native.charge_rep_string(r, at, elements),
            Event::PageTouch { at, page, frame, .. } => {
                r.charge(CycleCause::TlbFills, self.native.tlb_fill);
                if self.shadow.touch(r, m, page, frame) {
                    r.exit(ExitReason::ShadowPageFault, at);
                    r.charge(CycleCause::Exits, trap);
                }
            }
        }
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        self.plans.settle(r);
        Ok(())
    }
}
