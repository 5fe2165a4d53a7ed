//! A bitmap of backend addresses, so traffic that is neither to a service nor from a backend
//! passes after one hash lookup (the service map) and one array read, without a conntrack
//! lookup. A set bit only means "maybe a reply": the conntrack map has the last word.

/// Number of `u64` words in `reply_filter`.
pub const WORDS: u32 = 1024;
pub const BITS: u32 = WORDS * 64;

/// The bit for a backend `(addr, port, proto)`. Kernel and userspace must agree on it.
#[inline(always)]
pub fn bit(addr: [u8; 4], port: u16, proto: u8) -> u32 {
    let a = u32::from_ne_bytes(addr) as u64;
    let x = (a << 24) ^ ((port as u64) << 8) ^ proto as u64;
    // Fibonacci hashing: the top bits of a multiply spread well and cost one instruction.
    ((x.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> (64 - 16)) as u32 % BITS
}

/// The bit for an IPv6 backend: the same filter serves both families (a collision between
/// them only costs a conntrack lookup that finds nothing).
#[inline(always)]
pub fn bit6(addr: [u8; 16], port: u16, proto: u8) -> u32 {
    let mut a = 0u32;
    let mut i = 0;
    while i < 16 {
        a ^= u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        i += 4;
    }
    bit(a.to_ne_bytes(), port, proto)
}

/// `(word index, mask)` of a bit.
#[inline(always)]
pub fn word_and_mask(bit: u32) -> (u32, u64) {
    (bit / 64, 1u64 << (bit % 64))
}
