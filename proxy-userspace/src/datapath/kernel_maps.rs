//! Typed handles on the maps, used both by the agent (maps of the loaded object) and by the
//! CLI (maps opened from their pins, with no agent running).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as TrieKey, LpmTrie},
    },
};
use proxy_common::{
    conntrack::{CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_SNAT, Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    maps, reply_filter,
    service::{
        Affinity6Key, Affinity6Value, AffinityKey, AffinityValue, Backend4, Backend6, BackendConns,
        BackendConns6Key, BackendConnsKey, BackendSlotKey, MAGLEV_SIZE, MaglevKey, NodeConfig4,
        NodeConfig6, SCHED_MAGLEV, SourceRange4Key, SourceRange6Key, Svc4Key, Svc6Key, SvcMeta,
        SvcValue,
    },
    stats::{self, SvcCounters},
};

use super::DatapathError;
use crate::{
    model::{Family, IpRange, SvcKey},
    planner::{Backend, MapOp, MapState, Plan, ProgrammedService, Step, empty_meta},
};

/// The `src_ranges4` key of one IPv4 range of one service: the trie matches the 32 bits of
/// the svc_id whole, then the range's prefix. `None` for an IPv6 range.
pub fn range_key(svc_id: u32, range: &IpRange) -> Option<TrieKey<SourceRange4Key>> {
    let IpAddr::V4(addr) = range.addr else {
        return None;
    };
    Some(TrieKey::new(
        32 + u32::from(range.prefix_len),
        SourceRange4Key {
            svc_id_be: svc_id.to_be_bytes(),
            addr: addr.octets(),
        },
    ))
}

/// The `src_ranges6` key of one IPv6 range of one service (prefix 32 + the range's), as
/// [`range_key`]. `None` for an IPv4 range.
pub fn range_key6(svc_id: u32, range: &IpRange) -> Option<TrieKey<SourceRange6Key>> {
    let IpAddr::V6(addr) = range.addr else {
        return None;
    };
    Some(TrieKey::new(
        32 + u32::from(range.prefix_len),
        SourceRange6Key {
            svc_id_be: svc_id.to_be_bytes(),
            addr: addr.octets(),
        },
    ))
}

/// The service id and range of a trie key (`None` for a key no agent writes: a prefix
/// shorter than the svc_id, or host bits set).
fn range_of_parts(prefix_len: u32, svc_id_be: [u8; 4], addr: IpAddr) -> Option<(u32, IpRange)> {
    let prefix = u8::try_from(prefix_len.checked_sub(32)?).ok()?;
    let range = IpRange::new(addr, prefix)?;
    (range.addr == addr).then_some((u32::from_be_bytes(svc_id_be), range))
}

/// The service id and range of a `src_ranges4` key (`None` for a key no agent writes).
pub fn range_of_key(key: &TrieKey<SourceRange4Key>) -> Option<(u32, IpRange)> {
    let data = key.data();
    range_of_parts(
        key.prefix_len(),
        data.svc_id_be,
        Ipv4Addr::from(data.addr).into(),
    )
}

/// The service id and range of a `src_ranges6` key (`None` for a key no agent writes).
pub fn range_of_key6(key: &TrieKey<SourceRange6Key>) -> Option<(u32, IpRange)> {
    let data = key.data();
    range_of_parts(
        key.prefix_len(),
        data.svc_id_be,
        Ipv6Addr::from(data.addr).into(),
    )
}

/// The error of an op whose key and value are of different families (the planner never
/// makes one).
fn family_err(map: &str) -> DatapathError {
    DatapathError::Map {
        name: map.to_string(),
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "family",
            io_error: std::io::Error::other("an entry of the other address family"),
        }),
    }
}

pub struct KernelMaps {
    pub services: HashMap<MapData, Svc4Key, SvcValue>,
    pub backend_slots: HashMap<MapData, BackendSlotKey, Backend4>,
    pub conntrack: HashMap<MapData, Ct4Key, Ct4Value>,
    pub meta: HashMap<MapData, u32, SvcMeta>,
    pub reply_filter: Array<MapData, u64>,
    pub stats: PerCpuArray<MapData, u64>,
    pub maglev: HashMap<MapData, MaglevKey, u32>,
    pub backend_conns: HashMap<MapData, BackendConnsKey, BackendConns>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub counted: HashMap<MapData, Ct4Key, BackendConnsKey>,
    pub svc_counters: PerCpuArray<MapData, SvcCounters>,
    /// One-entry array: the node's SNAT address and port range, forwarding flags.
    pub node_cfg: Array<MapData, NodeConfig4>,
    /// loadBalancerSourceRanges of the external view (LPM trie).
    pub src_ranges: LpmTrie<MapData, SourceRange4Key, u8>,
    /// The IPv6 twins (`*6`): same shapes, `[u8; 16]` addresses.
    pub services6: HashMap<MapData, Svc6Key, SvcValue>,
    pub backend_slots6: HashMap<MapData, BackendSlotKey, Backend6>,
    pub conntrack6: HashMap<MapData, Ct6Key, Ct6Value>,
    pub backend_conns6: HashMap<MapData, BackendConns6Key, BackendConns>,
    pub affinity6: HashMap<MapData, Affinity6Key, Affinity6Value>,
    pub counted6: HashMap<MapData, Ct6Key, BackendConns6Key>,
    pub node_cfg6: Array<MapData, NodeConfig6>,
    pub src_ranges6: LpmTrie<MapData, SourceRange6Key, u8>,
}

/// What [`KernelMaps::apply`] did: steps that failed were rolled back and are named here.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub ops: usize,
    pub failed: Vec<String>,
}

fn map_err(name: &str) -> impl FnOnce(MapError) -> DatapathError + '_ {
    move |source| DatapathError::Map {
        name: name.to_string(),
        source,
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(map: Map, name: &str) -> Result<T, DatapathError> {
    T::try_from(map).map_err(map_err(name))
}

impl KernelMaps {
    fn from_lookup(
        mut get: impl FnMut(&str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        Ok(KernelMaps {
            services: typed(get(maps::SERVICES4)?, maps::SERVICES4)?,
            backend_slots: typed(get(maps::BACKEND_SLOTS4)?, maps::BACKEND_SLOTS4)?,
            conntrack: typed(get(maps::CONNTRACK4)?, maps::CONNTRACK4)?,
            meta: typed(get(maps::SVC_META)?, maps::SVC_META)?,
            reply_filter: typed(get(maps::REPLY_FILTER)?, maps::REPLY_FILTER)?,
            stats: typed(get(maps::STATS)?, maps::STATS)?,
            maglev: typed(get(maps::MAGLEV)?, maps::MAGLEV)?,
            backend_conns: typed(get(maps::BACKEND_CONNS4)?, maps::BACKEND_CONNS4)?,
            affinity: typed(get(maps::AFFINITY4)?, maps::AFFINITY4)?,
            counted: typed(get(maps::COUNTED4)?, maps::COUNTED4)?,
            svc_counters: typed(get(maps::SVC_COUNTERS)?, maps::SVC_COUNTERS)?,
            node_cfg: typed(get(maps::NODE_CFG4)?, maps::NODE_CFG4)?,
            src_ranges: typed(get(maps::SRC_RANGES4)?, maps::SRC_RANGES4)?,
            services6: typed(get(maps::SERVICES6)?, maps::SERVICES6)?,
            backend_slots6: typed(get(maps::BACKEND_SLOTS6)?, maps::BACKEND_SLOTS6)?,
            conntrack6: typed(get(maps::CONNTRACK6)?, maps::CONNTRACK6)?,
            backend_conns6: typed(get(maps::BACKEND_CONNS6)?, maps::BACKEND_CONNS6)?,
            affinity6: typed(get(maps::AFFINITY6)?, maps::AFFINITY6)?,
            counted6: typed(get(maps::COUNTED6)?, maps::COUNTED6)?,
            node_cfg6: typed(get(maps::NODE_CFG6)?, maps::NODE_CFG6)?,
            src_ranges6: typed(get(maps::SRC_RANGES6)?, maps::SRC_RANGES6)?,
        })
    }

    /// Takes the maps out of a loaded object (the programs keep their references).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Self::from_lookup(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| DatapathError::MissingMap(name.to_string()))
        })
    }

    /// Opens the maps an agent pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, DatapathError> {
        if !dir.join(maps::SERVICES4).exists() {
            return Err(DatapathError::NotPinned(dir.to_path_buf()));
        }
        // Maps of another layout would print garbage.
        super::layout::check(dir)?;
        Self::from_lookup(|name| {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// Reads what the service-side maps of both families hold, for the planner.
    pub fn read_state(&self) -> Result<MapState, DatapathError> {
        let mut state = MapState::default();
        let mut ranges = self.source_ranges()?;
        let mut spare: BTreeMap<u32, BTreeSet<IpRange>> = BTreeMap::new();
        let mut entries: Vec<(SvcKey, SvcValue)> = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(map_err(maps::SERVICES4))?;
            entries.push((key.into(), value));
        }
        for entry in self.services6.iter() {
            let (key, value) = entry.map_err(map_err(maps::SERVICES6))?;
            entries.push((key.into(), value));
        }
        for (key, value) in entries {
            let meta = self
                .meta
                .get(&value.svc_id, 0)
                .unwrap_or_else(|_| empty_meta());
            let mut backends = Vec::with_capacity(value.backend_count as usize);
            for slot in 0..value.backend_count {
                let slot = BackendSlotKey {
                    table: value.table,
                    slot,
                };
                backends.push(self.backend(&slot, key.family())?);
            }
            // Only ranges of the service's family are its own; others under its id are
            // leftovers (spare), for the other family's trie.
            let (source_ranges, others): (BTreeSet<IpRange>, BTreeSet<IpRange>) = ranges
                .remove(&value.svc_id)
                .unwrap_or_default()
                .into_iter()
                .partition(|r| r.family() == key.family());
            if !others.is_empty() {
                spare.insert(value.svc_id, others);
            }
            state.services.insert(
                key,
                ProgrammedService {
                    value,
                    backends,
                    meta,
                    source_ranges,
                },
            );
        }
        ranges.extend(spare);
        state.spare_ranges = ranges;
        state.node_config = Some(self.node_cfg.get(&0, 0).map_err(map_err(maps::NODE_CFG4))?);
        state.node_config6 = Some(
            self.node_cfg6
                .get(&0, 0)
                .map_err(map_err(maps::NODE_CFG6))?,
        );
        state.reply_filter = (0..reply_filter::WORDS)
            .map(|i| self.reply_filter.get(&i, 0).unwrap_or(0))
            .collect();
        // Indexed now, so the first incremental plan need not count every backend.
        state.reindex();
        Ok(state)
    }

    /// A slot of `backend_slots4` or `backend_slots6`.
    fn backend(&self, key: &BackendSlotKey, family: Family) -> Result<Backend, DatapathError> {
        match family {
            Family::V4 => self
                .backend_slots
                .get(key, 0)
                .map(Backend::from)
                .map_err(map_err(maps::BACKEND_SLOTS4)),
            Family::V6 => self
                .backend_slots6
                .get(key, 0)
                .map(Backend::from)
                .map_err(map_err(maps::BACKEND_SLOTS6)),
        }
    }

    /// A `services4` or `services6` value.
    fn service(&self, key: &SvcKey) -> Result<SvcValue, MapError> {
        match (key.v4(), key.v6()) {
            (Some(k), _) => self.services.get(&k, 0),
            (_, Some(k)) => self.services6.get(&k, 0),
            _ => Err(MapError::KeyNotFound),
        }
    }

    /// Deletes backend slots and metadata no live service refers to (left by an agent that
    /// died halfway through a change).
    pub fn remove_orphans(&mut self, state: &MapState) -> Result<usize, DatapathError> {
        // Live slots by family: a table of an IPv4 service has no business in
        // `backend_slots6`, and the reverse.
        let live_slots = |family: Family| -> BTreeSet<BackendSlotKey> {
            state
                .services
                .iter()
                .filter(|(k, _)| k.family() == family)
                .flat_map(|(_, s)| {
                    (0..s.value.backend_count).map(move |slot| BackendSlotKey {
                        table: s.value.table,
                        slot,
                    })
                })
                .collect()
        };
        let (live4, live6) = (live_slots(Family::V4), live_slots(Family::V6));
        let live_ids: BTreeSet<u32> = state.services.values().map(|s| s.value.svc_id).collect();
        let live_ids_of = |family: Family| -> BTreeSet<u32> {
            state
                .services
                .iter()
                .filter(|(k, _)| k.family() == family)
                .map(|(_, s)| s.value.svc_id)
                .collect()
        };
        let (ids4, ids6) = (live_ids_of(Family::V4), live_ids_of(Family::V6));
        let stale_slots: Vec<BackendSlotKey> = self
            .backend_slots
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live4.contains(k))
            .collect();
        let stale_slots6: Vec<BackendSlotKey> = self
            .backend_slots6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live6.contains(k))
            .collect();
        let stale_ids: Vec<u32> = self
            .meta
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live_ids.contains(id))
            .collect();
        for key in &stale_slots {
            self.backend_slots
                .remove(key)
                .map_err(map_err(maps::BACKEND_SLOTS4))?;
        }
        for key in &stale_slots6 {
            self.backend_slots6
                .remove(key)
                .map_err(map_err(maps::BACKEND_SLOTS6))?;
        }
        for id in &stale_ids {
            self.meta.remove(id).map_err(map_err(maps::SVC_META))?;
        }
        let live_maglev: BTreeSet<u32> = state
            .services
            .values()
            .filter(|s| s.value.scheduler == SCHED_MAGLEV)
            .map(|s| s.value.table)
            .collect();
        let stale_maglev: Vec<MaglevKey> = self
            .maglev
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live_maglev.contains(&k.table))
            .collect();
        for key in &stale_maglev {
            ignore_missing(self.maglev.remove(key)).map_err(map_err(maps::MAGLEV))?;
        }
        let stale_ranges: Vec<TrieKey<SourceRange4Key>> = self
            .src_ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !range_of_key(k).is_some_and(|(id, _)| ids4.contains(&id)))
            .collect();
        for key in &stale_ranges {
            ignore_missing(self.src_ranges.remove(key)).map_err(map_err(maps::SRC_RANGES4))?;
        }
        let stale_ranges6: Vec<TrieKey<SourceRange6Key>> = self
            .src_ranges6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !range_of_key6(k).is_some_and(|(id, _)| ids6.contains(&id)))
            .collect();
        for key in &stale_ranges6 {
            ignore_missing(self.src_ranges6.remove(key)).map_err(map_err(maps::SRC_RANGES6))?;
        }
        Ok(stale_slots.len()
            + stale_slots6.len()
            + stale_ids.len()
            + stale_maglev.len()
            + stale_ranges.len()
            + stale_ranges6.len())
    }

    /// The `src_ranges4` and `src_ranges6` entries, by service id (keys no agent writes
    /// are left out).
    pub fn source_ranges(&self) -> Result<BTreeMap<u32, BTreeSet<IpRange>>, DatapathError> {
        let mut out: BTreeMap<u32, BTreeSet<IpRange>> = Default::default();
        for key in self.src_ranges.keys() {
            let key = key.map_err(map_err(maps::SRC_RANGES4))?;
            if let Some((id, range)) = range_of_key(&key) {
                out.entry(id).or_default().insert(range);
            }
        }
        for key in self.src_ranges6.keys() {
            let key = key.map_err(map_err(maps::SRC_RANGES6))?;
            if let Some((id, range)) = range_of_key6(&key) {
                out.entry(id).or_default().insert(range);
            }
        }
        Ok(out)
    }

    /// Applies a plan: prologue, then each step as a unit (a step that fails is rolled back
    /// and reported by service name, the others go on), then the epilogue. `state` follows
    /// every successful op, so it keeps mirroring the maps.
    pub fn apply(&mut self, plan: &Plan, state: &mut MapState) -> ApplyReport {
        let mut report = ApplyReport::default();
        for op in &plan.prologue {
            self.apply_shared(op, state, &mut report);
        }
        for step in &plan.steps {
            self.apply_step(step, state, &mut report);
        }
        if !report.failed.is_empty() {
            // A rolled-back step may keep backends whose bits the epilogue would clear; a
            // superset of bits is safe, and the next plan trims it.
            return report;
        }
        for op in &plan.epilogue {
            self.apply_shared(op, state, &mut report);
        }
        report
    }

    fn apply_shared(&mut self, op: &MapOp, state: &mut MapState, report: &mut ApplyReport) {
        match self.write(op) {
            Ok(()) => {
                state.apply(op);
                report.ops += 1;
            }
            Err(e) => report.failed.push(format!("{e}")),
        }
    }

    fn apply_step(&mut self, step: &Step, state: &mut MapState, report: &mut ApplyReport) {
        let mut undo: Vec<MapOp> = Vec::new();
        for op in &step.ops {
            let inverse = self.inverse(op, state);
            match self.write(op) {
                Ok(()) => {
                    state.apply(op);
                    report.ops += 1;
                    undo.extend(inverse);
                }
                Err(e) => {
                    tracing::error!(service = %step.name, error = %e, "could not program service; rolled back, what was serving stays");
                    for op in undo.iter().rev() {
                        if self.write(op).is_ok() {
                            state.apply(op);
                        }
                    }
                    report.failed.push(format!("{}: {e}", step.name));
                    return;
                }
            }
        }
    }

    /// The op that undoes `op`, from what the map holds now (or, for the trie, whose
    /// lookups are longest-prefix matches, from the mirror `state`).
    fn inverse(&self, op: &MapOp, state: &MapState) -> Option<MapOp> {
        match op {
            MapOp::PutSourceRange { svc_id, range }
            | MapOp::DeleteSourceRange { svc_id, range } => {
                let present = state
                    .spare_ranges
                    .get(svc_id)
                    .is_some_and(|r| r.contains(range))
                    || state
                        .services
                        .values()
                        .any(|s| s.value.svc_id == *svc_id && s.source_ranges.contains(range));
                let (svc_id, range) = (*svc_id, *range);
                Some(if present {
                    MapOp::PutSourceRange { svc_id, range }
                } else {
                    MapOp::DeleteSourceRange { svc_id, range }
                })
            }
            MapOp::PutNodeConfig { .. } => self
                .node_cfg
                .get(&0, 0)
                .ok()
                .map(|value| MapOp::PutNodeConfig { value }),
            MapOp::PutNodeConfig6 { .. } => self
                .node_cfg6
                .get(&0, 0)
                .ok()
                .map(|value| MapOp::PutNodeConfig6 { value }),
            MapOp::PutBackend { key, value } => {
                let family = value.family();
                Some(match self.backend(key, family) {
                    Ok(value) => MapOp::PutBackend { key: *key, value },
                    Err(_) => MapOp::DeleteBackend { key: *key, family },
                })
            }
            MapOp::DeleteBackend { key, family } => Some(match self.backend(key, *family) {
                Ok(value) => MapOp::PutBackend { key: *key, value },
                Err(_) => MapOp::DeleteBackend {
                    key: *key,
                    family: *family,
                },
            }),
            MapOp::PutMeta { svc_id, .. } | MapOp::DeleteMeta { svc_id } => {
                Some(match self.meta.get(svc_id, 0) {
                    Ok(meta) => MapOp::PutMeta {
                        svc_id: *svc_id,
                        meta,
                    },
                    Err(_) => MapOp::DeleteMeta { svc_id: *svc_id },
                })
            }
            MapOp::PutService { key, .. } | MapOp::DeleteService { key } => {
                Some(match self.service(key) {
                    Ok(value) => MapOp::PutService { key: *key, value },
                    Err(_) => MapOp::DeleteService { key: *key },
                })
            }
            MapOp::SetReplyFilterWord { index, .. } => {
                self.reply_filter
                    .get(index, 0)
                    .ok()
                    .map(|word| MapOp::SetReplyFilterWord {
                        index: *index,
                        word,
                    })
            }
            // Only tables no live service reads are written, so undoing is deleting.
            MapOp::PutMaglevTable { table, .. } => Some(MapOp::DeleteMaglevTable { table: *table }),
            // Deleted only after the service stopped using it; nothing to restore.
            MapOp::DeleteMaglevTable { .. } => None,
            // Dropped conntrack entries are not restored: clients simply pick anew.
            MapOp::PurgeUdpConntrack { .. } => None,
            // The counters belonged to no live service (the id was free).
            MapOp::ResetCounters { .. } => None,
        }
    }

    fn write(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        match op {
            MapOp::PutBackend { key, value } => match (value.v4(), value.v6()) {
                (Some(v), _) => self
                    .backend_slots
                    .insert(key, v, 0)
                    .map_err(map_err(maps::BACKEND_SLOTS4)),
                (_, Some(v)) => self
                    .backend_slots6
                    .insert(key, v, 0)
                    .map_err(map_err(maps::BACKEND_SLOTS6)),
                _ => unreachable!("an address is of one family"),
            },
            MapOp::DeleteBackend {
                key,
                family: Family::V4,
            } => ignore_missing(self.backend_slots.remove(key))
                .map_err(map_err(maps::BACKEND_SLOTS4)),
            MapOp::DeleteBackend {
                key,
                family: Family::V6,
            } => ignore_missing(self.backend_slots6.remove(key))
                .map_err(map_err(maps::BACKEND_SLOTS6)),
            MapOp::PutMeta { svc_id, meta } => self
                .meta
                .insert(svc_id, meta, 0)
                .map_err(map_err(maps::SVC_META)),
            MapOp::DeleteMeta { svc_id } => {
                ignore_missing(self.meta.remove(svc_id)).map_err(map_err(maps::SVC_META))
            }
            MapOp::PutService { key, value } => match (key.v4(), key.v6()) {
                (Some(k), _) => self
                    .services
                    .insert(k, value, 0)
                    .map_err(map_err(maps::SERVICES4)),
                (_, Some(k)) => self
                    .services6
                    .insert(k, value, 0)
                    .map_err(map_err(maps::SERVICES6)),
                _ => unreachable!("an address is of one family"),
            },
            MapOp::DeleteService { key } => match (key.v4(), key.v6()) {
                (Some(k), _) => {
                    ignore_missing(self.services.remove(&k)).map_err(map_err(maps::SERVICES4))
                }
                (_, Some(k)) => {
                    ignore_missing(self.services6.remove(&k)).map_err(map_err(maps::SERVICES6))
                }
                _ => unreachable!("an address is of one family"),
            },
            MapOp::SetReplyFilterWord { index, word } => self
                .reply_filter
                .set(*index, word, 0)
                .map_err(map_err(maps::REPLY_FILTER)),
            MapOp::PurgeUdpConntrack { frontend, backends } => {
                self.purge_udp_conntrack(frontend, backends);
                Ok(())
            }
            MapOp::ResetCounters { svc_id } => {
                let zeros = vec![SvcCounters::default(); nr_cpus()?];
                let values =
                    PerCpuValues::try_from(zeros).map_err(|e| counters_err("PerCpuValues", e))?;
                self.svc_counters
                    .set(*svc_id, values, 0)
                    .map_err(map_err(maps::SVC_COUNTERS))
            }
            MapOp::PutMaglevTable { table, slots } => {
                for (index, slot) in slots.iter().enumerate() {
                    let key = MaglevKey {
                        table: *table,
                        index: index as u32,
                    };
                    self.maglev
                        .insert(key, slot, 0)
                        .map_err(map_err(maps::MAGLEV))?;
                }
                Ok(())
            }
            MapOp::PutSourceRange { svc_id, range } => {
                match (range_key(*svc_id, range), range_key6(*svc_id, range)) {
                    (Some(k), _) => self
                        .src_ranges
                        .insert(&k, 1, 0)
                        .map_err(map_err(maps::SRC_RANGES4)),
                    (_, Some(k)) => self
                        .src_ranges6
                        .insert(&k, 1, 0)
                        .map_err(map_err(maps::SRC_RANGES6)),
                    _ => Err(family_err(maps::SRC_RANGES4)),
                }
            }
            MapOp::DeleteSourceRange { svc_id, range } => {
                match (range_key(*svc_id, range), range_key6(*svc_id, range)) {
                    (Some(k), _) => ignore_missing(self.src_ranges.remove(&k))
                        .map_err(map_err(maps::SRC_RANGES4)),
                    (_, Some(k)) => ignore_missing(self.src_ranges6.remove(&k))
                        .map_err(map_err(maps::SRC_RANGES6)),
                    _ => Err(family_err(maps::SRC_RANGES4)),
                }
            }
            MapOp::PutNodeConfig { value } => self
                .node_cfg
                .set(0, value, 0)
                .map_err(map_err(maps::NODE_CFG4)),
            MapOp::PutNodeConfig6 { value } => self
                .node_cfg6
                .set(0, value, 0)
                .map_err(map_err(maps::NODE_CFG6)),
            MapOp::DeleteMaglevTable { table } => {
                for index in 0..MAGLEV_SIZE {
                    let key = MaglevKey {
                        table: *table,
                        index,
                    };
                    ignore_missing(self.maglev.remove(&key)).map_err(map_err(maps::MAGLEV))?;
                }
                Ok(())
            }
        }
    }

    /// The Maglev table of backend table `table` as the kernel holds it (entries missing
    /// from the map are `None`).
    pub fn maglev_table(&self, table: u32) -> Vec<Option<u32>> {
        (0..MAGLEV_SIZE)
            .map(|index| self.maglev.get(&MaglevKey { table, index }, 0).ok())
            .collect()
    }

    /// The per-backend connection counters of the counting schedulers.
    pub fn connection_counts(&self) -> Vec<(BackendConnsKey, BackendConns)> {
        self.backend_conns.iter().filter_map(Result::ok).collect()
    }

    /// The per-backend connection counters of IPv6 backends (`backend_conns6`).
    pub fn connection_counts6(&self) -> Vec<(BackendConns6Key, BackendConns)> {
        self.backend_conns6.iter().filter_map(Result::ok).collect()
    }

    /// Deletes the UDP conntrack entries between clients of `frontend` and `backends`, both
    /// directions (in `conntrack4` or `conntrack6`, the frontend's family).
    fn purge_udp_conntrack(&mut self, frontend: &SvcKey, backends: &[Backend]) {
        let gone =
            |addr: IpAddr, port: u16| backends.iter().any(|b| b.addr == addr && b.port == port);
        let (fa, fp) = (frontend.addr, frontend.port);
        if frontend.v4().is_some() {
            let a4 = |a: [u8; 4]| IpAddr::from(a);
            let doomed: Vec<Ct4Key> = self
                .conntrack
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| {
                    k.proto == frontend.proto
                        && ((a4(k.daddr) == fa
                            && k.dport == fp
                            && gone(a4(v.nat_addr), v.nat_port))
                            || (a4(v.nat_addr) == fa
                                && v.nat_port == fp
                                && gone(a4(k.saddr), k.sport)))
                })
                .map(|(k, _)| k)
                .collect();
            for key in doomed {
                // An entry the LRU already evicted is fine.
                let _ = self.conntrack.remove(&key);
            }
        } else {
            let a6 = |a: [u8; 16]| IpAddr::from(a);
            let doomed: Vec<Ct6Key> = self
                .conntrack6
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| {
                    k.proto == frontend.proto
                        && ((a6(k.daddr) == fa
                            && k.dport == fp
                            && gone(a6(v.nat_addr), v.nat_port))
                            || (a6(v.nat_addr) == fa
                                && v.nat_port == fp
                                && gone(a6(k.saddr), k.sport)))
                })
                .map(|(k, _)| k)
                .collect();
            for key in doomed {
                let _ = self.conntrack6.remove(&key);
            }
        }
    }

    /// Reply-filter words with the bit of every backend that still has a connection open
    /// (a reply entry whose connection is not closed in both directions): the reverse NAT
    /// of such a connection must go on after its backend leaves the service, as the
    /// kernel's conntrack keeps it for kube-proxy.
    pub fn reply_bits_in_use(&self) -> Vec<u64> {
        let mut words = vec![0u64; reply_filter::WORDS as usize];
        for (key, value) in self.conntrack.iter().filter_map(Result::ok) {
            if value.dir != CT_DIR_REPLY {
                continue;
            }
            if value.flags & CT_FLAG_CLOSING != 0 {
                // The client is the key's destination, or `nat2` when source-NAT-ed.
                let (client, client_port) = if value.flags & CT_FLAG_SNAT != 0 {
                    (value.nat2_addr, value.nat2_port)
                } else {
                    (key.daddr, key.dport)
                };
                let forward = Ct4Key {
                    saddr: client,
                    daddr: value.nat_addr,
                    sport: client_port,
                    dport: value.nat_port,
                    proto: key.proto,
                    _pad: [0; 3],
                };
                let forward_closing = self
                    .conntrack
                    .get(&forward, 0)
                    .map_or(true, |f| f.flags & CT_FLAG_CLOSING != 0);
                if forward_closing {
                    continue;
                }
            }
            let (word, mask) =
                reply_filter::word_and_mask(reply_filter::bit(key.saddr, key.sport, key.proto));
            words[word as usize] |= mask;
        }
        // The same for IPv6 connections (their bits are `bit6`, in the same filter).
        for (key, value) in self.conntrack6.iter().filter_map(Result::ok) {
            if value.dir != CT_DIR_REPLY {
                continue;
            }
            if value.flags & CT_FLAG_CLOSING != 0 {
                let (client, client_port) = if value.flags & CT_FLAG_SNAT != 0 {
                    (value.nat2_addr, value.nat2_port)
                } else {
                    (key.daddr, key.dport)
                };
                let forward = Ct6Key {
                    saddr: client,
                    daddr: value.nat_addr,
                    sport: client_port,
                    dport: value.nat_port,
                    proto: key.proto,
                    _pad: [0; 3],
                };
                let forward_closing = self
                    .conntrack6
                    .get(&forward, 0)
                    .map_or(true, |f| f.flags & CT_FLAG_CLOSING != 0);
                if forward_closing {
                    continue;
                }
            }
            let (word, mask) =
                reply_filter::word_and_mask(reply_filter::bit6(key.saddr, key.sport, key.proto));
            words[word as usize] |= mask;
        }
        words
    }

    /// Every conntrack entry.
    pub fn conntrack_entries(&self) -> Vec<(Ct4Key, Ct4Value)> {
        self.conntrack.iter().filter_map(Result::ok).collect()
    }

    /// Every `conntrack6` entry.
    pub fn conntrack_entries6(&self) -> Vec<(Ct6Key, Ct6Value)> {
        self.conntrack6.iter().filter_map(Result::ok).collect()
    }

    /// The datapath counters, summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..stats::COUNT)
            .map(|i| {
                let total = self
                    .stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (stats::NAMES[i as usize], total)
            })
            .collect()
    }
}

/// Possible CPUs: the number of values of a per-CPU map.
fn nr_cpus() -> Result<usize, DatapathError> {
    aya::util::nr_cpus()
        .map_err(|(path, e)| counters_err("nr_cpus", std::io::Error::other(format!("{path}: {e}"))))
}

fn counters_err(call: &'static str, io_error: std::io::Error) -> DatapathError {
    DatapathError::Map {
        name: maps::SVC_COUNTERS.to_string(),
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
