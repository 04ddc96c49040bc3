//! Block plans: the cost and effects of running one block in one mode under one engine, derived once per trace
//! from the engine's table, so that the hot path only counts executions and [`Plans::settle`] charges them at the
//! end.

use crate::classify::{BlockFacts, Op, Priced};
use crate::engines::{exit_reason_of, kernel_hole, user_detectable};
use crate::metrics::CycleCause;
use crate::primitive::Primitive as P;
use crate::replay::{Costs, Replay};
use crate::strategy::{Mechanism, Mode, Subject, Table};
use crate::trace::PreparedTrace;

/// One charge: a cause, the primitive that prices it, millicycles.
pub(crate) type Charge = (CycleCause, P, u64);

/// What running an operation records beyond its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    Silent,
    /// The monitor traps and emulates the instruction.
    Trap(crate::metrics::ExitReason),
    Hole(&'static str),
    Detectable(&'static str),
    /// A segment-register load through the monitor's copy of the descriptor.
    ShadowDescriptorLoad,
}

/// One operation's share of a block plan.
#[derive(Debug, Clone)]
struct Planned {
    index: u32,
    costs: Vec<Charge>,
    effect: Effect,
}

/// The cost of one plain instruction under a mechanism, and of each priced class beyond it.
fn instruction_cost(mechanism: Mechanism, costs: &Costs) -> (Vec<Charge>, [Vec<Charge>; 3]) {
    let native_priced = |priced: Priced| -> Vec<Charge> {
        let primitive = match priced {
            Priced::CallReturn => P::CallReturn,
            Priced::Divide => P::Divide,
            Priced::Multiply => P::Multiply,
        };
        vec![(CycleCause::GuestInstructions, primitive, costs.mc(primitive))]
    };
    match mechanism {
        // The interpreter's per-instruction cost covers a call or return; a division or multiplication it still
        // performs with the host's own instruction.
        Mechanism::Interpreted => (
            vec![(CycleCause::Interpretation, P::Interpret, costs.mc(P::Interpret))],
            [Vec::new(), native_priced(Priced::Divide), native_priced(Priced::Multiply)],
        ),
        _ => (
            vec![(CycleCause::GuestInstructions, P::CyclesPerInstruction, costs.mc(P::CyclesPerInstruction))],
            Priced::ALL.map(native_priced),
        ),
    }
}

/// The native cost of an operation the trace has no event for, beyond a plain instruction's.
pub(crate) fn native_op_cost(op: Op, costs: &Costs) -> Option<Charge> {
    let primitive = match op {
        Op::Cli | Op::Sti => P::CliSti,
        Op::Pushf | Op::Popf => P::PopfPushf,
        Op::MovFromCr(_) => P::MovFromCr,
        Op::MovDr | Op::CacheFlush | Op::Xsetbv => P::MovToCr,
        Op::Sgdt | Op::Sidt | Op::Sldt | Op::Str | Op::Smsw | Op::Lar | Op::Lsl | Op::Verr | Op::Verw => {
            P::DescriptorStore
        }
        Op::Rdtsc | Op::Rdpmc => P::Rdtsc,
        Op::Swapgs => P::Swapgs,
        _ => return None,
    };
    Some((CycleCause::NativeTransitions, primitive, costs.mc(primitive)))
}

/// The costs and effect of an event-less operation under a disposition's mechanism.
fn op_plan(op: Op, mechanism: Mechanism, costs: &Costs) -> (Vec<Charge>, Effect) {
    let native = || native_op_cost(op, costs).into_iter().collect::<Vec<_>>();
    match mechanism {
        Mechanism::Native | Mechanism::GuestMode => (native(), Effect::Silent),
        Mechanism::ShadowDescriptor => (native(), Effect::ShadowDescriptorLoad),
        // A store to memory shared with the hypervisor: a plain instruction, already counted.
        Mechanism::SharedMemory => (Vec::new(), Effect::Silent),
        Mechanism::Detectable(kind) => (native(), Effect::Detectable(kind)),
        Mechanism::Hole(kind) => (native(), Effect::Hole(kind)),
        Mechanism::Trap(reason) => (
            vec![
                (CycleCause::Exits, P::Trap, costs.mc(P::Trap)),
                (CycleCause::Emulation, P::Decode, costs.mc(P::Decode)),
                (CycleCause::Emulation, P::Emulate, costs.mc(P::Emulate)),
            ],
            Effect::Trap(reason),
        ),
        Mechanism::VmExit(reason, _) => {
            let mut charges = costs.vm_exit_round_trip(reason);
            charges.push((CycleCause::Emulation, P::Emulate, costs.mc(P::Emulate)));
            (charges, Effect::Trap(reason))
        }
        // Inside the interpreter every instruction gets its virtual-machine meaning: no hole, no trap.
        _ => (Vec::new(), Effect::Silent),
    }
}

/// The precomputed cost and effects of running one block in one mode.
#[derive(Debug, Clone)]
pub(crate) struct BlockPlan {
    /// Cost of a full execution.
    costs: Vec<Charge>,
    /// Operations that record something on each execution.
    recorded: Vec<Planned>,
    instruction: Vec<Charge>,
    priced: [Vec<Charge>; 3],
    /// Every non-innocuous operation without an event, for partial executions.
    planned: Vec<Planned>,
    /// The monitor interprets every instruction of the block (counted as emulated instructions).
    interprets: bool,
    instructions: u32,
}

impl BlockPlan {
    fn build(facts: &BlockFacts, mode: Mode, table: &Table, costs: &Costs) -> BlockPlan {
        let mechanism = table.get(Subject::Instructions, mode).mechanism;
        let (instruction, priced) = instruction_cost(mechanism, costs);
        let mut plan = BlockPlan {
            costs: Vec::new(),
            recorded: Vec::new(),
            instruction,
            priced,
            planned: Vec::new(),
            interprets: mechanism == Mechanism::Interpreted,
            instructions: facts.instructions,
        };
        for &(cause, primitive, cost) in &plan.instruction.clone() {
            plan.add(cause, primitive, cost * u64::from(facts.instructions));
        }
        for &(_, class) in &facts.priced {
            for &(cause, primitive, cost) in &plan.priced[class as usize].clone() {
                plan.add(cause, primitive, cost);
            }
        }
        for &(index, op) in &facts.ops {
            let Some(subject) = Subject::of_op(op) else { continue };
            let (costs, effect) = op_plan(op, table.get(subject, mode).mechanism, costs);
            // A subject groups instructions; each keeps its own exit reason, hole and finding.
            let effect = match effect {
                Effect::Trap(_) => Effect::Trap(exit_reason_of(op)),
                Effect::Hole(kind) => Effect::Hole(kernel_hole(op).unwrap_or(kind)),
                Effect::Detectable(kind) => Effect::Detectable(user_detectable(op).unwrap_or(kind)),
                other => other,
            };
            for &(cause, primitive, cost) in &costs {
                plan.add(cause, primitive, cost);
            }
            let planned = Planned { index, costs, effect };
            if effect != Effect::Silent {
                plan.recorded.push(planned.clone());
            }
            plan.planned.push(planned);
        }
        plan
    }

    fn add(&mut self, cause: CycleCause, primitive: P, cost: u64) {
        if cost == 0 {
            return;
        }
        match self.costs.iter_mut().find(|(c, p, _)| *c == cause && *p == primitive) {
            Some((_, _, total)) => *total += cost,
            None => self.costs.push((cause, primitive, cost)),
        }
    }

    /// Charge and record `count` full executions.
    fn settle(&self, r: &mut Replay, block: usize, count: u64) {
        if self.interprets {
            r.metrics.emulated_instructions += count * u64::from(self.instructions);
        }
        for &(cause, primitive, cost) in &self.costs {
            r.metrics.charge(cause, primitive, cost * count);
        }
        for planned in &self.recorded {
            record(r, block, planned, count);
        }
    }

    /// Charge and record one partial execution.
    fn apply_partial(&self, r: &mut Replay, block: usize, executed: u32) {
        if self.interprets {
            r.metrics.emulated_instructions += u64::from(executed);
        }
        let facts = &r.trace.facts[block];
        let retired: Vec<(usize, u64)> =
            facts.priced.iter().filter(|&&(i, _)| i < executed).map(|&(_, class)| (class as usize, 1)).collect();
        for &(cause, primitive, cost) in &self.instruction {
            r.metrics.charge(cause, primitive, cost * u64::from(executed));
        }
        for (class, count) in retired {
            for &(cause, primitive, cost) in &self.priced[class] {
                r.metrics.charge(cause, primitive, cost * count);
            }
        }
        for planned in self.planned.iter().filter(|p| p.index < executed) {
            for &(cause, primitive, cost) in &planned.costs {
                r.metrics.charge(cause, primitive, cost);
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
        Effect::ShadowDescriptorLoad => r.metrics.protection.shadow_descriptor_loads += count,
    }
}

/// Plans for every block of a trace, user and kernel, and how often each ran in full.
pub(crate) struct Plans {
    plans: Vec<[BlockPlan; 2]>,
    /// Full executions per block: [kernel, user].
    counts: Vec<[u64; 2]>,
}

impl Plans {
    pub fn build(trace: &PreparedTrace, table: &Table, costs: &Costs) -> Plans {
        Plans {
            plans: trace.facts.iter().map(|f| Mode::ALL.map(|mode| BlockPlan::build(f, mode, table, costs))).collect(),
            counts: vec![[0; 2]; trace.facts.len()],
        }
    }

    #[inline]
    pub fn apply(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        let mode = r.mode() as usize;
        if full {
            self.counts[block][mode] += 1;
        } else {
            self.plans[block][mode].apply_partial(r, block, executed);
        }
    }

    /// Charge and record the full executions counted so far.
    pub fn settle(&mut self, r: &mut Replay) {
        for (block, counts) in self.counts.iter_mut().enumerate() {
            for (mode, count) in counts.iter_mut().enumerate() {
                if *count > 0 {
                    self.plans[block][mode].settle(r, block, *count);
                    *count = 0;
                }
            }
        }
    }
}
