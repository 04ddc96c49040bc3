//! The pre-classified fast forms and the general operand path must agree. Every ALU operation,
//! width, input pair and carry is run register-to-register and with a memory operand (load and
//! store direction), each memory form once plain (a fast form) and once behind an FS override (FS
//! base 0 here), which only the general path handles.

mod common;
use common::*;
use iced_x86::code_asm::*;

const INPUTS: [u64; 6] = [0, 1, 0x7F, 0x80, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0001];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Registers,
    Load { with_fs: bool },
    Store { with_fs: bool },
}

fn memory_operand(bytes: u32, with_fs: bool) -> AsmMemoryOperand {
    let operand = match bytes {
        1 => byte_ptr(rdi),
        2 => word_ptr(rdi),
        4 => dword_ptr(rdi),
        _ => qword_ptr(rdi),
    };
    if with_fs {
        operand.fs()
    } else {
        operand
    }
}

/// `$emit!(method)` for the ALU operation `$mnemonic` names (ADD, OR, ADC, SBB, AND, SUB, XOR, CMP); `$other`
/// for any other name.
macro_rules! by_alu_mnemonic {
    ($mnemonic:expr, $emit:ident, $other:expr) => {
        match $mnemonic {
            "add" => $emit!(add),
            "or" => $emit!(or),
            "adc" => $emit!(adc),
            "sbb" => $emit!(sbb),
            "and" => $emit!(and),
            "sub" => $emit!(sub),
            "xor" => $emit!(xor),
            "cmp" => $emit!(cmp),
            _ => $other,
        }
    };
}

/// Emits `mnemonic` with RBX-sized destination and RCX-sized source, or with [RDI] in place of
/// the source (load) or the destination (store, the register operand then being RCX).
fn emit(a: &mut CodeAssembler, mnemonic: &str, form: Form, bytes: u32) {
    macro_rules! emit {
        ($method:ident) => {{
            let memory = |with_fs: bool| memory_operand(bytes, with_fs);
            match (form, bytes) {
                (Form::Registers, 1) => a.$method(bl, cl).unwrap(),
                (Form::Registers, 2) => a.$method(bx, cx).unwrap(),
                (Form::Registers, 4) => a.$method(ebx, ecx).unwrap(),
                (Form::Registers, _) => a.$method(rbx, rcx).unwrap(),
                (Form::Load { with_fs }, 1) => a.$method(bl, memory(with_fs)).unwrap(),
                (Form::Load { with_fs }, 2) => a.$method(bx, memory(with_fs)).unwrap(),
                (Form::Load { with_fs }, 4) => a.$method(ebx, memory(with_fs)).unwrap(),
                (Form::Load { with_fs }, _) => a.$method(rbx, memory(with_fs)).unwrap(),
                (Form::Store { with_fs }, 1) => a.$method(memory(with_fs), cl).unwrap(),
                (Form::Store { with_fs }, 2) => a.$method(memory(with_fs), cx).unwrap(),
                (Form::Store { with_fs }, 4) => a.$method(memory(with_fs), ecx).unwrap(),
                (Form::Store { with_fs }, _) => a.$method(memory(with_fs), rcx).unwrap(),
            }
        }};
    }
    by_alu_mnemonic!(mnemonic, emit, emit!(mov))
}

const FORMS: [Form; 5] = [
    Form::Registers,
    Form::Load { with_fs: false },
    Form::Load { with_fs: true },
    Form::Store { with_fs: false },
    Form::Store { with_fs: true },
];

/// Runs every width, form, input pair and carry of one mnemonic in a single guest; returns
/// (destination, status flags) per case, grouped by (width, form) in `FORMS` order.
fn run_mnemonic(mnemonic: &str) -> Vec<Vec<(u64, u64)>> {
    const RESULTS: u64 = DATA + 0x1000;
    let cases_per_form = INPUTS.len() * INPUTS.len() * 2;
    let mut case = 0u64;
    let (machine, result) = run_code(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(rsi, RESULTS).unwrap();
        for bytes in [1, 2, 4, 8] {
            for form in FORMS {
                for &a_value in &INPUTS {
                    for &b_value in &INPUTS {
                        for carry in [false, true] {
                            // Destination value a, source value b, wherever each lives in this form.
                            let (memory_value, rbx_value, rcx_value) = match form {
                                Form::Store { .. } => (a_value, 0, b_value),
                                _ => (b_value, a_value, b_value),
                            };
                            a.mov(rax, memory_value).unwrap();
                            a.mov(qword_ptr(rdi), rax).unwrap();
                            a.mov(rbx, rbx_value).unwrap();
                            a.mov(rcx, rcx_value).unwrap();
                            if carry {
                                a.stc().unwrap();
                            } else {
                                a.clc().unwrap();
                            }
                            emit(a, mnemonic, form, bytes);
                            a.pushfq().unwrap();
                            a.pop(rax).unwrap();
                            if let Form::Store { .. } = form {
                                a.mov(rbx, qword_ptr(rdi)).unwrap();
                            }
                            a.mov(qword_ptr(rsi + case * 16), rbx).unwrap();
                            a.mov(qword_ptr(rsi + case * 16 + 8), rax).unwrap();
                            case += 1;
                        }
                    }
                }
            }
        }
        exit(a, 0);
    });
    result.unwrap();
    let mut groups = Vec::new();
    for (group, (bytes, form)) in
        [1u32, 2, 4, 8].iter().flat_map(|bytes| FORMS.iter().map(move |form| (*bytes, *form))).enumerate()
    {
        let destination_mask = match form {
            // A store leaves the rest of the quadword as it was; compare the operand only.
            Form::Store { .. } => u64::MAX >> (64 - bytes * 8),
            _ => u64::MAX,
        };
        let first = (group * cases_per_form) as u64;
        groups.push(
            (first..first + cases_per_form as u64)
                .map(|case| {
                    (
                        read_u64(&machine, RESULTS + case * 16) & destination_mask,
                        status(read_u64(&machine, RESULTS + case * 16 + 8)),
                    )
                })
                .collect(),
        );
    }
    groups
}

#[test]
fn fast_forms_and_general_path_agree() {
    for mnemonic in ["add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "mov"] {
        let groups = run_mnemonic(mnemonic);
        for (width, bytes) in [1u32, 2, 4, 8].iter().enumerate() {
            let group = |form: usize| &groups[width * FORMS.len() + form];
            let registers = group(0);
            assert_eq!(group(1), registers, "{mnemonic}, {bytes} bytes, load");
            assert_eq!(group(2), registers, "{mnemonic}, {bytes} bytes, load through FS");
            assert_eq!(group(3), group(4), "{mnemonic}, {bytes} bytes, store");
            let register_results: Vec<_> =
                registers.iter().map(|(value, flags)| (value & (u64::MAX >> (64 - bytes * 8)), *flags)).collect();
            if mnemonic != "mov" {
                assert_eq!(group(3), &register_results, "{mnemonic}, {bytes} bytes, store against registers");
            }
        }
    }
}

/// Runs the same stack and LEA sequence twice: with the instructions that have fast forms (PUSH r64, POP r64,
/// CALL rel32, RET, LEA r64) and with general-path equivalents (PUSH and POP through memory, CALL through
/// memory, RET 0, LEA with an FS override, which LEA ignores). The call and the LEAs come first, padded with NOPs
/// so that both versions put every instruction at the same address. Returns every GPR and the stack's slots.
fn run_stack_sequence(fast: bool) -> (Vec<u64>, Vec<u64>) {
    const SCRATCH: u64 = DATA + 0x800;
    let call_through_memory = assemble(CODE, |a| a.call(qword_ptr(SCRATCH)).unwrap()).len();
    let registers = [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15];
    let (machine, result) = run_code(|a| {
        let nops = |a: &mut CodeAssembler, count: usize| (0..count).for_each(|_| a.nop().unwrap());
        // A call and a return, then LEA with a base, an index and a scale wrapping past 2^64, and with RIP.
        let mut function = a.create_label();
        let mut after = a.create_label();
        a.lea(rax, ptr(function)).unwrap();
        a.mov(qword_ptr(SCRATCH), rax).unwrap();
        if fast {
            nops(a, call_through_memory - 5);
            a.call(function).unwrap();
        } else {
            a.call(qword_ptr(SCRATCH)).unwrap();
        }
        a.jmp(after).unwrap();
        a.set_label(&mut function).unwrap();
        a.mov(rbx, rsp).unwrap();
        a.mov(rcx, qword_ptr(rsp)).unwrap();
        if fast {
            nops(a, 2);
            a.ret().unwrap();
        } else {
            a.ret_1(0).unwrap();
        }
        a.set_label(&mut after).unwrap();
        a.mov(rdx, 0xFFFF_FFFF_FFFF_FFF0u64).unwrap();
        a.mov(rsi, 0x30u64).unwrap();
        if fast {
            nops(a, 1);
            a.lea(rdi, qword_ptr(rdx + rsi * 8 + 0x7f)).unwrap();
            nops(a, 1);
            a.lea(r8, ptr(after)).unwrap();
        } else {
            a.lea(rdi, qword_ptr(rdx + rsi * 8 + 0x7f).fs()).unwrap();
            a.lea(r8, ptr(after).fs()).unwrap();
        }
        a.mov(qword_ptr(SCRATCH + 8), rbx).unwrap();
        a.mov(qword_ptr(SCRATCH + 16), rcx).unwrap();
        a.mov(qword_ptr(SCRATCH + 24), rdi).unwrap();
        a.mov(qword_ptr(SCRATCH + 32), r8).unwrap();
        a.mov(qword_ptr(SCRATCH + 40), rsp).unwrap();
        for (index, &register) in registers.iter().enumerate() {
            if register != rsp {
                a.mov(register, 0x1111_0000_0000_0000u64.wrapping_mul(index as u64 + 1) | index as u64).unwrap();
            }
        }
        // Every register pushed, the stack pointer included (PUSH RSP stores its value before the push).
        for &register in &registers {
            a.mov(qword_ptr(SCRATCH), register).unwrap();
            if fast {
                a.push(register).unwrap();
            } else {
                a.push(qword_ptr(SCRATCH)).unwrap();
            }
        }
        // Popped in another order, so that each register takes another's value; RSP is popped last.
        for &register in registers.iter().rev().filter(|&&r| r != rsp).take(14).chain([&rsp]) {
            if fast {
                a.pop(register).unwrap();
                a.mov(qword_ptr(SCRATCH), register).unwrap();
            } else {
                a.pop(qword_ptr(SCRATCH)).unwrap();
                a.mov(register, qword_ptr(SCRATCH)).unwrap();
            }
        }
        exit(a, 0);
    });
    result.unwrap();
    let mut values = machine.cpu().gpr.to_vec();
    values.extend((1..6).map(|slot| read_u64(&machine, SCRATCH + 8 * slot)));
    let stack = (1..=17).map(|slot| read_u64(&machine, STACK_TOP - 8 * slot)).collect();
    (values, stack)
}

#[test]
fn stack_forms_and_general_path_agree() {
    let (fast, fast_stack) = run_stack_sequence(true);
    let (general, general_stack) = run_stack_sequence(false);
    assert_eq!(fast_stack, general_stack);
    assert_eq!(fast, general);
    // The values themselves. Inside the function RSP was one slot down and the return address was there; after
    // the return RSP was back at the top.
    let (rbx_in_function, return_address, wrapped, rip_relative, rsp_after_return) =
        (fast[16], fast[17], fast[18], fast[19], fast[20]);
    assert_eq!(rbx_in_function, STACK_TOP - 8);
    assert!(return_address > CODE && return_address < rip_relative, "{return_address:#x}");
    assert_eq!(wrapped, 0xFFFF_FFFF_FFFF_FFF0u64.wrapping_add(0x30 * 8 + 0x7f));
    assert_eq!(rsp_after_return, STACK_TOP);
    // The pushes: the fifth slot holds RSP as it was before its own push (four slots down).
    assert_eq!(fast_stack[4], STACK_TOP - 8 * 4);
    assert_eq!(fast_stack[0], 0x1111_0000_0000_0000, "RAX, pushed first");
    // 14 pops took the top 14 slots (R15's down to RDX's); the 15th, POP RSP, loaded RCX's value into RSP.
    assert_eq!(fast[4], 0x2222_0000_0000_0001);
    assert_eq!(
        fast[15],
        0x1111_0000_0000_0000u64.wrapping_mul(16) | 15,
        "R15 popped first, so it got R15's value back"
    );
}

const IMMEDIATES: [i32; 7] = [0, 1, 0x7F, 0x80, -1, 0x7FFF, i32::MIN];

/// Emits `mnemonic [RDI], immediate` (or `inc`/`dec [RDI]`) at the given width, behind an FS override when
/// `with_fs` (FS base 0 here: the same address, through the general path only).
fn emit_memory_immediate(a: &mut CodeAssembler, mnemonic: &str, bytes: u32, with_fs: bool, immediate: i32) {
    let memory = memory_operand(bytes, with_fs);
    macro_rules! emit {
        ($method:ident) => {
            a.$method(memory, immediate).unwrap()
        };
    }
    by_alu_mnemonic!(
        mnemonic,
        emit,
        match mnemonic {
            "test" => emit!(test),
            "mov" => emit!(mov),
            "inc" => a.inc(memory).unwrap(),
            _ => a.dec(memory).unwrap(),
        }
    )
}

/// Every width, memory value, immediate and carry of one mnemonic with a memory destination, run once as a fast
/// form and once through the general path; returns (the memory's quadword, status flags) per case for each.
fn run_memory_immediate(mnemonic: &str) -> [Vec<(u64, u64)>; 2] {
    const RESULTS: u64 = DATA + 0x1000;
    let mut cases = Vec::new();
    for bytes in [1u32, 2, 4, 8] {
        // The immediates an instruction of this width encodes (a byte or a word is not sign-extended from 32 bits).
        let fits = |immediate: i32| match bytes {
            1 => (-0x80..=0xFF).contains(&immediate),
            2 => (-0x8000..=0xFFFF).contains(&immediate),
            _ => true,
        };
        for &memory_value in &INPUTS {
            for &immediate in IMMEDIATES.iter().filter(|&&immediate| fits(immediate)) {
                for carry in [false, true] {
                    cases.push((bytes, memory_value, immediate, carry));
                }
            }
        }
    }
    let (machine, result) = run_code(|a| {
        a.mov(rdi, DATA).unwrap();
        a.mov(rsi, RESULTS).unwrap();
        for (slot, with_fs) in [false, true].into_iter().enumerate() {
            for (case, &(bytes, memory_value, immediate, carry)) in cases.iter().enumerate() {
                a.mov(rax, memory_value).unwrap();
                a.mov(qword_ptr(rdi), rax).unwrap();
                if carry {
                    a.stc().unwrap();
                } else {
                    a.clc().unwrap();
                }
                emit_memory_immediate(a, mnemonic, bytes, with_fs, immediate);
                a.pushfq().unwrap();
                a.pop(rax).unwrap();
                a.mov(rbx, qword_ptr(rdi)).unwrap();
                let at = ((slot * cases.len() + case) * 16) as u64;
                a.mov(qword_ptr(rsi + at), rbx).unwrap();
                a.mov(qword_ptr(rsi + at + 8), rax).unwrap();
            }
        }
        exit(a, 0);
    });
    result.unwrap();
    [0, 1].map(|slot| {
        (0..cases.len())
            .map(|case| {
                let at = RESULTS + ((slot * cases.len() + case) * 16) as u64;
                (read_u64(&machine, at), status(read_u64(&machine, at + 8)))
            })
            .collect()
    })
}

#[test]
fn memory_immediate_forms_and_general_path_agree() {
    for mnemonic in ["add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "test", "mov", "inc", "dec"] {
        let [fast, general] = run_memory_immediate(mnemonic);
        assert_eq!(fast.len(), INPUTS.len() * 2 * (5 + 6 + 7 + 7), "{mnemonic}");
        assert_eq!(fast, general, "{mnemonic}");
    }
    // The values themselves, for the widths' first cases (memory 0, immediate 0, 1, 0x7F, 0x80, -1…, no carry).
    const CF: u64 = 1;
    const ZF: u64 = 0x40;
    const SF: u64 = 0x80;
    let [add, _] = run_memory_immediate("add");
    let byte_cases: Vec<_> = add.iter().step_by(2).take(5).collect();
    // A byte operation leaves the rest of the quadword; 0x80 as a byte is negative.
    assert_eq!(byte_cases.iter().map(|(value, _)| *value).collect::<Vec<_>>(), [0, 1, 0x7F, 0x80, 0xFF]);
    assert_eq!(byte_cases[0].1 & (ZF | SF), ZF);
    assert_eq!(byte_cases[3].1 & (ZF | SF), SF);
    // A quadword MOV sign-extends its 32-bit immediate (memory 0, immediate i32::MIN, no carry).
    let quadword_first = INPUTS.len() * 2 * (5 + 6 + 7);
    let [mov, _] = run_memory_immediate("mov");
    let min = mov[..].iter().skip(quadword_first).step_by(2).nth(6).unwrap();
    assert_eq!(min.0, 0xFFFF_FFFF_8000_0000);
    let [dec, _] = run_memory_immediate("dec");
    // DEC of 0 at every width wraps to all ones at that width, keeping CF from STC.
    let dec_carry = dec.iter().skip(1).step_by(2).next().unwrap();
    assert_eq!(dec_carry.0, 0xFF);
    assert_eq!(dec_carry.1 & (CF | SF), CF | SF);
}
