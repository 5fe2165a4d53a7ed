//! The agent's HTTP endpoints as a scraper or a kubelet probe sees them: a GET from inside
//! the node namespace (where the agent listens), and the samples of a Prometheus text page.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// Where the agent serves `/metrics` by default (kube-proxy's address), in its namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:10249";
/// Where it serves `/healthz` and `/livez` by default (it binds 0.0.0.0:10256).
pub const HEALTHZ_ADDR: &str = "127.0.0.1:10256";

/// An HTTP answer: status code, headers (lower-case names) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from inside `ns` to `addr` (e.g. [`METRICS_ADDR`]), 5 s at most.
pub fn get(ns: &NetNs, addr: &str, path: &str) -> Result<HttpAnswer> {
    let target: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let shown = format!("GET http://{addr}{path}");
    let path = path.to_string();
    let raw = ns
        .run(move || -> std::io::Result<Vec<u8>> {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.set_write_timeout(Some(Duration::from_secs(5)))?;
            write!(
                conn,
                "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
            )?;
            let mut raw = Vec::new();
            conn.read_to_end(&mut raw)?;
            Ok(raw)
        })?
        .with_context(|| shown.clone())?;
    parse_answer(&String::from_utf8_lossy(&raw)).with_context(|| shown)
}

fn parse_answer(raw: &str) -> Result<HttpAnswer> {
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        bail!("no end of headers in {raw:?}");
    };
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpAnswer {
        status,
        headers,
        body: body.to_string(),
    })
}

/// The value of the sample `name{labels}` in a Prometheus text page: the sample whose
/// labels include every one of `labels` (others may be there too). `None` if absent.
pub fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, found) = match series.split_once('{') {
                Some((m, rest)) => (m, parse_labels(rest.strip_suffix('}')?)),
                None => (series, Vec::new()),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| found.iter().any(|(fk, fv)| fk == k && fv == v));
            if all { value.parse().ok() } else { None }
        })
}

/// `k="v",k2="v2"` (values without escaped quotes, as the agent's are).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some((value, tail)) = after.split_once('"') else {
            break;
        };
        out.push((key.trim_start_matches(',').to_string(), value.to_string()));
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let page = "# HELP x_total X.\n# TYPE x_total counter\n\
                    x_total{a=\"1\",b=\"two\"} 3\nx_total{a=\"2\",b=\"two\"} 4\ny 0.5\n";
        assert_eq!(sample(page, "x_total", &[("a", "2")]), Some(4.0));
        assert_eq!(
            sample(page, "x_total", &[("b", "two"), ("a", "1")]),
            Some(3.0)
        );
        assert_eq!(sample(page, "x_total", &[("a", "3")]), None);
        assert_eq!(sample(page, "y", &[]), Some(0.5));
        assert_eq!(sample(page, "x", &[]), None);
    }

    #[test]
    fn answers_are_split_into_status_headers_and_body() {
        let a = parse_answer(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.body, "{}");
    }
}
