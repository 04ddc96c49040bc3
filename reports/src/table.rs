//! The results table: long-format rows (one number per row) and guest-address sites, written by `virtlab sweep`
//! as Parquet (and the rows as CSV too) with a manifest, and read back, checked, by the report.
//!
//! A results directory holds `results.parquet`, `results.csv`, `sites.parquet` and `manifest.json`. The manifest
//! is written last and removed first, so a directory whose manifest is present holds a complete sweep (or shard).

use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde_json::{json, Value};
use virtlab_traces::atomic::write_atomic;

use crate::error::{Error, Result};

/// Version of the files' layout. A reader refuses a newer one by name; bump it when a column changes meaning or
/// disappears (new columns, families and keys need no bump: readers ignore what they do not know).
pub const SCHEMA_VERSION: u64 = 1;

pub const MANIFEST: &str = "manifest.json";
pub const RESULTS_PARQUET: &str = "results.parquet";
pub const RESULTS_CSV: &str = "results.csv";
pub const SITES_PARQUET: &str = "sites.parquet";
const FORMAT: &str = "virtlab-results";

/// What one row of either table says it was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Job {
    /// The trace file as named on the sweep's command line.
    pub trace: String,
    pub workload: String,
    /// The workload's parameters, `key=value` joined with `,`.
    pub parameters: String,
    /// `x86-64` when the trace runs 64-bit code, else `x86-32`.
    pub architecture: String,
    pub engine: String,
    pub profile: String,
    /// The sweep's `--set` pairs, `key=value` joined with `,`.
    pub options: String,
}

/// One number: `family`/`key` name it (`exits`/`cpuid`); a refusing engine has one row, family [`REFUSED`],
/// with the reason as key and 1 as value.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub job: Job,
    pub family: String,
    pub key: String,
    pub value: f64,
}

/// The family of the one row a refusing engine has.
pub const REFUSED: &str = "refused";

/// One guest instruction address an engine attributes counts to, with that instruction's disassembly.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRow {
    pub job: Job,
    pub address: u64,
    pub kind: String,
    pub reason: String,
    pub count: u64,
    pub disassembly: String,
    /// The guest function holding the address, `name+0x1c` (empty when the trace names no functions, and in
    /// results written before the column existed).
    pub function: String,
}

/// Which part of a sweep a directory holds: jobs `first..end` of `total`, shard `index` of `count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
    pub first: u64,
    pub end: u64,
    pub total: u64,
}

/// What a sweep was asked to do, as its manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub written_by: String,
    pub shard: Shard,
    pub traces: Vec<String>,
    pub engines: Vec<String>,
    pub profiles: Vec<String>,
    pub options: String,
}

/// A results directory's contents.
#[derive(Debug, Clone, PartialEq)]
pub struct Results {
    pub manifest: Manifest,
    pub rows: Vec<Row>,
    pub sites: Vec<SiteRow>,
}

const JOB_COLUMNS: [&str; 7] = ["trace", "workload", "parameters", "architecture", "engine", "profile", "options"];

fn job_columns<'a>(jobs: impl Iterator<Item = &'a Job> + Clone) -> Vec<Column> {
    let column =
        |name: &str, field: fn(&Job) -> &str| Column::new(name.into(), jobs.clone().map(field).collect::<Vec<&str>>());
    vec![
        column("trace", |j| &j.trace),
        column("workload", |j| &j.workload),
        column("parameters", |j| &j.parameters),
        column("architecture", |j| &j.architecture),
        column("engine", |j| &j.engine),
        column("profile", |j| &j.profile),
        column("options", |j| &j.options),
    ]
}

fn polars_error(path: &Path, what: &str) -> impl FnOnce(PolarsError) -> Error {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |error| Error::invalid(path, format!("{what}: {error}"), "a Parquet file written by `virtlab sweep`")
}

fn parquet_bytes(path: &Path, columns: Vec<Column>, height: usize) -> Result<Vec<u8>> {
    let mut frame = DataFrame::new(height, columns).map_err(polars_error(path, "cannot build the table"))?;
    let mut bytes = Vec::new();
    ParquetWriter::new(&mut bytes).finish(&mut frame).map_err(polars_error(path, "cannot encode the table"))?;
    Ok(bytes)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes).map_err(|source| Error::Write { path: path.to_path_buf(), source })
}

/// Writes `results` into `dir` (created if missing): the manifest is removed first and written last, each file
/// atomically, so a reader never takes a half-written sweep for a whole one.
pub fn write_results(dir: &Path, results: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
    let manifest_path = dir.join(MANIFEST);
    match std::fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::Write { path: manifest_path, source: e })
        }
        _ => {}
    }
    let rows = &results.rows;
    let mut columns = job_columns(rows.iter().map(|r| &r.job));
    columns.push(Column::new("family".into(), rows.iter().map(|r| r.family.as_str()).collect::<Vec<_>>()));
    columns.push(Column::new("key".into(), rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>()));
    columns.push(Column::new("value".into(), rows.iter().map(|r| r.value).collect::<Vec<f64>>()));
    let path = dir.join(RESULTS_PARQUET);
    let results_parquet = parquet_bytes(&path, columns, rows.len())?;
    write(&path, &results_parquet)?;
    write(&dir.join(RESULTS_CSV), crate::csv::results(rows).as_bytes())?;

    let sites = &results.sites;
    let mut columns = job_columns(sites.iter().map(|s| &s.job));
    columns.push(Column::new("address".into(), sites.iter().map(|s| s.address).collect::<Vec<u64>>()));
    columns.push(Column::new("kind".into(), sites.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>()));
    columns.push(Column::new("reason".into(), sites.iter().map(|s| s.reason.as_str()).collect::<Vec<_>>()));
    columns.push(Column::new("count".into(), sites.iter().map(|s| s.count).collect::<Vec<u64>>()));
    columns.push(Column::new("disassembly".into(), sites.iter().map(|s| s.disassembly.as_str()).collect::<Vec<_>>()));
    columns.push(Column::new("function".into(), sites.iter().map(|s| s.function.as_str()).collect::<Vec<_>>()));
    let path = dir.join(SITES_PARQUET);
    let sites_parquet = parquet_bytes(&path, columns, sites.len())?;
    write(&path, &sites_parquet)?;

    let digests = [digest(&results_parquet), digest(&sites_parquet)];
    // `{:#}` is serde_json's pretty form of a value, which cannot fail to serialize.
    let text = format!("{:#}\n", manifest_json(&results.manifest, rows.len(), sites.len(), &digests));
    write(&manifest_path, text.as_bytes())
}

/// A file's BLAKE3 digest in hex, as the manifest records it.
fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn manifest_json(m: &Manifest, rows: usize, sites: usize, digests: &[String; 2]) -> Value {
    let s = &m.shard;
    json!({
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "written_by": m.written_by,
        "shard": { "index": s.index, "count": s.count },
        "jobs": { "first": s.first, "end": s.end, "total": s.total },
        "traces": m.traces,
        "engines": m.engines,
        "profiles": m.profiles,
        "options": m.options,
        "rows": { RESULTS_PARQUET: rows, SITES_PARQUET: sites },
        "blake3": { RESULTS_PARQUET: digests[0], SITES_PARQUET: digests[1] },
    })
}

/// Reads and checks a results directory: the manifest's format and schema version, each Parquet file's columns,
/// and that each file holds the rows the manifest counts.
pub fn read_results(dir: &Path) -> Result<Results> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::invalid(
            &manifest_path,
            "missing",
            format!("{} to be a results directory written by `virtlab sweep -o {}`", dir.display(), dir.display()),
        ),
        _ => Error::Read { path: manifest_path.clone(), source },
    })?;
    let (manifest, counts, digests) = parse_manifest(&manifest_path, &text)?;
    let results_path = dir.join(RESULTS_PARQUET);
    let frame = read_parquet(&results_path, counts.0, digests.0.as_deref())?;
    let jobs = read_jobs(&results_path, &frame)?;
    let family = strings(&results_path, &frame, "family")?;
    let key = strings(&results_path, &frame, "key")?;
    let value = numbers_f64(&results_path, &frame, "value")?;
    let rows = (0..frame.height())
        .map(|i| Row { job: jobs[i].clone(), family: family[i].clone(), key: key[i].clone(), value: value[i] })
        .collect();
    let sites_path = dir.join(SITES_PARQUET);
    let frame = read_parquet(&sites_path, counts.1, digests.1.as_deref())?;
    let jobs = read_jobs(&sites_path, &frame)?;
    let address = numbers_u64(&sites_path, &frame, "address")?;
    let kind = strings(&sites_path, &frame, "kind")?;
    let reason = strings(&sites_path, &frame, "reason")?;
    let count = numbers_u64(&sites_path, &frame, "count")?;
    let disassembly = strings(&sites_path, &frame, "disassembly")?;
    // Added after schema 1 was written: absent in older results, which name no functions.
    let function = match frame.column("function") {
        Ok(_) => strings(&sites_path, &frame, "function")?,
        Err(_) => vec![String::new(); frame.height()],
    };
    let sites = (0..frame.height())
        .map(|i| SiteRow {
            job: jobs[i].clone(),
            address: address[i],
            kind: kind[i].clone(),
            reason: reason[i].clone(),
            count: count[i],
            disassembly: disassembly[i].clone(),
            function: function[i].clone(),
        })
        .collect();
    Ok(Results { manifest, rows, sites })
}

fn field<'a>(path: &Path, object: &'a Value, key: &str, expected: &str) -> Result<&'a Value> {
    object.pointer(key).ok_or_else(|| Error::invalid(path, format!("no `{}`", &key[1..]), expected.to_string()))
}

fn unsigned(path: &Path, object: &Value, key: &str) -> Result<u64> {
    field(path, object, key, "an unsigned integer")?
        .as_u64()
        .ok_or_else(|| Error::invalid(path, format!("`{}` is not an unsigned integer", &key[1..]), "one"))
}

fn text_list(path: &Path, object: &Value, key: &str) -> Result<Vec<String>> {
    let problem = || Error::invalid(path, format!("`{}` is not a list of text", &key[1..]), "a list of names");
    field(path, object, key, "a list of names")?
        .as_array()
        .ok_or_else(problem)?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(problem))
        .collect()
}

/// The manifest and the row counts it promises for (results, sites).
/// The BLAKE3 digests manifest.json gives results.parquet and sites.parquet (absent from results written before
/// the manifest recorded them).
type Digests = (Option<String>, Option<String>);

/// The manifest, the row counts it gives each Parquet file, and their digests.
fn parse_manifest(path: &Path, text: &str) -> Result<(Manifest, (u64, u64), Digests)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Error::invalid(path, format!("not JSON ({e})"), "the manifest `virtlab sweep` writes (a JSON object)")
    })?;
    if value.pointer("/format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(Error::invalid(path, "`format` is not `virtlab-results`", "a manifest written by `virtlab sweep`"));
    }
    let version = unsigned(path, &value, "/schema_version")?;
    if version > SCHEMA_VERSION {
        return Err(Error::NewerSchema { path: path.to_path_buf(), found: version, supported: SCHEMA_VERSION });
    }
    if version == 0 {
        return Err(Error::invalid(path, "`schema_version` is 0", format!("1..={SCHEMA_VERSION}")));
    }
    let shard = Shard {
        index: unsigned(path, &value, "/shard/index")?,
        count: unsigned(path, &value, "/shard/count")?,
        first: unsigned(path, &value, "/jobs/first")?,
        end: unsigned(path, &value, "/jobs/end")?,
        total: unsigned(path, &value, "/jobs/total")?,
    };
    if shard.index >= shard.count || shard.first > shard.end || shard.end > shard.total {
        return Err(Error::invalid(
            path,
            format!(
                "shard {}/{} with jobs {}..{} of {}",
                shard.index, shard.count, shard.first, shard.end, shard.total
            ),
            "a shard index below the shard count and jobs first <= end <= total",
        ));
    }
    let manifest = Manifest {
        written_by: field(path, &value, "/written_by", "text")?.as_str().unwrap_or_default().to_string(),
        shard,
        traces: text_list(path, &value, "/traces")?,
        engines: text_list(path, &value, "/engines")?,
        profiles: text_list(path, &value, "/profiles")?,
        options: field(path, &value, "/options", "text")?.as_str().unwrap_or_default().to_string(),
    };
    let counts = (
        unsigned(path, &value, &format!("/rows/{RESULTS_PARQUET}"))?,
        unsigned(path, &value, &format!("/rows/{SITES_PARQUET}"))?,
    );
    let digest_of = |file: &str| -> Result<Option<String>> {
        match value.pointer(&format!("/blake3/{file}")) {
            None => Ok(None),
            Some(Value::String(hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Some(hex.to_ascii_lowercase()))
            }
            Some(_) => Err(Error::invalid(
                path,
                format!("`blake3.{file}` is not a BLAKE3 digest"),
                "64 hexadecimal digits, as `virtlab sweep` writes",
            )),
        }
    };
    Ok((manifest, counts, (digest_of(RESULTS_PARQUET)?, digest_of(SITES_PARQUET)?)))
}

fn read_parquet(path: &Path, expected_rows: u64, expected_digest: Option<&str>) -> Result<DataFrame> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => {
            Error::invalid(path, "missing", "the file `virtlab sweep` writes beside manifest.json")
        }
        _ => Error::Read { path: path.to_path_buf(), source },
    })?;
    if let Some(expected) = expected_digest {
        let found = digest(&bytes);
        if found != expected {
            return Err(Error::invalid(
                path,
                format!("its BLAKE3 digest is {found}, where manifest.json says {expected}"),
                "the file `virtlab sweep` wrote: it was changed or damaged since (run the sweep again)",
            ));
        }
    }
    // Polars sizes its buffers from the file's numbers, and a failed allocation aborts the process: numbers no
    // file of this size and row count needs are refused first.
    crate::parquet_bounds::check(&bytes, expected_rows).map_err(|problem| {
        Error::invalid(path, format!("damaged: {problem}"), "the file `virtlab sweep` wrote (run the sweep again)")
    })?;
    // Polars' Parquet decoder asserts on some damaged files (a dictionary page whose length disagrees with its
    // header, for one) instead of returning an error: a damaged results file must be an error naming it.
    let reader = ParquetReader::new(std::io::Cursor::new(bytes));
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.finish()));
    let Ok(decoded) = decoded else {
        return Err(Error::invalid(
            path,
            "damaged: its Parquet pages do not decode",
            "the file `virtlab sweep` wrote (run the sweep again)",
        ));
    };
    let frame = decoded.map_err(polars_error(path, "not a readable Parquet file"))?;
    if frame.height() as u64 != expected_rows {
        return Err(Error::invalid(
            path,
            format!("{} rows", frame.height()),
            format!("{expected_rows} rows, as manifest.json says (was the directory written by two sweeps at once?)"),
        ));
    }
    Ok(frame)
}

fn column<'a>(path: &Path, frame: &'a DataFrame, name: &str, dtype: &str) -> Result<&'a Column> {
    let column = frame.column(name).map_err(|_| {
        Error::invalid(path, format!("no column `{name}`"), format!("a column `{name}` of {dtype} values"))
    })?;
    if column.null_count() > 0 {
        return Err(Error::invalid(path, format!("column `{name}` has empty cells"), "a value in every row"));
    }
    Ok(column)
}

fn wrong_type(path: &Path, name: &str, dtype: &str) -> impl FnOnce(PolarsError) -> Error {
    let (path, name, dtype) = (path.to_path_buf(), name.to_string(), dtype.to_string());
    move |_| Error::invalid(path, format!("column `{name}` does not hold {dtype} values"), format!("{dtype} values"))
}

fn strings(path: &Path, frame: &DataFrame, name: &str) -> Result<Vec<String>> {
    let values = column(path, frame, name, "text")?.str().map_err(wrong_type(path, name, "text"))?;
    Ok(values.iter().map(|v| v.unwrap_or_default().to_string()).collect())
}

fn numbers_f64(path: &Path, frame: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let values = column(path, frame, name, "Float64")?.f64().map_err(wrong_type(path, name, "Float64"))?;
    Ok(values.iter().map(|v| v.unwrap_or_default()).collect())
}

fn numbers_u64(path: &Path, frame: &DataFrame, name: &str) -> Result<Vec<u64>> {
    let values = column(path, frame, name, "UInt64")?.u64().map_err(wrong_type(path, name, "UInt64"))?;
    Ok(values.iter().map(|v| v.unwrap_or_default()).collect())
}

fn read_jobs(path: &Path, frame: &DataFrame) -> Result<Vec<Job>> {
    let [trace, workload, parameters, architecture, engine, profile, options] =
        JOB_COLUMNS.map(|name| strings(path, frame, name));
    let (trace, workload, parameters, architecture) = (trace?, workload?, parameters?, architecture?);
    let (engine, profile, options) = (engine?, profile?, options?);
    Ok((0..frame.height())
        .map(|i| Job {
            trace: trace[i].clone(),
            workload: workload[i].clone(),
            parameters: parameters[i].clone(),
            architecture: architecture[i].clone(),
            engine: engine[i].clone(),
            profile: profile[i].clone(),
            options: options[i].clone(),
        })
        .collect())
}

/// Reads one results directory, or the shards of one sweep (one directory each, any order), and joins them into
/// the table a single run would have written: every shard of the same sweep present once, rows in job order.
pub fn read_sweep(dirs: &[PathBuf]) -> Result<Results> {
    let first =
        dirs.first().ok_or_else(|| Error::Empty { path: PathBuf::from("."), detail: "no directory given".into() })?;
    let mut parts: Vec<(PathBuf, Results)> =
        dirs.iter().map(|dir| read_results(dir).map(|r| (dir.clone(), r))).collect::<Result<_>>()?;
    parts.sort_by_key(|(_, r)| r.manifest.shard.index);
    let reference = parts[0].1.manifest.clone();
    let count = reference.shard.count;
    let same_sweep = |m: &Manifest| {
        (&m.traces, &m.engines, &m.profiles, &m.options)
            == (&reference.traces, &reference.engines, &reference.profiles, &reference.options)
    };
    for (index, (dir, part)) in parts.iter().enumerate() {
        let m = &part.manifest;
        if !same_sweep(m) || m.shard.count != count || m.shard.total != reference.shard.total {
            return Err(Error::invalid(
                dir.join(MANIFEST),
                "a different sweep from the first directory's (traces, engines, profiles, options or shard count differ)",
                "the shards of one sweep",
            ));
        }
        if m.shard.index != index as u64 {
            let problem = if m.shard.index < index as u64 {
                format!("shard {}/{count} is given twice", m.shard.index)
            } else {
                format!("shard {index}/{count} is missing")
            };
            return Err(Error::invalid(
                dir.join(MANIFEST),
                problem,
                format!("shards 0..{count} of the sweep, each once"),
            ));
        }
    }
    if parts.len() as u64 != count {
        return Err(Error::invalid(
            first.join(MANIFEST),
            format!("{} of {count} shards given", parts.len()),
            format!("every shard's directory (shards 0..{count})"),
        ));
    }
    let mut joined = Results { manifest: reference, rows: Vec::new(), sites: Vec::new() };
    joined.manifest.shard =
        Shard { index: 0, count: 1, first: 0, end: joined.manifest.shard.total, total: joined.manifest.shard.total };
    for (_, part) in parts {
        joined.rows.extend(part.rows);
        joined.sites.extend(part.sites);
    }
    if joined.rows.is_empty() {
        return Err(Error::Empty {
            path: first.join(RESULTS_PARQUET),
            detail: format!("{} jobs, 0 rows", joined.manifest.shard.total),
        });
    }
    Ok(joined)
}
