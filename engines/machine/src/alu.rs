//! Integer arithmetic with the exact RFLAGS effects of the Intel SDM.
//!
//! Every function takes operands already truncated to `bytes` (1, 2, 4 or 8) and returns the
//! truncated result plus the status flags it defines. Flags the SDM leaves undefined get a fixed,
//! documented value so every run is identical: see `README.md` ("Undefined flags").

use crate::cpu::rflags::{AF, CF, OF, PF, SF, STATUS, ZF};

#[inline(always)]
pub fn mask(bytes: u32) -> u64 {
    u64::MAX >> (64 - bytes * 8)
}

#[inline(always)]
pub fn sign_bit(bytes: u32) -> u64 {
    1u64 << (bytes * 8 - 1)
}

#[inline(always)]
pub fn sign_extend(value: u64, bytes: u32) -> u64 {
    let shift = 64 - bytes * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// SF, ZF and PF of a truncated result.
#[inline(always)]
pub fn szp(result: u64, bytes: u32) -> u64 {
    let mut flags = 0;
    if result == 0 {
        flags |= ZF;
    }
    if result & sign_bit(bytes) != 0 {
        flags |= SF;
    }
    if (result as u8).count_ones() & 1 == 0 {
        flags |= PF;
    }
    flags
}

/// ADD and ADC (`carry` 0 or 1).
#[inline(always)]
pub fn add(a: u64, b: u64, carry: u64, bytes: u32) -> (u64, u64) {
    let m = mask(bytes);
    let wide = (a as u128) + (b as u128) + (carry as u128);
    let result = (wide as u64) & m;
    let mut flags = szp(result, bytes);
    if wide > m as u128 {
        flags |= CF;
    }
    if (a ^ result) & (b ^ result) & sign_bit(bytes) != 0 {
        flags |= OF;
    }
    if (a ^ b ^ result) & 0x10 != 0 {
        flags |= AF;
    }
    (result, flags)
}

/// SUB, SBB (`borrow` 0 or 1) and CMP.
#[inline(always)]
pub fn sub(a: u64, b: u64, borrow: u64, bytes: u32) -> (u64, u64) {
    let m = mask(bytes);
    let result = a.wrapping_sub(b).wrapping_sub(borrow) & m;
    let mut flags = szp(result, bytes);
    if (a as u128) < (b as u128) + (borrow as u128) {
        flags |= CF;
    }
    if (a ^ b) & (a ^ result) & sign_bit(bytes) != 0 {
        flags |= OF;
    }
    if (a ^ b ^ result) & 0x10 != 0 {
        flags |= AF;
    }
    (result, flags)
}

/// AND, OR, XOR, TEST: CF = OF = 0; AF is undefined and reads as 0.
#[inline(always)]
pub fn logic(result: u64, bytes: u32) -> u64 {
    szp(result, bytes)
}

/// Which flags an operation writes; the rest keep their old value.
pub const ALL_BUT_CF: u64 = STATUS & !CF;

/// SHL/SAL. Returns None when the masked count is 0 (nothing, flags included, changes).
pub fn shl(a: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    let result = if count >= 64 { 0 } else { (a << count) & mask(bytes) };
    let carry = if count <= bits { (a >> (bits - count)) & 1 } else { 0 };
    let mut flags = szp(result, bytes);
    if carry != 0 {
        flags |= CF;
    }
    // OF is defined for count 1 only; the same formula is used for larger counts.
    if ((result & sign_bit(bytes) != 0) as u64) ^ carry != 0 {
        flags |= OF;
    }
    Some((result, flags))
}

pub fn shr(a: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let result = if count >= 64 { 0 } else { a >> count };
    let carry = if count <= 64 { (a >> (count - 1)) & 1 } else { 0 };
    let mut flags = szp(result, bytes);
    if carry != 0 {
        flags |= CF;
    }
    if a & sign_bit(bytes) != 0 {
        flags |= OF;
    }
    Some((result, flags))
}

pub fn sar(a: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let signed = sign_extend(a, bytes) as i64;
    let result = (signed >> count.min(63)) as u64 & mask(bytes);
    let carry = ((signed >> (count - 1).min(63)) & 1) as u64;
    let mut flags = szp(result, bytes);
    if carry != 0 {
        flags |= CF;
    }
    Some((result, flags))
}

/// ROL: only CF and OF change. `count` is the masked count (before reduction modulo the width).
pub fn rol(a: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    let n = count % bits;
    let result = if n == 0 { a } else { ((a << n) | (a >> (bits - n))) & mask(bytes) };
    let carry = result & 1;
    let mut flags = 0;
    if carry != 0 {
        flags |= CF;
    }
    if ((result >> (bits - 1)) & 1) ^ carry != 0 {
        flags |= OF;
    }
    Some((result, flags))
}

pub fn ror(a: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    let n = count % bits;
    let result = if n == 0 { a } else { ((a >> n) | (a << (bits - n))) & mask(bytes) };
    let msb = (result >> (bits - 1)) & 1;
    let mut flags = 0;
    if msb != 0 {
        flags |= CF;
    }
    if msb ^ ((result >> (bits - 2)) & 1) != 0 {
        flags |= OF;
    }
    Some((result, flags))
}

/// RCL through CF. `carry_in` is the current CF. For 8 and 16 bits the count is reduced modulo 9 / 17.
pub fn rcl(a: u64, count: u32, carry_in: u64, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    let n = if bits < 32 { count % (bits + 1) } else { count };
    let mut value = a;
    let mut carry = carry_in;
    for _ in 0..n {
        let out = (value >> (bits - 1)) & 1;
        value = ((value << 1) | carry) & mask(bytes);
        carry = out;
    }
    let mut flags = 0;
    if carry != 0 {
        flags |= CF;
    }
    if ((value >> (bits - 1)) & 1) ^ carry != 0 {
        flags |= OF;
    }
    Some((value, flags))
}

pub fn rcr(a: u64, count: u32, carry_in: u64, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    let n = if bits < 32 { count % (bits + 1) } else { count };
    let mut value = a;
    let mut carry = carry_in;
    for _ in 0..n {
        let out = value & 1;
        value = (value >> 1) | (carry << (bits - 1));
        carry = out;
    }
    let mut flags = 0;
    if carry != 0 {
        flags |= CF;
    }
    if ((value >> (bits - 1)) ^ (value >> (bits - 2))) & 1 != 0 {
        flags |= OF;
    }
    Some((value, flags))
}

/// SHLD: shifts `dest` left, filling from the top of `src`. `count` already masked (5 or 6 bits).
pub fn shld(dest: u64, src: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    let pattern = double_shift_pattern(dest, src, bits);
    let shifted = pattern << count;
    let result = ((shifted >> (pattern_bits(bits) - bits)) as u64) & mask(bytes);
    let carry = ((pattern >> (pattern_bits(bits) - count)) & 1) as u64;
    let mut flags = szp(result, bytes);
    if carry != 0 {
        flags |= CF;
    }
    if ((result ^ dest) & sign_bit(bytes)) != 0 {
        flags |= OF;
    }
    Some((result, flags))
}

/// Width of the bit pattern SHLD/SHRD shift: dest:src, or dest:src:dest for 16-bit operands,
/// whose counts above 16 are undefined (the pattern QEMU and Bochs use).
fn pattern_bits(bits: u32) -> u32 {
    if bits == 16 {
        48
    } else {
        2 * bits
    }
}

/// The SHLD pattern (dest in the high bits) for shifting left.
fn double_shift_pattern(dest: u64, src: u64, bits: u32) -> u128 {
    let pair = ((dest as u128) << bits) | src as u128;
    if bits == 16 {
        (pair << 16) | dest as u128
    } else {
        pair
    }
}

/// SHRD: shifts `dest` right, filling from the bottom of `src`.
pub fn shrd(dest: u64, src: u64, count: u32, bytes: u32) -> Option<(u64, u64)> {
    if count == 0 {
        return None;
    }
    let bits = bytes * 8;
    // src:dest with dest in the low bits (dest:src:dest for 16-bit operands, as for SHLD).
    let mut pattern = ((src as u128) << bits) | dest as u128;
    if bits == 16 {
        pattern |= (dest as u128) << 32;
    }
    let result = ((pattern >> count) as u64) & mask(bytes);
    let carry = ((pattern >> (count - 1)) & 1) as u64;
    let mut flags = szp(result, bytes);
    if carry != 0 {
        flags |= CF;
    }
    if ((result ^ dest) & sign_bit(bytes)) != 0 {
        flags |= OF;
    }
    Some((result, flags))
}

/// Flags for MUL: CF = OF = (upper half != 0); SF, ZF, PF (undefined) follow the lower half; AF = 0.
pub fn mul_flags(low: u64, high_nonzero: bool, bytes: u32) -> u64 {
    let mut flags = szp(low, bytes);
    if high_nonzero {
        flags |= CF | OF;
    }
    flags
}

/// Conditions of Jcc/SETcc/CMOVcc, by the low nibble of their opcode.
#[inline(always)]
pub fn condition(cc: u32, flags: u64) -> bool {
    let cf = flags & CF != 0;
    let zf = flags & ZF != 0;
    let sf = flags & SF != 0;
    let of = flags & OF != 0;
    let pf = flags & PF != 0;
    let holds = match cc >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || (sf != of),
    };
    holds ^ (cc & 1 != 0)
}
