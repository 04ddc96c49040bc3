//! Any bytes as a KVM binary statistics file (what the kernel's stats descriptor returns): a schema and its
//! values, or an error. No /dev/kvm is needed: the parser reads bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtlab_kvm::stats::{Header, Schema};

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data);
    if let Ok(schema) = Schema::parse(data) {
        let _ = schema.values(data.get(schema.data_offset as usize..).unwrap_or_default());
    }
});
