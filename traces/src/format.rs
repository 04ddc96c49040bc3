//! The container: preamble, chunk headers, checksums, limits and compression. See `FORMAT.md`.

use std::fmt;
use std::io::Read;

use crate::error::TraceError;

pub const MAGIC: [u8; 8] = *b"VLTRC\r\n\x1a";
/// The version this crate writes.
pub const VERSION_MAJOR: u16 = 3;
pub const VERSION_MINOR: u16 = 0;
/// The oldest major version this crate still reads: 2.x differs from 3.x only by having no event dictionaries.
pub const OLDEST_READABLE_MAJOR: u16 = 2;

pub const PREAMBLE_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 24;

/// The newest minor version of `major` this crate knows: a file of a newer minor may append header and footer
/// fields this crate skips. 2.1 appended the symbol map to the header; 3.0 kept 2.1's header.
pub fn newest_known_minor(major: u16) -> u16 {
    match major {
        2 => 1,
        _ => VERSION_MINOR,
    }
}

/// No chunk payload, stored or decompressed, may exceed this: it bounds a reader's memory per chunk.
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;
/// Raw payload size at which the writer closes an event or block chunk.
pub const TARGET_CHUNK_BYTES: usize = 1 << 20;
pub const MAX_BLOCK_INSTRUCTIONS: u32 = 4096;
pub const MAX_BLOCK_BYTES: usize = 16 * 4096;
/// Longest string (workload name, parameter, recorder, ending detail) a header or footer may hold.
pub const MAX_STRING_BYTES: usize = 64 << 10;
/// zstd level the writer uses: level 3 compresses a block stream at hundreds of MB/s with ratios that later levels
/// improve by only a few percent.
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Header,
    Image,
    Blocks,
    Events,
    Footer,
    /// A kind this reader does not know, at or above `0x80`: optional, skipped.
    Optional(u8),
}

impl ChunkKind {
    pub fn code(self) -> u8 {
        match self {
            ChunkKind::Header => 1,
            ChunkKind::Image => 2,
            ChunkKind::Blocks => 3,
            ChunkKind::Events => 4,
            ChunkKind::Footer => 5,
            ChunkKind::Optional(code) => code,
        }
    }

    pub fn from_code(code: u8) -> Option<ChunkKind> {
        Some(match code {
            1 => ChunkKind::Header,
            2 => ChunkKind::Image,
            3 => ChunkKind::Blocks,
            4 => ChunkKind::Events,
            5 => ChunkKind::Footer,
            0x80..=0xff => ChunkKind::Optional(code),
            _ => return None,
        })
    }
}

impl fmt::Display for ChunkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkKind::Header => f.write_str("header"),
            ChunkKind::Image => f.write_str("image"),
            ChunkKind::Blocks => f.write_str("blocks"),
            ChunkKind::Events => f.write_str("events"),
            ChunkKind::Footer => f.write_str("footer"),
            ChunkKind::Optional(code) => write!(f, "optional {code:#04x}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Stored,
    Zstd,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::Stored => 0,
            Codec::Zstd => 1,
        }
    }
}

/// A parsed and verified chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub kind: ChunkKind,
    pub codec: Codec,
    /// Records in the chunk (events, blocks, segments; 1 for header and footer).
    pub items: u32,
    pub raw_len: u32,
    pub stored_len: u32,
    pub payload_crc: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[0] = self.kind.code();
        out[1] = self.codec.code();
        set_lengths(&mut out, self.items, self.raw_len, self.stored_len, self.payload_crc);
        out
    }

    /// Parses the 24 header bytes of the chunk at file offset `offset`, checking everything that can be checked
    /// without the payload.
    pub fn decode(bytes: &[u8; CHUNK_HEADER_LEN], offset: u64) -> Result<ChunkHeader, TraceError> {
        let le32 = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let stored_crc = le32(20);
        let computed = crc32fast::hash(&bytes[..20]);
        if stored_crc != computed {
            return Err(TraceError::ChunkHeaderChecksum { offset, stored: stored_crc, computed });
        }
        let bad = |field: &'static str, value: u64, expected: String| TraceError::BadChunkHeader {
            offset,
            field,
            value,
            expected,
        };
        let kind = ChunkKind::from_code(bytes[0]).ok_or_else(|| {
            bad(
                "kind",
                bytes[0].into(),
                "not a chunk kind of format 2.x or 3.x (1–5 are required kinds, 0x80 and above optional ones): \
                 the trace was written by a newer virtlab or is corrupt"
                    .into(),
            )
        })?;
        let codec = match bytes[1] {
            0 => Codec::Stored,
            1 => Codec::Zstd,
            other => return Err(bad("codec", other.into(), "expected 0 (stored) or 1 (zstd)".into())),
        };
        let reserved = u16::from_le_bytes([bytes[2], bytes[3]]);
        if reserved != 0 {
            return Err(bad("reserved field", reserved.into(), "expected 0".into()));
        }
        let header =
            ChunkHeader { kind, codec, items: le32(4), raw_len: le32(8), stored_len: le32(12), payload_crc: le32(16) };
        for (field, value) in [("raw length", header.raw_len), ("stored length", header.stored_len)] {
            if value > MAX_CHUNK_BYTES {
                return Err(bad(field, value.into(), format!("more than the limit of {MAX_CHUNK_BYTES} bytes")));
            }
        }
        if codec == Codec::Stored && header.raw_len != header.stored_len {
            return Err(bad(
                "raw length",
                header.raw_len.into(),
                format!("a stored chunk's raw length must equal its stored length {}", header.stored_len),
            ));
        }
        Ok(header)
    }

    /// Verifies the payload checksum.
    pub fn verify_payload(&self, stored: &[u8], offset: u64) -> Result<(), TraceError> {
        let computed = crc32fast::hash(stored);
        if computed != self.payload_crc {
            return Err(TraceError::ChunkPayloadChecksum {
                kind: self.kind,
                offset,
                stored: self.payload_crc,
                computed,
            });
        }
        Ok(())
    }

    /// The payload in its raw form: borrowed when stored, decompressed into `scratch` when compressed.
    pub fn raw_payload<'s>(
        &self,
        stored: &'s [u8],
        scratch: &'s mut Vec<u8>,
        offset: u64,
    ) -> Result<&'s [u8], TraceError> {
        match self.codec {
            Codec::Stored => Ok(stored),
            Codec::Zstd => {
                decompress(stored, self.raw_len as usize, scratch).map_err(|reason| TraceError::Decompress {
                    kind: self.kind,
                    offset,
                    reason,
                })?;
                Ok(scratch)
            }
        }
    }
}

/// Above this ratio of raw to stored bytes, a chunk is decompressed by streaming, so that memory grows with the
/// output actually produced rather than with what the header claims. Recorded event streams of tight loops
/// compress by a thousand times and more, so readers keep their buffer across chunks: only the first pays.
const BULK_DECOMPRESS_MAX_RATIO: usize = 256;

/// Decompresses one zstd frame into `out`, which ends up holding exactly `raw_len` bytes.
///
/// Into a buffer that already has room (a reader reuses one across chunks, and a previous chunk's real output
/// paid for it), or for a claim within the ratio, the frame is decompressed in one call; otherwise by streaming.
fn decompress(stored: &[u8], raw_len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    let bulk = raw_len <= out.capacity() || raw_len <= stored.len().saturating_mul(BULK_DECOMPRESS_MAX_RATIO);
    let written = if bulk {
        out.reserve(raw_len);
        let mut decompressor = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
        decompressor.decompress_to_buffer(stored, out).map_err(|e| e.to_string())?
    } else {
        let decoder = zstd::stream::read::Decoder::with_buffer(stored).map_err(|e| e.to_string())?;
        // One byte past the claim is enough to tell that the frame holds more than the header says.
        std::io::Read::take(decoder, raw_len as u64 + 1).read_to_end(out).map_err(|e| e.to_string())?
    };
    if written != raw_len {
        return Err(format!("decompressed to {written} bytes, the header says {raw_len}"));
    }
    Ok(())
}

/// A whole chunk: header then stored payload. `stored` is `raw` itself for [`Codec::Stored`], or its zstd frame.
pub fn chunk_bytes(kind: ChunkKind, codec: Codec, items: u32, raw_len: u32, stored: &[u8]) -> Vec<u8> {
    let header = ChunkHeader {
        kind,
        codec,
        items,
        raw_len,
        stored_len: stored.len() as u32,
        payload_crc: crc32fast::hash(stored),
    };
    let mut chunk = Vec::with_capacity(CHUNK_HEADER_LEN + stored.len());
    chunk.extend_from_slice(&header.encode());
    chunk.extend_from_slice(stored);
    chunk
}

pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
    out[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
    out
}

/// The version a file declares, once its magic and version are known to be readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    /// Whether events chunks carry an event dictionary after their block dictionary (3.0 on).
    pub fn has_event_dictionary(self) -> bool {
        self.major >= 3
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

pub fn parse_preamble(bytes: &[u8]) -> Result<Version, TraceError> {
    let magic_len = bytes.len().min(8);
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(TraceError::BadMagic { found: bytes[..magic_len].to_vec(), expected: MAGIC });
    }
    if bytes.len() < PREAMBLE_LEN {
        return Err(TraceError::Truncated {
            what: "preamble",
            offset: 0,
            needed: PREAMBLE_LEN as u64,
            available: bytes.len() as u64,
        });
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
    if !(OLDEST_READABLE_MAJOR..=VERSION_MAJOR).contains(&major) {
        return Err(TraceError::UnsupportedVersion { major, minor });
    }
    let reserved = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if reserved != 0 {
        return Err(TraceError::BadPreamble {
            offset: 12,
            message: format!("reserved field is {reserved:#x}, expected 0"),
        });
    }
    Ok(Version { major, minor })
}

/// One chunk of a trace with its payload in raw form: what tools that damage traces on purpose (the mutation
/// tests, the fuzz targets) take apart and put back together. `kind` is the code as stored, so that a damaged
/// kind survives the round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawChunk {
    pub kind: u8,
    pub items: u32,
    pub raw: Vec<u8>,
}

/// A valid trace's preamble and chunks, every payload decompressed.
pub fn split_chunks(trace: &[u8]) -> Result<([u8; PREAMBLE_LEN], Vec<RawChunk>), TraceError> {
    parse_preamble(trace)?;
    let mut preamble = [0u8; PREAMBLE_LEN];
    preamble.copy_from_slice(&trace[..PREAMBLE_LEN]);
    let mut chunks = Vec::new();
    let mut scratch = Vec::new();
    let mut at = PREAMBLE_LEN;
    while at < trace.len() {
        let offset = at as u64;
        let truncated = |what, needed: usize| TraceError::Truncated {
            what,
            offset,
            needed: needed as u64,
            available: (trace.len() - at) as u64,
        };
        let header_bytes =
            trace[at..].first_chunk::<CHUNK_HEADER_LEN>().ok_or(truncated("chunk header", CHUNK_HEADER_LEN))?;
        let header = ChunkHeader::decode(header_bytes, offset)?;
        let start = at + CHUNK_HEADER_LEN;
        let stored = trace
            .get(start..start + header.stored_len as usize)
            .ok_or(truncated("chunk payload", CHUNK_HEADER_LEN + header.stored_len as usize))?;
        header.verify_payload(stored, offset)?;
        let raw = header.raw_payload(stored, &mut scratch, offset)?.to_vec();
        chunks.push(RawChunk { kind: header.kind.code(), items: header.items, raw });
        at = start + stored.len();
    }
    Ok((preamble, chunks))
}

/// Writes a chunk header's item count, lengths and payload checksum, then its own checksum; the kind, codec and
/// reserved bytes stay as they are.
fn set_lengths(header: &mut [u8], items: u32, raw_len: u32, stored_len: u32, payload_crc: u32) {
    header[4..8].copy_from_slice(&items.to_le_bytes());
    header[8..12].copy_from_slice(&raw_len.to_le_bytes());
    header[12..16].copy_from_slice(&stored_len.to_le_bytes());
    header[16..20].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&header[..20]);
    header[20..24].copy_from_slice(&header_crc.to_le_bytes());
}

/// The chunks written back after `preamble`, every one stored, with lengths and both checksums matching its
/// payload, whatever was done to it: damage reaches the decoders instead of stopping at a checksum.
pub fn join_stored(preamble: &[u8], chunks: &[RawChunk]) -> Vec<u8> {
    let mut out = preamble.to_vec();
    for chunk in chunks {
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[0] = chunk.kind;
        header[1] = Codec::Stored.code();
        let len = chunk.raw.len() as u32;
        set_lengths(&mut header, chunk.items, len, len, crc32fast::hash(&chunk.raw));
        out.extend_from_slice(&header);
        out.extend_from_slice(&chunk.raw);
    }
    out
}

/// Any bytes, with every chunk header's lengths and checksums made to match what follows it: a fuzzer's
/// mutations of a stored trace then reach the decoders, where the checksums would stop nearly all of them.
/// Kind, codec, item count and the reserved field are kept as they are (they are what the decoders judge); a
/// stored length that runs past the end is cut to the bytes there are; a stored chunk's raw length is set to its
/// stored length; bytes too few for a header are kept.
pub fn reseal(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut at = PREAMBLE_LEN;
    while at + CHUNK_HEADER_LEN <= out.len() {
        let start = at + CHUNK_HEADER_LEN;
        let field = |from: usize| u32::from_le_bytes([out[from], out[from + 1], out[from + 2], out[from + 3]]);
        let (items, raw_len) = (field(at + 4), field(at + 8));
        let stored_len = (field(at + 12) as usize).min(out.len() - start) as u32;
        let raw_len = if out[at + 1] == Codec::Stored.code() { stored_len } else { raw_len };
        let payload_crc = crc32fast::hash(&out[start..start + stored_len as usize]);
        set_lengths(&mut out[at..start], items, raw_len, stored_len, payload_crc);
        at = start + stored_len as usize;
    }
    out
}
