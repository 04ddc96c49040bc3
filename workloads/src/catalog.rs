//! The workload catalog: names, descriptions, parameters, and parameter validation.

use thiserror::Error;

/// Where a workload's measured part runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// A kernel-mode test driver (CPL 0), run after start-up with no process.
    Kernel,
    /// A user program (CPL 3) started as process 1.
    User,
}

/// One parameter a workload accepts. Its value is an unsigned integer in `min..=max`; for a choice it is the
/// index of the chosen name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub default: u64,
    pub min: u64,
    pub max: u64,
    pub kind: ParamKind,
}

/// How a parameter's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// An unsigned integer, shown in the banner whatever its value.
    Number,
    /// One of a few names (`min` is 0, `max` the last index). Shown in the banner only when it is not the
    /// default, so that images built before the choice existed keep their banner byte for byte.
    Choice(&'static [&'static str]),
}

impl ParamSpec {
    /// The value as the user writes it: a number, or a choice's name.
    pub fn value_text(&self, value: u64) -> String {
        match self.kind {
            ParamKind::Number => value.to_string(),
            ParamKind::Choice(names) => names.get(value as usize).map_or_else(|| value.to_string(), |n| n.to_string()),
        }
    }

    /// What the parameter accepts: `min..=max`, or the choices separated by `|`.
    pub fn accepted(&self) -> String {
        match self.kind {
            ParamKind::Number => format!("{}..={}", self.min, self.max),
            ParamKind::Choice(names) => names.join("|"),
        }
    }

    /// Whether `value` appears in the banner and in the image's parameter list.
    fn shown(&self, value: u64) -> bool {
        matches!(self.kind, ParamKind::Number) || value != self.default
    }
}

/// The instruction set a workload's kernel is built for: the `arch` parameter of every workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Long mode, four-level paging, SYSCALL (the default).
    X86_64,
    /// 32-bit protected mode, two-level paging, `INT 0x80` or SYSENTER.
    X86_32,
}

const ARCH_CHOICES: &[&str] = &["x86-64", "x86-32"];

/// `syscall`'s choice of system-call instruction on x86-32 (a choice, so that the default leaves the banner alone).
pub const SYSENTER: ParamSpec = ParamSpec {
    name: "sysenter",
    description: "with arch=x86-32: 0 enters the kernel with INT 0x80, 1 with SYSENTER (returning with SYSEXIT)",
    default: 0,
    min: 0,
    max: 1,
    kind: ParamKind::Choice(&["0", "1"]),
};

/// Every workload's `arch` parameter.
pub const ARCH: ParamSpec = ParamSpec {
    name: "arch",
    description: "the guest kernel's instruction set: x86-64 (long mode) or x86-32 (protected mode, two-level paging)",
    default: 0,
    min: 0,
    max: 1,
    kind: ParamKind::Choice(ARCH_CHOICES),
};

/// A catalog entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub privilege: Privilege,
    pub params: &'static [ParamSpec],
}

impl WorkloadSpec {
    /// The parameter named `name`, if this workload has it.
    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.params.iter().find(|param| param.name == name)
    }
}

/// Why a workload could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkloadError {
    #[error("unknown workload `{name}`; accepted: {accepted}")]
    UnknownWorkload { name: String, accepted: String },
    #[error("workload `{workload}` has no parameter `{param}`; accepted: {accepted}")]
    UnknownParameter { workload: String, param: String, accepted: String },
    #[error("parameter `{param}` of workload `{workload}` is given more than once")]
    DuplicateParameter { workload: String, param: String },
    #[error(
        "parameter `{param}` of workload `{workload}`: `{value}` is not an unsigned integer; accepted: {min}..={max}"
    )]
    NotANumber { workload: String, param: String, value: String, min: u64, max: u64 },
    #[error("parameter `{param}` of workload `{workload}`: `{value}` is not one of the choices; accepted: {accepted}")]
    NotAChoice { workload: String, param: String, value: String, accepted: String },
    #[error("parameter `{param}` of workload `{workload}`: {value} is out of range; accepted: {min}..={max}")]
    OutOfRange { workload: String, param: String, value: u64, min: u64, max: u64 },
    #[error("workload `{workload}` cannot have arch=x86-32: {reason}; use arch=x86-64")]
    Only64Bit { workload: String, reason: &'static str },
    #[error("parameter `{param}` of workload `{workload}` is not built for arch=x86-32 yet; {hint}")]
    ParamNotBuiltFor32Bit { workload: String, param: String, hint: &'static str },
    #[error(
        "parameter `sysenter=1` of workload `{workload}` needs arch=x86-32 (the 64-bit kernel is entered with SYSCALL)"
    )]
    SysenterNeeds32Bit { workload: String },
    #[error("assembling workload `{workload}` failed: {message}")]
    Assembly { workload: String, message: String },
}

const fn iterations(default: u64, max: u64) -> ParamSpec {
    ParamSpec {
        name: "iterations",
        description: "repetitions of the measured operation",
        default,
        min: 1,
        max,
        kind: ParamKind::Number,
    }
}

/// Every user-mode workload's switch for the kernel's memory-management counters. Off by default: timer
/// preemption may shift them between machines, and every machine must print the same serial output.
const COUNTERS: ParamSpec = ParamSpec {
    name: "counters",
    description: "1: print the kernel's counters (page-table pages, PTEs shared by fork, copy-on-write faults, pages copied, zero-fills) before `ok`",
    default: 0,
    min: 0,
    max: 1,
    kind: ParamKind::Number,
};

macro_rules! workload {
    ($name:literal, $privilege:ident, $description:literal, [$($param:expr),* $(,)?]) => {
        WorkloadSpec {
            name: $name,
            description: $description,
            privilege: Privilege::$privilege,
            params: &[$($param,)* ARCH],
        }
    };
}

static CATALOG: &[WorkloadSpec] = &[
    workload!("syscall", User, "Adams & Agesen: user-level null system call (getpid) round trip", [iterations(2000, 1_000_000), COUNTERS, SYSENTER]),
    workload!("in", Kernel, "Adams & Agesen: kernel-mode IN from the POST port 0x80", [iterations(2000, 1_000_000)]),
    workload!("cr8wr", Kernel, "Adams & Agesen: kernel-mode write of CR8 (task priority)", [iterations(2000, 1_000_000)]),
    workload!("callret", Kernel, "Adams & Agesen: kernel-mode call and return of an empty function", [iterations(10000, 2_000_000)]),
    workload!("pgfault", User, "Adams & Agesen: user-level true page fault on an unmapped address, delivered by the kernel to a user handler that skips the access", [iterations(1000, 1_000_000), COUNTERS]),
    workload!("divzero", User, "Adams & Agesen: user-level divide by zero, #DE delivered to the kernel and back to a user handler", [iterations(1000, 1_000_000), COUNTERS]),
    workload!("ptemod", Kernel, "Adams & Agesen: kernel-mode write of an unchanged value to a live page-table entry", [iterations(10000, 2_000_000)]),
    workload!("cpuid", Kernel, "vmexit: CPUID leaf 0 in kernel mode", [iterations(2000, 1_000_000)]),
    workload!("cr8rd", Kernel, "vmexit: kernel-mode read of CR8", [iterations(2000, 1_000_000)]),
    workload!("rdmsr", Kernel, "vmexit: kernel-mode RDMSR of IA32_KERNEL_GS_BASE (x86-32: IA32_SYSENTER_ESP)", [iterations(2000, 1_000_000)]),
    workload!("wrmsr", Kernel, "vmexit: kernel-mode WRMSR of IA32_KERNEL_GS_BASE (x86-32: IA32_SYSENTER_ESP)", [iterations(2000, 1_000_000)]),
    workload!("inl", Kernel, "vmexit: kernel-mode 32-bit IN from a port with no device", [iterations(2000, 1_000_000)]),
    workload!("outl", Kernel, "vmexit: kernel-mode 32-bit OUT to a port with no device", [iterations(2000, 1_000_000)]),
    workload!("hlt", Kernel, "vmexit: kernel-mode HLT, woken by the PIT timer interrupt", [iterations(50, 10_000)]),
    workload!("mmio", Kernel, "vmexit: kernel-mode 32-bit write and read of the MMIO test region", [iterations(2000, 1_000_000)]),
    workload!("sensitive-kernel", Kernel, "sensitive unprivileged instructions in kernel mode: SGDT SIDT SLDT STR SMSW PUSHF/POPF(IF) LAR LSL VERR VERW MOV from CS/SS", [
        iterations(500, 200_000),
        ParamSpec {
            name: "segment-probes",
            description: "1: also run LAR, LSL, VERR and VERW (KVM's instruction emulator, which runs CPL 0 on PVM hosts, has none of them); 0: leave them out",
            default: 1,
            min: 0,
            max: 1,
            kind: ParamKind::Number,
        },
    ]),
    workload!("redpill", User, "sensitive unprivileged instructions from user mode, checked against the guest's own tables", [iterations(500, 200_000), COUNTERS]),
    workload!("forkwait", User, "fork a child that exits with a known status, wait for it and check the status", [iterations(20, 2000), COUNTERS]),
    workload!("ctxswitch", User, "two processes ping-pong through yield", [iterations(1000, 200_000), COUNTERS]),
    workload!("mmap", User, "map four anonymous pages, touch them, unmap them", [iterations(256, 100_000), COUNTERS]),
    workload!("demandzero", User, "map 64 pages at a time, fault each in as a fresh zeroed page, unmap them", [iterations(512, 100_000), COUNTERS]),
    workload!("cow", User, "fork; the child writes every shared page (copy-on-write copies), the parent writes them after the child exits (last sharer: no copy)", [
        iterations(20, 2000),
        ParamSpec { name: "pages", description: "pages the parent fills before forking", default: 8, min: 1, max: 256, kind: ParamKind::Number },
        COUNTERS,
    ]),
    workload!("compute", User, "user-mode integer work (xorshift and multiply-accumulate), no system calls", [iterations(50_000, 1_000_000), COUNTERS]),
    workload!("memtouch", User, "stream over many demand-zero pages, one read-modify-write per page per pass", [
        iterations(16, 10_000),
        ParamSpec { name: "pages", description: "pages in the streamed region", default: 256, min: 1, max: 4096, kind: ParamKind::Number },
        COUNTERS,
    ]),
    workload!("syscall-mix", User, "null, write and mmap/munmap system calls mixed; writes one '.' per iteration", [iterations(64, 4096), COUNTERS]),
    workload!("boot", Kernel, "kernel start-up only: descriptor tables, system calls, PIC, PIT, page-frame pool (x86-32: descriptor tables, PIC, PIT, page tables)", [iterations(1, 100)]),
];

/// Every workload, in catalog order.
pub fn catalog() -> &'static [WorkloadSpec] {
    CATALOG
}

/// The catalog entry named `name`.
pub fn find(name: &str) -> Result<&'static WorkloadSpec, WorkloadError> {
    CATALOG.iter().find(|spec| spec.name == name).ok_or_else(|| WorkloadError::UnknownWorkload {
        name: name.to_string(),
        accepted: CATALOG.iter().map(|spec| spec.name).collect::<Vec<_>>().join(", "),
    })
}

/// Parameter values after validation, one per parameter of the workload, in catalog order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedParams(pub Vec<(&'static str, u64)>);

impl ResolvedParams {
    /// The value of a parameter the workload is known to have.
    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(param, _)| *param == name)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("workload parameter `{name}` is not in the catalog entry"))
    }

    /// The instruction set chosen with `arch`.
    pub fn arch(&self) -> Arch {
        match self.get(ARCH.name) {
            0 => Arch::X86_64,
            _ => Arch::X86_32,
        }
    }

    /// The parameters as the banner and the image show them, in catalog order: every number, and each choice
    /// that is not its default.
    pub fn shown(&self, spec: &WorkloadSpec) -> Vec<(&'static str, String)> {
        spec.params
            .iter()
            .zip(&self.0)
            .filter(|(param, (_, value))| param.shown(*value))
            .map(|(param, (name, value))| (*name, param.value_text(*value)))
            .collect()
    }
}

/// A parameter's value from its text: a number, or the index of a choice.
fn parse_value(spec: &WorkloadSpec, param: &ParamSpec, raw: &str) -> Result<u64, WorkloadError> {
    match param.kind {
        ParamKind::Number => raw.trim().parse().map_err(|_| WorkloadError::NotANumber {
            workload: spec.name.to_string(),
            param: param.name.to_string(),
            value: raw.to_string(),
            min: param.min,
            max: param.max,
        }),
        ParamKind::Choice(names) => {
            names.iter().position(|name| *name == raw.trim()).map(|index| index as u64).ok_or_else(|| {
                WorkloadError::NotAChoice {
                    workload: spec.name.to_string(),
                    param: param.name.to_string(),
                    value: raw.to_string(),
                    accepted: param.accepted(),
                }
            })
        }
    }
}

/// Validates `given` against `spec`, filling in defaults.
pub fn resolve(spec: &WorkloadSpec, given: &[(String, String)]) -> Result<ResolvedParams, WorkloadError> {
    let mut values: Vec<(&'static str, Option<u64>)> = spec.params.iter().map(|param| (param.name, None)).collect();
    for (name, raw) in given {
        let param = spec.param(name).ok_or_else(|| WorkloadError::UnknownParameter {
            workload: spec.name.to_string(),
            param: name.clone(),
            accepted: spec
                .params
                .iter()
                .map(|param| {
                    format!("{} ({}, default {})", param.name, param.accepted(), param.value_text(param.default))
                })
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let value = parse_value(spec, param, raw)?;
        if !(param.min..=param.max).contains(&value) {
            return Err(WorkloadError::OutOfRange {
                workload: spec.name.to_string(),
                param: name.clone(),
                value,
                min: param.min,
                max: param.max,
            });
        }
        let slot = values.iter_mut().find(|(slot_name, _)| *slot_name == param.name).expect("parameter slot exists");
        if slot.1.replace(value).is_some() {
            return Err(WorkloadError::DuplicateParameter { workload: spec.name.to_string(), param: name.clone() });
        }
    }
    Ok(ResolvedParams(
        values
            .into_iter()
            .zip(spec.params)
            .map(|((name, value), param)| (name, value.unwrap_or(param.default)))
            .collect(),
    ))
}
