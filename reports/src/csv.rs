//! The results table as CSV (RFC 4180: a header line, `,` between fields, fields with `,`, `"` or a line break
//! quoted). Written here rather than by polars so the bytes are ours to keep stable: numbers print as Rust prints
//! an `f64` (`1234`, `0.25`), the shortest text that reads back to the same value.

use std::fmt::Write;

use crate::table::Row;

fn field(out: &mut String, text: &str) {
    if text.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

/// The header line.
pub const HEADER: &str = "trace,workload,parameters,architecture,engine,profile,options,family,key,value\n";

/// `rows` with the header line first.
pub fn results(rows: &[Row]) -> String {
    let mut out = String::from(HEADER);
    for row in rows {
        let j = &row.job;
        for text in [&j.trace, &j.workload, &j.parameters, &j.architecture, &j.engine, &j.profile, &j.options] {
            field(&mut out, text);
            out.push(',');
        }
        field(&mut out, &row.family);
        out.push(',');
        field(&mut out, &row.key);
        let _ = writeln!(out, ",{}", row.value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Job;

    #[test]
    fn quotes_only_what_needs_it_and_prints_numbers_shortest() {
        let job = Job {
            trace: "a,b.vlt".into(),
            workload: "syscall".into(),
            parameters: "iterations=10".into(),
            architecture: "x86-64".into(),
            engine: "bt".into(),
            profile: "p4-2006".into(),
            options: String::new(),
        };
        let rows = [
            Row { job: job.clone(), family: "totals".into(), key: "cycles".into(), value: 1234.0 },
            Row { job, family: "refused".into(), key: "say \"no\"".into(), value: 0.25 },
        ];
        assert_eq!(
            results(&rows),
            format!(
                "{HEADER}\"a,b.vlt\",syscall,iterations=10,x86-64,bt,p4-2006,,totals,cycles,1234\n\
                 \"a,b.vlt\",syscall,iterations=10,x86-64,bt,p4-2006,,refused,\"say \"\"no\"\"\",0.25\n"
            )
        );
    }
}
