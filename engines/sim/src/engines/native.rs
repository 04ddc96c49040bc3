//! `native`: the recorded execution on the bare processor, the baseline every strategy is compared with. No
//! exits; every cost is the processor's own.

use virtlab_traces::Event;

use crate::classify::{Op, Priced};
use crate::engine::{Engine, EngineError, Options, Run};
use crate::metrics::CycleCause;
use crate::profile::Profile;
use crate::replay::{Effect, NativeCosts, OpPolicy, Plans, Replay, Session, Strategy};
use crate::trace::PreparedTrace;

pub struct Native;

impl Engine for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn summary(&self) -> &'static str {
        "the bare processor: every instruction direct, no monitor"
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        _options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let native = NativeCosts::new(profile);
        let plans = Plans::build(trace, &NativePolicy(&native));
        Ok(Box::new(Session::new(trace, NativeRun { native, plans })))
    }
}

/// Plain instructions and event-less operations at the processor's own cost; also the policy other engines use
/// for code they run directly.
pub(crate) struct NativePolicy<'a>(pub &'a NativeCosts);

impl OpPolicy for NativePolicy<'_> {
    fn instruction(&self, _kernel: bool) -> (u64, CycleCause) {
        (self.0.instruction, CycleCause::GuestInstructions)
    }

    fn priced(&self, priced: Priced, _kernel: bool) -> u64 {
        self.0.priced(priced)
    }

    fn static_op(&self, op: Op, _kernel: bool) -> ([(CycleCause, u64); 2], Effect) {
        ([(CycleCause::NativeTransitions, self.0.static_op(op)), (CycleCause::NativeTransitions, 0)], Effect::Silent)
    }
}

struct NativeRun {
    native: NativeCosts,
    plans: Plans,
}

impl Strategy for NativeRun {
    fn block(&mut self, r: &mut Replay, block: usize, executed: u32, full: bool) {
        self.plans.apply(r, block, executed, full);
    }

    fn event(&mut self, r: &mut Replay, event: &Event) {
        match *event {
            Event::RepString { at, elements } => self.native.charge_rep_string(r, at, elements),
            _ => r.charge(NativeCosts::event_cause(event), self.native.event(event)),
        }
    }

    fn finish(&mut self, r: &mut Replay) -> Result<(), EngineError> {
        self.plans.settle(r);
        Ok(())
    }
}
