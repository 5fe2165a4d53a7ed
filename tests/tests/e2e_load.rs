//! Load and churn end to end, in network namespaces with the real agent.
//!
//! - Load: 10,000 TCP connections through one VIP (`load`, 10.96.0.20:9000, scheduled by
//!   `lc` over four backend pods), all open at once, each exchanging a line answered by
//!   the backend the kernel chose for it (checked against its conntrack entry); the `lc`
//!   counts `bpfproxy services` shows equal what the servers hold; after every connection
//!   closed, the counts return to zero and every conntrack entry of them is closing.
//! - Churn: `myapp`'s EndpointSlice rewritten every 100 ms for a minute (two backends
//!   always ready, four coming and going, all of them alive) while clients open a new
//!   connection per request. kube-proxy's promise for TCP: connections keep working when
//!   their endpoint leaves the slice (the pod still serves; conntrack keeps the flow),
//!   and new connections go only to endpoints in the slice. So: zero failed requests, and
//!   no connection lands on an endpoint that the agent had already removed when the
//!   connection began and that was not written back before it ended (decided from the
//!   order of file writes and of `bpfproxy services` readings, no timing bounds).
//!
//! Needs root and the agent binary, like the other e2e tests; the tests run one at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use bpfproxy::datapath::KernelMaps;
use proxy_common::{
    PROTO_TCP,
    conntrack::{CT_DIR_FORWARD, CT_FLAG_CLOSING},
};
use testbed::{
    EndpointSlice, HttpConnection, LineServerProcess,
    cluster::{Cluster, HTTP_PORT, MYAPP, MYAPP_NAMESPACE, MYAPP_VIP},
    wait_until,
};

static SERIAL: Mutex<()> = Mutex::new(());

const LOAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOAD_PORT: u16 = 9000;
const LOAD_CONNS: usize = 10_000;
const LOAD_BACKENDS: usize = 4;
/// Connections being set up at once (all stay open after their exchange).
const CONNECTING_AT_ONCE: usize = 256;
/// Generous: a SYN dropped on a busy machine is retried after 1 s, 3 s, 7 s...
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

fn load_service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: load\n  namespace: default\n  \
         annotations:\n    bpfproxy.io/scheduler: lc\nspec:\n  type: ClusterIP\n  \
         clusterIP: {LOAD_VIP}\n  ports:\n  - name: tcp\n    protocol: TCP\n    \
         port: {LOAD_PORT}\n    targetPort: {LOAD_PORT}\n"
    )
}

/// (scheduler, backend ip -> open connections as counted for lc) of a service port, as
/// `bpfproxy services -o json` shows it.
fn shown(cluster: &Cluster, name: &str, port: u16) -> Result<(String, BTreeMap<String, u64>)> {
    let out = cluster.agent().cli(&["services", "-o", "json"])?;
    let rows: serde_json::Value = serde_json::from_str(&out).context("services -o json")?;
    let row = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name && r["port"] == port)
        .with_context(|| format!("{name}:{port} not listed: {out}"))?;
    let scheduler = row["scheduler"].as_str().unwrap_or_default().to_string();
    let mut open = BTreeMap::new();
    for b in row["backends"].as_array().into_iter().flatten() {
        open.insert(
            b["ip"].as_str().unwrap_or_default().to_string(),
            b["active_connections"].as_u64().unwrap_or(0),
        );
    }
    Ok((scheduler, open))
}

/// One open connection of the load test.
struct Held {
    /// Open until dropped.
    _stream: TcpStream,
    local: SocketAddrV4,
    /// The pod that answered.
    backend: String,
}

/// Opens `n` connections to the load VIP from the current thread's namespace, each
/// sending `c<i>` and reading `<pod> c<i>` back; returns them open, and the failures.
fn connect_all(n: usize) -> Result<(Vec<Held>, Vec<String>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTING_AT_ONCE));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let gate = gate.clone();
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                let exchange = async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    let mut s = socket
                        .connect(SocketAddr::V4(SocketAddrV4::new(LOAD_VIP, LOAD_PORT)))
                        .await?;
                    s.write_all(format!("c{i}\n").as_bytes()).await?;
                    // The answer is one line; read it without buffering past it.
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while line.last() != Some(&b'\n') {
                        if s.read(&mut byte).await? == 0 {
                            return Err(std::io::Error::other(format!(
                                "closed after {:?}",
                                String::from_utf8_lossy(&line)
                            )));
                        }
                        line.push(byte[0]);
                    }
                    Ok::<_, std::io::Error>((s, String::from_utf8_lossy(&line).into_owned()))
                };
                let (s, line) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
                    .await
                    .map_err(|_| format!("connection {i}: no answer within {EXCHANGE_TIMEOUT:?}"))?
                    .map_err(|e| format!("connection {i}: {e}"))?;
                let Some((backend, token)) = line.trim_end().split_once(' ') else {
                    return Err(format!("connection {i}: odd answer {line:?}"));
                };
                if token != format!("c{i}") {
                    return Err(format!("connection {i}: answer {line:?} is another's"));
                }
                let local = match s.local_addr() {
                    Ok(SocketAddr::V4(a)) => a,
                    other => return Err(format!("connection {i}: local address {other:?}")),
                };
                let stream = s.into_std().map_err(|e| format!("connection {i}: {e}"))?;
                Ok(Held {
                    _stream: stream,
                    local,
                    backend: backend.to_string(),
                })
            });
        }
        let mut held = Vec::with_capacity(n);
        let mut failed = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(h)) => held.push(h),
                Ok(Err(e)) => failed.push(e),
                Err(e) => failed.push(format!("task: {e}")),
            }
        }
        Ok((held, failed))
    })
}

#[test]
fn ten_thousand_concurrent_connections_through_one_vip_and_counts_back_to_zero() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The client sockets are in this process (the servers' in a child process).
    let limit = testbed::raise_nofile_to_hard().expect("raising RLIMIT_NOFILE");
    assert!(
        limit >= LOAD_CONNS as u64 + 1024,
        "RLIMIT_NOFILE hard limit {limit} is too low for {LOAD_CONNS} connections"
    );
    let mut cluster = Cluster::new(1, LOAD_BACKENDS).expect("building the testbed");
    if let Err(e) = load(&mut cluster) {
        panic!("{e:?}");
    }
}

fn load(cluster: &mut Cluster) -> Result<()> {
    let pods: Vec<&testbed::Pod> = cluster.topo.backends.iter().collect();
    let mut servers = LineServerProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_testbed-line-servers")),
        LOAD_PORT,
        &pods,
    )?;
    let mut slice =
        EndpointSlice::for_service("default", "load", "l0ad1").port("tcp", "TCP", LOAD_PORT);
    for p in &cluster.topo.backends {
        slice = slice.ready(&p.name, p.ip);
    }
    cluster
        .manifests
        .write("load-service.yaml", &load_service_yaml())?;
    cluster
        .manifests
        .write("load-endpointslice.yaml", &slice.to_yaml())?;
    cluster.start_agent()?;
    let ips: Vec<Ipv4Addr> = cluster.topo.backends.iter().map(|p| p.ip).collect();
    cluster
        .agent()
        .wait_for_backends("default", "load", LOAD_PORT, &ips)?;
    ensure!(
        shown(cluster, "load", LOAD_PORT)?.0 == "lc",
        "load is not scheduled by lc"
    );
    let ip_of: BTreeMap<String, Ipv4Addr> = cluster
        .topo
        .backends
        .iter()
        .map(|p| (p.name.clone(), p.ip))
        .collect();

    let start = Instant::now();
    let (held, failed) = cluster.client().ns.run(|| connect_all(LOAD_CONNS))??;
    let setup = start.elapsed();
    println!(
        "load: {} connections open, {} failed, set up in {setup:.1?}",
        held.len(),
        failed.len()
    );
    ensure!(
        failed.is_empty(),
        "{} of {LOAD_CONNS} connections failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    ensure!(held.len() == LOAD_CONNS);

    // Who answered: the pod of the backend in the connection's conntrack entry.
    let maps = KernelMaps::open_pinned(&cluster.bpffs())?;
    let client_ip = cluster.client().ip;
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for h in &held {
        ensure!(*h.local.ip() == client_ip, "local address {}", h.local);
        let ip = ip_of
            .get(&h.backend)
            .with_context(|| format!("answer from {:?}, not a backend", h.backend))?;
        let key = proxy_common::conntrack::Ct4Key {
            saddr: client_ip.octets(),
            daddr: LOAD_VIP.octets(),
            sport: h.local.port(),
            dport: LOAD_PORT,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let ct = maps
            .conntrack
            .get(&key, 0)
            .with_context(|| format!("no conntrack entry for {}", h.local))?;
        ensure!(
            (ct.dir, ct.nat_addr, ct.nat_port, ct.flags)
                == (CT_DIR_FORWARD, ip.octets(), LOAD_PORT, 0),
            "{}: answered by {} ({ip}), conntrack says {ct:?}",
            h.local,
            h.backend
        );
        *per_backend.entry(ip.to_string()).or_default() += 1;
    }
    let held_by_servers: BTreeMap<String, u64> = servers
        .counts()?
        .into_iter()
        .map(|(name, (_, open))| (ip_of[&name].to_string(), open))
        .collect();
    println!("load: connections per backend {per_backend:?}");
    ensure!(
        held_by_servers == per_backend,
        "servers hold {held_by_servers:?}, clients {per_backend:?}"
    );
    ensure!(
        per_backend.len() == LOAD_BACKENDS,
        "a backend got nothing: {per_backend:?}"
    );
    let fair = (LOAD_CONNS / LOAD_BACKENDS / 2) as u64;
    ensure!(
        per_backend.values().all(|n| *n >= fair),
        "lc left a backend with less than half its share: {per_backend:?}"
    );
    // The lc counts follow the open connections exactly.
    wait_until(
        "lc counts equal to the open connections",
        Duration::from_secs(30),
        || Ok((shown(cluster, "load", LOAD_PORT)?.1 == per_backend).then_some(())),
    )
    .with_context(|| format!("{:?}", shown(cluster, "load", LOAD_PORT)))?;

    // All close (FIN from the clients); the servers close their side on EOF.
    let locals: Vec<SocketAddrV4> = held.iter().map(|h| h.local).collect();
    let close_start = Instant::now();
    drop(held);
    wait_until(
        "servers to see every connection closed",
        Duration::from_secs(120),
        || Ok((servers.counts()?.values().map(|c| c.1).sum::<u64>() == 0).then_some(())),
    )?;
    wait_until("lc counts back to zero", Duration::from_secs(60), || {
        let (_, open) = shown(cluster, "load", LOAD_PORT)?;
        Ok(open.values().all(|n| *n == 0).then_some(()))
    })
    .with_context(|| format!("{:?}", shown(cluster, "load", LOAD_PORT)))?;
    // Every conntrack entry of these connections is closing (or already collected).
    let open_entries = wait_until(
        "conntrack entries of the closed connections to be closing",
        Duration::from_secs(60),
        || {
            let mut open = 0usize;
            for (k, v) in maps.conntrack_entries() {
                let ours = (k.daddr == LOAD_VIP.octets() && k.dport == LOAD_PORT)
                    || (k.daddr == client_ip.octets()
                        && locals.iter().any(|l| l.port() == k.dport)
                        && ip_of.values().any(|ip| ip.octets() == k.saddr));
                if ours && v.flags & CT_FLAG_CLOSING == 0 {
                    open += 1;
                }
            }
            Ok((open == 0).then_some(open))
        },
    )?;
    ensure!(open_entries == 0);
    let accepted: u64 = servers.counts()?.values().map(|c| c.0).sum();
    ensure!(
        accepted == LOAD_CONNS as u64,
        "servers accepted {accepted} connections for {LOAD_CONNS}"
    );
    println!(
        "load: all closed, counts and conntrack settled in {:.1?}",
        close_start.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Churn.

const CHURN_STEP: Duration = Duration::from_millis(100);
const CHURN_STEPS: usize = 600;
const STABLE: [&str; 2] = ["b1", "b2"];
const CHURNING: [&str; 4] = ["b3", "b4", "b5", "b6"];
const CLIENT_THREADS: usize = 3;

/// A GET on a new connection to myapp; a failure says what the datapath holds of the
/// connection.
fn request(ns: &testbed::NetNs, maps: &KernelMaps) -> Result<String, String> {
    let mut conn = HttpConnection::open(ns, MYAPP_VIP, HTTP_PORT).map_err(|e| format!("{e:#}"))?;
    conn.get().map_err(|e| {
        let Ok(SocketAddr::V4(local)) = conn.local_addr() else {
            return format!("{e:#}");
        };
        let key = |s: [u8; 4], sp: u16, d: [u8; 4], dp: u16| proxy_common::conntrack::Ct4Key {
            saddr: s,
            daddr: d,
            sport: sp,
            dport: dp,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let fwd = maps
            .conntrack
            .get(
                &key(
                    local.ip().octets(),
                    local.port(),
                    MYAPP_VIP.octets(),
                    HTTP_PORT,
                ),
                0,
            )
            .ok();
        let rev = fwd.and_then(|f| {
            maps.conntrack
                .get(
                    &key(f.nat_addr, f.nat_port, local.ip().octets(), local.port()),
                    0,
                )
                .ok()
        });
        let bit = fwd.map(|f| {
            let (w, m) = proxy_common::reply_filter::word_and_mask(
                proxy_common::reply_filter::bit(f.nat_addr, f.nat_port, PROTO_TCP),
            );
            maps.reply_filter.get(&w, 0).unwrap_or(0) & m != 0
        });
        format!("{e:#} (from {local}: conntrack {fwd:?}, reply entry {rev:?}, reply bit {bit:?})")
    })
}

/// One request: when it began and ended, and the pod that answered or the error.
struct Request {
    start: Instant,
    end: Instant,
    result: Result<String, String>,
}

/// One reading of `bpfproxy services`: it was true at some instant before `end`.
struct Reading {
    end: Instant,
    backends: BTreeSet<String>,
}

#[test]
fn endpoint_churn_every_100ms_for_a_minute_fails_no_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, STABLE.len() + CHURNING.len()).expect("building the testbed");
    if let Err(e) = churn(&mut cluster) {
        panic!("{e:?}");
    }
}

fn churn(cluster: &mut Cluster) -> Result<()> {
    let seed: u64 = match std::env::var("BPFPROXY_CHURN_SEED") {
        Ok(s) => s.trim().parse().context("BPFPROXY_CHURN_SEED")?,
        Err(_) => fastrand::u64(..),
    };
    println!("churn seed {seed} (replay the slice sequence with BPFPROXY_CHURN_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let all: Vec<&str> = STABLE.iter().chain(CHURNING.iter()).copied().collect();
    cluster.write_myapp_service(false)?;
    cluster.write_myapp_endpoints(&all, false)?;
    cluster.start_agent()?;
    cluster.wait_for_myapp_backends(&all)?;
    let ip_of: BTreeMap<String, String> = all
        .iter()
        .map(|p| (p.to_string(), cluster.backend(p).ip.to_string()))
        .collect();
    let set_of =
        |pods: &[&str]| -> BTreeSet<String> { pods.iter().map(|p| ip_of[*p].clone()).collect() };

    // (time before the write, backend IPs written), in order.
    let writes: Mutex<Vec<(Instant, BTreeSet<String>)>> =
        Mutex::new(vec![(Instant::now(), set_of(&all))]);
    let readings: Mutex<Vec<Reading>> = Mutex::new(Vec::new());
    let requests: Mutex<Vec<Request>> = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let client_ns = &cluster.client().ns;

    let churned = std::thread::scope(|s| -> Result<()> {
        let poller = s.spawn(|| -> Result<()> {
            while !done.load(Ordering::SeqCst) {
                // A reading that fails (the CLI racing a map update) is just not used.
                if let Ok(Some(info)) = cluster.agent().service(MYAPP_NAMESPACE, MYAPP, HTTP_PORT) {
                    let end = Instant::now();
                    let backends = info.backend_ips().into_iter().collect();
                    readings.lock().unwrap().push(Reading { end, backends });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        let clients: Vec<_> = (0..CLIENT_THREADS)
            .map(|_| {
                s.spawn(|| {
                    let maps = KernelMaps::open_pinned(&cluster.bpffs()).expect("pinned maps");
                    while !done.load(Ordering::SeqCst) {
                        let start = Instant::now();
                        let result = request(client_ns, &maps);
                        let end = Instant::now();
                        requests
                            .lock()
                            .unwrap()
                            .push(Request { start, end, result });
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        let begin = Instant::now();
        let mut result = Ok(());
        for step in 1..=CHURN_STEPS {
            let mut pods: Vec<&str> = STABLE.to_vec();
            pods.extend(CHURNING.iter().filter(|_| rng.bool()));
            let t = Instant::now();
            writes.lock().unwrap().push((t, set_of(&pods)));
            if let Err(e) = cluster.write_myapp_endpoints(&pods, false) {
                result = Err(e);
                break;
            }
            let next = begin + CHURN_STEP * step as u32;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            if cluster.agent().check_running().is_err() {
                break;
            }
        }
        // The churning endpoints leave for good; requests go on until the agent shows it.
        let t = Instant::now();
        writes.lock().unwrap().push((t, set_of(&STABLE)));
        let settled = cluster
            .write_myapp_endpoints(&STABLE, false)
            .and_then(|()| cluster.wait_for_myapp_backends(&STABLE).map(|_| ()));
        // A little traffic after the end is known to be programmed.
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().expect("client thread");
        }
        poller.join().expect("poller thread")?;
        result.and(settled)
    });
    cluster.agent().check_running()?;
    churned?;

    let writes = writes.into_inner().unwrap();
    let readings = readings.into_inner().unwrap();
    let requests = requests.into_inner().unwrap();

    // After a reading, the kernel serves the state of a write at least as new as the oldest
    // write of the set it showed that was made before the reading ended: the agent reads
    // the whole file each time, so it never goes back to an older one. Only a set shown by
    // two readings in a row counts, so a reading in the middle of an update (a mix of two
    // sets for a few microseconds) never does.
    let floor_after: Vec<(Instant, usize)> = {
        let mut out = Vec::new();
        let mut floor = 0usize;
        for (i, r) in readings.iter().enumerate() {
            if i == 0 || readings[i - 1].backends != r.backends {
                out.push((r.end, floor));
                continue;
            }
            if let Some(j) = writes
                .iter()
                .enumerate()
                .filter(|(_, (t, set))| *t <= r.end && *set == r.backends)
                .map(|(j, _)| j)
                .find(|&j| j >= floor)
            {
                floor = j;
            }
            out.push((r.end, floor));
        }
        out
    };
    let mut failed = Vec::new();
    let mut misrouted = Vec::new();
    let mut per_backend: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &requests {
        match &r.result {
            Err(e) => failed.push(e.clone()),
            Ok(pod) => {
                *per_backend.entry(pod.as_str()).or_default() += 1;
                let Some(ip) = ip_of.get(pod) else {
                    misrouted.push(format!("answer {pod:?} from no backend"));
                    continue;
                };
                // The newest write known applied before the request began...
                let floor = floor_after
                    .iter()
                    .take_while(|(end, _)| *end < r.start)
                    .last()
                    .map_or(0, |(_, f)| *f);
                // ...and every write since, up to the request's end, may be in force.
                let allowed = writes[floor..]
                    .iter()
                    .take_while(|(t, _)| *t <= r.end)
                    .any(|(_, set)| set.contains(ip));
                if !allowed {
                    misrouted.push(format!(
                        "a connection begun {:?} after the start went to {pod}, removed (and known applied) before it began",
                        r.start.duration_since(writes[0].0)
                    ));
                }
            }
        }
    }
    let distinct: BTreeSet<&BTreeSet<String>> = readings.iter().map(|r| &r.backends).collect();
    let churning_hits: u64 = CHURNING
        .iter()
        .map(|p| per_backend.get(p).copied().unwrap_or(0))
        .sum();
    println!(
        "churn: {} slice writes, {} readings of `bpfproxy services` ({} distinct backend sets), {} requests: {} failed, {} misrouted; answers per backend {per_backend:?}",
        writes.len(),
        readings.len(),
        distinct.len(),
        requests.len(),
        failed.len(),
        misrouted.len()
    );
    ensure!(
        failed.is_empty(),
        "{} requests failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    ensure!(
        misrouted.is_empty(),
        "{} misrouted, e.g. {:?}",
        misrouted.len(),
        &misrouted[..misrouted.len().min(5)]
    );
    // The churn was seen: the agent served many different sets, and the churning pods
    // answered too.
    ensure!(
        distinct.len() >= 5,
        "the agent showed only {} backend sets",
        distinct.len()
    );
    ensure!(churning_hits > 0, "no request reached a churning backend");
    ensure!(
        requests.len() >= 100,
        "only {} requests in a minute",
        requests.len()
    );
    Ok(())
}
