//! `weft.v1.Identity`: a proxy sends a CSR (its key stays with it) and its service's join token,
//! and gets back a short-lived SPIFFE X.509 SVID, its chain and the trust bundle.
//!
//! Checks, in order: names are DNS labels (`InvalidArgument`), the join token is the one of
//! `<namespace>/<service>` (`Unauthenticated`), the CSR parses and its signature verifies
//! (`InvalidArgument`), the CA's issuer outlives the requested certificate (`FailedPrecondition`).
//! The lifetime is the requested one capped at `--cert-ttl` (0 = `--cert-ttl`).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use weft_proto::v1::identity_server::Identity;
use weft_proto::v1::{CertifyRequest, CertifyResponse};

use crate::ca::{Ca, SignError};
use crate::metrics::Metrics;

/// The Identity service; without a CA (no `--ca-dir`) every call fails with
/// `FailedPrecondition`.
#[derive(Debug, Clone)]
pub struct IdentityService {
    ca: Option<Arc<Ca>>,
    metrics: Metrics,
}

impl IdentityService {
    pub fn new(ca: Option<Arc<Ca>>, metrics: Metrics) -> Self {
        Self { ca, metrics }
    }

    fn count(&self, result: &str) {
        self.metrics
            .certificates_issued_total
            .with_label_values(&[result])
            .inc();
    }

    /// Certify without the gRPC wrapping (the metrics are counted by the caller).
    fn certify_inner(
        &self,
        req: &CertifyRequest,
    ) -> Result<CertifyResponse, (&'static str, Status)> {
        let Some(ca) = &self.ca else {
            return Err((
                "error",
                Status::failed_precondition(
                    "identity is disabled: weft-control runs without --ca-dir",
                ),
            ));
        };
        let namespace = if req.namespace.is_empty() {
            "default"
        } else {
            req.namespace.as_str()
        };
        let service = req.service.as_str();
        for (what, value) in [("namespace", namespace), ("service", service)] {
            if !crate::ca::valid_name(value) {
                return Err((
                    "invalid",
                    Status::invalid_argument(
                        SignError::InvalidName {
                            what,
                            value: value.to_owned(),
                        }
                        .to_string(),
                    ),
                ));
            }
        }
        if !ca.token_secret().verify(namespace, service, &req.token) {
            return Err((
                "unauthenticated",
                Status::unauthenticated(format!(
                    "invalid join token for {namespace}/{service} (print the right one with `weft-control token --ca-dir DIR --namespace {namespace} --service {service}`)"
                )),
            ));
        }
        let ttl = Duration::from_secs(req.requested_ttl_seconds);
        let issued = ca
            .sign_csr(&req.csr_pem, namespace, service, Some(ttl))
            .map_err(|e| match e {
                SignError::InvalidName { .. } | SignError::InvalidCsr(_) => {
                    ("invalid", Status::invalid_argument(e.to_string()))
                }
                SignError::IssuerExpired { .. } | SignError::IssuerExpiresFirst { .. } => {
                    ("refused", Status::failed_precondition(e.to_string()))
                }
                SignError::Sign(_) => ("error", Status::internal(e.to_string())),
            })?;
        Ok(CertifyResponse {
            cert_chain_pem: issued.chain_pem,
            roots_pem: ca.roots_pem(),
            spiffe_id: issued.spiffe_id,
            not_after_unix: issued.not_after.unix_timestamp(),
            trust_domain: ca.trust_domain().to_owned(),
        })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        // Signing is a few hundred microseconds of CPU: not worth a blocking-pool hop.
        match self.certify_inner(&req) {
            Ok(resp) => {
                self.count("ok");
                tracing::info!(
                    spiffe_id = %resp.spiffe_id,
                    not_after = resp.not_after_unix,
                    peer = ?peer,
                    "issued a certificate"
                );
                Ok(Response::new(resp))
            }
            Err((result, status)) => {
                self.count(result);
                tracing::warn!(
                    namespace = %req.namespace,
                    service = %req.service,
                    peer = ?peer,
                    code = ?status.code(),
                    "certify refused: {}",
                    status.message()
                );
                Err(status)
            }
        }
    }
}
