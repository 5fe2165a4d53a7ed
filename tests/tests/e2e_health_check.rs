//! Health-check node ports end to end: the agent (`--node-name node-a`) serves a
//! LoadBalancer Service with externalTrafficPolicy Local and a healthCheckNodePort; a
//! client pod probes the port on the node's address as a cloud load balancer would, and
//! gets kube-proxy's answer: 200 and the JSON body while the Service has a ready endpoint
//! on node-a, 503 when the only local endpoint is terminating, and nothing once the
//! Service is gone.

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use testbed::{
    Cluster, EndpointSlice, Service,
    client::{ConnectOutcome, IO_TIMEOUT, connect},
    topology::POD_GATEWAY,
    wait_until,
};

const NODE: &str = "node-a";
const NAMESPACE: &str = "shop";
const NAME: &str = "web";
const HC_PORT: u16 = 32100;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SERVICE_FILE: &str = "web-service.yaml";
const SLICE_FILE: &str = "web-endpointslice.yaml";

fn service() -> Service {
    Service::cluster_ip(NAMESPACE, NAME, VIP)
        .node_port("http", "TCP", 80, 80, 30080)
        .kind("LoadBalancer")
        .external_policy("Local")
        .health_check_node_port(HC_PORT)
        .lb_ingress(LB_IP)
}

/// `b1` on this node (ready, or only terminating), `b2` on another node (ready).
fn slice(cluster: &Cluster, local_terminating: bool) -> EndpointSlice {
    let mut slice = EndpointSlice::for_service(NAMESPACE, NAME, "abcde")
        .port("http", "TCP", 80)
        .ready_on("b1", cluster.backend("b1").ip, NODE)
        .ready_on("b2", cluster.backend("b2").ip, "node-b");
    if local_terminating {
        slice.endpoints[0].ready = false;
        slice.endpoints[0].terminating = true;
    }
    slice
}

/// A probe's answer: status, header lines (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET /healthz` from the client pod to the node's address (the pods' gateway, an address
/// of the node namespace) on the health-check port; `None` if nothing listens there.
fn probe(cluster: &Cluster) -> Result<Option<Answer>> {
    let mut stream = match connect(&cluster.client().ns, POD_GATEWAY, HC_PORT, IO_TIMEOUT)? {
        ConnectOutcome::Connected(s, _) => s,
        ConnectOutcome::Refused(_) => return Ok(None),
        other => anyhow::bail!("connecting to {POD_GATEWAY}:{HC_PORT}: {other:?}"),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb-probe\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {raw:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {raw:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some(Answer {
        status,
        headers,
        body: body.to_string(),
    }))
}

/// Probes until `check` accepts an answer (the agent applies changes within moments).
fn wait_for_answer(
    cluster: &Cluster,
    what: &str,
    check: impl Fn(&Option<Answer>) -> bool,
) -> Result<Option<Answer>> {
    wait_until(what, Duration::from_secs(20), || {
        let answer = probe(cluster)?;
        Ok(check(&answer).then_some(answer))
    })
}

fn body_json(answer: &Answer) -> Result<serde_json::Value> {
    serde_json::from_str(&answer.body).with_context(|| format!("body {:?}", answer.body))
}

#[test]
fn the_health_check_node_port_answers_as_kube_proxy() {
    let mut cluster = Cluster::new(1, 2).expect("building the testbed");
    let body = |cluster: &mut Cluster| -> Result<()> {
        cluster
            .manifests
            .write(SERVICE_FILE, &service().to_yaml())?;
        cluster
            .manifests
            .write(SLICE_FILE, &slice(cluster, false).to_yaml())?;
        let glob = cluster.topo.node_interfaces_glob();
        cluster.start_agent_with(&glob, &["--node-name", NODE])?;

        // One ready endpoint on this node: 200, kube-proxy's body and headers.
        let ok = wait_for_answer(cluster, "200 on the health-check port", |a| {
            a.as_ref().is_some_and(|a| a.status == 200)
        })?
        .expect("an answer");
        ensure!(
            ok.header("content-type") == Some("application/json"),
            "{:?}",
            ok.headers
        );
        ensure!(
            ok.header("x-content-type-options") == Some("nosniff"),
            "{:?}",
            ok.headers
        );
        ensure!(
            ok.header("x-load-balancing-endpoint-weight") == Some("1"),
            "{:?}",
            ok.headers
        );
        let json = body_json(&ok)?;
        ensure!(json["service"]["namespace"] == NAMESPACE, "{json}");
        ensure!(json["service"]["name"] == NAME, "{json}");
        ensure!(json["localEndpoints"] == 1, "{json}");
        ensure!(json["serviceProxyHealthy"] == true, "{json}");

        // The local endpoint is only terminating (the other node's is ready): 503.
        cluster
            .manifests
            .write(SLICE_FILE, &slice(cluster, true).to_yaml())?;
        let down = wait_for_answer(cluster, "503 with only a terminating local endpoint", |a| {
            a.as_ref().is_some_and(|a| a.status == 503)
        })?
        .expect("an answer");
        let json = body_json(&down)?;
        ensure!(json["localEndpoints"] == 0, "{json}");
        ensure!(json["serviceProxyHealthy"] == true, "{json}");
        ensure!(
            down.header("x-load-balancing-endpoint-weight") == Some("0"),
            "{:?}",
            down.headers
        );

        // The Service is gone: so is its health-check port.
        cluster.manifests.remove(SERVICE_FILE)?;
        wait_for_answer(cluster, "the health-check port to close", Option::is_none)?;
        Ok(())
    };
    if let Err(e) = body(&mut cluster) {
        panic!("{e:?}");
    }
}
