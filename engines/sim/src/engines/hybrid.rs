//! `hybrid`: Popek & Goldberg's hybrid VMM (their Theorem 3): every instruction executed in virtual supervisor
//! mode is interpreted, virtual user mode runs directly, and memory is virtualized with shadow page tables. It
//! needs only the *user*-sensitive instructions to be privileged, which x86 nearly meets: in user mode SGDT,
//! SIDT, SLDT, STR, SMSW and the segment checks still reveal the monitor (detectable). It is also what Linux
//! KVM's PVM backend does with an unmodified kernel: the lab's own KVM host runs guest kernels this way.

use virtlab_traces::Event;

use super::{MonitorCosts, Shadowing, PAGE_FAULT};
use crate::classify::{Op, Priced};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::metrics::{CycleCause, ExitReason};
use crate::profile::Profile;
use crate::replay::{user_detectable, Effect, NativeCosts, OpPolicy, Plans, Replay, Session, Strategy};
use crate::trace::PreparedTrace;

pub struct Hybrid;

impl Engine for Hybrid {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn summary(&self) -> &'static str {
        "Popek & Goldberg's hybrid VMM: kernel interpreted, user direct, shadow paging (KVM's PVM)"
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        _options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let native = NativeCosts::new(profile);
        let monitor = MonitorCosts::new(profile);
        let plans = Plans::build(trace, &Interpreted { native: &native, monitor: &monitor });
        Ok(Box::new(Session::new(trace, HybridRun { native, monitor, plans, shadow: Shadowing::default() })))
    }
}

struct Interpreted<'a> {
    native: &'a NativeCosts,
    monitor: &'a MonitorCosts,
}

impl OpPolicy for Interpreted<'_> {
    fn instruction(&self, kernel: bool) -> (u64, CycleCause) {
        if kernel {
            (self.monitor.interpret, CycleCause::Interpretation)
        } else {
            (self.native.instruction, CycleCause::GuestInstructions)
        }
    }

    fn priced(&self, priced: Priced, kernel: bool) -> u64 {
        // The interpreter's per-instruction cost covers a call or return; a division or multiplication it
        // still performs with the host's own instruction.
        if kernel && priced == Priced::CallReturn {
            0
        } else {
            self.native.priced(priced)
        }
    }

    fn static_op(&self, op: Op, kernel: bool) -> ([(CycleCause, u64); 2], Effect) {
        if kernel {
            // The interpreter gives every instruction its virtual-machine meaning: no hole, no trap.
            return ([(CycleCause::Interpretation, 0), (CycleCause::Interpretation, 0)], Effect::Silent);
        }
        let native = [(CycleCause::NativeTransitions, self.native.static_op(op)), (CycleCause::Exits, 0)];
        (native, user_detectable(op).map_or(Effect::Silent, Effect::Detectable))
    }
}

struct HybridRun {
    native: NativeCosts,
    monitor: MonitorCosts,
    plans: Plans,
    shadow: Shadowing,
}

impl Strategy for HybridRun {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        if r.kernel() {
            r.metrics.emulated_instructions += u64::from(executed);
        }
        self.plans.apply(r, block, executed, full);
    }

    // Out of line: the block path, which runs for most events, stays a tight loop.
    #[inline(never)]
    fn event(&mut self, r: &mut Replay, event: &Event) {
        let m = &self.monitor;
        let user = !r.kernel();
        match *event {
            Event::Block(_) | Event::PartialBlock { .. } => {}
            Event::Context { context, .. } => self.shadow.context(&context),
            // Leaving direct execution: the monitor takes over and interprets the kernel from its entry point.
            Event::Syscall { at } | Event::SoftwareInterrupt { at, .. } if user => {
                m.reflect(r, ExitReason::SystemCall, at, m.trap)
            }
            Event::Exception { at, vector, .. } if user => {
                if vector == PAGE_FAULT {
                    r.metrics.shadow.true_faults += 1;
                }
                m.reflect(r, ExitReason::ExceptionNmi, at, m.trap);
            }
            Event::Interrupt { at, .. } if user => m.reflect(r, ExitReason::ExternalInterrupt, at, m.trap),
            // Inside the interpreter, transfers are virtual: the interpreter builds the frames itself.
            Event::Syscall { .. }
            | Event::SoftwareInterrupt { .. }
            | Event::Exception { .. }
            | Event::Interrupt { .. } => {
                if let Event::Exception { vector: PAGE_FAULT, .. } = event {
                    r.metrics.shadow.true_faults += 1;
                }
                r.charge(CycleCause::Reflection, m.reflect)
            }
            Event::Sysret { .. } | Event::Iret { .. } => {}
            Event::CrWrite { cr, old, new, .. } => self.shadow.cr_write(r, m, cr, old, new),
            Event::Cpuid { at, .. } if user => super::host_cpuid(r, self.native.cpuid, at),
            Event::MsrRead { .. } | Event::MsrWrite { .. } | Event::Cpuid { .. } | Event::DescriptorLoad { .. } => {
                r.charge(CycleCause::Emulation, m.emulate)
            }
            Event::Io { at, .. } => {
                r.exit(ExitReason::IoInstruction, at);
                r.charge(CycleCause::DeviceEmulation, m.device);
            }
            Event::Mmio { at, .. } => {
                r.exit(ExitReason::Mmio, at);
                r.charge(CycleCause::DeviceEmulation, m.device);
            }
            Event::Hlt { at, .. } => r.exit(ExitReason::Hlt, at),
            Event::Invlpg { address, .. } => self.shadow.invlpg(r, m, address),
            Event::PageTableWrite { at, gpa, level, old, new } => {
                if r.paging() {
                    if user {
                        m.emulate(r, ExitReason::TracingFault, at, m.trap);
                    }
                    self.shadow.write(r, m, gpa, level, old, new);
                }
            }
            // The interpreter steps a kernel string instruction one element at a time, as KVM's emulator does.
            Event::RepString { elements, .. } if !user => {
                r.charge(CycleCause::Interpretation, elements.saturating_mul(m.interpret))
            }
            Event::RepString { at, elements } => self.native.charge_rep_string(r, at, elements),
            // The interpreter translates kernel addresses itself; only directly executed user code walks the
            // shadow tables in hardware.
            Event::PageTouch { at, page, frame, .. } if user => {
                r.charge(CycleCause::TlbFills, self.native.tlb_fill);
                if self.shadow.touch(r, m, page, frame) {
                    r.exit(ExitReason::ShadowPageFault, at);
                    r.charge(CycleCause::Exits, m.trap);
                }
            }
            Event::PageTouch { .. } => {}
        }
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        self.plans.settle(r);
        Ok(())
    }
}
