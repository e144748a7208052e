//! How `weftctl` authenticates to the admin API and verifies it.
//!
//! The admin API speaks HTTPS with a certificate from the control plane's CA, so `weftctl` needs
//! the CA's `roots.pem` (`--ca`) and a credential: an admin client certificate (`--cert`/`--key`,
//! from `weft-control admin-cert`) or a bearer token (`--token-file`). On the control plane's
//! host `--ca-dir DIR` (the control plane's `--ca-dir`) provides both defaults: `DIR/roots.pem`
//! and the bootstrap token `DIR/admin-token`. A credential is never sent over plaintext
//! `http://` (the server then runs `--insecure-admin` and needs none).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Credential flags, shared by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Credentials {
    /// The control plane's CA directory: roots.pem verifies the server, admin-token (the
    /// bootstrap token) is the default credential.
    #[arg(long, global = true, env = "WEFT_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// PEM roots that verify the admin API's certificate (the control plane's roots.pem).
    #[arg(long = "ca", global = true, env = "WEFT_ADMIN_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// A file holding a bearer token (sent as `Authorization: Bearer`).
    #[arg(
        long,
        global = true,
        env = "WEFT_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// An admin client certificate (PEM, from `weft-control admin-cert`).
    #[arg(long, global = true, env = "WEFT_ADMIN_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, global = true, env = "WEFT_ADMIN_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
}

/// What the client sends: TLS settings for `https://` and an optional bearer token.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub bearer: Option<String>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl Credentials {
    /// The TLS config and token for a server URL that is `https` or not.
    pub fn resolve(&self, https: bool) -> Result<Resolved, String> {
        if !https {
            return Ok(Resolved::default());
        }
        let ca = self
            .ca
            .clone()
            .or_else(|| self.ca_dir.as_ref().map(|d| d.join("roots.pem")))
            .ok_or_else(|| {
                "the admin API is HTTPS: give the control plane's CA to verify it with --ca-dir DIR (its --ca-dir; default <policies>/.weft-ca) or --ca roots.pem".to_owned()
            })?;
        let ca_pem = read(&ca, "--ca")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| format!("--ca {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("--ca {}: no certificate in it", ca.display()));
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let mut bearer = None;
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&read(cert, "--cert")?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--cert {}: {e}", cert.display()))?;
                let key_der = PrivateKeyDer::from_pem_slice(&read(key, "--key")?)
                    .map_err(|e| format!("--key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("--cert/--key: {e}"))?
            }
            (None, None) => {
                let token_file = self.token_file.clone().or_else(|| {
                    self.ca_dir
                        .as_ref()
                        .map(|d| d.join(crate::admin::auth::BOOTSTRAP_TOKEN_FILE))
                        .filter(|p| p.exists())
                });
                if let Some(path) = token_file {
                    let token = String::from_utf8(read(&path, "--token-file")?)
                        .map_err(|_| format!("--token-file {}: not UTF-8", path.display()))?;
                    bearer = Some(token.trim().to_owned());
                }
                builder.with_no_client_auth()
            }
            _ => return Err("--cert and --key go together".to_owned()),
        };
        Ok(Resolved {
            tls: Some(Arc::new(config)),
            bearer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca_and_reads_the_bootstrap_token() {
        let none = Credentials::default();
        assert!(none.resolve(false).unwrap().tls.is_none());
        let e = none.resolve(true).unwrap_err();
        assert!(e.contains("--ca-dir"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let config = crate::ca::CaConfig::new(dir.path());
        let _ca = crate::ca::Ca::load_or_create(&config).unwrap();
        std::fs::write(dir.path().join("admin-token"), "tok-0123456789abcdef\n").unwrap();
        let creds = Credentials {
            ca_dir: Some(dir.path().to_owned()),
            ..Credentials::default()
        };
        let r = creds.resolve(true).unwrap();
        assert!(r.tls.is_some());
        assert_eq!(r.bearer.as_deref(), Some("tok-0123456789abcdef"));
        let half = Credentials {
            cert: Some(dir.path().join("x.pem")),
            ..creds
        };
        assert!(half.resolve(true).unwrap_err().contains("together"));
    }
}
