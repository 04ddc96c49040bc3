//! The machine and its run loop: blocks, time, interrupts, limits.

use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};

use crate::cpu::{CodeMode, Cpu};
use crate::decode::BlockCache;
use crate::devices::Devices;
use crate::error::MachineError;
use crate::fast::FastForm;
use crate::memory::{Memory, Tlb};
use crate::observer::{BlockExecution, CpuContext, CutShortReason, ExecutionObserver};

/// Guest RAM and loader settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Bytes of RAM at guest-physical 0; a multiple of 4 KiB, 2 MiB to 3 GiB.
    pub ram_size: u64,
    /// Passed to the guest through the Multiboot information structure.
    pub command_line: String,
}

impl Default for MachineConfig {
    fn default() -> MachineConfig {
        MachineConfig { ram_size: virtlab_machine_facts::MACHINE.ram_bytes, command_line: String::new() }
    }
}

/// When to give up on a guest that does not stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Retired instructions allowed in one call to [`Machine::run`].
    pub max_instructions: u64,
}

impl Default for RunLimits {
    fn default() -> RunLimits {
        RunLimits { max_instructions: 10_000_000_000 }
    }
}

/// How a run ended when the guest itself ended it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// The value the guest wrote to `isa-debug-exit` (port 0xF4). QEMU's process exits with
    /// `(status << 1) | 1` for the same write.
    pub exit_status: u32,
    pub serial: Vec<u8>,
    pub retired_user: u64,
    pub retired_kernel: u64,
    /// Instruction-time units spent halted.
    pub idle_time: u64,
    /// See [`Machine::state_digest`].
    pub digest: [u8; 32],
}

/// Why an instruction did not complete.
pub(crate) enum Fault {
    /// An architectural exception, delivered through the IDT. `address` is CR2 for #PF.
    Exception { vector: u8, error_code: Option<u32>, address: Option<u64> },
    /// The run ends with an error.
    Stop(Box<MachineError>),
}

/// The reference machine: one CPU, RAM, the devices, and the caches that make interpretation fast.
/// Blocks run between two readings of the wall clock when a deadline is set.
const CLOCK_CHECK_INTERVAL: u32 = 4096;

pub struct Machine {
    pub(crate) cpu: Cpu,
    /// `cpu.code_mode()`, refreshed whenever CS, CR0 or EFER change.
    pub(crate) mode: CodeMode,
    pub(crate) memory: Memory,
    pub(crate) tlb: Tlb,
    pub(crate) blocks: BlockCache,
    pub(crate) devices: Devices,
    /// (page, access kind, privilege) keys reported as touched in the current TLB epoch. An ordered set: as the
    /// standard hash set (SipHash on every TLB miss), it made recording `mmap` 5 % dearer (callgrind).
    pub(crate) touched_pages: BTreeSet<u64>,
    /// The tables the last faulting page walk read, reported with its #PF.
    pub(crate) fault_walk: Option<crate::observer::PageWalk>,
    pub(crate) page_table_roots: Vec<u64>,
    pub(crate) page_table_frames: Vec<u64>,
    pub(crate) page_table_map_valid: bool,
    pub(crate) retired_user: u64,
    pub(crate) retired_kernel: u64,
    pub(crate) idle_time: u64,
    pub(crate) index_in_block: u32,
    /// True while a block is being fetched: its first execute touches wait in `fetch_touches` until the block
    /// has been reported, so that they belong to it (at position 0) rather than to the block before.
    pub(crate) fetching: bool,
    pub(crate) fetch_touches: Vec<crate::observer::SideEvent>,
    /// Wall-clock time after which `run` stops at the next block boundary (see [`Machine::set_deadline`]).
    pub(crate) deadline: Option<std::time::Instant>,
    pub(crate) blocks_until_clock_check: u32,
    /// Set mid-block when the block must not go on: its code was overwritten, or the guest exited.
    pub(crate) end_block: bool,
    pub(crate) exit_status: Option<u32>,
    pub(crate) last_context: Option<CpuContext>,
}

/// Roots kept for page-table tracking: enough for every address space a test guest switches among.
const MAX_PAGE_TABLE_ROOTS: usize = 64;

impl Machine {
    /// A machine with the given RAM, CPU in its power-on state (callers set the entry state).
    pub(crate) fn bare(ram_size: u64) -> Machine {
        let cpu = Cpu::default();
        Machine {
            mode: cpu.code_mode(),
            cpu,
            memory: Memory::new(ram_size),
            tlb: Tlb::new(),
            blocks: BlockCache::new(),
            devices: Devices::new(),
            touched_pages: BTreeSet::new(),
            fault_walk: None,
            page_table_roots: Vec::new(),
            page_table_frames: Vec::new(),
            page_table_map_valid: false,
            retired_user: 0,
            retired_kernel: 0,
            idle_time: 0,
            index_in_block: 0,
            fetching: false,
            fetch_touches: Vec::new(),
            deadline: None,
            blocks_until_clock_check: CLOCK_CHECK_INTERVAL,
            end_block: false,
            exit_status: None,
            last_context: None,
        }
    }

    /// A machine with zeroed RAM and the CPU in the Multiboot entry state minus the loaded image:
    /// for harnesses that place code and tables themselves and then set the CPU through
    /// [`Machine::cpu_mut`] followed by [`Machine::cpu_changed`].
    pub fn new(config: &MachineConfig) -> Result<Machine, crate::error::LoadError> {
        let ram_size = config.ram_size;
        if ram_size & 0xFFF != 0 || ram_size < (2 << 20) || ram_size > crate::memory::MMIO_TEST_BASE.min(3 << 30) {
            return Err(crate::error::LoadError::BadMemorySize { ram_size });
        }
        Ok(Machine::bare(ram_size))
    }

    /// Runs until the guest exits through port 0xF4 or something ends the run with an error.
    pub fn run<O: ExecutionObserver>(
        &mut self,
        observer: &mut O,
        limits: RunLimits,
    ) -> Result<RunOutcome, MachineError> {
        let mut interp = Interp { machine: self, obs: observer };
        interp.run_loop(limits)
    }

    /// Makes [`Machine::run`] stop with [`MachineError::Deadline`] once this wall-clock time has passed,
    /// at a block boundary (so the run up to there is exactly what an unlimited run would have done). `None`
    /// removes the deadline. Only where the run stops depends on the host's clock, never what it did.
    pub fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.deadline = deadline;
    }

    /// Instruction time: retired instructions plus time spent halted. The TSC and the PIT run on it.
    pub fn now(&self) -> u64 {
        self.retired_user + self.retired_kernel + self.idle_time
    }

    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    pub fn cpu_mut(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    /// Re-derives cached state after the CPU was changed from outside (tests, snapshots).
    pub fn cpu_changed(&mut self) {
        self.mode = self.cpu.code_mode();
        self.tlb.flush();
        self.touched_pages.clear();
        self.note_page_table_root(self.cpu.cr3);
    }

    pub fn ram(&self) -> &[u8] {
        &self.memory.ram
    }

    /// All of RAM, to write as the caller likes (so every frame counts as written from now on).
    pub fn ram_mut(&mut self) -> &mut [u8] {
        let size = self.memory.ram_size();
        self.memory.touch(0..size);
        &mut self.memory.ram
    }

    /// Every 4 KiB page of RAM that is not all zero, in address order, as (guest-physical address, bytes).
    pub fn nonzero_pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.memory.nonzero_frames().map(|(frame, bytes)| (frame * crate::memory::PAGE_SIZE, bytes))
    }

    pub fn serial_output(&self) -> &[u8] {
        self.devices.serial.output()
    }

    pub fn retired_instructions(&self) -> u64 {
        self.retired_user + self.retired_kernel
    }

    /// Distinct blocks decoded so far.
    pub fn blocks_decoded(&self) -> u64 {
        self.blocks.blocks_decoded()
    }

    pub(crate) fn note_page_table_root(&mut self, cr3: u64) {
        if let Some(position) = self.page_table_roots.iter().position(|&root| root == cr3) {
            self.page_table_roots.remove(position);
        } else {
            self.page_table_map_valid = false;
        }
        if self.page_table_roots.len() == MAX_PAGE_TABLE_ROOTS {
            self.page_table_roots.remove(0);
            self.page_table_map_valid = false;
        }
        self.page_table_roots.push(cr3);
    }

    pub(crate) fn context(&self) -> CpuContext {
        CpuContext {
            cpl: self.cpu.cpl,
            paging: self.cpu.paging_mode(),
            cr3: self.cpu.cr3,
            interrupts_enabled: self.cpu.interrupts_enabled(),
        }
    }
}

/// The machine together with the observer of one run; all execution happens here so reports are
/// monomorphized per observer.
pub(crate) struct Interp<'a, O: ExecutionObserver> {
    pub machine: &'a mut Machine,
    pub obs: &'a mut O,
}

impl<O: ExecutionObserver> Deref for Interp<'_, O> {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        self.machine
    }
}

impl<O: ExecutionObserver> DerefMut for Interp<'_, O> {
    fn deref_mut(&mut self) -> &mut Machine {
        self.machine
    }
}

impl<O: ExecutionObserver> Interp<'_, O> {
    fn run_loop(&mut self, limits: RunLimits) -> Result<RunOutcome, MachineError> {
        let start = self.retired_instructions();
        loop {
            if let Some(status) = self.exit_status {
                return Ok(self.finish(status));
            }
            if O::ENABLED {
                self.report_context_change();
                if !self.page_table_map_valid {
                    self.rebuild_page_table_map();
                }
            }
            let now = self.now();
            self.devices.advance_time(now);
            if self.cpu.interrupt_shadow {
                self.cpu.interrupt_shadow = false;
                self.run_block(start, limits, 1)?;
                continue;
            }
            if self.cpu.interrupts_enabled() {
                if let Some(vector) = self.devices.pic.acknowledge() {
                    self.deliver_external_interrupt(vector)?;
                    continue;
                }
            }
            let until_timer = self.devices.time_until_next_event(now).unwrap_or(u64::MAX).max(1);
            self.run_block(start, limits, until_timer)?;
        }
    }

    /// Runs blocks until `budget` instructions retired, a block ends in anything but a plain
    /// branch, or an instruction faults.
    fn run_block(&mut self, start: u64, limits: RunLimits, budget: u64) -> Result<(), MachineError> {
        let executed = self.retired_instructions() - start;
        if executed >= limits.max_instructions {
            return Err(MachineError::InstructionLimit { limit: limits.max_instructions, rip: self.cpu.rip });
        }
        let mut budget = budget.min(limits.max_instructions - executed);
        loop {
            // A fetch fault happens between blocks (at the previous block's retired count, where
            // `index_in_block` stands); the fetch's page touches belong to the block it fetched.
            self.fetching = O::ENABLED;
            let fetched = self.fetch_block();
            self.fetching = false;
            let block = match fetched {
                Ok(block) => block,
                Err(fault) => {
                    self.report_fetch_touches();
                    return self.handle_fault(fault);
                }
            };
            if O::ENABLED {
                let address_space = if block.user_page { self.cpu.cr3 } else { 0 };
                let execution = BlockExecution {
                    id: block.id,
                    address: block.linear,
                    mode: block.mode,
                    bytes: &block.bytes,
                    address_space,
                    instruction_count: block.instructions.len() as u32,
                };
                self.obs.block(&execution);
                self.index_in_block = 0;
                self.report_fetch_touches();
            }
            let user = self.cpu.cpl == 3;
            let runnable = (block.instructions.len() as u64).min(budget) as usize;
            let address_mask = match self.mode {
                CodeMode::Bits64 => u64::MAX,
                CodeMode::Bits32 => 0xFFFF_FFFF,
                CodeMode::Bits16 => 0xFFFF,
            };
            let mut retired = 0usize;
            let mut fault = None;
            for (instruction, form) in block.instructions[..runnable].iter().zip(&block.forms[..runnable]) {
                self.index_in_block = retired as u32;
                self.cpu.rip = instruction.next_ip() & address_mask;
                let result = match form {
                    FastForm::General => self.execute(instruction),
                    _ => self.execute_fast(*form),
                };
                match result {
                    Ok(()) => {
                        retired += 1;
                        if self.end_block {
                            break;
                        }
                    }
                    Err(error) => {
                        self.cpu.rip = instruction.ip();
                        fault = Some(error);
                        break;
                    }
                }
            }
            // From here until the next block, events come after the instructions that retired.
            self.index_in_block = retired as u32;
            let ended_early = self.end_block;
            self.end_block = false;
            if user {
                self.retired_user += retired as u64;
            } else {
                self.retired_kernel += retired as u64;
            }
            if O::ENABLED && retired < block.instructions.len() {
                let reason = if fault.is_some() { CutShortReason::Exception } else { CutShortReason::Stopped };
                self.obs.block_cut_short(retired as u32, reason);
            }
            if let Some(fault) = fault {
                return self.handle_fault(fault);
            }
            budget -= retired as u64;
            if self.deadline_passed() {
                return Err(MachineError::Deadline { rip: self.cpu.rip });
            }
            if ended_early || budget == 0 || !block.chains || retired < block.instructions.len() {
                return Ok(());
            }
        }
    }

    /// Reads the clock only every [`CLOCK_CHECK_INTERVAL`] blocks: a few microseconds of guest time.
    #[inline]
    fn deadline_passed(&mut self) -> bool {
        let Some(deadline) = self.deadline else { return false };
        self.blocks_until_clock_check -= 1;
        if self.blocks_until_clock_check > 0 {
            return false;
        }
        self.blocks_until_clock_check = CLOCK_CHECK_INTERVAL;
        std::time::Instant::now() >= deadline
    }

    fn handle_fault(&mut self, fault: Fault) -> Result<(), MachineError> {
        match fault {
            Fault::Exception { vector, error_code, address } => self.deliver_exception(vector, error_code, address),
            Fault::Stop(mut error) => {
                // Built while the instruction ran, when RIP already pointed past it; RIP is rewound to the
                // instruction that made the access by now.
                if let MachineError::UnbackedPhysicalAddress { rip, .. } = error.as_mut() {
                    *rip = self.cpu.rip;
                }
                Err(*error)
            }
        }
    }

    fn report_fetch_touches(&mut self) {
        let index = self.index_in_block;
        for event in std::mem::take(&mut self.fetch_touches) {
            self.obs.side_event(index, &event);
        }
    }

    pub(crate) fn report_context_change(&mut self) {
        let context = self.context();
        if self.last_context != Some(context) {
            self.last_context = Some(context);
            let index = self.index_in_block;
            self.obs.context(index, &context);
        }
    }

    fn finish(&mut self, status: u32) -> RunOutcome {
        if O::ENABLED {
            self.report_context_change();
        }
        RunOutcome {
            exit_status: status,
            serial: self.devices.serial.output().to_vec(),
            retired_user: self.retired_user,
            retired_kernel: self.retired_kernel,
            idle_time: self.idle_time,
            digest: self.state_digest(),
        }
    }
}
