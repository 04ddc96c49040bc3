//! A guest that stays in 32-bit protected mode and walks through the mechanisms a 32-bit kernel relies on,
//! printing what the processor did at each step: its own GDT (rings 0, 1 and 3, a byte-granular data
//! segment, a call gate) and 32-bit TSS, two-level paging with one supervisor-only page, PUSHAD/POPAD,
//! LAR/LSL/VERR/VERW at CPL 0 and CPL 3, a segment-limit violation, a privilege-checked SS load, `IRET` to
//! CPL 3, `INT 0x80` through a DPL 3 trap gate with the TSS stack switch, `SYSENTER`/`SYSEXIT`, a far call
//! through the call gate with one parameter copied to the inner stack, a user access to a supervisor page,
//! and port I/O at CPL 3 with IOPL 0. The serial transcript is the machine's account of those rules, so
//! booting the image on the reference machine and under QEMU and comparing transcripts checks each of them.
//!
//! It is not a catalog workload (it has no measured loop and no processes): it is the first 32-bit guest, the
//! ground the 32-bit kernel stands on.

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction};

use crate::asm32::{
    self, descriptor, LabelAddresses, FLAT_4K_32, INTERRUPT_GATE_DPL0, MSR_SYSENTER_CS, MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP, TRAP_GATE_DPL3, TSS_LIMIT,
};
use crate::catalog::Arch;
use crate::image::GuestImage;
use crate::kernel::AsmResult;
use crate::layout::KERNEL_CODE_ADDRESS;
use crate::machine::MACHINE;

/// Selectors of the tour's GDT: the 32-bit kernel's, and more.
pub mod selector {
    pub use crate::asm32::selector::*;
    pub const CALL_GATE: u16 = 0x30 | 3;
    /// Data at DPL 0, base `SMALL_SEGMENT_BASE`, limit 0xFFF with byte granularity.
    pub const SMALL_DATA: u16 = 0x38;
    pub const RING1_CODE: u16 = 0x40 | 1;
    pub const RING1_DATA: u16 = 0x48 | 1;
}

const GDT: u32 = 0x30_0000;
const GDT_ENTRIES: u32 = 10;
const GDT_POINTER: u32 = GDT + 0x100;
const IDT_POINTER: u32 = GDT + 0x108;
/// Where the fault handlers resume: the address of the instruction after the one expected to fault.
const RESUME: u32 = GDT + 0x200;
const IDT: u32 = 0x30_1000;
const TSS: u32 = 0x30_2000;
const PAGE_DIRECTORY: u32 = 0x30_3000;
const PAGE_TABLE: u32 = 0x30_4000;
pub const SMALL_SEGMENT_BASE: u32 = 0x30_5000;
const BOOT_STACK_TOP: u32 = 0x31_0000;
/// The ring-0 stack the TSS gives interrupts and call gates from CPL 3.
pub const RING0_STACK_TOP: u32 = 0x32_0000;
pub const SYSENTER_STACK_TOP: u32 = 0x33_0000;
pub const USER_STACK_TOP: u32 = 0x34_0000;
/// The one page of the first 4 MiB mapped without the user bit.
pub const SUPERVISOR_PAGE: u32 = 0x3F_F000;

const CALL_GATE_DPL3: u32 = 0xEC;
pub const SYSCALL_VECTOR: u32 = 0x80;

/// The tour's image: the Multiboot stub jumps straight to the 32-bit program.
pub fn protected_mode_tour() -> GuestImage {
    let program = asm32::assemble_twice(assemble_pass).expect("the 32-bit tour assembles");
    let first_page = asm32::first_page().expect("the boot stub assembles");
    // Booted to compare machines, never recorded: it names no functions.
    GuestImage::new("x86-32-tour", Vec::new(), Arch::X86_32, first_page, program, Vec::new())
}

/// The program under construction, with its printing routines and strings.
struct Tour {
    a: CodeAssembler,
    labels: LabelAddresses,
    print_line: CodeLabel,
    print_text: CodeLabel,
    strings: Vec<(CodeLabel, Vec<u8>)>,
}

impl Tour {
    fn bind(&mut self, label: &mut CodeLabel) -> AsmResult {
        self.labels.bind(&mut self.a, label)
    }

    fn address_of(&mut self, label: CodeLabel) -> u32 {
        self.labels.address_of(label)
    }

    /// A NUL-terminated string emitted after the code.
    fn string(&mut self, text: &str) -> CodeLabel {
        let label = self.a.create_label();
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        self.strings.push((label, bytes));
        label
    }

    /// Prints `tag`, a space, EAX as eight hex digits and a newline (CPL 0; every register but ESI preserved).
    fn report(&mut self, tag: &str) -> AsmResult {
        let label = self.string(tag);
        {
            let address = self.address_of(label);
            self.a.mov(esi, address)
        }?;
        self.a.call(self.print_line)
    }

    /// Records where a fault handler resumes: the label bound right after the instruction expected to fault.
    fn expect_fault_before(&mut self, resume: CodeLabel) -> AsmResult {
        {
            let address = self.address_of(resume);
            self.a.mov(eax, address)
        }?;
        self.a.mov(dword_ptr(RESUME), eax)
    }

    /// From CPL 3: asks the kernel (`INT 0x80`, function 2) to print `tag` and ECX.
    fn user_report(&mut self, tag: &str) -> AsmResult {
        let label = self.string(tag);
        {
            let address = self.address_of(label);
            self.a.mov(ebx, address)
        }?;
        self.a.mov(eax, 2)?;
        self.a.int(SYSCALL_VECTOR)
    }

    /// LAR, LSL, VERR and VERW of `selector`, each printed with ZF in bit 31 (set when the query succeeded)
    /// and the result in the low bits (LAR and LSL; 0 when ZF is clear). From CPL 3 the kernel prints.
    fn descriptor_queries(&mut self, selector: u16, user: bool) -> AsmResult {
        let name = format!("{selector:#04x}");
        for (query, tag) in [("lar", "lar"), ("lsl", "lsl"), ("verr", "verr"), ("verw", "verw")] {
            self.a.mov(ecx, selector as u32)?;
            self.a.xor(edx, edx)?;
            match query {
                "lar" => self.a.lar(edx, ecx)?,
                "lsl" => self.a.lsl(edx, ecx)?,
                "verr" => self.a.verr(cx)?,
                _ => self.a.verw(cx)?,
            }
            self.a.setz(al)?;
            self.a.movzx(eax, al)?;
            self.a.shl(eax, 31)?;
            self.a.or(eax, edx)?;
            let tag = format!("{tag} {name}");
            if user {
                self.a.mov(ecx, eax)?;
                self.user_report(&tag)?;
            } else {
                self.report(&tag)?;
            }
        }
        Ok(())
    }
}

/// The GDT's fixed descriptors (the call gate's offset is filled in at run time).
fn gdt() -> [u64; GDT_ENTRIES as usize] {
    [
        0,
        descriptor(0, 0xF_FFFF, 0x9B, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0x93, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0xFB, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0xF3, FLAT_4K_32),
        descriptor(TSS, TSS_LIMIT, 0x89, 0),
        0,
        descriptor(SMALL_SEGMENT_BASE, 0xFFF, 0x93, 0x4),
        descriptor(0, 0xF_FFFF, 0xBB, FLAT_4K_32),
        descriptor(0, 0xF_FFFF, 0xB3, FLAT_4K_32),
    ]
}

/// One assembly of the program with the label addresses `known`; returns the bytes and the addresses of the
/// labels the code took.
fn assemble_pass(known: Vec<u32>) -> AsmResult<(Vec<u8>, Vec<u32>)> {
    let mut a = CodeAssembler::new(32)?;
    let print_line = a.create_label();
    let print_text = a.create_label();
    let mut t = Tour { a, labels: LabelAddresses::new(known), print_line, print_text, strings: Vec::new() };
    let mut handlers = Handlers::new(&mut t.a);

    emit_setup(&mut t, &handlers)?;
    emit_kernel_checks(&mut t)?;
    emit_enter_user(&mut t, &handlers)?;
    emit_user_part(&mut t, &mut handlers)?;
    handlers.emit(&mut t)?;
    emit_printing(&mut t)?;
    for (mut label, bytes) in std::mem::take(&mut t.strings) {
        t.bind(&mut label)?;
        t.a.db(&bytes)?;
    }
    let (result, addresses) = t.labels.assemble(&mut t.a, KERNEL_CODE_ADDRESS)?;
    Ok((result.inner.code_buffer, addresses))
}

/// Labels of the kernel's entry points.
struct Handlers {
    general_protection: CodeLabel,
    page_fault: CodeLabel,
    system_call: CodeLabel,
    sysenter: CodeLabel,
    gate: CodeLabel,
    user_entry: CodeLabel,
}

impl Handlers {
    fn new(a: &mut CodeAssembler) -> Self {
        Handlers {
            general_protection: a.create_label(),
            page_fault: a.create_label(),
            system_call: a.create_label(),
            sysenter: a.create_label(),
            gate: a.create_label(),
            user_entry: a.create_label(),
        }
    }

    fn emit(&mut self, t: &mut Tour) -> AsmResult {
        // #GP and #PF: print the error code (and CR2), drop it, and resume where the code said it would.
        t.bind(&mut self.general_protection)?;
        t.a.mov(eax, dword_ptr(esp))?;
        t.report("#GP error")?;
        resume_after_fault(t)?;

        t.bind(&mut self.page_fault)?;
        t.a.mov(eax, dword_ptr(esp))?;
        t.report("#PF error")?;
        t.a.mov(eax, cr2)?;
        t.report("#PF cr2")?;
        resume_after_fault(t)?;

        // INT 0x80: EAX = 0 exits with status EBX; 1 prints the interrupt frame the TSS stack switch built;
        // 2 prints the string at EBX and ECX; 3 prints the string at EBX.
        let mut frame = t.a.create_label();
        let mut print = t.a.create_label();
        let mut text = t.a.create_label();
        t.bind(&mut self.system_call)?;
        t.a.cmp(eax, 1)?;
        t.a.je(frame)?;
        t.a.cmp(eax, 2)?;
        t.a.je(print)?;
        t.a.cmp(eax, 3)?;
        t.a.je(text)?;
        t.a.mov(eax, ebx)?;
        t.a.mov(dx, MACHINE.debug_exit_port as u32)?;
        t.a.out(dx, eax)?;
        t.a.hlt()?;
        t.bind(&mut frame)?;
        for (offset, tag) in
            [(4, "int80 frame cs"), (8, "int80 frame eflags"), (12, "int80 frame esp"), (16, "int80 frame ss")]
        {
            t.a.mov(eax, dword_ptr(esp + offset))?;
            t.report(tag)?;
        }
        t.a.mov(eax, esp)?;
        t.report("int80 kernel esp")?;
        t.a.mov(eax, ss)?;
        t.report("int80 kernel ss")?;
        t.a.iretd()?;
        t.bind(&mut print)?;
        t.a.mov(esi, ebx)?;
        t.a.mov(eax, ecx)?;
        t.a.call(t.print_line)?;
        t.a.iretd()?;
        t.bind(&mut text)?;
        t.a.mov(esi, ebx)?;
        t.a.call(t.print_text)?;
        t.a.iretd()?;

        // SYSENTER: print where it arrived, then SYSEXIT to EDX with ESP = ECX (both preserved by printing).
        t.bind(&mut self.sysenter)?;
        t.a.mov(eax, cs)?;
        t.report("sysenter cs")?;
        t.a.mov(eax, ss)?;
        t.report("sysenter ss")?;
        t.a.mov(eax, esp)?;
        t.report("sysenter esp")?;
        t.a.pushfd()?;
        t.a.pop(eax)?;
        t.a.and(eax, 0x3200)?;
        t.report("sysenter if+iopl")?;
        t.a.sysexit()?;

        // The call gate's target: print the inner stack the CPU built, then return and release the parameter.
        t.bind(&mut self.gate)?;
        t.a.mov(eax, cs)?;
        t.report("gate cs")?;
        for (offset, tag) in
            [(4, "gate caller cs"), (8, "gate parameter"), (12, "gate caller esp"), (16, "gate caller ss")]
        {
            t.a.mov(eax, dword_ptr(esp + offset))?;
            t.report(tag)?;
        }
        t.a.mov(eax, esp)?;
        t.report("gate esp")?;
        t.a.add_instruction(Instruction::with1(Code::Retfd_imm16, 4u32)?)
    }
}

fn resume_after_fault(t: &mut Tour) -> AsmResult {
    t.a.add(esp, 4)?;
    t.a.mov(eax, dword_ptr(RESUME))?;
    t.a.mov(dword_ptr(esp), eax)?;
    t.a.iretd()
}

/// Descriptor tables, TSS, paging and the SYSENTER MSRs, then a reload of every segment register.
fn emit_setup(t: &mut Tour, handlers: &Handlers) -> AsmResult {
    t.a.cli()?;
    t.a.cld()?;
    t.a.mov(esp, BOOT_STACK_TOP)?;
    for (index, value) in gdt().into_iter().enumerate() {
        let address = GDT + 8 * index as u32;
        t.a.mov(dword_ptr(address), value as u32)?;
        t.a.mov(dword_ptr(address + 4), (value >> 32) as u32)?;
    }
    // The call gate: DPL 3, one parameter dword, to the kernel code segment at `gate`.
    let gate_slot = GDT + u32::from(selector::CALL_GATE & !7);
    {
        let address = t.address_of(handlers.gate);
        t.a.mov(eax, address)
    }?;
    t.a.mov(ecx, eax)?;
    t.a.and(eax, 0xFFFF)?;
    t.a.or(eax, u32::from(selector::KERNEL_CODE) << 16)?;
    t.a.mov(dword_ptr(gate_slot), eax)?;
    t.a.and(ecx, 0xFFFF_0000u32 as i32)?;
    t.a.or(ecx, (CALL_GATE_DPL3 << 8) | 1)?;
    t.a.mov(dword_ptr(gate_slot + 4), ecx)?;
    t.a.mov(word_ptr(GDT_POINTER), 8 * GDT_ENTRIES - 1)?;
    t.a.mov(dword_ptr(GDT_POINTER + 2), GDT)?;
    t.a.lgdt(ptr(GDT_POINTER))?;
    // Reload CS with a far return (a far jump cannot name a label), then the data and stack segments.
    let mut reloaded = t.a.create_label();
    t.a.push(u32::from(selector::KERNEL_CODE))?;
    {
        let address = t.address_of(reloaded);
        t.a.mov(eax, address)
    }?;
    t.a.push(eax)?;
    t.a.retf()?;
    t.bind(&mut reloaded)?;
    t.a.mov(eax, u32::from(selector::KERNEL_DATA))?;
    for segment in [ds, es, fs, gs, ss] {
        t.a.mov(segment, ax)?;
    }
    t.a.mov(esp, BOOT_STACK_TOP)?;

    // TSS: the ring-0 stack for CPL 3 events; the I/O map base past the limit, so no port is allowed at CPL 3.
    t.a.mov(dword_ptr(TSS + 4), RING0_STACK_TOP)?;
    t.a.mov(dword_ptr(TSS + 8), u32::from(selector::KERNEL_DATA))?;
    t.a.mov(word_ptr(TSS + 0x66), TSS_LIMIT + 1)?;
    t.a.mov(ax, u32::from(selector::TSS))?;
    t.a.ltr(ax)?;

    // IDT: #GP and #PF as interrupt gates, INT 0x80 as a trap gate user code may name.
    for (vector, handler, access) in [
        (13, handlers.general_protection, INTERRUPT_GATE_DPL0),
        (14, handlers.page_fault, INTERRUPT_GATE_DPL0),
        (SYSCALL_VECTOR, handlers.system_call, TRAP_GATE_DPL3),
    ] {
        let slot = IDT + 8 * vector;
        {
            let address = t.address_of(handler);
            t.a.mov(eax, address)
        }?;
        t.a.mov(ecx, eax)?;
        t.a.and(eax, 0xFFFF)?;
        t.a.or(eax, u32::from(selector::KERNEL_CODE) << 16)?;
        t.a.mov(dword_ptr(slot), eax)?;
        t.a.and(ecx, 0xFFFF_0000u32 as i32)?;
        t.a.or(ecx, access << 8)?;
        t.a.mov(dword_ptr(slot + 4), ecx)?;
    }
    t.a.mov(word_ptr(IDT_POINTER), 8 * 256 - 1)?;
    t.a.mov(dword_ptr(IDT_POINTER + 2), IDT)?;
    t.a.lidt(ptr(IDT_POINTER))?;

    // Two-level paging: the first 4 MiB identity-mapped through one page table, user-accessible except
    // `SUPERVISOR_PAGE`.
    let mut fill = t.a.create_label();
    t.a.mov(edi, PAGE_TABLE)?;
    t.a.mov(eax, 0x7)?;
    t.a.mov(ecx, 1024)?;
    t.bind(&mut fill)?;
    t.a.mov(dword_ptr(edi), eax)?;
    t.a.add(eax, 0x1000)?;
    t.a.add(edi, 4)?;
    t.a.dec(ecx)?;
    t.a.jnz(fill)?;
    t.a.mov(dword_ptr(PAGE_TABLE + (SUPERVISOR_PAGE >> 12) * 4), SUPERVISOR_PAGE | 0x3)?;
    t.a.mov(dword_ptr(PAGE_DIRECTORY), PAGE_TABLE | 0x7)?;
    t.a.mov(eax, PAGE_DIRECTORY)?;
    t.a.mov(cr3, eax)?;
    t.a.mov(eax, cr0)?;
    t.a.or(eax, 0x8000_0000u32 as i32)?;
    t.a.mov(cr0, eax)?;

    // SYSENTER lands on its own stack in the kernel code segment.
    let sysenter = t.address_of(handlers.sysenter);
    for (msr, value) in [
        (MSR_SYSENTER_CS, u32::from(selector::KERNEL_CODE)),
        (MSR_SYSENTER_ESP, SYSENTER_STACK_TOP),
        (MSR_SYSENTER_EIP, sysenter),
    ] {
        t.a.mov(ecx, msr)?;
        t.a.mov(eax, value)?;
        t.a.xor(edx, edx)?;
        t.a.wrmsr()?;
    }
    Ok(())
}

/// At CPL 0: PUSHAD/POPAD, the descriptor queries, a segment-limit violation and a refused SS load.
fn emit_kernel_checks(t: &mut Tour) -> AsmResult {
    // PUSHAD stores ESP as it was before the first push; POPAD skips that slot and restores the rest.
    t.a.mov(eax, 0xA0A0_A0A0u32)?;
    t.a.mov(ebx, 0xB0B0_B0B0u32)?;
    t.a.mov(ebp, 0x0BB0_0BB0u32)?;
    t.a.pushad()?;
    t.a.mov(eax, dword_ptr(esp + 12))?;
    t.a.sub(eax, esp)?;
    t.report("pushad saved esp - esp")?;
    t.a.mov(dword_ptr(esp + 28), 0x1234_5678u32)?;
    t.a.mov(dword_ptr(esp + 12), 0)?;
    t.a.popad()?;
    t.report("popad eax")?;
    t.a.mov(eax, ebp)?;
    t.report("popad ebp")?;
    t.a.mov(eax, esp)?;
    t.report("popad esp")?;

    for selector in [
        selector::KERNEL_CODE,
        selector::USER_DATA,
        selector::TSS,
        selector::CALL_GATE,
        selector::SMALL_DATA,
        selector::RING1_CODE,
        0x50, // past the GDT's limit
    ] {
        t.descriptor_queries(selector, false)?;
    }

    // The byte-granular segment: its last dword is reachable, one byte further is #GP(0).
    t.a.mov(eax, u32::from(selector::SMALL_DATA))?;
    t.a.mov(es, ax)?;
    t.a.mov(dword_ptr(SMALL_SEGMENT_BASE + 0xFFC), 0x5EED_5EEDu32)?;
    t.a.mov(eax, dword_ptr(0xFFC).es())?;
    t.report("small segment es:[0xffc]")?;
    let mut past_limit = t.a.create_label();
    t.expect_fault_before(past_limit)?;
    t.a.mov(eax, dword_ptr(0xFFD).es())?;
    t.bind(&mut past_limit)?;

    // SS must have RPL = DPL = CPL: the user data segment is refused with its selector as the error code.
    let mut refused = t.a.create_label();
    t.expect_fault_before(refused)?;
    t.a.mov(eax, u32::from(selector::USER_DATA))?;
    t.a.mov(ss, ax)?;
    t.bind(&mut refused)?;
    t.a.mov(eax, ss)?;
    t.report("ss after refused load")?;
    t.a.mov(eax, u32::from(selector::KERNEL_DATA))?;
    t.a.mov(es, ax)
}

/// IRETD to the user code segment at CPL 3 with IF clear and IOPL 0.
fn emit_enter_user(t: &mut Tour, handlers: &Handlers) -> AsmResult {
    t.a.mov(eax, u32::from(selector::USER_DATA))?;
    for segment in [ds, es, fs, gs] {
        t.a.mov(segment, ax)?;
    }
    t.a.push(u32::from(selector::USER_DATA))?;
    t.a.push(USER_STACK_TOP)?;
    t.a.push(0x2)?;
    t.a.push(u32::from(selector::USER_CODE))?;
    {
        let address = t.address_of(handlers.user_entry);
        t.a.mov(eax, address)
    }?;
    t.a.push(eax)?;
    t.a.iretd()
}

/// At CPL 3, reporting through `INT 0x80`.
fn emit_user_part(t: &mut Tour, handlers: &mut Handlers) -> AsmResult {
    t.bind(&mut handlers.user_entry)?;
    t.a.mov(ecx, cs)?;
    t.user_report("user cs")?;
    t.a.pushfd()?;
    t.a.pop(ecx)?;
    t.a.and(ecx, 0x3200)?;
    t.user_report("user if+iopl")?;
    t.a.mov(eax, 1)?;
    t.a.int(SYSCALL_VECTOR)?;

    // SYSENTER and back: SYSEXIT returns to EDX with ESP = ECX.
    let mut back = t.a.create_label();
    t.a.mov(ecx, esp)?;
    {
        let address = t.address_of(back);
        t.a.mov(edx, address)
    }?;
    t.a.sysenter()?;
    t.bind(&mut back)?;
    t.a.mov(ecx, cs)?;
    t.user_report("after sysexit cs")?;
    t.a.mov(ecx, esp)?;
    t.user_report("after sysexit esp")?;

    // A far call through the DPL 3 call gate into ring 0, with one parameter.
    t.a.push(0xC0FF_EE00u32)?;
    t.a.add_instruction(Instruction::with_far_branch(Code::Call_ptr1632, selector::CALL_GATE, 0)?)?;
    t.a.mov(ecx, esp)?;
    t.user_report("after gate esp")?;

    for selector in [selector::KERNEL_CODE, selector::USER_CODE, selector::KERNEL_DATA, selector::RING1_DATA] {
        t.descriptor_queries(selector, true)?;
    }

    // A user read of the supervisor page is #PF with error code 5 (present, user, read).
    let mut denied = t.a.create_label();
    {
        let address = t.address_of(denied);
        t.a.mov(eax, address)
    }?;
    t.a.mov(dword_ptr(RESUME), eax)?;
    t.a.mov(eax, dword_ptr(SUPERVISOR_PAGE + 0x10))?;
    t.bind(&mut denied)?;

    // Port I/O at CPL 3 with IOPL 0 and no I/O bitmap is #GP(0).
    let mut no_io = t.a.create_label();
    {
        let address = t.address_of(no_io);
        t.a.mov(eax, address)
    }?;
    t.a.mov(dword_ptr(RESUME), eax)?;
    t.a.mov(dx, MACHINE.post_port as u32)?;
    t.a.in_(al, dx)?;
    t.bind(&mut no_io)?;

    let done = t.string("ok\n");
    {
        let address = t.address_of(done);
        t.a.mov(ebx, address)
    }?;
    t.a.mov(eax, 3)?;
    t.a.int(SYSCALL_VECTOR)?;
    t.a.xor(eax, eax)?;
    t.a.xor(ebx, ebx)?;
    t.a.int(SYSCALL_VECTOR)
}

/// `print_text` writes the NUL-terminated string at ESI; `print_line` writes it, a space, EAX in hex and a
/// newline. Both preserve every register (PUSHAD/POPAD).
fn emit_printing(t: &mut Tour) -> AsmResult {
    let serial = MACHINE.serial_port as u32;
    let (mut next, mut done) = (t.a.create_label(), t.a.create_label());
    t.a.set_label(&mut t.print_text)?;
    t.a.pushad()?;
    t.a.mov(dx, serial)?;
    t.bind(&mut next)?;
    t.a.mov(al, byte_ptr(esi))?;
    t.a.test(al, al)?;
    t.a.jz(done)?;
    t.a.out(dx, al)?;
    t.a.inc(esi)?;
    t.a.jmp(next)?;
    t.bind(&mut done)?;
    t.a.popad()?;
    t.a.ret()?;

    let mut digit = t.a.create_label();
    let mut decimal = t.a.create_label();
    t.a.set_label(&mut t.print_line)?;
    t.a.call(t.print_text)?;
    t.a.pushad()?;
    t.a.mov(ebx, eax)?;
    t.a.mov(dx, serial)?;
    t.a.mov(al, b' ' as u32)?;
    t.a.out(dx, al)?;
    t.a.mov(ecx, 8)?;
    t.bind(&mut digit)?;
    t.a.rol(ebx, 4)?;
    t.a.mov(eax, ebx)?;
    t.a.and(eax, 0xF)?;
    t.a.add(eax, b'0' as u32)?;
    t.a.cmp(eax, b'9' as u32)?;
    t.a.jbe(decimal)?;
    t.a.add(eax, (b'a' - b'9' - 1) as u32)?;
    t.bind(&mut decimal)?;
    t.a.out(dx, al)?;
    t.a.dec(ecx)?;
    t.a.jnz(digit)?;
    t.a.mov(al, b'\n' as u32)?;
    t.a.out(dx, al)?;
    t.a.popad()?;
    t.a.ret()
}
