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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use virtlab_traces::{CheckError, CheckReport, ViewChecker};

type Outcome = Result<Metrics, EngineError>;

/// Replay `trace` on every engine in `engines`, in parallel on the current rayon pool. Each engine's replay is
/// split into one task per events chunk, chained in order; tasks run first-in first-out, so a thread that finishes
/// a chunk moves on to the engine that has waited longest. The engines advance round-robin across the threads and
/// the threads finish within about one chunk of each other, even when seven engines do not divide evenly between
/// two threads. Results come back in the order of `engines` and do not depend on the number of threads.
///
/// The trace must have passed the invariant checker; [`check_and_replay_many`] is for one that has not.
pub fn replay_many(
    trace: &PreparedTrace,
    engines: &[Box<dyn Engine>],
    profile: &Profile,
    options: &Options,
) -> Vec<Outcome> {
    let slots: Vec<Mutex<Option<Outcome>>> = engines.iter().map(|_| Mutex::new(None)).collect();
    rayon::scope_fifo(|scope| spawn_engines(scope, trace, engines, profile, options, &slots, None));
    collect(slots)
}

/// [`replay_many`] on a trace the invariant checker has not yet passed. No engine sees an event the checker has not
/// accepted, and the engines' results come back only for a trace the checker accepts whole, its recounted totals
/// included; otherwise the checker's error, and no engine goes past the chunk where it was found.
///
/// On two threads or more the checker goes through the events chunks as one more chain of tasks in the same pool,
/// ahead of the engines: an engine replays a chunk only once the checker has passed it, so the checking overlaps
/// the replays instead of coming before them. On one thread there is nothing to overlap with, so the checker is
/// fused with the first engine that starts: one decoding pass over each chunk runs the rules on every event and
/// hands it on to that engine (the other engines, if any, follow chunk by chunk).
pub fn check_and_replay_many(
    trace: &PreparedTrace,
    engines: &[Box<dyn Engine>],
    profile: &Profile,
    options: &Options,
) -> Result<(Vec<Outcome>, CheckReport), CheckError> {
    let checker = ViewChecker::new(&trace.view)?;
    if rayon::current_num_threads() == 1 {
        return check_fused(checker, trace, engines, profile, options);
    }
    let gate = CheckGate { checked: AtomicUsize::new(0), failed: AtomicBool::new(false) };
    let verdict = Mutex::new(None);
    let slots: Vec<Mutex<Option<Outcome>>> = engines.iter().map(|_| Mutex::new(None)).collect();
    rayon::scope_fifo(|scope| {
        let (gate, verdict) = (&gate, &verdict);
        scope.spawn_fifo(move |scope| check_step(scope, checker, gate, verdict));
        spawn_engines(scope, trace, engines, profile, options, &slots, Some(gate));
    });
    let report = verdict.into_inner().expect("no task panicked").expect("the checker delivered")?;
    Ok((collect(slots), report))
}

/// [`check_and_replay_many`] on one thread: the checker's pass carries the first engine that started.
fn check_fused(
    mut checker: ViewChecker,
    trace: &PreparedTrace,
    engines: &[Box<dyn Engine>],
    profile: &Profile,
    options: &Options,
) -> Result<(Vec<Outcome>, CheckReport), CheckError> {
    let mut runs: Vec<Result<Box<dyn Run>, EngineError>> =
        engines.iter().map(|engine| engine.start(trace, profile, options)).collect();
    let carrier = runs.iter().position(Result::is_ok);
    loop {
        let chunk = checker.chunks_checked();
        let more = match carrier.and_then(|index| runs[index].as_mut().ok()) {
            Some(run) => run.feed_checked(&mut checker)?,
            None => checker.check_next_chunk()?,
        };
        if !more {
            break;
        }
        for (index, slot) in runs.iter_mut().enumerate() {
            if Some(index) == carrier {
                continue;
            }
            if let Ok(run) = slot {
                if let Err(error) = run.feed(chunk) {
                    *slot = Err(error);
                }
            }
        }
    }
    let report = checker.finish()?;
    Ok((runs.into_iter().map(|run| run.and_then(|run| run.finish())).collect(), report))
}

/// How far the checker has come: engines wait for it.
struct CheckGate {
    /// Events chunks the checker has passed.
    checked: AtomicUsize,
    /// The checker found a violation: the engines stop.
    failed: AtomicBool,
}

fn check_step<'s>(
    scope: &rayon::ScopeFifo<'s>,
    mut checker: ViewChecker<'s, '_>,
    gate: &'s CheckGate,
    verdict: &'s Mutex<Option<Result<CheckReport, CheckError>>>,
) {
    let outcome = match checker.check_next_chunk() {
        Ok(true) => {
            gate.checked.store(checker.chunks_checked(), Ordering::Release);
            return scope.spawn_fifo(move |scope| check_step(scope, checker, gate, verdict));
        }
        Ok(false) => checker.finish(),
        Err(error) => Err(error),
    };
    gate.failed.store(outcome.is_err(), Ordering::Release);
    *verdict.lock().expect("no task panicked") = Some(outcome);
}

fn spawn_engines<'s>(
    scope: &rayon::ScopeFifo<'s>,
    trace: &'s PreparedTrace,
    engines: &'s [Box<dyn Engine>],
    profile: &'s Profile,
    options: &'s Options,
    slots: &'s [Mutex<Option<Outcome>>],
    gate: Option<&'s CheckGate>,
) {
    let chunks = trace.view.event_chunk_count();
    for (engine, slot) in engines.iter().zip(slots) {
        scope.spawn_fifo(move |scope| match engine.start(trace, profile, options) {
            Ok(run) => step(scope, run, 0, chunks, slot, gate),
            Err(error) => deliver(slot, Err(error)),
        });
    }
}

fn collect(slots: Vec<Mutex<Option<Outcome>>>) -> Vec<Outcome> {
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
    gate: Option<&'s CheckGate>,
) {
    if chunk == chunks {
        return deliver(slot, run.finish());
    }
    if let Some(checker) = gate {
        if checker.failed.load(Ordering::Acquire) {
            return;
        }
        if checker.checked.load(Ordering::Acquire) <= chunk {
            // Ahead of the checker: run some other pending task (the checker's next chunk, wherever it waits) and
            // come back later, at the back of the queue. On one thread the checker's task is ahead in the queue.
            // With nothing pending (the checker is running on another thread), give the core away rather than spin.
            if let Some(rayon::Yield::Idle) = rayon::yield_now() {
                std::thread::yield_now();
            }
            return scope.spawn_fifo(move |scope| step(scope, run, chunk, chunks, slot, gate));
        }
    }
    match run.feed(chunk) {
        Ok(()) => scope.spawn_fifo(move |scope| step(scope, run, chunk + 1, chunks, slot, gate)),
        Err(error) => deliver(slot, Err(error)),
    }
}
