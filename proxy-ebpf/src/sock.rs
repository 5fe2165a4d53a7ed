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
//! IPv6 (`sock_connect6`, `sock_sendmsg6`, `sock_recvmsg6`, `sock_getpeername6`) does the
//! same with `services6`, `backend_slots6`, `src_ranges6`, `node_cfg6` and `sock_rev6`.
//! A dual-stack socket naming an IPv4-mapped address (`::ffff:a.b.c.d`) is served from
//! the IPv4 maps at connect6, written back as a mapped backend and recorded in
//! `sock_rev4` (the kernel hands its sendmsg() to the sendmsg4 hook, with a plain IPv4
//! address, which records in `sock_rev4` too; getpeername6/recvmsg6 then show such a
//! socket's mapped backend as its mapped frontend).
//!
//! The backend is chosen uniformly at random over the service's live table, whatever its
//! scheduler and session affinity (those need the client address, which a socket does not
//! have before connect(), or per-connection state the socket path does not keep). A
//! frontend without backends fails the call at once: ECONNREFUSED, what a TCP RST or an
//! ICMP port unreachable gives at tc (EHOSTUNREACH for a traffic policy Local with no
//! local endpoint, where the packet path drops).

use aya_ebpf::{
    btf_maps::LruHashMap,
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use core::ptr::{read_volatile, write_volatile};
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    maps::DEFAULT_SOCK_REV,
    service::{BackendSlotKey, SCOPE_CLUSTER_IP, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES},
    sock::{SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value},
    stats,
};

use crate::{
    family::{BackendEntry, Family, V4, V6},
    maps::{count, count_new_connection},
    parse::A6,
};

/// (socket cookie, backend) -> the frontend the socket asked for.
#[btf_map(name = "sock_rev4")]
pub static SOCK_REV4: LruHashMap<SockRev4Key, SockRev4Value, { DEFAULT_SOCK_REV as usize }> =
    LruHashMap::new();

/// The IPv6 twin of `sock_rev4`.
#[btf_map(name = "sock_rev6")]
pub static SOCK_REV6: LruHashMap<SockRev6Key, SockRev6Value, { DEFAULT_SOCK_REV as usize }> =
    LruHashMap::new();

/// Return values of cgroup sock_addr programs.
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend::<In4>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend::<In4>(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend::<In4>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend::<In4>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) {
        to_backend::<Mapped>(&ctx, true)
    } else {
        to_backend::<In6>(&ctx, true)
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    // The kernel passes a mapped destination to sendmsg4 instead; tested anyway, so a
    // kernel that did not would still be served.
    if mapped(&ctx) {
        to_backend::<Mapped>(&ctx, false)
    } else {
        to_backend::<In6>(&ctx, false)
    }
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) {
        to_frontend::<Mapped>(&ctx);
    } else {
        to_frontend::<In6>(&ctx);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    if mapped(&ctx) {
        to_frontend::<Mapped>(&ctx);
    } else {
        to_frontend::<In6>(&ctx);
    }
    PROCEED
}

/// How a hook reads and writes the address of the call, and where it records what it
/// did: the maps it serves from are its [`Family`]'s.
trait SockAddr {
    type F: Family;
    /// The address the call names: (address, host-order port).
    fn user_addr(ctx: &SockAddrContext) -> (<Self::F as Family>::Addr, u16);
    fn set_user_addr(ctx: &SockAddrContext, addr: <Self::F as Family>::Addr, port: u16);
    /// The address the socket is bound to (zero if none).
    fn bound(ctx: &SockAddrContext) -> <Self::F as Family>::Addr;
    fn rev_insert(
        cookie: u64,
        backend: (<Self::F as Family>::Addr, u16),
        front: (<Self::F as Family>::Addr, u16),
    );
    fn rev_get(
        cookie: u64,
        backend: (<Self::F as Family>::Addr, u16),
    ) -> Option<(<Self::F as Family>::Addr, u16)>;
}

/// An IPv4 socket (`user_ip4`).
struct In4;
/// An IPv6 socket naming an IPv6 address (`user_ip6`).
struct In6;
/// An IPv6 socket naming an IPv4-mapped address: served as IPv4.
struct Mapped;

// `user_ip4`, `user_ip6` and the low 16 bits of `user_port` hold network-order values, so
// their in-memory bytes are the wire's. The kernel allows only 4-byte stores to them (and
// 4-byte or narrower loads): volatile accesses, one word each, keep LLVM from merging two
// into one 8-byte access the verifier would refuse.

#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the context the kernel passed; a 4-byte load of this field is allowed.
    u16::from_be(unsafe { read_volatile(&(*ctx.sock_addr).user_port) } as u16)
}

#[inline(always)]
fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: as in `port`; 4-byte stores of it are allowed at every hook used here.
    unsafe { write_volatile(&mut (*ctx.sock_addr).user_port, port.to_be() as u32) };
}

#[inline(always)]
fn ip6_word(ctx: &SockAddrContext, i: usize) -> u32 {
    // SAFETY: as in `port`; `i` < 4.
    unsafe { read_volatile(&(*ctx.sock_addr).user_ip6[i]) }
}

#[inline(always)]
fn set_ip6_word(ctx: &SockAddrContext, i: usize, w: u32) {
    // SAFETY: as in `set_port`; `i` < 4.
    unsafe { write_volatile(&mut (*ctx.sock_addr).user_ip6[i], w) };
}

/// The third word of an IPv4-mapped address (`::ffff:0:0/96`), as loaded from memory.
const MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The call names an IPv4-mapped address.
#[inline(always)]
fn mapped(ctx: &SockAddrContext) -> bool {
    ip6_word(ctx, 0) == 0 && ip6_word(ctx, 1) == 0 && ip6_word(ctx, 2) == MAPPED_WORD2
}

#[inline(always)]
fn bound4(ctx: &SockAddrContext) -> [u8; 4] {
    // SAFETY: `sk` of a sock_addr context is the socket (never null); 4-byte loads of its
    // `src_ip4` are allowed (of an IPv6 socket: the IPv4 address it is bound to, if any).
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        read_volatile(&(*sk).src_ip4).to_ne_bytes()
    }
}

#[inline(always)]
fn rev4_insert(cookie: u64, backend: ([u8; 4], u16), front: ([u8; 4], u16)) {
    let key = SockRev4Key {
        cookie,
        addr: backend.0,
        port: backend.1,
        _pad: 0,
    };
    let value = SockRev4Value {
        addr: front.0,
        port: front.1,
        _pad: 0,
    };
    // An LRU insert makes room by evicting; should it still fail, the call goes to the
    // backend anyway and only getpeername()/recvmsg() show the backend.
    let _ = SOCK_REV4.insert(key, value, 0);
}

#[inline(always)]
fn rev4_get(cookie: u64, backend: ([u8; 4], u16)) -> Option<([u8; 4], u16)> {
    let key = SockRev4Key {
        cookie,
        addr: backend.0,
        port: backend.1,
        _pad: 0,
    };
    let front = SOCK_REV4.get_ptr(key)?;
    // SAFETY: a lookup result, read at once.
    Some(unsafe { ((*front).addr, (*front).port) })
}

impl SockAddr for In4 {
    type F = V4;
    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> ([u8; 4], u16) {
        // SAFETY: as in `port`.
        let ip = unsafe { read_volatile(&(*ctx.sock_addr).user_ip4) };
        (ip.to_ne_bytes(), port(ctx))
    }
    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
        // SAFETY: as in `set_port`.
        unsafe { write_volatile(&mut (*ctx.sock_addr).user_ip4, u32::from_ne_bytes(addr)) };
        set_port(ctx, port);
    }
    #[inline(always)]
    fn bound(ctx: &SockAddrContext) -> [u8; 4] {
        bound4(ctx)
    }
    #[inline(always)]
    fn rev_insert(cookie: u64, backend: ([u8; 4], u16), front: ([u8; 4], u16)) {
        rev4_insert(cookie, backend, front)
    }
    #[inline(always)]
    fn rev_get(cookie: u64, backend: ([u8; 4], u16)) -> Option<([u8; 4], u16)> {
        rev4_get(cookie, backend)
    }
}

impl SockAddr for Mapped {
    type F = V4;
    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> ([u8; 4], u16) {
        (ip6_word(ctx, 3).to_ne_bytes(), port(ctx))
    }
    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
        // Words 0 to 2 already hold the mapped prefix (`mapped`).
        set_ip6_word(ctx, 3, u32::from_ne_bytes(addr));
        set_port(ctx, port);
    }
    #[inline(always)]
    fn bound(ctx: &SockAddrContext) -> [u8; 4] {
        bound4(ctx)
    }
    #[inline(always)]
    fn rev_insert(cookie: u64, backend: ([u8; 4], u16), front: ([u8; 4], u16)) {
        rev4_insert(cookie, backend, front)
    }
    #[inline(always)]
    fn rev_get(cookie: u64, backend: ([u8; 4], u16)) -> Option<([u8; 4], u16)> {
        rev4_get(cookie, backend)
    }
}

#[inline(always)]
fn a6(w: [u32; 4]) -> A6 {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&w[0].to_ne_bytes());
    b[4..8].copy_from_slice(&w[1].to_ne_bytes());
    b[8..12].copy_from_slice(&w[2].to_ne_bytes());
    b[12..16].copy_from_slice(&w[3].to_ne_bytes());
    A6::new(b)
}

impl SockAddr for In6 {
    type F = V6;
    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> (A6, u16) {
        let w = [
            ip6_word(ctx, 0),
            ip6_word(ctx, 1),
            ip6_word(ctx, 2),
            ip6_word(ctx, 3),
        ];
        (a6(w), port(ctx))
    }
    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: A6, port: u16) {
        let b = addr.bytes();
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        set_ip6_word(ctx, 0, w(0));
        set_ip6_word(ctx, 1, w(4));
        set_ip6_word(ctx, 2, w(8));
        set_ip6_word(ctx, 3, w(12));
        set_port(ctx, port);
    }
    #[inline(always)]
    fn bound(ctx: &SockAddrContext) -> A6 {
        // SAFETY: as in `bound4`; 4-byte loads of `src_ip6` are allowed.
        unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            a6([
                read_volatile(&(*sk).src_ip6[0]),
                read_volatile(&(*sk).src_ip6[1]),
                read_volatile(&(*sk).src_ip6[2]),
                read_volatile(&(*sk).src_ip6[3]),
            ])
        }
    }
    #[inline(always)]
    fn rev_insert(cookie: u64, backend: (A6, u16), front: (A6, u16)) {
        let key = SockRev6Key {
            cookie,
            addr: backend.0.bytes(),
            port: backend.1,
            _pad: [0; 6],
        };
        let value = SockRev6Value {
            addr: front.0.bytes(),
            port: front.1,
            _pad: 0,
        };
        // As in `rev4_insert`.
        let _ = SOCK_REV6.insert(key, value, 0);
    }
    #[inline(always)]
    fn rev_get(cookie: u64, backend: (A6, u16)) -> Option<(A6, u16)> {
        let key = SockRev6Key {
            cookie,
            addr: backend.0.bytes(),
            port: backend.1,
            _pad: [0; 6],
        };
        let front = SOCK_REV6.get_ptr(key)?;
        // SAFETY: a lookup result, read at once.
        Some(unsafe { (A6::new((*front).addr), (*front).port) })
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) }
}

/// connect/sendmsg: a frontend becomes one of its backends.
#[inline(always)]
fn to_backend<S: SockAddr>(ctx: &SockAddrContext, connect: bool) -> i32 {
    // SAFETY: the context the kernel passed.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    if proto != PROTO_TCP as u32 && proto != PROTO_UDP as u32 {
        return PROCEED;
    }
    let (addr, port) = S::user_addr(ctx);
    let Some(svc) = S::F::service(addr, port, proto as u8, SCOPE_CLUSTER_IP) else {
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
    if flags & SVC_F_SOURCE_RANGES != 0 && !S::F::source_allowed(svc_id, source::<S>(ctx)) {
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
        // SAFETY: a helper with a plain argument; allowed at connect and sendmsg hooks.
        unsafe { bpf_set_retval(-errno) };
        return REJECT;
    }
    // SAFETY: a helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % n;
    let Some(b) = S::F::backend_slots().get_ptr(BackendSlotKey { table, slot }) else {
        // A half-written table: leave the call as it is, as tc does.
        count(stats::ERR_BACKEND_MISSING);
        return PROCEED;
    };
    let (baddr, bport, _, _) = BackendEntry::read(b);
    S::rev_insert(cookie(ctx), (baddr, bport), (addr, port));
    S::set_user_addr(ctx, baddr, bport);
    count(stats::SOCK_LB);
    if connect {
        count_new_connection(svc_id);
    }
    PROCEED
}

/// The source a loadBalancerSourceRanges check sees: the address the socket is bound to,
/// else the node's address of the family (`node_cfg4`/`node_cfg6` `snat_addr`), which the
/// kernel picks for a node process that did not choose one; with neither known, the
/// unspecified address, which only a /0 range admits.
#[inline(always)]
fn source<S: SockAddr>(ctx: &SockAddrContext) -> <S::F as Family>::Addr {
    let bound = S::bound(ctx);
    if !S::F::same(&bound, &S::F::ZERO) {
        return bound;
    }
    match S::F::node() {
        Some(node) => node.snat_addr,
        None => S::F::ZERO,
    }
}

/// getpeername/recvmsg: a backend this socket was sent to shows as its frontend.
#[inline(always)]
fn to_frontend<S: SockAddr>(ctx: &SockAddrContext) {
    let backend = S::user_addr(ctx);
    if let Some((faddr, fport)) = S::rev_get(cookie(ctx), backend) {
        S::set_user_addr(ctx, faddr, fport);
    }
}
