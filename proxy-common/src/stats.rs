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
/// XDP on a node interface: not for a frontend of the external view nor an SNAT reply;
/// handed to the stack untouched.
pub const XDP_PASS: u32 = 11;
/// XDP: a new connection to an external frontend got a backend.
pub const XDP_FORWARD_NEW: u32 = 12;
/// XDP: a packet of a tracked connection to an external frontend.
pub const XDP_FORWARD_ESTABLISHED: u32 = 13;
/// XDP: a reply to an SNAT-ed connection, translated back to the client.
pub const XDP_SNAT_REPLY: u32 = 14;
/// XDP: a translated packet forwarded with bpf_fib_lookup + XDP_TX/XDP_REDIRECT rather than
/// through the kernel stack (counted in addition to the path above).
pub const XDP_FIB_REDIRECT: u32 = 15;
/// A client outside a LoadBalancer frontend's loadBalancerSourceRanges: dropped.
pub const DROP_SOURCE_RANGE: u32 = 16;
/// Traffic policy Local and no endpoint on this node: dropped.
pub const DROP_NO_LOCAL_BACKEND: u32 = 17;
/// No free SNAT port for a new connection: dropped.
pub const ERR_SNAT_PORTS: u32 = 18;
/// A pod reached its own service and landed on itself: source-NAT-ed to the frontend.
pub const HAIRPIN: u32 = 19;
/// A connect()/sendmsg() of a process on the node rewritten from a frontend to a backend by
/// the socket hooks.
pub const SOCK_LB: u32 = 20;
pub const COUNT: u32 = 21;

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
    "xdp_pass",
    "xdp_forward_new",
    "xdp_forward_established",
    "xdp_snat_reply",
    "xdp_fib_redirect",
    "drop_source_range",
    "drop_no_local_backend",
    "err_snat_ports",
    "hairpin",
    "sock_lb",
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
