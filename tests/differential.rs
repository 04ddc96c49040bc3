//! The reference machine checked against two real machines: every catalog workload must end with the same
//! serial output and exit status on the reference machine, under QEMU (TCG) and under KVM. A machine that
//! cannot run here is skipped with the reason; on a PVM host, the cases PVM cannot run are skipped by name
//! with the reason (workloads/README.md, "Under KVM on a PVM host").

use std::sync::OnceLock;
use std::time::Duration;

use virtlab_kvm::{Backend, KvmConfig, Probe};
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
use virtlab_workloads::{qemu, Privilege};

/// What one machine says at the end of a run.
#[derive(Debug, PartialEq, Eq)]
struct Ending {
    serial: String,
    exit_status: u32,
}

fn kvm() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(virtlab_kvm::probe)
}

/// Why KVM on this host cannot run this case, if it cannot.
fn kvm_limitation(name: &str, params: &[(&str, &str)]) -> Option<String> {
    let Probe::Available(backend) = kvm() else { return None };
    if *backend != Backend::Pvm {
        return None;
    }
    let spec = virtlab_workloads::catalog().iter().find(|s| s.name == name).expect("catalog workload");
    if spec.privilege == Privilege::User {
        return Some("on PVM, SYSCALL and INT n from CPL 3 do not reach an unmodified guest kernel".into());
    }
    if name == "sensitive-kernel" && !params.contains(&("segment-probes", "0")) {
        return Some("PVM runs CPL 0 in KVM's instruction emulator, which has no LAR/LSL/VERR/VERW".into());
    }
    None
}

fn on_reference_machine(image: &[u8]) -> Ending {
    let mut machine = Machine::from_multiboot(image, MachineConfig::default()).expect("image loads");
    let outcome = machine.run(&mut NullObserver, RunLimits { max_instructions: 100_000_000 }).expect("guest runs");
    Ending { serial: String::from_utf8_lossy(&outcome.serial).into_owned(), exit_status: outcome.exit_status }
}

fn compare(name: &str, params: &[(&str, &str)]) {
    let owned: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let image = virtlab_workloads::build(name, &owned).expect("workload builds").bytes;
    let reference = on_reference_machine(&image);
    assert_eq!(reference.exit_status, 0, "{name} failed its self-check on the reference machine: {}", reference.serial);
    assert!(reference.serial.ends_with("ok\n"), "{name}: {}", reference.serial);

    match qemu::available() {
        Err(reason) => eprintln!("{name}: skipping QEMU: {reason}"),
        Ok(()) => {
            let run = qemu::boot(&image, Duration::from_secs(120)).expect("qemu runs");
            let ending =
                Ending { serial: run.serial, exit_status: run.exit_status.expect("the guest exited under QEMU") };
            assert_eq!(ending, reference, "{name}: QEMU and the reference machine disagree");
            eprintln!("{name}: QEMU agrees");
        }
    }

    match (kvm(), kvm_limitation(name, params)) {
        (Probe::Unavailable(reason), _) => eprintln!("{name}: skipping KVM: {reason}"),
        (Probe::Available(_), Some(reason)) => eprintln!("{name}: skipping KVM: {reason}"),
        (Probe::Available(backend), None) => {
            let config = KvmConfig { timeout: Duration::from_secs(120), ..KvmConfig::default() };
            let outcome = virtlab_kvm::run(&image, &config).unwrap_or_else(|e| panic!("{name} under KVM: {e}"));
            let ending = Ending {
                serial: String::from_utf8_lossy(&outcome.serial).into_owned(),
                exit_status: outcome.exit_status,
            };
            assert_eq!(ending, reference, "{name}: KVM ({}) and the reference machine disagree", backend.name());
            eprintln!("{name}: KVM ({}) agrees", backend.name());
        }
    }
}

macro_rules! differential {
    ($($test:ident => $name:literal [$($param:literal = $value:literal),*];)*) => {
        $(
            #[test]
            fn $test() {
                compare($name, &[$(($param, $value)),*]);
            }
        )*

        #[test]
        fn every_catalog_workload_is_compared() {
            let compared = [$($name),*];
            for spec in virtlab_workloads::catalog() {
                assert!(compared.contains(&spec.name), "{} has no differential test", spec.name);
            }
        }
    };
}

differential! {
    syscall => "syscall" [];
    port_in => "in" [];
    cr8wr => "cr8wr" [];
    callret => "callret" [];
    pgfault => "pgfault" [];
    divzero => "divzero" [];
    ptemod => "ptemod" [];
    cpuid => "cpuid" [];
    cr8rd => "cr8rd" [];
    rdmsr => "rdmsr" [];
    wrmsr => "wrmsr" [];
    inl => "inl" [];
    outl => "outl" [];
    hlt => "hlt" [];
    mmio => "mmio" [];
    sensitive_kernel => "sensitive-kernel" [];
    sensitive_kernel_without_segment_probes => "sensitive-kernel" ["segment-probes" = "0"];
    redpill => "redpill" [];
    forkwait => "forkwait" [];
    ctxswitch => "ctxswitch" [];
    mmap => "mmap" [];
    demandzero => "demandzero" [];
    cow => "cow" [];
    compute => "compute" [];
    memtouch => "memtouch" [];
    syscall_mix => "syscall-mix" [];
    boot => "boot" [];
}
