//! Address and port rewrites with incremental checksum updates.
//!
//! Each field is stored with `bpf_skb_store_bytes`, the IPv4 header checksum is fixed with
//! `bpf_l3_csum_replace` and the L4 checksum with `bpf_l4_csum_replace`. The address change
//! carries `BPF_F_PSEUDO_HDR`: the address is part of the pseudo header, and that flag is what
//! keeps a CHECKSUM_PARTIAL skb (locally sent TCP/UDP on a veth) right, where the field holds
//! only the pseudo-header sum. The port change is a plain replace, which the kernel skips for
//! CHECKSUM_PARTIAL. UDP sent without a checksum keeps its zero; `BPF_F_MARK_MANGLED_0` turns a
//! computed zero into 0xffff. The helpers use no packet pointers, so none need re-deriving.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::parse::{ETH_LEN, IP_CSUM, IP_DADDR, IP_SADDR, Packet};

/// A helper call failed; the packet may be half rewritten and must be dropped.
pub struct RewriteError;

/// Client -> VIP becomes client -> backend.
#[inline(always)]
pub fn rewrite_dst(
    ctx: &TcContext,
    pkt: &Packet,
    addr: [u8; 4],
    port: u16,
) -> Result<(), RewriteError> {
    rewrite(ctx, pkt, ETH_LEN + IP_DADDR, pkt.daddr, addr, pkt.l4_off + 2, pkt.dport, port)
}

/// Backend -> client becomes VIP -> client.
#[inline(always)]
pub fn rewrite_src(
    ctx: &TcContext,
    pkt: &Packet,
    addr: [u8; 4],
    port: u16,
) -> Result<(), RewriteError> {
    rewrite(ctx, pkt, ETH_LEN + IP_SADDR, pkt.saddr, addr, pkt.l4_off, pkt.sport, port)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), RewriteError> {
    let csum_off = pkt.l4_csum_off();
    let l4_flags = if pkt.is_tcp() { 0 } else { BPF_F_MARK_MANGLED_0 as u64 };
    let fix_l4 = !pkt.no_l4_csum;

    if old_addr != new_addr {
        // The helpers take the old and new values as they are in memory (network order).
        let from = u32::from_ne_bytes(old_addr) as u64;
        let to = u32::from_ne_bytes(new_addr) as u64;
        if fix_l4 {
            ctx.l4_csum_replace(csum_off, from, to, l4_flags | BPF_F_PSEUDO_HDR as u64 | 4)
                .map_err(|_| RewriteError)?;
        }
        ctx.l3_csum_replace(ETH_LEN + IP_CSUM, from, to, 4).map_err(|_| RewriteError)?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| RewriteError)?;
    }
    if old_port != new_port {
        let new_be = new_port.to_be_bytes();
        if fix_l4 {
            let from = u16::from_ne_bytes(old_port.to_be_bytes()) as u64;
            let to = u16::from_ne_bytes(new_be) as u64;
            ctx.l4_csum_replace(csum_off, from, to, l4_flags | 2).map_err(|_| RewriteError)?;
        }
        ctx.store(port_off, &new_be, 0).map_err(|_| RewriteError)?;
    }
    Ok(())
}
