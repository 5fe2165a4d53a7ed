//! Socket-level load balancing for processes on the node (hostNetwork pods, the kubelet,
//! `curl` on the node), whose packets never cross a pod veth where `tc_ingress` runs.
//! cgroup/sock_addr programs on the cgroup the agent is given (`--socket-lb-cgroup`):
//!
//! - `sock_connect4` (connect() of TCP and UDP sockets) and `sock_sendmsg4` (sendto() /
//!   sendmsg() with an address on an unconnected UDP socket): a destination that is a
//!   frontend of the in-cluster view (`SCOPE_CLUSTER_IP`: ClusterIPs, and external IPs,
//!   LoadBalancer IPs and NodePorts on node addresses) is rewritten to a backend before the
//!   kernel routes anything, so no packet is ever translated and no conntrack entry is made.
//!   The socket's cookie and the backend are recorded in `sock_rev4` with the frontend.
//! - `sock_getpeername4` and `sock_recvmsg4` (the source of a UDP datagram received):
//!   a backend recorded for this socket is shown as the frontend it stands for.
//!
//! A LoadBalancer IP with loadBalancerSourceRanges admits the call only from a source in
//! the ranges (the socket's bound address, else the node's address); others fail with
//! EPERM, counted as `drop_source_range`.
//!
//! The backend is chosen uniformly at random over the service's live table, whatever its
//! scheduler and session affinity (those need the client address, which a socket does not
//! have before connect(), or per-connection state the socket path does not keep). A
//! frontend without backends fails the call at once: ECONNREFUSED, what a TCP RST or an
//! ICMP port unreachable gives at tc (EHOSTUNREACH for a traffic policy Local with no
//! local endpoint, where the packet path drops).

use aya_ebpf::{
    btf_maps::{LruHashMap, lpm_trie::Key},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    maps::DEFAULT_SOCK_REV,
    service::{
        BackendSlotKey, SCOPE_CLUSTER_IP, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES, SourceRange4Key,
        Svc4Key,
    },
    sock::{SockRev4Key, SockRev4Value},
    stats,
};

use crate::maps::{BACKEND_SLOTS4, NODE_CFG4, SERVICES4, SRC_RANGES4, count, count_new_connection};

/// (socket cookie, backend) -> the frontend the socket asked for.
#[btf_map(name = "sock_rev4")]
pub static SOCK_REV4: LruHashMap<SockRev4Key, SockRev4Value, { DEFAULT_SOCK_REV as usize }> =
    LruHashMap::new();

/// Return values of cgroup sock_addr programs.
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    PROCEED
}

/// The address the call names: (address bytes, host-order port). `user_ip4` and the low 16
/// bits of `user_port` hold network-order values, so their in-memory bytes are the wire's.
#[inline(always)]
fn user_addr(ctx: &SockAddrContext) -> ([u8; 4], u16) {
    // SAFETY: the context the kernel passed; 4-byte loads of these fields are allowed.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    (ip.to_ne_bytes(), u16::from_be(port as u16))
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
    // SAFETY: as in `user_addr`; 4-byte stores of these fields are allowed at every hook
    // used here.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr);
        (*ctx.sock_addr).user_port = port.to_be() as u32;
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) }
}

/// connect4/sendmsg4: a frontend becomes one of its backends.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext, connect: bool) -> i32 {
    // SAFETY: as in `user_addr`.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    if proto != PROTO_TCP as u32 && proto != PROTO_UDP as u32 {
        return PROCEED;
    }
    let (addr, port) = user_addr(ctx);
    let key = Svc4Key {
        addr,
        port,
        proto: proto as u8,
        scope: SCOPE_CLUSTER_IP,
    };
    let Some(svc) = SERVICES4.get_ptr(key) else {
        return PROCEED;
    };
    // SAFETY: a lookup result, read at once (see tc_ingress).
    let (svc_id, table, n, flags) = unsafe {
        (
            (*svc).svc_id,
            (*svc).table,
            (*svc).backend_count,
            (*svc).flags,
        )
    };
    if flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(ctx, svc_id) {
        // kube-proxy drops such packets; here the call fails at once (EPERM).
        count(stats::DROP_SOURCE_RANGE);
        return REJECT;
    }
    if n == 0 {
        let (errno, stat) = if flags & SVC_F_DROP_EMPTY != 0 {
            (EHOSTUNREACH, stats::DROP_NO_LOCAL_BACKEND)
        } else {
            (ECONNREFUSED, stats::REJECT_NO_BACKEND)
        };
        count(stat);
        // SAFETY: a helper with a plain argument; allowed at connect4 and sendmsg4.
        unsafe { bpf_set_retval(-errno) };
        return REJECT;
    }
    // SAFETY: a helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % n;
    let Some(b) = BACKEND_SLOTS4.get_ptr(BackendSlotKey { table, slot }) else {
        // A half-written table: leave the call as it is, as tc does.
        count(stats::ERR_BACKEND_MISSING);
        return PROCEED;
    };
    // SAFETY: a lookup result, read at once.
    let (baddr, bport) = unsafe { ((*b).addr, (*b).port) };
    let rev = SockRev4Key {
        cookie: cookie(ctx),
        addr: baddr,
        port: bport,
        _pad: 0,
    };
    let front = SockRev4Value {
        addr,
        port,
        _pad: 0,
    };
    // An LRU insert makes room by evicting; should it still fail, the call goes to the
    // backend anyway and only getpeername()/recvmsg() show the backend.
    let _ = SOCK_REV4.insert(rev, front, 0);
    set_user_addr(ctx, baddr, bport);
    count(stats::SOCK_LB);
    if connect {
        count_new_connection(svc_id);
    }
    PROCEED
}

/// Whether the socket's source is in the loadBalancerSourceRanges of `svc_id`. The source
/// is the address the socket is bound to, else the node's address (`node_cfg4.snat_addr`),
/// which the kernel picks for a node process that did not choose one; with neither known,
/// 0.0.0.0, which only a 0.0.0.0/0 range admits.
#[inline(always)]
fn source_allowed(ctx: &SockAddrContext, svc_id: u32) -> bool {
    // SAFETY: `sk` of a sock_addr context is the socket (never null); 4-byte loads of its
    // `src_ip4` are allowed.
    let bound = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (*sk).src_ip4
    };
    let src = if bound != 0 {
        bound.to_ne_bytes()
    } else {
        match NODE_CFG4.get(0) {
            Some(cfg) => cfg.snat_addr,
            None => [0; 4],
        }
    };
    let key = Key::new(
        64,
        SourceRange4Key {
            svc_id_be: svc_id.to_be_bytes(),
            addr: src,
        },
    );
    SRC_RANGES4.get(&key).is_some()
}

/// getpeername4/recvmsg4: a backend this socket was sent to shows as its frontend.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext) {
    let (addr, port) = user_addr(ctx);
    let key = SockRev4Key {
        cookie: cookie(ctx),
        addr,
        port,
        _pad: 0,
    };
    if let Some(front) = SOCK_REV4.get_ptr(key) {
        // SAFETY: a lookup result, read at once.
        let (faddr, fport) = unsafe { ((*front).addr, (*front).port) };
        set_user_addr(ctx, faddr, fport);
    }
}
