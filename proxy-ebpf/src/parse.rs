//! Bounds-checked header parsing with direct packet access, for tc and XDP alike, for
//! IPv4 and IPv6.

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use proxy_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IPV4_MIN_LEN: usize = Ipv4Hdr::LEN;
pub const IPV6_LEN: usize = Ipv6Hdr::LEN;
/// Offsets inside the IPv6 header: hop limit, source address (the destination follows).
pub const IP6_HOP_LIMIT: usize = 7;
pub const IP6_SADDR: usize = 8;
/// IPv6 next header values the parser tells apart.
pub const NEXTHDR_FRAGMENT: u8 = 44;
/// Offset of the checksum inside the IPv4 header.
pub const IP_CSUM: usize = 10;
/// Offset of the TTL inside the IPv4 header.
pub const IP_TTL: usize = 8;

pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the parser needs of a program context: the bounds of the packet's linear data,
/// and a way to make more of it linear. Implemented for tc and XDP, so both hooks share
/// one parser (monomorphised: each program gets the code for its own context only).
pub trait PacketCtx {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Makes the first `len` bytes linear if they are not; false if it cannot.
    fn pull(&self, len: u32) -> bool;
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    /// Only the headers actually read are pulled: on a TCP clone (every segment a socket
    /// sends) they are already private, while pulling payload would copy the skb's head.
    #[inline(always)]
    fn pull(&self, len: u32) -> bool {
        self.len() >= len && self.pull_data(len).is_ok()
    }
}

impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    /// An XDP frame's headers are in its first buffer (a multi-buffer frame's fragments
    /// hold payload only): nothing to pull.
    #[inline(always)]
    fn pull(&self, _len: u32) -> bool {
        false
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` is inside the linear
/// data. The verifier sees the comparison against `data_end` and accepts the access.
#[inline(always)]
pub fn ptr_at<C: PacketCtx, T>(ctx: &C, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// As [`ptr_at`], writable (XDP writes the packet directly; tc goes through helpers, see
/// `nat.rs`).
#[inline(always)]
pub fn ptr_at_mut<C: PacketCtx, T>(ctx: &C, off: usize) -> Option<*mut T> {
    ptr_at::<C, T>(ctx, off).map(|p| p as *mut T)
}

/// A pointer to a `T` at `off`, pulling the bytes up to its end into the linear area first
/// if they are not there (tc). `bpf_skb_pull_data` invalidates packet pointers; this
/// derives its pointer afterwards, and earlier pointers must not be used again.
#[inline(always)]
fn pull_ptr_at<C: PacketCtx, T>(ctx: &C, off: usize) -> Option<*const T> {
    if let Some(p) = ptr_at(ctx, off) {
        return Some(p);
    }
    if !ctx.pull((off + core::mem::size_of::<T>()) as u32) {
        return None;
    }
    ptr_at(ctx, off)
}

/// Why a packet is not parsed into a [`Packet`].
pub enum Skip {
    /// Neither IPv4 nor IPv6 (ARP, ...).
    NotIp,
    /// IP but neither TCP nor UDP (for IPv6: a next header that is not TCP/UDP, such as
    /// ICMPv6 or an extension header).
    NotTcpUdp,
    /// A fragment (IPv4: MF set or offset != 0; IPv6: a Fragment header follows).
    Fragment,
    /// A header is cut short or invalid.
    Malformed,
}

/// The fields of a TCP/UDP packet that the datapath uses, with the address type of its
/// family (`[u8; 4]` or `[u8; 16]`). Addresses are the wire bytes; ports are host order.
#[derive(Clone, Copy)]
pub struct Packet<A> {
    /// Offset of the L4 header: Ethernet + IHL * 4 (IPv4), Ethernet + 40 (IPv6).
    pub l4_off: usize,
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// UDP sent without a checksum (field 0, IPv4 only): the L4 checksum must stay
    /// untouched.
    pub no_l4_csum: bool,
    /// The IPv4 header checksum field as on the wire (IPv6 has none: zero).
    pub ip_csum: [u8; 2],
}

pub type Packet4 = Packet<[u8; 4]>;
pub type Packet6 = Packet<A6>;

/// An IPv6 address as the IPv6 path carries it: its 16 wire bytes held as two u64 words.
/// A plain `[u8; 16]` gets split by LLVM into 16 byte values, each spilled to its own
/// 8-byte stack slot across helper calls, until the path's frame outgrows the verifier's
/// 512 bytes; two words spill as two. The map types keep `[u8; 16]` (the ABI); the
/// conversion is at the map and packet boundaries.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct A6(pub [u64; 2]);

impl A6 {
    #[inline(always)]
    pub fn new(b: [u8; 16]) -> A6 {
        // SAFETY: same size, any bit pattern is valid for both.
        A6(unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(b) })
    }

    #[inline(always)]
    pub fn bytes(self) -> [u8; 16] {
        // SAFETY: as in `new`.
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(self.0) }
    }
}

impl<A> Packet<A> {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == PROTO_TCP
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.is_tcp() { TCP_CSUM } else { UDP_CSUM }
    }

    /// A TCP FIN or RST: the connection is ending.
    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The network layer of a frame, by its Ethernet type.
pub enum L3 {
    Ipv4,
    Ipv6,
}

/// Reads the Ethernet header: which parser comes next.
#[inline(always)]
pub fn ethertype<C: PacketCtx>(ctx: &C) -> Result<L3, Skip> {
    let eth: *const EthHdr = pull_ptr_at(ctx, 0).ok_or(Skip::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let t = unsafe { (*eth).ether_type };
    if t == EtherType::Ipv4 as u16 {
        Ok(L3::Ipv4)
    } else if t == EtherType::Ipv6 as u16 {
        Ok(L3::Ipv6)
    } else {
        Err(Skip::NotIp)
    }
}

/// Parses IPv4 (honouring IHL) and the TCP/UDP ports of a frame whose Ethernet type
/// [`ethertype`] found IPv4, with network-types' header layouts.
#[inline(always)]
pub fn parse4<C: PacketCtx>(ctx: &C) -> Result<Packet4, Skip> {
    let ip: *const Ipv4Hdr = pull_ptr_at(ctx, EthHdr::LEN).ok_or(Skip::Malformed)?;
    // SAFETY: as above. Copied out by value: the L4 pull below may move the packet.
    let ip = unsafe { ip.read() };
    let ihl = ip.ihl() as usize;
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Skip::Malformed);
    }
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Skip::NotTcpUdp);
    }
    // MF flag or a non-zero fragment offset.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }

    // ihl <= 60, so the verifier knows l4_off is bounded.
    let l4_off = EthHdr::LEN + ihl;
    let (sport, dport, tcp_flags, no_l4_csum) = ports(ctx, l4_off, proto)?;
    Ok(Packet {
        l4_off,
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport,
        dport,
        proto,
        tcp_flags,
        no_l4_csum,
        ip_csum: ip.check,
    })
}

/// Parses IPv6 and the TCP/UDP ports of a frame whose Ethernet type [`ethertype`] found
/// IPv6. Only a TCP or UDP header right after the fixed header is served: any other next
/// header (ICMPv6, hop-by-hop or routing options, ...) is [`Skip::NotTcpUdp`] and passes
/// untouched, as non-TCP/UDP IPv4 does; a Fragment header is [`Skip::Fragment`].
#[inline(always)]
pub fn parse6<C: PacketCtx>(ctx: &C) -> Result<Packet6, Skip> {
    let ip: *const Ipv6Hdr = pull_ptr_at(ctx, EthHdr::LEN).ok_or(Skip::Malformed)?;
    // SAFETY: bounds checked by ptr_at. Copied out: the L4 pull below may move the packet.
    let ip = unsafe { ip.read() };
    if ip.version() != 6 {
        return Err(Skip::Malformed);
    }
    let proto = ip.next_hdr;
    if proto == NEXTHDR_FRAGMENT {
        return Err(Skip::Fragment);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Skip::NotTcpUdp);
    }
    let l4_off = EthHdr::LEN + Ipv6Hdr::LEN;
    // An IPv6 UDP checksum is mandatory: a zero one is invalid and gets updated like any
    // other (the receiver drops it either way).
    let (sport, dport, tcp_flags, _) = ports(ctx, l4_off, proto)?;
    Ok(Packet {
        l4_off,
        saddr: A6::new(ip.src_addr),
        daddr: A6::new(ip.dst_addr),
        sport,
        dport,
        proto,
        tcp_flags,
        no_l4_csum: false,
        ip_csum: [0; 2],
    })
}

/// The ports (host order), TCP flags and "UDP without checksum" of the L4 header at
/// `l4_off`.
#[inline(always)]
fn ports<C: PacketCtx>(ctx: &C, l4_off: usize, proto: u8) -> Result<(u16, u16, u8, bool), Skip> {
    let (sport, dport, tcp_flags, no_l4_csum) = if proto == PROTO_TCP {
        let th: *const TcpHdr = pull_ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
        // SAFETY: bounds checked by ptr_at.
        let th = unsafe { th.read() };
        let flags = flag(th.fin(), TCP_FIN)
            | flag(th.syn(), TCP_SYN)
            | flag(th.rst(), TCP_RST)
            | flag(th.ack(), TCP_ACK);
        (th.source, th.dest, flags, false)
    } else {
        let uh: *const UdpHdr = pull_ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
        // SAFETY: bounds checked by ptr_at.
        let uh = unsafe { uh.read() };
        (uh.src, uh.dst, 0, uh.check == [0, 0])
    };
    Ok((
        u16::from_be_bytes(sport),
        u16::from_be_bytes(dport),
        tcp_flags,
        no_l4_csum,
    ))
}

#[inline(always)]
fn flag(set: u16, bit: u8) -> u8 {
    if set != 0 { bit } else { 0 }
}
