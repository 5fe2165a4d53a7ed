//! Golden tests of the Kubernetes API source, in the shape of Cilium's
//! `pkg/loadbalancer/tests/testdata/*.txtar`: each file under `tests/golden/` is a story of
//! API objects in (YAML) and the services the kernel maps hold out (the table
//! `bpfproxy services` prints).
//!
//! The path is the agent's own: the test API server (real list/watch protocol over HTTP),
//! reached by the real kube client through a kubeconfig file; `KubeSource` (watchers and
//! reflector stores with kube-proxy's label selector); `desired_state_with` (node `golden-node`,
//! node addresses 192.168.100.1 and fd00:100::1); the planner; and
//! `KernelMaps::apply` into freshly loaded (unpinned) maps, read back with
//! `inspect::services`. Needs root (BPF maps) and the kernel object.
//!
//! File format: lines starting with `#` before the first section describe the case. Then
//! sections `-- NAME --`, run in order:
//!
//! - `apply`: YAML documents to create or replace (Service, EndpointSlice, Node).
//! - `delete`: one `Kind namespace/name` per line.
//! - `interrupt-watches`: every open watch ends; the client resumes from its version.
//! - `api-down` / `api-up`: the server closes every connection while down.
//! - `compact`: the server forgets its history: resuming watches get 410 Gone.
//! - `services`: waits until the client has seen everything applied so far, programs the
//!   maps, and compares `bpfproxy services` with the body.
//! - `lists`: the number of list requests so far of Services and EndpointSlices
//!   (`services: 1`), to tell a resumed watch from a relist.
//!
//! `BPFPROXY_UPDATE_GOLDEN=1` rewrites the `services` and `lists` bodies with what was
//! found (review the diff!).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bpfproxy::{
    agent::without_unsupported,
    datapath::{Datapath, LoadOptions, MapSizes},
    inspect,
    kube_source::{KubeOptions, KubeSource},
    model::{ModelOptions, desired_state_with},
    planner::{Capacity, plan},
};
use testbed::ApiServer;

fn object_path() -> Option<PathBuf> {
    std::env::var_os("BPFPROXY_EBPF_OBJ")
        .map(PathBuf::from)
        .or_else(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/proxy-ebpf");
            p.is_file().then_some(p)
        })
}

struct Section {
    name: String,
    body: String,
    /// Byte range of the body in the file, for rewriting.
    range: (usize, usize),
}

fn parse(text: &str) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if let Some(name) = trimmed
            .strip_prefix("-- ")
            .and_then(|r| r.strip_suffix(" --"))
        {
            if let Some(last) = sections.last_mut() {
                last.range.1 = offset;
            }
            sections.push(Section {
                name: name.trim().to_string(),
                body: String::new(),
                range: (offset + line.len(), offset + line.len()),
            });
        } else if let Some(last) = sections.last_mut() {
            last.body.push_str(line);
        }
        offset += line.len();
    }
    if let Some(last) = sections.last_mut() {
        last.range.1 = offset;
    }
    sections
}

/// Trailing spaces off every line, no trailing blank lines.
fn normalize(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim_end).collect();
    let mut out = lines.join("\n");
    while out.ends_with('\n') {
        out.pop();
    }
    out.trim_end().to_string()
}

const SYNC_NS: &str = "golden-sync";

/// Marker objects the model ignores (a headless Service and its slice), bumped before
/// every check: once the client holds step `n` of both, it has seen everything before
/// (a watch delivers one resource's events in order).
fn sync_markers(step: usize) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: sync, namespace: {SYNC_NS}, annotations: {{step: '{step}'}}}}
spec: {{clusterIP: None, ports: [{{port: 1}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sync
  namespace: {SYNC_NS}
  labels: {{kubernetes.io/service-name: sync}}
  annotations: {{step: '{step}'}}
addressType: IPv4
endpoints: []
"
    )
}

fn marker_seen(source: &KubeSource, step: usize) -> bool {
    let step = step.to_string();
    let is_marker = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.namespace.as_deref() == Some(SYNC_NS)
            && meta
                .annotations
                .as_ref()
                .and_then(|a| a.get("step"))
                .is_some_and(|s| *s == step)
    };
    if !source.ready() {
        return false;
    }
    let (services, slices) = source.objects();
    services.iter().any(|s| is_marker(&s.metadata)) && slices.iter().any(|s| is_marker(&s.metadata))
}

/// Runs one golden file; returns the mismatches (empty when it passes) and the file with
/// its expectations replaced by what was found.
fn run_file(path: &Path) -> Result<(Vec<String>, String)> {
    let text = std::fs::read_to_string(path)?;
    let sections = parse(&text);
    if sections.is_empty() {
        bail!("{}: no sections", path.display());
    }
    let server = ApiServer::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let options = KubeOptions {
        kubeconfig: Some(server.kubeconfig().to_path_buf()),
        node_name: "golden-node".into(),
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let source = runtime.block_on(KubeSource::start(&options, tx))?;

    let sizes = MapSizes {
        services: 256,
        backend_slots: 1024,
        conntrack: 1024,
    };
    let mut dp = Datapath::load(&LoadOptions {
        object: object_path(),
        pin_dir: None,
        sizes,
    })
    .context("loading the datapath (root? `cargo xtask build-ebpf`?)")?;
    let mut state = dp.maps.read_state()?;
    let capacity = Capacity {
        services: sizes.services,
        backend_slots: sizes.backend_slots,
    };

    let mut failures = Vec::new();
    let mut rewritten = String::new();
    let mut copied = 0;
    let mut step = 0;
    for section in &sections {
        let context = format!("{}: section `{}`", path.display(), section.name);
        let mut found = None;
        match section.name.as_str() {
            "apply" => {
                server
                    .apply_yaml(&section.body)
                    .with_context(|| context.clone())?;
            }
            "delete" => {
                for line in section
                    .body
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                {
                    let (kind, object) = line
                        .split_once(' ')
                        .with_context(|| format!("{context}: `Kind ns/name` expected"))?;
                    let (ns, name) = object.split_once('/').unwrap_or(("", object));
                    server
                        .delete(kind, ns, name)
                        .with_context(|| context.clone())?;
                }
            }
            "interrupt-watches" => server.interrupt_watches(),
            "api-down" => server.set_available(false),
            "api-up" => server.set_available(true),
            "compact" => server.compact(),
            "services" => {
                step += 1;
                server.apply_yaml(&sync_markers(step))?;
                let start = Instant::now();
                while !marker_seen(&source, step) {
                    if start.elapsed() > Duration::from_secs(30) {
                        bail!("{context}: the client did not catch up with the server");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let (services, slices) = source.objects();
                // This node's name and one node address per family, so local endpoints
                // and NodePorts show too.
                let options = ModelOptions {
                    node_name: Some("golden-node".into()),
                    node_addresses: vec![
                        std::net::Ipv4Addr::new(192, 168, 100, 1).into(),
                        "fd00:100::1".parse().unwrap(),
                    ],
                    ..Default::default()
                };
                let (desired, _issues) = desired_state_with(&services, &slices, &options);
                let desired = without_unsupported(desired, &mut Default::default());
                let (plan, refused) = plan(&desired, &state, capacity);
                assert!(refused.is_empty(), "{context}: {refused:?}");
                let report = dp.maps.apply(&plan, &mut state);
                assert!(report.failed.is_empty(), "{context}: {:?}", report.failed);
                let rows = inspect::services(&dp.maps)?;
                found = Some(inspect::services_table(&rows));
            }
            "lists" => {
                let counts = server.counts();
                let mut out = String::new();
                // The Node watch is not synced by the markers: left out.
                for (resource, n) in counts.lists.iter().filter(|(r, _)| *r != "nodes") {
                    let _ = writeln!(out, "{resource}: {n}");
                }
                found = Some(out);
            }
            other => bail!("{context}: unknown section {other:?}"),
        }
        if let Some(found) = found {
            if normalize(&found) != normalize(&section.body) {
                failures.push(format!(
                    "{context} (step {step}):\n--- expected ---\n{}\n--- found ---\n{}\n",
                    normalize(&section.body),
                    normalize(&found)
                ));
            }
            rewritten.push_str(&text[copied..section.range.0]);
            rewritten.push_str(&normalize(&found));
            rewritten.push('\n');
            // Keep one blank line before the next section if there was one.
            if text[section.range.0..section.range.1].ends_with("\n\n") {
                rewritten.push('\n');
            }
            copied = section.range.1;
        }
    }
    rewritten.push_str(&text[copied..]);
    drop(source);
    runtime.shutdown_background();
    Ok((failures, rewritten))
}

#[test]
fn golden_files() {
    testbed::require_root().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txtar"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    let update = std::env::var_os("BPFPROXY_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for file in &files {
        eprintln!("golden: {}", file.display());
        let (mismatches, rewritten) = run_file(file).unwrap_or_else(|e| panic!("{e:#}"));
        if update && !mismatches.is_empty() {
            std::fs::write(file, rewritten).unwrap();
            eprintln!("golden: rewrote {}", file.display());
        } else {
            failures.extend(mismatches);
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatch(es):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
