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
    /// bpf_ktime_get_ns() when the connection was created.
    pub created_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding (asserted above).
    unsafe impl aya::Pod for super::Ct4Key {}
    unsafe impl aya::Pod for super::Ct4Value {}
}
