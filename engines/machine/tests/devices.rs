//! COM1, isa-debug-exit, POST port, MMIO test region, PIC + PIT timer interrupts and HLT.

mod common;
use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::devices::{INSTRUCTIONS_PER_PIT_TICK, MAX_SERIAL_BYTES};
use virtlab_machine::{Machine, MachineError, MMIO_TEST_BASE};

#[test]
fn serial_output_is_captured_and_transmitter_always_ready() {
    let (machine, result) = run_code(|a| {
        a.mov(dx, 0x3FD).unwrap();
        a.in_(al, dx).unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(dx, 0x3F8).unwrap();
        for byte in b"hi\n" {
            a.mov(al, *byte as u32).unwrap();
            a.out(dx, al).unwrap();
        }
        exit(a, 0x31);
    });
    let outcome = result.unwrap();
    assert_eq!(outcome.serial, b"hi\n");
    assert_eq!(outcome.exit_status, 0x31, "QEMU would exit with (0x31 << 1) | 1 = 0x63");
    assert_eq!(machine.cpu().gpr[8] & 0xFF, 0x60);
}

#[test]
fn a_guest_flooding_the_serial_port_is_stopped_at_its_out_with_the_output_bounded() {
    // One REP OUTSB of 2 MiB (one instruction, so the instruction limit does not stop it first).
    let (machine, result) = run_code(|a| {
        a.mov(esi, CODE as u32).unwrap(); // 5 bytes
        a.mov(ecx, 2u32 << 20).unwrap(); // 5 bytes
        a.mov(dx, 0x3F8).unwrap(); // 4 bytes
        a.rep().outsb().unwrap();
    });
    match result.unwrap_err() {
        MachineError::SerialFlood { limit, address } => assert_eq!((limit, address), (MAX_SERIAL_BYTES, CODE + 14)),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(machine.serial_output().len(), MAX_SERIAL_BYTES);
}

#[test]
fn post_port_and_unknown_ports() {
    let (machine, result) = run_code(|a| {
        a.mov(al, 0x12).unwrap();
        a.out(0x80, al).unwrap();
        a.in_(al, 0x80).unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(dx, 0x1234).unwrap();
        a.in_(eax, dx).unwrap();
        a.mov(r9, rax).unwrap();
        exit(a, 0);
    });
    result.unwrap();
    assert_eq!(machine.cpu().gpr[8] & 0xFF, 0xFF);
    assert_eq!(machine.cpu().gpr[9], 0xFFFF_FFFF);
}

#[test]
fn mmio_test_region_reads_zero_and_drops_writes() {
    let (machine, result) = run_code(|a| {
        a.mov(rdi, MMIO_TEST_BASE).unwrap();
        a.mov(rax, u64::MAX).unwrap();
        a.mov(qword_ptr(rdi + 8), rax).unwrap();
        a.mov(rbx, qword_ptr(rdi + 8)).unwrap();
        exit(a, 0);
    });
    result.unwrap();
    assert_eq!(machine.cpu().gpr[3], 0);
}

#[test]
fn unbacked_physical_address_is_an_error() {
    let (_, result) = run_code(|a| {
        a.mov(rdi, 0x3000_0000u64).unwrap();
        a.mov(rax, qword_ptr(rdi)).unwrap();
    });
    match result.unwrap_err() {
        // The load after the 10-byte `mov rdi, imm64` is the instruction named.
        MachineError::UnbackedPhysicalAddress { address, rip, .. } => {
            assert_eq!((address, rip), (0x3000_0000, CODE + 10))
        }
        other => panic!("unexpected {other}"),
    }
}

/// Remaps the PIC to 0x20/0x28, unmasks IRQ 0, programs PIT channel 0 (mode 2, `reload`), and
/// counts timer interrupts in R10 until `target`, halting between them. Exits with the count.
fn timer_guest(reload: u16, target: u8) -> Machine {
    let mut machine = long_mode_machine();
    place(&mut machine, HANDLERS, |a| {
        a.add(r10, 1).unwrap();
        a.mov(al, 0x20).unwrap();
        a.out(0x20, al).unwrap();
        a.iretq().unwrap();
    });
    set_gate(&mut machine, 0x20, HANDLERS, 0, 0, false);
    place(&mut machine, CODE, |a| {
        let mut wait = a.create_label();
        for (port, value) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xA0, 0x11),
            (0xA1, 0x28),
            (0xA1, 0x02),
            (0xA1, 0x01),
            (0x21, 0xFE),
            (0xA1, 0xFF),
        ] {
            a.mov(al, value).unwrap();
            a.out(port, al).unwrap();
        }
        a.mov(al, 0x34).unwrap();
        a.out(0x43, al).unwrap();
        a.mov(al, (reload & 0xFF) as u32).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(al, (reload >> 8) as u32).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(r10, 0u64).unwrap();
        a.sti().unwrap();
        a.set_label(&mut wait).unwrap();
        a.hlt().unwrap();
        a.cmp(r10, target as i32).unwrap();
        a.jb(wait).unwrap();
        a.cli().unwrap();
        a.mov(rax, r10).unwrap();
        a.out(0xF4, al).unwrap();
    });
    machine
}

#[test]
fn pit_interrupts_arrive_through_the_pic_and_hlt_idles_deterministically() {
    let mut machine = timer_guest(1000, 3);
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 3);
    let period = 1000 * INSTRUCTIONS_PER_PIT_TICK;
    assert!(outcome.idle_time > 2 * period && outcome.idle_time < 3 * period, "idle {}", outcome.idle_time);
    let mut again = timer_guest(1000, 3);
    let second = run_prepared(&mut again).unwrap();
    assert_eq!(outcome, second, "every run is identical");
}

#[test]
fn busy_loop_is_interrupted_at_the_pit_deadline() {
    let mut machine = long_mode_machine();
    place(&mut machine, HANDLERS, |a| {
        a.mov(rax, rcx).unwrap();
        a.mov(r9, rdx).unwrap();
        exit(a, 0x55);
    });
    set_gate(&mut machine, 0x08, HANDLERS, 0, 0, false);
    place(&mut machine, CODE, |a| {
        let mut top = a.create_label();
        a.mov(al, 0xFE).unwrap();
        a.out(0x21, al).unwrap();
        a.mov(al, 0x30).unwrap(); // channel 0, lobyte/hibyte, mode 0 (one shot)
        a.out(0x43, al).unwrap();
        a.mov(al, 10).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(al, 0).unwrap();
        a.out(0x40, al).unwrap();
        a.mov(rcx, 0u64).unwrap();
        a.sti().unwrap();
        a.set_label(&mut top).unwrap();
        a.inc(rcx).unwrap();
        a.jmp(top).unwrap();
    });
    let outcome = run_prepared(&mut machine).unwrap();
    assert_eq!(outcome.exit_status, 0x55);
    // The PIC comes up with vector base 8 (the BIOS default), so IRQ 0 is vector 8 here.
    // The count starts at the 8th instruction (time 7) and expires at 7 + 10 ticks; 10 instructions
    // precede the loop, so 8377 loop instructions retire first: 4189 INCs.
    assert_eq!(10 * INSTRUCTIONS_PER_PIT_TICK, 8380);
    assert_eq!(machine.cpu().gpr[1], 4189);
}

#[test]
fn rdtsc_counts_retired_instructions() {
    let (machine, result) = run_code(|a| {
        a.rdtsc().unwrap();
        a.mov(r8, rax).unwrap();
        a.nop().unwrap();
        a.nop().unwrap();
        a.rdtsc().unwrap();
        a.sub(rax, r8).unwrap();
        a.mov(r9, rax).unwrap();
        exit(a, 0);
    });
    result.unwrap();
    assert_eq!(machine.cpu().gpr[8], 0);
    assert_eq!(machine.cpu().gpr[9], 4);
}

#[test]
fn hlt_with_interrupts_disabled_is_an_error() {
    let (_, result) = run_code(|a| a.hlt().unwrap());
    assert!(matches!(result.unwrap_err(), MachineError::HaltedForever { rip } if rip == CODE));
}
