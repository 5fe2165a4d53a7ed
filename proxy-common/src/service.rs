//! Services and their backends.

/// `scope` of a [`Svc4Key`]: which kind of frontend address the key is.
pub const SCOPE_CLUSTER_IP: u8 = 0;
/// Reserved for the NodePort and external-address frontends.
pub const SCOPE_NODE_PORT: u8 = 1;
pub const SCOPE_EXTERNAL: u8 = 2;

/// Key of `services4`: one frontend (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc4Key {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// `scheduler` of a [`Svc4Value`]. Only random exists so far; the field is there so the
/// schedulers issue adds values without a layout change.
pub const SCHED_RANDOM: u8 = 0;

/// Value of `services4`.
///
/// Backends live in `backend_slots4` under `(table, 0..backend_count)`. A change of backends
/// is written to a fresh table first and then published by replacing this value in one map
/// update, so no packet sees a half-written backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Svc4Value {
    /// Stable id of the service port; keys `svc_meta`.
    pub svc_id: u32,
    /// Which backend table is live: `svc_id * 2` or `svc_id * 2 + 1`.
    pub table: u32,
    pub backend_count: u32,
    pub scheduler: u8,
    pub flags: u8,
    pub _pad: u16,
    /// ClientIP session affinity timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
}

/// Key of `backend_slots4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub table: u32,
    pub slot: u32,
}

/// Value of `backend_slots4`: one backend address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend4 {
    pub addr: [u8; 4],
    pub port: u16,
    /// `BACKEND_*` flags.
    pub flags: u8,
    pub weight: u8,
}

/// The backend is terminating (used only when no ready backend is left).
pub const BACKEND_TERMINATING: u8 = 1;

/// Length of the name fields in [`SvcMeta`]; Kubernetes names are at most 63 bytes.
pub const NAME_LEN: usize = 64;
pub const PORT_NAME_LEN: usize = 16;

/// Value of `svc_meta` (keyed by `svc_id`): who owns a service, for the CLI.
/// The kernel never reads it; keeping it in a pinned map means the CLI never shows names
/// that disagree with what the kernel serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcMeta {
    pub namespace: [u8; NAME_LEN],
    pub name: [u8; NAME_LEN],
    pub port_name: [u8; PORT_NAME_LEN],
}

const _: () = assert!(core::mem::size_of::<Svc4Key>() == 8);
const _: () = assert!(core::mem::size_of::<Svc4Value>() == 20);
const _: () = assert!(core::mem::size_of::<BackendSlotKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);
const _: () = assert!(core::mem::size_of::<SvcMeta>() == 144);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with every byte covered by a field (asserted above).
    unsafe impl aya::Pod for super::Svc4Key {}
    unsafe impl aya::Pod for super::Svc4Value {}
    unsafe impl aya::Pod for super::BackendSlotKey {}
    unsafe impl aya::Pod for super::Backend4 {}
    unsafe impl aya::Pod for super::SvcMeta {}
}
