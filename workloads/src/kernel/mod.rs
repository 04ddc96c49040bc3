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

use std::collections::HashSet;

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use crate::layout;
use crate::symbols::{FunctionLabels, Symbol};

pub(crate) type AsmResult<T = ()> = Result<T, IcedError>;

/// Declares the kernel routines' labels (fields of `Routines`) once: the struct, their creation, and their names
/// for the image's symbol map.
macro_rules! routines {
    ($($name:ident),* $(,)?) => {
        /// Labels of the kernel routines that other modules call or jump to.
        pub(crate) struct Routines {
            $(pub $name: CodeLabel,)*
            pub exception_stubs: Vec<CodeLabel>,
        }

        impl Routines {
            fn new(a: &mut CodeAssembler) -> Self {
                Routines {
                    $($name: a.create_label(),)*
                    exception_stubs: (0..layout::IDT_ENTRIES).map(|_| a.create_label()).collect(),
                }
            }

            /// Every routine's label with its name (`exception_stub_14` for the stubs).
            fn named(&self) -> Vec<(String, CodeLabel)> {
                let mut named = vec![$((stringify!($name).to_string(), self.$name)),*];
                named.extend(self.exception_stubs.iter().enumerate().map(|(v, l)| (format!("exception_stub_{v}"), *l)));
                named
            }
        }
    };
}

routines!(
    kernel_init,
    serial_init,
    serial_write,
    print_unsigned,
    exit_machine,
    report_success,
    report_failure,
    load_descriptor_tables,
    set_interrupt_gate,
    interrupt_controller_init,
    syscall_init,
    frame_pool_init,
    alloc_frame,
    alloc_frame_raw,
    alloc_page_table,
    free_frame,
    put_frame,
    out_of_memory,
    user_pte_address,
    create_address_space,
    free_address_space,
    share_user_pages,
    user_region_lookup,
    page_fault_handler,
    divide_error_handler,
    timer_handler,
    spurious_irq_handler,
    fault_common,
    syscall_entry,
    syscall_return,
    sys_exit,
    sys_getpid,
    sys_write,
    sys_fork,
    sys_wait,
    sys_yield,
    sys_mmap,
    sys_munmap,
    sys_set_trap_handler,
    schedule,
    switch_to,
    exit_current,
    fork_child_return,
    start_first_process,
);

/// The 64-bit kernel under construction.
pub(crate) struct Kernel {
    pub a: CodeAssembler,
    pub r: Routines,
    /// Print the memory-management counters before `ok` (the `counters` parameter of user workloads).
    pub print_counters: bool,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    failure_paths: Vec<(CodeLabel, String)>,
    user_program: Option<(CodeLabel, Vec<u8>, Vec<Symbol>)>,
    functions: FunctionLabels,
    /// Every label bound through `bind`, as bound (the routines' copies in `r` never are).
    bound: HashSet<CodeLabel>,
}

impl Kernel {
    pub fn new() -> AsmResult<Self> {
        let mut a = CodeAssembler::new(64)?;
        let r = Routines::new(&mut a);
        Ok(Kernel {
            a,
            r,
            print_counters: false,
            strings: Vec::new(),
            failure_paths: Vec::new(),
            user_program: None,
            functions: FunctionLabels::default(),
            bound: HashSet::new(),
        })
    }

    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    pub fn bind(&mut self, label: &mut CodeLabel) -> AsmResult {
        self.a.set_label(label)?;
        self.bound.insert(*label);
        Ok(())
    }

    /// Names the code from the next instruction to the next named function in the symbol map.
    pub fn function(&mut self, name: &str) -> AsmResult {
        self.functions.begin(&mut self.a, name)
    }

    /// A read-only string placed after the code; returns its label and length.
    pub fn string(&mut self, text: &str) -> (CodeLabel, u32) {
        let label = self.a.create_label();
        let bytes = text.as_bytes().to_vec();
        let length = bytes.len() as u32;
        self.strings.push((label, bytes));
        (label, length)
    }

    /// Embeds the user program (its bytes and its symbols at its user-space addresses) after the strings; returns
    /// its label and its size rounded up to whole pages.
    pub fn embed_user_program(&mut self, program: Vec<u8>, symbols: Vec<Symbol>) -> (CodeLabel, u32) {
        let label = self.a.create_label();
        let length = program.len().next_multiple_of(4096) as u32;
        self.user_program = Some((label, program, symbols));
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

    /// Emits the failure paths, strings and the user program, and assembles everything: the image's kernel bytes
    /// and the symbols of the kernel and of the user program.
    pub fn finish(mut self) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
        for (name, label) in self.r.named() {
            if let Some(bound) = self.bound.get(&label) {
                self.functions.add(&name, *bound);
            }
        }
        for (i, (mut label, message)) in std::mem::take(&mut self.failure_paths).into_iter().enumerate() {
            let (text, length) = self.string(&message);
            self.a.set_label(&mut label)?;
            if i == 0 {
                self.functions.add("failure_paths", label);
            }
            self.a.lea(rsi, ptr(text))?;
            self.a.mov(edx, length)?;
            self.a.jmp(self.r.report_failure)?;
        }
        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            self.a.set_label(&mut label)?;
            self.functions.end_code_at(label);
            self.a.db(&bytes)?;
        }
        let mut user_symbols = Vec::new();
        if let Some((mut label, mut program, symbols)) = self.user_program.take() {
            // Whole pages, so the page-by-page copy into the first process never reads past the image.
            program.resize(program.len().next_multiple_of(4096), 0);
            self.a.set_label(&mut label)?;
            self.functions.end_code_at(label);
            self.a.db(&program)?;
            user_symbols = symbols;
        }
        let (bytes, mut symbols) = self.functions.assemble(&mut self.a, layout::KERNEL_CODE_ADDRESS)?;
        symbols.extend(user_symbols);
        Ok((bytes, symbols))
    }
}

/// The 64-bit entry point (first instruction at `KERNEL_CODE_ADDRESS`): flat data segments, the
/// boot stack, kernel initialisation, the banner; the workload driver follows directly.
pub(crate) fn emit_entry(k: &mut Kernel, banner: &str) -> AsmResult {
    k.function("kernel_entry")?;
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
