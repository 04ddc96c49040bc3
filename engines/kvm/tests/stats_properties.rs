//! The statistics parser on untrusted bytes: anything in, a schema or an error out, never a panic; and a
//! well-formed layout, however its fields are laid out, reads back what was written.

use proptest::prelude::*;
use virtlab_kvm::stats::{Header, Schema, StatKind, HEADER_LEN};

/// Header, id, descriptors (unit, type and base from the given flags), then the values, at the given offsets.
fn layout(name_size: u32, gap: u32, stats: &[(u32, i16, Vec<u64>)]) -> (Vec<u8>, u32) {
    let id_offset = HEADER_LEN as u32 + gap;
    let desc_offset = id_offset + name_size + gap;
    let stride = 16 + name_size;
    let data_offset = desc_offset + stats.len() as u32 * stride + gap;
    let mut bytes = Vec::new();
    for field in [0, name_size, stats.len() as u32, id_offset, desc_offset, data_offset] {
        bytes.extend_from_slice(&field.to_le_bytes());
    }
    bytes.resize(id_offset as usize, 0xAA);
    bytes.extend_from_slice(b"vm");
    bytes.resize((id_offset + name_size) as usize, 0);
    bytes.resize(desc_offset as usize, 0xAA);
    let mut offset = 0u32;
    for (index, (flags, exponent, values)) in stats.iter().enumerate() {
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&exponent.to_le_bytes());
        bytes.extend_from_slice(&(values.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let start = bytes.len();
        bytes.extend_from_slice(format!("s{index}").as_bytes());
        bytes.resize(start + name_size as usize, 0);
        offset += 8 * values.len() as u32;
    }
    bytes.resize(data_offset as usize, 0xAA);
    for (_, _, values) in stats {
        for value in values {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
    }
    (bytes, data_offset)
}

/// Valid flags: type 0–4, unit 0–4 (in the high nibble), base 10 or 2.
fn flags() -> impl Strategy<Value = u32> {
    (0u32..=4, 0u32..=4, 0u32..=1).prop_map(|(kind, unit, base)| kind | unit << 4 | base << 8)
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(schema) = Schema::parse(&bytes) {
            let _ = schema.values(&bytes);
        }
        let _ = Header::parse(&bytes);
    }

    #[test]
    fn damaged_well_formed_layouts_never_panic(
        stats in proptest::collection::vec((flags(), any::<i16>(), proptest::collection::vec(any::<u64>(), 1..4)), 0..6),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let (mut bytes, _) = layout(24, 0, &stats);
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(schema) = Schema::parse(&bytes) {
            let _ = schema.values(&bytes);
        }
    }

    #[test]
    fn well_formed_layouts_read_back(
        name_size in 8u32..64,
        gap in 0u32..16,
        stats in proptest::collection::vec((flags(), any::<i16>(), proptest::collection::vec(any::<u64>(), 1..4)), 0..6),
    ) {
        let (bytes, data_offset) = layout(name_size, gap, &stats);
        let schema = Schema::parse(&bytes).unwrap();
        prop_assert_eq!(schema.id.as_str(), "vm");
        prop_assert_eq!(schema.descriptors.len(), stats.len());
        prop_assert_eq!(schema.data_offset, data_offset);
        let values = schema.values(&bytes[data_offset as usize..]).unwrap();
        for (index, (flags, exponent, written)) in stats.iter().enumerate() {
            let descriptor = &schema.descriptors[index];
            prop_assert_eq!(&descriptor.name, &format!("s{index}"));
            prop_assert_eq!(descriptor.exponent, *exponent);
            prop_assert_eq!(descriptor.base, if flags & 0x100 != 0 { 2 } else { 10 });
            prop_assert_eq!(descriptor.kind == StatKind::Cumulative, flags & 0xf == 0);
            prop_assert_eq!(&values[index], written);
        }
    }
}
