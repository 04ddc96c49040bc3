//! The replay driver every engine shares: one pass over the event stream that keeps the guest's context and the
//! user/kernel instruction split (exactly as the trace's footer counts them), looks each block and event up in
//! the engine's strategy table, and carries out the disposition: the mechanism's charges from the profile
//! ([`crate::mechanism`]) and the actions on the monitor's state.

use virtlab_traces::{BlockId, CheckError, CheckedEvents, Context, DecodeScratch, Event, PagingMode, ViewChecker};

use crate::classify::RepString;
use crate::engine::{EngineError, Run};
use crate::mechanism::Monitor;
use crate::metrics::{CycleCause, ExitReason, Metrics};
use crate::plan::{Charge, Plans};
use crate::primitive::Primitive as P;
use crate::profile::Profile;
use crate::strategy::{Mode, Subject, Table};
use crate::trace::PreparedTrace;

/// A profile's primitives as engines add them up: millicycles (flags and counts as given).
#[derive(Debug, Clone)]
pub(crate) struct Costs {
    mc: Vec<u64>,
    values: Vec<f64>,
}

impl Costs {
    pub fn new(profile: &Profile) -> Costs {
        Costs {
            mc: P::ALL.iter().map(|&p| profile.mc(p)).collect(),
            values: P::ALL.iter().map(|&p| profile.get(p)).collect(),
        }
    }

    #[inline]
    pub fn mc(&self, primitive: P) -> u64 {
        self.mc[primitive as usize]
    }

    pub fn flag(&self, primitive: P) -> bool {
        self.values[primitive as usize] != 0.0
    }

    /// Millicycles per byte of a string bandwidth primitive.
    pub fn per_byte(&self, rate: P) -> u64 {
        crate::profile::mc(1.0 / self.values[rate as usize])
    }

    /// A VM exit and entry with the VMCS accesses every handler makes and those of an emulating handler of
    /// `reason` (the static part of an exit: see [`crate::mechanism`] for the rest).
    pub fn vm_exit_round_trip(&self, reason: ExitReason) -> Vec<Charge> {
        let (reads, writes) = crate::engines::hw::vmcs_accesses(reason, crate::strategy::Handling::Emulate);
        vec![
            (CycleCause::Exits, P::Exit, self.mc(P::Exit)),
            (CycleCause::Exits, P::Entry, self.mc(P::Entry)),
            (CycleCause::Exits, P::Vmread, self.mc(P::Vmread) * reads),
            (CycleCause::Exits, P::Vmwrite, self.mc(P::Vmwrite) * writes),
        ]
    }
}

pub(crate) struct Replay<'t, 'a> {
    pub trace: &'t PreparedTrace<'a>,
    pub metrics: Metrics,
    pub context: Context,
    pub costs: Costs,
    /// The block execution events belong to, and how many instructions it retired.
    current: usize,
    retired: u32,
}

impl<'t, 'a> Replay<'t, 'a> {
    /// Guest address of instruction `at` of the current block.
    pub fn site(&self, at: u32) -> u64 {
        self.trace.facts.get(self.current).map_or(0, |f| f.address_of(at))
    }

    pub fn kernel(&self) -> bool {
        !self.context.is_user()
    }

    pub fn mode(&self) -> Mode {
        if self.context.is_user() {
            Mode::User
        } else {
            Mode::Kernel
        }
    }

    pub fn paging(&self) -> bool {
        self.context.paging != PagingMode::Disabled
    }

    /// Levels of a full walk in the current paging mode.
    pub fn paging_depth(&self) -> u8 {
        match self.context.paging {
            PagingMode::Disabled => 0,
            PagingMode::TwoLevel => 2,
            PagingMode::Pae => 3,
            PagingMode::FourLevel => 4,
            PagingMode::FiveLevel => 5,
        }
    }

    /// Charge `times` the primitive to `cause`.
    #[inline]
    pub fn pay(&mut self, cause: CycleCause, primitive: P, times: u64) {
        let mc = self.costs.mc(primitive) * times;
        self.metrics.charge(cause, primitive, mc);
    }

    pub fn exit(&mut self, reason: ExitReason, at: u32) {
        let site = self.site(at);
        self.metrics.exit(reason, site);
    }

    /// The REP string instruction at `at` of the current block.
    pub fn rep_string(&self, at: u32) -> Option<RepString> {
        self.trace.facts.get(self.current).and_then(|f| f.rep_string_at(at))
    }

    /// The block running now.
    pub fn current_block(&self) -> usize {
        self.current
    }
}

/// Kernel blocks an engine runs its own way (binary translation's translation cache).
pub(crate) trait KernelCode: Send {
    /// One kernel block execution; charges what the engine's code for it costs.
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool);
    /// A traced page-table write at `at` of the current block: true when the code the engine runs for the
    /// writing instruction handled it without a trap (charged already).
    fn traced_write(&mut self, r: &mut Replay, at: u32) -> bool;
    /// A context change, an exception or an interrupt: control no longer flows straight between kernel blocks.
    fn interrupted(&mut self);
    /// After the last event.
    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError>;
}

/// One engine's replay of one trace in progress: the driver's state, the table and its plans, the monitor's
/// state, and the decoder's buffers.
pub(crate) struct Session<'t, 'a> {
    replay: Replay<'t, 'a>,
    table: Table,
    plans: Plans,
    monitor: Monitor,
    kernel_code: Option<Box<dyn KernelCode + 't>>,
    scratch: DecodeScratch,
}

impl<'t, 'a> Session<'t, 'a> {
    pub fn new(
        trace: &'t PreparedTrace<'a>,
        profile: &Profile,
        table: Table,
        monitor: Monitor,
        kernel_code: Option<Box<dyn KernelCode + 't>>,
    ) -> Self {
        let initial = Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 };
        let costs = Costs::new(profile);
        let plans = Plans::build(trace, &table, &costs);
        let mut metrics = Metrics::default();
        let protection = monitor.protection();
        metrics.protection.kernel_ring = protection.kernel_ring();
        metrics.protection.monitor_base = protection.monitor_base();
        let replay = Replay { trace, metrics, context: initial, costs, current: 0, retired: 0 };
        Session { replay, table, plans, monitor, kernel_code, scratch: DecodeScratch::default() }
    }
}

impl<'t, 'a> Session<'t, 'a> {
    /// What the session does with each event, and the decoder's buffers for the chunks it decodes itself.
    #[inline(always)]
    fn consumer(&mut self) -> (Consumer<'_, 't, 'a>, &mut DecodeScratch) {
        let Session { replay, table, plans, monitor, kernel_code, scratch } = self;
        (Consumer { r: replay, table, plans, monitor, kernel_code }, scratch)
    }
}

/// A session's state as its event loop takes it apart: whichever loop decodes the events (the session's own, or
/// the checker's) calls into this.
struct Consumer<'s, 't, 'a> {
    r: &'s mut Replay<'t, 'a>,
    table: &'s Table,
    plans: &'s mut Plans,
    monitor: &'s mut Monitor,
    kernel_code: &'s mut Option<Box<dyn KernelCode + 't>>,
}

impl Consumer<'_, '_, '_> {
    #[inline(always)]
    fn full_block(&mut self, block: usize) {
        let executed = self.r.trace.facts[block].instructions;
        block_execution(self.r, self.plans, self.monitor, self.kernel_code, block, executed, true);
    }

    /// One event. `OTHERS_INLINE` false keeps everything but block executions behind one call, for the loop that
    /// inlines this; true inlines them too, for a caller that is itself out of line.
    #[inline(always)]
    fn take<const OTHERS_INLINE: bool>(&mut self, event: Event) {
        match event {
            Event::Block(id) => self.full_block(id.index()),
            Event::PartialBlock { block, executed } => {
                block_execution(self.r, self.plans, self.monitor, self.kernel_code, block.index(), executed, false)
            }
            other if OTHERS_INLINE => event_of(self.r, self.table, self.monitor, self.kernel_code, &other),
            other => self.not_a_block(&other),
        }
    }

    #[inline(never)]
    fn not_a_block(&mut self, event: &Event) {
        event_of(self.r, self.table, self.monitor, self.kernel_code, event);
    }
}

impl CheckedEvents for Consumer<'_, '_, '_> {
    #[inline(always)]
    fn block(&mut self, id: BlockId) {
        self.full_block(id.index());
    }

    // Out of line, as one call: the loop it shares with the checker's rules keeps their state in registers.
    #[inline(never)]
    fn event(&mut self, event: Event) {
        self.take::<true>(event);
    }
}

impl Run for Session<'_, '_> {
    fn feed(&mut self, chunk: usize) -> Result<(), EngineError> {
        let view = &self.replay.trace.view;
        let (mut consumer, scratch) = self.consumer();
        view.for_each_event_in_chunk(chunk, scratch, move |event| consumer.take::<false>(event))?;
        Ok(())
    }

    fn feed_checked(&mut self, checker: &mut ViewChecker) -> Result<bool, CheckError> {
        checker.check_next_chunk_into(&mut self.consumer().0)
    }

    fn finish(mut self: Box<Self>) -> Result<Metrics, EngineError> {
        let Session { replay: r, plans, monitor, kernel_code, .. } = &mut *self;
        if let Some(code) = kernel_code.as_mut() {
            code.finish(r)?;
        }
        plans.settle(r);
        monitor.finish(r);
        Ok(std::mem::take(&mut self.replay.metrics))
    }
}

#[inline(always)]
fn block_execution(
    r: &mut Replay,
    plans: &mut Plans,
    monitor: &mut Monitor,
    kernel_code: &mut Option<Box<dyn KernelCode + '_>>,
    block: usize,
    executed: u32,
    full: bool,
) {
    r.current = block;
    r.retired = executed;
    if r.context.is_user() {
        r.metrics.instructions_user += u64::from(executed);
    } else {
        r.metrics.instructions_kernel += u64::from(executed);
    }
    monitor.executed(r, block);
    match kernel_code {
        Some(code) if r.kernel() => code.block(r, block, executed, full),
        _ => plans.apply(r, block, executed, full),
    }
}

// Inlined into the one call out of the event loop (`Consumer::not_a_block`, `CheckedEvents::event`).
#[inline(always)]
fn event_of(
    r: &mut Replay,
    table: &Table,
    monitor: &mut Monitor,
    kernel_code: &mut Option<Box<dyn KernelCode + '_>>,
    event: &Event,
) {
    let user_before = r.context.is_user();
    if let Event::Context { at, context } = *event {
        if context.is_user() != user_before {
            // Instructions after `at` ran in the new context but were counted in the old one.
            let moved = u64::from(r.retired.saturating_sub(at.saturating_add(1)));
            let m = &mut r.metrics;
            let (from, to) = if user_before {
                (&mut m.instructions_user, &mut m.instructions_kernel)
            } else {
                (&mut m.instructions_kernel, &mut m.instructions_user)
            };
            *from = from.saturating_sub(moved);
            *to += moved;
        }
    }
    if matches!(event, Event::Context { .. } | Event::Exception { .. } | Event::Interrupt { .. }) {
        if let Some(code) = kernel_code.as_mut() {
            code.interrupted();
        }
    }
    if let Some(subject) = Subject::of_event(event, user_before) {
        let disposition = table.get(subject, r.mode());
        monitor.apply(r, disposition, event, kernel_code);
    }
    if let Event::Context { context, .. } = *event {
        monitor.context(&context);
        r.context = context;
    }
}
