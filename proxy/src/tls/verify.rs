//! Certificate verifiers for mesh mTLS.
//!
//! Both sides verify the peer's chain against the current [`TrustBundle`] (read per handshake,
//! so trust changes need no restart) and read its single `spiffe://` URI SAN, which must be in
//! the bundle's trust domain:
//!
//! - [`MeshClientVerifier`] (inbound, server side): any mesh identity may connect; the identity
//!   is read back from the session afterwards for authorization and `x-weft-peer-identity`.
//! - [`MeshServerVerifier`] (outbound, client side): the server must be exactly the identity the
//!   control plane said the endpoint runs (`Endpoint.identity`). Host names play no part.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError};

use super::spiffe::{SpiffeError, SpiffeId};
use super::trust::TrustStore;

/// Why a peer's certificate was refused beyond chain validation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No trust bundle yet (no certificate issued, no `TRUST` resource).
    #[error("no trust bundle yet")]
    NoTrust,
    /// The certificate carries no usable SPIFFE ID.
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// The identity is in another trust domain.
    #[error("peer identity {got} is not in trust domain {expected}")]
    ForeignDomain {
        /// Our trust domain.
        expected: String,
        /// The peer's identity.
        got: String,
    },
    /// The server is not the identity the control plane said the endpoint runs.
    #[error("server identity {got} is not the expected {expected}")]
    WrongIdentity {
        /// `Endpoint.identity`.
        expected: String,
        /// What the server presented.
        got: String,
    },
}

fn other(e: PeerError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(ce)
}

/// Verifies `end_entity` (+ `intermediates`) against the current bundle for `usage` and returns
/// the peer's SPIFFE ID, which must be in the bundle's trust domain.
pub fn verify_peer(
    trust: &TrustStore,
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Error> {
    let bundle = trust.load().ok_or_else(|| other(PeerError::NoTrust))?;
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        algs.all,
        &bundle.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    let id = super::spiffe::from_cert(end_entity).map_err(|e| other(e.into()))?;
    if id.trust_domain() != bundle.trust_domain {
        return Err(other(PeerError::ForeignDomain {
            expected: bundle.trust_domain.clone(),
            got: id.to_string(),
        }));
    }
    Ok(id)
}

/// Inbound: requires a client certificate chained to the trust bundle with a mesh identity.
#[derive(Debug)]
pub struct MeshClientVerifier {
    trust: Arc<TrustStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl MeshClientVerifier {
    /// A verifier reading `trust` per handshake.
    pub fn new(trust: Arc<TrustStore>, algs: WebPkiSupportedAlgorithms) -> Self {
        Self { trust, algs }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; our clients have exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_peer(
            &self.trust,
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Outbound: the server must chain to the trust bundle and be exactly `expected`.
#[derive(Debug)]
pub struct MeshServerVerifier {
    trust: Arc<TrustStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
}

impl MeshServerVerifier {
    /// A verifier expecting the server to be `expected`.
    pub fn new(
        trust: Arc<TrustStore>,
        algs: WebPkiSupportedAlgorithms,
        expected: SpiffeId,
    ) -> Self {
        Self {
            trust,
            algs,
            expected,
        }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify_peer(
            &self.trust,
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if id != self.expected {
            return Err(other(PeerError::WrongIdentity {
                expected: self.expected.to_string(),
                got: id.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}
