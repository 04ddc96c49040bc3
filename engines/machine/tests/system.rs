//! System instructions: MSRs and segment bases, SWAPGS, CPUID, control-register checks, far
//! transfers between 64-bit and compatibility mode, LLDT/LTR, string port I/O.

mod common;
use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::{cpuid, CodeMode, SegmentRegister};

#[test]
fn fs_gs_bases_from_msrs_and_swapgs() {
    let (machine, result) = run_code(|a| {
        a.mov(rax, 0x1111u64).unwrap();
        a.mov(qword_ptr(DATA + 0x10), rax).unwrap();
        a.mov(rax, 0x2222u64).unwrap();
        a.mov(qword_ptr(DATA + 0x20), rax).unwrap();
        a.mov(ecx, 0xC000_0100u32).unwrap(); // FS_BASE
        a.mov(eax, DATA as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(r8, qword_ptr(0x10).fs()).unwrap();
        a.mov(ecx, 0xC000_0102u32).unwrap(); // KERNEL_GS_BASE
        a.mov(eax, (DATA + 0x10) as u32).unwrap();
        a.wrmsr().unwrap();
        a.swapgs().unwrap();
        a.mov(r9, qword_ptr(0x10).gs()).unwrap();
        a.mov(ecx, 0xC000_0101u32).unwrap(); // GS_BASE
        a.rdmsr().unwrap();
        a.mov(r10, rax).unwrap();
        exit(a, 0);
    });
    result.unwrap();
    let cpu = machine.cpu();
    assert_eq!((cpu.gpr[8], cpu.gpr[9], cpu.gpr[10]), (0x1111, 0x2222, DATA + 0x10));
    assert_eq!(cpu.msr.kernel_gs_base, 0);
}

#[test]
fn unknown_msr_and_reserved_control_bits_fault() {
    for build in [
        (|a: &mut CodeAssembler| {
            a.mov(ecx, 0x1234u32).unwrap();
            a.rdmsr().unwrap();
        }) as fn(&mut CodeAssembler),
        |a| {
            a.mov(rax, 1u64 << 20).unwrap(); // CR4.SMEP: not in the model
            a.mov(cr4, rax).unwrap();
        },
        |a| {
            a.mov(rax, cr0).unwrap();
            a.and(eax, !1).unwrap(); // PG without PE
            a.mov(cr0, rax).unwrap();
        },
        |a| {
            a.mov(rax, 0x10u64).unwrap(); // CR8 above 15
            a.mov(cr8, rax).unwrap();
        },
        |a| {
            a.mov(ecx, 0xC000_0082u32).unwrap(); // LSTAR must be canonical
            a.mov(edx, 0x8000u32).unwrap();
            a.wrmsr().unwrap();
        },
    ] {
        let mut machine = long_mode_machine();
        recording_handler(&mut machine, 13, HANDLERS);
        place(&mut machine, CODE, build);
        assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 13);
        assert_eq!(machine.cpu().gpr[13], 0);
    }
}

#[test]
fn cpuid_model_claims_what_is_implemented() {
    let [max, vendor_b, vendor_c, vendor_d] = cpuid(0, 0);
    assert_eq!(max, 1);
    let vendor: Vec<u8> = [vendor_b, vendor_d, vendor_c].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&vendor, b"GenuineIntel");
    let [signature, _, features_c, features_d] = cpuid(1, 0);
    assert_eq!(signature, 0x6FB);
    assert_eq!(features_c, 0);
    assert_eq!(features_d & 1, 0, "no FPU");
    assert_ne!(features_d & (1 << 6), 0, "PAE");
    assert_eq!(features_d & (1 << 9), 0, "no local APIC");
    let [_, _, extended_c, extended_d] = cpuid(0x8000_0001, 0);
    assert_eq!((extended_c, extended_d), (1, (1 << 11) | (1 << 20) | (1 << 29)));
    assert_eq!(cpuid(7, 0), cpuid(1, 0), "leaves above the maximum return the highest basic leaf");
    let (machine, result) = run_code(|a| {
        a.mov(eax, 0x8000_0008u32).unwrap();
        a.cpuid().unwrap();
        a.mov(r8, rax).unwrap();
        exit(a, 0);
    });
    result.unwrap();
    assert_eq!(machine.cpu().gpr[8], 0x3027);
}

#[test]
fn far_return_to_compatibility_mode_and_far_jump_back() {
    const COMPAT: u64 = CODE + 0x400;
    const BACK: u64 = CODE + 0x800;
    let mut machine = long_mode_machine();
    let compat = assemble32(COMPAT, |a| {
        a.mov(eax, 0x1234_5678).unwrap();
        a.mov(ebx, esp).unwrap();
        // jmp far 0x08:BACK
        a.db(&[0xEA]).unwrap();
        a.dd(&[BACK as u32]).unwrap();
        a.dw(&[KERNEL_CS]).unwrap();
    });
    write_bytes(&mut machine, COMPAT, &compat);
    place(&mut machine, BACK, |a| {
        a.mov(r8, rax).unwrap();
        a.mov(ax, cs).unwrap();
        a.mov(r9, rax).unwrap();
        exit(a, 0);
    });
    place(&mut machine, CODE, |a| {
        a.push(CODE32_SELECTOR as i32).unwrap();
        a.mov(rax, COMPAT).unwrap();
        a.push(rax).unwrap();
        a.db(&[0x48, 0xCB]).unwrap(); // retfq
    });
    run_prepared(&mut machine).unwrap();
    let cpu = machine.cpu();
    assert_eq!(cpu.gpr[8], 0x1234_5678);
    assert_eq!(cpu.gpr[9] & 0xFFFF, KERNEL_CS as u64);
    assert_eq!(cpu.gpr[3], STACK_TOP, "RETF popped both words");
    assert_eq!(cpu.code_mode(), CodeMode::Bits64);
}

#[test]
fn far_call_through_memory_pointer_pushes_cs_and_rip() {
    const TARGET: u64 = CODE + 0x400;
    let mut machine = long_mode_machine();
    place(&mut machine, TARGET, |a| {
        a.mov(r8, qword_ptr(rsp)).unwrap();
        a.mov(r9, qword_ptr(rsp + 8)).unwrap();
        a.db(&[0x48, 0xCB]).unwrap(); // retfq
    });
    place(&mut machine, CODE, |a| {
        let mut after_call = a.create_label();
        a.lea(r11, ptr(after_call)).unwrap();
        a.mov(rax, TARGET).unwrap();
        a.mov(qword_ptr(DATA), rax).unwrap();
        a.mov(word_ptr(DATA + 8), KERNEL_CS as u32).unwrap();
        a.db(&[0x48, 0xFF, 0x1C, 0x25]).unwrap(); // call far qword [DATA] (REX.W FF /3, SIB disp32)
        a.dd(&[DATA as u32]).unwrap();
        a.set_label(&mut after_call).unwrap();
        a.mov(r10, rsp).unwrap();
        exit(a, 0);
    });
    run_prepared(&mut machine).unwrap();
    let cpu = machine.cpu();
    assert_eq!(cpu.gpr[8], cpu.gpr[11], "return address after the far call");
    assert_eq!(cpu.gpr[9], KERNEL_CS as u64);
    assert_eq!(cpu.gpr[10], STACK_TOP);
}

#[test]
fn lldt_and_ltr_load_system_segments() {
    let mut machine = long_mode_machine();
    // An LDT descriptor (16 bytes in long mode) at GDT slot 0x40: base DATA, limit 0xFFF.
    let ldt_low = 0xFFFu64 | ((DATA & 0xFF_FFFF) << 16) | (0x82u64 << 40);
    write_u64(&mut machine, GDT + 0x40, ldt_low);
    write_u64(&mut machine, GDT + 0x48, 0);
    machine.cpu_mut().gdtr.limit = 0x4F;
    // Put the TSS descriptor back to "available" so LTR can load it again.
    let tss = read_u64(&machine, GDT + 0x28) & !(2u64 << 40);
    write_u64(&mut machine, GDT + 0x28, tss);
    place(&mut machine, CODE, |a| {
        a.mov(ax, 0x40).unwrap();
        a.lldt(ax).unwrap();
        a.mov(ax, TSS_SELECTOR as u32).unwrap();
        a.ltr(ax).unwrap();
        a.sldt(r8w).unwrap();
        exit(a, 0);
    });
    run_prepared(&mut machine).unwrap();
    assert_eq!(machine.cpu().ldtr.base, DATA);
    assert_eq!(machine.cpu().gpr[8] & 0xFFFF, 0x40);
    assert_eq!(read_u64(&machine, GDT + 0x28) >> 40 & 0xF, 0xB, "LTR marks the TSS busy");
    // Loading a busy TSS again is #GP.
    let mut machine = long_mode_machine();
    recording_handler(&mut machine, 13, HANDLERS);
    let busy = read_u64(&machine, GDT + 0x28) | (2u64 << 40);
    write_u64(&mut machine, GDT + 0x28, busy);
    place(&mut machine, CODE, |a| {
        a.mov(ax, TSS_SELECTOR as u32).unwrap();
        a.ltr(ax).unwrap();
    });
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 13);
    assert_eq!(machine.cpu().gpr[13], TSS_SELECTOR as u64);
}

#[test]
fn string_port_io_moves_one_element_per_port_access() {
    let (machine, result) = run_code(|a| {
        a.mov(rsi, DATA).unwrap();
        a.mov(dword_ptr(DATA), 0x0A_6968).unwrap(); // "hi\n"
        a.mov(dx, 0x3F8).unwrap();
        a.mov(rcx, 3u64).unwrap();
        a.rep().outsb().unwrap();
        a.mov(rdi, DATA + 0x100).unwrap();
        a.mov(dx, 0x3FD).unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.rep().insb().unwrap();
        a.mov(r8w, word_ptr(DATA + 0x100)).unwrap();
        exit(a, 0);
    });
    assert_eq!(result.unwrap().serial, b"hi\n");
    assert_eq!(machine.cpu().gpr[8] & 0xFFFF, 0x6060);
    assert_eq!(machine.cpu().segment(SegmentRegister::Cs).selector, KERNEL_CS);
}
