//! `virtlab check`: the invariant checker, on a file of any size.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use virtlab_traces::{check_with_progress, CheckError, Site};

/// Validate a trace before trusting it: container and checksums, payload syntax, block ids and partial blocks,
/// event positions and contexts, block bytes that decode to their instruction counts, the image within RAM, and
/// every total in the header and footer recounted from the events.
///
/// Streams the file (memory: one chunk plus the block table). Exits 0 when the trace is valid, 1 with the first
/// problem otherwise.
#[derive(clap::Args)]
pub struct Args {
    /// The trace file.
    trace: PathBuf,
    /// Print one JSON object: {"valid": true, "events", "blocks", "instructions", "chunks", "file_bytes"} or
    /// {"valid": false, "error", "rule", "offset", "event"} (rule, offset and event are null when not known).
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let path = args.trace.display().to_string();
    let file = File::open(&args.trace).with_context(|| format!("cannot read {path}"))?;
    let file_bytes = file.metadata().with_context(|| format!("cannot read {path}"))?.len();
    // Drawn only on a terminal; a trace that takes seconds to check is tens of megabytes.
    let progress = if file_bytes > 32 << 20 { ProgressBar::new(file_bytes) } else { ProgressBar::hidden() };
    progress.set_style(
        ProgressStyle::with_template("checking {bar:40} {bytes}/{total_bytes} ({eta})").expect("valid template"),
    );
    let result = check_with_progress(BufReader::with_capacity(1 << 20, file), |bytes| progress.set_position(bytes));
    progress.finish_and_clear();
    match result {
        Ok(report) => {
            let text = if args.json {
                json!({"valid": true, "events": report.events, "blocks": report.blocks,
                       "instructions": report.instructions, "chunks": report.chunks, "file_bytes": report.file_bytes})
                .to_string()
            } else {
                format!(
                    "{path}: valid trace ({} events, {} unique blocks, {} instructions, {} chunks, {} bytes)",
                    report.events, report.blocks, report.instructions, report.chunks, report.file_bytes
                )
            };
            super::finish_output(super::print_line(&text))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(CheckError::Malformed(virtlab_traces::TraceError::Io(io))) => {
            Err(anyhow::Error::new(io).context(format!("cannot read {path}")))
        }
        Err(error) => {
            let (rule, offset, event) = match &error {
                CheckError::Violation(v) => {
                    let (offset, event) = match v.site {
                        Site::Event { index, chunk_offset } => (Some(chunk_offset), Some(index)),
                        _ => (None, None),
                    };
                    (Some(v.rule.name()), offset, event)
                }
                CheckError::Malformed(e) => (None, e.offset(), None),
            };
            if args.json {
                let text =
                    json!({"valid": false, "error": error.to_string(), "rule": rule, "offset": offset, "event": event});
                super::finish_output(super::print_line(&text.to_string()))?;
            } else {
                eprintln!("{path}: invalid trace: {error}");
            }
            Ok(ExitCode::from(super::EXIT_INVALID))
        }
    }
}
