//! The external view at XDP on the node interfaces: NodePorts, external IPs and
//! LoadBalancer IPs (`services4` and `services6` entries of scope `SCOPE_EXTERNAL`), before
//! the kernel stack sees the packet. IPv4 and IPv6 are served alike (generic over the
//! [`Family`]), each with its own maps (`*4`, `*6`, `node_cfg6` for IPv6 SNAT).
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
//! Checksums are updated by hand (`nat::rewrite_xdp`, `nat::rewrite_xdp6`), assuming complete L4 checksums as
//! frames from a wire have; see there for frames from a local veth.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    btf_maps::PerCpuArray,
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
        BACKEND_LOCAL, NODE_F_FIB_FORWARD, SCOPE_EXTERNAL, SVC_F_DROP_EMPTY, SVC_F_SNAT,
        SVC_F_SOURCE_RANGES, sched_counts_connections,
    },
    stats,
};

use crate::{
    conntrack::{self, CreateError, Created, NewConn, Snat, Translation},
    csum,
    family::{CtEntry, Family, V4, V6},
    maps::{count, count_new_connection, count_service},
    parse::{
        self, ETH_LEN, IP_CSUM, IP_TTL, IP6_HOP_LIMIT, IPV6_LEN, L3, Packet, TCP_SYN, ptr_at_mut,
    },
    sched::{self, Service},
};

/// The parameters of `bpf_fib_lookup` (see [`forward4`]). Not pinned: scratch space only.
#[btf_map(name = "fib_scratch")]
static FIB_SCRATCH: PerCpuArray<FibParams, 1> = PerCpuArray::new();

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
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
    // Not TCP/UDP over IPv4 or IPv6, a fragment or a malformed header: the stack's
    // business (a fragment of a connection to a frontend is not translated; see README).
    match parse::ethertype(ctx) {
        Ok(L3::Ipv4) => serve::<V4>(ctx),
        Ok(L3::Ipv6) => serve::<V6>(ctx),
        Err(_) => exit(stats::XDP_PASS, PASS),
    }
}

/// One family's external view, out of line: each family's path gets its own stack frame
/// (see `tc_family` in main.rs).
#[inline(never)]
fn serve<F: Family>(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = F::parse(ctx) else {
        return exit(stats::XDP_PASS, PASS);
    };
    let Some(pkt) = F::stash(&pkt) else {
        return exit(stats::XDP_PASS, PASS);
    };
    // SAFETY: `stash` gives the packet itself or this CPU's scratch copy of it.
    let pkt = unsafe { &*pkt };
    let len = (ctx.data_end() - ctx.data()) as u64;
    match F::service(pkt.daddr, pkt.dport, pkt.proto, SCOPE_EXTERNAL) {
        Some(svc) => {
            // SAFETY: a lookup result.
            let (svc, flags) = unsafe { Service::read(svc) };
            external::<F>(ctx, pkt, &svc, flags, len)
        }
        None => snat_reply::<F>(ctx, pkt, len),
    }
}

/// A packet to an external frontend.
#[inline(always)]
fn external<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    svc: &Service,
    flags: u8,
    len: u64,
) -> u32 {
    if flags & SVC_F_SOURCE_RANGES != 0 && !F::source_allowed(svc.svc_id, pkt.saddr) {
        F::mon_dropped(pkt, svc.svc_id, REASON_SOURCE_RANGE);
        return exit(stats::DROP_SOURCE_RANGE, DROP);
    }
    count_service(svc.svc_id, len, false);
    let fkey = conntrack::tuple_key::<F>(pkt);
    if let Some(ct) = F::conntrack().get_ptr_mut(&fkey) {
        let dir = F::Ct::dir(ct);
        // SAFETY: a lookup result, read and written only through this pointer.
        let ct_flags = unsafe { *F::Ct::flags(ct) };
        let t = Translation::of(ct);
        if dir == CT_DIR_FORWARD {
            if !(pkt.is_syn() && ct_flags & CT_FLAG_CLOSING != 0) {
                if pkt.is_closing() {
                    conntrack::note_closing::<F>(pkt, ct);
                    conntrack::release::<F>(&fkey, ct);
                }
                conntrack::touch::<F>(ct);
                return translate::<F>(ctx, pkt, &t, svc.svc_id, stats::XDP_FORWARD_ESTABLISHED);
            }
            // A new connection reuses the tuple of a closed one: select anew below.
            conntrack::forget_reply::<F>(pkt, &t);
            conntrack::forget_forward::<F>(pkt, ct);
        }
    }
    if svc.count == 0 {
        if flags & SVC_F_DROP_EMPTY != 0 {
            F::mon_dropped(pkt, svc.svc_id, REASON_NO_LOCAL_BACKEND);
            return exit(stats::DROP_NO_LOCAL_BACKEND, DROP);
        }
        F::mon_dropped(pkt, svc.svc_id, REASON_NO_BACKEND);
        return match F::reject_xdp(ctx, pkt) {
            Ok(action) => exit(stats::REJECT_NO_BACKEND, action),
            Err(_) => {
                F::mon_dropped(pkt, svc.svc_id, REASON_REWRITE);
                exit(stats::ERR_REWRITE, DROP)
            }
        };
    }
    new_connection::<F>(ctx, pkt, svc, flags)
}

/// A packet to a frontend with backends and without a tracked connection: pick a backend.
#[inline(always)]
fn new_connection<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    svc: &Service,
    flags: u8,
) -> u32 {
    let Ok(chosen) = sched::choose::<F>(pkt, svc) else {
        F::mon_dropped(pkt, svc.svc_id, REASON_BACKEND_MISSING);
        return exit(stats::ERR_BACKEND_MISSING, PASS);
    };
    let snat = if flags & SVC_F_SNAT != 0 && chosen.flags & BACKEND_LOCAL == 0 {
        match F::node() {
            Some(cfg) => Snat::Alloc {
                addr: cfg.snat_addr,
                min: cfg.port_min,
                max: cfg.port_max,
            },
            None => Snat::Alloc {
                addr: F::ZERO,
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
    match conntrack::create::<F>(
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
            let (stat, reason) = if midstream {
                (stats::CT_MISS_MIDSTREAM, REASON_MIDSTREAM)
            } else {
                (stats::XDP_FORWARD_NEW, 0)
            };
            F::mon_new(pkt, svc.svc_id, svc.scheduler, (t.addr, t.port), reason);
            translate::<F>(ctx, pkt, &t, svc.svc_id, stat)
        }
        Ok(Created::Raced(t)) => {
            translate::<F>(ctx, pkt, &t, svc.svc_id, stats::XDP_FORWARD_ESTABLISHED)
        }
        Err(CreateError::Full) => {
            F::mon_dropped(pkt, svc.svc_id, REASON_CT_FULL);
            exit(stats::ERR_CONNTRACK_FULL, PASS)
        }
        Err(CreateError::NoSnatPort) => {
            F::mon_dropped(pkt, svc.svc_id, REASON_SNAT_PORTS);
            exit(stats::ERR_SNAT_PORTS, DROP)
        }
    }
}

/// A client's packet rewritten as its forward entry says, counted as `stat`, then
/// forwarded (SNAT) or handed to the stack (DNAT only).
#[inline(always)]
fn translate<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    t: &Translation<F::Addr>,
    svc_id: u32,
    stat: u32,
) -> u32 {
    if F::rewrite_xdp(ctx, pkt, &t.forward(pkt)).is_err() {
        F::mon_dropped(pkt, svc_id, REASON_REWRITE);
        return exit(stats::ERR_REWRITE, DROP);
    }
    count(stat);
    if t.snat { F::forward(ctx) } else { PASS }
}

/// A packet to no external frontend: a backend's reply to an SNAT-ed connection (to the
/// SNAT address, at a port of the SNAT range) goes back to the client from the frontend;
/// anything else to the stack untouched.
#[inline(always)]
fn snat_reply<F: Family>(ctx: &XdpContext, pkt: &Packet<F::Addr>, len: u64) -> u32 {
    let Some(cfg) = F::node() else {
        return exit(stats::XDP_PASS, PASS);
    };
    if !F::same(&pkt.daddr, &cfg.snat_addr) || pkt.dport < cfg.port_min || pkt.dport > cfg.port_max
    {
        return exit(stats::XDP_PASS, PASS);
    }
    let Some(ct) = F::conntrack().get_ptr_mut(conntrack::tuple_key::<F>(pkt)) else {
        return exit(stats::XDP_PASS, PASS);
    };
    let t = Translation::of(ct);
    let (dir, svc_id) = (F::Ct::dir(ct), F::Ct::svc_id(ct));
    if dir != CT_DIR_REPLY || !t.snat {
        return exit(stats::XDP_PASS, PASS);
    }
    count_service(svc_id, len, true);
    conntrack::note_closing::<F>(pkt, ct);
    conntrack::note_closing_forward::<F>(pkt, &t);
    conntrack::touch::<F>(ct);
    if conntrack::note_replied::<F>(ct) {
        F::mon_first_reply(pkt, svc_id, t.client_of_reply(pkt), (t.addr, t.port));
    }
    if F::rewrite_xdp(ctx, pkt, &t.reply(pkt)).is_err() {
        return exit(stats::ERR_REWRITE, DROP);
    }
    count(stats::XDP_SNAT_REPLY);
    F::forward(ctx)
}

/// The FIB lookup parameters of this CPU, zeroed, if forwarding is on.
#[inline(always)]
fn fib_params(flags: Option<u32>) -> Option<&'static mut FibParams> {
    match flags {
        Some(f) if f & NODE_F_FIB_FORWARD != 0 => {}
        _ => return None,
    }
    let p = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot, used by one program run at a time.
    let p = unsafe { &mut *p };
    // SAFETY: a plain C struct, all zero is a valid value.
    *p = unsafe { core::mem::zeroed() };
    Some(p)
}

/// Runs the lookup; the egress ifindex when it resolved the next hop completely.
#[inline(always)]
fn fib_lookup(ctx: &XdpContext, p: &mut FibParams) -> Option<u32> {
    p.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `p` is a map value of the size given.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<FibParams>() as i32, 0) };
    (rc == FIB_SUCCESS).then_some(p.ifindex)
}

/// Writes the next hop's MACs and sends the frame out of `ifindex`.
#[inline(always)]
fn send(ctx: &XdpContext, p: &FibParams, ifindex: u32) -> u32 {
    let Some(eth) = ptr_at_mut::<_, [u8; 12]>(ctx, 0) else {
        return PASS;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    // SAFETY: checked against data_end by ptr_at_mut.
    unsafe { *eth = macs };
    count(stats::XDP_FIB_REDIRECT);
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a helper taking no pointers; returns XDP_REDIRECT or XDP_ABORTED.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// Sends a translated IPv4 packet on with the FIB's next hop when `NODE_F_FIB_FORWARD` is
/// set and the FIB resolves it completely; else hands it to the stack. The TTL is
/// decremented as a router does (a packet that would expire goes to the stack, which
/// answers it). Out of line, and its 64 bytes of lookup parameters in a per-CPU scratch
/// map: the verifier allows 512 bytes of stack for a whole call chain.
#[inline(never)]
pub(crate) fn forward4(ctx: &XdpContext) -> u32 {
    let Some(p) = fib_params(V4::node().map(|c| c.flags)) else {
        return PASS;
    };
    let Some(ip) = ptr_at_mut::<_, [u8; 20]>(ctx, ETH_LEN) else {
        return PASS;
    };
    // SAFETY: checked against data_end by ptr_at_mut.
    let hdr = unsafe { *ip };
    if hdr[IP_TTL] <= 1 {
        return PASS;
    }
    p.family = AF_INET;
    p.l4_protocol = hdr[9];
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    p.__bindgen_anon_2.tos = hdr[1];
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let Some(ifindex) = fib_lookup(ctx, p) else {
        return PASS;
    };
    // Pointers are re-derived: the helper call ended the verifier's knowledge of them.
    let Some(ip) = ptr_at_mut::<_, [u8; 20]>(ctx, ETH_LEN) else {
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
    }
    send(ctx, p, ifindex)
}

/// As [`forward4`], for IPv6 (`AF_INET6`): the hop limit is decremented (no header
/// checksum to update).
#[inline(never)]
pub(crate) fn forward6(ctx: &XdpContext) -> u32 {
    let Some(p) = fib_params(V6::node().map(|c| c.flags)) else {
        return PASS;
    };
    let Some(ip) = ptr_at_mut::<_, [u8; IPV6_LEN]>(ctx, ETH_LEN) else {
        return PASS;
    };
    // SAFETY: checked against data_end by ptr_at_mut.
    let hdr = unsafe { &*ip };
    if hdr[IP6_HOP_LIMIT] <= 1 {
        return PASS;
    }
    p.family = AF_INET6;
    p.l4_protocol = hdr[6];
    // The MTU check compares the whole IP packet.
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes([hdr[4], hdr[5]]) + IPV6_LEN as u16;
    // Traffic class and flow label, as the kernel's own lookup keys them.
    p.__bindgen_anon_2.flowinfo = u32::from_ne_bytes([hdr[0] & 0x0f, hdr[1], hdr[2], hdr[3]]);
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    // SAFETY: plain arrays of the same size (the union's IPv6 views, wire order).
    unsafe {
        p.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(src);
        p.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(dst);
    }
    let Some(ifindex) = fib_lookup(ctx, p) else {
        return PASS;
    };
    let Some(ip) = ptr_at_mut::<_, [u8; IPV6_LEN]>(ctx, ETH_LEN) else {
        return PASS;
    };
    // SAFETY: checked against data_end by ptr_at_mut.
    unsafe { (*ip)[IP6_HOP_LIMIT] -= 1 };
    send(ctx, p, ifindex)
}
