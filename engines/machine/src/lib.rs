//! virtlab's reference machine: a deterministic x86 interpreter that boots Multiboot 1 guests and
//! reports, through [`ExecutionObserver`], everything a trace recorder needs.
//!
//! ```no_run
//! use virtlab_machine::{Machine, MachineConfig, NullObserver, RunLimits};
//! let image = std::fs::read("guest.bin").unwrap();
//! let mut machine = Machine::from_multiboot(&image, MachineConfig::default()).unwrap();
//! let outcome = machine.run(&mut NullObserver, RunLimits::default()).unwrap();
//! println!("exit status {}", outcome.exit_status);
//! ```

mod alu;
pub mod cpu;
mod decode;
pub mod devices;
mod digest;
mod error;
mod exec;
mod fast;
mod interp;
pub mod interrupts;
mod memory;
pub mod multiboot;
pub mod observer;
mod system;

pub use cpu::{CodeMode, Cpu, PagingMode, Segment, SegmentRegister};
pub use error::{ExceptionChain, LoadError, MachineError};
pub use interp::{Machine, MachineConfig, RunLimits, RunOutcome};
pub use memory::{MMIO_TEST_BASE, MMIO_TEST_SIZE};
pub use observer::{
    AccessKind, BlockExecution, CpuContext, CutShortReason, DescriptorTable, ExecutionObserver, IoDirection,
    NullObserver, SideEvent, Transfer,
};
pub use system::cpuid;

/// Flag arithmetic, exposed for the flag tables in the tests and for engines that re-derive flags.
pub mod flags {
    pub use crate::alu::*;
}
