//! `hybrid`: Popek & Goldberg's hybrid VMM (their Theorem 3): every instruction executed in virtual supervisor
//! mode is interpreted, virtual user mode runs directly, and memory is virtualized with shadow page tables. It
//! needs only the *user*-sensitive instructions to be privileged, which x86 nearly meets: in user mode SGDT,
//! SIDT, SLDT, STR, SMSW and the segment checks still reveal the monitor (detectable). It is also what Linux
//! KVM's PVM backend does with an unmodified kernel: the lab's own KVM host runs guest kernels this way.

use super::{d, monitor_tables_visible_to_user};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::metrics::ExitReason as R;
use crate::profile::Profile;
use crate::protection::{Guard, GuestWidth, KernelPlacement, Protection};
use crate::replay::Session;
use crate::strategy::{Action, Disposition, Mechanism, Mode, Subject, Table, TraceHandling};
use crate::trace::PreparedTrace;

pub struct Hybrid;

pub(crate) fn table(_options: &Options) -> Table {
    let mut table = Table::filled(d(Mechanism::Native));
    let kernel = |table: &mut Table, subject, disposition| {
        table.set_in(subject, Mode::Kernel, disposition);
    };
    // Every instruction the kernel executes goes through the interpreter, which gives it its virtual-machine
    // meaning: no hole, no trap.
    for &subject in Subject::ALL.iter().filter(|s| s.is_instruction_class()) {
        kernel(&mut table, subject, d(Mechanism::Interpreted));
    }
    monitor_tables_visible_to_user(&mut table);
    // Leaving direct execution: the monitor takes over and interprets the kernel from its entry point.
    for subject in [Subject::Syscall, Subject::SoftwareInterrupt, Subject::SystemCallGate] {
        table.set_in(subject, Mode::User, d(Mechanism::Reflect(R::SystemCall)));
        kernel(&mut table, subject, d(Mechanism::InterpretedTransfer));
    }
    table.set_in(Subject::Exception, Mode::User, d(Mechanism::Reflect(R::ExceptionNmi)));
    table.set_in(
        Subject::PageFault,
        Mode::User,
        Disposition::with(Mechanism::Reflect(R::ExceptionNmi), &[Action::ClassifyFault, Action::TrueFault]),
    );
    table.set_in(Subject::Interrupt, Mode::User, d(Mechanism::Reflect(R::ExternalInterrupt)));
    // Inside the interpreter, transfers are virtual: the interpreter builds the frames itself, and its own
    // software MMU knows a true fault from a hidden one.
    kernel(&mut table, Subject::Exception, d(Mechanism::InterpretedTransfer));
    kernel(&mut table, Subject::PageFault, Disposition::with(Mechanism::InterpretedTransfer, &[Action::TrueFault]));
    kernel(&mut table, Subject::Interrupt, d(Mechanism::InterpretedTransfer));
    for subject in
        [Subject::Sysret, Subject::Iret, Subject::Cr0Write, Subject::Cr2Write, Subject::Cr4Write, Subject::Cr8Write]
    {
        kernel(&mut table, subject, d(Mechanism::Interpreted));
    }
    for subject in [Subject::Cr0WriteOwned, Subject::Cr4WriteOwned] {
        kernel(&mut table, subject, Disposition::with(Mechanism::Interpreted, &[Action::ShadowRebuild]));
    }
    for subject in [Subject::Cr3Write, Subject::Cr3Reload] {
        kernel(&mut table, subject, Disposition::with(Mechanism::Interpreted, &[Action::ShadowSwitch]));
    }
    for subject in [
        Subject::MsrReadSegmentBase,
        Subject::MsrReadOther,
        Subject::MsrWriteSegmentBase,
        Subject::MsrWriteSyscallSetup,
        Subject::MsrWriteOther,
        Subject::MsrReadSysenter,
        Subject::MsrWriteSysenter,
        Subject::Cpuid,
        Subject::GdtLoad,
        Subject::IdtLoad,
        Subject::LdtLoad,
        Subject::TrLoad,
    ] {
        kernel(&mut table, subject, d(Mechanism::InterpretedEmulate));
    }
    table.set_in(Subject::Cpuid, Mode::User, d(Mechanism::Detectable("cpuid_reports_host")));
    let device = |reason| Disposition::with(Mechanism::InterpretedDevice(reason), &[Action::Device]);
    for subject in [Subject::PostPort, Subject::ConsolePort, Subject::OtherPort] {
        table.set(subject, device(R::IoInstruction));
    }
    table.set(Subject::Mmio, device(R::Mmio));
    table.set(Subject::Hlt, d(Mechanism::InterpretedDevice(R::Hlt)));
    kernel(&mut table, Subject::Invlpg, Disposition::with(Mechanism::Interpreted, &[Action::ShadowInvalidate]));
    // The interpreter sees the kernel's stores and translates kernel addresses itself; only directly executed
    // user code walks the shadow tables in hardware.
    table.set_in(Subject::PageTableWrite, Mode::User, d(Mechanism::Traced(TraceHandling::Trap)));
    kernel(&mut table, Subject::PageTableWrite, d(Mechanism::Traced(TraceHandling::Interpreter)));
    table.set_in(Subject::PageTouch, Mode::User, d(Mechanism::ShadowTouch(TraceHandling::Trap)));
    kernel(&mut table, Subject::PageTouch, d(Mechanism::Interpreted));
    kernel(&mut table, Subject::RepString, d(Mechanism::InterpretedString));
    table
}

impl Engine for Hybrid {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn summary(&self) -> &'static str {
        "Popek & Goldberg's hybrid VMM: kernel interpreted, user direct, shadow paging (KVM's PVM)"
    }

    fn table(&self, options: &Options, _width: GuestWidth) -> Table {
        table(options)
    }

    /// The kernel never runs on the processor, so user code, in ring 3, is all the monitor guards itself from:
    /// supervisor pages suffice on either width.
    fn protection(&self, _options: &Options, _width: GuestWidth) -> Protection {
        Protection { kernel: KernelPlacement::Interpreted, guard: Guard::SupervisorPages }
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let protection = self.protection(options, trace.width());
        let monitor = Monitor::new(MonitorParts { shadow: true, protection, ..MonitorParts::default() }, profile);
        Ok(Box::new(Session::new(trace, profile, table(options), monitor, None)))
    }
}
