//! The machine every guest image relies on: the facts live in `virtlab-machine-facts` (`workloads/facts/`), the
//! one crate the reference machine, the KVM runner and the engines share with the images.

pub use virtlab_machine_facts::{exit_code, MachineFacts, MACHINE};
