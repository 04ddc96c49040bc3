//! Budgets against results: each budgeted metric's count, the pairs the results lack, the measured pairs no
//! budget covers, and for each breach the guest addresses behind it.

use std::collections::BTreeMap;
use std::path::Path;

use super::budgets::{Budgets, Limit, WorkloadKey};
use super::{BudgetError, MetricSpec, Vocabulary};
use crate::table::{Job, Results, SiteRow, REFUSED};

/// Sites listed under a breach, at most.
pub const BLAME_SITES: usize = 10;

/// One budgeted metric of one (workload, engine) pair, as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub workload: WorkloadKey,
    pub engine: String,
    pub limit: Limit,
    /// The most the budget allows for this run.
    pub ceiling: f64,
    pub actual: f64,
    /// For a breach: the guest addresses that account for the metric, most first (with a baseline: the sites
    /// that are new or grew, most growth first).
    pub blame: Vec<BlameSite>,
    /// For a breach: why `blame` is empty or partial, when it is.
    pub blame_note: Option<String>,
}

impl Check {
    pub fn is_over(&self) -> bool {
        self.actual > self.ceiling
    }

    /// How far past the ceiling the count is (negative: room left).
    pub fn over_by(&self) -> f64 {
        self.actual - self.ceiling
    }
}

/// A guest instruction that an engine attributes part of a metric to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlameSite {
    pub address: u64,
    /// `sys_getpid+0x12`, or empty when the trace names no functions.
    pub function: String,
    pub instruction: String,
    pub kind: String,
    pub reason: String,
    pub count: u64,
    /// The count at this site and reason in the baseline's run (0 for a new site); `None` without a baseline.
    pub baseline: Option<u64>,
}

/// A budgeted (workload, engine) pair the results do not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub workload: WorkloadKey,
    pub engine: String,
    pub line: usize,
    /// Not in the results at all, or the engine refused the trace (with its reason).
    pub reason: String,
}

/// A measured (workload, engine) pair with no budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbudgeted {
    pub workload: WorkloadKey,
    pub engine: String,
}

/// Everything the gate found.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub checks: Vec<Check>,
    pub missing: Vec<Missing>,
    pub unbudgeted: Vec<Unbudgeted>,
    /// Missing pairs do not fail the gate (`--allow-missing`).
    pub allow_missing: bool,
}

impl Verdict {
    pub fn over(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.is_over())
    }

    /// Every budget holds, and every budgeted pair was measured (unless missing pairs are allowed).
    pub fn passed(&self) -> bool {
        self.over().next().is_none() && (self.allow_missing || self.missing.is_empty())
    }
}

/// The rows and sites of one job of a results table.
#[derive(Default)]
pub(super) struct JobData<'a> {
    values: BTreeMap<(&'a str, &'a str), f64>,
    pub(super) refusal: Option<&'a str>,
    sites: Vec<&'a SiteRow>,
}

impl JobData<'_> {
    pub(super) fn measure(&self, metric: &MetricSpec) -> f64 {
        match &metric.key {
            Some(key) => self.values.get(&(metric.family.as_str(), key.as_str())).copied().unwrap_or(0.0),
            None => self.values.iter().filter(|((family, _), _)| *family == metric.family).map(|(_, v)| v).sum(),
        }
    }
}

/// The jobs of `results` taken with `budgets`' profile and options, in the table's order.
pub(super) fn jobs<'a>(results: &'a Results, budgets: &Budgets) -> Vec<(&'a Job, JobData<'a>)> {
    let wanted =
        |job: &Job| job.profile == budgets.profile && super::same_pairs(&super::pairs(&job.options), &budgets.options);
    let mut order: Vec<&'a Job> = Vec::new();
    let mut data: BTreeMap<&'a Job, JobData<'a>> = BTreeMap::new();
    for row in results.rows.iter().filter(|r| wanted(&r.job)) {
        let entry = data.entry(&row.job).or_insert_with(|| {
            order.push(&row.job);
            JobData::default()
        });
        if row.family == REFUSED {
            entry.refusal = Some(&row.key);
        } else {
            entry.values.insert((&row.family, &row.key), row.value);
        }
    }
    for site in results.sites.iter().filter(|s| wanted(&s.job)) {
        if let Some(entry) = data.get_mut(&site.job) {
            entry.sites.push(site);
        }
    }
    order.into_iter().map(|job| (job, data.remove(job).unwrap_or_default())).collect()
}

/// The same job in another run (a baseline): same workload, parameters, architecture, engine; the trace file's
/// name may differ.
fn same_job(a: &Job, b: &Job) -> bool {
    a.engine == b.engine && WorkloadKey::of_job(b).matches(a)
}

/// Checks `budgets` (read from `path`) against `results`. With `baseline`, a breach's blame lists the sites
/// that are new or grew since it. A budgeted workload that is neither known to `vocabulary` nor in the results
/// is an error naming its line, unless `allow_missing`, which lists it as missing instead.
pub fn check(
    budgets: &Budgets,
    path: &Path,
    vocabulary: &Vocabulary,
    results: &Results,
    baseline: Option<&Results>,
    allow_missing: bool,
) -> Result<Verdict, BudgetError> {
    let baseline_jobs = baseline.map(|b| jobs(b, budgets));
    let jobs = jobs(results, budgets);
    let mut verdict = Verdict { checks: Vec::new(), missing: Vec::new(), unbudgeted: Vec::new(), allow_missing };
    for entry in &budgets.workloads {
        let known = vocabulary.workloads.contains(&entry.workload.name)
            || results.rows.iter().any(|r| r.job.workload == entry.workload.name);
        if !known && !allow_missing {
            let names = vocabulary.workloads.iter().chain(results.rows.iter().map(|r| &r.job.workload));
            let hint = super::closest(&entry.workload.name, names.map(String::as_str))
                .map_or(String::new(), |close| format!(" (did you mean `{close}`?)"));
            return Err(BudgetError::at(
                path,
                Some(entry.line),
                format!(
                    "unknown workload `{}`{hint}: not in the catalog and not in the results; a misspelt name, or \
                     its trace is missing from the gate's input (--allow-missing lists it instead)",
                    entry.workload.name
                ),
            ));
        }
        for engine in &entry.engines {
            let found = jobs.iter().find(|(job, _)| job.engine == engine.engine && entry.workload.matches(job));
            let missing = |reason: String| Missing {
                workload: entry.workload.clone(),
                engine: engine.engine.clone(),
                line: engine.line,
                reason,
            };
            let Some((job, data)) = found else {
                let elsewhere =
                    results.rows.iter().find(|r| r.job.engine == engine.engine && entry.workload.matches(&r.job));
                let reason = match elsewhere {
                    Some(row) => format!(
                        "the results have it only under profile {} with options `{}`, not the budgets' {} with `{}`",
                        row.job.profile,
                        row.job.options,
                        budgets.profile,
                        budgets.options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
                    ),
                    None => "not in the results".into(),
                };
                verdict.missing.push(missing(reason));
                continue;
            };
            if let Some(reason) = data.refusal {
                verdict.missing.push(missing(format!("the engine refused the trace: {reason}")));
                continue;
            }
            let before = baseline_jobs.as_ref().and_then(|b| b.iter().find(|(other, _)| same_job(job, other)));
            for limit in &engine.limits {
                let Some(metric) = vocabulary.metric(&limit.metric) else {
                    let message = format!("`{}` is not a metric of the gate's vocabulary", limit.metric);
                    return Err(BudgetError::at(path, Some(limit.line), message));
                };
                let ceiling = limit.allowance.ceiling(entry.workload.iterations());
                let actual = data.measure(metric);
                let mut check = Check {
                    workload: entry.workload.clone(),
                    engine: engine.engine.clone(),
                    limit: limit.clone(),
                    ceiling,
                    actual,
                    blame: Vec::new(),
                    blame_note: None,
                };
                if check.is_over() {
                    blame(&mut check, metric, data, before.map(|(_, d)| d), baseline.is_some());
                }
                verdict.checks.push(check);
            }
        }
    }
    for (job, data) in &jobs {
        let budgeted = budgets
            .workloads
            .iter()
            .any(|w| w.workload.matches(job) && w.engines.iter().any(|e| e.engine == job.engine));
        if !budgeted && data.refusal.is_none() {
            verdict.unbudgeted.push(Unbudgeted { workload: WorkloadKey::of_job(job), engine: job.engine.clone() });
        }
    }
    Ok(verdict)
}

/// Fills a breach's blame: the sites of the metric's kind (and reason), most first; with a baseline, those that
/// are new or grew, most growth first.
fn blame(check: &mut Check, metric: &MetricSpec, data: &JobData<'_>, before: Option<&JobData<'_>>, has_baseline: bool) {
    let Some((kind, reason)) = metric.sites() else {
        check.blame_note = Some(format!("the engines do not attribute {} to guest addresses", metric.name));
        return;
    };
    let of_metric = |site: &&&SiteRow| site.kind == kind && reason.is_none_or(|r| site.reason == r);
    let earlier = |site: &SiteRow| {
        before.map(|b| {
            b.sites
                .iter()
                .filter(|s| s.address == site.address && s.kind == site.kind && s.reason == site.reason)
                .map(|s| s.count)
                .sum::<u64>()
        })
    };
    let mut sites: Vec<BlameSite> = data
        .sites
        .iter()
        .filter(of_metric)
        .map(|site| BlameSite {
            address: site.address,
            function: site.function.clone(),
            instruction: site.disassembly.clone(),
            kind: site.kind.clone(),
            reason: site.reason.clone(),
            count: site.count,
            baseline: earlier(site),
        })
        .collect();
    let growth = |s: &BlameSite| s.count as i128 - s.baseline.unwrap_or(0) as i128;
    if has_baseline {
        if before.is_none() {
            check.blame_note = Some("the baseline has no result for this workload and engine".into());
        }
        sites.retain(|s| growth(s) > 0);
        sites.sort_by(|a, b| growth(b).cmp(&growth(a)).then(a.address.cmp(&b.address)));
    } else {
        sites.sort_by(|a, b| b.count.cmp(&a.count).then(a.address.cmp(&b.address)));
    }
    if sites.is_empty() && check.blame_note.is_none() {
        check.blame_note = Some(match has_baseline {
            true => "no site is new or grew since the baseline".into(),
            false => "the engine attributed none of it to a guest address".into(),
        });
    }
    if sites.len() > BLAME_SITES {
        let rest = sites.len() - BLAME_SITES;
        sites.truncate(BLAME_SITES);
        check.blame_note = Some(format!("{rest} more sites not shown"));
    }
    check.blame = sites;
}
