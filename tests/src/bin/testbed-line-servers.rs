//! `testbed-line-servers PORT NETNS_PATH=NAME...`: a [`LineServer`] on PORT in each
//! namespace, in a process of its own so that thousands of server-side sockets do not
//! count against the open-file limit of the test that connects to them. Prints `ready`
//! once every server listens; answers each `counts` line on stdin with one JSON line
//! `{"NAME": [accepted, open], ...}`; exits, closing every connection, when stdin closes.
//! Spawned by `testbed::servers::LineServerProcess`.

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    path::Path,
};

use anyhow::{Context, Result};
use testbed::LineServer;

fn main() -> Result<()> {
    testbed::raise_nofile_to_hard().context("raising RLIMIT_NOFILE")?;
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .context("usage: testbed-line-servers PORT NETNS_PATH=NAME...")?
        .parse()
        .context("PORT")?;
    let servers: Vec<LineServer> = args
        .map(|a| {
            let (path, name) = a
                .split_once('=')
                .with_context(|| format!("{a:?} is not NETNS_PATH=NAME"))?;
            LineServer::start_at(Path::new(path), name, port)
        })
        .collect::<Result<_>>()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() == "counts" {
            let counts: BTreeMap<&str, [u64; 2]> = servers
                .iter()
                .map(|s| (s.name.as_str(), [s.accepted(), s.open()]))
                .collect();
            writeln!(out, "{}", serde_json::to_string(&counts)?)?;
            out.flush()?;
        }
    }
    Ok(())
}
