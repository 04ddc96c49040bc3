//! What several integration tests share: recording a catalog workload in memory.

use std::io::Cursor;

use virtlab_machine::MachineConfig;
use virtlab_record::{record, RecordRequest};
use virtlab_traces::Metadata;

/// Records the catalog workload `name` with `params` on the reference machine and returns the trace's bytes.
pub fn record_workload(name: &str, params: &[(&str, &str)]) -> Vec<u8> {
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let image = virtlab_workloads::build(name, &params).unwrap();
    let request = RecordRequest {
        image: &image.bytes,
        metadata: Metadata { workload: name.into(), params, recorder: "tests".into(), ..Metadata::default() },
        machine: MachineConfig::default(),
        max_instructions: 100_000_000,
        timeout: None,
    };
    let (out, _) = record(Cursor::new(Vec::new()), request).unwrap();
    out.into_inner()
}
