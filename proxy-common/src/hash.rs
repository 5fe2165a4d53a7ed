//! The hashes the hashing schedulers use (sh, dh, maglev). Kernel and userspace share them,
//! so tests and tools can tell which backend a tuple maps to.

/// Mixes one more 32-bit word into `h` (a multiply-xorshift round, as in murmur3's
/// finaliser: cheap in BPF, and every input bit reaches every output bit).
#[inline(always)]
pub const fn mix(h: u32, word: u32) -> u32 {
    let mut x = h ^ word.wrapping_mul(0xcc9e_2d51);
    x = x.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    fmix(x)
}

/// murmur3's 32-bit finaliser.
#[inline(always)]
pub const fn fmix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    x
}

const SEED: u32 = 0x9747_b28c;

/// Hash of an address (sh: the client; dh: the frontend address with its port).
#[inline(always)]
pub const fn addr_hash(addr: [u8; 4], port: u16) -> u32 {
    mix(mix(SEED, u32::from_le_bytes(addr)), port as u32)
}

/// Hash of a connection's 5-tuple (maglev).
#[inline(always)]
pub const fn tuple_hash(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let h = mix(SEED, u32::from_le_bytes(saddr));
    let h = mix(h, u32::from_le_bytes(daddr));
    let h = mix(h, ((sport as u32) << 16) | dport as u32);
    mix(h, proto as u32)
}

/// 64-bit FNV-1a, for the Maglev permutations of backend names (userspace only, but kept
/// here next to the kernel's hashes).
pub const fn fnv1a64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    // FNV's low bits are weak for short inputs; finish with a 64-bit avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}
