//! Untrusted input, mutated: real traces recorded from catalog workloads, guest images, profile files, the
//! catalog's budget file and a sweep's results directory are damaged in many small ways and fed to every parser
//! that reads them. Each must answer with a value or an error, never a panic; a trace the checker accepts must
//! replay under every engine without one.
//!
//! Trace mutations go *inside* the chunks: each chunk is decompressed, its payload (or its header fields) changed,
//! and the chunk written back stored, with lengths and both checksums recomputed — otherwise the chunk checksums
//! stop every mutation before a decoder sees it. The run is deterministic (a fixed seed); `VIRTLAB_MUTATIONS=N`
//! sets the number of mutations per seed for a long run (the default keeps CI to seconds), and a failure names
//! the seed trace, the mutation number and what was done, so it replays exactly.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use virtlab_engines::profile::BUILT_IN;
use virtlab_engines::{engine, ExitReason, Hypercall, Options, PreparedTrace, Profile};
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_reports::gate::{Budgets, Vocabulary};
use virtlab_traces::format::{join_stored, split_chunks, RawChunk};
use virtlab_traces::synth::SplitMix64;
use virtlab_traces::{check, Metadata, TraceView};

/// Mutations per seed unless `VIRTLAB_MUTATIONS` says otherwise.
const DEFAULT_MUTATIONS: u64 = 300;

fn mutations() -> u64 {
    std::env::var("VIRTLAB_MUTATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_MUTATIONS)
}

/// The mutations' random choices: SplitMix64 (`virtlab_traces::synth`), so a failing case is a seed and a number.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }

    /// Bytes that tend to sit on a boundary of some field.
    fn interesting_byte(&mut self) -> u8 {
        [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x40, 0x10][self.below(8)]
    }
}

/// Damages one chunk (or the chunk sequence) and says how.
fn mutate(rng: &mut Rng, chunks: &mut Vec<RawChunk>) -> String {
    let index = rng.below(chunks.len());
    let count = chunks.len();
    let chunk = &mut chunks[index];
    let len = chunk.raw.len();
    match rng.below(9) {
        0 if len > 0 => {
            let (at, bit) = (rng.below(len), rng.below(8));
            chunk.raw[at] ^= 1 << bit;
            format!("chunk {index}: flip bit {bit} of byte {at}")
        }
        1 if len > 0 => {
            let (at, value) = (rng.below(len), rng.interesting_byte());
            chunk.raw[at] = value;
            format!("chunk {index}: byte {at} = {value:#04x}")
        }
        2 => {
            let at = rng.below(len + 1);
            chunk.raw.truncate(at);
            format!("chunk {index}: truncate to {at} bytes")
        }
        3 if len > 0 => {
            let (from, count) = (rng.below(len), 1 + rng.below(16));
            let end = (from + count).min(len);
            let copy = chunk.raw[from..end].to_vec();
            let at = rng.below(len + 1);
            chunk.raw.splice(at..at, copy);
            format!("chunk {index}: duplicate bytes {from}..{end} at {at}")
        }
        4 => {
            let delta = [1u32, u32::MAX, 1 << 20][rng.below(3)];
            chunk.items = chunk.items.wrapping_add(delta);
            format!("chunk {index}: items {:+}", delta as i32)
        }
        5 => {
            let value = [0u8, 6, 0x7F, 0x81][rng.below(4)];
            chunk.kind = value;
            format!("chunk {index}: kind {value:#04x}")
        }
        6 if count > 1 => {
            let other = rng.below(count);
            chunks.swap(index, other);
            format!("swap chunks {index} and {other}")
        }
        7 => {
            chunks.remove(index);
            format!("drop chunk {index}")
        }
        _ => {
            let copy = chunk.clone();
            chunks.insert(index, copy);
            format!("duplicate chunk {index}")
        }
    }
}

/// Every reading path over `bytes`; returns the checker's verdict (its error's kind when it refused). Panics
/// propagate.
fn read_every_way(bytes: &[u8]) -> Result<(), String> {
    if let Ok(view) = TraceView::open(bytes) {
        for event in view.events() {
            if event.is_err() {
                break;
            }
        }
        let _ = view.for_each_event(|_| {});
    }
    check(Cursor::new(bytes)).map(|_| ()).map_err(|error| error_kind(&error.to_string()))
}

/// An error message without its numbers, so errors group by the rule or field they name.
fn error_kind(message: &str) -> String {
    let words: Vec<&str> = message.split_whitespace().filter(|w| !w.chars().any(|c| c.is_ascii_digit())).collect();
    words.into_iter().take(8).collect::<Vec<_>>().join(" ")
}

/// A trace the checker accepts is prepared and replayed by every engine: an error is allowed, a panic is not.
fn replay_every_engine(bytes: &[u8], profile: &Profile) {
    let view = TraceView::open(bytes).expect("a checked trace opens");
    let Ok(trace) = PreparedTrace::new(view) else { return };
    let mut options = Options::default();
    options.set("bt.lmsle", "true").unwrap();
    for engine in engine::all() {
        let _ = engine.replay(&trace, profile, &options);
    }
}

fn record(workload: &str, params: &[(&str, &str)]) -> Vec<u8> {
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let image = virtlab_workloads::build(workload, &params).unwrap();
    let metadata =
        Metadata { workload: workload.into(), params, recorder: "tests/mutations".into(), ..Metadata::default() };
    virtlab_record::record_in_memory(&image.bytes, metadata, 50_000_000).unwrap()
}

#[test]
fn mutated_real_traces_never_panic_a_reader_the_checker_or_an_engine() {
    let profile = Profile::load("p4-2006").unwrap();
    let count = mutations();
    let mut accepted = 0u64;
    let mut refusals = std::collections::BTreeMap::new();
    let seeds: [(&str, &[(&str, &str)]); 4] = [
        ("syscall", &[("iterations", "3")]),
        ("pgfault", &[("iterations", "2")]),
        ("forkwait", &[("iterations", "1")]),
        ("syscall", &[("iterations", "3"), ("arch", "x86-32"), ("sysenter", "1")]),
    ];
    for (seed_index, (workload, params)) in seeds.into_iter().enumerate() {
        let trace = record(workload, params);
        let (preamble, chunks) = split_chunks(&trace).unwrap();
        // The harness itself round-trips: every chunk rewritten stored is still a valid trace.
        assert_eq!(read_every_way(&join_stored(&preamble, &chunks)), Ok(()), "{workload}: re-stored trace rejected");
        let mut rng = Rng(SplitMix64(0x5EED_0000 + seed_index as u64));
        for number in 0..count {
            let mut damaged = chunks.clone();
            let mut what = mutate(&mut rng, &mut damaged);
            if rng.below(4) == 0 && !damaged.is_empty() {
                what = format!("{what}; {}", mutate(&mut rng, &mut damaged));
            }
            let bytes = join_stored(&preamble, &damaged);
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let verdict = read_every_way(&bytes);
                if verdict.is_ok() {
                    replay_every_engine(&bytes, &profile);
                }
                verdict
            }));
            match outcome {
                Ok(Ok(())) => accepted += 1,
                Ok(Err(kind)) => *refusals.entry(kind).or_insert(0u64) += 1,
                Err(_) => {
                    panic!("{workload} trace, mutation {number} ({what}): a reader, the checker or an engine panicked")
                }
            }
        }
    }
    // Some mutations are harmless (an optional chunk, a flipped bit in serial output), most are caught.
    let total = seeds.len() as u64 * count;
    eprintln!("{total} mutated traces, {accepted} accepted by the checker and replayed; refusals by kind:");
    for (kind, n) in &refusals {
        eprintln!("{n:>8}  {kind}");
    }
    assert!(accepted < total, "the checker accepted every mutation: it checks nothing");
    // The mutations reach past the container into the decoders and the checker's rules: many kinds of refusal.
    assert!(refusals.len() >= 10, "only {} kinds of refusal: {refusals:?}", refusals.len());
}

#[test]
fn mutated_guest_images_load_or_are_refused_and_run_within_their_budget() {
    let image = virtlab_workloads::build("cpuid", &[("iterations".into(), "2".into())]).unwrap().bytes;
    let mut rng = Rng(SplitMix64(0x1A6E));
    // A run costs a boot; half as many images as traces keep the test to seconds.
    for number in 0..mutations().div_ceil(2) {
        let mut damaged = image.clone();
        let what = match rng.below(4) {
            // The Multiboot header and the boot stub are the first page: aim there most of the time.
            0 | 1 => {
                let at = rng.below(4096.min(damaged.len()));
                damaged[at] = rng.interesting_byte();
                format!("byte {at}")
            }
            2 => {
                let at = rng.below(damaged.len());
                damaged[at] ^= 1 << rng.below(8);
                format!("bit in byte {at}")
            }
            _ => {
                let at = rng.below(damaged.len() + 1);
                damaged.truncate(at);
                format!("truncate to {at}")
            }
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let config = MachineConfig { ram_size: 40 << 20, ..MachineConfig::default() };
            let Ok(mut machine) = Machine::from_multiboot(&damaged, config) else { return };
            // A damaged guest may loop, fault or stop: each is an outcome; the budget bounds the run.
            let _ = machine.run(&mut NullObserver, RunLimits { max_instructions: 50_000 });
        }));
        assert!(outcome.is_ok(), "image mutation {number} ({what}): the loader or the machine panicked");
    }
}

/// One small damage to a text file: a byte replaced by one that means something in TOML, a truncation, or a huge
/// number inserted. Returns the damaged text and what was done.
fn damage_toml(rng: &mut Rng, text: &str) -> (String, String) {
    let mut bytes = text.as_bytes().to_vec();
    let at = rng.below(bytes.len());
    let what = match rng.below(3) {
        0 => {
            bytes[at] = b"=[]\"'.-#\n0e9x"[rng.below(13)];
            format!("byte {at}")
        }
        1 => {
            bytes.truncate(at);
            format!("truncate to {at}")
        }
        _ => {
            bytes.splice(at..at, b"1e308".iter().copied());
            format!("insert 1e308 at {at}")
        }
    };
    (String::from_utf8_lossy(&bytes).into_owned(), what)
}

#[test]
fn mutated_profiles_parse_or_name_what_is_wrong() {
    let mut rng = Rng(SplitMix64(0x9F0F));
    for (name, text) in BUILT_IN {
        for number in 0..mutations() {
            let (text, what) = damage_toml(&mut rng, text);
            let outcome = catch_unwind(AssertUnwindSafe(|| match Profile::parse(&text, "mutated.toml", &[]) {
                Ok(profile) => assert!(profile.clock_ghz > 0.0, "a parsed profile has a clock"),
                Err(error) => {
                    assert!(error.to_string().contains("mutated.toml") || error.to_string().contains("--set"))
                }
            }));
            assert!(
                outcome.is_ok(),
                "{name} profile, mutation {number} ({what}): the parser panicked or named nothing"
            );
        }
    }
}

#[test]
fn mutated_budget_files_parse_or_name_the_file() {
    let engines = engine::all().iter().map(|e| e.name().to_string()).collect();
    let workloads = virtlab_workloads::catalog().iter().map(|spec| spec.name.to_string()).collect();
    let mut keys: Vec<(String, String)> = ExitReason::ALL.iter().map(|r| ("exits".into(), r.name().into())).collect();
    keys.extend(Hypercall::ALL.iter().map(|h| ("hypercalls".to_string(), h.name().to_string())));
    keys.extend([("translations".into(), "callouts".into()), ("shadow".into(), "hidden_faults".into())]);
    let vocabulary = Vocabulary::new(engines, workloads, &keys);
    let path = std::path::Path::new("mutated.toml");
    let original = include_str!("../budgets/catalog.toml");
    assert!(Budgets::parse(original, path, &vocabulary).is_ok(), "the catalog's budgets parse unmutated");
    let mut rng = Rng(SplitMix64(0xB0D6));
    for number in 0..mutations() {
        let (text, what) = damage_toml(&mut rng, original);
        let outcome = catch_unwind(AssertUnwindSafe(|| match Budgets::parse(&text, path, &vocabulary) {
            // A damaged profile name parses: the profile is looked up when the gate runs, naming it.
            Ok(_) => {}
            Err(error) => assert!(error.to_string().starts_with("mutated.toml"), "{error}"),
        }));
        assert!(outcome.is_ok(), "budget mutation {number} ({what}): the parser panicked or named no file");
    }
}

/// A results directory written by `virtlab sweep` for a small recorded trace, in a fresh temporary directory.
fn swept_results() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("virtlab-mutations-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("syscall.vlt"), record("syscall", &[("iterations", "20")])).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_virtlab"))
        .current_dir(&dir)
        .args(["sweep", "syscall.vlt", "--set", "bt.lmsle=true", "-o", "results"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    dir
}

#[test]
fn mutated_results_directories_read_or_name_the_damaged_file() {
    let dir = swept_results();
    let original = dir.join("results");
    let pristine = virtlab_reports::table::read_results(&original).unwrap();
    assert!(!pristine.rows.is_empty() && !pristine.sites.is_empty(), "the sweep wrote rows and sites");
    let files = ["manifest.json", "results.parquet", "sites.parquet"];
    let contents: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(original.join(f)).unwrap()).collect();
    let damaged = dir.join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    let mut rng = Rng(SplitMix64(0x5E5F));
    let (mut read, mut refused) = (0u64, 0u64);
    for number in 0..mutations() {
        let which = rng.below(files.len());
        for (file, bytes) in files.iter().zip(&contents) {
            std::fs::write(damaged.join(file), bytes).unwrap();
        }
        let mut bytes = contents[which].clone();
        let at = rng.below(bytes.len());
        let what = match rng.below(3) {
            0 => {
                let bit = 1u8 << rng.below(8);
                bytes[at] ^= bit;
                format!("bit {bit:#x} of byte {at} flipped")
            }
            1 => {
                bytes.truncate(at);
                format!("truncated to {at} bytes")
            }
            _ => {
                let byte = rng.next() as u8;
                bytes.insert(at, byte);
                format!("byte {byte:#x} inserted at {at}")
            }
        };
        std::fs::write(damaged.join(files[which]), &bytes).unwrap();
        // The manifest's digest of a Parquet file refuses any change to it; half the time the digest is re-sealed
        // (as the trace mutations recompute chunk checksums), so that the damage reaches polars' decoder.
        let resealed = which > 0 && rng.below(2) == 0;
        if resealed {
            let manifest = String::from_utf8(contents[0].clone()).unwrap();
            let old = blake3::hash(&contents[which]).to_hex().to_string();
            assert!(manifest.contains(&old), "the manifest records {}'s digest", files[which]);
            let new = blake3::hash(&bytes).to_hex().to_string();
            std::fs::write(damaged.join(files[0]), manifest.replace(&old, &new)).unwrap();
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| virtlab_reports::table::read_results(&damaged)));
        match outcome {
            Ok(Ok(results)) => {
                read += 1;
                assert_eq!(
                    results.rows.len(),
                    pristine.rows.len(),
                    "{} ({what}): rows the manifest counts",
                    files[which]
                );
            }
            Ok(Err(error)) => {
                refused += 1;
                let message = error.to_string();
                if which > 0 && !resealed {
                    assert!(message.contains("BLAKE3"), "{} ({what}): refused by its digest: {message}", files[which]);
                }
                assert!(
                    files.iter().any(|file| message.contains(file)),
                    "{} mutation {number} ({what}): the error names no file: {message}",
                    files[which]
                );
            }
            Err(_) => panic!("{} mutation {number} ({what}): reading the results panicked", files[which]),
        }
    }
    eprintln!("results directories: {read} read, {refused} refused, of {} mutations", mutations());
    std::fs::remove_dir_all(&dir).unwrap();
}
