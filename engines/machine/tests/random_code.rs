//! Random bytes as guest code, at CPL 0 and CPL 3, in 64-bit and 32-bit mode: every run must end
//! in an outcome or a `MachineError`, never a panic. Every exception vector exits through a
//! handler, so faults are exercised as well as instructions.

mod common;
use common::*;
use virtlab_machine::{Machine, NullObserver, RunLimits};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `mov al, vector; out 0xF4, al` for every vector, assembled once.
fn exit_handlers() -> Vec<u8> {
    let mut code = Vec::new();
    for vector in 0..=255u8 {
        let handler = assemble(HANDLERS + vector as u64 * 16, |a| exit(a, vector));
        code.extend_from_slice(&handler);
        code.resize((vector as usize + 1) * 16, 0x90);
    }
    code
}

fn machine_with_exit_handlers(handlers: &[u8]) -> Machine {
    let mut machine = long_mode_machine();
    write_bytes(&mut machine, HANDLERS, handlers);
    for vector in 0..=255u8 {
        set_gate(&mut machine, vector, HANDLERS + vector as u64 * 16, 3, 0, false);
    }
    machine
}

fn run_random(handlers: &[u8], seed: u64, user: bool, compat: bool) {
    let mut random = XorShift(seed);
    let mut machine = machine_with_exit_handlers(handlers);
    let code: Vec<u8> = (0..256).map(|_| random.next() as u8).collect();
    let start = if user { USER_CODE } else { CODE + 0x1000 };
    write_bytes(&mut machine, start, &code);
    for register in 0..16 {
        machine.cpu_mut().gpr[register] = match random.next() % 4 {
            0 => DATA + (random.next() & 0xFFF),
            1 => random.next(),
            2 => random.next() & 0xFF,
            _ => 0,
        };
    }
    if user || compat {
        machine.cpu_mut().gpr[4] = STACK_TOP;
        let selector = if compat { CODE32_SELECTOR } else { USER_CS };
        place(&mut machine, CODE, |a| {
            use iced_x86::code_asm::*;
            if user {
                enter_user(a, 0x202);
            } else {
                a.push(selector as i32).unwrap();
                a.mov(rax, start).unwrap();
                a.push(rax).unwrap();
                a.db(&[0x48, 0xCB]).unwrap();
            }
        });
    } else {
        machine.cpu_mut().rip = start;
        machine.cpu_changed();
    }
    let _ = machine.run(&mut NullObserver, RunLimits { max_instructions: 5_000 });
}

/// Programs per mode; `RANDOM_CODE_SEEDS` raises it for a longer soak.
const SEEDS: u64 = 300;

#[test]
fn random_code_never_panics() {
    let seeds = std::env::var("RANDOM_CODE_SEEDS").ok().and_then(|value| value.parse().ok()).unwrap_or(SEEDS);
    let handlers = exit_handlers();
    for seed in 1..=seeds {
        let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        run_random(&handlers, seed, false, false);
        run_random(&handlers, seed ^ 1, true, false);
        run_random(&handlers, seed ^ 2, false, true);
    }
}
