//! bpfproxy datapath: ClusterIP load balancing for IPv4 and IPv6 TCP/UDP at tc ingress of
//! the node side of every pod's veth (that is, on what the pod sends).
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
mod family;
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
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    monitor::{
        REASON_BACKEND_MISSING, REASON_CT_FULL, REASON_MALFORMED, REASON_MIDSTREAM,
        REASON_NO_BACKEND, REASON_NO_LOCAL_BACKEND, REASON_REWRITE, REASON_SOURCE_RANGE,
    },
    reply_filter,
    service::{
        BackendConns6Key, BackendConnsKey, SCOPE_CLUSTER_IP, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES,
        sched_counts_connections,
    },
    stats,
};

use crate::{
    conntrack::{Created, NewConn, Snat, Translation},
    family::{CtEntry, Family, V4, V6},
    maps::{REPLY_FILTER, count, count_new_connection, count_service},
    parse::{ETH_LEN, L3, Packet, Skip, TCP_SYN, ptr_at},
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
/// so `backend_conns4`/`backend_conns6` keep being written only by atomic adds in the
/// kernel. The "frame" is 14 ignored bytes, a key and a native-endian u64 count; its
/// length tells the family: 34 bytes (a 12-byte `BackendConnsKey`) for `backend_conns4`,
/// 46 bytes (a 24-byte `BackendConns6Key`) for `backend_conns6`. Returns 0 when added, 1
/// when the backend has no counters, 2 for a frame of another length.
#[classifier]
pub fn conns_release(ctx: TcContext) -> i32 {
    if ctx.len() as usize == CONNS_FRAME6 {
        return release::<V6>(&ctx);
    }
    if ctx.len() as usize == CONNS_FRAME4 {
        return release::<V4>(&ctx);
    }
    2
}

const CONNS_FRAME4: usize = ETH_LEN + core::mem::size_of::<BackendConnsKey>() + 8;
const CONNS_FRAME6: usize = ETH_LEN + core::mem::size_of::<BackendConns6Key>() + 8;

#[inline(always)]
fn release<F: Family>(ctx: &TcContext) -> i32 {
    let Some(key) = ptr_at::<_, F::ConnsKey>(ctx, ETH_LEN) else {
        return 2;
    };
    let Some(n) = ptr_at::<_, [u8; 8]>(ctx, ETH_LEN + core::mem::size_of::<F::ConnsKey>()) else {
        return 2;
    };
    // SAFETY: ptr_at checked the bounds.
    let (key, n) = unsafe { (key.read_unaligned(), u64::from_ne_bytes(n.read_unaligned())) };
    if sched::add_closed::<F>(&key, n) {
        0
    } else {
        1
    }
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
fn fail_rewrite<F: Family>(pkt: &Packet<F::Addr>, svc_id: u32) -> Result<i32, i32> {
    F::mon_dropped(pkt, svc_id, REASON_REWRITE);
    fail(stats::ERR_REWRITE)
}

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> Result<i32, i32> {
    match parse::ethertype(ctx) {
        Ok(L3::Ipv4) => Ok(tc_family::<V4>(ctx)),
        Ok(L3::Ipv6) => Ok(tc_family::<V6>(ctx)),
        Err(skip) => skipped(skip),
    }
}

/// One family's datapath, out of line: each family's path gets its own stack frame (the
/// verifier allows 512 bytes per call chain) instead of both adding up in one.
#[inline(never)]
fn tc_family<F: Family>(ctx: &TcContext) -> i32 {
    let verdict = match F::parse(ctx) {
        Ok(pkt) => match F::stash(&pkt) {
            // SAFETY: `stash` gives the packet itself or this CPU's scratch copy of it.
            Some(pkt) => serve::<F>(ctx, unsafe { &*pkt }),
            None => exit(stats::PASS_MALFORMED, OK),
        },
        Err(skip) => skipped(skip),
    };
    match verdict {
        Ok(action) | Err(action) => action,
    }
}

/// A packet the parser did not take: passed, counted by why.
#[inline(always)]
fn skipped(skip: Skip) -> Result<i32, i32> {
    match skip {
        Skip::NotIp | Skip::NotTcpUdp => exit(stats::PASS_NOT_SERVICE, OK),
        Skip::Fragment => exit(stats::PASS_FRAGMENT, OK),
        Skip::Malformed => {
            monitor::malformed(REASON_MALFORMED);
            exit(stats::PASS_MALFORMED, OK)
        }
    }
}

/// A parsed packet of family `F`: to a frontend of the in-cluster view, or maybe a reply.
#[inline(always)]
fn serve<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Result<i32, i32> {
    match F::service(pkt.daddr, pkt.dport, pkt.proto, SCOPE_CLUSTER_IP) {
        Some(svc) => {
            // SAFETY: a lookup result.
            let (svc, flags) = unsafe { Service::read(svc) };
            to_service::<F>(ctx, pkt, &svc, flags)
        }
        None => maybe_reply::<F>(ctx, pkt),
    }
}

/// A packet to a service frontend: DNAT to the connection's backend, or pick one.
#[inline(always)]
fn to_service<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    svc: &Service,
    flags: u8,
) -> Result<i32, i32> {
    // A LoadBalancer IP with loadBalancerSourceRanges: pods outside them are dropped, as by
    // kube-proxy (the flag is only on such frontends, so others pay one bit test).
    if flags & SVC_F_SOURCE_RANGES != 0 && !F::source_allowed(svc.svc_id, pkt.saddr) {
        F::mon_dropped(pkt, svc.svc_id, REASON_SOURCE_RANGE);
        return fail(stats::DROP_SOURCE_RANGE);
    }
    let fkey = conntrack::tuple_key::<F>(pkt);
    if let Some(ct) = F::conntrack().get_ptr_mut(&fkey) {
        let dir = F::Ct::dir(ct);
        // SAFETY: a lookup result, read and written only through this pointer.
        let ct_flags = unsafe { *F::Ct::flags(ct) };
        let t = Translation::of(ct);
        if dir == CT_DIR_FORWARD {
            count_service(svc.svc_id, ctx.len() as u64, false);
            if !(pkt.is_syn() && ct_flags & CT_FLAG_CLOSING != 0) {
                if pkt.is_closing() {
                    conntrack::note_closing::<F>(pkt, ct);
                    conntrack::release::<F>(&fkey, ct);
                }
                conntrack::touch::<F>(ct);
                if translate::<F>(ctx, pkt, &t).is_err() {
                    return fail_rewrite::<F>(pkt, svc.svc_id);
                }
                return exit(stats::FORWARD_ESTABLISHED, OK);
            }
            // A new connection reuses the tuple of a closed one: select anew below.
            conntrack::forget_reply::<F>(pkt, &t);
            conntrack::forget_forward::<F>(pkt, ct);
        } else {
            // A reply that happens to be addressed to a frontend's address and port: a
            // hairpin connection's reply goes to the frontend address at the client's port.
            return reply::<F>(ctx, pkt, ct);
        }
    } else {
        count_service(svc.svc_id, ctx.len() as u64, false);
    }
    if svc.count == 0 {
        if flags & SVC_F_DROP_EMPTY != 0 {
            F::mon_dropped(pkt, svc.svc_id, REASON_NO_LOCAL_BACKEND);
            return fail(stats::DROP_NO_LOCAL_BACKEND);
        }
        F::mon_dropped(pkt, svc.svc_id, REASON_NO_BACKEND);
        return match F::reject(ctx, pkt) {
            Ok(action) => exit(stats::REJECT_NO_BACKEND, action),
            Err(_) => fail_rewrite::<F>(pkt, svc.svc_id),
        };
    }
    match new_connection::<F>(ctx, pkt, svc) {
        ACT_SHOT => Err(ACT_SHOT),
        action => Ok(action),
    }
}

/// A packet to a frontend with backends and without a tracked connection: pick a backend.
#[inline(always)]
fn new_connection<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>, svc: &Service) -> i32 {
    match try_new_connection::<F>(ctx, pkt, svc) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_new_connection<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    svc: &Service,
) -> Result<i32, i32> {
    let Ok(chosen) = sched::choose::<F>(pkt, svc) else {
        F::mon_dropped(pkt, svc.svc_id, REASON_BACKEND_MISSING);
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
    let hairpin = F::same(&chosen.addr, &pkt.saddr);
    let snat = if hairpin {
        Snat::Fixed(pkt.daddr, pkt.sport)
    } else {
        Snat::None
    };
    let (t, stat) = match conntrack::create::<F>(
        pkt,
        &NewConn {
            svc_id: svc.svc_id,
            addr: chosen.addr,
            port: chosen.port,
            count: counted,
            snat,
        },
    ) {
        Ok(Created::New(t)) => {
            count_new_connection(svc.svc_id);
            if hairpin {
                count(stats::HAIRPIN);
            }
            (t, new)
        }
        Ok(Created::Raced(t)) => (t, stats::FORWARD_ESTABLISHED),
        Err(_) => {
            F::mon_dropped(pkt, svc.svc_id, REASON_CT_FULL);
            return exit(stats::ERR_CONNTRACK_FULL, OK);
        }
    };
    if stat != stats::FORWARD_ESTABLISHED {
        let reason = if stat == stats::CT_MISS_MIDSTREAM {
            REASON_MIDSTREAM
        } else {
            0
        };
        F::mon_new(pkt, svc.svc_id, svc.scheduler, (t.addr, t.port), reason);
    }
    if translate::<F>(ctx, pkt, &t).is_err() {
        return fail_rewrite::<F>(pkt, svc.svc_id);
    }
    exit(stat, OK)
}

/// A client's packet rewritten as its forward entry says: DNAT, and SNAT too for a
/// source-NAT-ed connection (hairpin).
#[inline(always)]
fn translate<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    t: &Translation<F::Addr>,
) -> Result<(), nat::RewriteError> {
    if t.snat {
        F::rewrite_both(ctx, pkt, &t.forward(pkt))
    } else {
        F::rewrite_dst(ctx, pkt, t.addr, t.port)
    }
}

/// A packet to no service: a reply from a backend gets the frontend back as its source.
#[inline(always)]
fn maybe_reply<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Result<i32, i32> {
    let (word, mask) = reply_filter::word_and_mask(F::reply_bit(pkt.saddr, pkt.sport, pkt.proto));
    let maybe = match REPLY_FILTER.get(word) {
        Some(bits) => *bits & mask != 0,
        None => false,
    };
    if !maybe {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    let Some(ct) = F::conntrack().get_ptr_mut(conntrack::tuple_key::<F>(pkt)) else {
        return exit(stats::PASS_NOT_SERVICE, OK);
    };
    if F::Ct::dir(ct) != CT_DIR_REPLY {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    reply::<F>(ctx, pkt, ct)
}

/// A backend's packet on reply entry `ct`: the frontend becomes its source, and for a
/// source-NAT-ed connection the client its destination.
#[inline(always)]
fn reply<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>, ct: *mut F::Ct) -> Result<i32, i32> {
    let t = Translation::of(ct);
    let svc_id = F::Ct::svc_id(ct);
    count_service(svc_id, ctx.len() as u64, true);
    conntrack::note_closing::<F>(pkt, ct);
    conntrack::note_closing_forward::<F>(pkt, &t);
    conntrack::touch::<F>(ct);
    if conntrack::note_replied::<F>(ct) {
        F::mon_first_reply(pkt, svc_id, t.client_of_reply(pkt), (t.addr, t.port));
    }
    let done = if t.snat {
        F::rewrite_both(ctx, pkt, &t.reply(pkt))
    } else {
        F::rewrite_src(ctx, pkt, t.addr, t.port)
    };
    if done.is_err() {
        return fail_rewrite::<F>(pkt, svc_id);
    }
    exit(stats::REPLY, OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
