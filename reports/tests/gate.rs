//! The gate's library on handmade results: budget files read (and refused with their line), checked, blamed with
//! and without a baseline, rendered in every format, and rewritten by `update` with comments and order kept.

mod common;

use std::path::Path;

use common::TempDir;
use serde_json::Value;
use virtlab_reports::gate::render::{self, Context};
use virtlab_reports::gate::{self, Allowance, Budgets, Headroom, Vocabulary};
use virtlab_reports::table::{Job, Manifest, Results, Row, Shard, SiteRow, REFUSED};

const ENGINES: [&str; 3] = ["native", "trap-emulate", "hw-shadow"];

fn vocabulary() -> Vocabulary {
    let keys: Vec<(String, String)> = [
        ("totals", "exits_total"),
        ("totals", "cycles"),
        ("exits", "cpuid"),
        ("exits", "system_call"),
        ("exits", "shadow_page_fault"),
        ("hypercalls", "mmu_update"),
        ("translations", "callouts"),
        ("shadow", "hidden_faults"),
        ("cycles_by_cause", "exits"),
    ]
    .iter()
    .map(|(f, k)| (f.to_string(), k.to_string()))
    .collect();
    Vocabulary::new(ENGINES.map(String::from).to_vec(), vec!["cpuid".into(), "syscall".into()], &keys)
}

fn job(workload: &str, parameters: &str, engine: &str) -> Job {
    Job {
        trace: format!("{workload}.vlt"),
        workload: workload.into(),
        parameters: parameters.into(),
        architecture: "x86-64".into(),
        engine: engine.into(),
        profile: "p4-2006".into(),
        options: "bt.lmsle=true".into(),
    }
}

fn site(job: &Job, address: u64, reason: &str, count: u64, function: &str, instruction: &str) -> SiteRow {
    SiteRow {
        job: job.clone(),
        address,
        kind: "exit".into(),
        reason: reason.into(),
        count,
        disassembly: instruction.into(),
        function: function.into(),
    }
}

/// `cpuid` at 100 iterations: trap-emulate exits on nothing, hw-shadow on each CPUID (`cpuid_calls` of them at
/// the driver's loop, one more before it) and on 3 shadow faults; `extra` adds a second CPUID site in the loop.
fn results(cpuid_calls: u64, extra: u64) -> Results {
    let mut rows = Vec::new();
    let mut sites = Vec::new();
    for engine in ENGINES {
        let job = job("cpuid", "iterations=100", engine);
        let (cpuid, faults) = if engine == "hw-shadow" { (cpuid_calls + 1 + extra, 3.0) } else { (0, 0.0) };
        for (family, key, value) in [
            ("totals", "cycles", 1000.0),
            ("totals", "exits_total", cpuid as f64 + faults),
            ("exits", "cpuid", cpuid as f64),
            ("exits", "shadow_page_fault", faults),
            ("shadow", "hidden_faults", faults),
            ("holes", "popf_ignores_if", if engine == "trap-emulate" { 2.0 } else { 0.0 }),
        ] {
            rows.push(Row { job: job.clone(), family: family.into(), key: key.into(), value });
        }
        if engine == "hw-shadow" {
            sites.push(site(&job, 0x10_1010, "cpuid", 1, "driver+0x10", "cpuid"));
            sites.push(site(&job, 0x10_1020, "cpuid", cpuid_calls, "driver+0x20", "cpuid"));
            if extra > 0 {
                sites.push(site(&job, 0x10_1028, "cpuid", extra, "driver+0x28", "cpuid"));
            }
            sites.push(site(&job, 0x10_2000, "shadow_page_fault", 3, "memcpy+0x4", "mov [rdi],rax"));
        }
    }
    let refused = job("syscall", "iterations=10", "hw-shadow");
    rows.push(Row { job: refused, family: REFUSED.into(), key: "no thanks".into(), value: 1.0 });
    let measured = job("syscall", "iterations=10", "native");
    rows.push(Row { job: measured, family: "totals".into(), key: "exits_total".into(), value: 0.0 });
    Results {
        manifest: Manifest {
            written_by: "test".into(),
            shard: Shard { index: 0, count: 1, first: 0, end: 5, total: 5 },
            traces: vec!["cpuid.vlt".into(), "syscall.vlt".into()],
            engines: ENGINES.map(String::from).to_vec(),
            profiles: vec!["p4-2006".into()],
            options: "bt.lmsle=true".into(),
        },
        rows,
        sites,
    }
}

const BUDGETS: &str = r#"# The test's budgets.
[gate]
version = 1
profile = "p4-2006"
options = ["bt.lmsle=true"]

[[workload]]
name = "cpuid"
parameters = { iterations = 100 }
architecture = "x86-64"

[workload.hw-shadow]
exits.total = 104                                  # CPUID and faults
exits.cpuid = { per_iteration = 1.01, comment = "one CPUID per iteration" }
"shadow.hidden_faults" = 3

[workload.trap-emulate]
exits = { total = 0 }
holes.total = { max = 2 }

[[workload]]
name = "syscall"
parameters = { iterations = 10 }
architecture = "x86-64"

[workload.hw-shadow]
exits.total = 0
"#;

fn parse(text: &str) -> Result<Budgets, gate::BudgetError> {
    Budgets::parse(text, Path::new("b.toml"), &vocabulary())
}

fn check(budgets: &Budgets, results: &Results, baseline: Option<&Results>) -> gate::Verdict {
    gate::check(budgets, Path::new("b.toml"), &vocabulary(), results, baseline, false).unwrap()
}

#[test]
fn a_budget_file_is_read_in_every_form_it_allows() {
    let budgets = parse(BUDGETS).unwrap();
    assert_eq!(budgets.profile, "p4-2006");
    assert_eq!(budgets.options, [("bt.lmsle".to_string(), "true".to_string())]);
    assert_eq!(budgets.workloads.len(), 2);
    let cpuid = &budgets.workloads[0];
    assert_eq!((cpuid.line, cpuid.workload.iterations()), (7, Some(100)));
    let shadow = &cpuid.engines[0];
    let limits: Vec<(&str, Allowance, usize)> =
        shadow.limits.iter().map(|l| (l.metric.as_str(), l.allowance, l.line)).collect();
    assert_eq!(
        limits,
        [
            ("exits.total", Allowance::Count(104), 13),
            ("exits.cpuid", Allowance::PerIteration(1.01), 14),
            ("shadow.hidden_faults", Allowance::Count(3), 15)
        ]
    );
    assert_eq!(shadow.limits[1].comment.as_deref(), Some("one CPUID per iteration"));
    let trap = &cpuid.engines[1];
    assert_eq!(trap.limits[0].metric, "exits.total", "an inline group names family.key");
    assert_eq!(trap.limits[1].allowance, Allowance::Count(2));
}

#[test]
fn malformed_budget_files_are_refused_with_the_line_and_the_fix() {
    let cases: [(&str, &str, &str); 10] = [
        ("exits.total = 104", "exits.total = -1", "b.toml:13: `exits.total` is not a whole number of 0 or more"),
        (
            "[workload.trap-emulate]",
            "[workload.trap-emulator]",
            "b.toml:17: unknown engine `trap-emulator`; did you mean `trap-emulate`?",
        ),
        (
            "\"shadow.hidden_faults\" = 3",
            "shadow.hidden_fault = 3",
            "b.toml:15: unknown metric `shadow.hidden_fault`; did you mean `shadow.hidden_faults`?",
        ),
        ("version = 1", "version = 2", "b.toml:3: [gate] version must be 1"),
        ("name = \"syscall\"", "nom = \"syscall\"", "unknown key `nom` in a [[workload]]"),
        (
            "architecture = \"x86-64\"\n\n[workload.hw-shadow]\nexits.total = 104",
            "architecture = \"arm64\"\n\n[workload.hw-shadow]\nexits.total = 104",
            "b.toml:10: architecture `arm64`; expected x86-64 or x86-32",
        ),
        (
            "holes.total = { max = 2 }",
            "holes.total = { max = 2, per_iteration = 1 }",
            "b.toml:19: `holes.total` needs exactly one of max and per_iteration",
        ),
        (
            "iterations = 10 }\narchitecture = \"x86-64\"\n\n[workload.hw-shadow]\nexits.total = 0",
            "loops = 10 }\narchitecture = \"x86-64\"\n\n[workload.hw-shadow]\nexits.total = { per_iteration = 1 }",
            "`exits.total` is per iteration, but syscall loops=10 x86-64 has no `iterations` parameter",
        ),
        ("exits.total = 104", "exits.total = 104\nexits.total = 5", "b.toml:14: not valid TOML: duplicate key"),
        (
            "name = \"syscall\"\nparameters = { iterations = 10 }",
            "name = \"cpuid\"\nparameters = { iterations = 100 }",
            "b.toml:21: cpuid iterations=100 x86-64 already has budgets at line 7",
        ),
    ];
    for (from, to, expected) in cases {
        assert!(BUDGETS.contains(from), "{from}");
        let text = BUDGETS.replacen(from, to, 1);
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains(expected), "expected `{expected}` in: {error}");
    }
    let error = parse("[[workload]]\nname = 1\n").unwrap_err().to_string();
    assert!(error.contains("no [gate] table"), "{error}");
}

#[test]
fn budgets_hold_on_the_results_they_were_made_from() {
    let budgets = parse(BUDGETS).unwrap();
    let verdict = check(&budgets, &results(100, 0), None);
    assert_eq!(verdict.checks.len(), 5);
    assert_eq!(verdict.over().count(), 0, "{verdict:?}");
    let cpuid = &verdict.checks[1];
    assert_eq!((cpuid.ceiling, cpuid.actual), (101.0, 101.0), "1.01 per iteration × 100");
    assert_eq!(verdict.missing.len(), 1);
    assert!(verdict.missing[0].reason.contains("refused the trace: no thanks"));
    assert_eq!(verdict.missing[0].line, 26);
    let unbudgeted: Vec<String> =
        verdict.unbudgeted.iter().map(|u| format!("{} / {}", u.workload.label(), u.engine)).collect();
    assert_eq!(unbudgeted, ["cpuid iterations=100 x86-64 / native", "syscall iterations=10 x86-64 / native"]);
    assert!(!verdict.passed(), "a missing pair fails");
    let allowed = gate::check(&budgets, Path::new("b.toml"), &vocabulary(), &results(100, 0), None, true).unwrap();
    assert!(allowed.passed());
    let other_options = Budgets { options: Vec::new(), ..budgets.clone() };
    let verdict = check(&other_options, &results(100, 0), None);
    assert_eq!(verdict.checks.len(), 0);
    assert!(
        verdict.missing[0]
            .reason
            .contains("only under profile p4-2006 with options `bt.lmsle=true`, not the budgets' p4-2006 with ``"),
        "{}",
        verdict.missing[0].reason
    );
    assert!(render::summary(&allowed).starts_with("gate passed: 5 budgets hold; 1 budgeted pair missing"));
}

#[test]
fn a_breach_is_blamed_on_its_sites_and_with_a_baseline_on_the_new_one() {
    let budgets = parse(BUDGETS).unwrap();
    let after = results(100, 100);
    let verdict = check(&budgets, &after, None);
    let over: Vec<(&str, f64, f64)> =
        verdict.over().map(|c| (c.limit.metric.as_str(), c.actual, c.over_by())).collect();
    assert_eq!(over, [("exits.total", 204.0, 100.0), ("exits.cpuid", 201.0, 100.0)]);
    let blame: Vec<(u64, &str, u64)> =
        verdict.checks[1].blame.iter().map(|s| (s.address, s.function.as_str(), s.count)).collect();
    assert_eq!(
        blame,
        [(0x10_1020, "driver+0x20", 100), (0x10_1028, "driver+0x28", 100), (0x10_1010, "driver+0x10", 1)]
    );
    assert!(verdict.checks[0].blame.iter().any(|s| s.reason == "shadow_page_fault"), "the total blames every exit");

    let before = results(100, 0);
    let verdict = check(&budgets, &after, Some(&before));
    let blamed = &verdict.checks[1].blame;
    assert_eq!(blamed.len(), 1, "only the new site: {blamed:?}");
    assert_eq!((blamed[0].address, blamed[0].baseline), (0x10_1028, Some(0)));
    let context = Context { budgets: "b.toml", profile: "p4-2006", options: &budgets.options };
    let text = render::text(&context, &verdict, false);
    let has_line = |words: &[&str]| text.lines().any(|line| line.split_whitespace().eq(words.iter().copied()));
    let breach = ["cpuid", "iterations=100", "x86-64", "hw-shadow", "exits.cpuid", "101", "(1.01/iteration)", "201"];
    assert!(has_line(&[&breach[..], &["+100", "(+99.0%)"]].concat()), "{text}");
    assert!(has_line(&["0x101028", "driver+0x28", "cpuid", "cpuid", "100", "0", "new"]), "{text}");
    assert!(text.contains("(one CPUID per iteration), b.toml:14"), "{text}");
    assert!(text.trim_end().ends_with("gate FAILED: 2 of 5 budgets exceeded; 1 budgeted pair missing from the results; 2 measured pairs have no budget"), "{text}");
}

#[test]
fn the_verdict_renders_as_json_junit_and_markdown() {
    let budgets = parse(BUDGETS).unwrap();
    let verdict = check(&budgets, &results(100, 100), None);
    let context = Context { budgets: "b.toml", profile: "p4-2006", options: &budgets.options };

    let json: Value = render::json(&context, &verdict);
    assert_eq!((json["format"].as_str(), json["version"].as_u64()), (Some("virtlab-gate"), Some(1)));
    assert_eq!(json["passed"], false);
    assert_eq!(json["summary"]["over"], 2);
    let cpuid = &json["checks"][1];
    assert_eq!(cpuid["budget"]["per_iteration"], 1.01);
    assert_eq!((cpuid["actual"].as_u64(), cpuid["over_by"].as_u64()), (Some(201), Some(100)), "counts are whole");
    assert_eq!(cpuid["blame"][0]["address"], "0x101020");
    assert_eq!(cpuid["blame"][0]["function"], "driver+0x20");
    assert_eq!(json["missing"][0]["line"], 26);
    assert_eq!(json["unbudgeted"][1]["workload"]["parameters"]["iterations"], "10");

    let xml = render::junit(&context, &verdict);
    assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"virtlab gate\" tests=\"8\" failures=\"3\" errors=\"0\" skipped=\"2\">"), "{xml}");
    assert_eq!(xml.matches("<testcase ").count(), 8);
    assert_eq!(xml.matches("<failure type=\"over-budget\"").count(), 2);
    assert!(xml.contains("message=\"201 &gt; 101 (+100 (+99.0%))\""), "{xml}");
    assert!(xml.contains("0x101028  driver+0x28"), "{xml}");
    let self_closed = xml.lines().filter(|l| l.trim_start().starts_with("<testcase") && l.ends_with("/>")).count();
    assert_eq!(xml.matches("</testcase>").count() + self_closed, 8, "every case closed: {xml}");

    let md = render::markdown(&context, &verdict);
    assert!(md.starts_with("## virtlab gate: FAILED\n"), "{md}");
    assert!(
        md.contains(
            "| cpuid iterations=100 x86-64 | hw-shadow | exits.cpuid | 101 (1.01/iteration) | 201 | +100 (+99.0%) |"
        ),
        "{md}"
    );
    assert!(md.contains("| 0x101028 | driver+0x28 | cpuid | cpuid | 100 |"), "{md}");
    assert!(md.contains("<details><summary>Measured, without a budget (2)</summary>"), "{md}");
}

#[test]
fn update_rewrites_numbers_keeps_comments_and_adds_what_was_measured() {
    let temp = TempDir::new("gate-update");
    let path = temp.0.join("b.toml");
    std::fs::write(&path, BUDGETS).unwrap();
    let after = results(100, 100);
    let summary = gate::update(&path, &vocabulary(), &after, "5%".parse::<Headroom>().unwrap()).unwrap();
    assert_eq!((summary.changed, summary.not_measured, summary.added_engines, summary.added_workloads), (4, 1, 2, 0));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# The test's budgets.\n[gate]\n"), "{text}");
    assert!(text.contains("exits.total = 215                                  # CPUID and faults\n"), "{text}");
    assert!(text.contains("exits.cpuid = { per_iteration = 2.111, comment = \"one CPUID per iteration\" }"), "{text}");
    assert!(text.contains("\"shadow.hidden_faults\" = 4\n"), "{text}");
    assert!(text.contains("holes.total = { max = 3 }"), "{text}");
    // The unbudgeted pairs get tables in their workloads' entries, each in place.
    let native = text.find("[workload.native]").unwrap();
    assert!(
        native > text.find("[workload.trap-emulate]").unwrap() && native < text.find("name = \"syscall\"").unwrap()
    );
    assert!(
        text.trim_end().ends_with("[workload.native]\nexits.total = 0\nholes.total = 0\ndetectable.total = 0"),
        "{text}"
    );
    let budgets = parse(&text).unwrap();
    let verdict = gate::check(&budgets, Path::new("b.toml"), &vocabulary(), &after, None, true).unwrap();
    assert!(verdict.passed() && verdict.unbudgeted.is_empty(), "{verdict:?}");

    std::fs::write(&path, "[gate]\nversion = 1\nprofile = \"p4-2006\"\noptions = [\"bt.lmsle=true\"]\n").unwrap();
    let summary = gate::update(&path, &vocabulary(), &after, Headroom::default()).unwrap();
    assert_eq!((summary.added_engines, summary.added_workloads), (4, 2));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("[[workload]]\nname = \"cpuid\"\nparameters = { iterations = 100 }\narchitecture = \"x86-64\"\n"),
        "{text}"
    );
    assert!(text.contains("[workload.hw-shadow]\nexits.total = 204\nexits.cpuid = 201\nexits.shadow_page_fault = 3\nshadow.hidden_faults = 3\nholes.total = 0\n"), "{text}");
    let verdict = check(&parse(&text).unwrap(), &after, None);
    assert!(verdict.passed(), "{}", render::summary(&verdict));
    assert_eq!(verdict.checks.len(), 3 + 3 + 6 + 3);
}

#[test]
fn headroom_reads_percentages() {
    assert_eq!("5%".parse::<Headroom>().unwrap().percent(), 5.0);
    assert_eq!("12.5".parse::<Headroom>().unwrap().percent(), 12.5);
    assert!("-1%".parse::<Headroom>().is_err() && "five".parse::<Headroom>().is_err());
}
