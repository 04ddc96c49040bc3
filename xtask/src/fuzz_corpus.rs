//! `cargo xtask fuzz-corpus`: the seeds the cargo-fuzz targets (`fuzz/`) start from, made from what the lab
//! really reads: traces recorded from catalog workloads (on both widths), rewritten with every chunk stored so
//! that a fuzzer's byte mutations land in payloads the decoders read (the target reseals the checksums); the
//! built-in profiles; catalog guest images. The KVM statistics target starts from no seed (its 10-minute run in
//! BENCHMARKS.md grew from 48 to 224 coverage edges).

use std::path::{Path, PathBuf};

use anyhow::Context;
use virtlab_traces::format::{join_stored, split_chunks};
use virtlab_traces::Metadata;

#[derive(clap::Args)]
pub struct Args {
    /// The corpus root; each target's seeds go to a directory named after it (relative paths start at the
    /// workspace root). cargo-fuzz reads `fuzz/corpus/<target>` by default.
    #[arg(long, default_value = "fuzz/corpus", value_name = "DIR")]
    out: PathBuf,
}

/// Small recordings: a fuzzer's executions per second fall with the input's size.
const TRACES: &[(&str, &[(&str, &str)])] = &[
    ("syscall", &[("iterations", "3")]),
    ("pgfault", &[("iterations", "2")]),
    ("forkwait", &[("iterations", "1")]),
    ("in", &[("iterations", "3")]),
    ("ptemod", &[("iterations", "3")]),
    ("syscall", &[("iterations", "3"), ("arch", "x86-32"), ("sysenter", "1")]),
    ("cow", &[("iterations", "1"), ("arch", "x86-32")]),
];

const IMAGES: &[&str] = &["cpuid", "syscall", "pgfault", "boot"];

fn owned(params: &[(&str, &str)]) -> Vec<(String, String)> {
    params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn seed_name(workload: &str, params: &[(String, String)]) -> String {
    let mut name = workload.to_string();
    for (key, value) in params {
        name.push_str(&format!("-{key}={value}"));
    }
    name
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let root = crate::catalog_traces::under_root(&args.out);
    let dir = |target: &str| -> anyhow::Result<PathBuf> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    };

    let traces = dir("read_trace")?;
    for (workload, params) in TRACES {
        let params = owned(params);
        let image = virtlab_workloads::build(workload, &params)?;
        let metadata = Metadata {
            workload: workload.to_string(),
            params: params.clone(),
            recorder: "xtask fuzz-corpus".into(),
            ..Metadata::default()
        };
        let trace = virtlab_record::record_in_memory(&image.bytes, metadata, 50_000_000)?;
        let (preamble, chunks) = split_chunks(&trace).with_context(|| format!("{workload}: recorded trace"))?;
        write(&traces, &format!("{}.vlt", seed_name(workload, &params)), &join_stored(&preamble, &chunks))?;
    }

    let profiles = dir("profile")?;
    for (name, text) in virtlab_engines::profile::BUILT_IN {
        write(&profiles, &format!("{name}.toml"), text.as_bytes())?;
    }

    let images = dir("guest_image")?;
    for workload in IMAGES {
        let params = owned(&[("iterations", "2")]);
        let image = virtlab_workloads::build(workload, &params)?;
        write(&images, &format!("{}.img", seed_name(workload, &params)), &image.bytes)?;
    }
    dir("kvm_stats")?;

    println!(
        "{}: {} traces, {} profiles, {} guest images",
        root.display(),
        TRACES.len(),
        virtlab_engines::profile::BUILT_IN.len(),
        IMAGES.len()
    );
    Ok(())
}
