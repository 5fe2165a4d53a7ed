//! Property tests (proptest) of what reads user input: the manifest parser
//! (`manifest::parse_file`) and the conversion of API objects into the model
//! (`model::desired_state`).
//!
//! - Random text, random YAML/JSON documents and mutations of valid manifests give an
//!   error or objects, never a panic; objects that parse also go through the model.
//! - Valid Service/EndpointSlice manifests (YAML, multi-document, JSON) round-trip to the
//!   model that kube-proxy's rules give: one frontend per port, the ready endpoints.
//! - Out-of-range ports and values of the wrong type are errors naming the field.
//! - The model of k8s-openapi objects with random fields never panics, serves only valid
//!   frontends and endpoints, and does not depend on the order of the objects.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use bpfproxy::{
    manifest::{ManifestError, ParsedFile, parse_file},
    model::{DesiredState, Endpoint, Frontend, Protocol, desired_state},
};
use k8s_openapi::{
    api::{
        core::v1::{ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig},
        discovery::v1::{
            Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::prelude::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Valid manifests and the model they must give.

/// A Service with its ports and one EndpointSlice for it.
#[derive(Clone, Debug)]
struct App {
    namespace: String,
    name: String,
    cluster_ip: Ipv4Addr,
    /// (port, UDP?, the endpoints' port); named p0, p1, ...
    ports: Vec<(u16, bool, u16)>,
    /// (address, `conditions.ready`)
    endpoints: Vec<(Ipv4Addr, Option<bool>)>,
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,20}[a-z0-9])?"
}

fn app() -> impl Strategy<Value = App> {
    (
        dns_label(),
        dns_label(),
        any::<[u8; 4]>(),
        prop::collection::vec((1..=65535u16, any::<bool>(), 1..=65535u16), 1..5),
        prop::collection::vec((any::<[u8; 4]>(), prop::option::of(any::<bool>())), 0..8),
    )
        .prop_map(|(namespace, name, ip, mut ports, mut endpoints)| {
            // A port and protocol once per Service, an address once per slice.
            let mut seen = BTreeSet::new();
            ports.retain(|&(p, udp, _)| seen.insert((p, udp)));
            let mut seen = BTreeSet::new();
            endpoints.retain(|&(a, _)| seen.insert(a));
            App {
                namespace,
                name,
                cluster_ip: Ipv4Addr::from(ip),
                ports,
                endpoints: endpoints
                    .into_iter()
                    .map(|(a, r)| (Ipv4Addr::from(a), r))
                    .collect(),
            }
        })
}

fn proto(udp: bool) -> &'static str {
    if udp { "UDP" } else { "TCP" }
}

impl App {
    fn service(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, &(port, udp, target))| {
                json!({"name": format!("p{i}"), "port": port, "protocol": proto(udp), "targetPort": target})
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"type": "ClusterIP", "clusterIP": self.cluster_ip.to_string(), "ports": ports},
        })
    }

    fn slice(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, &(_, udp, target))| {
                json!({"name": format!("p{i}"), "port": target, "protocol": proto(udp)})
            })
            .collect();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|(addr, ready)| match ready {
                Some(r) => json!({"addresses": [addr.to_string()], "conditions": {"ready": r}}),
                None => json!({"addresses": [addr.to_string()]}),
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-x1", self.name),
                "namespace": self.namespace,
                "labels": {"kubernetes.io/service-name": self.name},
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        })
    }

    fn yaml(&self) -> String {
        format!(
            "# {}\n{}---\n{}",
            self.name,
            serde_yaml_ng::to_string(&self.service()).unwrap(),
            serde_yaml_ng::to_string(&self.slice()).unwrap()
        )
    }

    fn json_list(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [self.service(), self.slice()],
        }))
        .unwrap()
    }

    /// kube-proxy's model: a frontend per port, with the ready endpoints (an endpoint with
    /// no `ready` condition is ready) on the slice port of the same name and protocol.
    fn expected(&self) -> Vec<(Frontend, Vec<Endpoint>)> {
        let mut out: Vec<_> = self
            .ports
            .iter()
            .map(|&(port, udp, target)| {
                let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
                let frontend = Frontend::cluster(self.cluster_ip, port, protocol);
                let mut endpoints: Vec<Endpoint> = self
                    .endpoints
                    .iter()
                    .filter(|(_, ready)| ready.unwrap_or(true))
                    .map(|&(addr, _)| Endpoint {
                        addr: addr.into(),
                        port: target,
                        terminating: false,
                        local: false,
                    })
                    .collect();
                endpoints.sort();
                (frontend, endpoints)
            })
            .collect();
        out.sort();
        out
    }
}

fn parse(name: &str, text: &str) -> Result<ParsedFile, ManifestError> {
    parse_file(Path::new(name), text)
}

fn model_of(parsed: &ParsedFile) -> DesiredState {
    desired_state(&parsed.objects.services, &parsed.objects.slices).0
}

fn served(state: &DesiredState) -> Vec<(Frontend, Vec<Endpoint>)> {
    state
        .services
        .values()
        .map(|s| (s.frontend, s.endpoints.clone()))
        .collect()
}

/// What holds of any model: frontends with a port, endpoints with a port, sorted, unique.
fn assert_sound(state: &DesiredState) {
    for (frontend, svc) in &state.services {
        assert_eq!(*frontend, svc.frontend);
        assert_ne!(frontend.port, 0, "{frontend:?}");
        assert!(
            svc.endpoints.iter().all(|e| e.port != 0),
            "{frontend:?}: {:?}",
            svc.endpoints
        );
        assert!(
            svc.endpoints.windows(2).all(|w| w[0] < w[1]),
            "{frontend:?}: endpoints not sorted and unique: {:?}",
            svc.endpoints
        );
    }
}

/// Parsing never panics; what parses also goes through the model.
fn parse_anything(name: &str, text: &str) {
    if let Ok(parsed) = parse(name, text) {
        assert_sound(&model_of(&parsed));
    }
}

// ---------------------------------------------------------------------------------------
// Random documents.

/// YAML/JSON values built from the words of a manifest, so they reach deep into the
/// parser (a `kind: Service` with a `spec` of odd shape) more often than random text does.
fn value() -> impl Strategy<Value = Value> {
    let word = prop_oneof![
        Just("apiVersion"),
        Just("kind"),
        Just("metadata"),
        Just("name"),
        Just("namespace"),
        Just("labels"),
        Just("spec"),
        Just("ports"),
        Just("port"),
        Just("targetPort"),
        Just("protocol"),
        Just("clusterIP"),
        Just("clusterIPs"),
        Just("endpoints"),
        Just("addresses"),
        Just("conditions"),
        Just("ready"),
        Just("addressType"),
        Just("items"),
        Just("type"),
        Just("kubernetes.io/service-name"),
        Just("v1"),
        Just("Service"),
        Just("EndpointSlice"),
        Just("List"),
        Just("discovery.k8s.io/v1"),
        Just("IPv4"),
        Just("TCP"),
        Just("10.96.0.10"),
        Just("None"),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        word.clone().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(word.clone().prop_map(String::from), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A document that claims to be a Service, an EndpointSlice or a List, with random fields.
fn object() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(("v1", "Service")),
            Just(("discovery.k8s.io/v1", "EndpointSlice")),
            Just(("v1", "List")),
            Just(("apps/v1", "Deployment")),
        ],
        prop::collection::btree_map(
            prop_oneof![
                Just("metadata".to_string()),
                Just("spec".to_string()),
                Just("ports".to_string()),
                Just("endpoints".to_string()),
                Just("addressType".to_string()),
                Just("items".to_string()),
            ],
            value(),
            0..5,
        ),
    )
        .prop_map(|((api, kind), fields)| {
            let mut m: serde_json::Map<String, Value> = fields.into_iter().collect();
            m.insert("apiVersion".into(), api.into());
            m.insert("kind".into(), kind.into());
            Value::Object(m)
        })
}

/// Values a field of a manifest should not hold.
fn bad_scalar() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("-1"),
        Just("0"),
        Just("65536"),
        Just("99999999999"),
        Just("1.5"),
        Just("\"80\""),
        Just("eighty"),
        Just("[1, 2]"),
        Just("{a: b}"),
        Just("null"),
        Just("~"),
        Just("true"),
        Just("\"10.96.0.999\""),
        Just("\"\""),
        Just("&a x"),
        Just("*a"),
        Just("!!binary aGk="),
        Just("'\u{0}'"),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    /// Replaces the value after the `n`-th `: ` with a bad one.
    Value(usize, &'static str),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..20usize).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), "[-:\\[\\]{}'\"#&*!|> \n\t,a-z0-9]{1,6}")
            .prop_map(|(a, s)| Mutation::Insert(a, s)),
        (any::<usize>(), bad_scalar()).prop_map(|(n, v)| Mutation::Value(n, v)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn mutate(text: &str, m: &Mutation) -> String {
    match m {
        Mutation::Delete(a, n) => {
            let a = boundary(text, *a);
            let b = boundary(text, (a + n).min(text.len()));
            format!("{}{}", &text[..a], &text[b.max(a)..])
        }
        Mutation::Insert(a, s) => {
            let a = boundary(text, *a);
            format!("{}{s}{}", &text[..a], &text[a..])
        }
        Mutation::Value(n, v) => {
            let spots: Vec<usize> = text.match_indices(": ").map(|(i, _)| i + 2).collect();
            if spots.is_empty() {
                return text.to_string();
            }
            let at = spots[n % spots.len()];
            let end = text[at..].find('\n').map_or(text.len(), |e| at + e);
            format!("{}{v}{}", &text[..at], &text[end..])
        }
        Mutation::Truncate(a) => text[..boundary(text, *a)].to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text_is_an_error_or_objects_never_a_panic(text in "(?s).{0,300}") {
        parse_anything("f.yaml", &text);
        parse_anything("f.json", &text);
    }

    #[test]
    fn yaml_punctuation_never_panics(text in "[-:\\[\\]{}'\"#&*!|>%@`?, \n\ta-z0-9.]{0,200}") {
        parse_anything("f.yaml", &text);
        parse_anything("f.json", &text);
    }

    #[test]
    fn random_documents_never_panic(docs in prop::collection::vec(prop_oneof![object(), value()], 1..4)) {
        let yaml: String = docs
            .iter()
            .map(|d| serde_yaml_ng::to_string(d).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        parse_anything("f.yaml", &yaml);
        parse_anything("f.json", &serde_json::to_string(&docs[0]).unwrap());
        parse_anything("f.json", &serde_json::to_string(&Value::from(docs)).unwrap());
    }

    #[test]
    fn mutated_manifests_never_panic(app in app(), ms in prop::collection::vec(mutation(), 1..4)) {
        let mut yaml = app.yaml();
        let mut json = app.json_list();
        for m in &ms {
            yaml = mutate(&yaml, m);
            json = mutate(&json, m);
        }
        parse_anything("f.yaml", &yaml);
        parse_anything("f.json", &json);
    }

    #[test]
    fn valid_manifests_round_trip_to_the_model(app in app()) {
        let want = app.expected();
        for (name, text) in [("app.yaml", app.yaml()), ("app.json", app.json_list())] {
            let parsed = parse(name, &text)
                .unwrap_or_else(|e| panic!("{name} of {app:?} refused: {e}\n{text}"));
            prop_assert_eq!(parsed.objects.services.len(), 1);
            prop_assert_eq!(parsed.objects.slices.len(), 1);
            prop_assert!(parsed.skipped.is_empty());
            let (state, issues) =
                desired_state(&parsed.objects.services, &parsed.objects.slices);
            prop_assert!(issues.is_empty(), "{:?}", issues);
            prop_assert_eq!(served(&state), want.clone(), "{}", name);
            for svc in state.services.values() {
                prop_assert_eq!(&svc.name.namespace, &app.namespace);
                prop_assert_eq!(&svc.name.name, &app.name);
                prop_assert_eq!(svc.affinity_timeout_s, 0);
            }
        }
    }

    #[test]
    fn out_of_range_ports_are_errors_naming_the_field(
        app in app(),
        bad in prop_oneof![i32::MIN..=0, 65536..=i32::MAX],
        which in any::<prop::sample::Index>(),
        in_slice in any::<bool>(),
    ) {
        let i = which.index(app.ports.len());
        let (mut svc, mut slice) = (app.service(), app.slice());
        let field = if in_slice {
            slice["ports"][i]["port"] = bad.into();
            format!("ports[{i}].port: {bad} is out of range 1-65535")
        } else {
            svc["spec"]["ports"][i]["port"] = bad.into();
            format!("spec.ports[{i}].port: {bad} is out of range 1-65535")
        };
        let text = format!(
            "{}---\n{}",
            serde_yaml_ng::to_string(&svc).unwrap(),
            serde_yaml_ng::to_string(&slice).unwrap()
        );
        match parse("app.yaml", &text) {
            Err(e @ ManifestError::Invalid { .. }) => {
                prop_assert!(e.to_string().contains(&field), "{} lacks {}", e, field)
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn values_of_the_wrong_type_are_errors_naming_the_field(
        app in app(),
        bad in prop_oneof![
            Just(json!("eighty")),
            Just(json!(1.5)),
            Just(json!([80])),
            Just(json!({"port": 80})),
            Just(json!(true)),
            Just(json!(1u64 << 40)),
        ],
        field in prop_oneof![Just("port"), Just("protocol"), Just("name")],
    ) {
        // Strings where numbers go, a float or a huge number for an i32, lists and maps
        // anywhere. A YAML scalar in a string field reads as its text (`name: 1.5` is the
        // name "1.5"), which is then validated like any name.
        if field == "name" && !(bad.is_array() || bad.is_object()) {
            return Ok(());
        }
        let mut svc = app.service();
        svc["spec"]["ports"][0][field] = bad.clone();
        let text = serde_yaml_ng::to_string(&svc).unwrap();
        match parse("svc.yaml", &text) {
            Err(ManifestError::Syntax { line, message, .. }) => {
                prop_assert!(line >= 1);
                prop_assert!(!message.is_empty());
            }
            Err(e @ ManifestError::Invalid { .. }) => {
                let at = format!("spec.ports[0].{field}");
                prop_assert!(e.to_string().contains(&at), "{} lacks {}", e, at);
            }
            other => prop_assert!(false, "{} = {}: {:?}", field, bad, other),
        }
    }
}

// ---------------------------------------------------------------------------------------
// API objects with random fields, straight into the model (as the kube source hands them).

fn ip_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_string()),
        Just("None".to_string()),
        Just(String::new()),
        Just("fd00::1".to_string()),
        Just("010.096.000.010".to_string()),
        Just("10.96.0.256".to_string()),
        "[0-9.:a-f]{0,16}",
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("TCP".to_string()),
        Just("UDP".to_string()),
        Just("SCTP".to_string()),
        "[A-Za-z]{0,5}",
    ])
}

fn small_name() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just(String::new()),
        Just("a".to_string()),
        Just("b".to_string()),
        ".{0,6}",
    ])
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![1..=3i32, 65534..=65536i32, any::<i32>()]
}

fn api_service() -> impl Strategy<Value = Service> {
    (
        (small_name(), prop::option::of(Just("ns".to_string()))),
        (
            ip_string(),
            prop::option::of(prop::collection::vec(ip_string(), 0..3)),
        ),
        prop::collection::vec((small_name(), port_number(), protocol()), 0..4),
        prop::option::of(prop_oneof![
            Just("ClusterIP".to_string()),
            Just("ExternalName".to_string()),
            Just("NodePort".to_string()),
            "[A-Za-z]{0,6}",
        ]),
        (
            prop::option::of(prop_oneof![
                Just("ClientIP".to_string()),
                Just("None".to_string()),
                "[a-z]{0,4}"
            ]),
            prop::option::of(any::<i32>()),
        ),
        prop::option::of(prop::collection::btree_map(
            prop_oneof![
                Just("bpfproxy.io/scheduler".to_string()),
                Just("bpfproxy.io/weights".to_string()),
            ],
            ".{0,24}",
            0..3,
        )),
        prop::option::of(prop::collection::btree_map(
            prop_oneof![
                Just("service.kubernetes.io/service-proxy-name".to_string()),
                Just("service.kubernetes.io/headless".to_string()),
                Just("app".to_string()),
            ],
            ".{0,4}",
            0..2,
        )),
    )
        .prop_map(
            |(
                (name, namespace),
                (ip, ips),
                ports,
                type_,
                (affinity, timeout),
                annotations,
                labels,
            )| Service {
                metadata: ObjectMeta {
                    name,
                    namespace,
                    annotations,
                    labels,
                    ..ObjectMeta::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ip: Some(ip),
                    cluster_ips: ips,
                    type_,
                    ports: Some(
                        ports
                            .into_iter()
                            .map(|(name, port, protocol)| ServicePort {
                                name,
                                port,
                                protocol,
                                ..ServicePort::default()
                            })
                            .collect(),
                    ),
                    session_affinity: affinity,
                    session_affinity_config: Some(SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: timeout,
                        }),
                    }),
                    ..ServiceSpec::default()
                }),
                status: None,
            },
        )
}

fn api_slice() -> impl Strategy<Value = EndpointSlice> {
    (
        small_name(),
        prop::option::of(prop::collection::btree_map(
            prop_oneof![
                Just("kubernetes.io/service-name".to_string()),
                Just("service.kubernetes.io/headless".to_string()),
            ],
            prop_oneof![Just("a".to_string()), Just("b".to_string()), ".{0,4}"],
            0..2,
        )),
        prop_oneof![
            Just("IPv4".to_string()),
            Just("IPv6".to_string()),
            Just("FQDN".to_string()),
            "[A-Za-z0-9]{0,5}",
        ],
        prop::collection::vec(
            (
                prop::collection::vec(ip_string(), 0..3),
                prop::option::of((
                    prop::option::of(any::<bool>()),
                    prop::option::of(any::<bool>()),
                    prop::option::of(any::<bool>()),
                )),
            ),
            0..6,
        ),
        prop::option::of(prop::collection::vec(
            (small_name(), prop::option::of(port_number()), protocol()),
            0..4,
        )),
    )
        .prop_map(
            |(name, labels, address_type, endpoints, ports)| EndpointSlice {
                metadata: ObjectMeta {
                    name,
                    namespace: Some("ns".into()),
                    labels,
                    ..ObjectMeta::default()
                },
                address_type,
                endpoints: endpoints
                    .into_iter()
                    .map(|(addresses, conditions)| SliceEndpoint {
                        addresses,
                        conditions: conditions.map(|(ready, serving, terminating)| {
                            EndpointConditions {
                                ready,
                                serving,
                                terminating,
                            }
                        }),
                        ..SliceEndpoint::default()
                    })
                    .collect(),
                ports: ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|(name, port, protocol)| EndpointPort {
                            name,
                            port,
                            protocol,
                            ..EndpointPort::default()
                        })
                        .collect()
                }),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn api_objects_with_random_fields_give_a_sound_model_in_any_order(
        services in prop::collection::vec(api_service(), 0..4),
        slices in prop::collection::vec(api_slice(), 0..4),
    ) {
        let (state, issues) = desired_state(&services, &slices);
        assert_sound(&state);
        let mut rs = services.clone();
        let mut rl = slices.clone();
        rs.reverse();
        rl.reverse();
        let (again, mut issues_again) = desired_state(&rs, &rl);
        prop_assert_eq!(&state, &again, "the model depends on the order of the objects");
        let mut issues = issues;
        issues.sort();
        issues_again.sort();
        prop_assert_eq!(issues, issues_again);
    }
}
