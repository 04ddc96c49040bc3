//! The totals a trace's footer states, derived from its events. The writer tallies what it is given; the checker
//! tallies what it reads and compares.

use crate::codec::BlockShape;
use crate::model::{Event, GuestModes, Totals};

#[derive(Debug, Default, Clone)]
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
    #[inline]
    pub fn observe(&mut self, event: &Event, shapes: &[BlockShape]) {
        self.totals.events[event.kind().index()] += 1;
        match *event {
            Event::Block(id) => {
                let shape = shapes[id.index()];
                self.retire(shape.instructions);
                self.modes.add_code(shape.mode);
            }
            Event::PartialBlock { block, executed } => {
                self.retire(executed);
                self.modes.add_code(shapes[block.index()].mode);
            }
            Event::Context { at, context } => {
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
            _ => {}
        }
    }

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
