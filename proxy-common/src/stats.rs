//! Indices of the per-CPU `stats` counters (a PERCPU_ARRAY of u64), so operators can see why
//! packets took each path.

pub const PASS_NOT_SERVICE: u32 = 0;
pub const FORWARD_NEW: u32 = 1;
pub const FORWARD_ESTABLISHED: u32 = 2;
pub const REPLY: u32 = 3;
pub const REJECT_NO_BACKEND: u32 = 4;
pub const PASS_FRAGMENT: u32 = 5;
pub const PASS_MALFORMED: u32 = 6;
pub const ERR_CONNTRACK_FULL: u32 = 7;
pub const ERR_BACKEND_MISSING: u32 = 8;
pub const ERR_REWRITE: u32 = 9;
/// A TCP packet other than a SYN found no conntrack entry (its connection's entries were
/// evicted because the table was full, or expired while idle) and was given a backend
/// anew, as a new connection would be. Counted instead of `FORWARD_NEW`.
pub const CT_MISS_MIDSTREAM: u32 = 10;
pub const COUNT: u32 = 11;

pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_service",
    "forward_new",
    "forward_established",
    "reply",
    "reject_no_backend",
    "pass_fragment",
    "pass_malformed",
    "err_conntrack_full",
    "err_backend_missing",
    "err_rewrite",
    "ct_miss_midstream",
];

/// Value of `svc_counters` (a PERCPU_ARRAY indexed by `svc_id`): one service frontend's
/// traffic on one CPU. Userspace sums the CPUs. Bytes are `skb->len` at tc ingress (whole
/// Ethernet frames). Zeroed by the agent when it gives the `svc_id` to a new service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCounters {
    /// Packets sent to the frontend (forwarded, or refused for want of a backend).
    pub packets: u64,
    pub bytes: u64,
    /// Connections that got a backend from the scheduler (a conntrack entry was created).
    pub new_connections: u64,
    /// Packets from a backend translated back to the frontend.
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<SvcCounters>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, u64 fields only (no padding).
    unsafe impl aya::Pod for super::SvcCounters {}
}
