//! Boots hand-assembled Multiboot images on KVM and on the reference machine and compares how they end.
//! Skips, saying why, where /dev/kvm is not usable.

use std::time::Duration;

use virtlab_kvm::{probe, probe_device, run, KvmConfig, KvmError, Probe};
use virtlab_machine::multiboot::{flat_image, FLAT_IMAGE_CODE_OFFSET, FLAT_IMAGE_LOAD};
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};

const LOAD: u32 = FLAT_IMAGE_LOAD;
const CODE_OFFSET: usize = FLAT_IMAGE_CODE_OFFSET as usize;

fn kvm_here() -> bool {
    match probe() {
        Probe::Available(backend) => {
            eprintln!("KVM available (backend {}): running the KVM side", backend.name());
            true
        }
        Probe::Unavailable(reason) => {
            eprintln!("skipping the KVM side: {reason}");
            false
        }
    }
}

fn config(timeout: Duration) -> KvmConfig {
    KvmConfig { timeout, ..KvmConfig::default() }
}

/// Prints "K\n" on COM1, reads the MMIO test region, and exits with 5 plus what it read.
const HELLO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
    0x04, 0x05, // add al, 5
    0xe6, 0xf4, // out 0xf4, al
    0xeb, 0xfe, // jmp $ (never reached: the exit port ends the run)
];

#[test]
fn kvm_and_the_reference_machine_end_the_same_way() {
    let image = flat_image(HELLO);
    let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
    let reference = machine.run(&mut NullObserver, RunLimits::default()).unwrap();
    assert_eq!((reference.exit_status, reference.serial.as_slice()), (5, &b"K\n"[..]));
    if !kvm_here() {
        return;
    }
    let outcome = run(&image, &config(Duration::from_secs(20))).unwrap();
    assert_eq!(outcome.exit_status, reference.exit_status);
    assert_eq!(outcome.serial, reference.serial);
    assert_eq!(outcome.exits.io_out, 3, "two serial bytes and the exit port");
    assert_eq!(outcome.exits.mmio_read, 1);
}

#[test]
fn a_looping_guest_is_stopped_with_its_rip() {
    if !kvm_here() {
        return;
    }
    let image = flat_image(&[0xeb, 0xfe]); // jmp $
    match run(&image, &config(Duration::from_millis(500))) {
        Err(KvmError::Timeout { rip, .. }) => assert_eq!(rip, u64::from(LOAD) + CODE_OFFSET as u64),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn a_guest_flooding_the_serial_port_is_stopped_with_its_rip() {
    if !kvm_here() {
        return;
    }
    // mov dx, 0x3f8; mov al, 'x'; again: out dx, al; jmp again
    let image = flat_image(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfd]);
    let out = u64::from(LOAD) + CODE_OFFSET as u64 + 6;
    match run(&image, &config(Duration::from_secs(60))) {
        // KVM reports the RIP after the OUT it exited on.
        Err(KvmError::SerialFlood { limit, rip }) => {
            assert_eq!(limit, virtlab_machine::devices::MAX_SERIAL_BYTES);
            assert!(rip == out || rip == out + 1, "{rip:#x}");
        }
        other => panic!("expected a serial flood, got {other:?}"),
    }
}

#[test]
fn a_guest_writing_outside_ram_is_stopped_naming_the_address_on_both_machines() {
    // xor eax, eax; mov [0xe0000000], eax; jmp $ — neither RAM nor the MMIO test region.
    let image = flat_image(&[0x31, 0xc0, 0xa3, 0x00, 0x00, 0x00, 0xe0, 0xeb, 0xfe]);
    let store = u64::from(LOAD) + CODE_OFFSET as u64 + 2;
    let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
    match machine.run(&mut NullObserver, RunLimits::default()) {
        Err(virtlab_machine::MachineError::UnbackedPhysicalAddress { address, rip, .. }) => {
            assert_eq!((address, rip), (0xe000_0000, store))
        }
        other => panic!("expected an access outside RAM, got {other:?}"),
    }
    if !kvm_here() {
        return;
    }
    match run(&image, &config(Duration::from_secs(20))) {
        // KVM reports the access as MMIO to an address with no device; its RIP is the store's, or past it.
        Err(KvmError::UnmappedMmio { gpa, rip }) => {
            assert_eq!(gpa, 0xe000_0000);
            assert!(rip == store || rip == store + 5, "{rip:#x}");
        }
        other => panic!("expected an unmapped access, got {other:?}"),
    }
}

#[test]
fn a_triple_fault_is_reported_with_its_rip() {
    // lidt [descriptor with limit 0]; mov ax, 0xfff8; mov ds, ax -> #GP (selector past the GDT limit), which
    // cannot be delivered -> #DF, which cannot either -> shutdown.
    let descriptor = LOAD + CODE_OFFSET as u32 + 16;
    let mut code = vec![0x0f, 0x01, 0x1d];
    code.extend_from_slice(&descriptor.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xb8, 0xf8, 0xff, 0x8e, 0xd8]); // mov ax, 0xfff8; mov ds, ax
    code.extend_from_slice(&[0xeb, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // jmp $; padding; IDT descriptor
    let image = flat_image(&code);
    let faulting = u64::from(LOAD) + CODE_OFFSET as u64 + 11;
    let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
    let reference = machine.run(&mut NullObserver, RunLimits::default()).unwrap_err();
    assert!(reference.to_string().contains("triple fault"), "{reference}");
    if !kvm_here() {
        return;
    }
    match run(&image, &config(Duration::from_secs(20))) {
        Err(KvmError::TripleFault { rip }) => assert_eq!(rip, faulting),
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
fn a_missing_or_wrong_device_is_an_answer_saying_how_to_fix_it() {
    match probe_device(c"/nonexistent/kvm") {
        Probe::Unavailable(reason) => {
            assert!(reason.contains("cannot open /nonexistent/kvm") && reason.contains("read-write access"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    match probe_device(c"/dev/null") {
        Probe::Unavailable(reason) => assert!(reason.contains("/dev/null opens but KVM_CREATE_VM fails"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn images_without_a_multiboot_header_are_refused_before_kvm_is_touched() {
    let err = run(&[0x90; 64], &KvmConfig::default()).unwrap_err();
    assert!(matches!(err, KvmError::Load(_)), "{err}");
}
