//! Services and their backends.

/// `scope` of a [`Svc4Key`]: which view of the services a lookup is made in. A frontend
/// address may be in both views with different backends (externalTrafficPolicy Local
/// serves only this node's endpoints to outside clients, while pods reaching the same
/// address are short-circuited to all endpoints, as kube-proxy does).
///
/// The in-cluster view: what pods (tc at the pod veths) and processes on the node (the
/// socket hooks) reach. ClusterIPs (internalTrafficPolicy applied), and the external IPs,
/// LoadBalancer IPs and NodePorts on this node's addresses with all endpoints.
pub const SCOPE_CLUSTER_IP: u8 = 0;
/// The external view: what arrives on the node interfaces (XDP). External IPs,
/// LoadBalancer ingress IPs and NodePorts, one entry per (node address, nodePort), with
/// externalTrafficPolicy applied.
pub const SCOPE_EXTERNAL: u8 = 1;

/// `flags` of a [`SvcValue`].
///
/// The frontend is a NodePort (on one of this node's addresses).
pub const SVC_F_NODE_PORT: u8 = 1;
/// The frontend is one of `spec.externalIPs`.
pub const SVC_F_EXTERNAL_IP: u8 = 2;
/// The frontend is a `status.loadBalancer.ingress[].ip`.
pub const SVC_F_LOAD_BALANCER: u8 = 4;
/// externalTrafficPolicy Cluster: a backend on another node gets the connection with its
/// source rewritten to this node's address (`node_cfg4`), so the reply comes back here.
pub const SVC_F_SNAT: u8 = 8;
/// loadBalancerSourceRanges are set: a client not in `src_ranges4` under this svc_id is
/// dropped.
pub const SVC_F_SOURCE_RANGES: u8 = 16;
/// A traffic policy Local with no local endpoint while the service has endpoints
/// elsewhere: `backend_count` 0 means drop (kube-proxy's DROP), not reject.
pub const SVC_F_DROP_EMPTY: u8 = 32;

/// Key of `services4`: one frontend (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc4Key {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Key of `services6`: one IPv6 frontend, as [`Svc4Key`]. Its value is the same
/// [`SvcValue`]: svc_ids are shared by both families (a dual-stack Service port has one
/// svc_id per family), so `svc_meta`, `svc_counters`, `sched_rr` and `maglev` serve both.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc6Key {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// `scheduler` of a [`SvcValue`]: how a new connection picks its backend. Established
/// connections never run a scheduler (conntrack has their backend).
///
/// Uniform random over the live table.
pub const SCHED_RANDOM: u8 = 0;
/// Round robin over the live table (one shared counter per service in `sched_rr`).
pub const SCHED_RR: u8 = 1;
/// Least connections, weighted: the smallest `active / weight` (IPVS `wlc`).
pub const SCHED_LC: u8 = 2;
/// Shortest expected delay: the smallest `(active + 1) / weight` (IPVS `sed`).
pub const SCHED_SED: u8 = 3;
/// Never queue: an idle backend if there is one, else as `SCHED_SED` (IPVS `nq`).
pub const SCHED_NQ: u8 = 4;
/// Source hashing: the client address picks the slot.
pub const SCHED_SH: u8 = 5;
/// Destination hashing: the frontend address and port pick the slot.
pub const SCHED_DH: u8 = 6;
/// Maglev consistent hashing of the 5-tuple through the service's `maglev` table.
pub const SCHED_MAGLEV: u8 = 7;

/// Names of the schedulers, indexed by value (the annotation and CLI spelling).
pub const SCHED_NAMES: [&str; 8] = ["random", "rr", "lc", "sed", "nq", "sh", "dh", "maglev"];

/// Whether a scheduler needs the per-backend connection counts of `backend_conns4`.
#[inline(always)]
pub const fn sched_counts_connections(scheduler: u8) -> bool {
    matches!(scheduler, SCHED_LC | SCHED_SED | SCHED_NQ)
}

/// Size of every Maglev lookup table: a prime, so each backend's permutation
/// (`offset + j * skip mod M`) visits every entry. 16381 keeps the spread within about 1%
/// of even up to a few hundred backends (M should be much larger than N; Maglev's paper
/// uses M >= 100 N), and a table's `maglev` entries cost about 0.8 MB.
pub const MAGLEV_SIZE: u32 = 16_381;

/// Key of `maglev`: entry `index` (0..MAGLEV_SIZE) of the Maglev table of backend table
/// `table` (the same double-buffered id as `backend_slots4`, published with the service).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub table: u32,
    pub index: u32,
}

/// Key of `backend_conns4`: one backend of one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendConnsKey {
    pub svc_id: u32,
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of `backend_conns4`: monotonic counters, written only by the kernel programs with
/// atomic adds. Active connections = `opened - closed`.
///
/// `opened` counts the TCP connections a counting scheduler created to this backend, each
/// of which gets a token in `counted4` (keyed by its forward tuple). `closed` counts each
/// of them once: whoever deletes the token adds one. A map delete succeeds for one caller
/// only, so no connection is released twice: the first FIN or RST in either direction
/// deletes it, and so does a new connection reusing the tuple, and the agent's collector
/// deletes the tokens whose conntrack entry was evicted (it adds to `closed` through the
/// `conns_release` program, never by writing this map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendConns {
    pub opened: u64,
    pub closed: u64,
}

impl BackendConns {
    /// Connections open now (0 if a release raced ahead of its open).
    #[inline(always)]
    pub fn active(&self) -> u64 {
        self.opened.saturating_sub(self.closed)
    }
}

/// Key of `backend_conns6`: as [`BackendConnsKey`], for an IPv6 backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendConns6Key {
    pub svc_id: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

/// Key of `affinity4`: ClientIP session affinity of one client to one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client: [u8; 4],
}

/// Value of `affinity4`: the backend a client sticks to, and when it last started a
/// connection to it. `slot` is where the backend was in the live table when last used:
/// checked first (one lookup); when that slot holds another backend, the live table is
/// scanned for `addr:port`, and an entry whose backend is gone is dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
    pub slot: u32,
    pub _pad2: u32,
    /// bpf_ktime_get_ns() of the last new connection that used this entry.
    pub last_ns: u64,
}

/// Key of `affinity6`: as [`AffinityKey`], for an IPv6 client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity6Key {
    pub svc_id: u32,
    pub client: [u8; 16],
}

/// Value of `affinity6`: as [`AffinityValue`], for an IPv6 backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity6Value {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub slot: u32,
    /// bpf_ktime_get_ns() of the last new connection that used this entry.
    pub last_ns: u64,
}

/// Value of `services4` and `services6`.
///
/// Backends live in `backend_slots4` under `(table, 0..backend_count)`. A change of backends
/// is written to a fresh table first and then published by replacing this value in one map
/// update, so no packet sees a half-written backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcValue {
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

/// Value of `backend_slots6`: one IPv6 backend, as [`Backend4`]. A table (keyed by
/// [`BackendSlotKey`]) belongs to one svc_id, so to one family: a table's slots are all in
/// `backend_slots4` or all in `backend_slots6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    pub addr: [u8; 16],
    pub port: u16,
    pub flags: u8,
    pub weight: u8,
}

/// The backend is terminating (used only when no ready backend is left).
pub const BACKEND_TERMINATING: u8 = 1;
/// The backend runs on this node (its endpoint's `nodeName` is `--node-name`): reached
/// without SNAT from the external view.
pub const BACKEND_LOCAL: u8 = 2;

/// Key of `src_ranges4` (an LPM trie; the trie key's prefix length counts the 32 bits of
/// `svc_id`, always matched whole, plus the range's prefix): one allowed source range of
/// one LoadBalancer frontend. The value is a `u8` 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange4Key {
    /// Big-endian, so the trie compares it byte by byte like the address.
    pub svc_id_be: [u8; 4],
    pub addr: [u8; 4],
}

/// Key of `src_ranges6`: as [`SourceRange4Key`], for IPv6 ranges (prefix length 32 + the
/// range's prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange6Key {
    pub svc_id_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Value of `node_cfg4` (a one-entry array): what the external view needs to know about
/// this node. Written by the agent before it attaches the XDP program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig4 {
    /// Source address of SNAT-ed connections (externalTrafficPolicy Cluster to a backend
    /// on another node); 0.0.0.0 means none known: such backends are not used.
    pub snat_addr: [u8; 4],
    /// SNAT source ports are taken from `snat_port_min..=snat_port_max` (outside the
    /// kernel's ephemeral range, so node processes never hold them).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `NODE_F_*` flags.
    pub flags: u32,
}

/// Value of `node_cfg6` (a one-entry array): as [`NodeConfig4`], for IPv6 (`snat_addr`
/// `::` means no SNAT address known). The port range and flags are written the same in
/// both.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig6 {
    pub snat_addr: [u8; 16],
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub flags: u32,
}

/// `flags` of [`NodeConfig4`] and [`NodeConfig6`]: forward translated packets with bpf_fib_lookup and a
/// redirect (XDP_TX/XDP_REDIRECT) instead of handing them to the kernel stack.
pub const NODE_F_FIB_FORWARD: u32 = 1;

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
const _: () = assert!(core::mem::size_of::<SvcValue>() == 20);
const _: () = assert!(core::mem::size_of::<BackendSlotKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);
const _: () = assert!(core::mem::size_of::<SvcMeta>() == 144);
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);
const _: () = assert!(core::mem::size_of::<BackendConnsKey>() == 12);
const _: () = assert!(core::mem::size_of::<BackendConns>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 24);
const _: () = assert!(core::mem::size_of::<SourceRange4Key>() == 8);
const _: () = assert!(core::mem::size_of::<NodeConfig4>() == 12);
const _: () = assert!(core::mem::size_of::<Svc6Key>() == 20);
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);
const _: () = assert!(core::mem::size_of::<BackendConns6Key>() == 24);
const _: () = assert!(core::mem::size_of::<Affinity6Key>() == 20);
const _: () = assert!(core::mem::size_of::<Affinity6Value>() == 32);
const _: () = assert!(core::mem::size_of::<SourceRange6Key>() == 20);
const _: () = assert!(core::mem::size_of::<NodeConfig6>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with every byte covered by a field (asserted above).
    unsafe impl aya::Pod for super::Svc4Key {}
    unsafe impl aya::Pod for super::SvcValue {}
    unsafe impl aya::Pod for super::BackendSlotKey {}
    unsafe impl aya::Pod for super::Backend4 {}
    unsafe impl aya::Pod for super::SvcMeta {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::BackendConnsKey {}
    unsafe impl aya::Pod for super::BackendConns {}
    unsafe impl aya::Pod for super::SourceRange4Key {}
    unsafe impl aya::Pod for super::NodeConfig4 {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::Svc6Key {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::BackendConns6Key {}
    unsafe impl aya::Pod for super::Affinity6Key {}
    unsafe impl aya::Pod for super::Affinity6Value {}
    unsafe impl aya::Pod for super::SourceRange6Key {}
    unsafe impl aya::Pod for super::NodeConfig6 {}
}
