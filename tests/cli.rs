//! The `virtlab` trace tools, run as a user would: inspect, dump and check on trace files, valid and broken.

use std::io::Cursor;
use std::process::{Command, Output};

use serde_json::Value;
use virtlab_traces::synth::{self, SynthConfig};
use virtlab_traces::*;

mod common;

use common::ScratchDir;

fn virtlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtlab")).args(args).output().expect("virtlab runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// A hand-made 32-bit trace whose every count is known: 2 blocks (`mov eax, 1; out 0xf4, al` = 2 instructions,
/// `inc ecx; nop; nop` = 3), run as block 1, block 0, a partial block 1 (1 retired), and the guest's exit.
fn handmade_trace() -> Vec<u8> {
    let boot = BootState {
        rip: 0x10_0000,
        rax: 0x2bad_b002,
        rbx: 0x9500,
        rsp: 0,
        rflags: 2,
        cr0: 0x11,
        mode: CodeMode::Bits32,
        ram_bytes: 32 << 20,
    };
    let metadata = Metadata {
        workload: "handmade".into(),
        params: vec![("iterations".into(), "1".into())],
        recorder: "cli-test".into(),
        recorder_version: "0".into(),
        symbols: SymbolMap::new(vec![Symbol { name: "start".into(), start: 0x10_0000, end: 0x10_000a }]).unwrap(),
    };
    let image = [Segment { gpa: 0x10_0000, bytes: vec![0xb8, 1, 0, 0, 0, 0xe6, 0xf4, 0x41, 0x90, 0x90] }];
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), metadata, boot, &image).unwrap();
    let exit = writer
        .add_block(&Block {
            address: 0x10_0000,
            mode: CodeMode::Bits32,
            tag: 0,
            instructions: 2,
            bytes: vec![0xb8, 1, 0, 0, 0, 0xe6, 0xf4],
        })
        .unwrap();
    let body = writer
        .add_block(&Block {
            address: 0x10_0007,
            mode: CodeMode::Bits32,
            tag: 0,
            instructions: 3,
            bytes: vec![0x41, 0x90, 0x90],
        })
        .unwrap();
    let start = Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 };
    for event in [
        Event::Context { at: 0, context: start },
        Event::Block(body),
        Event::PartialBlock { block: body, executed: 1 },
        Event::Exception { at: 1, vector: 6, error_code: None, cr2: None, walk: Walk::default() },
        Event::Block(exit),
        Event::Io { at: 1, port: 0xf4, size: 1, direction: Direction::Write, value: 1 },
    ] {
        writer.push(&event).unwrap();
    }
    let ending = Ending {
        reason: EndReason::GuestExit,
        exit_status: 1,
        detail: String::new(),
        serial: b"hello\nworld\n".to_vec(),
        state_digest: [0xab; 32],
    };
    writer.finish(ending).unwrap().into_inner()
}

#[test]
fn inspect_json_reports_the_known_counts() {
    let dir = ScratchDir::new("cli-inspect");
    let trace = handmade_trace();
    let path = dir.file("t.vlt", &trace);
    let output = virtlab(&["inspect", &path, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(json["format_version"], "3.0");
    assert_eq!(json["symbols"], 1);
    assert_eq!(json["workload"], "handmade");
    assert_eq!(json["params"]["iterations"], "1");
    // 3 (block 1) + 1 (partial) + 2 (block 0), all at CPL 0.
    assert_eq!(json["instructions"], 6);
    assert_eq!(json["instructions_user"], 0);
    assert_eq!(json["instructions_kernel"], 6);
    assert_eq!(json["blocks"], 2);
    assert_eq!(json["events"]["block"], 2);
    assert_eq!(json["events"]["partial_block"], 1);
    assert_eq!(json["events"]["exception"], 1);
    assert_eq!(json["events"]["io"], 1);
    assert_eq!(json["events"]["cpuid"], 0);
    assert_eq!(json["events_total"], 6);
    assert_eq!(json["file_bytes"], trace.len() as u64);
    assert_eq!(json["bytes_per_instruction"].as_f64().unwrap(), trace.len() as f64 / 6.0);
    assert_eq!(json["exit_status"], 1);
    assert_eq!(json["complete"], true);
    assert_eq!(json["serial"], "hello\nworld\n");
    assert_eq!(json["state_digest"], "ab".repeat(32));
    assert_eq!(json["guest_modes"], serde_json::json!(["32-bit", "paging:none"]));
    assert_eq!(json["sections"]["image"]["chunks"], 1);
}

#[test]
fn inspect_text_shows_the_summary_and_the_serial_output() {
    let dir = ScratchDir::new("cli-inspect-text");
    let path = dir.file("t.vlt", &handmade_trace());
    let text = stdout(&virtlab(&["inspect", &path]));
    assert!(text.contains("instructions   6 (user 0, kernel 6)"), "{text}");
    assert!(text.contains("the guest exited with status 1"), "{text}");
    assert!(text.contains("  | hello\n  | world"), "{text}");
}

#[test]
fn dump_prints_one_line_per_event_with_sites_and_disassembly() {
    let dir = ScratchDir::new("cli-dump");
    let path = dir.file("t.vlt", &handmade_trace());
    let output = virtlab(&["dump", &path, "--disasm"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let event_lines: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("0x")).collect();
    assert_eq!(event_lines.len(), 6, "{text}");
    assert!(event_lines[0].contains("context") && event_lines[0].contains("cpl=0 if=0 paging=none cr3=0x0"), "{text}");
    assert!(
        event_lines[2].contains("partial_block") && event_lines[2].contains("1 of 3 instructions retired"),
        "{text}"
    );
    // The exception happened at the second instruction of block #1, the one that did not retire.
    assert!(
        event_lines[3].contains("exception")
            && event_lines[3].contains("@0x100008")
            && event_lines[3].contains("vector=6"),
        "{text}"
    );
    // The exit port write came from `out 0xf4, al` at 0x100005.
    assert!(
        event_lines[5].contains("@0x100005 <start+0x5>") && event_lines[5].contains("out port=0xf4 size=1 value=0x1"),
        "{text}"
    );
    assert!(text.contains("0x0000000000100000  mov eax,1"), "{text}");
    assert!(text.contains("0x0000000000100008  nop  <- cut short here"), "{text}");
}

#[test]
fn dump_windows_with_from_and_limit() {
    let dir = ScratchDir::new("cli-dump-window");
    let path = dir.file("t.vlt", &handmade_trace());
    let text = stdout(&virtlab(&["dump", &path, "--from", "3", "--limit", "2"]));
    let indices: Vec<&str> = text.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(indices, ["3", "4"], "{text}");
}

#[test]
fn check_accepts_a_valid_trace_and_refuses_a_broken_one_with_exit_1() {
    let dir = ScratchDir::new("cli-check");
    let (cursor, summary) =
        synth::write_trace(Cursor::new(Vec::new()), &SynthConfig { seed: 3, instructions: 300_000 }).unwrap();
    let mut trace = cursor.into_inner();
    let path = dir.file("ok.vlt", &trace);
    let output = virtlab(&["check", &path, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["events"], summary.events);

    let last = trace.len() - 1;
    trace[last - 40] ^= 0xff;
    let broken = dir.file("broken.vlt", &trace);
    let output = virtlab(&["check", &broken]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("invalid trace: corrupt footer chunk at offset"), "{}", stderr(&output));
    let json: Value = serde_json::from_str(&stdout(&virtlab(&["check", &broken, "--json"]))).unwrap();
    assert_eq!(json["valid"], false);
    assert!(json["offset"].as_u64().unwrap() > 0);
}

#[test]
fn unreadable_files_and_non_traces_have_their_own_exit_codes() {
    let dir = ScratchDir::new("cli-codes");
    let missing = dir.0.join("missing.vlt");
    let output = virtlab(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(3));
    assert!(stderr(&output).contains("cannot read"), "{}", stderr(&output));

    let not_a_trace = dir.file("image.bin", b"\x02\xb0\xad\x1b this is a multiboot image, not a trace");
    let output = virtlab(&["dump", &not_a_trace]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("not a virtlab trace"), "{}", stderr(&output));

    assert_eq!(virtlab(&["inspect"]).status.code(), Some(2));
}

#[test]
fn workloads_list_names_every_workload_with_its_parameters() {
    let output = virtlab(&["workloads", "list", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let names: Vec<&str> = json.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    for expected in [
        "syscall", "in", "cr8wr", "callret", "pgfault", "divzero", "ptemod", "cpuid", "hlt", "mmio", "redpill",
        "forkwait", "compute", "boot",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    for workload in json.as_array().unwrap() {
        let params = workload["params"].as_array().unwrap();
        assert!(params.iter().any(|p| p["name"] == "iterations"), "{workload}");
        let arch = params.iter().find(|p| p["name"] == "arch").expect("every workload takes arch");
        assert_eq!(arch["default"], "x86-64", "{workload}");
        assert_eq!(arch["choices"], serde_json::json!(["x86-64", "x86-32"]), "{workload}");
    }
}

#[test]
fn workloads_export_writes_a_multiboot_image_and_refuses_bad_parameters() {
    let dir = ScratchDir::new("cli-export");
    let image = dir.0.join("syscall.bin");
    let output = virtlab(&["workloads", "export", "syscall", "--param", "iterations=7", "-o", image.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes, virtlab_workloads::build("syscall", &[("iterations".into(), "7".into())]).unwrap().bytes);
    assert_eq!(&bytes[..4], &0x1bad_b002u32.to_le_bytes());

    let output = virtlab(&["workloads", "export", "syscall", "--param", "iterations=0", "-o", image.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("out of range; accepted: 1..=1000000"), "{}", stderr(&output));
    let output = virtlab(&["workloads", "export", "nosuch", "-o", image.to_str().unwrap()]);
    assert!(stderr(&output).contains("unknown workload `nosuch`; accepted: syscall"), "{}", stderr(&output));
}

/// Prints "hi" and exits with status 5.
const STATUS_FIVE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'h', 0xee, 0xb0, b'i', 0xee, // out 'h', out 'i'
    0xb0, 0x05, 0xe6, 0xf4, // mov al, 5; out 0xf4, al
];

#[test]
fn run_prints_the_serial_output_and_exits_with_the_guest_status() {
    let dir = ScratchDir::new("cli-run");
    let image = dir.file("five.bin", &virtlab_machine::multiboot::flat_image(STATUS_FIVE));
    let output = virtlab(&["run", &image]);
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    assert_eq!(stdout(&output), "hi");

    let output = virtlab(&["run", &image, "--machine", "kvm"]);
    match virtlab_kvm::probe() {
        virtlab_kvm::Probe::Available(backend) => {
            eprintln!("KVM ({}) available: checking run --machine kvm", backend.name());
            assert_eq!((output.status.code(), stdout(&output).as_str()), (Some(5), "hi"), "{}", stderr(&output));
        }
        virtlab_kvm::Probe::Unavailable(reason) => {
            eprintln!("KVM unavailable ({reason}): checking that run --machine kvm says so");
            assert_eq!(output.status.code(), Some(125));
            assert!(stderr(&output).contains("KVM is not usable here"), "{}", stderr(&output));
        }
    }

    let looping = dir.file("loop.bin", &virtlab_machine::multiboot::flat_image(&[0xeb, 0xfe]));
    let output = virtlab(&["run", &looping, "--max-instructions", "5000"]);
    assert_eq!(output.status.code(), Some(124));
    assert!(stderr(&output).contains("instruction limit of 5000 reached at RIP 0x100020"), "{}", stderr(&output));

    let not_an_image = dir.file("junk.bin", &[0u8; 64]);
    let output = virtlab(&["run", &not_an_image]);
    assert_eq!(output.status.code(), Some(125));
}

#[test]
fn record_writes_a_trace_that_inspect_and_check_accept() {
    let dir = ScratchDir::new("cli-record");
    let trace = dir.0.join("hlt.vlt");
    let trace = trace.to_str().unwrap();
    let output = virtlab(&["record", "hlt", "--param", "iterations=3", "-o", trace]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("the guest exited with status 0"), "{}", stderr(&output));
    assert!(virtlab(&["check", trace]).status.success());
    let json: Value = serde_json::from_str(&stdout(&virtlab(&["inspect", trace, "--json"]))).unwrap();
    assert_eq!(json["workload"], "hlt");
    assert_eq!(json["params"]["iterations"], "3");
    assert_eq!(json["exit_status"], 0);
    assert_eq!(json["serial"], "virtlab: hlt iterations=3\nok\n");
    assert!(json["events"]["hlt"].as_u64().unwrap() >= 3, "{json}");
    assert!(json["events"]["interrupt"].as_u64().unwrap() >= 3, "{json}");

    let incomplete = dir.0.join("cut.vlt");
    let output = virtlab(&["record", "compute", "--max-instructions", "20000", "-o", incomplete.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(124), "{}", stderr(&output));
    let json: Value =
        serde_json::from_str(&stdout(&virtlab(&["inspect", incomplete.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!((json["complete"].as_bool(), json["instructions"].as_u64()), (Some(false), Some(20000)));
    assert!(virtlab(&["check", incomplete.to_str().unwrap()]).status.success(), "an incomplete trace is still valid");
}

#[test]
fn a_guest_that_never_stops_is_ended_by_the_wall_clock_timeout() {
    let dir = ScratchDir::new("cli-timeout");
    let looping = dir.file("loop.bin", &virtlab_machine::multiboot::flat_image(&[0xeb, 0xfe]));
    let output = virtlab(&["run", &looping, "--max-instructions", "1000000000000", "--timeout", "0.2"]);
    assert_eq!(output.status.code(), Some(124), "{}", stderr(&output));
    assert!(stderr(&output).contains("wall-clock deadline passed at RIP 0x100020"), "{}", stderr(&output));

    let trace = dir.0.join("loop.vlt");
    let output = virtlab(&[
        "record",
        "--image",
        &looping,
        "--timeout",
        "0.2",
        "--max-instructions",
        "1000000000000",
        "-o",
        trace.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(124), "{}", stderr(&output));
    let json: Value = serde_json::from_str(&stdout(&virtlab(&["inspect", trace.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(json["end_reason"], "timeout");
    assert!(json["end_detail"].as_str().unwrap().contains("RIP 0x100020"), "{json}");
    assert!(virtlab(&["check", trace.to_str().unwrap()]).status.success());
}
