//! What several integration tests share: recording a catalog workload in memory, its functions named.

use virtlab_traces::{Metadata, Symbol, SymbolMap};

/// Records the catalog workload `name` with `params` on the reference machine and returns the trace's bytes.
pub fn record_workload(name: &str, params: &[(&str, &str)]) -> Vec<u8> {
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let image = virtlab_workloads::build(name, &params).unwrap();
    let symbols = image.symbols.iter().map(|s| Symbol { name: s.name.clone(), start: s.start, end: s.end }).collect();
    let symbols = SymbolMap::new(symbols).unwrap();
    let metadata = Metadata { workload: name.into(), params, recorder: "tests".into(), symbols, ..Metadata::default() };
    virtlab_record::record_in_memory(&image.bytes, metadata, 100_000_000).unwrap()
}
