//! Internet checksums (RFC 1071) for headers the program builds or rewrites itself. The L4
//! checksum of a rewritten packet is left to the kernel helpers (see `nat.rs`), which know
//! the skb's checksum state.

/// One's-complement sum of `bytes` as big-endian 16-bit words (`N` is even), added to `sum`.
#[inline(always)]
pub fn add<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a 32-bit sum to 16 bits and complements it: the value to put in the field.
#[inline(always)]
pub fn finish(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv4 header checksum of a 20-byte header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    finish(add(0, hdr))
}

/// The IPv4 header checksum after a 4-byte field changes from `old` to `new`, updated
/// incrementally (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn ipv4_update(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let mut sum = !u16::from_be_bytes(check) as u32;
    sum += !u16::from_be_bytes([old[0], old[1]]) as u32;
    sum += !u16::from_be_bytes([old[2], old[3]]) as u32;
    sum += u16::from_be_bytes([new[0], new[1]]) as u32;
    sum += u16::from_be_bytes([new[2], new[3]]) as u32;
    finish(sum).to_be_bytes()
}

/// The part of an incremental update (RFC 1624, eqn. 3) that a change of the 16-bit
/// words of `old` into those of `new` contributes: the sum of `~m` and `m'`.
#[inline(always)]
pub fn delta<const N: usize>(mut sum: u32, old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += !u16::from_be_bytes([old[i], old[i + 1]]) as u32;
        sum += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// A checksum field after changes whose [`delta`] is `delta`: HC' = ~(~HC + delta).
#[inline(always)]
pub fn apply(check: [u8; 2], delta: u32) -> [u8; 2] {
    finish(!u16::from_be_bytes(check) as u32 + delta).to_be_bytes()
}
