//! What a `/metrics` scrape costs when the conntrack map is full (root, the built kernel
//! object):
//!
//! ```sh
//! cargo xtask build-ebpf
//! cargo run --release -p bpfproxy-tests --example bench_scrape
//! ```
//!
//! Loads the object with the default map sizes, pinned under a throw-away folder of
//! /sys/fs/bpf, fills `conntrack4` to its 262,144 entries from userspace, and times the
//! metrics collector the agent runs at scrape time: a scrape that counts the kernel-written
//! maps (walking their keys), and one within the 10 s the counts are reused.

use std::{path::PathBuf, time::Instant};

use bpfproxy::{
    datapath::{Datapath, LoadOptions, MapSizes},
    metrics::{DatapathCollector, Metrics},
};
use proxy_common::conntrack::{Ct4Key, Ct4Value};

/// Removes the pin folder when dropped, also on a panic.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    testbed::require_root().expect("root");
    testbed::agent::ensure_bpffs().expect("bpffs");
    let pins = Pins(PathBuf::from(testbed::agent::BPFFS_ROOT).join(format!(
        "{}scrape-{}",
        testbed::agent::TEST_PIN_PREFIX,
        testbed::unique_run_id()
    )));
    let sizes = MapSizes::default();
    let mut dp = Datapath::load(&LoadOptions {
        object: testbed::datapath::object_path(),
        pin_dir: Some(pins.0.clone()),
        sizes,
    })
    .expect("loading the datapath (root? built with cargo xtask build-ebpf?)");
    let fill = Instant::now();
    for i in 0..sizes.conntrack {
        let key = Ct4Key {
            saddr: [10, 244, (i >> 16) as u8, (i >> 8) as u8],
            daddr: [10, 96, 0, 10],
            sport: i as u16,
            dport: 80,
            proto: 6,
            _pad: [0; 3],
        };
        let value = Ct4Value {
            nat_addr: [10, 245, 0, 1],
            nat_port: 80,
            dir: 0,
            flags: 0,
            svc_id: 1,
            counted: 0,
            last_seen_ns: 0,
            nat2_addr: [0; 4],
            nat2_port: 0,
            _pad: 0,
        };
        dp.maps
            .conntrack
            .insert(key, value, 0)
            .expect("filling conntrack4");
    }
    println!(
        "filled conntrack4 with {} entries in {:.2} s",
        sizes.conntrack,
        fill.elapsed().as_secs_f64()
    );
    let collector = DatapathCollector::open(&pins.0).expect("opening the pins");
    let t = Instant::now();
    let snap = collector.snapshot();
    let counting = t.elapsed();
    assert_eq!(snap.conntrack_entries, Some(u64::from(sizes.conntrack)));
    let metrics = Metrics::new(Some(collector));
    let t = Instant::now();
    let page = metrics.render();
    let cached = t.elapsed();
    println!(
        "| scrape | time |\n| --- | --- |\n| counting the maps (conntrack4 full) | {:.1} ms |\n| with the counts reused (within 10 s) | {:.2} ms ({} bytes) |",
        counting.as_secs_f64() * 1e3,
        cached.as_secs_f64() * 1e3,
        page.len()
    );
    drop(dp);
}
