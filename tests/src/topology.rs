//! One node namespace and its pods, wired like a CNI plugin with routed /32 pod addresses.
//!
//! Each pod has `eth0` with a /32 address and a default route via the link-local gateway
//! 169.254.1.1, which the node side of its veth owns. The node side (`bpv<run>-<i>`) has a
//! /32 route to the pod, the node forwards between pods (`ip_forward=1`, `rp_filter=0`).
//! The agent's tc programs go on the node-side veths, so every packet a pod sends passes
//! them. All of it lives inside the namespaces made here.
//!
//! A pod may also get an IPv6 address (the two-node testbed gives every pod one): a /128
//! on `eth0` and a default route via the link-local [`POD_GATEWAY6`], which the node side
//! of the veth owns, as IPv4 uses 169.254.1.1. Duplicate address detection is off in the
//! pod's namespace and on the node-side veth, so every address works at once; neighbour
//! discovery runs as usual both ways (the node resolves the pod's /128 on the veth, the
//! pod resolves the gateway).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// The gateway address every pod's default route points at; owned by each node-side veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 twin of [`POD_GATEWAY`]: a fixed link-local address on every node-side veth
/// (link-local, so the same address on many interfaces does not clash).
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Client pods get 10.240.1.<n>, backend pods 10.240.2.<n> (private, inside namespaces only).
pub const CLIENT_SUBNET: [u8; 3] = [10, 240, 1];
pub const BACKEND_SUBNET: [u8; 3] = [10, 240, 2];

/// A pod: its namespace, address and the node-side interface of its veth.
#[derive(Debug)]
pub struct Pod {
    /// Short name (`c1`, `b1`, ...); backends answer requests with it.
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, if it has one.
    pub ip6: Option<Ipv6Addr>,
    /// Name of the node-side veth, in the node namespace.
    pub node_if: String,
    pub ns: NetNs,
}

impl Pod {
    /// The pod's IPv6 address; panics if it has none.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name))
    }
}

/// A node namespace and its pods; everything is deleted on drop.
#[derive(Debug)]
pub struct Topology {
    pub run: String,
    pub clients: Vec<Pod>,
    pub backends: Vec<Pod>,
    /// Declared last, so pods (and with them the veths) go first on drop.
    pub node: NetNs,
}

impl Topology {
    /// `clients` client pods `c1..` and `backends` backend pods `b1..`, with a fresh run id.
    pub fn new(clients: usize, backends: usize) -> Result<Self> {
        Self::with_run_id(&crate::unique_run_id(), clients, backends)
    }

    /// Like [`Topology::new`] with a chosen run id (at most 9 characters). Namespaces are
    /// `bp<run>-node`, `bp<run>-c1`, `bp<run>-b1`, ...
    pub fn with_run_id(run: &str, clients: usize, backends: usize) -> Result<Self> {
        if run.len() > 9 || clients + backends > 99 {
            bail!("run id {run:?} too long or too many pods");
        }
        crate::require_root()?;
        let node = NetNs::create(&format!("bp{run}-node"))?;
        node.sysctl("ipv4/ip_forward", "1")?;
        node.sysctl("ipv4/conf/all/rp_filter", "0")?;
        node.sysctl("ipv4/conf/default/rp_filter", "0")?;
        let mut topo = Topology {
            run: run.to_owned(),
            clients: Vec::new(),
            backends: Vec::new(),
            node,
        };
        for i in 1..=clients {
            let pod = topo.add_pod(&format!("c{i}"), nth_ip(CLIENT_SUBNET, i))?;
            topo.clients.push(pod);
        }
        for i in 1..=backends {
            let pod = topo.add_pod(&format!("b{i}"), nth_ip(BACKEND_SUBNET, i))?;
            topo.backends.push(pod);
        }
        Ok(topo)
    }

    /// Adds a client pod `c<n>` to the running topology (its node-side veth appears while
    /// an agent may be running, as a new pod's would) and returns it.
    pub fn add_client(&mut self) -> Result<&Pod> {
        let i = self.clients.len() + 1;
        if self.clients.len() + self.backends.len() >= 99 {
            bail!("too many pods");
        }
        let pod = self.add_pod(&format!("c{i}"), nth_ip(CLIENT_SUBNET, i))?;
        self.clients.push(pod);
        Ok(self.clients.last().expect("just pushed"))
    }

    fn add_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        let index = self.clients.len() + self.backends.len() + 1;
        let node_if = format!("bpv{}-{index}", self.run);
        wire_pod(
            &self.node,
            &node_if,
            &format!("bp{}-{name}", self.run),
            name,
            ip,
            None,
        )
    }

    /// Glob matching every node-side veth of this topology, for the agent's `--interfaces`.
    pub fn node_interfaces_glob(&self) -> String {
        format!("bpv{}-*", self.run)
    }

    /// The first client pod.
    pub fn client(&self) -> &Pod {
        self.clients.first().expect("topology has no client pod")
    }

    /// The backend pod called `name` (`b1`, ...).
    pub fn backend(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no backend pod {name}"))
    }
}

/// `<subnet>.<i>`; `i` is below 100 (checked by [`Topology::with_run_id`]).
fn nth_ip(subnet: [u8; 3], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], i as u8)
}

/// Makes pod namespace `ns_name` with `eth0` = `ip`/32 and a default route via
/// [`POD_GATEWAY`], joined to `node` by a veth whose node side is `node_if` (at most 15
/// characters) with a /32 route to the pod. With `ip6`, the pod also gets `ip6`/128 and an
/// IPv6 default route via [`POD_GATEWAY6`], and the node a /128 route to it (IPv6
/// forwarding in `node` is the caller's: [`enable_ipv6_forwarding`]). The veth is made
/// inside `node` with its peer created directly in the pod's namespace: no interface ever
/// appears in the root namespace.
pub fn wire_pod(
    node: &NetNs,
    node_if: &str,
    ns_name: &str,
    name: &str,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
) -> Result<Pod> {
    if node_if.len() > 15 {
        bail!("interface name {node_if:?} is over 15 characters");
    }
    let ns = NetNs::create(ns_name)?;
    let pod_cidr = format!("{ip}/32");
    let gw = POD_GATEWAY.to_string();
    let gw_cidr = format!("{gw}/32");
    let setup = || -> Result<()> {
        // Before eth0 exists: it takes the namespace's defaults when it appears.
        no_dad(&ns)?;
        node.ip(&[
            "link",
            "add",
            node_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ip(&["addr", "add", &gw_cidr, "dev", node_if])?;
        node.ip(&["link", "set", node_if, "up"])?;
        node.sysctl(&format!("ipv4/conf/{node_if}/rp_filter"), "0")?;
        node.ip(&["route", "add", &pod_cidr, "dev", node_if])?;
        ns.ip(&["addr", "add", &pod_cidr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &gw_cidr, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        if let Some(ip6) = ip6 {
            let gw6 = POD_GATEWAY6.to_string();
            node.sysctl(&format!("ipv6/conf/{node_if}/accept_dad"), "0")?;
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{gw6}/64"),
                "dev",
                node_if,
                "nodad",
            ])?;
            node.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", node_if])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        }
        Ok(())
    };
    setup().with_context(|| format!("wiring pod {name} ({ip}) to {}", node.name()))?;
    Ok(Pod {
        name: name.to_owned(),
        ip,
        ip6,
        node_if: node_if.to_owned(),
        ns,
    })
}

/// Switches duplicate address detection off in `ns` for interfaces made from now on (and
/// for those already there through `all`), so IPv6 addresses are usable at once.
pub fn no_dad(ns: &NetNs) -> Result<()> {
    for key in ["all", "default"] {
        ns.sysctl(&format!("ipv6/conf/{key}/accept_dad"), "0")?;
    }
    Ok(())
}

/// Turns IPv6 forwarding on in `ns` (a node routing between its pods and its uplink).
pub fn enable_ipv6_forwarding(ns: &NetNs) -> Result<()> {
    ns.sysctl("ipv6/conf/all/forwarding", "1")
}
