//! Building the [`DesiredState`] from Service and EndpointSlice objects, with kube-proxy's
//! rules (see `shared/kubernetes-service-semantics.md`):
//!
//! - Services: skipped when headless (`clusterIP` None or empty), `ExternalName`, or labelled
//!   `service.kubernetes.io/service-proxy-name` / `service.kubernetes.io/headless`. One
//!   [`DesiredService`] per (address, port, protocol, view).
//! - Families (dual stack): kube-proxy runs one proxier per IP family, each serving only
//!   the Services with a ClusterIP of its family (pkg/proxy/servicechangetracker.go,
//!   `serviceToServiceMap` with `GetClusterIPByFamily`), and of those only the externalIPs,
//!   LoadBalancer ingress IPs, loadBalancerSourceRanges (pkg/proxy/serviceport.go,
//!   `newBaseServiceInfo`, with `MapIPsByIPFamily`/`MapCIDRsByIPFamily`), NodePort
//!   addresses and endpoints (slices of its `addressType`) of its family. Here both
//!   families are built side by side: a Service gets, per family it has a ClusterIP of,
//!   the frontends and endpoints of that family only. The address decides its family
//!   (`spec.ipFamilies` is not read: the API server keeps them in step).
//! - EndpointSlices: the same label filter; grouped by `kubernetes.io/service-name` and
//!   namespace; `IPv4` and `IPv6` slices (FQDN ones are ignored); only `addresses[0]` of
//!   an endpoint; merged over slices with duplicates (same IP:port) resolved in favour of
//!   the non-terminating copy.
//! - Backends of a service port: the slice ports with the same name and protocol (the
//!   Service's `targetPort` is never read), of the frontend's family; ready endpoints, or,
//!   when none of that family is ready, its serving and terminating ones.
//! - Addresses are normalised as Kubernetes parses them (IPv4 leading zeros read as
//!   decimal, IPv6 in its canonical form, IPv4-mapped IPv6 as IPv4).
//!
//! Nothing here fails: whatever cannot be served is left out and reported as a
//! [`ModelIssue`] naming the object and field.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice},
};

use proxy_common::service::{SVC_F_DROP_EMPTY, SVC_F_SNAT, SVC_F_SOURCE_RANGES};

use super::{
    DesiredService, DesiredState, Endpoint, Family, Frontend, FrontendKind, HealthCheck, IpRange,
    Protocol, Scheduler, Scheduling, Scope, ServicePortName,
};

/// Label that hands a Service (or slice) to another proxy; kube-proxy ignores such objects.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that marks a Service (or slice) headless.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Annotation of a Service choosing its scheduler (`rr`, `maglev`, ...).
pub const ANNOTATION_SCHEDULER: &str = "bpfproxy.io/scheduler";
/// Annotation of a Service giving backend weights: `10.244.1.5=3,fd00::7=2` (address `=`
/// weight 1..=255; unlisted backends weigh 1).
pub const ANNOTATION_WEIGHTS: &str = "bpfproxy.io/weights";

/// Choices of the operator that the model applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelOptions {
    /// The scheduler of Services without a `bpfproxy.io/scheduler` annotation.
    pub default_scheduler: Scheduler,
    /// This node's name: endpoints whose `nodeName` is this one are local (traffic
    /// policies Local, `BACKEND_LOCAL`, health checks). `None`: no endpoint is local.
    pub node_name: Option<String>,
    /// The addresses NodePorts are served on (`--nodeport-addresses` applied to the
    /// node's addresses), one NodePort frontend each; a Service's NodePorts go on those of
    /// the families it has a ClusterIP of.
    pub node_addresses: Vec<IpAddr>,
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not set.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest valid affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// How much a [`ModelIssue`] matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// Something the user most likely got wrong: a part of an object is not served.
    Warning,
    /// Expected in some setups (an address of a family the Service has no ClusterIP of);
    /// for the log.
    Notice,
}

/// Something in an object the model could not serve as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelIssue {
    pub severity: Severity,
    /// Kind and namespace/name, e.g. `Service default/myapp`.
    pub object: String,
    /// The field path, e.g. `spec.ports[1].protocol`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ModelIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// Parses an IPv4 address the way Kubernetes does for legacy objects (Go's
/// `netutils.ParseIPSloppy`): four decimal parts, leading zeros allowed and read as decimal
/// (`010.001.0.1` is 10.1.0.1), where Rust's parser would reject them.
pub fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse::<u16>().ok()?.try_into().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// A Kubernetes protocol name; `None` (not set) is TCP.
pub fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    match p {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(_) => None,
    }
}

/// Parses an IP address of either family as Kubernetes does (Go's `ParseIPSloppy`): IPv4
/// with [`parse_ipv4`]; IPv6 in any of its spellings (leading zeros, upper case, `::`,
/// embedded IPv4), kept in one canonical value; an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.1`) is the IPv4 address, as Go reads it. Zones (`%eth0`) are refused.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Some(a) = parse_ipv4(s) {
        return Some(IpAddr::V4(a));
    }
    let a = s.parse::<Ipv6Addr>().ok()?;
    Some(match a.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(a),
    })
}

/// A CIDR (`loadBalancerSourceRanges`) as Go's `ParseCIDRSloppy` reads it: an address of
/// either family (see [`parse_ip`]), `/`, and a prefix length of at most its bits; host
/// bits are cleared.
pub fn parse_ip_range(s: &str) -> Option<IpRange> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let addr = parse_ip(addr)?;
    IpRange::new(addr, len.parse().ok()?)
}

fn has_label(labels: Option<&BTreeMap<String, String>>, key: &str) -> bool {
    labels.is_some_and(|l| l.contains_key(key))
}

/// One backend candidate before the ready/terminating selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    ready: bool,
    serving: bool,
    terminating: bool,
    /// The endpoint's `nodeName` is this node.
    local: bool,
}

/// The endpoints of one (namespace, service, port name, protocol), both families, keyed by
/// IP:port.
pub(crate) type CandidateSet = BTreeMap<(IpAddr, u16), Candidate>;

/// (namespace, service name, port name, protocol).
type PortGroupKey = (String, String, String, Protocol);

struct Builder {
    issues: Vec<ModelIssue>,
}

impl Builder {
    fn issue(&mut self, severity: Severity, object: &str, field: String, message: String) {
        self.issues.push(ModelIssue {
            severity,
            object: object.to_string(),
            field,
            message,
        });
    }

    /// Merges the IPv4 and IPv6 slices into candidate sets per service port.
    fn collect_endpoints(
        &mut self,
        slices: &[EndpointSlice],
        node_name: Option<&str>,
    ) -> BTreeMap<PortGroupKey, CandidateSet> {
        // Slices in namespace/name order, so the outcome never depends on input order.
        let mut sorted: Vec<&EndpointSlice> = slices.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        let mut groups: BTreeMap<PortGroupKey, CandidateSet> = BTreeMap::new();
        for slice in sorted {
            let part = slice_part(slice, node_name);
            self.issues.extend(part.issues);
            let Some(service) = part.service else {
                continue;
            };
            let namespace = slice.metadata.namespace.clone().unwrap_or_default();
            for (port_name, protocol, number) in &part.ports {
                let key = (
                    namespace.clone(),
                    service.clone(),
                    port_name.clone(),
                    *protocol,
                );
                let set = groups.entry(key).or_default();
                for &(addr, candidate) in &part.endpoints {
                    merge_candidate(set, (addr, *number), candidate);
                }
            }
        }
        groups
    }

    /// The part of one slice (see [`slice_part`]), its issues left in `self`.
    fn slice(&mut self, slice: &EndpointSlice, node_name: Option<&str>) -> SlicePart {
        let mut part = SlicePart::default();
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let object = format!(
            "EndpointSlice {namespace}/{}",
            slice.metadata.name.as_deref().unwrap_or("")
        );
        let labels = slice.metadata.labels.as_ref();
        if has_label(labels, LABEL_SERVICE_PROXY_NAME) || has_label(labels, LABEL_HEADLESS) {
            return part;
        }
        let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            self.issue(
                Severity::Notice,
                &object,
                "metadata.labels".into(),
                format!("no {LABEL_SERVICE_NAME} label, so it belongs to no Service; ignored"),
            );
            return part;
        };
        // Each proxier of kube-proxy reads the slices of its family only
        // (pkg/proxy/endpointschangetracker.go); FQDN slices have no meaning for a proxy.
        let family = match slice.address_type.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            _ => return part,
        };
        part.service = Some(service.clone());
        part.endpoints = slice
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| self.candidate(&object, i, e, family, node_name))
            .collect();
        for (pi, port) in slice.ports.iter().flatten().enumerate() {
            let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
                self.issue(
                    Severity::Warning,
                    &object,
                    format!("ports[{pi}].protocol"),
                    format!(
                        "{:?} is not TCP, UDP or SCTP; port ignored",
                        port.protocol.as_deref().unwrap_or("")
                    ),
                );
                continue;
            };
            let number = match port.port {
                // No port (means "all ports") or 0: kube-proxy skips it.
                None | Some(0) => continue,
                Some(p) => match u16::try_from(p) {
                    Ok(p) => p,
                    Err(_) => {
                        self.issue(
                            Severity::Warning,
                            &object,
                            format!("ports[{pi}].port"),
                            format!("{p} is out of range 1-65535; port ignored"),
                        );
                        continue;
                    }
                },
            };
            part.ports
                .push((port.name.clone().unwrap_or_default(), protocol, number));
        }
        part
    }

    fn candidate(
        &mut self,
        object: &str,
        index: usize,
        endpoint: &SliceEndpoint,
        family: Family,
        node_name: Option<&str>,
    ) -> Option<(IpAddr, Candidate)> {
        // Only addresses[0] is used, as kube-proxy does; an endpoint without one is skipped.
        let first = endpoint.addresses.first()?;
        // An address of the other family than the slice's addressType is skipped, as
        // kube-proxy's endpoint slice cache does.
        let Some(addr) = parse_ip(first).filter(|a| Family::of(a) == family) else {
            self.issue(
                Severity::Warning,
                object,
                format!("endpoints[{index}].addresses[0]"),
                format!(
                    "{first:?} is not an {} address (the slice's addressType); endpoint ignored",
                    family.name()
                ),
            );
            return None;
        };
        let c = endpoint.conditions.as_ref();
        Some((
            addr,
            Candidate {
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                local: node_name.is_some() && endpoint.node_name.as_deref() == node_name,
            },
        ))
    }

    /// The ClusterIPs of a Service, at most one per family, in `spec.clusterIPs` order
    /// (`spec.clusterIP` when that is not set); empty when it is not to be served.
    fn cluster_ips(&mut self, object: &str, svc: &Service) -> Vec<IpAddr> {
        let Some(spec) = svc.spec.as_ref() else {
            return Vec::new();
        };
        let single = spec.cluster_ip.as_deref().unwrap_or("");
        // `clusterIPs` (dual stack) holds `clusterIP` first, then the other family's.
        let (field, ips): (&str, Vec<&str>) = match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => {
                ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
            }
            _ => ("spec.clusterIP", vec![single]),
        };
        if ips.iter().all(|ip| ip.is_empty()) {
            // kube-proxy treats an unset ClusterIP as headless. An API server always sets
            // it, so here it is a manifest that forgot it: say so.
            self.issue(
                Severity::Notice,
                object,
                "spec.clusterIP".into(),
                "not set, so the Service is handled as headless; set an address (standalone mode allocates none)".into(),
            );
            return Vec::new();
        }
        if ips.contains(&"None") {
            return Vec::new();
        }
        let mut out: Vec<IpAddr> = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let at = if field == "spec.clusterIPs" {
                format!("{field}[{i}]")
            } else {
                field.to_string()
            };
            match parse_ip(ip) {
                None => self.issue(
                    Severity::Warning,
                    object,
                    at,
                    format!("{ip:?} is not an IP address; not served"),
                ),
                Some(a) => {
                    if let Some(first) = out.iter().find(|o| Family::of(o) == Family::of(&a)) {
                        // The API server allows one per family; kube-proxy takes the one
                        // `ipFamilies` names, which is the first.
                        self.issue(
                            Severity::Warning,
                            object,
                            at,
                            format!(
                                "{ip:?}: a second {} ClusterIP (after {first}); ignored",
                                Family::of(&a).name()
                            ),
                        );
                    } else {
                        out.push(a);
                    }
                }
            }
        }
        out
    }

    /// The scheduler and weights of a Service, from its annotations.
    fn scheduling(&mut self, object: &str, svc: &Service, default: Scheduler) -> Scheduling {
        let annotations = svc.metadata.annotations.as_ref();
        let scheduler = match annotations.and_then(|a| a.get(ANNOTATION_SCHEDULER)) {
            None => default,
            Some(name) => match Scheduler::from_name(name.trim()) {
                Some(s) => s,
                None => {
                    self.issue(
                        Severity::Warning,
                        object,
                        format!("metadata.annotations[{ANNOTATION_SCHEDULER}]"),
                        format!(
                            "{name:?} is not one of {}; using {default}",
                            proxy_common::service::SCHED_NAMES.join(", ")
                        ),
                    );
                    default
                }
            },
        };
        let mut weights = BTreeMap::new();
        if let Some(list) = annotations.and_then(|a| a.get(ANNOTATION_WEIGHTS)) {
            let field = format!("metadata.annotations[{ANNOTATION_WEIGHTS}]");
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let parsed = item
                    .split_once('=')
                    .and_then(|(a, w)| Some((parse_ip(a.trim())?, w.trim().parse::<u8>().ok()?)));
                match parsed {
                    Some((addr, w)) if w >= 1 => {
                        weights.insert(addr, w);
                    }
                    _ => self.issue(
                        Severity::Warning,
                        object,
                        field.clone(),
                        format!("{item:?} is not ADDRESS=WEIGHT with a weight of 1-255; ignored"),
                    ),
                }
            }
        }
        weights.retain(|_, w| *w != 1);
        Scheduling { scheduler, weights }
    }

    fn affinity(&mut self, object: &str, svc: &Service) -> u32 {
        let Some(spec) = svc.spec.as_ref() else {
            return 0;
        };
        match spec.session_affinity.as_deref() {
            None | Some("None") => 0,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT_S,
                    Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S as i32).contains(&t) => t as u32,
                    Some(t) => {
                        self.issue(
                            Severity::Warning,
                            object,
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                            format!(
                                "{t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}; using {DEFAULT_AFFINITY_TIMEOUT_S}"
                            ),
                        );
                        DEFAULT_AFFINITY_TIMEOUT_S
                    }
                }
            }
            Some(other) => {
                self.issue(
                    Severity::Warning,
                    object,
                    "spec.sessionAffinity".into(),
                    format!("{other:?} is not None or ClientIP; no affinity"),
                );
                0
            }
        }
    }

    /// The frontend of one Service port, or `None` (reported) when it cannot be served.
    fn frontend(
        &mut self,
        object: &str,
        index: usize,
        addr: IpAddr,
        port: &ServicePort,
    ) -> Option<Frontend> {
        let Some(protocol) = parse_protocol(port.protocol.as_deref()) else {
            self.issue(
                Severity::Warning,
                object,
                format!("spec.ports[{index}].protocol"),
                format!(
                    "{:?} is not TCP, UDP or SCTP; port not served",
                    port.protocol.as_deref().unwrap_or("")
                ),
            );
            return None;
        };
        let number = match u16::try_from(port.port) {
            Ok(p) if p != 0 => p,
            _ => {
                self.issue(
                    Severity::Warning,
                    object,
                    format!("spec.ports[{index}].port"),
                    format!("{} is out of range 1-65535; port not served", port.port),
                );
                return None;
            }
        };
        Some(Frontend::cluster(addr, number, protocol))
    }

    /// The addresses of a list of `field` (`spec.externalIPs`), both families, each once;
    /// invalid ones are reported.
    fn ip_list<'s>(
        &mut self,
        object: &str,
        field: &str,
        list: impl Iterator<Item = (usize, &'s str)>,
    ) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (i, ip) in list {
            match parse_ip(ip) {
                Some(a) => {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                None => self.issue(
                    Severity::Warning,
                    object,
                    field.replace("[]", &format!("[{i}]")),
                    format!("{ip:?} is not an IP address; ignored"),
                ),
            }
        }
        out
    }

    /// `spec.loadBalancerSourceRanges` (whitespace trimmed, as kube-proxy does): the valid
    /// ranges of both families, sorted; invalid ones are reported and ignored, as
    /// kube-proxy's `MapCIDRsByIPFamily` (pkg/proxy/util/utils.go) skips them.
    fn source_ranges(&mut self, object: &str, ranges: &[String]) -> Vec<IpRange> {
        let mut out = Vec::new();
        for (i, raw) in ranges.iter().enumerate() {
            match parse_ip_range(raw.trim()) {
                Some(range) => out.push(range),
                None => self.issue(
                    Severity::Warning,
                    object,
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{raw:?} is not a CIDR (address/prefix length); ignored"),
                ),
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Adds a candidate for IP:port, keeping the non-terminating copy of a duplicate.
pub(crate) fn merge_candidate(set: &mut CandidateSet, key: (IpAddr, u16), candidate: Candidate) {
    match set.entry(key) {
        Entry::Vacant(v) => {
            v.insert(candidate);
        }
        Entry::Occupied(mut o) => {
            if o.get().terminating && !candidate.terminating {
                o.insert(candidate);
            }
        }
    }
}

/// The endpoints of `family`: ready ones; when none of that family is ready, its serving
/// and terminating ones (marked terminating). Sorted and unique. kube-proxy's cluster
/// policy, in the proxier of that family.
pub(crate) fn select_endpoints(set: Option<&CandidateSet>, family: Family) -> Vec<Endpoint> {
    select_where(set, family, |_| true)
}

/// The local endpoints of `family`: ready ones; when no local one is ready, the local
/// serving and terminating ones. kube-proxy's Local policy (whatever the other nodes have).
pub(crate) fn select_local(set: Option<&CandidateSet>, family: Family) -> Vec<Endpoint> {
    select_where(set, family, |c| c.local)
}

fn select_where(
    set: Option<&CandidateSet>,
    family: Family,
    keep: impl Fn(&Candidate) -> bool,
) -> Vec<Endpoint> {
    let Some(set) = set else { return Vec::new() };
    let endpoint = |(&(addr, port), c): (&(IpAddr, u16), &Candidate)| Endpoint {
        addr,
        port,
        terminating: !c.ready,
        local: c.local,
    };
    let of_family = |(key, _): &(&(IpAddr, u16), &Candidate)| Family::of(&key.0) == family;
    let ready: Vec<Endpoint> = set
        .iter()
        .filter(of_family)
        .filter(|(_, c)| c.ready && keep(c))
        .map(endpoint)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    // The map is keyed by IP:port, so both lists come out sorted and unique.
    set.iter()
        .filter(of_family)
        .filter(|(_, c)| c.serving && c.terminating && keep(c))
        .map(endpoint)
        .collect()
}

/// Ready local endpoints of `family` of a Service over all its slice ports, each address
/// once (what its health-check node port reports to that family's clients, as each
/// proxier of kube-proxy counts its own family; terminating endpoints do not count).
pub(crate) fn local_ready<'s>(
    sets: impl Iterator<Item = &'s CandidateSet>,
    family: Family,
) -> usize {
    let mut addrs = std::collections::BTreeSet::new();
    for set in sets {
        for (&(addr, _), c) in set {
            if c.ready && c.local && Family::of(&addr) == family {
                addrs.insert(addr);
            }
        }
    }
    addrs.len()
}

/// Builds what the datapath should serve from Service and EndpointSlice objects, with
/// kube-proxy's rules (see the module docs). The result never depends on the order of the
/// inputs. Objects or parts that cannot be served are left out and reported.
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
) -> (DesiredState, Vec<ModelIssue>) {
    desired_state_with(services, slices, &ModelOptions::default())
}

/// [`desired_state`] with the operator's options (default scheduler, node name and
/// addresses).
pub fn desired_state_with(
    services: &[Service],
    slices: &[EndpointSlice],
    options: &ModelOptions,
) -> (DesiredState, Vec<ModelIssue>) {
    let mut b = Builder { issues: Vec::new() };
    let endpoints = b.collect_endpoints(slices, options.node_name.as_deref());

    // Services in namespace/name order: on a frontend claimed twice the first one wins.
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });

    let mut state = DesiredState::default();
    // Which Service holds each frontend, and through which port index.
    let mut owners: BTreeMap<Frontend, (String, usize)> = BTreeMap::new();
    let mut health_owners: BTreeMap<u16, String> = BTreeMap::new();
    for svc in sorted {
        let part = service_part(svc, options);
        b.issues.extend(part.issues.iter().cloned());
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let object = service_object(&namespace, &name);
        for port in &part.ports {
            match owners.entry(port.frontend) {
                Entry::Occupied(o) => {
                    let (owner, owner_port) = o.get();
                    b.issues
                        .push(claimed_issue(&object, port, owner, *owner_port));
                    continue;
                }
                Entry::Vacant(v) => {
                    v.insert((object.clone(), port.index));
                }
            }
            let group = (
                namespace.clone(),
                name.clone(),
                port.name.port_name.clone(),
                port.frontend.protocol,
            );
            state
                .services
                .insert(port.frontend, part.desired(port, endpoints.get(&group)));
            if part.scheduling != Scheduling::default() {
                state
                    .scheduling
                    .insert(port.frontend, part.scheduling.clone());
            }
        }
        if let Some(hc_port) = part.health_check {
            match health_owners.entry(hc_port) {
                Entry::Occupied(o) => {
                    b.issues
                        .push(health_claimed_issue(&object, hc_port, o.get()));
                }
                Entry::Vacant(v) => {
                    v.insert(object.clone());
                    let sets: Vec<&CandidateSet> = endpoints
                        .range(
                            (
                                namespace.clone(),
                                name.clone(),
                                String::new(),
                                Protocol::Tcp,
                            )..,
                        )
                        .take_while(|((ns, n, ..), _)| *ns == namespace && *n == name)
                        .map(|(_, set)| set)
                        .collect();
                    state.health_checks.insert(
                        hc_port,
                        HealthCheck {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            local_ready: local_ready(sets.iter().copied(), Family::V4),
                            local_ready6: local_ready(sets.iter().copied(), Family::V6),
                        },
                    );
                }
            }
        }
    }
    (state, b.issues)
}

/// `Service namespace/name`, as issues name a Service.
pub(crate) fn service_object(namespace: &str, name: &str) -> String {
    format!("Service {namespace}/{name}")
}

/// The issue of a Service port whose frontend `owner` (which sorts first) already holds.
pub(crate) fn claimed_issue(
    object: &str,
    port: &PortPart,
    owner: &str,
    owner_port: usize,
) -> ModelIssue {
    let what = match port.kind {
        FrontendKind::ClusterIp => "port".to_string(),
        kind => format!("{kind} frontend"),
    };
    ModelIssue {
        severity: Severity::Warning,
        object: object.to_string(),
        field: format!("spec.ports[{}]", port.index),
        message: format!(
            "{} is also claimed by {owner} (spec.ports[{owner_port}]), which sorts first and keeps it; {what} ignored",
            port.frontend
        ),
    }
}

/// The issue of a Service whose health-check node port `owner` (which sorts first)
/// already answers.
pub(crate) fn health_claimed_issue(object: &str, port: u16, owner: &str) -> ModelIssue {
    ModelIssue {
        severity: Severity::Warning,
        object: object.to_string(),
        field: "spec.healthCheckNodePort".into(),
        message: format!(
            "{port} is also claimed by {owner}, which sorts first and keeps it; not answered for this Service"
        ),
    }
}

/// What one EndpointSlice contributes, parsed once: its Service (in its namespace), its
/// usable ports and its endpoints (of its addressType's family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SlicePart {
    /// The Service's name; `None` when the slice is ignored (labels, address type).
    pub service: Option<String>,
    /// (port name, protocol, number) of each usable port, in order.
    pub ports: Vec<(String, Protocol, u16)>,
    pub endpoints: Vec<(IpAddr, Candidate)>,
    pub issues: Vec<ModelIssue>,
}

/// The [`SlicePart`] of one EndpointSlice; `node_name` decides which endpoints are local.
pub(crate) fn slice_part(slice: &EndpointSlice, node_name: Option<&str>) -> SlicePart {
    let mut b = Builder { issues: Vec::new() };
    let mut part = b.slice(slice, node_name);
    part.issues = b.issues;
    part
}

impl SlicePart {
    /// Merges the candidates of `port_name`/`protocol` into `set`.
    pub(crate) fn merge_into(&self, set: &mut CandidateSet, port_name: &str, protocol: Protocol) {
        for (name, proto, number) in &self.ports {
            if name == port_name && *proto == protocol {
                for &(addr, candidate) in &self.endpoints {
                    merge_candidate(set, (addr, *number), candidate);
                }
            }
        }
    }

    /// Merges all its ports' candidates into `sets`, by (port name, protocol).
    pub(crate) fn merge_all(&self, sets: &mut BTreeMap<(String, Protocol), CandidateSet>) {
        for (name, proto, number) in &self.ports {
            let set = sets.entry((name.clone(), *proto)).or_default();
            for &(addr, candidate) in &self.endpoints {
                merge_candidate(set, (addr, *number), candidate);
            }
        }
    }
}

/// Which endpoints a frontend gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    /// All of the cluster's (ready, else serving and terminating).
    Cluster,
    /// This node's only (a traffic policy Local); none while others exist means drop.
    Local,
}

/// One served frontend of a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortPart {
    pub frontend: Frontend,
    /// Index in `spec.ports`.
    pub index: usize,
    pub name: ServicePortName,
    pub kind: FrontendKind,
    pub policy: Policy,
    /// `SVC_F_*` flags that do not depend on the endpoints.
    pub flags: u8,
    pub source_ranges: Vec<IpRange>,
}

/// What one Service contributes without its endpoints, parsed once: its served frontends
/// (each once, the first port claiming it wins), affinity and scheduling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServicePart {
    pub ports: Vec<PortPart>,
    pub affinity_timeout_s: u32,
    pub scheduling: Scheduling,
    /// `spec.healthCheckNodePort` when this node answers it (type LoadBalancer,
    /// externalTrafficPolicy Local).
    pub health_check: Option<u16>,
    pub issues: Vec<ModelIssue>,
}

impl ServicePart {
    /// The desired service of one of its frontends, given the candidates of its port.
    /// Only endpoints of the frontend's family count, as in kube-proxy's proxier of that
    /// family (for the terminating fallback and the drop-or-reject choice too).
    pub(crate) fn desired(&self, port: &PortPart, set: Option<&CandidateSet>) -> DesiredService {
        let family = port.frontend.family();
        let cluster = select_endpoints(set, family);
        let (endpoints, flags) = match port.policy {
            Policy::Cluster => (cluster, port.flags),
            Policy::Local => {
                let local = select_local(set, family);
                // kube-proxy: no endpoint at all rejects; endpoints only elsewhere drop.
                let drop = if local.is_empty() && !cluster.is_empty() {
                    SVC_F_DROP_EMPTY
                } else {
                    0
                };
                (local, port.flags | drop)
            }
        };
        DesiredService {
            frontend: port.frontend,
            name: port.name.clone(),
            endpoints,
            affinity_timeout_s: self.affinity_timeout_s,
            kind: port.kind,
            flags,
            source_ranges: port.source_ranges.clone(),
        }
    }
}

/// Whether a traffic policy field says Local.
fn is_local(policy: Option<&str>) -> bool {
    policy == Some("Local")
}

/// The [`ServicePart`] of one Service (empty when it is not served: labelled, headless,
/// ExternalName, no usable ClusterIP).
///
/// For each family the Service has a ClusterIP of (kube-proxy's proxier of a family skips
/// a Service without one, pkg/proxy/servicechangetracker.go), frontends of each port: the
/// ClusterIP (in-cluster view, internalTrafficPolicy applied); and each external address
/// of that family (`spec.externalIPs`, the LoadBalancer ingress IPs without ipMode Proxy,
/// the NodePort on each of `options.node_addresses`) twice: in the external view with
/// externalTrafficPolicy applied (Cluster: all endpoints, SNAT), and in the in-cluster
/// view with all endpoints, as kube-proxy short-circuits pod traffic to external
/// addresses. loadBalancerSourceRanges apply to the LoadBalancer IPs of their own family
/// only; a family without a valid range is not restricted (kube-proxy: serviceport.go
/// keeps `MapCIDRsByIPFamily(ranges)[family]`, and the nftables/iptables proxiers build the
/// firewall only when that list is not empty).
pub(crate) fn service_part(svc: &Service, options: &ModelOptions) -> ServicePart {
    let mut b = Builder { issues: Vec::new() };
    let mut part = ServicePart::default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let object = service_object(&namespace, &name);
    let labels = svc.metadata.labels.as_ref();
    if has_label(labels, LABEL_SERVICE_PROXY_NAME) || has_label(labels, LABEL_HEADLESS) {
        return part;
    }
    let Some(spec) = svc.spec.as_ref() else {
        b.issue(
            Severity::Warning,
            &object,
            "spec".into(),
            "missing; not served".into(),
        );
        part.issues = b.issues;
        return part;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return part;
    }
    let cluster_ips = b.cluster_ips(&object, svc);
    if cluster_ips.is_empty() {
        part.issues = b.issues;
        return part;
    }
    let families: Vec<Family> = cluster_ips.iter().map(Family::of).collect();
    let load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
    let internal_local = is_local(spec.internal_traffic_policy.as_deref());
    let external_local = is_local(spec.external_traffic_policy.as_deref());
    let external_ips = b.ip_list(
        &object,
        "spec.externalIPs[]",
        spec.external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .enumerate(),
    );
    let mut lb_ips = Vec::new();
    let mut source_ranges = None;
    if load_balancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        // ipMode Proxy: the load balancer proxies to the nodes itself, so its IP must not
        // be short-circuited here (kube-proxy leaves it alone too).
        let ips = ingress
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, ing)| {
                let ip = ing.ip.as_deref().filter(|ip| !ip.is_empty())?;
                (ing.ip_mode.as_deref() != Some("Proxy")).then_some((i, ip))
            });
        lb_ips = b.ip_list(&object, "status.loadBalancer.ingress[].ip", ips);
        if let Some(ranges) = spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| !r.is_empty())
        {
            source_ranges = Some(b.source_ranges(&object, ranges));
        }
    }
    // Addresses of a family the Service has no ClusterIP of are served by no proxier.
    for (field, list) in [
        ("spec.externalIPs", &external_ips),
        ("status.loadBalancer.ingress", &lb_ips),
    ] {
        for family in [Family::V4, Family::V6] {
            let left: Vec<String> = list
                .iter()
                .filter(|a| Family::of(a) == family && !families.contains(&family))
                .map(ToString::to_string)
                .collect();
            if !left.is_empty() {
                b.issue(
                    Severity::Notice,
                    &object,
                    field.into(),
                    format!(
                        "{} {}: the Service has no {} ClusterIP, so they are not served (as kube-proxy, which serves a family only for Services with a ClusterIP of it)",
                        family.name(),
                        left.join(", "),
                        family.name()
                    ),
                );
            }
        }
    }
    // The source ranges of each family, when it has any (`None`: unrestricted).
    let ranges_of = |family: Family| -> Option<Vec<IpRange>> {
        let r: Vec<IpRange> = source_ranges
            .iter()
            .flatten()
            .filter(|r| r.family() == family)
            .copied()
            .collect();
        (!r.is_empty()).then_some(r)
    };
    if source_ranges.is_some() {
        for &family in &families {
            if lb_ips.iter().any(|a| Family::of(a) == family) && ranges_of(family).is_none() {
                b.issue(
                    Severity::Warning,
                    &object,
                    "spec.loadBalancerSourceRanges".into(),
                    format!(
                        "no valid {} range, so the {} load balancer IPs accept every client (as kube-proxy, which applies each family's ranges to that family's IPs only)",
                        family.name(),
                        family.name()
                    ),
                );
            }
        }
    }
    if load_balancer
        && external_local
        && let Some(hc) = spec.health_check_node_port.filter(|p| *p != 0)
    {
        match u16::try_from(hc) {
            Ok(p) => part.health_check = Some(p),
            Err(_) => b.issue(
                Severity::Warning,
                &object,
                "spec.healthCheckNodePort".into(),
                format!("{hc} is out of range 1-65535; not answered"),
            ),
        }
    }
    part.affinity_timeout_s = b.affinity(&object, svc);
    part.scheduling = b.scheduling(&object, svc, options.default_scheduler);
    let external_policy = if external_local {
        Policy::Local
    } else {
        Policy::Cluster
    };
    let external_snat = if external_local { 0 } else { SVC_F_SNAT };
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        // The port and protocol are checked once, whatever the number of families.
        let Some(first) = b.frontend(&object, i, cluster_ips[0], port) else {
            continue;
        };
        let name = ServicePortName {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: port.name.clone().unwrap_or_default(),
            protocol: first.protocol,
        };
        let mut add = |b: &mut Builder,
                       frontend: Frontend,
                       kind: FrontendKind,
                       policy: Policy,
                       flags: u8,
                       ranges: &[IpRange]| {
            if let Some(first) = part.ports.iter().find(|p| p.frontend == frontend) {
                let (first_index, first_kind) = (first.index, first.kind);
                if kind == FrontendKind::ClusterIp {
                    b.issue(
                        Severity::Warning,
                        &object,
                        format!("spec.ports[{i}]"),
                        format!(
                            "{frontend} is already served by spec.ports[{first_index}]; port ignored"
                        ),
                    );
                } else {
                    b.issue(
                        Severity::Notice,
                        &object,
                        format!("spec.ports[{i}]"),
                        format!(
                            "{frontend} ({kind}) is already served by spec.ports[{first_index}] ({first_kind}); ignored"
                        ),
                    );
                }
                return;
            }
            part.ports.push(PortPart {
                frontend,
                index: i,
                name: name.clone(),
                kind,
                policy,
                flags: kind.flag() | flags,
                source_ranges: ranges.to_vec(),
            });
        };
        let cluster_policy = if internal_local {
            Policy::Local
        } else {
            Policy::Cluster
        };
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(p) => match u16::try_from(p) {
                Ok(p) => Some(p),
                Err(_) => {
                    b.issue(
                        Severity::Warning,
                        &object,
                        format!("spec.ports[{i}].nodePort"),
                        format!("{p} is out of range 1-65535; NodePort not served"),
                    );
                    None
                }
            },
        };
        for &addr in &cluster_ips {
            let family = Family::of(&addr);
            let cluster = Frontend::cluster(addr, first.port, first.protocol);
            add(
                &mut b,
                cluster,
                FrontendKind::ClusterIp,
                cluster_policy,
                0,
                &[],
            );
            let ranges = ranges_of(family);
            let of_family = |a: &&IpAddr| Family::of(a) == family;
            let externals = external_ips
                .iter()
                .filter(of_family)
                .map(|a| (*a, cluster.port, FrontendKind::ExternalIp))
                .chain(
                    lb_ips
                        .iter()
                        .filter(of_family)
                        .map(|a| (*a, cluster.port, FrontendKind::LoadBalancer)),
                )
                .chain(node_port.into_iter().flat_map(|np| {
                    options
                        .node_addresses
                        .iter()
                        .filter(of_family)
                        .map(move |a| (*a, np, FrontendKind::NodePort))
                }));
            for (ext_addr, ext_port, kind) in externals {
                let (ranges, range_flag) = match (&ranges, kind) {
                    (Some(r), FrontendKind::LoadBalancer) => (r.as_slice(), SVC_F_SOURCE_RANGES),
                    _ => (&[][..], 0),
                };
                let inside = Frontend::cluster(ext_addr, ext_port, cluster.protocol);
                let outside = Frontend {
                    scope: Scope::External,
                    ..inside
                };
                add(
                    &mut b,
                    outside,
                    kind,
                    external_policy,
                    external_snat | range_flag,
                    ranges,
                );
                add(&mut b, inside, kind, Policy::Cluster, range_flag, ranges);
            }
        }
    }
    part.issues = b.issues;
    part
}

#[cfg(test)]
mod tests {
    use proxy_common::service::{SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT};

    use super::*;

    fn svc(yaml: &str) -> Service {
        let mut s: Service = serde_yaml_ng::from_str(yaml).unwrap();
        s.metadata.namespace.get_or_insert_with(|| "default".into());
        s
    }

    fn slice(yaml: &str) -> EndpointSlice {
        let mut s: EndpointSlice = serde_yaml_ng::from_str(yaml).unwrap();
        s.metadata.namespace.get_or_insert_with(|| "default".into());
        s
    }

    /// The seed's `myapp` Service, given the ClusterIP that an API server would allocate.
    const MYAPP: &str = "
apiVersion: v1
kind: Service
metadata:
  name: myapp
  namespace: default
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  selector:
    app: myapp
    release: stabel
  ports:
  - name: http
    port: 80
    targetPort: 80
";

    const MYAPP_SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: myapp-x7k2p
  namespace: default
  labels: {kubernetes.io/service-name: myapp}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: [10.244.2.7]
  conditions: {ready: true}
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
- addresses: [10.244.3.9]
";

    fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
            terminating: false,
            local: false,
        }
    }

    fn term(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            terminating: true,
            ..ep(addr, port)
        }
    }

    fn fe(addr: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend::cluster(addr.parse::<IpAddr>().unwrap(), port, protocol)
    }

    fn endpoints_of(state: &DesiredState, frontend: Frontend) -> Vec<Endpoint> {
        state
            .services
            .get(&frontend)
            .unwrap_or_else(|| panic!("{frontend} missing"))
            .endpoints
            .clone()
    }

    /// A slice of `service` with one port and endpoints given as (address, ready, serving,
    /// terminating), `None` conditions as `~`.
    fn slice_of(name: &str, service: &str, port: &str, endpoints: &[&str]) -> EndpointSlice {
        let eps: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
        slice(&format!(
            "metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{port}]\nendpoints:\n{eps}"
        ))
    }

    #[test]
    fn seed_myapp_with_three_pods() {
        let (state, issues) = desired_state(&[svc(MYAPP)], &[slice(MYAPP_SLICE)]);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(state.services.len(), 1);
        let s = &state.services[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(s.name.to_string(), "default/myapp:http/TCP");
        assert_eq!(
            s.endpoints,
            [
                ep("10.244.1.5", 80),
                ep("10.244.2.7", 80),
                ep("10.244.3.9", 80)
            ]
        );
        assert_eq!(s.affinity_timeout_s, 0);
    }

    #[test]
    fn seed_myapp_without_cluster_ip_is_headless_with_a_notice() {
        let yaml = MYAPP.replace("  clusterIP: 10.96.0.10\n", "");
        let (state, issues) = desired_state(&[svc(&yaml)], &[slice(MYAPP_SLICE)]);
        assert!(state.services.is_empty());
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].severity, Severity::Notice);
        assert!(
            issues[0]
                .to_string()
                .starts_with("Service default/myapp: spec.clusterIP: not set")
        );
    }

    #[test]
    fn headless_external_name_and_labelled_services_are_skipped() {
        let headless = MYAPP.replace("10.96.0.10", "None");
        let external = MYAPP.replace(
            "type: ClusterIP",
            "type: ExternalName\n  externalName: example.com",
        );
        let proxy_name = MYAPP.replace(
            "namespace: default",
            "namespace: default\n  labels: {service.kubernetes.io/service-proxy-name: other}",
        );
        let headless_label = MYAPP.replace(
            "namespace: default",
            "namespace: default\n  labels: {service.kubernetes.io/headless: \"\"}",
        );
        for yaml in [headless, external, proxy_name, headless_label] {
            let (state, issues) = desired_state(&[svc(&yaml)], &[slice(MYAPP_SLICE)]);
            assert!(state.services.is_empty(), "{yaml}");
            assert!(issues.is_empty(), "{issues:?}");
        }
    }

    #[test]
    fn labelled_and_unlabelled_slices_are_ignored() {
        let other_proxy = MYAPP_SLICE.replace(
            "labels: {",
            "labels: {service.kubernetes.io/service-proxy-name: other, ",
        );
        let (state, _) = desired_state(&[svc(MYAPP)], &[slice(&other_proxy)]);
        assert!(endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());

        let unlabelled = MYAPP_SLICE.replace("  labels: {kubernetes.io/service-name: myapp}\n", "");
        let (state, issues) = desired_state(&[svc(MYAPP)], &[slice(&unlabelled)]);
        assert!(endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());
        assert_eq!(issues.len(), 1);
        assert!(issues[0].to_string().starts_with("EndpointSlice default/myapp-x7k2p: metadata.labels: no kubernetes.io/service-name label"));

        // Another namespace does not match.
        let elsewhere = MYAPP_SLICE.replace("namespace: default", "namespace: prod");
        let (state, _) = desired_state(&[svc(MYAPP)], &[slice(&elsewhere)]);
        assert!(endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());

        // FQDN slices are not for a proxy; an IPv6 slice holds no endpoint of the IPv4
        // ClusterIP (here its IPv4 addresses are misfiled, and reported).
        for (t, warnings) in [("FQDN", 0), ("IPv6", 3)] {
            let other = MYAPP_SLICE.replace("addressType: IPv4", &format!("addressType: {t}"));
            let (state, issues) = desired_state(&[svc(MYAPP)], &[slice(&other)]);
            assert!(endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());
            assert_eq!(issues.len(), warnings, "{t}: {issues:?}");
        }
    }

    #[test]
    fn backend_port_comes_from_the_slice_port_of_the_same_name_not_target_port() {
        let service = svc("
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: 1234}
  - {name: metrics, port: 9090, targetPort: metrics}
");
        let slices = [slice_of(
            "web-1",
            "web",
            "{name: http, port: 8080}, {name: metrics, port: 9102}, {name: admin, port: 7000}",
            &["addresses: [10.0.0.1]"],
        )];
        let (state, issues) = desired_state(&[service], &slices);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.20", 80, Protocol::Tcp)),
            [ep("10.0.0.1", 8080)]
        );
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.20", 9090, Protocol::Tcp)),
            [ep("10.0.0.1", 9102)]
        );
        assert_eq!(state.services.len(), 2);
    }

    #[test]
    fn an_unnamed_port_matches_an_unnamed_slice_port() {
        let service =
            svc("metadata: {name: one}\nspec: {clusterIP: 10.96.0.21, ports: [{port: 80}]}");
        let slices = [slice_of(
            "one-1",
            "one",
            "{port: 8080}",
            &["addresses: [10.0.0.1]"],
        )];
        let (state, _) = desired_state(&[service], &slices);
        let s = &state.services[&fe("10.96.0.21", 80, Protocol::Tcp)];
        assert_eq!(s.endpoints, [ep("10.0.0.1", 8080)]);
        assert_eq!(s.name.to_string(), "default/one/TCP");
    }

    #[test]
    fn protocols_on_the_same_port_are_separate_services() {
        let service = svc("
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
");
        let slices = [slice_of(
            "dns-1",
            "dns",
            "{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}, {name: dns, port: 9999, protocol: TCP}",
            &["addresses: [10.0.0.5]"],
        )];
        let (state, issues) = desired_state(&[service], &slices);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(state.services.len(), 2);
        // The TCP port named `dns` (9999) belongs to no service port: `dns` is UDP.
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.53", 53, Protocol::Udp)),
            [ep("10.0.0.5", 5353)]
        );
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.53", 53, Protocol::Tcp)),
            [ep("10.0.0.5", 5353)]
        );
        assert_eq!(
            state.services[&fe("10.96.0.53", 53, Protocol::Udp)]
                .name
                .to_string(),
            "default/dns:dns/UDP"
        );
    }

    fn web() -> Service {
        svc("metadata: {name: web}\nspec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80}]}")
    }

    fn web_endpoints(slices: &[EndpointSlice]) -> Vec<Endpoint> {
        let (state, _) = desired_state(&[web()], slices);
        endpoints_of(&state, fe("10.96.0.30", 80, Protocol::Tcp))
    }

    #[test]
    fn only_ready_endpoints_are_used_and_nil_conditions_mean_ready() {
        let s = slice_of(
            "web-1",
            "web",
            "{name: http, port: 8080}",
            &[
                "{addresses: [10.0.0.1]}",
                "{addresses: [10.0.0.2], conditions: {ready: false}}",
                "{addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: true}}",
                "{addresses: [10.0.0.4], conditions: {}}",
                "{addresses: [10.0.0.5, 10.0.0.6], conditions: {ready: true}}",
            ],
        );
        assert_eq!(
            web_endpoints(&[s]),
            [
                ep("10.0.0.1", 8080),
                ep("10.0.0.4", 8080),
                ep("10.0.0.5", 8080)
            ]
        );
    }

    #[test]
    fn with_no_ready_endpoint_serving_terminating_ones_are_used() {
        let s = slice_of(
            "web-1",
            "web",
            "{name: http, port: 8080}",
            &[
                "{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}",
                "{addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}",
                "{addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: false}}",
                "{addresses: [10.0.0.4], conditions: {ready: false, terminating: true}}",
            ],
        );
        assert_eq!(
            web_endpoints(&[s]),
            [term("10.0.0.1", 8080), term("10.0.0.4", 8080)]
        );

        let none = slice_of(
            "web-1",
            "web",
            "{name: http, port: 8080}",
            &["{addresses: [10.0.0.2], conditions: {ready: false}}"],
        );
        assert!(web_endpoints(&[none]).is_empty());
    }

    #[test]
    fn slices_are_merged_and_duplicates_keep_the_non_terminating_copy() {
        let a = slice_of(
            "web-a",
            "web",
            "{name: http, port: 8080}",
            &[
                "{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}",
                "{addresses: [10.0.0.2]}",
            ],
        );
        let b = slice_of(
            "web-b",
            "web",
            "{name: http, port: 8080}",
            &[
                "{addresses: [10.0.0.1], conditions: {ready: true}}",
                "{addresses: [10.0.0.3]}",
                "{addresses: [10.0.0.2]}",
            ],
        );
        let expected = [
            ep("10.0.0.1", 8080),
            ep("10.0.0.2", 8080),
            ep("10.0.0.3", 8080),
        ];
        assert_eq!(web_endpoints(&[a.clone(), b.clone()]), expected);
        assert_eq!(web_endpoints(&[b, a]), expected);
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_service_that_sorts_first() {
        let a = svc(
            "metadata: {name: alpha, namespace: team}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}",
        );
        let b = svc(
            "metadata: {name: beta, namespace: team}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80}, {name: x, port: 81}]}",
        );
        for services in [[a.clone(), b.clone()], [b, a]] {
            let (state, issues) = desired_state(&services, &[]);
            assert_eq!(
                state.services[&fe("10.96.0.40", 80, Protocol::Tcp)]
                    .name
                    .name,
                "alpha"
            );
            assert_eq!(
                state.services[&fe("10.96.0.40", 81, Protocol::Tcp)]
                    .name
                    .name,
                "beta"
            );
            assert_eq!(issues.len(), 1);
            assert_eq!(
                issues[0].to_string(),
                "Service team/beta: spec.ports[0]: 10.96.0.40:80/TCP is also claimed by Service team/alpha (spec.ports[0]), which sorts first and keeps it; port ignored"
            );
        }
    }

    #[test]
    fn session_affinity_timeout() {
        let with = |extra: &str| {
            let yaml = format!(
                "metadata: {{name: s}}\nspec:\n  clusterIP: 10.96.0.50\n  ports: [{{port: 80}}]\n{extra}"
            );
            let (state, issues) = desired_state(&[svc(&yaml)], &[]);
            (
                state.services[&fe("10.96.0.50", 80, Protocol::Tcp)].affinity_timeout_s,
                issues,
            )
        };
        assert_eq!(with("").0, 0);
        assert_eq!(with("  sessionAffinity: None\n").0, 0);
        assert_eq!(with("  sessionAffinity: ClientIP\n").0, 10_800);
        assert_eq!(
            with("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n").0,
            60
        );
        let (timeout, issues) = with(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
        );
        assert_eq!(timeout, 10_800);
        assert_eq!(
            issues[0].field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
    }

    #[test]
    fn scheduler_and_weights_come_from_annotations_with_a_default() {
        let with = |annotations: &str, default: Scheduler| {
            let yaml = format!(
                "metadata: {{name: s, annotations: {{{annotations}}}}}\nspec: {{clusterIP: 10.96.0.80, ports: [{{port: 80}}]}}"
            );
            let options = ModelOptions {
                default_scheduler: default,
                ..Default::default()
            };
            let (state, issues) = desired_state_with(&[svc(&yaml)], &[], &options);
            (
                state.scheduling_of(&fe("10.96.0.80", 80, Protocol::Tcp)),
                state.scheduling.len(),
                issues,
            )
        };
        let (s, n, issues) = with("", Scheduler::RANDOM);
        assert_eq!(
            (s, n),
            (Scheduling::default(), 0),
            "the default is not stored"
        );
        assert!(issues.is_empty());
        assert_eq!(with("", Scheduler::RR).0.scheduler, Scheduler::RR);
        for name in ["random", "rr", "lc", "sed", "nq", "sh", "dh", "maglev"] {
            let s = with(&format!("bpfproxy.io/scheduler: {name}"), Scheduler::RR).0;
            assert_eq!(s.scheduler.name(), name);
        }
        let (s, _, issues) = with("bpfproxy.io/scheduler: wrr", Scheduler::LC);
        assert_eq!(s.scheduler, Scheduler::LC);
        assert_eq!(issues.len(), 1);
        assert_eq!(
            issues[0].field,
            "metadata.annotations[bpfproxy.io/scheduler]"
        );
        let (s, _, issues) = with(
            "bpfproxy.io/scheduler: maglev, bpfproxy.io/weights: '10.0.0.1=3, 10.0.0.2=1,10.0.0.3=0,x'",
            Scheduler::RANDOM,
        );
        assert_eq!(s.scheduler, Scheduler::MAGLEV);
        assert_eq!(s.weight("10.0.0.1".parse().unwrap()), 3);
        assert_eq!(s.weight("10.0.0.2".parse().unwrap()), 1);
        assert_eq!(s.weight("10.0.0.9".parse().unwrap()), 1);
        assert_eq!(issues.len(), 2, "{issues:?}");
    }

    // ---- IPv6 and dual stack: one family's frontends get that family's endpoints ----

    /// A slice of `service` like [`slice_of`] with addressType IPv6.
    fn slice6_of(name: &str, service: &str, port: &str, endpoints: &[&str]) -> EndpointSlice {
        let mut s = slice_of(name, service, port, endpoints);
        s.address_type = "IPv6".into();
        s
    }

    fn fe6(addr: &str, port: u16) -> Frontend {
        fe(addr, port, Protocol::Tcp)
    }

    fn text_of(issues: &[ModelIssue]) -> Vec<String> {
        let mut text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        text.sort();
        text
    }

    #[test]
    fn a_single_stack_ipv6_service_is_served_with_its_ipv6_endpoints() {
        let service = svc("
metadata: {name: six}
spec:
  clusterIP: fd00:96::10
  clusterIPs: [fd00:96::10]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports: [{name: http, port: 80}]
");
        let slices = [
            slice6_of(
                "six-1",
                "six",
                "{name: http, port: 8080}",
                &[
                    "{addresses: ['fd00:244:1::11']}",
                    // Written long: the same address kube-proxy would program.
                    "{addresses: ['FD00:0244:0001:0000:0000:0000:0000:0012']}",
                    "{addresses: ['fd00:244:1::13'], conditions: {ready: false}}",
                ],
            ),
            // The IPv4 slice of the same Service: no IPv4 ClusterIP, nothing to serve.
            slice_of(
                "six-2",
                "six",
                "{name: http, port: 8080}",
                &["{addresses: [10.244.1.5]}"],
            ),
        ];
        let (state, issues) = desired_state(&[service], &slices);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            state.services.keys().copied().collect::<Vec<_>>(),
            [fe6("fd00:96::10", 80)]
        );
        let s = &state.services[&fe6("fd00:96::10", 80)];
        assert_eq!(s.frontend.to_string(), "[fd00:96::10]:80/TCP");
        assert_eq!(s.name.to_string(), "default/six:http/TCP");
        assert_eq!(
            s.endpoints,
            [ep("fd00:244:1::11", 8080), ep("fd00:244:1::12", 8080)]
        );
    }

    fn dual_service(policy: &str, ips: &str, families: &str) -> Service {
        svc(&format!(
            "
metadata: {{name: dual}}
spec:
  clusterIP: {first}
  clusterIPs: {ips}
  ipFamilies: {families}
  ipFamilyPolicy: {policy}
  ports: [{{name: http, port: 80}}, {{name: dns, port: 53, protocol: UDP}}]
",
            first = ips
                .trim_matches(['[', ']'])
                .split(',')
                .next()
                .unwrap()
                .trim()
                .trim_matches('\''),
        ))
    }

    fn dual_slices(v6_conds: &str) -> [EndpointSlice; 2] {
        [
            slice_of(
                "dual-v4",
                "dual",
                "{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}",
                &["{addresses: [10.244.1.5]}", "{addresses: [10.244.2.7]}"],
            ),
            slice6_of(
                "dual-v6",
                "dual",
                "{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}",
                &[
                    &format!("{{addresses: ['fd00:244:1::15'], conditions: {v6_conds}}}"),
                    "{addresses: ['fd00:244:2::17'], conditions: {ready: false}}",
                ],
            ),
        ]
    }

    #[test]
    fn a_dual_stack_service_has_one_frontend_per_family_each_with_its_own_endpoints() {
        for (policy, ips, families) in [
            (
                "PreferDualStack",
                "[10.96.0.60, 'fd00:96::60']",
                "[IPv4, IPv6]",
            ),
            (
                "RequireDualStack",
                "['fd00:96::60', 10.96.0.60]",
                "[IPv6, IPv4]",
            ),
        ] {
            let (state, issues) =
                desired_state(&[dual_service(policy, ips, families)], &dual_slices("{}"));
            assert!(issues.is_empty(), "{policy}: {issues:?}");
            assert_eq!(
                state.services.keys().copied().collect::<Vec<_>>(),
                [
                    fe("10.96.0.60", 53, Protocol::Udp),
                    fe("10.96.0.60", 80, Protocol::Tcp),
                    fe("fd00:96::60", 53, Protocol::Udp),
                    fe("fd00:96::60", 80, Protocol::Tcp),
                ],
                "{policy}"
            );
            assert_eq!(
                endpoints_of(&state, fe("10.96.0.60", 80, Protocol::Tcp)),
                [ep("10.244.1.5", 8080), ep("10.244.2.7", 8080)]
            );
            assert_eq!(
                endpoints_of(&state, fe("10.96.0.60", 53, Protocol::Udp)),
                [ep("10.244.1.5", 5353), ep("10.244.2.7", 5353)]
            );
            assert_eq!(
                endpoints_of(&state, fe("fd00:96::60", 80, Protocol::Tcp)),
                [ep("fd00:244:1::15", 8080)]
            );
            // Both families' ports have the same name: one Service port, two frontends.
            assert_eq!(
                state.services[&fe("fd00:96::60", 80, Protocol::Tcp)].name,
                state.services[&fe("10.96.0.60", 80, Protocol::Tcp)].name
            );
        }
    }

    #[test]
    fn the_terminating_fallback_is_decided_per_family() {
        // No ready IPv6 endpoint, a serving terminating one: the IPv6 frontend falls back
        // to it although IPv4 has ready ones (kube-proxy: one proxier per family).
        let (state, _) = desired_state(
            &[dual_service(
                "PreferDualStack",
                "[10.96.0.60, 'fd00:96::60']",
                "[IPv4, IPv6]",
            )],
            &dual_slices("{ready: false, serving: true, terminating: true}"),
        );
        assert_eq!(
            endpoints_of(&state, fe("fd00:96::60", 80, Protocol::Tcp)),
            [term("fd00:244:1::15", 8080)]
        );
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.60", 80, Protocol::Tcp)),
            [ep("10.244.1.5", 8080), ep("10.244.2.7", 8080)]
        );
        // And none at all of a family: that frontend has no endpoint (it rejects).
        let (state, _) = desired_state(
            &[dual_service(
                "PreferDualStack",
                "[10.96.0.60, 'fd00:96::60']",
                "[IPv4, IPv6]",
            )],
            &dual_slices("{ready: false}"),
        );
        assert!(endpoints_of(&state, fe("fd00:96::60", 80, Protocol::Tcp)).is_empty());
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.60", 80, Protocol::Tcp)).len(),
            2
        );
    }

    #[test]
    fn an_ipv6_slice_of_an_ipv4_only_service_is_ignored_and_misfiled_addresses_reported() {
        let (state, issues) = desired_state(
            &[svc(MYAPP)],
            &[
                slice(MYAPP_SLICE),
                slice6_of(
                    "myapp-v6",
                    "myapp",
                    "{name: http, port: 80}",
                    &["{addresses: ['fd00:244:1::5']}"],
                ),
            ],
        );
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(state.services.len(), 1);
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)),
            [
                ep("10.244.1.5", 80),
                ep("10.244.2.7", 80),
                ep("10.244.3.9", 80)
            ]
        );
        // An address of the other family than the slice's addressType is skipped, as in
        // kube-proxy's endpoint slice cache.
        let (state, issues) = desired_state(
            &[dual_service(
                "PreferDualStack",
                "[10.96.0.60, 'fd00:96::60']",
                "[IPv4, IPv6]",
            )],
            &[
                slice_of(
                    "dual-v4",
                    "dual",
                    "{name: http, port: 8080}",
                    &[
                        "{addresses: ['fd00:244:1::5']}",
                        "{addresses: [10.244.1.5]}",
                    ],
                ),
                slice6_of(
                    "dual-v6",
                    "dual",
                    "{name: http, port: 8080}",
                    &[
                        "{addresses: [10.244.1.6]}",
                        "{addresses: ['::ffff:10.244.1.7']}",
                    ],
                ),
            ],
        );
        assert_eq!(
            text_of(&issues),
            [
                r#"EndpointSlice default/dual-v4: endpoints[0].addresses[0]: "fd00:244:1::5" is not an IPv4 address (the slice's addressType); endpoint ignored"#,
                r#"EndpointSlice default/dual-v6: endpoints[0].addresses[0]: "10.244.1.6" is not an IPv6 address (the slice's addressType); endpoint ignored"#,
                r#"EndpointSlice default/dual-v6: endpoints[1].addresses[0]: "::ffff:10.244.1.7" is not an IPv6 address (the slice's addressType); endpoint ignored"#,
            ]
        );
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.60", 80, Protocol::Tcp)),
            [ep("10.244.1.5", 8080)]
        );
        assert!(endpoints_of(&state, fe("fd00:96::60", 80, Protocol::Tcp)).is_empty());
    }

    fn dual_node_options() -> ModelOptions {
        ModelOptions {
            node_name: Some("node-a".into()),
            node_addresses: vec![
                "192.168.1.10".parse().unwrap(),
                "fd00:251::1".parse().unwrap(),
                "fd00:252::1".parse().unwrap(),
            ],
            ..Default::default()
        }
    }

    /// A dual-stack LoadBalancer `lb` with external and ingress IPs of both families,
    /// nodePort 30080; `extra` goes under spec.
    fn dual_lb(extra: &str) -> Service {
        svc(&format!(
            "
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.1
  clusterIPs: [10.96.1.1, 'fd00:96::1:1']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  externalIPs: [198.51.100.7, '2001:db8::7']
  ports: [{{name: http, port: 80, nodePort: 30080}}]
{extra}
status:
  loadBalancer:
    ingress:
    - {{ip: 203.0.113.1}}
    - {{ip: '2001:db8:203::1'}}
    - {{ip: '2001:db8:203::3', ipMode: Proxy}}
"
        ))
    }

    fn dual_lb_slices() -> [EndpointSlice; 2] {
        [
            slice_of(
                "lb-v4",
                "lb",
                "{name: http, port: 8080}",
                &[
                    "{addresses: [10.0.0.1], nodeName: node-a}",
                    "{addresses: [10.0.0.2], nodeName: node-b}",
                ],
            ),
            slice6_of(
                "lb-v6",
                "lb",
                "{name: http, port: 8080}",
                &["{addresses: ['fd00:244:2::2'], nodeName: node-b}"],
            ),
        ]
    }

    #[test]
    fn external_and_load_balancer_ips_and_node_ports_go_to_their_family() {
        let (state, issues) =
            desired_state_with(&[dual_lb("")], &dual_lb_slices(), &dual_node_options());
        assert!(issues.is_empty(), "{issues:?}");
        let v4 = vec![local(ep("10.0.0.1", 8080)), ep("10.0.0.2", 8080)];
        let v6 = vec![ep("fd00:244:2::2", 8080)];
        let externals = [
            ("198.51.100.7", 80, FrontendKind::ExternalIp, &v4),
            ("203.0.113.1", 80, FrontendKind::LoadBalancer, &v4),
            ("192.168.1.10", 30080, FrontendKind::NodePort, &v4),
            ("2001:db8::7", 80, FrontendKind::ExternalIp, &v6),
            ("2001:db8:203::1", 80, FrontendKind::LoadBalancer, &v6),
            ("fd00:251::1", 30080, FrontendKind::NodePort, &v6),
            ("fd00:252::1", 30080, FrontendKind::NodePort, &v6),
        ];
        // Two ClusterIPs, each external address twice; no ipMode Proxy ingress.
        assert_eq!(state.services.len(), 2 + 2 * externals.len());
        assert_eq!(endpoints_of(&state, fe("10.96.1.1", 80, Protocol::Tcp)), v4);
        assert_eq!(endpoints_of(&state, fe6("fd00:96::1:1", 80)), v6);
        for (addr, port, kind, want) in externals {
            for f in [ext(addr, port), fe(addr, port, Protocol::Tcp)] {
                let s = &state.services[&f];
                assert_eq!(s.kind, kind, "{f}");
                assert_eq!(&s.endpoints, want, "{f}");
                let snat = if f.scope == Scope::External {
                    SVC_F_SNAT
                } else {
                    0
                };
                assert_eq!(s.flags, kind.flag() | snat, "{f}");
            }
        }
        assert_eq!(
            ext("fd00:251::1", 30080).to_string(),
            "[fd00:251::1]:30080/TCP (external view)"
        );

        // externalTrafficPolicy Local: each family's local endpoints; IPv6 has none here
        // while others exist elsewhere, so its external view drops (IPv4 does not).
        let (state, _) = desired_state_with(
            &[dual_lb("  externalTrafficPolicy: Local")],
            &dual_lb_slices(),
            &dual_node_options(),
        );
        let s4 = &state.services[&ext("203.0.113.1", 80)];
        assert_eq!(s4.endpoints, [local(ep("10.0.0.1", 8080))]);
        assert_eq!(s4.flags & (SVC_F_DROP_EMPTY | SVC_F_SNAT), 0);
        let s6 = &state.services[&ext("2001:db8:203::1", 80)];
        assert!(s6.endpoints.is_empty());
        assert_ne!(s6.flags & SVC_F_DROP_EMPTY, 0);
        // Pods still reach the IPv6 LB IP through all IPv6 endpoints.
        assert_eq!(endpoints_of(&state, fe6("2001:db8:203::1", 80)), v6);
    }

    #[test]
    fn addresses_of_a_family_without_a_cluster_ip_are_not_served() {
        // The same Service, IPv4 only: its IPv6 external and ingress IPs have no proxier.
        let mut single = dual_lb("");
        let spec = single.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["10.96.1.1".into()]);
        spec.ip_families = Some(vec!["IPv4".into()]);
        let (state, issues) =
            desired_state_with(&[single], &dual_lb_slices(), &dual_node_options());
        assert_eq!(
            text_of(&issues),
            [
                "Service default/lb: spec.externalIPs: IPv6 2001:db8::7: the Service has no IPv6 ClusterIP, so they are not served (as kube-proxy, which serves a family only for Services with a ClusterIP of it)",
                "Service default/lb: status.loadBalancer.ingress: IPv6 2001:db8:203::1: the Service has no IPv6 ClusterIP, so they are not served (as kube-proxy, which serves a family only for Services with a ClusterIP of it)",
            ]
        );
        assert!(
            state.services.keys().all(|f| f.family() == Family::V4),
            "{:?}",
            state.services.keys()
        );
        // ClusterIP, external IP, LB IP, one IPv4 NodePort address: each in two views but
        // the ClusterIP.
        assert_eq!(state.services.len(), 1 + 2 * 3);

        // IPv6 only: NodePorts on the IPv6 node addresses only.
        let six = svc(
            "metadata: {name: np6}\nspec: {type: NodePort, clusterIP: 'fd00:96::5', ports: [{port: 80, nodePort: 30081}]}",
        );
        let (state, issues) = desired_state_with(&[six], &[], &dual_node_options());
        assert!(issues.is_empty(), "{issues:?}");
        let mut node_ports: Vec<String> = state
            .services
            .keys()
            .filter(|f| f.scope == Scope::External)
            .map(ToString::to_string)
            .collect();
        node_ports.sort();
        assert_eq!(
            node_ports,
            [
                "[fd00:251::1]:30081/TCP (external view)",
                "[fd00:252::1]:30081/TCP (external view)"
            ]
        );
    }

    #[test]
    fn source_ranges_apply_to_load_balancer_ips_of_their_own_family() {
        let (state, issues) = desired_state_with(
            &[dual_lb(
                "  loadBalancerSourceRanges: ['10.1.0.0/16', ' fd00:1:0:0::/48 ', '2001:DB8:5::9/64']",
            )],
            &[],
            &dual_node_options(),
        );
        assert!(issues.is_empty(), "{issues:?}");
        let ranges = |f: Frontend| {
            let s = &state.services[&f];
            assert_ne!(s.flags & SVC_F_SOURCE_RANGES, 0, "{f}");
            s.source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        for f in [ext("203.0.113.1", 80), fe("203.0.113.1", 80, Protocol::Tcp)] {
            assert_eq!(ranges(f), ["10.1.0.0/16"]);
        }
        for f in [ext("2001:db8:203::1", 80), fe6("2001:db8:203::1", 80)] {
            // Host bits cleared, addresses in canonical form.
            assert_eq!(ranges(f), ["2001:db8:5::/64", "fd00:1::/48"]);
        }
        // NodePorts and external IPs bypass them, in both families.
        for f in [ext("fd00:251::1", 30080), ext("2001:db8::7", 80)] {
            assert_eq!(state.services[&f].flags & SVC_F_SOURCE_RANGES, 0, "{f}");
        }

        // IPv4 ranges only: the IPv6 LB IP is open to all, as in kube-proxy, and said so.
        let (state, issues) = desired_state_with(
            &[dual_lb("  loadBalancerSourceRanges: ['10.1.0.0/16']")],
            &[],
            &dual_node_options(),
        );
        assert_eq!(
            text_of(&issues),
            [
                "Service default/lb: spec.loadBalancerSourceRanges: no valid IPv6 range, so the IPv6 load balancer IPs accept every client (as kube-proxy, which applies each family's ranges to that family's IPs only)"
            ]
        );
        assert_ne!(
            state.services[&ext("203.0.113.1", 80)].flags & SVC_F_SOURCE_RANGES,
            0
        );
        let s6 = &state.services[&ext("2001:db8:203::1", 80)];
        assert_eq!(s6.flags & SVC_F_SOURCE_RANGES, 0);
        assert!(s6.source_ranges.is_empty());
    }

    #[test]
    fn health_checks_count_the_local_ready_endpoints_of_each_family() {
        let service = dual_lb("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100");
        let slices = [
            slice_of(
                "lb-v4",
                "lb",
                "{name: http, port: 8080}",
                &[
                    "{addresses: [10.0.0.1], nodeName: node-a}",
                    "{addresses: [10.0.0.2], nodeName: node-b}",
                ],
            ),
            slice6_of(
                "lb-v6",
                "lb",
                "{name: http, port: 8080}",
                &[
                    "{addresses: ['fd00:244:1::1'], nodeName: node-a}",
                    "{addresses: ['fd00:244:1::2'], nodeName: node-a}",
                    "{addresses: ['fd00:244:1::3'], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                ],
            ),
        ];
        let (state, _) = desired_state_with(&[service], &slices, &dual_node_options());
        let hc = &state.health_checks[&32100];
        assert_eq!((hc.local_ready, hc.local_ready6), (1, 2));
    }

    #[test]
    fn ipv6_addresses_are_normalised_and_conflicts_decided_on_the_normal_form() {
        // Leading zeros, upper case, `::` anywhere: one address (as kube-proxy's
        // TestBadIPs expects of IPv4 leading zeros).
        let long = svc("
metadata: {name: a-long}
spec:
  clusterIP: 'FD00:0096:0000:0000:0000:0000:0000:0010'
  externalIPs: ['2001:0DB8::0007']
  ports: [{port: 80}]
");
        let short = svc("
metadata: {name: b-short}
spec:
  clusterIP: 'fd00:96::10'
  ports: [{port: 80}]
");
        let (state, issues) = desired_state(&[short, long], &[]);
        assert_eq!(state.services[&fe6("fd00:96::10", 80)].name.name, "a-long");
        assert!(state.services.contains_key(&ext("2001:db8::7", 80)));
        assert_eq!(
            text_of(&issues),
            [
                "Service default/b-short: spec.ports[0]: [fd00:96::10]:80/TCP is also claimed by Service default/a-long (spec.ports[0]), which sorts first and keeps it; port ignored"
            ]
        );
        for (text, want) in [
            ("fd00:96::10", Some("fd00:96::10")),
            ("FD00:96:0:0::0010", Some("fd00:96::10")),
            ("::ffff:10.96.0.1", Some("10.96.0.1")),
            ("010.096.0.1", Some("10.96.0.1")),
            ("::1.2.3.4", Some("::102:304")),
            ("fe80::1%eth0", None),
            ("fd00::/64", None),
            ("fd00:::1", None),
            ("", None),
        ] {
            assert_eq!(
                parse_ip(text).map(|a| a.to_string()).as_deref(),
                want,
                "{text}"
            );
        }
        assert_eq!(
            parse_ip_range("FD00:1::5/48").map(|r| r.to_string()),
            Some("fd00:1::/48".into())
        );
        for bad in [
            "fd00::/129",
            "fd00::",
            "10.0.0.0/33",
            "10.0.0.0/",
            "fd00::/+8",
        ] {
            assert_eq!(parse_ip_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn cluster_ips_one_per_family_and_bad_ones_left_out() {
        let service = svc("
metadata: {name: odd}
spec:
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80, nonsense, 10.96.0.81, 'fd00:96::80']
  ports: [{port: 80}]
");
        let (state, issues) = desired_state(&[service], &[]);
        assert_eq!(
            state.services.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.80", 80, Protocol::Tcp), fe6("fd00:96::80", 80)]
        );
        assert_eq!(
            text_of(&issues),
            [
                r#"Service default/odd: spec.clusterIPs[1]: "nonsense" is not an IP address; not served"#,
                r#"Service default/odd: spec.clusterIPs[2]: "10.96.0.81": a second IPv4 ClusterIP (after 10.96.0.80); ignored"#,
            ]
        );
        // Weights may name IPv6 backends.
        let weighted = svc("
metadata:
  name: w
  annotations: {bpfproxy.io/weights: 'fd00:244::0001=3, 10.244.0.1=2'}
spec: {clusterIP: 'fd00:96::81', ports: [{port: 80}]}
");
        let (state, _) = desired_state(&[weighted], &[]);
        let sched = state.scheduling_of(&fe6("fd00:96::81", 80));
        assert_eq!(sched.weight("fd00:244::1".parse().unwrap()), 3);
        assert_eq!(sched.weight("10.244.0.1".parse().unwrap()), 2);
    }

    #[test]
    fn bad_values_are_reported_not_served() {
        let service = svc("
metadata: {name: bad}
spec:
  clusterIP: 10.96.0.70
  ports:
  - {name: a, port: 80, protocol: ICMP}
  - {name: b, port: 70000}
  - {name: c, port: 81}
");
        let s = slice_of(
            "bad-1",
            "bad",
            "{name: c, port: 8081}",
            &[
                "{addresses: [10.0.0.300]}",
                "{addresses: [010.000.000.001]}",
                "{addresses: []}",
            ],
        );
        let (state, issues) = desired_state(&[service], &[s]);
        assert_eq!(state.services.len(), 1);
        // Leading zeros are read as decimal, as Kubernetes does.
        assert_eq!(
            endpoints_of(&state, fe("10.96.0.70", 81, Protocol::Tcp)),
            [ep("10.0.0.1", 8081)]
        );
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                r#"EndpointSlice default/bad-1: endpoints[0].addresses[0]: "10.0.0.300" is not an IPv4 address (the slice's addressType); endpoint ignored"#,
                r#"Service default/bad: spec.ports[0].protocol: "ICMP" is not TCP, UDP or SCTP; port not served"#,
                "Service default/bad: spec.ports[1].port: 70000 is out of range 1-65535; port not served",
            ]
        );
    }

    #[test]
    fn a_service_without_endpoints_is_still_served() {
        let (state, issues) = desired_state(&[web()], &[]);
        assert!(issues.is_empty());
        assert!(endpoints_of(&state, fe("10.96.0.30", 80, Protocol::Tcp)).is_empty());
    }

    #[test]
    fn parse_ipv4_is_sloppy_like_kubernetes() {
        assert_eq!(parse_ipv4("10.96.0.1"), Some(Ipv4Addr::new(10, 96, 0, 1)));
        assert_eq!(
            parse_ipv4("010.096.000.010"),
            Some(Ipv4Addr::new(10, 96, 0, 10))
        );
        for bad in [
            "10.96.0.256",
            "10.96.0",
            "10.96.0.1.2",
            "10..0.1",
            "1e1.0.0.1",
            "0010.0.0.1",
            " 10.0.0.1",
            "",
        ] {
            assert_eq!(parse_ipv4(bad), None, "{bad}");
        }
    }

    // ---- External view: NodePorts, external and LoadBalancer IPs, traffic policies ----

    fn node_options() -> ModelOptions {
        ModelOptions {
            node_name: Some("node-a".into()),
            node_addresses: vec![
                "192.168.1.10".parse().unwrap(),
                "192.168.2.10".parse().unwrap(),
            ],
            ..Default::default()
        }
    }

    fn ext(addr: &str, port: u16) -> Frontend {
        Frontend {
            scope: Scope::External,
            ..fe(addr, port, Protocol::Tcp)
        }
    }

    fn local(e: Endpoint) -> Endpoint {
        Endpoint { local: true, ..e }
    }

    /// A LoadBalancer Service `lb` with an external IP, two usable ingress IPs (one more
    /// with ipMode Proxy, one hostname only), nodePort 30080; `extra` goes under spec.
    fn lb_service(extra: &str) -> Service {
        svc(&format!(
            "
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.1
  loadBalancerIP: 203.0.113.99
  externalIPs: [198.51.100.7]
  ports: [{{name: http, port: 80, nodePort: 30080}}]
{extra}
status:
  loadBalancer:
    ingress:
    - {{ip: 203.0.113.1}}
    - {{ip: 203.0.113.2, ipMode: VIP}}
    - {{ip: 203.0.113.3, ipMode: Proxy}}
    - {{hostname: lb.example.com}}
"
        ))
    }

    /// Endpoints of `lb`: 10.0.0.1 on this node, 10.0.0.2 on node-b, each with `conds`.
    fn lb_slice(local_conds: &str, remote_conds: &str) -> EndpointSlice {
        slice_of(
            "lb-1",
            "lb",
            "{name: http, port: 8080}",
            &[
                &format!("{{addresses: [10.0.0.1], nodeName: node-a, conditions: {local_conds}}}"),
                &format!("{{addresses: [10.0.0.2], nodeName: node-b, conditions: {remote_conds}}}"),
            ],
        )
    }

    fn flags_of(state: &DesiredState, f: Frontend) -> u8 {
        state
            .services
            .get(&f)
            .unwrap_or_else(|| panic!("{f} missing"))
            .flags
    }

    #[test]
    fn external_policy_cluster_serves_every_external_address_in_both_views() {
        let (state, issues) =
            desired_state_with(&[lb_service("")], &[lb_slice("{}", "{}")], &node_options());
        assert!(issues.is_empty(), "{issues:?}");
        let all = vec![local(ep("10.0.0.1", 8080)), ep("10.0.0.2", 8080)];
        let externals = [
            ("198.51.100.7", 80, FrontendKind::ExternalIp),
            ("203.0.113.1", 80, FrontendKind::LoadBalancer),
            ("203.0.113.2", 80, FrontendKind::LoadBalancer),
            ("192.168.1.10", 30080, FrontendKind::NodePort),
            ("192.168.2.10", 30080, FrontendKind::NodePort),
        ];
        // The ClusterIP plus each external address twice; no ipMode Proxy ingress, no
        // spec.loadBalancerIP, no IPv6 address, no hostname.
        assert_eq!(state.services.len(), 1 + 2 * externals.len());
        let cluster = &state.services[&fe("10.96.1.1", 80, Protocol::Tcp)];
        assert_eq!((cluster.kind, cluster.flags), (FrontendKind::ClusterIp, 0));
        assert_eq!(cluster.endpoints, all);
        for (addr, port, kind) in externals {
            let outside = &state.services[&ext(addr, port)];
            assert_eq!(outside.kind, kind);
            assert_eq!(outside.flags, kind.flag() | SVC_F_SNAT, "{addr}");
            assert_eq!(outside.endpoints, all);
            assert_eq!(outside.name.to_string(), "default/lb:http/TCP");
            let inside = &state.services[&fe(addr, port, Protocol::Tcp)];
            assert_eq!((inside.kind, inside.flags), (kind, kind.flag()), "{addr}");
            assert_eq!(inside.endpoints, all);
        }
        assert!(state.health_checks.is_empty());
    }

    #[test]
    fn external_policy_local_serves_local_endpoints_outside_and_all_inside() {
        let service = lb_service("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000");
        let (state, _) = desired_state_with(
            std::slice::from_ref(&service),
            &[lb_slice("{}", "{}")],
            &node_options(),
        );
        for f in [
            ext("203.0.113.1", 80),
            ext("192.168.1.10", 30080),
            ext("198.51.100.7", 80),
        ] {
            let s = &state.services[&f];
            assert_eq!(s.endpoints, [local(ep("10.0.0.1", 8080))], "{f}");
            assert_eq!(s.flags & (SVC_F_SNAT | SVC_F_DROP_EMPTY), 0, "{f}");
        }
        // Pods reaching the same addresses: all endpoints (kube-proxy's short-circuit).
        assert_eq!(
            endpoints_of(&state, fe("192.168.1.10", 30080, Protocol::Tcp)),
            [local(ep("10.0.0.1", 8080)), ep("10.0.0.2", 8080)]
        );

        // No endpoint here but one elsewhere: drop outside, all endpoints inside.
        let (state, _) = desired_state_with(
            std::slice::from_ref(&service),
            &[lb_slice("{ready: false}", "{}")],
            &node_options(),
        );
        let outside = &state.services[&ext("192.168.2.10", 30080)];
        assert!(outside.endpoints.is_empty());
        assert_eq!(outside.flags, SVC_F_NODE_PORT | SVC_F_DROP_EMPTY);
        assert_eq!(
            endpoints_of(&state, fe("192.168.2.10", 30080, Protocol::Tcp)),
            [ep("10.0.0.2", 8080)]
        );

        // No endpoint at all: rejected as for a ClusterIP (no drop flag).
        let (state, _) = desired_state_with(std::slice::from_ref(&service), &[], &node_options());
        assert_eq!(
            flags_of(&state, ext("192.168.2.10", 30080)),
            SVC_F_NODE_PORT
        );

        // No ready local endpoint but a local serving terminating one while the other node
        // has a ready one: the local terminating one, as kube-proxy falls back per policy.
        let (state, _) = desired_state_with(
            &[service],
            &[lb_slice(
                "{ready: false, serving: true, terminating: true}",
                "{}",
            )],
            &node_options(),
        );
        let outside = &state.services[&ext("203.0.113.1", 80)];
        assert_eq!(outside.endpoints, [local(term("10.0.0.1", 8080))]);
        assert_eq!(outside.flags, SVC_F_LOAD_BALANCER);
        assert_eq!(
            endpoints_of(&state, fe("10.96.1.1", 80, Protocol::Tcp)),
            [ep("10.0.0.2", 8080)]
        );
    }

    #[test]
    fn without_a_node_name_no_endpoint_is_local() {
        let service = lb_service("  externalTrafficPolicy: Local");
        let options = ModelOptions {
            node_name: None,
            ..node_options()
        };
        let (state, _) = desired_state_with(&[service], &[lb_slice("{}", "{}")], &options);
        let outside = &state.services[&ext("203.0.113.1", 80)];
        assert!(outside.endpoints.is_empty());
        assert_ne!(outside.flags & SVC_F_DROP_EMPTY, 0);
        assert!(
            endpoints_of(&state, fe("10.96.1.1", 80, Protocol::Tcp))
                .iter()
                .all(|e| !e.local)
        );
    }

    #[test]
    fn internal_policy_local_limits_the_cluster_ip_only() {
        let service = lb_service("  internalTrafficPolicy: Local");
        let (state, issues) = desired_state_with(
            std::slice::from_ref(&service),
            &[lb_slice("{}", "{}")],
            &node_options(),
        );
        assert!(issues.is_empty(), "{issues:?}");
        let cluster = &state.services[&fe("10.96.1.1", 80, Protocol::Tcp)];
        assert_eq!(cluster.endpoints, [local(ep("10.0.0.1", 8080))]);
        assert_eq!(cluster.flags, 0);
        // External addresses keep every endpoint, in both views.
        assert_eq!(endpoints_of(&state, ext("203.0.113.1", 80)).len(), 2);
        assert_eq!(
            endpoints_of(&state, fe("203.0.113.1", 80, Protocol::Tcp)).len(),
            2
        );

        // None local, some elsewhere: drop.
        let (state, _) = desired_state_with(
            std::slice::from_ref(&service),
            &[lb_slice("{ready: false}", "{}")],
            &node_options(),
        );
        let cluster = &state.services[&fe("10.96.1.1", 80, Protocol::Tcp)];
        assert!(cluster.endpoints.is_empty());
        assert_eq!(cluster.flags, SVC_F_DROP_EMPTY);

        // None anywhere (the remote one neither ready nor terminating): reject.
        let (state, _) = desired_state_with(
            &[service],
            &[lb_slice("{ready: false}", "{ready: false}")],
            &node_options(),
        );
        assert_eq!(flags_of(&state, fe("10.96.1.1", 80, Protocol::Tcp)), 0);
    }

    #[test]
    fn load_balancer_ips_need_type_load_balancer() {
        let yaml = "
metadata: {name: plain}
spec: {clusterIP: 10.96.1.2, ports: [{port: 80}]}
status: {loadBalancer: {ingress: [{ip: 203.0.113.5}]}}
";
        let (state, issues) = desired_state_with(&[svc(yaml)], &[], &node_options());
        assert!(issues.is_empty());
        assert_eq!(
            state.services.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.1.2", 80, Protocol::Tcp)]
        );
    }

    #[test]
    fn source_ranges_are_trimmed_checked_and_apply_to_load_balancer_ips_only() {
        let service = lb_service(
            "  loadBalancerSourceRanges: [' 10.1.0.0/16 ', 'bogus', '172.16.5.9/24', 'fd00::/8', '10.2.0.0/33']",
        );
        let (state, issues) = desired_state_with(&[service], &[], &node_options());
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                r#"Service default/lb: spec.loadBalancerSourceRanges[1]: "bogus" is not a CIDR (address/prefix length); ignored"#,
                r#"Service default/lb: spec.loadBalancerSourceRanges[4]: "10.2.0.0/33" is not a CIDR (address/prefix length); ignored"#,
            ]
        );
        // The IPv6 range is valid but of the other family: not applied here.
        let want: Vec<IpRange> = vec![
            IpRange::new("10.1.0.0".parse::<Ipv4Addr>().unwrap(), 16).unwrap(),
            IpRange::new("172.16.5.0".parse::<Ipv4Addr>().unwrap(), 24).unwrap(),
        ];
        for f in [ext("203.0.113.1", 80), fe("203.0.113.2", 80, Protocol::Tcp)] {
            let s = &state.services[&f];
            assert_ne!(s.flags & SVC_F_SOURCE_RANGES, 0, "{f}");
            assert_eq!(s.source_ranges, want, "{f}");
        }
        // NodePorts and external IPs bypass them, as in kube-proxy.
        for f in [
            ext("192.168.1.10", 30080),
            ext("198.51.100.7", 80),
            fe("10.96.1.1", 80, Protocol::Tcp),
        ] {
            let s = &state.services[&f];
            assert_eq!(s.flags & SVC_F_SOURCE_RANGES, 0, "{f}");
            assert!(s.source_ranges.is_empty(), "{f}");
        }

        // Ranges given, none usable for the family: its LB IPs are not restricted, as
        // kube-proxy (serviceport.go keeps the valid ranges of the proxier's family; the
        // proxiers build a firewall only from a non-empty list); a warning says so.
        for ranges in ["[nope]", "['fd00::/8']"] {
            let service = lb_service(&format!("  loadBalancerSourceRanges: {ranges}"));
            let (state, issues) = desired_state_with(&[service], &[], &node_options());
            let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
            assert!(
                text.contains(&"Service default/lb: spec.loadBalancerSourceRanges: no valid IPv4 range, so the IPv4 load balancer IPs accept every client (as kube-proxy, which applies each family's ranges to that family's IPs only)".to_string()),
                "{text:?}"
            );
            assert_eq!(
                text.len(),
                if ranges == "[nope]" { 2 } else { 1 },
                "{text:?}"
            );
            let s = &state.services[&ext("203.0.113.1", 80)];
            assert_eq!(s.flags & SVC_F_SOURCE_RANGES, 0);
            assert!(s.source_ranges.is_empty());
        }
    }

    #[test]
    fn node_ports_follow_the_node_addresses() {
        let service = lb_service("");
        let options = ModelOptions {
            node_addresses: vec!["10.9.0.1".parse().unwrap()],
            ..node_options()
        };
        let (state, _) = desired_state_with(std::slice::from_ref(&service), &[], &options);
        let node_ports: Vec<Frontend> = state
            .services
            .values()
            .filter(|s| s.kind == FrontendKind::NodePort)
            .map(|s| s.frontend)
            .collect();
        assert_eq!(
            node_ports,
            [fe("10.9.0.1", 30080, Protocol::Tcp), ext("10.9.0.1", 30080)]
        );
        // No node address known: no NodePort frontend at all.
        let (state, _) = desired_state_with(&[service], &[], &ModelOptions::default());
        assert!(
            state
                .services
                .values()
                .all(|s| s.kind != FrontendKind::NodePort)
        );

        let bad = svc(
            "metadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.96.1.3, ports: [{port: 80, nodePort: 70000}]}",
        );
        let (state, issues) = desired_state_with(&[bad], &[], &node_options());
        assert_eq!(state.services.len(), 1);
        assert_eq!(issues[0].field, "spec.ports[0].nodePort");
    }

    #[test]
    fn health_checks_count_local_ready_endpoints_once_each() {
        let service = svc("
metadata: {name: hc}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.4
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{name: a, port: 80, nodePort: 30100}, {name: b, port: 81, nodePort: 30101}]
");
        let slices = [
            slice_of(
                "hc-1",
                "hc",
                "{name: a, port: 8080}, {name: b, port: 8081}",
                &[
                    "{addresses: [10.0.0.1], nodeName: node-a}",
                    "{addresses: [10.0.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                    "{addresses: [10.0.0.4], nodeName: node-a, conditions: {ready: false}}",
                    "{addresses: [10.0.0.2], nodeName: node-b}",
                ],
            ),
            slice_of(
                "hc-2",
                "hc",
                "{name: a, port: 8080}",
                &["{addresses: [10.0.0.5], nodeName: node-a}"],
            ),
        ];
        let (state, issues) =
            desired_state_with(std::slice::from_ref(&service), &slices, &node_options());
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            state.health_checks.get(&32100),
            Some(&HealthCheck {
                namespace: "default".into(),
                name: "hc".into(),
                local_ready: 2,
                local_ready6: 0,
            })
        );
        assert_eq!(state.health_checks.len(), 1);

        // Only terminating endpoints here: 0 (the port answers 503).
        let only_terminating = [slice_of(
            "hc-1",
            "hc",
            "{name: a, port: 8080}",
            &[
                "{addresses: [10.0.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
            ],
        )];
        let (state, _) = desired_state_with(
            std::slice::from_ref(&service),
            &only_terminating,
            &node_options(),
        );
        assert_eq!(state.health_checks[&32100].local_ready, 0);

        // Only LoadBalancer Services with externalTrafficPolicy Local have one.
        for (from, to) in [
            (
                "externalTrafficPolicy: Local",
                "externalTrafficPolicy: Cluster",
            ),
            ("type: LoadBalancer", "type: NodePort"),
        ] {
            let yaml = serde_yaml_ng::to_string(&service)
                .unwrap()
                .replace(from, to);
            let (state, _) = desired_state_with(&[svc(&yaml)], &slices, &node_options());
            assert!(state.health_checks.is_empty(), "{to}");
        }

        // Two Services on one port: the first by namespace/name keeps it.
        let mut other = service.clone();
        other.metadata.name = Some("ab".into());
        let (state, issues) = desired_state_with(&[service, other], &slices, &node_options());
        assert_eq!(state.health_checks[&32100].name, "ab");
        // (Its ports clash too, as it is a copy: only the health-check one matters here.)
        assert_eq!(
            issues
                .iter()
                .filter(|i| i.field == "spec.healthCheckNodePort")
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "Service default/hc: spec.healthCheckNodePort: 32100 is also claimed by Service default/ab, which sorts first and keeps it; not answered for this Service"
            ]
        );
    }

    #[test]
    fn external_addresses_conflict_per_view_with_the_first_service_winning() {
        // `alpha` has 10.96.2.1:80 as its ClusterIP; `beta` lists it as an external IP: the
        // in-cluster view is alpha's, the external view beta's (nobody else claims it).
        let alpha =
            svc("metadata: {name: alpha}\nspec: {clusterIP: 10.96.2.1, ports: [{port: 80}]}");
        let beta = svc(
            "metadata: {name: beta}\nspec: {clusterIP: 10.96.2.2, externalIPs: [10.96.2.1], ports: [{port: 80}]}",
        );
        // `gamma`'s NodePort lands on the node address `delta` lists as an external IP.
        let gamma = svc(
            "metadata: {name: gamma}\nspec: {type: NodePort, clusterIP: 10.96.2.3, ports: [{port: 80, nodePort: 30200}]}",
        );
        let delta = svc(
            "metadata: {name: delta}\nspec: {clusterIP: 10.96.2.4, externalIPs: [192.168.1.10], ports: [{port: 30200}]}",
        );
        for services in [
            [alpha.clone(), beta.clone(), gamma.clone(), delta.clone()],
            [delta, gamma, beta, alpha],
        ] {
            let (state, issues) = desired_state_with(&services, &[], &node_options());
            let owner = |f: Frontend| state.services[&f].name.name.clone();
            assert_eq!(owner(fe("10.96.2.1", 80, Protocol::Tcp)), "alpha");
            assert_eq!(owner(ext("10.96.2.1", 80)), "beta");
            assert_eq!(owner(ext("192.168.1.10", 30200)), "delta");
            assert_eq!(
                state.services[&ext("192.168.1.10", 30200)].kind,
                FrontendKind::ExternalIp
            );
            assert_eq!(owner(ext("192.168.2.10", 30200)), "gamma");
            let mut text: Vec<String> = issues.iter().map(ToString::to_string).collect();
            text.sort();
            assert_eq!(
                text,
                [
                    "Service default/beta: spec.ports[0]: 10.96.2.1:80/TCP is also claimed by Service default/alpha (spec.ports[0]), which sorts first and keeps it; ExternalIP frontend ignored",
                    "Service default/gamma: spec.ports[0]: 192.168.1.10:30200/TCP (external view) is also claimed by Service default/delta (spec.ports[0]), which sorts first and keeps it; NodePort frontend ignored",
                    "Service default/gamma: spec.ports[0]: 192.168.1.10:30200/TCP is also claimed by Service default/delta (spec.ports[0]), which sorts first and keeps it; NodePort frontend ignored",
                ]
            );
        }
    }

    #[test]
    fn an_address_listed_twice_in_one_service_is_served_once() {
        let service = svc("
metadata: {name: twice}
spec:
  type: LoadBalancer
  clusterIP: 10.96.2.5
  externalIPs: [203.0.113.9, 203.0.113.9]
  ports: [{port: 80}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.9}]}}
");
        let (state, issues) = desired_state_with(&[service], &[], &node_options());
        assert_eq!(state.services.len(), 3);
        assert_eq!(
            state.services[&ext("203.0.113.9", 80)].kind,
            FrontendKind::ExternalIp
        );
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues.iter().all(|i| i.severity == Severity::Notice));
    }
}
