//! The app's kubelet probes, answered on the admin port at `/app-health/<container>/<kind>`.
//!
//! The injection webhook rewrites an injected pod's `httpGet`, `tcpSocket` and `grpc` probes
//! into `httpGet`s on the admin port (which capture leaves alone) and hands the original checks
//! to the proxy in `WEFT_APP_PROBES` (JSON, by path). For each probe the proxy runs the
//! original check against the app as the kubelet would, on the probe's `host` or else the
//! instance IP (the pod IP; the proxy's own connections are never captured), within the probe's
//! `timeoutSeconds`:
//! - HTTP(S): a `GET` of the path with the probe's headers; 200..=399 passes (HTTPS without
//!   certificate verification, like the kubelet);
//! - TCP: the connection opens;
//! - gRPC: `grpc.health.v1.Health/Check` (h2c) answers `SERVING`.
//!
//! 200 `ok` or 503 with the reason. An unknown path is 404. Nothing here is on the data path:
//! it runs on the admin server's runtime.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpStream;

/// The env var the webhook puts the probes in.
pub const APP_PROBES_ENV: &str = "WEFT_APP_PROBES";

/// Path prefix of the probe endpoints.
pub const PATH_PREFIX: &str = "/app-health/";

/// Longest a check may take, whatever the probe says.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// One original probe (`control-plane/src/inject/probes.rs` writes them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AppProbe {
    /// `httpGet`.
    Http {
        /// The app's port.
        port: u16,
        /// The path (and query).
        path: String,
        /// `HTTP` or `HTTPS`.
        scheme: String,
        /// Where to connect instead of the instance IP.
        #[serde(default)]
        host: Option<String>,
        /// Extra request headers.
        #[serde(default)]
        headers: Vec<(String, String)>,
        /// The probe's timeout.
        timeout_seconds: u32,
    },
    /// `tcpSocket`.
    Tcp {
        /// The app's port.
        port: u16,
        /// Where to connect instead of the instance IP.
        #[serde(default)]
        host: Option<String>,
        /// The probe's timeout.
        timeout_seconds: u32,
    },
    /// `grpc`.
    Grpc {
        /// The app's port.
        port: u16,
        /// The health service name ("" = the server).
        #[serde(default)]
        service: Option<String>,
        /// The probe's timeout.
        timeout_seconds: u32,
    },
}

/// The probes of this pod and where its app listens.
#[derive(Debug, Clone)]
pub struct AppProbes {
    table: BTreeMap<String, AppProbe>,
    instance_ip: IpAddr,
}

static INSTALLED: OnceLock<Arc<AppProbes>> = OnceLock::new();

impl AppProbes {
    /// Parses `WEFT_APP_PROBES`' JSON; probes connect to `instance_ip` unless they name a host.
    pub fn parse(json: &str, instance_ip: IpAddr) -> Result<Self, String> {
        let table: BTreeMap<String, AppProbe> = serde_json::from_str(json)
            .map_err(|e| format!("{APP_PROBES_ENV}: not a probe table: {e}"))?;
        if let Some(bad) = table.keys().find(|k| !k.starts_with(PATH_PREFIX)) {
            return Err(format!(
                "{APP_PROBES_ENV}: {bad:?} does not start with {PATH_PREFIX}"
            ));
        }
        Ok(Self { table, instance_ip })
    }

    /// Serves these probes from the admin port (once per process; later calls are ignored).
    pub fn install(self) {
        let _ = INSTALLED.set(Arc::new(self));
    }

    /// How many probes there are.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Runs the probe of `path`: `None` for an unknown path.
    pub async fn check(&self, path: &str) -> Option<Result<(), String>> {
        let probe = self.table.get(path)?;
        Some(run(probe, self.instance_ip).await)
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Answers `GET <path>` under [`PATH_PREFIX`] from the installed probes.
pub async fn answer(path: &str) -> Response<Full<Bytes>> {
    let Some(probes) = INSTALLED.get() else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no app probes configured ({APP_PROBES_ENV})\n"),
        );
    };
    match probes.check(path).await {
        None => text(StatusCode::NOT_FOUND, format!("no app probe at {path}\n")),
        Some(Ok(())) => text(StatusCode::OK, "ok\n".to_owned()),
        Some(Err(e)) => {
            tracing::debug!(path, "app probe failed: {e}");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
        }
    }
}

fn target(host: Option<&str>, instance_ip: IpAddr, port: u16) -> String {
    match host.map(|h| h.parse::<IpAddr>().map_err(|_| h)) {
        Some(Ok(ip)) => SocketAddr::new(ip, port).to_string(),
        Some(Err(name)) => format!("{name}:{port}"),
        None => SocketAddr::new(instance_ip, port).to_string(),
    }
}

async fn run(probe: &AppProbe, instance_ip: IpAddr) -> Result<(), String> {
    let (timeout, check) = match probe {
        AppProbe::Http {
            port,
            path,
            scheme,
            host,
            headers,
            timeout_seconds,
        } => (
            *timeout_seconds,
            futures::future::Either::Left(futures::future::Either::Left(http_check(
                target(host.as_deref(), instance_ip, *port),
                host.clone(),
                path,
                scheme,
                headers,
            ))),
        ),
        AppProbe::Tcp {
            port,
            host,
            timeout_seconds,
        } => (
            *timeout_seconds,
            futures::future::Either::Left(futures::future::Either::Right(tcp_check(target(
                host.as_deref(),
                instance_ip,
                *port,
            )))),
        ),
        AppProbe::Grpc {
            port,
            service,
            timeout_seconds,
        } => (
            *timeout_seconds,
            futures::future::Either::Right(grpc_check(
                target(None, instance_ip, *port),
                service.clone().unwrap_or_default(),
            )),
        ),
    };
    let limit = Duration::from_secs(u64::from(timeout.max(1))).min(MAX_TIMEOUT);
    tokio::time::timeout(limit, check)
        .await
        .map_err(|_| format!("timed out after {}s", limit.as_secs()))?
}

async fn connect(target: &str) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn tcp_check(target: String) -> Result<(), String> {
    connect(&target).await.map(drop)
}

async fn http_check(
    target: String,
    host: Option<String>,
    path: &str,
    scheme: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let stream = connect(&target).await?;
    let mut request = Request::get(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    })
    .header(
        http::header::HOST,
        host.clone().unwrap_or_else(|| target.clone()),
    )
    .header(http::header::USER_AGENT, "kube-probe/weft-proxy")
    .header(http::header::ACCEPT, "*/*");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building the probe request: {e}"))?;
    let status = if scheme.eq_ignore_ascii_case("HTTPS") {
        let name = host.unwrap_or_else(|| {
            target
                .rsplit_once(':')
                .map_or(target.clone(), |(h, _)| h.to_owned())
        });
        let tls = tls_connect(stream, &name).await?;
        send_http1(TokioIo::new(tls), request).await?
    } else {
        send_http1(TokioIo::new(stream), request).await?
    };
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("GET {path} on {target}: {status}"))
    }
}

async fn send_http1<I>(io: I, request: Request<Full<Bytes>>) -> Result<StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP request: {e}"))?;
    Ok(response.status())
}

/// Accepts any server certificate: a kubelet HTTPS probe does not verify it either.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn tls_connect(
    stream: TcpStream,
    name: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let server_name =
        rustls_pki_types::ServerName::try_from(name.trim_matches(['[', ']']).to_owned())
            .map_err(|e| format!("TLS server name {name:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, stream)
        .await
        .map_err(|e| format!("TLS handshake with {name}: {e}"))
}

/// `grpc.health.v1.HealthCheckRequest{service}`, framed (uncompressed, length-prefixed).
fn health_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        let mut len = service.len();
        while len >= 0x80 {
            message.push((len as u8) | 0x80);
            len >>= 7;
        }
        message.push(len as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

/// The `status` of a framed `HealthCheckResponse` (0 when absent: UNKNOWN).
fn health_status(mut body: Bytes) -> Result<u64, String> {
    if body.len() < 5 {
        return Err("the health check answered no message".to_owned());
    }
    body.advance(5);
    let mut status = 0;
    while body.has_remaining() {
        let tag = body.get_u8();
        match tag {
            0x08 => {
                let mut value = 0u64;
                for shift in (0..64).step_by(7) {
                    if !body.has_remaining() {
                        return Err("a truncated health check answer".to_owned());
                    }
                    let b = body.get_u8();
                    value |= u64::from(b & 0x7f) << shift;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                status = value;
            }
            _ => return Err(format!("an unexpected health check answer (tag {tag:#x})")),
        }
    }
    Ok(status)
}

async fn grpc_check(target: String, service: String) -> Result<(), String> {
    let stream = connect(&target).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {target}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::post(format!("http://{target}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(http::header::USER_AGENT, "kube-probe/weft-proxy")
        .body(Full::new(health_request(&service)))
        .map_err(|e| format!("building the health check: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("gRPC health check on {target}: {e}"))?;
    let header_status = response.headers().get("grpc-status").cloned();
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("gRPC health check on {target}: {e}"))?;
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(header_status);
    match grpc_status.as_ref().and_then(|v| v.to_str().ok()) {
        Some("0") => {}
        Some(code) => return Err(format!("gRPC health check on {target}: grpc-status {code}")),
        None => return Err(format!("gRPC health check on {target}: no grpc-status")),
    }
    match health_status(collected.to_bytes())? {
        1 => Ok(()),
        other => Err(format!(
            "gRPC health check on {target}: {} (service {service:?})",
            match other {
                0 => "UNKNOWN",
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "an unknown status",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A one-request HTTP server answering `status` and reporting the request head.
    async fn http_server(status: u16) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                head.extend_from_slice(&buf[..n]);
            }
            let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_3xx_and_fail_otherwise() {
        for (status, passes) in [(200, true), (302, true), (500, false), (404, false)] {
            let (port, server) = http_server(status).await;
            let json = format!(
                r#"{{"/app-health/web/livez": {{"http": {{"port": {port}, "path": "/healthz?x=1", "scheme": "HTTP", "headers": [["X-Probe", "1"]], "timeout_seconds": 2}}}}}}"#
            );
            let probes = AppProbes::parse(&json, LOCAL).unwrap();
            let result = probes.check("/app-health/web/livez").await.unwrap();
            assert_eq!(result.is_ok(), passes, "{status}: {result:?}");
            let head = server.await.unwrap();
            assert!(head.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{head}");
            assert!(head.to_ascii_lowercase().contains("x-probe: 1"), "{head}");
        }
    }

    #[tokio::test]
    async fn tcp_probes_pass_while_the_port_accepts() {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let json = format!(
            r#"{{"/app-health/db/readyz": {{"tcp": {{"port": {port}, "timeout_seconds": 1}}}}}}"#
        );
        let probes = AppProbes::parse(&json, LOCAL).unwrap();
        assert_eq!(probes.check("/app-health/db/readyz").await, Some(Ok(())));
        drop(listener);
        let e = probes
            .check("/app-health/db/readyz")
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.contains("connecting to 127.0.0.1:"), "{e}");
        assert_eq!(probes.check("/app-health/db/livez").await, None);
    }

    #[tokio::test]
    async fn grpc_probes_ask_the_health_service() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("db", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let probe = |service: &str| {
            format!(
                r#"{{"/app-health/api/startupz": {{"grpc": {{"port": {port}, "service": "{service}", "timeout_seconds": 5}}}}}}"#
            )
        };
        let check = |json: String| async move {
            AppProbes::parse(&json, LOCAL)
                .unwrap()
                .check("/app-health/api/startupz")
                .await
                .unwrap()
        };
        assert_eq!(check(probe("")).await, Ok(()));
        let e = check(probe("db")).await.unwrap_err();
        assert!(e.contains("NOT_SERVING"), "{e}");
        // An unknown service: the health service answers NOT_FOUND (5).
        let e = check(probe("nope")).await.unwrap_err();
        assert!(e.contains("grpc-status 5"), "{e}");
        server.abort();
    }

    #[test]
    fn health_messages() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_request("ab")[..],
            &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        assert_eq!(
            health_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1])),
            Ok(1)
        );
        assert_eq!(health_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Ok(0));
        assert!(health_status(Bytes::from_static(&[0, 0])).is_err());
        assert!(AppProbes::parse(
            r#"{"/other": {"tcp": {"port": 1, "timeout_seconds": 1}}}"#,
            LOCAL
        )
        .is_err());
        assert!(AppProbes::parse(r#"{"/app-health/a/livez": {"exec": {}}}"#, LOCAL).is_err());
    }
}
