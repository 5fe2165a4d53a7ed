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
