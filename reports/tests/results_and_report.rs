//! The results table and the report from a handmade sweep: written and read back unchanged, shards joined,
//! bad input refused by name with nothing partial left behind, charts that are real pictures, and a page that is
//! byte-identical across runs but for its timestamp line.

mod common;

use std::path::{Path, PathBuf};

use common::TempDir;
use serde_json::json;
use virtlab_reports::table::{self, Job, Manifest, Results, Row, Shard, SiteRow, REFUSED};
use virtlab_reports::{markdown_report, write_report, Error};

const ENGINES: [&str; 3] = ["native", "bt", "hw-shadow"];
const PROFILES: [&str; 2] = ["p4-2006", "sandybridge-2011"];

fn job(trace: &str, profile: &str, engine: &str) -> Job {
    Job {
        trace: format!("traces/{trace}.vlt"),
        workload: trace.to_string(),
        parameters: "iterations=10".into(),
        architecture: "x86-64".into(),
        engine: engine.into(),
        profile: profile.into(),
        options: "bt.lmsle=true".into(),
    }
}

/// Two workloads × two profiles × three engines; `bt` refuses `cpuid` under sandybridge-2011, and the `tlb`
/// family is one the report has never heard of.
fn sweep() -> Results {
    let mut rows = Vec::new();
    let mut sites = Vec::new();
    for (w, workload) in ["syscall", "cpuid"].iter().enumerate() {
        for (p, profile) in PROFILES.iter().enumerate() {
            for (e, engine) in ENGINES.iter().enumerate() {
                let job = job(workload, profile, engine);
                if *workload == "cpuid" && *engine == "bt" && p == 1 {
                    rows.push(Row { job, family: REFUSED.into(), key: "bt: no thanks".into(), value: 1.0 });
                    continue;
                }
                let scale = (1 + w) as f64 * (1 + p) as f64;
                let exits = if e == 0 { 0.0 } else { 40.0 * (e as f64) };
                let cycles = 1000.0 * scale * [1.0, 25.0, 900.0][e];
                for (family, key, value) in [
                    ("totals", "instructions", 5000.0),
                    ("totals", "cycles", cycles),
                    ("cycles_by_cause", "guest_instructions", 1000.0 * scale),
                    ("cycles_by_cause", "exits", cycles - 1000.0 * scale),
                    ("exits", "cpuid", exits),
                    ("exits", "system_call", exits / 2.0),
                    ("translations", "blocks", if *engine == "bt" { 12.0 } else { 0.0 }),
                    ("shadow", "hidden_faults", if *engine == "hw-shadow" { 7.0 } else { 0.0 }),
                    ("tlb", "flushes", 3.0),
                ] {
                    rows.push(Row { job: job.clone(), family: family.into(), key: key.into(), value });
                }
                if e > 0 {
                    sites.push(SiteRow {
                        job,
                        address: 0x10_1000 + w as u64,
                        kind: "exit".into(),
                        reason: "cpuid".into(),
                        count: exits as u64,
                        disassembly: "cpuid".into(),
                        function: format!("driver+{:#x}", w),
                    });
                }
            }
        }
    }
    let total = (2 * PROFILES.len() * ENGINES.len()) as u64;
    Results {
        manifest: Manifest {
            written_by: "virtlab test".into(),
            shard: Shard { index: 0, count: 1, first: 0, end: total, total },
            traces: vec!["traces/syscall.vlt".into(), "traces/cpuid.vlt".into()],
            engines: ENGINES.map(String::from).to_vec(),
            profiles: PROFILES.map(String::from).to_vec(),
            options: "bt.lmsle=true".into(),
        },
        rows,
        sites,
    }
}

fn validation() -> String {
    json!({
        "study": "adams-agesen", "profile": "p4-2006", "iterations": [1000, 2000],
        "cells": [
            {"benchmark": "syscall", "engine": "bt", "column": "BT", "lab": 2210.5, "paper": 2308.0,
             "deviation": -0.042, "within_tolerance": true},
            {"benchmark": "in", "engine": "bt", "column": "BT", "lab": 400.0, "paper": 216.0, "deviation": 0.852,
             "within_tolerance": false},
        ],
        "orderings": [{"benchmark": "syscall", "paper": "Native < VT < BT", "lab": "Native < VT < BT", "same": true}],
        "all_within_tolerance": false, "all_orderings_match": true,
    })
    .to_string()
}

fn written_sweep(dir: &Path) -> Results {
    let results = sweep();
    table::write_results(dir, &results).unwrap();
    std::fs::write(dir.join("validation.json"), validation()).unwrap();
    results
}

#[test]
fn the_table_reads_back_as_written_and_the_csv_matches_it() {
    let temp = TempDir::new("roundtrip");
    let dir = temp.0.join("results");
    let results = written_sweep(&dir);
    assert_eq!(table::read_results(&dir).unwrap(), results);
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "trace,workload,parameters,architecture,engine,profile,options,family,key,value");
    assert_eq!(lines.len(), results.rows.len() + 1);
    assert_eq!(
        lines[2],
        "traces/syscall.vlt,syscall,iterations=10,x86-64,native,p4-2006,bt.lmsle=true,totals,cycles,1000"
    );
    let first = std::fs::read(dir.join("results.parquet")).unwrap();
    table::write_results(&dir, &results).unwrap();
    assert_eq!(std::fs::read(dir.join("results.parquet")).unwrap(), first, "same rows, same bytes");
}

/// Splits the handmade sweep as `virtlab sweep --shard I/N` would: contiguous job ranges.
fn shards(count: u64) -> Vec<Results> {
    let whole = sweep();
    let total = whole.manifest.shard.total;
    let jobs: Vec<Job> = {
        let mut seen: Vec<Job> = Vec::new();
        for row in &whole.rows {
            if !seen.contains(&row.job) {
                seen.push(row.job.clone());
            }
        }
        seen
    };
    (0..count)
        .map(|index| {
            let (first, end) = (total * index / count, total * (index + 1) / count);
            let mine = &jobs[first as usize..end as usize];
            Results {
                manifest: Manifest { shard: Shard { index, count, first, end, total }, ..whole.manifest.clone() },
                rows: whole.rows.iter().filter(|r| mine.contains(&r.job)).cloned().collect(),
                sites: whole.sites.iter().filter(|s| mine.contains(&s.job)).cloned().collect(),
            }
        })
        .collect()
}

#[test]
fn shards_join_into_the_single_table_and_a_missing_or_doubled_shard_is_named() {
    let temp = TempDir::new("shards");
    let dirs: Vec<PathBuf> = shards(3)
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let dir = temp.0.join(format!("shard-{i}"));
            table::write_results(&dir, part).unwrap();
            dir
        })
        .collect();
    let mut given = vec![dirs[2].clone(), dirs[0].clone(), dirs[1].clone()];
    let joined = table::read_sweep(&given).unwrap();
    assert_eq!(joined, sweep());

    given.pop();
    let error = table::read_sweep(&given).unwrap_err().to_string();
    assert!(error.contains("shard 1/3 is missing") && error.contains("shard-2"), "{error}");
    let error = table::read_sweep(&[dirs[0].clone(), dirs[0].clone(), dirs[1].clone()]).unwrap_err().to_string();
    assert!(error.contains("shard 0/3 is given twice"), "{error}");
}

fn report_error(dir: &Path, out: &Path) -> String {
    let error = write_report(&[dir.to_path_buf()], out).unwrap_err();
    assert!(!error.is_io(), "{error}");
    assert!(!out.exists(), "no partial report is left: {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary report left behind: {leftovers:?}");
    error.to_string()
}

#[test]
fn bad_results_are_refused_by_file_and_leave_no_report() {
    let temp = TempDir::new("bad");
    let dir = temp.0.join("results");
    let out = temp.0.join("report");

    let error = report_error(&dir, &out);
    assert!(error.contains("manifest.json: missing; expected") && error.contains("virtlab sweep"), "{error}");

    written_sweep(&dir);
    std::fs::write(dir.join("results.parquet"), b"PAR1 this is not parquet").unwrap();
    let error = report_error(&dir, &out);
    assert!(
        error.contains("results.parquet: its BLAKE3 digest is ") && error.contains("where manifest.json says"),
        "{error}"
    );
    // Results written before the manifest recorded digests are read without them: the file's structure is checked
    // before polars reads it.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let mut manifest = manifest.as_object().unwrap().clone();
    assert!(manifest.remove("blake3").is_some(), "the manifest records the digests");
    std::fs::write(dir.join("manifest.json"), serde_json::Value::Object(manifest).to_string()).unwrap();
    let error = report_error(&dir, &out);
    assert!(error.contains("results.parquet: damaged: not a Parquet file (no PAR1 at both ends)"), "{error}");

    written_sweep(&dir);
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.replace("\"schema_version\": 1", "\"schema_version\": 7"))
        .unwrap();
    let error = report_error(&dir, &out);
    assert!(error.contains("manifest.json: written with results schema version 7, newer than the 1"), "{error}");

    std::fs::write(dir.join("manifest.json"), "{\"format\": \"virtlab-results\"").unwrap();
    let error = report_error(&dir, &out);
    assert!(error.contains("manifest.json: not JSON"), "{error}");

    let mut empty = sweep();
    empty.rows.clear();
    empty.sites.clear();
    table::write_results(&dir, &empty).unwrap();
    let error = report_error(&dir, &out);
    assert!(error.contains("results.parquet: the sweep has no results (12 jobs, 0 rows)"), "{error}");

    written_sweep(&dir);
    std::fs::write(dir.join("validation.json"), "[1, 2]").unwrap();
    let error = report_error(&dir, &out);
    assert!(error.contains("validation.json: no list `cells`"), "{error}");

    let error = write_report(&[temp.0.join("nowhere")], &out).unwrap_err();
    assert!(matches!(error, Error::Invalid { .. }), "{error}");
}

#[test]
fn a_failed_report_keeps_the_previous_one_and_a_foreign_directory_is_not_replaced() {
    let temp = TempDir::new("replace");
    let dir = temp.0.join("results");
    let out = temp.0.join("report");
    written_sweep(&dir);
    write_report(std::slice::from_ref(&dir), &out).unwrap();
    let before = std::fs::read(out.join("index.html")).unwrap();
    std::fs::remove_file(dir.join("sites.parquet")).unwrap();
    let error = write_report(std::slice::from_ref(&dir), &out).unwrap_err().to_string();
    assert!(error.contains("sites.parquet: missing"), "{error}");
    assert_eq!(std::fs::read(out.join("index.html")).unwrap(), before);

    let foreign = temp.0.join("notes");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), "mine").unwrap();
    written_sweep(&dir);
    let error = write_report(&[dir], &foreign).unwrap_err().to_string();
    assert!(error.contains("neither empty nor a report"), "{error}");
    assert_eq!(std::fs::read_to_string(foreign.join("thesis.tex")).unwrap(), "mine");
}

/// Width, height, and the share of pixels that are not white.
fn png_facts(path: &Path) -> (u32, u32, f64, usize) {
    let image = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    let pixels = image.pixels().count() as f64;
    let inked = image.pixels().filter(|p| p.0 != [255, 255, 255]).count() as f64;
    let mut colors: Vec<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    colors.sort_unstable();
    colors.dedup();
    (image.width(), image.height(), inked / pixels, colors.len())
}

fn without_timestamp(html: &str) -> String {
    html.lines().filter(|l| !l.starts_with("<p class=\"timestamp\">")).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_report_has_every_chart_as_a_real_picture_and_is_the_same_twice_but_for_its_timestamp() {
    let temp = TempDir::new("report");
    let dir = temp.0.join("results");
    written_sweep(&dir);
    let (one, two) = (temp.0.join("one"), temp.0.join("two"));
    let written = write_report(std::slice::from_ref(&dir), &one).unwrap();
    assert_eq!(written.index_html, one.join("index.html"));
    // Two workloads: relative cycles, exits, and one cycles-by-cause chart per profile.
    assert_eq!(written.charts, 2 * (2 + PROFILES.len()));
    write_report(std::slice::from_ref(&dir), &two).unwrap();

    let html = std::fs::read_to_string(one.join("index.html")).unwrap();
    let html_two = std::fs::read_to_string(two.join("index.html")).unwrap();
    assert_eq!(html.lines().filter(|l| l.starts_with("<p class=\"timestamp\">Generated ")).count(), 1);
    assert_eq!(without_timestamp(&html), without_timestamp(&html_two));

    let mut charts: Vec<String> =
        html.split("<img src=\"").skip(1).map(|rest| rest.split('"').next().unwrap().to_string()).collect();
    charts.sort();
    assert_eq!(charts.len(), written.charts);
    for chart in &charts {
        let (a, b) = (std::fs::read(one.join(chart)).unwrap(), std::fs::read(two.join(chart)).unwrap());
        assert_eq!(a, b, "{chart} differs between two reports");
        let (width, height, inked, colors) = png_facts(&one.join(chart));
        assert_eq!(width, 960, "{chart}");
        assert!(height >= 440, "{chart}");
        assert!(inked > 0.03 && inked < 0.6, "{chart}: {:.1}% of the pixels drawn", inked * 100.0);
        assert!(colors > 20, "{chart}: {colors} colors (text is anti-aliased, bars are colored)");
        assert!(a.len() > 8_000, "{chart}: {} bytes", a.len());
    }
    assert!(charts.contains(&"charts/01-syscall-relative.png".to_string()));

    // A refusal, the lmsle note, an unknown family, the validation with its miss highlighted, the sites.
    assert!(html.contains("<td>cpuid</td><td>bt</td><td>sandybridge-2011</td><td>bt: no thanks</td>"));
    assert!(html.contains("<code>bt.lmsle=true</code>: the host is taken to have long-mode segment limits"));
    assert!(html.contains("<caption>tlb, profile p4-2006</caption>"));
    assert!(html.contains("<tr class=\"hl\"><td>in</td><td>bt</td><td>BT</td>"));
    assert!(html.contains("<td class=\"n\">+85.2%</td>"));
    assert!(
        html.contains(
            "<td class=\"n\">0x101000</td><td>driver+0x0</td><td>exit</td><td>cpuid</td><td class=\"n\">40</td>\
             <td>cpuid</td>"
        ),
        "{html}"
    );
    // Cheapest: on syscall with p4-2006, bt costs 25× native and hw-shadow 900×.
    assert!(html.contains("<tr><td>syscall</td><td>bt (25.0×)</td><td>hw-shadow (900×)</td>"), "{html}");
}

#[test]
fn markdown_gives_the_same_tables_on_the_terminal() {
    let temp = TempDir::new("markdown");
    let dir = temp.0.join("results");
    written_sweep(&dir);
    let md = markdown_report(&[dir]).unwrap();
    assert!(md.starts_with("# virtlab report\n"));
    assert!(md.contains("## Cheapest strategy per workload"));
    assert!(md.contains("| syscall | bt (25.0×) | hw-shadow (900×) |"), "{md}");
    assert!(md.contains("| cpuid | bt | sandybridge-2011 | bt: no thanks |"));
    assert!(!md.contains(".png") && !md.contains("Generated"));
}

#[test]
fn a_page_count_that_would_make_polars_allocate_without_bound_is_refused_by_name() {
    // A sweep's directory damaged by tests/mutations.rs (a long run's mutation 19,495: bit 0 of byte 541 of
    // sites.parquet flipped, the manifest's digest re-sealed to match): a data page header whose value count reads
    // -247. Handed to polars 0.55, it asked for 2,305,843,009,213,693,896 bytes and the process aborted.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/crafted-page-count");
    let error = table::read_results(&dir).unwrap_err().to_string();
    assert!(error.contains("sites.parquet: damaged"), "{error}");
    assert!(error.contains("the page header at byte 533's field 5.1 holds -247"), "{error}");
}
