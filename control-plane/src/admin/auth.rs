//! Who may call the control plane's admin API, and what they may do.
//!
//! Two kinds of credential, both checked on every request:
//! - an **admin client certificate** issued by the control plane's CA (`weft-control admin-cert`),
//!   verified against the trust bundle by the TLS layer; its single URI SAN is
//!   `spiffe://<trust-domain>/weft-admin/<role>/<name>`, a path no workload SVID can carry;
//! - a **bearer token** (`Authorization: Bearer <token>`) listed in an `--admin-tokens` file
//!   (lines `<name> <read|write> <token>`, `#` comments) or the bootstrap token
//!   (`<ca-dir>/admin-token`, written on first start, named `bootstrap`, role `write`).
//!   Tokens are compared as SHA-256 digests, in constant time.
//!
//! Roles: `read` may call every `GET`, `/v1/validate` and `/v1/diff` (nothing is stored) and
//! `/metrics`; `write` may also apply and delete policies. `/healthz` needs nothing. Without
//! a credential the answer is 401, with a read credential on a mutating call 403; both are
//! counted (`weft_control_admin_requests_denied_total{reason}`). Every mutating call is written
//! to the audit log (tracing target `weft::audit`) with the caller's name, credential kind and
//! the outcome.
//!
//! `--insecure-admin` turns all of this off (plaintext HTTP, no credentials), and is refused
//! unless the admin address is loopback.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::Method;
use sha2::{Digest, Sha256};

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads, validation and diffs.
    Read,
    /// Everything, including applying and deleting policies.
    Write,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// `certificate` or `token`.
    pub via: &'static str,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.via, self.role.as_str())
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No credential, or one nobody issued (401).
    Unauthenticated(String),
    /// A credential whose role does not allow the call (403).
    Forbidden(String),
}

impl Denied {
    /// The `reason` label of `weft_control_admin_requests_denied_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Unauthenticated(m) | Self::Forbidden(m) => m,
        }
    }
}

/// Errors loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Format {
        path: String,
        line: usize,
        reason: String,
    },
}

/// The role a call needs; `None`: anyone may call it.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        return None;
    }
    // Fail closed: anything but a read or a known dry run needs write.
    let read_only = *method == Method::GET
        || *method == Method::HEAD
        || (*method == Method::POST
            && (path == "/v1/validate" || path.starts_with("/v1/validate/") || path == "/v1/diff"));
    Some(if read_only { Role::Read } else { Role::Write })
}

/// The file name of the bootstrap token in the CA directory.
pub const BOOTSTRAP_TOKEN_FILE: &str = "admin-token";

/// The SPIFFE ID path prefix of admin certificates.
pub const ADMIN_PATH: &str = "/weft-admin/";

/// Reads `<ca-dir>/admin-token`, creating it (mode 0600, 32 random bytes base64url) when absent.
pub fn ensure_bootstrap_token(ca_dir: &Path) -> Result<PathBuf, AuthError> {
    use base64::Engine as _;
    use rand::RngCore as _;
    let path = ca_dir.join(BOOTSTRAP_TOKEN_FILE);
    if !path.exists() {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let text = format!(
            "{}\n",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        match crate::private_file::write_new_private(&path, text.as_bytes()) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "wrote the bootstrap admin token (role write)")
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(AuthError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
    Ok(path)
}

#[derive(Debug, Clone)]
struct TokenEntry {
    name: String,
    role: Role,
    digest: [u8; 32],
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn read(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|source| AuthError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Parses an `--admin-tokens` file.
fn parse_tokens(path: &Path, text: &str) -> Result<Vec<TokenEntry>, AuthError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let format = |reason: String| AuthError::Format {
            path: path.display().to_string(),
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, token] = fields[..] else {
            return Err(format("expected `<name> <read|write> <token>`".to_owned()));
        };
        let role = Role::parse(role)
            .ok_or_else(|| format(format!("role {role:?}: expected read or write")))?;
        if token.len() < 16 {
            return Err(format(format!(
                "the token of {name:?} is shorter than 16 characters"
            )));
        }
        entries.push(TokenEntry {
            name: name.to_owned(),
            role,
            digest: digest(token),
        });
    }
    Ok(entries)
}

/// The admin API's credentials and policy.
#[derive(Debug)]
pub struct AdminAuth {
    required: bool,
    trust_domain: String,
    token_files: Vec<PathBuf>,
    bootstrap: Option<PathBuf>,
    tokens: ArcSwap<Vec<TokenEntry>>,
}

impl AdminAuth {
    /// No authentication (`--insecure-admin`; loopback only).
    pub fn disabled() -> Self {
        Self {
            required: false,
            trust_domain: String::new(),
            token_files: Vec::new(),
            bootstrap: None,
            tokens: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Authentication required: admin certificates of `trust_domain`, the tokens of
    /// `token_files`, and the bootstrap token in `bootstrap` (a file holding one token).
    pub fn new(
        trust_domain: &str,
        token_files: Vec<PathBuf>,
        bootstrap: Option<PathBuf>,
    ) -> Result<Self, AuthError> {
        let auth = Self {
            required: true,
            trust_domain: trust_domain.to_owned(),
            token_files,
            bootstrap,
            tokens: ArcSwap::from_pointee(Vec::new()),
        };
        auth.reload()?;
        Ok(auth)
    }

    /// Whether requests need a credential.
    pub fn is_required(&self) -> bool {
        self.required
    }

    /// Re-reads the token files (SIGHUP); on error the previous tokens stay. Returns how many
    /// tokens are in force.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let mut entries = Vec::new();
        if let Some(path) = &self.bootstrap {
            let token = read(path)?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(AuthError::Format {
                    path: path.display().to_string(),
                    line: 1,
                    reason: "the bootstrap token is shorter than 16 characters".to_owned(),
                });
            }
            entries.push(TokenEntry {
                name: "bootstrap".to_owned(),
                role: Role::Write,
                digest: digest(token),
            });
        }
        for path in &self.token_files {
            entries.extend(parse_tokens(path, &read(path)?)?);
        }
        let n = entries.len();
        self.tokens.store(Arc::new(entries));
        Ok(n)
    }

    /// The principal of a verified client certificate (leaf DER), if it is an admin
    /// certificate of our trust domain. Workload SVIDs and foreign IDs are no principal.
    pub fn principal_from_cert(&self, leaf: Option<&[u8]>) -> Option<Principal> {
        let id = weft_spiffe::from_cert_der(leaf?).ok()?;
        if id.trust_domain() != self.trust_domain {
            return None;
        }
        let rest = id.path().strip_prefix(ADMIN_PATH)?;
        let (role, name) = rest.split_once('/')?;
        if name.contains('/') {
            return None;
        }
        Some(Principal {
            name: name.to_owned(),
            role: Role::parse(role)?,
            via: "certificate",
        })
    }

    fn principal_from_token(&self, token: &str) -> Option<Principal> {
        let presented = digest(token);
        let mut found = None;
        // Every entry is compared, and each comparison takes the same time.
        for entry in self.tokens.load().iter() {
            let diff = entry
                .digest
                .iter()
                .zip(presented.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 && found.is_none() {
                found = Some(Principal {
                    name: entry.name.clone(),
                    role: entry.role,
                    via: "token",
                });
            }
        }
        found
    }

    /// Decides a request: `cert` is the connection's certificate principal, `authorization`
    /// the request's `Authorization` header. `Ok(None)`: allowed without a principal (auth
    /// disabled, or a public path).
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        cert: Option<&Principal>,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Option<Principal>, Denied> {
        let Some(needed) = required_role(method, path) else {
            return Ok(None);
        };
        if !self.required {
            return Ok(None);
        }
        let principal = match authorization {
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .ok_or_else(|| {
                        Denied::Unauthenticated(
                            "the Authorization header must be `Bearer <token>`".to_owned(),
                        )
                    })?;
                self.principal_from_token(token).ok_or_else(|| {
                    Denied::Unauthenticated("unknown bearer token".to_owned())
                })?
            }
            None => cert.cloned().ok_or_else(|| {
                Denied::Unauthenticated(
                    "the admin API needs a credential: an admin client certificate (weft-control admin-cert) or `Authorization: Bearer <token>`".to_owned(),
                )
            })?,
        };
        if principal.role < needed {
            return Err(Denied::Forbidden(format!(
                "{principal} may not {method} {path}: it needs role {}",
                needed.as_str()
            )));
        }
        Ok(Some(principal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(files: &[(&str, &str)]) -> (tempfile::TempDir, AdminAuth) {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (name, text) in files {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            paths.push(p);
        }
        let boot = dir.path().join("admin-token");
        std::fs::write(&boot, "bootstrap-token-0123456789\n").unwrap();
        let auth = AdminAuth::new("cluster.local", paths, Some(boot)).unwrap();
        (dir, auth)
    }

    fn bearer(t: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(&format!("Bearer {t}")).unwrap()
    }

    #[test]
    fn roles_decide_what_a_token_may_do() {
        let (_d, a) = auth(&[(
            "tokens",
            "# ops\nalice write alice-token-0123456789\nbob read bob-token-0123456789\n",
        )]);
        let put = Method::PUT;
        let p = "/v1/policies/a.yaml";
        assert_eq!(
            a.check(&put, p, None, None).unwrap_err().reason(),
            "unauthenticated"
        );
        assert_eq!(
            a.check(&put, p, None, Some(&bearer("nope-nope-nope-nope")))
                .unwrap_err()
                .reason(),
            "unauthenticated"
        );
        let alice = a
            .check(&put, p, None, Some(&bearer("alice-token-0123456789")))
            .unwrap()
            .unwrap();
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::Write));
        let denied = a
            .check(&put, p, None, Some(&bearer("bob-token-0123456789")))
            .unwrap_err();
        assert_eq!(denied.reason(), "forbidden");
        assert!(denied.message().contains("bob"), "{denied:?}");
        assert!(a
            .check(
                &Method::GET,
                "/v1/proxies",
                None,
                Some(&bearer("bob-token-0123456789"))
            )
            .is_ok());
        assert!(a
            .check(
                &Method::POST,
                "/v1/validate",
                None,
                Some(&bearer("bob-token-0123456789"))
            )
            .is_ok());
        let boot = a
            .check(
                &Method::DELETE,
                p,
                None,
                Some(&bearer("bootstrap-token-0123456789")),
            )
            .unwrap()
            .unwrap();
        assert_eq!(boot.name, "bootstrap");
        // Health is public; metrics are not.
        assert_eq!(a.check(&Method::GET, "/healthz", None, None), Ok(None));
        assert!(a.check(&Method::GET, "/metrics", None, None).is_err());
        // A certificate principal works without a header.
        let cert = Principal {
            name: "carol".into(),
            role: Role::Write,
            via: "certificate",
        };
        assert!(a.check(&put, p, Some(&cert), None).is_ok());
        assert!(AdminAuth::disabled().check(&put, p, None, None).is_ok());
    }

    #[test]
    fn malformed_token_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(
            &p,
            "alice write tok-0123456789abcdef\nbob admin tok-0123456789abcdef\n",
        )
        .unwrap();
        let e = AdminAuth::new("cluster.local", vec![p.clone()], None).unwrap_err();
        assert!(e.to_string().contains("tokens:2: role \"admin\""), "{e}");
        std::fs::write(&p, "alice write short\n").unwrap();
        assert!(AdminAuth::new("cluster.local", vec![p], None).is_err());
    }

    #[test]
    fn only_mutating_policy_calls_need_write() {
        assert_eq!(required_role(&Method::GET, "/healthz"), None);
        assert_eq!(
            required_role(&Method::GET, "/v1/policies"),
            Some(Role::Read)
        );
        assert_eq!(
            required_role(&Method::PUT, "/v1/policies"),
            Some(Role::Write)
        );
        assert_eq!(
            required_role(&Method::DELETE, "/v1/policies/a.yaml"),
            Some(Role::Write)
        );
        assert_eq!(required_role(&Method::POST, "/v1/diff"), Some(Role::Read));
        assert_eq!(required_role(&Method::PUT, "/v1/other"), Some(Role::Write));
        assert_eq!(
            required_role(&Method::POST, "/v1/policies"),
            Some(Role::Write)
        );
    }
}
