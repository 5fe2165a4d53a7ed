//! Benchmark of the schedulers (root, the built kernel object):
//!
//! ```sh
//! cargo xtask build-ebpf
//! cargo run --release -p bpfproxy-tests --example bench_schedulers [-- --runs N]
//! ```
//!
//! 1. The in-kernel cost of the first packet of a new TCP connection (a SYN to the
//!    ClusterIP) for each scheduler at 3, 100 and 1,000 backends, `random` measured in the
//!    same run: `tc_ingress` runs the SYN through BPF_PROG_TEST_RUN (the kernel times only
//!    the program), and the connection's conntrack entries are deleted between runs so
//!    every run schedules, creates the connection and rewrites the packet. `tc_floor` (an
//!    empty program) is shown for the floor of the measurement.
//! 2. The Maglev table for 1,000 backends: build time in userspace, and the kernel memory
//!    of one table in `maglev4` (the map's `memlock` before and after writing it).
//!
//! Prints a Markdown table. The thread is pinned to one CPU; run it on an idle machine.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use aya::{
    maps::IterableMap,
    programs::{TestRun, TestRunOptions},
};
use bpfproxy::{
    datapath::{
        Datapath, LoadOptions, MapSizes,
        loader::{PROG_TC_FLOOR, PROG_TC_INGRESS},
    },
    maglev,
    model::{
        DesiredService, DesiredState, Endpoint, Frontend, Protocol, Scheduler, Scheduling,
        ServicePortName,
    },
    planner::{Capacity, MapOp, MapState, plan},
};
use etherparse::PacketBuilder;
use proxy_common::{
    PROTO_TCP,
    conntrack::Ct4Key,
    service::{Backend4, MAGLEV_SIZE},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);

fn backend_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250) as u8 + 1)
}

struct Bench {
    dp: Datapath,
    state: MapState,
    frame: Vec<u8>,
}

impl Bench {
    fn serve(&mut self, backends: u32, scheduler: Scheduler, affinity_s: u32) {
        let frontend = Frontend::cluster(VIP, 80, Protocol::Tcp);
        let mut desired = DesiredState::default();
        desired.services.insert(
            frontend,
            DesiredService {
                frontend,
                name: ServicePortName {
                    namespace: "bench".into(),
                    name: "sched".into(),
                    port_name: String::new(),
                    protocol: Protocol::Tcp,
                },
                endpoints: (0..backends)
                    .map(|i| Endpoint {
                        addr: backend_ip(i).into(),
                        port: 8080,
                        terminating: false,
                        local: false,
                    })
                    .collect(),
                affinity_timeout_s: affinity_s,
                kind: Default::default(),
                flags: 0,
                source_ranges: Vec::new(),
            },
        );
        desired.scheduling.insert(
            frontend,
            Scheduling {
                scheduler,
                weights: Default::default(),
            },
        );
        let capacity = Capacity {
            services: 16,
            backend_slots: 8192,
        };
        let (p, errors) = plan(&desired, &self.state, capacity);
        assert!(errors.is_empty(), "{errors:?}");
        let report = self.dp.maps.apply(&p, &mut self.state);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }

    fn forget_connection(&mut self) {
        let fwd = Ct4Key {
            saddr: CLIENT.octets(),
            daddr: VIP.octets(),
            sport: 40_000,
            dport: 80,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        if let Ok(v) = self.dp.maps.conntrack.get(&fwd, 0) {
            let reply = Ct4Key {
                saddr: v.nat_addr,
                daddr: CLIENT.octets(),
                sport: v.nat_port,
                dport: 40_000,
                proto: PROTO_TCP,
                _pad: [0; 3],
            };
            let _ = self.dp.maps.conntrack.remove(&reply);
            let _ = self.dp.maps.conntrack.remove(&fwd);
        }
    }

    /// Mean ns per new connection over `runs` runs (and, to see the noise, the median).
    fn new_connection_ns(&mut self, prog: &str, runs: u32) -> (f64, u128) {
        let mut samples = Vec::with_capacity(runs as usize);
        for _ in 0..runs {
            self.forget_connection();
            let opts = TestRunOptions {
                data_in: Some(&self.frame),
                repeat: 1,
                ..TestRunOptions::new()
            };
            let r = self
                .dp
                .program_mut(prog)
                .expect("program")
                .test_run(opts)
                .expect("BPF_PROG_TEST_RUN");
            samples.push(r.duration);
        }
        samples.sort();
        let total: Duration = samples.iter().sum();
        (
            total.as_nanos() as f64 / runs as f64,
            samples[samples.len() / 2].as_nanos(),
        )
    }
}

fn memlock(map: &aya::maps::MapData) -> u64 {
    let Ok(info) = map.info() else { return 0 };
    let Ok(fd) = info.fd() else { return 0 };
    let raw = fd.as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("memlock:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

fn main() {
    let runs: u32 = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let mut set = nix::sched::CpuSet::new();
    set.set(nix::sched::sched_getcpu().unwrap_or(0))
        .expect("cpu set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinning");

    let opts = LoadOptions {
        object: testbed::datapath::object_path(),
        pin_dir: None,
        sizes: MapSizes {
            services: 16,
            backend_slots: 8192,
            conntrack: 65_536,
        },
    };
    let dp = Datapath::load(&opts).expect("loading the datapath (root? built?)");
    let state = dp.maps.read_state().expect("maps");
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 5], [2, 0, 0, 0, 0, 1])
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .tcp(40_000, 80, 1, 64240)
        .syn()
        .write(&mut frame, &[])
        .unwrap();
    let mut b = Bench { dp, state, frame };

    let rows: [(&str, Scheduler, u32); 9] = [
        ("random", Scheduler::RANDOM, 0),
        ("rr", Scheduler::RR, 0),
        ("lc", Scheduler::LC, 0),
        ("sed", Scheduler::SED, 0),
        ("nq", Scheduler::NQ, 0),
        ("sh", Scheduler::SH, 0),
        ("dh", Scheduler::DH, 0),
        ("maglev", Scheduler::MAGLEV, 0),
        ("random + ClientIP affinity", Scheduler::RANDOM, 10_800),
    ];
    println!("new-connection cost, ns per SYN in tc_ingress (mean / median of {runs} runs)\n");
    println!("| scheduler | 3 backends | 100 backends | 1,000 backends |");
    println!("| --- | --- | --- | --- |");
    let (floor, _) = b.new_connection_ns(PROG_TC_FLOOR, runs);
    for (name, sched, affinity) in rows {
        let mut cells = Vec::new();
        for n in [3u32, 100, 1_000] {
            b.serve(n, sched, affinity);
            // Warm up (first run creates the counters, the affinity entry, ...).
            b.new_connection_ns(PROG_TC_INGRESS, 50);
            let (mean, median) = b.new_connection_ns(PROG_TC_INGRESS, runs);
            cells.push(format!("{mean:.0} / {median}"));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!("| (tc_floor, empty program) | {floor:.0} | | |");

    // Maglev table for 1,000 backends.
    let backends: Vec<bpfproxy::planner::Backend> = (0..1_000)
        .map(|i| {
            Backend4 {
                addr: backend_ip(i).octets(),
                port: 8080,
                flags: 0,
                weight: 1,
            }
            .into()
        })
        .collect();
    let start = Instant::now();
    let mut tables = 0;
    while start.elapsed() < Duration::from_millis(500) || tables < 5 {
        std::hint::black_box(maglev::table_for(&backends));
        tables += 1;
    }
    let build = start.elapsed() / tables;
    // Write one table into a fresh table id and read the map's memory before and after.
    b.serve(3, Scheduler::RANDOM, 0);
    let before = memlock(b.dp.maps.maglev.map());
    let slots = maglev::table_for(&backends);
    let start = Instant::now();
    let report = b.dp.maps.apply(
        &bpfproxy::planner::Plan {
            prologue: vec![MapOp::PutMaglevTable { table: 1, slots }],
            steps: Vec::new(),
            epilogue: vec![MapOp::DeleteMaglevTable { table: 1 }],
        },
        &mut b.state,
    );
    let write = start.elapsed();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let after_delete = memlock(b.dp.maps.maglev.map());
    b.dp.maps
        .apply(
            &bpfproxy::planner::Plan {
                prologue: vec![MapOp::PutMaglevTable {
                    table: 1,
                    slots: maglev::table_for(&backends),
                }],
                ..Default::default()
            },
            &mut b.state,
        )
        .failed
        .is_empty()
        .then_some(())
        .expect("writing the table");
    let after = memlock(b.dp.maps.maglev.map());
    println!();
    println!("Maglev, 1,000 backends, table size M = {MAGLEV_SIZE}:");
    println!(
        "- build in userspace: {:.2} ms (mean of {tables})",
        build.as_secs_f64() * 1e3
    );
    println!(
        "- userspace memory of the result: {} KiB (u32 per entry)",
        MAGLEV_SIZE as usize * 4 / 1024
    );
    println!(
        "- writing it to maglev and deleting it again: {:.1} ms ({} map updates + deletes)",
        write.as_secs_f64() * 1e3,
        MAGLEV_SIZE
    );
    println!(
        "- kernel memory (maglev memlock): {} KiB before, {} KiB with one table ({} KiB per table; {} KiB after the delete)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024,
        after_delete / 1024
    );
}
