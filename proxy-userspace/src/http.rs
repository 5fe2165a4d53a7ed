//! A tiny HTTP/1.1 server for `/metrics`, `/healthz`, `/livez` and the health-check node
//! ports: GET (or HEAD) of a path,
//! one request per connection. Probes and scrapers need nothing more, and it keeps a web
//! framework out of the agent.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// An answer: status code, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// More header fields, written after the content type.
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The same answer with one more header field.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn not_found() -> Self {
        Response::new(404, "text/plain; charset=utf-8", "404 page not found\n")
    }
}

/// Answers a path (query string removed). `None`: 404. Runs on a blocking thread, so it
/// may read maps.
pub type Handler = Arc<dyn Fn(&str) -> Option<Response> + Send + Sync>;

/// Binds `addr`, naming `flag` in the error (the usual cause: kube-proxy or another agent
/// still holds the port).
pub async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("{flag} {addr}: cannot listen (is kube-proxy or another bpfproxy running?)")
    })
}

/// Serves `handler` on `listener` until the runtime ends, or until the returned task is
/// aborted (which closes the listener; requests being answered finish on their own).
pub fn serve(listener: TcpListener, handler: Handler) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                // Out of file descriptors, say: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, handler)).await;
            });
        }
    })
}

async fn answer(mut conn: tokio::net::TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request line and headers; a body, if any, is ignored.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let (method, path) = parse_request_line(&request);
    let response = match method {
        "GET" | "HEAD" => {
            let path = path.to_string();
            tokio::task::spawn_blocking(move || handler(&path))
                .await
                .ok()
                .flatten()
                .unwrap_or_else(Response::not_found)
        }
        _ => Response::new(405, "text/plain; charset=utf-8", "method not allowed\n"),
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\n",
        response.status,
        reason(response.status),
        response.content_type,
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n",
        response.body.len()
    ));
    conn.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        conn.write_all(response.body.as_bytes()).await?;
    }
    conn.shutdown().await
}

/// Method and path (without query string) of a request.
fn parse_request_line(request: &str) -> (&str, &str) {
    let line = request.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    (method, path)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_give_method_and_path() {
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("GET", "/metrics")
        );
        assert_eq!(
            parse_request_line("HEAD /livez HTTP/1.0\r\n"),
            ("HEAD", "/livez")
        );
        assert_eq!(parse_request_line(""), ("", ""));
    }

    #[tokio::test]
    async fn serves_a_path_and_refuses_others() {
        let listener = bind("--test-addr", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        serve(
            listener,
            Arc::new(|path| {
                (path == "/healthz").then(|| Response::new(503, "application/json", "{}"))
            }),
        );
        let get = |path: &'static str| async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            conn.read_to_string(&mut out).await.unwrap();
            out
        };
        let healthz = get("/healthz").await;
        assert!(
            healthz.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{healthz}"
        );
        assert!(healthz.contains("content-type: application/json\r\n"));
        assert!(healthz.ends_with("\r\n\r\n{}"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404 "));
    }
}
