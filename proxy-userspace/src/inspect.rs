//! What the CLI prints: the services and connections the kernel actually holds, read from
//! the pinned maps (no agent needed).

use std::{fmt::Write as _, net::Ipv4Addr};

use proxy_common::conntrack::CT_DIR_FORWARD;
use serde::Serialize;

use crate::{
    datapath::{DatapathError, KernelMaps},
    model::Protocol,
    planner::meta_to_name,
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub svc_id: u32,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub terminating: bool,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConnectionRow {
    pub protocol: String,
    pub client_ip: Ipv4Addr,
    pub client_port: u16,
    pub service_ip: Ipv4Addr,
    pub service_port: u16,
    pub backend_ip: Ipv4Addr,
    pub backend_port: u16,
    pub closing: bool,
    pub svc_id: u32,
}

fn protocol_name(n: u8) -> String {
    Protocol::from_number(n).map_or_else(|| n.to_string(), |p| p.to_string())
}

pub fn services(maps: &KernelMaps) -> Result<Vec<ServiceRow>, DatapathError> {
    let state = maps.read_state()?;
    let mut rows: Vec<ServiceRow> = state
        .services
        .iter()
        .map(|(key, svc)| {
            let (namespace, name, port_name) = meta_to_name(&svc.meta);
            ServiceRow {
                namespace,
                name,
                port_name,
                ip: Ipv4Addr::from(key.addr),
                port: key.port,
                protocol: protocol_name(key.proto),
                svc_id: svc.value.svc_id,
                backends: svc
                    .backends
                    .iter()
                    .map(|b| BackendRow {
                        ip: Ipv4Addr::from(b.addr),
                        port: b.port,
                        terminating: b.flags & proxy_common::service::BACKEND_TERMINATING != 0,
                    })
                    .collect(),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.port_name, a.port).cmp(&(
            &b.namespace,
            &b.name,
            &b.port_name,
            b.port,
        ))
    });
    Ok(rows)
}

/// Connections, one row each (the forward entry; its reply twin says the same backwards).
pub fn connections(maps: &KernelMaps) -> Vec<ConnectionRow> {
    let mut rows: Vec<ConnectionRow> = maps
        .conntrack_entries()
        .into_iter()
        .filter(|(_, v)| v.dir == CT_DIR_FORWARD)
        .map(|(k, v)| ConnectionRow {
            protocol: protocol_name(k.proto),
            client_ip: Ipv4Addr::from(k.saddr),
            client_port: k.sport,
            service_ip: Ipv4Addr::from(k.daddr),
            service_port: k.dport,
            backend_ip: Ipv4Addr::from(v.nat_addr),
            backend_port: v.nat_port,
            closing: v.flags & proxy_common::conntrack::CT_FLAG_CLOSING != 0,
            svc_id: v.svc_id,
        })
        .collect();
    rows.sort_by_key(|r| (r.service_ip, r.service_port, r.client_ip, r.client_port));
    rows
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:<22} {:<6} BACKENDS",
        "SERVICE", "FRONTEND", "PROTO"
    );
    for r in rows {
        let mut name = format!("{}/{}", r.namespace, r.name);
        if !r.port_name.is_empty() {
            name.push(':');
            name.push_str(&r.port_name);
        }
        let backends = if r.backends.is_empty() {
            "(none: connections are refused)".to_string()
        } else {
            r.backends
                .iter()
                .map(|b| {
                    let t = if b.terminating { " (terminating)" } else { "" };
                    format!("{}:{}{t}", b.ip, b.port)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{name:<32} {:<22} {:<6} {backends}",
            format!("{}:{}", r.ip, r.port),
            r.protocol
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
            format!("{}:{}", r.client_ip, r.client_port),
            format!("{}:{}", r.service_ip, r.service_port),
            format!("{}:{}", r.backend_ip, r.backend_port),
            if r.closing { "closing" } else { "open" }
        );
    }
    out
}
