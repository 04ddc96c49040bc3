//! The subcommands, and what they share: loading a trace and mapping failures to exit codes.

pub mod calibrate;
pub mod check;
pub mod dump;
pub mod engines;
pub mod gate;
pub mod inspect;
pub mod kvm_engine;
pub mod record;
pub mod replay;
pub mod report;
pub mod run;
pub mod story;
pub mod sweep;
pub mod symbol_list;
pub mod validate;
pub mod validate_kvm;
pub mod verdicts;
pub mod workloads;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use virtlab_engines::profile::BUILT_IN;
use virtlab_engines::Profile;
use virtlab_traces::{CheckError, TraceError};

pub const EXIT_INVALID: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_IO: u8 = 3;

/// Reads a whole file (a trace or an image). Mapping it instead would need `unsafe`, which this project keeps to
/// the KVM crate.
pub fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A profile by built-in name or by the path of a TOML file, with `--set` overrides. The engines parse profile
/// text; reading the file is the binary's job.
pub fn load_profile(name_or_path: &str, overrides: &[(String, String)]) -> anyhow::Result<Profile> {
    let path = Path::new(name_or_path);
    let built_in = BUILT_IN.iter().any(|(name, _)| *name == name_or_path);
    if built_in || !(path.extension().is_some_and(|ext| ext == "toml") || path.exists()) {
        return Ok(Profile::load_with(name_or_path, overrides)?);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read profile {name_or_path}"))?;
    Ok(Profile::parse(&text, name_or_path, overrides)?)
}

/// `key=value`, for `--param`.
pub fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not key=value (for example iterations=1000)")),
    }
}

/// 3 for I/O failures, 2 for a workload or parameter the catalog does not accept, 1 for a trace that is
/// malformed or breaks an invariant, 7 for a malformed budget file.
pub fn exit_code_for(error: &anyhow::Error) -> ExitCode {
    for cause in error.chain() {
        if let Some(error) = cause.downcast_ref::<virtlab_reports::gate::BudgetError>() {
            return ExitCode::from(if error.is_io() { EXIT_IO } else { gate::EXIT_BAD_BUDGETS });
        }
        if let Some(error) = cause.downcast_ref::<virtlab_reports::Error>() {
            return ExitCode::from(if error.is_io() { EXIT_IO } else { EXIT_INVALID });
        }
        if cause.is::<virtlab_workloads::WorkloadError>()
            || cause.is::<replay::UsageError>()
            || cause.is::<virtlab_engines::OptionError>()
            || cause.is::<virtlab_engines::ProfileError>()
        {
            return ExitCode::from(EXIT_USAGE);
        }
        if cause.is::<std::io::Error>() || matches!(cause.downcast_ref::<TraceError>(), Some(TraceError::Io(_))) {
            return ExitCode::from(EXIT_IO);
        }
        if cause.is::<TraceError>() || cause.is::<CheckError>() {
            return ExitCode::from(EXIT_INVALID);
        }
    }
    ExitCode::FAILURE
}

/// Writes to stdout, treating a closed pipe (`virtlab dump … | head`) as the reader having had enough.
pub fn finish_output(result: std::io::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("cannot write to standard output")?),
    }
}

/// Prints `text` and a newline to stdout.
pub fn print_line(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// A spinner with `message` and the elapsed time, drawn only on a terminal.
pub fn spinner(message: &str) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template("{msg} {spinner} {elapsed}").expect("valid template");
    progress.set_style(style);
    progress.set_message(message.to_string());
    progress.enable_steady_tick(std::time::Duration::from_millis(100));
    progress
}
