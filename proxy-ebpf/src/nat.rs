//! Address and port rewrites with incremental checksum updates.
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
    programs::TcContext,
};

use crate::{
    csum,
    parse::{ETH_LEN, IP_CSUM, IPV4_MIN_LEN, Packet},
};

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
    pkt: &Packet,
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
    pkt: &Packet,
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

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
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
