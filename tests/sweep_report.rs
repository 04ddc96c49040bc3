//! `virtlab sweep` and `virtlab report` as a user runs them, on traces recorded from catalog workloads: the table
//! agrees with `virtlab replay --json`, is byte-identical on one thread and two, shards concatenate into the single
//! run's table, refusals and bad traces are what they should be, and the report opens in a real browser.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use std::time::{Duration, Instant};

use common::ScratchDir;
use serde_json::Value;
use virtlab_reports::table::{read_results, read_sweep};

/// A scratch directory with recorded traces in it; commands run there.
struct Lab {
    dir: ScratchDir,
}

impl Lab {
    /// Records `syscall`, `in` and `pgfault` with few iterations: a user workload, a kernel one, and one with
    /// page faults for the shadow-paging engines.
    fn new(name: &str) -> Self {
        let lab = Lab { dir: ScratchDir::new(&format!("sweep-{name}")) };
        for (workload, iterations) in [("syscall", "20"), ("in", "20"), ("pgfault", "8")] {
            let param = format!("iterations={iterations}");
            let output = lab.run(&["record", workload, "--param", &param, "-o", &format!("{workload}.vlt")]);
            assert!(output.status.success(), "{}", text(&output.stderr));
        }
        lab
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_virtlab")).current_dir(&self.dir.0).args(args).output().unwrap()
    }

    /// `virtlab sweep` over the three traces with `extra` arguments; asserts it succeeded.
    fn sweep(&self, extra: &[&str]) {
        let mut args = vec!["sweep", "syscall.vlt", "in.vlt", "pgfault.vlt"];
        args.extend(extra);
        let output = self.run(&args);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The CSV's value for one job's family/key.
fn csv_value(csv: &str, trace: &str, engine: &str, profile: &str, family: &str, key: &str) -> Option<f64> {
    csv.lines().find_map(|line| {
        let f = csv_fields(line);
        (f[0] == trace && f[4] == engine && f[5] == profile && f[7] == family && f[8] == key)
            .then(|| f[9].parse().unwrap())
    })
}

/// One CSV line's fields; a quoted field (parameters such as `"iterations=8,counters=0"`) keeps its commas.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().unwrap().push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[test]
fn the_table_matches_replay_and_is_identical_on_one_thread_and_two() {
    let lab = Lab::new("table");
    lab.sweep(&["--profile", "all", "--set", "bt.lmsle=true", "--threads", "1", "-o", "one"]);
    lab.sweep(&["--profile", "all", "--set", "bt.lmsle=true", "--threads", "2", "-o", "two"]);
    for file in ["results.parquet", "results.csv", "sites.parquet", "manifest.json"] {
        assert!(lab.read(&format!("one/{file}")) == lab.read(&format!("two/{file}")), "{file} depends on threads");
    }
    let csv = text(&lab.read("one/results.csv"));
    let modelled = "native,trap-emulate,hybrid,bt,paravirt,hw-ept,hw-shadow";
    let replay = lab.run(&[
        "replay",
        "pgfault.vlt",
        "--json",
        "--engine",
        modelled,
        "--set",
        "bt.lmsle=true",
        "--profile",
        "core2-2006",
    ]);
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    let engines: Value = serde_json::from_slice(&replay.stdout).unwrap();
    let engines = engines.as_array().unwrap();
    assert_eq!(engines.len(), 7);
    for engine in engines {
        let name = engine["engine"].as_str().unwrap();
        let value = |family: &str, key: &str| csv_value(&csv, "pgfault.vlt", name, "core2-2006", family, key);
        assert_eq!(value("totals", "cycles"), engine["cycles"].as_f64(), "{name}");
        assert_eq!(value("totals", "instructions"), engine["instructions"].as_f64(), "{name}");
        for family in ["exits", "cycles_by_cause", "hypercalls", "shadow", "translations"] {
            for (key, number) in engine[family].as_object().unwrap() {
                assert_eq!(value(family, key), number.as_f64(), "{name} {family}/{key}");
            }
        }
    }
    // 3 traces × 3 profiles × 7 engines, each job's first row in the order trace, profile, engine.
    let results = read_results(&lab.path("one")).unwrap();
    assert_eq!(results.manifest.shard.total, 63);
    let mut jobs: Vec<(String, String, String)> = Vec::new();
    for row in &results.rows {
        let job = (row.job.trace.clone(), row.job.profile.clone(), row.job.engine.clone());
        if jobs.last() != Some(&job) {
            jobs.push(job);
        }
    }
    assert_eq!(jobs.len(), 63);
    assert_eq!(jobs[0], ("syscall.vlt".into(), "p4-2006".into(), "native".into()));
    assert_eq!(jobs[7], ("syscall.vlt".into(), "core2-2006".into(), "native".into()));
    assert!(results.rows.iter().all(|r| !r.job.workload.is_empty() && r.job.architecture == "x86-64"));
    assert!(results.rows.iter().any(|r| r.job.parameters == "iterations=8,counters=0" && r.job.workload == "pgfault"));

    // trap-emulate enters the monitor at the guest's SYSCALL instruction, once per system call at least.
    let syscall_sites: Vec<_> = results
        .sites
        .iter()
        .filter(|s| s.job.trace == "syscall.vlt" && s.job.engine == "trap-emulate" && s.job.profile == "p4-2006")
        .filter(|s| s.kind == "exit" && s.reason == "system_call")
        .collect();
    assert!(!syscall_sites.is_empty());
    assert!(
        syscall_sites.iter().any(|s| s.disassembly == "syscall" && s.count >= 20 && s.function.starts_with("main+")),
        "{syscall_sites:?}"
    );
    assert!(results.sites.iter().all(|s| !s.function.is_empty()), "every catalog site lies in a named function");
    assert!(results.sites.iter().all(|s| !s.disassembly.is_empty()), "every site's instruction is in a block");
}

#[test]
fn shards_concatenate_into_exactly_the_single_run() {
    let lab = Lab::new("shards");
    lab.sweep(&["--profile", "p4-2006,sandybridge-2011", "--set", "bt.lmsle=true", "-o", "whole"]);
    let mut csv = String::new();
    let mut dirs = Vec::new();
    for index in 0..4 {
        let dir = format!("shard-{index}");
        lab.sweep(&[
            "--profile",
            "p4-2006,sandybridge-2011",
            "--set",
            "bt.lmsle=true",
            "--shard",
            &format!("{index}/4"),
            "-o",
            &dir,
        ]);
        let part = text(&lab.read(&format!("{dir}/results.csv")));
        csv += if index == 0 { &part } else { part.split_once('\n').unwrap().1 };
        dirs.push(lab.path(&dir));
    }
    assert_eq!(csv, text(&lab.read("whole/results.csv")));
    let whole = read_results(&lab.path("whole")).unwrap();
    let parts: Vec<_> = dirs.iter().map(|d| read_results(d).unwrap()).collect();
    assert_eq!(parts.iter().map(|p| p.manifest.shard.end - p.manifest.shard.first).sum::<u64>(), 42);
    let rows: Vec<_> = parts.iter().flat_map(|p| p.rows.clone()).collect();
    let sites: Vec<_> = parts.iter().flat_map(|p| p.sites.clone()).collect();
    assert!(rows == whole.rows && sites == whole.sites);
    assert_eq!(read_sweep(&dirs).unwrap(), whole);

    let output = lab.run(&["sweep", "in.vlt", "--shard", "4/4", "-o", "x"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("`4/4` is not I/N with 0 <= I < N"));
    // The measured engine is not swept: naming it is a usage error that says where it runs, not an empty table.
    let output = lab.run(&["sweep", "in.vlt", "--engine", "bt,kvm", "-o", "y"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("virtlab replay TRACE --engine kvm"), "{}", text(&output.stderr));
    assert!(!lab.path("y").exists());
}

#[test]
fn a_refusing_engine_is_a_row_with_its_reason_and_a_bad_trace_writes_nothing() {
    let lab = Lab::new("refusal");
    lab.sweep(&["--engine", "native,bt", "-o", "plain"]);
    let results = read_results(&lab.path("plain")).unwrap();
    let bt: Vec<_> = results.rows.iter().filter(|r| r.job.engine == "bt").collect();
    assert_eq!(bt.len(), 3, "one row per trace");
    assert!(bt.iter().all(|r| r.family == "refused" && r.key.contains("--set bt.lmsle=true") && r.value == 1.0));

    let mut broken = lab.read("in.vlt");
    let middle = broken.len() / 2;
    for byte in &mut broken[middle..middle + 64] {
        *byte ^= 0x5a;
    }
    std::fs::write(lab.path("broken.vlt"), broken).unwrap();
    let output = lab.run(&["sweep", "syscall.vlt", "broken.vlt", "-o", "bad"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("broken.vlt"), "{}", text(&output.stderr));
    assert!(!lab.path("bad").exists(), "nothing is written when a trace fails");
}

/// A trace the readers accept and the checker refuses (a context event that changes nothing), which every engine
/// can still replay.
fn checker_refuses() -> Vec<u8> {
    use virtlab_traces::*;
    let boot = BootState {
        rip: 0x1000,
        rax: 0,
        rbx: 0,
        rsp: 0,
        rflags: 2,
        cr0: 0x11,
        mode: CodeMode::Bits32,
        ram_bytes: 1 << 20,
    };
    let meta = Metadata { workload: "handmade".into(), recorder: "tests".into(), ..Metadata::default() };
    let mut writer = TraceWriter::new(std::io::Cursor::new(Vec::new()), meta, boot, &[]).unwrap();
    let block = Block { address: 0x1000, mode: CodeMode::Bits32, tag: 0, instructions: 2, bytes: vec![0x90, 0x90] };
    let id = writer.add_block(&block).unwrap();
    let context = Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 };
    for event in [Event::Context { at: 0, context }, Event::Block(id), Event::Context { at: 1, context }] {
        writer.push(&event).unwrap();
    }
    let ending = Ending {
        reason: EndReason::GuestExit,
        exit_status: 0,
        detail: String::new(),
        serial: Vec::new(),
        state_digest: [0; 32],
    };
    writer.finish(ending).unwrap().into_inner()
}

#[test]
fn verdicts_are_kept_by_digest_and_a_trace_the_cache_holds_is_not_checked_again() {
    let lab = Lab::new("verdicts");
    lab.sweep(&["--engine", "native", "-o", "unchecked"]);
    lab.sweep(&["--engine", "native", "--verdicts", "verdicts.json", "-o", "first"]);
    lab.sweep(&["--engine", "native", "--verdicts", "verdicts.json", "-o", "second"]);
    let cache: Value = serde_json::from_slice(&lab.read("verdicts.json")).unwrap();
    let valid = cache["valid"].as_object().unwrap();
    assert_eq!(valid.len(), 3, "{cache}");
    let syscall = &valid[&blake3::hash(&lab.read("syscall.vlt")).to_hex().to_string()];
    let view = virtlab_traces::TraceView::open(&lab.read("syscall.vlt")).unwrap().footer().totals;
    assert_eq!(
        (syscall["events"].as_u64(), syscall["instructions"].as_u64()),
        (Some(view.events_total()), Some(view.instructions))
    );
    for run in ["first", "second"] {
        assert_eq!(lab.read(&format!("{run}/results.csv")), lab.read("unchecked/results.csv"), "{run}");
    }

    // The checker refuses this trace; a cache that holds its digest (as no checker would have written it)
    // shows that a cached trace is hashed, not checked.
    let bad = checker_refuses();
    std::fs::write(lab.path("bad.vlt"), &bad).unwrap();
    let output = lab.run(&["sweep", "bad.vlt", "--engine", "native", "--verdicts", "verdicts.json", "-o", "bad"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("context-changes"), "{}", text(&output.stderr));
    let mut forged = cache.clone();
    let digest = blake3::hash(&bad).to_hex().to_string();
    forged["valid"][&digest] = serde_json::json!({ "events": 3, "instructions": 2 });
    std::fs::write(lab.path("verdicts.json"), forged.to_string()).unwrap();
    let output = lab.run(&["sweep", "bad.vlt", "--engine", "native", "--verdicts", "verdicts.json", "-o", "bad"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    // The same entries under another checker are not trusted.
    forged["checker"] = Value::from("virtlab 0.0.0 writing format 1.0, checker rules revision 0");
    std::fs::write(lab.path("verdicts.json"), forged.to_string()).unwrap();
    let output = lab.run(&["sweep", "bad.vlt", "--engine", "native", "--verdicts", "verdicts.json", "-o", "bad2"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    // And a cache that is not one is named.
    std::fs::write(lab.path("verdicts.json"), "[1, 2").unwrap();
    let output = lab.run(&["sweep", "in.vlt", "--verdicts", "verdicts.json", "-o", "bad3"]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("verdicts.json is not a verdict cache"), "{}", text(&output.stderr));
}

fn without_timestamp(html: &[u8]) -> String {
    text(html).lines().filter(|l| !l.starts_with("<p class=\"timestamp\">")).collect::<Vec<_>>().join("\n")
}

#[test]
fn report_writes_a_page_the_same_twice_prints_markdown_and_refuses_bad_results_by_name() {
    let lab = Lab::new("report");
    lab.sweep(&["--profile", "p4-2006,core2-2006", "--set", "bt.lmsle=true", "-o", "results"]);
    let output = lab.run(&["report", "results", "-o", "report"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "report/index.html");
    let first = lab.read("report/index.html");
    assert!(lab.run(&["report", "results", "-o", "report"]).status.success());
    assert_eq!(without_timestamp(&first), without_timestamp(&lab.read("report/index.html")));
    let html = text(&first);
    for workload in ["syscall", "in", "pgfault"] {
        assert!(html.contains(&format!("<h3 id=\"w-{workload}\">{workload}</h3>")), "{workload}");
    }
    assert!(html.contains("<img src=\"charts/03-pgfault-cycles-core2-2006.png\""));

    let output = lab.run(&["report", "results", "--format", "md"]);
    assert!(output.status.success());
    let md = text(&output.stdout);
    assert!(md.contains("| workload | cheapest, p4-2006 | dearest, p4-2006 | cheapest, core2-2006 |"), "{md}");
    assert!(md.contains("\n| syscall | "));

    std::fs::create_dir_all(lab.path("empty")).unwrap();
    let output = lab.run(&["report", "empty", "-o", "r2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("empty/manifest.json: missing; expected"), "{}", text(&output.stderr));
    let manifest = text(&lab.read("results/manifest.json")).replace("\"schema_version\": 1", "\"schema_version\": 2");
    std::fs::write(lab.path("results/manifest.json"), manifest).unwrap();
    let output = lab.run(&["report", "results", "-o", "r2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("schema version 2, newer than the 1"), "{}", text(&output.stderr));
    assert!(!lab.path("r2").exists());
    let help = lab.run(&["--help"]);
    assert!(text(&help.stdout).contains("`report`: a results file is missing, corrupt, empty or from a newer schema"));
}

/// Debian's Chromium, if installed.
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Runs headless Chromium on `page` with `extra` arguments and a fresh profile; gives up after a minute. Its
/// output goes to files beside the profile, so that a page dump larger than a pipe's buffer cannot stall it.
fn headless(browser: &Path, profile: &Path, extra: &[String], page: &Path) -> Output {
    let (stdout, stderr) = (profile.with_extension("stdout"), profile.with_extension("stderr"));
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--allow-file-access-from-files",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output { status, stdout: std::fs::read(&stdout).unwrap(), stderr: std::fs::read(&stderr).unwrap() }
}

/// Written into a copy of the page (never into the report itself): after the page loads, it lists the images that
/// did not decode and every error the page raised, in an element `--dump-dom` prints.
const PROBE: &str = r#"<script>
var virtlabErrors = [];
window.addEventListener('error', function (e) {
  virtlabErrors.push(e.message || (e.target && (e.target.src || e.target.href)) || 'error');
}, true);
var virtlabConsoleError = console.error;
console.error = function () { virtlabErrors.push(Array.prototype.join.call(arguments, ' ')); virtlabConsoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement('pre');
  out.id = 'virtlab-probe';
  out.textContent = 'images=' + images.length + ' broken=' + broken.length + ' ' +
    broken.map(function (i) { return i.getAttribute('src'); }).join(' ') + ' errors=' + virtlabErrors.length + ' ' + virtlabErrors.join(' | ');
  document.body.appendChild(out);
});
</script>"#;

#[test]
fn the_report_opens_in_headless_chromium_with_every_image_loaded_and_no_errors() {
    let Some(browser) = chromium() else {
        eprintln!(
            "skipped: Chromium is not installed (/usr/bin/chromium); `.ci/run` installs Debian's `chromium` \
             (apt-get install chromium) so CI runs this test"
        );
        return;
    };
    let lab = Lab::new("browser");
    lab.sweep(&["--profile", "p4-2006,sandybridge-2011", "--set", "bt.lmsle=true", "-o", "results"]);
    std::fs::write(lab.path("results/validation.json"), include_str!("data/validation.json")).unwrap();
    let output = lab.run(&["report", "results", "-o", "report"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let html = text(&lab.read("report/index.html"));
    let images = html.matches("<img src=").count();
    assert_eq!(images, 3 * (2 + 2), "relative, exits and one cycles chart per profile for each of 3 workloads");

    let probed = lab.path("report/probe.html");
    std::fs::write(&probed, html.replacen("<head>", &format!("<head>\n{PROBE}"), 1)).unwrap();
    let dom = headless(
        &browser,
        &lab.path("profile-1"),
        &["--virtual-time-budget=10000".into(), "--dump-dom".into()],
        &probed,
    );
    let dom_text = text(&dom.stdout);
    let probe = dom_text
        .split("<pre id=\"virtlab-probe\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("the probe did not run; chromium said: {}", text(&dom.stderr)));
    assert_eq!(probe.trim(), format!("images={images} broken=0  errors=0"), "{probe}");

    let screenshot = lab.path("screenshot.png");
    let shot = headless(
        &browser,
        &lab.path("profile-2"),
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,3000".into(),
            "--hide-scrollbars".into(),
        ],
        &lab.path("report/index.html"),
    );
    let picture = image::open(&screenshot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}); chromium said: {}", text(&shot.stderr)))
        .to_rgb8();
    assert_eq!((picture.width(), picture.height()), (1280, 3000));
    let colored = picture.pixels().filter(|p| !(p.0[0] == p.0[1] && p.0[1] == p.0[2])).count();
    assert!(colored > 10_000, "the screenshot shows the charts' colored bars ({colored} colored pixels)");
    eprintln!("ran: headless Chromium loaded {images} charts with no errors; screenshot {}", screenshot.display());
}
