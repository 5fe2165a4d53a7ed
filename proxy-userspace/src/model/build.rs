//! Building the [`DesiredState`] from Service and EndpointSlice objects, with kube-proxy's
//! rules (see `shared/kubernetes-service-semantics.md`):
//!
//! - Services: skipped when headless (`clusterIP` None or empty), `ExternalName`, or labelled
//!   `service.kubernetes.io/service-proxy-name` / `service.kubernetes.io/headless`. Only the
//!   IPv4 ClusterIP is served here; one [`DesiredService`] per (ClusterIP, port, protocol).
//! - EndpointSlices: the same label filter; grouped by `kubernetes.io/service-name` and
//!   namespace; only `IPv4` slices; only `addresses[0]` of an endpoint; merged over slices
//!   with duplicates (same IP:port) resolved in favour of the non-terminating copy.
//! - Backends of a service port: the slice ports with the same name and protocol (the
//!   Service's `targetPort` is never read); ready endpoints, or, when none is ready, the
//!   serving and terminating ones.
//!
//! Nothing here fails: whatever cannot be served is left out and reported as a
//! [`ModelIssue`] naming the object and field.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice},
};

use proxy_common::service::{SVC_F_DROP_EMPTY, SVC_F_SNAT, SVC_F_SOURCE_RANGES};

use super::{
    DesiredService, DesiredState, Endpoint, Frontend, FrontendKind, HealthCheck, IpRange, Protocol,
    Scheduler, Scheduling, Scope, ServicePortName,
};

/// Label that hands a Service (or slice) to another proxy; kube-proxy ignores such objects.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that marks a Service (or slice) headless.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Annotation of a Service choosing its scheduler (`rr`, `maglev`, ...).
pub const ANNOTATION_SCHEDULER: &str = "bpfproxy.io/scheduler";
/// Annotation of a Service giving backend weights: `10.244.1.5=3,10.244.2.7=2` (address
/// `=` weight 1..=255; unlisted backends weigh 1).
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
    /// node's addresses), one NodePort frontend each.
    pub node_addresses: Vec<Ipv4Addr>,
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
    /// Expected in some setups (an IPv6-only Service, a feature not served yet); for the log.
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

/// What was found in a `clusterIP`/`clusterIPs` value.
enum ClusterIp {
    V4(Ipv4Addr),
    V6,
    Invalid,
}

fn classify_ip(s: &str) -> ClusterIp {
    if let Some(a) = parse_ipv4(s) {
        ClusterIp::V4(a)
    } else if s.parse::<Ipv6Addr>().is_ok() {
        ClusterIp::V6
    } else {
        ClusterIp::Invalid
    }
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

/// The endpoints of one (namespace, service, port name, protocol), keyed by IP:port.
pub(crate) type CandidateSet = BTreeMap<(Ipv4Addr, u16), Candidate>;

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

    /// Merges the IPv4 slices into candidate sets per service port.
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
        // FQDN slices have no meaning for a proxy; IPv6 ones are the IPv6 datapath's.
        if slice.address_type != "IPv4" {
            return part;
        }
        part.service = Some(service.clone());
        part.endpoints = slice
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| self.candidate(&object, i, e, node_name))
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
        node_name: Option<&str>,
    ) -> Option<(Ipv4Addr, Candidate)> {
        // Only addresses[0] is used, as kube-proxy does; an endpoint without one is skipped.
        let first = endpoint.addresses.first()?;
        let Some(addr) = parse_ipv4(first) else {
            self.issue(
                Severity::Warning,
                object,
                format!("endpoints[{index}].addresses[0]"),
                format!("{first:?} is not an IPv4 address; endpoint ignored"),
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

    /// The IPv4 ClusterIP of a Service, or `None` when it is not to be served here.
    fn cluster_ip(&mut self, object: &str, svc: &Service) -> Option<Ipv4Addr> {
        let spec = svc.spec.as_ref()?;
        let single = spec.cluster_ip.as_deref().unwrap_or("");
        // `clusterIPs` (dual stack) holds `clusterIP` first; take its IPv4 entry.
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
            return None;
        }
        if ips.contains(&"None") {
            return None;
        }
        let mut saw_v6 = false;
        for (i, ip) in ips.iter().enumerate() {
            match classify_ip(ip) {
                ClusterIp::V4(a) => return Some(a),
                ClusterIp::V6 => saw_v6 = true,
                ClusterIp::Invalid => {
                    let at = if field == "spec.clusterIPs" {
                        format!("{field}[{i}]")
                    } else {
                        field.to_string()
                    };
                    self.issue(
                        Severity::Warning,
                        object,
                        at,
                        format!("{ip:?} is not an IP address; Service not served"),
                    );
                    return None;
                }
            }
        }
        if saw_v6 {
            self.issue(
                Severity::Notice,
                object,
                field.into(),
                "IPv6 only; only IPv4 ClusterIPs are served so far".into(),
            );
        }
        None
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
                    .and_then(|(a, w)| Some((parse_ipv4(a.trim())?, w.trim().parse::<u8>().ok()?)));
                match parsed {
                    Some((addr, w)) if w >= 1 => {
                        weights.insert(addr.into(), w);
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
        addr: Ipv4Addr,
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

    /// The IPv4 addresses of a list of `field` (`spec.externalIPs`); IPv6 ones belong to
    /// the IPv6 datapath and are skipped, others are reported.
    fn ipv4_list<'s>(
        &mut self,
        object: &str,
        field: &str,
        list: impl Iterator<Item = (usize, &'s str)>,
    ) -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for (i, ip) in list {
            match classify_ip(ip) {
                ClusterIp::V4(a) => {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                ClusterIp::V6 => {}
                ClusterIp::Invalid => self.issue(
                    Severity::Warning,
                    object,
                    field.replace("[]", &format!("[{i}]")),
                    format!("{ip:?} is not an IP address; ignored"),
                ),
            }
        }
        out
    }

    /// `spec.loadBalancerSourceRanges` (whitespace trimmed, as kube-proxy does): the IPv4
    /// ranges, sorted. IPv6 ranges are the IPv6 datapath's; invalid ones are reported.
    fn source_ranges(&mut self, object: &str, ranges: &[String]) -> Vec<IpRange> {
        let mut out = Vec::new();
        for (i, raw) in ranges.iter().enumerate() {
            let text = raw.trim();
            let parsed = (|| {
                let (addr, len) = text.split_once('/')?;
                if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let len: u8 = len.parse().ok()?;
                match classify_ip(addr) {
                    ClusterIp::V4(a) => IpRange::new(a, len).map(Some),
                    ClusterIp::V6 => (len <= 128).then_some(None),
                    ClusterIp::Invalid => None,
                }
            })();
            match parsed {
                Some(Some(range)) => out.push(range),
                Some(None) => {}
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
pub(crate) fn merge_candidate(set: &mut CandidateSet, key: (Ipv4Addr, u16), candidate: Candidate) {
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

/// Ready endpoints; when none is ready, the serving and terminating ones (marked
/// terminating). Sorted and unique. kube-proxy's cluster policy.
pub(crate) fn select_endpoints(set: Option<&CandidateSet>) -> Vec<Endpoint> {
    select_where(set, |_| true)
}

/// The local endpoints: ready ones; when no local one is ready, the local serving and
/// terminating ones. kube-proxy's Local policy (whatever the other nodes have).
pub(crate) fn select_local(set: Option<&CandidateSet>) -> Vec<Endpoint> {
    select_where(set, |c| c.local)
}

fn select_where(set: Option<&CandidateSet>, keep: impl Fn(&Candidate) -> bool) -> Vec<Endpoint> {
    let Some(set) = set else { return Vec::new() };
    let endpoint = |(&(addr, port), c): (&(Ipv4Addr, u16), &Candidate)| Endpoint {
        addr: addr.into(),
        port,
        terminating: !c.ready,
        local: c.local,
    };
    let ready: Vec<Endpoint> = set
        .iter()
        .filter(|(_, c)| c.ready && keep(c))
        .map(endpoint)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    // The map is keyed by IP:port, so both lists come out sorted and unique.
    set.iter()
        .filter(|(_, c)| c.serving && c.terminating && keep(c))
        .map(endpoint)
        .collect()
}

/// Ready local endpoints of a Service over all its slice ports, each address once (what
/// its health-check node port reports; terminating endpoints do not count).
pub(crate) fn local_ready<'s>(sets: impl Iterator<Item = &'s CandidateSet>) -> usize {
    let mut addrs = std::collections::BTreeSet::new();
    for set in sets {
        for (&(addr, _), c) in set {
            if c.ready && c.local {
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
                    let sets = endpoints
                        .range(
                            (
                                namespace.clone(),
                                name.clone(),
                                String::new(),
                                Protocol::Tcp,
                            )..,
                        )
                        .take_while(|((ns, n, ..), _)| *ns == namespace && *n == name)
                        .map(|(_, set)| set);
                    state.health_checks.insert(
                        hc_port,
                        HealthCheck {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            local_ready: local_ready(sets),
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
/// usable ports and its IPv4 endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SlicePart {
    /// The Service's name; `None` when the slice is ignored (labels, address type).
    pub service: Option<String>,
    /// (port name, protocol, number) of each usable port, in order.
    pub ports: Vec<(String, Protocol, u16)>,
    pub endpoints: Vec<(Ipv4Addr, Candidate)>,
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
    pub(crate) fn desired(&self, port: &PortPart, set: Option<&CandidateSet>) -> DesiredService {
        let cluster = select_endpoints(set);
        let (endpoints, flags) = match port.policy {
            Policy::Cluster => (cluster, port.flags),
            Policy::Local => {
                let local = select_local(set);
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
/// Frontends of each port: the ClusterIP (in-cluster view, internalTrafficPolicy
/// applied); and each external address (`spec.externalIPs`, the LoadBalancer ingress IPs
/// without ipMode Proxy, the NodePort on each of `options.node_addresses`) twice: in the
/// external view with externalTrafficPolicy applied (Cluster: all endpoints, SNAT), and in
/// the in-cluster view with all endpoints, as kube-proxy short-circuits pod traffic to
/// external addresses. loadBalancerSourceRanges apply to the LoadBalancer IPs only.
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
    let Some(addr) = b.cluster_ip(&object, svc) else {
        part.issues = b.issues;
        return part;
    };
    let load_balancer = spec.type_.as_deref() == Some("LoadBalancer");
    let internal_local = is_local(spec.internal_traffic_policy.as_deref());
    let external_local = is_local(spec.external_traffic_policy.as_deref());
    let external_ips = b.ipv4_list(
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
        lb_ips = b.ipv4_list(&object, "status.loadBalancer.ingress[].ip", ips);
        if let Some(ranges) = spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| !r.is_empty())
        {
            // Ranges given but none usable here: nobody is allowed (fail closed).
            source_ranges = Some(b.source_ranges(&object, ranges));
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
        let Some(cluster) = b.frontend(&object, i, addr, port) else {
            continue;
        };
        let name = ServicePortName {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: port.name.clone().unwrap_or_default(),
            protocol: cluster.protocol,
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
        add(
            &mut b,
            cluster,
            FrontendKind::ClusterIp,
            cluster_policy,
            0,
            &[],
        );
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
        let externals = external_ips
            .iter()
            .map(|a| (*a, cluster.port, FrontendKind::ExternalIp))
            .chain(
                lb_ips
                    .iter()
                    .map(|a| (*a, cluster.port, FrontendKind::LoadBalancer)),
            )
            .chain(node_port.into_iter().flat_map(|np| {
                options
                    .node_addresses
                    .iter()
                    .map(move |a| (*a, np, FrontendKind::NodePort))
            }));
        for (ext_addr, ext_port, kind) in externals {
            let (ranges, range_flag) = match (&source_ranges, kind) {
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
        Frontend::cluster(addr.parse::<std::net::IpAddr>().unwrap(), port, protocol)
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

        // FQDN and IPv6 slices are not for this datapath.
        for t in ["FQDN", "IPv6"] {
            let other = MYAPP_SLICE.replace("addressType: IPv4", &format!("addressType: {t}"));
            let (state, issues) = desired_state(&[svc(MYAPP)], &[slice(&other)]);
            assert!(endpoints_of(&state, fe("10.96.0.10", 80, Protocol::Tcp)).is_empty());
            assert!(issues.is_empty());
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

    #[test]
    fn the_ipv4_cluster_ip_of_a_dual_stack_service_is_served() {
        let dual = svc("
metadata: {name: dual}
spec:
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 10.96.0.60]
  ipFamilies: [IPv6, IPv4]
  ports: [{port: 80}]
");
        let v6 = svc(
            "metadata: {name: v6}\nspec: {clusterIP: 'fd00::11', clusterIPs: ['fd00::11'], ports: [{port: 80}]}",
        );
        let (state, issues) = desired_state(&[dual, v6], &[]);
        assert_eq!(
            state.services.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.60", 80, Protocol::Tcp)]
        );
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].severity, Severity::Notice);
        assert_eq!(issues[0].object, "Service default/v6");
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
                r#"EndpointSlice default/bad-1: endpoints[0].addresses[0]: "10.0.0.300" is not an IPv4 address; endpoint ignored"#,
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
  externalIPs: [198.51.100.7, 'fd00::7']
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

        // Ranges given, none usable: nobody is allowed rather than everybody.
        let service = lb_service("  loadBalancerSourceRanges: [nope]");
        let (state, issues) = desired_state_with(&[service], &[], &node_options());
        assert_eq!(issues.len(), 1);
        let s = &state.services[&ext("203.0.113.1", 80)];
        assert_ne!(s.flags & SVC_F_SOURCE_RANGES, 0);
        assert!(s.source_ranges.is_empty());
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
