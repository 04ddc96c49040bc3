//! One virtual machine on the host's KVM: guest RAM filled from a [`BootSpec`], KVM's in-kernel PIC and PIT,
//! one vCPU in the spec's entry state, and the run loops.
//!
//! [`Vm::run`] is the engine's loop: every exit that reaches this process is answered by the reference machine's
//! device model and counted with the guest RIP it came from. [`Vm::run_bare`] is the least a VMM can do on the
//! same guest (answer reads with all ones or zero, stop at the exit port); it exists so that a benchmark can
//! measure what the engine's loop adds.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_SYNC_X86_REGS,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use virtlab_machine::cpu::Segment;
use virtlab_machine::devices::{Devices, DEBUG_EXIT_PORT};
use virtlab_machine::{MMIO_TEST_BASE, MMIO_TEST_SIZE};

use crate::memory::GuestRam;
use crate::stats::StatsFile;
use crate::watchdog::Watchdog;
use crate::KvmError;

/// The processor state a guest starts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI in encoding order.
    pub gpr: [u64; 8],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// ES, CS, SS, DS, FS, GS, as the reference machine keeps them.
    pub segments: [Segment; 6],
    /// (base, limit)
    pub gdtr: (u64, u16),
    pub idtr: (u64, u16),
}

/// What to put in a new VM: RAM size, the non-zero pieces of guest-physical memory, and the entry state.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    pub ram_size: u64,
    /// (guest-physical address, bytes); all other RAM starts zero.
    pub memory: Vec<(u64, &'a [u8])>,
    pub entry: EntryState,
}

/// RAM must end below the MMIO test region, which has no memory behind it.
pub const MAX_RAM: u64 = MMIO_TEST_BASE;

/// Which way a user-space exit went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserExit {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
}

impl UserExit {
    pub const ALL: [UserExit; 4] = [UserExit::IoIn, UserExit::IoOut, UserExit::MmioRead, UserExit::MmioWrite];

    pub fn name(self) -> &'static str {
        match self {
            UserExit::IoIn => "io_in",
            UserExit::IoOut => "io_out",
            UserExit::MmioRead => "mmio_read",
            UserExit::MmioWrite => "mmio_write",
        }
    }

    pub fn is_port_io(self) -> bool {
        matches!(self, UserExit::IoIn | UserExit::IoOut)
    }
}

/// How one run ended and what it took.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The value the guest wrote to the exit port.
    pub exit_status: u32,
    pub serial: Vec<u8>,
    /// User-space exits by kind and the guest RIP KVM reported with them.
    pub exits: HashMap<(UserExit, u64), u64>,
    pub wall_time: Duration,
    /// Time-stamp-counter cycles from the first KVM_RUN to the last exit.
    pub tsc_cycles: u64,
    /// The part of `tsc_cycles` spent outside KVM_RUN: this process handling exits.
    pub vmm_tsc_cycles: u64,
}

/// What a bare run took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BareRecord {
    pub exits: u64,
    pub tsc_cycles: u64,
    pub vmm_tsc_cycles: u64,
}

impl RunRecord {
    pub fn exits_of(&self, kind: UserExit) -> u64 {
        self.exits.iter().filter(|((k, _), _)| *k == kind).map(|(_, n)| n).sum()
    }

    pub fn exits_total(&self) -> u64 {
        self.exits.values().sum()
    }
}

fn ioctl<T>(what: &'static str, result: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    result.map_err(|source| KvmError::Ioctl { what, source })
}

/// The host's time-stamp counter.
pub fn tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 processor has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `KVM_GET_STATS_FD`, `_IO(KVMIO, 0xce)`: kvm-ioctls has no wrapper for it.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAE << 8 | 0xCE;

fn stats_file(fd: &impl std::os::fd::AsRawFd, what: &'static str) -> Result<StatsFile, KvmError> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new file descriptor (or -1), which we take
    // ownership of below; `fd` is a live VM or vCPU descriptor borrowed for the call.
    let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if raw < 0 {
        return Err(KvmError::Stats(format!("{what}: KVM_GET_STATS_FD failed: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `raw` is a fresh descriptor the kernel just gave this process; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    StatsFile::open(owned.into()).map_err(|e| KvmError::Stats(format!("{what}: {e}")))
}

/// A VM with one vCPU, ready to run. Fields drop in order: the vCPU and the VM before the memory they use.
pub struct Vm {
    vcpu: VcpuFd,
    vm: VmFd,
    _ram: GuestRam,
    /// KVM copies the registers into the run area at every exit (KVM_CAP_SYNC_REGS), so reading the RIP of an
    /// exit costs no system call.
    sync_regs: bool,
}

impl Vm {
    /// Opens /dev/kvm and builds the VM.
    pub fn new(spec: &BootSpec) -> Result<Vm, KvmError> {
        if spec.ram_size == 0 || spec.ram_size > MAX_RAM || spec.ram_size % 4096 != 0 {
            return Err(KvmError::Unrunnable(format!(
                "{} bytes of RAM: the KVM engine maps whole pages of RAM, at most {MAX_RAM:#x} bytes (below the \
                 MMIO test region)",
                spec.ram_size
            )));
        }
        let kvm = ioctl("opening /dev/kvm", Kvm::new())?;
        let vm = ioctl("KVM_CREATE_VM", kvm.create_vm())?;
        let mut ram = GuestRam::new(spec.ram_size as usize)?;
        let memory = ram.as_mut_slice();
        for (gpa, bytes) in &spec.memory {
            let range = usize::try_from(*gpa)
                .ok()
                .and_then(|start| Some(start..start.checked_add(bytes.len())?))
                .filter(|range| range.end <= memory.len())
                .ok_or_else(|| {
                    KvmError::Unrunnable(format!(
                        "guest memory at {gpa:#x} ({} bytes) lies outside the {} bytes of RAM",
                        bytes.len(),
                        spec.ram_size
                    ))
                })?;
            memory[range].copy_from_slice(bytes);
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.len() as u64,
            userspace_addr: ram.host_address(),
        };
        // SAFETY: `region` describes `ram`, a private anonymous mapping of exactly `memory_size` bytes that stays
        // mapped until after the VM is gone (`Vm` drops `vcpu` and `vm` before `_ram`).
        unsafe { ioctl("KVM_SET_USER_MEMORY_REGION", vm.set_user_memory_region(region))? };
        ioctl("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
        ioctl("KVM_CREATE_PIT2", vm.create_pit2(kvm_pit_config::default()))?;
        let mut vcpu = ioctl("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
        let cpuid = ioctl("KVM_GET_SUPPORTED_CPUID", kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))?;
        ioctl("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
        load_entry_state(&vcpu, &spec.entry)?;
        let sync_regs = kvm.check_extension_int(Cap::SyncRegs) as u32 & KVM_SYNC_X86_REGS != 0;
        if sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
        }
        Ok(Vm { vcpu, vm, _ram: ram, sync_regs })
    }

    /// The VM's and the vCPU's statistics files.
    pub fn stats(&self) -> Result<(StatsFile, StatsFile), KvmError> {
        Ok((stats_file(&self.vm, "VM statistics")?, stats_file(&self.vcpu, "vCPU statistics")?))
    }

    /// The vCPU's time-stamp-counter rate (KVM_GET_TSC_KHZ), when the host's TSC is stable.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.vcpu.get_tsc_khz().ok()
    }

    fn rip(&self) -> u64 {
        if self.sync_regs {
            self.vcpu.sync_regs().regs.rip
        } else {
            self.vcpu.get_regs().map_or(u64::MAX, |regs| regs.rip)
        }
    }

    /// The RIP for an error report, always read with a system call (the run area is stale after EINTR).
    fn current_rip(&self) -> u64 {
        self.vcpu.get_regs().map_or(u64::MAX, |regs| regs.rip)
    }

    /// The engine's loop: runs the guest until it writes to the exit port, answering every exit with the
    /// reference machine's devices and counting it at its guest RIP.
    pub fn run(&mut self, timeout: Duration) -> Result<RunRecord, KvmError> {
        let mut devices = Devices::new();
        let mut exits: HashMap<(UserExit, u64), u64> = HashMap::new();
        let watchdog = Watchdog::start(timeout);
        let started = Instant::now();
        let tsc_start = tsc();
        let mut in_kvm = 0u64;
        let exit_status = loop {
            let entered = tsc();
            let result = self.vcpu.run();
            in_kvm += tsc().wrapping_sub(entered);
            let exit = match result {
                Ok(exit) => exit,
                Err(e) => {
                    self.interrupted(e, &watchdog, timeout)?;
                    continue;
                }
            };
            // The exit borrows the vCPU's run area; decide inside, act on the vCPU after.
            let (kind, stop) = match exit {
                VcpuExit::IoOut(port, data) => {
                    devices.port_out(port, data.len() as u32, little_endian(data), 0);
                    let flood = devices.serial.flooded().then_some(Stop::SerialFlood);
                    (UserExit::IoOut, devices.exit_request.map(Stop::Exit).or(flood))
                }
                VcpuExit::IoIn(port, data) => {
                    let value = devices.port_in(port, data.len() as u32, 0);
                    let len = data.len();
                    data.copy_from_slice(&value.to_le_bytes()[..len]);
                    (UserExit::IoIn, None)
                }
                VcpuExit::MmioRead(gpa, data) => {
                    data.fill(0);
                    (UserExit::MmioRead, (!in_mmio_test_region(gpa)).then_some(Stop::Unmapped(gpa)))
                }
                VcpuExit::MmioWrite(gpa, _) => {
                    (UserExit::MmioWrite, (!in_mmio_test_region(gpa)).then_some(Stop::Unmapped(gpa)))
                }
                other => {
                    let stop = Stop::from_exit(other);
                    return Err(self.fatal_exit(stop));
                }
            };
            *exits.entry((kind, self.rip())).or_insert(0) += 1;
            match stop {
                None => {}
                Some(Stop::Exit(status)) => break status,
                Some(stop) => return Err(self.fatal_exit(stop)),
            }
        };
        let tsc_cycles = tsc().wrapping_sub(tsc_start);
        let wall_time = started.elapsed();
        drop(watchdog);
        let serial = devices.serial.output().to_vec();
        let vmm_tsc_cycles = tsc_cycles.saturating_sub(in_kvm);
        Ok(RunRecord { exit_status, serial, exits, wall_time, tsc_cycles, vmm_tsc_cycles })
    }

    /// The least a VMM does for a virtlab guest: port and MMIO reads get all ones and zero (what the catalog's
    /// devices answer to the reads it makes), writes are dropped, the exit port ends the run. Timed like
    /// [`Vm::run`], for benchmarks of the engine's loop against it.
    pub fn run_bare(&mut self, timeout: Duration) -> Result<BareRecord, KvmError> {
        let watchdog = Watchdog::start(timeout);
        let mut exits = 0u64;
        let tsc_start = tsc();
        let mut in_kvm = 0u64;
        loop {
            let entered = tsc();
            let result = self.vcpu.run();
            in_kvm += tsc().wrapping_sub(entered);
            let exit = match result {
                Ok(exit) => exit,
                Err(e) => {
                    self.interrupted(e, &watchdog, timeout)?;
                    continue;
                }
            };
            exits += 1;
            match exit {
                VcpuExit::IoOut(DEBUG_EXIT_PORT, _) => {
                    let tsc_cycles = tsc().wrapping_sub(tsc_start);
                    return Ok(BareRecord { exits, tsc_cycles, vmm_tsc_cycles: tsc_cycles.saturating_sub(in_kvm) });
                }
                VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) => {}
                VcpuExit::IoIn(_, data) => data.fill(0xff),
                VcpuExit::MmioRead(_, data) => data.fill(0),
                other => {
                    let stop = Stop::from_exit(other);
                    return Err(self.fatal_exit(stop));
                }
            }
        }
    }

    /// KVM_RUN returned an error: EINTR from the watchdog's signal is a timeout once the deadline passed (and
    /// a stray signal otherwise); anything else ends the run.
    fn interrupted(&self, error: kvm_ioctls::Error, watchdog: &Watchdog, timeout: Duration) -> Result<(), KvmError> {
        if error.errno() != libc::EINTR {
            return Err(KvmError::Ioctl { what: "KVM_RUN", source: error });
        }
        if watchdog.expired() {
            return Err(KvmError::Timeout { seconds: timeout.as_secs_f64(), rip: self.current_rip() });
        }
        Ok(())
    }

    fn fatal_exit(&mut self, stop: Stop) -> KvmError {
        let rip = self.current_rip();
        match stop {
            Stop::Exit(_) => unreachable!("a guest exit is not an error"),
            Stop::Unmapped(gpa) => KvmError::UnmappedMmio { gpa, rip },
            Stop::TripleFault => KvmError::TripleFault { rip },
            Stop::SerialFlood => KvmError::SerialFlood { limit: virtlab_machine::devices::MAX_SERIAL_BYTES, rip },
            Stop::Unexpected(exit) => KvmError::UnexpectedExit { exit, rip },
            Stop::Internal => internal_error(&mut self.vcpu, rip),
        }
    }
}

fn little_endian(data: &[u8]) -> u32 {
    data.iter().rev().fold(0, |value, &byte| value << 8 | u32::from(byte))
}

fn in_mmio_test_region(gpa: u64) -> bool {
    (MMIO_TEST_BASE..MMIO_TEST_BASE + MMIO_TEST_SIZE).contains(&gpa)
}

/// Why the run loop stops.
enum Stop {
    Exit(u32),
    Unmapped(u64),
    TripleFault,
    SerialFlood,
    Internal,
    Unexpected(String),
}

impl Stop {
    /// An exit the run loops do not serve.
    fn from_exit(exit: VcpuExit) -> Stop {
        match exit {
            VcpuExit::Shutdown => Stop::TripleFault,
            VcpuExit::InternalError => Stop::Internal,
            other => Stop::Unexpected(format!("{other:?}")),
        }
    }
}

/// KVM's internal-error exit, with its suberror named.
fn internal_error(vcpu: &mut VcpuFd, rip: u64) -> KvmError {
    // SAFETY: reading the `internal` member of the run area's exit union is valid after a
    // KVM_EXIT_INTERNAL_ERROR exit, which is the only caller.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let suberror = match internal.suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
            "KVM's instruction emulator cannot run the instruction there".to_string()
        }
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

fn load_entry_state(vcpu: &VcpuFd, entry: &EntryState) -> Result<(), KvmError> {
    let mut sregs = ioctl("KVM_GET_SREGS", vcpu.get_sregs())?;
    let [es, cs, ss, ds, fs, gs] = entry.segments.each_ref().map(kvm_segment_of);
    (sregs.es, sregs.cs, sregs.ss, sregs.ds, sregs.fs, sregs.gs) = (es, cs, ss, ds, fs, gs);
    // Hardware requires a usable task register in protected mode even before the guest loads its own.
    sregs.tr = kvm_segment { limit: 0xffff, type_: 11, present: 1, ..Default::default() };
    sregs.ldt = kvm_segment { type_: 2, unusable: 1, ..Default::default() };
    (sregs.gdt.base, sregs.gdt.limit) = entry.gdtr;
    (sregs.idt.base, sregs.idt.limit) = entry.idtr;
    sregs.cr0 = entry.cr0;
    sregs.cr3 = entry.cr3;
    sregs.cr4 = entry.cr4;
    sregs.efer = entry.efer;
    ioctl("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
    let mut regs = ioctl("KVM_GET_REGS", vcpu.get_regs())?;
    let [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi] = entry.gpr;
    (regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi) =
        (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi);
    regs.rip = entry.rip;
    regs.rflags = entry.rflags;
    ioctl("KVM_SET_REGS", vcpu.set_regs(&regs))
}
