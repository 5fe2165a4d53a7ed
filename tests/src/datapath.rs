//! The kernel program on its own, run through BPF_PROG_TEST_RUN: [`DatapathHarness`]
//! loads a fresh copy of the object (unpinned maps, so tests never see each other's
//! state), writes its maps with the agent's own code (`KernelMaps::apply` of planner
//! `MapOp`s), runs `tc_ingress` (or any program) on crafted frames and reads the maps and
//! counters back. Frames are built with etherparse ([`tcp_frame`]) and outputs checked by
//! [`assert_checksums`].
//!
//! Used by the packet, scheduler and fuzzing fixtures (`tests/tests/*_fixtures.rs`,
//! `packet_fuzz.rs`). Needs root and the object built by `cargo xtask build-ebpf` (or at
//! $BPFPROXY_EBPF_OBJ). Behind the `datapath` feature (on by default) so that `xtask`
//! can use the rest of `testbed` without building the agent.

use std::{path::PathBuf, time::Duration};

use aya::{
    maps::lpm_trie::Key,
    programs::{ProgramError, TestRun, TestRunOptions},
};
use bpfproxy::{
    datapath::{Datapath, LoadOptions},
    model::{Protocol, ServicePortName},
    planner::{MapOp, MapState, Plan, Step},
};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use proxy_common::{
    conntrack::{Ct4Key, Ct4Value},
    reply_filter,
    service::{
        Backend4, BackendSlotKey, NodeConfig4, SCHED_RANDOM, SCOPE_CLUSTER_IP, SourceRange4Key,
        Svc4Key, SvcValue,
    },
    stats,
};

pub use bpfproxy::datapath::{
    MapSizes,
    loader::{PROG_TC_FLOOR, PROG_TC_INGRESS, PROG_XDP_FLOOR, PROG_XDP_NODEPORT},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const ETH_LEN: usize = 14;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The freshly built object ($BPFPROXY_EBPF_OBJ, else the workspace's build output), so
/// the fixtures test the kernel program as it is now; the object embedded in the agent only
/// when neither exists.
pub fn object_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BPFPROXY_EBPF_OBJ") {
        return Some(PathBuf::from(p));
    }
    let built = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bpfel-unknown-none/release/proxy-ebpf"
    ));
    built.is_file().then_some(built)
}

/// One BPF_PROG_TEST_RUN: the program's return code, the output frame, the time per run.
#[derive(Debug)]
pub struct Run {
    pub ret: u32,
    pub out: Vec<u8>,
    pub duration: Duration,
}

/// A loaded object with its maps and the planner's mirror of them.
pub struct DatapathHarness {
    pub dp: Datapath,
    /// The planner's mirror of the maps, kept in step by `KernelMaps::apply`.
    pub state: MapState,
}

impl DatapathHarness {
    /// Loads a fresh copy of the object with maps of `sizes` (a test needs a few entries,
    /// not the defaults).
    pub fn load(sizes: MapSizes) -> DatapathHarness {
        let opts = LoadOptions {
            object: object_path(),
            pin_dir: None,
            sizes,
        };
        let dp = Datapath::load(&opts).unwrap_or_else(|e| {
            panic!(
                "loading {:?} (root? built with `cargo xtask build-ebpf`?): {e}",
                opts.object
            )
        });
        let state = dp.maps.read_state().expect("reading the maps");
        assert_eq!(state.reply_filter.len(), reply_filter::WORDS as usize);
        DatapathHarness { dp, state }
    }

    /// Applies a whole plan and requires every op to succeed.
    pub fn apply_plan(&mut self, plan: &Plan) {
        let report = self.dp.maps.apply(plan, &mut self.state);
        assert!(
            report.failed.is_empty(),
            "map writes failed: {:?}",
            report.failed
        );
    }

    /// Applies map ops as one step of a plan, with reply-filter words in the prologue (the
    /// order the planner uses), and requires every op to succeed.
    pub fn apply(&mut self, filter: Vec<MapOp>, ops: Vec<MapOp>) {
        self.apply_plan(&fixture_plan(filter, ops));
    }

    /// The op that sets the reply-filter bit of a backend.
    pub fn filter_bit(&self, addr: [u8; 4], port: u16, proto: u8) -> MapOp {
        let (index, mask) = reply_filter::word_and_mask(reply_filter::bit(addr, port, proto));
        MapOp::SetReplyFilterWord {
            index,
            word: self.state.reply_filter[index as usize] | mask,
        }
    }

    /// Programs a ClusterIP frontend (random scheduler) with its backends, as the agent
    /// does: reply-filter bits, then the backends in table `svc_id * 2`, then the service.
    pub fn add_service(
        &mut self,
        svc_id: u32,
        frontend: ([u8; 4], u16),
        proto: u8,
        backends: &[([u8; 4], u16)],
    ) {
        let mut ops: Vec<MapOp> = backends
            .iter()
            .enumerate()
            .map(|(slot, &(addr, port))| MapOp::PutBackend {
                key: BackendSlotKey {
                    table: svc_id * 2,
                    slot: slot as u32,
                },
                value: Backend4 {
                    addr,
                    port,
                    flags: 0,
                    weight: 1,
                }
                .into(),
            })
            .collect();
        ops.push(service_op(svc_id, frontend, proto, backends.len() as u32));
        // One op per backend: each reads the word as the previous one left it.
        for &(addr, port) in backends {
            let bit = self.filter_bit(addr, port, proto);
            self.apply(vec![bit], Vec::new());
        }
        self.apply(Vec::new(), ops);
    }

    /// Writes only the services4 value (the backend slots are left as they are).
    pub fn set_service(&mut self, svc_id: u32, frontend: ([u8; 4], u16), proto: u8, count: u32) {
        self.apply(Vec::new(), vec![service_op(svc_id, frontend, proto, count)]);
    }

    /// Sets a reply-filter bit without any conntrack entry behind it.
    pub fn set_filter_bit(&mut self, addr: [u8; 4], port: u16, proto: u8) {
        let bit = self.filter_bit(addr, port, proto);
        self.apply(vec![bit], Vec::new());
    }

    pub fn ct(&self, key: Ct4Key) -> Option<Ct4Value> {
        self.dp.maps.conntrack.get(&key, 0).ok()
    }

    pub fn ct_len(&self) -> usize {
        self.dp.maps.conntrack_entries().len()
    }

    /// The `stats` counters summed over CPUs, by index.
    pub fn stats(&self) -> [u64; stats::COUNT as usize] {
        let mut out = [0; stats::COUNT as usize];
        for (i, (name, value)) in self.dp.maps.counters().into_iter().enumerate() {
            assert_eq!(name, stats::NAMES[i]);
            out[i] = value;
        }
        out
    }

    /// The agent's collector of lc/sed/nq connection counts, on these maps.
    pub fn collect_connection_counts(&mut self) -> bpfproxy::datapath::loader::CollectReport {
        self.dp
            .collect_connection_counts(&self.state)
            .expect("collecting connection counts")
    }

    /// One counter summed over CPUs.
    pub fn counter(&self, index: u32) -> u64 {
        self.dp.maps.counters()[index as usize].1
    }

    /// Runs program `name` `repeat` times on one skb (the output of a run is the input of
    /// the next).
    pub fn try_run_prog(
        &mut self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        // Room for the largest output: a frame grows at most to an ICMP error.
        let mut out = vec![0u8; frame.len() + 2048];
        let res = {
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::new()
            };
            let prog = self.dp.program_mut(name).expect("program");
            prog.test_run(opts)?
        };
        out.truncate(res.data_size_out as usize);
        Ok(Run {
            ret: res.return_value,
            out,
            duration: res.duration,
        })
    }

    pub fn run_prog(&mut self, name: &str, frame: &[u8], repeat: u32) -> Run {
        self.try_run_prog(name, frame, repeat)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Runs XDP program `name` `repeat` times on one frame (the output of a run is the
    /// input of the next). With `ingress_ifindex`, the frame arrives on that interface of
    /// the calling thread's namespace (what `bpf_fib_lookup` starts from); else on none.
    pub fn try_run_xdp(
        &mut self,
        name: &str,
        frame: &[u8],
        repeat: u32,
        ingress_ifindex: Option<u32>,
    ) -> Result<Run, ProgramError> {
        let mut out = vec![0u8; frame.len() + 2048];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let md: Vec<u8> = [0, frame.len() as u32, 0, ingress_ifindex.unwrap_or(0), 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let res = {
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ingress_ifindex.map(|_| md.as_slice()),
                repeat,
                ..TestRunOptions::new()
            };
            let prog = self.dp.xdp_program_mut(name).expect("program");
            prog.test_run(opts)?
        };
        out.truncate(res.data_size_out as usize);
        Ok(Run {
            ret: res.return_value,
            out,
            duration: res.duration,
        })
    }

    /// Runs `xdp_nodeport` once, arriving on no interface.
    pub fn run_xdp(&mut self, frame: &[u8]) -> Run {
        self.try_run_xdp(PROG_XDP_NODEPORT, frame, 1, None)
            .expect("BPF_PROG_TEST_RUN of xdp_nodeport")
    }

    /// Programs frontend `key` (any scope) with `flags` (`SVC_F_*`) and `backends` (with
    /// their `BACKEND_*` flags) as the agent does: reply-filter bits, the backends in table
    /// `svc_id * 2`, then the service.
    pub fn add_frontend(&mut self, svc_id: u32, key: Svc4Key, flags: u8, backends: &[Backend4]) {
        for b in backends {
            let bit = self.filter_bit(b.addr, b.port, key.proto);
            self.apply(vec![bit], Vec::new());
        }
        let mut ops: Vec<MapOp> = backends
            .iter()
            .enumerate()
            .map(|(slot, b)| MapOp::PutBackend {
                key: BackendSlotKey {
                    table: svc_id * 2,
                    slot: slot as u32,
                },
                value: (*b).into(),
            })
            .collect();
        ops.push(MapOp::PutService {
            key: key.into(),
            value: SvcValue {
                svc_id,
                table: svc_id * 2,
                backend_count: backends.len() as u32,
                scheduler: SCHED_RANDOM,
                flags,
                _pad: 0,
                affinity_timeout_s: 0,
            },
        });
        self.apply(Vec::new(), ops);
    }

    /// Writes `node_cfg4`.
    pub fn set_node_config(&mut self, cfg: NodeConfig4) {
        self.dp
            .maps
            .node_cfg
            .set(0, cfg, 0)
            .expect("writing node_cfg4");
    }

    /// Allows clients in `addr/bits` to the frontend of `svc_id` (`src_ranges4`).
    pub fn allow_source_range(&mut self, svc_id: u32, addr: [u8; 4], bits: u32) {
        let key = Key::new(
            32 + bits,
            SourceRange4Key {
                svc_id_be: svc_id.to_be_bytes(),
                addr,
            },
        );
        self.dp
            .maps
            .src_ranges
            .insert(&key, 1, 0)
            .expect("writing src_ranges4");
    }

    /// Writes a conntrack entry directly (benchmarks set up connections this way).
    pub fn put_ct(&mut self, key: Ct4Key, value: Ct4Value) {
        self.dp
            .maps
            .conntrack
            .insert(key, value, 0)
            .expect("writing conntrack4");
    }

    /// A map of the object by name, found among the maps program `prog` uses (for maps
    /// `KernelMaps` has no handle of, such as the IPv6 ones).
    pub fn prog_map(&mut self, prog: &str, name: &str) -> aya::maps::MapData {
        let info = match self.dp.program_mut(prog) {
            Ok(p) => p.info(),
            Err(_) => self.dp.xdp_program_mut(prog).expect("program").info(),
        };
        let ids = info
            .expect("program info")
            .map_ids()
            .expect("map ids")
            .expect("the kernel reports map ids");
        ids.into_iter()
            .filter_map(|id| aya::maps::MapData::from_id(id).ok())
            .find(|m| {
                m.info()
                    .ok()
                    .and_then(|i| i.name_as_str().map(|n| n == name))
                    == Some(true)
            })
            .unwrap_or_else(|| panic!("{prog} uses no map {name}"))
    }

    /// Runs `tc_ingress` once; returns (return code, output frame).
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let r = self.run_prog(PROG_TC_INGRESS, frame, 1);
        (r.ret, r.out)
    }
}

/// The services4 write of a ClusterIP frontend served by table `svc_id * 2`.
pub fn service_op(svc_id: u32, (addr, port): ([u8; 4], u16), proto: u8, count: u32) -> MapOp {
    MapOp::PutService {
        key: Svc4Key {
            addr,
            port,
            proto,
            scope: SCOPE_CLUSTER_IP,
        }
        .into(),
        value: SvcValue {
            svc_id,
            table: svc_id * 2,
            backend_count: count,
            scheduler: SCHED_RANDOM,
            flags: 0,
            _pad: 0,
            affinity_timeout_s: 0,
        },
    }
}

/// A plan of one step (service `fixtures/svc`) holding `ops`, with `prologue` (reply-filter
/// words) first, in the order the planner uses.
pub fn fixture_plan(prologue: Vec<MapOp>, ops: Vec<MapOp>) -> Plan {
    Plan {
        prologue,
        steps: vec![Step {
            name: ServicePortName {
                namespace: "fixtures".into(),
                name: "svc".into(),
                port_name: String::new(),
                protocol: Protocol::Tcp,
            },
            ops,
        }],
        epilogue: Vec::new(),
    }
}

pub fn ct_key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> Ct4Key {
    Ct4Key {
        saddr: src,
        daddr: dst,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// An Ethernet/IPv4/TCP frame from the client MAC to the node MAC with `flags` (FIN, SYN,
/// RST, PSH, ACK bits), fixed sequence numbers and `payload`.
pub fn tcp_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1, 64240);
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
        b = b.ack(1);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// RFC 1071 sum folded to 16 bits (not complemented).
pub fn fold(bytes: &[u8], mut sum: u32) -> u16 {
    for pair in bytes.chunks(2) {
        let hi = pair[0] as u32;
        let lo = *pair.get(1).unwrap_or(&0) as u32;
        sum += (hi << 8) | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Recomputes the IPv4 header and L4 checksums of a frame and compares them with the
/// fields (a UDP checksum of 0 means none); returns the parsed headers.
pub fn assert_checksums(
    desc: &str,
    frame: &[u8],
) -> (etherparse::Ipv4Header, Option<TransportHeader>) {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .unwrap_or_else(|e| panic!("{desc}: output does not parse: {e:?}"));
    let Some(NetHeaders::Ipv4(ip, _)) = h.net else {
        panic!("{desc}: output is not IPv4");
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "{desc}: IPv4 header checksum"
    );
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(&ip, payload).unwrap(),
                "{desc}: TCP checksum"
            );
        }
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
            assert_eq!(
                u.checksum,
                u.calc_checksum_ipv4(&ip, payload).unwrap(),
                "{desc}: UDP checksum"
            );
        }
        _ => {}
    }
    (ip, h.transport)
}
