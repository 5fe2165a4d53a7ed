//! Client side: connect, HTTP GET and UDP requests from inside a pod's namespace.
//!
//! Sockets are made by a thread that entered the namespace and then used from the calling
//! thread (a socket stays in the namespace it was made in). Every socket has timeouts.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::NetNs;

/// Default bound on connecting and on each read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// How a TCP connection attempt ended. `Refused` is a RST (ECONNREFUSED); `TimedOut` means
/// nothing came back; `Unreachable` is an ICMP host/net unreachable.
#[derive(Debug)]
pub enum ConnectOutcome {
    Connected(TcpStream, Duration),
    Refused(Duration),
    TimedOut(Duration),
    Unreachable(Duration),
    Failed(std::io::Error, Duration),
}

impl ConnectOutcome {
    pub fn elapsed(&self) -> Duration {
        match self {
            ConnectOutcome::Connected(_, d)
            | ConnectOutcome::Refused(d)
            | ConnectOutcome::TimedOut(d)
            | ConnectOutcome::Unreachable(d)
            | ConnectOutcome::Failed(_, d) => *d,
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self, ConnectOutcome::Connected(..))
    }
}

/// The unspecified address of `addr`'s family, to bind a client socket to.
fn unspecified_like(addr: &SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Connects from `ns` to `addr:port` (either family), waiting at most `timeout`.
/// Only harness problems (e.g. the namespace is gone) are errors; how the attempt ended is
/// in the outcome.
pub fn connect(
    ns: &NetNs,
    addr: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<ConnectOutcome> {
    let target = SocketAddr::new(addr.into(), port);
    ns.run(move || {
        let start = Instant::now();
        let res = TcpStream::connect_timeout(&target, timeout);
        let elapsed = start.elapsed();
        match res {
            Ok(s) => ConnectOutcome::Connected(s, elapsed),
            Err(e) => classify_connect_error(e, elapsed),
        }
    })
}

fn classify_connect_error(e: std::io::Error, elapsed: Duration) -> ConnectOutcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => ConnectOutcome::Refused(elapsed),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ConnectOutcome::TimedOut(elapsed),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
            ConnectOutcome::Unreachable(elapsed)
        }
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => {
                ConnectOutcome::Unreachable(elapsed)
            }
            _ => ConnectOutcome::Failed(e, elapsed),
        },
    }
}

/// One `GET /` from `ns` to `addr:port` on a new connection; returns the body (a backend
/// answers with its name). Closes the connection.
pub fn http_get(ns: &NetNs, addr: impl Into<IpAddr>, port: u16) -> Result<String> {
    let mut conn = HttpConnection::open(ns, addr, port)?;
    conn.get()
}

/// A kept-alive HTTP connection: several requests over one TCP connection.
pub struct HttpConnection {
    stream: TcpStream,
    /// Bytes read past the last response.
    pending: Vec<u8>,
    peer: SocketAddr,
}

impl HttpConnection {
    pub fn open(ns: &NetNs, addr: impl Into<IpAddr>, port: u16) -> Result<Self> {
        let addr: IpAddr = addr.into();
        let peer = SocketAddr::new(addr, port);
        let stream = match connect(ns, addr, port, IO_TIMEOUT)? {
            ConnectOutcome::Connected(s, _) => s,
            other => bail!("connecting from {} to {peer}: {other:?}", ns.name()),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            stream,
            pending: Vec::new(),
            peer,
        })
    }

    /// The client's own address and port, as conntrack lists the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Sends `GET /` and returns the body of the `200 OK` answer.
    pub fn get(&mut self) -> Result<String> {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: bpfproxy-testbed\r\n\r\n",
            self.peer
        );
        self.stream
            .write_all(request.as_bytes())
            .with_context(|| format!("sending request to {}", self.peer))?;
        self.read_response()
            .with_context(|| format!("reading answer from {}", self.peer))
    }

    fn read_response(&mut self) -> Result<String> {
        let deadline = Instant::now() + IO_TIMEOUT * 2;
        let head_end = loop {
            if let Some(pos) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            self.fill(deadline)?;
        };
        let head = String::from_utf8_lossy(&self.pending[..head_end]).into_owned();
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
            bail!("unexpected status line {status:?}");
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| anyhow!("answer has no Content-Length: {head:?}"))?;
        let body_start = head_end + 4;
        while self.pending.len() < body_start + length {
            self.fill(deadline)?;
        }
        let body =
            String::from_utf8_lossy(&self.pending[body_start..body_start + length]).into_owned();
        self.pending.drain(..body_start + length);
        Ok(body)
    }

    fn fill(&mut self, deadline: Instant) -> Result<()> {
        if Instant::now() >= deadline {
            bail!("no complete answer within {:?}", IO_TIMEOUT * 2);
        }
        let mut chunk = [0u8; 2048];
        match self.stream.read(&mut chunk)? {
            0 => bail!("connection closed by peer"),
            n => {
                self.pending.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }
}

/// How a UDP exchange ended.
#[derive(Debug)]
pub enum UdpOutcome {
    /// An answer and where it came from.
    Reply {
        body: String,
        from: SocketAddr,
    },
    /// ICMP (or ICMPv6) port unreachable came back (ECONNREFUSED on the connected socket).
    Refused(Duration),
    TimedOut(Duration),
    Failed(std::io::Error, Duration),
}

/// Sends one datagram from `ns` to `addr:port` on a *connected* UDP socket and waits at
/// most `timeout` for the answer. A connected socket reports ICMP errors as ECONNREFUSED
/// and only accepts answers from `addr:port` itself.
pub fn udp_exchange(
    ns: &NetNs,
    addr: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<UdpOutcome> {
    let target = SocketAddr::new(addr.into(), port);
    let socket = ns
        .run(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind((unspecified_like(&target), 0))?;
            s.connect(target)?;
            Ok(s)
        })?
        .context("making a UDP socket")?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    let start = Instant::now();
    if let Err(e) = socket.send(b"who are you?\n") {
        return Ok(match e.kind() {
            ErrorKind::ConnectionRefused => UdpOutcome::Refused(start.elapsed()),
            _ => UdpOutcome::Failed(e, start.elapsed()),
        });
    }
    let mut buf = [0u8; 1500];
    let res = socket.recv(&mut buf);
    let elapsed = start.elapsed();
    Ok(match res {
        Ok(n) => UdpOutcome::Reply {
            body: String::from_utf8_lossy(&buf[..n]).into_owned(),
            from: socket.peer_addr()?,
        },
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => UdpOutcome::Refused(elapsed),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            UdpOutcome::TimedOut(elapsed)
        }
        Err(e) => UdpOutcome::Failed(e, elapsed),
    })
}

/// One UDP request from `ns` to `addr:port` on an *unconnected* socket: returns the answer,
/// and fails if it came from any address other than `addr:port` (so a reply that was not
/// translated back to the service address is caught).
pub fn udp_request(ns: &NetNs, addr: impl Into<IpAddr>, port: u16) -> Result<String> {
    let target = SocketAddr::new(addr.into(), port);
    let socket = ns
        .run(|| UdpSocket::bind((unspecified_like(&target), 0)))?
        .context("making a UDP socket")?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    socket.send_to(b"who are you?\n", target)?;
    let mut buf = [0u8; 1500];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("waiting for a UDP answer from {target}"))?;
    let body = String::from_utf8_lossy(&buf[..n]).into_owned();
    if from != target {
        bail!("UDP answer {body:?} came from {from}, not from {target}");
    }
    Ok(body)
}

/// How a question to a [`crate::servers::PeerServer`] ended: its answer (`<name>
/// <peer ip>:<peer port>`, `<name> [<peer ip6>]:<peer port>` for IPv6) and the address it
/// came from, or why there was none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Asked {
    Answer {
        text: String,
        from: SocketAddr,
    },
    /// A TCP RST or an ICMP port unreachable.
    Refused,
    /// Nothing came back in time.
    TimedOut,
    /// An ICMP host or network unreachable.
    Unreachable,
    Failed(String),
}

impl Asked {
    /// The answer, split into the backend's name and the IPv4 peer address it saw (`None`
    /// for an IPv6 peer: see [`Asked::reply`]).
    pub fn answer(&self) -> Option<(String, SocketAddrV4)> {
        match self.reply()? {
            (name, SocketAddr::V4(peer)) => Some((name, peer)),
            (_, SocketAddr::V6(_)) => None,
        }
    }

    /// The answer, split into the backend's name and the peer address it saw, of either
    /// family.
    pub fn reply(&self) -> Option<(String, SocketAddr)> {
        let Asked::Answer { text, .. } = self else {
            return None;
        };
        let (name, peer) = text.trim().split_once(' ')?;
        Some((name.to_owned(), peer.parse().ok()?))
    }

    /// Where the answer came from (the address the client's socket saw), if any.
    pub fn from(&self) -> Option<SocketAddr> {
        match self {
            Asked::Answer { from, .. } => Some(*from),
            _ => None,
        }
    }

    /// One line, as the `testbed-probe` binary prints it and [`Asked::parse`] reads it.
    pub fn to_line(&self) -> String {
        match self {
            Asked::Answer { text, from } => format!("answer {from} {}", text.trim()),
            Asked::Refused => "refused".into(),
            Asked::TimedOut => "timeout".into(),
            Asked::Unreachable => "unreachable".into(),
            Asked::Failed(e) => format!("failed {}", e.replace('\n', " ")),
        }
    }

    /// Reads a line written by [`Asked::to_line`].
    pub fn parse(line: &str) -> Result<Asked> {
        let line = line.trim();
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        Ok(match word {
            "answer" => {
                let (from, text) = rest.split_once(' ').unwrap_or((rest, ""));
                Asked::Answer {
                    text: text.to_owned(),
                    from: from
                        .parse()
                        .with_context(|| format!("address in {line:?}"))?,
                }
            }
            "refused" => Asked::Refused,
            "timeout" => Asked::TimedOut,
            "unreachable" => Asked::Unreachable,
            "failed" => Asked::Failed(rest.to_owned()),
            _ => bail!("not a probe line: {line:?}"),
        })
    }
}

/// Asks over TCP from `ns`: connects to `addr:port` (at most `timeout`), sends a line and
/// reads the answer until the server closes.
pub fn ask_tcp(ns: &NetNs, addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> Result<Asked> {
    let addr = addr.into();
    ns.run(move || ask_tcp_here(addr, port, timeout))
}

/// Asks over UDP from `ns` (one datagram on an unconnected socket, waiting at most
/// `timeout`); the answer carries the address it came from.
pub fn ask_udp(ns: &NetNs, addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> Result<Asked> {
    let addr = addr.into();
    ns.run(move || ask_udp_here(addr, port, timeout))
}

/// [`ask_tcp`] from the calling thread's own namespace.
pub fn ask_tcp_here(addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> Asked {
    let target = SocketAddr::new(addr.into(), port);
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => {
            return match classify_connect_error(e, Duration::ZERO) {
                ConnectOutcome::Refused(_) => Asked::Refused,
                ConnectOutcome::TimedOut(_) => Asked::TimedOut,
                ConnectOutcome::Unreachable(_) => Asked::Unreachable,
                other => Asked::Failed(format!("{other:?}")),
            };
        }
    };
    let mut exchange = || -> std::io::Result<String> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let from = stream.peer_addr()?;
        stream.write_all(b"who are you?\n")?;
        let mut text = String::new();
        // Bounded: the server closes after one answer, and each read times out.
        let mut chunk = [0u8; 512];
        while text.len() < 4096 {
            match stream.read(&mut chunk)? {
                0 => break,
                n => text.push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
        Ok(format!("{from} {text}"))
    };
    match exchange() {
        Ok(s) => {
            let (from, text) = s.split_once(' ').unwrap_or_default();
            Asked::Answer {
                text: text.trim().to_owned(),
                from: from.parse().expect("formatted above"),
            }
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Asked::TimedOut
        }
        Err(e) => Asked::Failed(format!("after connecting to {target}: {e}")),
    }
}

/// [`ask_udp`] from the calling thread's own namespace.
pub fn ask_udp_here(addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> Asked {
    let target = SocketAddr::new(addr.into(), port);
    let exchange = || -> std::io::Result<(String, SocketAddr)> {
        let socket = UdpSocket::bind((unspecified_like(&target), 0))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.set_write_timeout(Some(IO_TIMEOUT))?;
        socket.send_to(b"who are you?\n", target)?;
        let mut buf = [0u8; 1500];
        let (n, from) = socket.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
    };
    match exchange() {
        Ok((text, from)) => Asked::Answer { text, from },
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Asked::TimedOut
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Asked::Refused,
        Err(e) => Asked::Failed(format!("UDP to {target}: {e}")),
    }
}

/// An HTTP answer of any status, read whole.
#[derive(Clone, Debug)]
pub struct HttpAnswer {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `ns` to `addr:port` with `Connection: close`, reading the answer to
/// its end (at most a few seconds), whatever its status.
pub fn http_get_any(
    ns: &NetNs,
    addr: impl Into<IpAddr>,
    port: u16,
    path: &str,
) -> Result<HttpAnswer> {
    let addr: IpAddr = addr.into();
    let target = SocketAddr::new(addr, port);
    let mut stream = match connect(ns, addr, port, IO_TIMEOUT)? {
        ConnectOutcome::Connected(s, _) => s,
        other => bail!("connecting from {} to {target}: {other:?}", ns.name()),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 2048];
    // Bounded: each read times out and the answer is small.
    while raw.len() < 64 * 1024 {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e).with_context(|| format!("reading the answer of {target}")),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no complete head in {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    })
}
