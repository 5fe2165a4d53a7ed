//! The standalone source: Kubernetes manifests (YAML or JSON) in a directory.
//!
//! Each file (`.yaml`, `.yml`, `.json`; hidden files ignored; not recursive) may hold several
//! YAML documents separated by `---` lines, or a `kind: List`. `v1` Services and
//! `discovery.k8s.io/v1` EndpointSlices are kept; other kinds are reported as skipped. Each
//! object is then validated as the API server would, so a typo is reported by file, line,
//! object and field instead of silently changing what is served.
//!
//! [`ManifestDir`] keeps the last good version of each file: a file that stops parsing or
//! validating is reported and its previous content stays in effect, so an edit in progress
//! never takes down what is serving. Deleting a file drops its objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs, io,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::model::build::{MAX_AFFINITY_TIMEOUT_S, parse_ip, parse_ipv4, parse_protocol};

/// File name extensions read from a manifest directory.
pub const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Namespace of an object that names none (as `kubectl apply` would do).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Services and EndpointSlices, namespace set on each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManifestSet {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

/// A document of a kind that is not read (a Deployment, an Endpoints, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    /// 1-based line where the document starts.
    pub line: usize,
    pub api_version: String,
    pub kind: String,
    /// `namespace/name` or `name`, when the document has one.
    pub name: Option<String>,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: skipped {} ",
            self.file.display(),
            self.line,
            self.kind
        )?;
        if let Some(name) = &self.name {
            write!(f, "{name} ")?;
        }
        write!(
            f,
            "({}): only v1 Service and discovery.k8s.io/v1 EndpointSlice are read",
            self.api_version
        )
    }
}

/// What one file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedFile {
    pub objects: ManifestSet,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not YAML/JSON, or not the shape of the object's type (a string where a number goes).
    #[error("{}:{line}:{}{message}", file.display(), column.map(|c| format!("{c}: ")).unwrap_or_else(|| " ".into()))]
    Syntax {
        file: PathBuf,
        /// 1-based line in the file.
        line: usize,
        column: Option<usize>,
        message: String,
    },
    /// Well-formed, but a field holds a value the API server would refuse.
    #[error("{}:{line}: {object}: {}", file.display(), problems.join("; "))]
    Invalid {
        file: PathBuf,
        /// 1-based line where the object's document starts.
        line: usize,
        /// Kind and namespace/name, e.g. `Service default/myapp`.
        object: String,
        /// Each `field: what is wrong`.
        problems: Vec<String>,
    },
    /// The same object in two files: the one in the file that sorts first is used.
    #[error("{}: {object} is also defined in {}, whose copy is used", file.display(), first.display())]
    Duplicate {
        file: PathBuf,
        object: String,
        first: PathBuf,
    },
}

/// Whether `path` names a file the directory reader takes.
pub fn is_manifest_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && EXTENSIONS.contains(&ext)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
}

/// `apiVersion` and `kind` of a document, read before the typed parse.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<NameOnly>,
}

#[derive(Deserialize)]
struct NameOnly {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct ListDoc {
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

/// A parse failure: where (if known) and what.
struct Failure {
    line: Option<usize>,
    column: Option<usize>,
    message: String,
}

/// Drops the parser's own mention of the location the error already starts with.
fn strip_location(message: String, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => message.replacen(&format!(" at line {l} column {c}"), "", 1),
        _ => message,
    }
}

/// Deserializes one document. `text` is padded with the lines before the document, so the
/// parser's locations are lines of the file.
fn from_text<T: DeserializeOwned>(format: Format, text: &str) -> Result<T, Failure> {
    match format {
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| {
            let location = e.location();
            let line = location.as_ref().map(|l| l.line());
            let column = location.as_ref().map(|l| l.column());
            Failure {
                line,
                column,
                message: strip_location(e.to_string(), line, column),
            }
        }),
        Format::Json => serde_json::from_str(text).map_err(|e| {
            let line = (e.line() > 0).then_some(e.line());
            let column = (e.column() > 0).then_some(e.column());
            Failure {
                line,
                column,
                message: strip_location(e.to_string(), line, column),
            }
        }),
    }
}

/// One document of a file: its text, padded, and the 1-based line where it starts.
struct Document {
    padded: String,
    line: usize,
}

/// Whether a line is a document separator: `---` alone or followed by a space/comment.
fn is_separator(line: &str) -> bool {
    let line = line.trim_end();
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

/// Whether a line is a separator with nothing after it but a comment.
fn is_bare_separator(line: &str) -> bool {
    is_separator(line) && {
        let rest = line.trim()[3..].trim_start();
        rest.is_empty() || rest.starts_with('#')
    }
}

/// Whether a line holds nothing for the parser: blank, a comment, a bare marker, a directive.
fn is_filler(line: &str) -> bool {
    let t = line.trim();
    t.is_empty()
        || t.starts_with('#')
        || t.starts_with('%')
        || t == "..."
        || is_bare_separator(line)
}

/// Splits YAML text on `---` lines. Each document keeps its separator line (so content after
/// `--- ` on that line stays in it) and is prefixed with one newline per line before it.
fn split_documents(text: &str) -> Vec<Document> {
    let mut starts = vec![0usize];
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i > 0 && is_separator(line) {
            starts.push(offset);
        }
        offset += line.len();
    }
    starts.push(text.len());
    let mut docs = Vec::new();
    for w in starts.windows(2) {
        let body = &text[w[0]..w[1]];
        if body.lines().all(is_filler) {
            continue;
        }
        let before = text[..w[0]].matches('\n').count();
        // Start at the first line with content, for messages about the whole object.
        let lead = body.lines().take_while(|l| is_filler(l)).count();
        let mut padded = "\n".repeat(before);
        padded.push_str(body);
        docs.push(Document {
            padded,
            line: before + lead + 1,
        });
    }
    docs
}

/// Accumulates the objects of one file.
struct FileParser<'a> {
    file: &'a Path,
    format: Format,
    out: ParsedFile,
    seen: BTreeSet<String>,
}

impl FileParser<'_> {
    fn syntax(&self, doc_line: usize, f: Failure) -> ManifestError {
        ManifestError::Syntax {
            file: self.file.to_path_buf(),
            line: f.line.unwrap_or(doc_line),
            column: f.column,
            message: f.message,
        }
    }

    fn document(&mut self, doc: &Document) -> Result<(), ManifestError> {
        let meta: TypeMeta =
            from_text(self.format, &doc.padded).map_err(|f| self.syntax(doc.line, f))?;
        match type_of(&meta) {
            Ok(Kind::Service) => {
                let svc: Service =
                    from_text(self.format, &doc.padded).map_err(|f| self.syntax(doc.line, f))?;
                self.add_service(doc.line, svc)
            }
            Ok(Kind::EndpointSlice) => {
                let slice: EndpointSlice =
                    from_text(self.format, &doc.padded).map_err(|f| self.syntax(doc.line, f))?;
                self.add_slice(doc.line, slice)
            }
            Ok(Kind::List) => {
                let list: ListDoc =
                    from_text(self.format, &doc.padded).map_err(|f| self.syntax(doc.line, f))?;
                for (i, item) in list.items.into_iter().enumerate() {
                    self.list_item(doc.line, i, item)?;
                }
                Ok(())
            }
            Ok(Kind::Other) => {
                self.skip(doc.line, &meta);
                Ok(())
            }
            Err(message) => Err(ManifestError::Syntax {
                file: self.file.to_path_buf(),
                line: doc.line,
                column: None,
                message,
            }),
        }
    }

    /// An item of a `kind: List`, parsed from its value (so errors have no line of their
    /// own: they name the item).
    fn list_item(
        &mut self,
        line: usize,
        index: usize,
        item: serde_json::Value,
    ) -> Result<(), ManifestError> {
        let file = self.file;
        let mut label = format!("items[{index}]");
        let at = |label: &str, message: String| ManifestError::Syntax {
            file: file.to_path_buf(),
            line,
            column: None,
            message: format!("{label}: {message}"),
        };
        let meta: TypeMeta =
            serde_json::from_value(item.clone()).map_err(|e| at(&label, e.to_string()))?;
        if let (Some(kind), Some(name)) = (
            &meta.kind,
            meta.metadata.as_ref().and_then(|m| m.name.as_ref()),
        ) {
            let namespace = meta.metadata.as_ref().and_then(|m| m.namespace.as_deref());
            label = format!(
                "{label} ({kind} {}/{name})",
                namespace.unwrap_or(DEFAULT_NAMESPACE)
            );
        }
        let at = |message: String| at(&label, message);
        match type_of(&meta).map_err(&at)? {
            Kind::Service => {
                let svc: Service = serde_json::from_value(item).map_err(|e| at(e.to_string()))?;
                self.add_service(line, svc)
            }
            Kind::EndpointSlice => {
                let slice: EndpointSlice =
                    serde_json::from_value(item).map_err(|e| at(e.to_string()))?;
                self.add_slice(line, slice)
            }
            Kind::List => Err(at("a List inside a List is not read".into())),
            Kind::Other => {
                self.skip(line, &meta);
                Ok(())
            }
        }
    }

    fn skip(&mut self, line: usize, meta: &TypeMeta) {
        let name = meta.metadata.as_ref().and_then(|m| {
            let name = m.name.as_deref()?;
            Some(match m.namespace.as_deref() {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_string(),
            })
        });
        self.out.skipped.push(Skipped {
            file: self.file.to_path_buf(),
            line,
            api_version: meta.api_version.clone().unwrap_or_default(),
            kind: meta.kind.clone().unwrap_or_default(),
            name,
        });
    }

    fn check(
        &mut self,
        line: usize,
        object: String,
        problems: Vec<String>,
    ) -> Result<(), ManifestError> {
        let mut problems = problems;
        if !self.seen.insert(object.clone()) {
            problems.push("defined twice in this file".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Invalid {
                file: self.file.to_path_buf(),
                line,
                object,
                problems,
            })
        }
    }

    fn add_service(&mut self, line: usize, mut svc: Service) -> Result<(), ManifestError> {
        default_namespace(&mut svc.metadata);
        let object = object_name("Service", &svc.metadata);
        self.check(line, object, validate_service(&svc))?;
        self.out.objects.services.push(svc);
        Ok(())
    }

    fn add_slice(&mut self, line: usize, mut slice: EndpointSlice) -> Result<(), ManifestError> {
        default_namespace(&mut slice.metadata);
        let object = object_name("EndpointSlice", &slice.metadata);
        self.check(line, object, validate_endpoint_slice(&slice))?;
        self.out.objects.slices.push(slice);
        Ok(())
    }
}

enum Kind {
    Service,
    EndpointSlice,
    List,
    Other,
}

fn type_of(meta: &TypeMeta) -> Result<Kind, String> {
    let (Some(api_version), Some(kind)) = (meta.api_version.as_deref(), meta.kind.as_deref())
    else {
        return Err("not a Kubernetes object: apiVersion and kind are required".into());
    };
    Ok(match (api_version, kind) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "List") => Kind::List,
        _ => Kind::Other,
    })
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_string());
    }
}

/// `Kind namespace/name`, as errors name objects.
pub fn object_name(kind: &str, meta: &ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Parses the text of one manifest file; the extension of `path` picks JSON or YAML. The
/// first problem fails the whole file (a half-read file would serve half a change).
pub fn parse_file(path: &Path, text: &str) -> Result<ParsedFile, ManifestError> {
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        _ => Format::Yaml,
    };
    let docs = match format {
        Format::Yaml => split_documents(text),
        Format::Json if text.trim().is_empty() => Vec::new(),
        Format::Json => vec![Document {
            padded: text.to_string(),
            line: 1,
        }],
    };
    let mut parser = FileParser {
        file: path,
        format,
        out: ParsedFile::default(),
        seen: BTreeSet::new(),
    };
    for doc in &docs {
        parser.document(doc)?;
    }
    Ok(parser.out)
}

// ---- Validation: what the API server would refuse, named by field. -------------------

fn check_port(problems: &mut Vec<String>, field: &str, port: i32) {
    if !(1..=65535).contains(&port) {
        problems.push(format!("{field}: {port} is out of range 1-65535"));
    }
}

fn check_protocol(problems: &mut Vec<String>, field: &str, protocol: Option<&str>) {
    if parse_protocol(protocol).is_none() {
        problems.push(format!(
            "{field}: {:?} is not TCP, UDP or SCTP",
            protocol.unwrap_or("")
        ));
    }
}

/// An IP address field: IPv4 (leading zeros read as decimal, as Kubernetes does) or IPv6.
fn check_ip(problems: &mut Vec<String>, field: &str, ip: &str) {
    if ip.contains(':') {
        if ip.parse::<Ipv6Addr>().is_err() {
            problems.push(format!("{field}: {ip:?} is not an IPv6 address"));
        }
    } else if parse_ipv4(ip).is_none() {
        problems.push(format!("{field}: {ip:?} is not an IPv4 address"));
    }
}

/// Kubernetes' IANA_SVC_NAME: at most 15 of `a-z0-9-`, a letter among them, no `-` at an
/// end or twice in a row.
fn check_port_name(problems: &mut Vec<String>, field: &str, name: &str) {
    let ok = name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !ok {
        problems.push(format!(
            "{field}: {name:?} is not a valid port name (at most 15 of a-z, 0-9 and '-', with a letter)"
        ));
    }
}

/// A DNS label: at most 63 of `a-z0-9-`, alphanumeric at both ends.
fn check_dns_label(problems: &mut Vec<String>, field: &str, value: Option<&str>) {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        problems.push(format!("{field}: required"));
        return;
    };
    let ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !ok {
        problems.push(format!(
            "{field}: {value:?} is not a valid name (at most 63 of a-z, 0-9 and '-')"
        ));
    }
}

/// What the API server would refuse in a Service, each as `field: problem`.
pub fn validate_service(svc: &Service) -> Vec<String> {
    let mut p = Vec::new();
    check_dns_label(&mut p, "metadata.name", svc.metadata.name.as_deref());
    check_dns_label(
        &mut p,
        "metadata.namespace",
        svc.metadata.namespace.as_deref(),
    );
    let Some(spec) = svc.spec.as_ref() else {
        p.push("spec: required".into());
        return p;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&kind) {
        p.push(format!(
            "spec.type: {kind:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"
        ));
    }
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    if !cluster_ip.is_empty() && cluster_ip != "None" {
        check_ip(&mut p, "spec.clusterIP", cluster_ip);
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if i == 0 && !cluster_ip.is_empty() && ip != cluster_ip {
            p.push(format!(
                "{field}: {ip:?} must equal spec.clusterIP {cluster_ip:?}"
            ));
        } else if ip != "None" {
            check_ip(&mut p, &field, ip);
        }
    }
    // Dual stack, as the API server checks it: at most one ClusterIP per family (two in
    // all), `ipFamilies` naming each one's family in the same order, a known policy.
    let cluster_ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let ip_families: Vec<&str> = spec
        .ip_families
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let family_of = |ip: &str| match parse_ip(ip) {
        Some(IpAddr::V4(_)) => Some("IPv4"),
        Some(IpAddr::V6(_)) => Some("IPv6"),
        None => None,
    };
    if cluster_ips.len() > 2 {
        p.push(format!(
            "spec.clusterIPs: {} addresses; at most two (one per family)",
            cluster_ips.len()
        ));
    } else if let [a, b] = cluster_ips[..]
        && let (Some(fa), Some(fb)) = (family_of(a), family_of(b))
        && fa == fb
    {
        p.push(format!(
            "spec.clusterIPs[1]: {b:?} is {fb} like {a:?}; a dual-stack Service has one address per family"
        ));
    }
    if ip_families.len() > 2 {
        p.push(format!(
            "spec.ipFamilies: {} families; at most two",
            ip_families.len()
        ));
    }
    for (i, family) in ip_families.iter().enumerate() {
        if *family != "IPv4" && *family != "IPv6" {
            p.push(format!(
                "spec.ipFamilies[{i}]: {family:?} is not IPv4 or IPv6"
            ));
        } else if ip_families[..i].contains(family) {
            p.push(format!("spec.ipFamilies[{i}]: {family} is listed twice"));
        } else if let Some(ip) = cluster_ips.get(i)
            && let Some(actual) = family_of(ip)
            && actual != *family
        {
            p.push(format!(
                "spec.ipFamilies[{i}]: {family} but spec.clusterIPs[{i}] {ip:?} is {actual}"
            ));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("PreferDualStack") | Some("RequireDualStack") => {}
        Some("SingleStack") => {
            if cluster_ips.len() > 1 {
                p.push("spec.clusterIPs: two addresses but ipFamilyPolicy is SingleStack".into());
            }
        }
        Some(other) => p.push(format!(
            "spec.ipFamilyPolicy: {other:?} is not SingleStack, PreferDualStack or RequireDualStack"
        )),
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(&mut p, &format!("spec.externalIPs[{i}]"), ip);
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        check_port(&mut p, &at("port"), port.port);
        check_protocol(&mut p, &at("protocol"), port.protocol.as_deref());
        match port.name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => {
                check_port_name(&mut p, &at("name"), name);
                if !names.insert(name) {
                    p.push(format!("{}: {name:?} is used by another port", at("name")));
                }
            }
            None if ports.len() > 1 => p.push(format!(
                "{}: required when a Service has several ports",
                at("name")
            )),
            None => {}
        }
        if !numbers.insert((port.port, port.protocol.as_deref().unwrap_or("TCP"))) {
            p.push(format!(
                "{}: {}/{} is used by another port",
                at("port"),
                port.port,
                port.protocol.as_deref().unwrap_or("TCP")
            ));
        }
        if let Some(node_port) = port.node_port.filter(|&n| n != 0) {
            check_port(&mut p, &at("nodePort"), node_port);
        }
        match &port.target_port {
            Some(IntOrString::Int(t)) => check_port(&mut p, &at("targetPort"), *t),
            Some(IntOrString::String(t)) if t.is_empty() => {
                p.push(format!("{}: empty", at("targetPort")))
            }
            _ => {}
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None") => {}
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            if let Some(t) = timeout
                && !(1..=MAX_AFFINITY_TIMEOUT_S as i32).contains(&t)
            {
                p.push(format!(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"
                ));
            }
        }
        Some(other) => p.push(format!(
            "spec.sessionAffinity: {other:?} is not None or ClientIP"
        )),
    }
    for (field, value) in [
        (
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        ),
        (
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        ),
    ] {
        if let Some(v) = value
            && v != "Cluster"
            && v != "Local"
        {
            p.push(format!("{field}: {v:?} is not Cluster or Local"));
        }
    }
    p
}

/// What the API server would refuse in an EndpointSlice, each as `field: problem`.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Vec<String> {
    let mut p = Vec::new();
    if slice.metadata.name.as_deref().is_none_or(str::is_empty) {
        p.push("metadata.name: required".into());
    }
    check_dns_label(
        &mut p,
        "metadata.namespace",
        slice.metadata.namespace.as_deref(),
    );
    let address_type = slice.address_type.as_str();
    if !["IPv4", "IPv6", "FQDN"].contains(&address_type) {
        p.push(format!(
            "addressType: {address_type:?} is not IPv4, IPv6 or FQDN"
        ));
    }
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        if endpoint.addresses.is_empty() {
            p.push(format!(
                "endpoints[{i}].addresses: at least one address is required"
            ));
        }
        for (j, addr) in endpoint.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match address_type {
                "IPv4" if parse_ipv4(addr).is_none() => {
                    p.push(format!("{field}: {addr:?} is not an IPv4 address"))
                }
                "IPv6" if addr.parse::<Ipv6Addr>().is_err() => {
                    p.push(format!("{field}: {addr:?} is not an IPv6 address"))
                }
                "FQDN" if addr.is_empty() => p.push(format!("{field}: empty")),
                _ => {}
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(n) = port.port {
            check_port(&mut p, &format!("ports[{i}].port"), n);
        }
        check_protocol(
            &mut p,
            &format!("ports[{i}].protocol"),
            port.protocol.as_deref(),
        );
        let name = port.name.as_deref().unwrap_or("");
        if !names.insert(name) {
            p.push(format!("ports[{i}].name: {name:?} is used by another port"));
        }
    }
    p
}

// ---- The directory, with the last good version of each file. ------------------------

/// What a [`ManifestDir::reload`] found. Errors are reported on every reload for as long
/// as they last (the caller logs each once while it lasts).
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub errors: Vec<ManifestError>,
    pub skipped: Vec<Skipped>,
}

/// A manifest directory, with the last good content of each file.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    /// Last good parse of each file present at the last reload.
    files: BTreeMap<PathBuf, ParsedFile>,
}

impl ManifestDir {
    /// Nothing is read until [`reload`](Self::reload).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again. A file that fails keeps its last good content; a file
    /// gone drops its objects. If the directory itself cannot be listed, everything is kept.
    pub fn reload(&mut self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let mut paths = match list_manifest_files(&self.dir) {
            Ok(paths) => paths,
            Err(source) => {
                report.errors.push(ManifestError::Io {
                    path: self.dir.clone(),
                    source,
                });
                return report;
            }
        };
        paths.sort();
        let mut files = BTreeMap::new();
        for path in paths {
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                // Deleted between the listing and the read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    report.errors.push(ManifestError::Io {
                        path: path.clone(),
                        source,
                    });
                    if let Some(old) = self.files.remove(&path) {
                        files.insert(path, old);
                    }
                    continue;
                }
            };
            match parse_file(&path, &text) {
                Ok(parsed) => {
                    report.skipped.extend(parsed.skipped.iter().cloned());
                    files.insert(path, parsed);
                }
                Err(e) => {
                    report.errors.push(e);
                    if let Some(old) = self.files.remove(&path) {
                        files.insert(path, old);
                    }
                }
            }
        }
        self.files = files;
        report.errors.extend(self.duplicates().1);
        report
    }

    /// The objects in effect: of each file its last good content; an object defined in two
    /// files is taken from the file that sorts first.
    pub fn objects(&self) -> ManifestSet {
        self.duplicates().0
    }

    /// The merged set and the duplicates left out of it.
    fn duplicates(&self) -> (ManifestSet, Vec<ManifestError>) {
        let mut set = ManifestSet::default();
        let mut errors = Vec::new();
        let mut owners: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut first = |object: String, file: &Path, errors: &mut Vec<ManifestError>| match owners
            .get(&object)
        {
            Some(owner) => {
                errors.push(ManifestError::Duplicate {
                    file: file.to_path_buf(),
                    object,
                    first: owner.clone(),
                });
                false
            }
            None => {
                owners.insert(object, file.to_path_buf());
                true
            }
        };
        for (path, parsed) in &self.files {
            for svc in &parsed.objects.services {
                if first(object_name("Service", &svc.metadata), path, &mut errors) {
                    set.services.push(svc.clone());
                }
            }
            for slice in &parsed.objects.slices {
                if first(
                    object_name("EndpointSlice", &slice.metadata),
                    path,
                    &mut errors,
                ) {
                    set.slices.push(slice.clone());
                }
            }
        }
        (set, errors)
    }
}

fn list_manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        // Follows symlinks (ConfigMap volumes are symlinks); skips directories.
        if is_manifest_file(&path) && path.is_file() {
            paths.push(path);
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MYAPP: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp-deployment
  namespace: default
spec:
  replicas: 3
---
apiVersion: v1
kind: Service
metadata:
  name: myapp
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  selector:
    app: myapp
  ports:
  - name: http
    port: 80
    targetPort: 80
---
# the pods
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: myapp-abc12
  labels:
    kubernetes.io/service-name: myapp
addressType: IPv4
ports:
- name: http
  port: 80
endpoints:
- addresses: [10.244.1.5]
- addresses: [10.244.2.7]
- addresses: [10.244.3.9]
";

    fn parse(name: &str, text: &str) -> Result<ParsedFile, ManifestError> {
        parse_file(Path::new(name), text)
    }

    fn err(name: &str, text: &str) -> String {
        parse(name, text).expect_err("should fail").to_string()
    }

    #[test]
    fn multi_document_file_keeps_services_and_slices_and_skips_the_rest() {
        let parsed = parse("app.yaml", MYAPP).unwrap();
        assert_eq!(parsed.objects.services.len(), 1);
        assert_eq!(parsed.objects.slices.len(), 1);
        let svc = &parsed.objects.services[0];
        assert_eq!(svc.metadata.name.as_deref(), Some("myapp"));
        // No namespace in the file: `default`, as kubectl would.
        assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(parsed.objects.slices[0].endpoints.len(), 3);
        assert_eq!(
            parsed.skipped,
            vec![Skipped {
                file: "app.yaml".into(),
                line: 1,
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: Some("default/myapp-deployment".into()),
            }]
        );
        assert_eq!(
            parsed.skipped[0].to_string(),
            "app.yaml:1: skipped Deployment default/myapp-deployment (apps/v1): only v1 Service and discovery.k8s.io/v1 EndpointSlice are read"
        );
    }

    #[test]
    fn empty_documents_crlf_and_leading_separator_are_fine() {
        let text = "---\n# nothing\n---\n".to_string() + &MYAPP.replace('\n', "\r\n") + "---\n";
        let parsed = parse("app.yml", &text).unwrap();
        assert_eq!(parsed.objects.services.len(), 1);
        assert_eq!(parsed.objects.slices.len(), 1);
        assert_eq!(parsed.skipped[0].line, 4);
        assert_eq!(parse("empty.yaml", "").unwrap(), ParsedFile::default());
    }

    #[test]
    fn malformed_yaml_names_file_and_line_of_the_file() {
        // The error is in the third document, on line 13 of the file.
        let text = "\
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: c
spec: {}
";
        let e = parse("dir/bad.yaml", text).unwrap_err();
        let ManifestError::Syntax { file, line, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(file, Path::new("dir/bad.yaml"));
        assert!((13..=14).contains(line), "{e}");
        assert!(
            e.to_string().starts_with(&format!("dir/bad.yaml:{line}:")),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_the_field_and_line() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - port: eighty\n";
        let e = err("a.yaml", text);
        assert!(e.starts_with("a.yaml:6:"), "{e}");
        assert!(e.contains("spec.ports[0].port"), "{e}");
        assert!(!e.contains(" at line "), "location said twice: {e}");
    }

    #[test]
    fn out_of_range_port_names_object_and_field() {
        let text = "\
apiVersion: v1
kind: Service
metadata:
  name: myapp
  namespace: default
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80}
  - {name: big, port: 70000}
";
        assert_eq!(
            err("a.yaml", text),
            "a.yaml:1: Service default/myapp: spec.ports[1].port: 70000 is out of range 1-65535"
        );
    }

    fn service_with(spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: myapp}}\nspec:\n{spec}")
    }

    #[test]
    fn service_fields_are_validated() {
        let cases = [
            (
                "  clusterIP: 10.96.0.300\n  ports: [{port: 80}]\n",
                r#"spec.clusterIP: "10.96.0.300" is not an IPv4 address"#,
            ),
            (
                "  clusterIP: fd00::zz\n  ports: [{port: 80}]\n",
                r#"spec.clusterIP: "fd00::zz" is not an IPv6 address"#,
            ),
            (
                "  clusterIP: 10.96.0.1\n  ports: [{port: 80, protocol: ICMP}]\n",
                r#"spec.ports[0].protocol: "ICMP" is not TCP, UDP or SCTP"#,
            ),
            (
                "  ports: [{name: a, port: 80}, {port: 81}]\n",
                "spec.ports[1].name: required when a Service has several ports",
            ),
            (
                "  ports: [{name: a, port: 80}, {name: a, port: 81}]\n",
                r#"spec.ports[1].name: "a" is used by another port"#,
            ),
            (
                "  ports: [{name: a, port: 80}, {name: b, port: 80}]\n",
                "spec.ports[1].port: 80/TCP is used by another port",
            ),
            (
                "  ports: [{name: Http, port: 80}]\n",
                r#"spec.ports[0].name: "Http" is not a valid port name"#,
            ),
            (
                "  ports: [{port: 80, targetPort: 0}]\n",
                "spec.ports[0].targetPort: 0 is out of range 1-65535",
            ),
            (
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}\n",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 90000 is out of range 1-86400",
            ),
            (
                "  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.2]\n",
                r#"spec.clusterIPs[0]: "10.96.0.2" must equal spec.clusterIP "10.96.0.1""#,
            ),
            (
                "  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.1, 10.96.0.2]\n",
                r#"spec.clusterIPs[1]: "10.96.0.2" is IPv4 like "10.96.0.1"; a dual-stack Service has one address per family"#,
            ),
            (
                "  clusterIPs: [10.96.0.1, 'fd00::1', 'fd00::2']\n",
                "spec.clusterIPs: 3 addresses; at most two (one per family)",
            ),
            (
                "  clusterIPs: [10.96.0.1, 'fd00::1']\n  ipFamilies: [IPv6, IPv4]\n",
                r#"spec.ipFamilies[0]: IPv6 but spec.clusterIPs[0] "10.96.0.1" is IPv4"#,
            ),
            (
                "  ipFamilies: [IPv4, IPv4]\n",
                "spec.ipFamilies[1]: IPv4 is listed twice",
            ),
            (
                "  clusterIPs: [10.96.0.1, 'fd00::1']\n  ipFamilyPolicy: SingleStack\n",
                "spec.clusterIPs: two addresses but ipFamilyPolicy is SingleStack",
            ),
            (
                "  ipFamilyPolicy: DualStack\n",
                r#"spec.ipFamilyPolicy: "DualStack" is not SingleStack, PreferDualStack or RequireDualStack"#,
            ),
            ("  type: Bogus\n", r#"spec.type: "Bogus" is not ClusterIP"#),
        ];
        for (spec, expected) in cases {
            let e = err("s.yaml", &service_with(spec));
            assert!(
                e.starts_with("s.yaml:1: Service default/myapp: ") && e.contains(expected),
                "{spec}: got {e}, expected {expected}"
            );
        }
        // Valid: headless, IPv6, a named port alone, leading zeros (read as decimal).
        for spec in [
            "  clusterIP: None\n",
            "  clusterIP: fd00::10\n  ports: [{port: 53, protocol: UDP}]\n",
            "  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.1, 'fd00::1']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]\n",
            "  clusterIP: 'fd00::1'\n  clusterIPs: ['fd00::1', 10.96.0.1]\n  ipFamilies: [IPv6, IPv4]\n  ipFamilyPolicy: PreferDualStack\n  externalIPs: ['2001:db8::1', 192.0.2.1]\n",
            "  clusterIP: 010.096.000.010\n  ports: [{name: http, port: 80, targetPort: http}]\n",
        ] {
            parse("s.yaml", &service_with(spec)).unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }

    #[test]
    fn endpoint_slice_fields_are_validated() {
        let slice = |body: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: prod}}\n{body}"
            )
        };
        let cases = [
            (
                "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.256]}]\n",
                r#"endpoints[1].addresses[0]: "10.0.0.256" is not an IPv4 address"#,
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: []}]\n",
                "endpoints[0].addresses: at least one address is required",
            ),
            (
                "addressType: IPv4\nendpoints: []\nports: [{name: a, port: 0}]\n",
                "ports[0].port: 0 is out of range 1-65535",
            ),
            (
                "addressType: IPv4\nendpoints: []\nports: [{port: 80, protocol: icmp}]\n",
                r#"ports[0].protocol: "icmp" is not TCP, UDP or SCTP"#,
            ),
            (
                "addressType: IPv4\nendpoints: []\nports: [{port: 80}, {port: 81}]\n",
                r#"ports[1].name: "" is used by another port"#,
            ),
            (
                "addressType: IPv5\nendpoints: []\n",
                r#"addressType: "IPv5" is not IPv4, IPv6 or FQDN"#,
            ),
        ];
        for (body, expected) in cases {
            let e = err("e.yaml", &slice(body));
            assert!(
                e.starts_with("e.yaml:1: EndpointSlice prod/s: ") && e.contains(expected),
                "{body}: got {e}, expected {expected}"
            );
        }
    }

    #[test]
    fn an_object_twice_in_a_file_is_refused() {
        let doc = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let e = err("a.yaml", &format!("{doc}---\n{doc}"));
        assert_eq!(e, "a.yaml:6: Service default/a: defined twice in this file");
    }

    #[test]
    fn a_document_without_kind_is_an_error() {
        let e = err("a.yaml", "foo: bar\n");
        assert_eq!(
            e,
            "a.yaml:1: not a Kubernetes object: apiVersion and kind are required"
        );
    }

    #[test]
    fn json_files_and_lists_are_read() {
        let json = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "web", "namespace": "prod"},
     "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": 443}]}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}}
  ]
}"#;
        let parsed = parse("dump.json", json).unwrap();
        assert_eq!(parsed.objects.services.len(), 1);
        assert_eq!(parsed.skipped.len(), 1);
        assert_eq!(parsed.skipped[0].kind, "ConfigMap");

        let e = err("bad.json", "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \n}");
        assert!(e.starts_with("bad.json:4:"), "{e}");

        let bad_item = json.replace("443", "0");
        assert_eq!(
            err("dump.json", &bad_item),
            "dump.json:1: Service prod/web: spec.ports[0].port: 0 is out of range 1-65535"
        );
        let wrong_type = json.replace("443", "\"https\"");
        let e = err("dump.json", &wrong_type);
        assert!(
            e.starts_with("dump.json:1: items[0] (Service prod/web): invalid type"),
            "{e}"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    fn service_yaml(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
        )
    }

    fn names(dir: &ManifestDir) -> Vec<String> {
        dir.objects()
            .services
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    s.metadata.name.as_deref().unwrap(),
                    s.spec.as_ref().unwrap().cluster_ip.as_deref().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn directory_keeps_last_good_version_and_drops_deleted_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "a.yaml", &service_yaml("a", "10.96.0.1"));
        write(dir, "b.yml", &service_yaml("b", "10.96.0.2"));
        write(dir, "notes.txt", "not a manifest");
        write(dir, ".a.yaml.swp", "garbage: [");
        fs::create_dir(dir.join("sub.yaml")).unwrap();

        let mut md = ManifestDir::new(dir);
        let report = md.reload();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(names(&md), ["a=10.96.0.1", "b=10.96.0.2"]);

        // A broken edit: reported (file and line), the last good content stays in effect.
        write(
            dir,
            "a.yaml",
            &service_yaml("a", "10.96.0.9").replace("ports: [", "ports: [[["),
        );
        let report = md.reload();
        assert_eq!(report.errors.len(), 1);
        let e = report.errors[0].to_string();
        assert!(
            e.starts_with(&format!("{}:", dir.join("a.yaml").display())),
            "{e}"
        );
        assert_eq!(names(&md), ["a=10.96.0.1", "b=10.96.0.2"]);
        // Reported again while it lasts.
        assert_eq!(md.reload().errors.len(), 1);

        // An invalid edit likewise.
        write(dir, "a.yaml", &service_yaml("a", "10.96.0.300"));
        let report = md.reload();
        assert_eq!(report.errors.len(), 1);
        assert!(
            report.errors[0].to_string().contains("spec.clusterIP"),
            "{}",
            report.errors[0]
        );
        assert_eq!(names(&md), ["a=10.96.0.1", "b=10.96.0.2"]);

        // Fixed: the new content is used.
        write(dir, "a.yaml", &service_yaml("a", "10.96.0.9"));
        assert!(md.reload().errors.is_empty());
        assert_eq!(names(&md), ["a=10.96.0.9", "b=10.96.0.2"]);

        // Deleted: its objects go.
        fs::remove_file(dir.join("b.yml")).unwrap();
        assert!(md.reload().errors.is_empty());
        assert_eq!(names(&md), ["a=10.96.0.9"]);

        // A new file that is broken from the start adds nothing.
        write(dir, "c.json", "{");
        let report = md.reload();
        assert_eq!(report.errors.len(), 1);
        assert_eq!(names(&md), ["a=10.96.0.9"]);
    }

    #[test]
    fn directory_reports_skips_and_duplicates_across_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "1.yaml", &service_yaml("a", "10.96.0.1"));
        write(
            dir,
            "2.yaml",
            &(service_yaml("a", "10.96.0.2")
                + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"),
        );
        let mut md = ManifestDir::new(dir);
        let report = md.reload();
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].kind, "Pod");
        assert_eq!(report.errors.len(), 1);
        assert_eq!(
            report.errors[0].to_string(),
            format!(
                "{}: Service default/a is also defined in {}, whose copy is used",
                dir.join("2.yaml").display(),
                dir.join("1.yaml").display()
            )
        );
        assert_eq!(names(&md), ["a=10.96.0.1"]);
    }

    #[test]
    fn a_missing_directory_is_reported_and_keeps_what_was_loaded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        fs::create_dir(&dir).unwrap();
        write(&dir, "a.yaml", &service_yaml("a", "10.96.0.1"));
        let mut md = ManifestDir::new(&dir);
        assert!(md.reload().errors.is_empty());
        fs::rename(&dir, tmp.path().join("elsewhere")).unwrap();
        let report = md.reload();
        assert!(matches!(report.errors[..], [ManifestError::Io { .. }]));
        assert_eq!(names(&md), ["a=10.96.0.1"]);
    }
}
