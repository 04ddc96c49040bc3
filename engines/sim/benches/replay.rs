//! Replay speed of each engine: `cargo bench -p virtlab-engines --bench replay`.
//!
//! Guest instructions per second each engine replays on one thread (the design's target: at least 500 M/s per
//! core), profile p4-2006, `bt.lmsle=true`, on a synthetic trace (`virtlab_traces::synth`: a model of a trace's
//! shape, with system calls, page faults, interrupts and address-space switches, not a guest execution). `cargo
//! xtask bench-engines` measures the same on recorded catalog traces.
//!
//! The group `checked_on_one_thread` times what `virtlab replay --engine E --threads 1` does with a trace it has
//! not checked: the checker then the engine (`check_first`), against the two fused in one decoding pass
//! (`fused`, `check_and_replay_many` on a one-thread pool).

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtlab_engines::{check_and_replay_many, engine, Options, PreparedTrace, Profile};
use virtlab_traces::synth::{self, SynthConfig};
use virtlab_traces::{check_view, TraceView};

/// The synthetic trace's bytes and its instruction count.
fn synthetic() -> (Vec<u8>, u64) {
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 1, instructions: 20_000_000 }).unwrap();
    (cursor.into_inner(), summary.instructions)
}

fn lmsle() -> Options {
    let mut options = Options::default();
    options.set("bt.lmsle", "true").unwrap();
    options
}

fn replay(c: &mut Criterion) {
    let (bytes, instructions) = synthetic();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let profile = Profile::load("p4-2006").unwrap();
    let options = lmsle();

    let mut group = c.benchmark_group("replay");
    group.sample_size(10);
    group.throughput(Throughput::Elements(instructions));
    for engine in engine::all() {
        group.bench_function(engine.name(), |b| {
            b.iter(|| {
                let metrics = engine.replay(black_box(&trace), &profile, &options).unwrap();
                assert_eq!(metrics.instructions(), instructions);
                metrics
            })
        });
    }
    group.finish();
}

fn checked_on_one_thread(c: &mut Criterion) {
    let (bytes, instructions) = synthetic();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let profile = Profile::load("p4-2006").unwrap();
    let options = lmsle();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();

    let mut group = c.benchmark_group("checked_on_one_thread");
    group.sample_size(10);
    group.throughput(Throughput::Elements(instructions));
    for name in ["native", "hw-ept"] {
        let engines = vec![engine::by_name(name).unwrap()];
        group.bench_function(format!("{name}/check_first"), |b| {
            b.iter(|| {
                check_view(black_box(&trace.view)).unwrap();
                let metrics = engines[0].replay(&trace, &profile, &options).unwrap();
                assert_eq!(metrics.instructions(), instructions);
                metrics
            })
        });
        group.bench_function(format!("{name}/fused"), |b| {
            b.iter(|| {
                let (mut outcomes, _) =
                    pool.install(|| check_and_replay_many(black_box(&trace), &engines, &profile, &options)).unwrap();
                let metrics = outcomes.pop().unwrap().unwrap();
                assert_eq!(metrics.instructions(), instructions);
                metrics
            })
        });
    }
    group.finish();
}

criterion_group!(benches, replay, checked_on_one_thread);
criterion_main!(benches);
