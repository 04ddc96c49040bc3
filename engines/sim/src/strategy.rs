//! The strategy table: what each engine does with each instruction class and each kind of event, as data.
//!
//! A [`Table`] maps every [`Subject`] (an instruction class the trace has no event for, or an event, refined by
//! what decides a strategy's choice) in each [`Mode`] to a [`Disposition`]: the [`Mechanism`] that carries it out
//! and the [`Action`]s it takes on the monitor's state. The replay driver derives each block's plan and each
//! event's handling from the table and charges every mechanism from the profile in one place
//! (`replay.rs`); engines keep code only for real state (shadow page tables, the translation cache, the
//! hypercall batch). `virtlab engines --table` prints the tables, and `engines/sim/README.md`'s table is
//! generated from them (a test fails when the two drift).

use virtlab_traces::Event;

use crate::classify::Op;
use crate::metrics::{ExitReason, Hypercall};

/// The POST port: an I/O delay with no device behind it.
pub const POST_PORT: u16 = virtlab_machine_facts::MACHINE.post_port;
/// The vector of the system-call gate, as Linux and the lab's 32-bit kernel use it (a paravirtualized kernel
/// registers it with Xen as its fast trap).
pub const SYSTEM_CALL_VECTOR: u8 = 0x80;
/// COM1's registers.
pub const CONSOLE_PORTS: std::ops::RangeInclusive<u16> = virtlab_machine_facts::MACHINE.serial_ports();
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
/// IA32_SYSENTER_CS, _ESP and _EIP: where SYSENTER enters the kernel.
const MSR_SYSENTER: std::ops::RangeInclusive<u32> = 0x174..=0x176;

/// The guest's privilege when the subject happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Kernel,
    User,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Kernel, Mode::User];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::User => "user",
        }
    }
}

macro_rules! subjects {
    ($( $variant:ident => $name:literal, )*) => {
        /// What a strategy decides about: an instruction class the trace has no event for, or an event (refined
        /// by the facts a strategy's choice depends on: which control register, which MSR, which port).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Subject {
            $( $variant, )*
        }

        impl Subject {
            pub const ALL: &'static [Subject] = &[$( Subject::$variant, )*];
            pub const COUNT: usize = Subject::ALL.len();

            pub fn name(self) -> &'static str {
                match self {
                    $( Subject::$variant => $name, )*
                }
            }
        }
    };
}

subjects! {
    Instructions => "plain instructions",
    InterruptFlag => "CLI, STI",
    FlagsImage => "PUSHF, POPF",
    DescriptorRead => "SGDT, SIDT, SLDT, STR, SMSW",
    SegmentCheck => "LAR, LSL, VERR, VERW",
    SelectorRead => "MOV from CS/SS, PUSH CS/SS",
    FarTransfer => "far CALL, JMP, RET",
    SegmentLoad => "MOV/POP to a segment register, LDS/LES/LFS/LGS/LSS",
    ControlRead => "MOV from CR0, CR2, CR4",
    Cr3Read => "MOV from CR3",
    Cr8Read => "MOV from CR8",
    DebugRegister => "MOV to/from DR",
    TimeStamp => "RDTSC",
    Rdpmc => "RDPMC",
    Swapgs => "SWAPGS",
    CacheControl => "WBINVD, INVD, XSETBV",
    OtherPrivileged => "other privileged instructions",
    Syscall => "SYSCALL, SYSENTER",
    SoftwareInterrupt => "INT n",
    SystemCallGate => "INT 0x80 (the system-call gate)",
    Sysret => "SYSRET, SYSEXIT",
    Iret => "IRET",
    PageFault => "page fault (true, the guest's)",
    Exception => "other exception",
    Interrupt => "external interrupt",
    Cr0WriteOwned => "MOV CR0 changing a host-owned bit",
    Cr0Write => "MOV CR0, other bits",
    Cr2Write => "MOV CR2",
    Cr3Write => "MOV CR3, another address space",
    Cr3Reload => "MOV CR3, the same value (a TLB flush)",
    Cr4WriteOwned => "MOV CR4 changing a host-owned bit",
    Cr4Write => "MOV CR4, other bits",
    Cr8Write => "MOV CR8",
    MsrReadSegmentBase => "RDMSR of FS/GS/KERNEL_GS base",
    MsrReadOther => "other RDMSR",
    MsrWriteSegmentBase => "WRMSR of FS/GS/KERNEL_GS base",
    MsrWriteSyscallSetup => "WRMSR of STAR/LSTAR/CSTAR/SFMASK",
    MsrWriteOther => "other WRMSR",
    MsrReadSysenter => "RDMSR of SYSENTER_CS/ESP/EIP",
    MsrWriteSysenter => "WRMSR of SYSENTER_CS/ESP/EIP",
    PostPort => "IN/OUT, POST port 0x80",
    ConsolePort => "IN/OUT, serial console",
    OtherPort => "IN/OUT, other ports",
    Mmio => "MMIO access",
    Cpuid => "CPUID",
    Invlpg => "INVLPG",
    GdtLoad => "LGDT",
    IdtLoad => "LIDT",
    LdtLoad => "LLDT",
    TrLoad => "LTR",
    Hlt => "HLT",
    PageTableWrite => "page-table write",
    PageTouch => "first touch of a page (TLB fill)",
    RepString => "REP string work",
    EnterKernel => "switch to kernel mode",
    ReturnToUser => "switch to user mode",
}

impl Subject {
    /// The subject of an operation the trace has no event for (`None` for those with one).
    pub fn of_op(op: Op) -> Option<Subject> {
        Some(match op {
            Op::Innocuous => Subject::Instructions,
            Op::Cli | Op::Sti => Subject::InterruptFlag,
            Op::Pushf | Op::Popf => Subject::FlagsImage,
            Op::Sgdt | Op::Sidt | Op::Sldt | Op::Str | Op::Smsw => Subject::DescriptorRead,
            Op::Lar | Op::Lsl | Op::Verr | Op::Verw => Subject::SegmentCheck,
            Op::ReadCodeOrStackSelector => Subject::SelectorRead,
            Op::FarTransfer => Subject::FarTransfer,
            Op::SegmentLoad => Subject::SegmentLoad,
            Op::MovFromCr(8) => Subject::Cr8Read,
            Op::MovFromCr(3) => Subject::Cr3Read,
            Op::MovFromCr(_) => Subject::ControlRead,
            Op::MovDr => Subject::DebugRegister,
            Op::Rdtsc => Subject::TimeStamp,
            Op::Rdpmc => Subject::Rdpmc,
            Op::Swapgs => Subject::Swapgs,
            Op::CacheFlush | Op::Xsetbv => Subject::CacheControl,
            Op::OtherPrivileged => Subject::OtherPrivileged,
            _ => return None,
        })
    }

    /// The row an instruction belongs to, as far as its own bytes tell: the port of IN/OUT through DX, which MSR
    /// and whether a control-register write changes host-owned bits are known only when it runs, so those take
    /// the general row (the event decides at replay).
    pub fn of_instruction(op: Op, immediate_port: Option<u16>) -> Subject {
        if let Some(subject) = Subject::of_op(op) {
            return subject;
        }
        match op {
            Op::MovToCr(0) => Subject::Cr0Write,
            Op::MovToCr(2) => Subject::Cr2Write,
            Op::MovToCr(3) => Subject::Cr3Write,
            Op::MovToCr(4) => Subject::Cr4Write,
            Op::MovToCr(_) => Subject::Cr8Write,
            Op::Rdmsr => Subject::MsrReadOther,
            Op::Wrmsr => Subject::MsrWriteOther,
            Op::PortIn | Op::PortOut => match immediate_port {
                Some(POST_PORT) => Subject::PostPort,
                Some(port) if CONSOLE_PORTS.contains(&port) => Subject::ConsolePort,
                _ => Subject::OtherPort,
            },
            Op::Hlt => Subject::Hlt,
            Op::Invlpg => Subject::Invlpg,
            Op::Cpuid => Subject::Cpuid,
            Op::Syscall => Subject::Syscall,
            Op::Sysret => Subject::Sysret,
            Op::Iret => Subject::Iret,
            Op::SoftwareInterrupt => Subject::SoftwareInterrupt,
            Op::Lgdt => Subject::GdtLoad,
            Op::Lidt => Subject::IdtLoad,
            Op::Lldt => Subject::LdtLoad,
            Op::Ltr => Subject::TrLoad,
            _ => Subject::OtherPrivileged,
        }
    }

    /// The subject of an event, given the context before it; `None` for block executions and for context
    /// changes that do not switch between user and kernel mode.
    #[inline(always)]
    pub fn of_event(event: &Event, user_before: bool) -> Option<Subject> {
        Some(match *event {
            Event::Block(_) | Event::PartialBlock { .. } => return None,
            Event::Context { context, .. } => match (user_before, context.is_user()) {
                (true, false) => Subject::EnterKernel,
                (false, true) => Subject::ReturnToUser,
                _ => return None,
            },
            Event::Syscall { .. } => Subject::Syscall,
            Event::SoftwareInterrupt { vector: SYSTEM_CALL_VECTOR, .. } => Subject::SystemCallGate,
            Event::SoftwareInterrupt { .. } => Subject::SoftwareInterrupt,
            Event::Sysret { .. } => Subject::Sysret,
            Event::Iret { .. } => Subject::Iret,
            Event::Exception { vector: 14, .. } => Subject::PageFault,
            Event::Exception { .. } => Subject::Exception,
            Event::Interrupt { .. } => Subject::Interrupt,
            Event::CrWrite { cr, old, new, .. } => match cr {
                0 if (old ^ new) & CR0_HOST_OWNED != 0 => Subject::Cr0WriteOwned,
                0 => Subject::Cr0Write,
                2 => Subject::Cr2Write,
                3 if old == new => Subject::Cr3Reload,
                3 => Subject::Cr3Write,
                4 if (old ^ new) & CR4_HOST_OWNED != 0 => Subject::Cr4WriteOwned,
                4 => Subject::Cr4Write,
                _ => Subject::Cr8Write,
            },
            Event::MsrRead { index, .. } => match index {
                MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE => Subject::MsrReadSegmentBase,
                index if MSR_SYSENTER.contains(&index) => Subject::MsrReadSysenter,
                _ => Subject::MsrReadOther,
            },
            Event::MsrWrite { index, .. } => match index {
                MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE => Subject::MsrWriteSegmentBase,
                MSR_STAR | MSR_LSTAR | MSR_CSTAR | MSR_SFMASK => Subject::MsrWriteSyscallSetup,
                index if MSR_SYSENTER.contains(&index) => Subject::MsrWriteSysenter,
                _ => Subject::MsrWriteOther,
            },
            Event::Io { port, .. } if port == POST_PORT => Subject::PostPort,
            Event::Io { port, .. } if CONSOLE_PORTS.contains(&port) => Subject::ConsolePort,
            Event::Io { .. } => Subject::OtherPort,
            Event::Mmio { .. } => Subject::Mmio,
            Event::Cpuid { .. } => Subject::Cpuid,
            Event::Invlpg { .. } => Subject::Invlpg,
            Event::DescriptorLoad { load, .. } => match load {
                virtlab_traces::DescriptorLoad::Gdt { .. } => Subject::GdtLoad,
                virtlab_traces::DescriptorLoad::Idt { .. } => Subject::IdtLoad,
                virtlab_traces::DescriptorLoad::Ldt { .. } => Subject::LdtLoad,
                virtlab_traces::DescriptorLoad::Tr { .. } => Subject::TrLoad,
            },
            Event::Hlt { .. } => Subject::Hlt,
            Event::PageTableWrite { .. } => Subject::PageTableWrite,
            Event::PageTouch { .. } => Subject::PageTouch,
            Event::RepString { .. } => Subject::RepString,
        })
    }

    /// Whether the subject is an instruction class without events (charged in block plans).
    pub fn is_instruction_class(self) -> bool {
        self <= Subject::OtherPrivileged
    }
}

/// CR0 bits a VT-x monitor owns (guest/host mask): PE, ET, NE... as KVM sets them: PE, NW/CD, WP, PG, NE.
pub const CR0_HOST_OWNED: u64 = 1 | (1 << 5) | (1 << 16) | (1 << 29) | (1 << 30) | (1 << 31);
/// CR4 bits a VT-x monitor owns: PSE, PAE, PGE, PCIDE, OSXSAVE... every bit that changes paging or the
/// monitor's own use of the processor.
pub const CR4_HOST_OWNED: u64 =
    (1 << 4) | (1 << 5) | (1 << 7) | (1 << 12) | (1 << 13) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21);

/// How a VM exit's handler completes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handling {
    /// The exit qualification says what to do: emulate without decoding.
    Emulate,
    /// The handler fetches the guest instruction through a software page walk and decodes it before emulating
    /// (memory accesses: traced writes, MMIO).
    FetchDecodeEmulate,
    /// The handler injects the event back into the guest (exception, interrupt).
    Inject,
    /// Nested paging: the host maps the guest-physical page.
    MapGuestPage,
    /// Shadow paging: a hidden fault, filled from the guest's tables.
    ShadowFill,
    /// HLT: the vCPU sleeps until an interrupt.
    Halt,
}

/// How a strategy carries out one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// The processor runs it: its native cost.
    Native,
    /// Runs natively, and the guest can tell it is virtualized (host values, timing).
    Detectable(&'static str),
    /// Runs natively with the wrong result: a virtualization hole.
    Hole(&'static str),
    /// A trap into the software monitor, which decodes and emulates the instruction.
    Trap(ExitReason),
    /// A trap into the software monitor, which reflects the transfer into the guest kernel.
    Reflect(ExitReason),
    /// Inside the interpreter: the instruction's cost is the interpreter's per-instruction cost.
    Interpreted,
    /// Inside the interpreter, a transfer: the interpreter builds the guest's frame itself.
    InterpretedTransfer,
    /// Inside the interpreter, an operation the interpreter completes with the monitor's emulation.
    InterpretedEmulate,
    /// Inside the interpreter, a device access handed to the device model (an exit of the interpreted kernel).
    InterpretedDevice(ExitReason),
    /// Inside the interpreter, a string instruction stepped one element at a time.
    InterpretedString,
    /// Kernel code under binary translation: the CCF code the translator emits for the instruction, charged as
    /// emitted.
    Translated(Emitted),
    /// Kernel code under binary translation, a transfer: the callout the translator emitted, then the monitor
    /// reflects it into the guest.
    TranslatedTransfer,
    /// A guest page-table write: traps when the page is traced (the shadow decides), else a plain store.
    Traced(TraceHandling),
    /// A first touch the shadow page tables may miss: a hidden fault is filled after a trap or an exit.
    ShadowTouch(TraceHandling),
    /// Nested paging: the processor's two-dimensional walk; a new guest-physical frame exits.
    NestedWalk,
    /// A hypercall into Xen.
    Hypercall(Hypercall),
    /// A trap into Xen, which bounces it into the guest kernel (a bounce frame, then the return into the guest).
    Bounce(ExitReason),
    /// Queued for the next `mmu_update` batch.
    Queued,
    /// An event-channel upcall.
    Upcall,
    /// State Xen and the guest share in memory: a plain access.
    SharedMemory,
    /// A paravirtualized kernel does not do it at all (no I/O delay).
    Elided,
    /// A VM exit, completed as [`Handling`] says.
    VmExit(ExitReason, Handling),
    /// Runs in guest mode without an exit.
    GuestMode,
    /// Runs directly against the monitor's copy of the guest's descriptor (its privilege raised to the ring the
    /// kernel runs in, its limit truncated below the monitor), kept in the monitor's GDT: counted.
    ShadowDescriptor,
}

/// What the binary translator emits for a kernel instruction (its rules are `translate.rs`'s module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emitted {
    /// A copy (IDENT), or a rewrite that stays in the translation cache: branches end in continuation stubs or the
    /// indirect-branch lookup, RIP-relative and `%gs` operands are re-addressed. (An instruction that reads or loads
    /// `%gs` itself, which the monitor reserves, is a callout whatever its row.)
    Ident,
    /// A few instructions against the virtual CPU's state in the vCPU area (STI, POPF and CR8 writes end with a
    /// check for a pending interrupt they unmask); a callout where no such sequence exists (RDTSCP, an operand
    /// form the rewrite cannot express).
    InTc,
    /// A call or jump out of the translation cache into the monitor, which emulates the instruction.
    Callout,
    /// A call to the in-TC I/O helper for an immediate port listed in `bt.in_tc_ports`; a callout otherwise.
    PortIo,
}

/// How a traced write or a hidden fault reaches the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceHandling {
    /// A software trap (with decode and emulate for a write).
    Trap,
    /// A VM exit.
    VmExit,
    /// The interpreter sees kernel stores itself and translates kernel addresses itself: no trap.
    Interpreter,
    /// BT: a trap until adaptive translation makes the writing instruction call the write helper.
    Adaptive,
}

/// What a disposition does to the monitor's state, beyond its mechanism's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Shadow paging: switch to the new CR3's shadow root.
    ShadowSwitch,
    /// Shadow paging: INVLPG drops the page's shadow entries (and resynchronizes out-of-sync tables).
    ShadowInvalidate,
    /// Shadow paging: a CR0/CR4 write that changes paging drops every shadow.
    ShadowRebuild,
    /// The monitor's device model handles the access.
    Device,
    /// Hardware assist with `hw.user_space_devices`: the device exit goes on to a user-space device model.
    UserSpaceDevice,
    /// Paravirt: the queued page-table updates go to Xen first.
    FlushBatch,
    /// Paravirt x86-64: switch between the guest's user and kernel page tables (a CR3 load and the TLB refill).
    PageTableSwitch,
    /// Paravirt: tell Xen the new kernel stack (`stack_switch`), on a context switch.
    StackSwitch,
    /// Shadow paging: every guest #PF reaches the monitor first, which walks the guest's tables to tell a true
    /// fault from a hidden one.
    ClassifyFault,
    /// A true page fault, counted (`shadow.true_faults`).
    TrueFault,
    /// Segment limits guard the monitor: a touch of a page in its area is an access beyond a truncated limit,
    /// a #GP the monitor takes and emulates (counted, with the guest address).
    GuardCheck,
    /// Paravirt x86-32: the system call went through the fast trap gate straight into the ring-1 kernel (counted).
    FastSystemCall,
}

/// One cell of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disposition {
    pub mechanism: Mechanism,
    pub actions: &'static [Action],
}

impl Disposition {
    pub const fn new(mechanism: Mechanism) -> Disposition {
        Disposition { mechanism, actions: &[] }
    }

    pub const fn with(mechanism: Mechanism, actions: &'static [Action]) -> Disposition {
        Disposition { mechanism, actions }
    }
}

/// One engine's whole table: a disposition for every subject in every mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    cells: Vec<[Disposition; 2]>,
}

impl Table {
    /// A table whose every cell is `default`; rows are then set with [`Table::set`].
    pub fn filled(default: Disposition) -> Table {
        Table { cells: vec![[default; 2]; Subject::COUNT] }
    }

    /// Set a subject's disposition in both modes.
    pub fn set(&mut self, subject: Subject, disposition: Disposition) -> &mut Table {
        self.cells[subject as usize] = [disposition; 2];
        self
    }

    /// Set a subject's disposition in one mode.
    pub fn set_in(&mut self, subject: Subject, mode: Mode, disposition: Disposition) -> &mut Table {
        self.cells[subject as usize][mode as usize] = disposition;
        self
    }

    #[inline]
    pub fn get(&self, subject: Subject, mode: Mode) -> Disposition {
        self.cells[subject as usize][mode as usize]
    }
}

/// One row of a printed table: a subject, in one mode when some table treats the two modes differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub subject: Subject,
    /// `None` when every table treats the subject alike in both modes.
    pub mode: Option<Mode>,
}

impl Row {
    pub fn label(&self) -> String {
        match self.mode {
            None => self.subject.name().to_string(),
            Some(mode) => format!("{} ({})", self.subject.name(), mode.name()),
        }
    }
}

/// The rows that print `tables` side by side: one per subject, or one per mode where some table tells the modes
/// apart.
pub fn rows<'a>(tables: impl IntoIterator<Item = &'a Table> + Clone) -> Vec<Row> {
    let mut rows = Vec::new();
    for &subject in Subject::ALL {
        let split = tables.clone().into_iter().any(|t| t.get(subject, Mode::Kernel) != t.get(subject, Mode::User));
        if split {
            rows.extend(Mode::ALL.map(|mode| Row { subject, mode: Some(mode) }));
        } else {
            rows.push(Row { subject, mode: None });
        }
    }
    rows
}

impl Table {
    /// The disposition a row shows (kernel mode for a row that does not split by mode).
    pub fn at(&self, row: Row) -> Disposition {
        self.get(row.subject, row.mode.unwrap_or(Mode::Kernel))
    }
}

/// Titled tables side by side as a Markdown table: one column per table, one row per [`rows`].
pub fn markdown(tables: &[(String, Table)]) -> String {
    let mut out = String::from("| subject |");
    for (title, _) in tables {
        out += &format!(" {title} |");
    }
    out += "\n|---|";
    out += &"---|".repeat(tables.len());
    out.push('\n');
    for row in rows(tables.iter().map(|(_, t)| t)) {
        out += &format!("| {} |", row.label());
        for (_, table) in tables {
            out += &format!(" {} |", describe(&table.at(row)));
        }
        out.push('\n');
    }
    out
}

impl Mechanism {
    /// A short machine-readable name of the mechanism's kind (`--json`).
    pub fn kind(&self) -> &'static str {
        match self {
            Mechanism::Native => "native",
            Mechanism::Detectable(_) => "detectable",
            Mechanism::Hole(_) => "hole",
            Mechanism::Trap(_) => "trap",
            Mechanism::Reflect(_) => "reflect",
            Mechanism::Interpreted => "interpreted",
            Mechanism::InterpretedTransfer => "interpreted_transfer",
            Mechanism::InterpretedEmulate => "interpreted_emulate",
            Mechanism::InterpretedDevice(_) => "interpreted_device",
            Mechanism::InterpretedString => "interpreted_string",
            Mechanism::Translated(_) => "translated",
            Mechanism::TranslatedTransfer => "translated_transfer",
            Mechanism::Traced(_) => "traced",
            Mechanism::ShadowTouch(_) => "shadow_touch",
            Mechanism::NestedWalk => "nested_walk",
            Mechanism::Hypercall(_) => "hypercall",
            Mechanism::Bounce(_) => "bounce",
            Mechanism::Queued => "queued",
            Mechanism::Upcall => "upcall",
            Mechanism::SharedMemory => "shared_memory",
            Mechanism::Elided => "elided",
            Mechanism::VmExit(..) => "vm_exit",
            Mechanism::GuestMode => "guest_mode",
            Mechanism::ShadowDescriptor => "shadow_descriptor",
        }
    }

    /// The exit (or trap) reason the mechanism counts, if it counts one.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        match *self {
            Mechanism::Trap(reason)
            | Mechanism::Reflect(reason)
            | Mechanism::InterpretedDevice(reason)
            | Mechanism::Bounce(reason)
            | Mechanism::VmExit(reason, _) => Some(reason),
            _ => None,
        }
    }
}

/// A cell as the printed table shows it.
pub fn describe(disposition: &Disposition) -> String {
    let mut text = match disposition.mechanism {
        Mechanism::Native => "direct".to_string(),
        Mechanism::Detectable(kind) => format!("direct: detectable ({kind})"),
        Mechanism::Hole(kind) => format!("direct: hole ({kind})"),
        Mechanism::Trap(reason) => format!("trap [{}] + decode + emulate", reason.name()),
        Mechanism::Reflect(reason) => format!("trap [{}] + reflect", reason.name()),
        Mechanism::Interpreted => "interpreted".to_string(),
        Mechanism::InterpretedTransfer => "interpreted: the interpreter reflects it".to_string(),
        Mechanism::InterpretedEmulate => "interpreted + emulate".to_string(),
        Mechanism::InterpretedDevice(reason) => format!("interpreted; exit [{}]", reason.name()),
        Mechanism::InterpretedString => "interpreted one element at a time".to_string(),
        Mechanism::Translated(emitted) => match emitted {
            Emitted::Ident => "translated: IDENT or rewritten within the TC (%gs loads: callout)".to_string(),
            Emitted::InTc => "translated: in-TC sequence on the virtual CPU".to_string(),
            Emitted::Callout => "translated: callout + emulate".to_string(),
            Emitted::PortIo => "translated: in-TC I/O helper (ports in bt.in_tc_ports), else callout".to_string(),
        },
        Mechanism::TranslatedTransfer => "translated: callout, then reflected into the guest".to_string(),
        Mechanism::Traced(handling) => format!("traced when a shadow uses the page: {}", trace_handling(handling)),
        Mechanism::ShadowTouch(handling) => {
            format!("TLB fill + shadow lookup; a hidden fault: {} + guest walk + fill", trace_handling(handling))
        }
        Mechanism::NestedWalk => {
            "two-dimensional walk ((n+1)(m+1)-1 references, fewer with hw.nested_walk_cache); a new \
             guest-physical frame exits [ept_violation]"
                .to_string()
        }
        Mechanism::Hypercall(kind) => format!("hypercall `{}`", kind.name()),
        Mechanism::Bounce(reason) => format!("through Xen [{}]: bounce into the guest kernel", reason.name()),
        Mechanism::Queued => "queued for `mmu_update` (batches of at most 2048, validated per entry)".to_string(),
        Mechanism::Upcall => "event-channel upcall".to_string(),
        Mechanism::SharedMemory => "shared memory, no trap".to_string(),
        Mechanism::Elided => "nothing (a paravirtualized kernel does no I/O delay)".to_string(),
        Mechanism::VmExit(reason, handling) => format!("exit [{}] + {}", reason.name(), handling_name(handling)),
        Mechanism::GuestMode => "no exit".to_string(),
        Mechanism::ShadowDescriptor => "direct, through the monitor's copy of the descriptor".to_string(),
    };
    for action in disposition.actions {
        text += &format!(" + {}", action_name(*action));
    }
    text
}

fn trace_handling(handling: TraceHandling) -> &'static str {
    match handling {
        TraceHandling::Trap => "trap",
        TraceHandling::VmExit => "exit",
        TraceHandling::Interpreter => "the interpreter sees it, no trap",
        TraceHandling::Adaptive => "trap until adaptive BT makes the instruction call the write helper",
    }
}

fn handling_name(handling: Handling) -> &'static str {
    match handling {
        Handling::Emulate => "emulate",
        Handling::FetchDecodeEmulate => "fetch, decode and emulate",
        Handling::Inject => "inject",
        Handling::MapGuestPage => "map the guest page",
        Handling::ShadowFill => "walk and fill",
        Handling::Halt => "sleep until an interrupt",
    }
}

pub fn action_name(action: Action) -> &'static str {
    match action {
        Action::ShadowSwitch => "shadow root switch",
        Action::ShadowInvalidate => "shadow invalidate",
        Action::ShadowRebuild => "drop every shadow when paging changes",
        Action::Device => "device model",
        Action::UserSpaceDevice => "user-space device model (hw.user_space_devices)",
        Action::FlushBatch => "flush the batch first",
        Action::PageTableSwitch => "page-table switch (CR3 load and TLB refill)",
        Action::StackSwitch => "`stack_switch`",
        Action::ClassifyFault => "guest walk to classify the fault",
        Action::TrueFault => "counted as a true fault",
        Action::GuardCheck => "a touch of the monitor's area faults (#GP beyond the truncated limit)",
        Action::FastSystemCall => "fast trap gate into the ring-1 kernel, Xen not entered",
    }
}
