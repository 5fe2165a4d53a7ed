//! The desired state kept up to date object by object, so that an API event costs what
//! its Service costs, not what the cluster costs.
//!
//! Each Service and each EndpointSlice is parsed once into its part (see `build.rs`); a
//! Service's desired entries are rebuilt from its own part and the parts of its own slices
//! when one of them changes. Frontends claimed by several Services go to the one that
//! sorts first (namespace/name), as in [`super::desired_state`]. [`Model::take_changed`]
//! names the frontends whose desired entry changed, for the planner to diff only those.
//!
//! Pure like the rest of the model: the same objects give the same [`DesiredState`] as
//! [`super::desired_state_with`], whatever order the changes came in (unit-tested).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    DesiredState, Family, Frontend, HealthCheck, Protocol, Scheduling,
    build::{
        CandidateSet, ModelIssue, ModelOptions, ServicePart, Severity, SlicePart, claimed_issue,
        health_claimed_issue, local_ready, service_object, service_part, slice_part,
    },
};

/// (namespace, name) of an object.
pub type ObjectKey = (String, String);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The desired state, maintained incrementally from object changes.
#[derive(Debug, Default)]
pub struct Model {
    options: ModelOptions,
    /// SCTP frontends are left out (with a warning): the datapath parses TCP and UDP only.
    serve_sctp: bool,
    services: BTreeMap<ObjectKey, ServicePart>,
    slices: BTreeMap<ObjectKey, SlicePart>,
    /// Service (namespace, name) -> names of its slices (same namespace), in name order
    /// (the merge order of [`super::desired_state`]).
    slices_of: BTreeMap<ObjectKey, BTreeSet<String>>,
    /// Services whose ports claim each frontend; the first one holds it.
    claims: BTreeMap<Frontend, BTreeSet<ObjectKey>>,
    /// Frontends claimed by more than one Service (so listing issues skips the others).
    contested: BTreeSet<Frontend>,
    /// Services answering each health-check node port; the first one holds it.
    health_claims: BTreeMap<u16, BTreeSet<ObjectKey>>,
    desired: DesiredState,
    /// SCTP frontends left out, with the warning naming them.
    unsupported: BTreeMap<Frontend, ModelIssue>,
    /// Services and slices whose parts carry issues (so listing them costs what they are).
    with_issues: BTreeSet<(bool, ObjectKey)>,
    changed: BTreeSet<Frontend>,
}

impl Model {
    /// An empty model; `serve_sctp` false leaves SCTP ports out with a warning.
    pub fn new(options: ModelOptions, serve_sctp: bool) -> Self {
        Model {
            options,
            serve_sctp,
            ..Default::default()
        }
    }

    /// The options the model applies.
    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    /// Changes the options (the node's name or NodePort addresses changed): the model is
    /// emptied, every frontend it held reported as changed, and the caller must give it
    /// all objects again with [`Model::replace_all`]. Nothing happens if they are equal.
    pub fn set_options(&mut self, options: ModelOptions) -> bool {
        if self.options == options {
            return false;
        }
        let mut changed = std::mem::take(&mut self.changed);
        changed.extend(self.desired.services.keys().copied());
        *self = Model {
            options,
            serve_sctp: self.serve_sctp,
            changed,
            ..Default::default()
        };
        true
    }

    /// What is desired now.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The frontends whose desired entry changed (added, updated or gone) since the last
    /// call.
    pub fn take_changed(&mut self) -> BTreeSet<Frontend> {
        std::mem::take(&mut self.changed)
    }

    /// A Service was added or changed.
    pub fn set_service(&mut self, svc: &Service) {
        let key = key_of(&svc.metadata);
        let part = service_part(svc, &self.options);
        if self.services.get(&key) == Some(&part) {
            return;
        }
        self.mark_issues(false, &key, !part.issues.is_empty());
        let old = self.services.insert(key.clone(), part);
        self.refresh_service(&key, old.as_ref());
    }

    /// A Service was deleted.
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(old) = self.services.remove(&key) {
            self.mark_issues(false, &key, false);
            self.refresh_service(&key, Some(&old));
        }
    }

    /// An EndpointSlice was added or changed.
    pub fn set_slice(&mut self, slice: &EndpointSlice) {
        let key = key_of(&slice.metadata);
        let part = slice_part(slice, self.options.node_name.as_deref());
        if self.slices.get(&key) == Some(&part) {
            return;
        }
        self.mark_issues(true, &key, !part.issues.is_empty());
        let new_owner = part.service.clone();
        let old = self.slices.insert(key.clone(), part);
        self.slice_moved(&key, old.and_then(|o| o.service), new_owner);
    }

    /// An EndpointSlice was deleted.
    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(old) = self.slices.remove(&key) {
            self.mark_issues(true, &key, false);
            self.slice_moved(&key, old.service, None);
        }
    }

    /// Makes the model hold exactly these objects (a relist, a manifest reload, a full
    /// resync): each is parsed, but only those that differ from what the model holds are
    /// rebuilt and reported as changed.
    pub fn replace_all<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) {
        // Slices first: a new Service then finds its endpoints at once.
        let mut seen = BTreeSet::new();
        for slice in slices {
            seen.insert(key_of(&slice.metadata));
            self.set_slice(slice);
        }
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.remove_slice(&ns, &name);
        }
        let mut seen = BTreeSet::new();
        for svc in services {
            seen.insert(key_of(&svc.metadata));
            self.set_service(svc);
        }
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.remove_service(&ns, &name);
        }
    }

    /// Everything the model could not serve as written: the issues of the current
    /// objects, frontends lost to a Service that sorts first, SCTP ports left out.
    pub fn issues(&self) -> Vec<ModelIssue> {
        let mut issues = Vec::new();
        for (is_slice, key) in &self.with_issues {
            let part_issues = if *is_slice {
                self.slices.get(key).map(|p| &p.issues)
            } else {
                self.services.get(key).map(|p| &p.issues)
            };
            issues.extend(part_issues.into_iter().flatten().cloned());
        }
        for frontend in &self.contested {
            let Some(owners) = self.claims.get(frontend) else {
                continue;
            };
            let mut owners = owners.iter();
            let Some(first) = owners.next() else { continue };
            for loser in owners {
                let (Some(port), Some(owner_port)) =
                    (self.port_of(loser, frontend), self.port_of(first, frontend))
                else {
                    continue;
                };
                issues.push(claimed_issue(
                    &service_object(&loser.0, &loser.1),
                    port,
                    &service_object(&first.0, &first.1),
                    owner_port.index,
                ));
            }
        }
        for (port, owners) in &self.health_claims {
            let mut owners = owners.iter();
            let Some(first) = owners.next() else { continue };
            for loser in owners {
                issues.push(health_claimed_issue(
                    &service_object(&loser.0, &loser.1),
                    *port,
                    &service_object(&first.0, &first.1),
                ));
            }
        }
        issues.extend(self.unsupported.values().cloned());
        issues
    }

    /// Moves a Service's health-check claim from `old` to `new` and answers both ports
    /// again.
    fn refresh_health_claim(&mut self, key: &ObjectKey, old: Option<u16>, new: Option<u16>) {
        if old != new {
            if let Some(port) = old
                && let Some(set) = self.health_claims.get_mut(&port)
            {
                set.remove(key);
                if set.is_empty() {
                    self.health_claims.remove(&port);
                }
            }
            if let Some(port) = new {
                self.health_claims
                    .entry(port)
                    .or_default()
                    .insert(key.clone());
            }
        }
        for port in old.into_iter().chain(new) {
            self.resolve_health(port);
        }
    }

    /// Recomputes the health check of one node port from the Service holding it.
    fn resolve_health(&mut self, port: u16) {
        let wanted = self
            .health_claims
            .get(&port)
            .and_then(|s| s.first())
            .map(|owner| {
                let mut sets = BTreeMap::new();
                for slice in self.slices_of.get(owner).into_iter().flatten() {
                    if let Some(s) = self.slices.get(&(owner.0.clone(), slice.clone())) {
                        s.merge_all(&mut sets);
                    }
                }
                HealthCheck {
                    namespace: owner.0.clone(),
                    name: owner.1.clone(),
                    local_ready: local_ready(sets.values(), Family::V4),
                    local_ready6: local_ready(sets.values(), Family::V6),
                }
            });
        match wanted {
            Some(h) => self.desired.health_checks.insert(port, h),
            None => self.desired.health_checks.remove(&port),
        };
    }

    fn port_of(&self, service: &ObjectKey, frontend: &Frontend) -> Option<&super::build::PortPart> {
        self.services
            .get(service)?
            .ports
            .iter()
            .find(|p| p.frontend == *frontend)
    }

    fn mark_issues(&mut self, is_slice: bool, key: &ObjectKey, has: bool) {
        if has {
            self.with_issues.insert((is_slice, key.clone()));
        } else {
            self.with_issues.remove(&(is_slice, key.clone()));
        }
    }

    /// A slice joined, left or changed within its Service(s): their frontends are rebuilt.
    fn slice_moved(&mut self, key: &ObjectKey, old: Option<String>, new: Option<String>) {
        let (namespace, slice_name) = key;
        if let Some(old) = &old {
            let service = (namespace.clone(), old.clone());
            if let Some(set) = self.slices_of.get_mut(&service) {
                set.remove(slice_name);
                if set.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
        }
        if let Some(new) = &new {
            self.slices_of
                .entry((namespace.clone(), new.clone()))
                .or_default()
                .insert(slice_name.clone());
        }
        for service in old
            .iter()
            .chain(new.iter().filter(|n| Some(*n) != old.as_ref()))
        {
            let service = (namespace.clone(), service.clone());
            let frontends: Vec<Frontend> = self
                .services
                .get(&service)
                .map(|p| p.ports.iter().map(|p| p.frontend).collect())
                .unwrap_or_default();
            for f in frontends {
                self.resolve(f);
            }
            if let Some(port) = self.services.get(&service).and_then(|p| p.health_check) {
                self.resolve_health(port);
            }
        }
    }

    /// A Service's part changed from `old`: claims are moved, and every frontend it held
    /// or holds now is resolved again.
    fn refresh_service(&mut self, key: &ObjectKey, old: Option<&ServicePart>) {
        let old_frontends: Vec<Frontend> = old
            .map(|p| p.ports.iter().map(|p| p.frontend).collect())
            .unwrap_or_default();
        let new_frontends: Vec<Frontend> = self
            .services
            .get(key)
            .map(|p| p.ports.iter().map(|p| p.frontend).collect())
            .unwrap_or_default();
        for f in &old_frontends {
            if !new_frontends.contains(f)
                && let Some(set) = self.claims.get_mut(f)
            {
                set.remove(key);
                if set.is_empty() {
                    self.claims.remove(f);
                }
            }
        }
        for f in &new_frontends {
            self.claims.entry(*f).or_default().insert(key.clone());
        }
        for f in old_frontends.into_iter().chain(new_frontends) {
            if self.claims.get(&f).is_some_and(|c| c.len() > 1) {
                self.contested.insert(f);
            } else {
                self.contested.remove(&f);
            }
            self.resolve(f);
        }
        let new_health = self.services.get(key).and_then(|p| p.health_check);
        self.refresh_health_claim(key, old.and_then(|p| p.health_check), new_health);
    }

    /// Recomputes the desired entry of one frontend from the Service holding it and that
    /// Service's slices; records it as changed if it differs.
    fn resolve(&mut self, frontend: Frontend) {
        let owner = self.claims.get(&frontend).and_then(|s| s.first());
        let mut wanted = owner.and_then(|owner| {
            let part = self.services.get(owner)?;
            let port = part.ports.iter().find(|p| p.frontend == frontend)?;
            let mut set = CandidateSet::new();
            for slice in self.slices_of.get(owner).into_iter().flatten() {
                if let Some(s) = self.slices.get(&(owner.0.clone(), slice.clone())) {
                    s.merge_into(&mut set, &port.name.port_name, frontend.protocol);
                }
            }
            let service = part.desired(port, Some(&set));
            Some((service, part.scheduling.clone(), port.index, owner.clone()))
        });
        self.unsupported.remove(&frontend);
        if frontend.protocol == Protocol::Sctp
            && !self.serve_sctp
            && let Some((_, _, index, owner)) = wanted.take()
        {
            self.unsupported.insert(
                frontend,
                ModelIssue {
                    severity: Severity::Warning,
                    object: service_object(&owner.0, &owner.1),
                    field: format!("spec.ports[{index}]"),
                    message: format!(
                        "{frontend}: SCTP is not supported by the datapath; not programmed"
                    ),
                },
            );
        }
        let (service, scheduling) = match wanted {
            Some((s, sched, ..)) => (Some(s), Some(sched).filter(|s| *s != Scheduling::default())),
            None => (None, None),
        };
        let mut changed = false;
        if self.desired.services.get(&frontend) != service.as_ref() {
            match service {
                Some(s) => self.desired.services.insert(frontend, s),
                None => self.desired.services.remove(&frontend),
            };
            changed = true;
        }
        if self.desired.scheduling.get(&frontend) != scheduling.as_ref() {
            match scheduling {
                Some(s) => self.desired.scheduling.insert(frontend, s),
                None => self.desired.scheduling.remove(&frontend),
            };
            changed = true;
        }
        if changed {
            self.changed.insert(frontend);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired_state_with;

    /// A small deterministic generator (no extra crate).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn random_service(rng: &mut Lcg, i: u64) -> Service {
        // IPv4 only, IPv6 only or dual stack (either family first), from small pools so
        // ClusterIPs clash within a family.
        let v4 = format!("10.96.0.{}", rng.next(4));
        let v6 = format!("'fd00:96::{}'", rng.next(4));
        let cluster_ips = match rng.next(4) {
            0 => format!("clusterIP: {v4}"),
            1 => format!("clusterIP: {v6}"),
            2 => format!("clusterIP: {v4}\n  clusterIPs: [{v4}, {v6}]"),
            _ => format!("clusterIP: {v6}\n  clusterIPs: [{v6}, {v4}]"),
        };
        let mut ports = Vec::new();
        for p in 0..1 + rng.next(3) {
            let proto = ["TCP", "TCP", "UDP", "SCTP"][rng.next(4) as usize];
            // NodePorts clash between Services now and then (one node address is shared).
            let node_port = match rng.next(3) {
                0 => String::new(),
                _ => format!(", nodePort: {}", 30000 + rng.next(3)),
            };
            ports.push(format!(
                "{{name: p{p}, port: {}, protocol: {proto}{node_port}}}",
                80 + rng.next(2)
            ));
        }
        let annotations = match rng.next(3) {
            0 => "annotations: {bpfproxy.io/scheduler: rr}",
            1 => "annotations: {bpfproxy.io/scheduler: nonsense}",
            _ => "annotations: {}",
        };
        let mut extra = match rng.next(6) {
            0 => "\n  type: ExternalName",
            1 => "\n  sessionAffinity: ClientIP",
            2 | 3 => "\n  type: LoadBalancer",
            _ => "",
        }
        .to_string();
        // External addresses from a small pool, so they clash with ClusterIPs and each other.
        if rng.next(3) == 0 {
            extra += &format!(
                "\n  externalIPs: [10.96.0.{}, 'fd00:96::{}']",
                rng.next(6),
                rng.next(6)
            );
        }
        for field in ["externalTrafficPolicy", "internalTrafficPolicy"] {
            if rng.next(4) != 0 {
                extra += &format!(
                    "\n  {field}: {}",
                    ["Local", "Cluster"][rng.next(2) as usize]
                );
            }
        }
        if rng.next(3) != 0 {
            extra += &format!("\n  healthCheckNodePort: {}", 32000 + rng.next(2));
        }
        match rng.next(4) {
            0 => extra += "\n  loadBalancerSourceRanges: [' 10.0.0.0/8', bad, 192.168.0.0/24]",
            1 => extra += "\n  loadBalancerSourceRanges: ['fd00::/8', ' 10.0.0.0/8 ']",
            2 => extra += "\n  loadBalancerSourceRanges: ['2001:db8::/32']",
            _ => {}
        }
        let status = match rng.next(3) {
            0 => format!(
                "\nstatus: {{loadBalancer: {{ingress: [{{ip: 10.96.0.{}}}, {{ip: 203.0.113.{}, ipMode: {}}}, {{ip: 'fd00:96::{}'}}]}}}}",
                rng.next(6),
                rng.next(2),
                ["VIP", "Proxy"][rng.next(2) as usize],
                rng.next(6)
            ),
            _ => String::new(),
        };
        let yaml = format!(
            "metadata: {{name: s{i}, namespace: ns{}, {annotations}}}\nspec:\n  {cluster_ips}\n  ports: [{}]{extra}{status}",
            rng.next(2),
            ports.join(", ")
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn random_slice(rng: &mut Lcg, i: u64) -> EndpointSlice {
        let v6 = rng.next(2) == 0;
        let mut endpoints = Vec::new();
        for _ in 0..rng.next(5) {
            let cond = match rng.next(4) {
                0 => "{ready: false, serving: true, terminating: true}",
                1 => "{ready: false}",
                _ => "{}",
            };
            // Now and then an address the slice's addressType does not allow.
            let addr = match (rng.next(20), v6) {
                (0, _) => "10.244.0.999".to_string(),
                (1, true) => "10.244.0.1".to_string(),
                (1, false) => "fd00:244::1".to_string(),
                (_, true) => format!("fd00:244::{}", rng.next(6)),
                (_, false) => format!("10.244.0.{}", rng.next(6)),
            };
            let node = ["", ", nodeName: node-a", ", nodeName: node-b"][rng.next(3) as usize];
            endpoints.push(format!(
                "{{addresses: [\"{addr}\"], conditions: {cond}{node}}}"
            ));
        }
        let mut ports = Vec::new();
        for p in 0..1 + rng.next(2) {
            let proto = ["TCP", "TCP", "UDP", "SCTP"][rng.next(4) as usize];
            ports.push(format!(
                "{{name: p{p}, port: {}, protocol: {proto}}}",
                8080 + rng.next(2)
            ));
        }
        let label = if rng.next(10) == 0 {
            String::new()
        } else {
            format!("kubernetes.io/service-name: s{}", rng.next(6))
        };
        let yaml = format!(
            "metadata: {{name: e{i}, namespace: ns{}, labels: {{{label}}}}}\naddressType: {}\nendpoints: [{}]\nports: [{}]",
            rng.next(2),
            if v6 { "IPv6" } else { "IPv4" },
            endpoints.join(", "),
            ports.join(", ")
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn sorted(mut issues: Vec<ModelIssue>) -> Vec<String> {
        let mut v: Vec<String> = issues.drain(..).map(|i| i.to_string()).collect();
        v.sort();
        v
    }

    /// Over random sequences of adds, changes and deletes (including frontends claimed
    /// by several Services and slices moving between Services), the model equals the one
    /// built from scratch from the same objects, its issues too, and `take_changed` names
    /// every frontend whose entry changed.
    #[test]
    fn changes_one_by_one_give_the_state_built_from_scratch() {
        let mut rng = Lcg(11);
        let options = ModelOptions {
            node_name: Some("node-a".into()),
            // The first of each family is also an external IP in the pool, so NodePorts
            // clash with them.
            node_addresses: vec![
                "10.96.0.5".parse().unwrap(),
                "192.168.0.1".parse().unwrap(),
                "fd00:96::5".parse().unwrap(),
                "fd00:251::1".parse().unwrap(),
            ],
            ..Default::default()
        };
        let mut model = Model::new(options.clone(), true);
        let mut services: BTreeMap<u64, Service> = BTreeMap::new();
        let mut slices: BTreeMap<u64, EndpointSlice> = BTreeMap::new();
        let mut before = DesiredState::default();
        // What the random objects covered, so the property is not vacuous.
        let (mut most_services, mut conflicts, mut with_endpoints) = (0, 0, 0);
        let (mut external, mut drop_empty, mut ranges) = (0, 0, 0);
        let (mut health, mut health_ready) = (0, 0);
        // Per family: frontends, ones with endpoints, with source ranges; dual-stack ports.
        let (mut v6_frontends, mut v6_with_endpoints, mut v6_ranges) = (0, 0, 0);
        let mut health_ready6 = 0;
        for round in 0..4000 {
            let i = rng.next(6);
            match rng.next(4) {
                0 => {
                    if let Some(s) = services.remove(&i) {
                        let (ns, name) = key_of(&s.metadata);
                        model.remove_service(&ns, &name);
                    }
                }
                1 => {
                    let s = random_service(&mut rng, i);
                    if let Some(old) = services.insert(i, s.clone())
                        && key_of(&old.metadata) != key_of(&s.metadata)
                    {
                        let (ns, name) = key_of(&old.metadata);
                        model.remove_service(&ns, &name);
                    }
                    model.set_service(&s);
                }
                2 => {
                    if let Some(s) = slices.remove(&i) {
                        let (ns, name) = key_of(&s.metadata);
                        model.remove_slice(&ns, &name);
                    }
                }
                _ => {
                    let s = random_slice(&mut rng, i);
                    if let Some(old) = slices.insert(i, s.clone())
                        && key_of(&old.metadata) != key_of(&s.metadata)
                    {
                        let (ns, name) = key_of(&old.metadata);
                        model.remove_slice(&ns, &name);
                    }
                    model.set_slice(&s);
                }
            }
            let all_services: Vec<Service> = services.values().cloned().collect();
            let all_slices: Vec<EndpointSlice> = slices.values().cloned().collect();
            let (want, want_issues) = desired_state_with(&all_services, &all_slices, &options);
            assert_eq!(model.desired(), &want, "round {round}");
            assert_eq!(sorted(model.issues()), sorted(want_issues), "round {round}");
            most_services = most_services.max(want.services.len());
            conflicts += model
                .issues()
                .iter()
                .filter(|i| i.message.contains("also claimed"))
                .count();
            with_endpoints += want
                .services
                .values()
                .filter(|s| !s.endpoints.is_empty())
                .count();
            for s in want.services.values() {
                let six = s.frontend.family() == crate::model::Family::V6;
                assert!(
                    s.endpoints
                        .iter()
                        .all(|e| crate::model::Family::of(&e.addr) == s.frontend.family()),
                    "round {round}: {s:?}"
                );
                v6_frontends += usize::from(six);
                v6_with_endpoints += usize::from(six && !s.endpoints.is_empty());
                v6_ranges += usize::from(six && !s.source_ranges.is_empty());
                external += usize::from(s.frontend.scope == crate::model::Scope::External);
                drop_empty += usize::from(s.flags & proxy_common::service::SVC_F_DROP_EMPTY != 0);
                ranges += usize::from(!s.source_ranges.is_empty());
            }
            health += want.health_checks.len();
            health_ready += want
                .health_checks
                .values()
                .filter(|h| h.local_ready > 0)
                .count();
            health_ready6 += want
                .health_checks
                .values()
                .filter(|h| h.local_ready6 > 0)
                .count();
            let changed = model.take_changed();
            let frontends: BTreeSet<Frontend> = before
                .services
                .keys()
                .chain(want.services.keys())
                .copied()
                .collect();
            for f in frontends {
                let differs = before.services.get(&f) != want.services.get(&f)
                    || before.scheduling.get(&f) != want.scheduling.get(&f);
                if differs {
                    assert!(changed.contains(&f), "round {round}: {f} not reported");
                }
            }
            before = want;

            // A replace with the same objects changes nothing.
            if round % 50 == 0 {
                model.replace_all(&all_services, &all_slices);
                assert!(model.take_changed().is_empty(), "round {round}");
                let mut fresh = Model::new(options.clone(), true);
                fresh.replace_all(&all_services, &all_slices);
                assert_eq!(fresh.desired(), model.desired());
            }
        }
        assert!(
            most_services >= 5 && conflicts > 0 && with_endpoints > 50,
            "{most_services} {conflicts} {with_endpoints}"
        );
        assert!(
            external > 100 && drop_empty > 10 && health > 100 && health_ready > 0 && ranges > 10,
            "{external} {drop_empty} {health} {health_ready} {ranges}"
        );
        assert!(
            v6_frontends > 100 && v6_with_endpoints > 20 && v6_ranges > 5 && health_ready6 > 0,
            "{v6_frontends} {v6_with_endpoints} {v6_ranges} {health_ready6}"
        );
    }

    #[test]
    fn sctp_is_left_out_with_a_warning_when_not_served() {
        let svc: Service = serde_yaml_ng::from_str(
            "metadata: {name: m, namespace: default}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{name: a, port: 80}, {name: b, port: 80, protocol: SCTP}]",
        )
        .unwrap();
        let mut model = Model::new(ModelOptions::default(), false);
        model.set_service(&svc);
        assert_eq!(model.desired().services.len(), 1);
        assert_eq!(
            sorted(model.issues()),
            [
                "Service default/m: spec.ports[1]: 10.96.0.9:80/SCTP: SCTP is not supported by the datapath; not programmed"
            ]
        );
        model.remove_service("default", "m");
        assert!(model.desired().services.is_empty());
        assert!(model.issues().is_empty());
    }

    #[test]
    fn an_endpoint_change_touches_only_its_service() {
        let mut model = Model::new(ModelOptions::default(), false);
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for i in 0..50 {
            services.push(
                serde_yaml_ng::from_str::<Service>(&format!(
                    "metadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}"
                ))
                .unwrap(),
            );
            slices.push(slice_with(i, 1));
        }
        model.replace_all(&services, &slices);
        assert_eq!(model.take_changed().len(), 50);
        model.set_slice(&slice_with(7, 2));
        let changed = model.take_changed();
        assert_eq!(
            changed.into_iter().collect::<Vec<_>>(),
            [Frontend::cluster(
                "10.96.1.7".parse::<std::net::Ipv4Addr>().unwrap(),
                80,
                Protocol::Tcp
            )]
        );
        let f = model.desired().services.values().nth(7).unwrap();
        assert_eq!(f.endpoints.len(), 2);
    }

    /// A health check follows its Service's slices and the Service itself, and a change of
    /// the node's addresses moves every NodePort.
    #[test]
    fn health_checks_and_node_ports_follow_changes() {
        let options = ModelOptions {
            node_name: Some("node-a".into()),
            node_addresses: vec!["192.168.0.1".parse().unwrap()],
            ..Default::default()
        };
        let mut model = Model::new(options.clone(), false);
        let svc: Service = serde_yaml_ng::from_str(
            "metadata: {name: lb, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.9\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{port: 80, nodePort: 30080}]",
        )
        .unwrap();
        let slice = |nodes: &[&str]| -> EndpointSlice {
            let eps: Vec<String> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{{addresses: [10.244.0.{i}], nodeName: {n}}}"))
                .collect();
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: lb-1, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{port: 8080}}]",
                eps.join(", ")
            ))
            .unwrap()
        };
        model.set_service(&svc);
        assert_eq!(model.desired().health_checks[&32000].local_ready, 0);
        model.set_slice(&slice(&["node-a", "node-b", "node-a"]));
        assert_eq!(model.desired().health_checks[&32000].local_ready, 2);
        model.set_slice(&slice(&["node-b"]));
        assert_eq!(model.desired().health_checks[&32000].local_ready, 0);
        model.remove_service("default", "lb");
        assert!(model.desired().health_checks.is_empty());
        model.set_service(&svc);
        model.take_changed();

        let moved = ModelOptions {
            node_addresses: vec!["192.168.0.2".parse().unwrap()],
            ..options
        };
        assert!(model.set_options(moved.clone()));
        assert!(!model.set_options(moved.clone()));
        model.replace_all([&svc], [&slice(&["node-a"])]);
        let (want, _) = super::super::desired_state_with(&[svc], &[slice(&["node-a"])], &moved);
        assert_eq!(model.desired(), &want);
        let changed = model.take_changed();
        for addr in ["192.168.0.1", "192.168.0.2"] {
            assert!(
                changed
                    .iter()
                    .any(|f| f.addr.to_string() == addr && f.port == 30080),
                "{addr}: {changed:?}"
            );
        }
        assert_eq!(model.desired().health_checks[&32000].local_ready, 1);
    }

    /// A dual-stack LoadBalancer's IPv6 side follows its IPv6 slice only (frontends,
    /// health-check count), and a new IPv6 node address moves its IPv6 NodePorts while the
    /// IPv4 ones stay.
    #[test]
    fn the_ipv6_side_of_a_dual_stack_service_follows_its_own_slices_and_addresses() {
        let options = ModelOptions {
            node_name: Some("node-a".into()),
            node_addresses: vec![
                "192.168.0.1".parse().unwrap(),
                "fd00:251::1".parse().unwrap(),
            ],
            ..Default::default()
        };
        let mut model = Model::new(options.clone(), false);
        let svc: Service = serde_yaml_ng::from_str(
            "metadata: {name: lb, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.9\n  clusterIPs: [10.96.0.9, 'fd00:96::9']\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{port: 80, nodePort: 30080}]",
        )
        .unwrap();
        let slice = |family: &str, addrs: &[&str]| -> EndpointSlice {
            let eps: Vec<String> = addrs
                .iter()
                .map(|a| format!("{{addresses: ['{a}'], nodeName: node-a}}"))
                .collect();
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: lb-{family}, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: {family}\nendpoints: [{}]\nports: [{{port: 8080}}]",
                eps.join(", ")
            ))
            .unwrap()
        };
        model.set_service(&svc);
        model.set_slice(&slice("IPv4", &["10.244.0.1"]));
        model.take_changed();
        let hc = |m: &Model| {
            let h = &m.desired().health_checks[&32000];
            (h.local_ready, h.local_ready6)
        };
        assert_eq!(hc(&model), (1, 0));

        // An IPv6 slice changes the IPv6 frontends only.
        model.set_slice(&slice("IPv6", &["fd00:244::1", "fd00:244::2"]));
        assert_eq!(hc(&model), (1, 2));
        let changed = model.take_changed();
        assert!(!changed.is_empty());
        assert!(
            changed
                .iter()
                .all(|f| f.family() == crate::model::Family::V6),
            "{changed:?}"
        );
        let v6 = &model.desired().services[&Frontend::cluster(
            "fd00:96::9".parse::<std::net::Ipv6Addr>().unwrap(),
            80,
            Protocol::Tcp,
        )];
        assert_eq!(v6.endpoints.len(), 2);

        // The node's IPv6 address changes: only the IPv6 NodePorts move.
        let moved = ModelOptions {
            node_addresses: vec![
                "192.168.0.1".parse().unwrap(),
                "fd00:251::2".parse().unwrap(),
            ],
            ..options
        };
        assert!(model.set_options(moved.clone()));
        let svcs = [svc];
        let slices = [
            slice("IPv4", &["10.244.0.1"]),
            slice("IPv6", &["fd00:244::1", "fd00:244::2"]),
        ];
        model.replace_all(&svcs, &slices);
        let (want, _) = super::super::desired_state_with(&svcs, &slices, &moved);
        assert_eq!(model.desired(), &want);
        let node_ports: Vec<String> = want
            .services
            .keys()
            .filter(|f| f.port == 30080)
            .map(|f| f.addr.to_string())
            .collect();
        assert_eq!(
            node_ports,
            ["192.168.0.1", "192.168.0.1", "fd00:251::2", "fd00:251::2"]
        );
    }

    fn slice_with(i: u32, endpoints: u32) -> EndpointSlice {
        let eps: Vec<String> = (0..endpoints)
            .map(|e| format!("{{addresses: [10.244.{i}.{e}]}}"))
            .collect();
        serde_yaml_ng::from_str(&format!(
            "metadata: {{name: s{i}-a, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{port: 8080}}]",
            eps.join(", ")
        ))
        .unwrap()
    }
}
