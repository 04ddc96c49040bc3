//! Exception and interrupt delivery in long mode, IRETQ, SYSCALL/SYSRET, IOPL-sensitive flags,
//! double and triple faults, limits and unimplemented instructions.

mod common;
use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::interrupts::exception_name;
use virtlab_machine::{MachineError, SegmentRegister};

#[test]
fn divide_error_from_user_switches_to_rsp0_and_pushes_frame() {
    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 0, HANDLERS);
    let divide_at = USER_CODE + 5;
    place(&mut machine, USER_CODE, |a| {
        a.mov(ecx, 0).unwrap();
        a.div(ecx).unwrap();
        a.nop().unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 0);
    let cpu = machine.cpu();
    assert_eq!(cpu.cpl, 0);
    assert_eq!(cpu.gpr[12], KERNEL_STACK_TOP - 40, "five words, no error code, on TSS.RSP0");
    assert_eq!(cpu.gpr[13], divide_at, "#DE is a fault: the frame holds the DIV's address");
    assert_eq!(read_u64(&machine, KERNEL_STACK_TOP - 32), USER_CS as u64);
    assert_eq!(read_u64(&machine, KERNEL_STACK_TOP - 24) & 0x200, 0x200);
    assert_eq!(read_u64(&machine, KERNEL_STACK_TOP - 16), USER_STACK_TOP);
    assert_eq!(read_u64(&machine, KERNEL_STACK_TOP - 8), USER_DS as u64);
    assert!(!cpu.interrupts_enabled(), "an interrupt gate clears IF");
    assert_eq!(outcome.retired_user, 1, "the faulting DIV does not retire");
}

#[test]
fn page_fault_pushes_error_code_and_sets_cr2() {
    let mut machine = long_mode_machine();
    use_small_pages(&mut machine);
    set_pte(&mut machine, DATA, PRESENT | USER);
    recording_handler(&mut machine, 14, HANDLERS);
    place(&mut machine, USER_CODE, |a| {
        a.mov(rdi, DATA + 0x10).unwrap();
        a.mov(qword_ptr(rdi), 1).unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 14);
    let cpu = machine.cpu();
    assert_eq!(cpu.gpr[13], 0x7, "present | write | user");
    assert_eq!(cpu.gpr[11], DATA + 0x10);
    assert_eq!(cpu.gpr[12], KERNEL_STACK_TOP - 48, "six words with the error code");
}

#[test]
fn int3_handler_returns_with_iretq_and_user_code_continues() {
    let mut machine = long_mode_machine();
    place(&mut machine, HANDLERS, |a| {
        a.add(r10, 1).unwrap();
        a.iretq().unwrap();
    });
    set_gate(&mut machine, 3, HANDLERS, 3, 0, true);
    // SYSCALL lands here; the kernel reports R10 through the exit status.
    place(&mut machine, HANDLERS + 0x100, |a| {
        a.mov(rax, r10).unwrap();
        a.out(0xF4, al).unwrap();
    });
    machine.cpu_mut().msr.lstar = HANDLERS + 0x100;
    place(&mut machine, USER_CODE, |a| {
        a.int3().unwrap();
        a.int3().unwrap();
        a.int3().unwrap();
        a.syscall().unwrap();
    });
    place(&mut machine, CODE, |a| {
        a.mov(r10, 0u64).unwrap();
        enter_user(a, 0x202);
    });
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 3);
}

#[test]
fn int_n_to_a_kernel_only_gate_is_a_general_protection_fault() {
    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 13, HANDLERS);
    set_gate(&mut machine, 0x80, HANDLERS + 0x200, 0, 0, false);
    place(&mut machine, USER_CODE, |a| a.int(0x80).unwrap());
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 13);
    assert_eq!(machine.cpu().gpr[13], 0x80 * 8 + 2, "IDT-relative error code");
}

#[test]
fn interrupt_stack_table_switches_stacks_even_without_privilege_change() {
    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 6, HANDLERS);
    set_gate(&mut machine, 6, HANDLERS, 0, 1, false);
    place(&mut machine, CODE, |a| a.ud2().unwrap());
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 6);
    assert_eq!(machine.cpu().gpr[12], IST_STACK_TOP - 40);
    assert_eq!(machine.cpu().gpr[13], CODE);
}

#[test]
fn syscall_and_sysret_follow_star_lstar_fmask() {
    let mut machine = long_mode_machine();
    machine.cpu_mut().msr.lstar = HANDLERS;
    machine.cpu_mut().msr.fmask = 0x200 | 0x400;
    place(&mut machine, HANDLERS, |a| {
        a.mov(r8, rcx).unwrap();
        a.mov(r9, r11).unwrap();
        a.pushfq().unwrap();
        a.pop(r10).unwrap();
        a.mov(ax, cs).unwrap();
        a.mov(r12, rax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(r13, rax).unwrap();
        a.mov(al, 0x42).unwrap();
        a.out(0xF4, al).unwrap();
    });
    let syscall_next = USER_CODE + 2;
    place(&mut machine, USER_CODE, |a| a.syscall().unwrap());
    place(&mut machine, CODE, |a| {
        a.mov(rcx, USER_CODE).unwrap();
        a.mov(r11, 0x602u64).unwrap();
        a.sysretq().unwrap();
    });
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 0x42);
    let cpu = machine.cpu();
    assert_eq!(cpu.gpr[8], syscall_next);
    assert_eq!(cpu.gpr[9] & 0x600, 0x600, "R11 holds the user RFLAGS");
    assert_eq!(cpu.gpr[10] & 0x600, 0, "FMASK cleared IF and DF");
    assert_eq!(cpu.gpr[12] & 0xFFFF, KERNEL_CS as u64);
    assert_eq!(cpu.gpr[13] & 0xFFFF, KERNEL_DS as u64);
    assert_eq!(outcome.retired_user, 1);
}

#[test]
fn sysret_enters_user_mode_with_star_selectors() {
    let mut machine = long_mode_machine();
    machine.cpu_mut().msr.lstar = HANDLERS;
    place(&mut machine, HANDLERS, |a| exit(a, 1));
    place(&mut machine, USER_CODE, |a| {
        a.mov(ax, cs).unwrap();
        a.mov(r12, rax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(r13, rax).unwrap();
        a.syscall().unwrap();
    });
    place(&mut machine, CODE, |a| {
        a.mov(rcx, USER_CODE).unwrap();
        a.mov(r11, 0x202u64).unwrap();
        a.sysretq().unwrap();
    });
    run_prepared(&mut machine).unwrap();
    assert_eq!(machine.cpu().gpr[12] & 0xFFFF, USER_CS as u64);
    assert_eq!(machine.cpu().gpr[13] & 0xFFFF, USER_DS as u64);
}

#[test]
fn cli_in_user_mode_without_iopl_faults() {
    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 13, HANDLERS);
    place(&mut machine, USER_CODE, |a| a.cli().unwrap());
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 13);
    assert_eq!(machine.cpu().gpr[13], 0);
}

#[test]
fn popf_in_user_mode_silently_keeps_if_and_iopl() {
    let mut machine = long_mode_machine();
    machine.cpu_mut().msr.lstar = HANDLERS;
    place(&mut machine, HANDLERS, |a| exit(a, 0));
    place(&mut machine, USER_CODE, |a| {
        a.push(0x3000 | 0x1).unwrap(); // IOPL 3, IF clear, CF set
        a.popfq().unwrap();
        a.pushfq().unwrap();
        a.pop(rdi).unwrap();
        a.syscall().unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    run_prepared(&mut machine).unwrap();
    let flags = machine.cpu().gpr[7];
    assert_eq!(flags & 0x200, 0x200, "IF unchanged at CPL 3 > IOPL");
    assert_eq!(flags & 0x3000, 0, "IOPL unchanged outside CPL 0");
    assert_eq!(flags & 1, 1, "status flags do change");
}

#[test]
fn iopl_3_lets_user_mode_use_cli_and_ports() {
    let mut machine = long_mode_machine();
    place(&mut machine, USER_CODE, |a| {
        a.cli().unwrap();
        a.pushfq().unwrap();
        a.pop(rdi).unwrap();
        a.mov(al, 7).unwrap();
        a.out(0xF4, al).unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x3202));
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 7);
    assert_eq!(machine.cpu().gpr[7] & 0x200, 0);
}

#[test]
fn io_bitmap_grants_single_ports_to_user_mode() {
    let mut machine = long_mode_machine();
    // Clear the bit for port 0xF4 in the TSS I/O bitmap.
    let byte = (TSS + 0x68 + 0xF4 / 8) as usize;
    machine.ram_mut()[byte] &= !(1 << (0xF4 % 8));
    recording_handler(&mut machine, 13, HANDLERS);
    place(&mut machine, USER_CODE, |a| {
        a.mov(al, 9).unwrap();
        a.out(0xF4, al).unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 9);

    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 13, HANDLERS);
    place(&mut machine, USER_CODE, |a| {
        a.mov(al, 9).unwrap();
        a.out(0x80, al).unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 13);
}

#[test]
fn faulting_delivery_escalates_to_triple_fault_with_chain() {
    let mut machine = long_mode_machine();
    machine.cpu_mut().idtr.limit = 0;
    place(&mut machine, CODE, |a| {
        a.nop().unwrap();
        a.ud2().unwrap();
    });
    let error = run_prepared(&mut machine).unwrap_err();
    match &error {
        MachineError::TripleFault { rip, chain, .. } => {
            assert_eq!(*rip, CODE + 1);
            let vectors: Vec<u8> = chain.0.iter().map(|(vector, _)| *vector).collect();
            assert_eq!(vectors, vec![6, 13, 13, 8, 13]);
        }
        other => panic!("expected a triple fault, got {other}"),
    }
    let message = error.to_string();
    assert!(message.contains("#UD -> #GP(0x32) -> #GP(0x6a) -> #DF(0x0) -> #GP(0x42)"), "{message}");
    assert!(message.contains("0x10001"), "{message}");
    assert_eq!(exception_name(14), "#PF");
}

#[test]
fn page_fault_on_kernel_stack_during_delivery_is_a_double_fault() {
    let mut machine = long_mode_machine();
    use_small_pages(&mut machine);
    recording_handler(&mut machine, 8, HANDLERS);
    set_gate(&mut machine, 8, HANDLERS, 0, 1, false);
    recording_handler(&mut machine, 14, HANDLERS + 0x100);
    // The #PF handler's stack (the current one) is not mapped: delivering #PF faults again.
    place(&mut machine, CODE, |a| {
        a.mov(rsp, 0x1F_F000u64).unwrap();
        a.mov(rax, qword_ptr(0x1F_F000)).unwrap();
    });
    set_pte(&mut machine, 0x1F_F000, 0);
    set_pte(&mut machine, 0x1F_E000, 0);
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 8);
    assert_eq!(machine.cpu().gpr[13], 0, "#DF pushes error code 0");
}

#[test]
fn endless_loop_hits_the_instruction_limit() {
    let mut machine = long_mode_machine();
    place(&mut machine, CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.inc(rax).unwrap();
        a.jmp(top).unwrap();
    });
    let error = machine
        .run(&mut virtlab_machine::NullObserver, virtlab_machine::RunLimits { max_instructions: 1001 })
        .unwrap_err();
    assert_eq!(error, MachineError::InstructionLimit { limit: 1001, rip: CODE + 3 });
    assert_eq!(machine.retired_instructions(), 1001);
    assert!(error.to_string().contains("0x10003"));
}

#[test]
fn unimplemented_instruction_names_mnemonic_address_and_mode() {
    let mut machine = long_mode_machine();
    place(&mut machine, CODE, |a| {
        a.nop().unwrap();
        a.fninit().unwrap();
    });
    let error = run_prepared(&mut machine).unwrap_err();
    match &error {
        MachineError::Unimplemented { mnemonic, address, mode, cpl } => {
            assert_eq!(mnemonic, "fninit");
            assert_eq!(*address, CODE + 1);
            assert_eq!(*mode, virtlab_machine::CodeMode::Bits64);
            assert_eq!(*cpl, 0);
        }
        other => panic!("expected unimplemented, got {other}"),
    }
    assert!(error.to_string().contains("fninit at 0x10001 (64-bit"), "{error}");
}

#[test]
fn privileged_instructions_fault_in_user_mode() {
    for build in [
        (|a: &mut CodeAssembler| a.hlt().unwrap()) as fn(&mut CodeAssembler),
        |a| a.mov(rax, cr3).unwrap(),
        |a| a.wrmsr().unwrap(),
        |a| a.lgdt(ptr(DATA)).unwrap(),
        |a| a.invlpg(byte_ptr(DATA)).unwrap(),
    ] {
        let mut machine = long_mode_machine();
        recording_handler(&mut machine, 13, HANDLERS);
        place(&mut machine, USER_CODE, build);
        place(&mut machine, CODE, |a| enter_user(a, 0x202));
        assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 13);
    }
}

#[test]
fn sensitive_unprivileged_instructions_reveal_state_in_user_mode() {
    let mut machine = long_mode_machine();
    machine.cpu_mut().msr.lstar = HANDLERS;
    place(&mut machine, HANDLERS, |a| exit(a, 0));
    place(&mut machine, USER_CODE, |a| {
        a.mov(rdi, USER_STACK_TOP - 0x100).unwrap();
        a.sgdt(ptr(rdi)).unwrap();
        a.sidt(ptr(rdi + 16)).unwrap();
        a.str(ax).unwrap();
        a.mov(r8, rax).unwrap();
        a.smsw(eax).unwrap();
        a.mov(r9, rax).unwrap();
        a.mov(cx, USER_CS as u32).unwrap();
        a.lar(r10d, ecx).unwrap();
        a.lsl(r12d, ecx).unwrap();
        a.mov(dx, KERNEL_DS as u32).unwrap();
        a.verw(dx).unwrap();
        a.setz(bl).unwrap();
        a.syscall().unwrap();
    });
    place(&mut machine, CODE, |a| enter_user(a, 0x202));
    run_prepared(&mut machine).unwrap();
    let gdt_base = read_u64(&machine, USER_STACK_TOP - 0x100 + 2);
    let idt_base = read_u64(&machine, USER_STACK_TOP - 0x100 + 18);
    assert_eq!((gdt_base, idt_base), (GDT, IDT));
    let cpu = machine.cpu();
    assert_eq!(cpu.gpr[8] & 0xFFFF, TSS_SELECTOR as u64);
    assert_eq!(cpu.gpr[9] & 0xFFFF_FFFF, 0x8001_0011);
    assert_eq!(cpu.gpr[10], 0x00A0_FB00, "LAR: type (accessed after the IRETQ load), S, DPL, P, L, G");
    assert_eq!(cpu.gpr[12], 0xFFFF_FFFF);
    assert_eq!(cpu.gpr[3] & 0xFF, 0, "VERW of a DPL 0 segment fails at CPL 3");
    assert_eq!(cpu.segment(SegmentRegister::Cs).selector, KERNEL_CS);
}
