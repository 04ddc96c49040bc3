//! The results table indexed by (trace, profile, engine), in the sweep's own order of traces, profiles and engines.

use std::collections::BTreeMap;

use crate::table::{Results, Row, SiteRow, REFUSED};

/// One trace of the sweep and how the report names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceInfo {
    pub trace: String,
    pub workload: String,
    pub parameters: String,
    pub architecture: String,
    /// The workload's name, with its parameters when two traces share a workload.
    pub label: String,
}

/// What one engine measured on one trace with one profile, or why it refused.
#[derive(Debug, Default)]
pub struct JobResult<'a> {
    pub rows: Vec<&'a Row>,
    pub refusal: Option<&'a str>,
    pub sites: Vec<&'a SiteRow>,
}

impl JobResult<'_> {
    pub fn get(&self, family: &str, key: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.family == family && r.key == key).map(|r| r.value)
    }

    /// The family's keys and values, in the order the engine gave them.
    pub fn family(&self, family: &str) -> Vec<(&str, f64)> {
        self.rows.iter().filter(|r| r.family == family).map(|r| (r.key.as_str(), r.value)).collect()
    }
}

pub struct Index<'a> {
    pub results: &'a Results,
    pub traces: Vec<TraceInfo>,
    pub engines: Vec<String>,
    pub profiles: Vec<String>,
    /// Every metric family, in first-seen order.
    pub families: Vec<String>,
    jobs: BTreeMap<(usize, usize, usize), JobResult<'a>>,
}

fn position(list: &mut Vec<String>, name: &str) -> usize {
    list.iter().position(|n| n == name).unwrap_or_else(|| {
        list.push(name.to_string());
        list.len() - 1
    })
}

impl<'a> Index<'a> {
    pub fn new(results: &'a Results) -> Self {
        let m = &results.manifest;
        let (mut engines, mut profiles) = (m.engines.clone(), m.profiles.clone());
        let mut trace_names = m.traces.clone();
        let mut traces: Vec<Option<TraceInfo>> = vec![None; trace_names.len()];
        let mut families = Vec::new();
        let mut jobs: BTreeMap<(usize, usize, usize), JobResult<'a>> = BTreeMap::new();
        let mut key_of = |job: &crate::table::Job, traces: &mut Vec<Option<TraceInfo>>| {
            let t = position(&mut trace_names, &job.trace);
            if t >= traces.len() {
                traces.resize(t + 1, None);
            }
            traces[t].get_or_insert_with(|| TraceInfo {
                trace: job.trace.clone(),
                workload: job.workload.clone(),
                parameters: job.parameters.clone(),
                architecture: job.architecture.clone(),
                label: job.workload.clone(),
            });
            (t, position(&mut profiles, &job.profile), position(&mut engines, &job.engine))
        };
        for row in &results.rows {
            let key = key_of(&row.job, &mut traces);
            let job = jobs.entry(key).or_default();
            if row.family == REFUSED {
                job.refusal = Some(&row.key);
            } else {
                position(&mut families, &row.family);
                job.rows.push(row);
            }
        }
        for site in &results.sites {
            let key = key_of(&site.job, &mut traces);
            jobs.entry(key).or_default().sites.push(site);
        }
        let mut traces: Vec<TraceInfo> = traces.into_iter().flatten().collect();
        for i in 0..traces.len() {
            if traces.iter().filter(|t| t.workload == traces[i].workload).count() > 1 {
                traces[i].label = format!("{} ({})", traces[i].workload, traces[i].parameters);
            }
        }
        Index { results, traces, engines, profiles, families, jobs }
    }

    pub fn job(&self, trace: usize, profile: usize, engine: usize) -> Option<&JobResult<'a>> {
        self.jobs.get(&(trace, profile, engine))
    }

    pub fn value(&self, trace: usize, profile: usize, engine: usize, family: &str, key: &str) -> Option<f64> {
        self.job(trace, profile, engine)?.get(family, key)
    }

    /// The keys of `family` over the given jobs, in first-seen order, keeping only those non-zero somewhere.
    pub fn nonzero_keys(&self, family: &str, jobs: &[(usize, usize, usize)]) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for &(t, p, e) in jobs {
            for (key, value) in self.job(t, p, e).map(|j| j.family(family)).unwrap_or_default() {
                if value != 0.0 && !keys.iter().any(|k| k == key) {
                    keys.push(key.to_string());
                }
            }
        }
        keys
    }
}
