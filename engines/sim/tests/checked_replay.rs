//! `check_and_replay_many`: the checker going through the chunks ahead of the engines (two threads or more) or fused
//! with one of them (one thread) gives the engines' results and the checker's report exactly as checking first and
//! replaying after, on any number of threads; and a trace the checker refuses, in its last chunk or in its totals,
//! gives the checker's error, not results.

use std::io::Cursor;

use virtlab_engines::{check_and_replay_many, engine, replay_many, Metrics, Options, PreparedTrace, Profile};
use virtlab_traces::format::{join_stored, split_chunks, ChunkKind};
use virtlab_traces::synth::{self, SynthConfig};
use virtlab_traces::{check_view, CheckError, TraceView};

/// A synthetic trace of several events chunks.
fn trace_bytes() -> Vec<u8> {
    let config = SynthConfig { seed: 7, instructions: 12_000_000 };
    synth::write_trace(Cursor::new(Vec::new()), &config).unwrap().0.into_inner()
}

fn lmsle() -> Options {
    let mut options = Options::default();
    options.set("bt.lmsle", "true").unwrap();
    options
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

fn checked(bytes: &[u8], threads: usize) -> Result<Vec<Metrics>, CheckError> {
    let trace = PreparedTrace::new(TraceView::open(bytes).unwrap()).unwrap();
    let (profile, engines) = (Profile::load("p4-2006").unwrap(), engine::all());
    let (outcomes, report) = pool(threads).install(|| check_and_replay_many(&trace, &engines, &profile, &lmsle()))?;
    assert_eq!(report, check_view(&trace.view).unwrap());
    Ok(outcomes.into_iter().map(Result::unwrap).collect())
}

#[test]
fn checking_alongside_gives_what_checking_first_gives_on_any_thread_count() {
    let bytes = trace_bytes();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    assert!(trace.view.event_chunk_count() >= 3, "the test needs several chunks: {}", trace.view.event_chunk_count());
    let (profile, engines) = (Profile::load("p4-2006").unwrap(), engine::all());
    let first: Vec<Metrics> =
        pool(1).install(|| replay_many(&trace, &engines, &profile, &lmsle())).into_iter().map(Result::unwrap).collect();
    assert!(first.iter().all(|m| m.instructions() == trace.view.footer().totals.instructions));
    for threads in [1, 2, 3] {
        assert_eq!(checked(&bytes, threads).unwrap(), first, "{threads} threads");
    }
}

/// The trace with every chunk stored and `edit` applied to its chunks.
fn damaged(edit: impl FnOnce(&mut Vec<virtlab_traces::format::RawChunk>)) -> Vec<u8> {
    let (preamble, mut chunks) = split_chunks(&trace_bytes()).unwrap();
    edit(&mut chunks);
    join_stored(&preamble, &chunks)
}

fn check_error(bytes: &[u8]) -> String {
    check_view(&TraceView::open(bytes).unwrap()).unwrap_err().to_string()
}

#[test]
fn a_trace_refused_in_its_last_events_chunk_gives_the_checkers_error() {
    let bytes = damaged(|chunks| {
        let last = chunks.iter().rposition(|c| c.kind == ChunkKind::Events.code()).unwrap();
        let raw = &mut chunks[last].raw;
        raw.truncate(raw.len() - 3);
    });
    let expected = check_error(&bytes);
    assert!(expected.contains("events"), "{expected}");
    for threads in [1, 2] {
        assert_eq!(checked(&bytes, threads).unwrap_err().to_string(), expected, "{threads} threads");
    }
}

#[test]
fn a_trace_whose_totals_do_not_add_up_gives_the_checkers_error() {
    // The header's payload opens with the instruction and event totals, little-endian u64s.
    let bytes = damaged(|chunks| {
        let header = chunks.iter_mut().find(|c| c.kind == ChunkKind::Header.code()).unwrap();
        let events = u64::from_le_bytes(header.raw[8..16].try_into().unwrap());
        header.raw[8..16].copy_from_slice(&(events + 1).to_le_bytes());
    });
    let expected = check_error(&bytes);
    assert!(expected.contains("header event total"), "{expected}");
    for threads in [1, 2] {
        assert_eq!(checked(&bytes, threads).unwrap_err().to_string(), expected, "{threads} threads");
    }
}

/// On one thread the checker runs fused with the first engine that starts. When that is not the first engine (bt
/// refuses a 64-bit guest without `bt.lmsle`), the next one carries it, and the refusal still comes back in its
/// place; with no engine started at all, the checker runs alone.
#[test]
fn an_engine_that_cannot_start_leaves_the_checking_to_the_next() {
    let bytes = trace_bytes();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let profile = Profile::load("p4-2006").unwrap();
    let by_name = |names: &[&str]| -> Vec<_> { names.iter().map(|n| engine::by_name(n).unwrap()).collect() };
    let engines = by_name(&["bt", "hw-ept", "native"]);
    let options = Options::default();
    let outcomes = |threads: usize| {
        let (outcomes, report) =
            pool(threads).install(|| check_and_replay_many(&trace, &engines, &profile, &options)).unwrap();
        assert_eq!(report, check_view(&trace.view).unwrap());
        outcomes
    };
    let (fused, pipelined) = (outcomes(1), outcomes(2));
    let refusal =
        |outcome: &Result<Metrics, virtlab_engines::EngineError>| outcome.as_ref().map(|_| ()).unwrap_err().to_string();
    assert_eq!(refusal(&fused[0]), virtlab_engines::NEEDS_LMSLE);
    assert_eq!(refusal(&pipelined[0]), virtlab_engines::NEEDS_LMSLE);
    for (one, two) in fused[1..].iter().zip(&pipelined[1..]) {
        let (one, two) = (one.as_ref().unwrap(), two.as_ref().unwrap());
        assert_eq!(one, two);
        assert_eq!(one.instructions(), trace.view.footer().totals.instructions);
    }

    let none = by_name(&["bt"]);
    let (outcomes, report) = pool(1).install(|| check_and_replay_many(&trace, &none, &profile, &options)).unwrap();
    assert_eq!(report, check_view(&trace.view).unwrap());
    assert_eq!(refusal(&outcomes[0]), virtlab_engines::NEEDS_LMSLE);
}
