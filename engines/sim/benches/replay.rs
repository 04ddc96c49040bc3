//! Replay speed of each engine: `cargo bench -p virtlab-engines --bench replay`.
//!
//! Guest instructions per second each engine replays on one thread (the design's target: at least 500 M/s per
//! core), profile p4-2006, `bt.lmsle=true`, on a synthetic trace (`virtlab_traces::synth`: a model of a trace's
//! shape, with system calls, page faults, interrupts and address-space switches, not a guest execution). `cargo
//! xtask bench-engines` measures the same on recorded catalog traces.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtlab_engines::{engine, Options, PreparedTrace, Profile};
use virtlab_traces::synth::{self, SynthConfig};
use virtlab_traces::TraceView;

fn replay(c: &mut Criterion) {
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 1, instructions: 20_000_000 }).unwrap();
    let bytes = cursor.into_inner();
    let trace = PreparedTrace::new(TraceView::open(&bytes).unwrap()).unwrap();
    let profile = Profile::load("p4-2006").unwrap();
    let mut options = Options::default();
    options.set("bt.lmsle", "true").unwrap();

    let mut group = c.benchmark_group("replay");
    group.sample_size(10);
    group.throughput(Throughput::Elements(summary.instructions));
    for engine in engine::all() {
        group.bench_function(engine.name(), |b| {
            b.iter(|| {
                let metrics = engine.replay(black_box(&trace), &profile, &options).unwrap();
                assert_eq!(metrics.instructions(), summary.instructions);
                metrics
            })
        });
    }
    group.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
