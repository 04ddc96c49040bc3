//! A trace prepared for replay: the zero-copy view plus the decoded facts of every block, computed once and shared
//! by every engine (the value is `Sync`).

use virtlab_traces::{Block, CodeMode, TraceView};

use crate::classify::{BlockFacts, ClassifyError};

pub struct PreparedTrace<'a> {
    pub view: TraceView<'a>,
    pub facts: Vec<BlockFacts>,
}

impl<'a> PreparedTrace<'a> {
    pub fn new(view: TraceView<'a>) -> Result<PreparedTrace<'a>, ClassifyError> {
        let facts = view.blocks().iter().map(|(_, block)| BlockFacts::decode(block)).collect::<Result<_, _>>()?;
        Ok(PreparedTrace { view, facts })
    }

    pub fn block(&self, index: usize) -> &Block {
        self.view.blocks().get(virtlab_traces::BlockId(index as u32))
    }

    /// Whether the guest ran any 64-bit code (long mode).
    pub fn has_64_bit_code(&self) -> bool {
        self.facts.iter().any(|f| f.mode == CodeMode::Bits64)
    }

    /// The guest kernel's width: 64-bit when the guest ran any 64-bit code.
    pub fn width(&self) -> crate::protection::GuestWidth {
        match self.has_64_bit_code() {
            true => crate::protection::GuestWidth::Bits64,
            false => crate::protection::GuestWidth::Bits32,
        }
    }
}
