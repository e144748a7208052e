//! SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<service>`) and reading them from the
//! URI SAN of an X.509 certificate.

use std::fmt;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A mesh workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    trust_domain_len: usize,
    namespace: Option<(usize, usize)>,
}

/// Why a string or certificate does not carry a usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// Not `spiffe://<domain>/<path>`.
    #[error("{0:?} is not a spiffe://<trust-domain>/<path> URI")]
    Malformed(String),
    /// The certificate could not be parsed.
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    /// The certificate has no `spiffe://` URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    Missing,
    /// The certificate has several `spiffe://` URI SANs (SPIFFE allows exactly one).
    #[error("certificate has more than one spiffe:// URI SAN")]
    Ambiguous,
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>/<path>`; the namespace is read from a `/ns/<ns>/` path.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let malformed = || SpiffeError::Malformed(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let (domain, path) = rest.split_once('/').ok_or_else(malformed)?;
        if domain.is_empty() || path.is_empty() || domain.contains(['@', ':', '?', '#']) {
            return Err(malformed());
        }
        let path_start = "spiffe://".len() + domain.len() + 1;
        let mut namespace = None;
        let segments: Vec<&str> = path.split('/').collect();
        if segments.len() >= 2 && segments[0] == "ns" && !segments[1].is_empty() {
            let start = path_start + "ns/".len();
            namespace = Some((start, start + segments[1].len()));
        }
        Ok(Self {
            uri: uri.to_owned(),
            trust_domain_len: domain.len(),
            namespace,
        })
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        let start = "spiffe://".len();
        &self.uri[start..start + self.trust_domain_len]
    }

    /// The `ns` path segment, if the ID has the `/ns/<ns>/...` shape.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.map(|(a, b)| &self.uri[a..b])
    }

    /// Reads the single `spiffe://` URI SAN of a DER certificate.
    pub fn from_cert(der: &CertificateDer<'_>) -> Result<Self, SpiffeError> {
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| SpiffeError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| SpiffeError::BadCertificate(e.to_string()))?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    if found.is_some() {
                        return Err(SpiffeError::Ambiguous);
                    }
                    found = Some(Self::parse(uri)?);
                }
            }
        }
        found.ok_or(SpiffeError::Missing)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// `notBefore` and `notAfter` of a DER certificate, as Unix seconds.
pub fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), SpiffeError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| SpiffeError::BadCertificate(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mesh_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("prod"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/prod/sa/web");
        let other = SpiffeId::parse("spiffe://example.org/workload").unwrap();
        assert_eq!(other.namespace(), None);
    }

    #[test]
    fn rejects_non_spiffe() {
        for bad in [
            "https://x/y",
            "spiffe://",
            "spiffe://domain",
            "spiffe:///ns/a",
            "spiffe://u@d/x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_uri_san() {
        let ca = crate::tls::testing::TestCa::new("cluster.local");
        let leaf = ca.leaf("spiffe://cluster.local/ns/default/sa/web", 60);
        let id = SpiffeId::from_cert(&leaf.chain[0]).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        let (nb, na) = validity(&leaf.chain[0]).unwrap();
        assert!(na - nb >= 60, "{nb} {na}");
        assert_eq!(
            SpiffeId::from_cert(&ca.root_der()).unwrap_err(),
            SpiffeError::Missing
        );
    }
}
