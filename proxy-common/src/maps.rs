//! Names and default sizes of the maps, known to both sides.
//!
//! The kernel cuts map names at 15 bytes; these fit.

pub const SERVICES4: &str = "services4";
pub const BACKEND_SLOTS4: &str = "backend_slots4";
pub const CONNTRACK4: &str = "conntrack4";
pub const SVC_META: &str = "svc_meta";
pub const REPLY_FILTER4: &str = "reply_filter4";
pub const STATS: &str = "stats";

pub const DEFAULT_SERVICES: u32 = 65_536;
pub const DEFAULT_BACKEND_SLOTS: u32 = 262_144;
pub const DEFAULT_CONNTRACK: u32 = 262_144;
pub const MAGLEV4: &str = "maglev4";
pub const BACKEND_CONNS4: &str = "backend_conns4";
pub const AFFINITY4: &str = "affinity4";
pub const SCHED_RR4: &str = "sched_rr4";
pub const COUNTED4: &str = "counted4";

/// Maglev tables `maglev4` can hold (entries = this * `service::MAGLEV_SIZE`; the map is
/// not preallocated, so only tables in use take memory). A service being changed holds
/// two tables for a moment, so about half this many Maglev services fit.
pub const MAGLEV_TABLES: u32 = 64;
/// Size of `affinity4` (LRU): clients with ClientIP affinity, over all services.
pub const DEFAULT_AFFINITY: u32 = 65_536;
/// Backends whose connections a counting scheduler (lc, sed, nq) compares per new
/// connection; a service with more compares a window of this many, starting at a slot
/// that rotates.
pub const SCHED_SCAN_MAX: u32 = 1024;
