//! Admission of a proxy's registration: who may announce itself as an instance of which
//! service, at which address, with how much data.
//!
//! A discovery stream's `Hello` is a claim. With TLS gRPC (the default) the proxy must present
//! its SVID (the certificate `Identity.Certify` gave it) as a TLS client certificate: the service
//! and namespace come from that verified SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<service>`), and a
//! `Hello` that claims another is refused. Everything else in the `Hello` is bounded and parsed
//! here, before it reaches the registry, so one bad registration can never make every caller of
//! a service NACK (an unparsable `inbound_address`) or exceed its decode limit (huge labels).
//!
//! With `--insecure-grpc` there is no certificate to check: the claim is taken as made (the
//! sizes and formats are still checked). That is the one way to run without authenticated
//! registration, and the server says so loudly at start.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use weft_proto::v1::Node;
use weft_spiffe::SpiffeId;

/// Bounds on what one registration may carry, and on the registry as a whole.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A `Hello` must arrive this soon after the stream opens.
    pub hello_timeout: Duration,
    /// Longest `node.id`, bytes.
    pub max_id_len: usize,
    /// Most labels on one node.
    pub max_labels: usize,
    /// Longest label key, bytes.
    pub max_label_key_len: usize,
    /// Longest label value, bytes.
    pub max_label_value_len: usize,
    /// Most registrations (connected, or within their grace) in the registry.
    pub max_registrations: usize,
    /// Most registrations of one service (one identity).
    pub max_registrations_per_service: usize,
    /// The announced `inbound_address` must be on the IP the stream comes from (pods without
    /// NAT); off by default because loopback meshes and NATed hosts cannot satisfy it.
    pub require_peer_address: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            max_id_len: 253,
            max_labels: 32,
            max_label_key_len: 128,
            max_label_value_len: 256,
            max_registrations: 20_000,
            max_registrations_per_service: 5_000,
            require_peer_address: false,
        }
    }
}

/// Who is on the other end of a discovery stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A verified SVID of `namespace/service` in the control plane's trust domain.
    Workload { namespace: String, service: String },
    /// `--insecure-grpc`: nothing was verified.
    Unverified,
}

/// Why a registration was refused; each maps to a gRPC status and a metric reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("discovery requires this proxy's SVID as a TLS client certificate (get one from Identity.Certify with the service's join token)")]
    NoCertificate,
    #[error("client certificate: {0}")]
    BadCertificate(String),
    #[error("the client certificate is for {presented}, but the Hello claims {claimed}")]
    IdentityMismatch { presented: String, claimed: String },
    #[error("node id {id:?} is registered by {owner}; another identity cannot take it over")]
    IdTaken { id: String, owner: String },
    #[error("Hello.node.{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("registry full: {0}")]
    TooMany(String),
    #[error("no Hello within {0:?} of the stream opening")]
    HelloTimeout(Duration),
}

impl Refusal {
    /// The `reason` label of `weft_control_registrations_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate | Self::BadCertificate(_) => "unauthenticated",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::IdTaken { .. } => "id_taken",
            Self::Invalid { .. } => "invalid",
            Self::TooMany(_) => "too_many",
            Self::HelloTimeout(_) => "hello_timeout",
        }
    }

    /// The gRPC status the stream ends with.
    pub fn status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Self::NoCertificate | Self::BadCertificate(_) => {
                tonic::Status::unauthenticated(message)
            }
            Self::IdentityMismatch { .. } | Self::IdTaken { .. } => {
                tonic::Status::permission_denied(message)
            }
            Self::Invalid { .. } => tonic::Status::invalid_argument(message),
            Self::TooMany(_) => tonic::Status::resource_exhausted(message),
            Self::HelloTimeout(_) => tonic::Status::deadline_exceeded(message),
        }
    }
}

/// Every `reason` label value, so the series exist from the start.
pub const REFUSAL_REASONS: [&str; 6] = [
    "unauthenticated",
    "identity_mismatch",
    "id_taken",
    "invalid",
    "too_many",
    "hello_timeout",
];

/// The caller behind a TLS client certificate chain (leaf first) that rustls already verified
/// against the trust bundle: its SPIFFE ID must be a workload ID of `trust_domain`.
pub fn caller_from_chain(leaf_der: Option<&[u8]>, trust_domain: &str) -> Result<Caller, Refusal> {
    let leaf = leaf_der.ok_or(Refusal::NoCertificate)?;
    let id =
        weft_spiffe::from_cert_der(leaf).map_err(|e| Refusal::BadCertificate(e.to_string()))?;
    caller_from_id(&id, trust_domain)
}

/// [`caller_from_chain`] once the SPIFFE ID is read.
pub fn caller_from_id(id: &SpiffeId, trust_domain: &str) -> Result<Caller, Refusal> {
    if id.trust_domain() != trust_domain {
        return Err(Refusal::BadCertificate(format!(
            "{id} is not in the trust domain {trust_domain:?}"
        )));
    }
    let Some((namespace, service)) = id.workload() else {
        return Err(Refusal::BadCertificate(format!(
            "{id} is not a workload identity (spiffe://{trust_domain}/ns/<namespace>/sa/<service>)"
        )));
    };
    Ok(Caller::Workload {
        namespace: namespace.to_owned(),
        service: service.to_owned(),
    })
}

fn invalid(field: &str, reason: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Printable ASCII without spaces: what ids, label keys and values may hold.
fn printable(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

fn socket_addr(field: &str, value: &str, required: bool) -> Result<Option<SocketAddr>, Refusal> {
    if value.is_empty() {
        return if required {
            Err(invalid(field, "required (ip:port)"))
        } else {
            Ok(None)
        };
    }
    if value.len() > 64 {
        return Err(invalid(field, "longer than 64 bytes"));
    }
    value
        .parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| invalid(field, format!("{value:?} is not ip:port")))
}

/// Most `app_ports` one node may announce.
pub const MAX_APP_PORTS: usize = 64;

/// Transparent mode's fields: `instance_ip` an address callers can reach (with
/// `--require-peer-address`, the inbound address's IP, itself checked against the stream's),
/// `app_ports` distinct ports `1..=65535`, at most [`MAX_APP_PORTS`], and only with an
/// `instance_ip`.
fn transparent(node: &Node, limits: &Limits) -> Result<(), Refusal> {
    if node.instance_ip.is_empty() {
        if !node.app_ports.is_empty() {
            return Err(invalid("app_ports", "given without an instance_ip"));
        }
        return Ok(());
    }
    let ip: IpAddr = node.instance_ip.parse().map_err(|_| {
        invalid(
            "instance_ip",
            format!("{:.64?} is not an IP address", node.instance_ip),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(
            "instance_ip",
            format!("{ip} is not an address callers can reach"),
        ));
    }
    if limits.require_peer_address {
        let inbound = node.inbound_address.parse::<SocketAddr>().ok();
        if inbound.is_some_and(|a| a.ip() != ip) {
            return Err(invalid(
                "instance_ip",
                format!("{ip} is not the inbound address's IP; --require-peer-address is on"),
            ));
        }
    }
    if node.app_ports.len() > MAX_APP_PORTS {
        return Err(invalid(
            "app_ports",
            format!(
                "{} ports, at most {MAX_APP_PORTS} allowed",
                node.app_ports.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &node.app_ports {
        if !(1..=65535).contains(p) {
            return Err(invalid(
                "app_ports",
                format!("{p} is not a port (1..=65535)"),
            ));
        }
        if !seen.insert(*p) {
            return Err(invalid("app_ports", format!("port {p} is listed twice")));
        }
    }
    Ok(())
}

/// Checks `node` (from a `Hello`) against `caller` and `limits`; returns the node to register:
/// service and namespace taken from the verified identity, namespace defaulted. `peer` is the
/// address the stream comes from.
pub fn admit(
    mut node: Node,
    caller: &Caller,
    peer: Option<SocketAddr>,
    limits: &Limits,
) -> Result<Node, Refusal> {
    if node.id.is_empty() {
        return Err(invalid("id", "required"));
    }
    if node.id.len() > limits.max_id_len {
        return Err(invalid(
            "id",
            format!("longer than {} bytes", limits.max_id_len),
        ));
    }
    if !printable(&node.id) {
        return Err(invalid("id", "only printable ASCII without spaces"));
    }
    if node.namespace.is_empty() {
        node.namespace = match caller {
            Caller::Workload { namespace, .. } => namespace.clone(),
            Caller::Unverified => "default".to_owned(),
        };
    }
    if let Caller::Workload { namespace, service } = caller {
        if node.service.is_empty() {
            node.service = service.clone();
        }
        if &node.service != service || &node.namespace != namespace {
            return Err(Refusal::IdentityMismatch {
                presented: format!("{namespace}/{service}"),
                claimed: format!("{}/{}", node.namespace, node.service),
            });
        }
    }
    for (field, value) in [("service", &node.service), ("namespace", &node.namespace)] {
        if value.is_empty() {
            return Err(invalid(field, "required"));
        }
        if !crate::ca::valid_name(value) {
            return Err(invalid(
                field,
                format!("{value:.64?} is not a DNS label ([a-z0-9-], at most 63)"),
            ));
        }
    }
    let inbound = socket_addr("inbound_address", &node.inbound_address, true)?
        .unwrap_or_else(|| unreachable!("required"));
    if inbound.ip().is_unspecified() || inbound.port() == 0 {
        return Err(invalid(
            "inbound_address",
            format!("{inbound} is not an address callers can reach"),
        ));
    }
    if limits.require_peer_address {
        match peer {
            Some(p) if p.ip() == inbound.ip() => {}
            Some(p) => {
                return Err(invalid(
                    "inbound_address",
                    format!(
                        "{inbound} is not on the address the stream comes from ({}); --require-peer-address is on",
                        p.ip()
                    ),
                ))
            }
            None => {
                return Err(invalid(
                    "inbound_address",
                    "the stream's peer address is unknown; --require-peer-address is on",
                ))
            }
        }
    }
    socket_addr("outbound_address", &node.outbound_address, false)?;
    socket_addr("app_address", &node.app_address, false)?;
    if !node.tcp_bind_ip.is_empty() && node.tcp_bind_ip.parse::<IpAddr>().is_err() {
        return Err(invalid(
            "tcp_bind_ip",
            format!("{:.64?} is not an IP address", node.tcp_bind_ip),
        ));
    }
    transparent(&node, limits)?;
    if node.build_version.len() > 64 || !printable(&node.build_version) {
        return Err(invalid(
            "build_version",
            "at most 64 bytes of printable ASCII",
        ));
    }
    if node.labels.len() > limits.max_labels {
        return Err(invalid(
            "labels",
            format!(
                "{} labels, at most {} allowed",
                node.labels.len(),
                limits.max_labels
            ),
        ));
    }
    for (key, value) in &node.labels {
        if key.is_empty() || key.len() > limits.max_label_key_len || !printable(key) {
            return Err(invalid(
                "labels",
                format!(
                    "key {key:.64?}: 1 to {} bytes of printable ASCII",
                    limits.max_label_key_len
                ),
            ));
        }
        if value.len() > limits.max_label_value_len || !printable(value) {
            return Err(invalid(
                &format!("labels[{key}]"),
                format!(
                    "at most {} bytes of printable ASCII",
                    limits.max_label_value_len
                ),
            ));
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::node;

    fn web() -> Caller {
        Caller::Workload {
            namespace: "default".into(),
            service: "web".into(),
        }
    }

    #[test]
    fn identity_decides_service_and_namespace() {
        let n = admit(
            node("web-1", "", "127.0.0.2:15006"),
            &web(),
            None,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(
            (n.service.as_str(), n.namespace.as_str()),
            ("web", "default")
        );
        let e = admit(
            node("web-1", "api", "127.0.0.2:15006"),
            &web(),
            None,
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "identity_mismatch");
        assert_eq!(e.status().code(), tonic::Code::PermissionDenied);
        let mut other_ns = node("web-1", "web", "127.0.0.2:15006");
        other_ns.namespace = "prod".into();
        assert_eq!(
            admit(other_ns, &web(), None, &Limits::default())
                .unwrap_err()
                .reason(),
            "identity_mismatch"
        );
    }

    #[test]
    fn malformed_and_oversized_nodes_are_refused() {
        let limits = Limits::default();
        let check = |n: Node| admit(n, &web(), None, &limits).unwrap_err();
        assert!(check(node("", "web", "127.0.0.2:1"))
            .to_string()
            .contains("id"));
        assert!(check(node(&"x".repeat(254), "web", "127.0.0.2:1"))
            .to_string()
            .contains("253"));
        assert!(check(node("a b", "web", "127.0.0.2:1"))
            .to_string()
            .contains("id"));
        for bad in [
            "",
            "nonsense",
            "127.0.0.1",
            "0.0.0.0:80",
            "127.0.0.1:0",
            "[::1]",
        ] {
            let e = check(node("w", "web", bad));
            assert!(e.to_string().contains("inbound_address"), "{bad}: {e}");
        }
        let mut n = node("w", "web", "127.0.0.2:1");
        n.app_address = "app:80".into();
        assert!(check(n).to_string().contains("app_address"));
        let mut n = node("w", "web", "127.0.0.2:1");
        n.tcp_bind_ip = "x".into();
        assert!(check(n).to_string().contains("tcp_bind_ip"));
        let mut n = node("w", "web", "127.0.0.2:1");
        n.labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check(n).to_string().contains("33 labels"));
        let mut n = node("w", "web", "127.0.0.2:1");
        n.labels.insert("zone".into(), "z".repeat(10_000));
        assert!(check(n).to_string().contains("labels[zone]"));
        let mut n = node("w", "web", "127.0.0.2:1");
        n.labels.insert("bad key".into(), "v".into());
        assert_eq!(check(n).reason(), "invalid");
        let n = node("w", "Web", "127.0.0.2:1");
        assert_eq!(
            admit(n, &Caller::Unverified, None, &limits)
                .unwrap_err()
                .reason(),
            "invalid"
        );
    }

    #[test]
    fn transparent_fields_are_bounded() {
        let limits = Limits::default();
        let check = |n: Node| admit(n, &web(), None, &limits);
        let mut n = node("w", "web", "10.0.0.2:15006");
        n.instance_ip = "10.0.0.2".into();
        n.app_ports = vec![8080, 9000];
        assert!(check(n.clone()).is_ok());
        for (ip, ports, field) in [
            ("x", vec![], "instance_ip"),
            ("0.0.0.0", vec![], "instance_ip"),
            ("", vec![80], "app_ports"),
            ("10.0.0.2", vec![0], "app_ports"),
            ("10.0.0.2", vec![70000], "app_ports"),
            ("10.0.0.2", vec![80, 80], "app_ports"),
            ("10.0.0.2", (1..=65).collect(), "app_ports"),
        ] {
            let mut bad = n.clone();
            bad.instance_ip = ip.into();
            bad.app_ports = ports;
            let e = check(bad).unwrap_err();
            assert!(e.to_string().contains(field), "{ip}: {e}");
            assert_eq!(e.reason(), "invalid");
        }
        let strict = Limits {
            require_peer_address: true,
            ..Limits::default()
        };
        let peer: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        assert!(admit(n.clone(), &web(), Some(peer), &strict).is_ok());
        n.instance_ip = "10.0.0.3".into();
        assert!(admit(n, &web(), Some(peer), &strict)
            .unwrap_err()
            .to_string()
            .contains("instance_ip"));
    }

    #[test]
    fn peer_address_is_checked_when_asked() {
        let limits = Limits {
            require_peer_address: true,
            ..Limits::default()
        };
        let peer: SocketAddr = "127.0.0.2:40000".parse().unwrap();
        assert!(admit(
            node("w", "web", "127.0.0.2:15006"),
            &web(),
            Some(peer),
            &limits
        )
        .is_ok());
        let e = admit(
            node("w", "web", "127.0.0.9:15006"),
            &web(),
            Some(peer),
            &limits,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--require-peer-address"), "{e}");
        assert!(admit(
            node("w", "web", "127.0.0.9:15006"),
            &web(),
            Some(peer),
            &Limits::default()
        )
        .is_ok());
    }

    #[test]
    fn certificates_must_be_workloads_of_our_trust_domain() {
        let ok = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/api").unwrap();
        assert_eq!(
            caller_from_id(&ok, "cluster.local").unwrap(),
            Caller::Workload {
                namespace: "prod".into(),
                service: "api".into()
            }
        );
        assert!(caller_from_id(&ok, "example.org").is_err());
        let admin = SpiffeId::parse("spiffe://cluster.local/admin/write/alice").unwrap();
        assert!(caller_from_id(&admin, "cluster.local").is_err());
        assert_eq!(
            caller_from_chain(None, "cluster.local").unwrap_err(),
            Refusal::NoCertificate
        );
        assert_eq!(
            caller_from_chain(Some(b"garbage"), "cluster.local")
                .unwrap_err()
                .reason(),
            "unauthenticated"
        );
    }
}
