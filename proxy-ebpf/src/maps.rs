//! The maps of the datapath. Names come from `proxy_common::maps`; sizes are defaults that
//! userspace overrides at load time. All are BTF map definitions, so `bpftool map dump`
//! shows keys and values field by field.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    conntrack::{Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    maps::{
        DEFAULT_AFFINITY, DEFAULT_BACKEND_SLOTS, DEFAULT_CONNTRACK, DEFAULT_SERVICES,
        DEFAULT_SOURCE_RANGES, MAGLEV_TABLES,
    },
    reply_filter::WORDS,
    service::{
        Affinity6Key, Affinity6Value, AffinityKey, AffinityValue, Backend4, Backend6, BackendConns,
        BackendConns6Key, BackendConnsKey, BackendSlotKey, MAGLEV_SIZE, MaglevKey, NodeConfig4,
        NodeConfig6, SourceRange4Key, SourceRange6Key, Svc4Key, Svc6Key, SvcMeta, SvcValue,
    },
    stats::{COUNT, SvcCounters},
};

/// Service frontends (VIP, port, proto, scope) -> live backend table and backend count.
#[btf_map(name = "services4")]
pub static SERVICES4: HashMap<Svc4Key, SvcValue, { DEFAULT_SERVICES as usize }> = HashMap::new();

/// Backend tables: (table, slot 0..backend_count) -> backend address and port.
#[btf_map(name = "backend_slots4")]
pub static BACKEND_SLOTS4: HashMap<BackendSlotKey, Backend4, { DEFAULT_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// Connection tracking: forward (client -> VIP) and reply (backend -> client) 5-tuples.
#[btf_map(name = "conntrack4")]
pub static CONNTRACK4: LruHashMap<Ct4Key, Ct4Value, { DEFAULT_CONNTRACK as usize }> =
    LruHashMap::new();

/// Maglev lookup tables: (backend table, 0..MAGLEV_SIZE) -> slot in that backend table.
/// Built by the agent; not preallocated, so only the tables in use take memory.
#[btf_map(name = "maglev4")]
pub static MAGLEV: HashMap<
    MaglevKey,
    u32,
    { (MAGLEV_TABLES * MAGLEV_SIZE) as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Per-backend connection counters of the counting schedulers (lc, sed, nq):
/// (svc_id, backend) -> opened/closed, only ever added to atomically.
#[btf_map(name = "backend_conns4")]
pub static BACKEND_CONNS4: HashMap<
    BackendConnsKey,
    BackendConns,
    { DEFAULT_BACKEND_SLOTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// ClientIP session affinity: (svc_id, client) -> backend and last use.
#[btf_map(name = "affinity4")]
pub static AFFINITY4: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_AFFINITY as usize }> =
    LruHashMap::new();

/// Tokens of counted connections: forward tuple -> the counter it holds one `opened` of.
/// Deleting the token is what entitles to add the matching `closed` (exactly once).
/// Not LRU: a token must never vanish unseen.
#[btf_map(name = "counted4")]
pub static COUNTED4: HashMap<
    Ct4Key,
    BackendConnsKey,
    { DEFAULT_CONNTRACK as usize / 2 },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Round-robin position of each service on each CPU, indexed by svc_id (sized services + 1
/// at load). Per CPU: the default BPF ISA has no atomic fetch-and-add, and per-CPU
/// counters keep new connections from bouncing one cache line between CPUs.
#[btf_map(name = "sched_rr4")]
pub static SCHED_RR_POS: PerCpuArray<u32, { DEFAULT_SERVICES as usize + 1 }> = PerCpuArray::new();

/// Traffic of each service frontend on each CPU, indexed by svc_id (sized services + 1 at
/// load). An array rather than a per-CPU hash: the index is the svc_id the service lookup
/// already gave, so a bump is one direct lookup on the established path (no hashing); the
/// price is memory for every possible svc_id (40 bytes x (services + 1) x CPUs).
#[btf_map(name = "svc_counters")]
pub static SVC_COUNTERS: PerCpuArray<SvcCounters, { DEFAULT_SERVICES as usize + 1 }> =
    PerCpuArray::new();

/// svc_id -> namespace/name/port name, for the CLI only; the kernel never reads it. The
/// `export_name` the macro gives it keeps the unreferenced definition in the object's `.maps`.
#[btf_map(name = "svc_meta")]
#[allow(dead_code)]
pub static SVC_META: HashMap<u32, SvcMeta, { DEFAULT_SERVICES as usize }> = HashMap::new();

/// Bitmap over backend (addr, port, proto): a clear bit means "certainly not a reply".
#[btf_map(name = "reply_filter4")]
pub static REPLY_FILTER: Array<u64, { WORDS as usize }> = Array::new();

/// What the external view needs to know about this node (one entry, written by the agent).
#[btf_map(name = "node_cfg4")]
pub static NODE_CFG4: Array<NodeConfig4, 1> = Array::new();

/// loadBalancerSourceRanges: (svc_id, client prefix) -> 1 for each allowed range.
#[btf_map(name = "src_ranges4")]
pub static SRC_RANGES4: LpmTrie<SourceRange4Key, u8, { DEFAULT_SOURCE_RANGES as usize }> =
    LpmTrie::new();

// The IPv6 twins of the maps above: same shapes and sizes, `[u8; 16]` addresses. Tables
// and svc_ids are shared between the families, so `maglev4`, `sched_rr4`, `svc_counters`,
// `svc_meta` and `reply_filter4` have no twin.

/// IPv6 service frontends -> live backend table (in `backend_slots6`) and backend count.
#[btf_map(name = "services6")]
pub static SERVICES6: HashMap<Svc6Key, SvcValue, { DEFAULT_SERVICES as usize }> = HashMap::new();

/// IPv6 backend tables: (table, slot) -> backend address and port.
#[btf_map(name = "backend_slots6")]
pub static BACKEND_SLOTS6: HashMap<BackendSlotKey, Backend6, { DEFAULT_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// IPv6 connection tracking, as `conntrack4`.
#[btf_map(name = "conntrack6")]
pub static CONNTRACK6: LruHashMap<Ct6Key, Ct6Value, { DEFAULT_CONNTRACK as usize }> =
    LruHashMap::new();

/// Per-backend connection counters of IPv6 services, as `backend_conns4`.
#[btf_map(name = "backend_conns6")]
pub static BACKEND_CONNS6: HashMap<
    BackendConns6Key,
    BackendConns,
    { DEFAULT_BACKEND_SLOTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// ClientIP session affinity of IPv6 clients, as `affinity4`.
#[btf_map(name = "affinity6")]
pub static AFFINITY6: LruHashMap<Affinity6Key, Affinity6Value, { DEFAULT_AFFINITY as usize }> =
    LruHashMap::new();

/// Tokens of counted IPv6 connections, as `counted4`.
#[btf_map(name = "counted6")]
pub static COUNTED6: HashMap<
    Ct6Key,
    BackendConns6Key,
    { DEFAULT_CONNTRACK as usize / 2 },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// What the external view needs to know about this node for IPv6 (one entry).
#[btf_map(name = "node_cfg6")]
pub static NODE_CFG6: Array<NodeConfig6, 1> = Array::new();

/// IPv6 loadBalancerSourceRanges: (svc_id, client prefix) -> 1.
#[btf_map(name = "src_ranges6")]
pub static SRC_RANGES6: LpmTrie<SourceRange6Key, u8, { DEFAULT_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Per-CPU packet counters, one per `proxy_common::stats` index.
#[btf_map(name = "stats")]
pub static STATS: PerCpuArray<u64, { COUNT as usize }> = PerCpuArray::new();

/// Bumps one per-CPU counter (no atomics needed: the slot belongs to this CPU).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup and is this CPU's own slot.
        unsafe { *p += 1 };
    }
}

/// Adds one packet of `len` bytes to service `svc_id`'s counters on this CPU, towards the
/// frontend (`reply` false) or back from a backend (`reply` true).
#[inline(always)]
pub fn count_service(svc_id: u32, len: u64, reply: bool) {
    if let Some(c) = SVC_COUNTERS.get_ptr_mut(svc_id) {
        // SAFETY: the pointer comes from the map lookup and is this CPU's own slot.
        unsafe {
            if reply {
                (*c).reply_packets += 1;
                (*c).reply_bytes += len;
            } else {
                (*c).packets += 1;
                (*c).bytes += len;
            }
        }
    }
}

/// Counts a new connection of service `svc_id` on this CPU.
#[inline(always)]
pub fn count_new_connection(svc_id: u32) {
    if let Some(c) = SVC_COUNTERS.get_ptr_mut(svc_id) {
        // SAFETY: as in `count_service`.
        unsafe { (*c).new_connections += 1 };
    }
}
