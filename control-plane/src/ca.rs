//! The control plane's certificate authority: signs proxies' CSRs into short-lived X.509 SVIDs
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service>`), and the control plane's own gRPC
//! server certificate.
//!
//! Two modes, both persisted in the CA directory (created 0700):
//!
//! - **self-signed root** (default): `root.pem` + `root-key.pem`, ECDSA P-256, 10 years,
//!   generated on first start and reused afterwards. SVIDs are signed by the root; chain = leaf.
//! - **user-supplied root** (`--root-cert`/`--root-key`, the production path): the control plane
//!   generates `intermediate.pem` + `intermediate-key.pem` signed by that root (1 year, capped at
//!   the root's expiry; regenerated at start when missing, signed by another root, or past 2/3
//!   of its life) and signs SVIDs with it; chain = leaf + intermediate. The root's key is only
//!   read at start to sign the intermediate.
//!
//! The trust bundle is the own root plus every `--extra-root` (root rotation: trust a new root
//! before it signs anything); it is written to `roots.pem` and pushed to the proxies.
//!
//! The CA refuses to sign when its issuing certificate is expired or expires before the requested
//! certificate would (no silent capping of a proxy's lifetime).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::private_file::write_atomic;
use crate::token::{TokenError, TokenSecret};

/// The root's lifetime when the control plane generates it.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The default lifetime of the intermediate signed by a user-supplied root.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The default lifetime of an SVID.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Warn when the issuing certificate expires within this long.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates are valid from this long before they are issued (clock skew).
const BACKDATE: Duration = Duration::from_secs(60);

pub const ROOT_CERT_FILE: &str = "root.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const INTERMEDIATE_CERT_FILE: &str = "intermediate.pem";
pub const INTERMEDIATE_KEY_FILE: &str = "intermediate-key.pem";
/// The trust bundle (every root, PEM), rewritten whenever it changes.
pub const ROOTS_FILE: &str = "roots.pem";

/// Namespace and service of the control plane's own identity.
pub const CONTROL_NAMESPACE: &str = "weft-system";
pub const CONTROL_SERVICE: &str = "weft-control";

/// How to load or create the CA.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The CA directory (created 0700 if absent).
    pub dir: PathBuf,
    pub trust_domain: String,
    /// Default and maximum lifetime of an issued certificate.
    pub cert_ttl: Duration,
    /// A user-supplied root (PEM cert and PEM PKCS#8 key): sign with an intermediate from it.
    pub root: Option<(PathBuf, PathBuf)>,
    /// More trusted roots (PEM files, each may hold several certificates).
    pub extra_roots: Vec<PathBuf>,
    /// Lifetime of a generated intermediate (capped at the root's expiry).
    pub intermediate_ttl: Duration,
}

impl CaConfig {
    /// Defaults: trust domain `cluster.local`, 24h certificates, self-signed root.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: crate::policy::DEFAULT_TRUST_DOMAIN.to_owned(),
            cert_ttl: DEFAULT_CERT_TTL,
            root: None,
            extra_roots: Vec::new(),
            intermediate_ttl: INTERMEDIATE_TTL,
        }
    }
}

/// Errors loading or creating the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("invalid trust domain {0:?}: expected lower-case letters, digits, '.', '-', '_'")]
    TrustDomain(String),
    #[error("generating {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("invalid {what} {value:?}: expected a DNS label (lower-case letters, digits, '-', at most 63)")]
    InvalidName { what: &'static str, value: String },
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error("the CA's issuing certificate expired at {expired_at}: refusing to sign (rotate the CA: replace --root-cert/--root-key, or the CA directory's root, and restart)")]
    IssuerExpired { expired_at: String },
    #[error("the CA's issuing certificate expires at {issuer_not_after}, before the requested certificate would ({not_after}): refusing to sign (rotate the CA, or request a shorter lifetime)")]
    IssuerExpiresFirst {
        issuer_not_after: String,
        not_after: String,
    },
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A signed SVID.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM: leaf first, then intermediates.
    pub chain_pem: String,
    pub spiffe_id: String,
    pub not_after: OffsetDateTime,
}

/// A certificate and key generated by the control plane for its own use (its gRPC server).
#[derive(Debug, Clone)]
pub struct LocalCert {
    /// DER: leaf first, then intermediates.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The trust domain and roots proxies verify peers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    pub trust_domain: String,
    pub roots_pem: Vec<String>,
}

/// The certificate authority.
pub struct Ca {
    dir: PathBuf,
    trust_domain: String,
    cert_ttl: Duration,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: OffsetDateTime,
    /// PEM of the certificates between a leaf and the root (the intermediate, or nothing).
    intermediates_pem: Vec<String>,
    /// The root the issuer chains to.
    own_root_pem: String,
    extra_root_paths: Vec<PathBuf>,
    extra_roots_pem: RwLock<Vec<String>>,
    secret: TokenSecret,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("cert_ttl", &self.cert_ttl)
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `config.dir`, creating what is missing (directory, root or intermediate,
    /// join-token secret), and writes `roots.pem`.
    pub fn load_or_create(config: &CaConfig) -> Result<Self, CaError> {
        if !valid_trust_domain(&config.trust_domain) {
            return Err(CaError::TrustDomain(config.trust_domain.clone()));
        }
        create_private_dir(&config.dir)?;
        let now = now_secs();
        let (issuer, issuer_not_after, intermediates_pem, own_root_pem) = match &config.root {
            None => load_or_create_root(&config.dir, &config.trust_domain, now)?,
            Some((cert, key)) => load_or_create_intermediate(config, cert, key, now)?,
        };
        let secret = TokenSecret::load_or_create(&config.dir)?;
        let ca = Self {
            dir: config.dir.clone(),
            trust_domain: config.trust_domain.clone(),
            cert_ttl: config.cert_ttl,
            issuer,
            issuer_not_after,
            intermediates_pem,
            own_root_pem,
            extra_root_paths: config.extra_roots.clone(),
            extra_roots_pem: RwLock::new(Vec::new()),
            secret,
        };
        ca.reload_extra_roots()?;
        Ok(ca)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Default and maximum lifetime of an issued certificate.
    pub fn cert_ttl(&self) -> Duration {
        self.cert_ttl
    }

    /// When the certificate that signs SVIDs expires.
    pub fn issuer_not_after(&self) -> OffsetDateTime {
        self.issuer_not_after
    }

    pub fn token_secret(&self) -> &TokenSecret {
        &self.secret
    }

    /// The path of the trust bundle file.
    pub fn roots_file(&self) -> PathBuf {
        self.dir.join(ROOTS_FILE)
    }

    /// The trust bundle: the CA's root, then every extra root (deduplicated).
    pub fn roots_pem(&self) -> Vec<String> {
        let mut roots = vec![self.own_root_pem.clone()];
        for r in self.extra_roots_pem.read().expect("roots lock").iter() {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        roots
    }

    pub fn trust(&self) -> Trust {
        Trust {
            trust_domain: self.trust_domain.clone(),
            roots_pem: self.roots_pem(),
        }
    }

    /// Re-reads the `--extra-root` files and rewrites `roots.pem`. Returns whether the bundle
    /// changed. On error the previous extra roots stay in force.
    pub fn reload_extra_roots(&self) -> Result<bool, CaError> {
        let mut extra = Vec::new();
        for path in &self.extra_root_paths {
            let text = fs::read_to_string(path).map_err(|source| io_err(path, source))?;
            let certs = pem_certs(&text).map_err(|reason| invalid(path, reason))?;
            for der in certs {
                let (_, cert) = X509Certificate::from_der(&der)
                    .map_err(|e| invalid(path, format!("not an X.509 certificate: {e}")))?;
                if !cert.is_ca() {
                    tracing::warn!(path = %path.display(), subject = %cert.subject(), "extra root is not a CA certificate");
                }
                extra.push(der_to_pem("CERTIFICATE", &der));
            }
        }
        let changed = {
            let mut current = self.extra_roots_pem.write().expect("roots lock");
            let changed = *current != extra;
            *current = extra;
            changed
        };
        let bundle = self.roots_pem().concat();
        let path = self.roots_file();
        if fs::read_to_string(&path).ok().as_deref() != Some(bundle.as_str()) {
            write_atomic(&path, bundle.as_bytes(), 0o644).map_err(|e| io_err(&path, e))?;
        }
        Ok(changed)
    }

    /// The SPIFFE ID of `namespace/service` in this trust domain.
    pub fn spiffe_id(&self, namespace: &str, service: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service}", self.trust_domain)
    }

    /// A log line when the issuer is expired or expires within [`EXPIRY_WARNING`].
    pub fn expiry_warning(&self, now: OffsetDateTime) -> Option<String> {
        let left = self.issuer_not_after - now;
        if left <= time::Duration::ZERO {
            Some(format!(
                "the CA's issuing certificate EXPIRED at {}: no certificate can be issued until the CA is rotated",
                rfc3339(self.issuer_not_after)
            ))
        } else if left < time::Duration::try_from(EXPIRY_WARNING).unwrap_or(time::Duration::MAX) {
            Some(format!(
                "the CA's issuing certificate expires at {} (in {} days): rotate the CA before then",
                rfc3339(self.issuer_not_after),
                left.whole_days()
            ))
        } else {
            None
        }
    }

    fn check_issuer(
        &self,
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(), SignError> {
        if self.issuer_not_after <= now {
            return Err(SignError::IssuerExpired {
                expired_at: rfc3339(self.issuer_not_after),
            });
        }
        if self.issuer_not_after < not_after {
            return Err(SignError::IssuerExpiresFirst {
                issuer_not_after: rfc3339(self.issuer_not_after),
                not_after: rfc3339(not_after),
            });
        }
        Ok(())
    }

    /// The lifetime of a certificate for a request of `requested` (`None` or zero: the default;
    /// longer than the maximum: the maximum).
    pub fn lifetime(&self, requested: Option<Duration>) -> Duration {
        match requested {
            Some(d) if !d.is_zero() => d.min(self.cert_ttl),
            _ => self.cert_ttl,
        }
    }

    /// Signs `csr_pem` (a PKCS#10 CSR whose signature must verify) into an SVID for
    /// `namespace/service` valid for [`Ca::lifetime`]`(ttl)`. The CSR's subject and extensions
    /// are ignored; only its public key is used.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
    ) -> Result<Issued, SignError> {
        self.sign_csr_at(now_secs(), csr_pem, namespace, service, ttl)
    }

    fn sign_csr_at(
        &self,
        now: OffsetDateTime,
        csr_pem: &str,
        namespace: &str,
        service: &str,
        ttl: Option<Duration>,
    ) -> Result<Issued, SignError> {
        check_name("namespace", namespace)?;
        check_name("service", service)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::InvalidCsr(e.to_string()))?;
        let not_after = now + self.lifetime(ttl);
        self.check_issuer(now, not_after)?;
        let spiffe_id = self.spiffe_id(namespace, service);
        let params = leaf_params(
            now,
            not_after,
            vec![SanType::URI(ia5(&spiffe_id)?)],
            &format!("{service}.{namespace}"),
        );
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let mut chain_pem = cert.pem();
        for pem in &self.intermediates_pem {
            chain_pem.push_str(pem);
        }
        Ok(Issued {
            chain_pem,
            spiffe_id,
            not_after,
        })
    }

    /// Issues a certificate and a fresh key for the control plane's own use, with `dns`/`ips`
    /// SANs and the URI SAN `spiffe://<td>/ns/weft-system/sa/weft-control`. Its lifetime is the
    /// certificate TTL, capped at the issuer's expiry (the control plane would rather serve with
    /// a shorter-lived certificate than not at all); fails if the issuer is expired.
    pub fn issue_local(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<LocalCert, SignError> {
        let now = now_secs();
        if self.issuer_not_after <= now {
            return Err(SignError::IssuerExpired {
                expired_at: rfc3339(self.issuer_not_after),
            });
        }
        let not_after = (now + self.cert_ttl).min(self.issuer_not_after);
        let mut sans = Vec::new();
        for name in dns {
            sans.push(SanType::DnsName(ia5(name)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        sans.push(SanType::URI(ia5(
            &self.spiffe_id(CONTROL_NAMESPACE, CONTROL_SERVICE)
        )?));
        self.sign_local(now, &leaf_params(now, not_after, sans, CONTROL_SERVICE))
    }

    /// Signs `params` (built at `now`) with a fresh key: the chain (leaf + intermediates) and
    /// the key, for the control plane's own use or an operator's.
    fn sign_local(
        &self,
        now: OffsetDateTime,
        params: &CertificateParams,
    ) -> Result<LocalCert, SignError> {
        let key = KeyPair::generate()?;
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain_der = vec![cert.der().to_vec()];
        for pem in &self.intermediates_pem {
            chain_der.extend(pem_certs(pem).map_err(SignError::InvalidCsr)?);
        }
        Ok(LocalCert {
            chain_der,
            key_der: key.serialize_der(),
            not_before: now - BACKDATE,
            not_after,
        })
    }
}

impl Ca {
    /// Issues an admin client certificate and a fresh key for `name` with `role` (`read` or
    /// `write`): URI SAN `spiffe://<td>/weft-admin/<role>/<name>` (a path no workload SVID
    /// has), EKU clientAuth only, lifetime `ttl` capped at the issuer's expiry.
    pub fn issue_admin(
        &self,
        name: &str,
        role: &str,
        ttl: std::time::Duration,
    ) -> Result<LocalCert, SignError> {
        if !valid_name(name) {
            return Err(SignError::InvalidName {
                what: "admin name",
                value: name.to_owned(),
            });
        }
        if role != "read" && role != "write" {
            return Err(SignError::InvalidCsr(format!(
                "admin role {role:?}: expected read or write"
            )));
        }
        let now = now_secs();
        if self.issuer_not_after <= now {
            return Err(SignError::IssuerExpired {
                expired_at: rfc3339(self.issuer_not_after),
            });
        }
        let not_after = (now + ttl).min(self.issuer_not_after);
        let uri = format!("spiffe://{}/weft-admin/{role}/{name}", self.trust_domain);
        let mut params = leaf_params(now, not_after, vec![SanType::URI(ia5(&uri)?)], name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_local(now, &params)
    }
}

fn leaf_params(
    now: OffsetDateTime,
    not_after: OffsetDateTime,
    sans: Vec<SanType>,
    common_name: &str,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

fn ca_params(
    common_name: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    path_len: BasicConstraints,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(path_len);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

type Loaded = (
    Issuer<'static, KeyPair>,
    OffsetDateTime,
    Vec<String>,
    String,
);

fn load_or_create_root(
    dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<Loaded, CaError> {
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let (cert_pem, not_after, key) = load_cert_and_key(&cert_path, &key_path)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| invalid(&cert_path, e.to_string()))?;
            tracing::info!(root = %cert_path.display(), not_after = %rfc3339(not_after), "loaded the CA root");
            Ok((issuer, not_after, Vec::new(), cert_pem))
        }
        (false, false) => {
            let key = KeyPair::generate().map_err(|source| CaError::Generate {
                what: "the root key",
                source,
            })?;
            let not_after = now + ROOT_TTL;
            let params = ca_params(
                format!("weft root CA ({trust_domain})"),
                now - BACKDATE,
                not_after,
                BasicConstraints::Unconstrained,
            );
            let cert = params
                .self_signed(&key)
                .map_err(|source| CaError::Generate {
                    what: "the root certificate",
                    source,
                })?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(|e| io_err(&key_path, e))?;
            write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
                .map_err(|e| io_err(&cert_path, e))?;
            tracing::info!(root = %cert_path.display(), not_after = %rfc3339(not_after), "generated a self-signed CA root");
            Ok((Issuer::new(params, key), not_after, Vec::new(), cert.pem()))
        }
        (true, false) => Err(invalid(
            &key_path,
            "missing (the root certificate exists without its key)".into(),
        )),
        (false, true) => Err(invalid(
            &cert_path,
            "missing (the root key exists without its certificate)".into(),
        )),
    }
}

fn load_or_create_intermediate(
    config: &CaConfig,
    root_cert: &Path,
    root_key: &Path,
    now: OffsetDateTime,
) -> Result<Loaded, CaError> {
    let (root_pem, root_not_after, root_key) = load_cert_and_key(root_cert, root_key)?;
    let root_der = pem_certs(&root_pem)
        .map_err(|r| invalid(root_cert, r))?
        .remove(0);
    let (_, root) = X509Certificate::from_der(&root_der)
        .map_err(|e| invalid(root_cert, format!("not an X.509 certificate: {e}")))?;
    if !root.is_ca() {
        return Err(invalid(
            root_cert,
            "not a CA certificate (basicConstraints CA:TRUE is required)".into(),
        ));
    }
    if root_not_after <= now {
        tracing::error!(root = %root_cert.display(), not_after = %rfc3339(root_not_after), "the user-supplied root has EXPIRED: no certificate can be issued");
    }
    let cert_path = config.dir.join(INTERMEDIATE_CERT_FILE);
    let key_path = config.dir.join(INTERMEDIATE_KEY_FILE);
    let wanted_not_after = (now + config.intermediate_ttl).min(root_not_after);
    if cert_path.exists() && key_path.exists() {
        let (pem, not_after, key) = load_cert_and_key(&cert_path, &key_path)?;
        let der = pem_certs(&pem)
            .map_err(|r| invalid(&cert_path, r))?
            .remove(0);
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| invalid(&cert_path, format!("not an X.509 certificate: {e}")))?;
        let signed_by_root = cert.issuer() == root.subject()
            && cert.verify_signature(Some(root.public_key())).is_ok();
        let not_before =
            OffsetDateTime::from_unix_timestamp(cert.validity().not_before.timestamp())
                .unwrap_or(now);
        let worn = now >= not_before + (not_after - not_before) * 2 / 3;
        if !signed_by_root {
            tracing::info!(intermediate = %cert_path.display(), "the intermediate is not signed by the given root: generating a new one");
        } else if worn && wanted_not_after > not_after {
            tracing::info!(intermediate = %cert_path.display(), not_after = %rfc3339(not_after), "the intermediate is past 2/3 of its lifetime: generating a new one");
        } else {
            let issuer = Issuer::from_ca_cert_pem(&pem, key)
                .map_err(|e| invalid(&cert_path, e.to_string()))?;
            tracing::info!(intermediate = %cert_path.display(), not_after = %rfc3339(not_after), "loaded the CA intermediate");
            return Ok((issuer, not_after, vec![pem], root_pem));
        }
    }
    let root_issuer = Issuer::from_ca_cert_pem(&root_pem, root_key)
        .map_err(|e| invalid(root_cert, e.to_string()))?;
    let key = KeyPair::generate().map_err(|source| CaError::Generate {
        what: "the intermediate key",
        source,
    })?;
    let not_before = (now - BACKDATE).min(wanted_not_after - BACKDATE);
    let mut params = ca_params(
        format!("weft intermediate CA ({})", config.trust_domain),
        not_before,
        wanted_not_after,
        BasicConstraints::Constrained(0),
    );
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &root_issuer)
        .map_err(|source| CaError::Generate {
            what: "the intermediate certificate",
            source,
        })?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| io_err(&key_path, e))?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644).map_err(|e| io_err(&cert_path, e))?;
    tracing::info!(intermediate = %cert_path.display(), not_after = %rfc3339(wanted_not_after), "generated a CA intermediate signed by the given root");
    Ok((
        Issuer::new(params, key),
        wanted_not_after,
        vec![cert.pem()],
        root_pem,
    ))
}

/// Reads a PEM certificate and its PEM key, checking that they belong together. Returns the
/// certificate's PEM (the first certificate of the file), expiry and the key.
fn load_cert_and_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(String, OffsetDateTime, KeyPair), CaError> {
    let cert_text = fs::read_to_string(cert_path).map_err(|e| io_err(cert_path, e))?;
    let key_text = fs::read_to_string(key_path).map_err(|e| io_err(key_path, e))?;
    let der = pem_certs(&cert_text)
        .map_err(|r| invalid(cert_path, r))?
        .remove(0);
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| invalid(cert_path, format!("not an X.509 certificate: {e}")))?;
    let key = KeyPair::from_pem(&key_text).map_err(|e| {
        invalid(
            key_path,
            format!("not a PEM PKCS#8 private key (\"BEGIN PRIVATE KEY\"; convert with `openssl pkcs8 -topk8 -nocrypt`): {e}"),
        )
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            key_path,
            format!(
                "this key does not belong to the certificate {}",
                cert_path.display()
            ),
        ));
    }
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| invalid(cert_path, format!("notAfter: {e}")))?;
    Ok((der_to_pem("CERTIFICATE", &der), not_after, key))
}

/// Every certificate of a PEM text, as DER; an error if there is none.
pub fn pem_certs(text: &str) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE in the file".into());
    }
    Ok(certs)
}

/// PEM-encodes `der` under `label` (64-column base64).
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, SignError> {
    rcgen::string::Ia5String::try_from(s).map_err(SignError::Sign)
}

/// Whether `s` is a DNS label: what a namespace or service name may be.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_name(what: &'static str, value: &str) -> Result<(), SignError> {
    if valid_name(value) {
        Ok(())
    } else {
        Err(SignError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Now, in whole seconds (what a certificate can say).
fn now_secs() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// RFC 3339 text of `t` (for messages).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn io_err(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, reason: String) -> CaError {
    CaError::Invalid {
        path: path.display().to_string(),
        reason,
    }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist; warns if an existing one is
/// readable by others.
fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    if !dir.exists() {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(|e| io_err(dir, e))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(dir)
            .map_err(|e| io_err(dir, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "the CA directory is accessible by other users (expected 0700)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
