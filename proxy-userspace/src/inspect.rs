//! What the CLI prints: the services and connections the kernel actually holds, read from
//! the pinned maps (no agent needed).

use std::{fmt::Write as _, net::IpAddr};

use proxy_common::conntrack::CT_DIR_FORWARD;
use serde::Serialize;

use crate::{
    datapath::{DatapathError, KernelMaps},
    model::{FrontendKind, Protocol, Scheduler, Scope, host_port, policy_flag_names},
    planner::meta_to_name,
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Which view the entry is in: `cluster` (pods and node processes) or `external` (the
    /// node interfaces, at XDP).
    pub scope: String,
    /// `ClusterIP`, `ExternalIP`, `LoadBalancer` or `NodePort`.
    pub kind: String,
    /// Policy flags: `snat`, `source-ranges`, `drop-empty`.
    pub flags: Vec<String>,
    /// Allowed client ranges (with `source-ranges`; none listed then means nobody).
    pub source_ranges: Vec<String>,
    pub svc_id: u32,
    /// The scheduler new connections go through (`random`, `rr`, `maglev`, ...).
    pub scheduler: String,
    /// ClientIP session affinity timeout in seconds; 0 = none.
    pub affinity_timeout_s: u32,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub ip: IpAddr,
    pub port: u16,
    pub terminating: bool,
    /// On this node (reached without SNAT from the external view).
    pub local: bool,
    pub weight: u8,
    /// Connections open to it, as counted for lc/sed/nq (0 for other schedulers, which
    /// do not count).
    pub active_connections: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConnectionRow {
    pub protocol: String,
    pub client_ip: IpAddr,
    pub client_port: u16,
    pub service_ip: IpAddr,
    pub service_port: u16,
    pub backend_ip: IpAddr,
    pub backend_port: u16,
    pub closing: bool,
    pub svc_id: u32,
}

fn protocol_name(n: u8) -> String {
    Protocol::from_number(n).map_or_else(|| n.to_string(), |p| p.to_string())
}

pub fn services(maps: &KernelMaps) -> Result<Vec<ServiceRow>, DatapathError> {
    let state = maps.read_state()?;
    let counts: std::collections::BTreeMap<_, _> = maps.connection_counts().into_iter().collect();
    let counts6: std::collections::BTreeMap<_, _> = maps.connection_counts6().into_iter().collect();
    let mut rows: Vec<ServiceRow> = state
        .services
        .iter()
        .map(|(key, svc)| {
            let (namespace, name, port_name) = meta_to_name(&svc.meta);
            ServiceRow {
                namespace,
                name,
                port_name,
                ip: key.addr,
                port: key.port,
                protocol: protocol_name(key.proto),
                scope: Scope::from_value(key.scope)
                    .map_or_else(|| key.scope.to_string(), |s| s.name().to_string()),
                kind: FrontendKind::from_flags(svc.value.flags).name().to_string(),
                flags: policy_flag_names(svc.value.flags)
                    .into_iter()
                    .map(String::from)
                    .collect(),
                source_ranges: svc.source_ranges.iter().map(ToString::to_string).collect(),
                svc_id: svc.value.svc_id,
                scheduler: Scheduler::from_value(svc.value.scheduler).name(),
                affinity_timeout_s: svc.value.affinity_timeout_s,
                backends: svc
                    .backends
                    .iter()
                    .map(|b| BackendRow {
                        ip: b.addr,
                        port: b.port,
                        terminating: b.flags & proxy_common::service::BACKEND_TERMINATING != 0,
                        local: b.flags & proxy_common::service::BACKEND_LOCAL != 0,
                        weight: b.weight,
                        active_connections: match b.addr {
                            IpAddr::V4(a) => counts.get(&proxy_common::service::BackendConnsKey {
                                svc_id: svc.value.svc_id,
                                addr: a.octets(),
                                port: b.port,
                                _pad: 0,
                            }),
                            IpAddr::V6(a) => {
                                counts6.get(&proxy_common::service::BackendConns6Key {
                                    svc_id: svc.value.svc_id,
                                    addr: a.octets(),
                                    port: b.port,
                                    _pad: 0,
                                })
                            }
                        }
                        .map_or(0, |c| c.active()),
                    })
                    .collect(),
            }
        })
        .collect();
    // A Service's ClusterIP first, then its other frontends by kind and view.
    let kind_order = |k: &str| {
        ["ClusterIP", "ExternalIP", "LoadBalancer", "NodePort"]
            .iter()
            .position(|n| *n == k)
    };
    rows.sort_by(|a, b| {
        (
            &a.namespace,
            &a.name,
            &a.port_name,
            kind_order(&a.kind),
            &a.scope,
            a.port,
            a.ip,
        )
            .cmp(&(
                &b.namespace,
                &b.name,
                &b.port_name,
                kind_order(&b.kind),
                &b.scope,
                b.port,
                b.ip,
            ))
    });
    Ok(rows)
}

/// Connections of both families, one row each (the forward entry; its reply twin says the
/// same backwards).
pub fn connections(maps: &KernelMaps) -> Vec<ConnectionRow> {
    let closing = |flags: u8| flags & proxy_common::conntrack::CT_FLAG_CLOSING != 0;
    let rows4 = maps
        .conntrack_entries()
        .into_iter()
        .filter(|(_, v)| v.dir == CT_DIR_FORWARD)
        .map(|(k, v)| ConnectionRow {
            protocol: protocol_name(k.proto),
            client_ip: IpAddr::from(k.saddr),
            client_port: k.sport,
            service_ip: IpAddr::from(k.daddr),
            service_port: k.dport,
            backend_ip: IpAddr::from(v.nat_addr),
            backend_port: v.nat_port,
            closing: closing(v.flags),
            svc_id: v.svc_id,
        });
    let rows6 = maps
        .conntrack_entries6()
        .into_iter()
        .filter(|(_, v)| v.dir == CT_DIR_FORWARD)
        .map(|(k, v)| ConnectionRow {
            protocol: protocol_name(k.proto),
            client_ip: IpAddr::from(k.saddr),
            client_port: k.sport,
            service_ip: IpAddr::from(k.daddr),
            service_port: k.dport,
            backend_ip: IpAddr::from(v.nat_addr),
            backend_port: v.nat_port,
            closing: closing(v.flags),
            svc_id: v.svc_id,
        });
    let mut rows: Vec<ConnectionRow> = rows4.chain(rows6).collect();
    rows.sort_by_key(|r| (r.service_ip, r.service_port, r.client_ip, r.client_port));
    rows
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:<22} {:<6} {:<9} {:<13} {:<14} {:<20} BACKENDS",
        "SERVICE", "FRONTEND", "PROTO", "SCOPE", "KIND", "SCHEDULER", "FLAGS"
    );
    for r in rows {
        let mut name = format!("{}/{}", r.namespace, r.name);
        if !r.port_name.is_empty() {
            name.push(':');
            name.push_str(&r.port_name);
        }
        let backends = if r.backends.is_empty() && r.flags.iter().any(|f| f == "drop-empty") {
            // A traffic policy Local with endpoints on other nodes only (kube-proxy drops).
            "(none on this node: connections are dropped)".to_string()
        } else if r.backends.is_empty() {
            "(none: connections are refused)".to_string()
        } else {
            r.backends
                .iter()
                .map(|b| {
                    let t = if b.terminating { " (terminating)" } else { "" };
                    let l = if b.local { " (local)" } else { "" };
                    let w = if b.weight > 1 {
                        format!(" w{}", b.weight)
                    } else {
                        String::new()
                    };
                    let counting = ["lc", "sed", "nq"].contains(&r.scheduler.as_str());
                    let c = if counting {
                        format!(" ({} open)", b.active_connections)
                    } else {
                        String::new()
                    };
                    format!("{}{w}{c}{l}{t}", host_port(b.ip, b.port))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut scheduler = r.scheduler.clone();
        if r.affinity_timeout_s != 0 {
            scheduler.push_str(&format!("+aff{}s", r.affinity_timeout_s));
        }
        let mut flags = r.flags.join(",");
        if !r.source_ranges.is_empty() {
            flags.push_str(&format!("({})", r.source_ranges.join(",")));
        }
        if flags.is_empty() {
            flags.push('-');
        }
        let _ = writeln!(
            out,
            "{name:<32} {:<22} {:<6} {:<9} {:<13} {scheduler:<14} {flags:<20} {backends}",
            host_port(r.ip, r.port),
            r.protocol,
            r.scope,
            r.kind,
        );
    }
    out
}

pub fn connections_table(rows: &[ConnectionRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<22} {:<22} {:<22} STATE",
        "PROTO", "CLIENT", "SERVICE", "BACKEND"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<6} {:<22} {:<22} {:<22} {}",
            r.protocol,
            host_port(r.client_ip, r.client_port),
            host_port(r.service_ip, r.service_port),
            host_port(r.backend_ip, r.backend_port),
            if r.closing { "closing" } else { "open" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn the_table_shows_scope_kind_flags_and_local_backends() {
        let row = ServiceRow {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            ip: Ipv4Addr::new(203, 0, 113, 1).into(),
            port: 80,
            protocol: "TCP".into(),
            scope: "external".into(),
            kind: "LoadBalancer".into(),
            flags: vec!["snat".into(), "source-ranges".into()],
            source_ranges: vec!["10.0.0.0/8".into()],
            svc_id: 3,
            scheduler: "random".into(),
            affinity_timeout_s: 0,
            backends: vec![BackendRow {
                ip: Ipv4Addr::new(10, 244, 1, 5).into(),
                port: 8080,
                terminating: false,
                local: true,
                weight: 1,
                active_connections: 0,
            }],
        };
        let table = services_table(&[row]);
        let line = table.lines().nth(1).unwrap();
        for part in [
            "default/web:http",
            "203.0.113.1:80",
            "external",
            "LoadBalancer",
            "snat,source-ranges(10.0.0.0/8)",
            "10.244.1.5:8080 (local)",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
        assert!(table.lines().next().unwrap().contains("SCOPE"));
    }

    #[test]
    fn ipv6_rows_print_bracketed_in_the_same_tables() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let row = ServiceRow {
            namespace: "default".into(),
            name: "web".into(),
            port_name: String::new(),
            ip: v6("fd00:96::10"),
            port: 80,
            protocol: "TCP".into(),
            scope: "cluster".into(),
            kind: "ClusterIP".into(),
            flags: Vec::new(),
            source_ranges: vec!["fd00:203::/48".into()],
            svc_id: 2,
            scheduler: "random".into(),
            affinity_timeout_s: 0,
            backends: vec![BackendRow {
                ip: v6("fd00:244:1::11"),
                port: 8080,
                terminating: false,
                local: false,
                weight: 1,
                active_connections: 0,
            }],
        };
        let table = services_table(&[row]);
        let line = table.lines().nth(1).unwrap();
        for part in ["[fd00:96::10]:80", "[fd00:244:1::11]:8080", "fd00:203::/48"] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
        let conns = connections_table(&[ConnectionRow {
            protocol: "TCP".into(),
            client_ip: v6("fd00:251::100"),
            client_port: 40000,
            service_ip: v6("fd00:96::10"),
            service_port: 80,
            backend_ip: v6("fd00:244:1::11"),
            backend_port: 8080,
            closing: false,
            svc_id: 2,
        }]);
        let line = conns.lines().nth(1).unwrap();
        for part in [
            "[fd00:251::100]:40000",
            "[fd00:96::10]:80",
            "[fd00:244:1::11]:8080",
            "open",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
    }
}
