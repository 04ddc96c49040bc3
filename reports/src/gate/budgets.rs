//! The budget file, parsed with the position of every key, so that each problem names its line.
//!
//! ```toml
//! [gate]
//! version = 1
//! profile = "p4-2006"                  # the cost profile the counts are taken under
//! options = ["bt.lmsle=true"]          # the sweep's --set options
//!
//! [[workload]]
//! name = "syscall"
//! parameters = { iterations = 100, counters = 0 }
//! architecture = "x86-64"
//!
//! [workload.trap-emulate]
//! exits.total = 214
//! exits.system_call = { max = 202, comment = "SYSCALL and SYSRET trap" }
//! holes.total = 0
//! hypercalls.total = { per_iteration = 0.5 }
//! ```

use std::ops::Range;
use std::path::Path;

use toml_edit::{Document, Item, Table, TableLike, Value};

use super::{BudgetError, Vocabulary};
use crate::table::Job;

/// The version of the budget file's layout this gate reads.
pub const FORMAT_VERSION: i64 = 1;

/// A parsed budget file.
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    /// The cost profile the results must have been taken with.
    pub profile: String,
    /// The sweep's `--set` options, `key=value`, in the file's order.
    pub options: Vec<(String, String)>,
    pub workloads: Vec<WorkloadBudget>,
}

/// What identifies a workload's results: name, parameters and architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadKey {
    pub name: String,
    /// `key=value` pairs; their order does not matter.
    pub parameters: Vec<(String, String)>,
    pub architecture: String,
}

impl WorkloadKey {
    pub fn of_job(job: &Job) -> Self {
        WorkloadKey {
            name: job.workload.clone(),
            parameters: super::pairs(&job.parameters),
            architecture: job.architecture.clone(),
        }
    }

    pub fn matches(&self, job: &Job) -> bool {
        job.workload == self.name
            && job.architecture == self.architecture
            && super::same_pairs(&self.parameters, &super::pairs(&job.parameters))
    }

    /// `syscall iterations=100,counters=0 x86-64`.
    pub fn label(&self) -> String {
        let parameters: Vec<String> = self.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        match parameters.is_empty() {
            true => format!("{} {}", self.name, self.architecture),
            false => format!("{} {} {}", self.name, parameters.join(","), self.architecture),
        }
    }

    /// The `iterations` parameter, which per-iteration budgets scale with.
    pub fn iterations(&self) -> Option<u64> {
        self.parameters.iter().find(|(k, _)| k == "iterations").and_then(|(_, v)| v.parse().ok())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadBudget {
    pub workload: WorkloadKey,
    pub line: usize,
    pub engines: Vec<EngineBudget>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineBudget {
    pub engine: String,
    pub line: usize,
    pub limits: Vec<Limit>,
}

/// One metric's budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub metric: String,
    pub allowance: Allowance,
    pub comment: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Allowance {
    /// At most this many in the whole run.
    Count(u64),
    /// At most this many per iteration of the workload: the ceiling is this times its `iterations` parameter
    /// (the start-up's counts included).
    PerIteration(f64),
}

impl Allowance {
    /// The largest count that holds, for a workload run `iterations` times.
    pub fn ceiling(&self, iterations: Option<u64>) -> f64 {
        match *self {
            Allowance::Count(n) => n as f64,
            Allowance::PerIteration(rate) => rate * iterations.unwrap_or(0) as f64,
        }
    }

    /// `202` or `2.02/iteration`.
    pub fn describe(&self) -> String {
        match self {
            Allowance::Count(n) => n.to_string(),
            Allowance::PerIteration(rate) => format!("{rate}/iteration"),
        }
    }
}

/// Reads keys and values of one file, each error with its line.
struct Reader<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Reader<'_> {
    fn line(&self, span: Option<Range<usize>>) -> Option<usize> {
        span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1)
    }

    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> BudgetError {
        BudgetError::at(self.path, self.line(span), message)
    }

    /// The line of `key` in `table` (of its value when the key has no position).
    fn key_line(&self, table: &dyn TableLike, key: &str) -> usize {
        let span = table.key(key).and_then(|k| k.span()).or_else(|| table.get(key).and_then(Item::span));
        self.line(span).unwrap_or(0)
    }

    fn string(&self, table: &dyn TableLike, key: &str, what: &str) -> Result<String, BudgetError> {
        match table.get(key) {
            Some(item) => item.as_str().map(str::to_string).ok_or_else(|| {
                self.error(item.span(), format!("`{key}` is {}; expected {what} in quotes", item.type_name()))
            }),
            None => Err(self.error(table_span(table), format!("no `{key}`; expected {what}"))),
        }
    }

    /// Rejects keys of `table` outside `known`.
    fn only(&self, table: &dyn TableLike, known: &[&str], what: &str) -> Result<(), BudgetError> {
        match table.iter().find(|(key, _)| !known.contains(key)) {
            Some((key, _)) => Err(BudgetError::at(
                self.path,
                Some(self.key_line(table, key)),
                format!("unknown key `{key}` in {what}; expected {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }
}

fn table_span(table: &dyn TableLike) -> Option<Range<usize>> {
    table.iter().find_map(|(_, item)| item.span())
}

impl Budgets {
    /// Parses a budget file's `text` (`path` names it in errors), checking every engine and metric name against
    /// `vocabulary`. Workload names are checked against results, by [`super::check`].
    pub fn parse(text: &str, path: &Path, vocabulary: &Vocabulary) -> Result<Budgets, BudgetError> {
        let r = Reader { path, text };
        let document = Document::parse(text).map_err(|e| {
            let message = e.message().trim_end().to_string();
            r.error(e.span(), format!("not valid TOML: {message}"))
        })?;
        let root = document.as_table();
        r.only(root, &["gate", "workload"], "the file")?;
        let gate = match root.get("gate") {
            Some(Item::Table(gate)) => gate,
            _ => return Err(r.error(None, "no [gate] table; the file starts with [gate] version = 1, profile = …")),
        };
        let (profile, options) = parse_gate(&r, gate)?;
        let mut workloads = Vec::new();
        match root.get("workload") {
            None => {}
            Some(Item::ArrayOfTables(list)) => {
                for table in list.iter() {
                    workloads.push(parse_workload(&r, table, vocabulary)?);
                }
            }
            Some(other) => {
                return Err(r.error(other.span(), "`workload` must be a list of [[workload]] tables"));
            }
        }
        for (i, entry) in workloads.iter().enumerate() {
            if let Some(first) = workloads[..i].iter().find(|w| w.workload == entry.workload) {
                return Err(BudgetError::at(
                    path,
                    Some(entry.line),
                    format!(
                        "{} already has budgets at line {}; keep one [[workload]] per name, parameters and architecture",
                        entry.workload.label(),
                        first.line
                    ),
                ));
            }
        }
        Ok(Budgets { profile, options, workloads })
    }
}

fn parse_gate(r: &Reader<'_>, gate: &Table) -> Result<(String, Vec<(String, String)>), BudgetError> {
    r.only(gate, &["version", "profile", "options"], "[gate]")?;
    let version = gate.get("version").and_then(Item::as_integer);
    if version != Some(FORMAT_VERSION) {
        let span = gate.get("version").and_then(Item::span).or_else(|| gate.span());
        return Err(
            r.error(span, format!("[gate] version must be {FORMAT_VERSION}, the budget format this gate reads"))
        );
    }
    let profile = r.string(gate, "profile", "the cost profile's name (p4-2006) or a profile file")?;
    let mut options = Vec::new();
    if let Some(item) = gate.get("options") {
        let expected = "a list of \"key=value\" strings, the sweep's --set options";
        let list = item.as_array().ok_or_else(|| r.error(item.span(), format!("`options` must be {expected}")))?;
        for value in list.iter() {
            let pair = value.as_str().and_then(|text| text.split_once('=')).filter(|(k, _)| !k.is_empty());
            let (key, setting) = pair.ok_or_else(|| r.error(value.span(), format!("`options` must be {expected}")))?;
            options.push((key.to_string(), setting.to_string()));
        }
    }
    Ok((profile, options))
}

fn parse_workload(r: &Reader<'_>, table: &Table, vocabulary: &Vocabulary) -> Result<WorkloadBudget, BudgetError> {
    let line = r.line(table.span()).unwrap_or(0);
    let entry_keys = ["name", "parameters", "architecture"];
    if let Some((key, _)) = table.iter().find(|(key, item)| !entry_keys.contains(key) && !item.is_table_like()) {
        let message = format!(
            "unknown key `{key}` in a [[workload]]; expected name, parameters, architecture and one \
             [workload.ENGINE] table of budgets per engine"
        );
        return Err(BudgetError::at(r.path, Some(r.key_line(table, key)), message));
    }
    let name = r.string(table, "name", "the workload's name, as `virtlab inspect` shows it")?;
    let architecture = r.string(table, "architecture", "x86-64 or x86-32")?;
    if architecture != "x86-64" && architecture != "x86-32" {
        let span = table.get("architecture").and_then(Item::span);
        return Err(r.error(span, format!("architecture `{architecture}`; expected x86-64 or x86-32")));
    }
    let mut parameters = Vec::new();
    if let Some(item) = table.get("parameters") {
        let expected = "an inline table of the workload's parameters, { iterations = 100 }";
        let list =
            item.as_inline_table().ok_or_else(|| r.error(item.span(), format!("`parameters` must be {expected}")))?;
        for (key, value) in list.iter() {
            let text = match value {
                Value::Integer(n) => n.value().to_string(),
                Value::String(s) => s.value().clone(),
                _ => return Err(r.error(value.span(), format!("parameter `{key}` must be a number or a string"))),
            };
            parameters.push((key.to_string(), text));
        }
    }
    let workload = WorkloadKey { name, parameters, architecture };
    let mut engines = Vec::new();
    for (key, item) in table.iter().filter(|(key, _)| !entry_keys.contains(key)) {
        let line = r.key_line(table, key);
        let Some(limits) = item.as_table_like() else { continue }; // refused above
        if !vocabulary.engines.iter().any(|e| e == key) {
            let engines = vocabulary.engines.iter().map(String::as_str);
            let message = format!("unknown engine `{key}`{}", super::suggestion(key, engines, "engines"));
            return Err(BudgetError::at(r.path, Some(line), message));
        }
        let mut parsed = Vec::new();
        parse_limits(r, limits, "", &workload, vocabulary, &mut parsed)?;
        engines.push(EngineBudget { engine: key.to_string(), line, limits: parsed });
    }
    Ok(WorkloadBudget { workload, line, engines })
}

/// The limits of `table`; a (dotted or inline) table without `max` or `per_iteration` is a group whose keys are
/// `prefix.key`, so `exits.cpuid = 4` and `exits = { cpuid = 4 }` both name `exits.cpuid`.
fn parse_limits(
    r: &Reader<'_>,
    table: &dyn TableLike,
    prefix: &str,
    workload: &WorkloadKey,
    vocabulary: &Vocabulary,
    out: &mut Vec<Limit>,
) -> Result<(), BudgetError> {
    for (key, item) in table.iter() {
        let name = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
        let line = r.key_line(table, key);
        let group = item.as_table_like().filter(|t| !t.contains_key("max") && !t.contains_key("per_iteration"));
        if let Some(group) = group {
            parse_limits(r, group, &name, workload, vocabulary, out)?;
            continue;
        }
        if vocabulary.metric(&name).is_none() {
            let names = vocabulary.metrics.iter().map(|m| m.name.as_str());
            let message = format!("unknown metric `{name}`{}", super::suggestion(&name, names, "metrics"));
            return Err(BudgetError::at(r.path, Some(line), message));
        }
        let (allowance, comment) = allowance(r, item, &name, line)?;
        if matches!(allowance, Allowance::PerIteration(_)) && workload.iterations().is_none_or(|n| n == 0) {
            return Err(BudgetError::at(
                r.path,
                Some(line),
                format!(
                    "`{name}` is per iteration, but {} has no `iterations` parameter above 0; give a count (`max`)",
                    workload.label()
                ),
            ));
        }
        out.push(Limit { metric: name, allowance, comment, line });
    }
    Ok(())
}

/// A limit's value: a whole number, or `{ max = N }` / `{ per_iteration = X }` with an optional `comment`.
fn allowance(r: &Reader<'_>, item: &Item, name: &str, line: usize) -> Result<(Allowance, Option<String>), BudgetError> {
    let wrong = |problem: &str| {
        BudgetError::at(
            r.path,
            Some(line),
            format!(
                "`{name}` {problem}; expected a whole number (the most allowed), {{ max = N }} or \
                 {{ per_iteration = X }}, each with an optional comment = \"…\""
            ),
        )
    };
    let count = |item: &Item| match item.as_integer() {
        Some(n) if n >= 0 => Ok(n as u64),
        _ => Err(wrong("is not a whole number of 0 or more")),
    };
    let Some(table) = item.as_table_like() else {
        return Ok((Allowance::Count(count(item)?), None));
    };
    let known = ["max", "per_iteration", "comment"];
    if let Some((key, _)) = table.iter().find(|(key, _)| !known.contains(key)) {
        return Err(wrong(&format!("has an unknown key `{key}`")));
    }
    let comment = match table.get("comment") {
        Some(c) => Some(c.as_str().ok_or_else(|| wrong("has a comment that is not a string"))?.to_string()),
        None => None,
    };
    let allowance = match (table.get("max"), table.get("per_iteration")) {
        (Some(max), None) => Allowance::Count(count(max)?),
        (None, Some(rate)) => {
            let rate = rate.as_float().or_else(|| rate.as_integer().map(|n| n as f64));
            match rate {
                Some(rate) if rate.is_finite() && rate >= 0.0 => Allowance::PerIteration(rate),
                _ => return Err(wrong("has a per_iteration that is not a number of 0 or more")),
            }
        }
        _ => return Err(wrong("needs exactly one of max and per_iteration")),
    };
    Ok((allowance, comment))
}
