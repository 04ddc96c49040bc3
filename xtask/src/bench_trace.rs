//! `cargo xtask bench-trace`: how fast traces are written and read, and how big they are.

use std::io::Cursor;
use std::time::{Duration, Instant};

use crate::timing::fastest;

use anyhow::{ensure, Context};
use virtlab_traces::format::{ChunkKind, CHUNK_HEADER_LEN};
use virtlab_traces::synth::{self, EventHasher, SynthConfig};
use virtlab_traces::{check, Event, EventKind, TraceReader, TraceView};

#[derive(clap::Args)]
pub struct Args {
    /// Instructions per synthetic trace.
    #[arg(long, default_value_t = 200_000_000)]
    instructions: u64,
    /// Seeds of the traces to generate (one row each).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    seeds: Vec<u64>,
    /// Timed repetitions of each read; the fastest is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

fn per_second(count: u64, time: Duration) -> String {
    format!("{:.0} M/s", count as f64 / time.as_secs_f64() / 1e6)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    println!("| trace | instructions | events | block events | file bytes | bytes/instr | write | event chunks: decompress only | view loop (block events) | view cursor (events) | streaming reader (events) | checker (events) | correct |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &seed in &args.seeds {
        let config = SynthConfig { seed, instructions: args.instructions };
        let start = Instant::now();
        let (cursor, summary) =
            synth::write_trace(Cursor::new(Vec::new()), &config).context("writing the synthetic trace")?;
        let write_time = start.elapsed();
        let trace = cursor.into_inner();

        let view = TraceView::open(&trace)?;
        let block_events = view.footer().totals.count(EventKind::Block);

        // Correctness first (untimed): every reader returns exactly the events written.
        let mut hashes = Vec::new();
        let mut hasher = EventHasher::default();
        view.for_each_event(|event| hasher.add(&event))?;
        hashes.push(hasher.finish());
        let mut hasher = EventHasher::default();
        for event in view.events() {
            hasher.add(&event?);
        }
        hashes.push(hasher.finish());
        let mut reader = TraceReader::new(Cursor::new(&trace))?;
        let mut hasher = EventHasher::default();
        while let Some(event) = reader.next_event()? {
            hasher.add(&event);
        }
        hashes.push(hasher.finish());

        // Then speed: open (checksums, block table) plus decompressing and decoding every event, counting them.
        let (loop_time, blocks_seen) = fastest(args.repeat, || {
            let view = TraceView::open(&trace)?;
            let mut blocks = 0u64;
            view.for_each_event(|event| blocks += u64::from(matches!(event, Event::Block(_))))?;
            Ok(blocks)
        })?;
        // The floor under the loop: only decompressing the event chunks.
        let (decompress_time, raw_bytes) = fastest(args.repeat, || {
            let mut scratch = Vec::new();
            let mut raw = 0u64;
            for chunk in view.chunks().iter().filter(|c| c.header.kind == ChunkKind::Events) {
                let start = chunk.offset as usize + CHUNK_HEADER_LEN;
                let stored = &trace[start..start + chunk.header.stored_len as usize];
                raw += chunk.header.raw_payload(stored, &mut scratch, chunk.offset)?.len() as u64;
            }
            Ok(raw)
        })?;
        let (cursor_time, cursor_events) = fastest(args.repeat, || {
            let view = TraceView::open(&trace)?;
            let mut events = 0u64;
            for event in view.events() {
                event?;
                events += 1;
            }
            Ok(events)
        })?;
        let (stream_time, stream_events) = fastest(args.repeat, || {
            let mut reader = TraceReader::new(Cursor::new(&trace))?;
            let mut events = 0u64;
            while reader.next_event()?.is_some() {
                events += 1;
            }
            Ok(events)
        })?;
        let (check_time, report) = fastest(1, || Ok(check(Cursor::new(&trace))?))?;

        let correct = hashes.iter().all(|h| *h == summary.event_hash)
            && blocks_seen == block_events
            && cursor_events == summary.events
            && stream_events == summary.events
            && report.events == summary.events
            && view.footer().totals.instructions == summary.instructions;
        ensure!(correct, "seed {seed}: a reader returned something other than what was written");
        println!(
            "| synth seed={seed} | {} | {} | {} | {} | {:.3} | {} | {:.0} MB/s ({:.2} bytes/event) | {} | {} | {} | {} | {} |",
            summary.instructions,
            summary.events,
            block_events,
            trace.len(),
            trace.len() as f64 / summary.instructions as f64,
            per_second(summary.events, write_time),
            raw_bytes as f64 / decompress_time.as_secs_f64() / 1e6,
            raw_bytes as f64 / summary.events as f64,
            per_second(block_events, loop_time),
            per_second(summary.events, cursor_time),
            per_second(summary.events, stream_time),
            per_second(summary.events, check_time),
            if correct { "yes (event hash, counts)" } else { "NO" },
        );
    }
    Ok(())
}
