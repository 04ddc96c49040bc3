//! `virtlab gate` as a CI job runs it, end to end: a guest image assembled here (with its symbol list, as another
//! project would record its own), budgets written by `--update`, the gate passing; then the same guest with one
//! more exiting instruction per iteration fails with exit status 6, and its blame names that instruction's address
//! and function; `--update` makes it pass again. Also the catalog's own symbols in the blame, and malformed budget
//! files refused with status 7 and their line.

use std::process::{Command, Output};

mod common;

use common::ScratchDir;
use iced_x86::code_asm::*;
use serde_json::Value;

const ITERATIONS: u32 = 100;
/// Where `virtlab_machine::multiboot::flat_image` puts the code.
const CODE: u64 = 0x10_0020;

/// A scratch directory; commands run there.
struct Lab {
    dir: ScratchDir,
}

impl Lab {
    fn new(name: &str) -> Self {
        Lab { dir: ScratchDir::new(&format!("gate-{name}")) }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_virtlab")).current_dir(&self.dir.0).args(args).output().unwrap()
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        self.dir.file(name, bytes);
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The guest: `main` calls `work` ITERATIONS times, then writes 0 to the exit port. `work` runs CPUID (an exit
/// under hardware assist, always); with `extra`, also an OUT to the POST port (an exit under every monitor).
/// Returns the image, its symbol list as `nm --print-size` prints it, and the OUT's address when there is one.
fn guest(extra: bool) -> (Vec<u8>, String, Option<u64>) {
    let mut a = CodeAssembler::new(32).unwrap();
    let (mut main, mut top, mut work, mut out, mut end) =
        (a.create_label(), a.create_label(), a.create_label(), a.create_label(), a.create_label());
    a.set_label(&mut main).unwrap();
    a.mov(esp, 0x9_0000u32).unwrap();
    a.mov(esi, ITERATIONS).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(work).unwrap();
    a.dec(esi).unwrap();
    a.jnz(top).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut work).unwrap();
    a.xor(eax, eax).unwrap();
    a.cpuid().unwrap();
    if extra {
        a.set_label(&mut out).unwrap();
        a.out(0x80, al).unwrap();
    }
    a.ret().unwrap();
    a.set_label(&mut end).unwrap();
    a.nop().unwrap();
    let assembled = a.assemble_options(CODE, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).unwrap();
    let ip = |label: &CodeLabel| assembled.label_ip(label).unwrap();
    let (main_ip, work_ip, end_ip) = (ip(&main), ip(&work), ip(&end));
    let symbols = format!(
        "# nm --print-size --defined-only guest.elf\n{main_ip:08x} {:08x} T main\n{work_ip:08x} {:08x} T work\n\
         {main_ip:08x} {:08x} t main_alias\n         U undefined_symbol\n",
        work_ip - main_ip,
        end_ip - work_ip,
        work_ip - main_ip,
    );
    let image = virtlab_machine::multiboot::flat_image(&assembled.inner.code_buffer);
    (image, symbols, extra.then(|| ip(&out)))
}

/// Records the guest into `dir/guest.vlt` (the same workload name, `guest.bin`, whichever variant).
fn record(lab: &Lab, dir: &str, extra: bool) -> Option<u64> {
    let (image, symbols, out) = guest(extra);
    lab.write(&format!("{dir}/guest.bin"), &image);
    lab.write(&format!("{dir}/guest.map"), symbols.as_bytes());
    let (bin, map, vlt) = (format!("{dir}/guest.bin"), format!("{dir}/guest.map"), format!("{dir}/guest.vlt"));
    let output = lab.run(&["record", "--image", &bin, "--symbols", &map, "-o", &vlt]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    out
}

const HEADER: &str = "# Budgets for the test guest.\n[gate]\nversion = 1\nprofile = \"p4-2006\"\n";

fn check(budget: &Value, engine: &str, metric: &str) -> Value {
    budget["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["engine"] == engine && c["metric"] == metric)
        .unwrap_or_else(|| panic!("no check of {engine} {metric}"))
        .clone()
}

#[test]
fn one_more_exit_per_iteration_fails_the_gate_with_blame_and_update_makes_it_pass() {
    let lab = Lab::new("e2e");
    record(&lab, "before", false);
    let out_address = record(&lab, "after", true).unwrap();
    lab.write("budgets.toml", HEADER.as_bytes());

    // Budgets from the first guest, then the gate on it passes, and saves its results as a baseline.
    let output = lab.run(&["gate", "budgets.toml", "before/guest.vlt", "--update"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let budgets = lab.read("budgets.toml");
    assert!(budgets.starts_with(HEADER), "{budgets}");
    assert!(budgets.contains("[[workload]]\nname = \"guest.bin\"\narchitecture = \"x86-32\"\n"), "{budgets}");
    assert!(
        budgets.contains("[workload.hw-ept]\nexits.total = 103\nexits.cpuid = 100\nexits.io_instruction = 1\nexits.ept_violation = 2\n"),
        "{budgets}"
    );
    let output = lab.run(&["gate", "budgets.toml", "before/guest.vlt", "--save-results", "baseline"]);
    assert_eq!(output.status.code(), Some(0), "{}{}", text(&output.stdout), text(&output.stderr));
    assert!(text(&output.stdout).contains("gate passed: "), "{}", text(&output.stdout));

    // One more OUT per iteration: over budget, exit 6, the blame names the new instruction.
    let output = lab.run(&[
        "gate",
        "budgets.toml",
        "after/guest.vlt",
        "--baseline",
        "baseline",
        "--junit",
        "gate.xml",
        "--markdown",
        "gate.md",
    ]);
    let report = text(&output.stdout);
    assert_eq!(output.status.code(), Some(6), "{report}{}", text(&output.stderr));
    let site = format!("{out_address:#x}");
    let blame_line = report.lines().find(|l| l.trim_start().starts_with(&site)).unwrap_or_else(|| panic!("{report}"));
    let words: Vec<&str> = blame_line.split_whitespace().collect();
    assert_eq!(words, [site.as_str(), "work+0x4", "out", "80h,al", "io_instruction", "100", "0", "new"], "{report}");
    assert!(report.contains("guest.bin x86-32  hw-ept"), "{report}");
    assert!(report.trim_end().lines().last().unwrap().starts_with("gate FAILED: "), "{report}");
    let junit = lab.read("gate.xml");
    assert!(junit.contains("<failure type=\"over-budget\" message=\"203 &gt; 103 (+100 (+97.1%))\">"), "{junit}");
    assert!(lab
        .read("gate.md")
        .contains(&format!("| {site} | work+0x4 | out 80h,al | io_instruction | 100 | 0 | new |")));

    let output = lab.run(&["gate", "budgets.toml", "after/guest.vlt", "--json"]);
    assert_eq!(output.status.code(), Some(6));
    let verdict: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdict["passed"], false);
    let io = check(&verdict, "hw-ept", "exits.io_instruction");
    assert_eq!((io["actual"].as_f64(), io["over_by"].as_f64()), (Some(101.0), Some(100.0)));
    assert_eq!(io["blame"][0]["address"], site.as_str(), "the most frequent I/O site is the new OUT: {io}");
    assert_eq!(io["blame"][0]["function"], "work+0x4");
    // Every monitor exits on the OUT: trap-emulate too, where CPUID did not exit at all.
    assert_eq!(check(&verdict, "trap-emulate", "exits.total")["over"], true);
    assert_eq!(check(&verdict, "native", "exits.total")["over"], false);

    // Acknowledged: the budgets follow, the gate passes, the comment and order stay.
    let output = lab.run(&["gate", "budgets.toml", "after/guest.vlt", "--update", "--headroom", "5%"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let updated = lab.read("budgets.toml");
    assert!(updated.starts_with(HEADER) && updated.contains("exits.io_instruction = 107\n"), "{updated}");
    let output = lab.run(&["gate", "budgets.toml", "after/guest.vlt"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));
}

#[test]
fn the_catalog_is_blamed_by_kernel_and_user_function_and_bad_budgets_exit_7_with_their_line() {
    let lab = Lab::new("catalog");
    let output = lab.run(&["record", "syscall", "--param", "iterations=10", "-o", "syscall.vlt"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let budgets = format!(
        "{HEADER}options = [\"bt.lmsle=true\"]\n\n[[workload]]\nname = \"syscall\"\n\
         parameters = {{ iterations = 10, counters = 0 }}\narchitecture = \"x86-64\"\n\n\
         [workload.trap-emulate]\nexits.system_call = {{ per_iteration = 1, comment = \"SYSCALL only\" }}\n"
    );
    lab.write("budgets.toml", budgets.as_bytes());
    let output = lab.run(&["gate", "budgets.toml", "syscall.vlt", "--json"]);
    assert_eq!(output.status.code(), Some(6), "{}", text(&output.stderr));
    let verdict: Value = serde_json::from_slice(&output.stdout).unwrap();
    let calls = check(&verdict, "trap-emulate", "exits.system_call");
    assert_eq!((calls["actual"].as_f64(), calls["budget"]["ceiling"].as_f64()), (Some(22.0), Some(10.0)));
    let functions: Vec<&str> =
        calls["blame"].as_array().unwrap().iter().map(|s| s["function"].as_str().unwrap()).collect();
    assert!(functions[0].starts_with("syscall_return+") && functions[1].starts_with("main+"), "{functions:?}");
    assert_eq!(verdict["unbudgeted"].as_array().unwrap().len(), 6, "the other six engines: {verdict}");

    // A profile file: the sweep loads it, and the results carry the name inside it.
    let profile =
        include_str!("../engines/sim/profiles/p4-2006.toml").replacen("name = \"p4-2006\"", "name = \"mine\"", 1);
    lab.write("mine.toml", profile.as_bytes());
    lab.write("mine-budgets.toml", budgets.replace("profile = \"p4-2006\"", "profile = \"mine.toml\"").as_bytes());
    let output = lab.run(&["gate", "mine-budgets.toml", "syscall.vlt", "--json"]);
    assert_eq!(output.status.code(), Some(6), "{}", text(&output.stderr));
    let mine: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(mine["profile"], "mine");
    assert_eq!(check(&mine, "trap-emulate", "exits.system_call")["actual"], calls["actual"]);

    // A measured workload missing its budgets fails; --allow-missing lists it instead.
    let other = budgets.replace("name = \"syscall\"", "name = \"pgfault\"");
    lab.write("missing.toml", other.as_bytes());
    let output = lab.run(&["gate", "missing.toml", "syscall.vlt"]);
    assert_eq!(output.status.code(), Some(6));
    assert!(
        text(&output.stdout)
            .contains("pgfault iterations=10,counters=0 x86-64 / trap-emulate (missing.toml:12): not in the results"),
        "{}",
        text(&output.stdout)
    );
    let output = lab.run(&["gate", "missing.toml", "syscall.vlt", "--allow-missing"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));

    for (edit, expected) in [
        (
            budgets.replace("exits.system_call", "exits.sytem_call"),
            "bad.toml:13: unknown metric `exits.sytem_call`; did you mean `exits.system_call`?",
        ),
        (
            budgets.replace("[workload.trap-emulate]", "[workload.vmware]"),
            "bad.toml:12: unknown engine `vmware`; engines: native, trap-emulate",
        ),
        (
            budgets.replace("name = \"syscall\"", "name = \"sycall\""),
            "bad.toml:7: unknown workload `sycall` (did you mean `syscall`?): not in the catalog",
        ),
        (budgets.replace("version = 1", "version = 1 1"), "bad.toml:3: not valid TOML"),
    ] {
        lab.write("bad.toml", edit.as_bytes());
        let output = lab.run(&["gate", "bad.toml", "syscall.vlt"]);
        assert_eq!(output.status.code(), Some(7), "{}", text(&output.stderr));
        assert!(text(&output.stderr).contains(expected), "expected `{expected}` in {}", text(&output.stderr));
    }
    let help = lab.run(&["--help"]);
    assert!(text(&help.stdout).contains("6  `gate`: a budget is exceeded"), "{}", text(&help.stdout));
    assert!(text(&help.stdout).contains("7  `gate`: the budget file is malformed"));
}
