//! `bpfproxy monitor`: the datapath's decisions as events in the `monitor_events` ring
//! buffer, written only while `monitor_cfg` says a monitor is running.

/// Value of the one-entry array `monitor_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Non-zero: the datapath writes events. Checked only on the paths that have an event
    /// to report (new connection, first reply, drop), never on established packets.
    pub enabled: u32,
    /// The monitor process that turned it on, so the agent can turn it off again if that
    /// process died without doing so.
    pub pid: u32,
}

/// `kind`: a new connection was given a backend.
pub const EV_NEW: u8 = 1;
/// `kind`: the first reply of a connection was translated back to the service address.
pub const EV_REPLY: u8 = 2;
/// `kind`: a packet was dropped, rejected or passed untranslated; `reason` says why.
pub const EV_DROP: u8 = 3;

/// `reason` of `EV_DROP`: the service has no endpoints; rejected (ICMP port unreachable).
pub const REASON_NO_BACKEND: u8 = 1;
/// The conntrack map had no room; passed untranslated.
pub const REASON_CT_FULL: u8 = 2;
/// The chosen backend slot was missing (a half-written table); passed untranslated.
pub const REASON_BACKEND_MISSING: u8 = 3;
/// A rewrite helper failed; dropped.
pub const REASON_REWRITE: u8 = 4;
/// A header was cut short or invalid; passed untouched (no addresses in the event).
pub const REASON_MALFORMED: u8 = 5;
/// `reason` of `EV_NEW`: a TCP packet other than a SYN found no conntrack entry (evicted
/// or expired) and was given a backend anew.
pub const REASON_MIDSTREAM: u8 = 6;

/// A client outside a LoadBalancer frontend's loadBalancerSourceRanges; dropped.
pub const REASON_SOURCE_RANGE: u8 = 7;
/// A traffic policy Local with no endpoint on this node; dropped.
pub const REASON_NO_LOCAL_BACKEND: u8 = 8;
/// No free SNAT port (or no SNAT address) for a connection to another node; dropped.
pub const REASON_SNAT_PORTS: u8 = 9;

/// Names of the reasons, indexed by value.
pub const REASON_NAMES: [&str; 10] = [
    "",
    "no_backend",
    "conntrack_full",
    "backend_missing",
    "rewrite_failed",
    "malformed",
    "midstream",
    "source_range",
    "no_local_backend",
    "snat_ports",
];

/// One event. Addresses are wire bytes, ports host order, as in the map keys. For
/// `EV_REPLY` the packet went backend -> client; `vip` is the address it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The service port (keys `svc_meta`); 0 when unknown (malformed).
    pub svc_id: u32,
    pub kind: u8,
    pub reason: u8,
    pub proto: u8,
    /// `service::SCHED_*` of the service (`EV_NEW`).
    pub scheduler: u8,
    pub client: [u8; 4],
    pub vip: [u8; 4],
    pub backend: [u8; 4],
    pub client_port: u16,
    pub vip_port: u16,
    pub backend_port: u16,
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<MonitorConfig>() == 8);
const _: () = assert!(core::mem::size_of::<MonitorEvent>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, every byte covered by a field (asserted above).
    unsafe impl aya::Pod for super::MonitorConfig {}
    unsafe impl aya::Pod for super::MonitorEvent {}
}
