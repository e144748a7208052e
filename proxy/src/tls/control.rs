//! The gRPC channel to the control plane (`Discovery.Stream` and `Identity.Certify`): TLS when
//! the URL is `https://`, verifying the server against the bootstrap's `control_plane_ca`
//! (the control plane's `<ca-dir>/roots.pem`). The server's certificate must name the URL's host
//! (DNS name or IP). No client certificate: `Certify` authenticates with the join token.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Why the control-plane endpoint cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ControlChannelError {
    /// The URL is malformed.
    #[error("control_plane {url:?}: {source}")]
    Url {
        /// The configured URL.
        url: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// `https://` without a CA to verify the server with.
    #[error("control_plane {0:?} is https:// but control_plane_ca is not set")]
    NoCa(String),
    /// The TLS settings were refused.
    #[error("control_plane TLS: {0}")]
    Tls(tonic::transport::Error),
}

/// The endpoint for `url`, with TLS verified by `ca_pem` when `url` is `https://`.
pub fn control_endpoint(url: &str, ca_pem: Option<&str>) -> Result<Endpoint, ControlChannelError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|source| ControlChannelError::Url {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let ca = ca_pem.ok_or_else(|| ControlChannelError::NoCa(url.to_owned()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .assume_http2(true);
    endpoint.tls_config(tls).map_err(ControlChannelError::Tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca() {
        assert!(control_endpoint("http://127.0.0.1:1", None).is_ok());
        let e = control_endpoint("https://127.0.0.1:1", None).unwrap_err();
        assert!(e.to_string().contains("control_plane_ca"), "{e}");
        let ca = crate::tls::testing::TestCa::new("cluster.local");
        assert!(control_endpoint("https://127.0.0.1:1", Some(&ca.root_pem())).is_ok());
    }
}
