//! TLS originated by the sidecar to services outside the mesh (`Cluster.upstream_tls`): the app
//! speaks plaintext to its sidecar, the sidecar speaks TLS to the external endpoint.
//!
//! One [`OriginationConfig`] per cluster, built when the snapshot is built (never per request):
//! the roots that verify the server (the cluster's `roots_pem`, else the system's trust store,
//! loaded once per process with `rustls-native-certs`), the optional client certificate (read
//! from its files at build: an unreadable file is a NACK naming it), and one rustls client
//! config per ALPN (`h2`, `http/1.1`, none for TCP). Each endpoint gets a [`TlsTarget`]: that
//! config plus the name sent as SNI and verified in the server's certificate (`sni`, else the
//! endpoint's DNS name). A new config is only built when its inputs changed, and targets compare
//! by their inputs, so endpoint pools (keyed by address and what connections must be) keep their
//! connections across config pushes and DNS refreshes.
//!
//! Unlike mesh mTLS this is ordinary WebPKI verification (host name, not SPIFFE ID), TLS 1.2 or
//! 1.3 with ring's default suites (the servers are not ours), and session resumption is on: the
//! roots are fixed for the config's lifetime, so a resumed session was verified against the same
//! roots.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, TlsConnector};
use weft_proto::v1;

use super::Alpn;

/// Why a cluster's `upstream_tls` cannot be used: the field and the reason (a NACK).
pub type ConfigError = (&'static str, String);

/// What a config was built from; two configs with the same inputs are interchangeable.
#[derive(Clone, PartialEq, Eq)]
struct Inputs {
    sni: String,
    roots_pem: String,
    client_cert: Vec<u8>,
    client_key: Vec<u8>,
}

/// The TLS client side of one cluster's `upstream_tls`.
pub struct OriginationConfig {
    inputs: Inputs,
    /// `sni`, parsed; `None` = each endpoint's DNS name.
    sni: Option<ServerName<'static>>,
    h1: TlsConnector,
    h2: TlsConnector,
    opaque: TlsConnector,
}

impl std::fmt::Debug for OriginationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("OriginationConfig")
            .field("sni", &self.inputs.sni)
            .field("custom_roots", &!self.inputs.roots_pem.is_empty())
            .field("client_cert", &!self.inputs.client_cert.is_empty())
            .finish_non_exhaustive()
    }
}

/// The system's trust store, read once per process (`None`: it holds no usable certificate).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system trust store");
            }
            let mut store = RootCertStore::empty();
            let (added, ignored) = store.add_parsable_certificates(found.certs);
            tracing::info!(
                added,
                ignored,
                "loaded the system trust store for TLS origination"
            );
            if store.is_empty() {
                Err("the system trust store has no usable certificate (install ca-certificates, or set roots_pem)".to_owned())
            } else {
                Ok(Arc::new(store))
            }
        })
        .clone()
}

fn read_file(field: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| (field, format!("cannot read {path}: {e}")))
}

impl OriginationConfig {
    /// Builds the config of `proto`, or returns `previous` when it was built from the same
    /// inputs (the client certificate files are read again either way, so a rotated file is
    /// picked up by the next snapshot). `Err` names the field: unreadable or unusable files,
    /// roots that do not parse, an `sni` that is no server name.
    pub fn build(
        proto: &v1::UpstreamTls,
        previous: Option<&Arc<Self>>,
    ) -> Result<Arc<Self>, ConfigError> {
        let (client_cert, client_key) = match (&*proto.client_cert_file, &*proto.client_key_file) {
            ("", "") => (Vec::new(), Vec::new()),
            ("", _) | (_, "") => {
                return Err((
                    "upstream_tls",
                    "client_cert_file and client_key_file go together".into(),
                ))
            }
            (cert, key) => (
                read_file("upstream_tls.client_cert_file", cert)?,
                read_file("upstream_tls.client_key_file", key)?,
            ),
        };
        let inputs = Inputs {
            sni: proto.sni.clone(),
            roots_pem: proto.roots_pem.clone(),
            client_cert,
            client_key,
        };
        if let Some(p) = previous.filter(|p| p.inputs == inputs) {
            return Ok(Arc::clone(p));
        }
        Self::from_inputs(inputs, proto).map(Arc::new)
    }

    fn from_inputs(inputs: Inputs, proto: &v1::UpstreamTls) -> Result<Self, ConfigError> {
        let sni = match inputs.sni.as_str() {
            "" => None,
            s => Some(
                ServerName::try_from(s.to_owned())
                    .map_err(|e| ("upstream_tls.sni", format!("{s:?}: {e}")))?,
            ),
        };
        let roots = if inputs.roots_pem.is_empty() {
            system_roots().map_err(|e| ("upstream_tls.roots_pem", e))?
        } else {
            let mut store = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(inputs.roots_pem.as_bytes()) {
                let cert = cert.map_err(|e| ("upstream_tls.roots_pem", e.to_string()))?;
                store
                    .add(cert)
                    .map_err(|e| ("upstream_tls.roots_pem", e.to_string()))?;
            }
            if store.is_empty() {
                return Err(("upstream_tls.roots_pem", "holds no certificate".into()));
            }
            Arc::new(store)
        };
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| ("upstream_tls", e.to_string()))?
                .with_root_certificates(roots);
        let config = if inputs.client_cert.is_empty() {
            builder.with_no_client_auth()
        } else {
            let (cert_file, key_file) = (&proto.client_cert_file, &proto.client_key_file);
            let chain = CertificateDer::pem_slice_iter(&inputs.client_cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("upstream_tls.client_cert_file", format!("{cert_file}: {e}")))?;
            if chain.is_empty() {
                return Err((
                    "upstream_tls.client_cert_file",
                    format!("{cert_file}: holds no PEM certificate"),
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(&inputs.client_key)
                .map_err(|e| ("upstream_tls.client_key_file", format!("{key_file}: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                (
                    "upstream_tls.client_key_file",
                    format!("{key_file} with {cert_file}: {e}"),
                )
            })?
        };
        let with_alpn = |alpn: Alpn| {
            let mut c = config.clone();
            c.alpn_protocols = alpn.protocols();
            TlsConnector::from(Arc::new(c))
        };
        Ok(Self {
            h1: with_alpn(Alpn::Http1),
            h2: with_alpn(Alpn::H2),
            opaque: with_alpn(Alpn::None),
            sni,
            inputs,
        })
    }

    /// The name connections to an endpoint send and verify: `sni`, else `host` (the
    /// endpoint's DNS name). `Err` when there is neither (an `ip:port` endpoint without `sni`:
    /// there is no name to verify the server against).
    pub fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>, String> {
        if let Some(sni) = &self.sni {
            return Ok(sni.clone());
        }
        match host {
            Some(h) => ServerName::try_from(h.to_owned()).map_err(|e| format!("{h:?}: {e}")),
            None => Err(
                "an ip:port endpoint needs upstream_tls.sni: the name its certificate must carry"
                    .into(),
            ),
        }
    }

    fn connector(&self, alpn: Alpn) -> &TlsConnector {
        match alpn {
            Alpn::H2 => &self.h2,
            Alpn::Http1 => &self.h1,
            // The tunnel is only between sidecars: never offered to a service outside the mesh.
            Alpn::None | Alpn::Tunnel => &self.opaque,
        }
    }
}

/// How connections to one endpoint are wrapped: its cluster's config and the server name.
#[derive(Debug)]
pub struct TlsTarget {
    config: Arc<OriginationConfig>,
    name: ServerName<'static>,
}

impl PartialEq for TlsTarget {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && (Arc::ptr_eq(&self.config, &other.config)
                || self.config.inputs == other.config.inputs)
    }
}

impl Eq for TlsTarget {}

impl TlsTarget {
    /// Connections wrapped by `config`, sending and verifying `name`.
    pub fn new(config: Arc<OriginationConfig>, name: ServerName<'static>) -> Self {
        Self { config, name }
    }

    /// The name sent (SNI; none for an IP) and verified.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.name
    }

    /// The TLS handshake on `io`, offering `alpn`. The error names the server name and says
    /// what failed (e.g. rustls' "invalid peer certificate: UnknownIssuer").
    pub async fn connect<IO>(&self, io: IO, alpn: Alpn) -> std::io::Result<client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.name.clone();
        self.config
            .connector(alpn)
            .connect(name, io)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("TLS origination to {}: {e}", self.name.to_str()),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use rustls::server::WebPkiClientVerifier;
    use rustls::ServerConfig;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;

    /// A CA, and leaves it signs.
    struct Ca {
        cert: rcgen::Certificate,
        params: CertificateParams,
        key: KeyPair,
    }

    impl Ca {
        fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.self_signed(&key).unwrap();
            Self {
                cert,
                params: p,
                key,
            }
        }

        fn pem(&self) -> String {
            self.cert.pem()
        }

        /// (chain PEM, key PEM) of a leaf for `names`.
        fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let mut p =
                CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                    .unwrap();
            p.extended_key_usages = vec![if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
            let issuer = Issuer::new(self.params.clone(), &self.key);
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    fn tls_proto(roots: &str) -> v1::UpstreamTls {
        v1::UpstreamTls {
            roots_pem: roots.into(),
            ..Default::default()
        }
    }

    /// A server for `names` signed by `ca`, requiring a client certificate of `client_ca` if
    /// given; returns the SNI it saw and the ALPN it negotiated, after echoing one byte.
    async fn serve(
        io: tokio::io::DuplexStream,
        ca: &Ca,
        names: &[&str],
        client_ca: Option<&Ca>,
    ) -> Result<(Option<String>, Option<Vec<u8>>), String> {
        let (chain, key) = ca.leaf(names, false);
        let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let mut roots = RootCertStore::empty();
                roots.add(c.cert.der().clone()).unwrap();
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(v)
            }
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut s = TlsAcceptor::from(Arc::new(config))
            .accept(io)
            .await
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        s.write_all(&b).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let conn = s.get_ref().1;
        Ok((
            conn.server_name().map(str::to_owned),
            conn.alpn_protocol().map(<[u8]>::to_vec),
        ))
    }

    /// Handshake + one byte each way through `target`.
    async fn call(
        target: &TlsTarget,
        alpn: Alpn,
        ca: &Ca,
        names: &[&str],
        client_ca: Option<&Ca>,
    ) -> (
        Result<(Option<String>, Option<Vec<u8>>), String>,
        Result<(), String>,
    ) {
        let (a, b) = duplex(64 * 1024);
        let client = async {
            let mut s = target.connect(b, alpn).await.map_err(|e| e.to_string())?;
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(())
        };
        tokio::join!(serve(a, ca, names, client_ca), client)
    }

    #[tokio::test]
    async fn verifies_the_server_name_and_sends_sni_and_alpn() {
        let ca = Ca::new("external root");
        let config = OriginationConfig::build(&tls_proto(&ca.pem()), None).unwrap();
        let name = config.server_name(Some("api.external.test")).unwrap();
        let target = TlsTarget::new(Arc::clone(&config), name);
        let (server, client) = call(&target, Alpn::H2, &ca, &["api.external.test"], None).await;
        client.unwrap();
        let (sni, alpn) = server.unwrap();
        assert_eq!(sni.as_deref(), Some("api.external.test"));
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        let (server, client) = call(&target, Alpn::Http1, &ca, &["api.external.test"], None).await;
        client.unwrap();
        assert_eq!(server.unwrap().1.as_deref(), Some(&b"http/1.1"[..]));

        // A certificate for another name is refused.
        let (_, client) = call(&target, Alpn::Http1, &ca, &["other.test"], None).await;
        let e = client.unwrap_err();
        assert!(
            e.contains("TLS origination to api.external.test") && e.contains("not valid for name"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_untrusted_server_is_refused_naming_the_reason() {
        let (ours, theirs) = (Ca::new("ours"), Ca::new("theirs"));
        let config = OriginationConfig::build(&tls_proto(&ours.pem()), None).unwrap();
        let target = TlsTarget::new(
            Arc::clone(&config),
            config.server_name(Some("api.external.test")).unwrap(),
        );
        let (_, client) = call(&target, Alpn::Http1, &theirs, &["api.external.test"], None).await;
        let e = client.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    #[tokio::test]
    async fn presents_the_client_certificate_from_its_files() {
        let (server_ca, client_ca) = (Ca::new("server"), Ca::new("clients"));
        let dir = tempfile_dir();
        let (chain, key) = client_ca.leaf(&["weft-client"], true);
        let cert_file = dir.join("client.pem");
        let key_file = dir.join("client-key.pem");
        std::fs::write(&cert_file, chain).unwrap();
        std::fs::write(&key_file, key).unwrap();
        let proto = v1::UpstreamTls {
            sni: "api.external.test".into(),
            roots_pem: server_ca.pem(),
            client_cert_file: cert_file.display().to_string(),
            client_key_file: key_file.display().to_string(),
        };
        let config = OriginationConfig::build(&proto, None).unwrap();
        // `sni` wins over the endpoint's host (and serves ip:port endpoints).
        let name = config.server_name(None).unwrap();
        assert_eq!(name.to_str(), "api.external.test");
        let target = TlsTarget::new(config, name);
        let (server, client) = call(
            &target,
            Alpn::Http1,
            &server_ca,
            &["api.external.test"],
            Some(&client_ca),
        )
        .await;
        server.unwrap();
        client.unwrap();
        // Without a client certificate the server refuses.
        let bare = OriginationConfig::build(&tls_proto(&server_ca.pem()), None).unwrap();
        let target = TlsTarget::new(
            Arc::clone(&bare),
            bare.server_name(Some("api.external.test")).unwrap(),
        );
        let (server, _) = call(
            &target,
            Alpn::Http1,
            &server_ca,
            &["api.external.test"],
            Some(&client_ca),
        )
        .await;
        assert!(server.is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "weft-origination-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let err = |p: v1::UpstreamTls| OriginationConfig::build(&p, None).unwrap_err();
        let (field, reason) = err(v1::UpstreamTls {
            client_cert_file: "/nonexistent/weft/client.pem".into(),
            client_key_file: "/nonexistent/weft/client-key.pem".into(),
            ..tls_proto("")
        });
        assert_eq!(field, "upstream_tls.client_cert_file");
        assert!(reason.contains("/nonexistent/weft/client.pem"), "{reason}");
        let (field, _) = err(v1::UpstreamTls {
            client_cert_file: "/x".into(),
            ..tls_proto("")
        });
        assert_eq!(field, "upstream_tls");
        let (field, reason) = err(tls_proto("not a pem"));
        assert_eq!(field, "upstream_tls.roots_pem");
        assert_eq!(reason, "holds no certificate");
        let ca = Ca::new("r");
        let (field, _) = err(v1::UpstreamTls {
            sni: "bad name!".into(),
            ..tls_proto(&ca.pem())
        });
        assert_eq!(field, "upstream_tls.sni");
        // No sni and no host: nothing to verify.
        let c = OriginationConfig::build(&tls_proto(&ca.pem()), None).unwrap();
        assert!(c
            .server_name(None)
            .unwrap_err()
            .contains("needs upstream_tls.sni"));
    }

    #[test]
    fn same_inputs_reuse_the_config_and_targets_compare_by_inputs() {
        let ca = Ca::new("r");
        let a = OriginationConfig::build(&tls_proto(&ca.pem()), None).unwrap();
        let again = OriginationConfig::build(&tls_proto(&ca.pem()), Some(&a)).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let fresh = OriginationConfig::build(&tls_proto(&ca.pem()), None).unwrap();
        assert!(!Arc::ptr_eq(&a, &fresh));
        let name = |c: &Arc<OriginationConfig>, h| c.server_name(Some(h)).unwrap();
        assert_eq!(
            TlsTarget::new(Arc::clone(&a), name(&a, "x.test")),
            TlsTarget::new(Arc::clone(&fresh), name(&fresh, "x.test"))
        );
        assert_ne!(
            TlsTarget::new(Arc::clone(&a), name(&a, "x.test")),
            TlsTarget::new(Arc::clone(&a), name(&a, "y.test"))
        );
        let other = OriginationConfig::build(&tls_proto(&Ca::new("s").pem()), Some(&a)).unwrap();
        assert_ne!(
            TlsTarget::new(Arc::clone(&a), name(&a, "x.test")),
            TlsTarget::new(Arc::clone(&other), name(&other, "x.test"))
        );
    }
}
