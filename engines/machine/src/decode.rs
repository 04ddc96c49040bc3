//! The predecoded block cache.
//!
//! A block is a run of decoded instructions starting at one linear address, ending at the first
//! control transfer or state-changing system instruction, at a page end, or after
//! [`MAX_BLOCK_INSTRUCTIONS`]. Blocks are keyed by (linear address, physical address, code mode) so
//! the same code mapped twice, or a page remapped, never reuses the wrong decode. Frames holding
//! cached code are flagged; a write there drops every block decoded from the frame.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::cpu::{CodeMode, SegmentRegister};
use crate::fast::{classify, FastForm};
use crate::interp::{Fault, Interp};
use crate::memory::{FRAME_CODE, PAGE_SIZE};
use crate::observer::{AccessKind, ExecutionObserver};

pub const MAX_BLOCK_INSTRUCTIONS: usize = 64;
const FRONT_ENTRIES: usize = 8192;

pub struct Block {
    pub id: u64,
    pub linear: u64,
    pub physical: u64,
    pub mode: CodeMode,
    pub instructions: Box<[Instruction]>,
    /// Fast form of each instruction, same order.
    pub(crate) forms: Box<[FastForm]>,
    /// The block ends in a plain branch (Jcc, JMP, CALL, RET, LOOP): the run loop may go straight
    /// on to the next block without looking at interrupts or devices.
    pub(crate) chains: bool,
    pub bytes: Box<[u8]>,
    /// Frame of the next page when the last instruction spills into it.
    pub spill_frame: Option<u64>,
    pub user_page: bool,
    valid: Cell<bool>,
}

type BlockKey = (u64, u64, CodeMode);

pub struct BlockCache {
    blocks: HashMap<BlockKey, Rc<Block>>,
    by_frame: HashMap<u64, Vec<BlockKey>>,
    /// Direct-mapped by linear address: skips hashing on the hot path.
    front: Vec<Option<Rc<Block>>>,
    next_id: u64,
}

impl BlockCache {
    pub fn new() -> BlockCache {
        BlockCache { blocks: HashMap::new(), by_frame: HashMap::new(), front: vec![None; FRONT_ENTRIES], next_id: 0 }
    }

    /// Number of distinct blocks decoded so far (including invalidated ones).
    pub fn blocks_decoded(&self) -> u64 {
        self.next_id
    }

    fn front_slot(linear: u64) -> usize {
        ((linear ^ (linear >> 13)) as usize) % FRONT_ENTRIES
    }
}

impl Default for BlockCache {
    fn default() -> BlockCache {
        BlockCache::new()
    }
}

/// Instructions after which the run loop must look at the machine again: control transfers, and
/// anything that changes privilege, translation, interrupt state or device state.
fn ends_block(instruction: &Instruction) -> bool {
    if instruction.flow_control() != FlowControl::Next {
        return true;
    }
    match instruction.mnemonic() {
        Mnemonic::Hlt
        | Mnemonic::Cli
        | Mnemonic::Sti
        | Mnemonic::Popf
        | Mnemonic::Popfd
        | Mnemonic::Popfq
        | Mnemonic::Wrmsr
        | Mnemonic::Lgdt
        | Mnemonic::Lidt
        | Mnemonic::Lldt
        | Mnemonic::Ltr
        | Mnemonic::Lmsw
        | Mnemonic::Clts
        | Mnemonic::Invlpg
        | Mnemonic::Swapgs
        | Mnemonic::In
        | Mnemonic::Out
        | Mnemonic::Insb
        | Mnemonic::Insw
        | Mnemonic::Insd
        | Mnemonic::Outsb
        | Mnemonic::Outsw
        | Mnemonic::Outsd => true,
        Mnemonic::Mov | Mnemonic::Pop => {
            instruction.op0_kind() == OpKind::Register && {
                let register = instruction.op0_register();
                register.is_cr() || register == Register::SS || register == Register::CS
            }
        }
        _ => false,
    }
}

impl<O: ExecutionObserver> Interp<'_, O> {
    /// Finds or decodes the block at CS:RIP.
    #[inline(always)]
    pub(crate) fn fetch_block(&mut self) -> Result<Rc<Block>, Fault> {
        let linear = self.code_linear(self.cpu.rip);
        let user = self.cpu.cpl == 3;
        let physical = self.translate(linear, AccessKind::Execute, user)?;
        let mode = self.mode;
        let slot = BlockCache::front_slot(linear);
        if let Some(block) = &self.blocks.front[slot] {
            if block.linear == linear && block.physical == physical && block.mode == mode && block.valid.get() {
                let block = block.clone();
                if block.spill_frame.is_none() || self.spill_matches(&block, user)? {
                    return Ok(block);
                }
            }
        }
        self.fetch_block_slow(linear, physical, mode, user, slot)
    }

    fn spill_matches(&mut self, block: &Block, user: bool) -> Result<bool, Fault> {
        let next_page = (block.linear | (PAGE_SIZE - 1)).wrapping_add(1);
        let frame = self.translate(next_page, AccessKind::Execute, user)? >> 12;
        Ok(Some(frame) == block.spill_frame)
    }

    #[inline(never)]
    fn fetch_block_slow(
        &mut self,
        linear: u64,
        physical: u64,
        mode: CodeMode,
        user: bool,
        slot: usize,
    ) -> Result<Rc<Block>, Fault> {
        if let Some(block) = self.blocks.blocks.get(&(linear, physical, mode)).cloned() {
            if block.spill_frame.is_none() || self.spill_matches(&block, user)? {
                self.blocks.front[slot] = Some(block.clone());
                return Ok(block);
            }
            self.invalidate_block_key(&(linear, physical, mode));
        }
        let block = Rc::new(self.decode_block(linear, physical, mode, user)?);
        let key = (linear, physical, mode);
        for frame in std::iter::once(physical >> 12).chain(block.spill_frame) {
            self.memory.frame_flags[frame as usize] |= FRAME_CODE;
            self.blocks.by_frame.entry(frame).or_default().push(key);
        }
        self.blocks.blocks.insert(key, block.clone());
        self.blocks.front[slot] = Some(block.clone());
        Ok(block)
    }

    fn decode_block(&mut self, linear: u64, physical: u64, mode: CodeMode, user: bool) -> Result<Block, Fault> {
        let page_end = (physical | (PAGE_SIZE - 1)) + 1;
        if page_end > self.memory.ram_size() {
            return Err(self.unbacked(physical));
        }
        let rip = self.cpu.rip;
        let bitness = mode.bitness();
        let mut instructions = Vec::new();
        let mut bytes = Vec::new();
        let mut spill_frame = None;
        let mut straddles_page_end = false;
        {
            let code = &self.memory.ram[physical as usize..page_end as usize];
            let mut decoder = Decoder::with_ip(bitness, code, rip, DecoderOptions::NONE);
            let mut instruction = Instruction::default();
            while decoder.can_decode() && instructions.len() < MAX_BLOCK_INSTRUCTIONS {
                let position = decoder.position();
                decoder.decode_out(&mut instruction);
                if instruction.is_invalid() {
                    straddles_page_end = decoder.last_error() == iced_x86::DecoderError::NoMoreBytes;
                    break;
                }
                bytes.extend_from_slice(&code[position..position + instruction.len()]);
                instructions.push(instruction);
                if ends_block(&instruction) {
                    break;
                }
            }
        }
        if straddles_page_end {
            // Fetch the next page only now that an instruction needs it, as the CPU would.
            let consumed = bytes.len() as u64;
            let tail_start = physical + consumed;
            let head_len = (page_end - tail_start) as usize;
            let next_linear = linear + consumed + head_len as u64;
            let next_physical = match self.translate(next_linear, AccessKind::Execute, user) {
                Ok(pa) => pa,
                Err(fault) if instructions.is_empty() => return Err(fault),
                Err(_) => return Ok(self.finish_block(linear, physical, mode, user, instructions, bytes, None)),
            };
            if next_physical + 15 > self.memory.ram_size() {
                return Err(self.unbacked(next_physical));
            }
            let mut window = Vec::with_capacity(15);
            window.extend_from_slice(&self.memory.ram[tail_start as usize..page_end as usize]);
            window
                .extend_from_slice(&self.memory.ram[next_physical as usize..next_physical as usize + (15 - head_len)]);
            let mut decoder = Decoder::with_ip(bitness, &window, rip + consumed, DecoderOptions::NONE);
            let instruction = decoder.decode();
            if !instruction.is_invalid() {
                bytes.extend_from_slice(&window[..instruction.len()]);
                instructions.push(instruction);
                spill_frame = Some(next_physical >> 12);
            }
        }
        if instructions.is_empty() {
            return Err(Fault::Exception { vector: crate::interrupts::UD, error_code: None, address: None });
        }
        Ok(self.finish_block(linear, physical, mode, user, instructions, bytes, spill_frame))
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_block(
        &mut self,
        linear: u64,
        physical: u64,
        mode: CodeMode,
        user: bool,
        instructions: Vec<Instruction>,
        bytes: Vec<u8>,
        spill_frame: Option<u64>,
    ) -> Block {
        let id = self.blocks.next_id;
        self.blocks.next_id += 1;
        let user_page = user || self.is_user_page(linear);
        Block {
            id,
            linear,
            physical,
            mode,
            forms: instructions.iter().map(|instruction| classify(instruction, mode)).collect(),
            chains: instructions.last().is_some_and(|last| {
                matches!(
                    last.flow_control(),
                    FlowControl::ConditionalBranch
                        | FlowControl::UnconditionalBranch
                        | FlowControl::IndirectBranch
                        | FlowControl::Call
                        | FlowControl::IndirectCall
                        | FlowControl::Return
                ) && !matches!(
                    last.mnemonic(),
                    Mnemonic::Retf
                        | Mnemonic::Iret
                        | Mnemonic::Iretd
                        | Mnemonic::Iretq
                        | Mnemonic::Syscall
                        | Mnemonic::Sysret
                        | Mnemonic::Sysretq
                        | Mnemonic::Sysenter
                        | Mnemonic::Sysexit
                        | Mnemonic::Sysexitq
                        | Mnemonic::Int
                        | Mnemonic::Int1
                        | Mnemonic::Int3
                        | Mnemonic::Into
                ) && !last.is_jmp_far()
                    && !last.is_call_far()
                    && !last.is_jmp_far_indirect()
                    && !last.is_call_far_indirect()
            }),
            instructions: instructions.into_boxed_slice(),
            bytes: bytes.into_boxed_slice(),
            spill_frame,
            user_page,
            valid: Cell::new(true),
        }
    }

    fn invalidate_block_key(&mut self, key: &BlockKey) {
        if let Some(block) = self.blocks.blocks.remove(key) {
            block.valid.set(false);
        }
    }

    /// A guest write hit a frame with cached code: drop its blocks and end the current block so the
    /// next instruction is decoded from the new bytes.
    pub(crate) fn invalidate_code_frame(&mut self, frame: u64) {
        if let Some(keys) = self.blocks.by_frame.remove(&frame) {
            for key in keys {
                self.invalidate_block_key(&key);
            }
        }
        self.memory.frame_flags[frame as usize] &= !FRAME_CODE;
        self.end_block = true;
    }

    /// Linear address of a code offset: CS base applies outside 64-bit mode.
    #[inline(always)]
    pub(crate) fn code_linear(&self, offset: u64) -> u64 {
        if self.mode == CodeMode::Bits64 {
            offset
        } else {
            (self.cpu.segments[SegmentRegister::Cs as usize].base + offset) & 0xFFFF_FFFF
        }
    }
}
