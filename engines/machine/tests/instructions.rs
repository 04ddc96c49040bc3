//! Integer instruction groups executed on the machine, results and RFLAGS checked against values
//! worked out from the Intel SDM.

mod common;
use common::*;
use iced_x86::code_asm::*;

const C: u64 = 0x1;
const P: u64 = 0x4;
const A: u64 = 0x10;
const Z: u64 = 0x40;
const S: u64 = 0x80;
const O: u64 = 0x800;

fn run(build: impl FnOnce(&mut CodeAssembler)) -> virtlab_machine::Machine {
    let (machine, result) = run_code(|a| {
        build(a);
        save_flags_and_exit(a);
    });
    let outcome = result.unwrap_or_else(|error| panic!("run failed: {error}"));
    assert_eq!(outcome.exit_status, 0);
    machine
}

/// Register `index` as the code under test left it (RAX is read from its copy in R14).
fn gpr(machine: &virtlab_machine::Machine, index: usize) -> u64 {
    machine.cpu().gpr[if index == 0 { 14 } else { index }]
}

fn flags(machine: &virtlab_machine::Machine) -> u64 {
    status(gpr(machine, 15))
}

#[test]
fn alu_register_forms_set_exact_flags() {
    let m = run(|a| {
        a.mov(al, 0xFF).unwrap();
        a.add(al, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0, C | P | A | Z));
    let m = run(|a| {
        a.mov(eax, 0x7FFF_FFFF).unwrap();
        a.add(eax, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0), flags(&m)), (0x8000_0000, O | S | A | P));
    let m = run(|a| {
        a.mov(rax, 0u64).unwrap();
        a.sub(rax, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0), flags(&m)), (u64::MAX, C | S | A | P));
    let m = run(|a| {
        a.stc().unwrap();
        a.mov(bl, 0x7F).unwrap();
        a.adc(bl, 0).unwrap();
    });
    assert_eq!((gpr(&m, 3) & 0xFF, flags(&m)), (0x80, O | S | A));
    let m = run(|a| {
        a.stc().unwrap();
        a.mov(cx, 0).unwrap();
        a.sbb(cx, 0).unwrap();
    });
    assert_eq!((gpr(&m, 1) & 0xFFFF, flags(&m)), (0xFFFF, C | S | A | P));
    let m = run(|a| {
        a.mov(edx, 5).unwrap();
        a.cmp(edx, 5).unwrap();
    });
    assert_eq!(flags(&m), Z | P);
    let m = run(|a| {
        a.mov(al, 0xF0).unwrap();
        a.and(al, 0x0F).unwrap();
    });
    assert_eq!(flags(&m), Z | P);
    let m = run(|a| {
        a.mov(al, 0x80).unwrap();
        a.or(al, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0x81, S | P));
    let m = run(|a| {
        a.mov(rax, 0x1234u64).unwrap();
        a.xor(eax, eax).unwrap();
    });
    assert_eq!((gpr(&m, 0), flags(&m)), (0, Z | P));
    let m = run(|a| {
        a.mov(al, 0x80).unwrap();
        a.test(al, 0x80).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0x80, S));
}

#[test]
fn inc_dec_keep_carry_neg_not() {
    let m = run(|a| {
        a.stc().unwrap();
        a.mov(al, 0xFF).unwrap();
        a.inc(al).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0, C | Z | A | P));
    let m = run(|a| {
        a.clc().unwrap();
        a.mov(al, 0x80).unwrap();
        a.dec(al).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0x7F, O | A));
    let m = run(|a| {
        a.mov(al, 0x80).unwrap();
        a.neg(al).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0x80, C | O | S));
    let m = run(|a| {
        a.mov(rbx, 0x00FF_00FFu64).unwrap();
        a.not(ebx).unwrap();
    });
    assert_eq!(gpr(&m, 3), 0xFF00_FF00);
}

#[test]
fn memory_operands_read_modify_write() {
    let m = run(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(qword_ptr(rdi), 0x7F).unwrap();
        a.add(byte_ptr(rdi), 1).unwrap();
        a.mov(rax, qword_ptr(rdi)).unwrap();
    });
    assert_eq!((gpr(&m, 0), flags(&m)), (0x80, O | S | A));
    let m = run(|a| {
        a.mov(rsi, DATA).unwrap();
        a.mov(dword_ptr(rsi + 8), 3).unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.imul_3(eax, dword_ptr(rsi + rcx * 4), 7).unwrap();
    });
    assert_eq!(gpr(&m, 0), 21);
}

#[test]
fn shifts_and_rotates_by_cl_and_immediate() {
    let m = run(|a| {
        a.mov(al, 0x81).unwrap();
        a.shl(al, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0x02, C | O));
    let m = run(|a| {
        a.mov(al, 0x81).unwrap();
        a.sar(al, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m)), (0xC0, C | S | P));
    let m = run(|a| {
        a.mov(rax, 0x8000_0000_0000_0001u64).unwrap();
        a.mov(cl, 65).unwrap();
        a.shr(rax, cl).unwrap();
    });
    assert_eq!((gpr(&m, 0), flags(&m)), (0x4000_0000_0000_0000, C | O | P));
    let m = run(|a| {
        a.mov(al, 0x81).unwrap();
        a.rol(al, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m) & (C | O)), (0x03, C | O));
    let m = run(|a| {
        a.mov(al, 0x01).unwrap();
        a.stc().unwrap();
        a.rcr(al, 1).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFF, flags(&m) & (C | O)), (0x80, C | O));
    // A zero count changes nothing, flags included.
    let m = run(|a| {
        a.stc().unwrap();
        a.mov(eax, 5).unwrap();
        a.mov(cl, 32).unwrap();
        a.shl(eax, cl).unwrap();
    });
    assert_eq!((gpr(&m, 0), flags(&m) & C), (5, C));
    let m = run(|a| {
        a.mov(eax, 0x1234_5678).unwrap();
        a.mov(edx, 0xABCD).unwrap();
        a.shrd(eax, edx, 16).unwrap();
    });
    assert_eq!(gpr(&m, 0), 0xABCD_1234);
    let m = run(|a| {
        a.mov(ax, 0x8000).unwrap();
        a.mov(dx, 0xFFFF).unwrap();
        a.mov(cl, 4).unwrap();
        a.shld(ax, dx, cl).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFFFF, flags(&m)), (0x000F, O | P));
}

#[test]
fn multiply_and_divide() {
    let m = run(|a| {
        a.mov(al, 0x10).unwrap();
        a.mov(bl, 0x10).unwrap();
        a.mul(bl).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFFFF, flags(&m) & (C | O)), (0x100, C | O));
    let m = run(|a| {
        a.mov(rax, u64::MAX).unwrap();
        a.mov(rbx, 2u64).unwrap();
        a.mul(rbx).unwrap();
    });
    assert_eq!((gpr(&m, 0), gpr(&m, 2), flags(&m) & (C | O)), (u64::MAX - 1, 1, C | O));
    let m = run(|a| {
        a.mov(rax, -3i64 as u64).unwrap();
        a.mov(rcx, 5u64).unwrap();
        a.imul(rcx).unwrap();
    });
    assert_eq!((gpr(&m, 0), gpr(&m, 2), flags(&m) & (C | O)), (-15i64 as u64, u64::MAX, 0));
    let m = run(|a| {
        a.mov(ax, 0x100).unwrap();
        a.imul_2(ax, ax).unwrap();
    });
    assert_eq!((gpr(&m, 0) & 0xFFFF, flags(&m) & (C | O)), (0, C | O));
    let m = run(|a| {
        a.mov(edx, 1).unwrap();
        a.mov(eax, 5).unwrap();
        a.mov(ecx, 3).unwrap();
        a.div(ecx).unwrap();
    });
    assert_eq!((gpr(&m, 0), gpr(&m, 2)), (0x5555_5557, 0));
    let m = run(|a| {
        a.mov(rax, -7i64 as u64).unwrap();
        a.cqo().unwrap();
        a.mov(rcx, 2u64).unwrap();
        a.idiv(rcx).unwrap();
    });
    assert_eq!((gpr(&m, 0), gpr(&m, 2)), (-3i64 as u64, -1i64 as u64));
    let m = run(|a| {
        a.mov(ax, 0xFF9C_u32 as i32).unwrap(); // -100
        a.mov(bl, 7).unwrap();
        a.idiv(bl).unwrap();
    });
    assert_eq!(gpr(&m, 0) & 0xFFFF, ((-2i8 as u8 as u64) << 8) | (-14i8 as u8 as u64));
}

#[test]
fn data_movement() {
    let m = run(|a| {
        a.mov(rax, u64::MAX).unwrap();
        a.mov(eax, 1).unwrap();
        a.mov(rbx, u64::MAX).unwrap();
        a.mov(bx, 2).unwrap();
        a.mov(rcx, 0u64).unwrap();
        a.mov(ch, 0x12).unwrap();
        a.mov(dl, 0x80).unwrap();
        a.movsx(rsi, dl).unwrap();
        a.movzx(edi, dl).unwrap();
        a.mov(r8d, 0x8000_0000u32).unwrap();
        a.movsxd(r9, r8d).unwrap();
        a.lea(r10, qword_ptr(rax + rbx * 4 + 0x100)).unwrap();
    });
    assert_eq!(gpr(&m, 0), 1);
    assert_eq!(gpr(&m, 3), 0xFFFF_FFFF_FFFF_0002);
    assert_eq!(gpr(&m, 1), 0x1200);
    assert_eq!(gpr(&m, 6), 0xFFFF_FFFF_FFFF_FF80);
    assert_eq!(gpr(&m, 7), 0x80);
    assert_eq!(gpr(&m, 9), 0xFFFF_FFFF_8000_0000);
    assert_eq!(gpr(&m, 10), 1u64.wrapping_add(0xFFFF_FFFF_FFFF_0002u64.wrapping_mul(4)).wrapping_add(0x100));
}

#[test]
fn conditional_moves_and_sets() {
    let m = run(|a| {
        a.mov(eax, 1).unwrap();
        a.mov(ebx, 2).unwrap();
        a.cmp(eax, ebx).unwrap();
        a.mov(rcx, u64::MAX).unwrap();
        a.cmovl(rcx, rbx).unwrap();
        a.mov(rdx, u64::MAX).unwrap();
        a.cmovg(edx, ebx).unwrap();
        a.setb(sil).unwrap();
        a.seta(dil).unwrap();
    });
    assert_eq!(gpr(&m, 1), 2);
    // A 32-bit CMOV whose condition fails still zero-extends.
    assert_eq!(gpr(&m, 2), 0xFFFF_FFFF);
    assert_eq!(gpr(&m, 6) & 0xFF, 1);
    assert_eq!(gpr(&m, 7) & 0xFF, 0);
}

#[test]
fn exchange_and_compare_exchange() {
    let m = run(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(qword_ptr(rdi), 10).unwrap();
        a.mov(rax, 10u64).unwrap();
        a.mov(rbx, 20u64).unwrap();
        a.cmpxchg(qword_ptr(rdi), rbx).unwrap();
        a.mov(r8, qword_ptr(rdi)).unwrap();
        a.mov(rax, 99u64).unwrap();
        a.cmpxchg(qword_ptr(rdi), rbx).unwrap();
        a.mov(r9, rax).unwrap();
        a.mov(rcx, 5u64).unwrap();
        a.xadd(qword_ptr(rdi), rcx).unwrap();
        a.mov(r10, qword_ptr(rdi)).unwrap();
        a.mov(rdx, 7u64).unwrap();
        a.xchg(qword_ptr(rdi), rdx).unwrap();
        a.mov(r11, qword_ptr(rdi)).unwrap();
        a.mov(r12d, 0x1122_3344u32).unwrap();
        a.bswap(r12d).unwrap();
    });
    assert_eq!(gpr(&m, 8), 20);
    assert_eq!(gpr(&m, 9), 20);
    assert_eq!(gpr(&m, 1), 20);
    assert_eq!(gpr(&m, 10), 25);
    assert_eq!(gpr(&m, 2), 25);
    assert_eq!(gpr(&m, 11), 7);
    assert_eq!(gpr(&m, 12), 0x4433_2211);
    assert_eq!(flags(&m) & Z, 0, "the second CMPXCHG failed, so ZF ended clear before XADD");
}

#[test]
fn cmpxchg8b_both_outcomes() {
    let m = run(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(rax, 0x1111_1111_2222_2222u64).unwrap();
        a.mov(qword_ptr(rdi), rax).unwrap();
        a.mov(eax, 0x2222_2222).unwrap();
        a.mov(edx, 0x1111_1111).unwrap();
        a.mov(ebx, 0x4444_4444).unwrap();
        a.mov(ecx, 0x3333_3333).unwrap();
        a.cmpxchg8b(qword_ptr(rdi)).unwrap();
        a.setz(r8b).unwrap();
        a.mov(r9, qword_ptr(rdi)).unwrap();
        a.mov(eax, 0).unwrap();
        a.cmpxchg8b(qword_ptr(rdi)).unwrap();
    });
    assert_eq!(gpr(&m, 8) & 0xFF, 1);
    assert_eq!(gpr(&m, 9), 0x3333_3333_4444_4444);
    assert_eq!((gpr(&m, 0), gpr(&m, 2)), (0x4444_4444, 0x3333_3333));
    assert_eq!(flags(&m) & Z, 0);
}

#[test]
fn bit_tests_and_scans() {
    let m = run(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(qword_ptr(rdi), 0).unwrap();
        a.mov(qword_ptr(rdi + 8), 0).unwrap();
        a.mov(rax, 70u64).unwrap();
        // Bit 70 of the string at DATA is bit 6 of the second quadword.
        a.bts(qword_ptr(rdi), rax).unwrap();
        a.mov(r8, qword_ptr(rdi + 8)).unwrap();
        a.bt(qword_ptr(rdi), rax).unwrap();
        a.setc(r9b).unwrap();
        a.mov(ebx, 0b1010).unwrap();
        a.btr(ebx, 1).unwrap();
        a.setc(r10b).unwrap();
        a.btc(ebx, 0).unwrap();
        a.mov(ecx, 0x0001_0100).unwrap();
        a.bsf(edx, ecx).unwrap();
        a.bsr(esi, ecx).unwrap();
    });
    assert_eq!(gpr(&m, 8), 1 << 6);
    assert_eq!(gpr(&m, 9) & 0xFF, 1);
    assert_eq!(gpr(&m, 10) & 0xFF, 1);
    assert_eq!(gpr(&m, 3), 0b1001);
    assert_eq!((gpr(&m, 2), gpr(&m, 6)), (8, 16));
    assert_eq!(flags(&m) & Z, 0);
}

#[test]
fn string_instructions_with_rep() {
    let m = run(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(al, 0x5A).unwrap();
        a.mov(rcx, 100u64).unwrap();
        a.rep().stosb().unwrap();
        a.mov(r8, rdi).unwrap();
        a.mov(rsi, DATA).unwrap();
        a.mov(rdi, DATA + 0x1000).unwrap();
        a.mov(rcx, 13u64).unwrap();
        a.rep().movsq().unwrap();
        a.mov(r9, qword_ptr(DATA + 0x1000 + 88)).unwrap();
        // Find the first byte that is not 0x5A.
        a.mov(rdi, DATA).unwrap();
        a.mov(rcx, 200u64).unwrap();
        a.repe().scasb().unwrap();
        a.mov(r10, rcx).unwrap();
        a.mov(rsi, DATA).unwrap();
        a.mov(rdi, DATA + 0x1000).unwrap();
        a.mov(rcx, 8u64).unwrap();
        a.repe().cmpsb().unwrap();
        a.mov(r11, rcx).unwrap();
        a.std().unwrap();
        a.mov(rsi, DATA + 3).unwrap();
        a.lodsb().unwrap();
        a.mov(r12, rsi).unwrap();
        a.cld().unwrap();
    });
    assert_eq!(gpr(&m, 8), DATA + 100);
    assert_eq!(gpr(&m, 9), 0x5A5A_5A5A_5A5A_5A5A);
    // 100 bytes matched, the 101st did not: RCX = 200 - 101.
    assert_eq!(gpr(&m, 10), 99);
    assert_eq!(gpr(&m, 11), 0);
    assert_eq!(gpr(&m, 0) & 0xFF, 0x5A);
    assert_eq!(gpr(&m, 12), DATA + 2);
}

#[test]
fn stack_calls_and_loops() {
    let m = run(|a| {
        let mut function = a.create_label();
        let mut after = a.create_label();
        let mut top = a.create_label();
        a.push(0x1234).unwrap();
        a.pop(rbx).unwrap();
        a.mov(rax, 0u64).unwrap();
        a.mov(rcx, 10u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rax, rcx).unwrap();
        a.loop_(top).unwrap();
        a.call(function).unwrap();
        a.jmp(after).unwrap();
        a.set_label(&mut function).unwrap();
        a.enter(16, 0).unwrap();
        a.mov(qword_ptr(rbp - 8), 77).unwrap();
        a.mov(rdx, qword_ptr(rbp - 8)).unwrap();
        a.leave().unwrap();
        a.ret().unwrap();
        a.set_label(&mut after).unwrap();
        a.mov(rsi, rsp).unwrap();
    });
    assert_eq!(gpr(&m, 3), 0x1234);
    assert_eq!(gpr(&m, 0), 55);
    assert_eq!(gpr(&m, 2), 77);
    assert_eq!(gpr(&m, 6), STACK_TOP);
}

#[test]
fn indirect_jumps_and_jrcxz() {
    let m = run(|a| {
        let mut target = a.create_label();
        let mut skip = a.create_label();
        a.lea(rax, qword_ptr(target)).unwrap();
        a.jmp(rax).unwrap();
        a.mov(rbx, 1u64).unwrap();
        a.set_label(&mut target).unwrap();
        a.mov(rcx, 0u64).unwrap();
        a.jrcxz(skip).unwrap();
        a.mov(rdx, 1u64).unwrap();
        a.set_label(&mut skip).unwrap();
        a.nop().unwrap();
    });
    assert_eq!(gpr(&m, 3), 0);
    assert_eq!(gpr(&m, 2), 0);
}

#[test]
fn sign_extension_family() {
    let m = run(|a| {
        a.mov(rax, 0x80u64).unwrap();
        a.cbw().unwrap();
        a.mov(rbx, rax).unwrap();
        a.mov(rax, 0x8000u64).unwrap();
        a.cwde().unwrap();
        a.mov(rcx, rax).unwrap();
        a.mov(rax, 0x8000_0000u64).unwrap();
        a.cdqe().unwrap();
        a.mov(rsi, rax).unwrap();
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.cdq().unwrap();
    });
    assert_eq!(gpr(&m, 3), 0xFF80);
    assert_eq!(gpr(&m, 1), 0xFFFF_8000);
    assert_eq!(gpr(&m, 6), 0xFFFF_FFFF_8000_0000);
    assert_eq!(gpr(&m, 2), 0xFFFF_FFFF);
}

#[test]
fn lahf_sahf_and_flag_instructions() {
    let m = run(|a| {
        a.mov(al, 0xFF).unwrap();
        a.add(al, 1).unwrap();
        a.lahf().unwrap();
        a.mov(bl, ah).unwrap();
        a.mov(ah, 0x80 | 0x01).unwrap();
        a.sahf().unwrap();
        a.cmc().unwrap();
    });
    assert_eq!(gpr(&m, 3) & 0xFF, C | P | A | Z | 2);
    assert_eq!(flags(&m), S);
}

#[test]
fn rep_string_bulk_and_element_paths_agree() {
    // Overlapping forward copy replicates the first byte, as element-wise MOVSB does.
    let m = run(|a| {
        a.mov(word_ptr(DATA), 0x6261).unwrap();
        a.mov(rsi, DATA).unwrap();
        a.mov(rdi, DATA + 1).unwrap();
        a.mov(rcx, 10u64).unwrap();
        a.rep().movsb().unwrap();
        a.mov(rax, qword_ptr(DATA + 3)).unwrap();
    });
    assert_eq!(gpr(&m, 0), 0x6161_6161_6161_6161);
    // Three pages of STOSQ and a MOVSQ of them, across page boundaries.
    let m = run(|a| {
        a.mov(rdi, DATA + 8).unwrap();
        a.mov(rax, 0x0123_4567_89AB_CDEFu64).unwrap();
        a.mov(rcx, 3 * 512u64).unwrap();
        a.rep().stosq().unwrap();
        a.mov(r8, rdi).unwrap();
        a.mov(rsi, DATA + 8).unwrap();
        a.mov(rdi, DATA + 0x8000 + 4).unwrap();
        a.mov(rcx, 3 * 512u64).unwrap();
        a.rep().movsq().unwrap();
        a.mov(r9, qword_ptr(DATA + 0x8000 + 4 + 0x2000)).unwrap();
        a.mov(r10, qword_ptr(DATA + 0x8000 + 4 + 3 * 4096)).unwrap();
    });
    assert_eq!(gpr(&m, 8), DATA + 8 + 3 * 4096);
    assert_eq!(gpr(&m, 9), 0x0123_4567_89AB_CDEF);
    assert_eq!(gpr(&m, 10), 0, "one past the copied range");
    assert_eq!(gpr(&m, 1), 0);
}

#[test]
fn rep_stos_faulting_midway_leaves_exact_progress() {
    let mut machine = long_mode_machine();
    use_small_pages(&mut machine);
    set_pte(&mut machine, DATA + 0x1000, 0);
    recording_handler(&mut machine, 14, HANDLERS);
    place(&mut machine, CODE, |a| {
        a.mov(rdi, DATA + 0xFF0).unwrap();
        a.mov(al, 0xEE).unwrap();
        a.mov(rcx, 0x20u64).unwrap();
        a.rep().stosb().unwrap();
    });
    assert_eq!(run_prepared(&mut machine).unwrap().exit_status, 14);
    let cpu = machine.cpu();
    assert_eq!((cpu.gpr[1], cpu.gpr[7], cpu.gpr[11]), (0x10, DATA + 0x1000, DATA + 0x1000));
    assert_eq!(read_u64(&machine, DATA + 0xFF8), 0xEEEE_EEEE_EEEE_EEEE);
}

#[test]
fn imul_register_forms_match_the_memory_forms() {
    for (a_value, b_value) in
        [(3u64, 7u64), (u64::MAX, 2), (0x4000_0000_0000_0000, 2), (0x8000, 0x8000), (0x7FFF_FFFF, 0x7FFF_FFFF)]
    {
        for bytes in [2u32, 4, 8] {
            let m = run(|a| {
                a.mov(rdi, DATA).unwrap();
                a.mov(rax, b_value).unwrap();
                a.mov(qword_ptr(rdi), rax).unwrap();
                for (through_memory, result, flags) in [(false, r8, r9), (true, r10, r11)] {
                    a.mov(rbx, a_value).unwrap();
                    a.mov(rcx, b_value).unwrap();
                    match (bytes, through_memory) {
                        (2, false) => a.imul_2(bx, cx).unwrap(),
                        (2, true) => a.imul_2(bx, word_ptr(rdi)).unwrap(),
                        (4, false) => a.imul_2(ebx, ecx).unwrap(),
                        (4, true) => a.imul_2(ebx, dword_ptr(rdi)).unwrap(),
                        (_, false) => a.imul_2(rbx, rcx).unwrap(),
                        (_, true) => a.imul_2(rbx, qword_ptr(rdi)).unwrap(),
                    }
                    a.pushfq().unwrap();
                    a.pop(flags).unwrap();
                    a.mov(result, rbx).unwrap();
                }
                a.imul_3(r12, rcx, 0x1234).unwrap();
                a.mov(rsi, rcx).unwrap();
                a.imul_3(rsi, qword_ptr(rdi), 0x1234).unwrap();
            });
            assert_eq!(
                (gpr(&m, 8), status(gpr(&m, 9))),
                (gpr(&m, 10), status(gpr(&m, 11))),
                "{a_value:#x} * {b_value:#x}, {bytes} bytes"
            );
            assert_eq!(gpr(&m, 12), gpr(&m, 6));
        }
    }
}
