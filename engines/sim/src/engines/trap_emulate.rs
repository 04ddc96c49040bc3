//! `trap-and-emulate`: the classic VMM (Popek & Goldberg's Theorem 1 construction) applied to x86 as if it were
//! virtualizable. The guest kernel runs deprivileged and directly; every privileged instruction traps and is
//! emulated; the shadow page tables trace guest page-table writes. x86 breaks the theorem's premise: the
//! sensitive-unprivileged instructions (Robin & Irvine 2000) run without trapping and give wrong results, which
//! this engine reports as holes with their addresses; CPUID and RDTSC run natively and are detectable.

use super::{d, monitor_tables_visible_to_user, shadow_paging, trapping_privileged_events};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::metrics::ExitReason as R;
use crate::profile::Profile;
use crate::replay::Session;
use crate::strategy::{Mechanism, Mode, Subject, Table, TraceHandling};
use crate::trace::PreparedTrace;

pub struct TrapEmulate;

/// The deprivileged kernel's table; binary translation reuses its user-mode rows.
pub(crate) fn table(_options: &Options) -> Table {
    let mut table = Table::filled(d(Mechanism::Native));
    let trap = |reason| d(Mechanism::Trap(reason));
    let hole = d(Mechanism::Hole("the deprivileged kernel sees the monitor's state"));
    for (subject, disposition) in [
        (Subject::InterruptFlag, trap(R::InterruptFlag)),
        (Subject::FlagsImage, hole),
        (Subject::DescriptorRead, hole),
        (Subject::SegmentCheck, hole),
        (Subject::SelectorRead, hole),
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
        .set(Subject::Cpuid, d(Mechanism::Detectable("cpuid_reports_host")));
    trapping_privileged_events(&mut table);
    shadow_paging(&mut table, TraceHandling::Trap, TraceHandling::Trap);
    table
}

impl Engine for TrapEmulate {
    fn name(&self) -> &'static str {
        "trap-emulate"
    }

    fn summary(&self) -> &'static str {
        "deprivileged kernel run directly; privileged instructions trap; POPF, SGDT and friends are holes"
    }

    fn table(&self, options: &Options) -> Table {
        table(options)
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let monitor = Monitor::new(MonitorParts { shadow: true, ..MonitorParts::default() }, profile);
        Ok(Box::new(Session::new(trace, profile, table(options), monitor, None)))
    }
}
