//! One's complement checksum arithmetic (RFC 1071, RFC 1624). Values are 16-bit
//! words as they sit in memory: one's complement sums do not depend on byte
//! order, so packet fields never need swapping.

/// Folds a 32-bit one's complement sum to 16 bits. Two rounds fold any `u32`:
/// the first leaves at most 0x1fffe, the second at most 0xffff.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 incremental update `HC' = ~(~HC + ~m + m')` (equation 3) of checksum
/// `check` for a 32-bit field changing from `from` to `to`. This is the kernel's
/// `csum_replace4`, so the result is what `bpf_l3_csum_replace` /
/// `bpf_l4_csum_replace` write on a packet without checksum offload. It never
/// returns 0xffff (-0) for a non-trivial update, unlike equation 2.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(from as u16))
        + u32::from(!((from >> 16) as u16))
        + u32::from(to as u16)
        + u32::from((to >> 16) as u16);
    !fold(sum)
}

/// RFC 1624 incremental update for a 16-bit field changing from `from` to `to`
/// (the kernel's `csum_replace2`).
#[inline(always)]
pub fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!from) + u32::from(to);
    !fold(sum)
}

/// The one's complement sum of `bytes` as big-endian 16-bit words (an odd last
/// byte is padded with zero), added to `init`, not yet folded. Sums up to 2^48
/// bytes cannot overflow.
pub fn sum_be_words(bytes: &[u8], init: u64) -> u64 {
    let mut sum = init;
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds a 64-bit one's complement sum to 16 bits.
pub fn fold64(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 1624 section 4 (as numbers, i.e. big-endian words):
    /// sum of the other words 0xCD7A, field m = 0x5555 becomes 0x3285.
    #[test]
    fn rfc1624_example_gives_plus_zero() {
        let check = !fold(0xcd7a + 0x5555);
        assert_eq!(check, 0xdd2f);
        // Recomputed from scratch: ~(0xCD7A + 0x3285) = ~0xFFFF = 0x0000.
        assert_eq!(!fold(0xcd7a + 0x3285), 0x0000);
        // Equation 3 gives the same; equation 2 (HC + m + ~m') would give 0xFFFF.
        assert_eq!(csum_replace2(check, 0x5555, 0x3285), 0x0000);
        assert_eq!(
            fold(u32::from(check) + 0x5555 + u32::from(!0x3285u16)),
            0xffff
        );
    }

    /// The 32-bit form agrees with two 16-bit updates and with recomputation.
    #[test]
    fn replace4_matches_recomputation() {
        let words: [u16; 4] = [0x4500, 0x0054, 0xc0a8, 0x0001];
        let sum = |w: &[u16]| !fold64(w.iter().map(|&x| u64::from(x)).sum());
        let check = sum(&words);
        let new = [0x4500, 0x0054, 0x0a00, 0x0002];
        let from = u32::from(words[2]) | u32::from(words[3]) << 16;
        let to = u32::from(new[2]) | u32::from(new[3]) << 16;
        let inc = csum_replace4(check, from, to);
        assert_eq!(inc, sum(&new));
        assert_eq!(
            inc,
            csum_replace2(csum_replace2(check, words[2], new[2]), words[3], new[3])
        );
    }

    /// Edge values: the field is all ones or all zeros, the checksum is 0xffff
    /// or 0x0000 (both encode zero in one's complement).
    #[test]
    fn edge_values() {
        // Nothing changes: the checksum keeps its value, except that -0 (0xffff)
        // can only come out as +0 when every term is zero.
        assert_eq!(csum_replace4(0x1234, 0xdead_beef, 0xdead_beef), 0x1234);
        assert_eq!(csum_replace2(0x0000, 0xffff, 0xffff), 0x0000);
        // 0xffff and 0x0000 are the same number: replacing one by the other
        // leaves a valid checksum valid (sum unchanged modulo 0xffff).
        assert_eq!(csum_replace2(0x1234, 0xffff, 0x0000), 0x1234);
        assert_eq!(csum_replace2(0x1234, 0x0000, 0xffff), 0x1234);
        // A checksum of 0xffff (all other words sum to zero) updated for 0 -> 1.
        assert_eq!(csum_replace2(0xffff, 0x0000, 0x0001), 0xfffe);
        // All-zero terms: ~fold(0) = 0xffff, the one case that yields -0.
        assert_eq!(csum_replace4(0xffff, 0xffff_ffff, 0), 0xffff);
        // Full-scale carries fold correctly.
        assert_eq!(fold(0xffff_ffff), 0xffff);
        assert_eq!(fold(0x0001_ffff), 0x0001);
        assert_eq!(fold64(0xffff_ffff_ffff), 0xffff);
        for check in [0x0000u16, 0x0001, 0x7fff, 0xfffe, 0xffff] {
            for (from, to) in [(0u16, 0xffffu16), (0xffff, 0), (0x8000, 0x7fff), (1, 0)] {
                let out = csum_replace2(check, from, to);
                // Modulo 0xffff, out = check + from - to.
                let lhs = (u32::from(out) + u32::from(to)) % 0xffff;
                let rhs = (u32::from(check) + u32::from(from)) % 0xffff;
                assert_eq!(lhs, rhs, "check {check:#x} {from:#x} -> {to:#x}");
            }
        }
    }

    #[test]
    fn sum_pads_an_odd_byte() {
        assert_eq!(sum_be_words(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
        assert_eq!(sum_be_words(&[], 7), 7);
    }
}
