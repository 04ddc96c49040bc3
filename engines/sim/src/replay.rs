//! The replay driver every engine shares: one pass over the event stream that keeps the guest's context and the
//! user/kernel instruction split (exactly as the trace's footer counts them), and hands each block execution and
//! each event to the engine's strategy.

use virtlab_traces::{Context, DecodeScratch, Event, PagingMode};

use crate::classify::{BlockFacts, Op, Priced, RepString, StringWork};
use crate::engine::{EngineError, Run};
use crate::metrics::{CycleCause, ExitReason, Metrics};
use crate::profile::{mc, Profile};
use crate::trace::PreparedTrace;

/// What an engine does with block executions and events.
pub(crate) trait Strategy {
    /// One execution of block `block` that retired `executed` instructions (all of them when `full`), in the
    /// context current at its start.
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool);
    /// Any other event. A `Context` event reaches the strategy before the driver updates `r.context`.
    fn event(&mut self, r: &mut Replay, event: &Event);
    /// After the last event: charge what was only counted, report what went wrong.
    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError>;
}

pub(crate) struct Replay<'t, 'a> {
    pub trace: &'t PreparedTrace<'a>,
    pub metrics: Metrics,
    pub context: Context,
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

    pub fn paging(&self) -> bool {
        self.context.paging != PagingMode::Disabled
    }

    pub fn charge(&mut self, cause: CycleCause, millicycles: u64) {
        self.metrics.charge(cause, millicycles);
    }

    pub fn exit(&mut self, reason: ExitReason, at: u32) {
        let site = self.site(at);
        self.metrics.exit(reason, site);
    }

    /// The REP string instruction at `at` of the current block.
    pub fn rep_string(&self, at: u32) -> Option<RepString> {
        self.trace.facts.get(self.current).and_then(|f| f.rep_string_at(at))
    }
}

/// One engine's replay of one trace in progress: the driver's state, the strategy's, and the decoder's buffers.
pub(crate) struct Session<'t, 'a, S> {
    replay: Replay<'t, 'a>,
    strategy: S,
    scratch: DecodeScratch,
}

impl<'t, 'a, S: Strategy> Session<'t, 'a, S> {
    pub fn new(trace: &'t PreparedTrace<'a>, strategy: S) -> Self {
        let initial = Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 };
        let replay = Replay { trace, metrics: Metrics::default(), context: initial, current: 0, retired: 0 };
        Session { replay, strategy, scratch: DecodeScratch::default() }
    }
}

impl<S: Strategy + Send> Run for Session<'_, '_, S> {
    fn feed(&mut self, chunk: usize) -> Result<(), EngineError> {
        let Session { replay: r, strategy, scratch } = self;
        let trace = r.trace;
        trace.view.for_each_event_in_chunk(chunk, scratch, |event| dispatch(r, strategy, event))?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<Metrics, EngineError> {
        self.strategy.finish(&mut self.replay)?;
        Ok(self.replay.metrics)
    }
}

#[inline(always)]
fn dispatch<S: Strategy>(r: &mut Replay, strategy: &mut S, event: Event) {
    match event {
        Event::Block(id) => {
            let block = id.index();
            let executed = r.trace.facts[block].instructions;
            r.retire(block, executed);
            strategy.block(r, block, executed, true);
        }
        Event::PartialBlock { block, executed } => {
            r.retire(block.index(), executed);
            strategy.block(r, block.index(), executed, false);
        }
        Event::Context { at, context } => {
            if context.is_user() != r.context.is_user() {
                // Instructions after `at` ran in the new context but were counted in the old one.
                let moved = u64::from(r.retired.saturating_sub(at.saturating_add(1)));
                let m = &mut r.metrics;
                let (from, to) = if r.context.is_user() {
                    (&mut m.instructions_user, &mut m.instructions_kernel)
                } else {
                    (&mut m.instructions_kernel, &mut m.instructions_user)
                };
                *from = from.saturating_sub(moved);
                *to += moved;
            }
            strategy.event(r, &event);
            r.context = context;
        }
        other => strategy.event(r, &other),
    }
}

impl Replay<'_, '_> {
    #[inline]
    fn retire(&mut self, block: usize, executed: u32) {
        self.current = block;
        self.retired = executed;
        if self.context.is_user() {
            self.metrics.instructions_user += u64::from(executed);
        } else {
            self.metrics.instructions_kernel += u64::from(executed);
        }
    }
}

/// The bare processor's costs in millicycles.
#[derive(Debug, Clone)]
pub(crate) struct NativeCosts {
    pub instruction: u64,
    pub call_return: u64,
    pub divide: u64,
    pub multiply: u64,
    rep_startup: u64,
    /// Millicycles per byte of a REP MOVS or REP STOS of doublewords or quadwords.
    rep_copy_per_byte: u64,
    rep_fill_per_byte: u64,
    /// Millicycles per element of every other REP string instruction.
    rep_element: u64,
    pub syscall: u64,
    pub sysret: u64,
    pub exception: u64,
    pub iret: u64,
    pub mov_to_cr: u64,
    pub invlpg: u64,
    pub tlb_fill: u64,
    pub port_io: u64,
    pub mmio: u64,
    pub cpuid: u64,
    pub msr: u64,
    pub descriptor_load: u64,
    pub hlt: u64,
    mov_from_cr: u64,
    cli_sti: u64,
    popf_pushf: u64,
    rdtsc: u64,
    descriptor_store: u64,
    swapgs: u64,
}

impl NativeCosts {
    pub fn new(profile: &Profile) -> NativeCosts {
        let n = &profile.native;
        NativeCosts {
            instruction: mc(n.cycles_per_instruction),
            call_return: mc(n.call_return),
            divide: mc(n.divide),
            multiply: mc(n.multiply),
            rep_startup: mc(n.rep_startup),
            rep_copy_per_byte: mc(1.0 / n.rep_movs_bytes_per_cycle),
            rep_fill_per_byte: mc(1.0 / n.rep_stos_bytes_per_cycle),
            rep_element: mc(n.rep_element),
            syscall: mc(n.syscall),
            sysret: mc(n.sysret),
            exception: mc(n.exception),
            iret: mc(n.iret),
            mov_to_cr: mc(n.mov_to_cr),
            invlpg: mc(n.invlpg),
            tlb_fill: mc(n.tlb_fill),
            port_io: mc(n.port_io),
            mmio: mc(n.mmio),
            cpuid: mc(n.cpuid),
            msr: mc(n.msr),
            descriptor_load: mc(n.descriptor_load),
            hlt: mc(n.hlt),
            mov_from_cr: mc(n.mov_from_cr),
            cli_sti: mc(n.cli_sti),
            popf_pushf: mc(n.popf_pushf),
            rdtsc: mc(n.rdtsc),
            descriptor_store: mc(n.descriptor_store),
            swapgs: mc(n.swapgs),
        }
    }

    /// The native cost of an operation the trace has no event for, beyond a plain instruction's.
    pub fn static_op(&self, op: Op) -> u64 {
        match op {
            Op::Cli | Op::Sti => self.cli_sti,
            Op::Pushf | Op::Popf => self.popf_pushf,
            Op::MovFromCr(_) => self.mov_from_cr,
            Op::MovDr | Op::CacheFlush | Op::Xsetbv => self.mov_to_cr,
            Op::Sgdt | Op::Sidt | Op::Sldt | Op::Str | Op::Smsw | Op::Lar | Op::Lsl | Op::Verr | Op::Verw => {
                self.descriptor_store
            }
            Op::Rdtsc | Op::Rdpmc => self.rdtsc,
            Op::Swapgs => self.swapgs,
            _ => 0,
        }
    }

    /// Extra cost of an instruction the model prices apart.
    pub fn priced(&self, priced: Priced) -> u64 {
        match priced {
            Priced::CallReturn => self.call_return,
            Priced::Divide => self.divide,
            Priced::Multiply => self.multiply,
        }
    }

    /// One execution of a REP string instruction over `elements` elements: a start-up, then the elements at the
    /// processor's string bandwidth (doubleword and quadword MOVS and STOS) or one by one (everything else).
    pub fn rep_string(&self, rep: RepString, elements: u64) -> u64 {
        let bytes = elements.saturating_mul(u64::from(rep.element_bytes));
        let work = match rep.work {
            StringWork::Copy if rep.element_bytes >= 4 => bytes.saturating_mul(self.rep_copy_per_byte),
            StringWork::Fill if rep.element_bytes >= 4 => bytes.saturating_mul(self.rep_fill_per_byte),
            _ => elements.saturating_mul(self.rep_element),
        };
        self.rep_startup.saturating_add(work)
    }

    /// Charge the REP string instruction behind a `rep_string` event as the bare processor runs it.
    pub fn charge_rep_string(&self, r: &mut Replay, at: u32, elements: u64) {
        if let Some(rep) = r.rep_string(at) {
            r.charge(CycleCause::StringOperations, self.rep_string(rep, elements));
        }
    }

    /// The native cost of the operation behind an event (its own hardware cost, the instruction aside).
    pub fn event(&self, event: &Event) -> u64 {
        match *event {
            Event::Syscall { .. } => self.syscall,
            Event::Sysret { .. } => self.sysret,
            Event::Exception { .. } | Event::Interrupt { .. } | Event::SoftwareInterrupt { .. } => self.exception,
            Event::Iret { .. } => self.iret,
            Event::CrWrite { .. } => self.mov_to_cr,
            Event::MsrRead { .. } | Event::MsrWrite { .. } => self.msr,
            Event::Io { .. } => self.port_io,
            Event::Cpuid { .. } => self.cpuid,
            Event::Invlpg { .. } => self.invlpg,
            Event::DescriptorLoad { .. } => self.descriptor_load,
            Event::Hlt { .. } => self.hlt,
            Event::PageTouch { .. } => self.tlb_fill,
            Event::Mmio { .. } => self.mmio,
            Event::Block(_)
            | Event::PartialBlock { .. }
            | Event::Context { .. }
            | Event::PageTableWrite { .. }
            | Event::RepString { .. } => 0,
        }
    }

    /// Which cycle cause an event's native cost belongs to.
    pub fn event_cause(event: &Event) -> CycleCause {
        match event {
            Event::Io { .. } | Event::Mmio { .. } => CycleCause::Devices,
            Event::PageTouch { .. } => CycleCause::TlbFills,
            Event::RepString { .. } => CycleCause::StringOperations,
            _ => CycleCause::NativeTransitions,
        }
    }
}

/// What an engine does with one execution of an operation the trace has no event for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Nothing to record beyond its cost.
    Silent,
    /// The monitor traps and emulates the instruction.
    Trap(ExitReason),
    /// The guest silently gets a result a native machine would not give (a virtualization hole).
    Hole(&'static str),
    /// The guest can tell it is virtualized (host values, timing).
    Detectable(&'static str),
}

/// One operation's share of a block plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planned {
    pub index: u32,
    pub costs: [(CycleCause, u64); 2],
    pub effect: Effect,
}

/// The precomputed cost and effects of running one block in one mode (user or kernel) under one engine.
#[derive(Debug, Clone)]
pub(crate) struct BlockPlan {
    /// Cost of a full execution, by cause.
    pub costs: Vec<(CycleCause, u64)>,
    /// Operations that record something on each execution.
    pub recorded: Vec<Planned>,
    /// Cost of one plain instruction in this plan, and of each priced class beyond it.
    instruction: u64,
    priced: [u64; 3],
    cause: CycleCause,
    /// Every non-innocuous operation without an event, for partial executions.
    planned: Vec<Planned>,
}

/// How an engine runs plain instructions and event-less operations, from which block plans are built.
pub(crate) trait OpPolicy {
    /// Cost of one plain instruction, and the cause it is charged to.
    fn instruction(&self, kernel: bool) -> (u64, CycleCause);
    /// Extra cost of an instruction the native model prices apart (near CALL and RET, DIV, MUL).
    fn priced(&self, priced: Priced, kernel: bool) -> u64;
    /// Costs (beyond a plain instruction's) and effect of one execution of an event-less operation.
    fn static_op(&self, op: Op, kernel: bool) -> ([(CycleCause, u64); 2], Effect);
}

impl BlockPlan {
    pub fn build(facts: &BlockFacts, kernel: bool, policy: &impl OpPolicy) -> BlockPlan {
        let (instruction, cause) = policy.instruction(kernel);
        let priced = Priced::ALL.map(|p| policy.priced(p, kernel));
        let mut plan =
            BlockPlan { costs: Vec::new(), recorded: Vec::new(), instruction, priced, cause, planned: Vec::new() };
        plan.add(cause, instruction * u64::from(facts.instructions));
        for &(_, class) in &facts.priced {
            plan.add(cause, plan.priced[class as usize]);
        }
        for &(index, op) in &facts.ops {
            if op.has_event() {
                continue;
            }
            let (costs, effect) = policy.static_op(op, kernel);
            let planned = Planned { index, costs, effect };
            for (op_cause, cost) in costs {
                plan.add(op_cause, cost);
            }
            if effect != Effect::Silent {
                plan.recorded.push(planned);
            }
            plan.planned.push(planned);
        }
        plan
    }

    fn add(&mut self, cause: CycleCause, cost: u64) {
        if cost == 0 {
            return;
        }
        match self.costs.iter_mut().find(|(c, _)| *c == cause) {
            Some((_, total)) => *total += cost,
            None => self.costs.push((cause, cost)),
        }
    }

    /// Charge and record `count` full executions.
    fn settle(&self, r: &mut Replay, block: usize, count: u64) {
        for &(cause, cost) in &self.costs {
            r.charge(cause, cost * count);
        }
        for planned in &self.recorded {
            record(r, block, planned, count);
        }
    }

    /// Charge and record one partial execution.
    fn apply_partial(&self, r: &mut Replay, block: usize, executed: u32) {
        let facts = &r.trace.facts[block];
        let priced: u64 =
            facts.priced.iter().filter(|&&(i, _)| i < executed).map(|&(_, class)| self.priced[class as usize]).sum();
        r.charge(self.cause, self.instruction * u64::from(executed) + priced);
        for planned in self.planned.iter().filter(|p| p.index < executed) {
            for (cause, cost) in planned.costs {
                r.charge(cause, cost);
            }
            record(r, block, planned, 1);
        }
    }
}

fn record(r: &mut Replay, block: usize, planned: &Planned, count: u64) {
    let address = r.trace.facts[block].address_of(planned.index);
    match planned.effect {
        Effect::Silent => {}
        Effect::Trap(reason) => {
            r.metrics.exits_at(reason, address, count);
            r.metrics.emulated_instructions += count;
        }
        Effect::Hole(kind) => r.metrics.hole(kind, address, count),
        Effect::Detectable(kind) => r.metrics.detectable(kind, address, count),
    }
}

/// Plans for every block of a trace, user and kernel, and how often each ran in full.
///
/// A full execution's cost and effects are the same every time, so the hot path only counts executions;
/// [`Plans::settle`] charges and records them all at the end. Partial executions are charged as they come.
pub(crate) struct Plans {
    user: Vec<BlockPlan>,
    kernel: Vec<BlockPlan>,
    /// Full executions per block: [user, kernel].
    counts: Vec<[u64; 2]>,
}

impl Plans {
    pub fn build(trace: &PreparedTrace, policy: &impl OpPolicy) -> Plans {
        Plans {
            user: trace.facts.iter().map(|f| BlockPlan::build(f, false, policy)).collect(),
            kernel: trace.facts.iter().map(|f| BlockPlan::build(f, true, policy)).collect(),
            counts: vec![[0; 2]; trace.facts.len()],
        }
    }

    #[inline]
    pub fn apply(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        let kernel = r.kernel();
        if full {
            self.counts[block][usize::from(kernel)] += 1;
        } else if kernel {
            self.kernel[block].apply_partial(r, block, executed);
        } else {
            self.user[block].apply_partial(r, block, executed);
        }
    }

    /// Charge and record the full executions counted so far.
    pub fn settle(&mut self, r: &mut Replay) {
        for (block, counts) in self.counts.iter_mut().enumerate() {
            for (plan, count) in [(&self.user[block], counts[0]), (&self.kernel[block], counts[1])] {
                if count > 0 {
                    plan.settle(r, block, count);
                }
            }
            *counts = [0; 2];
        }
    }
}

/// The exit reason hardware and software monitors give a trapping instruction.
pub(crate) fn exit_reason_of(op: Op) -> ExitReason {
    match op {
        Op::Cli | Op::Sti | Op::Popf | Op::Pushf => ExitReason::InterruptFlag,
        Op::MovToCr(_) | Op::MovFromCr(_) => ExitReason::CrAccess,
        Op::MovDr => ExitReason::DrAccess,
        Op::Lgdt | Op::Lidt | Op::Sgdt | Op::Sidt => ExitReason::GdtrIdtr,
        Op::Lldt | Op::Ltr | Op::Sldt | Op::Str => ExitReason::LdtrTr,
        Op::Smsw => ExitReason::CrAccess,
        Op::Rdmsr => ExitReason::MsrRead,
        Op::Wrmsr => ExitReason::MsrWrite,
        Op::PortIn | Op::PortOut => ExitReason::IoInstruction,
        Op::Hlt => ExitReason::Hlt,
        Op::Invlpg => ExitReason::Invlpg,
        Op::Cpuid => ExitReason::Cpuid,
        Op::Rdtsc => ExitReason::Rdtsc,
        Op::Rdpmc => ExitReason::Rdpmc,
        Op::Swapgs => ExitReason::Swapgs,
        Op::Syscall | Op::Sysret | Op::SoftwareInterrupt => ExitReason::SystemCall,
        Op::Iret => ExitReason::Iret,
        Op::CacheFlush => ExitReason::Wbinvd,
        Op::Xsetbv => ExitReason::Xsetbv,
        Op::Innocuous
        | Op::Lar
        | Op::Lsl
        | Op::Verr
        | Op::Verw
        | Op::ReadCodeOrStackSelector
        | Op::FarTransfer
        | Op::OtherPrivileged => ExitReason::PrivilegedInstruction,
    }
}

/// The hole a deprivileged kernel falls into when it runs a sensitive-unprivileged instruction directly.
pub(crate) fn kernel_hole(op: Op) -> &'static str {
    match op {
        Op::Popf => "popf_ignores_if",
        Op::Pushf => "pushf_reveals_real_if",
        Op::Sgdt => "sgdt_reveals_monitor_gdt",
        Op::Sidt => "sidt_reveals_monitor_idt",
        Op::Sldt => "sldt_reveals_monitor_ldt",
        Op::Str => "str_reveals_monitor_tr",
        Op::Smsw => "smsw_reveals_monitor_cr0",
        Op::Lar | Op::Lsl | Op::Verr | Op::Verw => "segment_check_sees_deprivileged_dpl",
        Op::ReadCodeOrStackSelector => "selector_reveals_deprivileged_cpl",
        _ => "far_transfer_sees_deprivileged_cpl",
    }
}

/// What user mode can observe with a sensitive-unprivileged instruction when the monitor's own tables are loaded
/// (the "red pill").
pub(crate) fn user_detectable(op: Op) -> Option<&'static str> {
    match op {
        Op::Sgdt => Some("sgdt_reveals_monitor_gdt"),
        Op::Sidt => Some("sidt_reveals_monitor_idt"),
        Op::Sldt => Some("sldt_reveals_monitor_ldt"),
        Op::Str => Some("str_reveals_monitor_tr"),
        Op::Smsw => Some("smsw_reveals_monitor_cr0"),
        Op::Lar | Op::Lsl | Op::Verr | Op::Verw => Some("segment_check_sees_deprivileged_dpl"),
        _ => None,
    }
}
