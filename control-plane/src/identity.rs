//! `weft.v1.Identity`: a proxy sends a CSR (its key stays with it) and its service's join token,
//! and gets back a short-lived SPIFFE X.509 SVID, its chain and the trust bundle.
//!
//! Checks, in order: names are DNS labels (`InvalidArgument`), the join credential entitles the
//! caller to `<namespace>/<service>` (`Unauthenticated`), the CSR parses and its signature
//! verifies (`InvalidArgument`), the CA's issuer outlives the requested certificate
//! (`FailedPrecondition`). The lifetime is the requested one capped at `--cert-ttl` (0 =
//! `--cert-ttl`).
//!
//! The join credential is either the HMAC join token of `<namespace>/<service>`
//! ([`crate::token`]) or, with `--k8s-jwks`, a projected Kubernetes ServiceAccount token (a JWT,
//! [`crate::token::kubernetes`]) of ServiceAccount `<namespace>:<service>`: a pod is certified
//! only as its own ServiceAccount.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use weft_proto::v1::identity_server::Identity;
use weft_proto::v1::{CertifyRequest, CertifyResponse};

use crate::ca::{Ca, SignError};
use crate::metrics::Metrics;
use crate::token::kubernetes::{looks_like_jwt, KubernetesTokens};

/// The Identity service; without a CA (no `--ca-dir`) every call fails with
/// `FailedPrecondition`.
#[derive(Debug, Clone)]
pub struct IdentityService {
    ca: Option<Arc<Ca>>,
    metrics: Metrics,
    kubernetes: Option<Arc<KubernetesTokens>>,
}

impl IdentityService {
    pub fn new(ca: Option<Arc<Ca>>, metrics: Metrics) -> Self {
        Self {
            ca,
            metrics,
            kubernetes: None,
        }
    }

    /// Also accepts projected Kubernetes ServiceAccount tokens verified by `tokens`.
    #[must_use]
    pub fn with_kubernetes_tokens(mut self, tokens: Option<Arc<KubernetesTokens>>) -> Self {
        self.kubernetes = tokens;
        self
    }

    /// Whether `token` entitles its bearer to `namespace/service`; the refusal says why not.
    fn authenticate(
        &self,
        ca: &Ca,
        namespace: &str,
        service: &str,
        token: &str,
    ) -> Result<(), String> {
        if !looks_like_jwt(token) {
            return if ca.token_secret().verify(namespace, service, token) {
                Ok(())
            } else {
                Err(format!(
                    "invalid join token for {namespace}/{service} (print the right one with `weft-control token --ca-dir DIR --namespace {namespace} --service {service}`)"
                ))
            };
        }
        let Some(kubernetes) = &self.kubernetes else {
            return Err(
                "a Kubernetes ServiceAccount token, but this control plane verifies none (start it with --k8s-jwks, --k8s-issuer and --k8s-audience)"
                    .to_owned(),
            );
        };
        let account = kubernetes.verify(token).map_err(|e| e.to_string())?;
        if account.namespace != namespace || account.name != service {
            return Err(format!(
                "the Kubernetes token is ServiceAccount {}/{}: it is certified only as namespace {:?} service {:?}, not {namespace}/{service} (the service of an injected pod is its ServiceAccount's name)",
                account.namespace, account.name, account.namespace, account.name
            ));
        }
        tracing::debug!(
            namespace,
            service_account = %account.name,
            pod = ?account.pod,
            "Kubernetes ServiceAccount token verified"
        );
        Ok(())
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
        if let Err(reason) = self.authenticate(ca, namespace, service, &req.token) {
            return Err(("unauthenticated", Status::unauthenticated(reason)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaConfig;
    use crate::token::kubernetes::testing::{claims, now, verifier, Issuer};

    fn request(namespace: &str, service: &str, token: &str) -> CertifyRequest {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        CertifyRequest {
            csr_pem: csr,
            token: token.to_owned(),
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            requested_ttl_seconds: 600,
        }
    }

    /// The Kubernetes path: a projected token certifies its own ServiceAccount only; the HMAC
    /// join token keeps working beside it.
    #[test]
    fn certify_takes_a_projected_token_for_its_own_service_account_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(&CaConfig::new(dir.path().join("ca"))).unwrap());
        let issuer = Issuer::ec("k1");
        let tokens = Arc::new(verifier(dir.path(), &[&issuer]));
        let metrics = Metrics::new().unwrap();
        let service = IdentityService::new(Some(Arc::clone(&ca)), metrics.clone())
            .with_kubernetes_tokens(Some(tokens));
        let token = issuer.sign(&claims("shop", "web", "weft", now() + 3600));

        let ok = service
            .certify_inner(&request("shop", "web", &token))
            .unwrap();
        assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");

        for (ns, svc) in [("shop", "payments"), ("default", "web")] {
            let (result, status) = service
                .certify_inner(&request(ns, svc, &token))
                .unwrap_err();
            assert_eq!(result, "unauthenticated");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(
                status.message().contains("ServiceAccount shop/web"),
                "{}",
                status.message()
            );
        }
        let expired = issuer.sign(&claims("shop", "web", "weft", now() - 600));
        let (_, status) = service
            .certify_inner(&request("shop", "web", &expired))
            .unwrap_err();
        assert!(status.message().contains("expired"), "{}", status.message());

        // The HMAC join token still works.
        let hmac = ca.token_secret().token("shop", "api");
        assert!(service
            .certify_inner(&request("shop", "api", &hmac))
            .is_ok());

        // Without --k8s-jwks a JWT is refused, saying so.
        let plain = IdentityService::new(Some(ca), metrics);
        let (_, status) = plain
            .certify_inner(&request("shop", "web", &token))
            .unwrap_err();
        assert!(
            status.message().contains("--k8s-jwks"),
            "{}",
            status.message()
        );
    }
}
