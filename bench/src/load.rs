//! The end-to-end load: a small HTTP server in each backend pod and the client loops, the
//! same for every contender.
//!
//! The server has a few threads blocked in `accept` on one listener; each serves its
//! connection to the end. A request with `Connection: close` is answered and the server
//! closes (so the server, not the client, keeps the TIME_WAIT and client ports are free at
//! once); other requests are answered on the kept-alive connection.
//!
//! Clients are threads that entered the client pod's namespace. Every socket has timeouts,
//! every loop ends at a deadline and after a bounded number of iterations.

use std::{
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CloneFlags, CpuSet, sched_setaffinity, setns},
    sys::{
        socket::{setsockopt, sockopt},
        time::TimeVal,
    },
    unistd::Pid,
};
use testbed::NetNs;

use crate::figures::quantile;

/// How often blocked server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(100);
/// Bound on connecting and on each read or write of the client.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Iterations of one client thread, whatever the deadline.
const MAX_ITERATIONS: u64 = 2_000_000;

const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const REQUEST_KEEP: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const RESPONSE_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
const RESPONSE_KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// The CPU every client and server thread runs on: the last one. On one CPU a request's
/// round trip is CPU work (both threads, the softirqs, the datapath) rather than the wake-up
/// latency of an idle vCPU, and the connection rate is the rate one CPU sustains, so the
/// figures measure what each contender costs, while the other CPUs take the machine's
/// other work.
pub fn load_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from) - 1
}

/// Pins the calling thread to [`load_cpu`].
fn pin() -> Result<()> {
    let mut set = CpuSet::new();
    set.set(load_cpu()).context("CPU set")?;
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")?;
    Ok(())
}

/// Enters the network namespace at `ns_path` and pins the thread to the load CPU.
fn enter(ns_path: &Path) -> Result<()> {
    let file = File::open(ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
    pin()
}
/// A backend's HTTP server; stops and joins its threads on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Listens on 0.0.0.0:`port` in `ns` with `workers` threads.
    pub fn start(ns: &NetNs, port: u16, workers: usize) -> Result<Self> {
        let listener = ns
            .run(move || -> Result<TcpListener> {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                // accept() honours SO_RCVTIMEO: blocked threads wake up to look at `stop`.
                setsockopt(
                    &l,
                    sockopt::ReceiveTimeout,
                    &TimeVal::new(0, POLL.as_micros() as _),
                )?;
                Ok(l)
            })?
            .with_context(|| format!("listening on port {port} in {}", ns.name()))?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..workers {
            let (listener, stop) = (listener.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bench-srv-{i}"))
                    .spawn(move || {
                        if let Err(e) = pin() {
                            eprintln!("bench server: {e:#}");
                        }
                        serve(&listener, &stop)
                    })?,
            );
        }
        Ok(Server { stop, threads })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = serve_connection(stream, stop);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn serve_connection(mut stream: TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let mut idle = Instant::now();
    while !stop.load(Ordering::Relaxed) && idle.elapsed() < Duration::from_secs(10) {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let close = buf[..end].windows(17).any(|w| w == b"Connection: close");
            buf.drain(..end + 4);
            if close {
                stream.write_all(RESPONSE_CLOSE)?;
                return Ok(());
            }
            stream.write_all(RESPONSE_KEEP)?;
            continue;
        }
        if buf.len() > 8192 {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                idle = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Outcome of the connection-rate load.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateResult {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl RateResult {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One connection: connect, one request, read the answer to its end, close.
fn one_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(REQUEST_CLOSE)?;
    let mut got = [0u8; 128];
    let mut n = 0;
    loop {
        match s.read(&mut got[n..])? {
            0 => break,
            k => n += k,
        }
        if n == got.len() {
            break;
        }
    }
    if &got[..n] != RESPONSE_CLOSE {
        return Err(std::io::Error::other("unexpected answer"));
    }
    Ok(())
}

/// `threads` client threads in `ns`, each opening connections one after the other to the
/// `targets` in turn, until `duration` is over.
pub fn connection_rate(
    ns: &NetNs,
    targets: &[SocketAddrV4],
    threads: usize,
    duration: Duration,
) -> Result<RateResult> {
    let path = ns.path();
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<Result<RateResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let path = path.clone();
                s.spawn(move || -> Result<RateResult> {
                    enter(&path)?;
                    let mut r = RateResult::default();
                    let mut i = t;
                    while Instant::now() < deadline
                        && r.ok + r.errors < MAX_ITERATIONS
                        && !testbed::stop_requested()
                    {
                        let target = SocketAddr::V4(targets[i % targets.len()]);
                        i += 1;
                        match one_connection(target) {
                            Ok(()) => r.ok += 1,
                            Err(_) => {
                                r.errors += 1;
                                // A failing target must not turn this into a busy loop.
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    Ok(r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut total = RateResult {
        elapsed,
        ..RateResult::default()
    };
    for r in results {
        let r = r?;
        total.ok += r.ok;
        total.errors += r.errors;
    }
    if total.ok == 0 {
        bail!(
            "no connection to {targets:?} succeeded ({} errors)",
            total.errors
        );
    }
    Ok(total)
}

/// Outcome of the latency load: request round trips in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct LatencyResult {
    pub requests: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One kept-alive connection from `ns` to `target`; requests one after the other for
/// `duration` (after a short warm-up), each timed from write to the end of its answer.
pub fn request_latency(
    ns: &NetNs,
    target: SocketAddrV4,
    duration: Duration,
) -> Result<LatencyResult> {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<LatencyResult> {
            enter(&path)?;
            let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), IO_TIMEOUT)
                .with_context(|| format!("connecting to {target}"))?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.set_nodelay(true)?;
            let mut answer = [0u8; RESPONSE_KEEP.len()];
            let mut rtts = Vec::new();
            const WARM_UP: usize = 200;
            let mut deadline = None;
            let mut i = 0u64;
            while i < MAX_ITERATIONS && !testbed::stop_requested() {
                if rtts.len() == WARM_UP && deadline.is_none() {
                    rtts.clear();
                    deadline = Some(Instant::now() + duration);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                i += 1;
                let t = Instant::now();
                stream.write_all(REQUEST_KEEP)?;
                stream
                    .read_exact(&mut answer)
                    .context("reading an answer")?;
                rtts.push(t.elapsed().as_nanos() as f64 / 1e3);
                if answer != RESPONSE_KEEP {
                    bail!("unexpected answer {:?}", String::from_utf8_lossy(&answer));
                }
            }
            if rtts.is_empty() {
                bail!("no request answered");
            }
            rtts.sort_by(f64::total_cmp);
            Ok(LatencyResult {
                requests: rtts.len(),
                p50_us: quantile(&rtts, 0.50),
                p99_us: quantile(&rtts, 0.99),
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("latency client panicked")))
    })
}

/// Tries one connection to `target` from `ns` until it works or `timeout` passes.
pub fn wait_reachable(ns: &NetNs, target: SocketAddrV4, timeout: Duration) -> Result<()> {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<()> {
            enter(&path)?;
            let start = Instant::now();
            loop {
                match one_connection(SocketAddr::V4(target)) {
                    Ok(()) => return Ok(()),
                    Err(e) if start.elapsed() >= timeout || testbed::stop_requested() => {
                        bail!("{target} not reachable after {timeout:?}: {e}")
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
    })
}
