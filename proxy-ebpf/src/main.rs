//! bpfproxy datapath: ClusterIP load balancing for IPv4 TCP/UDP at tc ingress of the node
//! side of every pod's veth (that is, on what the pod sends).
//!
//! A packet to a service frontend gets its destination rewritten to a backend (chosen at
//! random on the first packet, then pinned by conntrack); a packet from a backend on a
//! tracked connection gets its source rewritten back to the frontend. Everything else passes
//! untouched after one hash lookup and one array read. Every exit is counted in `stats`.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod maps;
mod nat;
mod parse;
mod reject;

use aya_ebpf::{
    bindings::{TC_ACT_OK as ACT_OK, TC_ACT_SHOT as ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    reply_filter,
    service::{BackendSlotKey, SCOPE_CLUSTER_IP, Svc4Key},
    stats,
};

use crate::{
    maps::{BACKEND_SLOTS4, CONNTRACK4, REPLY_FILTER4, SERVICES4, count},
    parse::{Packet, Skip},
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

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(Skip::NotIpv4 | Skip::NotTcpUdp) => return exit(stats::PASS_NOT_SERVICE, OK),
        Err(Skip::Fragment) => return exit(stats::PASS_FRAGMENT, OK),
        Err(Skip::Malformed) => return exit(stats::PASS_MALFORMED, OK),
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
            let (svc_id, table, backend_count) =
                unsafe { ((*svc).svc_id, (*svc).table, (*svc).backend_count) };
            to_service(ctx, &pkt, svc_id, table, backend_count)
        }
        None => maybe_reply(ctx, &pkt),
    }
}

/// A packet to a service frontend: DNAT to the connection's backend, or pick one.
#[inline(always)]
fn to_service(
    ctx: &TcContext,
    pkt: &Packet,
    svc_id: u32,
    table: u32,
    backend_count: u32,
) -> Result<i32, i32> {
    if let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) {
        // SAFETY: a lookup result, read and written only through this pointer.
        let (dir, flags, addr, port) =
            unsafe { ((*ct).dir, (*ct).flags, (*ct).nat_addr, (*ct).nat_port) };
        if dir == CT_DIR_FORWARD {
            if !(pkt.is_syn() && flags & CT_FLAG_CLOSING != 0) {
                conntrack::note_closing(pkt, ct);
                if nat::rewrite_dst(ctx, pkt, addr, port).is_err() {
                    return fail(stats::ERR_REWRITE);
                }
                return exit(stats::FORWARD_ESTABLISHED, OK);
            }
            // A new connection reuses the tuple of a closed one: select anew below.
            conntrack::forget_reply(pkt, addr, port);
        }
    }

    if backend_count == 0 {
        return match reject::reject(ctx, pkt) {
            Ok(action) => exit(stats::REJECT_NO_BACKEND, action),
            Err(_) => fail(stats::ERR_REWRITE),
        };
    }
    // SAFETY: a helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % backend_count;
    let Some(backend) = BACKEND_SLOTS4.get_ptr(BackendSlotKey { table, slot }) else {
        return exit(stats::ERR_BACKEND_MISSING, OK);
    };
    // SAFETY: a lookup result.
    let (addr, port) = unsafe { ((*backend).addr, (*backend).port) };
    if conntrack::create(pkt, svc_id, addr, port).is_err() {
        return exit(stats::ERR_CONNTRACK_FULL, OK);
    }
    if nat::rewrite_dst(ctx, pkt, addr, port).is_err() {
        return fail(stats::ERR_REWRITE);
    }
    exit(stats::FORWARD_NEW, OK)
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
    let (dir, addr, port) = unsafe { ((*ct).dir, (*ct).nat_addr, (*ct).nat_port) };
    if dir != CT_DIR_REPLY {
        return exit(stats::PASS_NOT_SERVICE, OK);
    }
    conntrack::note_closing(pkt, ct);
    conntrack::note_closing_forward(pkt, addr, port);
    if nat::rewrite_src(ctx, pkt, addr, port).is_err() {
        return fail(stats::ERR_REWRITE);
    }
    exit(stats::REPLY, OK)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
