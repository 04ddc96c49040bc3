//! Interpreter speed on a compute-bound guest: an xorshift loop with loads, stores and branches.
//!
//! `cargo run --release --example throughput [iterations]` prints guest instructions per second
//! interpreting (no observer) and with an observer doing a trace writer's per-block work.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::*;
use iced_x86::code_asm::*;
use virtlab_machine::{
    BlockExecution, CpuContext, CutShortReason, ExecutionObserver, Machine, NullObserver, RunLimits, SideEvent,
    Transfer,
};

/// Does the work a trace writer's hot path does: a varint block id per executed block into a
/// stream buffer, each new block's bytes once into a table, events counted.
#[derive(Default)]
struct TraceLikeObserver {
    stream: Vec<u8>,
    streamed: u64,
    /// Indexed by block id (ids are dense).
    known_blocks: Vec<bool>,
    block_table: Vec<u8>,
    events: u64,
}

impl TraceLikeObserver {
    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.stream.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.stream.push(value as u8);
        if self.stream.len() > 1 << 20 {
            // Stands in for handing a full buffer to the file writer.
            self.streamed += self.stream.len() as u64;
            self.stream.clear();
        }
    }
}

impl ExecutionObserver for TraceLikeObserver {
    fn block(&mut self, block: &BlockExecution<'_>) {
        let id = block.id as usize;
        if id >= self.known_blocks.len() {
            self.known_blocks.resize(id + 1, false);
        }
        if !self.known_blocks[id] {
            self.known_blocks[id] = true;
            self.block_table.extend_from_slice(block.bytes);
        }
        self.varint(block.id);
    }
    fn block_cut_short(&mut self, retired: u32, _reason: CutShortReason) {
        self.varint(retired as u64);
    }
    fn context(&mut self, _index: u32, _context: &CpuContext) {
        self.events += 1;
    }
    fn transfer(&mut self, _index: u32, _transfer: &Transfer) {
        self.events += 1;
    }
    fn side_event(&mut self, index: u32, _event: &SideEvent) {
        self.events += 1;
        self.varint(index as u64);
    }
}

fn guest(iterations: u64) -> Machine {
    let mut machine = long_mode_machine();
    place(&mut machine, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rax, 0x1234_5678_9ABC_DEF1u64).unwrap();
        a.mov(rcx, iterations).unwrap();
        a.mov(rdi, DATA).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rdx, rax).unwrap();
        a.shl(rdx, 13).unwrap();
        a.xor(rax, rdx).unwrap();
        a.mov(rdx, rax).unwrap();
        a.shr(rdx, 7).unwrap();
        a.xor(rax, rdx).unwrap();
        a.mov(rdx, rax).unwrap();
        a.shl(rdx, 17).unwrap();
        a.xor(rax, rdx).unwrap();
        a.mov(rsi, rax).unwrap();
        a.and(esi, 0xFF8).unwrap();
        a.add(qword_ptr(rdi + rsi), rax).unwrap();
        a.add(rbx, qword_ptr(rdi + rsi)).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.mov(rax, rbx).unwrap();
        a.and(eax, 0x7F).unwrap();
        a.out(0xF4, al).unwrap();
    });
    machine
}

fn measure<O: ExecutionObserver>(label: &str, iterations: u64, observer: &mut O) -> f64 {
    let mut machine = guest(iterations);
    let start = Instant::now();
    let outcome = machine.run(observer, RunLimits { max_instructions: u64::MAX }).expect("the benchmark guest exits");
    let seconds = start.elapsed().as_secs_f64();
    let instructions = outcome.retired_kernel + outcome.retired_user;
    let rate = instructions as f64 / seconds / 1e6;
    println!(
        "{label:<12} {instructions:>12} instructions in {seconds:>7.3} s = {rate:>7.1} M instructions/s (exit {})",
        outcome.exit_status
    );
    rate
}

fn main() {
    let iterations = std::env::args().nth(1).and_then(|arg| arg.parse().ok()).unwrap_or(20_000_000u64);
    measure("interpreting", iterations, &mut NullObserver);
    let mut recording = TraceLikeObserver::default();
    measure("recording", iterations, &mut recording);
    println!(
        "(recording-like observer: {} stream bytes, {} distinct blocks, {} events)",
        recording.streamed + recording.stream.len() as u64,
        recording.known_blocks.iter().filter(|known| **known).count(),
        recording.events
    );
}
