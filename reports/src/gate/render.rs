//! The gate's verdict for people (text, like `perf kvm stat`'s tables), for programs (versioned JSON), for CI
//! systems (JUnit XML) and for a CI job's page (Markdown).

use std::fmt::Write;

use serde_json::{json, Value};

use super::check::{BlameSite, Check, Verdict};

/// Version of the JSON object [`json`] returns; bumped when a field changes meaning or disappears.
pub const JSON_VERSION: u64 = 1;

/// What the verdict was about: the budget file and the sweep settings it names.
pub struct Context<'a> {
    pub budgets: &'a str,
    pub profile: &'a str,
    pub options: &'a [(String, String)],
}

impl Context<'_> {
    fn options(&self) -> String {
        let options: Vec<String> = self.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if options.is_empty() {
            "none".into()
        } else {
            options.join(",")
        }
    }

    fn title(&self) -> String {
        format!("{}, profile {}, options {}", self.budgets, self.profile, self.options())
    }
}

/// A count as printed: whole numbers without decimals.
fn number(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn over_by(check: &Check) -> String {
    let by = check.over_by();
    if by <= 0.0 {
        return "-".into();
    }
    match check.ceiling > 0.0 {
        true => format!("+{} (+{:.1}%)", number(by), by / check.ceiling * 100.0),
        false => format!("+{}", number(by)),
    }
}

fn budget(check: &Check) -> String {
    match check.limit.allowance {
        super::Allowance::Count(n) => n.to_string(),
        super::Allowance::PerIteration(_) => {
            format!("{} ({})", number(check.ceiling), check.limit.allowance.describe())
        }
    }
}

/// The closing line: what failed, what was missing, what has no budget.
pub fn summary(verdict: &Verdict) -> String {
    let over = verdict.over().count();
    let total = verdict.checks.len();
    let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut parts = Vec::new();
    if over > 0 {
        parts.push(format!("{over} of {} exceeded", plural(total, "budget", "budgets")));
    } else {
        parts.push(format!("{} hold", plural(total, "budget", "budgets")));
    }
    if !verdict.missing.is_empty() {
        let allowed = if verdict.allow_missing { " (allowed)" } else { "" };
        parts.push(format!(
            "{} missing from the results{allowed}",
            plural(verdict.missing.len(), "budgeted pair", "budgeted pairs")
        ));
    }
    if !verdict.unbudgeted.is_empty() {
        parts.push(format!(
            "{} no budget",
            plural(verdict.unbudgeted.len(), "measured pair has", "measured pairs have")
        ));
    }
    let slack = verdict.checks.iter().filter(|c| c.actual < c.ceiling).count();
    if slack > 0 && over == 0 {
        parts.push(format!("{slack} above their count (`virtlab gate --update` tightens them)"));
    }
    format!("gate {}: {}", if verdict.passed() { "passed" } else { "FAILED" }, parts.join("; "))
}

/// Left-aligned columns, the numeric ones (`right`) right-aligned.
fn columns(rows: &[Vec<String>], right: &[usize]) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| match right.contains(&c) {
                true => format!("{cell:>w$}", w = widths[c]),
                false => format!("{cell:<w$}", w = widths[c]),
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

fn check_row(check: &Check, status: bool) -> Vec<String> {
    let mut row = vec![
        check.workload.label(),
        check.engine.clone(),
        check.limit.metric.clone(),
        budget(check),
        number(check.actual),
        over_by(check),
    ];
    if status {
        row.push(if check.is_over() { "OVER" } else { "ok" }.into());
    }
    row
}

fn blame_rows(sites: &[BlameSite]) -> Vec<Vec<String>> {
    let baseline = sites.iter().any(|s| s.baseline.is_some());
    let mut rows = vec![["address", "function", "instruction", "reason", "count"].map(String::from).to_vec()];
    if baseline {
        rows[0].extend(["baseline".to_string(), "change".to_string()]);
    }
    for site in sites {
        let mut row = vec![
            format!("{:#x}", site.address),
            if site.function.is_empty() { "-".into() } else { site.function.clone() },
            site.instruction.clone(),
            site.reason.clone(),
            site.count.to_string(),
        ];
        if let Some(before) = site.baseline {
            row.push(before.to_string());
            row.push(if before == 0 { "new".into() } else { format!("+{}", site.count - before) });
        }
        rows.push(row);
    }
    rows
}

fn blame_title(check: &Check, budgets: &str) -> String {
    let comment = check.limit.comment.as_ref().map_or(String::new(), |c| format!(" ({c})"));
    format!(
        "{} / {} / {}: {} > {}{comment}, {budgets}:{}",
        check.workload.label(),
        check.engine,
        check.limit.metric,
        number(check.actual),
        number(check.ceiling),
        check.limit.line
    )
}

/// The verdict as text: the breaches (every check with `all`) in a table, each breach's blame, the missing and
/// the unbudgeted pairs, and the summary line.
pub fn text(context: &Context<'_>, verdict: &Verdict, all: bool) -> String {
    let mut out = format!("virtlab gate: {}\n", context.title());
    let header = ["workload", "engine", "metric", "budget", "actual", "over by"].map(String::from).to_vec();
    let shown: Vec<&Check> = verdict.checks.iter().filter(|c| all || c.is_over()).collect();
    if !shown.is_empty() {
        let mut rows = vec![header];
        if all {
            rows[0].push("status".into());
        }
        rows.extend(shown.iter().map(|c| check_row(c, all)));
        let _ = write!(out, "\n{}", columns(&rows, &[3, 4, 5]));
    }
    for check in verdict.over() {
        let _ = writeln!(out, "\nblame: {}", blame_title(check, context.budgets));
        if !check.blame.is_empty() {
            for line in columns(&blame_rows(&check.blame), &[4, 5, 6]).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(note) = &check.blame_note {
            let _ = writeln!(out, "  ({note})");
        }
    }
    if !verdict.missing.is_empty() {
        let _ = writeln!(out, "\nbudgeted, missing from the results:");
        for m in &verdict.missing {
            let _ =
                writeln!(out, "  {} / {} ({}:{}): {}", m.workload.label(), m.engine, context.budgets, m.line, m.reason);
        }
    }
    if !verdict.unbudgeted.is_empty() {
        let _ = writeln!(out, "\nmeasured, without a budget:");
        for u in &verdict.unbudgeted {
            let _ = writeln!(out, "  {} / {}", u.workload.label(), u.engine);
        }
    }
    let _ = writeln!(out, "\n{}", summary(verdict));
    out
}

fn workload_json(workload: &super::WorkloadKey) -> Value {
    let parameters: serde_json::Map<String, Value> =
        workload.parameters.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({ "name": workload.name, "parameters": parameters, "architecture": workload.architecture })
}

/// A count as JSON: a whole number when it is one (counts are; per-iteration ceilings may not be).
fn count_json(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 2f64.powi(53) {
        json!(value as i64)
    } else {
        json!(value)
    }
}

fn check_json(check: &Check) -> Value {
    let (kind, value) = match check.limit.allowance {
        super::Allowance::Count(n) => ("max", json!(n)),
        super::Allowance::PerIteration(rate) => ("per_iteration", json!(rate)),
    };
    let blame: Vec<Value> = check
        .blame
        .iter()
        .map(|s| {
            json!({
                "address": format!("{:#x}", s.address), "function": s.function, "instruction": s.instruction,
                "kind": s.kind, "reason": s.reason, "count": s.count, "baseline": s.baseline,
            })
        })
        .collect();
    json!({
        "workload": workload_json(&check.workload),
        "engine": check.engine,
        "metric": check.limit.metric,
        "line": check.limit.line,
        "comment": check.limit.comment,
        "budget": { kind: value, "ceiling": count_json(check.ceiling) },
        "actual": count_json(check.actual),
        "over_by": count_json(check.over_by()),
        "over": check.is_over(),
        "blame": blame,
        "blame_note": check.blame_note,
    })
}

/// The verdict as one JSON object (`format` `virtlab-gate`, `version` [`JSON_VERSION`]).
pub fn json(context: &Context<'_>, verdict: &Verdict) -> Value {
    let options: serde_json::Map<String, Value> = context.options.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "format": "virtlab-gate",
        "version": JSON_VERSION,
        "budgets": context.budgets,
        "profile": context.profile,
        "options": options,
        "passed": verdict.passed(),
        "summary": {
            "checks": verdict.checks.len(),
            "over": verdict.over().count(),
            "missing": verdict.missing.len(),
            "unbudgeted": verdict.unbudgeted.len(),
            "text": summary(verdict),
        },
        "checks": verdict.checks.iter().map(check_json).collect::<Vec<_>>(),
        "missing": verdict.missing.iter().map(|m| json!({
            "workload": workload_json(&m.workload), "engine": m.engine, "line": m.line, "reason": m.reason,
        })).collect::<Vec<_>>(),
        "unbudgeted": verdict.unbudgeted.iter().map(|u| json!({
            "workload": workload_json(&u.workload), "engine": u.engine,
        })).collect::<Vec<_>>(),
    })
}

/// Text for an XML attribute or element: escaped as HTML is, without the control characters XML 1.0 forbids.
fn xml(text: &str) -> String {
    let allowed: String = text.chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r')).collect();
    crate::document::escape(&allowed)
}

/// The verdict as JUnit XML: one test case per budget (a failure when over, with its blame), one per missing
/// pair (a failure, or skipped when missing pairs are allowed) and one skipped per measured pair without a budget.
pub fn junit(context: &Context<'_>, verdict: &Verdict) -> String {
    let mut cases = String::new();
    let (mut failures, mut skipped) = (0, 0);
    for check in &verdict.checks {
        let class = xml(&format!("{}.{}", check.workload.label(), check.engine));
        let _ = write!(cases, "    <testcase classname=\"{class}\" name=\"{}\"", xml(&check.limit.metric));
        if check.is_over() {
            failures += 1;
            let message = format!("{} > {} ({})", number(check.actual), number(check.ceiling), over_by(check));
            let mut body = blame_title(check, context.budgets) + "\n";
            body += &columns(&blame_rows(&check.blame), &[4, 5, 6]);
            if let Some(note) = &check.blame_note {
                body += &format!("({note})\n");
            }
            let _ = writeln!(
                cases,
                ">\n      <failure type=\"over-budget\" message=\"{}\">{}</failure>\n    </testcase>",
                xml(&message),
                xml(&body)
            );
        } else {
            let _ = writeln!(cases, "/>");
        }
    }
    for m in &verdict.missing {
        let class = xml(&format!("{}.{}", m.workload.label(), m.engine));
        let message = xml(&format!("{} ({}:{})", m.reason, context.budgets, m.line));
        let outcome = if verdict.allow_missing {
            skipped += 1;
            format!("<skipped message=\"{message}\"/>")
        } else {
            failures += 1;
            format!("<failure type=\"missing\" message=\"{message}\"/>")
        };
        let _ =
            writeln!(cases, "    <testcase classname=\"{class}\" name=\"results\">\n      {outcome}\n    </testcase>");
    }
    for u in &verdict.unbudgeted {
        skipped += 1;
        let class = xml(&format!("{}.{}", u.workload.label(), u.engine));
        let _ = writeln!(
            cases,
            "    <testcase classname=\"{class}\" name=\"budget\">\n      <skipped message=\"measured without a budget\"/>\n    </testcase>"
        );
    }
    let tests = verdict.checks.len() + verdict.missing.len() + verdict.unbudgeted.len();
    let counts = format!("tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\"");
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"virtlab gate\" {counts}>\n  \
         <testsuite name=\"{}\" {counts}>\n{cases}  </testsuite>\n</testsuites>\n",
        xml(&context.title())
    )
}

fn md_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn md_table(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|c| md_cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if i == 0 {
            let _ = writeln!(out, "|{}", "---|".repeat(row.len()));
        }
    }
    out
}

/// The verdict as Markdown for a CI job's page: the summary, the breaches with their blame, the missing and the
/// unbudgeted pairs (the last two in collapsed sections).
pub fn markdown(context: &Context<'_>, verdict: &Verdict) -> String {
    let mut out = format!(
        "## virtlab gate: {}\n\n`{}`\n\n**{}**\n",
        if verdict.passed() { "passed" } else { "FAILED" },
        context.title(),
        summary(verdict)
    );
    let over: Vec<&Check> = verdict.over().collect();
    if !over.is_empty() {
        let mut rows = vec![["workload", "engine", "metric", "budget", "actual", "over by"].map(String::from).to_vec()];
        rows.extend(over.iter().map(|c| check_row(c, false)));
        let _ = write!(out, "\n{}", md_table(&rows));
        for check in over {
            let _ = writeln!(out, "\n### Blame: {}\n", md_cell(&blame_title(check, context.budgets)));
            if !check.blame.is_empty() {
                out += &md_table(&blame_rows(&check.blame));
            }
            if let Some(note) = &check.blame_note {
                let _ = writeln!(out, "\n_{note}_");
            }
        }
    }
    let lists = [
        (
            "Budgeted, missing from the results",
            verdict
                .missing
                .iter()
                .map(|m| format!("{} / {}: {} (line {})", m.workload.label(), m.engine, m.reason, m.line))
                .collect::<Vec<_>>(),
        ),
        (
            "Measured, without a budget",
            verdict.unbudgeted.iter().map(|u| format!("{} / {}", u.workload.label(), u.engine)).collect(),
        ),
    ];
    for (title, items) in lists {
        if !items.is_empty() {
            let _ = writeln!(out, "\n<details><summary>{title} ({})</summary>\n", items.len());
            for item in items {
                let _ = writeln!(out, "- {}", md_cell(&item));
            }
            let _ = writeln!(out, "\n</details>");
        }
    }
    out
}
