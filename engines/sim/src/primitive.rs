//! The primitives a cost profile gives: every quantity an engine multiplies by what its mechanism does on a trace.
//! Each has a key (`section.name` in the profile's TOML), a unit, and a one-line meaning; profiles give each a
//! value, a provenance and a source (see [`crate::profile`]).

/// What a primitive's value measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Cycles,
    BytesPerCycle,
    /// A count (table entries, writes).
    Count,
    /// 0 or 1: whether the processor or monitor has a feature.
    Flag,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Cycles => "cycles",
            Unit::BytesPerCycle => "bytes per cycle",
            Unit::Count => "count",
            Unit::Flag => "flag",
        }
    }
}

macro_rules! primitives {
    ($( $variant:ident = $section:literal $name:literal $unit:ident: $meaning:literal, )*) => {
        /// One primitive of a cost profile.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Primitive {
            $( #[doc = $meaning] $variant, )*
        }

        impl Primitive {
            /// Every primitive, in profile order.
            pub const ALL: &'static [Primitive] = &[$( Primitive::$variant, )*];
            pub const COUNT: usize = Primitive::ALL.len();

            /// `section.name`, as in the profile's TOML and in `--set`.
            pub fn key(self) -> &'static str {
                match self {
                    $( Primitive::$variant => concat!($section, ".", $name), )*
                }
            }

            pub fn section(self) -> &'static str {
                match self {
                    $( Primitive::$variant => $section, )*
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $( Primitive::$variant => $name, )*
                }
            }

            pub fn unit(self) -> Unit {
                match self {
                    $( Primitive::$variant => Unit::$unit, )*
                }
            }

            pub fn meaning(self) -> &'static str {
                match self {
                    $( Primitive::$variant => $meaning, )*
                }
            }
        }
    };
}

primitives! {
    CyclesPerInstruction = "native" "cycles_per_instruction" Cycles: "a simple instruction (ALU, load, store, branch)",
    CallReturn = "native" "call_return" Cycles: "a near CALL or RET beyond a simple instruction",
    Divide = "native" "divide" Cycles: "DIV or IDIV beyond a simple instruction",
    Multiply = "native" "multiply" Cycles: "MUL or IMUL beyond a simple instruction",
    RepStartup = "native" "rep_startup" Cycles: "starting one REP string instruction",
    RepMovsBytesPerCycle = "native" "rep_movs_bytes_per_cycle" BytesPerCycle: "REP MOVS bandwidth (doubleword and quadword elements)",
    RepStosBytesPerCycle = "native" "rep_stos_bytes_per_cycle" BytesPerCycle: "REP STOS bandwidth (doubleword and quadword elements)",
    RepElement = "native" "rep_element" Cycles: "one element of any other REP string instruction",
    Syscall = "native" "syscall" Cycles: "SYSCALL (or INT n) into the kernel",
    Sysret = "native" "sysret" Cycles: "SYSRET back to user mode",
    Exception = "native" "exception" Cycles: "delivering an exception or interrupt through the IDT",
    Iret = "native" "iret" Cycles: "IRET",
    MovToCr = "native" "mov_to_cr" Cycles: "a serializing control-register write",
    MovFromCr = "native" "mov_from_cr" Cycles: "a control-register read",
    CliSti = "native" "cli_sti" Cycles: "CLI or STI",
    PopfPushf = "native" "popf_pushf" Cycles: "POPF or PUSHF",
    Invlpg = "native" "invlpg" Cycles: "INVLPG",
    WalkReference = "native" "walk_reference" Cycles: "one memory reference of a page walk (a TLB fill reads one per table)",
    TlbEntries = "native" "tlb_entries" Count: "translations the data TLB holds (what a full flush throws away at most)",
    PortIo = "native" "port_io" Cycles: "one port access on the bus",
    Mmio = "native" "mmio" Cycles: "one uncached access to a device register",
    Cpuid = "native" "cpuid" Cycles: "CPUID",
    Rdtsc = "native" "rdtsc" Cycles: "RDTSC",
    Msr = "native" "msr" Cycles: "RDMSR or WRMSR",
    DescriptorLoad = "native" "descriptor_load" Cycles: "LGDT, LIDT, LLDT or LTR",
    DescriptorStore = "native" "descriptor_store" Cycles: "SGDT, SIDT, SLDT, STR, SMSW, LAR, LSL, VERR or VERW",
    Swapgs = "native" "swapgs" Cycles: "SWAPGS",
    Hlt = "native" "hlt" Cycles: "HLT's own cost (the wait for an interrupt is idle time)",
    Trap = "monitor" "trap" Cycles: "a trap into the software monitor and the return to the guest",
    Decode = "monitor" "decode" Cycles: "decoding the faulting guest instruction in software",
    Emulate = "monitor" "emulate" Cycles: "emulating one instruction on the virtual CPU",
    Reflect = "monitor" "reflect" Cycles: "building the guest's exception or system-call frame (reflecting a transfer)",
    Device = "monitor" "device" Cycles: "one access to an emulated device register in the monitor",
    Interpret = "monitor" "interpret" Cycles: "interpreting one guest instruction (or one string element)",
    GuestWalkLevel = "monitor" "guest_walk_level" Cycles: "reading one level of the guest's page tables in software",
    ShadowFill = "monitor" "shadow_fill" Cycles: "validating and installing one shadow entry after the walk",
    ShadowSwitch = "monitor" "shadow_switch" Cycles: "a guest CR3 write finding its cached shadow root",
    ShadowInvalidate = "monitor" "shadow_invalidate" Cycles: "dropping one shadow entry",
    ShadowUpdate = "monitor" "shadow_update" Cycles: "propagating one traced write into one shadow of the page",
    ShadowProtect = "monitor" "shadow_protect" Cycles: "write-protecting a guest page-table page a shadow is built from",
    UnsyncLeafTables = "monitor" "unsync_leaf_tables" Flag: "leaf page tables go out of sync on a write (no trap until the next CR3 load or INVLPG)",
    ResyncTable = "monitor" "resync_table" Cycles: "re-synchronizing one out-of-sync leaf table",
    WriteFloodThreshold = "monitor" "write_flood_threshold" Count: "traced writes in a row to one page after which the monitor stops shadowing it (0: never)",
    TranslatePerInstruction = "bt" "translate_per_instruction" Cycles: "translating one guest instruction",
    IndirectLookup = "bt" "indirect_lookup" Cycles: "an indirect branch's lookup of its translated target",
    Callout = "bt" "callout" Cycles: "a callout from the translation cache into the monitor and back",
    Continuation = "bt" "continuation" Cycles: "an unchained exit through the translator that patches the jump",
    InTcHelper = "bt" "in_tc_helper" Cycles: "a call from translated code to a monitor helper in the translation cache",
    Hypercall = "paravirt" "hypercall" Cycles: "a hypercall into Xen and the return",
    UpdateValidation = "paravirt" "update_validation" Cycles: "Xen validating one page-table entry of a batch",
    Upcall = "paravirt" "upcall" Cycles: "an event-channel upcall into the guest",
    Exit = "hw" "exit" Cycles: "a VM exit (the hardware's transition)",
    Entry = "hw" "entry" Cycles: "a VM entry",
    Vmread = "hw" "vmread" Cycles: "one VMREAD",
    Vmwrite = "hw" "vmwrite" Cycles: "one VMWRITE",
    Vpid = "hw" "vpid" Flag: "tagged TLB entries (VPID/ASID): transitions keep the guest's translations",
    EptViolation = "hw" "ept_violation" Cycles: "the host's handling of an EPT violation beyond the exit (map one page)",
    NestedWalkCache = "hw" "nested_walk_cache" Flag: "the page-walk cache holds nested translations (Bhargava et al. 2008)",
    UserSpaceExit = "hw" "user_space_exit" Cycles: "completing a device exit in the user-space device model and re-entering",
}
