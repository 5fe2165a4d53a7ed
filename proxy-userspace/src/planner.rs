//! What changes: diffs the desired state against what the maps hold and emits the fewest
//! map writes, ordered so that no packet sees a half-written service.
//!
//! Pure: [`MapState`] is a mirror of the maps (read from the kernel at start, then kept in
//! step by [`MapState::apply`] as each op succeeds), so plans are unit-testable.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::{
    PROTO_UDP, maps, reply_filter,
    service::{
        BACKEND_LOCAL, BACKEND_TERMINATING, Backend4, Backend6, BackendSlotKey, NAME_LEN,
        NODE_F_FIB_FORWARD, NodeConfig4, NodeConfig6, PORT_NAME_LEN, SCHED_MAGLEV, SvcMeta,
        SvcValue,
    },
};

pub use crate::model::SvcKey;
use crate::{
    maglev,
    model::{
        DesiredService, DesiredState, Endpoint, Family, Frontend, IpRange, Protocol, Scheduling,
        ServicePortName, host_port,
    },
};

/// One backend slot's value, of either family (`backend_slots4` holds [`Backend4`],
/// `backend_slots6` [`Backend6`]; the address says which).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// `BACKEND_*` flags.
    pub flags: u8,
    pub weight: u8,
}

impl Backend {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// The `backend_slots4` value (`None` for an IPv6 backend).
    pub fn v4(&self) -> Option<Backend4> {
        match self.addr {
            IpAddr::V4(a) => Some(Backend4 {
                addr: a.octets(),
                port: self.port,
                flags: self.flags,
                weight: self.weight,
            }),
            IpAddr::V6(_) => None,
        }
    }

    /// The `backend_slots6` value (`None` for an IPv4 backend).
    pub fn v6(&self) -> Option<Backend6> {
        match self.addr {
            IpAddr::V6(a) => Some(Backend6 {
                addr: a.octets(),
                port: self.port,
                flags: self.flags,
                weight: self.weight,
            }),
            IpAddr::V4(_) => None,
        }
    }
}

impl From<Backend4> for Backend {
    fn from(b: Backend4) -> Self {
        Backend {
            addr: Ipv4Addr::from(b.addr).into(),
            port: b.port,
            flags: b.flags,
            weight: b.weight,
        }
    }
}

impl From<Backend6> for Backend {
    fn from(b: Backend6) -> Self {
        Backend {
            addr: Ipv6Addr::from(b.addr).into(),
            port: b.port,
            flags: b.flags,
            weight: b.weight,
        }
    }
}

/// The reply-filter bit of a backend of a `proto` service (`reply_filter::bit` or `bit6`
/// by family).
pub fn reply_bit(addr: IpAddr, port: u16, proto: u8) -> u32 {
    match addr {
        IpAddr::V4(a) => reply_filter::bit(a.octets(), port, proto),
        IpAddr::V6(a) => reply_filter::bit6(a.octets(), port, proto),
    }
}

/// One service as programmed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub value: SvcValue,
    /// Backends in slot order of the live table (`value.table`).
    pub backends: Vec<Backend>,
    pub meta: SvcMeta,
    /// Its `src_ranges4` or `src_ranges6` entries (allowed client ranges, under its
    /// `svc_id`; of its family).
    pub source_ranges: BTreeSet<IpRange>,
}

/// Mirror of the service-side maps of both families (`services4` and `services6` in
/// `services`, keyed by [`SvcKey`] whose address says the family; likewise for backends
/// and ranges).
///
/// Equality compares the maps' contents (the public fields), not the internal index.
#[derive(Clone, Debug, Default)]
pub struct MapState {
    pub services: BTreeMap<SvcKey, ProgrammedService>,
    /// Words of `reply_filter` (length `reply_filter::WORDS`, or empty before the first read).
    pub reply_filter: Vec<u64>,
    /// `backend_slots4`/`backend_slots6` entries outside every live table: a table being
    /// filled before the `PutService` that publishes it, or an old table until its slots
    /// are deleted. Empty between plans. A table belongs to one svc_id, so to one family.
    pub spare_slots: BTreeMap<BackendSlotKey, Backend>,
    /// `svc_meta` entries of no service in `services`: written just before a new service,
    /// or left by a removed one until its `DeleteMeta`. Empty between plans.
    pub spare_meta: BTreeMap<u32, SvcMeta>,
    /// `src_ranges4` entries of no service in `services`, by `svc_id`: written just before
    /// a new service, or left by a removed one until deleted. Empty between plans.
    pub spare_ranges: BTreeMap<u32, BTreeSet<IpRange>>,
    /// The `node_cfg4` entry (`None` before the first read or write).
    pub node_config: Option<NodeConfig4>,
    /// The `node_cfg6` entry (`None` before the first read or write).
    pub node_config6: Option<NodeConfig6>,
    /// `svc_id` -> key in `services`, kept by [`MapState::apply`]; rebuilt when the number
    /// of services changed behind its back (call [`MapState::reindex`] after replacing
    /// services by hand).
    by_id: BTreeMap<u32, SvcKey>,
    indexed: usize,
    /// Live backends per reply-filter bit (length `reply_filter::BITS` once indexed), kept
    /// by [`MapState::apply`], so a plan finds the words a change touches without going
    /// over every service.
    filter_refs: Vec<u32>,
    /// A planner's scratch copy of some services only: its `filter_refs` still count the
    /// whole maps, so they are never recounted from its services.
    partial: bool,
}

impl PartialEq for MapState {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.reply_filter == other.reply_filter
            && self.spare_slots == other.spare_slots
            && self.spare_meta == other.spare_meta
            && self.spare_ranges == other.spare_ranges
            && self.node_config == other.node_config
            && self.node_config6 == other.node_config6
    }
}

impl Eq for MapState {}

/// Sizes of the maps, so the planner can refuse what would not fit before writing anything.
/// Each family has its own maps of these sizes (`services4` and `services6` hold
/// `services` each, and so on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backend_slots: u32,
}

/// One write to a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Write a slot of `backend_slots4` or `backend_slots6` (the value's family).
    PutBackend {
        key: BackendSlotKey,
        value: Backend,
    },
    DeleteBackend {
        key: BackendSlotKey,
        family: Family,
    },
    PutMeta {
        svc_id: u32,
        meta: SvcMeta,
    },
    DeleteMeta {
        svc_id: u32,
    },
    /// Write `services4` or `services6` (the key's family).
    PutService {
        key: SvcKey,
        value: SvcValue,
    },
    DeleteService {
        key: SvcKey,
    },
    SetReplyFilterWord {
        index: u32,
        word: u64,
    },
    /// Write the Maglev table of backend table `table`: entry `i` -> slot `slots[i]`
    /// (`maglev`). Written before the `PutService` that publishes `table`.
    PutMaglevTable {
        table: u32,
        slots: Vec<u32>,
    },
    /// Delete the Maglev table of `table` (after the service stopped using it).
    DeleteMaglevTable {
        table: u32,
    },
    /// Drop UDP conntrack entries of `frontend` whose backend is one of `backends`
    /// (kube-proxy clears UDP conntrack when an endpoint goes, so clients move at once).
    PurgeUdpConntrack {
        frontend: SvcKey,
        backends: Vec<Backend>,
    },
    /// Zero the traffic counters of `svc_id` (`svc_counters`), given to a new service: its
    /// counters must not start from those of a service that had the id before.
    ResetCounters {
        svc_id: u32,
    },
    /// Allow clients in `range` for the service `svc_id` (`src_ranges4` or `src_ranges6`,
    /// the range's family).
    PutSourceRange {
        svc_id: u32,
        range: IpRange,
    },
    DeleteSourceRange {
        svc_id: u32,
        range: IpRange,
    },
    /// Write the node's configuration (`node_cfg4`).
    PutNodeConfig {
        value: NodeConfig4,
    },
    /// Write the node's IPv6 configuration (`node_cfg6`).
    PutNodeConfig6 {
        value: NodeConfig6,
    },
}

/// The ops for one service port, applied together; if one fails the step is rolled back
/// and the error names `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub name: ServicePortName,
    pub ops: Vec<MapOp>,
}

/// A plan is applied prologue, steps, epilogue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Reply-filter words that gain bits (`old | new`), written before any service is
    /// published, so the first reply of a new backend is never missed.
    pub prologue: Vec<MapOp>,
    /// Service steps in order: additions and changes first, removals after.
    pub steps: Vec<Step>,
    /// Reply-filter words set to exactly the new bits, after all steps.
    pub epilogue: Vec<MapOp>,
}

impl Plan {
    /// No write at all.
    pub fn is_empty(&self) -> bool {
        self.prologue.is_empty() && self.steps.is_empty() && self.epilogue.is_empty()
    }

    /// Number of map writes (conntrack purges included).
    pub fn op_count(&self) -> usize {
        self.prologue.len()
            + self.steps.iter().map(|s| s.ops.len()).sum::<usize>()
            + self.epilogue.len()
    }
}

/// A service the planner could not program; what was serving for it stays as it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{name}: {map} is full ({size} entries)")]
    Full {
        name: ServicePortName,
        frontend: Frontend,
        map: &'static str,
        size: u32,
    },
    #[error("{name}: no service id left")]
    NoServiceId {
        name: ServicePortName,
        frontend: Frontend,
    },
}

impl PlanError {
    /// The frontend of the refused service.
    pub fn frontend(&self) -> Frontend {
        match self {
            PlanError::Full { frontend, .. } | PlanError::NoServiceId { frontend, .. } => *frontend,
        }
    }
}

/// Largest `svc_id` whose backend tables (`svc_id * 2 + 1`) fit a `u32`.
pub const MAX_SVC_ID: u32 = (u32::MAX - 1) / 2;

/// An `svc_meta` value with no names (what a missing entry reads as).
pub fn empty_meta() -> SvcMeta {
    SvcMeta {
        namespace: [0; NAME_LEN],
        name: [0; NAME_LEN],
        port_name: [0; PORT_NAME_LEN],
    }
}

/// Copies `s` into a NUL-padded field, cut (at a character boundary) so one NUL is always
/// left at the end.
fn name_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

fn field_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The `svc_meta` value of a service port (names truncated to fit, NUL-padded).
pub fn meta_from_name(name: &ServicePortName) -> SvcMeta {
    SvcMeta {
        namespace: name_field(&name.namespace),
        name: name_field(&name.name),
        port_name: name_field(&name.port_name),
    }
}

/// `(namespace, name, port name)` of an `svc_meta` value; the inverse of [`meta_from_name`]
/// for names that fit.
pub fn meta_to_name(meta: &SvcMeta) -> (String, String, String) {
    (
        field_str(&meta.namespace),
        field_str(&meta.name),
        field_str(&meta.port_name),
    )
}

/// The backend slot value of an endpoint.
pub fn backend_from_endpoint(endpoint: &Endpoint) -> Backend {
    let mut flags = 0;
    if endpoint.terminating {
        flags |= BACKEND_TERMINATING;
    }
    if endpoint.local {
        flags |= BACKEND_LOCAL;
    }
    Backend {
        addr: endpoint.addr,
        port: endpoint.port,
        flags,
        weight: 1,
    }
}

/// The `node_cfg4` value: where SNAT-ed connections come from (`None`: no SNAT address
/// known, so the kernel uses no remote backend for them), the SNAT source port range, and
/// whether translated packets are forwarded at XDP (`NODE_F_FIB_FORWARD`).
pub fn node_config(
    snat_addr: Option<std::net::Ipv4Addr>,
    snat_ports: std::ops::RangeInclusive<u16>,
    fib_forward: bool,
) -> NodeConfig4 {
    NodeConfig4 {
        snat_addr: snat_addr.map_or([0; 4], |a| a.octets()),
        snat_port_min: *snat_ports.start(),
        snat_port_max: *snat_ports.end(),
        flags: if fib_forward { NODE_F_FIB_FORWARD } else { 0 },
    }
}

/// The write that makes `node_cfg4` hold `wanted`, if it does not already.
pub fn plan_node_config(wanted: &NodeConfig4, current: &MapState) -> Option<MapOp> {
    (current.node_config.as_ref() != Some(wanted))
        .then_some(MapOp::PutNodeConfig { value: *wanted })
}

/// The `node_cfg6` value, as [`node_config`] for IPv6: the IPv6 SNAT address (`None`:
/// none known, written as `::`), the same port range and flags.
pub fn node_config6(
    snat_addr: Option<Ipv6Addr>,
    snat_ports: std::ops::RangeInclusive<u16>,
    fib_forward: bool,
) -> NodeConfig6 {
    NodeConfig6 {
        snat_addr: snat_addr.map_or([0; 16], |a| a.octets()),
        snat_port_min: *snat_ports.start(),
        snat_port_max: *snat_ports.end(),
        flags: if fib_forward { NODE_F_FIB_FORWARD } else { 0 },
    }
}

/// The write that makes `node_cfg6` hold `wanted`, if it does not already.
pub fn plan_node_config6(wanted: &NodeConfig6, current: &MapState) -> Option<MapOp> {
    (current.node_config6.as_ref() != Some(wanted))
        .then_some(MapOp::PutNodeConfig6 { value: *wanted })
}

/// Entries of the `*4` (index 0) and `*6` (index 1) maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyCounts {
    pub services: [usize; 2],
    pub slots: [usize; 2],
    pub ranges: [usize; 2],
}

/// The two backend tables of a service id. Wrapping, so an out-of-range id read from the
/// maps cannot panic (the planner never allocates one above [`MAX_SVC_ID`]).
fn tables_of(svc_id: u32) -> [u32; 2] {
    let first = svc_id.wrapping_mul(2);
    [first, first.wrapping_add(1)]
}

/// The table that is not `live` among the two of `svc_id`.
fn other_table(svc_id: u32, live: u32) -> u32 {
    let [first, second] = tables_of(svc_id);
    if live == first { second } else { first }
}

fn table_range(table: u32) -> std::ops::RangeInclusive<BackendSlotKey> {
    BackendSlotKey { table, slot: 0 }..=BackendSlotKey {
        table,
        slot: u32::MAX,
    }
}

/// Adds (or removes) the reply-filter references of live `backends` of a `proto` service.
fn count_refs(refs: &mut [u32], proto: u8, backends: &[Backend], add: bool) {
    for b in backends {
        let bit = reply_bit(b.addr, b.port, proto) as usize;
        if let Some(r) = refs.get_mut(bit) {
            *r = if add { *r + 1 } else { r.saturating_sub(1) };
        }
    }
}

/// The reply-filter references of every live backend of `services`.
fn refs_of(services: &BTreeMap<SvcKey, ProgrammedService>) -> Vec<u32> {
    let mut refs = vec![0u32; reply_filter::BITS as usize];
    for (key, svc) in services {
        count_refs(&mut refs, key.proto, &svc.backends, true);
    }
    refs
}

impl MapState {
    /// Rebuilds the `svc_id` index and the reply-filter references from `services`.
    pub fn reindex(&mut self) {
        self.by_id = self
            .services
            .iter()
            .map(|(k, s)| (s.value.svc_id, *k))
            .collect();
        self.indexed = self.services.len();
        if !self.partial {
            self.filter_refs = refs_of(&self.services);
        }
    }

    /// Whether the index and references follow `services` (else the next op rebuilds them).
    fn indexed(&self) -> bool {
        self.indexed == self.services.len() && self.filter_refs.len() == reply_filter::BITS as usize
    }

    fn ensure_indexed(&mut self) {
        if !self.indexed() {
            self.reindex();
        }
    }

    /// The reply-filter word `index` as the live backends want it.
    fn wanted_word(&self, index: usize) -> u64 {
        let refs = &self.filter_refs[index * 64..(index + 1) * 64];
        refs.iter()
            .enumerate()
            .filter(|(_, r)| **r > 0)
            .fold(0, |w, (bit, _)| w | 1 << bit)
    }

    /// A copy holding only the services of `keys` (and every spare entry), with the
    /// reply-filter references of the whole state: what a plan touching only `keys` needs.
    fn subset(&self, keys: &BTreeSet<SvcKey>) -> MapState {
        let services: BTreeMap<SvcKey, ProgrammedService> = keys
            .iter()
            .filter_map(|k| Some((*k, self.services.get(k)?.clone())))
            .collect();
        let mut state = MapState {
            services,
            reply_filter: self.reply_filter.clone(),
            spare_slots: self.spare_slots.clone(),
            spare_meta: self.spare_meta.clone(),
            spare_ranges: self.spare_ranges.clone(),
            node_config: self.node_config,
            filter_refs: if self.indexed() {
                self.filter_refs.clone()
            } else {
                refs_of(&self.services)
            },
            partial: true,
            ..Default::default()
        };
        state.reindex();
        state
    }

    /// The key of the service with `svc_id`.
    fn key_of_id(&mut self, svc_id: u32) -> Option<SvcKey> {
        self.ensure_indexed();
        let key = *self.by_id.get(&svc_id)?;
        match self.services.get(&key) {
            Some(s) if s.value.svc_id == svc_id => Some(key),
            _ => {
                self.reindex();
                self.by_id.get(&svc_id).copied()
            }
        }
    }

    /// The service whose live table is `table`.
    fn live_table(&mut self, table: u32) -> Option<SvcKey> {
        let key = self.key_of_id(table / 2)?;
        (self.services[&key].value.table == table).then_some(key)
    }

    fn slot_present(&mut self, key: &BackendSlotKey) -> bool {
        self.spare_slots.contains_key(key)
            || self
                .live_table(key.table)
                .is_some_and(|k| (key.slot as usize) < self.services[&k].backends.len())
    }

    /// Whether `src_ranges4` holds `range` for `svc_id`.
    fn range_present(&mut self, svc_id: u32, range: &IpRange) -> bool {
        self.spare_ranges
            .get(&svc_id)
            .is_some_and(|r| r.contains(range))
            || self
                .key_of_id(svc_id)
                .is_some_and(|k| self.services[&k].source_ranges.contains(range))
    }

    /// Number of `src_ranges4` and `src_ranges6` entries.
    pub fn range_count(&self) -> usize {
        self.services
            .values()
            .map(|s| s.source_ranges.len())
            .sum::<usize>()
            + self.spare_ranges.values().map(BTreeSet::len).sum::<usize>()
    }

    /// Number of `backend_slots4` and `backend_slots6` entries.
    pub fn slot_count(&self) -> usize {
        self.services
            .values()
            .map(|s| s.backends.len())
            .sum::<usize>()
            + self.spare_slots.len()
    }

    /// Entries of each family's maps, indexed by [`Family::index`]: services, backend
    /// slots, source ranges.
    pub fn counts_by_family(&self) -> FamilyCounts {
        let mut c = FamilyCounts::default();
        for (key, s) in &self.services {
            let f = key.family().index();
            c.services[f] += 1;
            c.slots[f] += s.backends.len();
            c.ranges[f] += s.source_ranges.len();
        }
        for b in self.spare_slots.values() {
            c.slots[b.family().index()] += 1;
        }
        for r in self.spare_ranges.values().flatten() {
            c.ranges[r.family().index()] += 1;
        }
        c
    }

    /// Takes the slots `0..count` of `table` out of the spare slots, up to the first missing.
    fn take_table(&mut self, table: u32, count: u32) -> Vec<Backend> {
        let mut backends = Vec::with_capacity(count as usize);
        for slot in 0..count {
            match self.spare_slots.remove(&BackendSlotKey { table, slot }) {
                Some(b) => backends.push(b),
                None => break,
            }
        }
        backends
    }

    fn spare_table(&mut self, table: u32, backends: Vec<Backend>) {
        for (slot, b) in backends.into_iter().enumerate() {
            self.spare_slots.insert(
                BackendSlotKey {
                    table,
                    slot: slot as u32,
                },
                b,
            );
        }
    }

    /// Mirrors one successful map write, so the state keeps equal to the maps.
    ///
    /// A live service's `backends` are the slots `0..backend_count` of its table that are
    /// present, up to the first missing one (so a hole shows as `backends.len() <
    /// backend_count`, which the planner repairs); every other slot is a spare slot.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend { key, value } => {
                let Some(k) = self.live_table(key.table) else {
                    self.spare_slots.insert(*key, *value);
                    return;
                };
                let svc = self.services.get_mut(&k).expect("indexed");
                let slot = key.slot as usize;
                if slot < svc.backends.len() {
                    let old = std::mem::replace(&mut svc.backends[slot], *value);
                    count_refs(&mut self.filter_refs, k.proto, &[old], false);
                    count_refs(&mut self.filter_refs, k.proto, &[*value], true);
                } else if slot == svc.backends.len() && slot < svc.value.backend_count as usize {
                    // Fills a hole: the slots after it may now join.
                    svc.backends.push(*value);
                    count_refs(&mut self.filter_refs, k.proto, &[*value], true);
                    let (table, have, count) = (
                        svc.value.table,
                        svc.backends.len() as u32,
                        svc.value.backend_count,
                    );
                    let mut more = Vec::new();
                    for slot in have..count {
                        match self.spare_slots.remove(&BackendSlotKey { table, slot }) {
                            Some(b) => more.push(b),
                            None => break,
                        }
                    }
                    count_refs(&mut self.filter_refs, k.proto, &more, true);
                    self.services
                        .get_mut(&k)
                        .expect("indexed")
                        .backends
                        .extend(more);
                } else {
                    self.spare_slots.insert(*key, *value);
                }
            }
            MapOp::DeleteBackend { key, .. } => {
                if self.spare_slots.remove(key).is_some() {
                    return;
                }
                if let Some(k) = self.live_table(key.table) {
                    let svc = self.services.get_mut(&k).expect("indexed");
                    let slot = key.slot as usize;
                    if slot < svc.backends.len() {
                        let gone = svc.backends.split_off(slot);
                        count_refs(&mut self.filter_refs, k.proto, &gone, false);
                        let after: Vec<Backend> = gone.into_iter().skip(1).collect();
                        for (i, b) in after.into_iter().enumerate() {
                            let key = BackendSlotKey {
                                table: key.table,
                                slot: key.slot + 1 + i as u32,
                            };
                            self.spare_slots.insert(key, b);
                        }
                    }
                }
            }
            MapOp::PutMeta { svc_id, meta } => match self.key_of_id(*svc_id) {
                Some(k) => self.services.get_mut(&k).expect("indexed").meta = *meta,
                None => {
                    self.spare_meta.insert(*svc_id, *meta);
                }
            },
            MapOp::DeleteMeta { svc_id } => {
                self.spare_meta.remove(svc_id);
                if let Some(k) = self.key_of_id(*svc_id) {
                    self.services.get_mut(&k).expect("indexed").meta = empty_meta();
                }
            }
            MapOp::PutService { key, value } => {
                self.ensure_indexed();
                let (meta, source_ranges) = match self.services.remove(key) {
                    Some(old) => {
                        self.by_id.remove(&old.value.svc_id);
                        count_refs(&mut self.filter_refs, key.proto, &old.backends, false);
                        self.spare_table(old.value.table, old.backends);
                        if old.value.svc_id == value.svc_id {
                            (old.meta, old.source_ranges)
                        } else {
                            if old.meta != empty_meta() {
                                self.spare_meta.insert(old.value.svc_id, old.meta);
                            }
                            if !old.source_ranges.is_empty() {
                                self.spare_ranges
                                    .insert(old.value.svc_id, old.source_ranges);
                            }
                            (
                                self.spare_meta
                                    .remove(&value.svc_id)
                                    .unwrap_or_else(empty_meta),
                                self.spare_ranges.remove(&value.svc_id).unwrap_or_default(),
                            )
                        }
                    }
                    None => (
                        self.spare_meta
                            .remove(&value.svc_id)
                            .unwrap_or_else(empty_meta),
                        self.spare_ranges.remove(&value.svc_id).unwrap_or_default(),
                    ),
                };
                let backends = self.take_table(value.table, value.backend_count);
                count_refs(&mut self.filter_refs, key.proto, &backends, true);
                self.services.insert(
                    *key,
                    ProgrammedService {
                        value: *value,
                        backends,
                        meta,
                        source_ranges,
                    },
                );
                self.by_id.insert(value.svc_id, *key);
                self.indexed = self.services.len();
            }
            MapOp::DeleteService { key } => {
                self.ensure_indexed();
                if let Some(old) = self.services.remove(key) {
                    count_refs(&mut self.filter_refs, key.proto, &old.backends, false);
                    if self.by_id.get(&old.value.svc_id) == Some(key) {
                        self.by_id.remove(&old.value.svc_id);
                    }
                    self.spare_table(old.value.table, old.backends);
                    if old.meta != empty_meta() {
                        self.spare_meta.insert(old.value.svc_id, old.meta);
                    }
                    if !old.source_ranges.is_empty() {
                        self.spare_ranges
                            .insert(old.value.svc_id, old.source_ranges);
                    }
                }
                self.indexed = self.services.len();
            }
            MapOp::PutSourceRange { svc_id, range } => match self.key_of_id(*svc_id) {
                Some(k) => {
                    let svc = self.services.get_mut(&k).expect("indexed");
                    svc.source_ranges.insert(*range);
                }
                None => {
                    self.spare_ranges.entry(*svc_id).or_default().insert(*range);
                }
            },
            MapOp::DeleteSourceRange { svc_id, range } => {
                if let Some(set) = self.spare_ranges.get_mut(svc_id) {
                    set.remove(range);
                    if set.is_empty() {
                        self.spare_ranges.remove(svc_id);
                    }
                }
                if let Some(k) = self.key_of_id(*svc_id) {
                    let svc = self.services.get_mut(&k).expect("indexed");
                    svc.source_ranges.remove(range);
                }
            }
            MapOp::PutNodeConfig { value } => self.node_config = Some(*value),
            MapOp::PutNodeConfig6 { value } => self.node_config6 = Some(*value),
            MapOp::SetReplyFilterWord { index, word } => {
                if self.reply_filter.is_empty() {
                    self.reply_filter = vec![0; reply_filter::WORDS as usize];
                }
                if let Some(w) = self.reply_filter.get_mut(*index as usize) {
                    *w = *word;
                }
            }
            // Conntrack is not mirrored; Maglev tables follow from the services (a live
            // table of a `maglev` service has one), so they are not mirrored either.
            MapOp::PurgeUdpConntrack { .. }
            | MapOp::ResetCounters { .. }
            | MapOp::PutMaglevTable { .. }
            | MapOp::DeleteMaglevTable { .. } => {}
        }
    }
}

/// Plans the writes that take the maps from `current` to `desired`.
///
/// Steps come in frontend order, additions and changes first, removals after; each is one
/// service port. Services that would not fit (`capacity`) are refused with a [`PlanError`]
/// and get no ops, so what serves for them stays; the others proceed. A refused service is
/// planned again next time (a later plan may find the room that removals freed).
pub fn plan(
    desired: &DesiredState,
    current: &MapState,
    capacity: Capacity,
) -> (Plan, Vec<PlanError>) {
    let mut scratch = current.clone();
    scratch.reindex();
    let mut planner = Planner::new(current, scratch, capacity);
    let mut plan = Plan::default();
    for svc in desired.services.values() {
        let scheduling = desired.scheduling_of(&svc.frontend);
        if let Some(step) = planner.upsert(svc, &scheduling) {
            plan.steps.push(step);
        }
    }
    let wanted: BTreeSet<SvcKey> = desired.services.keys().map(Frontend::key).collect();
    for key in current.services.keys().filter(|k| !wanted.contains(k)) {
        plan.steps.push(planner.remove(key));
    }

    let words = reply_filter::WORDS as usize;
    let mut old = current.reply_filter.clone();
    old.resize(words, 0);
    let new = filter_words(&planner.state);
    for (i, (&o, &n)) in old.iter().zip(&new).enumerate() {
        filter_ops(&mut plan, i, o, n);
    }
    (plan, planner.errors)
}

/// Plans only the services of `keys` (frontends that changed, or were refused before):
/// each is added, updated or removed to match `desired`, exactly as [`plan`] would, and
/// the reply-filter words their backends touch are set from the references of the whole
/// maps. Costs what those services cost, not what the maps hold; the other services are
/// assumed to match `desired` already (the periodic full [`plan`] repairs any that do not).
pub fn plan_changes(
    desired: &DesiredState,
    keys: &BTreeSet<SvcKey>,
    current: &MapState,
    capacity: Capacity,
) -> (Plan, Vec<PlanError>) {
    let scratch = current.subset(keys);
    let mut planner = Planner::new(current, scratch, capacity);
    let mut plan = Plan::default();
    let wanted = |key: &SvcKey| desired.services.get(&frontend_of(key)?);
    for key in keys {
        if let Some(svc) = wanted(key) {
            let scheduling = desired.scheduling_of(&svc.frontend);
            if let Some(step) = planner.upsert(svc, &scheduling) {
                plan.steps.push(step);
            }
        }
    }
    for key in keys {
        if wanted(key).is_none() && current.services.contains_key(key) {
            plan.steps.push(planner.remove(key));
        }
    }

    // The words of the backends these services had and will have.
    let mut words = BTreeSet::new();
    for key in keys {
        for state in [current, &planner.state] {
            for b in state
                .services
                .get(key)
                .into_iter()
                .flat_map(|s| &s.backends)
            {
                let bit = reply_bit(b.addr, b.port, key.proto);
                words.insert(reply_filter::word_and_mask(bit).0 as usize);
            }
        }
    }
    for i in words {
        let old = current.reply_filter.get(i).copied().unwrap_or(0);
        filter_ops(&mut plan, i, old, planner.state.wanted_word(i));
    }
    (plan, planner.errors)
}

/// The frontend of a service key.
fn frontend_of(key: &SvcKey) -> Option<Frontend> {
    Frontend::from_key(key)
}

/// Word `i` of the reply filter goes from `old` to `new`: bits gained are set before any
/// service is published (prologue), bits lost cleared after every step (epilogue).
fn filter_ops(plan: &mut Plan, i: usize, old: u64, new: u64) {
    let union = old | new;
    if union != old {
        plan.prologue.push(MapOp::SetReplyFilterWord {
            index: i as u32,
            word: union,
        });
    }
    if new != union {
        plan.epilogue.push(MapOp::SetReplyFilterWord {
            index: i as u32,
            word: new,
        });
    }
}

/// Keeps set, in the epilogue of `plan`, the reply-filter bits in `in_use` (backends that
/// still have open connections, from `KernelMaps::reply_bits_in_use`): a backend that
/// leaves a service with connections open keeps getting their replies reverse-NAT-ed, as
/// kube-proxy's conntrack does. The bits go on a later plan, once those connections are
/// closed. Returns how many epilogue words keep bits.
pub fn keep_reply_bits(plan: &mut Plan, current: &MapState, in_use: &[u64]) -> usize {
    let mut kept = 0;
    plan.epilogue.retain_mut(|op| {
        let MapOp::SetReplyFilterWord { index, word } = op else {
            return true;
        };
        let keep = in_use.get(*index as usize).copied().unwrap_or(0);
        // Only bits that are set now stay set: this never adds a bit.
        let now = current
            .reply_filter
            .get(*index as usize)
            .copied()
            .unwrap_or(0);
        let wanted = *word | (keep & now);
        if wanted != *word {
            kept += 1;
        }
        *word = wanted;
        wanted != now
    });
    kept
}

/// The reply-filter words of every live backend in `state`.
pub fn filter_words(state: &MapState) -> Vec<u64> {
    let mut words = vec![0u64; reply_filter::WORDS as usize];
    for (key, svc) in &state.services {
        for b in &svc.backends {
            let (word, mask) = reply_filter::word_and_mask(reply_bit(b.addr, b.port, key.proto));
            words[word as usize] |= mask;
        }
    }
    words
}

struct Planner<'a> {
    /// Ids in use in the maps, in order (the mirror's index, or built once).
    current_ids: std::borrow::Cow<'a, BTreeMap<u32, SvcKey>>,
    /// Ids taken by services planned so far.
    taken: BTreeSet<u32>,
    /// No id below this one is free.
    next_id: u32,
    /// `services4`/`services6`, `backend_slots4`/`backend_slots6` and
    /// `src_ranges4`/`src_ranges6` entries in the maps as planned so far.
    counts: FamilyCounts,
    /// Live Maglev tables of those services; counted when first needed.
    other_maglev: Option<usize>,
    current: &'a MapState,
    capacity: Capacity,
    /// The maps (or the planned services' part of them) as they will be after the steps
    /// planned so far.
    state: MapState,
    errors: Vec<PlanError>,
}

fn maglev_tables<'s>(services: impl Iterator<Item = &'s ProgrammedService>) -> usize {
    services
        .filter(|s| s.value.scheduler == SCHED_MAGLEV && !s.backends.is_empty())
        .count()
}

impl<'a> Planner<'a> {
    fn new(current: &'a MapState, state: MapState, capacity: Capacity) -> Self {
        let current_ids = if current.indexed() && current.by_id.len() == current.services.len() {
            std::borrow::Cow::Borrowed(&current.by_id)
        } else {
            std::borrow::Cow::Owned(
                current
                    .services
                    .iter()
                    .map(|(k, s)| (s.value.svc_id, *k))
                    .collect(),
            )
        };
        Planner {
            current_ids,
            taken: BTreeSet::new(),
            next_id: 1,
            counts: current.counts_by_family(),
            other_maglev: None,
            current,
            capacity,
            state,
            errors: Vec::new(),
        }
    }

    /// The lowest id not used in the maps nor by a planned service (ids of services this
    /// plan removes are not reused before the next plan).
    fn alloc_id(&mut self) -> Option<u32> {
        let mut id = self.next_id;
        let mut used = self.current_ids.range(id..).map(|(id, _)| *id).peekable();
        loop {
            while used.next_if(|u| *u < id).is_some() {}
            if used.peek() == Some(&id) || self.taken.contains(&id) {
                id = id.checked_add(1)?;
                continue;
            }
            break;
        }
        if id > MAX_SVC_ID {
            return None;
        }
        self.taken.insert(id);
        self.next_id = id + 1;
        Some(id)
    }

    fn release_id(&mut self, id: u32) {
        self.taken.remove(&id);
        self.next_id = self.next_id.min(id);
    }

    /// Deletes of the spare slots of `table` (from `from_slot` on) not already in `ops`.
    fn delete_spares(&self, ops: &mut Vec<MapOp>, table: u32, from_slot: u32) {
        let spares = self.state.spare_slots.range(table_range(table));
        for (key, family) in spares
            .map(|(k, b)| (*k, b.family()))
            .filter(|(k, _)| k.slot >= from_slot)
        {
            let op = MapOp::DeleteBackend { key, family };
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
    }

    /// The step that adds or updates one service, or `None` when it is unchanged (or
    /// refused).
    fn upsert(&mut self, svc: &DesiredService, scheduling: &Scheduling) -> Option<Step> {
        let key = svc.frontend.key();
        let backends: Vec<Backend> = svc
            .endpoints
            .iter()
            .map(|e| Backend {
                weight: scheduling.weight(e.addr),
                ..backend_from_endpoint(e)
            })
            .collect();
        let count = backends.len() as u32;
        let meta = meta_from_name(&svc.name);
        let scheduler = scheduling.scheduler.value();
        let maglev = scheduler == SCHED_MAGLEV;
        let value = |svc_id: u32, table: u32| SvcValue {
            svc_id,
            table,
            backend_count: count,
            scheduler,
            flags: svc.flags,
            _pad: 0,
            affinity_timeout_s: svc.affinity_timeout_s,
        };
        let ranges: BTreeSet<IpRange> = svc.source_ranges.iter().copied().collect();
        let put_backends = |ops: &mut Vec<MapOp>, table: u32| {
            for (slot, b) in backends.iter().enumerate() {
                ops.push(MapOp::PutBackend {
                    key: BackendSlotKey {
                        table,
                        slot: slot as u32,
                    },
                    value: *b,
                });
            }
            if maglev && !backends.is_empty() {
                ops.push(MapOp::PutMaglevTable {
                    table,
                    slots: maglev::table_for(&backends),
                });
            }
        };
        let mut ops = Vec::new();
        let new_id = match self.state.services.get(&key).cloned() {
            Some(cur) => {
                let id = cur.value.svc_id;
                let was_maglev = cur.value.scheduler == SCHED_MAGLEV && !cur.backends.is_empty();
                // A Maglev table is written with the backends, into the table being filled
                // (a service without backends has none: switching would not write one, and
                // every plan would switch again).
                let switch = cur.backends != backends
                    || cur.value.backend_count as usize != cur.backends.len()
                    || (maglev && !was_maglev && !backends.is_empty());
                if meta != cur.meta {
                    ops.push(MapOp::PutMeta { svc_id: id, meta });
                }
                // Ranges gained before the service may use them, lost after.
                for range in ranges.difference(&cur.source_ranges) {
                    ops.push(MapOp::PutSourceRange {
                        svc_id: id,
                        range: *range,
                    });
                }
                if switch {
                    let table = other_table(id, cur.value.table);
                    put_backends(&mut ops, table);
                    ops.push(MapOp::PutService {
                        key,
                        value: value(id, table),
                    });
                    for slot in 0..cur.backends.len() as u32 {
                        ops.push(MapOp::DeleteBackend {
                            key: BackendSlotKey {
                                table: cur.value.table,
                                slot,
                            },
                            family: key.family(),
                        });
                    }
                    if was_maglev {
                        ops.push(MapOp::DeleteMaglevTable {
                            table: cur.value.table,
                        });
                    }
                    self.delete_spares(&mut ops, cur.value.table, 0);
                    self.delete_spares(&mut ops, table, count);
                    if key.proto == PROTO_UDP {
                        let gone: Vec<Backend> = cur
                            .backends
                            .iter()
                            .filter(|o| {
                                !backends
                                    .iter()
                                    .any(|n| n.addr == o.addr && n.port == o.port)
                            })
                            .copied()
                            .collect();
                        if !gone.is_empty() {
                            ops.push(MapOp::PurgeUdpConntrack {
                                frontend: key,
                                backends: gone,
                            });
                        }
                    }
                } else if value(id, cur.value.table) != cur.value {
                    ops.push(MapOp::PutService {
                        key,
                        value: value(id, cur.value.table),
                    });
                    if was_maglev && !maglev {
                        ops.push(MapOp::DeleteMaglevTable {
                            table: cur.value.table,
                        });
                    }
                }
                for range in cur.source_ranges.difference(&ranges) {
                    ops.push(MapOp::DeleteSourceRange {
                        svc_id: id,
                        range: *range,
                    });
                }
                None
            }
            None => {
                let Some(id) = self.alloc_id() else {
                    self.errors.push(PlanError::NoServiceId {
                        name: svc.name.clone(),
                        frontend: svc.frontend,
                    });
                    return None;
                };
                let [table, other] = tables_of(id);
                ops.push(MapOp::ResetCounters { svc_id: id });
                ops.push(MapOp::PutMeta { svc_id: id, meta });
                for range in &ranges {
                    ops.push(MapOp::PutSourceRange {
                        svc_id: id,
                        range: *range,
                    });
                }
                put_backends(&mut ops, table);
                ops.push(MapOp::PutService {
                    key,
                    value: value(id, table),
                });
                // Left by an agent that stopped halfway: clear them now the id is taken.
                self.delete_spares(&mut ops, table, count);
                self.delete_spares(&mut ops, other, 0);
                for range in self.state.spare_ranges.get(&id).into_iter().flatten() {
                    if !ranges.contains(range) {
                        ops.push(MapOp::DeleteSourceRange {
                            svc_id: id,
                            range: *range,
                        });
                    }
                }
                Some(id)
            }
        };
        if ops.is_empty() {
            return None;
        }
        if let Err(e) = self.fits(svc, new_id.is_some(), &ops) {
            if let Some(id) = new_id {
                self.release_id(id);
            }
            self.errors.push(e);
            return None;
        }
        Some(Step {
            name: svc.name.clone(),
            ops,
        })
    }

    /// Checks that a step fits the maps and, if so, mirrors it into the planned state. All
    /// puts of a step precede its deletes, so its peak use is the current use plus its new
    /// entries.
    fn fits(
        &mut self,
        svc: &DesiredService,
        new_service: bool,
        ops: &[MapOp],
    ) -> Result<(), PlanError> {
        let family = svc.frontend.family();
        let f = family.index();
        let [services_map, slots_map, ranges_map] = match family {
            Family::V4 => [maps::SERVICES4, maps::BACKEND_SLOTS4, maps::SRC_RANGES4],
            Family::V6 => [maps::SERVICES6, maps::BACKEND_SLOTS6, maps::SRC_RANGES6],
        };
        if new_service {
            // Its family's map, and the svc_ids both families share (`svc_meta`,
            // `svc_counters`, `sched_rr` hold `capacity.services` ids over both).
            let total = self.counts.services[0] + self.counts.services[1];
            let full = if self.counts.services[f] >= self.capacity.services as usize {
                Some(services_map)
            } else if total >= self.capacity.services as usize {
                Some(maps::SVC_META)
            } else {
                None
            };
            if let Some(map) = full {
                return Err(PlanError::Full {
                    name: svc.name.clone(),
                    frontend: svc.frontend,
                    map,
                    size: self.capacity.services,
                });
            }
        }
        // Slots and ranges by the family of each op (a reused id may clear leftovers of
        // the other family).
        let (mut added, mut deleted) = ([0usize; 2], [0usize; 2]);
        for op in ops {
            match op {
                MapOp::PutBackend { key, value } if !self.state.slot_present(key) => {
                    added[value.family().index()] += 1
                }
                MapOp::DeleteBackend { key, family } if self.state.slot_present(key) => {
                    deleted[family.index()] += 1
                }
                _ => {}
            }
        }
        let new_tables = ops
            .iter()
            .filter(|op| matches!(op, MapOp::PutMaglevTable { .. }))
            .count();
        let other_maglev = |p: &mut Self| {
            *p.other_maglev.get_or_insert_with(|| {
                let (current, state) = (p.current, &p.state);
                maglev_tables(
                    current
                        .services
                        .iter()
                        .filter(|(k, _)| !state.services.contains_key(k))
                        .map(|(_, s)| s),
                )
            })
        };
        if new_tables > 0
            && other_maglev(self) + maglev_tables(self.state.services.values()) + new_tables
                > maps::MAGLEV_TABLES as usize
        {
            return Err(PlanError::Full {
                name: svc.name.clone(),
                frontend: svc.frontend,
                map: maps::MAGLEV,
                size: maps::MAGLEV_TABLES * proxy_common::service::MAGLEV_SIZE,
            });
        }
        if self.counts.slots[f] + added[f] > self.capacity.backend_slots as usize {
            return Err(PlanError::Full {
                name: svc.name.clone(),
                frontend: svc.frontend,
                map: slots_map,
                size: self.capacity.backend_slots,
            });
        }
        let (mut ranges_added, mut ranges_deleted) = ([0usize; 2], [0usize; 2]);
        for op in ops {
            match op {
                MapOp::PutSourceRange { svc_id, range }
                    if !self.state.range_present(*svc_id, range) =>
                {
                    ranges_added[range.family().index()] += 1
                }
                MapOp::DeleteSourceRange { svc_id, range }
                    if self.state.range_present(*svc_id, range) =>
                {
                    ranges_deleted[range.family().index()] += 1
                }
                _ => {}
            }
        }
        if self.counts.ranges[f] + ranges_added[f] > maps::DEFAULT_SOURCE_RANGES as usize {
            return Err(PlanError::Full {
                name: svc.name.clone(),
                frontend: svc.frontend,
                map: ranges_map,
                size: maps::DEFAULT_SOURCE_RANGES,
            });
        }
        for i in 0..2 {
            self.counts.ranges[i] = self.counts.ranges[i] + ranges_added[i] - ranges_deleted[i];
            self.counts.slots[i] = self.counts.slots[i] + added[i] - deleted[i];
        }
        if new_service {
            self.counts.services[f] += 1;
        }
        for op in ops {
            self.state.apply(op);
        }
        Ok(())
    }

    /// The step that removes one service: unpublish, then free its slots and metadata.
    fn remove(&mut self, key: &SvcKey) -> Step {
        let cur = self.state.services[key].clone();
        let id = cur.value.svc_id;
        let mut ops = vec![MapOp::DeleteService { key: *key }];
        if cur.value.scheduler == SCHED_MAGLEV && !cur.backends.is_empty() {
            ops.push(MapOp::DeleteMaglevTable {
                table: cur.value.table,
            });
        }
        for slot in 0..cur.backends.len() as u32 {
            ops.push(MapOp::DeleteBackend {
                key: BackendSlotKey {
                    table: cur.value.table,
                    slot,
                },
                family: key.family(),
            });
        }
        for table in tables_of(id) {
            self.delete_spares(&mut ops, table, 0);
        }
        ops.push(MapOp::DeleteMeta { svc_id: id });
        let spare = self.state.spare_ranges.get(&id).into_iter().flatten();
        for range in cur.source_ranges.iter().chain(spare) {
            ops.push(MapOp::DeleteSourceRange {
                svc_id: id,
                range: *range,
            });
        }
        if key.proto == PROTO_UDP && !cur.backends.is_empty() {
            ops.push(MapOp::PurgeUdpConntrack {
                frontend: *key,
                backends: cur.backends.clone(),
            });
        }
        self.counts.services[key.family().index()] -= 1;
        for op in &ops {
            if let MapOp::DeleteBackend { key, family } = op
                && self.state.slot_present(key)
            {
                self.counts.slots[family.index()] -= 1;
            }
            if let MapOp::DeleteSourceRange { svc_id, range } = op
                && self.state.range_present(*svc_id, range)
            {
                self.counts.ranges[range.family().index()] -= 1;
            }
            self.state.apply(op);
        }
        Step {
            name: name_of(key, &cur.meta),
            ops,
        }
    }
}

/// The name of a programmed service, from its `svc_meta` (or its frontend, if it has none).
fn name_of(key: &SvcKey, meta: &SvcMeta) -> ServicePortName {
    let (namespace, name, port_name) = meta_to_name(meta);
    let protocol = Protocol::from_number(key.proto).unwrap_or(Protocol::Tcp);
    if name.is_empty() {
        return ServicePortName {
            namespace: "(unnamed)".into(),
            name: host_port(key.addr, key.port),
            port_name: String::new(),
            protocol,
        };
    }
    ServicePortName {
        namespace,
        name,
        port_name,
        protocol,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::{
        PROTO_TCP,
        service::{
            SCOPE_CLUSTER_IP, SCOPE_EXTERNAL, SVC_F_DROP_EMPTY, SVC_F_LOAD_BALANCER, SVC_F_SNAT,
            SVC_F_SOURCE_RANGES,
        },
    };

    use super::*;
    use crate::model::FrontendKind;

    const BIG: Capacity = Capacity {
        services: 65_536,
        backend_slots: 262_144,
    };

    /// `fd00:<group>::<last>`.
    fn v6(group: u16, last: u16) -> std::net::IpAddr {
        std::net::Ipv6Addr::new(0xfd00, group, 0, 0, 0, 0, 0, last).into()
    }

    /// An IPv6 ClusterIP frontend `[fd00:96::<last>]:port`.
    fn frontend6(last: u8, port: u16, protocol: Protocol) -> Frontend {
        Frontend::cluster(v6(0x96, u16::from(last)), port, protocol)
    }

    /// IPv6 endpoints `[fd00:244::<last>]:8080`, sorted.
    fn eps6(lasts: &[u8]) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = lasts
            .iter()
            .map(|&l| Endpoint {
                addr: v6(0x244, u16::from(l)),
                port: 8080,
                terminating: false,
                local: false,
            })
            .collect();
        v.sort();
        v
    }

    fn frontend(last: u8, port: u16, protocol: Protocol) -> Frontend {
        Frontend::cluster(Ipv4Addr::new(10, 96, 0, last), port, protocol)
    }

    fn eps(lasts: &[u8]) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = lasts
            .iter()
            .map(|&l| Endpoint {
                addr: Ipv4Addr::new(10, 244, 0, l).into(),
                port: 8080,
                terminating: false,
                local: false,
            })
            .collect();
        v.sort();
        v
    }

    fn service(name: &str, f: Frontend, endpoints: Vec<Endpoint>) -> DesiredService {
        DesiredService {
            frontend: f,
            name: ServicePortName {
                namespace: "default".into(),
                name: name.into(),
                port_name: "http".into(),
                protocol: f.protocol,
            },
            endpoints,
            affinity_timeout_s: 0,
            kind: Default::default(),
            flags: 0,
            source_ranges: Vec::new(),
        }
    }

    fn desired(services: impl IntoIterator<Item = DesiredService>) -> DesiredState {
        DesiredState {
            services: services.into_iter().map(|s| (s.frontend, s)).collect(),
            ..Default::default()
        }
    }

    fn apply_plan(state: &mut MapState, plan: &Plan) {
        for op in plan
            .prologue
            .iter()
            .chain(plan.steps.iter().flat_map(|s| &s.ops))
            .chain(&plan.epilogue)
        {
            state.apply(op);
        }
    }

    /// Plans, checks nothing was refused, applies; returns the plan.
    fn step(state: &mut MapState, d: &DesiredState) -> Plan {
        let (plan, errors) = plan(d, state, BIG);
        assert!(errors.is_empty(), "{errors:?}");
        apply_plan(state, &plan);
        plan
    }

    fn slot(table: u32, slot: u32) -> BackendSlotKey {
        BackendSlotKey { table, slot }
    }

    fn put_backend(table: u32, s: u32, e: &Endpoint) -> MapOp {
        MapOp::PutBackend {
            key: slot(table, s),
            value: backend_from_endpoint(e),
        }
    }

    fn svc_value(svc_id: u32, table: u32, count: u32) -> SvcValue {
        SvcValue {
            svc_id,
            table,
            backend_count: count,
            scheduler: proxy_common::service::SCHED_RANDOM,
            flags: 0,
            _pad: 0,
            affinity_timeout_s: 0,
        }
    }

    fn scheduling(scheduler: crate::model::Scheduler) -> Scheduling {
        Scheduling {
            scheduler,
            weights: BTreeMap::new(),
        }
    }

    #[test]
    fn the_scheduler_and_weights_reach_the_service_value_and_slots() {
        use crate::model::Scheduler;
        let f = frontend(10, 80, Protocol::Tcp);
        let mut d = desired([service("web", f, eps(&[1, 2]))]);
        let mut sched = scheduling(Scheduler::LC);
        sched.weights.insert(Ipv4Addr::new(10, 244, 0, 2).into(), 5);
        d.scheduling.insert(f, sched);
        let mut state = MapState::default();
        step(&mut state, &d);
        let svc = &state.services[&f.key()];
        assert_eq!(svc.value.scheduler, proxy_common::service::SCHED_LC);
        assert_eq!(
            svc.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [1, 5]
        );
        // Only the scheduler changes: one put of the value, same table.
        d.scheduling.get_mut(&f).unwrap().scheduler = Scheduler::RR;
        let (p, errors) = plan(&d, &state, BIG);
        assert!(errors.is_empty());
        assert_eq!(p.steps.len(), 1);
        assert!(matches!(
            p.steps[0].ops[..],
            [MapOp::PutService { value, .. }] if value.scheduler == proxy_common::service::SCHED_RR && value.table == svc.value.table
        ));
    }

    #[test]
    fn a_maglev_table_is_written_before_its_table_is_published_and_deleted_after() {
        use crate::model::Scheduler;
        let f = frontend(11, 80, Protocol::Tcp);
        let mut d = desired([service("mg", f, eps(&[1, 2, 3]))]);
        d.scheduling.insert(f, scheduling(Scheduler::MAGLEV));
        let mut state = MapState::default();
        let p = step(&mut state, &d);
        let ops = &p.steps[0].ops;
        let put = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutMaglevTable { table: 2, slots } if slots.len() == proxy_common::service::MAGLEV_SIZE as usize && slots.iter().all(|s| *s < 3)))
            .expect("maglev table of table 2");
        let publish = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutService { .. }))
            .unwrap();
        assert!(put < publish);

        // A backend goes: a new table in the other buffer, then the old one deleted.
        let mut d2 = desired([service("mg", f, eps(&[1, 3]))]);
        d2.scheduling = d.scheduling.clone();
        let p = step(&mut state, &d2);
        let ops = &p.steps[0].ops;
        let put = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutMaglevTable { table: 3, .. }))
            .unwrap();
        let publish = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutService { .. }))
            .unwrap();
        let delete = ops
            .iter()
            .position(|o| matches!(o, MapOp::DeleteMaglevTable { table: 2 }))
            .unwrap();
        assert!(put < publish && publish < delete);

        // Switching to random keeps the backends and drops the table.
        let d3 = desired([service("mg", f, eps(&[1, 3]))]);
        let p = step(&mut state, &d3);
        assert!(matches!(
            p.steps[0].ops[..],
            [
                MapOp::PutService { .. },
                MapOp::DeleteMaglevTable { table: 3 }
            ]
        ));
        // And back to maglev: a fresh table through a switch.
        let p = step(&mut state, &d2);
        assert!(
            p.steps[0]
                .ops
                .iter()
                .any(|o| matches!(o, MapOp::PutMaglevTable { table: 2, .. }))
        );
        // Removal deletes it.
        let p = step(&mut state, &desired([]));
        assert!(
            p.steps[0]
                .ops
                .contains(&MapOp::DeleteMaglevTable { table: 2 })
        );
    }

    /// Service ops of a plan, without the reply filter.
    fn step_ops(plan: &Plan) -> Vec<(String, Vec<MapOp>)> {
        plan.steps
            .iter()
            .map(|s| (s.name.to_string(), s.ops.clone()))
            .collect()
    }

    #[test]
    fn a_new_service_is_counters_then_meta_then_backends_then_published() {
        let f = frontend(10, 80, Protocol::Tcp);
        let e = eps(&[1, 2]);
        let d = desired([service("myapp", f, e.clone())]);
        let (plan, errors) = plan(&d, &MapState::default(), BIG);
        assert!(errors.is_empty());
        let name = ServicePortName {
            namespace: "default".into(),
            name: "myapp".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            plan.steps,
            [Step {
                name: name.clone(),
                ops: vec![
                    // The id may have served another service: its counters start at 0.
                    MapOp::ResetCounters { svc_id: 1 },
                    MapOp::PutMeta {
                        svc_id: 1,
                        meta: meta_from_name(&name)
                    },
                    put_backend(2, 0, &e[0]),
                    put_backend(2, 1, &e[1]),
                    MapOp::PutService {
                        key: f.key(),
                        value: svc_value(1, 2, 2)
                    },
                ],
            }]
        );
        assert!(plan.epilogue.is_empty());
        assert!(!plan.prologue.is_empty());
    }

    #[test]
    fn an_unchanged_state_plans_nothing() {
        let mut state = MapState::default();
        let d = desired([
            service("a", frontend(10, 80, Protocol::Tcp), eps(&[1, 2, 3])),
            service("b", frontend(11, 53, Protocol::Udp), eps(&[])),
        ]);
        step(&mut state, &d);
        let (again, errors) = plan(&d, &state, BIG);
        assert!(errors.is_empty());
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(again.op_count(), 0);
    }

    #[test]
    fn a_service_without_endpoints_is_programmed_with_no_backends() {
        let mut state = MapState::default();
        let f = frontend(10, 80, Protocol::Tcp);
        let plan = step(&mut state, &desired([service("a", f, vec![])]));
        assert_eq!(plan.steps[0].ops.len(), 3); // ResetCounters, PutMeta, PutService
        assert_eq!(state.services[&f.key()].value.backend_count, 0);
        assert!(plan.prologue.is_empty() && plan.epilogue.is_empty());
    }

    #[test]
    fn a_backend_change_fills_the_other_table_then_switches_then_frees_the_old() {
        let f = frontend(10, 80, Protocol::Tcp);
        let mut state = MapState::default();
        step(&mut state, &desired([service("a", f, eps(&[1, 2]))]));

        // Added: table 2 -> 3.
        let e = eps(&[1, 2, 3]);
        let plan = step(&mut state, &desired([service("a", f, e.clone())]));
        let expected = vec![
            put_backend(3, 0, &e[0]),
            put_backend(3, 1, &e[1]),
            put_backend(3, 2, &e[2]),
            MapOp::PutService {
                key: f.key(),
                value: svc_value(1, 3, 3),
            },
            MapOp::DeleteBackend {
                key: slot(2, 0),
                family: Family::V4,
            },
            MapOp::DeleteBackend {
                key: slot(2, 1),
                family: Family::V4,
            },
        ];
        assert_eq!(
            step_ops(&plan),
            [("default/a:http/TCP".to_string(), expected)]
        );
        assert_eq!(state.services[&f.key()].value.table, 3);
        assert!(state.spare_slots.is_empty());

        // Removed: table 3 -> 2. TCP: no conntrack purge.
        let e = eps(&[3]);
        let plan = step(&mut state, &desired([service("a", f, e.clone())]));
        let expected = vec![
            put_backend(2, 0, &e[0]),
            MapOp::PutService {
                key: f.key(),
                value: svc_value(1, 2, 1),
            },
            MapOp::DeleteBackend {
                key: slot(3, 0),
                family: Family::V4,
            },
            MapOp::DeleteBackend {
                key: slot(3, 1),
                family: Family::V4,
            },
            MapOp::DeleteBackend {
                key: slot(3, 2),
                family: Family::V4,
            },
        ];
        assert_eq!(plan.steps[0].ops, expected);
        assert_eq!(
            state.services[&f.key()].backends,
            [backend_from_endpoint(&e[0])]
        );
    }

    #[test]
    fn a_terminating_flag_change_is_a_backend_change() {
        let f = frontend(10, 80, Protocol::Tcp);
        let mut state = MapState::default();
        step(&mut state, &desired([service("a", f, eps(&[1]))]));
        let mut e = eps(&[1]);
        e[0].terminating = true;
        let plan = step(&mut state, &desired([service("a", f, e)]));
        assert!(
            matches!(plan.steps[0].ops[0], MapOp::PutBackend { value, .. } if value.flags == BACKEND_TERMINATING)
        );
        // Same address: nothing to purge, and the filter bit stays.
        assert!(plan.prologue.is_empty() && plan.epilogue.is_empty());
    }

    #[test]
    fn udp_backends_that_go_have_their_conntrack_purged_after_the_switch() {
        let f = frontend(53, 53, Protocol::Udp);
        let mut state = MapState::default();
        step(&mut state, &desired([service("dns", f, eps(&[1, 2, 3]))]));
        let plan = step(&mut state, &desired([service("dns", f, eps(&[2, 4]))]));
        let ops = &plan.steps[0].ops;
        let gone: Vec<Backend> = eps(&[1, 3]).iter().map(backend_from_endpoint).collect();
        assert_eq!(
            ops.last(),
            Some(&MapOp::PurgeUdpConntrack {
                frontend: f.key(),
                backends: gone
            })
        );
        let publish = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutService { .. }));
        assert!(publish < Some(ops.len() - 1));

        // Only additions: nothing to purge.
        let plan = step(&mut state, &desired([service("dns", f, eps(&[2, 4, 5]))]));
        assert!(
            !plan.steps[0]
                .ops
                .iter()
                .any(|o| matches!(o, MapOp::PurgeUdpConntrack { .. }))
        );
    }

    #[test]
    fn a_removed_service_is_unpublished_then_freed() {
        let tcp = frontend(10, 80, Protocol::Tcp);
        let udp = frontend(11, 53, Protocol::Udp);
        let mut state = MapState::default();
        step(
            &mut state,
            &desired([
                service("a", tcp, eps(&[1, 2])),
                service("b", udp, eps(&[3])),
            ]),
        );
        let plan = step(&mut state, &desired([]));
        let b3: Vec<Backend> = eps(&[3]).iter().map(backend_from_endpoint).collect();
        assert_eq!(
            step_ops(&plan),
            [
                (
                    "default/a:http/TCP".to_string(),
                    vec![
                        MapOp::DeleteService { key: tcp.key() },
                        MapOp::DeleteBackend {
                            key: slot(2, 0),
                            family: Family::V4,
                        },
                        MapOp::DeleteBackend {
                            key: slot(2, 1),
                            family: Family::V4,
                        },
                        MapOp::DeleteMeta { svc_id: 1 },
                    ]
                ),
                (
                    "default/b:http/UDP".to_string(),
                    vec![
                        MapOp::DeleteService { key: udp.key() },
                        MapOp::DeleteBackend {
                            key: slot(4, 0),
                            family: Family::V4,
                        },
                        MapOp::DeleteMeta { svc_id: 2 },
                        MapOp::PurgeUdpConntrack {
                            frontend: udp.key(),
                            backends: b3
                        },
                    ]
                ),
            ]
        );
        assert!(plan.prologue.is_empty());
        assert!(!plan.epilogue.is_empty());
        assert_eq!(
            state,
            MapState {
                reply_filter: vec![0; reply_filter::WORDS as usize],
                ..MapState::default()
            }
        );
    }

    #[test]
    fn additions_and_changes_come_first_in_frontend_order_then_removals() {
        let mut state = MapState::default();
        step(
            &mut state,
            &desired([
                service("gone", frontend(1, 80, Protocol::Tcp), eps(&[1])),
                service("changed", frontend(5, 80, Protocol::Tcp), eps(&[1])),
            ]),
        );
        let (plan, _) = plan(
            &desired([
                service("changed", frontend(5, 80, Protocol::Tcp), eps(&[2])),
                service("new-udp", frontend(3, 80, Protocol::Udp), eps(&[1])),
                service("new-tcp", frontend(3, 80, Protocol::Tcp), eps(&[1])),
            ]),
            &state,
            BIG,
        );
        let names: Vec<String> = plan.steps.iter().map(|s| s.name.name.clone()).collect();
        assert_eq!(names, ["new-tcp", "new-udp", "changed", "gone"]);
    }

    #[test]
    fn meta_only_and_value_only_changes_are_single_puts() {
        let f = frontend(10, 80, Protocol::Tcp);
        let mut state = MapState::default();
        step(&mut state, &desired([service("a", f, eps(&[1]))]));

        let mut renamed = service("a", f, eps(&[1]));
        renamed.name.port_name = "web".into();
        let plan = step(&mut state, &desired([renamed.clone()]));
        assert_eq!(
            plan.steps[0].ops,
            [MapOp::PutMeta {
                svc_id: 1,
                meta: meta_from_name(&renamed.name)
            }]
        );
        assert_eq!(plan.steps[0].name.port_name, "web");

        let mut sticky = renamed;
        sticky.affinity_timeout_s = 10_800;
        let plan = step(&mut state, &desired([sticky]));
        assert_eq!(
            plan.steps[0].ops,
            [MapOp::PutService {
                key: f.key(),
                value: SvcValue {
                    affinity_timeout_s: 10_800,
                    ..svc_value(1, 2, 1)
                }
            }]
        );
        assert!(plan.prologue.is_empty() && plan.epilogue.is_empty());
    }

    #[test]
    fn ids_are_kept_and_new_ones_take_the_lowest_free() {
        let (a, b, c, d) = (
            frontend(1, 80, Protocol::Tcp),
            frontend(2, 80, Protocol::Tcp),
            frontend(3, 80, Protocol::Tcp),
            frontend(4, 80, Protocol::Tcp),
        );
        let mut state = MapState::default();
        step(
            &mut state,
            &desired([
                service("a", a, eps(&[1])),
                service("b", b, eps(&[1])),
                service("c", c, eps(&[1])),
            ]),
        );
        let id = |state: &MapState, f: Frontend| state.services[&f.key()].value.svc_id;
        assert_eq!([id(&state, a), id(&state, b), id(&state, c)], [1, 2, 3]);

        // b goes and d comes in the same plan: b's id is still in use while d is added.
        step(
            &mut state,
            &desired([
                service("a", a, eps(&[1, 2])),
                service("c", c, eps(&[1])),
                service("d", d, eps(&[1])),
            ]),
        );
        assert_eq!([id(&state, a), id(&state, c), id(&state, d)], [1, 3, 4]);

        // Next time, b's id is free again.
        step(
            &mut state,
            &desired([
                service("a", a, eps(&[1, 2])),
                service("b", b, eps(&[1])),
                service("c", c, eps(&[1])),
                service("d", d, eps(&[1])),
            ]),
        );
        assert_eq!(id(&state, b), 2);
    }

    #[test]
    fn services_that_do_not_fit_are_refused_and_the_others_proceed() {
        let (a, b, c) = (
            frontend(1, 80, Protocol::Tcp),
            frontend(2, 80, Protocol::Tcp),
            frontend(3, 80, Protocol::Tcp),
        );
        let mut state = MapState::default();
        step(&mut state, &desired([service("a", a, eps(&[1, 2]))]));

        // services4 holds 2: b fits, c does not; a's change still goes through.
        let small = Capacity {
            services: 2,
            backend_slots: 100,
        };
        let d = desired([
            service("a", a, eps(&[1, 2, 3])),
            service("b", b, eps(&[1])),
            service("foo", c, eps(&[1])),
        ]);
        let (p, errors) = plan(&d, &state, small);
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/foo:http/TCP: services4 is full (2 entries)"]
        );
        let names: Vec<&str> = p.steps.iter().map(|s| s.name.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        apply_plan(&mut state, &p);
        assert!(!state.services.contains_key(&c.key()));
        assert!(state.slot_count() <= 100);

        // Backend slots: a change needs old + new tables at once. 4 slots used (a: 3, b: 1);
        // growing a to 4 needs 4 + 4 = 8 during the switch.
        let tight = Capacity {
            services: 10,
            backend_slots: 7,
        };
        let d = desired([
            service("a", a, eps(&[1, 2, 3, 4])),
            service("b", b, eps(&[1, 2])),
        ]);
        let (p, errors) = plan(&d, &state, tight);
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/a:http/TCP: backend_slots4 is full (7 entries)"]
        );
        // b: 4 + 2 = 6 fits. a keeps what it had.
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].name.name, "b");
        apply_plan(&mut state, &p);
        assert_eq!(state.services[&a.key()].backends.len(), 3);
        // A refused service is planned again next time.
        let (p, _) = plan(&d, &state, BIG);
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].name.name, "a");
    }

    #[test]
    fn a_refused_new_service_frees_its_id() {
        let mut state = MapState::default();
        step(
            &mut state,
            &desired([service("a", frontend(1, 80, Protocol::Tcp), eps(&[1]))]),
        );
        let cap = Capacity {
            services: 10,
            backend_slots: 3,
        };
        let d = desired([
            service("a", frontend(1, 80, Protocol::Tcp), eps(&[1])),
            service("big", frontend(2, 80, Protocol::Tcp), eps(&[1, 2, 3])),
            service("small", frontend(3, 80, Protocol::Tcp), eps(&[1])),
        ]);
        let (p, errors) = plan(&d, &state, cap);
        assert_eq!(errors.len(), 1);
        assert_eq!(p.steps.len(), 1);
        assert!(matches!(
            p.steps[0].ops[0..2],
            [
                MapOp::ResetCounters { svc_id: 2 },
                MapOp::PutMeta { svc_id: 2, .. }
            ]
        ));
    }

    fn words_of(backends: &[(Endpoint, u8)]) -> Vec<u64> {
        let mut w = vec![0u64; reply_filter::WORDS as usize];
        for (e, proto) in backends {
            let (i, m) = reply_filter::word_and_mask(reply_bit(e.addr, e.port, *proto));
            w[i as usize] |= m;
        }
        w
    }

    #[test]
    fn reply_filter_gains_bits_before_the_steps_and_loses_them_after() {
        let f = frontend(10, 80, Protocol::Tcp);
        let mut state = MapState::default();
        let first = step(&mut state, &desired([service("a", f, eps(&[1, 2]))]));
        let old = words_of(
            &eps(&[1, 2])
                .into_iter()
                .map(|e| (e, PROTO_TCP))
                .collect::<Vec<_>>(),
        );
        let expected: Vec<MapOp> = old
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0)
            .map(|(i, &w)| MapOp::SetReplyFilterWord {
                index: i as u32,
                word: w,
            })
            .collect();
        assert_eq!(first.prologue, expected);
        assert!(first.epilogue.is_empty());
        assert_eq!(state.reply_filter, old);

        let (p, _) = plan(&desired([service("a", f, eps(&[2, 3]))]), &state, BIG);
        let new = words_of(
            &eps(&[2, 3])
                .into_iter()
                .map(|e| (e, PROTO_TCP))
                .collect::<Vec<_>>(),
        );
        for (i, (&o, &n)) in old.iter().zip(&new).enumerate() {
            let set = |ops: &[MapOp]| {
                ops.iter().find_map(|op| match op {
                    MapOp::SetReplyFilterWord { index, word } if *index == i as u32 => Some(*word),
                    _ => None,
                })
            };
            assert_eq!(
                set(&p.prologue),
                (o | n != o).then_some(o | n),
                "prologue word {i}"
            );
            assert_eq!(
                set(&p.epilogue),
                (n != o | n).then_some(n),
                "epilogue word {i}"
            );
        }
        apply_plan(&mut state, &p);
        assert_eq!(state.reply_filter, new);
    }

    #[test]
    fn a_leaving_backend_with_open_connections_keeps_its_reply_bit() {
        let f = frontend(10, 80, Protocol::Tcp);
        let mut state = MapState::default();
        step(&mut state, &desired([service("a", f, eps(&[1, 2, 3]))]));
        let with = |ids: &[u8]| {
            words_of(
                &eps(ids)
                    .into_iter()
                    .map(|e| (e, PROTO_TCP))
                    .collect::<Vec<_>>(),
            )
        };
        // Backends 1 and 2 leave; 1 still has a connection open.
        let in_use = with(&[1]);
        let (mut p, _) = plan(&desired([service("a", f, eps(&[3]))]), &state, BIG);
        keep_reply_bits(&mut p, &state, &in_use);
        apply_plan(&mut state, &p);
        assert_eq!(
            state.reply_filter,
            with(&[1, 3]),
            "the bits of 1 and 3 only"
        );
        assert_eq!(state.services[&f.key()].backends.len(), 1);

        // Once it closed, the next plan clears the bit.
        let (mut p, _) = plan(&desired([service("a", f, eps(&[3]))]), &state, BIG);
        keep_reply_bits(&mut p, &state, &with(&[]));
        apply_plan(&mut state, &p);
        assert_eq!(state.reply_filter, with(&[3]));

        // A bit in use that was never set is not added.
        let (mut p, _) = plan(&desired([service("a", f, eps(&[3]))]), &state, BIG);
        keep_reply_bits(&mut p, &state, &with(&[7]));
        apply_plan(&mut state, &p);
        assert_eq!(state.reply_filter, with(&[3]));
    }

    #[test]
    fn meta_names_are_truncated_and_read_back() {
        let name = ServicePortName {
            namespace: "kube-system".into(),
            name: "a".repeat(70),
            port_name: "metrics-port-long".into(),
            protocol: Protocol::Tcp,
        };
        let meta = meta_from_name(&name);
        assert_eq!(meta.name[NAME_LEN - 1], 0);
        let (ns, n, port) = meta_to_name(&meta);
        assert_eq!(ns, "kube-system");
        assert_eq!(n, "a".repeat(NAME_LEN - 1));
        assert_eq!(port, "metrics-port-lo");
        assert_eq!(
            meta_to_name(&empty_meta()),
            (String::new(), String::new(), String::new())
        );
        // A cut never splits a character.
        let wide = ServicePortName {
            port_name: "é".repeat(10),
            ..name
        };
        assert_eq!(meta_to_name(&meta_from_name(&wide)).2, "é".repeat(7));
    }

    #[test]
    fn backends_carry_the_terminating_flag_and_weight_one() {
        let e = Endpoint {
            addr: Ipv4Addr::new(10, 0, 0, 1).into(),
            port: 8080,
            terminating: true,
            local: false,
        };
        assert_eq!(
            backend_from_endpoint(&e),
            Backend {
                addr: Ipv4Addr::new(10, 0, 0, 1).into(),
                port: 8080,
                flags: BACKEND_TERMINATING,
                weight: 1
            }
        );
        assert_eq!(
            backend_from_endpoint(&e).v4(),
            Some(Backend4 {
                addr: [10, 0, 0, 1],
                port: 8080,
                flags: BACKEND_TERMINATING,
                weight: 1
            })
        );
    }

    /// The inverse of `op` given what `state` holds now (what the applier does for rollback).
    fn inverse(state: &mut MapState, op: &MapOp) -> Option<MapOp> {
        Some(match op {
            MapOp::PutBackend { key, .. } | MapOp::DeleteBackend { key, .. } => {
                let family = match op {
                    MapOp::PutBackend { value, .. } => value.family(),
                    MapOp::DeleteBackend { family, .. } => *family,
                    _ => unreachable!(),
                };
                let held = state.spare_slots.get(key).copied().or_else(|| {
                    let k = state.live_table(key.table)?;
                    state.services[&k].backends.get(key.slot as usize).copied()
                });
                match held {
                    Some(value) => MapOp::PutBackend { key: *key, value },
                    None => MapOp::DeleteBackend { key: *key, family },
                }
            }
            MapOp::PutMeta { svc_id, .. } | MapOp::DeleteMeta { svc_id } => {
                let held = state.spare_meta.get(svc_id).copied().or_else(|| {
                    let k = state.key_of_id(*svc_id)?;
                    Some(state.services[&k].meta).filter(|m| *m != empty_meta())
                });
                match held {
                    Some(meta) => MapOp::PutMeta {
                        svc_id: *svc_id,
                        meta,
                    },
                    None => MapOp::DeleteMeta { svc_id: *svc_id },
                }
            }
            MapOp::PutService { key, .. } | MapOp::DeleteService { key } => {
                match state.services.get(key) {
                    Some(s) => MapOp::PutService {
                        key: *key,
                        value: s.value,
                    },
                    None => MapOp::DeleteService { key: *key },
                }
            }
            MapOp::SetReplyFilterWord { index, .. } => MapOp::SetReplyFilterWord {
                index: *index,
                word: state
                    .reply_filter
                    .get(*index as usize)
                    .copied()
                    .unwrap_or(0),
            },
            MapOp::PutMaglevTable { table, .. } => MapOp::DeleteMaglevTable { table: *table },
            MapOp::PutSourceRange { svc_id, range }
            | MapOp::DeleteSourceRange { svc_id, range } => {
                let (svc_id, range) = (*svc_id, *range);
                if state.range_present(svc_id, &range) {
                    MapOp::PutSourceRange { svc_id, range }
                } else {
                    MapOp::DeleteSourceRange { svc_id, range }
                }
            }
            MapOp::PutNodeConfig { .. } => MapOp::PutNodeConfig {
                value: state.node_config?,
            },
            MapOp::PutNodeConfig6 { .. } => MapOp::PutNodeConfig6 {
                value: state.node_config6?,
            },
            MapOp::PurgeUdpConntrack { .. }
            | MapOp::ResetCounters { .. }
            | MapOp::DeleteMaglevTable { .. } => return None,
        })
    }

    #[test]
    fn a_step_rolled_back_at_any_op_restores_the_state() {
        let (a, b) = (
            frontend(1, 80, Protocol::Udp),
            frontend(2, 80, Protocol::Tcp),
        );
        let mut base = MapState::default();
        step(
            &mut base,
            &desired([service("a", a, eps(&[1, 2, 3])), service("b", b, eps(&[1]))]),
        );
        let (p, _) = plan(
            &desired([
                service("a", a, eps(&[2, 4])),
                service("c", frontend(3, 80, Protocol::Tcp), eps(&[5])),
            ]),
            &base,
            BIG,
        );
        let mut before = base.clone();
        for op in &p.prologue {
            before.apply(op);
        }
        for s in &p.steps {
            for fail_at in 0..=s.ops.len() {
                let mut state = before.clone();
                let mut undo = Vec::new();
                for op in &s.ops[..fail_at] {
                    undo.extend(inverse(&mut state, op));
                    state.apply(op);
                }
                for op in undo.iter().rev() {
                    state.apply(op);
                }
                assert_eq!(state, before, "{} rolled back after {fail_at} ops", s.name);
            }
            for op in &s.ops {
                before.apply(op);
            }
        }
    }

    #[test]
    fn apply_mirrors_holes_and_the_planner_repairs_them() {
        let f = frontend(10, 80, Protocol::Tcp);
        let mut state = MapState::default();
        let d = desired([service("a", f, eps(&[1, 2, 3]))]);
        step(&mut state, &d);
        // A slot of the live table vanishes (as if deleted by hand).
        state.apply(&MapOp::DeleteBackend {
            key: slot(2, 1),
            family: Family::V4,
        });
        assert_eq!(state.services[&f.key()].backends.len(), 1);
        assert_eq!(state.spare_slots.len(), 1);
        // The planner rewrites the service into the other table and clears the leftovers.
        step(&mut state, &d);
        assert_eq!(state.services[&f.key()].backends.len(), 3);
        assert!(state.spare_slots.is_empty());
        assert!(plan(&d, &state, BIG).0.is_empty());
    }

    #[test]
    fn leftovers_of_an_interrupted_agent_are_cleared_when_their_id_is_reused() {
        let mut state = MapState::default();
        // An agent died after filling table 2 and writing meta 1, before the PutService.
        let stale = Backend4 {
            addr: [1, 1, 1, 1],
            port: 1,
            flags: 0,
            weight: 1,
        };
        for s in 0..4 {
            state.apply(&MapOp::PutBackend {
                key: slot(2, s),
                value: stale.into(),
            });
        }
        state.apply(&MapOp::PutBackend {
            key: slot(3, 0),
            value: stale.into(),
        });
        state.apply(&MapOp::PutMeta {
            svc_id: 1,
            meta: empty_meta(),
        });
        let d = desired([service("a", frontend(10, 80, Protocol::Tcp), eps(&[1, 2]))]);
        step(&mut state, &d);
        assert!(state.spare_slots.is_empty(), "{:?}", state.spare_slots);
        assert!(state.spare_meta.is_empty());
        assert_eq!(
            state.services.values().next().unwrap().meta,
            meta_from_name(&d.services.values().next().unwrap().name)
        );
        assert!(plan(&d, &state, BIG).0.is_empty());
    }

    /// A small deterministic generator, so the property test needs no extra crate.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Services on frontends `10.96.0.0..=10.96.0.8` and `fd00:96::9..=fd00:96::b` (IPv6
    /// ones with IPv6 endpoints and ranges only, as the model guarantees).
    fn random_desired(rng: &mut Lcg) -> DesiredState {
        let mut services = Vec::new();
        for last in 0..12u8 {
            if rng.next(3) == 0 {
                continue;
            }
            let ipv6 = last >= 9;
            let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][rng.next(3) as usize];
            let mut endpoints: Vec<Endpoint> = (0..rng.next(6))
                .map(|_| Endpoint {
                    addr: if ipv6 {
                        v6(0x244, rng.next(8) as u16)
                    } else {
                        Ipv4Addr::new(10, 244, 0, rng.next(8) as u8).into()
                    },
                    port: 8080 + rng.next(2) as u16,
                    terminating: rng.next(4) == 0,
                    local: rng.next(2) == 0,
                })
                .collect();
            endpoints.sort();
            endpoints.dedup_by_key(|e| (e.addr, e.port));
            let f = if ipv6 {
                frontend6(last, 80, protocol)
            } else {
                frontend(last, 80, protocol)
            };
            let mut s = service(&format!("s{}", rng.next(3)), f, endpoints);
            s.affinity_timeout_s = [0, 60, 10_800][rng.next(3) as usize];
            // External views, kinds, policy flags and source ranges from small pools.
            if rng.next(3) == 0 {
                s.frontend.scope = crate::model::Scope::External;
            }
            s.kind = [
                FrontendKind::ClusterIp,
                FrontendKind::ExternalIp,
                FrontendKind::LoadBalancer,
                FrontendKind::NodePort,
            ][rng.next(4) as usize];
            s.flags = s.kind.flag() | [0, SVC_F_SNAT, SVC_F_DROP_EMPTY][rng.next(3) as usize];
            if rng.next(3) == 0 {
                s.flags |= SVC_F_SOURCE_RANGES;
                s.source_ranges = (0..rng.next(3))
                    .map(|_| {
                        let len = [8, 16, 24][rng.next(3) as usize];
                        if ipv6 {
                            IpRange::new(v6(0x203, rng.next(2) as u16), 32 + len).unwrap()
                        } else {
                            IpRange::new(Ipv4Addr::new(10, rng.next(2) as u8, 0, 0), len).unwrap()
                        }
                    })
                    .collect();
                s.source_ranges.sort();
                s.source_ranges.dedup();
            }
            services.push(s);
        }
        desired(services)
    }

    #[test]
    fn applying_a_plan_reaches_a_state_that_plans_to_nothing() {
        let mut rng = Lcg(7);
        let mut state = MapState::default();
        for round in 0..300 {
            let d = random_desired(&mut rng);
            let (p, errors) = plan(&d, &state, BIG);
            assert!(errors.is_empty());
            apply_plan(&mut state, &p);

            let (again, _) = plan(&d, &state, BIG);
            assert!(again.is_empty(), "round {round}: {again:?}");
            // The maps hold exactly the desired services, with nothing left over.
            assert!(
                state.spare_slots.is_empty()
                    && state.spare_meta.is_empty()
                    && state.spare_ranges.is_empty(),
                "round {round}"
            );
            assert_eq!(
                state.range_count(),
                d.services
                    .values()
                    .map(|s| s.source_ranges.len())
                    .sum::<usize>()
            );
            assert_eq!(state.services.len(), d.services.len());
            for (f, s) in &d.services {
                let got = &state.services[&f.key()];
                let want: Vec<Backend> = s.endpoints.iter().map(backend_from_endpoint).collect();
                assert_eq!(got.backends, want, "round {round}");
                assert_eq!(got.value.backend_count as usize, want.len());
                assert_eq!(got.value.flags, s.flags);
                assert!(got.source_ranges.iter().eq(s.source_ranges.iter()));
                assert!(tables_of(got.value.svc_id).contains(&got.value.table));
                // Never a backend or range of the other family.
                assert!(got.backends.iter().all(|b| b.family() == f.family()));
                assert!(got.source_ranges.iter().all(|r| r.family() == f.family()));
            }
            let ids: BTreeSet<u32> = state.services.values().map(|s| s.value.svc_id).collect();
            assert_eq!(ids.len(), state.services.len(), "ids are unique");
            assert_eq!(state.reply_filter, filter_words(&state));
            assert_eq!(
                state.slot_count(),
                d.services
                    .values()
                    .map(|s| s.endpoints.len())
                    .sum::<usize>()
            );
            // From a state to itself: nothing.
            let (same, _) = plan(&d, &state, BIG);
            assert!(same.is_empty());
        }
    }

    /// `d` with about a quarter of its frontends changed: removed, added, given other
    /// endpoints, affinity or scheduler.
    fn random_change(rng: &mut Lcg, d: &DesiredState) -> DesiredState {
        use crate::model::Scheduler;
        let fresh = random_desired(rng);
        let mut next = d.clone();
        for last in 0..12u8 {
            if rng.next(4) != 0 {
                continue;
            }
            next.services.retain(|f, _| last_byte(f.addr) != last);
            next.scheduling.retain(|f, _| last_byte(f.addr) != last);
            if let Some(s) = fresh
                .services
                .values()
                .find(|s| last_byte(s.frontend.addr) == last)
            {
                next.services.insert(s.frontend, s.clone());
                match rng.next(4) {
                    0 => {
                        next.scheduling
                            .insert(s.frontend, scheduling(Scheduler::MAGLEV));
                    }
                    1 => {
                        next.scheduling
                            .insert(s.frontend, scheduling(Scheduler::RR));
                    }
                    _ => {}
                }
            }
        }
        next
    }

    /// The last byte of an address (the generators' frontends differ in it).
    fn last_byte(addr: std::net::IpAddr) -> u8 {
        *crate::model::addr_bytes(&addr).last().unwrap()
    }

    /// Frontends whose desired entry differs between `a` and `b`.
    fn changed_keys(a: &DesiredState, b: &DesiredState) -> BTreeSet<SvcKey> {
        a.services
            .keys()
            .chain(b.services.keys())
            .filter(|f| {
                a.services.get(f) != b.services.get(f) || a.scheduling.get(f) != b.scheduling.get(f)
            })
            .map(Frontend::key)
            .collect()
    }

    /// Planning only the changed services (plus those refused before) gives, change after
    /// change, the very plan and state that planning everything gives, also when some
    /// services do not fit; and the state is what a full plan from scratch programs.
    #[test]
    fn planning_only_the_changes_ends_where_planning_everything_does() {
        let mut rng = Lcg(3);
        let small = Capacity {
            services: 7,
            backend_slots: 16,
        };
        let (mut inc, mut full) = (MapState::default(), MapState::default());
        let mut d = DesiredState::default();
        let mut refused: BTreeSet<SvcKey> = BTreeSet::new();
        let (mut refusals, mut steps) = (0, 0);
        for round in 0..400 {
            let next = random_change(&mut rng, &d);
            let capacity = if round % 100 < 50 { BIG } else { small };
            let mut keys = changed_keys(&d, &next);
            keys.extend(&refused);
            d = next;

            let (p_inc, e_inc) = plan_changes(&d, &keys, &inc, capacity);
            let (p_full, e_full) = plan(&d, &full, capacity);
            assert_eq!(p_inc, p_full, "round {round}");
            assert_eq!(e_inc, e_full, "round {round}");
            refused = e_inc.iter().map(|e| e.frontend().key()).collect();
            refusals += e_inc.len();
            steps += p_inc.steps.len();
            apply_plan(&mut inc, &p_inc);
            apply_plan(&mut full, &p_full);
            assert_eq!(inc, full, "round {round}");
            assert_eq!(inc.filter_refs, refs_of(&inc.services), "round {round}");
            assert_eq!(inc.reply_filter, filter_words(&inc), "round {round}");

            if refused.is_empty() {
                // The same content as a fresh agent would program (ids and tables aside).
                let mut scratch = MapState::default();
                step(&mut scratch, &d);
                type Content = (SvcKey, Vec<Backend>, u8, u8, BTreeSet<IpRange>);
                let backends = |m: &MapState| -> Vec<Content> {
                    m.services
                        .iter()
                        .map(|(k, s)| {
                            let v = s.value;
                            (
                                *k,
                                s.backends.clone(),
                                v.scheduler,
                                v.flags,
                                s.source_ranges.clone(),
                            )
                        })
                        .collect()
                };
                assert_eq!(backends(&inc), backends(&scratch), "round {round}");
                assert_eq!(filter_words(&inc), filter_words(&scratch), "round {round}");
                let again = plan(&d, &inc, BIG).0;
                assert!(again.is_empty(), "round {round}: {again:?}");
            }
        }
        assert!(refusals > 10 && steps > 500, "{refusals} {steps}");
    }

    #[test]
    fn a_change_plans_only_its_service_and_the_words_it_touches() {
        let many: Vec<DesiredService> = (0..200u8)
            .map(|i| {
                service(
                    &format!("s{i}"),
                    frontend(i, 80, Protocol::Tcp),
                    eps(&[i, i / 2]),
                )
            })
            .collect();
        let d = desired(many.clone());
        let mut state = MapState::default();
        step(&mut state, &d);
        let mut changed = many;
        changed[5].endpoints = eps(&[250]);
        let d2 = desired(changed);
        let keys = BTreeSet::from([frontend(5, 80, Protocol::Tcp).key()]);
        let (p, errors) = plan_changes(&d2, &keys, &state, BIG);
        assert!(errors.is_empty());
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].name.name, "s5");
        // s5's old backends are also s10's (10.244.0.5) and s2's (10.244.0.2): their bits
        // stay. Only the new backend's word gains a bit, before the switch; nothing is
        // cleared.
        let bit = |last: u8| reply_filter::bit([10, 244, 0, last], 8080, PROTO_TCP);
        let (word, mask) = reply_filter::word_and_mask(bit(250));
        assert_eq!(
            p.prologue,
            [MapOp::SetReplyFilterWord {
                index: word,
                word: state.reply_filter[word as usize] | mask
            }]
        );
        assert!(p.epilogue.is_empty(), "{:?}", p.epilogue);
        apply_plan(&mut state, &p);
        for last in [250, 5, 2] {
            let (w, m) = reply_filter::word_and_mask(bit(last));
            assert_ne!(state.reply_filter[w as usize] & m, 0, "10.244.0.{last}");
        }
        assert_eq!(state.reply_filter, filter_words(&state));
        assert!(plan(&d2, &state, BIG).0.is_empty());
    }

    #[test]
    fn a_service_without_meta_is_removed_under_its_frontend() {
        let mut state = MapState::default();
        let key = SvcKey {
            addr: Ipv4Addr::new(10, 96, 0, 1).into(),
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_CLUSTER_IP,
        };
        state.apply(&MapOp::PutService {
            key,
            value: svc_value(7, 14, 0),
        });
        let (p, _) = plan(&DesiredState::default(), &state, BIG);
        assert_eq!(p.steps[0].name.to_string(), "(unnamed)/10.96.0.1:80/TCP");
        apply_plan(&mut state, &p);
        assert!(state.services.is_empty());
    }

    fn range(a: u8, len: u8) -> IpRange {
        IpRange::new(Ipv4Addr::new(10, a, 0, 0), len).unwrap()
    }

    /// An external-view LoadBalancer frontend with source ranges, one backend local.
    fn lb_service(ranges: &[IpRange], flags: u8) -> DesiredService {
        let mut f = frontend(20, 80, Protocol::Tcp);
        f.scope = crate::model::Scope::External;
        let mut endpoints = eps(&[1, 2]);
        endpoints[0].local = true;
        DesiredService {
            kind: FrontendKind::LoadBalancer,
            flags: SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES | flags,
            source_ranges: ranges.to_vec(),
            ..service("lb", f, endpoints)
        }
    }

    #[test]
    fn flags_local_backends_and_source_ranges_reach_the_maps_in_order() {
        let s = lb_service(&[range(1, 16), range(2, 24)], SVC_F_SNAT);
        let key = s.frontend.key();
        assert_eq!(key.scope, SCOPE_EXTERNAL);
        let mut state = MapState::default();
        let p = step(&mut state, &desired([s.clone()]));
        let ops = &p.steps[0].ops;
        let publish = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutService { .. }))
            .unwrap();
        let ranges: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, MapOp::PutSourceRange { svc_id: 1, .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ranges.len(), 2);
        assert!(ranges.iter().all(|i| *i < publish), "{ops:?}");
        let svc = &state.services[&key];
        assert_eq!(
            svc.value.flags,
            SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES | SVC_F_SNAT
        );
        assert_eq!(
            svc.backends.iter().map(|b| b.flags).collect::<Vec<_>>(),
            [BACKEND_LOCAL, 0]
        );
        assert_eq!(state.range_count(), 2);

        // A range swapped for another: the new one before, the old one after; nothing else.
        let s2 = lb_service(&[range(1, 16), range(3, 8)], SVC_F_SNAT);
        let p = step(&mut state, &desired([s2.clone()]));
        assert_eq!(
            p.steps[0].ops,
            [
                MapOp::PutSourceRange {
                    svc_id: 1,
                    range: range(3, 8)
                },
                MapOp::DeleteSourceRange {
                    svc_id: 1,
                    range: range(2, 24)
                },
            ]
        );
        // Only the flags change: one put of the value in place.
        let s3 = lb_service(&[range(1, 16), range(3, 8)], 0);
        let p = step(&mut state, &desired([s3]));
        assert!(matches!(
            p.steps[0].ops[..],
            [MapOp::PutService { value, .. }] if value.flags == SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES && value.table == 2
        ));
        // Removal: unpublished first, then its ranges go.
        let p = step(&mut state, &desired([]));
        let ops = &p.steps[0].ops;
        assert_eq!(ops[0], MapOp::DeleteService { key });
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, MapOp::DeleteSourceRange { svc_id: 1, .. }))
                .count(),
            2
        );
        assert_eq!(state.range_count(), 0);
        assert!(state.services.is_empty() && state.spare_ranges.is_empty());
    }

    #[test]
    fn ranges_left_under_a_reused_id_are_deleted() {
        let mut state = MapState::default();
        // An agent died after writing a range for id 1 but before publishing its service.
        state
            .spare_ranges
            .insert(1, [range(9, 8)].into_iter().collect());
        let p = step(&mut state, &desired([lb_service(&[range(1, 16)], 0)]));
        assert!(p.steps[0].ops.contains(&MapOp::DeleteSourceRange {
            svc_id: 1,
            range: range(9, 8)
        }));
        assert!(state.spare_ranges.is_empty());
        let only: Vec<IpRange> = state
            .services
            .values()
            .next()
            .unwrap()
            .source_ranges
            .iter()
            .copied()
            .collect();
        assert_eq!(only, [range(1, 16)]);
    }

    #[test]
    fn a_step_with_source_ranges_rolled_back_at_any_op_restores_the_state() {
        let mut base = MapState::default();
        step(
            &mut base,
            &desired([lb_service(&[range(1, 16), range(2, 24)], 0)]),
        );
        for next in [
            desired([lb_service(&[range(2, 24), range(3, 8)], SVC_F_SNAT)]),
            desired([]),
            desired([lb_service(&[], 0)]),
        ] {
            let (p, _) = plan(&next, &base, BIG);
            for s in &p.steps {
                for fail_at in 0..=s.ops.len() {
                    let mut state = base.clone();
                    let mut undo = Vec::new();
                    for op in &s.ops[..fail_at] {
                        undo.extend(inverse(&mut state, op));
                        state.apply(op);
                    }
                    for op in undo.iter().rev() {
                        state.apply(op);
                    }
                    assert_eq!(state, base, "{} rolled back after {fail_at} ops", s.name);
                }
            }
        }
    }

    #[test]
    fn the_node_config_is_written_when_it_differs() {
        let want = node_config(Some(Ipv4Addr::new(192, 168, 1, 10)), 61000..=65535, true);
        assert_eq!(
            want,
            NodeConfig4 {
                snat_addr: [192, 168, 1, 10],
                snat_port_min: 61000,
                snat_port_max: 65535,
                flags: NODE_F_FIB_FORWARD,
            }
        );
        assert_eq!(node_config(None, 1..=2, false).snat_addr, [0; 4]);
        assert_eq!(node_config(None, 1..=2, false).flags, 0);
        let mut state = MapState::default();
        let op = plan_node_config(&want, &state).expect("nothing written yet");
        assert_eq!(op, MapOp::PutNodeConfig { value: want });
        state.apply(&op);
        assert_eq!(plan_node_config(&want, &state), None);
        let other = node_config(Some(Ipv4Addr::new(192, 168, 1, 10)), 61000..=65535, false);
        assert!(plan_node_config(&other, &state).is_some());
    }

    #[test]
    fn an_ipv6_service_is_planned_like_an_ipv4_one_into_its_family_maps() {
        let f = frontend6(10, 80, Protocol::Tcp);
        let e = eps6(&[1, 2]);
        let d = desired([service("web6", f, e.clone())]);
        let mut state = MapState::default();
        let p = step(&mut state, &d);
        let name = d.services[&f].name.clone();
        assert_eq!(
            p.steps[0].ops,
            [
                MapOp::ResetCounters { svc_id: 1 },
                MapOp::PutMeta {
                    svc_id: 1,
                    meta: meta_from_name(&name)
                },
                put_backend(2, 0, &e[0]),
                put_backend(2, 1, &e[1]),
                MapOp::PutService {
                    key: f.key(),
                    value: svc_value(1, 2, 2)
                },
            ]
        );
        // The key and the slots are IPv6 ones: services6 and backend_slots6.
        assert_eq!(f.key().family(), Family::V6);
        let key6 = f.key().v6().expect("a services6 key");
        assert_eq!(key6.addr[..2], [0xfd, 0x00]);
        assert_eq!((key6.port, key6.proto), (80, PROTO_TCP));
        let slot0 = backend_from_endpoint(&e[0]);
        assert_eq!(slot0.v4(), None);
        assert_eq!(slot0.v6().unwrap().addr, v6_octets(&e[0]));
        // The reply filter gets the IPv6 bits (bit6), before the service is published.
        let want: Vec<u64> = {
            let mut w = vec![0u64; reply_filter::WORDS as usize];
            for ep in &e {
                let (i, m) =
                    reply_filter::word_and_mask(reply_filter::bit6(v6_octets(ep), 8080, PROTO_TCP));
                w[i as usize] |= m;
            }
            w
        };
        assert_eq!(state.reply_filter, want);
        assert!(!p.prologue.is_empty() && p.epilogue.is_empty());
        assert_eq!(p.steps[0].name.to_string(), "default/web6:http/TCP");
        assert!(plan(&d, &state, BIG).0.is_empty());
    }

    fn v6_octets(e: &Endpoint) -> [u8; 16] {
        match e.addr {
            std::net::IpAddr::V6(a) => a.octets(),
            std::net::IpAddr::V4(_) => panic!("an IPv4 endpoint"),
        }
    }

    #[test]
    fn a_dual_stack_pair_gets_two_ids_and_tables_in_each_family() {
        let (f4, f6) = (
            frontend(10, 80, Protocol::Tcp),
            frontend6(10, 80, Protocol::Tcp),
        );
        let d = desired([
            service("web", f4, eps(&[1, 2])),
            service("web", f6, eps6(&[1, 2, 3])),
        ]);
        let mut state = MapState::default();
        let p = step(&mut state, &d);
        assert_eq!(p.steps.len(), 2);
        // Frontend order: the IPv4 one first.
        let (s4, s6) = (&state.services[&f4.key()], &state.services[&f6.key()]);
        assert_eq!((s4.value.svc_id, s4.value.table), (1, 2));
        assert_eq!((s6.value.svc_id, s6.value.table), (2, 4));
        // Each step's slots are of its own family (backend_slots4 vs backend_slots6).
        for (step, family, table) in [(&p.steps[0], Family::V4, 2), (&p.steps[1], Family::V6, 4)] {
            let puts: Vec<&Backend> = step
                .ops
                .iter()
                .filter_map(|o| match o {
                    MapOp::PutBackend { key, value } => {
                        assert_eq!(key.table, table);
                        Some(value)
                    }
                    _ => None,
                })
                .collect();
            assert!(!puts.is_empty());
            assert!(puts.iter().all(|b| b.family() == family), "{puts:?}");
        }
        assert_eq!(state.counts_by_family().services, [1, 1]);
        assert_eq!(state.counts_by_family().slots, [2, 3]);
        // Removing the IPv6 one deletes its IPv6 slots only.
        let p = step(&mut state, &desired([service("web", f4, eps(&[1, 2]))]));
        assert_eq!(
            p.steps[0].ops[..4],
            [
                MapOp::DeleteService { key: f6.key() },
                MapOp::DeleteBackend {
                    key: slot(4, 0),
                    family: Family::V6
                },
                MapOp::DeleteBackend {
                    key: slot(4, 1),
                    family: Family::V6
                },
                MapOp::DeleteBackend {
                    key: slot(4, 2),
                    family: Family::V6
                },
            ]
        );
        assert_eq!(state.counts_by_family().slots, [2, 0]);
    }

    #[test]
    fn an_ipv6_backend_change_fills_the_other_table_then_switches_then_frees_the_old() {
        let f = frontend6(53, 53, Protocol::Udp);
        let mut state = MapState::default();
        step(&mut state, &desired([service("dns6", f, eps6(&[1, 2]))]));
        let e = eps6(&[2, 3]);
        let p = step(&mut state, &desired([service("dns6", f, e.clone())]));
        let gone: Vec<Backend> = eps6(&[1]).iter().map(backend_from_endpoint).collect();
        assert_eq!(
            p.steps[0].ops,
            [
                put_backend(3, 0, &e[0]),
                put_backend(3, 1, &e[1]),
                MapOp::PutService {
                    key: f.key(),
                    value: svc_value(1, 3, 2),
                },
                MapOp::DeleteBackend {
                    key: slot(2, 0),
                    family: Family::V6
                },
                MapOp::DeleteBackend {
                    key: slot(2, 1),
                    family: Family::V6
                },
                // UDP: the leaving backend's conntrack6 entries go, after the switch.
                MapOp::PurgeUdpConntrack {
                    frontend: f.key(),
                    backends: gone
                },
            ]
        );
        assert_eq!(state.services[&f.key()].value.table, 3);
        assert!(state.spare_slots.is_empty());
        assert_eq!(state.reply_filter, filter_words(&state));
    }

    fn range6(group: u16, len: u8) -> IpRange {
        IpRange::new(v6(0x203, group), len).unwrap()
    }

    #[test]
    fn ipv6_source_ranges_are_planned_like_ipv4_ones() {
        let mut f = frontend6(20, 80, Protocol::Tcp);
        f.scope = crate::model::Scope::External;
        let lb = |ranges: &[IpRange]| DesiredService {
            kind: FrontendKind::LoadBalancer,
            flags: SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES,
            source_ranges: ranges.to_vec(),
            ..service("lb6", f, eps6(&[1]))
        };
        let mut state = MapState::default();
        let p = step(&mut state, &desired([lb(&[range6(1, 48), range6(2, 64)])]));
        let ops = &p.steps[0].ops;
        let publish = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutService { .. }))
            .unwrap();
        let ranges: Vec<(usize, IpRange)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                MapOp::PutSourceRange { svc_id: 1, range } => Some((i, *range)),
                _ => None,
            })
            .collect();
        assert_eq!(
            ranges.iter().map(|r| r.1).collect::<Vec<_>>(),
            [range6(1, 48), range6(2, 64)]
        );
        assert!(
            ranges
                .iter()
                .all(|(i, r)| *i < publish && r.family() == Family::V6)
        );
        assert_eq!(state.counts_by_family().ranges, [0, 2]);
        // One swapped: the new one before, the old one after.
        let p = step(&mut state, &desired([lb(&[range6(1, 48), range6(3, 40)])]));
        assert_eq!(
            p.steps[0].ops,
            [
                MapOp::PutSourceRange {
                    svc_id: 1,
                    range: range6(3, 40)
                },
                MapOp::DeleteSourceRange {
                    svc_id: 1,
                    range: range6(2, 64)
                },
            ]
        );
    }

    #[test]
    fn each_family_fills_its_own_maps() {
        let cap = Capacity {
            services: 4,
            backend_slots: 3,
        };
        let mut state = MapState::default();
        // Three slots in each family: both fit side by side (backend_slots4 and
        // backend_slots6 are separate maps), four services use the four ids.
        let d = desired([
            service("a", frontend(1, 80, Protocol::Tcp), eps(&[1, 2])),
            service("b", frontend(2, 80, Protocol::Tcp), eps(&[1])),
            service("a", frontend6(1, 80, Protocol::Tcp), eps6(&[1, 2])),
            service("b", frontend6(2, 80, Protocol::Tcp), eps6(&[1])),
        ]);
        let (p, errors) = plan(&d, &state, cap);
        assert!(errors.is_empty(), "{errors:?}");
        apply_plan(&mut state, &p);
        assert_eq!(state.counts_by_family().services, [2, 2]);
        assert_eq!(state.counts_by_family().slots, [3, 3]);
        // The svc_ids are shared by both families (svc_meta, svc_counters, sched_rr hold
        // `services` ids): a fifth service is refused though services6 has room.
        let mut more = d.clone();
        let c6 = service("c", frontend6(3, 80, Protocol::Tcp), eps6(&[1]));
        more.services.insert(c6.frontend, c6);
        let (_, errors) = plan(&more, &state, cap);
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/c:http/TCP: svc_meta is full (4 entries)"]
        );
        // Growing an IPv6 service past its slots: backend_slots6 is full, backend_slots4
        // is not involved.
        let mut grow = d.clone();
        grow.services
            .get_mut(&frontend6(2, 80, Protocol::Tcp))
            .unwrap()
            .endpoints = eps6(&[1, 2, 3]);
        let (p, errors) = plan(&grow, &state, cap);
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/b:http/TCP: backend_slots6 is full (3 entries)"]
        );
        assert!(p.steps.is_empty());
        // An IPv6-only state: services6 fills first.
        let two = Capacity {
            services: 2,
            backend_slots: 10,
        };
        let d6 = desired([
            service("a", frontend6(1, 80, Protocol::Tcp), eps6(&[1])),
            service("b", frontend6(2, 80, Protocol::Tcp), eps6(&[1])),
            service("c", frontend6(3, 80, Protocol::Tcp), eps6(&[1])),
        ]);
        let (_, errors) = plan(&d6, &MapState::default(), two);
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["default/c:http/TCP: services6 is full (2 entries)"]
        );
    }

    #[test]
    fn the_ipv6_node_config_is_written_when_it_differs() {
        let addr: std::net::Ipv6Addr = "fd00:251::1".parse().unwrap();
        let want = node_config6(Some(addr), 61000..=65535, true);
        assert_eq!(
            want,
            NodeConfig6 {
                snat_addr: addr.octets(),
                snat_port_min: 61000,
                snat_port_max: 65535,
                flags: NODE_F_FIB_FORWARD,
            }
        );
        // No IPv6 SNAT address: `::`.
        assert_eq!(node_config6(None, 1..=2, false).snat_addr, [0; 16]);
        let mut state = MapState::default();
        let op = plan_node_config6(&want, &state).expect("nothing written yet");
        assert_eq!(op, MapOp::PutNodeConfig6 { value: want });
        state.apply(&op);
        assert_eq!(plan_node_config6(&want, &state), None);
        // The IPv4 one is separate.
        assert_eq!(state.node_config, None);
        assert!(plan_node_config6(&node_config6(None, 61000..=65535, true), &state).is_some());
    }
}
