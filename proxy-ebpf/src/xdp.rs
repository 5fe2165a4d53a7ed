//! The external view at XDP on the node interfaces: NodePorts, external IPs and
//! LoadBalancer IPs (`services4` entries of scope `SCOPE_EXTERNAL`), before the kernel
//! stack sees the packet.
//!
//! - A frontend with loadBalancerSourceRanges drops clients outside them (`src_ranges4`).
//! - A tracked connection is translated as its conntrack entry says.
//! - A new one gets a backend from the service's scheduler. A backend on this node
//!   (`BACKEND_LOCAL`), or any backend of a service without `SVC_F_SNAT`
//!   (externalTrafficPolicy Local), gets the packet DNAT-ed only, client address kept, and
//!   handed to the stack (XDP_PASS), which delivers it to the pod; the pod's reply is
//!   translated back by `tc_ingress` at the pod's veth, from the same two conntrack entries
//!   tc makes. A backend on another node under `SVC_F_SNAT` (externalTrafficPolicy
//!   Cluster) gets it DNAT-ed and source-NAT-ed to the node's SNAT address and a free port,
//!   so the reply comes back here, where it is found by its destination (the SNAT address
//!   and a port of the SNAT range) and translated back to the client.
//! - No backend: drop under `SVC_F_DROP_EMPTY` (a traffic policy Local without a local
//!   endpoint), else an ICMP port unreachable sent back (XDP_TX), as tc does.
//!
//! Source-NAT-ed packets (both directions) are forwarded with `bpf_fib_lookup` when
//! `node_cfg4` has `NODE_F_FIB_FORWARD`: XDP_TX out of the interface they came in on, or
//! XDP_REDIRECT to another; anything the FIB does not resolve at once (no neighbour entry
//! yet, a local destination, fragmentation needed) goes to the stack, which does. DNAT-only
//! packets always go to the stack: their backend is a pod behind a veth, and a frame
//! redirected into a veth whose peer runs no XDP program is dropped.
//!
//! Packets passed to the stack after SNAT (or a NodePort reply) carry one of the node's own
//! addresses as their source: the node interfaces need `accept_local=1`, or the stack
//! drops them as martians (see README).
//!
//! Checksums are updated by hand (`nat::rewrite_xdp`), assuming complete L4 checksums as
//! frames from a wire have; see there for frames from a local veth.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    btf_maps::PerCpuArray,
    btf_maps::lpm_trie::Key,
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::btf_map,
    programs::XdpContext,
};
use proxy_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    monitor::{
        REASON_BACKEND_MISSING, REASON_CT_FULL, REASON_MIDSTREAM, REASON_NO_BACKEND,
        REASON_NO_LOCAL_BACKEND, REASON_REWRITE, REASON_SNAT_PORTS, REASON_SOURCE_RANGE,
    },
    service::{
        BACKEND_LOCAL, NODE_F_FIB_FORWARD, NodeConfig4, SCOPE_EXTERNAL, SVC_F_DROP_EMPTY,
        SVC_F_SNAT, SVC_F_SOURCE_RANGES, SourceRange4Key, Svc4Key, sched_counts_connections,
    },
    stats,
};

use crate::{
    conntrack::{self, CreateError, Created, Snat, Translation},
    csum,
    maps::{
        CONNTRACK4, NODE_CFG4, SERVICES4, SRC_RANGES4, count, count_new_connection, count_service,
    },
    monitor, nat,
    parse::{self, ETH_LEN, IP_CSUM, IP_TTL, Packet, TCP_SYN, ptr_at_mut},
    reject,
    sched::{self, Service},
};

/// The parameters of `bpf_fib_lookup` (see [`forward`]). Not pinned: scratch space only.
#[btf_map(name = "fib_scratch")]
static FIB_SCRATCH: PerCpuArray<FibParams, 1> = PerCpuArray::new();

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
const AF_INET: u8 = 2;
const FIB_SUCCESS: i64 = aya_ebpf::bindings::BPF_FIB_LKUP_RET_SUCCESS as i64;

/// Counts `stat` and returns `action`.
#[inline(always)]
fn exit(stat: u32, action: u32) -> u32 {
    count(stat);
    action
}

/// The program: parse, then the external frontend or an SNAT reply.
#[inline(always)]
pub fn nodeport(ctx: &XdpContext) -> u32 {
    // Not IPv4 TCP/UDP, a fragment or a malformed header: the stack's business (a
    // fragment of a connection to a frontend is not translated; see README).
    let Ok(pkt) = parse::parse(ctx) else {
        return exit(stats::XDP_PASS, PASS);
    };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let key = Svc4Key {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_EXTERNAL,
    };
    match SERVICES4.get_ptr(key) {
        Some(svc) => {
            // SAFETY: a lookup result.
            let (svc, flags) = unsafe { Service::read(svc) };
            external(ctx, &pkt, &svc, flags, len)
        }
        None => snat_reply(ctx, &pkt, len),
    }
}

/// The client is inside one of the frontend's loadBalancerSourceRanges (also asked by
/// `tc_ingress`: kube-proxy holds pods to the ranges too).
#[inline(always)]
pub(crate) fn source_allowed(svc_id: u32, client: [u8; 4]) -> bool {
    // The trie matches svc_id's 32 bits whole, then the longest range prefix.
    let key = Key::new(
        64,
        SourceRange4Key {
            svc_id_be: svc_id.to_be_bytes(),
            addr: client,
        },
    );
    SRC_RANGES4.get(&key).is_some()
}

/// A packet to an external frontend.
#[inline(always)]
fn external(ctx: &XdpContext, pkt: &Packet, svc: &Service, flags: u8, len: u64) -> u32 {
    if flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(svc.svc_id, pkt.saddr) {
        monitor::dropped(pkt, svc.svc_id, REASON_SOURCE_RANGE);
        return exit(stats::DROP_SOURCE_RANGE, DROP);
    }
    count_service(svc.svc_id, len, false);
    if let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) {
        // SAFETY: a lookup result, read and written only through this pointer.
        let (dir, ct_flags) = unsafe { ((*ct).dir, (*ct).flags) };
        let t = Translation::of(ct);
        if dir == CT_DIR_FORWARD {
            if !(pkt.is_syn() && ct_flags & CT_FLAG_CLOSING != 0) {
                if pkt.is_closing() {
                    conntrack::note_closing(pkt, ct);
                    conntrack::release(&conntrack::tuple_key(pkt), ct);
                }
                conntrack::touch(ct);
                return translate(ctx, pkt, &t, svc.svc_id, stats::XDP_FORWARD_ESTABLISHED);
            }
            // A new connection reuses the tuple of a closed one: select anew below.
            conntrack::forget_reply(pkt, &t);
            conntrack::forget_forward(pkt, ct);
        }
    }
    if svc.count == 0 {
        if flags & SVC_F_DROP_EMPTY != 0 {
            monitor::dropped(pkt, svc.svc_id, REASON_NO_LOCAL_BACKEND);
            return exit(stats::DROP_NO_LOCAL_BACKEND, DROP);
        }
        monitor::dropped(pkt, svc.svc_id, REASON_NO_BACKEND);
        return match reject::reject_xdp(ctx, pkt) {
            Ok(action) => exit(stats::REJECT_NO_BACKEND, action),
            Err(_) => {
                monitor::dropped(pkt, svc.svc_id, REASON_REWRITE);
                exit(stats::ERR_REWRITE, DROP)
            }
        };
    }
    new_connection(ctx, pkt, svc, flags)
}

/// A packet to a frontend with backends and without a tracked connection: pick a backend.
#[inline(always)]
fn new_connection(ctx: &XdpContext, pkt: &Packet, svc: &Service, flags: u8) -> u32 {
    let Ok(chosen) = sched::choose(pkt, svc) else {
        monitor::dropped(pkt, svc.svc_id, REASON_BACKEND_MISSING);
        return exit(stats::ERR_BACKEND_MISSING, PASS);
    };
    let snat = if flags & SVC_F_SNAT != 0 && chosen.flags & BACKEND_LOCAL == 0 {
        match node_cfg() {
            Some(cfg) => Snat::Alloc {
                addr: cfg.snat_addr,
                min: cfg.snat_port_min,
                max: cfg.snat_port_max,
            },
            None => Snat::Alloc {
                addr: [0; 4],
                min: 1,
                max: 0,
            },
        }
    } else {
        Snat::None
    };
    let counted = pkt.is_tcp() && sched_counts_connections(svc.scheduler);
    // A TCP packet that is no SYN starts nothing: its connection lost its entries.
    let midstream = pkt.is_tcp() && pkt.tcp_flags & TCP_SYN == 0;
    match conntrack::create(pkt, svc.svc_id, chosen.addr, chosen.port, counted, snat) {
        Ok(Created::New(t)) => {
            count_new_connection(svc.svc_id);
            let (stat, reason) = if midstream {
                (stats::CT_MISS_MIDSTREAM, REASON_MIDSTREAM)
            } else {
                (stats::XDP_FORWARD_NEW, 0)
            };
            monitor::new_connection(pkt, svc.svc_id, svc.scheduler, (t.addr, t.port), reason);
            translate(ctx, pkt, &t, svc.svc_id, stat)
        }
        Ok(Created::Raced(t)) => {
            translate(ctx, pkt, &t, svc.svc_id, stats::XDP_FORWARD_ESTABLISHED)
        }
        Err(CreateError::Full) => {
            monitor::dropped(pkt, svc.svc_id, REASON_CT_FULL);
            exit(stats::ERR_CONNTRACK_FULL, PASS)
        }
        Err(CreateError::NoSnatPort) => {
            monitor::dropped(pkt, svc.svc_id, REASON_SNAT_PORTS);
            exit(stats::ERR_SNAT_PORTS, DROP)
        }
    }
}

/// A client's packet rewritten as its forward entry says, counted as `stat`, then
/// forwarded (SNAT) or handed to the stack (DNAT only).
#[inline(always)]
fn translate(ctx: &XdpContext, pkt: &Packet, t: &Translation, svc_id: u32, stat: u32) -> u32 {
    if nat::rewrite_xdp(ctx, pkt, &t.forward(pkt)).is_err() {
        monitor::dropped(pkt, svc_id, REASON_REWRITE);
        return exit(stats::ERR_REWRITE, DROP);
    }
    count(stat);
    if t.snat { forward(ctx) } else { PASS }
}

#[inline(always)]
fn node_cfg() -> Option<NodeConfig4> {
    NODE_CFG4.get(0).copied()
}

/// A packet to no external frontend: a backend's reply to an SNAT-ed connection (to the
/// SNAT address, at a port of the SNAT range) goes back to the client from the frontend;
/// anything else to the stack untouched.
#[inline(always)]
fn snat_reply(ctx: &XdpContext, pkt: &Packet, len: u64) -> u32 {
    let Some(cfg) = node_cfg() else {
        return exit(stats::XDP_PASS, PASS);
    };
    if pkt.daddr != cfg.snat_addr || pkt.dport < cfg.snat_port_min || pkt.dport > cfg.snat_port_max
    {
        return exit(stats::XDP_PASS, PASS);
    }
    let Some(ct) = CONNTRACK4.get_ptr_mut(conntrack::tuple_key(pkt)) else {
        return exit(stats::XDP_PASS, PASS);
    };
    let t = Translation::of(ct);
    // SAFETY: a lookup result.
    let (dir, svc_id) = unsafe { ((*ct).dir, (*ct).svc_id) };
    if dir != CT_DIR_REPLY || !t.snat {
        return exit(stats::XDP_PASS, PASS);
    }
    count_service(svc_id, len, true);
    conntrack::note_closing(pkt, ct);
    conntrack::note_closing_forward(pkt, &t);
    conntrack::touch(ct);
    if conntrack::note_replied(ct) {
        monitor::first_reply(pkt, svc_id, t.client_of_reply(pkt), (t.addr, t.port));
    }
    if nat::rewrite_xdp(ctx, pkt, &t.reply(pkt)).is_err() {
        return exit(stats::ERR_REWRITE, DROP);
    }
    count(stats::XDP_SNAT_REPLY);
    forward(ctx)
}

/// Sends a translated packet on with the FIB's next hop when `NODE_F_FIB_FORWARD` is set
/// and the FIB resolves it completely; else hands it to the stack. The TTL is decremented
/// as a router does (a packet that would expire goes to the stack, which answers it).
/// Out of line, and its 64 bytes of lookup parameters in a per-CPU scratch map: the
/// verifier allows 512 bytes of stack for a whole call chain.
#[inline(never)]
fn forward(ctx: &XdpContext) -> u32 {
    match node_cfg() {
        Some(cfg) if cfg.flags & NODE_F_FIB_FORWARD != 0 => {}
        _ => return PASS,
    }
    let Some(ip) = ptr_at_mut::<_, [u8; 20]>(ctx, ETH_LEN) else {
        return PASS;
    };
    // SAFETY: checked against data_end by ptr_at_mut.
    let hdr = unsafe { *ip };
    if hdr[IP_TTL] <= 1 {
        return PASS;
    }
    let Some(p) = FIB_SCRATCH.get_ptr_mut(0) else {
        return PASS;
    };
    // SAFETY: this CPU's own slot, used by one program run at a time.
    let p = unsafe { &mut *p };
    // SAFETY: a plain C struct, all zero is a valid value.
    *p = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = hdr[9];
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    p.__bindgen_anon_2.tos = hdr[1];
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let ingress = ctx.ingress_ifindex() as u32;
    p.ifindex = ingress;
    // SAFETY: `p` is a map value of the size given.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc != FIB_SUCCESS {
        return PASS;
    }
    // Pointers are re-derived: the helper call ended the verifier's knowledge of them.
    let Some(ip) = ptr_at_mut::<_, [u8; 20]>(ctx, ETH_LEN) else {
        return PASS;
    };
    let Some(eth) = ptr_at_mut::<_, [u8; 12]>(ctx, 0) else {
        return PASS;
    };
    // SAFETY: checked against data_end by ptr_at_mut.
    unsafe {
        let old = [(*ip)[IP_TTL], (*ip)[IP_TTL + 1]];
        let new = [old[0] - 1, old[1]];
        let c = [(*ip)[IP_CSUM], (*ip)[IP_CSUM + 1]];
        let c = csum::apply(c, csum::delta(0, &old, &new));
        (*ip)[IP_TTL] = new[0];
        (*ip)[IP_CSUM] = c[0];
        (*ip)[IP_CSUM + 1] = c[1];
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        *eth = macs;
    }
    count(stats::XDP_FIB_REDIRECT);
    if p.ifindex == ingress {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a helper taking no pointers; returns XDP_REDIRECT or XDP_ABORTED.
    unsafe { bpf_redirect(p.ifindex, 0) as u32 }
}
