//! The wall-clock deadline: it stops a guest that never ends, at a block boundary, and changes nothing for a
//! guest that ends in time.

use std::time::{Duration, Instant};

use virtlab_machine::multiboot::{flat_image, FLAT_IMAGE_CODE_OFFSET, FLAT_IMAGE_LOAD};
use virtlab_machine::{Machine, MachineConfig, MachineError, NullObserver, RunLimits};

const UNLIMITED: RunLimits = RunLimits { max_instructions: u64::MAX };

#[test]
fn a_deadline_stops_a_looping_guest_and_names_where() {
    let mut machine = Machine::from_multiboot(&flat_image(&[0xeb, 0xfe]), MachineConfig::default()).unwrap();
    machine.set_deadline(Some(Instant::now() + Duration::from_millis(50)));
    let error = machine.run(&mut NullObserver, UNLIMITED).unwrap_err();
    assert_eq!(error, MachineError::Deadline { rip: u64::from(FLAT_IMAGE_LOAD + FLAT_IMAGE_CODE_OFFSET) });
    assert!(machine.retired_instructions() > 0);
}

#[test]
fn a_deadline_changes_nothing_for_a_guest_that_ends_in_time() {
    // mov al, 3; out 0xf4, al
    let image = flat_image(&[0xb0, 0x03, 0xe6, 0xf4]);
    let mut plain = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
    let expected = plain.run(&mut NullObserver, UNLIMITED).unwrap();
    let mut limited = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
    limited.set_deadline(Some(Instant::now() + Duration::from_secs(60)));
    assert_eq!(limited.run(&mut NullObserver, UNLIMITED).unwrap(), expected);
    assert_eq!(expected.exit_status, 3);
}
