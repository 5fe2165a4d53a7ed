//! The manifests in `deploy/` decode as the Kubernetes types they claim to be and give the
//! agent what it needs: list/watch on Services, EndpointSlices and Nodes, host network,
//! its capabilities, /sys/fs/bpf from the host, the node name, and a liveness probe on the
//! health endpoint it is told to serve.

use std::path::Path;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;

fn documents(file: &str) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn one<T: DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn rbac_grants_list_and_watch_on_what_the_agent_watches() {
    let docs = documents("rbac.yaml");
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    let role: ClusterRole = one(&docs, "ClusterRole");
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    let allows = |group: &str, resource: &str, verb: &str| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["list", "watch"] {
            assert!(allows(group, resource, verb), "{verb} {group}/{resource}");
        }
    }
    // Read-only.
    for rule in role.rules.iter().flatten() {
        for verb in &rule.verbs {
            assert!(verb == "list" || verb == "watch", "verb {verb}");
        }
    }
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn the_daemonset_runs_the_agent_against_the_api_on_every_node() {
    let rbac = documents("rbac.yaml");
    let sa: ServiceAccount = one(&rbac, "ServiceAccount");
    let ds: DaemonSet = one(&documents("daemonset.yaml"), "DaemonSet");
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "run");
    assert!(
        !args.iter().any(|a| a.starts_with("--manifests")),
        "{args:?}"
    );
    assert!(args.iter().any(|a| a.starts_with("--interfaces")));
    let env = c.env.as_ref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .clone()
        .unwrap();
    for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(caps.iter().any(|c| c == cap), "{cap} missing: {caps:?}");
    }
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    // Socket-level load balancing on the host's cgroup2 root, mounted from the host.
    let cgroup = args
        .iter()
        .find_map(|a| a.strip_prefix("--socket-lb-cgroup="))
        .unwrap_or_else(|| panic!("--socket-lb-cgroup missing: {args:?}"));
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == cgroup)
        .unwrap_or_else(|| panic!("{cgroup} not mounted"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.host_path.as_ref().unwrap().path, "/sys/fs/cgroup");
    // The probes ask the port the agent serves /livez and /healthz on.
    let port_of = |flag: &str| -> i32 {
        let addr = args
            .iter()
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("{flag} missing: {args:?}"));
        addr.rsplit(':').next().unwrap().parse().unwrap()
    };
    let health = port_of("--healthz-addr=");
    for (probe, path) in [
        (&c.liveness_probe, "/livez"),
        (&c.readiness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(health)
        );
    }
    // Both ports are declared, the metrics one where --metrics-addr listens.
    let ports = c.ports.as_ref().expect("container ports");
    let declared = |name: &str| {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    assert_eq!(declared("healthz"), Some(health));
    assert_eq!(declared("metrics"), Some(port_of("--metrics-addr=")));
}
