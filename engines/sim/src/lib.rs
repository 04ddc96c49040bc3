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
mod mechanism;
pub mod metrics;
mod plan;
pub mod primitive;
pub mod profile;
pub mod protection;
mod replay;
pub mod shadow;
pub mod strategy;
mod tlb;
mod trace;
pub mod translate;

pub use engine::{Engine, EngineError, GuestBits, OptionError, Options, Run, OPTION_KEYS};
pub use engines::bt::NEEDS_LMSLE;
pub use engines::paravirt::MAX_BATCH;
pub use metrics::{
    CycleCause, ExitReason, Finding, Hypercall, MechanismStats, Metrics, ProtectionStats, Site, SiteCause,
};
pub use primitive::Primitive;
pub use profile::{Profile, ProfileError, Provenance};
pub use protection::{Guard, GuestWidth, KernelPlacement, Protection};
pub use trace::PreparedTrace;

use std::sync::Mutex;

type Outcome = Result<Metrics, EngineError>;

/// Replay `trace` on every engine in `engines`, in parallel on the current rayon pool. Each engine's replay is
/// split into one task per events chunk, chained in order; tasks run first-in first-out, so a thread that finishes
/// a chunk moves on to the engine that has waited longest. The engines advance round-robin across the threads and
/// the threads finish within about one chunk of each other, even when seven engines do not divide evenly between
/// two threads. Results come back in the order of `engines` and do not depend on the number of threads.
pub fn replay_many(
    trace: &PreparedTrace,
    engines: &[Box<dyn Engine>],
    profile: &Profile,
    options: &Options,
) -> Vec<Outcome> {
    let chunks = trace.view.event_chunk_count();
    let slots: Vec<Mutex<Option<Outcome>>> = engines.iter().map(|_| Mutex::new(None)).collect();
    rayon::scope_fifo(|scope| {
        for (engine, slot) in engines.iter().zip(&slots) {
            scope.spawn_fifo(move |scope| match engine.start(trace, profile, options) {
                Ok(run) => step(scope, run, 0, chunks, slot),
                Err(error) => deliver(slot, Err(error)),
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("no task panicked").expect("every engine delivered"))
        .collect()
}

fn deliver(slot: &Mutex<Option<Outcome>>, outcome: Outcome) {
    *slot.lock().expect("no task panicked") = Some(outcome);
}

fn step<'s>(
    scope: &rayon::ScopeFifo<'s>,
    mut run: Box<dyn Run + 's>,
    chunk: usize,
    chunks: usize,
    slot: &'s Mutex<Option<Outcome>>,
) {
    if chunk == chunks {
        return deliver(slot, run.finish());
    }
    match run.feed(chunk) {
        Ok(()) => scope.spawn_fifo(move |scope| step(scope, run, chunk + 1, chunks, slot)),
        Err(error) => deliver(slot, Err(error)),
    }
}
