//! The seven engines. Each is its strategy table (what it does with each instruction class and event, as data)
//! and the parts of the monitor's state it keeps; the replay driver does the rest. Shared here: the exit reason,
//! hole and detectable event each sensitive instruction gives, and the rows several tables share.

pub mod bt;
pub mod hw;
pub mod hybrid;
pub mod native;
pub mod paravirt;
pub mod trap_emulate;

use crate::classify::Op;
use crate::metrics::ExitReason;
use crate::protection::{KernelPlacement, Protection};
use crate::strategy::{Action, Disposition, Mechanism, Mode, Subject, Table, TraceHandling};

/// The exit reason hardware and software monitors give a trapping instruction.
pub(crate) fn exit_reason_of(op: Op) -> ExitReason {
    match op {
        Op::Cli | Op::Sti | Op::Popf | Op::Pushf => ExitReason::InterruptFlag,
        Op::MovToCr(_) | Op::MovFromCr(_) => ExitReason::CrAccess,
        Op::MovDr => ExitReason::DrAccess,
        Op::Lgdt | Op::Lidt | Op::Sgdt | Op::Sidt => ExitReason::GdtrIdtr,
        Op::Lldt | Op::Ltr | Op::Sldt | Op::Str => ExitReason::LdtrTr,
        Op::Smsw => ExitReason::CrAccess,
        Op::Rdmsr => ExitReason::MsrRead,
        Op::Wrmsr => ExitReason::MsrWrite,
        Op::PortIn | Op::PortOut => ExitReason::IoInstruction,
        Op::Hlt => ExitReason::Hlt,
        Op::Invlpg => ExitReason::Invlpg,
        Op::Cpuid => ExitReason::Cpuid,
        Op::Rdtsc => ExitReason::Rdtsc,
        Op::Rdpmc => ExitReason::Rdpmc,
        Op::Swapgs => ExitReason::Swapgs,
        Op::Syscall | Op::Sysret | Op::SoftwareInterrupt => ExitReason::SystemCall,
        Op::Iret => ExitReason::Iret,
        Op::CacheFlush => ExitReason::Wbinvd,
        Op::Xsetbv => ExitReason::Xsetbv,
        Op::Innocuous
        | Op::Lar
        | Op::Lsl
        | Op::Verr
        | Op::Verw
        | Op::ReadCodeOrStackSelector
        | Op::FarTransfer
        | Op::SegmentLoad
        | Op::OtherPrivileged => ExitReason::PrivilegedInstruction,
    }
}

/// The hole a deprivileged kernel falls into when it runs a sensitive-unprivileged instruction directly; `None`
/// where it depends on the ring the kernel runs in, which the table's row names ([`selector_hole`]).
pub(crate) fn kernel_hole(op: Op) -> Option<&'static str> {
    Some(match op {
        Op::Popf => "popf_ignores_if",
        Op::Pushf => "pushf_reveals_real_if",
        Op::Sgdt => "sgdt_reveals_monitor_gdt",
        Op::Sidt => "sidt_reveals_monitor_idt",
        Op::Sldt => "sldt_reveals_monitor_ldt",
        Op::Str => "str_reveals_monitor_tr",
        Op::Smsw => "smsw_reveals_monitor_cr0",
        Op::Lar | Op::Lsl | Op::Verr | Op::Verw => "segment_check_sees_deprivileged_dpl",
        Op::ReadCodeOrStackSelector => return None,
        _ => "far_transfer_sees_deprivileged_cpl",
    })
}

/// MOV from CS or SS, PUSH CS or SS in a deprivileged kernel: the selector's RPL is the ring the kernel really
/// runs in.
pub(crate) fn selector_hole(protection: Protection) -> &'static str {
    match protection.kernel {
        KernelPlacement::Ring(1) => "selector_shows_rpl_1",
        KernelPlacement::Ring(2) => "selector_shows_rpl_2",
        _ => "selector_shows_rpl_3",
    }
}

/// What user mode can observe with a sensitive-unprivileged instruction when the monitor's own tables are loaded
/// (the "red pill").
pub(crate) fn user_detectable(op: Op) -> Option<&'static str> {
    match op {
        Op::Sgdt => Some("sgdt_reveals_monitor_gdt"),
        Op::Sidt => Some("sidt_reveals_monitor_idt"),
        Op::Sldt => Some("sldt_reveals_monitor_ldt"),
        Op::Str => Some("str_reveals_monitor_tr"),
        Op::Smsw => Some("smsw_reveals_monitor_cr0"),
        Op::Lar | Op::Lsl | Op::Verr | Op::Verw => Some("segment_check_sees_deprivileged_dpl"),
        _ => None,
    }
}

const fn d(mechanism: Mechanism) -> Disposition {
    Disposition::new(mechanism)
}

/// User code run directly under a software monitor whose descriptor tables are loaded: the red-pill instructions
/// see the monitor's.
fn monitor_tables_visible_to_user(table: &mut Table) {
    let detectable = d(Mechanism::Detectable("reveals the monitor's descriptor tables"));
    table.set_in(Subject::DescriptorRead, Mode::User, detectable);
    table.set_in(Subject::SegmentCheck, Mode::User, detectable);
}

/// The rows a monitor's self-protection adds: a deprivileged kernel loads its segment registers through the
/// monitor's copies of its descriptors (and so does user code when the monitor truncates segments), and under
/// segment limits a touch of the monitor's area faults. Call after the page-touch rows are set.
fn protect(table: &mut Table, protection: Protection) {
    let shadow = d(Mechanism::ShadowDescriptor);
    if matches!(protection.kernel, KernelPlacement::Ring(ring) if ring > 0) {
        table.set_in(Subject::SegmentLoad, Mode::Kernel, shadow);
    }
    if protection.truncates_segments() {
        table.set_in(Subject::SegmentLoad, Mode::User, shadow);
        for mode in Mode::ALL {
            let touch = table.get(Subject::PageTouch, mode);
            debug_assert!(touch.actions.is_empty(), "a page touch's actions would be replaced");
            table.set_in(Subject::PageTouch, mode, Disposition::with(touch.mechanism, &[Action::GuardCheck]));
        }
    }
}

/// What a software monitor (trap-and-emulate, BT, the hybrid monitor for user code) does with the guest's
/// memory: shadow page tables traced by write protection, every guest #PF classified first.
fn shadow_paging(table: &mut Table, touch: TraceHandling, write: TraceHandling) {
    table
        .set(Subject::PageTouch, d(Mechanism::ShadowTouch(touch)))
        .set(Subject::PageTableWrite, d(Mechanism::Traced(write)))
        .set(
            Subject::PageFault,
            Disposition::with(
                Mechanism::Reflect(ExitReason::ExceptionNmi),
                &[Action::ClassifyFault, Action::TrueFault],
            ),
        )
        .set(Subject::Exception, d(Mechanism::Reflect(ExitReason::ExceptionNmi)))
        .set(Subject::Interrupt, d(Mechanism::Reflect(ExitReason::ExternalInterrupt)));
}

/// A software monitor's traps on privileged events, with the shadow actions they take.
fn trapping_privileged_events(table: &mut Table) {
    use ExitReason as R;
    let trap = |reason| d(Mechanism::Trap(reason));
    let owned = Disposition::with(Mechanism::Trap(R::CrAccess), &[Action::ShadowRebuild]);
    let cr3 = Disposition::with(Mechanism::Trap(R::CrAccess), &[Action::ShadowSwitch]);
    let device = |reason| Disposition::with(Mechanism::Trap(reason), &[Action::Device]);
    table
        .set(Subject::Sysret, trap(R::SystemCall))
        .set(Subject::Iret, trap(R::Iret))
        .set(Subject::Cr0WriteOwned, owned)
        .set(Subject::Cr4WriteOwned, owned)
        .set(Subject::Cr0Write, trap(R::CrAccess))
        .set(Subject::Cr2Write, trap(R::CrAccess))
        .set(Subject::Cr4Write, trap(R::CrAccess))
        .set(Subject::Cr8Write, trap(R::CrAccess))
        .set(Subject::Cr3Write, cr3)
        .set(Subject::Cr3Reload, cr3)
        .set(Subject::MsrReadSegmentBase, trap(R::MsrRead))
        .set(Subject::MsrReadOther, trap(R::MsrRead))
        .set(Subject::MsrWriteSegmentBase, trap(R::MsrWrite))
        .set(Subject::MsrWriteSyscallSetup, trap(R::MsrWrite))
        .set(Subject::MsrWriteOther, trap(R::MsrWrite))
        .set(Subject::MsrReadSysenter, trap(R::MsrRead))
        .set(Subject::MsrWriteSysenter, trap(R::MsrWrite))
        .set(Subject::PostPort, device(R::IoInstruction))
        .set(Subject::ConsolePort, device(R::IoInstruction))
        .set(Subject::OtherPort, device(R::IoInstruction))
        .set(Subject::Mmio, device(R::Mmio))
        .set(Subject::Invlpg, Disposition::with(Mechanism::Trap(R::Invlpg), &[Action::ShadowInvalidate]))
        .set(Subject::GdtLoad, trap(R::GdtrIdtr))
        .set(Subject::IdtLoad, trap(R::GdtrIdtr))
        .set(Subject::LdtLoad, trap(R::LdtrTr))
        .set(Subject::TrLoad, trap(R::LdtrTr))
        .set(Subject::Hlt, trap(R::Hlt));
}
