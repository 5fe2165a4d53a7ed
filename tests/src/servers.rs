//! Backend servers: threads inside a pod's namespace that answer with the pod's name.
//!
//! [`HttpServer`] answers every HTTP request on a connection (keep-alive) with
//! `200 OK` and the name as body; [`UdpServer`] answers every datagram with the name.
//! [`EchoServer`] sends every byte back (for streams checked byte by byte). All stop, and
//! join their threads, when the guard drops.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::NetNs;

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A connection with no request for this long is closed by the server.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Largest request head the server accepts.
const MAX_REQUEST: usize = 16 * 1024;

/// An HTTP server in a namespace; stops on drop.
pub struct HttpServer {
    pub name: String,
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on 0.0.0.0:`port` inside `ns`; every answer's body is `name`.
    pub fn start(ns: &NetNs, name: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let listener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("binding TCP port {port} in {}", ns.name()))?;
        let addr = listener.local_addr()?;
        let thread = {
            let (stop, requests, name) = (stop.clone(), requests.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!("http-{name}"))
                .spawn(move || {
                    let (own, stop2) = (name.clone(), stop.clone());
                    accept_loop(listener, &format!("http server {name}"), &stop, move |c| {
                        serve_connection(c, &own, &stop2, &requests)
                    })
                })?
        };
        Ok(HttpServer {
            name: name.to_owned(),
            addr,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections until `stop`, serving each on its own thread with `serve`, and
/// joins those threads at the end. `what` names the server in messages.
fn accept_loop<F>(listener: TcpListener, what: &str, stop: &AtomicBool, serve: F)
where
    F: Fn(TcpStream) -> std::io::Result<()> + Clone + Send + 'static,
{
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (serve, own) = (serve.clone(), what.to_owned());
                match std::thread::Builder::new()
                    .name(format!("{what}-conn"))
                    .spawn(move || {
                        if let Err(e) = serve(stream) {
                            eprintln!("testbed: {own}: {e}");
                        }
                    }) {
                    Ok(t) => conns.push(t),
                    Err(e) => eprintln!("testbed: {what}: spawning: {e}"),
                }
                conns.retain(|t| !t.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                eprintln!("testbed: {what}: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

fn serve_connection(
    mut stream: TcpStream,
    name: &str,
    stop: &AtomicBool,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL * 5))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 2048];
    let mut last_activity = Instant::now();
    while !stop.load(Ordering::SeqCst) && last_activity.elapsed() < IDLE_LIMIT {
        // Answer every complete request head in the buffer (pipelining is fine).
        while let Some(end) = find_head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let close = head.contains("connection: close");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
                name.len(),
                if close { "Connection: close\r\n" } else { "" },
                name
            );
            // Counted before answering, so a client that has its answer sees the count.
            requests.fetch_add(1, Ordering::Relaxed);
            stream.write_all(response.as_bytes())?;
            if close {
                return Ok(());
            }
        }
        if buf.len() > MAX_REQUEST {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                last_activity = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// A UDP server in a namespace that answers each datagram with its name; stops on drop.
pub struct UdpServer {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    /// Listens on 0.0.0.0:`port` inside `ns`.
    pub fn start(ns: &NetNs, name: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = ns
            .run(move || -> std::io::Result<UdpSocket> {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                s.set_read_timeout(Some(POLL * 5))?;
                s.set_write_timeout(Some(Duration::from_secs(1)))?;
                Ok(s)
            })?
            .with_context(|| format!("binding UDP port {port} in {}", ns.name()))?;
        let addr = socket.local_addr()?;
        let thread = {
            let (stop, name) = (stop.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || {
                    let mut buf = [0u8; 1500];
                    while !stop.load(Ordering::SeqCst) {
                        match socket.recv_from(&mut buf) {
                            Ok((_, peer)) => {
                                if let Err(e) = socket.send_to(name.as_bytes(), peer) {
                                    eprintln!("testbed: udp server {name}: send: {e}");
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(e) => {
                                eprintln!("testbed: udp server {name}: recv: {e}");
                                std::thread::sleep(POLL);
                            }
                        }
                    }
                })?
        };
        Ok(UdpServer {
            name: name.to_owned(),
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server that tells each client who answered and whom it saw: on TCP and UDP on the
/// same port, over IPv4 and IPv6, every request (a line on a TCP connection, or a
/// datagram) is answered with `<name> <peer ip>:<peer port>` (`<name> [<peer ip6>]:<peer
/// port>` over IPv6), the peer address as the backend's socket reports it (so a test sees
/// whether the client's address was kept or source-NAT-ed). The IPv6 sockets are IPv6-only,
/// so an IPv4 peer is never reported as `::ffff:a.b.c.d`. A TCP connection is closed after
/// its answer. Stops on drop.
pub struct PeerServer {
    pub name: String,
    pub port: u16,
    /// Requests answered so far (TCP and UDP, both families).
    answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PeerServer {
    /// Listens on 0.0.0.0:`port` and [::]:`port`, TCP and UDP, inside `ns`. Where the
    /// kernel has no IPv6 at all, IPv4 only.
    pub fn start(ns: &NetNs, name: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        type Sockets = (Vec<TcpListener>, Vec<UdpSocket>);
        let (listeners, sockets) = ns
            .run(move || -> std::io::Result<Sockets> {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                let (mut listeners, mut sockets) = (vec![l], vec![s]);
                match ipv6_only_sockets(port) {
                    Ok((l6, s6)) => {
                        listeners.push(l6);
                        sockets.push(s6);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                    Err(e) => return Err(e),
                }
                for l in &listeners {
                    l.set_nonblocking(true)?;
                }
                for s in &sockets {
                    s.set_read_timeout(Some(POLL * 5))?;
                    s.set_write_timeout(Some(Duration::from_secs(1)))?;
                }
                Ok((listeners, sockets))
            })?
            .with_context(|| format!("binding TCP and UDP port {port} in {}", ns.name()))?;
        let mut threads = Vec::new();
        for listener in listeners {
            let (stop, answered, name) = (stop.clone(), answered.clone(), name.to_owned());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("peer-tcp-{name}"))
                    .spawn(move || {
                        let what = format!("peer server {name}");
                        accept_loop(listener, &what, &stop, move |c| {
                            answer_peer(c, &name, &answered)
                        })
                    })?,
            );
        }
        for socket in sockets {
            let (stop, answered, name) = (stop.clone(), answered.clone(), name.to_owned());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("peer-udp-{name}"))
                    .spawn(move || answer_datagrams(&socket, &name, &stop, &answered))?,
            );
        }
        Ok(PeerServer {
            name: name.to_owned(),
            port,
            answered,
            stop,
            threads,
        })
    }

    /// Requests answered so far, TCP and UDP.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP listener and a UDP socket on [::]:`port` with IPV6_V6ONLY set, so that they share
/// the port with the IPv4 sockets instead of taking IPv4 too (v4-mapped).
fn ipv6_only_sockets(port: u16) -> std::io::Result<(TcpListener, UdpSocket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    let tcp = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_only_v6(true)?;
    tcp.set_reuse_address(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(128)?;
    let udp = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_only_v6(true)?;
    udp.bind(&addr.into())?;
    Ok((tcp.into(), udp.into()))
}

/// Answers every datagram on `socket` with `<name> <peer>` until `stop`.
fn answer_datagrams(socket: &UdpSocket, name: &str, stop: &AtomicBool, answered: &AtomicU64) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                answered.fetch_add(1, Ordering::Relaxed);
                let answer = format!("{name} {peer}");
                if let Err(e) = socket.send_to(answer.as_bytes(), peer) {
                    eprintln!("testbed: peer server {name}: send: {e}");
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("testbed: peer server {name}: recv: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Reads one line (at most a few seconds), answers `<name> <peer>` and closes.
fn answer_peer(mut stream: TcpStream, name: &str, answered: &AtomicU64) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < MAX_REQUEST {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    answered.fetch_add(1, Ordering::Relaxed);
    stream.write_all(format!("{name} {peer}\n").as_bytes())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// A TCP echo server in a namespace: every connection gets back each byte it sends, in
/// order, and is closed after the client closes its side. Stops on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    /// Bytes echoed so far, over all connections.
    echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on 0.0.0.0:`port` inside `ns`.
    pub fn start(ns: &NetNs, port: u16) -> Result<Self> {
        Self::start_on(ns, Ipv4Addr::UNSPECIFIED.into(), port)
    }

    /// Listens on `ip`:`port` inside `ns` (`::` for IPv6 peers).
    pub fn start_on(ns: &NetNs, ip: std::net::IpAddr, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let listener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let l = TcpListener::bind((ip, port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("binding TCP port {port} in {}", ns.name()))?;
        let addr = listener.local_addr()?;
        let thread = {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            std::thread::Builder::new()
                .name(format!("echo-{port}"))
                .spawn(move || {
                    let stop2 = stop.clone();
                    accept_loop(listener, "echo server", &stop, move |c| {
                        echo(c, &stop2, &echoed)
                    })
                })?
        };
        Ok(EchoServer {
            addr,
            echoed,
            stop,
            thread: Some(thread),
        })
    }

    /// Bytes echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(mut stream: TcpStream, stop: &AtomicBool, echoed: &AtomicU64) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL * 5))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut chunk = [0u8; 16 * 1024];
    let mut last_activity = Instant::now();
    while !stop.load(Ordering::SeqCst) && last_activity.elapsed() < IDLE_LIMIT {
        match stream.read(&mut chunk) {
            Ok(0) => {
                // The client is done: close our side so it reads EOF after the last byte.
                let _ = stream.shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Ok(n) => {
                stream.write_all(&chunk[..n])?;
                echoed.fetch_add(n as u64, Ordering::Relaxed);
                last_activity = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A TCP server for thousands of concurrent connections (the [`HttpServer`]'s thread per
/// connection does not scale that far): every line received is answered with
/// `<name> <line>`, and a connection stays open until the peer closes it. One tokio
/// runtime thread per server; counts accepted and open connections; stops on drop.
pub struct LineServer {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Listen backlog of a [`LineServer`]: a burst of connections queues instead of having its
/// SYNs dropped (and retried a second later).
const LINE_BACKLOG: i32 = 4096;

impl LineServer {
    /// Listens on 0.0.0.0:`port` inside `ns`.
    pub fn start(ns: &NetNs, name: &str, port: u16) -> Result<Self> {
        Self::start_at(&ns.path(), name, port)
    }

    /// Listens on 0.0.0.0:`port` inside the namespace whose handle is `ns_path` (e.g.
    /// `/run/netns/<name>`), for a process that did not make the namespace.
    pub fn start_at(ns_path: &std::path::Path, name: &str, port: u16) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let ns_file = std::fs::File::open(ns_path)
            .with_context(|| format!("opening {}", ns_path.display()))?;
        let listener = std::thread::scope(|s| {
            s.spawn(move || -> Result<std::io::Result<TcpListener>> {
                nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("setns")?;
                Ok((|| -> std::io::Result<TcpListener> {
                    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                    // std listens with a small backlog; listening again raises it.
                    // SAFETY: a valid socket descriptor owned by `l`.
                    if unsafe { libc::listen(l.as_raw_fd(), LINE_BACKLOG) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    l.set_nonblocking(true)?;
                    Ok(l)
                })())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("binding thread panicked"))?
        })?
        .with_context(|| format!("binding TCP port {port} in {}", ns_path.display()))?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the server's runtime")?;
        let thread = {
            let (accepted, open, name) = (accepted.clone(), open.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!("line-{name}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => return eprintln!("testbed: line server {name}: {e}"),
                        };
                        tokio::select! {
                            _ = stop_rx => {}
                            () = line_accept_loop(listener, name, accepted, open) => {}
                        }
                    });
                    // Dropping the runtime closes every connection still open.
                })?
        };
        Ok(LineServer {
            name: name.to_owned(),
            addr,
            accepted,
            open,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted, not yet closed by the peer).
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn line_accept_loop(
    listener: tokio::net::TcpListener,
    name: String,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let (name, open) = (name.clone(), open.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_lines(stream, &name).await {
                        eprintln!("testbed: line server {name}: {e}");
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) => {
                // EMFILE and the like: say so, and go on after a pause.
                eprintln!("testbed: line server {name}: accept: {e}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

async fn serve_lines(stream: tokio::net::TcpStream, name: &str) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        match tokio::time::timeout(IDLE_LIMIT, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                write
                    .write_all(format!("{name} {line}\n").as_bytes())
                    .await?
            }
            // The peer closed (or reset) the connection, or left it idle too long.
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// [`LineServer`]s for several pods in a child process (the `testbed-line-servers` binary
/// of this package), so that their sockets do not count against the open-file limit of
/// the test process, which holds the client side. Ends the child on drop.
pub struct LineServerProcess {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl LineServerProcess {
    /// Starts `bin` (`env!("CARGO_BIN_EXE_testbed-line-servers")` in a test) with a
    /// server on `port` in each of `pods`, and waits until they all listen.
    pub fn spawn(bin: &std::path::Path, port: u16, pods: &[&crate::Pod]) -> Result<Self> {
        use std::{io::BufRead, process::Stdio};
        let mut cmd = std::process::Command::new(bin);
        cmd.arg(port.to_string());
        for p in pods {
            cmd.arg(format!("{}={}", p.ns.path().display(), p.name));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take();
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let mut me = LineServerProcess {
            child,
            stdin,
            stdout,
        };
        if line.trim() != "ready" {
            let status = me.child.wait()?;
            anyhow::bail!("{} did not start ({status}): {line:?}", bin.display());
        }
        Ok(me)
    }

    /// Pod name -> (connections accepted, connections open).
    pub fn counts(&mut self) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
        use std::io::BufRead;
        let stdin = self.stdin.as_mut().context("stopped")?;
        stdin.write_all(b"counts\n")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let raw: std::collections::BTreeMap<String, [u64; 2]> =
            serde_json::from_str(&line).with_context(|| format!("counts {line:?}"))?;
        Ok(raw.into_iter().map(|(k, [a, o])| (k, (a, o))).collect())
    }
}

impl Drop for LineServerProcess {
    fn drop(&mut self) {
        // Closing stdin ends the child; kill it if it has not gone after a while.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
