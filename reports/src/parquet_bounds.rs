//! What a Parquet file may make its reader allocate, checked before polars reads it.
//!
//! Polars' Parquet decoder sizes its buffers from the file's own numbers: row and value counts, page and column
//! sizes, offsets. A damaged number made it ask for 2,305,843,009,213,693,896 bytes, and a failed allocation aborts
//! the process: no error, no file named. So before polars sees a results file, this walks its metadata (the
//! footer's Thrift, compact protocol) and the header of every page it points to, and refuses a file in which a
//! length runs past the bytes there are, or a count, size or offset exceeds what a file of its length and row
//! count can hold. The walk itself allocates nothing that grows with the file.

/// Bytes one row may account for, uncompressed, in any column of a results file, however generous: rows are
/// numbers and short strings (a disassembled instruction, a function name).
const BYTES_PER_ROW: u64 = 4096;
/// How much larger than the whole file its uncompressed pages may be.
const EXPANSION: u64 = 64;
/// Nesting deeper than Parquet's metadata ever goes.
const MAX_DEPTH: u32 = 32;

/// Thrift compact protocol types.
const BOOL_TRUE: u8 = 1;
const BOOL_FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;

/// Field ids, as paths from the file metadata: row_groups (4) → columns (1) → meta_data (3) → the field.
const COLUMN_META: [i16; 3] = [4, 1, 3];
const TOTAL_COMPRESSED_SIZE: i16 = 7;
const DATA_PAGE_OFFSET: i16 = 9;
const DICTIONARY_PAGE_OFFSET: i16 = 11;
/// In a page header: the page's stored size, and its checksum (any 32-bit value).
const COMPRESSED_PAGE_SIZE: i16 = 3;
const PAGE_CRC: i16 = 4;

/// Checks the Parquet file `bytes`, said to hold `rows` rows; the error says what is wrong, for a message that
/// names the file.
pub(crate) fn check(bytes: &[u8], rows: u64) -> Result<(), String> {
    let len = bytes.len();
    if len < 12 || !bytes.starts_with(b"PAR1") || !bytes.ends_with(b"PAR1") {
        return Err("not a Parquet file (no PAR1 at both ends)".into());
    }
    let footer_len = u32::from_le_bytes([bytes[len - 8], bytes[len - 7], bytes[len - 6], bytes[len - 5]]) as usize;
    let footer_start = (len - 8)
        .checked_sub(footer_len)
        .filter(|&start| start >= 4)
        .ok_or_else(|| format!("its footer length {footer_len} runs past the start of the file ({len} bytes)"))?;
    let limit = (len as u64)
        .saturating_mul(EXPANSION)
        .saturating_add(rows.saturating_mul(BYTES_PER_ROW))
        .saturating_add(1 << 20);

    let mut columns = ColumnChunks { limit, current: ColumnChunk::default(), found: Vec::new() };
    Walker::new(bytes, footer_start, len - 8).walk_struct(&mut Vec::new(), &mut columns)?;
    for chunk in &columns.found {
        check_pages(bytes, chunk, footer_start, limit)?;
    }
    Ok(())
}

/// Where one column chunk's pages are, from its metadata.
#[derive(Debug, Default, Clone, Copy)]
struct ColumnChunk {
    compressed: Option<u64>,
    data_page: Option<u64>,
    dictionary_page: Option<u64>,
}

/// What the metadata walk keeps: the bound every number must keep, and the column chunks.
struct ColumnChunks {
    limit: u64,
    current: ColumnChunk,
    found: Vec<ColumnChunk>,
}

impl Fields for ColumnChunks {
    fn int(&mut self, path: &[i16], value: i64) -> Result<(), String> {
        let value = bounded(|| "the footer".into(), path, value, self.limit)?;
        if let Some((&field, parent)) = path.split_last() {
            if parent == COLUMN_META {
                match field {
                    TOTAL_COMPRESSED_SIZE => self.current.compressed = Some(value),
                    DATA_PAGE_OFFSET => self.current.data_page = Some(value),
                    DICTIONARY_PAGE_OFFSET => self.current.dictionary_page = Some(value),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn struct_end(&mut self, path: &[i16]) {
        if path == COLUMN_META {
            self.found.push(std::mem::take(&mut self.current));
        }
    }
}

/// A count, size or offset within `[0, limit]`; the error names the field by its path of Thrift field ids.
fn bounded(place: impl FnOnce() -> String, path: &[i16], value: i64, limit: u64) -> Result<u64, String> {
    u64::try_from(value).ok().filter(|&v| v <= limit).ok_or_else(|| {
        let path: Vec<String> = path.iter().map(i16::to_string).collect();
        format!(
            "{}'s field {} holds {value}, where a file of its size and row count needs a number from 0 to {limit}",
            place(),
            path.join(".")
        )
    })
}

/// Walks the page headers of one column chunk: each must lie in the chunk, its numbers in bounds.
fn check_pages(bytes: &[u8], chunk: &ColumnChunk, footer_start: usize, limit: u64) -> Result<(), String> {
    let (Some(compressed), Some(data_page)) = (chunk.compressed, chunk.data_page) else {
        return Err("a column chunk without its size or data page offset".into());
    };
    let start = match chunk.dictionary_page {
        Some(dictionary) if dictionary > 0 => dictionary.min(data_page),
        _ => data_page,
    };
    let end =
        start.checked_add(compressed).filter(|&end| start >= 4 && end <= footer_start as u64).ok_or_else(|| {
            format!("a column chunk at {start} of {compressed} bytes does not lie between the header and the footer")
        })?;
    let (mut at, end) = (start as usize, end as usize);
    while at < end {
        let mut page = PageHeader { at, limit, compressed: None };
        let mut walker = Walker::new(bytes, at, end);
        walker.walk_struct(&mut Vec::new(), &mut page)?;
        let size = page.compressed.ok_or_else(|| format!("the page header at {at} gives no page size"))?;
        at =
            walker.pos.checked_add(size as usize).filter(|&next| next <= end).ok_or_else(|| {
                format!("the page at {at} ({size} bytes) runs past the end of its column chunk at {end}")
            })?;
    }
    Ok(())
}

struct PageHeader {
    at: usize,
    limit: u64,
    compressed: Option<u64>,
}

impl Fields for PageHeader {
    fn int(&mut self, path: &[i16], value: i64) -> Result<(), String> {
        if path == [PAGE_CRC] {
            return Ok(());
        }
        let value = bounded(|| format!("the page header at byte {}", self.at), path, value, self.limit)?;
        if path == [COMPRESSED_PAGE_SIZE] {
            self.compressed = Some(value);
        }
        Ok(())
    }

    fn struct_end(&mut self, _: &[i16]) {}
}

/// What a walk reports: every integer field with its path of field ids (list elements keep their list's path),
/// and the end of every struct.
trait Fields {
    fn int(&mut self, path: &[i16], value: i64) -> Result<(), String>;
    fn struct_end(&mut self, path: &[i16]);
}

/// A reader of Thrift's compact protocol over `bytes[pos..end]` that checks every length against what remains.
struct Walker<'b> {
    bytes: &'b [u8],
    pos: usize,
    end: usize,
    depth: u32,
}

impl<'b> Walker<'b> {
    fn new(bytes: &'b [u8], pos: usize, end: usize) -> Walker<'b> {
        Walker { bytes, pos, end, depth: 0 }
    }

    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    fn byte(&mut self) -> Result<u8, String> {
        if self.pos >= self.end {
            return Err(format!("its metadata ends inside a field at byte {}", self.pos));
        }
        self.pos += 1;
        Ok(self.bytes[self.pos - 1])
    }

    fn skip(&mut self, count: u64) -> Result<(), String> {
        if count > self.remaining() as u64 {
            return Err(format!("a length of {count} at byte {} runs past its metadata", self.pos));
        }
        self.pos += count as usize;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("a number longer than 64 bits at byte {}", self.pos))
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let raw = self.varint()?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A count of elements, each at least one byte long, that must fit in what remains.
    fn count(&mut self, count: u64) -> Result<u64, String> {
        if count > self.remaining() as u64 {
            return Err(format!("a count of {count} elements at byte {} runs past its metadata", self.pos));
        }
        Ok(count)
    }

    fn walk_struct(&mut self, path: &mut Vec<i16>, fields: &mut dyn Fields) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("its metadata nests deeper than {MAX_DEPTH} at byte {}", self.pos));
        }
        let mut last = 0i16;
        loop {
            let header = self.byte()?;
            if header == 0 {
                break;
            }
            let delta = header >> 4;
            let id = if delta == 0 {
                i16::try_from(self.zigzag()?).map_err(|_| format!("a field id out of range at byte {}", self.pos))?
            } else {
                last.checked_add(i16::from(delta))
                    .ok_or_else(|| format!("a field id out of range at byte {}", self.pos))?
            };
            last = id;
            path.push(id);
            self.value(header & 0x0f, path, fields)?;
            path.pop();
        }
        fields.struct_end(path);
        self.depth -= 1;
        Ok(())
    }

    fn value(&mut self, kind: u8, path: &mut Vec<i16>, fields: &mut dyn Fields) -> Result<(), String> {
        match kind {
            // A struct field's boolean is its type; a list's or map's takes a byte, read by `element`.
            BOOL_TRUE | BOOL_FALSE => Ok(()),
            BYTE => self.skip(1),
            I16 | I32 | I64 => {
                let value = self.zigzag()?;
                fields.int(path, value)
            }
            DOUBLE => self.skip(8),
            BINARY => {
                let len = self.varint()?;
                self.skip(len)
            }
            LIST | SET => {
                let header = self.byte()?;
                let size = match header >> 4 {
                    15 => self.varint()?,
                    short => u64::from(short),
                };
                for _ in 0..self.count(size)? {
                    self.element(header & 0x0f, path, fields)?;
                }
                Ok(())
            }
            MAP => {
                let size = self.varint()?;
                if size == 0 {
                    return Ok(());
                }
                let types = self.byte()?;
                for _ in 0..self.count(size)? {
                    self.element(types >> 4, path, fields)?;
                    self.element(types & 0x0f, path, fields)?;
                }
                Ok(())
            }
            STRUCT => self.walk_struct(path, fields),
            other => Err(format!("an unknown Thrift type {other} at byte {}", self.pos)),
        }
    }

    fn element(&mut self, kind: u8, path: &mut Vec<i16>, fields: &mut dyn Fields) -> Result<(), String> {
        match kind {
            BOOL_TRUE | BOOL_FALSE => self.skip(1),
            _ => self.value(kind, path, fields),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    /// A Parquet file as `virtlab sweep` writes one: polars' writer, defaults, a string and a number column.
    fn polars_file(rows: usize) -> Vec<u8> {
        let names: Vec<String> = (0..rows).map(|i| format!("engine-{}", i % 7)).collect();
        let values: Vec<f64> = (0..rows).map(|i| i as f64 * 1.5).collect();
        let mut frame =
            DataFrame::new(rows, vec![Column::new("key".into(), names), Column::new("value".into(), values)]).unwrap();
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes).finish(&mut frame).unwrap();
        bytes
    }

    /// A file whose footer is `metadata`, its pages none.
    fn with_footer(metadata: &[u8]) -> Vec<u8> {
        let mut bytes = b"PAR1".to_vec();
        bytes.extend_from_slice(metadata);
        bytes.extend_from_slice(&(metadata.len() as u32).to_le_bytes());
        bytes.extend_from_slice(b"PAR1");
        bytes
    }

    fn zigzag(value: i64) -> Vec<u8> {
        varint(((value << 1) ^ (value >> 63)) as u64)
    }

    fn varint(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn files_polars_writes_pass_with_their_row_count() {
        for rows in [1, 100, 50_000] {
            let bytes = polars_file(rows);
            assert_eq!(check(&bytes, rows as u64), Ok(()), "{rows} rows");
            let frame = ParquetReader::new(std::io::Cursor::new(bytes)).finish().unwrap();
            assert_eq!(frame.height(), rows);
        }
    }

    #[test]
    fn a_count_no_file_of_this_size_needs_is_refused_by_its_field() {
        // FileMetaData { version (1): 1, num_rows (3): 2^61 }
        let mut metadata = vec![0x15];
        metadata.extend(zigzag(1));
        metadata.push(0x26);
        metadata.extend(zigzag(1 << 61));
        metadata.push(0);
        let problem = check(&with_footer(&metadata), 10).unwrap_err();
        assert!(problem.starts_with("the footer's field 3 holds 2305843009213693952"), "{problem}");
        // A negative size is refused too: a reader would take it for an unsigned one.
        let mut negative = vec![0x26];
        negative.extend(zigzag(-1));
        negative.push(0);
        assert!(check(&with_footer(&negative), 10).unwrap_err().contains("holds -1"));
    }

    #[test]
    fn lengths_and_counts_past_the_metadata_are_refused() {
        // created_by (6): a string of a million bytes, in a footer of a few.
        let mut binary = vec![0x68];
        binary.extend(varint(1 << 20));
        assert!(check(&with_footer(&binary), 10).unwrap_err().contains("a length of 1048576"));
        // schema (2): a list of a billion structs.
        let mut list = vec![0x29, 0xFC];
        list.extend(varint(1 << 30));
        assert!(check(&with_footer(&list), 10).unwrap_err().contains("a count of 1073741824 elements"));
        // A footer length past the start of the file.
        let mut bytes = with_footer(&[0]);
        let at = bytes.len() - 8;
        bytes[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(check(&bytes, 10).unwrap_err().contains("footer length 1000"));
    }

    #[test]
    fn nesting_without_end_is_refused() {
        // Field 1 a struct, holding field 1 a struct, …: deeper than any Parquet metadata.
        let metadata = vec![0x1C; 100];
        assert!(check(&with_footer(&metadata), 10).unwrap_err().contains("nests deeper than 32"));
    }

    /// A file of one column chunk holding one page of `data` bytes whose header says it stores `stored` bytes:
    /// PAR1, the page, then FileMetaData { row_groups (4): [ { columns (1): [ { meta_data (3): {
    /// total_compressed_size (7), data_page_offset (9): 4 } } ] } ] }.
    fn one_page(data: usize, stored: i64) -> Vec<u8> {
        let mut page = vec![0x15];
        page.extend(zigzag(0));
        page.push(0x15);
        page.extend(zigzag(data as i64));
        page.push(0x15);
        page.extend(zigzag(stored));
        page.push(0);
        let chunk_len = (page.len() + data) as i64;
        page.resize(page.len() + data, 0xAB);
        let mut metadata = vec![0x49, 0x1C, 0x19, 0x1C, 0x3C, 0x76];
        metadata.extend(zigzag(chunk_len));
        metadata.push(0x26);
        metadata.extend(zigzag(4));
        metadata.extend([0, 0, 0, 0]);
        let mut bytes = b"PAR1".to_vec();
        bytes.extend(page);
        bytes.extend(&metadata);
        bytes.extend((metadata.len() as u32).to_le_bytes());
        bytes.extend(b"PAR1");
        bytes
    }

    #[test]
    fn every_page_must_lie_in_its_column_chunk() {
        assert_eq!(check(&one_page(5, 5), 1), Ok(()));
        let problem = check(&one_page(5, 1000), 1).unwrap_err();
        assert!(problem.contains("the page at 4 (1000 bytes) runs past the end of its column chunk"), "{problem}");
        // The chunk's pages walked from a polars file: one chunk per column.
        let bytes = polars_file(1000);
        let footer_len = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
        let mut chunks = ColumnChunks { limit: u64::MAX, current: ColumnChunk::default(), found: Vec::new() };
        let footer = bytes.len() - 8 - footer_len;
        Walker::new(&bytes, footer, bytes.len() - 8).walk_struct(&mut Vec::new(), &mut chunks).unwrap();
        assert_eq!(chunks.found.len(), 2);
        assert!(chunks.found.iter().all(|c| c.compressed.is_some() && c.data_page.is_some()));
    }
}
