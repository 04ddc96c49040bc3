//! Reading speed of the event stream: `cargo bench -p virtlab-traces --bench read`.
//!
//! The figure that matters is block events per second through `TraceView::for_each_event`, decompression
//! included (the format's target: at least 300 M/s on one core).

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtlab_traces::synth::{self, SynthConfig};
use virtlab_traces::{Event, EventKind, TraceReader, TraceView};

fn read(c: &mut Criterion) {
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 1, instructions: 100_000_000 }).unwrap();
    let trace = cursor.into_inner();
    let view = TraceView::open(&trace).unwrap();
    let block_events = view.footer().totals.count(EventKind::Block);

    let mut group = c.benchmark_group("read");
    group.sample_size(20);
    group.throughput(Throughput::Elements(block_events));
    group.bench_function("view_for_each_block_events", |b| {
        b.iter(|| {
            let view = TraceView::open(black_box(&trace)).unwrap();
            let mut blocks = 0u64;
            view.for_each_event(|event| blocks += u64::from(matches!(event, Event::Block(_)))).unwrap();
            assert_eq!(blocks, block_events);
            blocks
        })
    });
    group.throughput(Throughput::Elements(summary.events));
    group.bench_function("view_cursor_events", |b| {
        b.iter(|| {
            let mut events = 0u64;
            for event in view.events() {
                black_box(event.unwrap());
                events += 1;
            }
            events
        })
    });
    group.bench_function("streaming_reader_events", |b| {
        b.iter(|| {
            let mut reader = TraceReader::new(Cursor::new(black_box(&trace))).unwrap();
            let mut events = 0u64;
            while reader.next_event().unwrap().is_some() {
                events += 1;
            }
            events
        })
    });
    group.finish();
}

criterion_group!(benches, read);
criterion_main!(benches);
