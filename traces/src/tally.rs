//! The totals a trace's footer states, derived from its events. The writer tallies what it is given; the checker
//! tallies what it reads and compares.

use crate::codec::BlockShape;
use crate::model::{Context, Event, EventKind, GuestModes, Totals};

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub totals: Totals,
    pub modes: GuestModes,
    user: bool,
    /// Instructions the current block execution retired, to move between user and kernel when a context change
    /// happens inside it.
    current_retired: u32,
}

impl Tally {
    /// Counts one event. `shapes` must hold every block the event can name (the caller has checked its id).
    #[inline(always)]
    pub fn observe(&mut self, event: &Event, shapes: &[BlockShape]) {
        match *event {
            Event::Block(id) => self.block(shapes[id.index()]),
            Event::PartialBlock { block, executed } => self.partial(shapes[block.index()], executed),
            Event::Context { at, context } => self.context(at, context),
            ref other => self.other(other.kind()),
        }
    }

    // The pieces of `observe`, for readers that take events apart themselves.

    /// One full execution of a block of this shape.
    #[inline(always)]
    pub fn block(&mut self, shape: BlockShape) {
        self.totals.events[EventKind::Block.index()] += 1;
        self.retire(shape.instructions);
        self.modes.add_code(shape.mode);
    }

    /// One partial execution of a block of this shape, which retired `executed` instructions.
    #[inline(always)]
    pub fn partial(&mut self, shape: BlockShape, executed: u32) {
        self.totals.events[EventKind::PartialBlock.index()] += 1;
        self.retire(executed);
        self.modes.add_code(shape.mode);
    }

    /// A context event.
    #[inline(always)]
    pub fn context(&mut self, at: u32, context: Context) {
        self.totals.events[EventKind::Context.index()] += 1;
        self.modes.add_paging(context.paging);
        if context.is_user() != self.user {
            // Instructions after `at` ran in the new context but were counted in the old one.
            let moved = u64::from(self.current_retired.saturating_sub(at.saturating_add(1)));
            let (from, to) = if self.user {
                (&mut self.totals.instructions_user, &mut self.totals.instructions_kernel)
            } else {
                (&mut self.totals.instructions_kernel, &mut self.totals.instructions_user)
            };
            *from -= moved;
            *to += moved;
            self.user = context.is_user();
        }
    }

    /// An event of any other kind, which only counts.
    #[inline(always)]
    pub fn other(&mut self, kind: EventKind) {
        self.totals.events[kind.index()] += 1;
    }

    #[inline(always)]
    fn retire(&mut self, count: u32) {
        self.current_retired = count;
        let count = u64::from(count);
        self.totals.instructions += count;
        if self.user {
            self.totals.instructions_user += count;
        } else {
            self.totals.instructions_kernel += count;
        }
    }
}
