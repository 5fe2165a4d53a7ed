//! A small "cluster": a [`Topology`] whose backend pods all serve HTTP on port 80 and UDP on
//! port 53, a manifests directory, and the agent in the node namespace. This is the setting
//! of the e2e tests and of `cargo xtask demo`, around the `myapp` service.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::Result;

use crate::{
    agent::{Agent, BPFFS_ROOT, ServiceInfo, TEST_PIN_PREFIX},
    manifests::{EndpointSlice, ManifestDir, Service},
    servers::{HttpServer, UdpServer},
    topology::{Pod, Topology},
};

/// ClusterIP of `myapp`.
pub const MYAPP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const MYAPP_NAMESPACE: &str = "default";
pub const MYAPP: &str = "myapp";
/// `myapp`'s HTTP port (port and targetPort).
pub const HTTP_PORT: u16 = 80;
/// Port of the UDP service port (port and targetPort) used by the UDP tests.
pub const DNS_PORT: u16 = 53;
/// File names in the manifests directory.
pub const SERVICE_FILE: &str = "myapp-service.yaml";
pub const SLICE_FILE: &str = "myapp-endpointslice.yaml";

/// Everything of one run; dropped in field order: agent, servers, manifests, namespaces.
pub struct Cluster {
    agent: Option<Agent>,
    pub http_servers: Vec<HttpServer>,
    pub udp_servers: Vec<UdpServer>,
    pub manifests: ManifestDir,
    pub topo: Topology,
}

impl Cluster {
    /// `clients` client pods and `backends` backend pods (`b1..`), each backend serving
    /// HTTP on [`HTTP_PORT`] and UDP on [`DNS_PORT`], answering with its pod name.
    /// The agent is not started yet.
    pub fn new(clients: usize, backends: usize) -> Result<Self> {
        Self::with_run_id(&crate::unique_run_id(), clients, backends)
    }

    pub fn with_run_id(run: &str, clients: usize, backends: usize) -> Result<Self> {
        let topo = Topology::with_run_id(run, clients, backends)?;
        let manifests = ManifestDir::create(run)?;
        let mut http_servers = Vec::new();
        let mut udp_servers = Vec::new();
        for pod in &topo.backends {
            http_servers.push(HttpServer::start(&pod.ns, &pod.name, HTTP_PORT)?);
            udp_servers.push(UdpServer::start(&pod.ns, &pod.name, DNS_PORT)?);
        }
        Ok(Cluster {
            agent: None,
            http_servers,
            udp_servers,
            manifests,
            topo,
        })
    }

    /// Where this run's agent pins its maps: `/sys/fs/bpf/bpfproxy-testbed-<run>`.
    pub fn bpffs(&self) -> PathBuf {
        PathBuf::from(BPFFS_ROOT).join(format!("{TEST_PIN_PREFIX}{}", self.topo.run))
    }

    /// Starts the agent on the node's pod-facing veths, reading the manifests directory.
    pub fn start_agent(&mut self) -> Result<&Agent> {
        let interfaces = self.topo.node_interfaces_glob();
        self.start_agent_with(&interfaces, &[])
    }

    /// Starts the agent with `--interfaces interfaces` and the `extra` arguments, reading
    /// the manifests directory, and waits until it has attached to every interface: a
    /// service shows in the maps before the last veth is attached, and a reply leaving a
    /// backend through a veth not yet attached would pass untranslated.
    pub fn start_agent_with(&mut self, interfaces: &str, extra: &[&str]) -> Result<&Agent> {
        let agent = Agent::start_with_args(
            &self.topo.node,
            self.manifests.path(),
            interfaces,
            &self.bpffs(),
            extra,
        )?;
        let agent = self.agent.insert(agent);
        agent.wait_until_running()?;
        Ok(agent)
    }

    /// The running agent. Panics if [`Cluster::start_agent`] was not called.
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent not started")
    }

    pub fn client(&self) -> &Pod {
        self.topo.client()
    }

    pub fn backend(&self, name: &str) -> &Pod {
        self.topo.backend(name)
    }

    /// Names of all backend pods.
    pub fn backend_names(&self) -> Vec<String> {
        self.topo.backends.iter().map(|p| p.name.clone()).collect()
    }

    /// Writes the `myapp` Service: ClusterIP [`MYAPP_VIP`], port `http` 80/TCP -> 80, and
    /// with `udp` also port `dns` 53/UDP -> 53.
    pub fn write_myapp_service(&self, udp: bool) -> Result<()> {
        self.manifests
            .write(SERVICE_FILE, &myapp_service(udp).to_yaml())
    }

    /// Writes the `myapp` EndpointSlice with the backend pods `pods` (ready), in that order.
    pub fn write_myapp_endpoints(&self, pods: &[&str], udp: bool) -> Result<()> {
        let slice = myapp_endpoint_slice(pods.iter().map(|p| self.backend(p)), udp);
        self.manifests.write(SLICE_FILE, &slice.to_yaml())
    }

    /// Waits until the agent serves `myapp:80` with exactly the backends `pods`.
    pub fn wait_for_myapp_backends(&self, pods: &[&str]) -> Result<ServiceInfo> {
        let ips: Vec<Ipv4Addr> = pods.iter().map(|p| self.backend(p).ip).collect();
        self.agent()
            .wait_for_backends(MYAPP_NAMESPACE, MYAPP, HTTP_PORT, &ips)
    }
}

/// The `myapp` Service (see [`Cluster::write_myapp_service`]).
pub fn myapp_service(udp: bool) -> Service {
    let svc = Service::cluster_ip(MYAPP_NAMESPACE, MYAPP, MYAPP_VIP)
        .port("http", "TCP", HTTP_PORT, HTTP_PORT);
    if udp {
        svc.port("dns", "UDP", DNS_PORT, DNS_PORT)
    } else {
        svc
    }
}

/// The `myapp` EndpointSlice for `pods` (all ready).
pub fn myapp_endpoint_slice<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    udp: bool,
) -> EndpointSlice {
    let mut slice =
        EndpointSlice::for_service(MYAPP_NAMESPACE, MYAPP, "x7k2p").port("http", "TCP", HTTP_PORT);
    if udp {
        slice = slice.port("dns", "UDP", DNS_PORT);
    }
    for pod in pods {
        slice = slice.ready(&pod.name, pod.ip);
    }
    slice
}
