//! The block table as readers hold it.

use crate::codec::BlockShape;
use crate::model::{Block, BlockId};

/// Every block defined so far, by id. `shapes` is kept apart from the blocks so the replay loop touches only the
/// eight bytes per block it needs.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    blocks: Vec<Block>,
    shapes: Vec<BlockShape>,
}

impl BlockTable {
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The block with this id. Ids read from a trace are checked on decoding, so they are always in range.
    pub fn get(&self, id: BlockId) -> &Block {
        &self.blocks[id.index()]
    }

    pub fn try_get(&self, id: BlockId) -> Option<&Block> {
        self.blocks.get(id.index())
    }

    /// Instruction count and mode of each block, indexed by id.
    pub fn shapes(&self) -> &[BlockShape] {
        &self.shapes
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (BlockId, &Block)> {
        self.blocks.iter().enumerate().map(|(index, block)| (BlockId(index as u32), block))
    }

    pub(crate) fn push(&mut self, block: Block) {
        self.shapes.push(BlockShape { instructions: block.instructions, mode: block.mode });
        self.blocks.push(block);
    }
}
