//! The kvm engine as a user runs it: `virtlab replay --engine kvm` beside the models, `virtlab validate kvm` and
//! `virtlab calibrate host`. Where /dev/kvm is unusable each test checks that the command says why, and prints
//! that it did so; where it is usable, the measured values are checked against the trace and the models.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use virtlab_engines::{Primitive, Profile, Provenance};
use virtlab_kvm::{Backend, Probe};

fn virtlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtlab")).args(args).output().expect("virtlab runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(output)))
}

/// The backend, saying whether the KVM side of the test runs.
fn kvm_here(test: &str) -> Option<Backend> {
    match virtlab_kvm::probe() {
        Probe::Available(backend) => {
            eprintln!("{test}: KVM available (backend {}): running the KVM side", backend.name());
            Some(backend)
        }
        Probe::Unavailable(reason) => {
            eprintln!("{test}: KVM unusable ({reason}): checking that the command says so");
            None
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("virtlab-kvm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }

    fn record(&self, workload: &str, iterations: u32) -> String {
        let path = self.path(&format!("{workload}.vlt"));
        let iterations = format!("iterations={iterations}");
        let out = virtlab(&["record", workload, "--param", &iterations, "-o", &path]);
        assert!(out.status.success(), "{}", stderr(&out));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entry<'a>(all: &'a Value, engine: &str) -> &'a Value {
    all.as_array().unwrap().iter().find(|o| o["engine"] == engine).unwrap_or_else(|| panic!("no {engine} entry"))
}

#[test]
fn replay_shows_kvm_beside_the_models_with_the_same_exits_at_the_same_addresses() {
    let dir = TempDir::new("replay");
    let trace = dir.record("mmio", 100);
    let out = virtlab(&["replay", &trace, "--engine", "hybrid,kvm", "--set", "kvm.runs=2", "--json"]);
    let all = json(&out);
    let kvm = entry(&all, "kvm");
    let Some(backend) = kvm_here("replay") else {
        assert_eq!(out.status.code(), Some(4));
        assert!(kvm["unsupported"].as_str().unwrap().contains("/dev/kvm"), "{kvm}");
        return;
    };
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let hybrid = entry(&all, "hybrid");
    assert_eq!(kvm["backend"], backend.name());
    assert_eq!(kvm["instructions"], hybrid["instructions"]);
    assert_eq!(kvm["measured"]["runs"], 2);
    assert_eq!(kvm["cycles"], kvm["measured"]["tsc_cycles"]["median"]);
    assert!(kvm["cycles_by_cause"].is_null() && kvm["shadow"].is_null() && kvm["holes"].is_null());
    // 100 iterations of a 32-bit MMIO store and load: 200 MMIO exits, at the same two instructions as the model's.
    let mmio = if backend == Backend::Pvm { "mmio" } else { "ept_misconfig" };
    assert_eq!(kvm["exits"][mmio], 200);
    assert_eq!(kvm["measured"]["user_space_exits_by_kind"]["mmio_read"], 100);
    assert_eq!(kvm["measured"]["user_space_exits_by_kind"]["mmio_write"], 100);
    let top = |o: &Value| -> Vec<(String, u64)> {
        o["top_sites"]
            .as_array()
            .unwrap()
            .iter()
            .take(2)
            .map(|s| (s["address"].as_str().unwrap().to_string(), s["count"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(top(kvm), top(hybrid));
    if backend == Backend::Pvm {
        assert_eq!(hybrid["exits"]["mmio"], 200);
        assert_eq!(kvm["emulated_instructions"], kvm["instructions_kernel"]);
        assert_eq!(kvm["measured"]["vcpu_stats"]["insn_emulation"]["median"], kvm["instructions_kernel"]);
        assert_eq!(kvm["measured"]["vcpu_stats"]["mmio_exits"]["unit"], "count");
    }

    let text = virtlab(&["replay", &trace, "--engine", "kvm", "--set", "kvm.runs=1"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(&format!("measured    backend {}, 1 runs", backend.name())), "{text}");
}

#[test]
fn replay_refuses_what_the_backend_cannot_run_and_bad_kvm_options() {
    let dir = TempDir::new("refuse");
    let trace = dir.record("syscall", 10);
    for bad in [["--set", "kvm.runs=0"], ["--set", "kvm.timeout=-1"], ["--set", "kvm.warp=1"]] {
        let out = virtlab(&["replay", &trace, "--engine", "kvm", bad[0], bad[1]]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
    let out = virtlab(&["replay", &trace, "--engine", "native,kvm", "--json"]);
    let all = json(&out);
    let kvm = entry(&all, "kvm");
    match kvm_here("refuse") {
        None => assert!(kvm["unsupported"].as_str().unwrap().contains("/dev/kvm"), "{kvm}"),
        Some(Backend::Pvm) => {
            assert_eq!(out.status.code(), Some(4));
            let reason = kvm["unsupported"].as_str().unwrap();
            assert!(reason.contains("user mode under PVM") && reason.contains("(11 times)"), "{reason}");
            assert!(entry(&all, "native")["unsupported"].is_null());
        }
        Some(_) => assert_eq!(out.status.code(), Some(0), "{}", stderr(&out)),
    }
}

#[test]
fn validate_kvm_checks_the_model_against_kvm_on_every_workload_the_backend_runs() {
    let out = virtlab(&["validate", "kvm", "--json"]);
    let result = json(&out);
    let Some(backend) = kvm_here("validate") else {
        assert_eq!(out.status.code(), Some(0));
        assert!(result["skipped"].as_str().unwrap().contains("/dev/kvm"), "{result}");
        return;
    };
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(result["all_pass"], true);
    assert_eq!(result["backend"], backend.name());
    let cases = result["cases"].as_array().unwrap();
    let case = |workload: &str, params: usize| {
        cases
            .iter()
            .find(|c| c["workload"] == workload && c["params"].as_array().unwrap().len() == params)
            .unwrap_or_else(|| panic!("no case {workload}"))
    };
    let check = |c: &Value, quantity: &str| -> (u64, u64, u64) {
        let check =
            c["checks"].as_array().unwrap().iter().find(|k| k["quantity"].as_str().unwrap().starts_with(quantity));
        let check = check.unwrap_or_else(|| panic!("no {quantity} in {c}"));
        (
            check["expected"].as_u64().unwrap(),
            check["kvm"]["min"].as_u64().unwrap(),
            check["kvm"]["max"].as_u64().unwrap(),
        )
    };
    // Defaults: mmio 2000 iterations of a store and a load; hlt 50 halts.
    assert_eq!(check(case("mmio", 0), "MMIO exits"), (4000, 4000, 4000));
    assert_eq!(check(case("hlt", 0), "HLT exits"), (50, 50, 50));
    if backend == Backend::Pvm {
        let (kernel, min, max) = check(case("callret", 0), "emulated instructions");
        assert_eq!((min, max), (kernel, kernel));
        assert!(case("sensitive-kernel", 0)["skipped"].as_str().unwrap().contains("LAR"));
        assert!(case("sensitive-kernel", 1)["checks"].is_array());
        assert!(cases.iter().all(|c| c["workload"] != "syscall"), "user-mode workloads are not run on PVM");
    }
}

#[test]
fn calibrate_host_writes_a_profile_every_engine_loads() {
    let dir = TempDir::new("calibrate");
    let path = dir.path("host.toml");
    let out = virtlab(&["calibrate", "host", "-o", &path, "--runs", "1"]);
    match kvm_here("calibrate") {
        None => {
            assert_eq!(out.status.code(), Some(1));
            assert!(stderr(&out).contains("needs KVM"), "{}", stderr(&out));
            return;
        }
        Some(Backend::Pvm) => {}
        Some(other) => {
            assert_eq!(out.status.code(), Some(1));
            assert!(stderr(&out).contains(other.name()), "{}", stderr(&out));
            return;
        }
    }
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let host = Profile::parse(&std::fs::read_to_string(&path).unwrap(), "host.toml", &[]).unwrap();
    let base = Profile::load("sandybridge-2011").unwrap();
    assert_eq!(host.name, "host");
    // Measured: the emulator takes hundreds of cycles per instruction at least; native code less than ten.
    let interpret = host.get(Primitive::Interpret);
    assert!(interpret > 100.0, "{interpret}");
    let cpi = host.get(Primitive::CyclesPerInstruction);
    assert!(cpi > 0.0 && cpi < 10.0, "{cpi}");
    assert!(host.get(Primitive::Device) > interpret, "an exit to user space costs more than one instruction");
    for primitive in [Primitive::CyclesPerInstruction, Primitive::Interpret, Primitive::Device] {
        let entry = host.entry(primitive);
        assert_eq!(entry.provenance, Provenance::Measured, "{}", primitive.key());
        assert!(entry.source.contains("measured"), "{}: {}", primitive.key(), entry.source);
    }
    // Not measurable on PVM: the base profile's values, with their provenance and why.
    for primitive in [Primitive::Exit, Primitive::Vmread, Primitive::Callout] {
        let (entry, base_entry) = (host.entry(primitive), base.entry(primitive));
        assert_eq!((entry.value, entry.provenance), (base_entry.value, base_entry.provenance));
    }
    assert!(host
        .entry(Primitive::Exit)
        .source
        .starts_with("[base sandybridge-2011] not measured here: PVM has no VT-x"));

    let trace = dir.record("in", 50);
    let out = virtlab(&["replay", &trace, "--engine", "native,hybrid,hw-ept", "--profile", &path, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let hybrid = entry(&json(&out), "hybrid")["cycles"].as_u64().unwrap();
    let instructions = entry(&json(&out), "hybrid")["instructions_kernel"].as_u64().unwrap();
    assert!(hybrid as f64 >= instructions as f64 * interpret, "hybrid interprets every kernel instruction");
}
