//! virtlab's simulation engines: each replays a recorded native execution under one virtualization strategy and
//! counts what that strategy does on it — exits and traps by reason, translations, hypercalls, shadow faults,
//! holes — and what it costs under a profile of primitive cycle costs.
//!
//! - [`PreparedTrace`]: a trace opened once and decoded once, shared by every engine;
//! - [`Engine`]: the object-safe interface; [`engine::all`] lists the seven engines;
//! - [`Profile`]: primitive costs from TOML (`profiles/`), with strict loading;
//! - [`Metrics`]: the one schema every engine fills;
//! - [`replay_many`]: several engines on one trace in parallel.

pub mod classify;
pub mod engine;
mod engines;
mod fasthash;
pub mod metrics;
pub mod profile;
mod replay;
pub mod shadow;
mod trace;
pub mod translate;

pub use engine::{Engine, EngineError, GuestBits, OptionError, Options, OPTION_KEYS};
pub use engines::bt::NEEDS_LMSLE;
pub use engines::paravirt::MAX_BATCH;
pub use metrics::{CycleCause, ExitReason, Finding, Hypercall, Metrics, Site, SiteCause};
pub use profile::{Profile, ProfileError};
pub use trace::PreparedTrace;

use rayon::prelude::*;

/// Replay `trace` on every engine in `engines`, in parallel on the current rayon pool. Results come back in the
/// order of `engines` and do not depend on the number of threads.
pub fn replay_many(
    trace: &PreparedTrace,
    engines: &[Box<dyn Engine>],
    profile: &Profile,
    options: &Options,
) -> Vec<Result<Metrics, EngineError>> {
    engines.par_iter().map(|engine| engine.replay(trace, profile, options)).collect()
}
