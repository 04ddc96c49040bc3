//! The x86-32 guest kernel (`arch=x86-32`): 32-bit protected mode with flat segments, the kernel at CPL 0, its
//! own GDT, 32-bit TSS and IDT (32-bit interrupt gates), two-level paging with 4 KiB pages (no PAE, no PSE), and
//! the serial console, PIC and PIT programmed exactly as the 64-bit kernel programs them. The Multiboot entry
//! jumps straight to it; it prints the same banner, `ok` and `FAIL: …` lines and ends through the same exit port
//! with the same codes.
//!
//! It never maps or touches a linear address from `HYPERVISOR_HOLE` (0xFC00_0000) up: a hypervisor that shares
//! the guest's linear address space lives there — VMware's monitor in the top 4 MiB, 32-bit Xen in the top
//! 64 MiB — so the guest leaves the whole top 64 MiB alone.
//!
//! A process (user-mode workloads: `process`, `sched`) has the 4 MiB from `process::USER_CODE` (0x4000_0000) and
//! one anonymous mapping in the 16 MiB from `memory::MMAP_BASE` (0x4800_0000).
//!
//! Register conventions: routines may clobber EAX, ECX, EDX, ESI and EDI and preserve EBX, EBP and ESP.

pub(crate) mod memory;
pub(crate) mod process;
pub(crate) mod sched;

use iced_x86::code_asm::*;

use crate::asm32::{
    self, descriptor, gate, selector, LabelAddresses, Pass, FLAT_4K_32, INTERRUPT_GATE_DPL0, TRAP_GATE_DPL3, TSS_LIMIT,
};
use crate::kernel::interrupts::{interrupt_controller_writes, END_OF_INTERRUPT, VECTORS_WITH_ERROR_CODE};
use crate::kernel::serial::serial_init_writes;
use crate::kernel::AsmResult;
use crate::layout::{BOOT_STACK_TOP, IDT_ENTRIES, KERNEL_CODE_ADDRESS, KERNEL_CR0};
use crate::machine::{exit_code, MACHINE};
use crate::symbols::{FunctionLabels, Symbol};

pub(crate) use process::USER_CODE;

/// The lowest linear address of the top 64 MiB, which the kernel never maps or touches.
pub const HYPERVISOR_HOLE: u32 = 0xFC00_0000;

// The kernel's fixed data, identity mapped, inside what the loader zeroes (up to `layout::BSS_END`).
pub const GDT: u32 = 0x20_0000;
pub const GDT_ENTRIES: u32 = 6;
const GDT_POINTER: u32 = GDT + 0x100;
const IDT_POINTER: u32 = GDT + 0x108;
pub const VAR_TIMER_TICKS: u32 = GDT + 0x110;
pub const TSS: u32 = GDT + 0x200;
pub const IDT: u32 = 0x20_1000;
/// `INT 0x80`: the system-call gate, DPL 3. The IDT runs up to it; the gates between the PIC's and it are
/// not present.
pub const SYSCALL_VECTOR: u32 = 0x80;
pub const IDT_LIMIT: u32 = (SYSCALL_VECTOR + 1) * 8 - 1;
/// The boot stack's top: where start-up runs, and, once process 1 runs, every kernel entry from user mode.
pub const BOOT_STACK_TOP32: u32 = BOOT_STACK_TOP as u32;
pub const PAGE_DIRECTORY: u32 = 0x20_2000;
/// The page table of the first 4 MiB (page 0 left out: the null guard).
pub const PAGE_TABLE_LOW: u32 = 0x20_3000;
/// The page table of the 4 MiB that hold the MMIO test region.
pub(crate) const PAGE_TABLE_MMIO: u32 = 0x20_4000;
pub const PTE_PRESENT_WRITABLE: u32 = 0x3;
/// Write-through and cache-disabled: the MMIO test region must not be cached.
const PTE_UNCACHED: u32 = 0x18;

const _: () = assert!((MACHINE.mmio_test_base as u32) < HYPERVISOR_HOLE);
const _: () = assert!(BOOT_STACK_TOP <= 0x40_0000, "the boot stack lies in the first 4 MiB");

/// The GDT: flat code and data at DPL 0 and 3 (the order SYSENTER/SYSEXIT need) and the TSS.
pub fn gdt() -> [u64; GDT_ENTRIES as usize] {
    [
        0,
        descriptor(0, 0xF_FFFF, 0x9B, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0x93, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0xFB, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0xF3, FLAT_4K_32),
        descriptor(TSS, TSS_LIMIT, 0x89, 0),
    ]
}

/// Labels of the kernel routines drivers call or jump to.
pub(crate) struct Routines32 {
    pub kernel_init: CodeLabel,
    pub serial_write: CodeLabel,
    pub print_unsigned: CodeLabel,
    pub exit_machine: CodeLabel,
    pub report_success: CodeLabel,
    pub report_failure: CodeLabel,
    pub fault_common: CodeLabel,
    pub timer_handler: CodeLabel,
    pub spurious_irq_handler: CodeLabel,
    pub user_fault: CodeLabel,
    pub syscall_int80: CodeLabel,
    pub sysenter_entry: CodeLabel,
    pub syscall_dispatch: CodeLabel,
    pub sys_exit: CodeLabel,
    pub sys_mmap: CodeLabel,
    pub sys_munmap: CodeLabel,
    pub user_page_fault: CodeLabel,
    pub alloc_frame: CodeLabel,
    pub put_frame: CodeLabel,
    pub share_mapping: CodeLabel,
    pub user_fault_delivery: CodeLabel,
    pub out_of_memory: CodeLabel,
    pub sys_fork: CodeLabel,
    pub fork_child_return: CodeLabel,
    pub sys_wait: CodeLabel,
    pub sys_yield: CodeLabel,
    pub schedule: CodeLabel,
    pub switch_to: CodeLabel,
    pub exit_child: CodeLabel,
}

/// The 32-bit kernel under construction (one pass of it).
pub(crate) struct Kernel32 {
    pub a: CodeAssembler,
    labels: LabelAddresses,
    pub r: Routines32,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    failure_paths: Vec<(CodeLabel, String)>,
    user_program: Option<(CodeLabel, Vec<u8>)>,
    functions: FunctionLabels,
}

impl Kernel32 {
    fn new(known: Vec<u32>) -> AsmResult<Self> {
        let mut a = CodeAssembler::new(32)?;
        let r = Routines32 {
            kernel_init: a.create_label(),
            serial_write: a.create_label(),
            print_unsigned: a.create_label(),
            exit_machine: a.create_label(),
            report_success: a.create_label(),
            report_failure: a.create_label(),
            fault_common: a.create_label(),
            timer_handler: a.create_label(),
            spurious_irq_handler: a.create_label(),
            user_fault: a.create_label(),
            syscall_int80: a.create_label(),
            sysenter_entry: a.create_label(),
            syscall_dispatch: a.create_label(),
            sys_exit: a.create_label(),
            sys_mmap: a.create_label(),
            sys_munmap: a.create_label(),
            user_page_fault: a.create_label(),
            alloc_frame: a.create_label(),
            put_frame: a.create_label(),
            share_mapping: a.create_label(),
            user_fault_delivery: a.create_label(),
            out_of_memory: a.create_label(),
            sys_fork: a.create_label(),
            fork_child_return: a.create_label(),
            sys_wait: a.create_label(),
            sys_yield: a.create_label(),
            schedule: a.create_label(),
            switch_to: a.create_label(),
            exit_child: a.create_label(),
        };
        Ok(Kernel32 {
            a,
            labels: LabelAddresses::new(known),
            r,
            strings: Vec::new(),
            failure_paths: Vec::new(),
            user_program: None,
            functions: FunctionLabels::default(),
        })
    }

    pub fn bind(&mut self, label: &mut CodeLabel) -> AsmResult {
        self.labels.bind(&mut self.a, label)
    }

    /// The address of `label` as a 32-bit immediate (see `asm32`).
    pub fn address_of(&mut self, label: CodeLabel) -> u32 {
        self.labels.address_of(label)
    }

    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }

    /// Names the code from the next instruction to the next named function in the symbol map.
    pub fn function(&mut self, name: &str) -> AsmResult {
        self.functions.begin(&mut self.a, name)
    }

    /// Embeds the user program after the strings, in whole pages; returns its label and its size in pages.
    pub fn embed_user_program(&mut self, mut program: Vec<u8>) -> (CodeLabel, u32) {
        let label = self.a.create_label();
        program.resize(program.len().next_multiple_of(4096), 0);
        let pages = (program.len() / 4096) as u32;
        self.user_program = Some((label, program));
        (label, pages)
    }

    /// Binds a routine's label and names it in the symbol map.
    fn routine(&mut self, name: &str, label: CodeLabel) -> AsmResult {
        let mut label = label;
        self.bind(&mut label)?;
        self.functions.add(name, label);
        Ok(())
    }

    /// ESI = the address of `text` (placed after the code), ECX = its length.
    fn load_string(&mut self, text: &str) -> AsmResult {
        let label = self.a.create_label();
        self.strings.push((label, text.as_bytes().to_vec()));
        let address = self.address_of(label);
        self.a.mov(esi, address)?;
        self.a.mov(ecx, text.len() as u32)
    }

    /// Writes `text` to the serial console.
    pub fn print(&mut self, text: &str) -> AsmResult {
        self.load_string(text)?;
        self.a.call(self.r.serial_write)
    }

    /// Prints EAX in `base` (10 or 16).
    pub fn print_number(&mut self, base: u32) -> AsmResult {
        self.a.mov(ecx, base)?;
        self.a.call(self.r.print_unsigned)
    }

    /// A label that, when jumped to, reports a failed self-check with `message` and ends the run.
    pub fn failure(&mut self, message: &str) -> CodeLabel {
        let label = self.a.create_label();
        self.failure_paths.push((label, message.to_string()));
        label
    }

    /// Emits the failure paths and strings and assembles: the bytes, the symbols, the addresses the code took.
    fn finish(mut self) -> Pass<(Vec<u8>, Vec<Symbol>)> {
        for (i, (mut label, message)) in std::mem::take(&mut self.failure_paths).into_iter().enumerate() {
            self.bind(&mut label)?;
            if i == 0 {
                self.functions.add("failure_paths", label);
            }
            self.load_string(&message)?;
            self.a.jmp(self.r.report_failure)?;
        }
        for (i, (mut label, bytes)) in std::mem::take(&mut self.strings).into_iter().enumerate() {
            self.bind(&mut label)?;
            if i == 0 {
                self.functions.end_code_at(label);
            }
            self.a.db(&bytes)?;
        }
        if let Some((mut label, program)) = self.user_program.take() {
            self.bind(&mut label)?;
            self.functions.end_code_at(label);
            self.a.db(&program)?;
        }
        let (result, addresses) = self.labels.assemble(&mut self.a, KERNEL_CODE_ADDRESS)?;
        let symbols = self.functions.symbols_in(&result, KERNEL_CODE_ADDRESS)?;
        Ok(((result.inner.code_buffer, symbols), addresses))
    }
}

/// Assembles the kernel with `driver` (the workload's measured part, the symbol `driver`) after start-up and the
/// banner: the kernel's bytes and symbols.
pub(crate) fn assemble(banner: &str, driver: impl Fn(&mut Kernel32) -> AsmResult) -> AsmResult<(Vec<u8>, Vec<Symbol>)> {
    asm32::assemble_twice(|known| {
        let mut k = Kernel32::new(known)?;
        emit_entry(&mut k, &format!("{banner}\n"))?;
        k.function("driver")?;
        driver(&mut k)?;
        emit_routines(&mut k)?;
        k.finish()
    })
}

/// The entry point (at `KERNEL_CODE_ADDRESS`, jumped to from the Multiboot entry): the boot stack, start-up, the
/// banner.
fn emit_entry(k: &mut Kernel32, banner: &str) -> AsmResult {
    k.function("kernel_entry")?;
    k.a.cli()?;
    k.a.cld()?;
    k.a.mov(esp, BOOT_STACK_TOP as u32)?;
    k.a.call(k.r.kernel_init)?;
    k.print(banner)
}

fn emit_routines(k: &mut Kernel32) -> AsmResult {
    emit_kernel_init(k)?;
    emit_serial_write(k)?;
    emit_print_unsigned(k)?;
    emit_run_endings(k)?;
    emit_interrupt_handlers(k)?;
    process::emit(k)
}

/// kernel_init: the serial port, GDT, TSS, IDT, PIC and PIT, and paging. It can run again (the `boot` workload
/// repeats it): rewriting the GDT clears the TSS descriptor's busy bit before LTR.
fn emit_kernel_init(k: &mut Kernel32) -> AsmResult {
    let kernel_init = k.r.kernel_init;
    k.routine("kernel_init", kernel_init)?;
    for (port, value) in serial_init_writes() {
        k.a.mov(dx, port as u32)?;
        k.a.mov(al, value as u32)?;
        k.a.out(dx, al)?;
    }
    emit_store_table(k, GDT, &gdt())?;
    k.a.mov(word_ptr(GDT_POINTER), 8 * GDT_ENTRIES - 1)?;
    k.a.mov(dword_ptr(GDT_POINTER + 2), GDT)?;
    k.a.lgdt(ptr(GDT_POINTER))?;
    // Reload CS with a far return (a far jump cannot name a label), then the data segments.
    let mut reloaded = k.label();
    k.a.push(u32::from(selector::KERNEL_CODE))?;
    let address = k.address_of(reloaded);
    k.a.mov(eax, address)?;
    k.a.push(eax)?;
    k.a.retf()?;
    k.bind(&mut reloaded)?;
    k.a.mov(eax, u32::from(selector::KERNEL_DATA))?;
    for segment in [ds, es, ss] {
        k.a.mov(segment, ax)?;
    }
    k.a.xor(eax, eax)?;
    k.a.mov(fs, ax)?;
    k.a.mov(gs, ax)?;

    // TSS: the ring-0 stack; the I/O map base past the limit, so no port is allowed at CPL 3.
    k.a.mov(dword_ptr(TSS + 4), BOOT_STACK_TOP as u32)?;
    k.a.mov(dword_ptr(TSS + 8), u32::from(selector::KERNEL_DATA))?;
    k.a.mov(word_ptr(TSS + 0x66), TSS_LIMIT + 1)?;
    k.a.mov(ax, u32::from(selector::TSS))?;
    k.a.ltr(ax)?;

    // IDT: exceptions 0–31 and the PIC's vectors 32–47, all interrupt gates (IF cleared on entry).
    // Every vector but the timer's and IRQ 7's enters through a stub that pushes the vector.
    let stubs: Vec<(u32, CodeLabel)> =
        (0..IDT_ENTRIES as u32).filter(|v| !matches!(v, 32 | 39)).map(|v| (v, k.label())).collect();
    let mut table = Vec::new();
    for vector in 0..IDT_ENTRIES as u32 {
        let handler = match vector {
            32 => k.r.timer_handler,
            39 => k.r.spurious_irq_handler,
            _ => stubs.iter().find(|(v, _)| *v == vector).expect("every other vector has a stub").1,
        };
        let address = k.address_of(handler);
        table.push(gate(address, INTERRUPT_GATE_DPL0));
    }
    emit_store_table(k, IDT, &table)?;
    let syscall_int80 = k.address_of(k.r.syscall_int80);
    emit_store_table(k, IDT + 8 * SYSCALL_VECTOR, &[gate(syscall_int80, TRAP_GATE_DPL3)])?;
    k.a.mov(word_ptr(IDT_POINTER), IDT_LIMIT)?;
    k.a.mov(dword_ptr(IDT_POINTER + 2), IDT)?;
    k.a.lidt(ptr(IDT_POINTER))?;

    for (port, value) in interrupt_controller_writes() {
        k.a.mov(al, value as u32)?;
        k.a.out(port as u32, al)?;
    }

    // Paging: the first 4 MiB identity mapped but page 0, supervisor only; the MMIO test page, uncached.
    let mut fill = k.label();
    k.a.mov(edi, PAGE_TABLE_LOW + 4)?;
    k.a.mov(eax, 0x1000 | PTE_PRESENT_WRITABLE)?;
    k.a.mov(ecx, 1023)?;
    k.bind(&mut fill)?;
    k.a.mov(dword_ptr(edi), eax)?;
    k.a.add(eax, 0x1000)?;
    k.a.add(edi, 4)?;
    k.a.dec(ecx)?;
    k.a.jnz(fill)?;
    let mmio = MACHINE.mmio_test_base as u32;
    k.a.mov(dword_ptr(PAGE_DIRECTORY), PAGE_TABLE_LOW | PTE_PRESENT_WRITABLE)?;
    k.a.mov(dword_ptr(PAGE_DIRECTORY + (mmio >> 22) * 4), PAGE_TABLE_MMIO | PTE_PRESENT_WRITABLE)?;
    k.a.mov(dword_ptr(PAGE_TABLE_MMIO + ((mmio >> 12) & 0x3FF) * 4), mmio | PTE_UNCACHED | PTE_PRESENT_WRITABLE)?;
    k.a.mov(eax, PAGE_DIRECTORY)?;
    k.a.mov(cr3, eax)?;
    k.a.mov(eax, KERNEL_CR0)?;
    k.a.mov(cr0, eax)?;
    k.a.ret()?;

    // The exception stubs: a uniform frame (vector, error code, EIP, CS, EFLAGS) for `fault_common`.
    for (vector, stub) in stubs {
        k.routine(&format!("exception_stub_{vector}"), stub)?;
        if !VECTORS_WITH_ERROR_CODE.contains(&u64::from(vector)) && vector != 14 {
            k.a.push(0)?;
        }
        k.a.push(vector)?;
        k.a.jmp(k.r.fault_common)?;
    }
    Ok(())
}

/// Stores `entries` (8 bytes each) at `base`, two immediate dword moves each.
fn emit_store_table(k: &mut Kernel32, base: u32, entries: &[u64]) -> AsmResult {
    for (index, value) in entries.iter().enumerate() {
        let address = base + 8 * index as u32;
        k.a.mov(dword_ptr(address), *value as u32)?;
        k.a.mov(dword_ptr(address + 4), (*value >> 32) as u32)?;
    }
    Ok(())
}

/// serial_write(ESI = bytes, ECX = length): the transmit holding register, byte by byte (the emulated UART
/// accepts a byte at any time, so the line status register is not polled).
fn emit_serial_write(k: &mut Kernel32) -> AsmResult {
    let serial_write = k.r.serial_write;
    k.routine("serial_write", serial_write)?;
    let (mut next_byte, mut done) = (k.label(), k.label());
    k.a.test(ecx, ecx)?;
    k.a.jz(done)?;
    k.a.mov(dx, MACHINE.serial_port as u32)?;
    k.bind(&mut next_byte)?;
    k.a.mov(al, byte_ptr(esi))?;
    k.a.out(dx, al)?;
    k.a.inc(esi)?;
    k.a.dec(ecx)?;
    k.a.jnz(next_byte)?;
    k.bind(&mut done)?;
    k.a.ret()
}

/// print_unsigned(EAX = value, ECX = base 10 or 16): digits built backwards in a stack buffer.
fn emit_print_unsigned(k: &mut Kernel32) -> AsmResult {
    let print_unsigned = k.r.print_unsigned;
    k.routine("print_unsigned", print_unsigned)?;
    let (mut next_digit, mut decimal_digit) = (k.label(), k.label());
    k.a.sub(esp, 16)?;
    k.a.lea(edi, ptr(esp + 16))?;
    k.bind(&mut next_digit)?;
    k.a.xor(edx, edx)?;
    k.a.div(ecx)?;
    k.a.add(dl, b'0' as u32)?;
    k.a.cmp(dl, b'9' as u32)?;
    k.a.jbe(decimal_digit)?;
    k.a.add(dl, (b'a' - b'9' - 1) as u32)?;
    k.bind(&mut decimal_digit)?;
    k.a.dec(edi)?;
    k.a.mov(byte_ptr(edi), dl)?;
    k.a.test(eax, eax)?;
    k.a.jnz(next_digit)?;
    k.a.mov(esi, edi)?;
    k.a.lea(ecx, ptr(esp + 16))?;
    k.a.sub(ecx, edi)?;
    k.a.call(k.r.serial_write)?;
    k.a.add(esp, 16)?;
    k.a.ret()
}

/// exit_machine(EAX = code), report_success, report_failure(ESI = message, ECX = length).
fn emit_run_endings(k: &mut Kernel32) -> AsmResult {
    let exit_machine = k.r.exit_machine;
    k.routine("exit_machine", exit_machine)?;
    let mut stopped = k.label();
    k.a.out(MACHINE.debug_exit_port as u32, eax)?;
    // Only reached on a machine without the exit device: stop for good.
    k.a.cli()?;
    k.bind(&mut stopped)?;
    k.a.hlt()?;
    k.a.jmp(stopped)?;

    let report_success = k.r.report_success;
    k.routine("report_success", report_success)?;
    k.print("ok\n")?;
    k.a.mov(eax, exit_code::SUCCESS)?;
    k.a.jmp(k.r.exit_machine)?;

    let report_failure = k.r.report_failure;
    k.routine("report_failure", report_failure)?;
    k.a.push(esi)?;
    k.a.push(ecx)?;
    k.print("FAIL: ")?;
    k.a.pop(ecx)?;
    k.a.pop(esi)?;
    k.a.call(k.r.serial_write)?;
    k.print("\n")?;
    k.a.mov(eax, exit_code::CHECK_FAILED)?;
    k.a.jmp(k.r.exit_machine)
}

/// fault_common (stack: vector, error code, EIP, CS, EFLAGS): an exception in user mode goes to `user_fault`;
/// in kernel mode it is a panic. The timer counts ticks; a spurious IRQ 7 is not in service, so it is not
/// acknowledged.
fn emit_interrupt_handlers(k: &mut Kernel32) -> AsmResult {
    let fault_common = k.r.fault_common;
    k.routine("fault_common", fault_common)?;
    k.a.test(byte_ptr(esp + 12), 3)?;
    k.a.jnz(k.r.user_fault)?;
    k.print("panic: vector ")?;
    k.a.mov(eax, dword_ptr(esp))?;
    k.print_number(10)?;
    for (text, offset) in [(" error 0x", 4), (" eip 0x", 8)] {
        k.print(text)?;
        k.a.mov(eax, dword_ptr(esp + offset))?;
        k.print_number(16)?;
    }
    k.print(" cr2 0x")?;
    k.a.mov(eax, cr2)?;
    k.print_number(16)?;
    k.print("\n")?;
    k.a.mov(eax, exit_code::KERNEL_PANIC)?;
    k.a.jmp(k.r.exit_machine)?;

    let timer_handler = k.r.timer_handler;
    k.routine("timer_handler", timer_handler)?;
    k.a.push(eax)?;
    k.a.inc(dword_ptr(VAR_TIMER_TICKS))?;
    k.a.mov(al, END_OF_INTERRUPT)?;
    k.a.out(MACHINE.pic_master_ports.0 as u32, al)?;
    k.a.pop(eax)?;
    k.a.iretd()?;

    let spurious = k.r.spurious_irq_handler;
    k.routine("spurious_irq_handler", spurious)?;
    k.a.iretd()
}
