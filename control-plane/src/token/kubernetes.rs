//! Certify's Kubernetes path: a projected ServiceAccount token (what the kubelet writes into a
//! pod's `serviceAccountToken` volume) as the join credential, verified offline.
//!
//! The token is a JWT signed by the cluster's service-account issuer. The control plane checks
//! it against the issuer's public keys, a JWKS file (`--k8s-jwks`: what the API server serves at
//! `/openid/v1/jwks`), re-read whenever the file changes (last good keys kept if it breaks), so
//! no API server is needed. Checked: the signature (RS256/384/512, PS256/384/512, ES256/384;
//! never `none` or HMAC), `iss` = `--k8s-issuer`, `aud` contains `--k8s-audience`, `exp`
//! present and in the future (30 s leeway for clock skew; legacy Secret-based tokens have no
//! `exp` and are refused), `nbf` if present, and `sub` = `system:serviceaccount:<ns>:<sa>`
//! agreeing with the `kubernetes.io` claim when it is there.
//!
//! The identity a token may be certified as is fixed: `<ns>/<sa>`, the ServiceAccount's
//! namespace and name (the pod-bound claims name a pod that cannot be looked up without an API
//! server, so they only go to the log). A pod can therefore only obtain the SVID of its own
//! ServiceAccount; the injection webhook derives the service from the ServiceAccount by default
//! for that reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Leeway on `exp` / `nbf` for clock skew between the cluster and the control plane.
pub const LEEWAY_SECONDS: u64 = 30;

/// Signature algorithms a service-account issuer uses (asymmetric only).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Largest JWKS file read.
const MAX_JWKS_BYTES: u64 = 1 << 20;

/// `--k8s-jwks`, `--k8s-issuer`, `--k8s-audience`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesTokenConfig {
    /// The issuer's public keys (JWKS JSON).
    pub jwks: PathBuf,
    /// The expected `iss` (the API server's `--service-account-issuer`).
    pub issuer: String,
    /// The audience the projected token was requested for.
    pub audience: String,
}

/// Why a JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("--k8s-jwks {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--k8s-jwks {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Why a token was refused (the message goes back to the proxy and to the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the Kubernetes token is not a JWT: {0}")]
    Malformed(String),
    #[error(
        "the Kubernetes token is signed with {0:?}: only asymmetric issuer algorithms are accepted"
    )]
    Algorithm(String),
    #[error("the Kubernetes token's signature does not verify with any key of the JWKS (--k8s-jwks: is it this cluster's issuer?)")]
    Signature,
    #[error("the Kubernetes token expired (the kubelet rotates projected tokens: is the proxy reading a stale copy?)")]
    Expired,
    #[error("the Kubernetes token is not valid yet (nbf in the future: clock skew?)")]
    NotYetValid,
    #[error("the Kubernetes token's issuer is not {0:?} (--k8s-issuer)")]
    Issuer(String),
    #[error("the Kubernetes token's audience does not include {0:?} (the injected volume's audience must be --k8s-audience)")]
    Audience(String),
    #[error("the Kubernetes token has no {0} claim (legacy ServiceAccount Secret tokens have no exp and are refused: use a projected token)")]
    MissingClaim(String),
    #[error(
        "the Kubernetes token's subject {0:?} is not system:serviceaccount:<namespace>:<name>"
    )]
    Subject(String),
    #[error("the Kubernetes token's claims disagree: {0}")]
    Inconsistent(String),
}

/// The ServiceAccount a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    /// The pod the token is bound to (`kubernetes.io.pod.name`), for the log.
    pub pod: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: NamedRef,
    #[serde(default)]
    pod: Option<NamedRef>,
}

#[derive(Debug, Deserialize)]
struct NamedRef {
    name: String,
}

/// What identifies a version of the JWKS file (re-read when it changes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&m),
    })
}

/// Verifies projected ServiceAccount tokens against a JWKS file.
#[derive(Debug)]
pub struct KubernetesTokens {
    config: KubernetesTokenConfig,
    keys: ArcSwap<JwkSet>,
    stamp: Mutex<Option<FileStamp>>,
}

impl KubernetesTokens {
    /// Loads the JWKS (an unreadable or keyless file is an error: fail closed at start).
    pub fn load(config: KubernetesTokenConfig) -> Result<Self, JwksError> {
        let (keys, stamp) = read_jwks(&config.jwks)?;
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
            stamp: Mutex::new(Some(stamp)),
        })
    }

    pub fn config(&self) -> &KubernetesTokenConfig {
        &self.config
    }

    /// Re-reads the JWKS file if it changed; a broken file keeps the previous keys (logged).
    fn refresh(&self) {
        let mut last = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.config.jwks).ok();
        if now.is_none() || now == *last {
            return;
        }
        match read_jwks(&self.config.jwks) {
            Ok((keys, stamp)) => {
                tracing::info!(
                    path = %self.config.jwks.display(),
                    keys = keys.keys.len(),
                    "Kubernetes service-account keys reloaded"
                );
                self.keys.store(Arc::new(keys));
                *last = Some(stamp);
            }
            Err(e) => {
                tracing::error!("{e} (keeping the previous keys)");
                *last = now;
            }
        }
    }

    /// Verifies `token`; returns the ServiceAccount it speaks for.
    pub fn verify(&self, token: &str) -> Result<ServiceAccount, TokenRefusal> {
        self.refresh();
        let token = token.trim();
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenRefusal::Malformed(e.to_string()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenRefusal::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        let keys = self.keys.load();
        let candidates: Vec<&Jwk> = match &header.kid {
            Some(kid) if keys.find(kid).is_some() => keys.find(kid).into_iter().collect(),
            // An unknown or absent kid: try every key (a JWKS without kids is legal).
            _ => keys.keys.iter().collect(),
        };
        let mut refusal = TokenRefusal::Signature;
        for jwk in candidates {
            if jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::try_from(a).ok())
                .is_some_and(|a| a != header.alg)
            {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
                Ok(data) => return service_account(&data.claims),
                Err(e) => match e.kind() {
                    // Another key may verify it.
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidRsaKey(_) => {}
                    // The signature verified: the claims are what is wrong.
                    ErrorKind::ExpiredSignature => return Err(TokenRefusal::Expired),
                    ErrorKind::ImmatureSignature => return Err(TokenRefusal::NotYetValid),
                    ErrorKind::InvalidIssuer => {
                        return Err(TokenRefusal::Issuer(self.config.issuer.clone()))
                    }
                    ErrorKind::InvalidAudience => {
                        return Err(TokenRefusal::Audience(self.config.audience.clone()))
                    }
                    ErrorKind::MissingRequiredClaim(c) => {
                        return Err(TokenRefusal::MissingClaim(c.clone()))
                    }
                    other => refusal = TokenRefusal::Malformed(format!("{other:?}")),
                },
            }
        }
        Err(refusal)
    }
}

/// Whether `token` has the shape of a JWT (three base64url parts), as opposed to an HMAC join
/// token (one part).
pub fn looks_like_jwt(token: &str) -> bool {
    let token = token.trim();
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

fn service_account(claims: &Claims) -> Result<ServiceAccount, TokenRefusal> {
    let subject = || TokenRefusal::Subject(claims.sub.clone());
    let rest = claims
        .sub
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(subject)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(subject)?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return Err(subject());
    }
    let mut pod = None;
    if let Some(k) = &claims.kubernetes {
        if k.namespace != namespace || k.serviceaccount.name != name {
            return Err(TokenRefusal::Inconsistent(format!(
                "sub {:?} but kubernetes.io names {}/{}",
                claims.sub, k.namespace, k.serviceaccount.name
            )));
        }
        pod = k.pod.as_ref().map(|p| p.name.clone());
    }
    Ok(ServiceAccount {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        pod,
    })
}

fn read_jwks(path: &Path) -> Result<(JwkSet, FileStamp), JwksError> {
    let io = |source| JwksError::Io {
        path: path.display().to_string(),
        source,
    };
    let invalid = |reason: String| JwksError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let before = stamp(path).map_err(io)?;
    if before.len > MAX_JWKS_BYTES {
        return Err(invalid(format!(
            "{} bytes, more than {MAX_JWKS_BYTES}",
            before.len
        )));
    }
    let text = std::fs::read(path).map_err(io)?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
        invalid(format!(
            "not a JWKS (expected {{\"keys\": [...]}} as served at /openid/v1/jwks): {e}"
        ))
    })?;
    let usable = set
        .keys
        .iter()
        .filter(|k| DecodingKey::from_jwk(k).is_ok())
        .count();
    if usable == 0 {
        return Err(invalid("no usable public key in it".to_owned()));
    }
    Ok((set, before))
}

/// A service-account issuer for tests: a key pair made in the test, signing tokens the way the
/// kubelet's TokenRequest does.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;
    use std::time::SystemTime;

    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;

    use super::{KubernetesTokenConfig, KubernetesTokens};

    pub(crate) struct Issuer {
        key: EncodingKey,
        alg: Algorithm,
        pub(crate) kid: String,
    }

    impl Issuer {
        pub(crate) fn ec(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate().unwrap();
            Self {
                key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
                alg: Algorithm::ES256,
                kid: kid.to_owned(),
            }
        }

        pub(crate) fn rsa(kid: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("k.pem");
            let status = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&path)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl (scripts/install-test-deps.sh installs it)");
            assert!(status.success());
            Self {
                key: EncodingKey::from_rsa_pem(&std::fs::read(&path).unwrap()).unwrap(),
                alg: Algorithm::RS256,
                kid: kid.to_owned(),
            }
        }

        pub(crate) fn jwk(&self) -> serde_json::Value {
            let mut jwk = Jwk::from_encoding_key(&self.key, self.alg).unwrap();
            jwk.common.key_id = Some(self.kid.clone());
            jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
            serde_json::to_value(jwk).unwrap()
        }

        pub(crate) fn sign(&self, claims: &serde_json::Value) -> String {
            let mut header = Header::new(self.alg);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &self.key).unwrap()
        }
    }

    pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    pub(crate) fn now() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// The claims of a projected token for pod `web-1` of ServiceAccount `ns/sa`.
    pub(crate) fn claims(ns: &str, sa: &str, aud: &str, exp: i64) -> serde_json::Value {
        json!({
            "aud": [aud],
            "exp": exp,
            "iat": now() - 60,
            "nbf": now() - 60,
            "iss": ISSUER,
            "jti": "5c1b9c4e-0d67-4f0e-9f2b-6b0a4d3a1c11",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {
                "namespace": ns,
                "node": {"name": "node-1", "uid": "0c5e4f5e-7b7a-4b0e-8a87-bd1a2e6f0a01"},
                "pod": {"name": "web-1", "uid": "1d2e3f40-5a6b-4c7d-8e9f-0a1b2c3d4e5f"},
                "serviceaccount": {"name": sa, "uid": "2e3f4051-6b7c-4d8e-9fa0-1b2c3d4e5f60"},
                "warnafter": now() + 3000
            }
        })
    }

    /// A verifier of `issuers`' tokens (JWKS written to `dir/jwks.json`), audience `weft`.
    pub(crate) fn verifier(dir: &Path, issuers: &[&Issuer]) -> KubernetesTokens {
        let jwks = dir.join("jwks.json");
        let keys: Vec<_> = issuers.iter().map(|i| i.jwk()).collect();
        std::fs::write(&jwks, json!({ "keys": keys }).to_string()).unwrap();
        KubernetesTokens::load(KubernetesTokenConfig {
            jwks,
            issuer: ISSUER.to_owned(),
            audience: "weft".to_owned(),
        })
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{claims, now, verifier, Issuer, ISSUER};
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    #[test]
    fn a_projected_token_names_its_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let (ec, rsa) = (Issuer::ec("ec-1"), Issuer::rsa("rsa-1"));
        let v = verifier(dir.path(), &[&ec, &rsa]);
        for issuer in [&ec, &rsa] {
            let token = issuer.sign(&claims("shop", "web", "weft", now() + 3600));
            assert!(looks_like_jwt(&token));
            assert_eq!(
                v.verify(&format!("{token}\n")).unwrap(),
                ServiceAccount {
                    namespace: "shop".into(),
                    name: "web".into(),
                    pod: Some("web-1".into())
                }
            );
        }
        assert!(!looks_like_jwt(
            "gqNFvhGljtXWdKt2-ylnE8zkGNJgNo2Lla1YcscQ04k"
        ));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = Issuer::ec("k1");
        let v = verifier(dir.path(), &[&issuer]);
        let exp = now() + 3600;
        // Expired (beyond the leeway).
        let expired = issuer.sign(&claims("shop", "web", "weft", now() - 120));
        assert_eq!(v.verify(&expired), Err(TokenRefusal::Expired));
        // Requested for another audience (e.g. the API server's own).
        let wrong_aud = issuer.sign(&claims(
            "shop",
            "web",
            "https://kubernetes.default.svc",
            exp,
        ));
        assert_eq!(
            v.verify(&wrong_aud),
            Err(TokenRefusal::Audience("weft".into()))
        );
        // Signed by a key that is not the cluster's, with the same kid and without one.
        let stranger = Issuer::ec("k1");
        let forged = stranger.sign(&claims("shop", "web", "weft", exp));
        assert_eq!(v.verify(&forged), Err(TokenRefusal::Signature));
        let mut unnamed = Issuer::ec("x");
        unnamed.kid = "unknown-kid".into();
        assert_eq!(
            v.verify(&unnamed.sign(&claims("shop", "web", "weft", exp))),
            Err(TokenRefusal::Signature)
        );
        // Another issuer.
        let mut c = claims("shop", "web", "weft", exp);
        c["iss"] = json!("https://evil.example");
        assert_eq!(
            v.verify(&issuer.sign(&c)),
            Err(TokenRefusal::Issuer(ISSUER.into()))
        );
        // A legacy Secret token: no exp.
        let mut c = claims("shop", "web", "weft", exp);
        c.as_object_mut().unwrap().remove("exp");
        assert!(matches!(
            v.verify(&issuer.sign(&c)),
            Err(TokenRefusal::MissingClaim(claim)) if claim == "exp"
        ));
        // Not a ServiceAccount, or claims that disagree.
        let mut c = claims("shop", "web", "weft", exp);
        c["sub"] = json!("system:node:node-1");
        assert!(matches!(
            v.verify(&issuer.sign(&c)),
            Err(TokenRefusal::Subject(_))
        ));
        let mut c = claims("shop", "web", "weft", exp);
        c["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
        assert!(matches!(
            v.verify(&issuer.sign(&c)),
            Err(TokenRefusal::Inconsistent(_))
        ));
        // HMAC-signed "JWT" with the public key as the secret: never accepted.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("shop", "web", "weft", exp),
            &EncodingKey::from_secret(b"whatever".as_slice()).unwrap(),
        )
        .unwrap();
        assert!(matches!(v.verify(&hs), Err(TokenRefusal::Algorithm(_))));
        assert!(matches!(
            v.verify("eyJ.not.jwt"),
            Err(TokenRefusal::Malformed(_))
        ));
    }

    #[test]
    fn the_jwks_is_reread_when_it_changes_and_a_broken_one_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (Issuer::ec("old"), Issuer::ec("new"));
        let v = verifier(dir.path(), &[&old]);
        let exp = now() + 3600;
        let by_new = new.sign(&claims("shop", "web", "weft", exp));
        assert_eq!(v.verify(&by_new), Err(TokenRefusal::Signature));
        // The issuer's keys rotated: the file is replaced (renamed over, like a ConfigMap).
        let tmp = dir.path().join("jwks.tmp");
        std::fs::write(&tmp, json!({"keys": [new.jwk()]}).to_string()).unwrap();
        std::fs::rename(&tmp, dir.path().join("jwks.json")).unwrap();
        assert!(v.verify(&by_new).is_ok());
        assert_eq!(
            v.verify(&old.sign(&claims("shop", "web", "weft", exp))),
            Err(TokenRefusal::Signature)
        );
        // A broken file: the keys in force stay.
        std::fs::write(dir.path().join("jwks.json"), "{not json").unwrap();
        assert!(v.verify(&by_new).is_ok());
        // At start a broken file is an error naming it.
        let err = KubernetesTokens::load(v.config().clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("jwks.json") && err.contains("not a JWKS"),
            "{err}"
        );
    }
}
