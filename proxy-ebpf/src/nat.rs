//! Address and port rewrites with incremental checksum updates, at tc (through helpers)
//! and at XDP (direct writes, checksums by hand; see [`rewrite_xdp`]), for IPv4 and
//! (at the end of the file) IPv6.
//!
//! The IPv4 header checksum is updated here (RFC 1624) and written together with the
//! addresses, and with the ports too when the header has no options: one
//! `bpf_skb_store_bytes` for the whole span. The header checksum covers only the header, so
//! doing it by hand is exact whatever the skb's checksum state.
//!
//! The L4 checksum is left to `bpf_l4_csum_replace`, which knows that state. The address
//! change carries `BPF_F_PSEUDO_HDR`: the address is in the pseudo header, and that flag is
//! what keeps a CHECKSUM_PARTIAL skb (locally sent TCP/UDP on a veth) right, where the field
//! holds only the pseudo-header sum. The port change is a plain replace, which the kernel
//! skips for CHECKSUM_PARTIAL. UDP sent without a checksum keeps its zero;
//! `BPF_F_MARK_MANGLED_0` turns a computed zero into 0xffff.
//!
//! Writes go through `bpf_skb_store_bytes` rather than packet pointers: a direct write makes
//! the verifier add an unclone prologue to the whole program, and every TCP segment is a
//! clone (the socket keeps the original for retransmission), so each packet, service or not,
//! would pay for a copy of its linear data. The helper only needs the bytes it writes to be
//! private, which the headers of a TCP clone already are. All packet fields used here were
//! read by `parse` before the first helper call, so no packet pointer needs re-deriving.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};

use crate::{
    csum,
    family::eq16,
    parse::{
        A6, ETH_LEN, IP_CSUM, IP6_SADDR, IPV4_MIN_LEN, IPV6_LEN, Packet4, Packet6, TCP_CSUM,
        UDP_CSUM, ptr_at_mut,
    },
};

/// The addresses and ports a packet gets (wire-order addresses, host-order ports).
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub saddr: A,
    pub sport: u16,
    pub daddr: A,
    pub dport: u16,
}

/// A helper call failed; the packet may be half rewritten and must be dropped.
pub struct RewriteError;

/// Checksum, source and destination address, source and destination port of an IPv4
/// header without options followed by its L4 header.
#[repr(C)]
struct Span {
    ip_csum: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

const SPAN_OFF: usize = ETH_LEN + IP_CSUM;
/// Checksum and both addresses: the part of `Span` inside any IPv4 header.
const SPAN_ADDRS: usize = 10;
const _: () = assert!(core::mem::size_of::<Span>() == 14);
const _: () = assert!(SPAN_OFF + core::mem::size_of::<Span>() == ETH_LEN + IPV4_MIN_LEN + 4);

/// Client -> VIP becomes client -> backend.
#[inline(always)]
pub fn rewrite_dst(
    ctx: &TcContext,
    pkt: &Packet4,
    addr: [u8; 4],
    port: u16,
) -> Result<(), RewriteError> {
    let span = Span {
        ip_csum: csum::ipv4_update(pkt.ip_csum, pkt.daddr, addr),
        saddr: pkt.saddr,
        daddr: addr,
        sport: pkt.sport.to_be_bytes(),
        dport: port.to_be_bytes(),
    };
    rewrite(
        ctx,
        pkt,
        &span,
        pkt.daddr,
        addr,
        pkt.l4_off + 2,
        pkt.dport,
        port,
    )
}

/// Backend -> client becomes VIP -> client.
#[inline(always)]
pub fn rewrite_src(
    ctx: &TcContext,
    pkt: &Packet4,
    addr: [u8; 4],
    port: u16,
) -> Result<(), RewriteError> {
    let span = Span {
        ip_csum: csum::ipv4_update(pkt.ip_csum, pkt.saddr, addr),
        saddr: addr,
        daddr: pkt.daddr,
        sport: port.to_be_bytes(),
        dport: pkt.dport.to_be_bytes(),
    };
    rewrite(
        ctx, pkt, &span, pkt.saddr, addr, pkt.l4_off, pkt.sport, port,
    )
}

/// Both ends at once (a source-NAT-ed connection: NodePort SNAT, hairpin): the packet
/// becomes `new`. Out of line: used by source-NAT-ed connections only, it keeps its
/// spans off the stack frame of the common paths.
#[inline(never)]
pub fn rewrite_both(
    ctx: &TcContext,
    pkt: &Packet4,
    new: &Tuple<[u8; 4]>,
) -> Result<(), RewriteError> {
    let mut old_addrs = [0u8; 8];
    old_addrs[..4].copy_from_slice(&pkt.saddr);
    old_addrs[4..].copy_from_slice(&pkt.daddr);
    let mut new_addrs = [0u8; 8];
    new_addrs[..4].copy_from_slice(&new.saddr);
    new_addrs[4..].copy_from_slice(&new.daddr);
    let span = Span {
        ip_csum: csum::apply(pkt.ip_csum, csum::delta(0, &old_addrs, &new_addrs)),
        saddr: new.saddr,
        daddr: new.daddr,
        sport: new.sport.to_be_bytes(),
        dport: new.dport.to_be_bytes(),
    };
    let csum_off = pkt.l4_csum_off();
    let l4_flags = if pkt.is_tcp() {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    };
    if !pkt.no_l4_csum {
        for (old, new) in [(pkt.saddr, new.saddr), (pkt.daddr, new.daddr)] {
            if old != new {
                let from = u32::from_ne_bytes(old) as u64;
                let to = u32::from_ne_bytes(new) as u64;
                ctx.l4_csum_replace(csum_off, from, to, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)
                    .map_err(|_| RewriteError)?;
            }
        }
        for (old, new) in [(pkt.sport, new.sport), (pkt.dport, new.dport)] {
            if old != new {
                let from = u16::from_ne_bytes(old.to_be_bytes()) as u64;
                let to = u16::from_ne_bytes(new.to_be_bytes()) as u64;
                ctx.l4_csum_replace(csum_off, from, to, l4_flags | 2)
                    .map_err(|_| RewriteError)?;
            }
        }
    }
    if pkt.l4_off == ETH_LEN + IPV4_MIN_LEN {
        return ctx.store(SPAN_OFF, &span, 0).map_err(|_| RewriteError);
    }
    // SAFETY: `Span` is repr(C) and starts with its first SPAN_ADDRS bytes.
    let addrs = unsafe { &*(&span as *const Span as *const [u8; SPAN_ADDRS]) };
    ctx.store(SPAN_OFF, addrs, 0).map_err(|_| RewriteError)?;
    let ports = [span.sport[0], span.sport[1], span.dport[0], span.dport[1]];
    ctx.store(pkt.l4_off, &ports, 0).map_err(|_| RewriteError)
}

/// XDP: the packet becomes `new`, written in place, the IPv4 header and L4 checksums
/// updated by hand (RFC 1624: XDP has no skb, hence no checksum helpers and no checksum
/// state). A UDP datagram without a checksum keeps its zero; a computed zero becomes
/// 0xffff.
///
/// This assumes the L4 checksum is complete, as in a frame from a real wire. A frame sent
/// by a local socket over a veth is CHECKSUM_PARTIAL (the field holds only the
/// pseudo-header sum, to be completed by offload), which XDP cannot tell: the update is
/// then still a correct update of the pseudo-header part, but the peer sees a partial
/// checksum. Interfaces that feed a node from a veth (the tests' "wire") must have TX
/// checksum offload off (`ethtool -K <if> tx off`) so their frames arrive complete.
#[inline(always)]
pub fn rewrite_xdp(
    ctx: &XdpContext,
    pkt: &Packet4,
    new: &Tuple<[u8; 4]>,
) -> Result<(), RewriteError> {
    let addrs: *mut [u8; 8] = ptr_at_mut(ctx, ETH_LEN + IP_CSUM + 2).ok_or(RewriteError)?;
    let ip_csum: *mut [u8; 2] = ptr_at_mut(ctx, ETH_LEN + IP_CSUM).ok_or(RewriteError)?;
    let ports: *mut [u8; 4] = ptr_at_mut(ctx, pkt.l4_off).ok_or(RewriteError)?;
    let l4_csum: *mut [u8; 2] = ptr_at_mut(ctx, pkt.l4_csum_off()).ok_or(RewriteError)?;
    let mut new_addrs = [0u8; 8];
    new_addrs[..4].copy_from_slice(&new.saddr);
    new_addrs[4..].copy_from_slice(&new.daddr);
    let s = new.sport.to_be_bytes();
    let d = new.dport.to_be_bytes();
    let new_ports = [s[0], s[1], d[0], d[1]];
    // SAFETY: every pointer was checked against data_end by ptr_at_mut.
    unsafe {
        let addr_delta = csum::delta(0, &*addrs, &new_addrs);
        *ip_csum = csum::apply(*ip_csum, addr_delta);
        if !pkt.no_l4_csum {
            let mut c = csum::apply(*l4_csum, csum::delta(addr_delta, &*ports, &new_ports));
            if !pkt.is_tcp() && c == [0, 0] {
                c = [0xff, 0xff];
            }
            *l4_csum = c;
        }
        *addrs = new_addrs;
        *ports = new_ports;
    }
    Ok(())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet4,
    span: &Span,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), RewriteError> {
    let csum_off = pkt.l4_csum_off();
    let l4_flags = if pkt.is_tcp() {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    };
    let fix_l4 = !pkt.no_l4_csum;
    let addr_changes = old_addr != new_addr;
    let port_changes = old_port != new_port;

    if fix_l4 && addr_changes {
        // The helpers take the old and new values as they are in memory (network order).
        let from = u32::from_ne_bytes(old_addr) as u64;
        let to = u32::from_ne_bytes(new_addr) as u64;
        ctx.l4_csum_replace(csum_off, from, to, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)
            .map_err(|_| RewriteError)?;
    }
    if fix_l4 && port_changes {
        let from = u16::from_ne_bytes(old_port.to_be_bytes()) as u64;
        let to = u16::from_ne_bytes(new_port.to_be_bytes()) as u64;
        ctx.l4_csum_replace(csum_off, from, to, l4_flags | 2)
            .map_err(|_| RewriteError)?;
    }

    if pkt.l4_off == ETH_LEN + IPV4_MIN_LEN {
        // No options: checksum, addresses and ports are one span.
        return ctx.store(SPAN_OFF, span, 0).map_err(|_| RewriteError);
    }
    if addr_changes {
        // SAFETY: `Span` is repr(C) and starts with its first SPAN_ADDRS bytes.
        let addrs = unsafe { &*(span as *const Span as *const [u8; SPAN_ADDRS]) };
        ctx.store(SPAN_OFF, addrs, 0).map_err(|_| RewriteError)?;
    }
    if port_changes {
        ctx.store(port_off, &new_port.to_be_bytes(), 0)
            .map_err(|_| RewriteError)?;
    }
    Ok(())
}

// IPv6. The header has no checksum; the TCP/UDP checksum covers a pseudo header with both
// 16-byte addresses. At tc the address change goes to `bpf_l4_csum_replace` as one
// `bpf_csum_diff` of the old and new addresses (size 0: `to` is a checksum diff) with
// `BPF_F_PSEUDO_HDR`, so a CHECKSUM_PARTIAL skb (locally sent, on a veth) keeps its
// pseudo-header-only field right, as for IPv4; the port changes are plain replaces.
// `BPF_F_IPV6` (Linux 6.16) tells the helper not to fold the diff into a
// CHECKSUM_COMPLETE skb's `csum`: unlike IPv4, no header checksum compensates the address
// change inside the packet's own sum. Older kernels refuse the flag; the update is then
// redone without it (their CHECKSUM_COMPLETE skbs get a stale `csum`, which only costs
// the stack a software checksum).

/// `BPF_F_IPV6` of `bpf_l4_csum_replace` (not in aya's bindings yet).
const BPF_F_IPV6: u64 = 1 << 7;

/// Source and destination addresses and ports of an IPv6 header followed by its L4
/// header: one contiguous span, written in one store.
#[repr(C)]
struct Span6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
}

const SPAN6_OFF: usize = ETH_LEN + IP6_SADDR;
/// Offset of an IPv6 packet's L4 header (no extension headers are served).
pub const L4_6: usize = ETH_LEN + IPV6_LEN;

/// Offset of an IPv6 packet's L4 checksum field.
#[inline(always)]
pub fn l4_csum_off6(pkt: &Packet6) -> usize {
    L4_6 + if pkt.is_tcp() { TCP_CSUM } else { UDP_CSUM }
}
const _: () = assert!(SPAN6_OFF + core::mem::size_of::<Span6>() == ETH_LEN + IPV6_LEN + 4);

/// tc, IPv6: the packet becomes `new` (either end or both).
#[inline(always)]
pub fn rewrite6(ctx: &TcContext, pkt: &Packet6, new: &Tuple<A6>) -> Result<(), RewriteError> {
    let csum_off = l4_csum_off6(pkt);
    let l4_flags = if pkt.is_tcp() {
        0
    } else {
        BPF_F_MARK_MANGLED_0 as u64
    };
    let mut span = Span6 {
        saddr: pkt.saddr.bytes(),
        daddr: pkt.daddr.bytes(),
        sport: pkt.sport.to_be_bytes(),
        dport: pkt.dport.to_be_bytes(),
    };
    if !eq16(&pkt.saddr, &new.saddr) || !eq16(&pkt.daddr, &new.daddr) {
        let mut old = [pkt.saddr, pkt.daddr];
        let mut to = [new.saddr, new.daddr];
        // SAFETY: both buffers are 32 bytes on this stack frame.
        let diff = unsafe {
            bpf_csum_diff(
                old.as_mut_ptr() as *mut u32,
                32,
                to.as_mut_ptr() as *mut u32,
                32,
                0,
            )
        };
        if diff < 0 {
            return Err(RewriteError);
        }
        let flags = l4_flags | BPF_F_PSEUDO_HDR as u64;
        if ctx
            .l4_csum_replace(csum_off, 0, diff as u64, flags | BPF_F_IPV6)
            .is_err()
        {
            ctx.l4_csum_replace(csum_off, 0, diff as u64, flags)
                .map_err(|_| RewriteError)?;
        }
        span.saddr = new.saddr.bytes();
        span.daddr = new.daddr.bytes();
    }
    for (old, new) in [(pkt.sport, new.sport), (pkt.dport, new.dport)] {
        if old != new {
            let from = u16::from_ne_bytes(old.to_be_bytes()) as u64;
            let to = u16::from_ne_bytes(new.to_be_bytes()) as u64;
            ctx.l4_csum_replace(csum_off, from, to, l4_flags | 2)
                .map_err(|_| RewriteError)?;
        }
    }
    span.sport = new.sport.to_be_bytes();
    span.dport = new.dport.to_be_bytes();
    ctx.store(SPAN6_OFF, &span, 0).map_err(|_| RewriteError)
}

/// XDP, IPv6: the packet becomes `new`, written in place, the L4 checksum updated by hand
/// (RFC 1624) over the addresses and ports; a UDP checksum that comes out zero is sent as
/// 0xffff (zero would mean none, which IPv6 forbids). Same assumption of complete
/// checksums as [`rewrite_xdp`]. The difference of the old and new 36-byte spans is summed
/// by `bpf_csum_diff`: unrolled, its 36 words would take more registers than BPF has.
#[inline(always)]
pub fn rewrite_xdp6(ctx: &XdpContext, pkt: &Packet6, new: &Tuple<A6>) -> Result<(), RewriteError> {
    // The IPv6 path keeps its packet in map memory (`Family::stash`), where the verifier
    // knows no bound of `l4_off`: the offsets are the constants they always are.
    let span: *mut Span6 = ptr_at_mut(ctx, SPAN6_OFF).ok_or(RewriteError)?;
    let l4_csum: *mut [u8; 2] = ptr_at_mut(ctx, l4_csum_off6(pkt)).ok_or(RewriteError)?;
    let mut to = Span6 {
        saddr: new.saddr.bytes(),
        daddr: new.daddr.bytes(),
        sport: new.sport.to_be_bytes(),
        dport: new.dport.to_be_bytes(),
    };
    // SAFETY: `span` was checked against data_end, `to` is on this frame, both 36 bytes.
    let diff = unsafe { bpf_csum_diff(span as *mut u32, 36, &raw mut to as *mut u32, 36, 0) };
    if diff < 0 {
        return Err(RewriteError);
    }
    // SAFETY: checked against data_end by ptr_at_mut; csum_diff does not move the packet.
    unsafe {
        // The helper sums in memory order: the field is updated as read, natively.
        let mut sum = !u16::from_ne_bytes(*l4_csum) as u64 + diff as u32 as u64;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let mut c = !(sum as u16);
        if !pkt.is_tcp() && c == 0 {
            c = 0xffff;
        }
        *l4_csum = c.to_ne_bytes();
        *span = to;
    }
    Ok(())
}
