//! `virtlab sweep`: traces × profiles × engines replayed in parallel into one long-format results table.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use virtlab_engines::{profile::BUILT_IN, EngineError, PreparedTrace};
use virtlab_reports::flatten;
use virtlab_reports::table::{Job, Manifest, Results, Row, Shard, SiteRow, REFUSED};
use virtlab_traces::TraceView;

use super::replay::{metrics_json, prepare, setup, Setup};
use super::verdicts::Verdicts;

/// Replay traces under engines and profiles, and write the results as a table.
///
/// Every trace is checked, then replayed under every engine with every profile (the jobs
/// run in parallel), and each engine's result becomes rows of a long-format table, one
/// number per row:
///
///   trace, workload, parameters, architecture, engine, profile, options, family, key, value
///
/// `family`/`key` are the names `virtlab replay --json` uses: totals/cycles,
/// exits/cpuid, cycles_by_cause/exits, hypercalls/mmu_update, translations/callouts,
/// shadow/hidden_faults, holes/popf_ignores_if, detectable/…; a family the engines add
/// later appears in the table as it is. An engine that refuses a trace gives one row,
/// family `refused`, with the reason as key (for example bt on a 64-bit trace without
/// `--set bt.lmsle=true`).
///
/// Writes into DIR (created if missing), each file atomically, `manifest.json` last:
///   results.parquet  the table (Parquet, for polars, pandas, DuckDB, Arrow)
///   results.csv      the same table as CSV
///   sites.parquet    per engine: guest address, kind (exit, callout, hypercall, holes,
///                    detectable), reason, count, the instruction's disassembly, and the
///                    guest function holding it (`name+0x1c`, when the trace names them)
///   manifest.json    schema version, traces, engines, profiles, options, shard, row counts,
///                    and each Parquet file's BLAKE3 digest (a changed file is refused by it)
/// The files are byte-identical for the same traces and command line, on any thread count.
///
/// Sharding: `--shard I/N` runs the I-th of N contiguous slices of the job list (jobs are
/// ordered trace, then profile, then engine), so N machines can each run one; the N
/// directories' tables, concatenated in shard order, are exactly the table of one run.
/// `virtlab report DIR0 DIR1 …` takes the shards' directories and joins them.
///
/// Every trace is checked once per sweep; `--verdicts FILE` remembers the valid ones by digest
/// across sweeps.
///
/// Examples:
///   virtlab sweep syscall.vlt pgfault.vlt --profile all --set bt.lmsle=true -o results
///   virtlab sweep traces/*.vlt --engine bt,hw-ept --profile p4-2006,sandybridge-2011 -o r
///   virtlab sweep traces/*.vlt --profile all --shard 3/8 -o results-3   # shard 3 of 8
///
/// Engines, profiles and --set keys are those of `virtlab replay` (see its --help), except
/// `kvm`: it measures this host's hypervisor by booting the guest, so `all` here means the
/// seven modelled engines and `virtlab replay --engine kvm` measures the real one.
///
/// Exit status: 0 when the table is written (refusals are rows of it); 1 for a trace that
/// is malformed or fails the checker (nothing is written); 2 for a bad engine, profile,
/// --set or --shard; 3 for a file that cannot be read or written.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Trace files, from `virtlab record` (or the cache of `cargo xtask bench`).
    #[arg(required = true, value_name = "TRACE")]
    traces: Vec<PathBuf>,
    /// An engine name, a comma-separated list, or `all`.
    #[arg(long, default_value = "all")]
    engine: String,
    /// Built-in profile names or profile TOML files, comma-separated or repeated; `all` for every built-in one.
    #[arg(long, value_delimiter = ',', default_value = "p4-2006", value_name = "NAME|FILE|all")]
    profile: Vec<String>,
    /// An engine option or profile primitive as key=value, applied to every job; repeat for several.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = super::parse_param)]
    settings: Vec<(String, String)>,
    /// Run only slice I (counted from 0) of N of the jobs.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<(u64, u64)>,
    /// The results directory.
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Worker threads (default: one per core). Results do not depend on it.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Keep the checker's verdicts in FILE (JSON, created if missing), by each trace's BLAKE3 digest: a trace this
    /// virtlab already found valid is hashed, not checked again. Verdicts of another virtlab are not used.
    #[arg(long, value_name = "FILE")]
    verdicts: Option<PathBuf>,
}

fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let parsed = text.split_once('/').and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u64>().ok()?)));
    match parsed {
        Some((index, count)) if index < count => Ok((index, count)),
        _ => Err(format!("`{text}` is not I/N with 0 <= I < N (for example 0/4 for the first of four shards)")),
    }
}

/// The sweep's jobs: `traces` × `profiles` × `engines`, in that nesting; a job's number is its place in it.
struct Plan {
    setups: Vec<Setup>,
    traces: Vec<PathBuf>,
    options: String,
}

impl Plan {
    fn engines(&self) -> usize {
        self.setups[0].engines.len()
    }

    fn total(&self) -> u64 {
        (self.traces.len() * self.setups.len() * self.engines()) as u64
    }

    /// The engines of (trace, profile) that fall in jobs `first..end`.
    fn engine_range(&self, trace: usize, profile: usize, first: u64, end: u64) -> std::ops::Range<usize> {
        let base = ((trace * self.setups.len() + profile) * self.engines()) as u64;
        let from = first.saturating_sub(base).min(self.engines() as u64) as usize;
        let to = end.saturating_sub(base).min(self.engines() as u64) as usize;
        from..to.max(from)
    }
}

/// What to sweep: the command line's traces, engines, profiles, `--set` pairs, shard and threads.
pub struct Request<'a> {
    pub traces: &'a [PathBuf],
    pub engine: &'a str,
    pub profiles: &'a [String],
    pub settings: &'a [(String, String)],
    pub shard: Option<(u64, u64)>,
    pub threads: Option<usize>,
    /// The file of the checker's cached verdicts (`--verdicts`), if any.
    pub verdicts: Option<&'a std::path::Path>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let request = Request {
        traces: &args.traces,
        engine: &args.engine,
        profiles: &args.profile,
        settings: &args.settings,
        shard: args.shard,
        threads: args.threads,
        verdicts: args.verdicts.as_deref(),
    };
    let results = sweep(&request)?;
    virtlab_reports::table::write_results(&args.output, &results)?;
    let shard = &results.manifest.shard;
    eprintln!(
        "{}: {} rows from {} jobs{}",
        args.output.display(),
        results.rows.len(),
        shard.end - shard.first,
        if shard.count > 1 {
            format!(" (shard {}/{} of {} jobs)", shard.index, shard.count, shard.total)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Replays the request's jobs (a progress bar on the terminal) and returns their results table.
pub fn sweep(request: &Request<'_>) -> anyhow::Result<Results> {
    let names: Vec<String> = if request.profiles.iter().any(|p| p == "all") {
        BUILT_IN.iter().map(|(name, _)| name.to_string()).collect()
    } else {
        request.profiles.to_vec()
    };
    let setups: Vec<Setup> =
        names.iter().map(|name| setup(request.engine, name, request.settings)).collect::<anyhow::Result<_>>()?;
    if request.engine != "all" && setups.iter().any(|s| s.kvm.is_some()) {
        return Err(super::replay::UsageError(
            "the sweep replays the modelled engines; kvm measures this host's hypervisor one boot at a time: \
             run `virtlab replay TRACE --engine kvm` for it"
                .into(),
        )
        .into());
    }
    let options = request.settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let plan = Plan { setups, traces: request.traces.to_vec(), options };
    let (index, count) = request.shard.unwrap_or((0, 1));
    let total = plan.total();
    let shard = Shard { index, count, first: total * index / count, end: total * (index + 1) / count, total };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(request.threads.unwrap_or(0)).build()?;
    let progress = ProgressBar::new(shard.end - shard.first);
    progress.set_style(ProgressStyle::with_template("sweep {bar:30} {pos}/{len} jobs {elapsed} {msg}")?);
    let mut results = Results {
        manifest: Manifest {
            written_by: format!("virtlab {}", env!("CARGO_PKG_VERSION")),
            shard: shard.clone(),
            traces: plan.traces.iter().map(|t| t.display().to_string()).collect(),
            engines: plan.setups[0].engines.iter().map(|e| e.name().to_string()).collect(),
            profiles: plan.setups.iter().map(|s| s.profile.name.clone()).collect(),
            options: plan.options.clone(),
        },
        rows: Vec::new(),
        sites: Vec::new(),
    };
    let mut verdicts = request.verdicts.map(Verdicts::load).transpose()?;
    for t in 0..plan.traces.len() {
        let ranges: Vec<_> = (0..plan.setups.len()).map(|p| plan.engine_range(t, p, shard.first, shard.end)).collect();
        if ranges.iter().all(|r| r.is_empty()) {
            continue;
        }
        progress.set_message(plan.traces[t].display().to_string());
        pool.install(|| sweep_trace(&plan, t, &ranges, verdicts.as_mut(), &mut results, &progress))?;
    }
    progress.finish_and_clear();
    if let Some(verdicts) = &verdicts {
        verdicts.save()?;
    }
    Ok(results)
}

/// Replays one trace under the engines in `ranges` (one range per profile) and appends their rows and sites.
fn sweep_trace(
    plan: &Plan,
    t: usize,
    ranges: &[std::ops::Range<usize>],
    verdicts: Option<&mut Verdicts>,
    results: &mut Results,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let path = &plan.traces[t];
    let name = path.display().to_string();
    let bytes = super::read_file(path)?;
    let trace = match verdicts {
        Some(verdicts) => verdicts.prepare(&bytes, &name)?,
        None => prepare(&bytes, &name)?,
    };
    let metadata = trace.view.metadata();
    let job = |p: usize, engine: &str| Job {
        trace: name.clone(),
        workload: metadata.workload.clone(),
        parameters: metadata.params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        architecture: if trace.has_64_bit_code() { "x86-64" } else { "x86-32" }.to_string(),
        engine: engine.to_string(),
        profile: plan.setups[p].profile.name.clone(),
        options: plan.options.clone(),
    };
    let outcomes: Vec<Vec<_>> = (0..plan.setups.len())
        .into_par_iter()
        .map(|p| {
            let s = &plan.setups[p];
            let outcomes = virtlab_engines::replay_many(&trace, &s.engines[ranges[p].clone()], &s.profile, &s.options);
            progress.inc(outcomes.len() as u64);
            outcomes
        })
        .collect();
    let mut sites = Vec::new();
    for (p, outcomes) in outcomes.into_iter().enumerate() {
        let s = &plan.setups[p];
        for (engine, outcome) in s.engines[ranges[p].clone()].iter().zip(outcomes) {
            let job = job(p, engine.name());
            match outcome {
                Ok(metrics) => {
                    let mut value = metrics_json(engine.name(), &s.profile, metadata, &metrics, usize::MAX);
                    let object = value.as_object_mut().expect("an engine's result is a JSON object");
                    for site in flatten::sites(object) {
                        sites.push((job.clone(), site));
                    }
                    // The top sites' counts are the exits, callouts and hypercalls already in their families.
                    object.remove("top_sites");
                    results.rows.extend(flatten::metrics(object).into_iter().map(|m| Row {
                        job: job.clone(),
                        family: m.family,
                        key: m.key,
                        value: m.value,
                    }));
                }
                Err(EngineError::Unsupported(reason)) => {
                    results.rows.push(Row { job, family: REFUSED.into(), key: reason, value: 1.0 })
                }
                Err(other) => bail!(anyhow::Error::new(other).context(format!("engine {} on {name}", engine.name()))),
            }
        }
    }
    let wanted: BTreeSet<u64> = sites.iter().map(|(_, site)| site.address).collect();
    let text = disassemble(&trace, &wanted);
    results.sites.extend(sites.into_iter().map(|(job, site)| SiteRow {
        job,
        address: site.address,
        disassembly: text.get(&site.address).cloned().unwrap_or_default(),
        kind: site.kind,
        reason: site.reason,
        count: site.count,
        function: site.function,
    }));
    Ok(())
}

/// Intel-syntax text of the instructions at `addresses`, from the first block of the trace that holds each.
fn disassemble(trace: &PreparedTrace<'_>, addresses: &BTreeSet<u64>) -> HashMap<u64, String> {
    let mut formatter = IntelFormatter::new();
    let mut text = HashMap::new();
    let view: &TraceView<'_> = &trace.view;
    for (_, block) in view.blocks().iter() {
        let end = block.address.saturating_add(block.bytes.len() as u64);
        if addresses.range(block.address..end).next().is_none() {
            continue;
        }
        for instruction in Decoder::with_ip(block.mode.bitness(), &block.bytes, block.address, DecoderOptions::NONE) {
            if addresses.contains(&instruction.ip()) && !text.contains_key(&instruction.ip()) {
                let mut out = String::new();
                formatter.format(&instruction, &mut out);
                text.insert(instruction.ip(), out);
            }
        }
    }
    text
}
