//! Parsers of untrusted input answer with errors, never with a panic: their production code (everything before the
//! file's `#[cfg(test)]` module) holds no `unwrap()`, `expect(…)`, `unreachable!`, `panic!`, `todo!` or
//! `unimplemented!`. A new parser joins the list when it lands; the mutation tests (`tests/mutations.rs`) check the
//! same files from the other side, with damaged input.

const PARSERS: &[&str] = &[
    "engines/machine/src/multiboot.rs",
    "engines/sim/src/profile.rs",
    "engines/kvm/src/stats.rs",
    "reports/src/table.rs",
    "reports/src/parquet_bounds.rs",
    "reports/src/csv.rs",
    "reports/src/gate/budgets.rs",
    "reports/src/gate/check.rs",
    "reports/src/gate/update.rs",
    "src/cmd/symbol_list.rs",
    "traces/src/format.rs",
    "traces/src/codec.rs",
    "traces/src/reader.rs",
    "traces/src/check.rs",
    "traces/src/blocks.rs",
    "src/cmd/verdicts.rs",
];

const PANICKING: &[&str] = &[".unwrap()", ".expect(", "unreachable!", "panic!(", "todo!", "unimplemented!"];

#[test]
fn parsers_of_untrusted_input_have_no_panic_path() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut found = Vec::new();
    for file in PARSERS {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap_or_else(|e| panic!("{file}: {e}"));
        let production = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (number, line) in production.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if PANICKING.iter().any(|pattern| code.contains(pattern)) {
                found.push(format!("{file}:{}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "panic paths on untrusted input (return an error naming the file and offset):\n{}",
        found.join("\n")
    );
}
