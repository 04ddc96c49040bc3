//! Any bytes as a Multiboot guest image (`virtlab run IMAGE`): the loader accepts or refuses it, and an accepted
//! guest runs in 40 MiB of RAM until it stops, faults or meets the instruction budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};

fuzz_target!(|data: &[u8]| {
    let config = MachineConfig { ram_size: 40 << 20, ..MachineConfig::default() };
    let Ok(mut machine) = Machine::from_multiboot(data, config) else { return };
    let _ = machine.run(&mut NullObserver, RunLimits { max_instructions: 50_000 });
});
