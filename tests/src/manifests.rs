//! Kubernetes objects as YAML files in the directory the agent watches.
//!
//! Files are replaced atomically (written to a hidden temporary name, then renamed), so the
//! agent never reads half a file.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// A Service: ClusterIP by default; [`Service::kind`] and the other builders make it a
/// NodePort or LoadBalancer with its external settings. Its ClusterIP may be of either
/// family; [`Service::dual_stack`] adds a second of the other family (`clusterIPs`,
/// `ipFamilies` in that order, `ipFamilyPolicy`).
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs`; the first is `spec.clusterIP`, and their families in order are
    /// `spec.ipFamilies`.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ipFamilyPolicy` (`SingleStack`, `PreferDualStack`, `RequireDualStack`), when
    /// set.
    pub ip_family_policy: Option<String>,
    pub ports: Vec<ServicePort>,
    /// `spec.type`: `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub kind: String,
    /// `spec.externalTrafficPolicy` (`Cluster`/`Local`), when set.
    pub external_traffic_policy: Option<String>,
    /// `spec.internalTrafficPolicy` (`Cluster`/`Local`), when set.
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ingress: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`.
    pub source_ranges: Vec<String>,
}

/// One port of a [`Service`].
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

impl Service {
    /// A ClusterIP service with no ports yet.
    pub fn cluster_ip(namespace: &str, name: &str, cluster_ip: impl Into<IpAddr>) -> Self {
        Service {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            cluster_ips: vec![cluster_ip.into()],
            ip_family_policy: None,
            ports: Vec::new(),
            kind: "ClusterIP".to_owned(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            health_check_node_port: None,
            external_ips: Vec::new(),
            lb_ingress: Vec::new(),
            source_ranges: Vec::new(),
        }
    }

    /// Adds a port `name` (`protocol` `TCP`/`UDP`) `port` -> `target_port`.
    pub fn port(mut self, name: &str, protocol: &str, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePort {
            name: name.to_owned(),
            protocol: protocol.to_owned(),
            port,
            target_port,
            node_port: None,
        });
        self
    }

    /// Adds a port like [`Service::port`] with `nodePort` `node_port`.
    pub fn node_port(
        mut self,
        name: &str,
        protocol: &str,
        port: u16,
        target_port: u16,
        node_port: u16,
    ) -> Self {
        self = self.port(name, protocol, port, target_port);
        self.ports.last_mut().expect("just pushed").node_port = Some(node_port);
        self
    }

    /// Makes the service dual stack: `second` (of the other family than the first
    /// ClusterIP) joins `clusterIPs`, and `ipFamilyPolicy` becomes `policy`
    /// (`RequireDualStack` or `PreferDualStack`).
    pub fn dual_stack(mut self, second: impl Into<IpAddr>, policy: &str) -> Self {
        self.cluster_ips.push(second.into());
        self.ip_family_policy = Some(policy.to_owned());
        self
    }

    /// Sets `spec.ipFamilyPolicy`.
    pub fn ip_family_policy(mut self, policy: &str) -> Self {
        self.ip_family_policy = Some(policy.to_owned());
        self
    }

    /// Sets `spec.type` (`ClusterIP`, `NodePort`, `LoadBalancer`).
    pub fn kind(mut self, kind: &str) -> Self {
        self.kind = kind.to_owned();
        self
    }

    /// Sets `spec.externalTrafficPolicy`.
    pub fn external_policy(mut self, policy: &str) -> Self {
        self.external_traffic_policy = Some(policy.to_owned());
        self
    }

    /// Sets `spec.internalTrafficPolicy`.
    pub fn internal_policy(mut self, policy: &str) -> Self {
        self.internal_traffic_policy = Some(policy.to_owned());
        self
    }

    /// Sets `spec.healthCheckNodePort`.
    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    /// Adds an address to `spec.externalIPs`.
    pub fn external_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.external_ips.push(ip.into());
        self
    }

    /// Adds an `ip` entry to `status.loadBalancer.ingress`.
    pub fn lb_ingress(mut self, ip: impl Into<IpAddr>) -> Self {
        self.lb_ingress.push(ip.into());
        self
    }

    /// Adds a CIDR to `spec.loadBalancerSourceRanges`.
    pub fn source_range(mut self, cidr: &str) -> Self {
        self.source_ranges.push(cidr.to_owned());
        self
    }

    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  type: {kind}\n  selector:\n    app: {name}\n",
            name = self.name,
            ns = self.namespace,
            kind = self.kind,
        );
        if let Some(first) = self.cluster_ips.first() {
            let _ = writeln!(y, "  clusterIP: {first}");
        }
        y.push_str("  clusterIPs:\n");
        for ip in &self.cluster_ips {
            let _ = writeln!(y, "  - {ip}");
        }
        y.push_str("  ipFamilies:\n");
        for ip in &self.cluster_ips {
            let _ = writeln!(y, "  - {}", ip_family(ip));
        }
        if let Some(p) = &self.ip_family_policy {
            let _ = writeln!(y, "  ipFamilyPolicy: {p}");
        }
        if let Some(p) = &self.external_traffic_policy {
            let _ = writeln!(y, "  externalTrafficPolicy: {p}");
        }
        if let Some(p) = &self.internal_traffic_policy {
            let _ = writeln!(y, "  internalTrafficPolicy: {p}");
        }
        if let Some(p) = self.health_check_node_port {
            let _ = writeln!(y, "  healthCheckNodePort: {p}");
        }
        if !self.external_ips.is_empty() {
            y.push_str("  externalIPs:\n");
            for ip in &self.external_ips {
                let _ = writeln!(y, "  - {ip}");
            }
        }
        if !self.source_ranges.is_empty() {
            y.push_str("  loadBalancerSourceRanges:\n");
            for r in &self.source_ranges {
                let _ = writeln!(y, "  - {r}");
            }
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            let _ = write!(
                y,
                "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
                p.name, p.protocol, p.port, p.target_port
            );
            if let Some(np) = p.node_port {
                let _ = writeln!(y, "    nodePort: {np}");
            }
        }
        if !self.lb_ingress.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &self.lb_ingress {
                let _ = writeln!(y, "    - ip: {ip}");
            }
        }
        y
    }
}

/// `IPv4` or `IPv6`, as `ipFamilies` and `addressType` spell them.
pub fn ip_family(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// An EndpointSlice of a service (`addressType` IPv4 unless set with
/// [`EndpointSlice::address_type`]).
#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// Value of the `kubernetes.io/service-name` label.
    pub service_name: String,
    /// `addressType`: `IPv4` or `IPv6`.
    pub address_type: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

/// One endpoint (a pod) of an [`EndpointSlice`].
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The pod's name, written as `targetRef`.
    pub pod: String,
    pub ready: bool,
    pub terminating: bool,
    /// `nodeName`: which node the pod runs on (decides "local" endpoints).
    pub node_name: Option<String>,
}

/// One port of an [`EndpointSlice`].
#[derive(Clone, Debug)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: String,
    pub port: u16,
}

impl EndpointSlice {
    /// An empty slice `<service>-<suffix>` for `service`.
    pub fn for_service(namespace: &str, service: &str, suffix: &str) -> Self {
        EndpointSlice {
            namespace: namespace.to_owned(),
            name: format!("{service}-{suffix}"),
            service_name: service.to_owned(),
            address_type: "IPv4".to_owned(),
            endpoints: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// Sets `addressType` (`IPv4`, `IPv6`).
    pub fn address_type(mut self, address_type: &str) -> Self {
        self.address_type = address_type.to_owned();
        self
    }

    pub fn port(mut self, name: &str, protocol: &str, port: u16) -> Self {
        self.ports.push(EndpointPort {
            name: name.to_owned(),
            protocol: protocol.to_owned(),
            port,
        });
        self
    }

    /// Adds a ready, serving endpoint.
    pub fn ready(mut self, pod: &str, ip: impl Into<IpAddr>) -> Self {
        self.endpoints.push(Endpoint {
            ip: ip.into(),
            pod: pod.to_owned(),
            ready: true,
            terminating: false,
            node_name: None,
        });
        self
    }

    /// Adds a ready, serving endpoint on node `node`.
    pub fn ready_on(mut self, pod: &str, ip: impl Into<IpAddr>, node: &str) -> Self {
        self = self.ready(pod, ip);
        self.endpoints.last_mut().expect("just pushed").node_name = Some(node.to_owned());
        self
    }

    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  \
             namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\n    \
             endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n\
             addressType: {}\n",
            self.name, self.namespace, self.service_name, self.address_type
        );
        if self.endpoints.is_empty() {
            y.push_str("endpoints: []\n");
        } else {
            y.push_str("endpoints:\n");
        }
        for e in &self.endpoints {
            let _ = write!(
                y,
                "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    \
                 terminating: {}\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: {}\n",
                e.ip,
                e.ready,
                e.ready || e.terminating,
                e.terminating,
                e.pod,
                self.namespace
            );
            if let Some(node) = &e.node_name {
                let _ = writeln!(y, "  nodeName: {node}");
            }
        }
        y.push_str("ports:\n");
        for p in &self.ports {
            let _ = write!(
                y,
                "- name: {}\n  protocol: {}\n  port: {}\n",
                p.name, p.protocol, p.port
            );
        }
        y
    }
}

/// Joins YAML documents into one multi-document file.
pub fn documents(docs: &[String]) -> String {
    docs.iter()
        .map(|d| d.trim_end())
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n"
}

/// A manifests directory (under the system temp dir), removed on drop.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    /// Creates `<tmp>/bpfproxy-manifests-<run>`, emptying what an earlier run left there.
    pub fn create(run: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("bpfproxy-manifests-{run}"));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("emptying {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ManifestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces `file` (e.g. `myapp-service.yaml`) with `content` in one rename.
    pub fn write(&self, file: &str, content: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{file}.tmp"));
        let dst = self.path.join(file);
        std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))
    }

    /// Deletes `file`.
    pub fn remove(&self, file: &str) -> Result<()> {
        let p = self.path.join(file);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
