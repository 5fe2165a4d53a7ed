//! Bounds-checked header parsing with direct packet access.

use aya_ebpf::programs::TcContext;
use proxy_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_LEN: usize = 20;
/// Offset of the checksum inside the IPv4 header.
pub const IP_CSUM: usize = 10;

pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` is inside the linear
/// data. The verifier sees the comparison against `data_end` and accepts the access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// A pointer to a `T` at `off`, pulling the bytes up to its end into the linear area first
/// if the skb is paged there. Only the headers actually read are pulled: on a TCP clone
/// (every segment a socket sends) they are already private, while pulling payload would
/// copy the skb's head. `bpf_skb_pull_data` invalidates packet pointers; this derives its
/// pointer afterwards, and earlier pointers must not be used again.
#[inline(always)]
fn pull_ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    if let Some(p) = ptr_at(ctx, off) {
        return Some(p);
    }
    let need = (off + core::mem::size_of::<T>()) as u32;
    if ctx.len() < need || ctx.pull_data(need).is_err() {
        return None;
    }
    ptr_at(ctx, off)
}

/// Why a packet is not parsed into a [`Packet`].
pub enum Skip {
    /// Not IPv4 (ARP, IPv6, ...).
    NotIpv4,
    /// IPv4 but neither TCP nor UDP.
    NotTcpUdp,
    /// A fragment (MF set or offset != 0).
    Fragment,
    /// A header is cut short or invalid.
    Malformed,
}

/// The fields of an IPv4 TCP/UDP packet that the datapath uses. Addresses are the wire
/// bytes; ports are host order.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the L4 header: Ethernet + IHL * 4.
    pub l4_off: usize,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// UDP sent without a checksum (field 0): the L4 checksum must stay untouched.
    pub no_l4_csum: bool,
    /// The IPv4 header checksum field as on the wire.
    pub ip_csum: [u8; 2],
}

impl Packet {
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

/// Parses Ethernet, IPv4 (honouring IHL) and the TCP/UDP ports.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Skip> {
    let eth_type: *const [u8; 2] = pull_ptr_at(ctx, 12).ok_or(Skip::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    if u16::from_be_bytes(unsafe { *eth_type }) != ETH_P_IP {
        return Err(Skip::NotIpv4);
    }
    let ip: *const [u8; IPV4_MIN_LEN] = pull_ptr_at(ctx, ETH_LEN).ok_or(Skip::Malformed)?;
    // SAFETY: as above. Copied out by value: the L4 pull below may move the packet.
    let ip = unsafe { ip.read() };
    let vihl = ip[0];
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_LEN {
        return Err(Skip::Malformed);
    }
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Skip::NotTcpUdp);
    }
    // MF flag or a non-zero fragment offset.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    let ip_csum = [ip[10], ip[11]];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];

    // ihl <= 60, so the verifier knows l4_off is bounded.
    let l4_off = ETH_LEN + ihl;
    let (ports, tcp_flags, no_l4_csum) = if proto == PROTO_TCP {
        let th: *const [u8; TCP_LEN] = pull_ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
        // SAFETY: bounds checked by ptr_at.
        let th = unsafe { th.read() };
        ([th[0], th[1], th[2], th[3]], th[13], false)
    } else {
        let uh: *const [u8; UDP_LEN] = pull_ptr_at(ctx, l4_off).ok_or(Skip::Malformed)?;
        // SAFETY: bounds checked by ptr_at.
        let uh = unsafe { uh.read() };
        ([uh[0], uh[1], uh[2], uh[3]], 0, uh[6] == 0 && uh[7] == 0)
    };

    Ok(Packet {
        l4_off,
        saddr,
        daddr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        no_l4_csum,
        ip_csum,
    })
}
