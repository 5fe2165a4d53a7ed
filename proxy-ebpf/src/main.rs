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
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK as ACT_OK, TC_ACT_SHOT as ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, Ct4Value},
    monitor::{
        REASON_BACKEND_MISSING, REASON_CT_FULL, REASON_MALFORMED, REASON_MIDSTREAM,
        REASON_NO_BACKEND, REASON_NO_LOCAL_BACKEND, REASON_REWRITE, REASON_SOURCE_RANGE,
    },
    reply_filter,
    service::{
        BackendConnsKey, SCOPE_CLUSTER_IP, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES, Svc4Key,
        sched_counts_connections,
    },
    stats,
};

use crate::{
    conntrack::{Created, Snat, Translation},
    maps::{CONNTRACK4, REPLY_FILTER, SERVICES4, count, count_new_connection, count_service},
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
/// IPs, and replies to the connections it source-NAT-ed); see `xdp.rs`.
#[xdp]
pub fn xdp_nodeport(ctx: XdpContext) -> u32 {
    xdp::nodeport(&ctx)
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
    let Some(key) = ptr_at::<_, BackendConnsKey>(&ctx, ETH_LEN) else {
        return 2;
    };
    let Some(n) = ptr_at::<_, [u8; 8]>(&ctx, ETH_LEN + core::mem::size_of::<BackendConnsKey>())
    else {
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
            // SAFETY: a lookup result.
            let (svc, flags) = unsafe { Service::read(svc) };
            to_service(ctx, &pkt, &svc, flags)
        }
        None => maybe_reply(ctx, &pkt),
    }
}

/// A packet to a service frontend: DNAT to the connection's backend, or pick one.
#[inline(always)]
fn to_service(ctx: &TcContext, pkt: &Packet, svc: &Service, flags: u8) -> Result<i32, i32> {
    // A LoadBalancer IP with loadBalancerSourceRanges: pods outside them are dropped, as by
    // kube-proxy (the flag is only on such frontends, so others pay one bit test).
    if flags & SVC_F_SOURCE_RANGES != 0 && !xdp::source_allowed(svc.svc_id, pkt.saddr) {
        monitor::dropped(pkt, svc.svc_id, REASON_SOURCE_RANGE);
        return fail(stats::DROP_SOURCE_RANGE);
    }
    if let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) {
        // SAFETY: a lookup result, read and written only through this pointer.
        let (dir, ct_flags) = unsafe { ((*ct).dir, (*ct).flags) };
        let t = Translation::of(ct);
        if dir == CT_DIR_FORWARD {
            count_service(svc.svc_id, ctx.len() as u64, false);
            if !(pkt.is_syn() && ct_flags & CT_FLAG_CLOSING != 0) {
                if pkt.is_closing() {
                    conntrack::note_closing(pkt, ct);
                    conntrack::release(&conntrack::tuple_key(pkt), ct);
                }
                conntrack::touch(ct);
                if translate(ctx, pkt, &t).is_err() {
                    return fail_rewrite(pkt, svc.svc_id);
                }
                return exit(stats::FORWARD_ESTABLISHED, OK);
            }
            // A new connection reuses the tuple of a closed one: select anew below.
            conntrack::forget_reply(pkt, &t);
            conntrack::forget_forward(pkt, ct);
        } else {
            // A reply that happens to be addressed to a frontend's address and port: a
            // hairpin connection's reply goes to the frontend address at the client's port.
            return reply(ctx, pkt, ct);
        }
    } else {
        count_service(svc.svc_id, ctx.len() as u64, false);
    }
    if svc.count == 0 {
        if flags & SVC_F_DROP_EMPTY != 0 {
            monitor::dropped(pkt, svc.svc_id, REASON_NO_LOCAL_BACKEND);
            return fail(stats::DROP_NO_LOCAL_BACKEND);
        }
        monitor::dropped(pkt, svc.svc_id, REASON_NO_BACKEND);
        return match reject::reject(ctx, pkt) {
            Ok(action) => exit(stats::REJECT_NO_BACKEND, action),
            Err(_) => fail_rewrite(pkt, svc.svc_id),
        };
    }
    match new_connection(ctx, pkt, svc) {
        ACT_SHOT => Err(ACT_SHOT),
        action => Ok(action),
    }
}

/// A packet to a frontend with backends and without a tracked connection: pick a backend.
#[inline(always)]
fn new_connection(ctx: &TcContext, pkt: &Packet, svc: &Service) -> i32 {
    match try_new_connection(ctx, pkt, svc) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_new_connection(ctx: &TcContext, pkt: &Packet, svc: &Service) -> Result<i32, i32> {
    let Ok(chosen) = sched::choose(pkt, svc) else {
        monitor::dropped(pkt, svc.svc_id, REASON_BACKEND_MISSING);
        return exit(stats::ERR_BACKEND_MISSING, OK);
    };
    let counted = pkt.is_tcp() && sched_counts_connections(svc.scheduler);
    // A TCP packet that is no SYN starts nothing: its connection lost its entries.
    let new = if pkt.is_tcp() && pkt.tcp_flags & TCP_SYN == 0 {
        stats::CT_MISS_MIDSTREAM
    } else {
        stats::FORWARD_NEW
    };
    // Hairpin: the pod reached its own service and landed on itself. A packet from its own
    // address would be dropped as a martian, so the source becomes the frontend (keeping
    // the client port, which keeps the reply key unique to the client's socket).
    let hairpin = chosen.addr == pkt.saddr;
    let snat = if hairpin {
        Snat::Fixed(pkt.daddr, pkt.sport)
    } else {
        Snat::None
    };
    let (t, stat) =
        match conntrack::create(pkt, svc.svc_id, chosen.addr, chosen.port, counted, snat) {
            Ok(Created::New(t)) => {
                count_new_connection(svc.svc_id);
                if hairpin {
                    count(stats::HAIRPIN);
                }
                (t, new)
            }
            Ok(Created::Raced(t)) => (t, stats::FORWARD_ESTABLISHED),
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
        monitor::new_connection(pkt, svc.svc_id, svc.scheduler, (t.addr, t.port), reason);
    }
    if translate(ctx, pkt, &t).is_err() {
        return fail_rewrite(pkt, svc.svc_id);
    }
    exit(stat, OK)
}

/// A client's packet rewritten as its forward entry says: DNAT, and SNAT too for a
/// source-NAT-ed connection (hairpin).
#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, t: &Translation) -> Result<(), nat::RewriteError> {
    if t.snat {
        nat::rewrite_both(ctx, pkt, &t.forward(pkt))
    } else {
        nat::rewrite_dst(ctx, pkt, t.addr, t.port)
    }
}

/// A packet to no service: a reply from a backend gets the frontend back as its source.
#[inline(always)]
fn maybe_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, i32> {
    let (word, mask) =
        reply_filter::word_and_mask(reply_filter::bit(pkt.saddr, pkt.sport, pkt.proto));
    let maybe = match REPLY_FILTER.get(word) {
        Some(bits) => *bits & mask != 0,
        None => false,
    };
    if !maybe {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) else {
        return exit(stats::PASS_NOT_SERVICE, OK);
    };
    // SAFETY: a lookup result.
    if unsafe { (*ct).dir } != CT_DIR_REPLY {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    reply(ctx, pkt, ct)
}

/// A backend's packet on reply entry `ct`: the frontend becomes its source, and for a
/// source-NAT-ed connection the client its destination.
#[inline(always)]
fn reply(ctx: &TcContext, pkt: &Packet, ct: *mut Ct4Value) -> Result<i32, i32> {
    let t = Translation::of(ct);
    // SAFETY: a lookup result.
    let svc_id = unsafe { (*ct).svc_id };
    count_service(svc_id, ctx.len() as u64, true);
    conntrack::note_closing(pkt, ct);
    conntrack::note_closing_forward(pkt, &t);
    conntrack::touch(ct);
    if conntrack::note_replied(ct) {
        monitor::first_reply(pkt, svc_id, t.client_of_reply(pkt), (t.addr, t.port));
    }
    let done = if t.snat {
        nat::rewrite_both(ctx, pkt, &t.reply(pkt))
    } else {
        nat::rewrite_src(ctx, pkt, t.addr, t.port)
    };
    if done.is_err() {
        return fail_rewrite(pkt, svc_id);
    }
    exit(stats::REPLY, OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
