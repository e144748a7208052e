//! Getting and renewing this proxy's certificate.
//!
//! The key pair (ECDSA P-256) and its CSR are generated locally; the private key never leaves the
//! process. `Identity.Certify` (authenticated by the join token) returns the chain, the roots and
//! the SPIFFE ID. The new certificate is swapped into the [`CertStore`] for new handshakes and
//! `weft_cert_expiry_timestamp_seconds` is set to its notAfter.
//!
//! Schedule: renew at ~2/3 of the lifetime (±5% jitter so a fleet started together does not renew
//! together); a failed attempt is retried with jittered exponential backoff, never waiting more
//! than a third of the remaining validity, so several attempts happen before expiry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use weft_proto::v1;
use weft_proto::v1::identity_client::IdentityClient;

use super::certs::{Issued, IssuedError};
use super::trust::{TrustBundle, TrustError};
use super::MeshTls;
use crate::discovery::Backoff;

/// Shortest wait before a renewal, whatever the lifetime (guards against a renewal loop).
const MIN_RENEW_DELAY: Duration = Duration::from_millis(250);

/// Why an attempt to get a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// Generating the key or the CSR failed.
    #[error("generating key/CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The control plane refused or could not be reached.
    #[error("Identity.Certify: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The returned chain is not PEM.
    #[error("cert_chain_pem: {0}")]
    ChainPem(String),
    /// The returned certificate is unusable.
    #[error(transparent)]
    Issued(#[from] IssuedError),
    /// The returned roots are unusable.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The join token file cannot be read.
    #[error("join_token_file {0}")]
    Token(String),
    /// The channel to the control plane cannot be set up.
    #[error("control-plane channel: {0}")]
    Channel(String),
}

/// Where the join token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// Given inline (bootstrap `join_token`).
    Inline(String),
    /// Read, trimmed, before every request (bootstrap `join_token_file`): a rotated token file
    /// is picked up without a restart.
    File(PathBuf),
}

impl TokenSource {
    fn read(&self) -> Result<String, RenewError> {
        match self {
            Self::Inline(t) => Ok(t.clone()),
            Self::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .map_err(|e| RenewError::Token(format!("{}: {e}", p.display()))),
        }
    }
}

/// Makes the gRPC channel to the control plane (called again after a transport failure, so a CA
/// file that appears or changes later is picked up).
pub type ChannelFactory = Box<dyn Fn() -> Result<Channel, String> + Send + Sync>;

/// Who to ask for which identity.
#[derive(Debug, Clone)]
pub struct CertifyParams {
    /// The join token.
    pub token: TokenSource,
    /// The service this sidecar fronts.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Requested lifetime; `None` = the control plane's default.
    pub ttl: Option<Duration>,
}

/// The renewal task.
pub struct Renewer {
    tls: Arc<MeshTls>,
    connect: ChannelFactory,
    client: Option<IdentityClient<Channel>>,
    params: CertifyParams,
}

impl std::fmt::Debug for Renewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewer")
            .field("service", &self.params.service)
            .field("namespace", &self.params.namespace)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// When (Unix ms) a certificate received at `received_ms` and valid until `not_after` (Unix s)
/// should be renewed: 2/3 of its remaining lifetime, moved by `jitter` (in -1..=1) times 5% of
/// it. The lifetime is counted from receipt, not `notBefore`: CAs backdate `notBefore` for clock
/// skew, which would make short lifetimes look mostly spent.
pub fn renew_at_ms(received_ms: i64, not_after: i64, jitter: f64) -> i64 {
    let nb = received_ms;
    let lifetime = not_after.saturating_mul(1000).saturating_sub(nb).max(0);
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    let jitter_ms = (lifetime as f64 * 0.05 * jitter.clamp(-1.0, 1.0)) as i64;
    nb + lifetime * 2 / 3 + jitter_ms
}

/// How long to wait before retrying after a failure: the backoff's delay, but at most a third of
/// the time the current certificate has left (if any).
pub fn retry_delay(backoff: Duration, expires_in_ms: Option<i64>) -> Duration {
    match expires_in_ms {
        Some(left) if left > 0 => {
            let third = Duration::from_millis(u64::try_from(left / 3).unwrap_or(0));
            backoff.min(third).max(Duration::from_millis(100))
        }
        _ => backoff,
    }
}

impl Renewer {
    /// A renewer calling `Identity.Certify` on channels from `connect` and installing into
    /// `tls`.
    pub fn new(tls: Arc<MeshTls>, connect: ChannelFactory, params: CertifyParams) -> Self {
        Self {
            tls,
            connect,
            client: None,
            params,
        }
    }

    /// One attempt: key, CSR, `Certify`, install. Returns when it was received (Unix ms) and the
    /// certificate's notAfter (Unix s).
    pub async fn certify(&mut self) -> Result<(i64, i64), RenewError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr_pem = CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        let req = v1::CertifyRequest {
            csr_pem,
            token: self.params.token.read()?,
            service: self.params.service.clone(),
            namespace: self.params.namespace.clone(),
            requested_ttl_seconds: self.params.ttl.map_or(0, |d| d.as_secs().max(1)),
        };
        let client = match &mut self.client {
            Some(c) => c,
            None => self.client.insert(IdentityClient::new(
                (self.connect)().map_err(RenewError::Channel)?,
            )),
        };
        let resp = match client.certify(req).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if status.code() == tonic::Code::Unavailable {
                    // Transport trouble: make a new channel next time (re-reading the CA file).
                    self.client = None;
                }
                return Err(status.into());
            }
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(resp.cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| RenewError::ChainPem(e.to_string()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let issued = Issued::new(chain, &key)?;
        if !resp.spiffe_id.is_empty() && resp.spiffe_id != issued.id.as_str() {
            return Err(IssuedError::WrongIdentity {
                expected: resp.spiffe_id,
                got: issued.id.to_string(),
            }
            .into());
        }
        let domain = if resp.trust_domain.is_empty() {
            issued.id.trust_domain().to_owned()
        } else {
            resp.trust_domain.clone()
        };
        if !resp.roots_pem.is_empty() {
            let bundle = TrustBundle::from_pem(&domain, &resp.roots_pem)?;
            self.tls.trust().set_certify(&bundle);
        }
        let validity = (now_ms(), issued.not_after);
        tracing::info!(
            identity = %issued.id,
            not_after = issued.not_after,
            "certificate installed"
        );
        #[allow(clippy::cast_precision_loss)]
        self.tls.metrics().cert_expiry.set(issued.not_after as f64);
        #[allow(clippy::cast_precision_loss)]
        self.tls
            .metrics()
            .cert_issued
            .set(validity.0 as f64 / 1000.0);
        self.tls.certs().install(issued);
        Ok(validity)
    }

    /// Gets a certificate, then keeps renewing it, forever.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let delay = match self.certify().await {
                Ok((nb, na)) => {
                    self.tls.metrics().renewal(true);
                    backoff.reset();
                    let jitter = rand::rng().random_range(-1.0..=1.0);
                    let wait = renew_at_ms(nb, na, jitter).saturating_sub(now_ms());
                    Duration::from_millis(u64::try_from(wait).unwrap_or(0)).max(MIN_RENEW_DELAY)
                }
                Err(e) => {
                    self.tls.metrics().renewal(false);
                    let left = self
                        .tls
                        .certs()
                        .load()
                        .map(|i| i.not_after.saturating_mul(1000).saturating_sub(now_ms()));
                    let delay = retry_delay(backoff.next_delay(), left);
                    tracing::warn!(error = %e, retry_in = ?delay, cert_expires_in_ms = ?left, "certificate request failed");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_with_bounded_jitter() {
        assert_eq!(renew_at_ms(1_000_000, 1030, 0.0), 1_020_000);
        // 5% of 30s = 1.5s either way.
        assert_eq!(renew_at_ms(1_000_000, 1030, 1.0), 1_021_500);
        assert_eq!(renew_at_ms(1_000_000, 1030, -1.0), 1_018_500);
        assert_eq!(renew_at_ms(1_000_000, 1030, 7.0), 1_021_500);
        // Short test lifetimes stay well inside the validity.
        let at = renew_at_ms(0, 3, 1.0);
        assert!(at > 1_500 && at < 3_000, "{at}");
        // Already expired: renew now.
        assert!(renew_at_ms(5_000, 3, 0.0) <= 5_000);
    }

    #[test]
    fn retries_before_expiry() {
        let b = Duration::from_secs(20);
        assert_eq!(retry_delay(b, None), b);
        assert_eq!(retry_delay(b, Some(3_000)), Duration::from_millis(1_000));
        assert_eq!(retry_delay(b, Some(90_000)), b);
        assert_eq!(retry_delay(b, Some(30)), Duration::from_millis(100));
        assert_eq!(retry_delay(b, Some(-5)), b);
    }
}

#[cfg(test)]
mod service_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use weft_proto::v1;
    use weft_proto::v1::identity_server::{Identity, IdentityServer};

    use super::*;
    use crate::tls::metrics::SecurityMetrics;
    use crate::tls::testing::TestCa;

    struct FakeIdentity {
        ca: TestCa,
        ttl: i64,
        calls: Arc<AtomicUsize>,
        fail_first: usize,
    }

    #[tonic::async_trait]
    impl Identity for FakeIdentity {
        async fn certify(
            &self,
            req: tonic::Request<v1::CertifyRequest>,
        ) -> Result<tonic::Response<v1::CertifyResponse>, tonic::Status> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail_first {
                return Err(tonic::Status::unavailable("not yet"));
            }
            let r = req.into_inner();
            if r.token != "secret" {
                return Err(tonic::Status::unauthenticated("bad token"));
            }
            let id = format!("spiffe://cluster.local/ns/{}/sa/{}", r.namespace, r.service);
            Ok(tonic::Response::new(v1::CertifyResponse {
                cert_chain_pem: self.ca.sign_csr(&r.csr_pem, &id, self.ttl),
                roots_pem: vec![self.ca.root_pem()],
                spiffe_id: id,
                not_after_unix: 0,
                trust_domain: "cluster.local".into(),
            }))
        }
    }

    async fn serve(fake: FakeIdentity) -> ChannelFactory {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        Box::new(move || {
            Ok(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy(),
            )
        })
    }

    fn params(token: &str) -> CertifyParams {
        CertifyParams {
            token: TokenSource::Inline(token.into()),
            service: "web".into(),
            namespace: "default".into(),
            ttl: Some(Duration::from_secs(3)),
        }
    }

    #[tokio::test]
    async fn installs_certificate_roots_and_expiry_then_renews() {
        let calls = Arc::new(AtomicUsize::new(0));
        let channel = serve(FakeIdentity {
            ca: TestCa::new("cluster.local"),
            ttl: 3,
            calls: Arc::clone(&calls),
            fail_first: 1,
        })
        .await;
        let tls = Arc::new(MeshTls::new(SecurityMetrics::unregistered()).unwrap());
        let task = tokio::spawn(Renewer::new(Arc::clone(&tls), channel, params("secret")).run());
        tokio::time::timeout(Duration::from_secs(5), tls.certs().wait_ready())
            .await
            .expect("a certificate after one failed attempt");
        let first = tls.certs().load().unwrap();
        assert_eq!(
            first.id.as_str(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(tls.trust().load().unwrap().roots.len(), 1);
        #[allow(clippy::cast_precision_loss)]
        let expiry = first.not_after as f64;
        assert!((tls.metrics().cert_expiry.get() - expiry).abs() < 1e-9);
        // 3 s lifetime: renewed at ~2 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        loop {
            let now = tls.certs().load().unwrap();
            if !Arc::ptr_eq(&now, &first) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never renewed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(calls.load(Ordering::SeqCst) >= 3);
        task.abort();
    }

    #[tokio::test]
    async fn a_bad_token_is_an_error_naming_the_status() {
        let channel = serve(FakeIdentity {
            ca: TestCa::new("cluster.local"),
            ttl: 60,
            calls: Arc::default(),
            fail_first: 0,
        })
        .await;
        let tls = Arc::new(MeshTls::new(SecurityMetrics::unregistered()).unwrap());
        let mut r = Renewer::new(Arc::clone(&tls), channel, params("wrong"));
        let e = r.certify().await.unwrap_err();
        assert!(
            e.to_string().contains("Unauthenticated") || e.to_string().contains("bad token"),
            "{e}"
        );
        assert!(tls.certs().load().is_none());
    }
}
