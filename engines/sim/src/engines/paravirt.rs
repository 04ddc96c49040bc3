//! `paravirt`: a Xen-style paravirtualized guest (Barham et al., SOSP 2003). The trace is replayed as if the guest
//! kernel had been ported to Xen: each privileged operation becomes the hypercall a Xen port issues for it,
//! page-table writes are queued and validated in `mmu_update` batches, the event mask and the kernel's register
//! copies live in memory shared with Xen, and interrupts arrive as event-channel upcalls. Xen's own costs: a
//! hypercall is the processor's transition into Xen and back plus Xen's dispatch (`paravirt.hypercall`).
//!
//! The two guest widths differ as the seeds describe: a 32-bit kernel runs in ring 1 under a Xen guarded by
//! segment limits, and its system calls reach it through the fast trap gate without entering Xen; on x86-64
//! (no segment limits, two paging privilege levels) kernel and user both run in ring 3 with two page tables, so
//! every system call enters Xen, which switches to the kernel's page tables, and every return is a
//! `HYPERVISOR_iret` that switches back — each switch a CR3 load and the TLB refills after it. On x86-32 only
//! `INT 0x80` takes the fast trap (Xen registers it from the guest's trap table); SYSENTER always enters ring 0,
//! so Xen bounces it, and the kernel returns to user mode with a plain ring-1 IRET.

use super::{d, protect};
use crate::engine::{Engine, EngineError, GuestBits, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::metrics::{ExitReason as R, Hypercall as H};
use crate::profile::Profile;
use crate::protection::{GuestWidth, Protection, XEN_MONITOR_BYTES};
use crate::replay::Session;
use crate::strategy::{Action, Disposition, Mechanism, Mode, Subject, Table};
use crate::trace::PreparedTrace;

pub use crate::mechanism::MAX_BATCH;

pub struct Paravirt;

/// The paravirtualized kernel's width: the trace's unless `paravirt.guest_bits` fixes it.
fn width_of(options: &Options, trace_width: GuestWidth) -> GuestWidth {
    match options.paravirt_guest_bits {
        GuestBits::Bits64 => GuestWidth::Bits64,
        GuestBits::Bits32 => GuestWidth::Bits32,
        GuestBits::Auto => trace_width,
    }
}

/// Xen's guest kernel: ring 1 under a Xen in the top 64 MiB on x86-32; ring 3 with two page tables on x86-64.
fn protection(width: GuestWidth) -> Protection {
    Protection::deprivileged(width, XEN_MONITOR_BYTES, false)
}

/// The table for a guest of the given width.
pub(crate) fn table_for(width: GuestWidth) -> Table {
    let bits64 = width == GuestWidth::Bits64;
    let mut table = Table::filled(d(Mechanism::Native));
    let hypercall = |kind| d(Mechanism::Hypercall(kind));
    let trap = |reason| d(Mechanism::Trap(reason));
    let kernel = |table: &mut Table, subject, disposition| {
        table.set_in(subject, Mode::Kernel, disposition);
    };
    // The event mask and the kernel's own register copies live in memory shared with Xen.
    for subject in [Subject::InterruptFlag, Subject::FlagsImage, Subject::ControlRead, Subject::Cr3Read] {
        kernel(&mut table, subject, d(Mechanism::SharedMemory));
    }
    for subject in [Subject::Cr8Read, Subject::Swapgs] {
        kernel(&mut table, subject, d(Mechanism::SharedMemory));
    }
    for (subject, reason) in [
        (Subject::DebugRegister, R::DrAccess),
        (Subject::Rdpmc, R::Rdpmc),
        (Subject::CacheControl, R::Wbinvd),
        (Subject::OtherPrivileged, R::PrivilegedInstruction),
    ] {
        kernel(&mut table, subject, trap(reason));
    }
    super::monitor_tables_visible_to_user(&mut table);
    if bits64 {
        table.set(Subject::Syscall, d(Mechanism::Bounce(R::SystemCall)));
        table.set(Subject::SoftwareInterrupt, d(Mechanism::Bounce(R::SystemCall)));
        table.set(Subject::SystemCallGate, d(Mechanism::Bounce(R::SystemCall)));
        table.set(Subject::Sysret, hypercall(H::Iret));
        table.set(Subject::Iret, hypercall(H::Iret));
        table.set(Subject::EnterKernel, Disposition::with(Mechanism::Native, &[Action::PageTableSwitch]));
        table.set(
            Subject::ReturnToUser,
            Disposition::with(Mechanism::Native, &[Action::FlushBatch, Action::PageTableSwitch]),
        );
    } else {
        // The fast system-call handler: the processor enters the ring-1 kernel directly, and returns natively.
        table.set(Subject::SystemCallGate, Disposition::with(Mechanism::Native, &[Action::FastSystemCall]));
        table.set(Subject::Syscall, d(Mechanism::Bounce(R::SystemCall)));
        table.set(Subject::SoftwareInterrupt, d(Mechanism::Bounce(R::SystemCall)));
        table.set(Subject::ReturnToUser, Disposition::with(Mechanism::Native, &[Action::FlushBatch]));
    }
    // CR2 is readable in ring 0 only: every fault goes through Xen.
    table.set(Subject::PageFault, Disposition::with(Mechanism::Bounce(R::ExceptionNmi), &[Action::TrueFault]));
    table.set(Subject::Exception, d(Mechanism::Bounce(R::ExceptionNmi)));
    table.set(Subject::Interrupt, d(Mechanism::Upcall));
    table.set(
        Subject::Cr3Write,
        Disposition::with(Mechanism::Hypercall(H::MmuextOp), &[Action::FlushBatch, Action::StackSwitch]),
    );
    table.set(Subject::Cr3Reload, Disposition::with(Mechanism::Hypercall(H::MmuextOp), &[Action::FlushBatch]));
    table.set(Subject::Cr0WriteOwned, hypercall(H::FpuTaskswitch));
    table.set(Subject::Cr0Write, hypercall(H::FpuTaskswitch));
    // Xen emulates a write of the guest's CR2 when it traps the privileged instruction.
    table.set(Subject::Cr2Write, trap(R::CrAccess));
    // The TPR is the event mask in shared memory.
    table.set(Subject::Cr8Write, d(Mechanism::SharedMemory));
    for subject in [Subject::Cr4WriteOwned, Subject::Cr4Write] {
        table.set(subject, Disposition::with(Mechanism::Trap(R::CrAccess), &[Action::FlushBatch]));
    }
    table.set(Subject::MsrWriteSegmentBase, hypercall(H::SetSegmentBase));
    // A PV kernel registers its system-call entry points, SYSENTER's included, with Xen.
    table.set(Subject::MsrWriteSyscallSetup, hypercall(H::SetCallbacks));
    table.set(Subject::MsrWriteSysenter, hypercall(H::SetCallbacks));
    table.set(Subject::MsrReadSysenter, trap(R::MsrRead));
    table.set(Subject::MsrWriteOther, trap(R::MsrWrite));
    table.set(Subject::MsrReadSegmentBase, trap(R::MsrRead));
    table.set(Subject::MsrReadOther, trap(R::MsrRead));
    table.set(Subject::PostPort, d(Mechanism::Elided));
    table.set(Subject::ConsolePort, hypercall(H::ConsoleIo));
    table.set(Subject::OtherPort, hypercall(H::PhysdevOp));
    table.set(Subject::Mmio, Disposition::with(Mechanism::Trap(R::Mmio), &[Action::Device]));
    table.set(Subject::Cpuid, d(Mechanism::Detectable("cpuid_reports_host")));
    table.set(Subject::Invlpg, Disposition::with(Mechanism::Hypercall(H::MmuextOp), &[Action::FlushBatch]));
    table.set(Subject::GdtLoad, hypercall(H::SetGdt));
    table.set(Subject::IdtLoad, hypercall(H::SetTrapTable));
    table.set(Subject::LdtLoad, hypercall(H::MmuextOp));
    table.set(Subject::TrLoad, hypercall(H::StackSwitch));
    table.set(Subject::Hlt, hypercall(H::SchedOp));
    table.set(Subject::PageTableWrite, d(Mechanism::Queued));
    protect(&mut table, protection(width));
    table
}

impl Engine for Paravirt {
    fn name(&self) -> &'static str {
        "paravirt"
    }

    fn summary(&self) -> &'static str {
        "Xen-style paravirtualization: hypercalls, batched page-table updates, event channels"
    }

    fn table(&self, options: &Options, width: GuestWidth) -> Table {
        table_for(width_of(options, width))
    }

    fn protection(&self, options: &Options, width: GuestWidth) -> Protection {
        protection(width_of(options, width))
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let width = width_of(options, trace.width());
        let bits64 = width == GuestWidth::Bits64;
        let protection = protection(width);
        let parts =
            MonitorParts { batch: true, pv_bits64: bits64, flushes: bits64, protection, ..MonitorParts::default() };
        let monitor = Monitor::new(parts, profile);
        Ok(Box::new(Session::new(trace, profile, table_for(width), monitor, None)))
    }
}
