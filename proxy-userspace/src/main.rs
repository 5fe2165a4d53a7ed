//! `bpfproxy`: the node agent (`run`) and the inspection commands.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use bpfproxy::{
    agent::{AgentConfig, ConntrackGc, NodeConfig, SourceConfig, run},
    conntrack_gc::Timeouts,
    datapath::{KernelMaps, LoadOptions, MapSizes},
    inspect,
    kube_source::{KubeOptions, node_name_or_hostname},
    model::Scheduler,
};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_common::maps;

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/bpfproxy";

#[derive(Parser)]
#[command(
    name = "bpfproxy",
    version,
    about = "eBPF Kubernetes Service load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

// Parsed once at start: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent in the foreground until SIGTERM or SIGINT.
    Run {
        /// Folder of Kubernetes YAML/JSON manifests (Service, EndpointSlice); watched live.
        /// Without it the agent watches the Kubernetes API.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Kubeconfig file for the API (default: `KUBECONFIG`, `~/.kube/config`, then the
        /// in-cluster service account).
        #[arg(long, conflicts_with = "manifests")]
        kubeconfig: Option<PathBuf>,
        /// This node's name: endpoints whose `nodeName` is this one are local (traffic
        /// policies Local, health-check node ports, no SNAT). Default with the API: the
        /// hostname; with --manifests: none (no endpoint is local).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// The node's external interfaces, by name or glob, comma separated: `xdp_nodeport`
        /// (NodePorts, external and LoadBalancer IPs) is attached there in native XDP mode,
        /// and `tc_ingress` too (it reverse-translates replies of pods on other nodes to
        /// ClusterIP connections made here). None: no external view.
        #[arg(long, value_delimiter = ',')]
        node_interfaces: Vec<String>,
        /// CIDRs (IPv4 or IPv6) of the node addresses NodePorts are served on, comma
        /// separated (kube-proxy's flag, split by family as kube-proxy does: a family
        /// without a CIDR here keeps its default). Default: every IPv4 address and every
        /// global IPv6 address (never link-local) of the --node-interfaces. Addresses are
        /// read again when they change.
        #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
        nodeport_addresses: Vec<bpfproxy::model::IpRange>,
        /// Source address of connections SNAT-ed to a backend on another node
        /// (externalTrafficPolicy Cluster), at most one per family: `192.168.1.10`,
        /// `fd00::10`, or both (`192.168.1.10,fd00::10`, or the flag twice); each must be
        /// an address of this node. Default for a family not given: the first address of
        /// that family (IPv6: global scope) on the --node-interfaces.
        #[arg(long, value_delimiter = ',', value_parser = parse_address)]
        snat_address: Vec<std::net::IpAddr>,
        /// Source ports of SNAT-ed connections, MIN-MAX. The default is above the kernel's
        /// ephemeral range (32768-60999), so no process on the node holds them.
        #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
        snat_ports: std::ops::RangeInclusive<u16>,
        /// Forward translated packets from XDP (bpf_fib_lookup + XDP_TX/XDP_REDIRECT) when
        /// the route allows it, instead of handing them to the kernel stack. `false` keeps
        /// them going through the stack (and its netfilter rules).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        xdp_fib_forward: bool,
        /// Interfaces to attach to, by name or glob (e.g. `veth*`), comma separated.
        /// Interfaces that appear later and match are attached too.
        #[arg(long, value_delimiter = ',', required = true)]
        interfaces: Vec<String>,
        /// Folder on bpffs where the maps are pinned (mounted if missing).
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Capacity of the services map (service ports).
        #[arg(long, default_value_t = maps::DEFAULT_SERVICES)]
        max_services: u32,
        /// Capacity of the backend slots map (sum of backends over services, x2 during a change).
        #[arg(long, default_value_t = maps::DEFAULT_BACKEND_SLOTS)]
        max_backends: u32,
        /// Capacity of the connection-tracking map (two entries per connection).
        #[arg(long, default_value_t = maps::DEFAULT_CONNTRACK)]
        max_connections: u32,
        /// Load this eBPF object instead of the embedded one.
        #[arg(long)]
        object: Option<PathBuf>,
        /// Scheduler of Services without a `bpfproxy.io/scheduler` annotation: random, rr,
        /// lc, sed, nq, sh, dh or maglev.
        #[arg(long, default_value = "random", value_parser = parse_scheduler)]
        scheduler: Scheduler,
        /// Seconds between full resyncs: the maps are read back and anything that drifted
        /// (e.g. an entry deleted by hand) is repaired. Changes apply at once regardless.
        #[arg(long, default_value_t = 30)]
        resync_seconds: u64,
        /// Answer `/healthz` and `/livez` here (kube-proxy's port); `""` for nowhere.
        /// `--health-addr` is the older spelling.
        #[arg(long, alias = "health-addr", default_value = "0.0.0.0:10256", value_parser = listen_addr)]
        healthz_addr: ListenAddr,
        /// Answer `/metrics` (Prometheus) here (kube-proxy's port); `""` for nowhere.
        #[arg(long, default_value = "127.0.0.1:10249", value_parser = listen_addr)]
        metrics_addr: ListenAddr,
        /// On exit, take the programs off the interfaces. By default they stay attached
        /// (links pinned under --bpffs) so a restart or upgrade drops nothing; the next
        /// agent swaps its programs in, and `bpfproxy cleanup` removes everything.
        #[arg(long)]
        detach_on_exit: bool,
        /// Socket-level load balancing for processes on the node (hostNetwork pods, the
        /// kubelet, `curl` on the node): attach the cgroup connect4/sendmsg4/recvmsg4/
        /// getpeername4 programs to this cgroup2 folder (the host's cgroup2 root covers
        /// every process), so they reach ClusterIPs, NodePorts on node addresses and
        /// external/LoadBalancer IPs. Off when absent (pinned hooks of an earlier agent are
        /// then removed).
        #[arg(long, value_name = "PATH")]
        socket_lb_cgroup: Option<PathBuf>,
        /// Seconds an established TCP connection may stay idle before its conntrack
        /// entries are removed (default: Cilium's; above the 2 h TCP keepalive).
        #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u64).range(1..))]
        ct_tcp_timeout: u64,
        /// Seconds a TCP connection may stay idle after a FIN or RST.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        ct_tcp_closing_timeout: u64,
        /// Seconds a TCP SYN may stay unanswered.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        ct_tcp_syn_timeout: u64,
        /// Seconds a UDP flow may stay idle.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        ct_udp_timeout: u64,
        /// Seconds between two passes of the conntrack collector (each walks the whole
        /// map: about 1 s of CPU per million entries).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        ct_gc_interval: u64,
    },
    /// Remove every program, link and pin bpfproxy made under --bpffs. Refused while an
    /// agent runs on the folder; entries that are not bpfproxy's are listed, not removed.
    /// Traffic then passes untranslated. Safe to run again.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Services as the kernel holds them.
    Services {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Tracked connections: client, service, chosen backend.
    Conntrack {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Live trace of the datapath's decisions (new connection -> backend, first reply,
    /// drops with their reason), until Ctrl-C. Events are on only while it runs.
    Monitor {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Only events of this Service (all its ports).
        #[arg(long, value_name = "NAMESPACE/NAME", value_parser = bpfproxy::monitor::Filter::parse_service)]
        service: Option<(String, String)>,
        /// Only events of this client address.
        #[arg(long)]
        client: Option<std::net::Ipv4Addr>,
        /// `json`: one JSON object per line.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Datapath counters (packets by path taken), summed over CPUs.
    Stats {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bpfproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            manifests,
            kubeconfig,
            node_name,
            node_interfaces,
            nodeport_addresses,
            snat_address,
            snat_ports,
            xdp_fib_forward,
            interfaces,
            bpffs,
            max_services,
            max_backends,
            max_connections,
            object,
            resync_seconds,
            scheduler,
            healthz_addr,
            metrics_addr,
            detach_on_exit,
            socket_lb_cgroup,
            ct_tcp_timeout,
            ct_tcp_closing_timeout,
            ct_tcp_syn_timeout,
            ct_udp_timeout,
            ct_gc_interval,
        } => {
            let (source, node_name) = match manifests {
                Some(dir) => (SourceConfig::Manifests(dir), node_name),
                None => {
                    let node_name = node_name_or_hostname(node_name);
                    let source = SourceConfig::Kube(KubeOptions {
                        kubeconfig,
                        node_name: node_name.clone(),
                    });
                    (source, Some(node_name))
                }
            };
            let config = AgentConfig {
                source,
                node: NodeConfig {
                    name: node_name,
                    interfaces: node_interfaces,
                    nodeport_addresses,
                    snat_address: bpfproxy::node::parse_snat_addresses(&snat_address)
                        .map_err(anyhow::Error::msg)?,
                    snat_ports,
                    xdp_fib_forward,
                },
                interfaces,
                load: LoadOptions {
                    object,
                    pin_dir: Some(bpffs),
                    sizes: MapSizes {
                        services: max_services,
                        backend_slots: max_backends,
                        conntrack: max_connections,
                    },
                },
                resync: Duration::from_secs(resync_seconds.max(1)),
                default_scheduler: scheduler,
                healthz_addr: healthz_addr.0,
                metrics_addr: metrics_addr.0,
                detach_on_exit,
                socket_lb_cgroup,
                conntrack_gc: ConntrackGc {
                    interval: Duration::from_secs(ct_gc_interval),
                    timeouts: Timeouts {
                        tcp_established: Duration::from_secs(ct_tcp_timeout),
                        tcp_closing: Duration::from_secs(ct_tcp_closing_timeout),
                        tcp_syn: Duration::from_secs(ct_tcp_syn_timeout),
                        udp: Duration::from_secs(ct_udp_timeout),
                    },
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(config))
        }
        Command::Cleanup { bpffs } => cleanup(&bpffs),
        Command::Services { bpffs, output } => {
            let rows = inspect::services(&KernelMaps::open_pinned(&bpffs)?)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", inspect::services_table(&rows)),
            }
            Ok(())
        }
        Command::Conntrack { bpffs, output } => {
            let rows = inspect::connections(&KernelMaps::open_pinned(&bpffs)?);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", inspect::connections_table(&rows)),
            }
            Ok(())
        }
        Command::Monitor {
            bpffs,
            service,
            client,
            output,
        } => bpfproxy::monitor::run(
            bpffs,
            bpfproxy::monitor::Filter { service, client },
            matches!(output, Output::Json),
        ),
        Command::Stats { bpffs, output } => {
            let counters = KernelMaps::open_pinned(&bpffs)?.counters();
            match output {
                Output::Json => {
                    let map: serde_json::Map<String, serde_json::Value> = counters
                        .iter()
                        .map(|(k, v)| (k.to_string(), (*v).into()))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&map)?);
                }
                Output::Table => {
                    for (name, value) in counters {
                        println!("{name:<22} {value}");
                    }
                }
            }
            Ok(())
        }
    }
}

fn cleanup(dir: &std::path::Path) -> anyhow::Result<()> {
    let report = bpfproxy::datapath::cleanup::cleanup(dir)?;
    if !report.existed {
        println!("nothing to clean up: {} does not exist", dir.display());
        return Ok(());
    }
    for (interface, link, program) in &report.detached {
        match interface.as_str() {
            "" => println!("removed link {link} (program {program}): its interface was gone"),
            name => println!("detached from {name} (link {link}, program {program})"),
        }
    }
    let pins = report.removed.len() + report.detached.len();
    if report.left.is_empty() {
        println!(
            "removed {pins} pins and {}: nothing of bpfproxy is left there",
            dir.display()
        );
    } else {
        println!(
            "removed {pins} pins; kept {} and these entries, which are not bpfproxy's:",
            dir.display()
        );
        for path in &report.left {
            println!("  {}", path.display());
        }
    }
    Ok(())
}

/// An address to listen on, or none (`""`).
#[derive(Clone, Copy, Debug)]
struct ListenAddr(Option<std::net::SocketAddr>);

fn listen_addr(s: &str) -> Result<ListenAddr, String> {
    if s.is_empty() {
        return Ok(ListenAddr(None));
    }
    s.parse()
        .map(|a| ListenAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (want IP:PORT, or \"\" for none)"))
}

fn parse_scheduler(name: &str) -> Result<Scheduler, String> {
    Scheduler::from_name(name).ok_or_else(|| {
        format!(
            "{name:?} is not one of {}",
            proxy_common::service::SCHED_NAMES.join(", ")
        )
    })
}

fn parse_cidr(s: &str) -> Result<bpfproxy::model::IpRange, String> {
    bpfproxy::node::parse_cidr(s)
}

fn parse_address(s: &str) -> Result<std::net::IpAddr, String> {
    bpfproxy::node::parse_address(s)
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    bpfproxy::node::parse_port_range(s)
}
