//! Errors of reading and writing traces. Every reading error says where: a file offset, and for problems inside a
//! chunk's payload the chunk's offset and the byte within its (decompressed) payload.

use std::io;

use crate::format::ChunkKind;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    #[error(
        "not a virtlab trace: the first 8 bytes are {found:02x?}, a trace starts with {expected:02x?} \
         (is this a guest image or some other file?)"
    )]
    BadMagic { found: Vec<u8>, expected: [u8; 8] },

    #[error(
        "trace format version {major}.{minor} cannot be read: this virtlab reads {oldest}.x to {newest}.x \
         (re-record the trace with this virtlab, or use a virtlab that reads {major}.x)",
        oldest = crate::format::OLDEST_READABLE_MAJOR,
        newest = crate::format::VERSION_MAJOR
    )]
    UnsupportedVersion { major: u16, minor: u16 },

    #[error("bad preamble at offset {offset}: {message}")]
    BadPreamble { offset: u64, message: String },

    #[error("truncated trace: {what} at offset {offset} needs {needed} bytes but only {available} remain")]
    Truncated { what: &'static str, offset: u64, needed: u64, available: u64 },

    #[error("corrupt chunk header at offset {offset}: its checksum does not match (stored {stored:#010x}, computed {computed:#010x})")]
    ChunkHeaderChecksum { offset: u64, stored: u32, computed: u32 },

    #[error("corrupt {kind} chunk at offset {offset}: payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ChunkPayloadChecksum { kind: ChunkKind, offset: u64, stored: u32, computed: u32 },

    #[error("chunk at offset {offset}: {field} is {value}, {expected}")]
    BadChunkHeader { offset: u64, field: &'static str, value: u64, expected: String },

    #[error("chunk at offset {offset}: {message}")]
    ChunkOrder { offset: u64, message: String },

    #[error("{kind} chunk at offset {offset}: zstd could not decompress the payload: {reason}")]
    Decompress { kind: ChunkKind, offset: u64, reason: String },

    #[error("{kind} chunk at offset {offset}, payload byte {position}: {message}")]
    Malformed { kind: ChunkKind, offset: u64, position: u64, message: String },

    #[error("{message} (after the footer at offset {offset})")]
    Trailing { offset: u64, message: String },
}

impl TraceError {
    /// The file offset the error is about: where the bad chunk (or field) starts. `None` for I/O errors.
    pub fn offset(&self) -> Option<u64> {
        match self {
            TraceError::Io(_) => None,
            TraceError::BadMagic { .. } | TraceError::UnsupportedVersion { .. } => Some(0),
            TraceError::BadPreamble { offset, .. }
            | TraceError::Truncated { offset, .. }
            | TraceError::ChunkHeaderChecksum { offset, .. }
            | TraceError::ChunkPayloadChecksum { offset, .. }
            | TraceError::BadChunkHeader { offset, .. }
            | TraceError::ChunkOrder { offset, .. }
            | TraceError::Decompress { offset, .. }
            | TraceError::Malformed { offset, .. }
            | TraceError::Trailing { offset, .. } => Some(*offset),
        }
    }
}

/// A problem found while decoding a payload; the caller adds which chunk it was in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PayloadError {
    pub position: usize,
    pub message: String,
}

impl PayloadError {
    pub fn new(position: usize, message: impl Into<String>) -> Self {
        PayloadError { position, message: message.into() }
    }

    pub fn in_chunk(self, kind: ChunkKind, offset: u64) -> TraceError {
        TraceError::Malformed { kind, offset, position: self.position as u64, message: self.message }
    }
}

/// Errors of writing a trace: the recorder broke the writer's contract, or the output failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("I/O error writing the trace: {0}")]
    Io(#[from] io::Error),

    #[error("block {id} does not exist: only {defined} blocks were added (call add_block first)")]
    UnknownBlock { id: u32, defined: u32 },

    #[error("partial execution of block {id} retires {executed} instructions but the block has only {instructions}: a partial block must stop before its end")]
    PartialTooLong { id: u32, executed: u32, instructions: u32 },

    #[error("invalid {kind} event: {reason}")]
    InvalidEvent { kind: &'static str, reason: String },

    #[error("invalid block at {address:#x}: {reason}")]
    InvalidBlock { address: u64, reason: String },

    #[error("{what} is {value} bytes, more than the format's limit of {limit}")]
    TooLarge { what: String, value: u64, limit: u64 },

    #[error("image segment at {gpa:#x} is empty: leave it out")]
    EmptySegment { gpa: u64 },
}
