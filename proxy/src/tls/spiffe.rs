//! SPIFFE IDs for the proxy: the shared `weft-spiffe` parser (the SPIFFE spec's rules, the same
//! bytes the control plane accepts), read from rustls' certificate type.

use rustls_pki_types::CertificateDer;

pub use weft_spiffe::{SpiffeError, SpiffeId};

/// Reads the single `spiffe://` URI SAN of a DER certificate (already verified by rustls).
pub fn from_cert(der: &CertificateDer<'_>) -> Result<SpiffeId, SpiffeError> {
    weft_spiffe::from_cert_der(der.as_ref())
}

/// `notBefore` and `notAfter` of a DER certificate, as Unix seconds.
pub fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), SpiffeError> {
    weft_spiffe::validity(der.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_uri_san() {
        let ca = crate::tls::testing::TestCa::new("cluster.local");
        let leaf = ca.leaf("spiffe://cluster.local/ns/default/sa/web", 60);
        let id = from_cert(&leaf.chain[0]).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.namespace(), Some("default"));
        let (nb, na) = validity(&leaf.chain[0]).unwrap();
        assert!(na - nb >= 60, "{nb} {na}");
        assert_eq!(from_cert(&ca.root_der()).unwrap_err(), SpiffeError::Missing);
    }
}
