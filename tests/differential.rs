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
    if params.contains(&("arch", "x86-32")) {
        return Some(
            "on PVM, the 32-bit kernel's MOV to CR0 that turns on two-level paging raises #GP (seen: `panic: vector \
             13` at kernel_init's MOV CR0)"
                .into(),
        );
    }
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

        /// Every workload that builds with arch=x86-32 is compared with arch=x86-32; the others say why not.
        #[test]
        fn every_x86_32_workload_is_compared() {
            let compared: Vec<&str> =
                [$(($name, &[$(($param, $value)),*][..])),*]
                    .into_iter()
                    .filter(|(_, params): &(&str, &[(&str, &str)])| params.contains(&("arch", "x86-32")))
                    .map(|(name, _)| name)
                    .collect();
            let arch = [("arch".to_string(), "x86-32".to_string())];
            for spec in virtlab_workloads::catalog() {
                match virtlab_workloads::build(spec.name, &arch) {
                    Ok(_) => assert!(compared.contains(&spec.name), "{} arch=x86-32 has no differential test", spec.name),
                    Err(error) => assert!(
                        error.to_string().contains("arch=x86-32") && !compared.contains(&spec.name),
                        "{}: {error}",
                        spec.name
                    ),
                }
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
    port_in_32 => "in" ["arch" = "x86-32"];
    callret_32 => "callret" ["arch" = "x86-32"];
    ptemod_32 => "ptemod" ["arch" = "x86-32"];
    cpuid_32 => "cpuid" ["arch" = "x86-32"];
    rdmsr_32 => "rdmsr" ["arch" = "x86-32"];
    wrmsr_32 => "wrmsr" ["arch" = "x86-32"];
    inl_32 => "inl" ["arch" = "x86-32"];
    outl_32 => "outl" ["arch" = "x86-32"];
    hlt_32 => "hlt" ["arch" = "x86-32"];
    mmio_32 => "mmio" ["arch" = "x86-32"];
    sensitive_kernel_32 => "sensitive-kernel" ["arch" = "x86-32"];
    sensitive_kernel_without_segment_probes_32 => "sensitive-kernel" ["arch" = "x86-32", "segment-probes" = "0"];
    boot_32 => "boot" ["arch" = "x86-32"];
    syscall_32 => "syscall" ["arch" = "x86-32"];
    syscall_sysenter_32 => "syscall" ["arch" = "x86-32", "sysenter" = "1"];
    pgfault_32 => "pgfault" ["arch" = "x86-32"];
    divzero_32 => "divzero" ["arch" = "x86-32"];
    compute_32 => "compute" ["arch" = "x86-32"];
    redpill_32 => "redpill" ["arch" = "x86-32"];
    mmap_32 => "mmap" ["arch" = "x86-32"];
    demandzero_32 => "demandzero" ["arch" = "x86-32"];
    memtouch_32 => "memtouch" ["arch" = "x86-32"];
    syscall_mix_32 => "syscall-mix" ["arch" = "x86-32"];
    forkwait_32 => "forkwait" ["arch" = "x86-32"];
    ctxswitch_32 => "ctxswitch" ["arch" = "x86-32"];
    cow_32 => "cow" ["arch" = "x86-32"];
}

/// The x86-32 tour's transcript as the SDM has it. Derived values: PUSHAD stores ESP from before its eight
/// pushes (0x20 above the final ESP); the interrupt from CPL 3 and the call gate both switch to the TSS's
/// ring-0 stack (0x320000) and push five dwords (SS, ESP, and EFLAGS or the parameter, CS, EIP), so the
/// handler sees 0x31ffec; SYSENTER takes ESP from its MSR (0x330000) and SYSEXIT's CS is SYSENTER_CS + 16
/// with RPL 3; a user read of the supervisor page is #PF with error code 5 (present, user, read); loading SS
/// with the user data selector is #GP(0x20); IN at CPL 3 with IOPL 0 and no I/O bitmap is #GP(0).
const TOUR_TRANSCRIPT: &str = "\
pushad saved esp - esp 00000020\npopad eax 12345678\npopad ebp 0bb00bb0\npopad esp 00310000\n\
lar 0x08 80c09b00\nlsl 0x08 ffffffff\nverr 0x08 80000000\nverw 0x08 00000000\n\
lar 0x23 80c0f300\nlsl 0x23 ffffffff\nverr 0x23 80000000\nverw 0x23 80000000\n\
lar 0x28 80008b00\nlsl 0x28 80000067\nverr 0x28 00000000\nverw 0x28 00000000\n\
lar 0x33 8010ec00\nlsl 0x33 00000000\nverr 0x33 00000000\nverw 0x33 00000000\n\
lar 0x38 80409300\nlsl 0x38 80000fff\nverr 0x38 80000000\nverw 0x38 80000000\n\
lar 0x41 80c0bb00\nlsl 0x41 ffffffff\nverr 0x41 80000000\nverw 0x41 00000000\n\
lar 0x50 00000000\nlsl 0x50 00000000\nverr 0x50 00000000\nverw 0x50 00000000\n\
small segment es:[0xffc] 5eed5eed\n#GP error 00000000\n#GP error 00000020\nss after refused load 00000010\n\
user cs 0000001b\nuser if+iopl 00000000\n\
int80 frame cs 0000001b\nint80 frame eflags 00000046\nint80 frame esp 00340000\nint80 frame ss 00000023\n\
int80 kernel esp 0031ffec\nint80 kernel ss 00000010\n\
sysenter cs 00000008\nsysenter ss 00000010\nsysenter esp 00330000\nsysenter if+iopl 00000000\n\
after sysexit cs 0000001b\nafter sysexit esp 00340000\n\
gate cs 00000008\ngate caller cs 0000001b\ngate parameter c0ffee00\ngate caller esp 0033fffc\n\
gate caller ss 00000023\ngate esp 0031ffec\nafter gate esp 00340000\n\
lar 0x08 00000000\nlsl 0x08 00000000\nverr 0x08 00000000\nverw 0x08 00000000\n\
lar 0x1b 80c0fb00\nlsl 0x1b ffffffff\nverr 0x1b 80000000\nverw 0x1b 00000000\n\
lar 0x10 00000000\nlsl 0x10 00000000\nverr 0x10 00000000\nverw 0x10 00000000\n\
lar 0x49 00000000\nlsl 0x49 00000000\nverr 0x49 00000000\nverw 0x49 00000000\n\
#PF error 00000005\n#PF cr2 003ff010\n#GP error 00000000\nok\n";

/// The line only a machine that checks data-segment limits prints: the read one byte past the small segment.
const SEGMENT_LIMIT_LINE: &str = "small segment es:[0xffc] 5eed5eed\n#GP error 00000000\n";

/// The first 32-bit guest: protected mode with its own GDT, TSS, call gate and two-level paging, printing what
/// the processor did for PUSHAD/POPAD, LAR/LSL/VERR/VERW, segment limits, SS loads, IRET to CPL 3, INT 0x80
/// with the TSS stack switch, SYSENTER/SYSEXIT, a call gate with a parameter, a user access to a supervisor
/// page and port I/O at CPL 3 (`workloads/src/tour32.rs`). QEMU must print the same transcript but for one
/// line: its TCG translator does not check data-segment limits on memory accesses (observed with the QEMU
/// this project installs), so the read past the small segment's limit succeeds there; the reference machine
/// raises #GP(0) as the SDM specifies, which is the mechanism VMware's 32-bit monitor relied on.
#[test]
fn protected_mode_tour_32_bit() {
    let image = virtlab_workloads::tour32::protected_mode_tour().bytes;
    let reference = on_reference_machine(&image);
    assert_eq!(reference, Ending { serial: TOUR_TRANSCRIPT.to_string(), exit_status: 0 });
    match qemu::available() {
        Err(reason) => eprintln!("x86-32 tour: skipping QEMU: {reason}"),
        Ok(()) => {
            let run = qemu::boot(&image, Duration::from_secs(120)).expect("qemu runs");
            let without_limit_check =
                TOUR_TRANSCRIPT.replace(SEGMENT_LIMIT_LINE, "small segment es:[0xffc] 5eed5eed\n");
            let ending =
                Ending { serial: run.serial, exit_status: run.exit_status.expect("the guest exited under QEMU") };
            assert_eq!(ending, Ending { serial: without_limit_check, exit_status: 0 }, "x86-32 tour under QEMU");
            eprintln!("x86-32 tour: QEMU agrees (but for the data-segment limit check it does not make)");
        }
    }
    match kvm() {
        Probe::Unavailable(reason) => eprintln!("x86-32 tour: skipping KVM: {reason}"),
        Probe::Available(Backend::Pvm) => eprintln!(
            "x86-32 tour: skipping KVM: on PVM, CPL 0 runs in KVM's instruction emulator, which cannot run a 32-bit \
             IRET, and INT n from CPL 3 does not reach an unmodified guest kernel"
        ),
        Probe::Available(backend) => {
            let config = KvmConfig { timeout: Duration::from_secs(120), ..KvmConfig::default() };
            let outcome = virtlab_kvm::run(&image, &config).unwrap_or_else(|e| panic!("x86-32 tour under KVM: {e}"));
            let ending = Ending {
                serial: String::from_utf8_lossy(&outcome.serial).into_owned(),
                exit_status: outcome.exit_status,
            };
            assert_eq!(ending, reference, "x86-32 tour: KVM ({}) and the reference machine disagree", backend.name());
            eprintln!("x86-32 tour: KVM ({}) agrees", backend.name());
        }
    }
}
