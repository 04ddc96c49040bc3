//! `virtlab gate --update`: budgets rewritten from results, the file's comments, order and forms kept.

use std::path::Path;
use std::str::FromStr;

use toml_edit::{value, ArrayOfTables, DocumentMut, InlineTable, Item, Table, TableLike, Value};

use super::budgets::{Allowance, Budgets, WorkloadKey};
use super::check::{jobs, JobData};
use super::{BudgetError, Vocabulary};
use crate::table::{Job, Results};

/// How much above the measured count an updated budget is set: `5%` (or `5`) is 5 %.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Headroom(f64);

impl FromStr for Headroom {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = text.trim().trim_end_matches('%').trim();
        match number.parse::<f64>() {
            Ok(percent) if percent.is_finite() && percent >= 0.0 => Ok(Headroom(percent / 100.0)),
            _ => Err(format!("`{text}` is not a percentage of 0 or more (for example 5%)")),
        }
    }
}

impl Headroom {
    pub fn percent(&self) -> f64 {
        self.0 * 100.0
    }

    /// The smallest whole number at or above `actual` plus the headroom (exactly `actual` with none).
    fn count(&self, actual: f64) -> u64 {
        let scaled = actual * (1.0 + self.0);
        // Rounding error must not lift 100 × 1.05 to 106.
        (scaled - 1e-9 * scaled.max(1.0)).ceil().max(actual) as u64
    }

    /// `actual / iterations` plus the headroom, rounded up to thousandths so that it still covers `actual`.
    fn rate(&self, actual: f64, iterations: u64) -> f64 {
        let mut rate = ((actual / iterations as f64 * (1.0 + self.0)) * 1000.0 - 1e-6).ceil() / 1000.0;
        while rate * (iterations as f64) < actual {
            rate += 0.001;
        }
        rate
    }
}

/// What an update did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateSummary {
    /// Budgets whose number changed, and those already at the new number.
    pub changed: usize,
    pub unchanged: usize,
    /// Engine tables added (to existing workloads and to new ones), and workloads added.
    pub added_engines: usize,
    pub added_workloads: usize,
    /// Budgeted pairs the results do not have (or whose engine refused): left as they were.
    pub not_measured: usize,
}

/// Rewrites the budget file at `path` from `results`: every budget the results measure becomes the count plus
/// `headroom` (a per-iteration budget stays one), and every measured pair without budgets gets them (see
/// [`default_limits`]). Comments, order and the form of each budget are kept; the file is replaced atomically.
pub fn update(
    path: &Path,
    vocabulary: &Vocabulary,
    results: &Results,
    headroom: Headroom,
) -> Result<UpdateSummary, BudgetError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| BudgetError::Read { path: path.to_path_buf(), source })?;
    let budgets = Budgets::parse(&text, path, vocabulary)?;
    let mut document: DocumentMut = text.parse().map_err(|_| BudgetError::at(path, None, "not valid TOML"))?;
    let measured = jobs(results, &budgets);
    let find = |key: &WorkloadKey, engine: &str| {
        measured.iter().find(|(job, data)| job.engine == engine && key.matches(job) && data.refusal.is_none())
    };
    let mut summary = UpdateSummary::default();
    if !document.contains_key("workload") {
        document.insert("workload", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    let drift = |line: usize, what: &str| {
        BudgetError::at(
            path,
            Some(line),
            format!("{what} is not where reading the file found it; was it edited meanwhile?"),
        )
    };
    let list = document["workload"].as_array_of_tables_mut().ok_or_else(|| drift(0, "the [[workload]] list"))?;
    for (entry, table) in budgets.workloads.iter().zip(list.iter_mut()) {
        for engine in &entry.engines {
            let Some((_, data)) = find(&entry.workload, &engine.engine) else {
                summary.not_measured += 1;
                continue;
            };
            let limits = table
                .get_mut(&engine.engine)
                .and_then(Item::as_table_like_mut)
                .ok_or_else(|| drift(engine.line, &format!("[workload.{}]", engine.engine)))?;
            for limit in &engine.limits {
                let metric = vocabulary.metric(&limit.metric).ok_or_else(|| drift(limit.line, &limit.metric))?;
                let actual = data.measure(metric);
                let new = match (limit.allowance, entry.workload.iterations()) {
                    (Allowance::PerIteration(_), Some(iterations)) if iterations > 0 => {
                        Value::from(headroom.rate(actual, iterations))
                    }
                    _ => Value::from(headroom.count(actual) as i64),
                };
                let old = limit.allowance;
                let slot = metric_value(limits, &limit.metric).ok_or_else(|| drift(limit.line, &limit.metric))?;
                set_keeping_decor(slot, new);
                match (old, slot.as_integer(), slot.as_float()) {
                    (Allowance::Count(n), Some(m), _) if n as i64 == m => summary.unchanged += 1,
                    (Allowance::PerIteration(r), _, Some(s)) if r == s => summary.unchanged += 1,
                    _ => summary.changed += 1,
                }
            }
        }
    }
    add_unbudgeted(list, &budgets, &measured, vocabulary, headroom, &mut summary)
        .ok_or_else(|| drift(0, "a [[workload]]"))?;
    let text = document.to_string();
    virtlab_traces::atomic::write_atomic(path, text.as_bytes())
        .map_err(|source| BudgetError::Write { path: path.to_path_buf(), source })?;
    Ok(summary)
}

/// The value of `metric` in an engine's table, whichever way it was written: `"exits.total" = …`,
/// `exits.total = …`, `exits = { total = … }`; for `{ max = … }` or `{ per_iteration = … }`, that number.
fn metric_value<'a>(table: &'a mut dyn TableLike, metric: &str) -> Option<&'a mut Value> {
    if table.contains_key(metric) {
        let item = table.get_mut(metric)?;
        if item.is_table_like() {
            let limit = item.as_table_like_mut()?;
            let key = if limit.contains_key("max") { "max" } else { "per_iteration" };
            return limit.get_mut(key)?.as_value_mut();
        }
        return item.as_value_mut();
    }
    let (first, rest) = metric.split_once('.')?;
    metric_value(table.get_mut(first)?.as_table_like_mut()?, rest)
}

fn set_keeping_decor(slot: &mut Value, new: Value) {
    let decor = slot.decor().clone();
    *slot = new;
    *slot.decor_mut() = decor;
}

/// The budgets a newly measured pair starts with: the total exits, holes and detectable events, and those of
/// exits by reason, hypercalls, callouts, hidden page faults and emulated instructions that are not zero,
/// grouped by family.
fn default_limits(data: &JobData<'_>, vocabulary: &Vocabulary, headroom: Headroom) -> Table {
    let always = ["exits.total", "holes.total", "detectable.total"];
    let when_not_zero = |name: &str| {
        name.starts_with("exits.")
            || name.starts_with("hypercalls.")
            || ["translations.callouts", "shadow.hidden_faults", "emulated_instructions"].contains(&name)
    };
    let families = ["exits", "hypercalls", "translations", "shadow", "emulated_instructions", "holes", "detectable"];
    let family_of = |name: &str| name.split('.').next().unwrap_or(name).to_string();
    let mut chosen: Vec<(&str, u64)> = vocabulary
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), data.measure(m)))
        .filter(|(name, actual)| always.contains(name) || (*actual > 0.0 && when_not_zero(name)))
        .map(|(name, actual)| (name, headroom.count(actual)))
        .collect();
    let rank = |name: &str| families.iter().position(|f| *f == family_of(name)).unwrap_or(families.len());
    chosen.sort_by_key(|(name, _)| (rank(name), !name.ends_with(".total")));
    let mut table = Table::new();
    for (name, count) in chosen {
        match name.split_once('.') {
            Some((family, key)) => {
                if !table.contains_key(family) {
                    let mut group = Table::new();
                    group.set_dotted(true);
                    table.insert(family, Item::Table(group));
                }
                if let Some(group) = table.get_mut(family).and_then(Item::as_table_mut) {
                    group[key] = value(count as i64);
                }
            }
            None => table[name] = value(count as i64),
        }
    }
    table
}

/// Appends budgets for the measured pairs no budget covers: an engine table in the workload's existing
/// [[workload]] entry, or a new entry. `None` when the list does not hold the entries the file was read with.
fn add_unbudgeted(
    list: &mut ArrayOfTables,
    budgets: &Budgets,
    measured: &[(&Job, JobData<'_>)],
    vocabulary: &Vocabulary,
    headroom: Headroom,
    summary: &mut UpdateSummary,
) -> Option<()> {
    let mut added: Vec<WorkloadKey> = Vec::new();
    for (job, data) in measured.iter().filter(|(_, data)| data.refusal.is_none()) {
        let key = WorkloadKey::of_job(job);
        let entry = budgets.workloads.iter().position(|w| w.workload.matches(job));
        if entry.is_some_and(|i| budgets.workloads[i].engines.iter().any(|e| e.engine == job.engine)) {
            continue;
        }
        let index = match entry.or_else(|| added.iter().position(|k| *k == key).map(|i| budgets.workloads.len() + i)) {
            Some(index) => index,
            None => {
                list.push(new_workload(&key));
                added.push(key);
                summary.added_workloads += 1;
                list.len() - 1
            }
        };
        let table = list.get_mut(index)?;
        table.insert(&job.engine, Item::Table(default_limits(data, vocabulary, headroom)));
        summary.added_engines += 1;
    }
    Some(())
}

fn new_workload(key: &WorkloadKey) -> Table {
    let mut table = Table::new();
    table["name"] = value(key.name.as_str());
    if !key.parameters.is_empty() {
        let mut parameters = InlineTable::new();
        for (name, text) in &key.parameters {
            let item: Value = match text.parse::<i64>() {
                Ok(number) => number.into(),
                Err(_) => text.as_str().into(),
            };
            parameters.insert(name, item);
        }
        table["parameters"] = Item::Value(Value::InlineTable(parameters));
    }
    table["architecture"] = value(key.architecture.as_str());
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_up_past_the_headroom_and_no_further() {
        let five: Headroom = "5%".parse().unwrap();
        assert_eq!(five.count(100.0), 105, "100 × 1.05 is 105, whatever the floating-point rounding");
        assert_eq!(five.count(101.0), 107);
        assert_eq!(five.count(0.0), 0);
        assert_eq!(Headroom::default().count(202.0), 202);
        assert_eq!(five.rate(201.0, 100), 2.111);
        assert_eq!(Headroom::default().rate(1.0, 3), 0.334, "0.334 × 3 covers 1");
    }
}
