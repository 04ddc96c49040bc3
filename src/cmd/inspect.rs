//! `virtlab inspect`: what a trace holds, in one screen or one JSON object.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Value};
use virtlab_traces::format::ChunkKind;
use virtlab_traces::{EndReason, EventKind, TraceView};

/// Summarize a trace: instructions retired (user and kernel), unique blocks, events by kind, size on disk, how
/// the guest ended and what it printed.
///
/// Reads the header, the block table and the footer; it does not decode the event stream (use `check` to verify
/// that the totals it shows match the events).
#[derive(clap::Args)]
pub struct Args {
    /// The trace file.
    trace: PathBuf,
    /// Print one JSON object instead of text (keys: format_version, workload, params, recorder, symbols (the
    /// functions the trace names), instructions,
    /// instructions_user, instructions_kernel, blocks, events, events_total, file_bytes, bytes_per_instruction,
    /// end_reason, complete, exit_status, end_detail, serial, state_digest, guest_modes, sections).
    #[arg(long)]
    json: bool,
}

/// Chunks, stored bytes and raw bytes of one kind of section.
#[derive(Default)]
struct SectionSize {
    chunks: u64,
    stored: u64,
    raw: u64,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let bytes = super::read_file(&args.trace)?;
    let view = TraceView::open(&bytes).with_context(|| format!("{} is not a readable trace", args.trace.display()))?;
    let summary = summarize(&view, &args.trace.display().to_string());
    let text = if args.json { serde_json::to_string_pretty(&summary)? } else { render_text(&summary) };
    super::finish_output(super::print_line(&text))?;
    Ok(ExitCode::SUCCESS)
}

fn section_name(kind: ChunkKind) -> String {
    match kind {
        ChunkKind::Optional(code) => format!("optional_{code:02x}"),
        other => other.to_string(),
    }
}

fn summarize(view: &TraceView<'_>, file: &str) -> Value {
    let header = view.header();
    let footer = view.footer();
    let totals = &footer.totals;
    let events: serde_json::Map<String, Value> =
        EventKind::ALL.iter().map(|kind| (kind.name().to_string(), json!(totals.count(*kind)))).collect();
    let params: BTreeMap<&str, &str> =
        header.metadata.params.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
    // In file order: header, image, blocks and events, footer.
    let mut sections: Vec<(String, SectionSize)> = Vec::new();
    for chunk in view.chunks() {
        let name = section_name(chunk.header.kind);
        let index = match sections.iter().position(|(known, _)| *known == name) {
            Some(index) => index,
            None => {
                sections.push((name, SectionSize::default()));
                sections.len() - 1
            }
        };
        let size = &mut sections[index].1;
        size.chunks += 1;
        size.stored += chunk.total_len();
        size.raw += u64::from(chunk.header.raw_len);
    }
    let sections: serde_json::Map<String, Value> = sections
        .into_iter()
        .map(|(name, size)| (name, json!({"chunks": size.chunks, "stored_bytes": size.stored, "raw_bytes": size.raw})))
        .collect();
    let complete = footer.is_complete();
    json!({
        "file": file,
        "format_version": view.version().to_string(),
        "workload": header.metadata.workload,
        "params": params,
        "recorder": header.metadata.recorder,
        "recorder_version": header.metadata.recorder_version,
        "symbols": header.metadata.symbols.symbols().len(),
        "guest_modes": header.modes.names(),
        "instructions": totals.instructions,
        "instructions_user": totals.instructions_user,
        "instructions_kernel": totals.instructions_kernel,
        "blocks": totals.blocks,
        "events": events,
        "events_total": totals.events_total(),
        "file_bytes": view.file_len(),
        "bytes_per_instruction": if totals.instructions == 0 { Value::Null } else { json!(view.file_len() as f64 / totals.instructions as f64) },
        "end_reason": footer.ending.reason.name(),
        "complete": complete,
        "exit_status": if footer.ending.reason == EndReason::GuestExit { json!(footer.ending.exit_status) } else { Value::Null },
        "end_detail": footer.ending.detail,
        "serial": String::from_utf8_lossy(&footer.ending.serial),
        "state_digest": footer.ending.state_digest.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "sections": sections,
    })
}

fn render_text(summary: &Value) -> String {
    use std::fmt::Write;
    let number = |key: &str| summary[key].as_u64().unwrap_or(0);
    let mut out = String::new();
    let params: Vec<String> = summary["params"]
        .as_object()
        .map(|params| params.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "trace          {} (format {})",
        summary["file"].as_str().unwrap_or(""),
        summary["format_version"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "workload       {} [{}]", summary["workload"].as_str().unwrap_or(""), params.join(" "));
    let _ = writeln!(
        out,
        "recorder       {} {}",
        summary["recorder"].as_str().unwrap_or(""),
        summary["recorder_version"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "symbols        {} functions named", number("symbols"));
    let modes: Vec<&str> =
        summary["guest_modes"].as_array().map(|m| m.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let _ = writeln!(out, "guest modes    {}", modes.join(", "));
    let ending = match summary["exit_status"].as_u64() {
        Some(status) => format!("the guest exited with status {status}"),
        None => format!(
            "stopped by the recorder: {} ({}) — the trace is INCOMPLETE",
            summary["end_reason"].as_str().unwrap_or(""),
            summary["end_detail"].as_str().unwrap_or("")
        ),
    };
    let _ = writeln!(out, "ending         {ending}");
    let _ = writeln!(
        out,
        "instructions   {} (user {}, kernel {})",
        number("instructions"),
        number("instructions_user"),
        number("instructions_kernel")
    );
    let _ = writeln!(out, "unique blocks  {}", number("blocks"));
    let bytes_per_instruction =
        summary["bytes_per_instruction"].as_f64().map_or("-".to_string(), |b| format!("{b:.3}"));
    let _ =
        writeln!(out, "file           {} bytes, {bytes_per_instruction} bytes per instruction", number("file_bytes"));
    let _ = writeln!(out, "events         {}", number("events_total"));
    for kind in EventKind::ALL {
        let count = summary["events"][kind.name()].as_u64().unwrap_or(0);
        if count > 0 {
            let _ = writeln!(out, "  {:<20} {count:>12}", kind.name());
        }
    }
    let _ = writeln!(out, "sections       (chunks, bytes on disk, raw bytes)");
    if let Some(sections) = summary["sections"].as_object() {
        for (name, size) in sections {
            let _ = writeln!(
                out,
                "  {name:<20} {:>5} {:>12} {:>12}",
                size["chunks"].as_u64().unwrap_or(0),
                size["stored_bytes"].as_u64().unwrap_or(0),
                size["raw_bytes"].as_u64().unwrap_or(0)
            );
        }
    }
    let _ = writeln!(out, "state digest   {}", summary["state_digest"].as_str().unwrap_or(""));
    let serial = summary["serial"].as_str().unwrap_or("");
    let _ = writeln!(out, "serial output  {} bytes{}", serial.len(), if serial.is_empty() { "" } else { ":" });
    for line in serial.lines() {
        let _ = writeln!(out, "  | {}", line.escape_debug());
    }
    out.trim_end().to_string()
}
