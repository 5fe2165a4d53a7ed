//! ICMP destination unreachable / port unreachable for a service without backends, as
//! kube-proxy's iptables REJECT sends it: the client's stack turns it into ECONNREFUSED.
//! IPv6 gets the ICMPv6 twin (type 1, code 4), built the same way ([`reject6`]).
//!
//! The packet itself becomes the reply: cut (or grown) to Ethernet + IPv4 + ICMP + the
//! quoted original IPv4 header (first 20 bytes, IHL set to 5) + 8 bytes of its L4 header,
//! and sent back out of the interface it came from.
//!
//! The skb keeps its checksum state. A locally sent TCP SYN or UDP datagram is
//! CHECKSUM_PARTIAL; the peer's stack then trusts the ICMP checksum (which is valid anyway),
//! and nothing on the veth path completes the stale L4 offload. `bpf_skb_change_tail`
//! refuses to cut such an skb before the end of its L4 checksum field, which only matters
//! when the original header has more than 18 bytes of IP options (28 for UDP): that packet
//! is dropped (ERR_REWRITE) instead of answered.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, xdp_action},
    btf_maps::PerCpuArray,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail},
    macros::btf_map,
    programs::{TcContext, XdpContext},
};

use crate::{
    csum,
    nat::L4_6,
    parse::{ETH_LEN, IPV4_MIN_LEN, IPV6_LEN, Packet4, Packet6, PacketCtx, ptr_at, ptr_at_mut},
};

const ICMP_LEN: usize = 8;
const QUOTE_L4: usize = 8;
const IP_TOT_LEN: usize = IPV4_MIN_LEN + ICMP_LEN + IPV4_MIN_LEN + QUOTE_L4;

/// The whole reply frame, built in a per-CPU scratch map (70 bytes the verifier would
/// otherwise count in the stack of the packet path that calls this) and written at once.
#[repr(C)]
pub struct Reply {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_type: [u8; 2],
    ip: [u8; IPV4_MIN_LEN],
    icmp: [u8; ICMP_LEN],
    quote_ip: [u8; IPV4_MIN_LEN],
    quote_l4: [u8; QUOTE_L4],
}

const FRAME_LEN: usize = ETH_LEN + IP_TOT_LEN;
const _: () = assert!(core::mem::size_of::<Reply>() == FRAME_LEN);

/// Where the reply frame is built (see [`Reply`]). Not pinned: scratch space only.
#[btf_map(name = "reject_scratch")]
static REJECT_SCRATCH: PerCpuArray<Reply, 1> = PerCpuArray::new();

/// A header read or a helper failed.
pub struct RejectError;

/// The ICMP error answering the packet, built on the stack from its headers.
#[inline(always)]
fn build<C: PacketCtx>(ctx: &C, pkt: &Packet4, r: &mut Reply) -> Result<(), RejectError> {
    let eth: *const [u8; ETH_LEN] = ptr_at(ctx, 0).ok_or(RejectError)?;
    let ip: *const [u8; IPV4_MIN_LEN] = ptr_at(ctx, ETH_LEN).ok_or(RejectError)?;
    let l4: *const [u8; QUOTE_L4] = ptr_at(ctx, pkt.l4_off).ok_or(RejectError)?;
    let tot = (IP_TOT_LEN as u16).to_be_bytes();
    *r = Reply {
        eth_dst: [0; 6],
        eth_src: [0; 6],
        eth_type: [0; 2],
        ip: [
            0x45, 0xc0, // version/IHL, TOS: internetwork control, as Linux sends ICMP errors
            tot[0], tot[1], 0, 0, // total length, id
            0, 0, 64, 1, // no fragmentation, TTL 64, ICMP
            0, 0, // checksum
            0, 0, 0, 0, 0, 0, 0, 0, // addresses
        ],
        // Type 3 (destination unreachable), code 3 (port unreachable), checksum, unused.
        icmp: [3, 3, 0, 0, 0, 0, 0, 0],
        quote_ip: [0; IPV4_MIN_LEN],
        quote_l4: [0; QUOTE_L4],
    };
    // SAFETY: bounds checked by ptr_at; copied out before the packet changes.
    unsafe {
        let eth = &*eth;
        r.eth_dst.copy_from_slice(&eth[6..12]);
        r.eth_src.copy_from_slice(&eth[0..6]);
        r.eth_type.copy_from_slice(&eth[12..14]);
        r.quote_ip = *ip;
        r.quote_l4 = *l4;
    }

    if r.quote_ip[0] != 0x45 {
        // Options are not quoted: the copy says so in its IHL and gets its checksum redone.
        r.quote_ip[0] = 0x45;
        r.quote_ip[10] = 0;
        r.quote_ip[11] = 0;
        let c = csum::ipv4_header(&r.quote_ip).to_be_bytes();
        r.quote_ip[10] = c[0];
        r.quote_ip[11] = c[1];
    }

    r.ip[12..16].copy_from_slice(&pkt.daddr);
    r.ip[16..20].copy_from_slice(&pkt.saddr);
    let c = csum::ipv4_header(&r.ip).to_be_bytes();
    r.ip[10] = c[0];
    r.ip[11] = c[1];

    let sum = csum::add(csum::add(csum::add(0, &r.icmp), &r.quote_ip), &r.quote_l4);
    let c = csum::finish(sum).to_be_bytes();
    r.icmp[2] = c[0];
    r.icmp[3] = c[1];
    Ok(())
}

/// The scratch frame of this CPU (programs do not migrate while they run).
#[inline(always)]
fn scratch() -> Result<&'static mut Reply, RejectError> {
    let p = REJECT_SCRATCH.get_ptr_mut(0).ok_or(RejectError)?;
    // SAFETY: this CPU's own slot, used by one program run at a time.
    Ok(unsafe { &mut *p })
}

/// Turns the packet into the ICMP error and returns TC_ACT_REDIRECT. Kept out of line: it
/// is the rare path, and its frame buffer should not weigh on the hot path's stack.
#[inline(never)]
pub fn reject(ctx: &TcContext, pkt: &Packet4) -> Result<i32, RejectError> {
    let r = scratch()?;
    build(ctx, pkt, r)?;
    // SAFETY: the context pointer is the program's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, FRAME_LEN as u32, 0) } != 0 {
        return Err(RejectError);
    }
    // Packet pointers are stale from here on; only helpers touch the packet.
    ctx.store(0, r, 0).map_err(|_| RejectError)?;
    // SAFETY: reads a field of the program's own skb; bpf_redirect takes no pointers.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(RejectError);
    }
    Ok(TC_ACT_REDIRECT)
}

/// XDP: turns the frame into the ICMP error in place (cut or grown with
/// `bpf_xdp_adjust_tail`) and returns XDP_TX, back out of the interface it came in on.
/// Out of line for the same reason as [`reject`].
#[inline(never)]
pub fn reject_xdp(ctx: &XdpContext, pkt: &Packet4) -> Result<u32, RejectError> {
    let r = scratch()?;
    build(ctx, pkt, r)?;
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context pointer is the program's own frame.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, FRAME_LEN as i32 - len) } != 0 {
        return Err(RejectError);
    }
    // Packet pointers are stale after the resize; this one is derived anew.
    let out: *mut Reply = ptr_at_mut(ctx, 0).ok_or(RejectError)?;
    // SAFETY: checked against data_end by ptr_at_mut.
    unsafe { core::ptr::copy_nonoverlapping(r as *const Reply, out, 1) };
    Ok(xdp_action::XDP_TX)
}

// IPv6: ICMPv6 destination unreachable, port unreachable (RFC 4443: type 1, code 4),
// quoting the original IPv6 header and 8 bytes of its L4 header (RFC 4443 asks for as
// much as fits in 1280 bytes; the quote here is what a client's stack needs to find the
// socket, as for IPv4). Its checksum covers the IPv6 pseudo header.

const ICMP6_PAYLOAD: usize = ICMP_LEN + IPV6_LEN + QUOTE_L4;
const FRAME6_LEN: usize = ETH_LEN + IPV6_LEN + ICMP6_PAYLOAD;
const NEXTHDR_ICMP6: u8 = 58;

/// The whole ICMPv6 reply frame, built in a per-CPU scratch map as [`Reply`].
#[repr(C)]
pub struct Reply6 {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    eth_type: [u8; 2],
    ip: [u8; IPV6_LEN],
    icmp: [u8; ICMP_LEN],
    quote_ip: [u8; IPV6_LEN],
    quote_l4: [u8; QUOTE_L4],
}

const _: () = assert!(core::mem::size_of::<Reply6>() == FRAME6_LEN);

/// Where the IPv6 reply frame is built. Not pinned: scratch space only.
#[btf_map(name = "reject6_scratch")]
static REJECT6_SCRATCH: PerCpuArray<Reply6, 1> = PerCpuArray::new();

/// The ICMPv6 error answering the packet.
#[inline(always)]
fn build6<C: PacketCtx>(ctx: &C, pkt: &Packet6, r: &mut Reply6) -> Result<(), RejectError> {
    let eth: *const [u8; ETH_LEN] = ptr_at(ctx, 0).ok_or(RejectError)?;
    let ip: *const [u8; IPV6_LEN] = ptr_at(ctx, ETH_LEN).ok_or(RejectError)?;
    let l4: *const [u8; QUOTE_L4] = ptr_at(ctx, L4_6).ok_or(RejectError)?;
    let plen = (ICMP6_PAYLOAD as u16).to_be_bytes();
    // SAFETY: bounds checked by ptr_at; copied out before the packet changes.
    unsafe {
        let eth = &*eth;
        r.eth_dst.copy_from_slice(&eth[6..12]);
        r.eth_src.copy_from_slice(&eth[0..6]);
        r.eth_type.copy_from_slice(&eth[12..14]);
        r.quote_ip = *ip;
        r.quote_l4 = *l4;
    }
    // Version 6, no traffic class or flow label; hop limit 64 as Linux sends errors.
    r.ip[..8].copy_from_slice(&[0x60, 0, 0, 0, plen[0], plen[1], NEXTHDR_ICMP6, 64]);
    r.ip[8..24].copy_from_slice(&pkt.daddr.bytes());
    r.ip[24..40].copy_from_slice(&pkt.saddr.bytes());
    // Type 1 (destination unreachable), code 4 (port unreachable), checksum, unused.
    r.icmp = [1, 4, 0, 0, 0, 0, 0, 0];
    Ok(())
}

/// The ICMPv6 checksum of the frame `build6` wrote: the pseudo header (both addresses,
/// the upper-layer length, next header 58) and the message. Summed by `bpf_csum_diff`
/// over the scratch frame: unrolled by hand, the 44 words take more registers than BPF
/// has and spill a stack frame the packet path's chain cannot afford.
#[inline(always)]
fn icmp6_csum(r: &mut Reply6) -> Result<(), RejectError> {
    // The pseudo header's upper-layer length and next header, as two big-endian words.
    let mut lens = [0u8; 8];
    lens[2..4].copy_from_slice(&(ICMP6_PAYLOAD as u16).to_be_bytes());
    lens[7] = NEXTHDR_ICMP6;
    let addrs = r.ip[8..].as_mut_ptr() as *mut u32;
    let msg = r.icmp.as_mut_ptr() as *mut u32;
    // SAFETY: the buffers are in this CPU's scratch entry and on the stack, of the sizes
    // given (multiples of 4, as the helper wants); `from` is empty.
    let sum = unsafe {
        let s = bpf_csum_diff(core::ptr::null_mut(), 0, addrs, 32, 0);
        let s = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            lens.as_mut_ptr() as *mut u32,
            8,
            s as u32,
        );
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            msg,
            ICMP6_PAYLOAD as u32,
            s as u32,
        )
    };
    if sum < 0 {
        return Err(RejectError);
    }
    // The helper sums in memory order, so the folded value is stored as is.
    let mut s = sum as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    let c = (!(s as u16)).to_ne_bytes();
    r.icmp[2] = c[0];
    r.icmp[3] = c[1];
    Ok(())
}

#[inline(always)]
fn scratch6() -> Result<&'static mut Reply6, RejectError> {
    let p = REJECT6_SCRATCH.get_ptr_mut(0).ok_or(RejectError)?;
    // SAFETY: this CPU's own slot, used by one program run at a time.
    Ok(unsafe { &mut *p })
}

/// As [`reject`], for IPv6: the packet becomes the ICMPv6 port unreachable.
#[inline(never)]
pub fn reject6(ctx: &TcContext, pkt: &Packet6) -> Result<i32, RejectError> {
    let r = scratch6()?;
    build6(ctx, pkt, r)?;
    icmp6_csum(r)?;
    // SAFETY: the context pointer is the program's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, FRAME6_LEN as u32, 0) } != 0 {
        return Err(RejectError);
    }
    ctx.store(0, r, 0).map_err(|_| RejectError)?;
    // SAFETY: as in `reject`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(RejectError);
    }
    Ok(TC_ACT_REDIRECT)
}

/// As [`reject_xdp`], for IPv6.
#[inline(never)]
pub fn reject_xdp6(ctx: &XdpContext, pkt: &Packet6) -> Result<u32, RejectError> {
    let r = scratch6()?;
    build6(ctx, pkt, r)?;
    icmp6_csum(r)?;
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context pointer is the program's own frame.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, FRAME6_LEN as i32 - len) } != 0 {
        return Err(RejectError);
    }
    let out: *mut Reply6 = ptr_at_mut(ctx, 0).ok_or(RejectError)?;
    // SAFETY: checked against data_end by ptr_at_mut.
    unsafe { core::ptr::copy_nonoverlapping(r as *const Reply6, out, 1) };
    Ok(xdp_action::XDP_TX)
}
