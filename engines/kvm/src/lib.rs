//! Runs a virtlab guest image on the host's KVM, booted the Multiboot way, with the same devices the reference
//! machine has. It exists to check the reference machine against a real one (`virtlab run --machine kvm`); the
//! full KVM engine, with statistics and timing, is a later piece of work.
//!
//! The image is loaded by the reference machine's own loader ([`Machine::from_multiboot`]) and its RAM and entry
//! registers are copied into the VM, so both machines start from the same state. PIC and PIT are KVM's in-kernel
//! models; every port exit goes to the reference machine's device model ([`Devices`]), so the serial port, the
//! exit port, the POST port and unassigned ports answer exactly as they do there. The MMIO test region reads 0
//! and drops writes; any other MMIO access is an error.
//!
//! This is the only crate of the project with `unsafe` code: mapping guest memory, registering it with KVM, and
//! interrupting a vCPU thread on timeout.

mod memory;
mod watchdog;

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use virtlab_machine::cpu::Segment;
use virtlab_machine::devices::Devices;
use virtlab_machine::{LoadError, Machine, MachineConfig, SegmentRegister, MMIO_TEST_BASE, MMIO_TEST_SIZE};

use memory::GuestRam;
use watchdog::Watchdog;

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
    match Kvm::new() {
        Ok(kvm) => match kvm.create_vm() {
            Ok(_) => Probe::Available(Backend::detect()),
            Err(e) => Probe::Unavailable(format!("/dev/kvm opens but KVM_CREATE_VM fails: {e}")),
        },
        Err(e) => Probe::Unavailable(format!(
            "cannot open /dev/kvm ({e}): load the kvm module and give this user read-write access to /dev/kvm"
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
    #[error("the guest was still running after {seconds} s (RIP {rip:#x}): raise --timeout, or the guest loops")]
    Timeout { seconds: f64, rip: u64 },
    #[error("the guest accessed {gpa:#x}, which is neither RAM nor the MMIO test region at {MMIO_TEST_BASE:#x} (RIP {rip:#x})")]
    UnmappedMmio { gpa: u64, rip: u64 },
    #[error("KVM internal error at RIP {rip:#x}: {suberror}")]
    Internal { suberror: String, rip: u64 },
    #[error("unexpected KVM exit {exit} at RIP {rip:#x}")]
    UnexpectedExit { exit: String, rip: u64 },
}

fn ioctl<T>(what: &'static str, result: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    result.map_err(|source| KvmError::Ioctl { what, source })
}

/// Boots `image` on KVM and runs it until it writes to the exit port.
pub fn run(image: &[u8], config: &KvmConfig) -> Result<KvmOutcome, KvmError> {
    let machine_config = MachineConfig { ram_size: config.ram_size, ..MachineConfig::default() };
    let machine = Machine::from_multiboot(image, machine_config)?;
    if let Probe::Unavailable(reason) = probe() {
        return Err(KvmError::Unavailable(reason));
    }
    let kvm = ioctl("opening /dev/kvm", Kvm::new())?;
    let vm = ioctl("KVM_CREATE_VM", kvm.create_vm())?;
    let mut ram = GuestRam::new(machine.ram().len())?;
    ram.as_mut_slice().copy_from_slice(machine.ram());
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.len() as u64,
        userspace_addr: ram.host_address(),
    };
    // SAFETY: `region` describes `ram`, a private anonymous mapping of exactly `memory_size` bytes that stays
    // mapped until after the VM (declared after it, so dropped first) is gone.
    unsafe { ioctl("KVM_SET_USER_MEMORY_REGION", vm.set_user_memory_region(region))? };
    ioctl("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
    ioctl("KVM_CREATE_PIT2", vm.create_pit2(kvm_pit_config::default()))?;
    let mut vcpu = ioctl("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
    let cpuid = ioctl("KVM_GET_SUPPORTED_CPUID", kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))?;
    ioctl("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
    load_entry_state(&vcpu, &machine)?;

    let started = Instant::now();
    let watchdog = Watchdog::start(config.timeout);
    let mut devices = Devices::new();
    let mut exits = UserExits::default();
    let exit_status = loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => {
                if watchdog.expired() {
                    return Err(KvmError::Timeout { seconds: config.timeout.as_secs_f64(), rip: rip(&vcpu) });
                }
                continue;
            }
            Err(source) => return Err(KvmError::Ioctl { what: "KVM_RUN", source }),
        };
        // The exit borrows the vCPU's run area; decide inside, act on the vCPU after.
        let stop = match exit {
            VcpuExit::IoOut(port, data) => {
                exits.io_out += 1;
                devices.port_out(port, data.len() as u32, little_endian(data), 0);
                devices.exit_request.map(Stop::Exit)
            }
            VcpuExit::IoIn(port, data) => {
                exits.io_in += 1;
                let value = devices.port_in(port, data.len() as u32, 0);
                let len = data.len();
                data.copy_from_slice(&value.to_le_bytes()[..len]);
                None
            }
            VcpuExit::MmioRead(gpa, data) => {
                exits.mmio_read += 1;
                data.fill(0);
                (!in_mmio_test_region(gpa)).then_some(Stop::Unmapped(gpa))
            }
            VcpuExit::MmioWrite(gpa, _) => {
                exits.mmio_write += 1;
                (!in_mmio_test_region(gpa)).then_some(Stop::Unmapped(gpa))
            }
            VcpuExit::Shutdown => Some(Stop::TripleFault),
            VcpuExit::InternalError => Some(Stop::Internal),
            other => Some(Stop::Unexpected(format!("{other:?}"))),
        };
        match stop {
            None => {}
            Some(Stop::Exit(status)) => break status,
            Some(Stop::Unmapped(gpa)) => return Err(KvmError::UnmappedMmio { gpa, rip: rip(&vcpu) }),
            Some(Stop::TripleFault) => return Err(KvmError::TripleFault { rip: rip(&vcpu) }),
            Some(Stop::Unexpected(exit)) => return Err(KvmError::UnexpectedExit { exit, rip: rip(&vcpu) }),
            Some(Stop::Internal) => return Err(internal_error(&mut vcpu)),
        }
    };
    drop(watchdog);
    Ok(KvmOutcome {
        exit_status,
        serial: devices.serial.output().to_vec(),
        exits,
        backend: Backend::detect(),
        wall_time: started.elapsed(),
    })
}

fn little_endian(data: &[u8]) -> u32 {
    data.iter().rev().fold(0, |value, &byte| value << 8 | u32::from(byte))
}

fn rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map_or(u64::MAX, |regs| regs.rip)
}

fn in_mmio_test_region(gpa: u64) -> bool {
    (MMIO_TEST_BASE..MMIO_TEST_BASE + MMIO_TEST_SIZE).contains(&gpa)
}

/// Why the run loop stops.
enum Stop {
    Exit(u32),
    Unmapped(u64),
    TripleFault,
    Internal,
    Unexpected(String),
}

/// KVM's internal-error exit, with its suberror named.
fn internal_error(vcpu: &mut VcpuFd) -> KvmError {
    let rip = rip(vcpu);
    // SAFETY: reading the `internal` member of the run area's exit union is valid after a
    // KVM_EXIT_INTERNAL_ERROR exit, which is the only caller.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let suberror = match internal.suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "the instruction emulator failed".to_string(),
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "an exception occurred while delivering another".to_string(),
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "an event could not be delivered".to_string(),
        other => format!("suberror {other}"),
    };
    KvmError::Internal { suberror, rip }
}

/// KVM's form of a segment register: the reference machine keeps descriptor bits 40–55 in `attributes`.
fn kvm_segment_of(segment: &Segment) -> kvm_segment {
    let bits = segment.attributes;
    let bit = |n: u16| u8::from(bits & (1 << n) != 0);
    kvm_segment {
        base: segment.base,
        limit: segment.limit,
        selector: segment.selector,
        type_: (bits & 0xf) as u8,
        s: bit(4),
        dpl: ((bits >> 5) & 3) as u8,
        present: bit(7),
        avl: bit(12),
        l: bit(13),
        db: bit(14),
        g: bit(15),
        unusable: u8::from(bits & (1 << 7) == 0),
        padding: 0,
    }
}

/// Copies the reference machine's entry state (Multiboot: 32-bit protected mode, flat segments, paging off,
/// EAX = 0x2BADB002, EBX = the information structure) into the vCPU.
fn load_entry_state(vcpu: &VcpuFd, machine: &Machine) -> Result<(), KvmError> {
    let cpu = machine.cpu();
    let mut sregs = ioctl("KVM_GET_SREGS", vcpu.get_sregs())?;
    let segment = |register: SegmentRegister| kvm_segment_of(cpu.segment(register));
    sregs.cs = segment(SegmentRegister::Cs);
    sregs.ds = segment(SegmentRegister::Ds);
    sregs.es = segment(SegmentRegister::Es);
    sregs.fs = segment(SegmentRegister::Fs);
    sregs.gs = segment(SegmentRegister::Gs);
    sregs.ss = segment(SegmentRegister::Ss);
    // Hardware requires a usable task register in protected mode even before the guest loads its own.
    sregs.tr = kvm_segment { limit: 0xffff, type_: 11, present: 1, ..Default::default() };
    sregs.ldt = kvm_segment { type_: 2, unusable: 1, ..Default::default() };
    sregs.gdt.base = cpu.gdtr.base;
    sregs.gdt.limit = cpu.gdtr.limit;
    sregs.idt.base = cpu.idtr.base;
    sregs.idt.limit = cpu.idtr.limit;
    sregs.cr0 = cpu.cr0;
    sregs.cr3 = cpu.cr3;
    sregs.cr4 = cpu.cr4;
    sregs.efer = cpu.efer;
    ioctl("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
    let mut regs = ioctl("KVM_GET_REGS", vcpu.get_regs())?;
    let gpr = |index: usize| cpu.gpr[index];
    regs.rax = gpr(0);
    regs.rcx = gpr(1);
    regs.rdx = gpr(2);
    regs.rbx = gpr(3);
    regs.rsp = gpr(4);
    regs.rbp = gpr(5);
    regs.rsi = gpr(6);
    regs.rdi = gpr(7);
    regs.rip = cpu.rip;
    regs.rflags = cpu.rflags;
    ioctl("KVM_SET_REGS", vcpu.set_regs(&regs))
}
