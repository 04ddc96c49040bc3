//! KVM's binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst §4.133): a file descriptor per
//! VM and per vCPU whose content is a header, an id string, a block of descriptors and a block of `u64` values.
//!
//! The layout comes from the kernel, but this module treats it as untrusted bytes: every offset and length is
//! checked against what was read, sizes are capped before anything is allocated, and a malformed layout is an
//! error naming the field, never a panic. [`Schema::parse`] and [`Schema::values`] take plain bytes so that a
//! property test can feed them anything.

use std::fs::File;
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    KVM_STATS_BASE_MASK, KVM_STATS_BASE_POW10, KVM_STATS_BASE_POW2, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT,
    KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST, KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK,
    KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES, KVM_STATS_UNIT_CYCLES, KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_NONE,
    KVM_STATS_UNIT_SECONDS,
};

/// Size of `struct kvm_stats_header`: six `u32`s.
pub const HEADER_LEN: usize = 24;
/// Size of `struct kvm_stats_desc` before its name: flags, exponent, size, offset, bucket_size.
const DESCRIPTOR_FIXED_LEN: usize = 16;
/// No kernel has more than a few hundred statistics with names of a few dozen bytes; anything past these bounds
/// is a corrupt layout, refused before memory is reserved for it.
const MAX_DESCRIPTORS: u32 = 4096;
const MAX_NAME_SIZE: u32 = 256;
const MAX_VALUES_PER_STAT: u16 = 1024;
/// The most bytes the descriptor block or the data block may span.
pub const MAX_BLOCK_LEN: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    #[error("KVM statistics: {what} at byte {offset}: {problem}")]
    Malformed { what: String, offset: u64, problem: String },
    #[error("KVM statistics: reading {len} bytes at offset {offset} of the stats file failed: {message}")]
    Read { offset: u64, len: usize, message: String },
}

fn malformed(what: impl Into<String>, offset: u64, problem: impl Into<String>) -> StatsError {
    StatsError::Malformed { what: what.into(), offset, problem: problem.into() }
}

/// How a statistic accumulates (the descriptor's type bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// Only ever grows: a delta over a run is meaningful.
    Cumulative,
    /// A current value (a gauge).
    Instant,
    /// The largest value seen.
    Peak,
    LinearHistogram,
    LogHistogram,
}

impl StatKind {
    pub fn name(self) -> &'static str {
        match self {
            StatKind::Cumulative => "cumulative",
            StatKind::Instant => "instant",
            StatKind::Peak => "peak",
            StatKind::LinearHistogram => "linear_histogram",
            StatKind::LogHistogram => "log_histogram",
        }
    }

    /// Whether the difference of two readings is what happened in between.
    pub fn is_additive(self) -> bool {
        matches!(self, StatKind::Cumulative | StatKind::LinearHistogram | StatKind::LogHistogram)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatUnit {
    None,
    Bytes,
    Seconds,
    Cycles,
    Boolean,
}

impl StatUnit {
    pub fn name(self) -> &'static str {
        match self {
            StatUnit::None => "count",
            StatUnit::Bytes => "bytes",
            StatUnit::Seconds => "seconds",
            StatUnit::Cycles => "cycles",
            StatUnit::Boolean => "boolean",
        }
    }
}

/// One statistic's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatDescriptor {
    pub name: String,
    pub kind: StatKind,
    pub unit: StatUnit,
    /// 10 or 2: a raw value times `base^exponent` is in `unit`.
    pub base: u32,
    pub exponent: i16,
    /// Number of `u64` values (1, or the buckets of a histogram).
    pub size: u16,
    /// Byte offset of the first value in the data block.
    pub offset: u32,
}

impl StatDescriptor {
    /// A raw reading in the statistic's unit: `raw × base^exponent` (nanoseconds become seconds).
    pub fn scale(&self, raw: f64) -> f64 {
        raw * f64::from(self.base).powi(i32::from(self.exponent))
    }
}

/// The descriptors of one stats file and where its values are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// The file's id string, e.g. `kvm-1234/vcpu-0`.
    pub id: String,
    pub descriptors: Vec<StatDescriptor>,
    pub data_offset: u32,
    /// Bytes of the data block the descriptors cover.
    pub data_len: usize,
}

fn u32_at(bytes: &[u8], offset: usize, what: &str) -> Result<u32, StatsError> {
    let field = bytes
        .get(offset..)
        .and_then(<[u8]>::first_chunk::<4>)
        .ok_or_else(|| malformed(what, offset as u64, format!("needs 4 bytes, the file has {}", bytes.len())))?;
    Ok(u32::from_le_bytes(*field))
}

/// The little-endian number in `bytes` (at most 8 of them; an empty slice is 0).
fn little_endian(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |value, &byte| value << 8 | u64::from(byte))
}

/// The header fields, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub name_size: u32,
    pub num_desc: u32,
    pub id_offset: u32,
    pub desc_offset: u32,
    pub data_offset: u32,
}

impl Header {
    pub fn parse(bytes: &[u8]) -> Result<Header, StatsError> {
        let field = |index: usize, what: &str| u32_at(bytes, 4 * index, what);
        let header = Header {
            name_size: field(1, "header name_size")?,
            num_desc: field(2, "header num_desc")?,
            id_offset: field(3, "header id_offset")?,
            desc_offset: field(4, "header desc_offset")?,
            data_offset: field(5, "header data_offset")?,
        };
        if header.name_size == 0 || header.name_size > MAX_NAME_SIZE {
            return Err(malformed(
                "header name_size",
                4,
                format!("{} is not in 1..={MAX_NAME_SIZE}", header.name_size),
            ));
        }
        if header.num_desc > MAX_DESCRIPTORS {
            return Err(malformed("header num_desc", 8, format!("{} exceeds {MAX_DESCRIPTORS}", header.num_desc)));
        }
        Ok(header)
    }

    fn descriptor_stride(&self) -> usize {
        DESCRIPTOR_FIXED_LEN + self.name_size as usize
    }

    /// How many bytes from the start of the file hold the header, the id string and every descriptor.
    pub fn layout_len(&self) -> usize {
        let descriptors = self.desc_offset as usize + self.num_desc as usize * self.descriptor_stride();
        let id = self.id_offset as usize + self.name_size as usize;
        descriptors.max(id).max(HEADER_LEN)
    }
}

fn nul_terminated(bytes: &[u8], what: &str, offset: usize) -> Result<String, StatsError> {
    let end = bytes.iter().position(|&b| b == 0).ok_or_else(|| malformed(what, offset as u64, "no NUL terminator"))?;
    std::str::from_utf8(&bytes[..end]).map(str::to_string).map_err(|_| malformed(what, offset as u64, "not UTF-8"))
}

impl Schema {
    /// Parses the start of a stats file: header, id string and descriptors (`bytes` holds at least
    /// [`Header::layout_len`] bytes from offset 0).
    pub fn parse(bytes: &[u8]) -> Result<Schema, StatsError> {
        let header = Header::parse(bytes)?;
        if header.layout_len() > MAX_BLOCK_LEN {
            return Err(malformed("header", 0, format!("the descriptors would span {} bytes", header.layout_len())));
        }
        let region = |offset: u32, len: usize, what: &str| {
            let start = offset as usize;
            bytes.get(start..start + len).ok_or_else(|| {
                malformed(what, u64::from(offset), format!("needs {len} bytes, the file has {}", bytes.len()))
            })
        };
        let id_offset = header.id_offset as usize;
        let id =
            nul_terminated(region(header.id_offset, header.name_size as usize, "id string")?, "id string", id_offset)?;
        let stride = header.descriptor_stride();
        let block = region(header.desc_offset, header.num_desc as usize * stride, "descriptor block")?;
        let mut descriptors = Vec::with_capacity(header.num_desc as usize);
        let mut data_len = 0usize;
        for (index, raw) in block.chunks_exact(stride).enumerate() {
            let at = header.desc_offset as usize + index * stride;
            let descriptor = parse_descriptor(raw, at)?;
            let end = descriptor.offset as usize + 8 * descriptor.size as usize;
            if end > MAX_BLOCK_LEN {
                return Err(malformed(
                    format!("descriptor `{}` offset", descriptor.name),
                    at as u64 + 8,
                    format!("values would end at byte {end} of the data block"),
                ));
            }
            data_len = data_len.max(end);
            descriptors.push(descriptor);
        }
        Ok(Schema { id, descriptors, data_offset: header.data_offset, data_len })
    }

    /// The values of every statistic from the data block (`data` = `data_len` bytes at `data_offset`), one `Vec`
    /// per descriptor.
    pub fn values(&self, data: &[u8]) -> Result<Vec<Vec<u64>>, StatsError> {
        self.descriptors
            .iter()
            .map(|d| {
                let start = d.offset as usize;
                let len = 8 * d.size as usize;
                let raw = data.get(start..start + len).ok_or_else(|| {
                    malformed(
                        format!("values of `{}`", d.name),
                        u64::from(self.data_offset) + start as u64,
                        format!("need {len} bytes, the data block has {}", data.len()),
                    )
                })?;
                Ok(raw.chunks_exact(8).map(little_endian).collect())
            })
            .collect()
    }
}

fn parse_descriptor(raw: &[u8], at: usize) -> Result<StatDescriptor, StatsError> {
    // `raw` is one descriptor's stride: the fixed fields and a name of `name_size` (at least 1) bytes.
    let field = |from: usize, to: usize| little_endian(raw.get(from..to).unwrap_or_default());
    let flags = field(0, 4) as u32;
    let exponent = field(4, 6) as u16 as i16;
    let size = field(6, 8) as u16;
    let offset = field(8, 12) as u32;
    let name_bytes = raw.get(DESCRIPTOR_FIXED_LEN..).unwrap_or_default();
    let name = nul_terminated(name_bytes, "descriptor name", at + DESCRIPTOR_FIXED_LEN)?;
    let what = |field: &str| format!("descriptor `{name}` {field}");
    let kind = match flags & KVM_STATS_TYPE_MASK {
        KVM_STATS_TYPE_CUMULATIVE => StatKind::Cumulative,
        KVM_STATS_TYPE_INSTANT => StatKind::Instant,
        KVM_STATS_TYPE_PEAK => StatKind::Peak,
        KVM_STATS_TYPE_LINEAR_HIST => StatKind::LinearHistogram,
        KVM_STATS_TYPE_LOG_HIST => StatKind::LogHistogram,
        other => return Err(malformed(what("type"), at as u64, format!("unknown type {other}"))),
    };
    let unit = match flags & KVM_STATS_UNIT_MASK {
        KVM_STATS_UNIT_NONE => StatUnit::None,
        KVM_STATS_UNIT_BYTES => StatUnit::Bytes,
        KVM_STATS_UNIT_SECONDS => StatUnit::Seconds,
        KVM_STATS_UNIT_CYCLES => StatUnit::Cycles,
        KVM_STATS_UNIT_BOOLEAN => StatUnit::Boolean,
        other => return Err(malformed(what("unit"), at as u64, format!("unknown unit {:#x}", other))),
    };
    let base = match flags & KVM_STATS_BASE_MASK {
        KVM_STATS_BASE_POW10 => 10,
        KVM_STATS_BASE_POW2 => 2,
        other => return Err(malformed(what("base"), at as u64, format!("unknown base {:#x}", other))),
    };
    if size == 0 || size > MAX_VALUES_PER_STAT {
        return Err(malformed(what("size"), at as u64 + 6, format!("{size} is not in 1..={MAX_VALUES_PER_STAT}")));
    }
    if offset % 8 != 0 {
        return Err(malformed(what("offset"), at as u64 + 8, format!("{offset} is not a multiple of 8")));
    }
    Ok(StatDescriptor { name, kind, unit, base, exponent, size, offset })
}

/// A VM's or vCPU's stats file, with its schema read once.
pub struct StatsFile {
    file: File,
    pub schema: Schema,
}

fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>, StatsError> {
    let mut buffer = vec![0; len];
    file.read_exact_at(&mut buffer, offset).map_err(|e| StatsError::Read { offset, len, message: e.to_string() })?;
    Ok(buffer)
}

impl StatsFile {
    /// Reads the header and descriptors of a stats file descriptor returned by `KVM_GET_STATS_FD`.
    pub fn open(file: File) -> Result<StatsFile, StatsError> {
        let header = Header::parse(&read_at(&file, 0, HEADER_LEN)?)?;
        let len = header.layout_len();
        if len > MAX_BLOCK_LEN {
            return Err(malformed("header", 0, format!("the descriptors would span {len} bytes")));
        }
        let schema = Schema::parse(&read_at(&file, 0, len)?)?;
        Ok(StatsFile { file, schema })
    }

    /// The current values, one `Vec` per descriptor.
    pub fn read(&self) -> Result<Vec<Vec<u64>>, StatsError> {
        let data = read_at(&self.file, u64::from(self.schema.data_offset), self.schema.data_len)?;
        self.schema.values(&data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as the kernel lays it out: header, id, descriptors, data.
    fn file(descriptors: &[(&str, u32, i16, u16, u32)], values: &[u64]) -> Vec<u8> {
        let name_size = 48u32;
        let id_offset = HEADER_LEN as u32;
        let desc_offset = id_offset + name_size;
        let data_offset = desc_offset + descriptors.len() as u32 * (16 + name_size);
        let mut bytes = Vec::new();
        for field in [0, name_size, descriptors.len() as u32, id_offset, desc_offset, data_offset] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        let mut id = b"kvm-1/vcpu-0".to_vec();
        id.resize(name_size as usize, 0);
        bytes.extend_from_slice(&id);
        for (name, flags, exponent, size, offset) in descriptors {
            bytes.extend_from_slice(&flags.to_le_bytes());
            bytes.extend_from_slice(&exponent.to_le_bytes());
            bytes.extend_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&offset.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            let mut name = name.as_bytes().to_vec();
            name.resize(name_size as usize, 0);
            bytes.extend_from_slice(&name);
        }
        for value in values {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn a_kernel_layout_parses_with_units_and_exponents() {
        let seconds = KVM_STATS_UNIT_SECONDS;
        let hist = KVM_STATS_TYPE_LOG_HIST;
        let bytes = file(
            &[("exits", 0, 0, 1, 0), ("halt_wait_ns", seconds, -9, 1, 8), ("halt_wait_hist", hist, 0, 2, 16)],
            &[7, 1_500_000_000, 3, 4],
        );
        let schema = Schema::parse(&bytes).unwrap();
        assert_eq!(schema.id, "kvm-1/vcpu-0");
        assert_eq!(schema.descriptors.len(), 3);
        let wait = &schema.descriptors[1];
        assert_eq!(
            (wait.name.as_str(), wait.unit, wait.base, wait.exponent),
            ("halt_wait_ns", StatUnit::Seconds, 10, -9)
        );
        assert_eq!(wait.scale(1_500_000_000.0), 1.5);
        assert_eq!(schema.descriptors[2].kind, StatKind::LogHistogram);
        assert_eq!(schema.data_len, 32);
        let data = &bytes[schema.data_offset as usize..];
        assert_eq!(schema.values(data).unwrap(), vec![vec![7], vec![1_500_000_000], vec![3, 4]]);
    }

    #[test]
    fn damaged_layouts_are_errors_that_say_where() {
        let good = file(&[("exits", 0, 0, 1, 0)], &[1]);
        let err = Schema::parse(&good[..30]).unwrap_err().to_string();
        assert!(err.contains("id string") && err.contains("byte 24"), "{err}");
        let mut bad_type = good.clone();
        bad_type[HEADER_LEN + 48] = 9;
        let err = Schema::parse(&bad_type).unwrap_err().to_string();
        assert!(err.contains("`exits` type") && err.contains("unknown type 9"), "{err}");
        let mut many = good.clone();
        many[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Schema::parse(&many).unwrap_err().to_string().contains("num_desc"));
        let schema = Schema::parse(&good).unwrap();
        let err = schema.values(&[0; 4]).unwrap_err().to_string();
        assert!(err.contains("values of `exits`") && err.contains("need 8 bytes"), "{err}");
    }
}
