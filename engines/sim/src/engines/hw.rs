//! `hw-ept` and `hw-shadow`: a VT-x/AMD-V monitor. The guest kernel runs in guest mode at its own CPL 0, so
//! sensitive instructions give the guest's own values and most privileged ones do not exit; what exits is what
//! the VMCS controls say (CPUID and HLT always; I/O; MSRs outside the bitmap; CR0/CR4 bits the host owns; CR8
//! without a TPR shadow). With nested paging (EPT/NPT) page tables are the guest's business: a TLB fill is a
//! two-dimensional walk and only the first touch of each guest-physical page exits; without it (first-generation
//! VT-x, Adams & Agesen 2006) the monitor keeps shadow page tables: CR3 writes, INVLPG, hidden faults, true page
//! faults and traced page-table writes all exit.
//!
//! Each exit is handled as first-generation monitors did (`vmcs_accesses`): the VMCS fields every handler reads
//! and writes, those its exit reason needs, the guest instruction fetched through a software walk and decoded
//! for exits that emulate a memory access, and, without VPID, the TLB flush on every transition.

use super::d;
use crate::engine::{Engine, EngineError, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::metrics::ExitReason as R;
use crate::profile::Profile;
use crate::protection::GuestWidth;
use crate::replay::Session;
use crate::strategy::{Action, Disposition, Handling, Mechanism, Subject, Table, TraceHandling};
use crate::trace::PreparedTrace;

pub struct HardwareAssist {
    pub nested_paging: bool,
}

/// VMCS reads and writes of one exit and the entry after it, as first-generation VT-x handlers make them (KVM in
/// Linux 2.6.20, `drivers/kvm/vmx.c`, counted from the code; shared refs §9): every exit reads 4 fields
/// (interruptibility, IDT-vectoring information, exit reason, instruction length), and every entry is preceded by
/// 3 reads and 6 writes (host selectors and bases, controls, HOST_RSP). The handler's own reads: 5 for a #PF exit
/// (9 in all), 6 for MOV CR (qualification, RSP, RIP, then RIP, length and interruptibility to skip the
/// instruction: 10 in all), 2 for non-string I/O (6 in all); the lab gives the other emulating handlers the
/// skip's 3, an external interrupt its interruption information, an EPT exit its qualification and address.
/// Skipping an emulated instruction writes RIP and interruptibility; injecting an event writes the entry
/// interruption information, error code and instruction length; fetching the guest instruction to decode it
/// reads CS, RIP and CR0 before the software walk.
pub fn vmcs_accesses(reason: R, handling: Handling) -> (u64, u64) {
    const EXIT_READS: u64 = 4;
    const ENTRY_READS: u64 = 3;
    const ENTRY_WRITES: u64 = 6;
    const SKIP_WRITES: u64 = 2;
    const INJECT_WRITES: u64 = 3;
    const FETCH_READS: u64 = 3;
    let handler_reads = match reason {
        R::ExceptionNmi | R::ShadowPageFault | R::TracingFault | R::Mmio => 5,
        R::CrAccess => 6,
        R::IoInstruction | R::EptViolation | R::EptMisconfig => 2,
        R::ExternalInterrupt => 1,
        _ => 3,
    };
    let (fetch_reads, writes) = match handling {
        Handling::Emulate | Handling::Halt => (0, SKIP_WRITES),
        Handling::FetchDecodeEmulate => (FETCH_READS, SKIP_WRITES),
        Handling::Inject => (0, INJECT_WRITES),
        Handling::MapGuestPage | Handling::ShadowFill => (0, 0),
    };
    (EXIT_READS + handler_reads + fetch_reads + ENTRY_READS, ENTRY_WRITES + writes)
}

pub(crate) fn table(options: &Options, ept: bool) -> Table {
    let mut table = Table::filled(d(Mechanism::GuestMode));
    let exit = |reason, handling| d(Mechanism::VmExit(reason, handling));
    let emulate = |reason| exit(reason, Handling::Emulate);
    let device = |reason, handling| {
        Disposition::with(Mechanism::VmExit(reason, handling), &[Action::Device, Action::UserSpaceDevice])
    };
    for (subject, reason) in [
        (Subject::DebugRegister, R::DrAccess),
        (Subject::Rdpmc, R::Rdpmc),
        (Subject::CacheControl, R::Wbinvd),
        (Subject::OtherPrivileged, R::PrivilegedInstruction),
    ] {
        table.set(subject, emulate(reason));
    }
    if !options.hw_tpr_shadow {
        table.set(Subject::Cr8Read, emulate(R::CrAccess));
        table.set(Subject::Cr8Write, emulate(R::CrAccess));
    }
    // KVM lets the guest at the segment bases and the SYSENTER MSRs, which the VMCS switches on every entry and
    // exit (`vmx_disable_intercept_for_msr` on vCPU creation, arch/x86/kvm/vmx/vmx.c).
    if !options.hw_msr_bitmap {
        table.set(Subject::MsrReadSegmentBase, emulate(R::MsrRead));
        table.set(Subject::MsrWriteSegmentBase, emulate(R::MsrWrite));
        table.set(Subject::MsrReadSysenter, emulate(R::MsrRead));
        table.set(Subject::MsrWriteSysenter, emulate(R::MsrWrite));
    }
    table
        .set(Subject::MsrReadOther, emulate(R::MsrRead))
        .set(Subject::MsrWriteSyscallSetup, emulate(R::MsrWrite))
        .set(Subject::MsrWriteOther, emulate(R::MsrWrite))
        .set(Subject::Cr0WriteOwned, emulate(R::CrAccess))
        .set(Subject::Cr4WriteOwned, emulate(R::CrAccess))
        .set(Subject::Interrupt, exit(R::ExternalInterrupt, Handling::Inject))
        .set(Subject::PostPort, device(R::IoInstruction, Handling::Emulate))
        .set(Subject::ConsolePort, device(R::IoInstruction, Handling::Emulate))
        .set(Subject::OtherPort, device(R::IoInstruction, Handling::Emulate))
        .set(Subject::Cpuid, emulate(R::Cpuid))
        .set(Subject::Hlt, exit(R::Hlt, Handling::Halt));
    if ept {
        table
            .set(Subject::Mmio, device(R::EptMisconfig, Handling::FetchDecodeEmulate))
            .set(Subject::PageTouch, d(Mechanism::NestedWalk));
        return table;
    }
    let shadow = |reason, action| Disposition::with(Mechanism::VmExit(reason, Handling::Emulate), action);
    table
        .set(Subject::Cr3Read, emulate(R::CrAccess))
        .set(Subject::Cr3Write, shadow(R::CrAccess, &[Action::ShadowSwitch]))
        .set(Subject::Cr3Reload, shadow(R::CrAccess, &[Action::ShadowSwitch]))
        .set(Subject::Cr0WriteOwned, shadow(R::CrAccess, &[Action::ShadowRebuild]))
        .set(Subject::Cr4WriteOwned, shadow(R::CrAccess, &[Action::ShadowRebuild]))
        .set(Subject::Invlpg, shadow(R::Invlpg, &[Action::ShadowInvalidate]))
        .set(Subject::Mmio, device(R::Mmio, Handling::FetchDecodeEmulate))
        .set(
            Subject::PageFault,
            Disposition::with(
                Mechanism::VmExit(R::ExceptionNmi, Handling::Inject),
                &[Action::ClassifyFault, Action::TrueFault],
            ),
        )
        .set(Subject::PageTableWrite, d(Mechanism::Traced(TraceHandling::VmExit)))
        .set(Subject::PageTouch, d(Mechanism::ShadowTouch(TraceHandling::VmExit)));
    table
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

    fn table(&self, options: &Options, _width: GuestWidth) -> Table {
        table(options, self.nested_paging)
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let parts = MonitorParts {
            shadow: !self.nested_paging,
            nested: self.nested_paging,
            flushes: !profile.flag(crate::primitive::Primitive::Vpid),
            user_space_devices: options.hw_user_space_devices,
            ..MonitorParts::default()
        };
        let monitor = Monitor::new(parts, profile);
        Ok(Box::new(Session::new(trace, profile, table(options, self.nested_paging), monitor, None)))
    }
}
