//! Boots every workload under QEMU (TCG) and checks its exact serial output and exit status.
//! Skips, saying why, when `qemu-system-x86_64` is not installed.

use std::time::Duration;

use virtlab_workloads::{qemu, ParamKind};

/// QEMU's status for a guest that wrote 0 (success) to isa-debug-exit: (0 << 1) | 1.
const SUCCESS_STATUS: i32 = 1;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Builds `name` with `params`, boots it, and returns (guest serial output, QEMU's exit status).
fn run_under_qemu(name: &str, params: &[(&str, &str)]) -> Option<(String, i32)> {
    if let Err(reason) = qemu::available() {
        eprintln!("skipping {name}: {reason}");
        return None;
    }
    eprintln!("booting {name} under {}", qemu::QEMU);
    let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let image = virtlab_workloads::build(name, &params).expect("workload builds");
    let run = qemu::boot(&image.bytes, TIMEOUT).expect("run qemu");
    Some((run.serial, run.qemu_status))
}

fn expect_ok(name: &str, params: &[(&str, &str)], middle: &str) {
    let Some((guest, status)) = run_under_qemu(name, params) else { return };
    let spec = virtlab_workloads::catalog().iter().find(|spec| spec.name == name).unwrap();
    // Numbers are shown given or not; a choice (arch) only when given.
    let shown: Vec<(&str, String)> = spec
        .params
        .iter()
        .filter_map(|param| match params.iter().find(|(k, _)| *k == param.name) {
            Some((k, v)) => Some((*k, v.to_string())),
            None => (param.kind == ParamKind::Number).then(|| (param.name, param.default.to_string())),
        })
        .collect();
    let expected = format!("{}\n{middle}ok\n", virtlab_workloads::banner(name, &shown));
    assert_eq!(guest, expected, "serial output of {name}");
    assert_eq!(status, SUCCESS_STATUS, "exit status of {name}");
}

macro_rules! qemu_tests {
    ($($test:ident => $name:literal [$($param:literal = $value:literal),*] $middle:expr;)*) => {
        $(
            #[test]
            fn $test() {
                expect_ok($name, &[$(($param, $value)),*], $middle);
            }
        )*

        #[test]
        fn every_catalog_entry_is_booted() {
            let tested = [$($name),*];
            for spec in virtlab_workloads::catalog() {
                assert!(tested.contains(&spec.name), "{} has no QEMU test", spec.name);
            }
        }
    };
}

qemu_tests! {
    syscall => "syscall" [] "";
    port_in => "in" [] "";
    cr8wr => "cr8wr" [] "";
    callret => "callret" [] "";
    pgfault => "pgfault" [] "";
    divzero => "divzero" [] "";
    ptemod => "ptemod" [] "";
    cpuid => "cpuid" [] "";
    cr8rd => "cr8rd" [] "";
    rdmsr => "rdmsr" [] "";
    wrmsr => "wrmsr" [] "";
    inl => "inl" [] "";
    outl => "outl" [] "";
    hlt => "hlt" [] "";
    mmio => "mmio" [] "";
    sensitive_kernel => "sensitive-kernel" [] "";
    sensitive_kernel_without_segment_probes => "sensitive-kernel" ["segment-probes" = "0"] "";
    redpill => "redpill" [] "";
    forkwait => "forkwait" [] "";
    forkwait_fills_process_table_repeatedly => "forkwait" ["iterations" = "250"] "";
    ctxswitch => "ctxswitch" [] "";
    mmap => "mmap" [] "";
    demandzero => "demandzero" [] "";
    cow => "cow" [] "";
    // The child's writes copy, the parent's (after the child exited) reuse: the same counts on every machine.
    cow_counters => "cow" ["iterations" = "6", "pages" = "5", "counters" = "1"]
        "counters: page-tables=35 ptes-shared=36 cow-faults=60 pages-copied=30 zero-fills=5\n";
    compute => "compute" [] "";
    memtouch => "memtouch" [] "";
    memtouch_large => "memtouch" ["iterations" = "2", "pages" = "4096"] "";
    syscall_mix => "syscall-mix" ["iterations" = "5"] ".....\n";
    boot => "boot" [] "";
    boot_repeated => "boot" ["iterations" = "3"] "";
}

#[test]
fn syscall_mix_default_prints_one_dot_per_iteration() {
    let dots = ".".repeat(64);
    expect_ok("syscall-mix", &[], &format!("{dots}\n"));
}
