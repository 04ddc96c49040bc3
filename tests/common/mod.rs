//! What several integration tests share: recording a catalog workload in memory (its functions named), and a
//! scratch directory.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

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

/// An empty directory of this test's own under the system's temporary directory, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("virtlab-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` (directories created as needed) and returns its path as text, for a command line.
    pub fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
