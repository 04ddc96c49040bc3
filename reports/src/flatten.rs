//! Engine results, as the JSON object `virtlab replay --json` prints for one engine, flattened into long-format
//! metrics and guest-address sites without naming a single metric: a family or key the engines add later becomes
//! rows of its own.

use serde_json::{Map, Value};

/// One number of one engine's result: `family` groups keys (`exits`, `cycles_by_cause`, …; numbers at the top
/// level of the object form the family `totals`).
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub family: String,
    pub key: String,
    pub value: f64,
}

/// One guest instruction address that an engine attributes counts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// `exit`, `callout`, `hypercall` (from a cause written `kind:reason`), or the list's own name (`holes`,
    /// `detectable`).
    pub kind: String,
    pub reason: String,
    pub address: u64,
    pub count: u64,
    /// The guest function holding the address (`sys_getpid+0x12`), empty when the trace does not name it.
    pub function: String,
}

/// The family of numbers at the top level of a result.
pub const TOTALS: &str = "totals";

/// Every number in `object`, in the object's order: top-level numbers under [`TOTALS`], a nested object's
/// numbers under its name (`a.b` deeper down), and a list of `{…, count}` records as one row per label (the
/// record's first text field other than `address`) with the counts summed. Text at any level identifies the
/// result and is not a metric.
pub fn metrics(object: &Map<String, Value>) -> Vec<Metric> {
    let mut out = Vec::new();
    for (name, value) in object {
        match value {
            Value::Object(inner) => nested(name, inner, &mut out),
            Value::Array(items) => labelled_counts(name, items, &mut out),
            other => push_number(TOTALS, name, other, &mut out),
        }
    }
    out
}

fn nested(family: &str, object: &Map<String, Value>, out: &mut Vec<Metric>) {
    for (name, value) in object {
        match value {
            Value::Object(inner) => nested(&format!("{family}.{name}"), inner, out),
            Value::Array(items) => labelled_counts(&format!("{family}.{name}"), items, out),
            other => push_number(family, name, other, out),
        }
    }
}

fn push_number(family: &str, key: &str, value: &Value, out: &mut Vec<Metric>) {
    let number = match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    };
    if let Some(value) = number {
        out.push(Metric { family: family.to_string(), key: key.to_string(), value });
    }
}

/// The label of a record in a list: its first text field other than the address.
fn label(record: &Map<String, Value>) -> Option<&str> {
    record.iter().find(|(name, _)| name.as_str() != "address").and_then(|(_, value)| value.as_str())
}

fn labelled_counts(family: &str, items: &[Value], out: &mut Vec<Metric>) {
    let mut sums: Vec<(&str, f64)> = Vec::new();
    for record in items.iter().filter_map(Value::as_object) {
        let (Some(label), Some(count)) = (label(record), record.get("count").and_then(Value::as_f64)) else {
            continue;
        };
        match sums.iter_mut().find(|(seen, _)| *seen == label) {
            Some((_, sum)) => *sum += count,
            None => sums.push((label, count)),
        }
    }
    out.extend(sums.into_iter().map(|(key, value)| Metric { family: family.to_string(), key: key.into(), value }));
}

/// Every `{address, …, count}` record in the lists at the top level of `object`, in order. The record's label
/// (see [`metrics`]) gives kind and reason: `exit:cr_access` splits into both, a plain label is the reason and
/// the list's name the kind; a `function` field names the guest function. Addresses are numbers or `0x…` text.
pub fn sites(object: &Map<String, Value>) -> Vec<Site> {
    let mut out = Vec::new();
    for (list, value) in object {
        for record in value.as_array().into_iter().flatten().filter_map(Value::as_object) {
            let (Some(address), Some(count)) =
                (record.get("address").and_then(address), record.get("count").and_then(Value::as_u64))
            else {
                continue;
            };
            let label = label(record).unwrap_or_default();
            let (kind, reason) = label.split_once(':').unwrap_or((list.as_str(), label));
            let function = record.get("function").and_then(Value::as_str).unwrap_or_default().to_string();
            out.push(Site { kind: kind.to_string(), reason: reason.to_string(), address, count, function });
        }
    }
    out
}

fn address(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(text) => u64::from_str_radix(text.strip_prefix("0x")?, 16).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn numbers_become_rows_by_family_and_text_is_left_out() {
        let result = object(json!({
            "engine": "bt", "cycles": 1200, "exits": {"cpuid": 3, "hlt": 0},
            "tlb": {"misses": {"data": 7}}, "lmsle": true,
        }));
        let rows: Vec<(String, String, f64)> =
            metrics(&result).into_iter().map(|m| (m.family, m.key, m.value)).collect();
        assert_eq!(
            rows,
            [
                ("totals".into(), "cycles".into(), 1200.0),
                ("exits".into(), "cpuid".into(), 3.0),
                ("exits".into(), "hlt".into(), 0.0),
                ("tlb.misses".into(), "data".into(), 7.0),
                ("totals".into(), "lmsle".into(), 1.0),
            ]
        );
    }

    #[test]
    fn lists_of_records_sum_their_counts_per_label_and_give_sites() {
        let result = object(json!({
            "holes": [
                {"kind": "popf_ignores_if", "address": "0x1000", "count": 2},
                {"kind": "sgdt_reveals_monitor", "address": "0x1008", "count": 1},
                {"kind": "popf_ignores_if", "address": "0x2000", "count": 5},
            ],
            "top_sites": [{"address": "0xffff8000", "cause": "exit:cr_access", "count": 9, "function": "switch_to+0x4"}],
        }));
        let rows: Vec<(String, String, f64)> =
            metrics(&result).into_iter().map(|m| (m.family, m.key, m.value)).collect();
        assert_eq!(
            rows,
            [
                ("holes".into(), "popf_ignores_if".into(), 7.0),
                ("holes".into(), "sgdt_reveals_monitor".into(), 1.0),
                ("top_sites".into(), "exit:cr_access".into(), 9.0),
            ]
        );
        let sites = sites(&result);
        assert_eq!(sites.len(), 4);
        let exit = Site {
            kind: "exit".into(),
            reason: "cr_access".into(),
            address: 0xffff_8000,
            count: 9,
            function: "switch_to+0x4".into(),
        };
        assert_eq!(sites[3], exit);
        let hole = Site {
            kind: "holes".into(),
            reason: "popf_ignores_if".into(),
            address: 0x1000,
            count: 2,
            function: String::new(),
        };
        assert_eq!(sites[0], hole);
    }
}
