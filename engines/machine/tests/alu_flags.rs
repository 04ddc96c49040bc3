//! Flag tables for the arithmetic core, expected values worked out from the Intel SDM definitions
//! (Vol. 1 appendix A, Vol. 2 instruction pages). Flag bits: CF 0x1, PF 0x4, AF 0x10, ZF 0x40,
//! SF 0x80, OF 0x800.

use virtlab_machine::flags::*;

const C: u64 = 0x1;
const P: u64 = 0x4;
const A: u64 = 0x10;
const Z: u64 = 0x40;
const S: u64 = 0x80;
const O: u64 = 0x800;

#[test]
fn add_and_adc() {
    // (a, b, carry in, bytes, result, flags)
    let table: &[(u64, u64, u64, u32, u64, u64)] = &[
        (0xFF, 0x01, 0, 1, 0x00, C | P | A | Z),
        (0x7F, 0x01, 0, 1, 0x80, O | S | A),
        (0x0F, 0x01, 0, 1, 0x10, A),
        (0x01, 0x02, 0, 1, 0x03, P),
        (0x80, 0x80, 0, 1, 0x00, C | O | Z | P),
        (0xFFFF, 0x0001, 0, 2, 0x0000, C | P | A | Z),
        (0x7FFF_FFFF, 1, 0, 4, 0x8000_0000, O | S | A | P),
        (0xFFFF_FFFF, 1, 0, 4, 0, C | P | A | Z),
        (0x8000_0000_0000_0000, 0x8000_0000_0000_0000, 0, 8, 0, C | O | Z | P),
        (0xFF, 0x00, 1, 1, 0x00, C | P | A | Z),
        (0x7F, 0x00, 1, 1, 0x80, O | S | A),
        (0xFE, 0x01, 1, 1, 0x00, C | P | A | Z),
    ];
    for &(a, b, carry, bytes, result, flags) in table {
        assert_eq!(add(a, b, carry, bytes), (result, flags), "add {a:#x} + {b:#x} + {carry} ({bytes} bytes)");
    }
}

#[test]
fn sub_sbb_cmp_neg() {
    let table: &[(u64, u64, u64, u32, u64, u64)] = &[
        (0x00, 0x01, 0, 1, 0xFF, C | S | A | P),
        (0x80, 0x01, 0, 1, 0x7F, O | A),
        (0x05, 0x05, 0, 1, 0x00, Z | P),
        (0x10, 0x01, 0, 1, 0x0F, A | P),
        (0x7F, 0xFF, 0, 1, 0x80, C | O | S),
        (0x0000, 0x0001, 0, 2, 0xFFFF, C | S | A | P),
        (0x8000_0000, 1, 0, 4, 0x7FFF_FFFF, O | A | P),
        (0, 1, 0, 8, u64::MAX, C | S | A | P),
        (0x00, 0x00, 1, 1, 0xFF, C | S | A | P),
        (0x01, 0x00, 1, 1, 0x00, Z | P),
        (0x80, 0x7F, 1, 1, 0x00, O | Z | P | A),
    ];
    for &(a, b, borrow, bytes, result, flags) in table {
        assert_eq!(sub(a, b, borrow, bytes), (result, flags), "sub {a:#x} - {b:#x} - {borrow} ({bytes} bytes)");
    }
    // NEG is 0 - x with CF = (x != 0).
    assert_eq!(sub(0, 0x00, 0, 1), (0x00, Z | P));
    assert_eq!(sub(0, 0x80, 0, 1), (0x80, C | O | S));
    assert_eq!(sub(0, 0x01, 0, 1), (0xFF, C | S | A | P));
}

#[test]
fn logic_flags() {
    assert_eq!(logic(0xF0 & 0x0F, 1), Z | P);
    assert_eq!(logic(0x80 | 0x01, 1), S | P);
    assert_eq!(logic(0xFF ^ 0x0F, 1), S | P);
    assert_eq!(logic(0x01, 1), 0);
    assert_eq!(logic(0x8000_0000_0000_0000, 8), S | P);
    assert_eq!(logic(0x0100, 2), P);
}

#[test]
fn shifts() {
    // (value, count, bytes) -> (result, flags)
    assert_eq!(shl(0x81, 1, 1), Some((0x02, C | O)));
    assert_eq!(shl(0x40, 1, 1), Some((0x80, O | S)));
    // OF is undefined for counts above 1; the model applies the count-1 formula (MSB ^ CF).
    assert_eq!(shl(0x01, 8, 1), Some((0x00, C | O | Z | P)));
    assert_eq!(shl(0x01, 9, 1), Some((0x00, Z | P)));
    assert_eq!(shl(0x1234, 0, 2), None);
    assert_eq!(shl(1, 63, 8), Some((1 << 63, S | O | P)));
    assert_eq!(shr(0x81, 1, 1), Some((0x40, C | O)));
    assert_eq!(shr(0x02, 1, 1), Some((0x01, 0)));
    assert_eq!(shr(0x8000_0000, 31, 4), Some((1, O)));
    assert_eq!(shr(0x8000_0000, 32 - 1, 4).unwrap().0, 1);
    assert_eq!(sar(0x81, 1, 1), Some((0xC0, C | S | P)));
    assert_eq!(sar(0x80, 7, 1), Some((0xFF, S | P)));
    assert_eq!(sar(0x80, 8, 1), Some((0xFF, C | S | P)));
    assert_eq!(sar(0x7F, 1, 1), Some((0x3F, C | P)));
}

#[test]
fn rotates() {
    assert_eq!(rol(0x81, 1, 1), Some((0x03, C | O)));
    assert_eq!(rol(0x40, 1, 1), Some((0x80, O)));
    assert_eq!(rol(0x81, 8, 1), Some((0x81, C)));
    assert_eq!(ror(0x81, 1, 1), Some((0xC0, C)));
    assert_eq!(ror(0x01, 1, 1), Some((0x80, C | O)));
    assert_eq!(ror(0x02, 1, 1), Some((0x01, 0)));
    assert_eq!(rcl(0x80, 1, 0, 1), Some((0x00, C | O)));
    assert_eq!(rcl(0x40, 1, 1, 1), Some((0x81, O)));
    assert_eq!(rcl(0x01, 9, 0, 1), Some((0x01, 0)));
    assert_eq!(rcr(0x01, 1, 1, 1), Some((0x80, C | O)));
    assert_eq!(rcr(0x02, 1, 0, 1), Some((0x01, 0)));
    assert_eq!(rcl(1 << 63, 1, 0, 8), Some((0, C | O)));
    assert_eq!(rol(0x1234, 0, 2), None);
}

#[test]
fn double_shifts() {
    assert_eq!(shld(0x8000, 0xFFFF, 4, 2), Some((0x000F, O | P)));
    assert_eq!(shld(0x1000_0000, 0x8000_0000, 4, 4), Some((0x0000_0008, C)));
    assert_eq!(shrd(0x1, 0x0, 1, 4), Some((0, C | Z | P)));
    assert_eq!(shrd(0x0, 0x1, 1, 4), Some((0x8000_0000, O | S | P)));
    assert_eq!(shrd(0x1234_5678, 0xABCD, 16, 4), Some((0xABCD_1234, S | O)));
    assert_eq!(shld(0x8000_0000_0000_0001, 0xF000_0000_0000_0000, 4, 8), Some((0x1F, O)));
    assert_eq!(shrd(0x8000_0000_0000_0001, 0xF, 63, 8), Some((0x1F, O)));
    assert_eq!(shrd(0x0000_0000_0000_0003, 0x1, 1, 8), Some((0x8000_0000_0000_0001, C | O | S)));
    // 16-bit counts above 16 shift through dest:src:dest.
    assert_eq!(shld(0x1234, 0xABCD, 20, 2), Some((0xBCD1, O | S | P)));
}

#[test]
fn multiply_flags() {
    assert_eq!(mul_flags(0x00, true, 1), C | O | Z | P);
    assert_eq!(mul_flags(0x06, false, 1), P);
}

#[test]
fn conditions() {
    // Jcc condition numbers 0..=15 against a few flag states.
    let holds = |cc: u32, flags: u64| condition(cc, flags);
    assert!(holds(0, O) && !holds(1, O));
    assert!(holds(2, C) && holds(6, C) && !holds(7, C));
    assert!(holds(4, Z) && holds(14, Z) && !holds(15, Z));
    assert!(holds(8, S) && holds(12, S) && !holds(12, S | O));
    assert!(holds(13, S | O) && holds(15, 0) && holds(10, P) && holds(11, 0));
}
