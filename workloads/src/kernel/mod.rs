//! The guest kernel, assembled with iced-x86's `CodeAssembler`.
//!
//! The 32-bit boot stub (`boot`) is assembled on its own; everything else is one 64-bit assembly that
//! starts at `layout::KERNEL_CODE_ADDRESS` with the long-mode entry point, followed by the workload
//! driver, the kernel's routines, out-of-line failure paths and finally read-only strings and the
//! user program.
//!
//! Register conventions inside the kernel follow the System V ABI: routines may clobber RAX, RCX,
//! RDX, RSI, RDI and R8–R11 and preserve RBX, RBP and R12–R15, unless a routine's comment says
//! otherwise.

pub(crate) mod boot;
pub(crate) mod descriptors;
pub(crate) mod interrupts;
pub(crate) mod memory;
pub(crate) mod process;
pub(crate) mod serial;
pub(crate) mod syscalls;

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use crate::layout;

pub(crate) type AsmResult<T = ()> = Result<T, IcedError>;

/// Labels of the kernel routines that other modules call or jump to.
pub(crate) struct Routines {
    pub kernel_init: CodeLabel,
    pub serial_init: CodeLabel,
    pub serial_write: CodeLabel,
    pub print_unsigned: CodeLabel,
    pub exit_machine: CodeLabel,
    pub report_success: CodeLabel,
    pub report_failure: CodeLabel,
    pub load_descriptor_tables: CodeLabel,
    pub set_interrupt_gate: CodeLabel,
    pub interrupt_controller_init: CodeLabel,
    pub syscall_init: CodeLabel,
    pub frame_pool_init: CodeLabel,
    pub alloc_frame: CodeLabel,
    pub alloc_frame_raw: CodeLabel,
    pub alloc_page_table: CodeLabel,
    pub free_frame: CodeLabel,
    pub put_frame: CodeLabel,
    pub out_of_memory: CodeLabel,
    pub user_pte_address: CodeLabel,
    pub create_address_space: CodeLabel,
    pub free_address_space: CodeLabel,
    pub share_user_pages: CodeLabel,
    pub user_region_lookup: CodeLabel,
    pub page_fault_handler: CodeLabel,
    pub divide_error_handler: CodeLabel,
    pub timer_handler: CodeLabel,
    pub spurious_irq_handler: CodeLabel,
    pub fault_common: CodeLabel,
    pub exception_stubs: Vec<CodeLabel>,
    pub syscall_entry: CodeLabel,
    pub syscall_return: CodeLabel,
    pub sys_exit: CodeLabel,
    pub sys_getpid: CodeLabel,
    pub sys_write: CodeLabel,
    pub sys_fork: CodeLabel,
    pub sys_wait: CodeLabel,
    pub sys_yield: CodeLabel,
    pub sys_mmap: CodeLabel,
    pub sys_munmap: CodeLabel,
    pub sys_set_trap_handler: CodeLabel,
    pub schedule: CodeLabel,
    pub switch_to: CodeLabel,
    pub exit_current: CodeLabel,
    pub fork_child_return: CodeLabel,
    pub start_first_process: CodeLabel,
}

/// The 64-bit kernel under construction.
pub(crate) struct Kernel {
    pub a: CodeAssembler,
    pub r: Routines,
    /// Print the memory-management counters before `ok` (the `counters` parameter of user workloads).
    pub print_counters: bool,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    failure_paths: Vec<(CodeLabel, String)>,
    user_program: Option<(CodeLabel, Vec<u8>)>,
}

impl Kernel {
    pub fn new() -> AsmResult<Self> {
        let mut a = CodeAssembler::new(64)?;
        let mut l = || a.create_label();
        let r = Routines {
            kernel_init: l(),
            serial_init: l(),
            serial_write: l(),
            print_unsigned: l(),
            exit_machine: l(),
            report_success: l(),
            report_failure: l(),
            load_descriptor_tables: l(),
            set_interrupt_gate: l(),
            interrupt_controller_init: l(),
            syscall_init: l(),
            frame_pool_init: l(),
            alloc_frame: l(),
            alloc_frame_raw: l(),
            alloc_page_table: l(),
            free_frame: l(),
            put_frame: l(),
            out_of_memory: l(),
            user_pte_address: l(),
            create_address_space: l(),
            free_address_space: l(),
            share_user_pages: l(),
            user_region_lookup: l(),
            page_fault_handler: l(),
            divide_error_handler: l(),
            timer_handler: l(),
            spurious_irq_handler: l(),
            fault_common: l(),
            exception_stubs: (0..layout::IDT_ENTRIES).map(|_| l()).collect(),
            syscall_entry: l(),
            syscall_return: l(),
            sys_exit: l(),
            sys_getpid: l(),
            sys_write: l(),
            sys_fork: l(),
            sys_wait: l(),
            sys_yield: l(),
            sys_mmap: l(),
            sys_munmap: l(),
            sys_set_trap_handler: l(),
            schedule: l(),
            switch_to: l(),
            exit_current: l(),
            fork_child_return: l(),
            start_first_process: l(),
        };
        Ok(Kernel { a, r, print_counters: false, strings: Vec::new(), failure_paths: Vec::new(), user_program: None })
    }

    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    pub fn bind(&mut self, label: &mut CodeLabel) -> AsmResult {
        self.a.set_label(label)
    }

    /// A read-only string placed after the code; returns its label and length.
    pub fn string(&mut self, text: &str) -> (CodeLabel, u32) {
        let label = self.a.create_label();
        let bytes = text.as_bytes().to_vec();
        let length = bytes.len() as u32;
        self.strings.push((label, bytes));
        (label, length)
    }

    /// Embeds the user program after the strings; returns its label and its size rounded up to
    /// whole pages.
    pub fn embed_user_program(&mut self, program: Vec<u8>) -> (CodeLabel, u32) {
        let label = self.a.create_label();
        let length = program.len().next_multiple_of(4096) as u32;
        self.user_program = Some((label, program));
        (label, length)
    }

    /// Writes `text` to the serial console.
    pub fn print(&mut self, text: &str) -> AsmResult {
        let (label, length) = self.string(text);
        self.a.lea(rsi, ptr(label))?;
        self.a.mov(edx, length)?;
        self.a.call(self.r.serial_write)
    }

    /// Prints RDI in the given base (10 or 16) on the serial console.
    pub fn print_number(&mut self, base: u32) -> AsmResult {
        self.a.mov(esi, base)?;
        self.a.call(self.r.print_unsigned)
    }

    /// A label that, when jumped to, reports a failed self-check with `message` and ends the run.
    pub fn failure(&mut self, message: &str) -> CodeLabel {
        let label = self.a.create_label();
        self.failure_paths.push((label, message.to_string()));
        label
    }

    /// Emits the failure paths, strings and the user program, and assembles everything.
    pub fn finish(mut self) -> AsmResult<Vec<u8>> {
        for (mut label, message) in std::mem::take(&mut self.failure_paths) {
            let (text, length) = self.string(&message);
            self.a.set_label(&mut label)?;
            self.a.lea(rsi, ptr(text))?;
            self.a.mov(edx, length)?;
            self.a.jmp(self.r.report_failure)?;
        }
        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            self.a.set_label(&mut label)?;
            self.a.db(&bytes)?;
        }
        if let Some((mut label, mut program)) = self.user_program.take() {
            // Whole pages, so the page-by-page copy into the first process never reads past the image.
            program.resize(program.len().next_multiple_of(4096), 0);
            self.a.set_label(&mut label)?;
            self.a.db(&program)?;
        }
        self.a.assemble(layout::KERNEL_CODE_ADDRESS)
    }
}

/// The 64-bit entry point (first instruction at `KERNEL_CODE_ADDRESS`): flat data segments, the
/// boot stack, kernel initialisation, the banner; the workload driver follows directly.
pub(crate) fn emit_entry(k: &mut Kernel, banner: &str) -> AsmResult {
    k.a.mov(ax, layout::KERNEL_DATA_SELECTOR as u32)?;
    k.a.mov(ds, ax)?;
    k.a.mov(es, ax)?;
    k.a.mov(ss, ax)?;
    k.a.xor(eax, eax)?;
    k.a.mov(fs, ax)?;
    k.a.mov(gs, ax)?;
    k.a.mov(rsp, layout::BOOT_STACK_TOP)?;
    k.a.call(k.r.kernel_init)?;
    k.print(banner)
}

/// kernel_init: everything start-up does after the switch to long mode. It can run again (the
/// `boot` workload repeats it) as long as no process exists.
fn emit_kernel_init(k: &mut Kernel) -> AsmResult {
    let mut entry = k.r.kernel_init;
    k.bind(&mut entry)?;
    k.a.call(k.r.serial_init)?;
    k.a.call(k.r.load_descriptor_tables)?;
    k.a.call(k.r.syscall_init)?;
    k.a.call(k.r.interrupt_controller_init)?;
    k.a.call(k.r.frame_pool_init)?;
    for slot in 0..layout::PROCESS_SLOTS {
        let stack_top = layout::KERNEL_STACKS + (slot + 1) * layout::KERNEL_STACK_BYTES;
        let field = layout::PROCESS_TABLE + slot * layout::PROCESS_SLOT_BYTES + layout::PROC_KERNEL_STACK_TOP as u64;
        k.a.mov(qword_ptr(field), stack_top as i32)?;
    }
    k.a.ret()
}

/// Emits every kernel routine; called after the entry point and the workload driver.
pub(crate) fn emit_routines(k: &mut Kernel) -> AsmResult {
    emit_kernel_init(k)?;
    serial::emit(k)?;
    descriptors::emit(k)?;
    interrupts::emit(k)?;
    memory::emit(k)?;
    syscalls::emit(k)?;
    process::emit(k)
}
