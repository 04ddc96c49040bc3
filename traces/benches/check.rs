//! Speed of the invariant checker: `cargo bench -p virtlab-traces --bench check`.
//!
//! Events per second through `check_view` (the pass `virtlab replay` and `virtlab sweep` make over a trace they
//! have open) and through the streaming `check` (`virtlab check`, any size of trace), beside the view's plain loop
//! over the same events: the checker's goal is the decoder's speed, at least 200 M events/s on one core. The trace
//! is synthetic (`virtlab_traces::synth`), a model of a trace's shape; `cargo xtask bench-engines` measures the
//! checker on recorded catalog traces.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtlab_traces::synth::{self, SynthConfig};
use virtlab_traces::{check, check_view, Event, TraceView};

fn checker(c: &mut Criterion) {
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 1, instructions: 100_000_000 }).unwrap();
    let trace = cursor.into_inner();
    let view = TraceView::open(&trace).unwrap();

    let mut group = c.benchmark_group("check");
    group.sample_size(20);
    group.throughput(Throughput::Elements(summary.events));
    group.bench_function("view_loop_events", |b| {
        b.iter(|| {
            let mut blocks = 0u64;
            view.for_each_event(|event| blocks += u64::from(matches!(event, Event::Block(_)))).unwrap();
            black_box(blocks)
        })
    });
    group.bench_function("check_view_events", |b| {
        b.iter(|| {
            let report = check_view(black_box(&view)).unwrap();
            assert_eq!(report.events, summary.events);
            report
        })
    });
    group.bench_function("check_streaming_events", |b| {
        b.iter(|| {
            let report = check(Cursor::new(black_box(&trace))).unwrap();
            assert_eq!(report.events, summary.events);
            report
        })
    });
    group.finish();
}

criterion_group!(benches, checker);
criterion_main!(benches);
