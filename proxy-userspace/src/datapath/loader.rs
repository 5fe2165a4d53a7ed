//! Loads the eBPF object, sizes its maps and pins them under one bpffs folder.
//!
//! Maps are pinned by name, and a restarted agent reuses the pins it finds (aya opens a
//! pinned map instead of creating one), so services and connections survive a restart.
//! A folder records its map layout version ([`layout`]); pins of another version are
//! refused before anything is written.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{CgroupSockAddr, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use proxy_common::{
    conntrack::{Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    maps,
    monitor::MonitorConfig,
    service::{
        Affinity6Key, Affinity6Value, AffinityKey, AffinityValue, Backend4, Backend6, BackendConns,
        BackendConns6Key, BackendConnsKey, BackendSlotKey, MaglevKey, NodeConfig4, NodeConfig6,
        SourceRange4Key, SourceRange6Key, Svc4Key, Svc6Key, SvcMeta, SvcValue,
    },
    sock::{SockRev4Key, SockRev4Value, SockRev6Key, SockRev6Value},
    stats::SvcCounters,
};

use super::{
    DatapathError, KernelMaps, bpffs,
    layout::{self, Layout},
};
use crate::planner::MapState;

/// The object built by `cargo xtask build-ebpf`, embedded by build.rs.
static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// The programs in the object.
pub const PROG_TC_INGRESS: &str = "tc_ingress";
/// A program that only returns TC_ACT_OK: the floor benchmarks measure against.
pub const PROG_TC_FLOOR: &str = "tc_floor";
/// Run by the agent (BPF_PROG_TEST_RUN) to release the counts of evicted connections.
pub const PROG_CONNS_RELEASE: &str = "conns_release";
/// The external view at XDP on the node interfaces.
pub const PROG_XDP_NODEPORT: &str = "xdp_nodeport";
/// An XDP program that only passes: the floor benchmarks measure `xdp_nodeport` against,
/// and what tests attach on the far side of a veth so XDP_TX/REDIRECT into it is received.
pub const PROG_XDP_FLOOR: &str = "xdp_floor";

/// Sizes of the maps that grow with the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backend_slots: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: maps::DEFAULT_SERVICES,
            backend_slots: maps::DEFAULT_BACKEND_SLOTS,
            conntrack: maps::DEFAULT_CONNTRACK,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// An object file to load instead of the embedded one.
    pub object: Option<PathBuf>,
    /// Folder on bpffs to pin maps in (and reuse them from); `None` keeps them unpinned.
    pub pin_dir: Option<PathBuf>,
    pub sizes: MapSizes,
}

/// Expected shape of each pinned map: (name, type, key size, value size).
fn map_shapes() -> [(&'static str, MapType, usize, usize); 26] {
    use std::mem::size_of;
    [
        (
            maps::SERVICES4,
            MapType::Hash,
            size_of::<Svc4Key>(),
            size_of::<SvcValue>(),
        ),
        (
            maps::BACKEND_SLOTS4,
            MapType::Hash,
            size_of::<BackendSlotKey>(),
            size_of::<Backend4>(),
        ),
        (
            maps::CONNTRACK4,
            MapType::LruHash,
            size_of::<Ct4Key>(),
            size_of::<Ct4Value>(),
        ),
        (
            maps::SVC_META,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<SvcMeta>(),
        ),
        (
            maps::REPLY_FILTER,
            MapType::Array,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
        (
            maps::STATS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
        (
            maps::MAGLEV,
            MapType::Hash,
            size_of::<MaglevKey>(),
            size_of::<u32>(),
        ),
        (
            maps::BACKEND_CONNS4,
            MapType::Hash,
            size_of::<BackendConnsKey>(),
            size_of::<BackendConns>(),
        ),
        (
            maps::AFFINITY4,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
        ),
        (
            maps::SCHED_RR_POS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u32>(),
        ),
        (
            maps::COUNTED4,
            MapType::Hash,
            size_of::<Ct4Key>(),
            size_of::<BackendConnsKey>(),
        ),
        (
            maps::MONITOR_CFG,
            MapType::Array,
            size_of::<u32>(),
            size_of::<MonitorConfig>(),
        ),
        // A ring buffer has no key or value; the kernel reports both sizes as 0.
        (maps::MONITOR_EVENTS, MapType::RingBuf, 0, 0),
        (
            maps::SVC_COUNTERS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<SvcCounters>(),
        ),
        (
            maps::NODE_CFG4,
            MapType::Array,
            size_of::<u32>(),
            size_of::<NodeConfig4>(),
        ),
        // The trie's key is its 4-byte prefix length followed by the data.
        (
            maps::SRC_RANGES4,
            MapType::LpmTrie,
            4 + size_of::<SourceRange4Key>(),
            size_of::<u8>(),
        ),
        (
            maps::SOCK_REV4,
            MapType::LruHash,
            size_of::<SockRev4Key>(),
            size_of::<SockRev4Value>(),
        ),
        (
            maps::SOCK_REV6,
            MapType::LruHash,
            size_of::<SockRev6Key>(),
            size_of::<SockRev6Value>(),
        ),
        (
            maps::SERVICES6,
            MapType::Hash,
            size_of::<Svc6Key>(),
            size_of::<SvcValue>(),
        ),
        (
            maps::BACKEND_SLOTS6,
            MapType::Hash,
            size_of::<BackendSlotKey>(),
            size_of::<Backend6>(),
        ),
        (
            maps::CONNTRACK6,
            MapType::LruHash,
            size_of::<Ct6Key>(),
            size_of::<Ct6Value>(),
        ),
        (
            maps::BACKEND_CONNS6,
            MapType::Hash,
            size_of::<BackendConns6Key>(),
            size_of::<BackendConns>(),
        ),
        (
            maps::AFFINITY6,
            MapType::LruHash,
            size_of::<Affinity6Key>(),
            size_of::<Affinity6Value>(),
        ),
        (
            maps::COUNTED6,
            MapType::Hash,
            size_of::<Ct6Key>(),
            size_of::<BackendConns6Key>(),
        ),
        (
            maps::NODE_CFG6,
            MapType::Array,
            size_of::<u32>(),
            size_of::<NodeConfig6>(),
        ),
        (
            maps::SRC_RANGES6,
            MapType::LpmTrie,
            4 + size_of::<SourceRange6Key>(),
            size_of::<u8>(),
        ),
    ]
}

/// The loaded object: its programs and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: KernelMaps,
    pub pin_dir: Option<PathBuf>,
    /// A shared lock on the pin folder while this agent uses it: `bpfproxy cleanup` refuses
    /// to run under it.
    _lock: Option<fs::File>,
}

impl Datapath {
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        let owned;
        let bytes: &[u8] = match &opts.object {
            Some(path) => {
                owned = fs::read(path).map_err(|source| DatapathError::ReadObject {
                    path: path.clone(),
                    source,
                })?;
                &owned
            }
            None if EMBEDDED_OBJECT.is_empty() => return Err(DatapathError::NoEmbeddedObject),
            None => EMBEDDED_OBJECT,
        };

        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::SERVICES4, opts.sizes.services)
            .map_max_entries(maps::SVC_META, opts.sizes.services)
            .map_max_entries(maps::BACKEND_SLOTS4, opts.sizes.backend_slots)
            .map_max_entries(maps::CONNTRACK4, opts.sizes.conntrack)
            // Indexed by svc_id, which the planner keeps within 1..=services.
            .map_max_entries(maps::SCHED_RR_POS, opts.sizes.services.saturating_add(1))
            .map_max_entries(maps::SVC_COUNTERS, opts.sizes.services.saturating_add(1))
            // Counters exist only for backends of counting services: at most one per slot.
            .map_max_entries(maps::BACKEND_CONNS4, opts.sizes.backend_slots)
            // One token per counted connection, which has two conntrack entries.
            .map_max_entries(maps::COUNTED4, (opts.sizes.conntrack / 2).max(1))
            // The IPv6 twins are sized as their IPv4 maps.
            .map_max_entries(maps::SERVICES6, opts.sizes.services)
            .map_max_entries(maps::BACKEND_SLOTS6, opts.sizes.backend_slots)
            .map_max_entries(maps::CONNTRACK6, opts.sizes.conntrack)
            .map_max_entries(maps::BACKEND_CONNS6, opts.sizes.backend_slots)
            .map_max_entries(maps::COUNTED6, (opts.sizes.conntrack / 2).max(1));
        let mut adopting = false;
        let mut lock = None;
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                bpffs::ensure_pin_dir(dir)?;
                lock = Some(bpffs::lock_shared(dir)?);
                // Before anything under `dir` is opened for writing.
                match layout::check(dir)? {
                    Layout::Fresh => layout::stamp(dir)?,
                    Layout::Current => {}
                    Layout::Adoptable(found) => {
                        tracing::info!(
                            dir = %dir.display(),
                            found,
                            version = maps::LAYOUT_VERSION,
                            "taking over pins of an older, compatible map layout"
                        );
                        adopting = true;
                    }
                }
                check_pins(dir)?;
                map_shapes()
                    .iter()
                    .map(|(name, ..)| (*name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(bytes)?;

        for name in [PROG_TC_INGRESS, PROG_TC_FLOOR, PROG_CONNS_RELEASE] {
            let prog = classifier(&mut ebpf, name)?;
            prog.load().map_err(|source| DatapathError::Program {
                name: name.to_string(),
                source,
            })?;
        }
        for name in [PROG_XDP_NODEPORT, PROG_XDP_FLOOR] {
            let prog = xdp(&mut ebpf, name)?;
            prog.load().map_err(|source| DatapathError::Program {
                name: name.to_string(),
                source,
            })?;
        }
        let maps = KernelMaps::take_from(&mut ebpf)?;
        if adopting && let Some(dir) = &opts.pin_dir {
            // The new maps exist now: the folder is of this version.
            layout::stamp(dir)?;
        }
        Ok(Datapath {
            ebpf,
            maps,
            pin_dir: opts.pin_dir.clone(),
            _lock: lock,
        })
    }

    pub fn program_mut(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }

    /// An XDP program of the object ([`PROG_XDP_NODEPORT`], [`PROG_XDP_FLOOR`]).
    pub fn xdp_program_mut(&mut self, name: &str) -> Result<&mut Xdp, DatapathError> {
        xdp(&mut self.ebpf, name)
    }

    /// One of the socket-level load-balancing programs (`sock_lb::HOOKS`), not loaded
    /// until socket-level load balancing is asked for.
    pub fn sock_program_mut(&mut self, name: &str) -> Result<&mut CgroupSockAddr, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::MissingProgram(name.to_string()))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: name.to_string(),
                source,
            })
    }

    /// Keeps the connection counts of lc/sed/nq from drifting when conntrack entries go
    /// without a FIN or RST (LRU eviction), and drops the counters of backends that are gone
    /// and drained.
    ///
    /// Each counted connection holds a token in `counted4` under its forward tuple; the one
    /// who deletes the token adds the connection's `closed` (a delete succeeds once). A
    /// token whose forward conntrack entry is gone belongs to an evicted connection: it is
    /// deleted here and, if this delete was the one that succeeded, released through the
    /// `conns_release` program, so the kernel stays the only writer of the counters.
    pub fn collect_connection_counts(
        &mut self,
        state: &MapState,
    ) -> Result<CollectReport, DatapathError> {
        let mut report = CollectReport::default();
        let tokens: Vec<(Ct4Key, BackendConnsKey)> =
            self.maps.counted.iter().filter_map(Result::ok).collect();
        let mut held: BTreeSet<BackendConnsKey> = BTreeSet::new();
        for (tuple, backend) in tokens {
            if self.maps.conntrack.get(&tuple, 0).is_ok() {
                held.insert(backend);
                continue;
            }
            if self.maps.counted.remove(&tuple).is_ok() {
                self.release_connections(&backend, 1)?;
                report.released += 1;
            }
        }
        let live: BTreeSet<BackendConnsKey> = state
            .services
            .values()
            .flat_map(|s| {
                s.backends.iter().filter_map(|b| {
                    Some(BackendConnsKey {
                        svc_id: s.value.svc_id,
                        addr: b.v4()?.addr,
                        port: b.port,
                        _pad: 0,
                    })
                })
            })
            .collect();
        for (key, counts) in self.maps.connection_counts() {
            if counts.active() == 0 && !held.contains(&key) && !live.contains(&key) {
                let _ = self.maps.backend_conns.remove(&key);
                report.removed += 1;
            }
        }
        // The same for IPv6 connections (`counted6`, `conntrack6`, `backend_conns6`).
        let tokens: Vec<(Ct6Key, BackendConns6Key)> =
            self.maps.counted6.iter().filter_map(Result::ok).collect();
        let mut held: BTreeSet<BackendConns6Key> = BTreeSet::new();
        for (tuple, backend) in tokens {
            if self.maps.conntrack6.get(&tuple, 0).is_ok() {
                held.insert(backend);
                continue;
            }
            if self.maps.counted6.remove(&tuple).is_ok() {
                self.release_connections6(&backend, 1)?;
                report.released += 1;
            }
        }
        let live: BTreeSet<BackendConns6Key> = state
            .services
            .values()
            .flat_map(|s| {
                s.backends.iter().filter_map(|b| {
                    Some(BackendConns6Key {
                        svc_id: s.value.svc_id,
                        addr: b.v6()?.addr,
                        port: b.port,
                        _pad: 0,
                    })
                })
            })
            .collect();
        for (key, counts) in self.maps.connection_counts6() {
            if counts.active() == 0 && !held.contains(&key) && !live.contains(&key) {
                let _ = self.maps.backend_conns6.remove(&key);
                report.removed += 1;
            }
        }
        Ok(report)
    }

    /// Adds `n` to a backend's `closed` counter, in the kernel (see
    /// [`Datapath::collect_connection_counts`]).
    pub fn release_connections(
        &mut self,
        key: &BackendConnsKey,
        n: u64,
    ) -> Result<(), DatapathError> {
        self.run_conns_release(pod_bytes(key), n)
    }

    /// Adds `n` to an IPv6 backend's `closed` counter (`backend_conns6`): the program
    /// tells the IPv6 frame (14 bytes, `BackendConns6Key`, u64) from the IPv4 one by its
    /// length.
    pub fn release_connections6(
        &mut self,
        key: &BackendConns6Key,
        n: u64,
    ) -> Result<(), DatapathError> {
        self.run_conns_release(pod_bytes(key), n)
    }

    fn run_conns_release(&mut self, key: &[u8], n: u64) -> Result<(), DatapathError> {
        let mut frame = vec![0u8; 14];
        frame.extend_from_slice(key);
        frame.extend_from_slice(&n.to_ne_bytes());
        let prog = self.program_mut(PROG_CONNS_RELEASE)?;
        let opts = TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::new()
        };
        prog.test_run(opts)
            .map_err(|source| DatapathError::Program {
                name: PROG_CONNS_RELEASE.to_string(),
                source,
            })?;
        Ok(())
    }
}

/// What one pass of [`Datapath::collect_connection_counts`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectReport {
    /// Connections released because their conntrack entry was evicted.
    pub released: u64,
    /// Counters removed (backends no longer served, with nothing open).
    pub removed: usize,
}

/// The bytes of a map key (repr(C), no implicit padding).
fn pod_bytes<T: aya::Pod>(key: &T) -> &[u8] {
    // SAFETY: the Pod keys of proxy-common are repr(C) with every byte covered by a field
    // (asserted there), so all their bytes are initialised.
    unsafe { std::slice::from_raw_parts((key as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram(name.to_string()))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: name.to_string(),
            source,
        })
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, DatapathError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram(name.to_string()))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: name.to_string(),
            source,
        })
}

/// Refuses pins left by a version whose map layout differs: reusing them would let the new
/// programs read old bytes with a new meaning.
pub(crate) fn check_pins(dir: &Path) -> Result<(), DatapathError> {
    for (name, map_type, key, value) in map_shapes() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| DatapathError::Map {
            name: name.to_string(),
            source,
        })?;
        let found_type = info.map_type().ok();
        if info.key_size() as usize != key
            || info.value_size() as usize != value
            || found_type != Some(map_type)
        {
            return Err(DatapathError::IncompatiblePin {
                path,
                dir: dir.to_path_buf(),
                key_size: info.key_size(),
                value_size: info.value_size(),
                map_type: format!("{found_type:?}"),
                want_key: key as u32,
                want_value: value as u32,
                want_type: format!("{map_type:?}"),
            });
        }
    }
    Ok(())
}

/// Names of all maps the object pins.
pub fn map_names() -> impl Iterator<Item = &'static str> {
    map_shapes().into_iter().map(|(name, ..)| name)
}
