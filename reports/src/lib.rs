//! virtlab's results table and report. `virtlab sweep` turns engine results (the JSON objects of
//! `virtlab replay --json`) into a long-format table with [`flatten`] and writes it with [`table::write_results`];
//! `virtlab report` reads it back with [`table::read_sweep`] and writes [`write_report`]'s HTML page and PNG
//! charts, or prints [`markdown_report`].
//!
//! **Invariant:** this crate never links an engine. It knows results only as rows of the table, so the engines
//! can add metric families and keys and the report shows them without a change here.

mod chart;
mod csv;
mod document;
mod error;
pub mod flatten;
pub mod gate;
mod index;
mod parquet_bounds;
mod report;
pub mod table;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

pub use error::{Error, Result};

/// The validation's JSON (`virtlab validate … --json`), read from a results directory when present.
pub const VALIDATION: &str = "validation.json";

/// Report formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Html,
    Markdown,
}

/// Reads `validation.json` from the first of `dirs` that has one.
pub fn read_validation(dirs: &[PathBuf]) -> Result<Option<Value>> {
    for dir in dirs {
        let path = dir.join(VALIDATION);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Read { path, source }),
        };
        let expected = "the JSON object `virtlab validate adams-agesen --json` prints";
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::invalid(&path, format!("not JSON ({e})"), expected))?;
        if !value.get("cells").is_some_and(Value::is_array) {
            return Err(Error::invalid(&path, "no list `cells`", expected));
        }
        return Ok(Some(value));
    }
    Ok(None)
}

/// The tables of the report for the results in `dirs` (one sweep, or its shards), as Markdown.
pub fn markdown_report(dirs: &[PathBuf]) -> Result<String> {
    let results = table::read_sweep(dirs)?;
    let validation = read_validation(dirs)?;
    let index = index::Index::new(&results);
    Ok(report::build(&index, validation.as_ref(), String::new()).document.markdown())
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub index_html: PathBuf,
    pub charts: usize,
}

/// Writes the report for the results in `dirs` into the directory `out`: `index.html` and `charts/*.png`. The
/// report is built beside `out` and renamed into place, so `out` is either the old report or the whole new one;
/// an existing `out` must be a previous report (it has an `index.html`) or empty.
pub fn write_report(dirs: &[PathBuf], out: &Path) -> Result<Written> {
    let results = table::read_sweep(dirs)?;
    let validation = read_validation(dirs)?;
    let index = index::Index::new(&results);
    let report = report::build(&index, validation.as_ref(), timestamp());
    if out.exists() && !is_replaceable(out) {
        return Err(Error::invalid(
            out,
            "exists and is neither empty nor a report (no index.html)",
            "a new directory, or a report to replace",
        ));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "report".into());
    let temp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write_into(&temp, &report).and_then(|()| replace_dir(&temp, out, &parent, &name));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result?;
    Ok(Written { index_html: out.join("index.html"), charts: report.charts.len() })
}

fn is_replaceable(dir: &Path) -> bool {
    dir.join("index.html").is_file() || std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

fn write_into(dir: &Path, report: &report::Report) -> Result<()> {
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(write_error(dir))?;
    }
    std::fs::create_dir_all(dir.join("charts")).map_err(write_error(dir))?;
    report.charts.par_iter().try_for_each(|c| c.chart.draw(&dir.join(&c.file)))?;
    let index = dir.join("index.html");
    std::fs::write(&index, report.document.html()).map_err(write_error(&index))
}

fn replace_dir(temp: &Path, out: &Path, parent: &Path, name: &str) -> Result<()> {
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| Error::Write { path: to.to_path_buf(), source })
    };
    if out.exists() {
        let old = parent.join(format!(".{name}.{}.old", std::process::id()));
        rename(out, &old)?;
        if let Err(e) = rename(temp, out) {
            let _ = std::fs::rename(&old, out);
            return Err(e);
        }
        std::fs::remove_dir_all(&old).map_err(|source| Error::Write { path: old, source })
    } else {
        rename(temp, out)
    }
}

/// `Generated 2026-01-31 13:05:09 UTC`: the one line that differs between two reports of the same results.
fn timestamp() -> String {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_date(days as i64);
    format!("Generated {year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_454), (2026, 1, 1));
    }
}
