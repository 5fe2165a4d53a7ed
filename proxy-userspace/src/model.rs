//! What the cluster wants: a pure model of the desired services, built from Service and
//! EndpointSlice objects with kube-proxy's rules. No kernel, no I/O: easy to unit-test.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy_common::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    service::{
        SCHED_NAMES, SCOPE_CLUSTER_IP, SCOPE_EXTERNAL, SVC_F_DROP_EMPTY, SVC_F_EXTERNAL_IP,
        SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_SNAT, SVC_F_SOURCE_RANGES, Svc4Key, Svc6Key,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Sctp => PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Which view of the services a frontend is in (`proxy_common::service::SCOPE_*`): the
/// in-cluster view (pods, processes on the node) or the external view (the node
/// interfaces, at XDP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    #[default]
    Cluster,
    External,
}

impl Scope {
    pub fn value(self) -> u8 {
        match self {
            Scope::Cluster => SCOPE_CLUSTER_IP,
            Scope::External => SCOPE_EXTERNAL,
        }
    }

    pub fn from_value(v: u8) -> Option<Self> {
        match v {
            SCOPE_CLUSTER_IP => Some(Scope::Cluster),
            SCOPE_EXTERNAL => Some(Scope::External),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Cluster => "cluster",
            Scope::External => "external",
        }
    }
}

/// An address family: which of the `*4` or `*6` maps an entry goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// 0 for IPv4, 1 for IPv6 (to index per-family counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Bits in an address of the family.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The wire bytes of an address (4 or 16).
pub fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `addr:port` as Rust's socket addresses print it (`10.0.0.1:80`, `[fd00::1]:80`).
pub fn host_port(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// One address a service answers on, in one view: address:port/protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

/// The identity of a service entry in `services4` or `services6` (the family is the
/// address's): a [`Frontend`] as the maps hold it, so protocol and scope values no agent
/// writes can still be named (and removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

impl SvcKey {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// The `services4` key (`None` for an IPv6 key).
    pub fn v4(&self) -> Option<Svc4Key> {
        match self.addr {
            IpAddr::V4(a) => Some(Svc4Key {
                addr: a.octets(),
                port: self.port,
                proto: self.proto,
                scope: self.scope,
            }),
            IpAddr::V6(_) => None,
        }
    }

    /// The `services6` key (`None` for an IPv4 key).
    pub fn v6(&self) -> Option<Svc6Key> {
        match self.addr {
            IpAddr::V6(a) => Some(Svc6Key {
                addr: a.octets(),
                port: self.port,
                proto: self.proto,
                scope: self.scope,
            }),
            IpAddr::V4(_) => None,
        }
    }
}

impl From<Svc4Key> for SvcKey {
    fn from(k: Svc4Key) -> Self {
        SvcKey {
            addr: Ipv4Addr::from(k.addr).into(),
            port: k.port,
            proto: k.proto,
            scope: k.scope,
        }
    }
}

impl From<Svc6Key> for SvcKey {
    fn from(k: Svc6Key) -> Self {
        SvcKey {
            addr: Ipv6Addr::from(k.addr).into(),
            port: k.port,
            proto: k.proto,
            scope: k.scope,
        }
    }
}

impl Frontend {
    /// A frontend of the in-cluster view.
    pub fn cluster(addr: impl Into<IpAddr>, port: u16, protocol: Protocol) -> Self {
        Frontend {
            addr: addr.into(),
            port,
            protocol,
            scope: Scope::Cluster,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    pub fn key(&self) -> SvcKey {
        SvcKey {
            addr: self.addr,
            port: self.port,
            proto: self.protocol.number(),
            scope: self.scope.value(),
        }
    }

    /// The frontend of a service key (`None` for an unknown protocol or scope).
    pub fn from_key(key: &SvcKey) -> Option<Self> {
        Some(Frontend {
            addr: key.addr,
            port: key.port,
            protocol: Protocol::from_number(key.proto)?,
            scope: Scope::from_value(key.scope)?,
        })
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", host_port(self.addr, self.port), self.protocol)?;
        if self.scope == Scope::External {
            f.write_str(" (external view)")?;
        }
        Ok(())
    }
}

/// What kind of address of a Service a frontend is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    #[default]
    ClusterIp,
    /// One of `spec.externalIPs`.
    ExternalIp,
    /// A `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
    /// `spec.ports[].nodePort` on one of this node's addresses.
    NodePort,
}

impl FrontendKind {
    /// The `SVC_F_*` flag naming the kind (none for a ClusterIP).
    pub fn flag(self) -> u8 {
        match self {
            FrontendKind::ClusterIp => 0,
            FrontendKind::ExternalIp => SVC_F_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
            FrontendKind::NodePort => SVC_F_NODE_PORT,
        }
    }

    /// The kind named by service flags (the inverse of [`FrontendKind::flag`]).
    pub fn from_flags(flags: u8) -> Self {
        if flags & SVC_F_NODE_PORT != 0 {
            FrontendKind::NodePort
        } else if flags & SVC_F_LOAD_BALANCER != 0 {
            FrontendKind::LoadBalancer
        } else if flags & SVC_F_EXTERNAL_IP != 0 {
            FrontendKind::ExternalIp
        } else {
            FrontendKind::ClusterIp
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::NodePort => "NodePort",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of the policy flags of a service entry (`snat`, `source-ranges`, `drop-empty`),
/// for the CLI and logs; the kind flags are shown as the kind.
pub fn policy_flag_names(flags: u8) -> Vec<&'static str> {
    [
        (SVC_F_SNAT, "snat"),
        (SVC_F_SOURCE_RANGES, "source-ranges"),
        (SVC_F_DROP_EMPTY, "drop-empty"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect()
}

/// An address range (`loadBalancerSourceRanges`, `--nodeport-addresses`) of either family,
/// its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpRange {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpRange {
    /// `addr/prefix_len` with the bits past the prefix cleared (`None` if the prefix is
    /// longer than the family's addresses: over 32 for IPv4, over 128 for IPv6).
    pub fn new(addr: impl Into<IpAddr>, prefix_len: u8) -> Option<Self> {
        let addr = addr.into();
        if prefix_len > Family::of(&addr).bits() {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                // A shift by 32 (prefix 0) overflows: the mask is then 0.
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Some(IpRange { addr, prefix_len })
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// Whether `addr` is in the range (never for an address of the other family).
    pub fn contains(&self, addr: impl Into<IpAddr>) -> bool {
        let addr = addr.into();
        Family::of(&addr) == self.family()
            && IpRange::new(addr, self.prefix_len).is_some_and(|r| r.addr == self.addr)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// kube-proxy's identity of a service port: namespace/name:port-name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// May be empty (a single unnamed port).
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// One backend of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// Only used because no ready endpoint was left (kube-proxy's terminating fallback).
    pub terminating: bool,
    /// Runs on this node (the endpoint's `nodeName` is the agent's node name).
    pub local: bool,
}

/// One service port as the datapath should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub frontend: Frontend,
    pub name: ServicePortName,
    /// Sorted and without duplicates, so equal sets compare equal.
    pub endpoints: Vec<Endpoint>,
    /// ClientIP session affinity; 0 = none.
    pub affinity_timeout_s: u32,
    pub kind: FrontendKind,
    /// The `SVC_F_*` flags of the service entry (the kind's flag included).
    pub flags: u8,
    /// Allowed client ranges when `flags` has `SVC_F_SOURCE_RANGES` (may be empty: then
    /// no client is allowed); sorted, without duplicates.
    pub source_ranges: Vec<IpRange>,
}

/// A scheduler: how a service port picks the backend of a new connection. The value is
/// the `scheduler` byte of the kernel's service entry (`proxy_common::service::SCHED_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scheduler(u8);

impl Scheduler {
    pub const RANDOM: Scheduler = Scheduler(proxy_common::service::SCHED_RANDOM);
    pub const RR: Scheduler = Scheduler(proxy_common::service::SCHED_RR);
    pub const LC: Scheduler = Scheduler(proxy_common::service::SCHED_LC);
    pub const SED: Scheduler = Scheduler(proxy_common::service::SCHED_SED);
    pub const NQ: Scheduler = Scheduler(proxy_common::service::SCHED_NQ);
    pub const SH: Scheduler = Scheduler(proxy_common::service::SCHED_SH);
    pub const DH: Scheduler = Scheduler(proxy_common::service::SCHED_DH);
    pub const MAGLEV: Scheduler = Scheduler(proxy_common::service::SCHED_MAGLEV);

    /// By name, as in the `bpfproxy.io/scheduler` annotation (`random`, `rr`, `lc`, `sed`,
    /// `nq`, `sh`, `dh`, `maglev`).
    pub fn from_name(name: &str) -> Option<Self> {
        SCHED_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| Scheduler(i as u8))
    }

    /// From the kernel's byte (unknown values are kept, and shown as numbers).
    pub fn from_value(value: u8) -> Self {
        Scheduler(value)
    }

    pub fn value(self) -> u8 {
        self.0
    }

    pub fn name(self) -> String {
        SCHED_NAMES
            .get(self.0 as usize)
            .map_or_else(|| self.0.to_string(), |n| n.to_string())
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// How one service port schedules: the scheduler and the backends' weights (1 unless an
/// annotation says otherwise; Kubernetes endpoints carry none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scheduling {
    pub scheduler: Scheduler,
    /// Weight by backend address (1..=255); a backend not listed weighs 1.
    pub weights: BTreeMap<IpAddr, u8>,
}

impl Scheduling {
    /// The weight of a backend.
    pub fn weight(&self, addr: IpAddr) -> u8 {
        self.weights.get(&addr).copied().unwrap_or(1)
    }
}

/// A `spec.healthCheckNodePort` this node answers (LoadBalancer Services with
/// externalTrafficPolicy Local): HTTP 200 while the Service has a ready endpoint on this
/// node, 503 otherwise (terminating endpoints do not count), as kube-proxy does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready IPv4 endpoints of the Service on this node (over its ports, each address
    /// once), answered to IPv4 probes.
    pub local_ready: usize,
    /// Ready IPv6 endpoints of the Service on this node, answered to IPv6 probes (kube-proxy
    /// runs one proxier, so one health server, per family).
    pub local_ready6: usize,
}

/// Everything the cluster wants served, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, DesiredService>,
    /// Services that do not schedule as `Scheduling::default()` (random, all weights 1);
    /// a frontend missing here uses the default.
    pub scheduling: BTreeMap<Frontend, Scheduling>,
    /// Health-check node ports to answer, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl DesiredState {
    /// The scheduling of a frontend.
    pub fn scheduling_of(&self, frontend: &Frontend) -> Scheduling {
        self.scheduling.get(frontend).cloned().unwrap_or_default()
    }
}

pub mod build;
pub mod incremental;

pub use build::{ModelIssue, ModelOptions, Severity, desired_state, desired_state_with};
pub use incremental::Model;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_clear_host_bits_and_contain_their_addresses() {
        let r = IpRange::new(Ipv4Addr::new(192, 168, 7, 9), 16).unwrap();
        assert_eq!(r.to_string(), "192.168.0.0/16");
        assert!(r.contains(Ipv4Addr::new(192, 168, 200, 1)));
        assert!(!r.contains(Ipv4Addr::new(192, 169, 0, 1)));
        let all = IpRange::new(Ipv4Addr::new(1, 2, 3, 4), 0).unwrap();
        assert_eq!(all.to_string(), "0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(
            IpRange::new(Ipv4Addr::new(1, 2, 3, 4), 32).unwrap().addr,
            Ipv4Addr::new(1, 2, 3, 4)
        );
        assert_eq!(IpRange::new(Ipv4Addr::new(1, 2, 3, 4), 33), None);
    }

    #[test]
    fn ipv6_ranges_clear_host_bits_and_keep_to_their_family() {
        let a: Ipv6Addr = "fd00:203:0:7::9".parse().unwrap();
        let r = IpRange::new(a, 48).unwrap();
        assert_eq!(r.to_string(), "fd00:203::/48");
        assert!(r.contains("fd00:203:0:ffff::1".parse::<Ipv6Addr>().unwrap()));
        assert!(!r.contains("fd00:204::1".parse::<Ipv6Addr>().unwrap()));
        assert_eq!(IpRange::new(a, 128).unwrap().addr, a);
        assert_eq!(IpRange::new(a, 129), None);
        let all = IpRange::new(a, 0).unwrap();
        assert_eq!(all.to_string(), "::/0");
        assert!(all.contains("2001:db8::1".parse::<Ipv6Addr>().unwrap()));
        // The other family is never inside, even under a /0.
        assert!(!all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let v4_all = IpRange::new(Ipv4Addr::UNSPECIFIED, 0).unwrap();
        assert!(!v4_all.contains(Ipv6Addr::LOCALHOST));
        assert_eq!(r.family(), Family::V6);
    }

    #[test]
    fn kinds_and_flags_round_trip() {
        for kind in [
            FrontendKind::ClusterIp,
            FrontendKind::ExternalIp,
            FrontendKind::LoadBalancer,
            FrontendKind::NodePort,
        ] {
            assert_eq!(FrontendKind::from_flags(kind.flag() | SVC_F_SNAT), kind);
        }
        assert_eq!(
            policy_flag_names(SVC_F_SNAT | SVC_F_DROP_EMPTY | SVC_F_NODE_PORT),
            ["snat", "drop-empty"]
        );
        let f = Frontend {
            scope: Scope::External,
            ..Frontend::cluster(Ipv4Addr::new(192, 0, 2, 1), 30080, Protocol::Tcp)
        };
        assert_eq!(Frontend::from_key(&f.key()), Some(f));
        assert_eq!(f.to_string(), "192.0.2.1:30080/TCP (external view)");
        assert_eq!(
            SvcKey::from(f.key().v4().unwrap()),
            f.key(),
            "services4 keys round-trip"
        );
        assert_eq!(f.key().v6(), None);
        let f6 = Frontend {
            scope: Scope::External,
            ..Frontend::cluster("fd00::1".parse::<Ipv6Addr>().unwrap(), 80, Protocol::Udp)
        };
        assert_eq!(Frontend::from_key(&f6.key()), Some(f6));
        assert_eq!(SvcKey::from(f6.key().v6().unwrap()), f6.key());
        assert_eq!(f6.key().v4(), None);
        assert_eq!(f6.to_string(), "[fd00::1]:80/UDP (external view)");
    }
}
