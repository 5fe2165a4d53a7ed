//! Connection tracking entries.
//!
//! Each NAT-ed connection has two entries in the `conntrack4` LRU hash: the forward tuple
//! (client -> VIP) maps to the backend, the reply tuple (backend -> client) maps back to the
//! VIP. Both use the same value type; `dir` tells them apart.

/// Key of `conntrack4`: a 5-tuple as seen on the wire at that hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// `flags`: a FIN or RST was seen; the next SYN on this tuple picks a backend anew.
pub const CT_FLAG_CLOSING: u8 = 1;
/// `flags`, reply entry only: the backend answered (the kernel's IPS_SEEN_REPLY). Tells a
/// TCP connection past its handshake from one that only sent a SYN, for the timeouts.
pub const CT_FLAG_REPLIED: u8 = 2;
/// `flags`: the connection is source-NAT-ed too (externalTrafficPolicy Cluster to a
/// backend on another node, or a hairpin); `nat2_*` is the other address to rewrite:
/// forward, the source becomes `nat2` (node address and SNAT port); reply, the
/// destination becomes `nat2` (the client). The reply entry's key is then the tuple
/// (backend -> nat2 of the forward entry).
pub const CT_FLAG_SNAT: u8 = 4;

/// The datapath rewrites `last_seen_ns` only when it is older than this, so an established
/// flow writes its entry about once a second, not on every packet. Timeouts are in seconds,
/// so expiry is at most this late.
pub const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

/// Value of `conntrack4`: the address to write in place of the VIP (forward: destination
/// becomes the backend) or of the backend (reply: source becomes the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct4Value {
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
    pub dir: u8,
    pub flags: u8,
    pub svc_id: u32,
    /// Forward entry only: 1 if this connection was counted in `backend_conns4` (it has a
    /// token in `counted4`) and no FIN/RST was seen yet. A hint that saves closing packets
    /// of uncounted connections a map operation; the token decides.
    pub counted: u32,
    /// bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC_COARSE) of the last packet through this
    /// entry, give or take [`LAST_SEEN_REFRESH_NS`]; the agent's collector expires entries
    /// idle for longer than their timeout.
    pub last_seen_ns: u64,
    /// With [`CT_FLAG_SNAT`]: the second address to rewrite (see there); else zero.
    pub nat2_addr: [u8; 4],
    pub nat2_port: u16,
    pub _pad: u16,
}

/// Key of `conntrack6` (and of `counted6`): an IPv6 5-tuple, as [`Ct4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `conntrack6`: the fields of [`Ct4Value`] with IPv6 addresses (reordered so
/// that no implicit padding is needed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct6Value {
    pub nat_addr: [u8; 16],
    /// With [`CT_FLAG_SNAT`]: the second address to rewrite; else zero.
    pub nat2_addr: [u8; 16],
    pub nat_port: u16,
    pub nat2_port: u16,
    pub dir: u8,
    pub flags: u8,
    pub _pad: u16,
    pub svc_id: u32,
    pub counted: u32,
    pub last_seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Ct6Key>() == 40);
const _: () = assert!(core::mem::size_of::<Ct6Value>() == 56);
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding (asserted above).
    unsafe impl aya::Pod for super::Ct4Key {}
    unsafe impl aya::Pod for super::Ct4Value {}
    unsafe impl aya::Pod for super::Ct6Key {}
    unsafe impl aya::Pod for super::Ct6Value {}
}
