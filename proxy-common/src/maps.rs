//! Names and default sizes of the maps, known to both sides.
//!
//! The kernel cuts map names at 15 bytes; these fit.

pub const SERVICES4: &str = "services4";
pub const BACKEND_SLOTS4: &str = "backend_slots4";
pub const CONNTRACK4: &str = "conntrack4";
pub const SVC_META: &str = "svc_meta";
/// Shared by both families (an IPv6 backend sets `reply_filter::bit6`); the pin keeps
/// its layout-4 name so that layout-4 pins are taken over (see [`LAYOUT_ADOPTS`]).
pub const REPLY_FILTER: &str = "reply_filter4";
pub const STATS: &str = "stats";

/// The IPv6 maps: the same shapes with `[u8; 16]` addresses, and the same sizes as their
/// IPv4 counterparts. `svc_meta`, `svc_counters`, `reply_filter4`, `maglev4`, `sched_rr4`
/// and `stats` serve both families (the last three keep the names they had in layout 4).
pub const SERVICES6: &str = "services6";
pub const BACKEND_SLOTS6: &str = "backend_slots6";
pub const CONNTRACK6: &str = "conntrack6";
pub const BACKEND_CONNS6: &str = "backend_conns6";
pub const AFFINITY6: &str = "affinity6";
pub const COUNTED6: &str = "counted6";
/// One-entry array of `service::NodeConfig6`.
pub const NODE_CFG6: &str = "node_cfg6";
/// LPM trie of the IPv6 loadBalancerSourceRanges (`service::SourceRange6Key`).
pub const SRC_RANGES6: &str = "src_ranges6";

pub const DEFAULT_SERVICES: u32 = 65_536;
pub const DEFAULT_BACKEND_SLOTS: u32 = 262_144;
pub const DEFAULT_CONNTRACK: u32 = 262_144;
/// Keyed by backend table, so shared by both families; layout-4 name kept, as above.
pub const MAGLEV: &str = "maglev4";
pub const BACKEND_CONNS4: &str = "backend_conns4";
pub const AFFINITY4: &str = "affinity4";
/// Indexed by svc_id, so shared by both families; layout-4 name kept, as above.
pub const SCHED_RR_POS: &str = "sched_rr4";
pub const COUNTED4: &str = "counted4";
pub const MONITOR_CFG: &str = "monitor_cfg";
pub const MONITOR_EVENTS: &str = "monitor_events";

/// Size of the `monitor_events` ring buffer: 256 KiB, about 6,500 events (40 bytes plus an
/// 8-byte header each) between two reads of the monitor.
pub const MONITOR_RING_BYTES: u32 = 256 * 1024;
/// Per-CPU traffic counters of each service frontend, indexed by svc_id
/// (`stats::SvcCounters`).
pub const SVC_COUNTERS: &str = "svc_counters";
/// One-entry array of `service::NodeConfig4`.
pub const NODE_CFG4: &str = "node_cfg4";
/// LPM trie of the loadBalancerSourceRanges (`service::SourceRange4Key`).
pub const SRC_RANGES4: &str = "src_ranges4";
/// Reverse map of the socket hooks (`sock::SockRev4Key` -> `sock::SockRev4Value`, LRU):
/// which frontend a node process's socket asked for, by the backend it was sent to.
pub const SOCK_REV4: &str = "sock_rev4";
/// The IPv6 twin of `sock_rev4` (`sock::SockRev6Key` -> `sock::SockRev6Value`, LRU, as
/// many entries: `DEFAULT_SOCK_REV`).
pub const SOCK_REV6: &str = "sock_rev6";
/// Capacity of `sock_rev4`: sockets of node processes (and UDP backends per socket) that
/// reached a service. LRU: a socket idle longest loses its entry first (its getpeername
/// then shows the backend).
pub const DEFAULT_SOCK_REV: u32 = 65_536;
/// Capacity of `src_ranges4`: source ranges over all LoadBalancer frontends.
pub const DEFAULT_SOURCE_RANGES: u32 = 16_384;

/// Maglev tables `maglev` can hold (entries = this * `service::MAGLEV_SIZE`; the map is
/// not preallocated, so only tables in use take memory). A service being changed holds
/// two tables for a moment, so about half this many Maglev services fit.
pub const MAGLEV_TABLES: u32 = 64;
/// Size of `affinity4` (LRU): clients with ClientIP affinity, over all services.
pub const DEFAULT_AFFINITY: u32 = 65_536;
/// Backends whose connections a counting scheduler (lc, sed, nq) compares per new
/// connection; a service with more compares a window of this many, starting at a slot
/// that rotates.
pub const SCHED_SCAN_MAX: u32 = 1024;

/// Pin name of the one-entry array that records which layout the pinned maps have.
pub const LAYOUT: &str = "layout";
/// Folder (under the pin folder) where the tc links are pinned, one per interface, so the
/// programs stay attached while the agent restarts.
pub const LINKS_DIR: &str = "links";

/// Version of the layout of the pinned maps, written in the `layout` map when a pin folder
/// is created. An agent reuses pins only if their version is this one (or one listed in
/// [`LAYOUT_ADOPTS`]); any other it refuses without writing, since it would read old bytes
/// with a new meaning (or the reverse).
///
/// **Bump it in the same commit** as any change to what is pinned: a map added or removed,
/// a key, value or map type changed (size or meaning of a field, padding turned into a
/// field, a new `SCHED_*` or flag value that older programs would misread), or a changed
/// map size rule. Also add a new map to `map_shapes` in `proxy-userspace`'s `loader.rs` so
/// its key and value sizes are checked. Nothing else is needed: new pin folders get the new
/// version, and folders of other versions are refused with a message telling the operator
/// to run `bpfproxy cleanup`.
///
/// 2: `Ct4Value::last_seen_ns` (was the creation time) and `CT_FLAG_REPLIED` (the conntrack
/// collector would misjudge entries of version 1), `stats` grew to 11 counters, the monitor
/// maps `monitor_cfg` and `monitor_events`.
///
/// 3: `svc_counters` (per-service counters) added; everything else as in 2, so pins of 2
/// are taken over (their services' counters start at 0).
///
/// 4: the external view (NodePort, external and LoadBalancer IPs at XDP): `Ct4Value` grew
/// `nat2_*` for SNAT (32 bytes), service scopes and flags, `BACKEND_LOCAL`, `node_cfg4`,
/// `src_ranges4`, `stats` grew to 21 counters, `sock_rev4` (socket-level load balancing).
///
/// 5: IPv6 and dual stack: the `*6` maps (and `sock_rev6`) added; `reply_filter4`, `maglev4`
/// and `sched_rr4` now serve both families under their old names; everything else as in 4,
/// so pins of 4 are taken over (an upgrade keeps its services and connections).
pub const LAYOUT_VERSION: u32 = 5;

/// Older layout versions whose pins this version takes over in place: only when the change
/// since was purely additive (new maps, every existing map unchanged), list the old version
/// here; the agent then creates the new maps next to the old ones and records
/// [`LAYOUT_VERSION`] in the folder, so an upgrade keeps services and connections.
pub const LAYOUT_ADOPTS: &[u32] = &[4];
