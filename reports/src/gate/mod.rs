//! The exit-count gate: budgets (a TOML file committed with the code) checked against a results table, each
//! breach blamed on the guest instructions that account for it.
//!
//! Counts from a deterministic trace are exact, so a budget is exact too: `actual > budget` fails, with no noise
//! margin. [`Budgets::parse`] reads the file and names the line of anything it does not know; [`check`] compares
//! it with [`crate::table::Results`] (and blames breaches, against a baseline when given); [`render`] prints the
//! verdict as text, JSON, JUnit XML or Markdown; [`update`] rewrites the file's numbers from results, keeping
//! its comments and order.
//!
//! This module knows metric names only through the [`Vocabulary`] its caller builds from an engine's result, so
//! it links no engine.

mod budgets;
mod check;
pub mod render;
mod update;

use std::path::PathBuf;

pub use budgets::{Allowance, Budgets, EngineBudget, Limit, WorkloadBudget, WorkloadKey, FORMAT_VERSION};
pub use check::{check, BlameSite, Check, Missing, Unbudgeted, Verdict};
pub use update::{update, Headroom, UpdateSummary};

/// A budget file that cannot be read or is not what the gate expects: the file, the line when one is at fault,
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("{}: cannot read it: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot write it: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{}{}: {message}", path.display(), line.map_or(String::new(), |l| format!(":{l}")))]
    Invalid { path: PathBuf, line: Option<usize>, message: String },
}

impl BudgetError {
    /// The budget file at `path` is not what the gate expects, at `line` when one is at fault.
    pub fn at(path: &std::path::Path, line: Option<usize>, message: impl Into<String>) -> Self {
        BudgetError::Invalid { path: path.to_path_buf(), line, message: message.into() }
    }

    /// The file could not be read or written, as opposed to one that is not a budget file.
    pub fn is_io(&self) -> bool {
        matches!(self, BudgetError::Read { .. } | BudgetError::Write { .. })
    }
}

/// Where a metric's number comes from in an engine's rows of the results table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    /// The name budgets use: `exits.total`, `exits.cpuid`, `hypercalls.mmu_update`, `shadow.hidden_faults`…
    pub name: String,
    pub family: String,
    /// The key in the family; `None` sums the whole family (`holes.total`: holes of every kind).
    pub key: Option<String>,
}

impl MetricSpec {
    /// The site kind and reason (`None`: every reason) of the guest addresses that account for this metric,
    /// where the engines attribute it to addresses.
    pub fn sites(&self) -> Option<(&'static str, Option<&str>)> {
        let key = self.key.as_deref();
        match (self.family.as_str(), key) {
            ("totals", Some("exits_total")) => Some(("exit", None)),
            ("exits", reason) => Some(("exit", reason)),
            ("hypercalls", kind) => Some(("hypercall", kind)),
            ("translations", Some("callouts")) => Some(("callout", None)),
            ("shadow", Some("hidden_faults")) => Some(("exit", Some("shadow_page_fault"))),
            ("holes", None) => Some(("holes", None)),
            ("detectable", None) => Some(("detectable", None)),
            _ => None,
        }
    }
}

/// What a budget file may name: the engines, the workloads known without results (a catalog), and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocabulary {
    pub engines: Vec<String>,
    pub workloads: Vec<String>,
    pub metrics: Vec<MetricSpec>,
}

/// The families whose every key is a metric, `family.key`.
const KEYED_FAMILIES: [&str; 4] = ["exits", "hypercalls", "translations", "shadow"];

impl Vocabulary {
    /// The metrics from the (family, key) pairs of an engine's result as the results table flattens it: every
    /// key of `exits`, `hypercalls`, `translations` and `shadow` as `family.key`; `exits.total` and
    /// `emulated_instructions` from the totals; `hypercalls.total`, `holes.total` and `detectable.total` as sums.
    pub fn new(engines: Vec<String>, workloads: Vec<String>, result_keys: &[(String, String)]) -> Self {
        let spec = |name: String, family: &str, key: Option<&str>| MetricSpec {
            name,
            family: family.to_string(),
            key: key.map(str::to_string),
        };
        let mut metrics = vec![
            spec("exits.total".into(), "totals", Some("exits_total")),
            spec("hypercalls.total".into(), "hypercalls", None),
            spec("holes.total".into(), "holes", None),
            spec("detectable.total".into(), "detectable", None),
            spec("emulated_instructions".into(), "totals", Some("emulated_instructions")),
        ];
        for (family, key) in result_keys {
            if KEYED_FAMILIES.contains(&family.as_str()) && key != "total" {
                metrics.push(spec(format!("{family}.{key}"), family, Some(key)));
            }
        }
        Vocabulary { engines, workloads, metrics }
    }

    pub fn metric(&self, name: &str) -> Option<&MetricSpec> {
        self.metrics.iter().find(|m| m.name == name)
    }
}

/// `key=value` pairs joined with `,`, as the results table writes parameters and options, split back.
pub(crate) fn pairs(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// The same pairs in any order.
pub(crate) fn same_pairs(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let sorted = |pairs: &[(String, String)]| {
        let mut pairs = pairs.to_vec();
        pairs.sort();
        pairs
    };
    sorted(a) == sorted(b)
}

/// `; did you mean `close`?` for the known name closest to `name` (at most two edits away), else `; NOUN: every
/// known name`.
pub(crate) fn suggestion<'a>(name: &str, known: impl Iterator<Item = &'a str> + Clone, noun: &str) -> String {
    match closest(name, known.clone()) {
        Some(close) => format!("; did you mean `{close}`?"),
        None => format!("; {noun}: {}", known.collect::<Vec<_>>().join(", ")),
    }
}

/// The known name closest to `name`, if one is at most two edits away.
pub(crate) fn closest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known.map(|k| (edits(name, k), k)).filter(|(d, _)| *d <= 2).min().map(|(_, k)| k)
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}
