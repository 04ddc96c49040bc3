//! The virtlab trace format (writes 3.0, reads 2.x and 3.x).
//!
//! A trace is one recorded native execution of a guest: its image and boot state, the unique basic blocks it ran,
//! and the stream of events (block executions, context changes, transfers and the values of privileged
//! operations) in execution order. `FORMAT.md` in this crate gives the byte layout.
//!
//! - Recorders write with [`TraceWriter`] (or [`TraceFile`], which writes atomically).
//! - Engines replay through [`TraceView`], a zero-copy view over the whole trace in memory.
//! - Tools stream any size of trace through [`TraceReader`].
//! - [`check`] validates a trace before anything consumes it.
//!
//! ```
//! use std::io::Cursor;
//! use virtlab_traces::*;
//!
//! let boot = BootState { rip: 0x10_0000, rax: 0x2bad_b002, rbx: 0x9000, rsp: 0, rflags: 2, cr0: 0x11,
//!                        mode: CodeMode::Bits32, ram_bytes: 128 << 20 };
//! let meta = Metadata { workload: "demo".into(), recorder: "doc".into(), ..Metadata::default() };
//! let mut writer = TraceWriter::new(Cursor::new(Vec::new()), meta, boot, &[])?;
//! // nop; nop; hlt
//! let block = writer.add_block(&Block { address: 0x10_0000, mode: CodeMode::Bits32, tag: 0,
//!                                       instructions: 3, bytes: vec![0x90, 0x90, 0xf4] })?;
//! let start = Context { cpl: 0, interrupts_enabled: false, paging: PagingMode::Disabled, cr3: 0 };
//! writer.push(&Event::Context { at: 0, context: start })?;
//! writer.push(&Event::Block(block))?;
//! writer.push(&Event::Hlt { at: 2, idle: 0 })?;
//! let ending = Ending { reason: EndReason::GuestExit, exit_status: 0, detail: String::new(),
//!                       serial: b"hi\n".to_vec(), state_digest: [0; 32] };
//! let bytes = writer.finish(ending)?.into_inner();
//!
//! let view = TraceView::open(&bytes)?;
//! assert_eq!(view.footer().totals.instructions, 3);
//! let mut blocks_run = 0;
//! view.for_each_event(|event| if let Event::Block(_) = event { blocks_run += 1 })?;
//! assert_eq!(blocks_run, 1);
//! check(Cursor::new(&bytes))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod atomic;
mod blocks;
mod check;
mod codec;
mod error;
pub mod fasthash;
pub mod format;
mod model;
mod reader;
pub mod synth;
mod tally;
mod writer;

pub use blocks::BlockTable;
pub use check::{
    check, check_view, check_with_progress, CheckError, CheckReport, CheckedEvents, Rule, Site, ViewChecker, Violation,
    RULES_REVISION,
};
pub use codec::{BlockShape, Header};
pub use error::{TraceError, WriteError};
pub use model::*;
pub use reader::{ChunkInfo, DecodeScratch, EventCursor, TraceReader, TraceView};
pub use writer::{TraceFile, TraceWriter, MAX_SERIAL_BYTES};

/// The repository README's Rust examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
