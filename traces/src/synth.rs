//! Synthetic traces, for benchmarking and testing the format before (and apart from) any recorder.
//!
//! The stream imitates a small 64-bit system: two processes running loops of user blocks with data-dependent
//! branches, system calls through a kernel path, page faults that cut a block short, timer interrupts that switch
//! address space, first touches of pages, and page-table writes, after a boot phase of blocks that run once. The block bytes are real x86-64 code, so the
//! checker's decode rule holds. It is a model of a trace's *shape*, not a guest execution: format figures measured
//! on it say so.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Seek, Write};

use crate::error::WriteError;
use crate::model::{
    Access, Block, BlockId, BootState, CodeMode, Context, EndReason, Ending, Event, Metadata, PageSize, PagingMode,
    Walk,
};
use crate::writer::TraceWriter;

/// SplitMix64: a tiny deterministic generator, the same sequence everywhere, so a failing case is a seed and a
/// number (the synthetic traces here, the mutation tests' damage).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; 0, drawing nothing, when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next_u64() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// Straight-line x86-64 instructions the generator draws from (all valid in 64-bit mode).
const BODY: &[&[u8]] = &[
    &[0x48, 0x89, 0xc3],             // mov rbx, rax
    &[0x48, 0x83, 0xc0, 0x01],       // add rax, 1
    &[0x48, 0x8b, 0x4f, 0x08],       // mov rcx, [rdi+8]
    &[0x48, 0x89, 0x4e, 0x10],       // mov [rsi+16], rcx
    &[0x48, 0x8d, 0x04, 0x91],       // lea rax, [rcx+rdx*4]
    &[0x31, 0xd2],                   // xor edx, edx
    &[0x48, 0x39, 0xd8],             // cmp rax, rbx
    &[0x48, 0x0f, 0xaf, 0xc1],       // imul rax, rcx
    &[0x90],                         // nop
    &[0x48, 0xc1, 0xe0, 0x03],       // shl rax, 3
    &[0xb8, 0x2a, 0x00, 0x00, 0x00], // mov eax, 42
    &[0x48, 0x85, 0xc0],             // test rax, rax
];
const JNE_REL8: [u8; 2] = [0x75, 0x10];
const SYSCALL: [u8; 2] = [0x0f, 0x05];
const SYSRETQ: [u8; 3] = [0x48, 0x0f, 0x07];
const IRETQ: [u8; 2] = [0x48, 0xcf];
const MOV_CR3_RAX: [u8; 3] = [0x0f, 0x22, 0xd8];
const MOV_RDX_TO_MEM: [u8; 3] = [0x48, 0x89, 0x17]; // mov [rdi], rdx (a page-table store in the fault handler)

const USER_BASE: u64 = 0x40_0000;
const BOOT_BLOCKS: u64 = 300;
const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;

/// How big a synthetic trace to make.
#[derive(Debug, Clone, Copy)]
pub struct SynthConfig {
    pub seed: u64,
    /// Stop once at least this many instructions have retired.
    pub instructions: u64,
}

/// What the generator wrote, to compare a reader's view against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSummary {
    pub events: u64,
    pub instructions: u64,
    /// Hash of every event in order, as [`hash_events`] computes it.
    pub event_hash: u64,
}

/// Order-sensitive hash of an event sequence, for checking that a reader returns exactly what was written.
#[derive(Default)]
pub struct EventHasher(DefaultHasher);

impl EventHasher {
    pub fn add(&mut self, event: &Event) {
        event.hash(&mut self.0);
    }

    pub fn finish(&self) -> u64 {
        self.0.finish()
    }
}

struct Process {
    cr3: u64,
    /// Ids of the process's user blocks; block `i` falls through to `i + 1` or branches back.
    blocks: Vec<BlockId>,
    syscall_block: BlockId,
    next_data_page: u64,
}

struct Generator<'w, W: Write + Seek> {
    writer: &'w mut TraceWriter<W>,
    rng: SplitMix64,
    hasher: EventHasher,
    events: u64,
    instructions: u64,
    /// Instructions the last block execution retired: where an interrupt after it sits.
    last_retired: u32,
    context: Context,
}

impl<W: Write + Seek> Generator<'_, W> {
    fn emit(&mut self, event: Event) -> Result<(), WriteError> {
        self.writer.push(&event)?;
        self.hasher.add(&event);
        self.events += 1;
        Ok(())
    }

    fn block(&mut self, address: u64, tag: u64, body: usize, end: &[u8]) -> Result<BlockId, WriteError> {
        let mut bytes = Vec::new();
        for _ in 0..body {
            bytes.extend_from_slice(BODY[self.rng.below(BODY.len() as u64) as usize]);
        }
        bytes.extend_from_slice(end);
        let instructions = body as u32 + u32::from(!end.is_empty());
        self.writer.add_block(&Block { address, mode: CodeMode::Bits64, tag, instructions, bytes })
    }

    fn run(&mut self, id: BlockId, instructions: u32) -> Result<(), WriteError> {
        self.instructions += u64::from(instructions);
        self.last_retired = instructions;
        self.emit(Event::Block(id))
    }

    fn switch_context(&mut self, at: u32, change: impl FnOnce(&mut Context)) -> Result<(), WriteError> {
        change(&mut self.context);
        self.emit(Event::Context { at, context: self.context })
    }
}

/// Writes a synthetic trace of about `config.instructions` instructions through `writer` and finishes it.
pub fn write_trace<W: Write + Seek>(out: W, config: &SynthConfig) -> Result<(W, SynthSummary), WriteError> {
    let boot = BootState {
        rip: 0x10_0000,
        rax: 0x2bad_b002,
        rbx: 0x9500,
        rsp: 0,
        rflags: 0x2,
        cr0: 0x11,
        mode: CodeMode::Bits32,
        ram_bytes: 128 << 20,
    };
    let metadata = Metadata {
        workload: "synthetic".into(),
        params: vec![
            ("seed".into(), config.seed.to_string()),
            ("instructions".into(), config.instructions.to_string()),
        ],
        recorder: "virtlab-traces synth".into(),
        recorder_version: env!("CARGO_PKG_VERSION").into(),
        ..Metadata::default()
    };
    let mut writer = TraceWriter::new(out, metadata, boot, &[])?;
    let mut generator = Generator {
        writer: &mut writer,
        rng: SplitMix64(config.seed),
        hasher: EventHasher::default(),
        events: 0,
        instructions: 0,
        last_retired: 0,
        context: Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::FourLevel, cr3: 0x1000 },
    };
    let g = &mut generator;
    g.emit(Event::Context { at: 0, context: g.context })?;

    // Boot: kernel start-up code runs once, so, as in a recorded guest, the hot blocks that follow get ids past
    // the one-byte range.
    for index in 0..BOOT_BLOCKS {
        let boot_block = g.block(KERNEL_BASE + 0x10_0000 + index * 0x40, 0, 3 + (index % 4) as usize, &JNE_REL8)?;
        g.run(boot_block, g.writer.block_instructions(boot_block))?;
    }

    // Kernel paths: system call (entry, work, exit), timer (entry, scheduler with CR3 switch, exit), page fault.
    let k = |offset: u64| KERNEL_BASE + offset;
    let sys_entry = g.block(k(0x1000), 0, 6, &JNE_REL8)?;
    let sys_work: Vec<BlockId> =
        (0..8).map(|i| g.block(k(0x1100 + i * 0x40), 0, 3 + (i as usize % 4), &JNE_REL8)).collect::<Result<_, _>>()?;
    let sys_exit = g.block(k(0x1400), 0, 4, &SYSRETQ)?;
    let irq_entry = g.block(k(0x2000), 0, 8, &JNE_REL8)?;
    let irq_switch = g.block(k(0x2100), 0, 3, &MOV_CR3_RAX)?;
    let irq_exit = g.block(k(0x2200), 0, 5, &IRETQ)?;
    let pf_entry = g.block(k(0x3000), 0, 7, &JNE_REL8)?;
    let pf_fill = g.block(k(0x3100), 0, 2, &MOV_RDX_TO_MEM)?;
    let pf_exit = g.block(k(0x3200), 0, 3, &IRETQ)?;

    let mut processes = Vec::new();
    for (index, cr3) in [0x20_0000u64, 0x30_0000].into_iter().enumerate() {
        let blocks = (0..24)
            .map(|i| g.block(USER_BASE + i * 0x20, cr3, 2 + body_variation(index, i), &JNE_REL8))
            .collect::<Result<Vec<_>, _>>()?;
        let syscall_block = g.block(USER_BASE + 0x800, cr3, 3, &SYSCALL)?;
        processes.push(Process { cr3, blocks, syscall_block, next_data_page: 0x1000_0000 });
    }
    let shape = |g: &Generator<'_, W>, id: BlockId| g.writer.block_instructions(id);

    // Enter the first process.
    let mut current = 0usize;
    g.run(irq_exit, shape(g, irq_exit))?;
    g.emit(Event::Iret { at: 5 })?;
    let first_cr3 = processes[0].cr3;
    g.switch_context(5, |c| {
        c.cpl = 3;
        c.interrupts_enabled = true;
        c.cr3 = first_cr3;
    })?;

    let mut position = 0usize;
    let mut since_timer = 0u64;
    let mut fresh_epoch = false;
    while g.instructions < config.instructions {
        let process = &mut processes[current];
        let id = process.blocks[position];
        let length = shape(g, id);

        if g.rng.chance(400) {
            // A true page fault on a data access: the block stops at the faulting instruction.
            let executed = g.rng.below(u64::from(length)) as u32;
            g.instructions += u64::from(executed);
            g.last_retired = executed;
            g.emit(Event::PartialBlock { block: id, executed })?;
            let page = process.next_data_page;
            process.next_data_page += 0x1000;
            g.emit(Event::Exception {
                at: executed,
                vector: 14,
                error_code: Some(6),
                cr2: Some(page + 0x18),
                walk: four_level_walk(process.cr3, page),
            })?;
            g.switch_context(executed, |c| c.cpl = 0)?;
            for kernel_block in [pf_entry, pf_fill] {
                g.run(kernel_block, shape(g, kernel_block))?;
            }
            let pte_gpa = 0x40_0000 + (page >> 12) * 8 % 0x1000;
            g.emit(Event::PageTableWrite {
                at: 2,
                gpa: pte_gpa,
                level: 1,
                old: 0,
                new: (page & 0xff_f000) | 0x8000_0000_0000_0007,
            })?;
            g.run(pf_exit, shape(g, pf_exit))?;
            g.emit(Event::Iret { at: 3 })?;
            g.switch_context(3, |c| c.cpl = 3)?;
            g.run(id, length)?;
            g.emit(Event::PageTouch {
                at: 1,
                page,
                frame: page & 0xff_f000,
                access: Access::Write,
                user: true,
                size: PageSize::Size4K,
                walk: four_level_walk(process.cr3, page),
            })?;
        } else {
            g.run(id, length)?;
            if fresh_epoch {
                fresh_epoch = false;
                let cr3 = process.cr3;
                for page in 0..4u64 {
                    let page = USER_BASE + page * 0x1000;
                    let touch = Event::PageTouch {
                        at: 0,
                        page,
                        frame: cr3 + page,
                        access: Access::Execute,
                        user: true,
                        size: PageSize::Size4K,
                        walk: four_level_walk(cr3, page),
                    };
                    g.emit(touch)?;
                }
            }
            if g.rng.chance(64) {
                let page = USER_BASE + (g.rng.below(64) << 12);
                g.emit(Event::PageTouch {
                    at: 0,
                    page,
                    frame: 0x80_0000 + page,
                    access: Access::Read,
                    user: true,
                    size: PageSize::Size4K,
                    walk: four_level_walk(processes[current].cr3, page),
                })?;
            }
        }
        since_timer += u64::from(length);

        // Loop structure: mostly fall through, sometimes branch back a few blocks, and sometimes make a system call.
        position = if g.rng.chance(6) { position.saturating_sub(1 + g.rng.below(4) as usize) } else { position + 1 };
        if position >= processes[current].blocks.len() {
            position = 0;
            let syscall_block = processes[current].syscall_block;
            let length = shape(g, syscall_block);
            g.run(syscall_block, length)?;
            g.emit(Event::Syscall { at: length - 1 })?;
            g.switch_context(length - 1, |c| c.cpl = 0)?;
            g.run(sys_entry, shape(g, sys_entry))?;
            let work = 1 + g.rng.below(sys_work.len() as u64) as usize;
            for &kernel_block in &sys_work[..work] {
                g.run(kernel_block, shape(g, kernel_block))?;
            }
            if g.rng.chance(8) {
                g.emit(Event::MsrRead { at: 1, index: 0xc000_0102, value: 0xffff_8880_0000_0000 })?;
            }
            g.run(sys_exit, shape(g, sys_exit))?;
            g.emit(Event::Sysret { at: 4 })?;
            g.switch_context(4, |c| c.cpl = 3)?;
        }

        if since_timer >= 20_000 {
            // The timer fires between two user blocks; the scheduler switches to the other process.
            since_timer = 0;
            let next = (current + 1) % processes.len();
            let at = g.last_retired;
            g.emit(Event::Interrupt { at, vector: 0x20 })?;
            g.switch_context(at, |c| {
                c.cpl = 0;
                c.interrupts_enabled = false;
            })?;
            g.run(irq_entry, shape(g, irq_entry))?;
            g.emit(Event::Io { at: 7, port: 0x20, size: 1, direction: crate::model::Direction::Write, value: 0x20 })?;
            g.run(irq_switch, shape(g, irq_switch))?;
            let (old, new) = (processes[current].cr3, processes[next].cr3);
            g.emit(Event::CrWrite { at: 3, cr: 3, old, new })?;
            g.switch_context(3, |c| c.cr3 = new)?;
            g.run(irq_exit, shape(g, irq_exit))?;
            g.emit(Event::Iret { at: 5 })?;
            g.switch_context(5, |c| {
                c.cpl = 3;
                c.interrupts_enabled = true;
            })?;
            // The new address space starts a TLB epoch: the next user block touches its code pages afresh.
            fresh_epoch = true;
            current = next;
        }
    }

    let summary = SynthSummary { events: g.events, instructions: g.instructions, event_hash: g.hasher.finish() };
    let ending = Ending {
        reason: EndReason::GuestExit,
        exit_status: 0,
        detail: String::new(),
        serial: b"synthetic\n".to_vec(),
        state_digest: summary.event_hash.to_le_bytes().repeat(4).try_into().expect("32 bytes"),
    };
    let out = writer.finish(ending)?;
    Ok((out, summary))
}

/// Extra body instructions (0 to 4) that vary across a process's blocks, as real basic-block lengths do.
fn body_variation(process: usize, block: u64) -> usize {
    (block as usize * 7 + process * 3) % 5
}

/// The tables a 4-level walk of `page` reads in the address space of `cr3`: the model keeps each process's four
/// tables in the frames right after its PML4, one page table per 2 MiB.
fn four_level_walk(cr3: u64, page: u64) -> Walk {
    let root = (cr3 >> 12) as u32;
    let leaf = root + 3 + ((page >> 21) & 7) as u32;
    Walk::new(&[root, root + 1, root + 2, leaf]).expect("four tables")
}
