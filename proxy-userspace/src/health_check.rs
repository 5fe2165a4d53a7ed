//! Health-check node ports: for each LoadBalancer Service with externalTrafficPolicy Local,
//! an HTTP server on its `spec.healthCheckNodePort` that tells the cloud load balancer
//! whether this node has a ready endpoint of the Service, with kube-proxy's answer
//! (pkg/proxy/healthcheck): status 200 when the Service has ready endpoints here and the
//! agent is healthy, 503 otherwise; a JSON body naming the Service, its local endpoint count
//! and the agent's health; `X-Load-Balancing-Endpoint-Weight` with the count. Every path
//! gets the same answer (load balancers probe `/healthz` or `/`).
//!
//! The servers follow `DesiredState::health_checks`: a port appears, its server starts; a
//! port goes, its listener closes. A port that cannot be bound is reported (naming the
//! port and the Service) and tried again on the next sync; the other ports keep serving.
//!
//! Where: every address of the agent's network namespace, as kube-proxy does when
//! `--nodeport-addresses` is not set: `0.0.0.0` for IPv4 and `[::]` (IPv6 only) for IPv6,
//! each answering with the local endpoints of its own family. kube-proxy runs one proxier
//! per family, each with its own health server counting its family's endpoints; since
//! kubernetes PR #137370 the IPv4 one listens on an IPv4 socket and the IPv6 one on an
//! IPv6 socket (before, the second failed to bind). bpfproxy does not narrow them to the
//! NodePort addresses: the probe of a cloud load balancer comes to the node address the
//! node is registered with, and a listener on all addresses answers it whatever interface
//! it is on. Without IPv6 in the namespace (`EAFNOSUPPORT`), IPv4 alone is served.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    health::Health,
    http,
    model::{Family, HealthCheck},
};

/// What a health-check node port answers to a client of `family`: (status, body, endpoint
/// weight header), from that family's local ready endpoints.
pub fn answer(check: &HealthCheck, family: Family, proxy_healthy: bool) -> http::Response {
    let local = match family {
        Family::V4 => check.local_ready,
        Family::V6 => check.local_ready6,
    };
    let healthy = local > 0 && proxy_healthy;
    // kube-proxy's exact text (tab-indented, no trailing newline); a JSON string escapes
    // as Go's %q does for the names Kubernetes allows.
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        serde_json::Value::from(check.namespace.as_str()),
        serde_json::Value::from(check.name.as_str()),
        local,
        proxy_healthy,
    );
    http::Response::new(if healthy { 200 } else { 503 }, "application/json", body)
        .with_header("x-load-balancing-endpoint-weight", local.to_string())
}

/// The running health-check servers, by port.
pub struct HealthCheckServers {
    /// Where to listen, at most one address per family.
    listen: Vec<IpAddr>,
    health: Health,
    servers: BTreeMap<u16, Server>,
    /// IPv6 sockets cannot be made here (a kernel without IPv6): IPv4 alone is served.
    no_ipv6: bool,
}

struct Server {
    /// Shared with the server's handlers, which read it on each request.
    check: Arc<Mutex<HealthCheck>>,
    /// One accept loop per listening address.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Ends the accept loops, which closes the listeners.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl HealthCheckServers {
    /// Servers on every address (`0.0.0.0` and `[::]`); `health` is the agent's own,
    /// reported as `serviceProxyHealthy`.
    pub fn new(health: Health) -> Self {
        Self::on(
            vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            health,
        )
    }

    /// Servers on `listen` only (one address per family).
    pub fn on(listen: Vec<IpAddr>, health: Health) -> Self {
        HealthCheckServers {
            listen,
            health,
            servers: BTreeMap::new(),
            no_ipv6: false,
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }

    /// Starts and stops servers so that exactly the ports of `wanted` are served, each
    /// with its current counts. Returns one message per port that could not be bound (it
    /// is tried again on the next call, on all its addresses). Must run inside the tokio
    /// runtime.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<String> {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                let check = lock(&server.check);
                tracing::info!(port, service = %format!("{}/{}", check.namespace, check.name), "health-check node port closed");
            }
            keep
        });
        let mut errors = Vec::new();
        for (&port, check) in wanted {
            if let Some(server) = self.servers.get(&port) {
                *lock(&server.check) = check.clone();
                continue;
            }
            let shared = Arc::new(Mutex::new(check.clone()));
            let mut server = Server {
                check: shared.clone(),
                tasks: Vec::new(),
            };
            let mut failed = None;
            for &ip in &self.listen {
                let family = Family::of(&ip);
                if family == Family::V6 && self.no_ipv6 {
                    continue;
                }
                let addr = SocketAddr::new(ip, port);
                match listen(addr) {
                    Ok(listener) => {
                        let handler_check = shared.clone();
                        let health = self.health.clone();
                        server.tasks.push(http::serve(
                            listener,
                            Arc::new(move |_path| {
                                let check = lock(&handler_check).clone();
                                Some(answer(&check, family, health.status().healthy))
                            }),
                        ));
                        tracing::info!(%addr, service = %format!("{}/{}", check.namespace, check.name), "health-check node port serving");
                    }
                    Err(e)
                        if family == Family::V6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                    {
                        tracing::warn!(
                            "no IPv6 in this network namespace: health-check node ports are served on IPv4 only"
                        );
                        self.no_ipv6 = true;
                    }
                    Err(e) => {
                        failed = Some((addr, e));
                        break;
                    }
                }
            }
            match failed {
                // Dropping the server closes what it opened: all addresses are tried again.
                Some((addr, e)) => errors.push(format!(
                    "health-check node port {port} of Service {}/{}: cannot listen on {addr}: {e} (tried again on the next sync)",
                    check.namespace, check.name
                )),
                None => {
                    self.servers.insert(port, server);
                }
            }
        }
        errors
    }
}

fn lock(check: &Mutex<HealthCheck>) -> std::sync::MutexGuard<'_, HealthCheck> {
    check.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listener with SO_REUSEADDR (a port closed a moment ago, with connections in
/// TIME_WAIT, can be taken again at once); an IPv6 one is IPv6 only, so that it and the
/// IPv4 one on the same port can both be bound.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let socket = tokio::net::TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)
                .map_err(std::io::Error::from)?;
            socket
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn check(namespace: &str, name: &str, local_ready: usize) -> HealthCheck {
        HealthCheck {
            namespace: namespace.into(),
            name: name.into(),
            local_ready,
            local_ready6: 0,
        }
    }

    #[test]
    fn ready_local_endpoints_answer_200_with_kube_proxys_body_and_headers() {
        let r = answer(&check("shop", "web", 2), Family::V4, true);
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.headers,
            vec![("x-load-balancing-endpoint-weight", "2".to_string())]
        );
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["service"]["namespace"], "shop");
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(json["localEndpoints"], 2);
        assert_eq!(json["serviceProxyHealthy"], true);
    }

    #[test]
    fn no_ready_local_endpoint_answers_503() {
        let r = answer(&check("shop", "web", 0), Family::V4, true);
        assert_eq!(r.status, 503);
        assert_eq!(
            r.headers,
            vec![("x-load-balancing-endpoint-weight", "0".to_string())]
        );
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["localEndpoints"], 0);
        assert_eq!(json["serviceProxyHealthy"], true);
    }

    #[test]
    fn an_unhealthy_agent_answers_503_even_with_local_endpoints() {
        let r = answer(&check("shop", "web", 3), Family::V4, false);
        assert_eq!(r.status, 503);
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["localEndpoints"], 3);
        assert_eq!(json["serviceProxyHealthy"], false);
    }

    /// A port nobody listens on now (bound, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn get(port: u16, path: &str) -> std::io::Result<String> {
        get_at("127.0.0.1".parse().unwrap(), port, path).await
    }

    async fn get_at(ip: IpAddr, port: u16, path: &str) -> std::io::Result<String> {
        let mut conn = tokio::net::TcpStream::connect((ip, port)).await?;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        conn.read_to_string(&mut out).await?;
        Ok(out)
    }

    fn synced_health() -> Health {
        let health = Health::new(Duration::from_secs(60), None);
        health.synced(Instant::now());
        health
    }

    #[tokio::test]
    async fn servers_start_follow_the_counts_and_stop_with_the_desired_state() {
        let mut servers =
            HealthCheckServers::on(vec!["127.0.0.1".parse().unwrap()], synced_health());
        let (a, b) = (free_port(), free_port());
        let mut wanted = BTreeMap::from([(a, check("ns", "a", 1)), (b, check("ns", "b", 0))]);
        assert!(servers.sync(&wanted).is_empty());
        assert_eq!(servers.ports().collect::<Vec<_>>().len(), 2);

        let ra = get(a, "/healthz").await.unwrap();
        assert!(ra.starts_with("HTTP/1.1 200 OK\r\n"), "{ra}");
        assert!(ra.contains("content-type: application/json\r\n"), "{ra}");
        assert!(ra.contains("x-content-type-options: nosniff\r\n"), "{ra}");
        assert!(
            ra.contains("x-load-balancing-endpoint-weight: 1\r\n"),
            "{ra}"
        );
        assert!(ra.contains("\"name\": \"a\""), "{ra}");
        let rb = get(b, "/").await.unwrap();
        assert!(rb.starts_with("HTTP/1.1 503 "), "{rb}");
        assert!(rb.contains("\"localEndpoints\": 0"), "{rb}");

        // Counts change in place; a port that goes closes.
        wanted.insert(b, check("ns", "b", 4));
        wanted.remove(&a);
        assert!(servers.sync(&wanted).is_empty());
        let rb = get(b, "/healthz").await.unwrap();
        assert!(rb.starts_with("HTTP/1.1 200 "), "{rb}");
        assert!(
            rb.contains("x-load-balancing-endpoint-weight: 4\r\n"),
            "{rb}"
        );
        // The accept loop ends when its task is next polled.
        let mut closed = false;
        for _ in 0..100 {
            if get(a, "/healthz").await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "port {a} still answers after its health check went");
        assert_eq!(servers.ports().collect::<Vec<_>>(), vec![b]);
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_and_the_others_serve() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let ok = free_port();
        let mut servers =
            HealthCheckServers::on(vec!["127.0.0.1".parse().unwrap()], synced_health());
        let wanted = BTreeMap::from([
            (busy, check("shop", "busy", 1)),
            (ok, check("shop", "fine", 1)),
        ]);
        let errors = servers.sync(&wanted);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(&format!("health-check node port {busy}"))
                && errors[0].contains("Service shop/busy"),
            "{errors:?}"
        );
        assert!(
            get(ok, "/healthz")
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200 ")
        );
        // Freed: the next sync takes it.
        drop(taken);
        assert!(servers.sync(&wanted).is_empty());
        let r = get(busy, "/healthz").await.unwrap();
        assert!(r.contains("\"name\": \"busy\""), "{r}");
    }

    #[test]
    fn each_family_answers_with_its_own_endpoints() {
        let c = HealthCheck {
            local_ready6: 2,
            ..check("shop", "web", 0)
        };
        let r4 = answer(&c, Family::V4, true);
        let r6 = answer(&c, Family::V6, true);
        assert_eq!((r4.status, r6.status), (503, 200));
        assert!(r6.body.contains("\"localEndpoints\": 2"), "{}", r6.body);
        assert_eq!(
            r6.headers,
            vec![("x-load-balancing-endpoint-weight", "2".to_string())]
        );
    }

    /// On one port, the IPv4 listener answers with the IPv4 count and the IPv6 one (IPv6
    /// only, so both bind) with the IPv6 count, as kube-proxy's two proxiers do.
    #[tokio::test]
    async fn ipv4_and_ipv6_listeners_share_a_port_and_answer_per_family() {
        let port = free_port();
        let mut servers = HealthCheckServers::on(
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            synced_health(),
        );
        let wanted = BTreeMap::from([(
            port,
            HealthCheck {
                local_ready6: 3,
                ..check("ns", "dual", 1)
            },
        )]);
        assert!(servers.sync(&wanted).is_empty());
        let r4 = get_at("127.0.0.1".parse().unwrap(), port, "/healthz")
            .await
            .unwrap();
        assert!(
            r4.contains("x-load-balancing-endpoint-weight: 1\r\n"),
            "{r4}"
        );
        let r6 = get_at("::1".parse().unwrap(), port, "/healthz")
            .await
            .unwrap();
        assert!(r6.starts_with("HTTP/1.1 200 "), "{r6}");
        assert!(r6.contains("\"localEndpoints\": 3"), "{r6}");
        assert!(
            r6.contains("x-load-balancing-endpoint-weight: 3\r\n"),
            "{r6}"
        );
    }
}
