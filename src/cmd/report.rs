//! `virtlab report`: the HTML report (PNG charts) or Markdown tables of a results directory.

use std::path::PathBuf;
use std::process::ExitCode;

use virtlab_reports::Format;

/// Turn the results of `virtlab sweep` into a report: an HTML page with charts, or Markdown.
///
/// The page, DIR/index.html with its PNG charts in DIR/charts/, shows:
///   - the sweep (traces, engines, profiles, options) and any engine that refused a trace;
///   - the cheapest and dearest strategy per workload and profile;
///   - cycles relative to native for every workload, engine and profile;
///   - per workload: charts of cycles relative to native (grouped by engine, one bar per
///     profile; log scale when the values span more than two decades), exits by reason
///     and cycles by cause per engine (stacked, one chart per profile), the numbers behind
///     them, and the guest instructions (with their disassembly) that entered the monitor
///     most;
///   - binary-translation statistics, paravirtual hypercalls by kind, shadow paging;
///   - any other measurement the engines report;
///   - the validation against a paper when the results directory holds validation.json
///     (`cargo xtask bench` writes it; by hand:
///     `virtlab validate adams-agesen --json > RESULTS/validation.json`).
///
/// The page opens from disk: no server, no network, no script. Two reports of the same
/// results are byte-identical except the line saying when the page was generated.
///
/// `--format md` prints the same tables as Markdown on standard output instead.
///
/// Several directories are the shards of one sweep (`virtlab sweep --shard I/N`): every
/// shard must be there, once. An existing output directory is replaced only if it holds
/// a previous report (or nothing); the new report is built beside it and renamed into
/// place, so a failure leaves no partial report.
///
/// Examples:
///   virtlab report results -o report && xdg-open report/index.html
///   virtlab report results --format md | less
///   virtlab report results-0 results-1 results-2 -o report      # a sharded sweep
///
/// Exit status: 0 when the report is written; 1 when a results file is missing, corrupt,
/// from a newer schema or empty (the message names the file and what was expected); 2 for
/// a bad command line; 3 when a file cannot be read or written.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Results directories written by `virtlab sweep` (the shards of one sweep, or one directory).
    #[arg(required = true, value_name = "DIR")]
    results: Vec<PathBuf>,
    /// Where to write the HTML report (a directory); required with --format html.
    #[arg(short, long, value_name = "REPORT_DIR", required_if_eq("format", "html"))]
    output: Option<PathBuf>,
    /// `html`: index.html and charts in REPORT_DIR; `md`: Markdown tables on standard output.
    #[arg(long, default_value = "html", value_parser = ["html", "md"])]
    format: String,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let format = if args.format == "md" { Format::Markdown } else { Format::Html };
    match (format, &args.output) {
        (Format::Html, Some(output)) => {
            let progress = super::spinner("drawing the report");
            let written = virtlab_reports::write_report(&args.results, output)?;
            progress.finish_and_clear();
            eprintln!("{} charts", written.charts);
            super::finish_output(super::print_line(&written.index_html.display().to_string()))?;
        }
        _ => super::finish_output(super::print_line(&virtlab_reports::markdown_report(&args.results)?))?,
    }
    Ok(ExitCode::SUCCESS)
}
