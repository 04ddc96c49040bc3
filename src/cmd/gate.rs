//! `virtlab gate`: exit-count budgets checked against a sweep's results, breaches blamed on guest instructions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use virtlab_engines::{engine, Metrics, Profile};
use virtlab_reports::gate::render::{self, Context as RenderContext};
use virtlab_reports::gate::{self, Budgets, Headroom, Vocabulary};
use virtlab_reports::table::{read_sweep, write_results, Results};
use virtlab_traces::Metadata;

/// Exit status when a budget is exceeded, or a budgeted pair is missing from the results.
pub const EXIT_OVER_BUDGET: u8 = 6;
/// Exit status when the budget file is malformed (or names an engine, metric or workload the gate does not know).
pub const EXIT_BAD_BUDGETS: u8 = 7;

/// Fail when a guest exits more than its budget allows, and name the guest instructions that did it.
///
/// Counts from a deterministic trace are exact, so the gate is exact: a budget of 202 fails at
/// 203. It checks each budgeted metric of each (workload, engine) pair against the results of
/// `virtlab sweep` (--results DIR), or sweeps the given traces itself with the budgets' profile
/// and options. For each breach it prints the guest addresses that account for the metric,
/// disassembled and named by function (`main+0xf`, from the trace's symbol map); with
/// --baseline (an earlier run's results, such as main's), the sites that are new or grew.
///
/// The budget file (TOML, committed with the code; `budgets/catalog.toml` is the lab's own):
///
///   [gate]
///   version = 1
///   profile = "p4-2006"              # the cost profile the counts are taken under
///   options = ["bt.lmsle=true"]      # the sweep's --set options
///
///   [[workload]]                     # one per name, parameters and architecture
///   name = "syscall"                 # as `virtlab inspect` shows it
///   parameters = { iterations = 100, counters = 0 }
///   architecture = "x86-64"          # or x86-32
///
///   [workload.trap-emulate]          # one table per engine
///   exits.total = 214                # at most 214 exits in the whole run
///   exits.system_call = { max = 202, comment = "SYSCALL and SYSRET trap" }
///   hypercalls.total = { per_iteration = 0.5 }   # x the `iterations` parameter
///   holes.total = 0
///
/// Metrics: exits.total and exits.<reason> (cpuid, hlt, io_instruction, …), hypercalls.total
/// and hypercalls.<kind> (mmu_update, …), translations.<key> (blocks, callouts, …),
/// shadow.<key> (hidden_faults, …), holes.total, detectable.total, emulated_instructions.
/// An unknown engine, metric or workload is an error naming its line.
///
/// Output: a table of the breaches (--all: of every budget) with workload, engine, metric,
/// budget, actual and over by; the blame under each breach; the budgeted pairs missing from
/// the results (they fail the gate unless --allow-missing); the measured pairs without a
/// budget; a closing summary line. --json prints one object instead (format virtlab-gate,
/// version 1); --junit and --markdown also write JUnit XML and a Markdown summary (for
/// `$GITHUB_STEP_SUMMARY`, say).
///
/// `--update` rewrites the budget file from the results instead of checking it: every
/// budget becomes the measured count plus --headroom (0% by default), a per-iteration
/// budget stays one, and each measured pair without budgets gets them (total exits, holes
/// and detectable events; exits by reason, hypercalls, translations.callouts,
/// shadow.hidden_faults and emulated_instructions where not zero). Comments and order are
/// kept.
///
/// Examples:
///   virtlab gate budgets.toml syscall.vlt pgfault.vlt
///   virtlab gate budgets.toml --results results --baseline main-results --junit gate.xml
///   virtlab gate budgets.toml traces/*.vlt --update --headroom 5%
///
/// Exit status: 0 when every budget holds; 6 when a budget is exceeded or a budgeted pair is
/// missing from the results; 7 when the budget file is malformed or names what the gate does
/// not know; 1 for an invalid trace or results directory; 2 for a bad command line; 3 for a
/// file that cannot be read or written.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The budget file.
    budgets: PathBuf,
    /// Trace files to sweep (every modelled engine, the budgets' profile and options).
    #[arg(value_name = "TRACE", required_unless_present = "results", conflicts_with = "results")]
    traces: Vec<PathBuf>,
    /// A results directory of `virtlab sweep` to check instead; repeat for the shards of one sweep.
    #[arg(long, value_name = "DIR")]
    results: Vec<PathBuf>,
    /// An earlier run's results directory: each breach's blame lists the sites that are new or grew since.
    #[arg(long, value_name = "DIR")]
    baseline: Vec<PathBuf>,
    /// Budgeted pairs missing from the results are listed without failing the gate.
    #[arg(long)]
    allow_missing: bool,
    /// List every budget, not only the breaches.
    #[arg(long)]
    all: bool,
    /// Print the verdict as one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write the verdict as JUnit XML (one test case per budget) to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Also write the verdict as Markdown to FILE.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Write the swept traces' results table to DIR (a later run's --baseline).
    #[arg(long, value_name = "DIR", requires = "traces")]
    save_results: Option<PathBuf>,
    /// Rewrite the budget file from the results instead of checking it.
    #[arg(long)]
    update: bool,
    /// With --update: how far above the measured count each budget is set, in percent.
    #[arg(long, default_value = "0%", value_name = "PERCENT", requires = "update")]
    headroom: Headroom,
    /// Worker threads for the sweep (default: one per core). Results do not depend on it.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

/// The engines, the catalog's workloads, and the metrics an engine's result has (read from the result of an
/// engine that measured nothing, so that every family and key the engines report is there).
fn vocabulary() -> anyhow::Result<Vocabulary> {
    let engines = engine::all().iter().map(|e| e.name().to_string()).collect();
    let workloads = virtlab_workloads::catalog().iter().map(|spec| spec.name.to_string()).collect();
    let profile = Profile::load_with("p4-2006", &[])?;
    let mut empty = super::replay::metrics_json("native", &profile, &Metadata::default(), &Metrics::default(), 0);
    let object = empty.as_object_mut().expect("an engine's result is a JSON object");
    let keys: Vec<(String, String)> =
        virtlab_reports::flatten::metrics(object).into_iter().map(|m| (m.family, m.key)).collect();
    Ok(Vocabulary::new(engines, workloads, &keys))
}

/// The budgets, their profile's name made the one results carry (a profile file's results carry the name
/// inside it), and the profile as the file gives it (a name or a path), for the sweep.
fn read_budgets(path: &Path, vocabulary: &Vocabulary) -> anyhow::Result<(Budgets, String)> {
    let text =
        std::fs::read_to_string(path).map_err(|source| gate::BudgetError::Read { path: path.to_path_buf(), source })?;
    let mut budgets = Budgets::parse(&text, path, vocabulary)?;
    let profile = super::load_profile(&budgets.profile, &[])
        .map_err(|e| gate::BudgetError::at(path, None, format!("[gate] profile `{}`: {e:#}", budgets.profile)))?;
    let given = std::mem::replace(&mut budgets.profile, profile.name);
    Ok((budgets, given))
}

/// The results to check: the given directories, or a sweep of the given traces with `profile` (saved when
/// asked).
fn results(args: &Args, budgets: &Budgets, profile: String) -> anyhow::Result<Results> {
    if !args.results.is_empty() {
        return Ok(read_sweep(&args.results)?);
    }
    let profiles = [profile];
    let request = super::sweep::Request {
        traces: &args.traces,
        engine: "all",
        profiles: &profiles,
        settings: &budgets.options,
        shard: None,
        threads: args.threads,
        verdicts: None,
    };
    let results = super::sweep::sweep(&request)?;
    if let Some(dir) = &args.save_results {
        write_results(dir, &results)?;
    }
    Ok(results)
}

fn write_output(path: &Path, text: &str) -> anyhow::Result<()> {
    virtlab_traces::atomic::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let vocabulary = vocabulary()?;
    let (budgets, profile) = read_budgets(&args.budgets, &vocabulary)?;
    let results = results(args, &budgets, profile)?;
    if args.update {
        let summary = gate::update(&args.budgets, &vocabulary, &results, args.headroom)?;
        eprintln!(
            "{}: {} budgets changed, {} unchanged, {} engine tables added ({} new workloads), {} budgeted pairs \
             not measured (left as they were); headroom {}%",
            args.budgets.display(),
            summary.changed,
            summary.unchanged,
            summary.added_engines,
            summary.added_workloads,
            summary.not_measured,
            headroom_text(args.headroom.percent())
        );
        return Ok(ExitCode::SUCCESS);
    }
    let baseline = if args.baseline.is_empty() { None } else { Some(read_sweep(&args.baseline)?) };
    let verdict = gate::check(&budgets, &args.budgets, &vocabulary, &results, baseline.as_ref(), args.allow_missing)?;
    let name = args.budgets.display().to_string();
    let context = RenderContext { budgets: &name, profile: &budgets.profile, options: &budgets.options };
    if let Some(path) = &args.junit {
        write_output(path, &render::junit(&context, &verdict))?;
    }
    if let Some(path) = &args.markdown {
        write_output(path, &render::markdown(&context, &verdict))?;
    }
    let text = match args.json {
        true => serde_json::to_string_pretty(&render::json(&context, &verdict))?,
        false => render::text(&context, &verdict, args.all).trim_end().to_string(),
    };
    super::finish_output(super::print_line(&text))?;
    Ok(if verdict.passed() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_OVER_BUDGET) })
}

fn headroom_text(percent: f64) -> String {
    let text = format!("{percent:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}
