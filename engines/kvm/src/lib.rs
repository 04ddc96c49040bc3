//! The KVM engine: virtlab guests on the host's real hypervisor.
//!
//! - [`run`] boots a Multiboot image (loaded by the reference machine's own loader, [`Machine::from_multiboot`],
//!   whose RAM and entry registers are copied into the VM) and runs it to its end: `virtlab run --machine kvm`,
//!   and the check of the reference machine against a real one.
//! - [`measure`] boots a trace's embedded guest memory and boot state several times, checks that every run ends
//!   as the trace does, and measures: exits that reached this process with their guest RIPs, KVM's binary
//!   statistics ([`stats`]) as deltas, wall time and time-stamp-counter cycles. [`refusal`] says, from the trace
//!   alone, why this host's backend cannot run a guest.
//!
//! PIC and PIT are KVM's in-kernel models; every port exit goes to the reference machine's device model
//! ([`virtlab_machine::devices::Devices`]), so the serial port, the exit port, the POST port and unassigned ports
//! answer exactly as they do there. The MMIO test region reads 0 and drops writes; any other MMIO access is an
//! error.
//!
//! This is the only crate of the project with `unsafe` code: mapping guest memory, registering it with KVM,
//! reading KVM's run area, asking for the statistics descriptors, reading the TSC and interrupting a vCPU thread
//! on timeout. Every other crate inherits `unsafe_code = "forbid"` from the workspace; here clippy rejects an
//! `unsafe` block without its `// SAFETY:` comment.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod boot;
mod measure;
mod memory;
pub mod stats;
pub mod vm;
mod watchdog;

use std::ffi::CStr;
use std::path::Path;
use std::time::Duration;

use kvm_ioctls::Kvm;
use virtlab_machine::{LoadError, Machine, MachineConfig, MMIO_TEST_BASE};

pub use measure::{
    measure, refusal, ExitSite, MeasureOptions, Measurement, RunFigures, Spread, StatMeasurement, StatScope,
};
pub use vm::UserExit;

/// Which hardware support the host's KVM runs on. On PVM, guest code at CPL 0 is run by KVM's instruction
/// emulator and CPL 3 runs natively: a real hybrid VMM, not hardware assist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vmx,
    Svm,
    Pvm,
    Unknown,
}

impl Backend {
    /// Reads which KVM vendor module is loaded.
    pub fn detect() -> Backend {
        let loaded = |module: &str| Path::new("/sys/module").join(module).exists();
        if loaded("kvm_pvm") {
            Backend::Pvm
        } else if loaded("kvm_intel") {
            Backend::Vmx
        } else if loaded("kvm_amd") {
            Backend::Svm
        } else {
            Backend::Unknown
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::Pvm => "pvm",
            Backend::Unknown => "unknown",
        }
    }
}

/// Whether KVM can be used here, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Available(Backend),
    Unavailable(String),
}

/// Opens `/dev/kvm` to see whether VMs can be made. Never fails: a missing or inaccessible device is an answer.
pub fn probe() -> Probe {
    probe_device(c"/dev/kvm")
}

/// [`probe`] on the device at `path`.
pub fn probe_device(path: &CStr) -> Probe {
    let name = path.to_string_lossy();
    match Kvm::new_with_path(path) {
        Ok(kvm) => match kvm.create_vm() {
            Ok(_) => Probe::Available(Backend::detect()),
            Err(e) => {
                Probe::Unavailable(format!("{name} opens but KVM_CREATE_VM fails ({e}): it is not a usable KVM device"))
            }
        },
        Err(e) => Probe::Unavailable(format!(
            "cannot open {name} ({e}): load the kvm module and give this user read-write access to {name}"
        )),
    }
}

/// `Ok(false)` rather than an error when there is no usable KVM.
pub fn is_available() -> Result<bool, KvmError> {
    Ok(matches!(probe(), Probe::Available(_)))
}

#[derive(Debug, Clone)]
pub struct KvmConfig {
    pub ram_size: u64,
    /// Wall-clock budget: a guest still running after it is stopped with an error naming its RIP.
    pub timeout: Duration,
}

impl Default for KvmConfig {
    fn default() -> Self {
        KvmConfig { ram_size: MachineConfig::default().ram_size, timeout: Duration::from_secs(30) }
    }
}

/// Exits that reached this process (KVM handles the rest in the kernel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserExits {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
}

#[derive(Debug, Clone)]
pub struct KvmOutcome {
    /// The value the guest wrote to the exit port.
    pub exit_status: u32,
    pub serial: Vec<u8>,
    pub exits: UserExits,
    pub backend: Backend,
    pub wall_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("KVM is not usable here: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{what} failed: {source} (is /dev/kvm usable, and does the host support this guest's mode?)")]
    Ioctl { what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot map {bytes} bytes of guest memory: {source}")]
    Memory { bytes: u64, source: std::io::Error },
    #[error("the guest triple-faulted (KVM shutdown exit); last RIP {rip:#x}")]
    TripleFault { rip: u64 },
    #[error("the guest wrote more than {limit} bytes to the serial port (RIP {rip:#x}); a guest of the lab prints a few kilobytes: check it for a print loop")]
    SerialFlood { limit: usize, rip: u64 },
    #[error("the guest was still running after {seconds} s (RIP {rip:#x}): raise --timeout, or the guest loops")]
    Timeout { seconds: f64, rip: u64 },
    #[error("the guest accessed {gpa:#x}, which is neither RAM nor the MMIO test region at {MMIO_TEST_BASE:#x} (RIP {rip:#x})")]
    UnmappedMmio { gpa: u64, rip: u64 },
    #[error("KVM internal error at RIP {rip:#x}: {suberror}")]
    Internal { suberror: String, rip: u64 },
    #[error("unexpected KVM exit {exit} at RIP {rip:#x}")]
    UnexpectedExit { exit: String, rip: u64 },
    #[error("this host's KVM cannot run the guest: {0}")]
    Unrunnable(String),
    #[error("KVM did not reproduce the trace: {0}")]
    Diverged(String),
    #[error("{0}")]
    Stats(String),
}

/// Starts a VM from `spec` and runs it with the engine's loop until the guest writes to the exit port.
pub fn run_boot(spec: &vm::BootSpec, timeout: Duration) -> Result<vm::RunRecord, KvmError> {
    vm::Vm::new(spec)?.run(timeout)
}

/// Boots `image` on KVM and runs it until it writes to the exit port.
pub fn run(image: &[u8], config: &KvmConfig) -> Result<KvmOutcome, KvmError> {
    let machine_config = MachineConfig { ram_size: config.ram_size, ..MachineConfig::default() };
    let machine = Machine::from_multiboot(image, machine_config)?;
    if let Probe::Unavailable(reason) = probe() {
        return Err(KvmError::Unavailable(reason));
    }
    let record = run_boot(&boot::from_machine(&machine), config.timeout)?;
    let count = |kind: UserExit| record.exits_of(kind);
    Ok(KvmOutcome {
        exit_status: record.exit_status,
        exits: UserExits {
            io_in: count(UserExit::IoIn),
            io_out: count(UserExit::IoOut),
            mmio_read: count(UserExit::MmioRead),
            mmio_write: count(UserExit::MmioWrite),
        },
        serial: record.serial,
        backend: Backend::detect(),
        wall_time: record.wall_time,
    })
}
