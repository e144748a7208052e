use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::{SpiffeError, SpiffeId};

/// Returns the SPIFFE ID of a DER-encoded X.509-SVID.
///
/// The certificate must have exactly one URI subjectAltName (SPIFFE
/// X.509-SVID spec, section 2) and it must be a valid workload SPIFFE ID.
/// A certificate with two URI SANs is rejected even if only one is
/// `spiffe://`, because the spec forbids it and a peer presenting it is
/// either misconfigured or trying to confuse a verifier.
///
/// This does not verify the certificate; see the crate docs.
pub fn from_cert_der(der: &[u8]) -> Result<SpiffeId, SpiffeError> {
    let cert = parse(der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SpiffeError::BadCertificate(format!("subjectAltName: {e}")))?
        .ok_or(SpiffeError::Missing)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SpiffeError::Missing),
        // URI schemes are case-insensitive, so `SPIFFE://...` is a SPIFFE ID
        // with a bad scheme (reported as such), not a missing one.
        [uri] if has_spiffe_scheme(uri) => SpiffeId::parse(uri),
        [_] => Err(SpiffeError::Missing),
        _ => Err(SpiffeError::Ambiguous(
            uris.iter().map(|u| (*u).to_owned()).collect(),
        )),
    }
}

/// Returns the certificate's `(notBefore, notAfter)` as Unix seconds.
pub fn validity(der: &[u8]) -> Result<(i64, i64), SpiffeError> {
    let cert = parse(der)?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SpiffeError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SpiffeError::BadCertificate(e.to_string()))?;
    // Trailing bytes mean the caller passed something other than one
    // certificate (e.g. a chain); accepting it would silently ignore data.
    if !rest.is_empty() {
        return Err(SpiffeError::BadCertificate(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"))
}
