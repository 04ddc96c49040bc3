//! `virtlab engines`: the engines, and what each does with each instruction class and event (the strategy table
//! their replays derive from).

use std::process::ExitCode;

use serde_json::{json, Map, Value};
use virtlab_engines::strategy::{self, describe, Row, Table};
use virtlab_engines::{engine, Options};

use super::replay::UsageError;

/// List the engines, or print their strategy tables.
///
/// Without `--table`: each engine's name and strategy. With `--table`: for every subject (an
/// instruction class the trace has no event for, or an event kind refined by what a strategy
/// decides on: which control register, which MSR, which port), each engine's disposition: the
/// mechanism that carries it out, with its exit or trap reason in brackets, and the actions it
/// takes on the monitor's state. A subject some engine treats differently in kernel and user
/// mode gets one row per mode. These tables are data the replays derive from, so what is printed
/// is what runs. An engine whose table depends on the guest's width has one per width, titled
/// `(x86-64)` and `(x86-32)`: `trap-emulate` and `paravirt` run a 64-bit kernel in ring 3 with
/// two page tables (long mode ignores segment limits) and a 32-bit one in ring 1 behind segment
/// limits, where Xen's fast trap gate takes INT 0x80 (`virtlab story` shows what it costs).
///
/// Examples:
///   virtlab engines --table --engine bt
///   virtlab engines --table --set hw.tpr_shadow=false --json
///   virtlab engines --table --markdown     (the table of engines/sim/README.md)
///
/// Exit status: 0; 2 for an unknown engine or option.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Print the strategy tables.
    #[arg(long)]
    table: bool,
    /// Only this engine (with --table).
    #[arg(long, requires = "table")]
    engine: Option<String>,
    /// An engine option as key=value (see `virtlab replay --help`); repeat for several.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = super::parse_param)]
    settings: Vec<(String, String)>,
    /// Print the tables as one Markdown table, one column per engine.
    #[arg(long, requires = "table", conflicts_with = "json")]
    markdown: bool,
    /// Print JSON: without --table an array of {name, summary}; with it an object {engines: [names],
    /// rows: [{subject, mode (null when both modes agree), cells: {engine: {mechanism, exit_reason, actions,
    /// text}}}]}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut options = Options::default();
    for (key, value) in &args.settings {
        options.set(key, value).map_err(|e| UsageError(e.to_string()))?;
    }
    let text = if !args.table {
        list(args.json)?
    } else {
        let mut tables = engine::tables(&options);
        if let Some(name) = &args.engine {
            anyhow::ensure!(
                engine::by_name(name).is_some(),
                UsageError(format!("no engine named `{name}`; `virtlab engines` lists them"))
            );
            tables.retain(|(title, _)| title == name || title.starts_with(&format!("{name} (")));
        }
        if args.markdown {
            strategy::markdown(&tables)
        } else if args.json {
            serde_json::to_string_pretty(&tables_json(&tables))?
        } else {
            render(&tables)
        }
    };
    super::finish_output(super::print_line(text.trim_end()))?;
    Ok(ExitCode::SUCCESS)
}

fn list(json: bool) -> anyhow::Result<String> {
    let engines = engine::all();
    if json {
        let list: Vec<Value> = engines.iter().map(|e| json!({ "name": e.name(), "summary": e.summary() })).collect();
        return Ok(serde_json::to_string_pretty(&list)?);
    }
    let mut out = String::new();
    for e in &engines {
        out += &format!("{:<13} {}\n", e.name(), e.summary());
    }
    out += &format!(
        "{:<13} {}\n",
        "kvm", "measured, not modelled: the trace's guest on this host's KVM (`virtlab replay --engine kvm`)"
    );
    out += "\n`virtlab engines --table` shows what each does with each instruction class and event.";
    Ok(out)
}

fn rows_of(tables: &[(String, Table)]) -> Vec<Row> {
    strategy::rows(tables.iter().map(|(_, t)| t))
}

fn tables_json(tables: &[(String, Table)]) -> Value {
    let rows: Vec<Value> = rows_of(tables)
        .into_iter()
        .map(|row| {
            let cells: Map<String, Value> = tables
                .iter()
                .map(|(title, table)| {
                    let cell = table.at(row);
                    let actions: Vec<&str> = cell.actions.iter().map(|a| strategy::action_name(*a)).collect();
                    let value = json!({
                        "mechanism": cell.mechanism.kind(),
                        "exit_reason": cell.mechanism.exit_reason().map(|r| r.name()),
                        "actions": actions,
                        "text": describe(&cell),
                    });
                    (title.clone(), value)
                })
                .collect();
            json!({ "subject": row.subject.name(), "mode": row.mode.map(|m| m.name()), "cells": cells })
        })
        .collect();
    let names: Vec<&str> = tables.iter().map(|(title, _)| title.as_str()).collect();
    json!({ "engines": names, "rows": rows })
}

fn render(tables: &[(String, Table)]) -> String {
    let width = tables.iter().map(|(title, _)| title.len()).max().unwrap_or(0);
    let mut out = String::new();
    for row in rows_of(tables) {
        out += &row.label();
        out.push('\n');
        for (title, table) in tables {
            out += &format!("  {title:<width$}  {}\n", describe(&table.at(row)));
        }
    }
    out
}
