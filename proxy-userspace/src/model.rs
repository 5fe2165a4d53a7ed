//! What the cluster wants: a pure model of the desired services, built from Service and
//! EndpointSlice objects with kube-proxy's rules. No kernel, no I/O: easy to unit-test.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use proxy_common::{
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    service::{SCHED_NAMES, SCOPE_CLUSTER_IP, Svc4Key},
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

/// One address a service answers on: ClusterIP:port/protocol (NodePort and external
/// addresses come as other scopes later).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    pub fn key(&self) -> Svc4Key {
        Svc4Key {
            addr: self.addr.octets(),
            port: self.port,
            proto: self.protocol.number(),
            scope: SCOPE_CLUSTER_IP,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
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
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Only used because no ready endpoint was left (kube-proxy's terminating fallback).
    pub terminating: bool,
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
    pub weights: BTreeMap<Ipv4Addr, u8>,
}

impl Scheduling {
    /// The weight of a backend.
    pub fn weight(&self, addr: Ipv4Addr) -> u8 {
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
    /// Ready endpoints of the Service on this node (over its ports, each address once).
    pub local_ready: usize,
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
