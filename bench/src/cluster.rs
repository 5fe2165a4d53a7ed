//! The synthetic cluster every contender is programmed with: filler services with a few
//! endpoints each on addresses no packet is ever sent to, and (for the end-to-end runs) the
//! measured service last, so that it is the last rule of iptables' KUBE-SERVICES chain.
//!
//! ClusterIPs of fillers are 10.100.0.0 + i, their endpoints 10.128.0.0 + i * k + j port
//! 8080; an endpoint change gives endpoint k-1 of a service the address 10.160.0.0 + i.
//! These addresses only ever appear in maps and rules.

use std::net::Ipv4Addr;

use bpfproxy::model::{
    DesiredService, DesiredState, Endpoint, Frontend, Protocol, ServicePortName,
};
use testbed::manifests::{self, EndpointSlice, Service};

pub const NAMESPACE: &str = "bench";
/// The service the end-to-end client talks to.
pub const MEASURED_NAME: &str = "measured";
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const MEASURED_PORT: u16 = 80;
pub const PORT_NAME: &str = "http";
const FILLER_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 0);
const FILLER_ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const CHANGED_ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 160, 0, 0);
const FILLER_PORT: u16 = 80;
const FILLER_TARGET_PORT: u16 = 8080;

/// One TCP service port and its endpoints (all on one target port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthService {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

/// Filler service `i` with `endpoints` endpoints.
pub fn filler(i: usize, endpoints: usize) -> SynthService {
    SynthService {
        namespace: NAMESPACE.into(),
        name: format!("svc-{i}"),
        vip: offset(FILLER_VIP_BASE, i),
        port: FILLER_PORT,
        endpoints: (0..endpoints)
            .map(|j| {
                (
                    offset(FILLER_ENDPOINT_BASE, i * endpoints + j),
                    FILLER_TARGET_PORT,
                )
            })
            .collect(),
    }
}

/// `count` filler services.
pub fn fillers(count: usize, endpoints: usize) -> Vec<SynthService> {
    (0..count).map(|i| filler(i, endpoints)).collect()
}

/// `total` services: fillers, then `measured` last.
pub fn with_measured(total: usize, endpoints: usize, measured: SynthService) -> Vec<SynthService> {
    let mut all = fillers(total.saturating_sub(1), endpoints);
    all.push(measured);
    all
}

/// The end-to-end service: [`MEASURED_VIP`]:80 to the backend pods' port 80.
pub fn measured(backends: &[Ipv4Addr]) -> SynthService {
    SynthService {
        namespace: NAMESPACE.into(),
        name: MEASURED_NAME.into(),
        vip: MEASURED_VIP,
        port: MEASURED_PORT,
        endpoints: backends.iter().map(|ip| (*ip, MEASURED_PORT)).collect(),
    }
}

/// The same service with its last endpoint moved to a fresh address (index `i` makes it
/// unique): one endpoint gone, one new.
pub fn with_changed_endpoint(svc: &SynthService, i: usize) -> SynthService {
    let mut changed = svc.clone();
    if let Some(last) = changed.endpoints.last_mut() {
        *last = (offset(CHANGED_ENDPOINT_BASE, i), last.1);
    }
    changed
}

impl SynthService {
    pub fn port_name(&self) -> ServicePortName {
        ServicePortName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port_name: PORT_NAME.into(),
            protocol: Protocol::Tcp,
        }
    }

    pub fn frontend(&self) -> Frontend {
        Frontend::cluster(self.vip, self.port, Protocol::Tcp)
    }

    pub fn desired(&self) -> DesiredService {
        let mut endpoints: Vec<Endpoint> = self
            .endpoints
            .iter()
            .map(|&(addr, port)| Endpoint {
                addr: addr.into(),
                port,
                terminating: false,
                local: false,
            })
            .collect();
        endpoints.sort();
        endpoints.dedup();
        DesiredService {
            frontend: self.frontend(),
            name: self.port_name(),
            endpoints,
            affinity_timeout_s: 0,
            kind: Default::default(),
            flags: 0,
            source_ranges: Vec::new(),
        }
    }

    fn target_port(&self) -> u16 {
        self.endpoints.first().map_or(self.port, |e| e.1)
    }

    /// The Service and EndpointSlice as YAML documents.
    pub fn manifests(&self) -> [String; 2] {
        let service = Service::cluster_ip(&self.namespace, &self.name, self.vip).port(
            PORT_NAME,
            "TCP",
            self.port,
            self.target_port(),
        );
        let mut slice = EndpointSlice::for_service(&self.namespace, &self.name, "bench").port(
            PORT_NAME,
            "TCP",
            self.target_port(),
        );
        for (j, (ip, _)) in self.endpoints.iter().enumerate() {
            slice = slice.ready(&format!("{}-{j}", self.name), *ip);
        }
        [service.to_yaml(), slice.to_yaml()]
    }
}

/// What the agent's model would build from these services.
pub fn desired_state(services: &[SynthService]) -> DesiredState {
    let mut state = DesiredState::default();
    for s in services {
        state.services.insert(s.frontend(), s.desired());
    }
    state
}

/// Every service as one multi-document YAML file.
pub fn manifests_yaml(services: &[SynthService]) -> String {
    let docs: Vec<String> = services.iter().flat_map(SynthService::manifests).collect();
    manifests::documents(&docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_do_not_collide() {
        let all = with_measured(1_000, 2, measured(&[Ipv4Addr::new(10, 240, 2, 1)]));
        assert_eq!(all.len(), 1_000);
        assert_eq!(all.last().unwrap().name, MEASURED_NAME);
        let state = desired_state(&all);
        assert_eq!(state.services.len(), 1_000);
        let mut eps: Vec<_> = all.iter().flat_map(|s| s.endpoints.clone()).collect();
        let n = eps.len();
        eps.sort();
        eps.dedup();
        assert_eq!(eps.len(), n);
    }

    #[test]
    fn a_changed_endpoint_is_new() {
        let s = filler(7, 2);
        let c = with_changed_endpoint(&s, 7);
        assert_eq!(c.endpoints[0], s.endpoints[0]);
        assert_ne!(c.endpoints[1], s.endpoints[1]);
    }

    #[test]
    fn manifests_parse_into_the_same_model() {
        let all = with_measured(3, 2, measured(&[Ipv4Addr::new(10, 240, 2, 1)]));
        let yaml = manifests_yaml(&all);
        let parsed = bpfproxy::manifest::parse_file(std::path::Path::new("x.yaml"), &yaml)
            .expect("manifests parse");
        let (state, issues) =
            bpfproxy::model::desired_state(&parsed.objects.services, &parsed.objects.slices);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(state, desired_state(&all));
    }
}
