mod common;
use common::*;
use iced_x86::code_asm::*;

#[test]
fn add_and_exit() {
    let (machine, result) = run_code(|a| {
        a.mov(rax, 40u64).unwrap();
        a.add(rax, 2).unwrap();
        a.mov(rbx, rax).unwrap();
        save_flags_and_exit(a);
    });
    let outcome = result.unwrap();
    assert_eq!(outcome.exit_status, 0);
    assert_eq!(machine.cpu().gpr[3], 42);
}
