//! Symbol lists given with `virtlab record --image … --symbols FILE`: untrusted text, read into a trace's symbol
//! map.

use std::path::Path;

use anyhow::{bail, Context};
use virtlab_traces::{Symbol, SymbolMap};

/// A symbol list as `nm --print-size` prints it: `ADDRESS SIZE TYPE NAME`, hex address and size. Code symbols
/// (types t, T, w, W) are kept; an alias (a second name on the same range) keeps the first name.
pub fn read(path: &Path) -> anyhow::Result<SymbolMap> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut symbols: Vec<Symbol> = Vec::new();
    let mut ranges = std::collections::HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (address, size, kind, name) = match fields[..] {
            [] => continue,
            [first, ..] if first.starts_with('#') => continue,
            // `nm --print-size` prints no size for symbols without one (and `U` for undefined ones).
            [_, _, _] | [_, _] => continue,
            [address, size, kind, name] => (address, size, kind, name),
            _ => bail!(
                "{}:{}: `{line}` is not ADDRESS SIZE TYPE NAME (as `nm --print-size --defined-only` prints)",
                path.display(),
                number + 1
            ),
        };
        let hex = |field: &str, what: &str| {
            u64::from_str_radix(field.trim_start_matches("0x"), 16)
                .with_context(|| format!("{}:{}: the {what} `{field}` is not hexadecimal", path.display(), number + 1))
        };
        let (start, size) = (hex(address, "address")?, hex(size, "size")?);
        let end = start
            .checked_add(size)
            .with_context(|| format!("{}:{}: `{name}` wraps around the address space", path.display(), number + 1))?;
        if matches!(kind, "t" | "T" | "w" | "W") && size > 0 && ranges.insert((start, end)) {
            symbols.push(Symbol { name: name.to_string(), start, end });
        }
    }
    SymbolMap::new(symbols).with_context(|| format!("{}: the symbols do not form a map", path.display()))
}
