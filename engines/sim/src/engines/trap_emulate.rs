//! `trap-and-emulate`: the classic VMM (Popek & Goldberg's Theorem 1 construction) applied to x86 as if it were
//! virtualizable. The guest kernel runs deprivileged and directly; every privileged instruction traps and is
//! emulated; the shadow page tables trace guest page-table writes. x86 breaks the theorem's premise: the
//! sensitive-unprivileged instructions (Robin & Irvine 2000) run without trapping and give wrong results, which
//! this engine reports as holes with their addresses; CPUID and RDTSC run natively and are detectable.
//!
//! Where the kernel runs depends on the guest's width ([`crate::protection`]): a 32-bit kernel in ring 1, the
//! monitor in the top 4 MiB behind truncated segments, U/S paging still separating ring 1 from ring 3; a 64-bit
//! kernel in ring 3 (long mode ignores the limits), with two page tables switched on every kernel entry and
//! return.

use super::{d, monitor_tables_visible_to_user, protect, selector_hole, shadow_paging, trapping_privileged_events};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::metrics::ExitReason as R;
use crate::profile::Profile;
use crate::protection::{Guard, GuestWidth, Protection, VMWARE_MONITOR_BYTES};
use crate::replay::Session;
use crate::strategy::{Action, Disposition, Mechanism, Mode, Subject, Table, TraceHandling};
use crate::trace::PreparedTrace;

pub struct TrapEmulate;

/// Where the deprivileged kernel runs: a classic monitor has no long-mode segment limits.
fn protection(width: GuestWidth) -> Protection {
    Protection::deprivileged(width, VMWARE_MONITOR_BYTES, false)
}

/// The deprivileged kernel's table; binary translation reuses its user-mode rows.
pub(crate) fn table(_options: &Options, width: GuestWidth) -> Table {
    let mut table = Table::filled(d(Mechanism::Native));
    let trap = |reason| d(Mechanism::Trap(reason));
    let hole = d(Mechanism::Hole("the deprivileged kernel sees the monitor's state"));
    for (subject, disposition) in [
        (Subject::InterruptFlag, trap(R::InterruptFlag)),
        (Subject::FlagsImage, hole),
        (Subject::DescriptorRead, hole),
        (Subject::SegmentCheck, hole),
        (Subject::SelectorRead, d(Mechanism::Hole(selector_hole(protection(width))))),
        (Subject::FarTransfer, hole),
        (Subject::ControlRead, trap(R::CrAccess)),
        (Subject::Cr3Read, trap(R::CrAccess)),
        (Subject::Cr8Read, trap(R::CrAccess)),
        (Subject::DebugRegister, trap(R::DrAccess)),
        (Subject::Rdpmc, trap(R::Rdpmc)),
        (Subject::Swapgs, trap(R::Swapgs)),
        (Subject::CacheControl, trap(R::Wbinvd)),
        (Subject::OtherPrivileged, trap(R::PrivilegedInstruction)),
    ] {
        table.set_in(subject, Mode::Kernel, disposition);
    }
    monitor_tables_visible_to_user(&mut table);
    table
        .set(Subject::TimeStamp, d(Mechanism::Detectable("rdtsc_shows_monitor_time")))
        .set(Subject::Syscall, d(Mechanism::Reflect(R::SystemCall)))
        .set(Subject::SoftwareInterrupt, d(Mechanism::Reflect(R::SystemCall)))
        .set(Subject::SystemCallGate, d(Mechanism::Reflect(R::SystemCall)))
        .set(Subject::Cpuid, d(Mechanism::Detectable("cpuid_reports_host")));
    trapping_privileged_events(&mut table);
    shadow_paging(&mut table, TraceHandling::Trap, TraceHandling::Trap);
    let protection = protection(width);
    protect(&mut table, protection);
    if protection.guard == Guard::TwoPageTables {
        for subject in [Subject::EnterKernel, Subject::ReturnToUser] {
            table.set(subject, Disposition::with(Mechanism::Native, &[Action::PageTableSwitch]));
        }
    }
    table
}

impl Engine for TrapEmulate {
    fn name(&self) -> &'static str {
        "trap-emulate"
    }

    fn summary(&self) -> &'static str {
        "deprivileged kernel run directly; privileged instructions trap; POPF, SGDT and friends are holes"
    }

    fn table(&self, options: &Options, width: GuestWidth) -> Table {
        table(options, width)
    }

    fn protection(&self, _options: &Options, width: GuestWidth) -> Protection {
        protection(width)
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let width = trace.width();
        let protection = protection(width);
        let flushes = protection.guard == Guard::TwoPageTables;
        let monitor =
            Monitor::new(MonitorParts { shadow: true, flushes, protection, ..MonitorParts::default() }, profile);
        Ok(Box::new(Session::new(trace, profile, table(options, width), monitor, None)))
    }
}
