//! `native`: the recorded execution on the bare processor, the baseline every strategy is compared with. No
//! exits; every cost is the processor's own.

use crate::engine::{Engine, EngineError, Options, Run};
use crate::mechanism::{Monitor, MonitorParts};
use crate::profile::Profile;
use crate::protection::GuestWidth;
use crate::replay::Session;
use crate::strategy::{Disposition, Mechanism, Table};
use crate::trace::PreparedTrace;

pub struct Native;

/// Everything at the processor's own cost.
pub(crate) fn table(_options: &Options) -> Table {
    Table::filled(Disposition::new(Mechanism::Native))
}

impl Engine for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn summary(&self) -> &'static str {
        "the bare processor: every instruction direct, no monitor"
    }

    fn table(&self, options: &Options, _width: GuestWidth) -> Table {
        table(options)
    }

    fn start<'t>(
        &self,
        trace: &'t PreparedTrace<'t>,
        profile: &Profile,
        options: &Options,
    ) -> Result<Box<dyn Run + 't>, EngineError> {
        let monitor = Monitor::new(MonitorParts::default(), profile);
        Ok(Box::new(Session::new(trace, profile, table(options), monitor, None)))
    }
}
