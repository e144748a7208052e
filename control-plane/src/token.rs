//! Per-service join tokens: how a proxy proves to `Identity.Certify` that it may ask for the
//! identity of `<namespace>/<service>`.
//!
//! `token = base64url_nopad(HMAC-SHA256(secret, "<namespace>/<service>"))`, where `secret` is 32
//! random bytes persisted in the CA directory (`token.key`, mode 0600, generated on first start).
//! Tokens are stateless: the control plane recomputes and compares them in constant time. An
//! operator prints one with `weft-control token --ca-dir DIR --service S [--namespace N]`. Rotating
//! `token.key` (delete it and restart) invalidates every token at once.
//!
//! On Kubernetes the join credential is the pod's projected ServiceAccount token instead
//! ([`kubernetes`]): `Identity.Certify` takes either.

pub mod kubernetes;

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

/// The name of the secret's file in the CA directory.
pub const SECRET_FILE: &str = "token.key";

const SECRET_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Errors reading or creating the token secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a join-token secret (expected {SECRET_LEN} bytes, base64url)")]
    Malformed { path: String },
}

/// The HMAC key every join token is derived from.
#[derive(Clone)]
pub struct TokenSecret([u8; SECRET_LEN]);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

impl TokenSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let mut bytes = [0u8; SECRET_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads `<dir>/token.key`.
    pub fn load(dir: &Path) -> Result<Self, TokenError> {
        let path = dir.join(SECRET_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| TokenError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; SECRET_LEN]>::try_from(b).ok())
            .ok_or_else(|| TokenError::Malformed {
                path: path.display().to_string(),
            })?;
        Ok(Self(bytes))
    }

    /// Reads `<dir>/token.key`, creating it (mode 0600) with a fresh secret if it is absent.
    pub fn load_or_create(dir: &Path) -> Result<Self, TokenError> {
        let path = dir.join(SECRET_FILE);
        if path.exists() {
            return Self::load(dir);
        }
        let secret = Self::generate();
        let text = format!("{}\n", URL_SAFE_NO_PAD.encode(secret.0));
        match crate::private_file::write_new_private(&path, text.as_bytes()) {
            Ok(()) => Ok(secret),
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(dir),
            Err(source) => Err(TokenError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn mac(&self, namespace: &str, service: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(namespace.as_bytes());
        mac.update(b"/");
        mac.update(service.as_bytes());
        mac
    }

    /// The join token of `namespace/service`.
    pub fn token(&self, namespace: &str, service: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(namespace, service).finalize().into_bytes())
    }

    /// Whether `token` is the join token of `namespace/service` (constant-time comparison).
    pub fn verify(&self, namespace: &str, service: &str, token: &str) -> bool {
        let Ok(given) = URL_SAFE_NO_PAD.decode(token.trim()) else {
            return false;
        };
        self.mac(namespace, service).verify_slice(&given).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_bound_to_namespace_and_service() {
        let s = TokenSecret::from_bytes([7; SECRET_LEN]);
        let t = s.token("default", "web");
        assert_eq!(t.len(), 43, "32 bytes base64url without padding: {t}");
        assert!(s.verify("default", "web", &t));
        assert!(s.verify("default", "web", &format!("  {t}\n")));
        assert!(!s.verify("default", "api", &t));
        assert!(!s.verify("prod", "web", &t));
        // The separator keeps "a/bc" and "ab/c" apart.
        assert_ne!(s.token("a", "bc"), s.token("ab", "c"));
        assert!(!s.verify("default", "web", ""));
        assert!(!s.verify("default", "web", "not base64 !"));
        assert!(!s.verify("default", "web", &t[..40]));
        let other = TokenSecret::from_bytes([8; SECRET_LEN]);
        assert!(!other.verify("default", "web", &t));
    }

    #[test]
    fn known_vector() {
        // printf 'default/web' | openssl dgst -sha256 -mac HMAC -macopt hexkey:00..(32 bytes) -binary
        // | base64url without padding.
        let s = TokenSecret::from_bytes([0; SECRET_LEN]);
        assert_eq!(
            s.token("default", "web"),
            "gqNFvhGljtXWdKt2-ylnE8zkGNJgNo2Lla1YcscQ04k"
        );
    }

    #[test]
    fn persisted_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = TokenSecret::load_or_create(dir.path()).unwrap();
        let b = TokenSecret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.token("n", "s"), b.token("n", "s"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(SECRET_FILE), "short").unwrap();
        let err = TokenSecret::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a join-token secret"), "{err}");
    }
}
