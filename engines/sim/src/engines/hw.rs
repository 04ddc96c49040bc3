//! `hw-ept` and `hw-shadow`: a VT-x/AMD-V monitor. The guest kernel runs in guest mode at its own CPL 0, so
//! sensitive instructions give the guest's own values and most privileged ones do not exit; what exits is what
//! the VMCS controls say (CPUID and HLT always; I/O; MSRs outside the bitmap; CR0/CR4 bits the host owns; CR8
//! without a TPR shadow). With nested paging (EPT/NPT) page tables are the guest's business and only the first
//! touch of each guest-physical page exits; without it (first-generation VT-x, Adams & Agesen 2006) the monitor
//! keeps shadow page tables: CR3 writes, INVLPG, hidden faults, true page faults and traced page-table writes all
//! exit. Each exit costs the hardware's exit and entry plus the VMCS reads of a typical handler (profile `hw`).

use virtlab_traces::Event;

use super::{MonitorCosts, Shadowing, PAGE_FAULT};
use crate::classify::{Op, Priced};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::fasthash::FastSet;
use crate::metrics::{CycleCause, ExitReason};
use crate::profile::{mc, Profile};
use crate::replay::{exit_reason_of, Effect, NativeCosts, OpPolicy, Plans, Replay, Session, Strategy};
use crate::trace::PreparedTrace;

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

pub struct HardwareAssist {
    pub nested_paging: bool,
}

impl Engine for HardwareAssist {
    fn name(&self) -> &'static str {
        if self.nested_paging {
            "hw-ept"
        } else {
            "hw-shadow"
        }
    }

    fn summary(&self) -> &'static str {
        if self.nested_paging {
            "VT-x/AMD-V with nested paging (EPT/NPT): exits on CPUID, HLT, I/O, MMIO and first touches"
        } else {
            "first-generation VT-x: hardware exits plus shadow page tables (CR3, INVLPG, faults, traced writes)"
        }
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let h = &profile.hw;
        let native = NativeCosts::new(profile);
        let monitor = MonitorCosts::new(profile);
        let vmexit = VmExit {
            // An exit and the entry back, with the VMCS reads a typical handler makes.
            round_trip: mc(h.exit + h.entry + h.vmread * h.vmreads_per_exit),
            injection: mc(h.vmwrite * h.vmwrites_per_injection),
            ept_violation: mc(h.ept_violation),
            user_space_exit: if options.hw_user_space_devices { mc(h.user_space_exit) } else { 0 },
        };
        let policy =
            GuestMode { monitor: &monitor, native: &native, vmexit: &vmexit, options, ept: self.nested_paging };
        let plans = Plans::build(trace, &policy);
        let engine = HwRun {
            native,
            monitor,
            vmexit,
            plans,
            ept: self.nested_paging,
            options: options.clone(),
            shadow: Shadowing::default(),
            mapped_frames: FastSet::default(),
        };
        Ok(Box::new(Session::new(trace, engine)))
    }
}

struct VmExit {
    round_trip: u64,
    injection: u64,
    ept_violation: u64,
    user_space_exit: u64,
}

struct GuestMode<'a> {
    monitor: &'a MonitorCosts,
    native: &'a NativeCosts,
    vmexit: &'a VmExit,
    options: &'a Options,
    ept: bool,
}

impl GuestMode<'_> {
    fn exits(&self, op: Op) -> bool {
        match op {
            Op::MovFromCr(3) => !self.ept,
            Op::MovFromCr(8) => !self.options.hw_tpr_shadow,
            Op::MovDr | Op::CacheFlush | Op::Xsetbv | Op::Rdpmc | Op::OtherPrivileged => true,
            _ => false,
        }
    }
}

impl OpPolicy for GuestMode<'_> {
    fn instruction(&self, _kernel: bool) -> (u64, CycleCause) {
        (self.native.instruction, CycleCause::GuestInstructions)
    }

    fn priced(&self, priced: Priced, _kernel: bool) -> u64 {
        self.native.priced(priced)
    }

    fn static_op(&self, op: Op, _kernel: bool) -> ([(CycleCause, u64); 2], Effect) {
        if self.exits(op) {
            let costs = [(CycleCause::Exits, self.vmexit.round_trip), (CycleCause::Emulation, self.monitor.emulate)];
            return (costs, Effect::Trap(exit_reason_of(op)));
        }
        ([(CycleCause::NativeTransitions, self.native.static_op(op)), (CycleCause::Exits, 0)], Effect::Silent)
    }
}

struct HwRun {
    native: NativeCosts,
    monitor: MonitorCosts,
    vmexit: VmExit,
    plans: Plans,
    ept: bool,
    options: Options,
    shadow: Shadowing,
    /// Guest-physical frames the host has mapped in the EPT.
    mapped_frames: FastSet<u64>,
}

/// CR0 and CR4 bits the host owns (guest/host mask): a change exits.
fn host_owned_bits_changed(cr: u8, old: u64, new: u64) -> bool {
    let mask: u64 = match cr {
        0 => 1 | (1 << 5) | (1 << 16) | (1 << 29) | (1 << 30) | (1 << 31),
        4 => (1 << 4) | (1 << 5) | (1 << 7) | (1 << 12) | (1 << 13) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21),
        _ => 0,
    };
    (old ^ new) & mask != 0
}

impl HwRun {
    /// An exit the monitor handles by emulating the instruction (the exit qualification says which, so there
    /// is no decode).
    fn emulate(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        r.exit(reason, at);
        r.charge(CycleCause::Exits, self.vmexit.round_trip);
        r.charge(CycleCause::Emulation, self.monitor.emulate);
        r.metrics.emulated_instructions += 1;
    }

    /// An exit for a memory access: the monitor must fetch and decode the instruction.
    fn decode_and_emulate(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        self.emulate(r, reason, at);
        r.charge(CycleCause::Emulation, self.monitor.decode);
    }

    fn device(&self, r: &mut Replay) {
        r.charge(CycleCause::DeviceEmulation, self.monitor.device + self.vmexit.user_space_exit);
    }

    /// An exit for an event the monitor injects back into the guest, which the guest then takes as native.
    fn inject(&self, r: &mut Replay, reason: ExitReason, at: u32) {
        r.exit(reason, at);
        r.charge(CycleCause::Exits, self.vmexit.round_trip);
        r.charge(CycleCause::Reflection, self.vmexit.injection);
        r.charge(CycleCause::NativeTransitions, self.native.exception);
    }

    fn native(&self, r: &mut Replay, event: &Event) {
        r.charge(NativeCosts::event_cause(event), self.native.event(event));
    }
}

impl Strategy for HwRun {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        self.plans.apply(r, block, executed, full);
    }

    // Out of line: the block path, which runs for most events, stays a tight loop.
    #[inline(never)]
    fn event(&mut self, r: &mut Replay, event: &Event) {
        let m = &self.monitor;
        match *event {
            Event::Block(_) | Event::PartialBlock { .. } => {}
            Event::Context { context, .. } => {
                if !self.ept {
                    self.shadow.context(&context);
                }
            }
            Event::Syscall { .. }
            | Event::Sysret { .. }
            | Event::SoftwareInterrupt { .. }
            | Event::Iret { .. }
            | Event::DescriptorLoad { .. } => self.native(r, event),
            Event::Exception { at, vector, .. } => {
                if vector == PAGE_FAULT && !self.ept {
                    r.metrics.shadow.true_faults += 1;
                    self.inject(r, ExitReason::ExceptionNmi, at);
                } else {
                    self.native(r, event);
                }
            }
            Event::Interrupt { at, .. } => self.inject(r, ExitReason::ExternalInterrupt, at),
            Event::CrWrite { at, cr, old, new } => {
                let exits = match cr {
                    3 => !self.ept,
                    8 => !self.options.hw_tpr_shadow,
                    0 | 4 => host_owned_bits_changed(cr, old, new),
                    _ => false,
                };
                if exits {
                    self.emulate(r, ExitReason::CrAccess, at);
                } else {
                    self.native(r, event);
                }
                if !self.ept {
                    self.shadow.cr_write(r, m, cr, old, new);
                }
            }
            Event::MsrRead { at, index, .. } | Event::MsrWrite { at, index, .. } => {
                let passed =
                    self.options.hw_msr_bitmap && matches!(index, MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE);
                if passed {
                    self.native(r, event);
                } else {
                    let reason =
                        if matches!(event, Event::MsrRead { .. }) { ExitReason::MsrRead } else { ExitReason::MsrWrite };
                    self.emulate(r, reason, at);
                }
            }
            Event::Io { at, .. } => {
                self.emulate(r, ExitReason::IoInstruction, at);
                self.device(r);
            }
            Event::Mmio { at, .. } => {
                let reason = if self.ept { ExitReason::EptMisconfig } else { ExitReason::Mmio };
                self.decode_and_emulate(r, reason, at);
                self.device(r);
            }
            Event::Cpuid { at, .. } => self.emulate(r, ExitReason::Cpuid, at),
            Event::Hlt { at, .. } => self.emulate(r, ExitReason::Hlt, at),
            Event::Invlpg { at, address } => {
                if self.ept {
                    self.native(r, event);
                } else {
                    self.emulate(r, ExitReason::Invlpg, at);
                    self.shadow.invlpg(r, m, address);
                }
            }
            Event::PageTableWrite { at, gpa, level, old, new } => {
                if !self.ept && r.paging() {
                    self.decode_and_emulate(r, ExitReason::TracingFault, at);
                    self.shadow.write(r, m, gpa, level, old, new);
                }
            }
            Event::RepString { at, elements } => self.native.charge_rep_string(r, at, elements),
            Event::PageTouch { at, page, frame, .. } => {
                self.native(r, event);
                if self.ept {
                    if self.mapped_frames.insert(frame) {
                        r.exit(ExitReason::EptViolation, at);
                        r.charge(CycleCause::Exits, self.vmexit.round_trip);
                        r.charge(CycleCause::NestedPaging, self.vmexit.ept_violation);
                    }
                } else if self.shadow.touch(r, m, page, frame) {
                    r.exit(ExitReason::ShadowPageFault, at);
                    r.charge(CycleCause::Exits, self.vmexit.round_trip);
                }
            }
        }
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        self.plans.settle(r);
        Ok(())
    }
}
