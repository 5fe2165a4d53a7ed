//! Packet fuzzing of `tc_ingress`, and of `xdp_nodeport` with the same frontends in the
//! external view, through BPF_PROG_TEST_RUN.
//!
//! Tens of thousands of frames, random and mutated (truncated at every length, odd IP
//! versions and IHL, IP options, fragments, 802.1Q and QinQ tags, IPv6 with extension
//! headers, random bytes, bit flips of valid service packets), are run against a loaded
//! object with services and conntrack entries programmed. Each run is checked against a
//! reference parser written here (what the datapath must do with that frame):
//!
//! - every run gives a verdict: TC_ACT_OK, TC_ACT_SHOT, or the redirect of a reject (an
//!   ICMP port unreachable with valid checksums back to the sender); the kernel may refuse
//!   only a frame too short for its headers (EINVAL);
//! - a frame that is not a well-formed, unfragmented IPv4 TCP/UDP packet to a frontend or
//!   from a backend with a connection leaves byte for byte unchanged;
//! - a rewritten frame changes only the NAT-ed address and port and the two checksums; its
//!   destination is a backend of the frontend it was sent to (the connection's backend if
//!   it had one), or its source the frontend of the connection it replies on; the IPv4 and
//!   L4 checksums keep their residual (valid stays valid: the rewrite is incremental, like
//!   the kernel's NAT, so a frame arriving with a bad checksum keeps it bad);
//! - afterwards services4 and backend_slots4 read back identical, and every conntrack entry
//!   is a pair (forward, reply) for a well-formed tuple sent to a frontend with backends.
//!
//! At XDP the frontends are NodePorts of local backends (DNAT only, handed to the stack):
//! the same rules hold with XDP's verdicts (XDP_PASS, XDP_DROP, XDP_TX for the reject), and
//! a backend's reply is not XDP's to translate (tc_ingress at the pod's veth does it), so
//! it passes unchanged.
//!
//! Seeded: the seed is printed, and BPFPROXY_FUZZ_SEED=<n> replays a run;
//! BPFPROXY_FUZZ_RUNS sets the number of random frames (default 40,000).

use std::collections::{BTreeMap, HashMap, HashSet};

use aya::programs::ProgramError;
use etherparse::{IpHeaders, IpNumber, Ipv4Header, PacketBuilder};
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, Ct4Key},
    service::{
        BACKEND_LOCAL, Backend4, BackendSlotKey, SCOPE_EXTERNAL, SVC_F_NODE_PORT, SVC_F_SNAT,
        Svc4Key, SvcValue,
    },
    stats,
};
use testbed::datapath::{
    CLIENT_MAC, DatapathHarness, ETH_LEN, MapSizes, NODE_MAC, PROG_TC_INGRESS, PROG_XDP_NODEPORT,
    TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX, ct_key, fold,
};

type Addr = ([u8; 4], u16);

const VIP_WEB: [u8; 4] = [10, 96, 0, 10];
const VIP_DNS: [u8; 4] = [10, 96, 0, 53];
const VIP_EMPTY: [u8; 4] = [10, 96, 0, 99];
const CLIENTS: [[u8; 4]; 3] = [[10, 244, 1, 5], [10, 244, 1, 6], [192, 168, 7, 1]];
const OUTSIDE: [u8; 4] = [93, 184, 216, 34];

/// A frontend (address, port, protocol) and its backends.
struct Svc {
    id: u32,
    frontend: Addr,
    proto: u8,
    backends: Vec<Addr>,
}

fn services() -> Vec<Svc> {
    vec![
        Svc {
            id: 1,
            frontend: (VIP_WEB, 80),
            proto: PROTO_TCP,
            backends: vec![
                ([10, 244, 2, 7], 8080),
                ([10, 244, 2, 8], 8080),
                ([10, 244, 3, 7], 8081),
            ],
        },
        Svc {
            id: 2,
            frontend: (VIP_DNS, 53),
            proto: PROTO_UDP,
            backends: vec![([10, 244, 3, 9], 5353), ([10, 244, 3, 10], 5353)],
        },
        Svc {
            id: 3,
            frontend: (VIP_DNS, 53),
            proto: PROTO_TCP,
            backends: vec![([10, 244, 3, 9], 5353)],
        },
        Svc {
            id: 4,
            frontend: (VIP_EMPTY, 80),
            proto: PROTO_TCP,
            backends: vec![],
        },
        Svc {
            id: 5,
            frontend: (VIP_EMPTY, 53),
            proto: PROTO_UDP,
            backends: vec![],
        },
    ]
}

/// services4 and backend_slots4, sorted.
type Programmed = (Vec<(Svc4Key, SvcValue)>, Vec<(BackendSlotKey, Backend4)>);

/// Services by (frontend, protocol): its backends.
type Frontends = HashMap<(Addr, u8), Vec<Addr>>;

// ---------------------------------------------------------------------------------------
// The reference parser: what the datapath must make of a frame.

/// An IPv4 TCP/UDP packet as the datapath parses it.
#[derive(Clone, Copy, Debug)]
struct Parsed {
    l4_off: usize,
    src: Addr,
    dst: Addr,
    proto: u8,
    /// A SYN without ACK.
    syn: bool,
    udp_no_csum: bool,
}

/// Ethernet type IPv4, version 4, IHL >= 5 and the whole header present, TCP or UDP, not a
/// fragment, the whole TCP (20 bytes) or UDP (8 bytes) header present. Nothing else (total
/// length, checksums) is looked at, as in the datapath.
fn reference_parse(f: &[u8]) -> Option<Parsed> {
    if f.len() < ETH_LEN + 20 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return None;
    }
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let l4_off = ETH_LEN + ihl;
    let l4 = &f[l4_off..];
    if l4.len() < if proto == PROTO_TCP { 20 } else { 8 } {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Some(Parsed {
        l4_off,
        src: (ip[12..16].try_into().unwrap(), port(0)),
        dst: (ip[16..20].try_into().unwrap(), port(2)),
        proto,
        syn: proto == PROTO_TCP && l4[13] & 0x12 == 0x02,
        udp_no_csum: proto == PROTO_UDP && l4[6..8] == [0, 0],
    })
}

/// The residual of the IPv4 header checksum: 0xffff when it is valid (ones' complement
/// zero normalised).
fn ip_residual(f: &[u8], p: &Parsed) -> u16 {
    norm(fold(&f[ETH_LEN..p.l4_off], 0))
}

/// The residual of the L4 checksum over the pseudo-header and the rest of the frame.
fn l4_residual(f: &[u8], p: &Parsed) -> u16 {
    let seg = &f[p.l4_off..];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&f[ETH_LEN + 12..ETH_LEN + 20]);
    pseudo.extend_from_slice(&[0, p.proto]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let s = u32::from(fold(&pseudo, 0));
    norm(fold(seg, s))
}

fn norm(x: u16) -> u16 {
    if x == 0 { 0xffff } else { x }
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Frames.

struct Gen {
    rng: fastrand::Rng,
    services: Vec<(Addr, u8, Vec<Addr>)>,
}

impl Gen {
    fn client(&mut self) -> Addr {
        // Few clients and ports, so frames hit existing connections often.
        let c = CLIENTS[self.rng.usize(..CLIENTS.len())];
        (c, 40000 + self.rng.u16(..24))
    }

    fn options(&mut self) -> Vec<u8> {
        match self.rng.u8(..4) {
            0 | 1 => Vec::new(),
            // Router alert.
            2 => vec![0x94, 0x04, 0, 0],
            // Random option bytes, 4n of them.
            _ => {
                let n = 4 * self.rng.usize(1..=10);
                (0..n).map(|_| self.rng.u8(..)).collect()
            }
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = match self.rng.u8(..4) {
            0 => 0,
            1 => self.rng.usize(..8),
            _ => self.rng.usize(..300),
        };
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    /// A well-formed IPv4 TCP or UDP frame with valid checksums.
    fn ipv4(&mut self, src: Addr, dst: Addr, proto: u8, flags: u8) -> Vec<u8> {
        let mut ip = Ipv4Header::new(0, 64, IpNumber(proto), src.0, dst.0).unwrap();
        ip.identification = self.rng.u16(..);
        ip.dont_fragment = self.rng.bool();
        ip.options = self.options()[..].try_into().unwrap();
        let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
            .ip(IpHeaders::Ipv4(ip, Default::default()));
        let payload = self.payload();
        let mut v = Vec::new();
        if proto == PROTO_TCP {
            let mut t = b.tcp(src.1, dst.1, self.rng.u32(..), self.rng.u16(..));
            if flags & 0x01 != 0 {
                t = t.fin();
            }
            if flags & 0x02 != 0 {
                t = t.syn();
            }
            if flags & 0x04 != 0 {
                t = t.rst();
            }
            if flags & 0x08 != 0 {
                t = t.psh();
            }
            if flags & 0x10 != 0 {
                t = t.ack(self.rng.u32(..));
            }
            t.write(&mut v, &payload).unwrap();
        } else {
            b.udp(src.1, dst.1).write(&mut v, &payload).unwrap();
            if self.rng.u8(..8) == 0 {
                // Sent without a checksum (allowed over IPv4).
                let at = ETH_LEN + usize::from(v[ETH_LEN] & 0x0f) * 4 + 6;
                v[at..at + 2].fill(0);
            }
        }
        v
    }

    fn flags(&mut self) -> u8 {
        match self.rng.u8(..6) {
            0 => 0x02,
            1 => 0x10,
            2 => 0x18,
            3 => 0x11,
            4 => 0x14,
            _ => self.rng.u8(..0x20),
        }
    }

    /// A frame a user would send: to a frontend, a reply from a backend, or elsewhere.
    fn service_frame(&mut self) -> Vec<u8> {
        let (frontend, proto, backends) =
            self.services[self.rng.usize(..self.services.len())].clone();
        let client = self.client();
        let flags = self.flags();
        match self.rng.u8(..5) {
            0..=2 => self.ipv4(client, frontend, proto, flags),
            3 if !backends.is_empty() => {
                let be = backends[self.rng.usize(..backends.len())];
                self.ipv4(be, client, proto, flags)
            }
            _ => {
                let dst = (OUTSIDE, self.rng.u16(..));
                let proto = if self.rng.bool() {
                    PROTO_TCP
                } else {
                    PROTO_UDP
                };
                self.ipv4(client, dst, proto, flags)
            }
        }
    }

    fn random_bytes(&mut self) -> Vec<u8> {
        let n = self.rng.usize(..160);
        let mut v: Vec<u8> = (0..n).map(|_| self.rng.u8(..)).collect();
        // Often an IPv4 ethertype and version, so the random bytes reach the IPv4 parser.
        if n >= 15 && self.rng.bool() {
            v[12..14].copy_from_slice(&[0x08, 0x00]);
            v[14] = 0x40 | (v[14] & 0x0f);
        }
        v
    }

    fn bit_flips(&mut self) -> Vec<u8> {
        let mut v = self.service_frame();
        for _ in 0..self.rng.usize(1..=4) {
            // Mostly in the headers, where a flip changes what the datapath sees.
            let upto = v.len().min(ETH_LEN + 60 + 20);
            let at = self.rng.usize(..upto);
            v[at] ^= 1 << self.rng.u8(..8);
        }
        v
    }

    fn odd_version_ihl(&mut self) -> Vec<u8> {
        let mut v = self.service_frame();
        v[ETH_LEN] = (self.rng.u8(..16) << 4) | self.rng.u8(..16);
        v
    }

    fn fragment(&mut self) -> Vec<u8> {
        let mut v = self.service_frame();
        let mf = u16::from(self.rng.bool()) << 13;
        let offset = if self.rng.bool() {
            0
        } else {
            self.rng.u16(1..0x2000)
        };
        let df = u16::from(self.rng.bool()) << 14;
        let frag = (df | mf | offset).to_be_bytes();
        v[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frag);
        fix_ip_csum(&mut v);
        v
    }

    /// One (802.1Q) or two (QinQ: 802.1ad then 802.1Q) tags before an IPv4 packet.
    fn vlan(&mut self) -> Vec<u8> {
        let v = self.service_frame();
        let mut tags = Vec::new();
        if self.rng.bool() {
            tags.extend_from_slice(&[0x88, 0xa8]);
            tags.extend_from_slice(&self.rng.u16(..0x1000).to_be_bytes());
        }
        tags.extend_from_slice(&[0x81, 0x00]);
        tags.extend_from_slice(&self.rng.u16(..0x1000).to_be_bytes());
        let mut out = v[..12].to_vec();
        out.extend_from_slice(&tags);
        out.extend_from_slice(&v[12..]);
        out
    }

    /// IPv6 with extension headers (hop-by-hop, routing, fragment, destination options)
    /// before a TCP or UDP header whose ports are a frontend's.
    fn ipv6(&mut self) -> Vec<u8> {
        let mut ext = Vec::new();
        let mut next_hdrs = Vec::new();
        for _ in 0..self.rng.usize(..4) {
            let kind = [0u8, 43, 44, 60][self.rng.usize(..4)];
            next_hdrs.push(kind);
        }
        let l4: u8 = if self.rng.bool() { 6 } else { 17 };
        let first = *next_hdrs.first().unwrap_or(&l4);
        for (i, &kind) in next_hdrs.iter().enumerate() {
            let next = *next_hdrs.get(i + 1).unwrap_or(&l4);
            if kind == 44 {
                let mut h = vec![next, 0];
                h.extend_from_slice(&self.rng.u16(..).to_be_bytes());
                h.extend_from_slice(&self.rng.u32(..).to_be_bytes());
                ext.extend_from_slice(&h);
            } else {
                let units = self.rng.usize(..3);
                let mut h = vec![next, units as u8];
                h.extend((0..6 + units * 8).map(|_| self.rng.u8(..)));
                ext.extend_from_slice(&h);
            }
        }
        let mut l4_bytes = Vec::new();
        l4_bytes.extend_from_slice(&self.rng.u16(..).to_be_bytes());
        l4_bytes.extend_from_slice(&80u16.to_be_bytes());
        l4_bytes.extend((0..if l4 == 6 { 16 } else { 4 }).map(|_| self.rng.u8(..)));
        let mut v = Vec::new();
        v.extend_from_slice(&NODE_MAC);
        v.extend_from_slice(&CLIENT_MAC);
        v.extend_from_slice(&[0x86, 0xdd]);
        v.extend_from_slice(&[0x60, 0, 0, 0]);
        v.extend_from_slice(&((ext.len() + l4_bytes.len()) as u16).to_be_bytes());
        v.extend_from_slice(&[first, 64]);
        v.extend_from_slice(&[0xfd; 16]);
        // A v4-mapped VIP as destination: still IPv6, never a service.
        let mut dst = [0u8; 16];
        dst[10] = 0xff;
        dst[11] = 0xff;
        dst[12..].copy_from_slice(&VIP_WEB);
        v.extend_from_slice(&dst);
        v.extend_from_slice(&ext);
        v.extend_from_slice(&l4_bytes);
        v
    }

    fn truncated(&mut self) -> Vec<u8> {
        let v = self.service_frame();
        let cut = self.rng.usize(..=v.len());
        v[..cut].to_vec()
    }

    fn next(&mut self) -> (&'static str, Vec<u8>) {
        match self.rng.u8(..10) {
            0 | 1 => ("service", self.service_frame()),
            2 | 3 => ("bit flips", self.bit_flips()),
            4 => ("version/IHL", self.odd_version_ihl()),
            5 => ("fragment", self.fragment()),
            6 => ("VLAN", self.vlan()),
            7 => ("IPv6", self.ipv6()),
            8 => ("random", self.random_bytes()),
            _ => ("truncated", self.truncated()),
        }
    }
}

fn fix_ip_csum(v: &mut [u8]) {
    let ihl = usize::from(v[ETH_LEN] & 0x0f) * 4;
    v[ETH_LEN + 10..ETH_LEN + 12].fill(0);
    let c = !fold(&v[ETH_LEN..ETH_LEN + ihl], 0);
    v[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// The checks of one run.

#[derive(Default, Debug)]
struct Tally {
    runs: u64,
    refused: u64,
    unchanged: u64,
    dnat: u64,
    snat: u64,
    rejected: u64,
    shot: u64,
    by_kind: BTreeMap<&'static str, u64>,
}

struct Fuzz {
    h: DatapathHarness,
    frontends: Frontends,
    /// Backend -> the frontends it serves.
    backends: HashMap<(Addr, u8), Vec<Addr>>,
    /// Forward tuples of well-formed frames sent to a frontend with backends.
    sent: HashSet<Ct4Key>,
    tally: Tally,
    /// Runs `xdp_nodeport` (verdicts mapped to tc's) instead of `tc_ingress`.
    xdp: bool,
}

impl Fuzz {
    fn run(&mut self, kind: &'static str, frame: &[u8]) {
        let ctx = || format!("{kind} frame {}", hex(frame));
        self.tally.runs += 1;
        *self.tally.by_kind.entry(kind).or_default() += 1;
        let parsed = reference_parse(frame);
        // The connection the frame belongs to, as it was before the run.
        let fwd_before = parsed.and_then(|p| {
            self.h
                .ct(ct_key(p.src.0, p.src.1, p.dst.0, p.dst.1, p.proto))
        });
        let stats_before = self.h.stats();
        let run = if self.xdp {
            self.h
                .try_run_xdp(PROG_XDP_NODEPORT, frame, 1, None)
                .map(|mut run| {
                    run.ret = match run.ret {
                        XDP_PASS => TC_ACT_OK,
                        XDP_DROP => TC_ACT_SHOT,
                        XDP_TX => TC_ACT_REDIRECT,
                        other => 100 + other,
                    };
                    run
                })
        } else {
            self.h.try_run_prog(PROG_TC_INGRESS, frame, 1)
        };
        let run = match run {
            Ok(run) => run,
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) && too_short(frame) =>
            {
                self.tally.refused += 1;
                assert_eq!(
                    self.h.stats(),
                    stats_before,
                    "{}: refused, yet counted",
                    ctx()
                );
                return;
            }
            Err(e) => panic!("{}: BPF_PROG_TEST_RUN failed: {e:?}", ctx()),
        };
        let out = &run.out;
        let stats_after = self.h.stats();
        let bumped: u64 = (0..stats::COUNT as usize)
            .map(|i| stats_after[i] - stats_before[i])
            .sum();
        assert_eq!(bumped, 1, "{}: one counter per packet", ctx());
        match run.ret {
            TC_ACT_SHOT => {
                self.tally.shot += 1;
                assert!(
                    parsed.is_some(),
                    "{}: dropped a frame it does not handle",
                    ctx()
                );
                return;
            }
            TC_ACT_REDIRECT => {
                self.tally.rejected += 1;
                let p = parsed.unwrap_or_else(|| panic!("{}: rejected a non-service frame", ctx()));
                let backends = self.frontends.get(&(p.dst, p.proto));
                assert!(
                    backends.is_some_and(Vec::is_empty),
                    "{}: rejected, but not sent to a frontend without backends",
                    ctx()
                );
                check_port_unreachable(&ctx(), frame, &p, out);
                return;
            }
            TC_ACT_OK => {}
            other => panic!("{}: return code {other}", ctx()),
        }
        if out == frame {
            self.tally.unchanged += 1;
            if let Some(p) = parsed {
                let to_frontend = self.frontends.get(&(p.dst, p.proto));
                assert!(
                    to_frontend.is_none_or(Vec::is_empty),
                    "{}: a packet to a frontend with backends left unchanged",
                    ctx()
                );
                assert!(
                    to_frontend.is_none(),
                    "{}: a packet to a frontend without backends passed",
                    ctx()
                );
            }
            return;
        }
        let p = parsed.unwrap_or_else(|| {
            panic!(
                "{}: a frame the datapath must not handle was changed to {}",
                ctx(),
                hex(out)
            )
        });
        assert_eq!(out.len(), frame.len(), "{}: length changed", ctx());
        // Only the NAT-ed address and port and the two checksums may differ.
        let dst_side = self.frontends.contains_key(&(p.dst, p.proto));
        let (addr_at, port_at) = if dst_side {
            (ETH_LEN + 16, p.l4_off + 2)
        } else {
            (ETH_LEN + 12, p.l4_off)
        };
        let csum_at = p.l4_off + if p.proto == PROTO_TCP { 16 } else { 6 };
        for (i, (a, b)) in frame.iter().zip(out.iter()).enumerate() {
            let allowed = (addr_at..addr_at + 4).contains(&i)
                || (port_at..port_at + 2).contains(&i)
                || (ETH_LEN + 10..ETH_LEN + 12).contains(&i)
                || (csum_at..csum_at + 2).contains(&i);
            assert!(
                a == b || allowed,
                "{}: byte {i} changed ({a:#04x} -> {b:#04x}), output {}",
                ctx(),
                hex(out)
            );
        }
        let new: Addr = (
            out[addr_at..addr_at + 4].try_into().unwrap(),
            u16::from_be_bytes([out[port_at], out[port_at + 1]]),
        );
        if dst_side {
            self.tally.dnat += 1;
            let backends = &self.frontends[&(p.dst, p.proto)];
            assert!(
                backends.contains(&new),
                "{}: DNAT to {new:?}, not a backend of {:?}",
                ctx(),
                p.dst
            );
            if let Some(ct) = fwd_before
                && ct.dir == CT_DIR_FORWARD
                && !(p.syn && ct.flags & CT_FLAG_CLOSING != 0)
            {
                assert_eq!(
                    new,
                    (ct.nat_addr, ct.nat_port),
                    "{}: an open connection moved to another backend",
                    ctx()
                );
            }
            self.sent
                .insert(ct_key(p.src.0, p.src.1, p.dst.0, p.dst.1, p.proto));
        } else {
            assert!(!self.xdp, "{}: XDP translated a reply", ctx());
            self.tally.snat += 1;
            let served = self.backends.get(&(p.src, p.proto));
            assert!(
                served.is_some_and(|f| f.contains(&new)),
                "{}: SNAT to {new:?}, which {:?} does not serve",
                ctx(),
                p.src
            );
            let ct = fwd_before.unwrap_or_else(|| panic!("{}: SNAT without a connection", ctx()));
            assert_eq!(ct.dir, CT_DIR_REPLY, "{}: SNAT on a forward entry", ctx());
            assert_eq!(
                (ct.nat_addr, ct.nat_port),
                new,
                "{}: SNAT to another frontend than the connection's",
                ctx()
            );
        }
        assert_eq!(
            ip_residual(out, &p),
            ip_residual(frame, &p),
            "{}: IPv4 checksum broken by the rewrite, output {}",
            ctx(),
            hex(out)
        );
        if p.udp_no_csum {
            assert_eq!(
                out[csum_at..csum_at + 2],
                [0, 0],
                "{}: UDP checksum 0 set",
                ctx()
            );
        } else {
            assert_eq!(
                l4_residual(out, &p),
                l4_residual(frame, &p),
                "{}: L4 checksum broken by the rewrite, output {}",
                ctx(),
                hex(out)
            );
        }
    }

    /// Services and backend slots as they read back, conntrack entries as pairs of a
    /// well-formed tuple sent to a frontend with backends.
    fn check_maps(&self, programmed: &Programmed) {
        assert_eq!(
            &read_services(&self.h),
            programmed,
            "services4/backend_slots4 changed"
        );
        let entries: HashMap<Ct4Key, _> = self.h.dp.maps.conntrack_entries().into_iter().collect();
        for (k, v) in &entries {
            match v.dir {
                CT_DIR_FORWARD => {
                    assert!(
                        self.sent.contains(k),
                        "conntrack entry {k:?} -> {v:?} for a tuple never sent well-formed to a frontend"
                    );
                    let backends = &self.frontends[&((k.daddr, k.dport), k.proto)];
                    assert!(
                        backends.contains(&(v.nat_addr, v.nat_port)),
                        "{k:?} -> {v:?}: not a backend"
                    );
                    let rev = ct_key(v.nat_addr, v.nat_port, k.saddr, k.sport, k.proto);
                    let r = entries
                        .get(&rev)
                        .unwrap_or_else(|| panic!("{k:?} has no reply entry"));
                    assert_eq!(
                        (r.dir, r.nat_addr, r.nat_port),
                        (CT_DIR_REPLY, k.daddr, k.dport)
                    );
                }
                CT_DIR_REPLY => {
                    let fwd = ct_key(k.daddr, k.dport, v.nat_addr, v.nat_port, k.proto);
                    let f = entries.get(&fwd).unwrap_or_else(|| {
                        panic!("reply entry {k:?} -> {v:?} has no forward entry")
                    });
                    assert_eq!(
                        (f.dir, f.nat_addr, f.nat_port),
                        (CT_DIR_FORWARD, k.saddr, k.sport)
                    );
                }
                d => panic!("conntrack entry {k:?} with direction {d}"),
            }
        }
    }
}

/// Frames the kernel's BPF_PROG_TEST_RUN refuses: shorter than Ethernet, or than the
/// network header their ethertype announces.
fn too_short(f: &[u8]) -> bool {
    if f.len() < ETH_LEN {
        return true;
    }
    let need = match [f[12], f[13]] {
        [0x08, 0x00] => 20,
        [0x86, 0xdd] => 40,
        _ => 0,
    };
    f.len() < ETH_LEN + need
}

fn check_port_unreachable(ctx: &str, input: &[u8], p: &Parsed, out: &[u8]) {
    assert_eq!(
        out.len(),
        ETH_LEN + 20 + 8 + 20 + 8,
        "{ctx}: ICMP error length"
    );
    assert_eq!(out[0..6], input[6..12], "{ctx}: to the sender's MAC");
    assert_eq!(out[12..14], [0x08, 0x00], "{ctx}: ethertype");
    let ip = &out[ETH_LEN..ETH_LEN + 20];
    assert_eq!(ip[0], 0x45, "{ctx}: IHL 5");
    assert_eq!(ip[9], 1, "{ctx}: ICMP");
    assert_eq!(fold(ip, 0), 0xffff, "{ctx}: IPv4 header checksum");
    assert_eq!(ip[12..16], p.dst.0, "{ctx}: from the frontend");
    assert_eq!(ip[16..20], p.src.0, "{ctx}: to the sender");
    let icmp = &out[ETH_LEN + 20..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "{ctx}: port unreachable");
    assert_eq!(fold(icmp, 0), 0xffff, "{ctx}: ICMP checksum");
    assert_eq!(
        icmp[28..36],
        input[p.l4_off..p.l4_off + 8],
        "{ctx}: quoted L4 bytes"
    );
}

fn read_services(h: &DatapathHarness) -> Programmed {
    let mut s: Vec<_> =
        h.dp.maps
            .services
            .iter()
            .map(|r| r.expect("services4"))
            .collect();
    s.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.scope));
    let mut b: Vec<_> =
        h.dp.maps
            .backend_slots
            .iter()
            .map(|r| r.expect("backend_slots4"))
            .collect();
    b.sort_by_key(|(k, _)| (k.table, k.slot));
    (s, b)
}

fn seed() -> u64 {
    match std::env::var("BPFPROXY_FUZZ_SEED") {
        Ok(s) => s.trim().parse().expect("BPFPROXY_FUZZ_SEED: a u64"),
        Err(_) => fastrand::u64(..),
    }
}

fn runs() -> u64 {
    std::env::var("BPFPROXY_FUZZ_RUNS")
        .map(|s| s.trim().parse().expect("BPFPROXY_FUZZ_RUNS: a count"))
        .unwrap_or(40_000)
}

#[test]
fn random_and_mutated_frames_get_a_verdict_and_keep_maps_sound() {
    fuzz_program(false);
}

#[test]
fn xdp_random_and_mutated_frames_get_a_verdict_and_keep_maps_sound() {
    fuzz_program(true);
}

fn fuzz_program(xdp: bool) {
    let seed = seed();
    let name = if xdp { "xdp_nodeport" } else { "tc_ingress" };
    println!("packet_fuzz {name} seed {seed} (replay with BPFPROXY_FUZZ_SEED={seed})");
    let mut h = DatapathHarness::load(MapSizes {
        services: 64,
        backend_slots: 256,
        // Far above what the run creates, so the LRU never evicts half of a pair.
        conntrack: 65_536,
    });
    let svcs = services();
    let mut frontends = Frontends::new();
    let mut backends: HashMap<(Addr, u8), Vec<Addr>> = HashMap::new();
    for s in &svcs {
        if xdp {
            let backends: Vec<Backend4> = s
                .backends
                .iter()
                .map(|&(addr, port)| Backend4 {
                    addr,
                    port,
                    flags: BACKEND_LOCAL,
                    weight: 1,
                })
                .collect();
            let key = Svc4Key {
                addr: s.frontend.0,
                port: s.frontend.1,
                proto: s.proto,
                scope: SCOPE_EXTERNAL,
            };
            h.add_frontend(s.id, key, SVC_F_NODE_PORT | SVC_F_SNAT, &backends);
        } else {
            h.add_service(s.id, s.frontend, s.proto, &s.backends);
        }
        frontends.insert((s.frontend, s.proto), s.backends.clone());
        for &b in &s.backends {
            backends.entry((b, s.proto)).or_default().push(s.frontend);
        }
    }
    let programmed = read_services(&h);
    assert_eq!(programmed.0.len(), svcs.len());
    let mut fuzz = Fuzz {
        h,
        frontends,
        backends,
        sent: HashSet::new(),
        tally: Tally::default(),
        xdp,
    };
    let mut frames = Gen {
        rng: fastrand::Rng::with_seed(seed),
        services: svcs
            .iter()
            .map(|s| (s.frontend, s.proto, s.backends.clone()))
            .collect(),
    };

    // Connections first: a SYN (or datagram) from every client port to every frontend,
    // and a reply from its backend, so later frames hit established entries.
    for i in 0..CLIENTS.len() * 24 {
        let client = (
            CLIENTS[i % CLIENTS.len()],
            40000 + (i / CLIENTS.len()) as u16,
        );
        for s in svcs.iter().filter(|s| !s.backends.is_empty()) {
            let frame = frames.ipv4(client, s.frontend, s.proto, 0x02);
            fuzz.run("setup", &frame);
            let ct = fuzz
                .h
                .ct(ct_key(
                    client.0,
                    client.1,
                    s.frontend.0,
                    s.frontend.1,
                    s.proto,
                ))
                .expect("a connection");
            let reply = frames.ipv4((ct.nat_addr, ct.nat_port), client, s.proto, 0x12);
            fuzz.run("setup", &reply);
        }
    }
    assert!(fuzz.tally.dnat > 0 && (xdp || fuzz.tally.snat > 0));

    // Every truncation of a few frames: TCP with options, UDP, a reply, VLAN, IPv6.
    let bases = [
        frames.ipv4((CLIENTS[0], 40001), (VIP_WEB, 80), PROTO_TCP, 0x18),
        frames.ipv4((CLIENTS[1], 40002), (VIP_DNS, 53), PROTO_UDP, 0),
        frames.ipv4((CLIENTS[2], 40003), (VIP_EMPTY, 80), PROTO_TCP, 0x02),
        frames.vlan(),
        frames.ipv6(),
    ];
    for base in &bases {
        for cut in 0..=base.len() {
            fuzz.run("truncated", &base[..cut]);
        }
    }

    for _ in 0..runs() {
        let (kind, frame) = frames.next();
        fuzz.run(kind, &frame);
    }
    fuzz.check_maps(&programmed);
    let t = &fuzz.tally;
    println!(
        "packet_fuzz {name}: {} runs ({:?}): {} unchanged, {} DNAT, {} SNAT, {} rejected, {} dropped, {} refused by the kernel as too short; {} conntrack entries",
        t.runs,
        t.by_kind,
        t.unchanged,
        t.dnat,
        t.snat,
        t.rejected,
        t.shot,
        t.refused,
        fuzz.h.ct_len()
    );
    assert_eq!(t.shot, 0, "no frame should fail a rewrite");
    assert!(t.rejected > 0 && t.dnat > 100 && t.unchanged > 1000);
    if xdp {
        assert_eq!(
            t.snat, 0,
            "XDP translates no reply of a DNAT-only connection"
        );
    } else {
        assert!(t.snat > 100);
    }
}

// ---------------------------------------------------------------------------------------
// IPv6: service frames to IPv6 frontends (services6), replies from their backends, their
// bit flips and truncations, extension headers and random bytes, through tc_ingress and
// xdp_nodeport (local backends: DNAT only). The rules are those above, for IPv6: a verdict
// for every frame; a frame that is not well-formed IPv6 with TCP/UDP right after the
// header leaves unchanged; a rewrite changes only the NAT-ed address and port and the L4
// checksum, to a backend of the frontend (or from a backend to its frontend), keeping the
// checksum's residual; a frontend without backends gets an ICMPv6 port unreachable with a
// valid checksum; services6 and backend_slots6 read back identical and conntrack6 holds
// pairs.

type Addr6 = ([u8; 16], u16);

const fn v6(last: u8, net: u8) -> [u8; 16] {
    [0xfd, 0, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]
}

/// (frontend, protocol, backends).
fn services6() -> Vec<(Addr6, u8, Vec<Addr6>)> {
    vec![
        (
            (v6(10, 0x96), 80),
            PROTO_TCP,
            vec![(v6(7, 0x44), 8080), (v6(8, 0x44), 8080)],
        ),
        ((v6(53, 0x96), 53), PROTO_UDP, vec![(v6(9, 0x44), 5353)]),
        ((v6(99, 0x96), 80), PROTO_TCP, vec![]),
        ((v6(99, 0x96), 53), PROTO_UDP, vec![]),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Parsed6 {
    src: Addr6,
    dst: Addr6,
    proto: u8,
}

/// Ethernet type IPv6, version 6, next header TCP or UDP, its whole header present.
fn reference_parse6(f: &[u8]) -> Option<Parsed6> {
    if f.len() < ETH_LEN + 40 || f[12..14] != [0x86, 0xdd] || f[ETH_LEN] >> 4 != 6 {
        return None;
    }
    let proto = f[ETH_LEN + 6];
    let need = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    let l4 = &f[ETH_LEN + 40..];
    if l4.len() < need {
        return None;
    }
    let addr = |at: usize| -> [u8; 16] { f[ETH_LEN + at..ETH_LEN + at + 16].try_into().unwrap() };
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Some(Parsed6 {
        src: (addr(8), port(0)),
        dst: (addr(24), port(2)),
        proto,
    })
}

/// The residual of the L4 checksum over the IPv6 pseudo header and the segment.
fn l4_residual6(f: &[u8], proto: u8) -> u16 {
    let seg = &f[ETH_LEN + 40..];
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&f[ETH_LEN + 8..ETH_LEN + 40]);
    pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    norm(fold(seg, u32::from(fold(&pseudo, 0))))
}

struct Gen6 {
    rng: fastrand::Rng,
    services: Vec<(Addr6, u8, Vec<Addr6>)>,
}

impl Gen6 {
    fn client(&mut self) -> Addr6 {
        (v6(self.rng.u8(1..4), 0x51), 40000 + self.rng.u16(..16))
    }

    fn frame(&mut self, src: Addr6, dst: Addr6, proto: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..self.rng.usize(..64)).map(|_| self.rng.u8(..)).collect();
        let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(src.0, dst.0, 64);
        let mut v = Vec::new();
        if proto == PROTO_TCP {
            let mut t = b.tcp(src.1, dst.1, self.rng.u32(..), 64240);
            match self.rng.u8(..5) {
                0 | 1 => t = t.syn(),
                2 => t = t.ack(1),
                3 => t = t.fin().ack(1),
                _ => t = t.rst(),
            }
            t.write(&mut v, &payload).unwrap();
        } else {
            b.udp(src.1, dst.1).write(&mut v, &payload).unwrap();
        }
        v
    }

    /// To a frontend, or a reply from one of its backends to a client.
    fn service_frame(&mut self) -> Vec<u8> {
        let (fe, proto, backends) = self.services[self.rng.usize(..self.services.len())].clone();
        let client = self.client();
        if !backends.is_empty() && self.rng.u8(..3) == 0 {
            let b = backends[self.rng.usize(..backends.len())];
            self.frame(b, client, proto)
        } else {
            self.frame(client, fe, proto)
        }
    }

    fn next(&mut self) -> (&'static str, Vec<u8>) {
        match self.rng.u8(..8) {
            0..=2 => ("IPv6 service", self.service_frame()),
            3 | 4 => {
                let mut v = self.service_frame();
                for _ in 0..self.rng.usize(1..4) {
                    let i = self.rng.usize(..v.len());
                    v[i] ^= 1 << self.rng.u8(..8);
                }
                ("IPv6 bit flips", v)
            }
            5 => {
                let v = self.service_frame();
                let cut = self.rng.usize(ETH_LEN + 40..=v.len());
                ("IPv6 truncated", v[..cut].to_vec())
            }
            6 => {
                // A hop-by-hop options header before a frontend's TCP header.
                let mut v = self.service_frame();
                if v[ETH_LEN + 6] == PROTO_TCP || v[ETH_LEN + 6] == PROTO_UDP {
                    let next = v[ETH_LEN + 6];
                    v[ETH_LEN + 6] = 0;
                    let ext = [next, 0, 1, 4, 0, 0, 0, 0];
                    v.splice(ETH_LEN + 40..ETH_LEN + 40, ext);
                    let plen = u16::from_be_bytes([v[ETH_LEN + 4], v[ETH_LEN + 5]]) + 8;
                    v[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&plen.to_be_bytes());
                }
                ("IPv6 extension header", v)
            }
            _ => {
                let mut v = vec![0u8; ETH_LEN + 40 + self.rng.usize(..40)];
                v.iter_mut().for_each(|b| *b = self.rng.u8(..));
                v[12] = 0x86;
                v[13] = 0xdd;
                ("IPv6 random", v)
            }
        }
    }
}

#[test]
fn ipv6_random_and_mutated_frames_get_a_verdict_and_keep_maps_sound() {
    for xdp in [false, true] {
        fuzz_ipv6(xdp);
    }
}

fn fuzz_ipv6(xdp: bool) {
    use aya::maps::{HashMap as BpfHashMap, Map};
    use proxy_common::{
        conntrack::{Ct6Key, Ct6Value},
        service::{Backend6, SCOPE_CLUSTER_IP, Svc6Key},
    };
    let seed = seed();
    let name = if xdp { "xdp_nodeport" } else { "tc_ingress" };
    println!("packet_fuzz IPv6 {name} seed {seed} (replay with BPFPROXY_FUZZ_SEED={seed})");
    let mut h = DatapathHarness::load(MapSizes {
        services: 64,
        backend_slots: 256,
        conntrack: 65_536,
    });
    let mut services: BpfHashMap<_, Svc6Key, SvcValue> =
        BpfHashMap::try_from(Map::HashMap(h.prog_map(PROG_TC_INGRESS, "services6"))).unwrap();
    let mut slots: BpfHashMap<_, BackendSlotKey, Backend6> =
        BpfHashMap::try_from(Map::HashMap(h.prog_map(PROG_TC_INGRESS, "backend_slots6"))).unwrap();
    let ct: BpfHashMap<_, Ct6Key, Ct6Value> =
        BpfHashMap::try_from(Map::LruHashMap(h.prog_map(PROG_TC_INGRESS, "conntrack6"))).unwrap();
    let svcs = services6();
    for (i, (fe, proto, backends)) in svcs.iter().enumerate() {
        let id = i as u32 + 1;
        for (slot, &(addr, port)) in backends.iter().enumerate() {
            let (index, mask) = proxy_common::reply_filter::word_and_mask(
                proxy_common::reply_filter::bit6(addr, port, *proto),
            );
            let word = h.state.reply_filter[index as usize] | mask;
            h.apply(
                vec![bpfproxy::planner::MapOp::SetReplyFilterWord { index, word }],
                Vec::new(),
            );
            let b = Backend6 {
                addr,
                port,
                flags: if xdp { BACKEND_LOCAL } else { 0 },
                weight: 1,
            };
            let key = BackendSlotKey {
                table: id * 2,
                slot: slot as u32,
            };
            slots.insert(key, b, 0).unwrap();
        }
        let key = Svc6Key {
            addr: fe.0,
            port: fe.1,
            proto: *proto,
            scope: if xdp {
                SCOPE_EXTERNAL
            } else {
                SCOPE_CLUSTER_IP
            },
        };
        let value = SvcValue {
            svc_id: id,
            table: id * 2,
            backend_count: backends.len() as u32,
            scheduler: 0,
            flags: if xdp { SVC_F_NODE_PORT | SVC_F_SNAT } else { 0 },
            _pad: 0,
            affinity_timeout_s: 0,
        };
        services.insert(key, value, 0).unwrap();
    }
    let read = |services: &BpfHashMap<_, Svc6Key, SvcValue>,
                slots: &BpfHashMap<_, BackendSlotKey, Backend6>| {
        let mut s: Vec<_> = services.iter().map(|r| r.unwrap()).collect();
        s.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.scope));
        let mut b: Vec<_> = slots.iter().map(|r| r.unwrap()).collect();
        b.sort_by_key(|(k, _)| (k.table, k.slot));
        (s, b)
    };
    let programmed = read(&services, &slots);
    let frontends: HashMap<(Addr6, u8), Vec<Addr6>> = svcs
        .iter()
        .map(|(fe, proto, b)| ((*fe, *proto), b.clone()))
        .collect();
    let frontend_of: HashMap<(Addr6, u8), Addr6> = svcs
        .iter()
        .flat_map(|(fe, proto, bs)| bs.iter().map(move |b| ((*b, *proto), *fe)))
        .collect();
    let mut g = Gen6 {
        rng: fastrand::Rng::with_seed(seed),
        services: svcs.clone(),
    };
    let n = runs() / 4;
    let mut rewritten = 0u64;
    for _ in 0..n {
        let (kind, frame) = g.next();
        let ctx = || format!("{name} {kind} frame {}", hex(&frame));
        let parsed = reference_parse6(&frame);
        let before = h.stats();
        let run = if xdp {
            h.try_run_xdp(PROG_XDP_NODEPORT, &frame, 1, None)
        } else {
            h.try_run_prog(PROG_TC_INGRESS, &frame, 1)
        };
        let run = match run {
            Ok(run) => run,
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) && too_short(&frame) =>
            {
                continue;
            }
            Err(e) => panic!("{}: BPF_PROG_TEST_RUN failed: {e:?}", ctx()),
        };
        let after = h.stats();
        let bumped: u64 = (0..stats::COUNT as usize)
            .map(|i| after[i] - before[i])
            .sum();
        assert_eq!(bumped, 1, "{}: one counter per packet", ctx());
        let (ok, shot, reject) = if xdp {
            (XDP_PASS, XDP_DROP, XDP_TX)
        } else {
            (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
        };
        let out = &run.out;
        if run.ret == reject {
            let p = parsed.unwrap_or_else(|| panic!("{}: rejected a non-service frame", ctx()));
            assert!(
                frontends.get(&(p.dst, p.proto)).is_some_and(Vec::is_empty),
                "{}: rejected, but not sent to a frontend without backends",
                ctx()
            );
            let icmp = etherparse::Icmpv6Slice::from_slice(&out[ETH_LEN + 40..]).expect("ICMPv6");
            assert!(
                icmp.is_checksum_valid(p.dst.0, p.src.0),
                "{}: ICMPv6 checksum",
                ctx()
            );
            assert_eq!(out[ETH_LEN + 40], 1, "{}: destination unreachable", ctx());
            assert_eq!(out[ETH_LEN + 41], 4, "{}: port unreachable", ctx());
            continue;
        }
        if run.ret == shot {
            assert!(
                parsed.is_some(),
                "{}: dropped a frame it does not handle",
                ctx()
            );
            continue;
        }
        assert_eq!(run.ret, ok, "{}: return code", ctx());
        if out == &frame {
            if let Some(p) = parsed {
                assert!(
                    !frontends.contains_key(&(p.dst, p.proto)),
                    "{}: a packet to a frontend passed unchanged",
                    ctx()
                );
            }
            continue;
        }
        let p = parsed.unwrap_or_else(|| panic!("{}: changed a frame it must not handle", ctx()));
        let q = reference_parse6(out).expect("the output parses");
        assert_eq!(out.len(), frame.len(), "{}: length changed", ctx());
        rewritten += 1;
        if let Some(backends) = frontends.get(&(p.dst, p.proto)) {
            assert!(backends.contains(&q.dst), "{}: DNAT to {:?}", ctx(), q.dst);
            assert_eq!(q.src, p.src, "{}: source kept", ctx());
        } else {
            assert!(!xdp, "{}: XDP translated a backend's packet", ctx());
            let fe = frontend_of
                .get(&(p.src, p.proto))
                .unwrap_or_else(|| panic!("{}: rewrote a packet of no connection", ctx()));
            assert_eq!(q.src, *fe, "{}: reply from the frontend", ctx());
            assert_eq!(q.dst, p.dst, "{}: destination kept", ctx());
        }
        // Outside the addresses, ports and L4 checksum, nothing changed.
        let csum_at = ETH_LEN + 40 + if p.proto == PROTO_TCP { 16 } else { 6 };
        for i in 0..frame.len() {
            let nat = (ETH_LEN + 8..ETH_LEN + 40).contains(&i)
                || (ETH_LEN + 40..ETH_LEN + 44).contains(&i)
                || (csum_at..csum_at + 2).contains(&i);
            if !nat {
                assert_eq!(out[i], frame[i], "{}: byte {i} changed", ctx());
            }
        }
        assert_eq!(
            l4_residual6(out, p.proto),
            l4_residual6(&frame, p.proto),
            "{}: L4 checksum residual",
            ctx()
        );
    }
    assert!(
        rewritten > n / 20,
        "{name}: only {rewritten} of {n} frames translated"
    );
    assert_eq!(
        read(&services, &slots),
        programmed,
        "services6/backend_slots6 changed"
    );
    let entries: Vec<(Ct6Key, Ct6Value)> = ct.iter().map(|r| r.unwrap()).collect();
    for (k, v) in &entries {
        if v.dir == CT_DIR_FORWARD {
            let backend = (v.nat_addr, v.nat_port);
            let rev = Ct6Key {
                saddr: backend.0,
                daddr: k.saddr,
                sport: backend.1,
                dport: k.sport,
                proto: k.proto,
                _pad: [0; 3],
            };
            assert!(
                entries
                    .iter()
                    .any(|(rk, rv)| *rk == rev && rv.dir == CT_DIR_REPLY),
                "{name}: forward entry {k:?} without its reply entry"
            );
        }
    }
}
