//! Packet fixtures for the kernel program, run through BPF_PROG_TEST_RUN.
//!
//! Each fixture is an input frame built with etherparse, the return code `tc_ingress` must
//! give, the one `stats` counter it must bump, and what the output frame must be: unchanged
//! byte for byte, DNAT-ed or SNAT-ed (every other byte unchanged, IPv4 and L4 checksums
//! recomputed here and compared), or an ICMP port unreachable built from the input.
//! Stateful fixtures (a TCP connection's life) run in order against one loaded object and
//! may check the maps after their step.
//!
//! The object is loaded and its maps written with the agent's own code
//! (`bpfproxy::datapath`: `Datapath::load`, `KernelMaps::apply` of planner `MapOp`s).
//! Needs root (BPF_PROG_TEST_RUN of a sched_cls program) and the object built by
//! `cargo xtask build-ebpf` (or at $BPFPROXY_EBPF_OBJ).

use aya::programs::ProgramError;
use etherparse::{IpFragOffset, IpHeaders, IpNumber, Ipv4Header, PacketBuilder, TransportHeader};
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, Ct4Key},
    stats,
};
use testbed::datapath::{
    ACK, CLIENT_MAC, DatapathHarness, ETH_LEN, FIN, MapSizes, NODE_MAC, PROG_TC_FLOOR,
    PROG_TC_INGRESS, PSH, RST, SYN, TC_ACT_OK, TC_ACT_REDIRECT, assert_checksums, ct_key, fold,
};

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const VIP_PORT: u16 = 80;
const BACKEND: [u8; 4] = [10, 244, 2, 7];
const BACKEND_PORT: u16 = 8080;
const DNS_VIP: [u8; 4] = [10, 96, 0, 53];
const DNS_BACKEND: [u8; 4] = [10, 244, 3, 9];
/// A service with no ready backend.
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 99];
const OUTSIDE: [u8; 4] = [93, 184, 216, 34];

// ---------------------------------------------------------------------------------------
// The loaded object and its maps (`testbed::datapath`), with small maps.

type Harness = DatapathHarness;

fn load() -> Harness {
    DatapathHarness::load(MapSizes {
        services: 64,
        backend_slots: 256,
        conntrack: 4096,
    })
}

// ---------------------------------------------------------------------------------------
// Frames.

fn ip(src: [u8; 4], dst: [u8; 4], options: &[u8]) -> Ipv4Header {
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, src, dst).unwrap();
    h.identification = 0x1234;
    h.dont_fragment = true;
    h.options = options.try_into().expect("options of 4n bytes, at most 40");
    h
}

fn builder(ip: Ipv4Header) -> etherparse::PacketBuilderStep<IpHeaders> {
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ip(IpHeaders::Ipv4(ip, Default::default()))
}

fn tcp_ip(ip: Ipv4Header, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = builder(ip).tcp(sport, dport, 0x0101_0101, 64240);
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    if flags & PSH != 0 {
        b = b.psh();
    }
    if flags & ACK != 0 {
        b = b.ack(0x0202_0202);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Vec<u8> {
    let payload: &[u8] = if flags & PSH != 0 {
        b"GET / HTTP/1.1\r\n\r\n"
    } else {
        b""
    };
    tcp_ip(ip(src.0, dst.0, &[]), src.1, dst.1, flags, payload)
}

fn udp_ip(ip: Ipv4Header, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    builder(ip)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    udp_ip(
        ip(src.0, dst.0, &[]),
        src.1,
        dst.1,
        b"\x12\x34\x01\x00\x00\x01query",
    )
}

/// A UDP datagram sent without a checksum (field 0, allowed over IPv4).
fn udp_no_csum(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut v = udp(src, dst);
    let l4 = ETH_LEN + 20;
    v[l4 + 6] = 0;
    v[l4 + 7] = 0;
    v
}

fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::new();
    builder(ip(src, dst, &[]))
        .icmpv4_echo_request(7, 1)
        .write(&mut v, b"ping")
        .unwrap();
    v
}

fn ipv6_udp() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(40000, VIP_PORT)
        .write(&mut v, b"v6")
        .unwrap();
    v
}

fn fragment(more: bool, offset: u16) -> Vec<u8> {
    let mut h = ip(CLIENT, VIP, &[]);
    h.dont_fragment = false;
    h.more_fragments = more;
    h.fragment_offset = IpFragOffset::try_new(offset).unwrap();
    udp_ip(h, 40000, VIP_PORT, &[0xab; 64])
}

// ---------------------------------------------------------------------------------------
// Checks of output frames.

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// TC_ACT_OK, frame unchanged byte for byte.
    Unchanged,
    /// Destination rewritten to this address and port, nothing else but checksums changed.
    Dnat([u8; 4], u16),
    /// Source rewritten to this address and port.
    Snat([u8; 4], u16),
    /// An ICMP port unreachable from the original destination back to the sender.
    PortUnreachable,
}

struct Fixture {
    desc: &'static str,
    frame: Vec<u8>,
    ret: u32,
    /// The one counter this packet must bump.
    stat: u32,
    expect: Expect,
    /// Further checks of the maps after this step.
    after: Option<fn(&Harness)>,
    /// Kernels with the 2026 test_run fix refuse (EINVAL) an IPv4 frame with less than 20
    /// bytes after the Ethernet header; older ones run it. Either is checked: the refusal
    /// must be EINVAL with no counter bumped, a run must meet the fixture.
    kernel_may_refuse: bool,
}

fn fx(desc: &'static str, frame: Vec<u8>, stat: u32, expect: Expect) -> Fixture {
    let ret = match expect {
        Expect::PortUnreachable => TC_ACT_REDIRECT,
        _ => TC_ACT_OK,
    };
    Fixture {
        desc,
        frame,
        ret,
        stat,
        expect,
        after: None,
        kernel_may_refuse: false,
    }
}

impl Fixture {
    fn then(mut self, check: fn(&Harness)) -> Self {
        self.after = Some(check);
        self
    }

    fn kernel_may_refuse(mut self) -> Self {
        self.kernel_may_refuse = true;
        self
    }
}

fn l4_offset(frame: &[u8]) -> usize {
    ETH_LEN + ((frame[ETH_LEN] & 0x0f) as usize) * 4
}

fn csum_offset(frame: &[u8]) -> usize {
    l4_offset(frame)
        + if frame[ETH_LEN + 9] == PROTO_TCP {
            16
        } else {
            6
        }
}

/// The input with one address and port replaced; checksum fields are compared separately.
fn assert_nat(desc: &str, input: &[u8], out: &[u8], dst: bool, addr: [u8; 4], port: u16) {
    assert_eq!(out.len(), input.len(), "{desc}: length changed");
    let mut want = input.to_vec();
    let addr_off = ETH_LEN + if dst { 16 } else { 12 };
    let port_off = l4_offset(input) + if dst { 2 } else { 0 };
    want[addr_off..addr_off + 4].copy_from_slice(&addr);
    want[port_off..port_off + 2].copy_from_slice(&port.to_be_bytes());
    let mut got = out.to_vec();
    for at in [ETH_LEN + 10, csum_offset(input)] {
        want[at..at + 2].fill(0);
        got[at..at + 2].fill(0);
    }
    assert_eq!(
        got, want,
        "{desc}: bytes other than the NAT-ed fields and checksums changed"
    );
    assert_checksums(desc, out);
    let in_l4_csum = &input[csum_offset(input)..csum_offset(input) + 2];
    let out_l4_csum = &out[csum_offset(input)..csum_offset(input) + 2];
    if in_l4_csum == [0, 0] {
        assert_eq!(
            out_l4_csum,
            [0, 0],
            "{desc}: a zero UDP checksum must stay zero"
        );
    }
}

fn assert_port_unreachable(desc: &str, input: &[u8], out: &[u8]) {
    assert_eq!(
        out.len(),
        ETH_LEN + 20 + 8 + 20 + 8,
        "{desc}: ICMP error length"
    );
    assert_eq!(
        out[0..6],
        input[6..12],
        "{desc}: destination MAC is the sender's"
    );
    assert_eq!(
        out[6..12],
        input[0..6],
        "{desc}: source MAC is the one it was sent to"
    );
    assert_eq!(out[12..14], [0x08, 0x00], "{desc}: ethertype");
    let (ip, transport) = assert_checksums(desc, out);
    assert_eq!(ip.ihl(), 5, "{desc}: IHL");
    assert_eq!(ip.protocol, IpNumber::ICMP, "{desc}: protocol");
    assert_eq!(ip.time_to_live, 64, "{desc}: TTL");
    assert_eq!(
        ip.total_len as usize,
        out.len() - ETH_LEN,
        "{desc}: total length"
    );
    assert!(
        !ip.more_fragments && ip.fragment_offset.value() == 0,
        "{desc}: fragmented"
    );
    assert_eq!(
        ip.source,
        input[ETH_LEN + 16..ETH_LEN + 20],
        "{desc}: source is the VIP"
    );
    assert_eq!(
        ip.destination,
        input[ETH_LEN + 12..ETH_LEN + 16],
        "{desc}: destination is the client"
    );
    match transport {
        Some(TransportHeader::Icmpv4(h)) => assert_eq!(
            h.icmp_type,
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port
            ),
            "{desc}: ICMP type/code"
        ),
        other => panic!("{desc}: not ICMP: {other:?}"),
    }
    let icmp = &out[ETH_LEN + 20..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "{desc}: type 3 code 3");
    assert_eq!(fold(icmp, 0), 0xffff, "{desc}: ICMP checksum");
    // The quote: the original IPv4 header (first 20 bytes, IHL 5) and 8 bytes of its L4.
    let quote = &icmp[8..28];
    let orig = &input[ETH_LEN..ETH_LEN + 20];
    assert_eq!(quote[0], 0x45, "{desc}: quoted IHL");
    assert_eq!(quote[1..10], orig[1..10], "{desc}: quoted header");
    assert_eq!(quote[12..20], orig[12..20], "{desc}: quoted addresses");
    assert_eq!(fold(quote, 0), 0xffff, "{desc}: quoted header checksum");
    if orig[0] == 0x45 {
        assert_eq!(quote, orig, "{desc}: quoted header verbatim");
    }
    let l4 = l4_offset(input);
    assert_eq!(icmp[28..36], input[l4..l4 + 8], "{desc}: quoted L4 bytes");
}

fn check(h: &mut Harness, f: &Fixture) {
    let before = h.stats();
    let (ret, out) = match h.try_run_prog(PROG_TC_INGRESS, &f.frame, 1) {
        Ok(run) => (run.ret, run.out),
        Err(ProgramError::SyscallError(e)) if f.kernel_may_refuse => {
            assert_eq!(
                e.io_error.raw_os_error(),
                Some(libc::EINVAL),
                "{}: the kernel refuses this frame, but not as too short: {e}",
                f.desc
            );
            assert_eq!(h.stats(), before, "{}: a refused frame counted", f.desc);
            eprintln!("{}: refused by this kernel (EINVAL), as expected", f.desc);
            return;
        }
        Err(e) => panic!("{}: BPF_PROG_TEST_RUN: {e:?}", f.desc),
    };
    assert_eq!(ret, f.ret, "{}: return code", f.desc);
    let after = h.stats();
    for i in 0..stats::COUNT as usize {
        let want = before[i] + u64::from(i as u32 == f.stat);
        assert_eq!(after[i], want, "{}: counter {}", f.desc, stats::NAMES[i]);
    }
    match f.expect {
        Expect::Unchanged => assert!(out == f.frame, "{}: frame changed", f.desc),
        Expect::Dnat(addr, port) => assert_nat(f.desc, &f.frame, &out, true, addr, port),
        Expect::Snat(addr, port) => assert_nat(f.desc, &f.frame, &out, false, addr, port),
        Expect::PortUnreachable => assert_port_unreachable(f.desc, &f.frame, &out),
    }
    if let Some(after) = f.after {
        after(h);
    }
}

fn run_table(h: &mut Harness, table: &[Fixture]) {
    for f in table {
        check(h, f);
    }
}

/// The usual services: web (TCP, one backend), DNS (UDP and TCP), one without backends.
fn harness() -> Harness {
    let mut h = load();
    h.add_service(1, (VIP, VIP_PORT), PROTO_TCP, &[(BACKEND, BACKEND_PORT)]);
    h.add_service(2, (DNS_VIP, 53), PROTO_UDP, &[(DNS_BACKEND, 5353)]);
    h.add_service(3, (DNS_VIP, 53), PROTO_TCP, &[(DNS_BACKEND, 5353)]);
    h.add_service(4, (EMPTY_VIP, 80), PROTO_TCP, &[]);
    h.add_service(5, (EMPTY_VIP, 53), PROTO_UDP, &[]);
    h
}

// ---------------------------------------------------------------------------------------
// The fixtures.

const C: ([u8; 4], u16) = (CLIENT, 40000);
const SVC: ([u8; 4], u16) = (VIP, VIP_PORT);
const BE: ([u8; 4], u16) = (BACKEND, BACKEND_PORT);

fn fwd_key() -> Ct4Key {
    ct_key(CLIENT, 40000, VIP, VIP_PORT, PROTO_TCP)
}

fn rev_key() -> Ct4Key {
    ct_key(BACKEND, BACKEND_PORT, CLIENT, 40000, PROTO_TCP)
}

#[test]
fn tcp_connection_lifecycle() {
    use stats::*;
    let mut h = harness();
    let table = [
        fx(
            "SYN to the VIP",
            tcp(C, SVC, SYN),
            FORWARD_NEW,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        )
        .then(|h| {
            let f = h.ct(fwd_key()).expect("forward entry");
            assert_eq!(
                (f.nat_addr, f.nat_port, f.dir, f.flags, f.svc_id),
                (BACKEND, BACKEND_PORT, CT_DIR_FORWARD, 0, 1)
            );
            assert!(f.last_seen_ns > 0);
            let r = h.ct(rev_key()).expect("reply entry");
            assert_eq!(
                (r.nat_addr, r.nat_port, r.dir, r.flags, r.svc_id),
                (VIP, VIP_PORT, CT_DIR_REPLY, 0, 1)
            );
            assert_eq!(r.last_seen_ns, f.last_seen_ns);
            assert_eq!(h.ct_len(), 2);
        }),
        fx(
            "SYN-ACK from the backend",
            tcp(BE, C, SYN | ACK),
            REPLY,
            Expect::Snat(VIP, VIP_PORT),
        ),
        fx(
            "ACK",
            tcp(C, SVC, ACK),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "request data",
            tcp(C, SVC, PSH | ACK),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "response data",
            tcp(BE, C, PSH | ACK),
            REPLY,
            Expect::Snat(VIP, VIP_PORT),
        ),
        fx(
            "retransmitted SYN on a live connection",
            tcp(C, SVC, SYN),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        )
        .then(|h| assert_eq!(h.ct_len(), 2)),
        fx(
            "client FIN",
            tcp(C, SVC, FIN | ACK),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        )
        .then(|h| {
            assert_eq!(
                h.ct(fwd_key()).unwrap().flags,
                CT_FLAG_CLOSING,
                "FIN marks the forward entry"
            );
            assert_eq!(
                h.ct(rev_key()).unwrap().flags,
                CT_FLAG_REPLIED,
                "the backend answered"
            );
        }),
        fx(
            "backend FIN",
            tcp(BE, C, FIN | ACK),
            REPLY,
            Expect::Snat(VIP, VIP_PORT),
        )
        .then(|h| {
            assert_eq!(
                h.ct(rev_key()).unwrap().flags,
                CT_FLAG_CLOSING | CT_FLAG_REPLIED,
                "FIN marks the reply entry"
            )
        }),
        fx(
            "last ACK on a closing connection",
            tcp(C, SVC, ACK),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "SYN reusing the closed tuple",
            tcp(C, SVC, SYN),
            FORWARD_NEW,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        )
        .then(|h| {
            assert_eq!(
                h.ct(fwd_key()).unwrap().flags,
                0,
                "a new connection starts open"
            );
            assert_eq!(h.ct(rev_key()).unwrap().flags, 0);
            assert_eq!(h.ct_len(), 2);
        }),
        fx(
            "backend RST",
            tcp(BE, C, RST | ACK),
            REPLY,
            Expect::Snat(VIP, VIP_PORT),
        )
        .then(|h| {
            assert_eq!(
                h.ct(rev_key()).unwrap().flags,
                CT_FLAG_CLOSING | CT_FLAG_REPLIED,
                "RST marks the reply entry"
            );
            assert_eq!(
                h.ct(fwd_key()).unwrap().flags,
                CT_FLAG_CLOSING,
                "a backend's RST marks the forward entry too"
            );
        }),
        fx(
            "client RST",
            tcp(C, SVC, RST),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "SYN after RST picks anew",
            tcp(C, SVC, SYN),
            FORWARD_NEW,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "client RST of the new connection",
            tcp(C, SVC, RST | ACK),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        )
        .then(|h| assert_eq!(h.ct(fwd_key()).unwrap().flags, CT_FLAG_CLOSING)),
    ];
    run_table(&mut h, &table);
}

#[test]
fn udp_request_and_reply() {
    use stats::*;
    let mut h = harness();
    let client = (CLIENT, 53001);
    let svc = (DNS_VIP, 53);
    let be = (DNS_BACKEND, 5353);
    let table = [
        fx(
            "UDP query to the VIP",
            udp(client, svc),
            FORWARD_NEW,
            Expect::Dnat(DNS_BACKEND, 5353),
        )
        .then(|h| {
            let f = h
                .ct(ct_key(CLIENT, 53001, DNS_VIP, 53, PROTO_UDP))
                .expect("forward entry");
            assert_eq!(
                (f.nat_addr, f.nat_port, f.dir, f.svc_id),
                (DNS_BACKEND, 5353, CT_DIR_FORWARD, 2)
            );
            let r = h
                .ct(ct_key(DNS_BACKEND, 5353, CLIENT, 53001, PROTO_UDP))
                .expect("reply entry");
            assert_eq!(
                (r.nat_addr, r.nat_port, r.dir, r.svc_id),
                (DNS_VIP, 53, CT_DIR_REPLY, 2)
            );
        }),
        fx(
            "UDP answer from the backend",
            udp(be, client),
            REPLY,
            Expect::Snat(DNS_VIP, 53),
        ),
        fx(
            "second query on the same tuple",
            udp(client, svc),
            FORWARD_ESTABLISHED,
            Expect::Dnat(DNS_BACKEND, 5353),
        ),
        fx(
            "query without UDP checksum",
            udp_no_csum((CLIENT, 53002), svc),
            FORWARD_NEW,
            Expect::Dnat(DNS_BACKEND, 5353),
        ),
        fx(
            "answer without UDP checksum",
            udp_no_csum(be, (CLIENT, 53002)),
            REPLY,
            Expect::Snat(DNS_VIP, 53),
        ),
        fx(
            "TCP to the same VIP:53 is its own service",
            tcp((CLIENT, 53003), svc, SYN),
            FORWARD_NEW,
            Expect::Dnat(DNS_BACKEND, 5353),
        )
        .then(|h| {
            assert_eq!(
                h.ct(ct_key(CLIENT, 53003, DNS_VIP, 53, PROTO_TCP))
                    .unwrap()
                    .svc_id,
                3
            )
        }),
    ];
    run_table(&mut h, &table);
}

#[test]
fn passes_untouched() {
    use stats::*;
    let mut h = harness();
    // A bit set for OUTSIDE:443/TCP with no conntrack entry behind it: a filter false positive.
    h.set_filter_bit(OUTSIDE, 443, PROTO_TCP);
    let tcp_full = tcp(C, SVC, SYN);
    let udp_full = udp(C, (DNS_VIP, 53));
    let mut bad_ihl = tcp(C, SVC, SYN);
    bad_ihl[ETH_LEN] = 0x44;
    let mut not_v4 = tcp(C, SVC, SYN);
    not_v4[ETH_LEN] = 0x65;
    let table = [
        fx(
            "ICMP echo to the VIP",
            icmp_echo(CLIENT, VIP),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "TCP to the outside",
            tcp(C, (OUTSIDE, 443), SYN),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "UDP to the outside",
            udp(C, (OUTSIDE, 123)),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "TCP from the outside (filter bit set, no conntrack)",
            tcp((OUTSIDE, 443), C, SYN | ACK),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "TCP to the VIP on a port it does not serve",
            tcp(C, (VIP, 81), SYN),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "UDP to a TCP-only VIP port",
            udp(C, SVC),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "TCP from a backend port to a client with no connection",
            tcp(BE, (CLIENT, 41000), ACK),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx(
            "client-to-client traffic on a backend's tuple direction",
            tcp(C, BE, SYN),
            PASS_NOT_SERVICE,
            Expect::Unchanged,
        ),
        fx("IPv6", ipv6_udp(), PASS_NOT_SERVICE, Expect::Unchanged),
        fx(
            "cut inside the IPv4 header",
            tcp_full[..ETH_LEN + 12].to_vec(),
            PASS_MALFORMED,
            Expect::Unchanged,
        )
        .kernel_may_refuse(),
        fx(
            "cut inside the IPv4 header, IHL 6",
            tcp_ip(ip(CLIENT, VIP, &[1, 1, 1, 0]), 40000, VIP_PORT, SYN, b"")[..ETH_LEN + 22]
                .to_vec(),
            PASS_MALFORMED,
            Expect::Unchanged,
        ),
        fx(
            "cut inside the TCP header",
            tcp_full[..ETH_LEN + 20 + 12].to_vec(),
            PASS_MALFORMED,
            Expect::Unchanged,
        ),
        fx(
            "cut inside the UDP header",
            udp_full[..ETH_LEN + 20 + 6].to_vec(),
            PASS_MALFORMED,
            Expect::Unchanged,
        ),
        fx(
            "cut inside IPv4 options",
            tcp_ip(ip(CLIENT, VIP, &[1; 40]), 40000, VIP_PORT, SYN, b"")[..ETH_LEN + 40].to_vec(),
            PASS_MALFORMED,
            Expect::Unchanged,
        ),
        fx("IHL below 5", bad_ihl, PASS_MALFORMED, Expect::Unchanged),
        fx(
            "IP version 6 in an IPv4 frame",
            not_v4,
            PASS_MALFORMED,
            Expect::Unchanged,
        ),
        fx(
            "first fragment (MF) to the VIP",
            fragment(true, 0),
            PASS_FRAGMENT,
            Expect::Unchanged,
        ),
        fx(
            "later fragment to the VIP",
            fragment(true, 9),
            PASS_FRAGMENT,
            Expect::Unchanged,
        ),
        fx(
            "last fragment to the VIP",
            fragment(false, 9),
            PASS_FRAGMENT,
            Expect::Unchanged,
        ),
    ];
    run_table(&mut h, &table);
    assert_eq!(h.ct_len(), 0, "passing packets create no conntrack entries");
}

#[test]
fn ip_options_are_honoured() {
    use stats::*;
    let mut h = harness();
    // Router alert (4 bytes) and a 40-byte header of NOPs with an EOL: IHL 6 and IHL 15.
    let ra = [0x94, 0x04, 0x00, 0x00];
    let mut nops = [1u8; 40];
    nops[39] = 0;
    let table = [
        fx(
            "SYN with IHL 6 to the VIP",
            tcp_ip(ip(CLIENT, VIP, &ra), 40100, VIP_PORT, SYN, b""),
            FORWARD_NEW,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "reply with IHL 6",
            tcp_ip(
                ip(BACKEND, CLIENT, &ra),
                BACKEND_PORT,
                40100,
                SYN | ACK,
                b"",
            ),
            REPLY,
            Expect::Snat(VIP, VIP_PORT),
        ),
        fx(
            "data with IHL 15 to the VIP",
            tcp_ip(ip(CLIENT, VIP, &nops), 40100, VIP_PORT, PSH | ACK, b"hello"),
            FORWARD_ESTABLISHED,
            Expect::Dnat(BACKEND, BACKEND_PORT),
        ),
        fx(
            "UDP with IHL 15 to the VIP",
            udp_ip(ip(CLIENT, DNS_VIP, &nops), 53100, 53, b"q"),
            FORWARD_NEW,
            Expect::Dnat(DNS_BACKEND, 5353),
        ),
        fx(
            "UDP reply with IHL 15",
            udp_ip(ip(DNS_BACKEND, CLIENT, &nops), 5353, 53100, b"a"),
            REPLY,
            Expect::Snat(DNS_VIP, 53),
        ),
        fx(
            "options to a service without backends",
            tcp_ip(ip(CLIENT, EMPTY_VIP, &nops), 40101, 80, SYN, b""),
            REJECT_NO_BACKEND,
            Expect::PortUnreachable,
        ),
    ];
    run_table(&mut h, &table);
}

#[test]
fn no_backends_rejects_with_port_unreachable() {
    use stats::*;
    let mut h = harness();
    // A SYN with the options Linux sends (MSS, SACK, timestamps, window scale): 74 bytes,
    // so the frame shrinks to the ICMP error; a bare UDP datagram grows to it.
    let mut b = builder(ip(CLIENT, EMPTY_VIP, &[]))
        .tcp(40200, 80, 0xdead_beef, 64240)
        .syn();
    b = b
        .options(&[
            etherparse::TcpOptionElement::MaximumSegmentSize(1460),
            etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
            etherparse::TcpOptionElement::Timestamp(1, 0),
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::WindowScale(7),
        ])
        .unwrap();
    let mut syn = Vec::new();
    b.write(&mut syn, b"").unwrap();
    assert_eq!(syn.len(), 74);
    let small_udp = udp_ip(ip(CLIENT, EMPTY_VIP, &[]), 53200, 53, b"");
    assert!(small_udp.len() < 70);
    let table = [
        fx(
            "TCP SYN to a service without backends",
            syn,
            REJECT_NO_BACKEND,
            Expect::PortUnreachable,
        ),
        fx(
            "UDP to a service without backends",
            small_udp,
            REJECT_NO_BACKEND,
            Expect::PortUnreachable,
        ),
        fx(
            "UDP with payload to a service without backends",
            udp((CLIENT, 53201), (EMPTY_VIP, 53)),
            REJECT_NO_BACKEND,
            Expect::PortUnreachable,
        ),
    ];
    run_table(&mut h, &table);
    assert_eq!(
        h.ct_len(),
        0,
        "a rejected packet creates no conntrack entries"
    );
}

#[test]
fn missing_backend_slot_passes() {
    use stats::*;
    let mut h = harness();
    // The service says 3 backends but table 20 has none: a half-written state.
    h.set_service(10, ([10, 96, 0, 77], 80), PROTO_TCP, 3);
    let table = [fx(
        "SYN to a service whose slot is missing",
        tcp(C, ([10, 96, 0, 77], 80), SYN),
        ERR_BACKEND_MISSING,
        Expect::Unchanged,
    )];
    run_table(&mut h, &table);
    assert_eq!(h.ct_len(), 0);
}

#[test]
fn backend_choice_spreads_and_sticks() {
    let mut h = load();
    let backends: Vec<([u8; 4], u16)> = (1..=3)
        .map(|i| ([10, 244, 5, i], 9000 + u16::from(i)))
        .collect();
    h.add_service(7, (VIP, 443), PROTO_TCP, &backends);
    let mut used = std::collections::HashSet::new();
    for port in 30000..30060u16 {
        let syn = tcp((CLIENT, port), (VIP, 443), SYN);
        let (ret, out) = h.run(&syn);
        assert_eq!(ret, TC_ACT_OK);
        let (ip, t) = assert_checksums("SYN", &out);
        let Some(TransportHeader::Tcp(t)) = t else {
            panic!("not TCP")
        };
        let chosen = (ip.destination, t.destination_port);
        assert!(backends.contains(&chosen), "{chosen:?} is not a backend");
        used.insert(chosen);
        let ct = h.ct(ct_key(CLIENT, port, VIP, 443, PROTO_TCP)).unwrap();
        assert_eq!((ct.nat_addr, ct.nat_port), chosen);
        let rev = h
            .ct(ct_key(chosen.0, chosen.1, CLIENT, port, PROTO_TCP))
            .unwrap();
        assert_eq!(
            (rev.nat_addr, rev.nat_port, rev.dir),
            (VIP, 443, CT_DIR_REPLY)
        );
        for flags in [ACK, PSH | ACK, FIN | ACK] {
            let f = fx(
                "same tuple",
                tcp((CLIENT, port), (VIP, 443), flags),
                stats::FORWARD_ESTABLISHED,
                Expect::Dnat(chosen.0, chosen.1),
            );
            check(&mut h, &f);
        }
        let f = fx(
            "reply",
            tcp((chosen.0, chosen.1), (CLIENT, port), ACK),
            stats::REPLY,
            Expect::Snat(VIP, 443),
        );
        check(&mut h, &f);
    }
    assert_eq!(
        used.len(),
        3,
        "60 connections over 3 backends used only {used:?}"
    );
    let s = h.stats();
    assert_eq!(s[stats::FORWARD_NEW as usize], 60);
    assert_eq!(s[stats::FORWARD_ESTABLISHED as usize], 180);
    assert_eq!(s[stats::REPLY as usize], 60);
}

/// The cost of an established-flow packet against the floor program, in one run.
///
/// BPF_PROG_TEST_RUN repeats the program on the same skb, so the rewrite of one run is the
/// input of the next. Two services that are each other's backend make every run an
/// established-flow hit with a full rewrite: VIP:80 -> VIP2:81 -> VIP:80 -> ...
#[test]
fn established_cost_vs_floor() {
    const REPEAT: u32 = 1_000_000;
    let vip2 = [10, 96, 0, 11];
    let mut h = load();
    h.add_service(1, (VIP, 80), PROTO_TCP, &[(vip2, 81)]);
    h.add_service(2, (vip2, 81), PROTO_TCP, &[(VIP, 80)]);
    let frame = tcp(C, (VIP, 80), PSH | ACK);
    // Create both connections (VIP and VIP2 are each one hop away from the other).
    let (_, hop) = h.run(&frame);
    h.run(&hop);
    let before = h.stats();
    let run = h.run_prog(PROG_TC_INGRESS, &frame, REPEAT);
    assert_eq!(run.ret, TC_ACT_OK);
    assert_checksums("after a million rewrites", &run.out);
    let established = run.duration;
    let after = h.stats();
    assert_eq!(
        after[stats::FORWARD_ESTABLISHED as usize] - before[stats::FORWARD_ESTABLISHED as usize],
        u64::from(REPEAT),
        "every run took the established path"
    );
    let non_service = tcp(C, (OUTSIDE, 443), PSH | ACK);
    let pass = h.run_prog(PROG_TC_INGRESS, &non_service, REPEAT);
    assert_eq!(pass.ret, TC_ACT_OK);
    let pass = pass.duration;
    let floor = h.run_prog(PROG_TC_FLOOR, &frame, REPEAT);
    assert_eq!(floor.ret, TC_ACT_OK);
    let floor = floor.duration;
    println!(
        "ns/run over {REPEAT} runs: tc_ingress established {} ns, tc_ingress non-service {} ns, tc_floor {} ns",
        established.as_nanos(),
        pass.as_nanos(),
        floor.as_nanos()
    );
}
