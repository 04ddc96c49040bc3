//! Workloads scaled toward a number of instructions: the benchmark tasks measure long runs, in which booting the
//! machine and writing the trace's image are a small part of the time.

use anyhow::Context;
use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};

/// The `iterations` that make workload `name` retire about `target` instructions: its default scaled by how far
/// a run at the default falls short, capped at the parameter's maximum.
pub fn iterations_toward(name: &str, target: u64) -> anyhow::Result<u64> {
    let spec = virtlab_workloads::catalog().iter().find(|s| s.name == name).context("no such workload")?;
    let param = spec.param("iterations").context("every workload takes iterations")?;
    let mut machine = Machine::from_multiboot(&virtlab_workloads::build(name, &[])?.bytes, MachineConfig::default())?;
    machine.run(&mut NullObserver, RunLimits { max_instructions: 4_000_000_000 })?;
    let scale = (target / machine.retired_instructions().max(1)).max(1);
    Ok(param.default.saturating_mul(scale).min(param.max))
}
