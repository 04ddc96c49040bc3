//! `virtlab record`: run a guest on the reference machine and write its trace.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use virtlab_machine::MachineConfig;
use virtlab_record::{record_to_file, RecordRequest};
use virtlab_traces::{EndReason, Metadata, Symbol, SymbolMap};
use virtlab_workloads::GuestImage;

/// Record a guest's execution as a trace: a catalog workload (built with its parameters) or an image file.
///
/// The trace names the guest's functions: a catalog image's come from the assembler's labels (kernel routines,
/// the workload's `driver`, a user program's `main`); for an image file, `--symbols` reads them from a symbol
/// list (`nm --print-size --defined-only kernel.elf > kernel.map`). `virtlab dump`, `replay`, `sweep`, `report`
/// and `gate` then show `sys_getpid+0x12` beside an instruction's address.
///
/// Examples:
///   virtlab record syscall --param iterations=1000 -o syscall.vlt
///   virtlab record --image guest.bin --symbols guest.map -o guest.vlt
///
/// Exit status: 0 when the guest ran to its exit (whatever status it exited with: see `virtlab inspect`); 124
/// when a limit stopped it (the trace is written, marked incomplete); 125 when the guest could not go on (triple
/// fault, an instruction the reference machine does not model: the trace is written, marked incomplete, with
/// the reason) or could not start.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// A workload from `virtlab workloads list`.
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    workload: Option<String>,
    /// Workload parameter as key=value; repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = super::parse_param, requires = "workload")]
    params: Vec<(String, String)>,
    /// A Multiboot image to record instead of a workload.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The image's functions, one per line as `nm --print-size` prints them: ADDRESS SIZE TYPE NAME (hex
    /// address and size; code types t, T, w, W kept; lines without a size, and `#` comments, skipped).
    #[arg(long, requires = "image", value_name = "FILE")]
    symbols: Option<PathBuf>,
    /// Where to write the trace.
    #[arg(short, long)]
    output: PathBuf,
    /// Stop after this many instructions.
    #[arg(long, default_value_t = 2_000_000_000, value_name = "N")]
    max_instructions: u64,
    /// Stop after this many seconds of wall-clock time (at the next block boundary).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let (bytes, metadata) = match (&args.workload, &args.image) {
        (Some(name), _) => {
            let image = virtlab_workloads::build(name, &args.params)?;
            let params = image.params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let metadata = catalog_metadata(&image, params)?;
            (image.bytes, metadata)
        }
        (None, Some(path)) => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let symbols = match &args.symbols {
                Some(file) => super::symbol_list::read(file)?,
                None => SymbolMap::default(),
            };
            (super::read_file(path)?, Metadata { workload: name, symbols, ..recorder_metadata() })
        }
        (None, None) => unreachable!("clap requires one of them"),
    };
    let request = RecordRequest {
        image: &bytes,
        metadata,
        machine: MachineConfig::default(),
        max_instructions: args.max_instructions,
        timeout: args.timeout.map(|s| Duration::from_secs_f64(s.max(0.0))),
    };
    let progress = super::spinner("recording");
    let summary =
        record_to_file(&args.output, request).with_context(|| format!("recording into {}", args.output.display()))?;
    progress.finish_and_clear();
    let file_bytes = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    let ending = &summary.ending;
    let how = match ending.reason {
        EndReason::GuestExit => format!("the guest exited with status {}", ending.exit_status),
        other => format!("INCOMPLETE ({}): {}", other.name(), ending.detail),
    };
    eprintln!(
        "{}: {} instructions, {file_bytes} bytes ({:.3} bytes/instruction); {how}",
        args.output.display(),
        summary.instructions,
        file_bytes as f64 / summary.instructions.max(1) as f64
    );
    Ok(ExitCode::from(match ending.reason {
        EndReason::GuestExit => 0,
        EndReason::InstructionLimit | EndReason::Timeout => super::run::EXIT_STOPPED,
        EndReason::TripleFault | EndReason::MachineError => super::run::EXIT_CANNOT_RUN,
    }))
}

fn recorder_metadata() -> Metadata {
    Metadata {
        recorder: "virtlab reference machine".into(),
        recorder_version: env!("CARGO_PKG_VERSION").into(),
        ..Metadata::default()
    }
}

/// Records a catalog workload in memory on the reference machine, as `virtlab record` would, and insists that
/// it ran to a clean exit: what `validate` and `calibrate host` replay.
pub fn record_catalog_trace(workload: &str, params: &[(String, String)]) -> anyhow::Result<Vec<u8>> {
    let image = virtlab_workloads::build(workload, params)?;
    let metadata = catalog_metadata(&image, params.to_vec())?;
    virtlab_record::record_in_memory(&image.bytes, metadata, 2_000_000_000)
        .with_context(|| format!("recording {workload} {params:?}"))
}

/// A catalog image's metadata: its name, the given parameters, and its functions from the assembler's labels.
fn catalog_metadata(image: &GuestImage, params: Vec<(String, String)>) -> anyhow::Result<Metadata> {
    let symbols = image.symbols.iter().map(|s| Symbol { name: s.name.clone(), start: s.start, end: s.end }).collect();
    let symbols = SymbolMap::new(symbols).with_context(|| format!("the symbols of workload {}", image.workload))?;
    Ok(Metadata { workload: image.workload.to_string(), params, symbols, ..recorder_metadata() })
}
