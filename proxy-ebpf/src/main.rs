//! bpfproxy datapath: ClusterIP load balancing for IPv4 TCP/UDP at tc ingress of the node
//! side of every pod's veth (that is, on what the pod sends).
//!
//! A packet to a service frontend gets its destination rewritten to a backend (chosen at
//! random on the first packet, then pinned by conntrack); a packet from a backend on a
//! tracked connection gets its source rewritten back to the frontend. Everything else passes
//! untouched after one hash lookup and one array read. Every exit is counted in `stats`.
#![no_std]
#![no_main]
// Atomic adds on map values: core's Atomic* types have no RMW methods on the BPF target;
// the intrinsic, its result unused, lowers to the BPF_ATOMIC add of the default ISA.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod csum;
mod maps;
mod monitor;
mod nat;
mod parse;
mod reject;
mod sched;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_OK as ACT_OK, TC_ACT_SHOT as ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    monitor::{
        REASON_BACKEND_MISSING, REASON_CT_FULL, REASON_MALFORMED, REASON_MIDSTREAM,
        REASON_NO_BACKEND, REASON_REWRITE,
    },
    reply_filter,
    service::{BackendConnsKey, SCOPE_CLUSTER_IP, Svc4Key, sched_counts_connections},
    stats,
};

use crate::{
    conntrack::Created,
    maps::{CONNTRACK4, REPLY_FILTER4, SERVICES4, count, count_new_connection, count_service},
    parse::{ETH_LEN, Packet, Skip, TCP_SYN, ptr_at},
    sched::Service,
};

const OK: i32 = ACT_OK;

/// The datapath entry point.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match try_tc_ingress(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

/// The floor that benchmarks compare `tc_ingress` against: same program type, no work.
#[classifier]
pub fn tc_floor(_ctx: TcContext) -> i32 {
    OK
}

/// The external view at XDP on the node interfaces (NodePorts, external and LoadBalancer
/// IPs). First step: attached by the agent, passes everything to the stack; the
/// translation comes in the following commits.
#[xdp]
pub fn xdp_nodeport(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The floor that benchmarks compare `xdp_nodeport` against, and the program tests put on
/// the far side of a veth so that XDP_TX/XDP_REDIRECT into it is received (a veth peer
/// without XDP or GRO drops such frames).
#[xdp]
pub fn xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Not attached anywhere: the agent runs it with BPF_PROG_TEST_RUN to add to a backend's
/// `closed` counter the connections whose conntrack entry was evicted before they closed,
/// so `backend_conns4` keeps being written only by atomic adds in the kernel. The "frame"
/// is 14 ignored bytes, a `BackendConnsKey` and a native-endian u64 count. Returns 0 when
/// added, 1 when the backend has no counters, 2 for a short frame.
#[classifier]
pub fn conns_release(ctx: TcContext) -> i32 {
    let Some(key) = ptr_at::<BackendConnsKey>(&ctx, ETH_LEN) else {
        return 2;
    };
    let Some(n) = ptr_at::<[u8; 8]>(&ctx, ETH_LEN + core::mem::size_of::<BackendConnsKey>()) else {
        return 2;
    };
    // SAFETY: ptr_at checked the bounds.
    let (key, n) = unsafe { (key.read_unaligned(), u64::from_ne_bytes(n.read_unaligned())) };
    if sched::add_closed(key, n) { 0 } else { 1 }
}

/// Counts `stat` and returns `action`.
#[inline(always)]
fn exit(stat: u32, action: i32) -> Result<i32, i32> {
    count(stat);
    Ok(action)
}

/// Counts `stat` and drops the packet.
#[inline(always)]
fn fail(stat: u32) -> Result<i32, i32> {
    count(stat);
    Err(ACT_SHOT)
}

/// A rewrite helper failed: reported to a monitor, counted, dropped.
#[inline(always)]
fn fail_rewrite(pkt: &Packet, svc_id: u32) -> Result<i32, i32> {
    monitor::dropped(pkt, svc_id, REASON_REWRITE);
    fail(stats::ERR_REWRITE)
}

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(Skip::NotIpv4 | Skip::NotTcpUdp) => return exit(stats::PASS_NOT_SERVICE, OK),
        Err(Skip::Fragment) => return exit(stats::PASS_FRAGMENT, OK),
        Err(Skip::Malformed) => {
            monitor::malformed(REASON_MALFORMED);
            return exit(stats::PASS_MALFORMED, OK);
        }
    };
    let key = Svc4Key {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_CLUSTER_IP,
    };
    match SERVICES4.get_ptr(key) {
        Some(svc) => {
            // SAFETY: a lookup result. A concurrent update of a preallocated hash may
            // recycle the element; reading the three fields at once, right after the
            // lookup, keeps that window to a few instructions (the usual BPF trade-off).
            let svc = unsafe {
                Service {
                    svc_id: (*svc).svc_id,
                    table: (*svc).table,
                    count: (*svc).backend_count,
                    scheduler: (*svc).scheduler,
                    affinity_timeout_s: (*svc).affinity_timeout_s,
                }
            };
            to_service(ctx, &pkt, &svc)
        }
        None => maybe_reply(ctx, &pkt),
    }
}

/// A packet to a service frontend: DNAT to the connection's backend, or pick one.
#[inline(always)]
fn to_service(ctx: &TcContext, pkt: &Packet, svc: &Service) -> Result<i32, i32> {
    count_service(svc.svc_id, ctx.len() as u64, false);
    if let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) {
        // SAFETY: a lookup result, read and written only through this pointer.
        let (dir, flags, addr, port) =
            unsafe { ((*ct).dir, (*ct).flags, (*ct).nat_addr, (*ct).nat_port) };
        if dir == CT_DIR_FORWARD {
            if !(pkt.is_syn() && flags & CT_FLAG_CLOSING != 0) {
                if pkt.is_closing() {
                    conntrack::note_closing(pkt, ct);
                    conntrack::release(&conntrack::tuple_key(pkt), ct);
                }
                conntrack::touch(ct);
                if nat::rewrite_dst(ctx, pkt, addr, port).is_err() {
                    return fail_rewrite(pkt, svc.svc_id);
                }
                return exit(stats::FORWARD_ESTABLISHED, OK);
            }
            // A new connection reuses the tuple of a closed one: select anew below.
            conntrack::forget_reply(pkt, addr, port);
            conntrack::forget_forward(pkt, ct);
        }
    }

    if svc.count == 0 {
        monitor::dropped(pkt, svc.svc_id, REASON_NO_BACKEND);
        return match reject::reject(ctx, pkt) {
            Ok(action) => exit(stats::REJECT_NO_BACKEND, action),
            Err(_) => fail_rewrite(pkt, svc.svc_id),
        };
    }
    let Ok(chosen) = sched::choose(pkt, svc) else {
        monitor::dropped(pkt, svc.svc_id, REASON_BACKEND_MISSING);
        return exit(stats::ERR_BACKEND_MISSING, OK);
    };
    let count = pkt.is_tcp() && sched_counts_connections(svc.scheduler);
    // A TCP packet that is no SYN starts nothing: its connection lost its entries.
    let new = if pkt.is_tcp() && pkt.tcp_flags & TCP_SYN == 0 {
        stats::CT_MISS_MIDSTREAM
    } else {
        stats::FORWARD_NEW
    };
    let (addr, port, stat) =
        match conntrack::create(pkt, svc.svc_id, chosen.addr, chosen.port, count) {
            Ok(Created::New) => {
                count_new_connection(svc.svc_id);
                (chosen.addr, chosen.port, new)
            }
            Ok(Created::Raced(addr, port)) => (addr, port, stats::FORWARD_ESTABLISHED),
            Err(_) => {
                monitor::dropped(pkt, svc.svc_id, REASON_CT_FULL);
                return exit(stats::ERR_CONNTRACK_FULL, OK);
            }
        };
    if stat != stats::FORWARD_ESTABLISHED {
        let reason = if stat == stats::CT_MISS_MIDSTREAM {
            REASON_MIDSTREAM
        } else {
            0
        };
        monitor::new_connection(pkt, svc.svc_id, svc.scheduler, (addr, port), reason);
    }
    if nat::rewrite_dst(ctx, pkt, addr, port).is_err() {
        return fail_rewrite(pkt, svc.svc_id);
    }
    exit(stat, OK)
}

/// A packet to no service: a reply from a backend gets the frontend back as its source.
#[inline(always)]
fn maybe_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, i32> {
    let (word, mask) =
        reply_filter::word_and_mask(reply_filter::bit(pkt.saddr, pkt.sport, pkt.proto));
    let maybe = match REPLY_FILTER4.get(word) {
        Some(bits) => *bits & mask != 0,
        None => false,
    };
    if !maybe {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) else {
        return exit(stats::PASS_NOT_SERVICE, OK);
    };
    // SAFETY: a lookup result, read and written only through this pointer.
    let (dir, addr, port, svc_id) =
        unsafe { ((*ct).dir, (*ct).nat_addr, (*ct).nat_port, (*ct).svc_id) };
    if dir != CT_DIR_REPLY {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    count_service(svc_id, ctx.len() as u64, true);
    conntrack::note_closing(pkt, ct);
    conntrack::note_closing_forward(pkt, addr, port);
    conntrack::touch(ct);
    if conntrack::note_replied(ct) {
        monitor::first_reply(pkt, svc_id, (addr, port));
    }
    if nat::rewrite_src(ctx, pkt, addr, port).is_err() {
        return fail_rewrite(pkt, svc_id);
    }
    exit(stats::REPLY, OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
