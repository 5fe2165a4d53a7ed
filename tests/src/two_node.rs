//! Two nodes on one LAN, with pods behind each and an external client: the setting of
//! the NodePort / LoadBalancer / external-IP tests.
//!
//! ```text
//!                 lan (bridge br0, 192.168.251.0/24, no address of its own)
//!        ┌─────────────────┬──────────────────────────┬───────────────────┐
//!   bpl<run>-a         bpl<run>-b                bpl<run>-c      (xdp_floor on each)
//!        │                 │                          │
//!   node A eth0 .1    node B eth0 .2            client eth0 .100
//!   pods a1.. 10.244.1.1x/32  pods b1.. 10.244.2.1x/32   routes 203.0.113.0/24 (LB IPs)
//!   route 10.244.2.0/24 via .2  route 10.244.1.0/24 via .1   and 198.51.100.0/24
//!                                                            (external IPs) via node A
//! ```
//!
//! IPv6 runs alongside (dual stack everywhere): the LAN is fd00:251::/64 (node A ::1, node B
//! ::2, client ::100), pods on A are fd00:244:1::1x/128 and on B fd00:244:2::1x/128 (the
//! same digits as their IPv4 last byte: a1 is 10.244.1.11 and fd00:244:1::11), each node
//! routes the other's pod range fd00:244:<n>::/64 via its LAN address, and the client
//! routes the IPv6 LoadBalancer range fd00:203::/64 via node A. Duplicate address
//! detection is off in every namespace, so addresses work at once.
//!
//! Pods are wired as in [`crate::topology`] (/32 address, default route via 169.254.1.1 on
//! the node side of the veth; /128 and default route via fe80::1 for IPv6). Each node
//! forwards (`ip_forward=1`, IPv6 `forwarding=1`) and runs its own agent
//! ([`TwoNode::start_agent`]) with its own bpffs folder, `--node-name node-a|node-b`,
//! `--interfaces` = its pod veths and `--node-interfaces eth0`; both read the same
//! manifests folder, as two nodes read one API server.
//!
//! The LAN stands for a wire, so frames reaching a node's uplink carry full checksums:
//! TX checksum offload is off on every interface feeding the LAN (an XDP program cannot
//! complete a CHECKSUM_PARTIAL packet it sends back out). And the LAN side of each veth
//! runs the trivial XDP program `xdp_floor`, because a veth only receives frames sent by
//! XDP_TX/XDP_REDIRECT into its peer when it has XDP (or GRO) on: a real NIC's far end,
//! the switch, takes every frame.
//!
//! Every pod runs a [`PeerServer`] on [`PEER_PORT`] (TCP and UDP) answering
//! `<pod> <peer ip>:<peer port>` (`<pod> [<peer ip6>]:<peer port>` for IPv6). All of it lives in namespaces made here, named from
//! [`crate::unique_run_id`]; guards delete namespaces, pins and cgroups on drop, also when
//! a test panics.

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{Xdp, XdpMode};

use crate::{
    agent::{Agent, BPFFS_ROOT, TEST_PIN_PREFIX},
    cgroup::{TEST_CGROUP_PREFIX, TestCgroup},
    client::{Asked, ask_tcp, ask_udp},
    manifests::{EndpointSlice, ManifestDir, Service, documents},
    netns::NetNs,
    servers::PeerServer,
    topology::{Pod, enable_ipv6_forwarding, no_dad, wire_pod},
};

/// The LAN between the nodes and the external client.
pub const LAN_SUBNET: [u8; 3] = [192, 168, 251];
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 251, 1);
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 251, 2);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 251, 100);
/// The LAN's IPv6 prefix and the nodes' and client's IPv6 addresses on it.
pub const LAN_PREFIX6: &str = "fd00:251::/64";
pub const NODE_A_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, 1);
pub const NODE_B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, 2);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, 0x100);
/// LoadBalancer ingress IPs are taken from here; the client routes it via node A.
pub const LB_CIDR: &str = "203.0.113.0/24";
/// IPv6 LoadBalancer ingress IPs are taken from here; the client routes it via node A.
pub const LB_CIDR6: &str = "fd00:203::/64";
/// Services' IPv6 ClusterIPs are taken from here (nothing routes it: only the agents
/// serve it).
pub const SERVICE_CIDR6: &str = "fd00:96::/112";
/// External IPs are taken from here; the client routes it via node A.
pub const EXTERNAL_CIDR: &str = "198.51.100.0/24";
/// Every pod's [`PeerServer`] listens here, TCP and UDP.
pub const PEER_PORT: u16 = 8080;
/// Port (TCP and UDP, named `tcp` and `udp`) of every test service made by
/// [`peer_service`]; its targetPort is [`PEER_PORT`].
pub const SERVICE_PORT: u16 = 80;
/// Namespace of the test services.
pub const SERVICE_NAMESPACE: &str = "default";
/// The node's uplink, on the LAN.
pub const UPLINK: &str = "eth0";

/// ETHTOOL_GTXCSUM / ETHTOOL_STXCSUM (linux/ethtool.h).
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One node: its namespace, LAN address, pods and (once started) agent.
pub struct Node {
    /// Dropped first: SIGTERM and the pins removed while the interfaces still exist.
    agent: Option<Agent>,
    /// `node-a` / `node-b`: the `--node-name`, and the endpoints' `nodeName`.
    pub name: String,
    /// The uplink's address on the LAN.
    pub addr: Ipv4Addr,
    /// The uplink's IPv6 address on the LAN.
    pub addr6: Ipv6Addr,
    /// First three bytes of this node's pod CIDR (`10.244.1` for A).
    pub pod_subnet: [u8; 3],
    pub pods: Vec<Pod>,
    /// Node-side pod veths are `<if_prefix><i>`.
    if_prefix: String,
    bpffs: PathBuf,
    /// Declared last: the pods (and their veths) go first.
    pub ns: NetNs,
}

impl Node {
    /// The pod called `name` (`a1`, `b2`, ...).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on {}", self.name))
    }

    /// This node's IPv6 pod range, e.g. `fd00:244:1::/64`.
    pub fn pod_cidr6(&self) -> String {
        format!("fd00:244:{}::/64", self.pod_subnet[2])
    }

    /// Glob of this node's pod veths, for `--interfaces`.
    pub fn pods_glob(&self) -> String {
        format!("{}*", self.if_prefix)
    }

    /// This node's pod CIDR, e.g. `10.244.1.0/24`.
    pub fn pod_cidr(&self) -> String {
        let [a, b, c] = self.pod_subnet;
        format!("{a}.{b}.{c}.0/24")
    }

    /// This node's agent; panics if it was not started.
    pub fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .unwrap_or_else(|| panic!("the agent of {} was not started", self.name))
    }

    /// Counter `name` of `bpfproxy stats` on this node (e.g. `drop_source_range`).
    pub fn stat(&self, name: &str) -> Result<u64> {
        let json = self.agent().cli(&["stats", "-o", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&json).with_context(|| format!("stats JSON {json:?}"))?;
        v[name]
            .as_u64()
            .with_context(|| format!("no counter {name} in {json}"))
    }

    /// Where this node's agent pins its maps.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }
}

/// Which node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    A,
    B,
}

/// The two-node testbed; everything is removed on drop.
pub struct TwoNode {
    pub run: String,
    /// The pods' servers, stopped before their namespaces go.
    pub servers: Vec<PeerServer>,
    /// Keeps `xdp_floor` attached to the LAN side of the veths.
    _floor: aya::Ebpf,
    pub a: Node,
    pub b: Node,
    pub client: NetNs,
    pub manifests: ManifestDir,
    /// After the agents (which hold programs on them) and before the LAN.
    cgroups: Vec<TestCgroup>,
    pub lan: NetNs,
}

impl TwoNode {
    /// Builds the LAN, nodes A and B with `pods_per_node` pods each (`a1..`, `b1..`), the
    /// client, and starts a [`PeerServer`] in every pod. No agent runs yet.
    pub fn new(pods_per_node: usize) -> Result<Self> {
        crate::require_root()?;
        if pods_per_node > 50 {
            bail!("at most 50 pods per node");
        }
        let run = crate::unique_run_id();
        let lan = NetNs::create(&format!("bp{run}-lan"))?;
        // No multicast snooping: neighbour solicitations go to every port, as on a plain
        // switch, whatever MLD reports the bridge saw or missed.
        lan.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        lan.ip(&["link", "set", "br0", "up"])?;

        let mut a = Self::build_node(
            &run,
            &lan,
            'a',
            (NODE_A_IP, NODE_A_IP6),
            [10, 244, 1],
            pods_per_node,
        )?;
        let mut b = Self::build_node(
            &run,
            &lan,
            'b',
            (NODE_B_IP, NODE_B_IP6),
            [10, 244, 2],
            pods_per_node,
        )?;
        a.ns.ip(&["route", "add", &b.pod_cidr(), "via", &NODE_B_IP.to_string()])?;
        b.ns.ip(&["route", "add", &a.pod_cidr(), "via", &NODE_A_IP.to_string()])?;
        a.ns.ip(&[
            "-6",
            "route",
            "add",
            &b.pod_cidr6(),
            "via",
            &NODE_B_IP6.to_string(),
        ])?;
        b.ns.ip(&[
            "-6",
            "route",
            "add",
            &a.pod_cidr6(),
            "via",
            &NODE_A_IP6.to_string(),
        ])?;

        let client = NetNs::create(&format!("bp{run}-cl"))?;
        no_dad(&client)?;
        let client_lan_if = uplink(&run, &lan, &client, 'c', (CLIENT_IP, CLIENT_IP6))?;
        for cidr in [LB_CIDR, EXTERNAL_CIDR] {
            client.ip(&["route", "add", cidr, "via", &NODE_A_IP.to_string()])?;
        }
        client.ip(&[
            "-6",
            "route",
            "add",
            LB_CIDR6,
            "via",
            &NODE_A_IP6.to_string(),
        ])?;

        let lan_ifs = [format!("bpl{run}-a"), format!("bpl{run}-b"), client_lan_if];
        for ifname in &lan_ifs {
            tx_checksum_off(&lan, ifname)?;
        }
        for ns in [&a.ns, &b.ns, &client] {
            tx_checksum_off(ns, UPLINK)?;
        }
        let floor = attach_xdp_floor(&lan, &lan_ifs)?;

        let mut servers = Vec::new();
        for node in [&mut a, &mut b] {
            for pod in &node.pods {
                servers.push(PeerServer::start(&pod.ns, &pod.name, PEER_PORT)?);
            }
        }
        let manifests = ManifestDir::create(&run)?;
        Ok(TwoNode {
            run,
            servers,
            _floor: floor,
            a,
            b,
            client,
            manifests,
            cgroups: Vec::new(),
            lan,
        })
    }

    fn build_node(
        run: &str,
        lan: &NetNs,
        letter: char,
        (addr, addr6): (Ipv4Addr, Ipv6Addr),
        pod_subnet: [u8; 3],
        pods: usize,
    ) -> Result<Node> {
        let ns = NetNs::create(&format!("bp{run}-n{letter}"))?;
        ns.sysctl("ipv4/ip_forward", "1")?;
        ns.sysctl("ipv4/conf/all/rp_filter", "0")?;
        ns.sysctl("ipv4/conf/default/rp_filter", "0")?;
        no_dad(&ns)?;
        enable_ipv6_forwarding(&ns)?;
        uplink(run, lan, &ns, letter, (addr, addr6))?;
        let if_prefix = format!("bp{letter}{run}-");
        let mut node = Node {
            agent: None,
            name: format!("node-{letter}"),
            addr,
            addr6,
            pod_subnet,
            pods: Vec::new(),
            if_prefix,
            bpffs: PathBuf::from(BPFFS_ROOT).join(format!("{TEST_PIN_PREFIX}{run}-{letter}")),
            ns,
        };
        for i in 1..=pods {
            let name = format!("{letter}{i}");
            let [x, y, z] = pod_subnet;
            let ip = Ipv4Addr::new(x, y, z, 10 + i as u8);
            let ip6 = pod_ip6(z, 10 + i as u8);
            let node_if = format!("{}{i}", node.if_prefix);
            let pod = wire_pod(
                &node.ns,
                &node_if,
                &format!("bp{run}-{name}"),
                &name,
                ip,
                Some(ip6),
            )?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    pub fn node(&self, which: Which) -> &Node {
        match which {
            Which::A => &self.a,
            Which::B => &self.b,
        }
    }

    /// The pod called `name` on either node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.a
            .pods
            .iter()
            .chain(&self.b.pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The node a pod runs on (`a1` -> node A).
    pub fn node_of(&self, pod: &str) -> &Node {
        if self.a.pods.iter().any(|p| p.name == pod) {
            &self.a
        } else {
            &self.b
        }
    }

    /// Starts the agent of node `which` (`--node-name`, `--node-interfaces eth0`, its pods'
    /// veths, its own bpffs folder, the shared manifests) with `extra` arguments, and waits
    /// until it is running.
    pub fn start_agent(&mut self, which: Which, extra: &[&str]) -> Result<&Agent> {
        let name = self.node(which).name.clone();
        let mut args = vec!["--node-name", &name, "--node-interfaces", UPLINK];
        args.extend_from_slice(extra);
        self.start_pod_agent(which, &args)
    }

    /// Like [`TwoNode::start_agent`] with the pod side only: no `--node-name` and no
    /// `--node-interfaces`, for what needs neither (in-cluster traffic that does not cross
    /// an uplink translated, hairpin, socket-level load balancing).
    pub fn start_pod_agent(&mut self, which: Which, extra: &[&str]) -> Result<&Agent> {
        let manifests = self.manifests.path().to_owned();
        let node = match which {
            Which::A => &mut self.a,
            Which::B => &mut self.b,
        };
        // Two agents, two namespaces: the default ports do not collide, but no test reads
        // the metrics.
        let mut args = vec!["--metrics-addr", ""];
        args.extend_from_slice(extra);
        let agent =
            Agent::start_with_args(&node.ns, &manifests, &node.pods_glob(), &node.bpffs, &args)?;
        let agent = node.agent.insert(agent);
        agent.wait_until_running()?;
        Ok(agent)
    }

    /// Makes a cgroup v2 (a [`TestCgroup`]) for processes of node `which` (for `--socket-lb-cgroup`), removed
    /// on drop; returns its path.
    pub fn make_cgroup(&mut self, which: Which) -> Result<PathBuf> {
        let letter = match which {
            Which::A => 'a',
            Which::B => 'b',
        };
        let cg = TestCgroup::create(&format!("{}-{letter}", self.run))?;
        let path = cg.path().to_owned();
        self.cgroups.push(cg);
        Ok(path)
    }

    /// Runs `probe.bin` (the `testbed-probe` binary) as a process in node `which`'s
    /// namespace and in `probe.cgroup`, asking `proto` (`tcp`/`udp`) `addr:port`; returns
    /// how it ended. Bounded: the probe gives up after `timeout`, and is killed 5 s later.
    pub fn ask_from_node(
        &self,
        which: Which,
        probe: &NodeProbe,
        proto: &str,
        addr: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<Asked> {
        let addr: IpAddr = addr.into();
        let (cgroup, probe) = (probe.cgroup, probe.bin);
        let node = self.node(which);
        let netns = std::fs::File::open(node.ns.path())
            .with_context(|| format!("opening {}", node.ns.path().display()))?;
        let procs_path = cgroup.join("cgroup.procs");
        // Never the machine's own cgroups: only one made by the harness.
        let is_test_cgroup = cgroup
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(TEST_CGROUP_PREFIX));
        if !is_test_cgroup {
            bail!(
                "refusing to run a probe in {}: not a test cgroup",
                cgroup.display()
            );
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("opening {}", procs_path.display()))?;
        let mut cmd = Command::new(probe);
        cmd.args([
            proto,
            &addr.to_string(),
            &port.to_string(),
            &timeout.as_millis().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: only write(2) and setns(2) run between fork and exec, on descriptors
        // opened before the fork; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process: the probe joins the cgroup...
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                // ...and the node's network namespace, before it runs any code.
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", probe.display()))?;
        let deadline = Instant::now() + timeout + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not finish within {timeout:?} + 5 s",
                    probe.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut out)?;
        child
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut err)?;
        if !status.success() {
            bail!("{} failed ({status}): {}", probe.display(), err.trim());
        }
        Asked::parse(&out)
    }
}

/// A Service `name` of type `kind` with ClusterIP `cluster_ip` and ports `tcp` 80/TCP and
/// `udp` 80/UDP to the pods' [`PEER_PORT`], both with nodePort `node_port` if given. Add an
/// IPv6 ClusterIP with [`Service::dual_stack`].
pub fn peer_service(
    name: &str,
    kind: &str,
    cluster_ip: Ipv4Addr,
    node_port: Option<u16>,
) -> Service {
    peer_service_at(name, kind, cluster_ip.into(), node_port)
}

/// [`peer_service`] with an IPv6 ClusterIP only (`ipFamilies: [IPv6]`, `SingleStack`).
pub fn peer_service6(
    name: &str,
    kind: &str,
    cluster_ip: Ipv6Addr,
    node_port: Option<u16>,
) -> Service {
    peer_service_at(name, kind, cluster_ip.into(), node_port).ip_family_policy("SingleStack")
}

fn peer_service_at(name: &str, kind: &str, cluster_ip: IpAddr, node_port: Option<u16>) -> Service {
    let svc = Service::cluster_ip(SERVICE_NAMESPACE, name, cluster_ip).kind(kind);
    match node_port {
        Some(np) => svc
            .node_port("tcp", "TCP", SERVICE_PORT, PEER_PORT, np)
            .node_port("udp", "UDP", SERVICE_PORT, PEER_PORT, np),
        None => svc.port("tcp", "TCP", SERVICE_PORT, PEER_PORT).port(
            "udp",
            "UDP",
            SERVICE_PORT,
            PEER_PORT,
        ),
    }
}

impl TwoNode {
    /// The EndpointSlice of [`peer_service`] `service` with the pods `pods` (ready, each
    /// with the `nodeName` of the node it runs on).
    pub fn peer_slice(&self, service: &str, pods: &[&str]) -> EndpointSlice {
        let mut slice = EndpointSlice::for_service(SERVICE_NAMESPACE, service, "s1")
            .port("tcp", "TCP", PEER_PORT)
            .port("udp", "UDP", PEER_PORT);
        for pod in pods {
            let p = self.pod(pod);
            slice = slice.ready_on(&p.name, p.ip, &self.node_of(pod).name);
        }
        slice
    }

    /// The IPv6 EndpointSlice (`addressType: IPv6`, named `<service>-s6`) of
    /// [`peer_service`] `service` with the IPv6 addresses of the pods `pods`.
    pub fn peer_slice6(&self, service: &str, pods: &[&str]) -> EndpointSlice {
        let mut slice = EndpointSlice::for_service(SERVICE_NAMESPACE, service, "s6")
            .address_type("IPv6")
            .port("tcp", "TCP", PEER_PORT)
            .port("udp", "UDP", PEER_PORT);
        for pod in pods {
            let p = self.pod(pod);
            slice = slice.ready_on(&p.name, p.ip6(), &self.node_of(pod).name);
        }
        slice
    }

    /// Writes the services and their slices as one manifest file `file`, read by both
    /// agents.
    pub fn write_services(&self, file: &str, services: &[(Service, EndpointSlice)]) -> Result<()> {
        let docs: Vec<String> = services
            .iter()
            .flat_map(|(svc, slice)| [svc.to_yaml(), slice.to_yaml()])
            .collect();
        self.manifests.write(file, &documents(&docs))
    }

    /// Like [`TwoNode::write_services`] with any number of slices per service (a dual-stack
    /// service has one per family).
    pub fn write_services_slices(
        &self,
        file: &str,
        services: &[(Service, Vec<EndpointSlice>)],
    ) -> Result<()> {
        let docs: Vec<String> = services
            .iter()
            .flat_map(|(svc, slices)| {
                std::iter::once(svc.to_yaml()).chain(slices.iter().map(EndpointSlice::to_yaml))
            })
            .collect();
        self.manifests.write(file, &documents(&docs))
    }

    /// Asks `addr:port` (`tcp`/`udp`) from `from` until a backend called `want` answers,
    /// for at most 20 s (the agents apply a change within that), and returns its answer.
    /// For the first request to a new service; later checks ask once.
    pub fn wait_for_answer(
        &self,
        from: &NetNs,
        proto: &str,
        addr: impl Into<IpAddr>,
        port: u16,
        want: &str,
    ) -> Result<Asked> {
        let addr: IpAddr = addr.into();
        let what = format!(
            "{want} to answer {proto} {} from {}",
            std::net::SocketAddr::new(addr, port),
            from.name()
        );
        crate::wait_until(&what, crate::agent::READY_TIMEOUT, || {
            let asked = match proto {
                "tcp" => ask_tcp(from, addr, port, Duration::from_secs(1))?,
                _ => ask_udp(from, addr, port, Duration::from_secs(1))?,
            };
            match asked.reply() {
                Some((name, _)) if name == want => Ok(Some(asked)),
                _ => bail!("last outcome: {asked:?}"),
            }
        })
        .with_context(|| self.agent_logs())
    }

    /// Both agents' logs (for a failure message).
    pub fn agent_logs(&self) -> String {
        let mut out = String::new();
        for node in [&self.a, &self.b] {
            if let Some(agent) = &node.agent {
                out.push_str(&format!(
                    "---- {} agent log ----\n{}",
                    node.name,
                    agent.log()
                ));
            }
        }
        out
    }
}

/// What runs a client process on a node: the `testbed-probe` binary
/// (`env!("CARGO_BIN_EXE_testbed-probe")` in a test) and the cgroup to run it in.
pub struct NodeProbe<'a> {
    pub bin: &'a Path,
    pub cgroup: &'a Path,
}

/// Pod `i`'s IPv6 address on the node whose IPv4 pod range is `10.244.<node>.0/24`, for
/// IPv4 last byte `last`: `fd00:244:<node>::<last>`, the decimal digits read as hex (so
/// 10.244.1.11 pairs with fd00:244:1::11).
pub fn pod_ip6(node: u8, last: u8) -> Ipv6Addr {
    let hex = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex");
    Ipv6Addr::new(0xfd00, 0x244, hex(node), 0, 0, 0, 0, hex(last))
}

/// A veth `bpl<run>-<letter>` in `lan`, enslaved to `br0`, whose peer is `eth0` in `ns` with
/// `addr`/24 and `addr6`/64 (no duplicate address detection). Returns the LAN-side name.
fn uplink(
    run: &str,
    lan: &NetNs,
    ns: &NetNs,
    letter: char,
    (addr, addr6): (Ipv4Addr, Ipv6Addr),
) -> Result<String> {
    let lan_if = format!("bpl{run}-{letter}");
    let setup = || -> Result<()> {
        lan.ip(&[
            "link",
            "add",
            &lan_if,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK,
            "netns",
            ns.name(),
        ])?;
        lan.ip(&["link", "set", &lan_if, "master", "br0"])?;
        lan.ip(&["link", "set", &lan_if, "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", UPLINK])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr6}/64"),
            "dev",
            UPLINK,
            "nodad",
        ])?;
        ns.ip(&["link", "set", UPLINK, "up"])?;
        Ok(())
    };
    setup().with_context(|| format!("wiring {} to the LAN as {addr}", ns.name()))?;
    Ok(lan_if)
}

/// Switches TX checksum offload off on `ifname` in `ns` (ethtool's `tx off`, through the
/// SIOCETHTOOL ioctl: ethtool itself may not be installed), and checks it took.
pub fn tx_checksum_off(ns: &NetNs, ifname: &str) -> Result<()> {
    let name = ifname.to_owned();
    ns.run(move || -> Result<()> {
        ethtool_value(&name, ETHTOOL_STXCSUM, 0)?;
        let now = ethtool_value(&name, ETHTOOL_GTXCSUM, 0)?;
        if now != 0 {
            bail!("TX checksum offload still on after switching it off");
        }
        Ok(())
    })?
    .with_context(|| {
        format!(
            "switching off TX checksum offload on {ifname} in {}",
            ns.name()
        )
    })
}

/// Whether TX checksum offload is on for `ifname` in `ns`.
pub fn tx_checksum_on(ns: &NetNs, ifname: &str) -> Result<bool> {
    let name = ifname.to_owned();
    ns.run(move || ethtool_value(&name, ETHTOOL_GTXCSUM, 0))?
        .map(|v| v != 0)
}

/// One SIOCETHTOOL call with a `struct ethtool_value`; returns its `data` afterwards.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked) and stays NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = ifname.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        bail!("interface name {ifname:?} too long");
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: plain socket and ioctl calls; `ifr` points at `value`, alive across the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut ifr);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            bail!("SIOCETHTOOL {cmd:#x} on {ifname}: {err}");
        }
    }
    Ok(value.data)
}

/// Loads the eBPF object (small maps: only `xdp_floor` is used) and attaches `xdp_floor`
/// in native mode to each of `ifnames` in `ns`. The links live as long as the returned
/// object.
fn attach_xdp_floor(ns: &NetNs, ifnames: &[String]) -> Result<aya::Ebpf> {
    let object = crate::datapath::object_path().context(
        "the eBPF object is not built (cargo xtask build-ebpf) and BPFPROXY_EBPF_OBJ is unset",
    )?;
    let bytes = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    let ifnames = ifnames.to_vec();
    ns.run(move || -> Result<aya::Ebpf> {
        use proxy_common::maps;
        let mut loader = aya::EbpfLoader::new();
        // Every map of the object is created on load: keep the big ones small.
        for map in [
            maps::SERVICES4,
            maps::SVC_META,
            maps::BACKEND_SLOTS4,
            maps::CONNTRACK4,
            maps::SCHED_RR_POS,
            maps::SVC_COUNTERS,
            maps::BACKEND_CONNS4,
            maps::COUNTED4,
            maps::AFFINITY4,
            maps::SRC_RANGES4,
            maps::SERVICES6,
            maps::BACKEND_SLOTS6,
            maps::CONNTRACK6,
            maps::BACKEND_CONNS6,
            maps::COUNTED6,
            maps::AFFINITY6,
            maps::SRC_RANGES6,
        ] {
            loader.map_max_entries(map, 16);
        }
        let mut ebpf = loader.load(&bytes).context("loading the eBPF object")?;
        let prog: &mut Xdp = ebpf
            .program_mut("xdp_floor")
            .context("no program xdp_floor in the object")?
            .try_into()?;
        prog.load().context("loading xdp_floor")?;
        for ifname in &ifnames {
            prog.attach(ifname, XdpMode::Driver)
                .with_context(|| format!("attaching xdp_floor to {ifname}"))?;
        }
        Ok(ebpf)
    })?
    .with_context(|| format!("xdp_floor on the LAN side of the veths in {}", ns.name()))
}
