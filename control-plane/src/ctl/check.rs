//! `weftctl check`: what can be checked without a kubeconfig, as a checklist a human reads in
//! five seconds (one line per check, `✔` pass, `!` warning, `✘` failure, `-` not checked, then
//! a summary line), or `--output json`.
//!
//! Checks, in order:
//! - the control plane's admin API answers (`/healthz`) and accepts the credential;
//! - `/readyz` (policies loaded, CA ready);
//! - the CA root (the `--ca` / `--ca-dir` roots weftctl verifies the admin API with) and the
//!   CA's issuing certificate (`weft_control_issuer_expiry_timestamp_seconds`): expired fails,
//!   within `--warn-within` (30 days) warns;
//! - the policy set in force (an invalid store fails: the last good set is being served), and
//!   the local files given with `-f`, validated against it;
//! - every connected proxy's ACKed versions against what the control plane would send it now
//!   (`POST /v1/diff` with no change): stale and NACKing proxies are named;
//! - with `--webhook https://host:15017`: the injection webhook's serving certificate (dates;
//!   its chain with `--webhook-ca`) and its `/healthz`.
//!
//! Exit 0 only when every check passed; 3 when the control plane is unreachable; 1 otherwise.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::apply::read_policy_files;
use super::{
    list, one_line, reply_errors, s, AdminClient, CtlError, EXIT_REJECTED, EXIT_UNREACHABLE,
};

/// `weftctl check` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The injection webhook to check (e.g. https://weft-control.weft-system.svc:15017):
    /// its serving certificate and /healthz.
    #[arg(long, env = "WEFT_WEBHOOK", value_name = "URL")]
    pub webhook: Option<String>,
    /// PEM roots that must verify the webhook's certificate (the webhook configuration's
    /// caBundle); without it only the certificate's dates are checked.
    #[arg(long, value_name = "PEM", requires = "webhook")]
    pub webhook_ca: Option<PathBuf>,
    /// Local policy files (or directories) to validate against the serving set (repeatable).
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
    /// Warn about certificates that expire within this.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub warn_within: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: CheckOutput,
}

/// `weftctl check --output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckOutput {
    Text,
    Json,
}

/// One check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    /// Not checked (nothing to check, or what it needs failed earlier).
    Skip,
}

impl Status {
    fn symbol(self) -> &'static str {
        match self {
            Self::Pass => "✔",
            Self::Warn => "!",
            Self::Fail => "✘",
            Self::Skip => "-",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

fn check(name: &str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        status,
        detail: one_line(&detail.into()),
    }
}

/// How many proxies are named in one line before `+N more`.
const NAMED_PROXIES: usize = 5;

/// How often stale proxies are looked at again before they are reported (a push in flight
/// is ACKed within moments).
const PROXY_ATTEMPTS: usize = 3;

/// Runs every check and prints the result.
pub(super) async fn run(
    client: &AdminClient,
    credentials: &super::auth::Credentials,
    args: &CheckArgs,
) -> Result<(), CtlError> {
    let mut checks = Vec::new();
    let reachable = control_plane(client, &mut checks).await;
    if reachable {
        readyz(client, &mut checks).await;
    }
    checks.push(ca_root(
        credentials,
        client.base().starts_with("https://"),
        args.warn_within,
    ));
    if reachable {
        checks.push(ca_issuer(client, args.warn_within).await);
        checks.push(policies(client).await);
        if !args.paths.is_empty() {
            checks.push(local_files(client, &args.paths).await);
        }
        checks.push(proxies(client).await);
    }
    if let Some(url) = &args.webhook {
        checks.push(webhook(url, args.webhook_ca.as_ref(), args.warn_within).await);
    }
    let summary = summary(&checks);
    match args.output {
        CheckOutput::Text => print!("{}", render(&checks, &summary)),
        CheckOutput::Json => {
            let v = json!({
                "ok": checks.iter().all(|c| matches!(c.status, Status::Pass | Status::Skip)),
                "checks": checks,
                "summary": summary,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
    }
    if checks
        .iter()
        .all(|c| matches!(c.status, Status::Pass | Status::Skip))
    {
        Ok(())
    } else {
        Err(CtlError {
            code: if reachable {
                EXIT_REJECTED
            } else {
                EXIT_UNREACHABLE
            },
            message: summary,
        })
    }
}

/// The summary line.
pub fn summary(checks: &[Check]) -> String {
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let (pass, warn, fail, skip) = (
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skip),
    );
    let skipped = if skip > 0 {
        format!(", {skip} not checked")
    } else {
        String::new()
    };
    if warn == 0 && fail == 0 {
        format!("all {pass} checks passed{skipped}")
    } else {
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        format!(
            "{} failed, {}, {} passed{skipped}",
            fail,
            plural(warn, "warning"),
            pass
        )
    }
}

/// The checklist as text.
pub fn render(checks: &[Check], summary: &str) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{} {:width$}  {}\n",
            c.status.symbol(),
            c.name,
            c.detail
        ));
    }
    let worst = if checks.iter().any(|c| c.status == Status::Fail) {
        Status::Fail
    } else if checks.iter().any(|c| c.status == Status::Warn) {
        Status::Warn
    } else {
        Status::Pass
    };
    out.push_str(&format!("{} {summary}\n", worst.symbol()));
    out
}

async fn control_plane(client: &AdminClient, checks: &mut Vec<Check>) -> bool {
    const NAME: &str = "control plane reachable";
    match client.send(Method::GET, "/healthz", None).await {
        Err(e) => {
            checks.push(check(NAME, Status::Fail, e.to_string()));
            return false;
        }
        Ok(r) if r.status != StatusCode::OK => {
            checks.push(check(
                NAME,
                Status::Fail,
                format!("GET /healthz: {}", r.status),
            ));
            return false;
        }
        Ok(_) => {}
    }
    // An authenticated read proves the credential.
    match client.send(Method::GET, "/v1/policies", None).await {
        Ok(r) if r.status == StatusCode::OK => {
            checks.push(check(
                NAME,
                Status::Pass,
                format!("{} (credential accepted)", client.base()),
            ));
        }
        Ok(r) => checks.push(check(
            NAME,
            Status::Fail,
            format!(
                "{} answers, but GET /v1/policies: {}",
                client.base(),
                reply_errors(&r).join("; ")
            ),
        )),
        Err(e) => checks.push(check(NAME, Status::Fail, e.to_string())),
    }
    true
}

async fn readyz(client: &AdminClient, checks: &mut Vec<Check>) {
    const NAME: &str = "control plane ready";
    checks.push(match client.send(Method::GET, "/readyz", None).await {
        Ok(r) if r.status == StatusCode::OK => check(NAME, Status::Pass, "/readyz: ready"),
        Ok(r) => check(
            NAME,
            Status::Fail,
            format!("/readyz {}: {}", r.status.as_u16(), r.text().trim()),
        ),
        Err(e) => check(NAME, Status::Fail, e.to_string()),
    });
}

/// A certificate's subject and validity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Validity {
    subject: String,
    not_before: i64,
    not_after: i64,
}

fn validity(der: &[u8]) -> Result<Validity, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(Validity {
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn date(unix: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Judges an expiry: expired (or not yet valid) fails, within `warn_within` warns.
fn expiry(name: &str, what: &str, v: &Validity, warn_within: Duration, now: i64) -> Check {
    let left = v.not_after - now;
    let days = left / 86_400;
    if v.not_before > now {
        check(
            name,
            Status::Fail,
            format!(
                "{what} {} is not valid before {}",
                v.subject,
                date(v.not_before)
            ),
        )
    } else if left <= 0 {
        check(
            name,
            Status::Fail,
            format!("{what} {} EXPIRED at {}", v.subject, date(v.not_after)),
        )
    } else if left < i64::try_from(warn_within.as_secs()).unwrap_or(i64::MAX) {
        check(
            name,
            Status::Warn,
            format!(
                "{what} {} expires in {days} days ({}): rotate it",
                v.subject,
                date(v.not_after)
            ),
        )
    } else {
        check(
            name,
            Status::Pass,
            format!("{what} valid until {} ({days} days)", date(v.not_after)),
        )
    }
}

fn ca_root(credentials: &super::auth::Credentials, https: bool, warn_within: Duration) -> Check {
    const NAME: &str = "CA root";
    let Some(path) = credentials
        .ca
        .clone()
        .or_else(|| credentials.ca_dir.as_ref().map(|d| d.join("roots.pem")))
    else {
        let why = if https {
            "no --ca or --ca-dir"
        } else {
            "plaintext admin API and no --ca or --ca-dir"
        };
        return check(NAME, Status::Skip, format!("not checked ({why})"));
    };
    let pem = match std::fs::read(&path) {
        Ok(p) => p,
        Err(e) => return check(NAME, Status::Fail, format!("{}: {e}", path.display())),
    };
    let mut soonest: Option<Validity> = None;
    for der in CertificateDer::pem_slice_iter(&pem) {
        let v = match der.map_err(|e| e.to_string()).and_then(|d| validity(&d)) {
            Ok(v) => v,
            Err(e) => return check(NAME, Status::Fail, format!("{}: {e}", path.display())),
        };
        if soonest.as_ref().is_none_or(|s| v.not_after < s.not_after) {
            soonest = Some(v);
        }
    }
    match soonest {
        Some(v) => expiry(NAME, "root", &v, warn_within, now()),
        None => check(
            NAME,
            Status::Fail,
            format!("{}: no certificate in it", path.display()),
        ),
    }
}

async fn metrics_value(client: &AdminClient, name: &str) -> Result<Option<f64>, String> {
    let r = client
        .send(Method::GET, "/metrics", None)
        .await
        .map_err(|e| e.to_string())?;
    if r.status != StatusCode::OK {
        return Err(format!("GET /metrics: {}", r.status));
    }
    Ok(r.text().lines().find_map(|l| {
        let (metric, value) = l.split_once(' ')?;
        (metric == name)
            .then(|| value.trim().parse().ok())
            .flatten()
    }))
}

async fn ca_issuer(client: &AdminClient, warn_within: Duration) -> Check {
    const NAME: &str = "CA intermediate";
    match metrics_value(client, "weft_control_issuer_expiry_timestamp_seconds").await {
        Err(e) => check(NAME, Status::Fail, e),
        Ok(None) => check(
            NAME,
            Status::Fail,
            "weft_control_issuer_expiry_timestamp_seconds missing from /metrics",
        ),
        Ok(Some(v)) if v <= 0.0 => check(
            NAME,
            Status::Skip,
            "the control plane runs without a CA (no mesh identity)",
        ),
        #[allow(clippy::cast_possible_truncation)]
        Ok(Some(v)) => expiry(
            NAME,
            "issuing certificate",
            &Validity {
                subject: "of the control plane".to_owned(),
                not_before: 0,
                not_after: v as i64,
            },
            warn_within,
            now(),
        ),
    }
}

async fn policies(client: &AdminClient) -> Check {
    const NAME: &str = "policies";
    let r = match client.send(Method::GET, "/v1/policies", None).await {
        Ok(r) if r.status == StatusCode::OK => r,
        Ok(r) => {
            return check(
                NAME,
                Status::Fail,
                format!("GET /v1/policies: {}", reply_errors(&r).join("; ")),
            )
        }
        Err(e) => return check(NAME, Status::Fail, e.to_string()),
    };
    let v = r.json().unwrap_or(Value::Null);
    let version = s(&v, "version");
    let revision = match v.get("revision") {
        Some(Value::Number(n)) => format!(", revision {n}"),
        _ => String::new(),
    };
    let files = list(&v, "files").len();
    match v.get("error").and_then(Value::as_str) {
        Some(e) => check(
            NAME,
            Status::Fail,
            format!(
                "the store holds an invalid policy, serving the last good set (version {version}): {}",
                e.lines().next().unwrap_or_default()
            ),
        ),
        None => check(NAME, Status::Pass, format!("version {version}{revision}, {files} files, valid")),
    }
}

async fn local_files(client: &AdminClient, paths: &[PathBuf]) -> Check {
    const NAME: &str = "local policy files";
    let files = match read_policy_files(paths) {
        Ok(f) => f,
        Err(e) => return check(NAME, Status::Fail, e.message),
    };
    let body = json!({ "files": files }).to_string();
    match client.send(Method::POST, "/v1/validate", Some(body)).await {
        Ok(r) if r.status == StatusCode::OK => check(
            NAME,
            Status::Pass,
            format!("{} files valid against the serving set", files.len()),
        ),
        Ok(r) => {
            let errors = reply_errors(&r);
            let more = if errors.len() > 1 {
                format!(" (+{} more: weftctl validate -f)", errors.len() - 1)
            } else {
                String::new()
            };
            check(
                NAME,
                Status::Fail,
                format!("{}{more}", errors.first().cloned().unwrap_or_default()),
            )
        }
        Err(e) => check(NAME, Status::Fail, e.to_string()),
    }
}

/// A connected proxy's problem: its name and what is wrong.
fn proxy_problems(statuses: &Value, diff: &Value) -> (usize, Vec<String>, Vec<String>) {
    let current: std::collections::BTreeMap<String, &Value> = list(diff, "proxies")
        .iter()
        .map(|p| (s(p, "id"), p))
        .collect();
    let mut connected = 0;
    let mut stale = Vec::new();
    let mut nacking = Vec::new();
    for p in statuses.as_array().map_or(&[][..], Vec::as_slice) {
        if s(p, "state") != "connected" {
            continue;
        }
        let id = s(p, "id");
        // Another replica's proxy: its versions are that replica's to know.
        let Some(now) = current.get(&id) else {
            continue;
        };
        connected += 1;
        if p.get("nacking") == Some(&Value::Bool(true)) {
            nacking.push(format!("{id} NACKing: {}", one_line(&s(p, "last_nack"))));
            continue;
        }
        let acked = p.get("versions");
        let behind: Vec<String> = now
            .get("types")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(t, d)| acked.and_then(|a| a.get(t.as_str())) != d.get("version"))
            .map(|(t, _)| t.clone())
            .collect();
        if !behind.is_empty() {
            stale.push(format!("{id} stale ({})", behind.join(", ")));
        }
    }
    (connected, stale, nacking)
}

fn named(items: &[String]) -> String {
    let mut out = items
        .iter()
        .take(NAMED_PROXIES)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > NAMED_PROXIES {
        out.push_str(&format!(
            "; +{} more (weftctl status)",
            items.len() - NAMED_PROXIES
        ));
    }
    out
}

async fn proxies(client: &AdminClient) -> Check {
    const NAME: &str = "proxies in sync";
    let mut last = (0, Vec::new(), Vec::new());
    for attempt in 0..PROXY_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let statuses = match client.send(Method::GET, "/v1/proxies", None).await {
            Ok(r) if r.status == StatusCode::OK => r.json().unwrap_or(Value::Null),
            Ok(r) => {
                return check(
                    NAME,
                    Status::Fail,
                    format!("GET /v1/proxies: {}", reply_errors(&r).join("; ")),
                )
            }
            Err(e) => return check(NAME, Status::Fail, e.to_string()),
        };
        let diff = match client
            .send(
                Method::POST,
                "/v1/diff",
                Some(json!({ "files": [] }).to_string()),
            )
            .await
        {
            Ok(r) if r.status == StatusCode::OK => r.json().unwrap_or(Value::Null),
            Ok(r) => {
                return check(
                    NAME,
                    Status::Fail,
                    format!(
                        "POST /v1/diff (the versions each proxy should have): {}",
                        reply_errors(&r).join("; ")
                    ),
                )
            }
            Err(e) => return check(NAME, Status::Fail, e.to_string()),
        };
        last = proxy_problems(&statuses, &diff);
        if last.1.is_empty() && last.2.is_empty() {
            break;
        }
    }
    let (connected, stale, nacking) = last;
    if stale.is_empty() && nacking.is_empty() {
        let detail = if connected == 0 {
            "no proxies connected".to_owned()
        } else {
            format!("{connected} proxies ACKed the current config")
        };
        return check(NAME, Status::Pass, detail);
    }
    let bad: Vec<String> = nacking.into_iter().chain(stale).collect();
    check(
        NAME,
        Status::Fail,
        format!(
            "{} of {connected} proxies behind: {}",
            bad.len(),
            named(&bad)
        ),
    )
}

/// Accepts any certificate during the handshake and keeps the chain: the check judges it
/// afterwards (dates, and the chain with `--webhook-ca`).
#[derive(Debug)]
struct RecordChain {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl rustls::client::danger::ServerCertVerifier for RecordChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self
            .chain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = chain;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies `chain` for `host` against the roots in `ca`.
fn verify_chain(chain: &[CertificateDer<'static>], host: &str, ca: &PathBuf) -> Result<(), String> {
    let pem = std::fs::read(ca).map_err(|e| format!("--webhook-ca {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(&pem) {
        let der = der.map_err(|e| format!("--webhook-ca {}: {e}", ca.display()))?;
        roots
            .add(der)
            .map_err(|e| format!("--webhook-ca {}: {e}", ca.display()))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| format!("--webhook-ca {}: {e}", ca.display()))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let (leaf, rest) = chain.split_first().ok_or("no certificate presented")?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        leaf,
        rest,
        &name,
        &[],
        UnixTime::now(),
    )
    .map(drop)
    .map_err(|e| format!("not trusted by --webhook-ca {}: {e}", ca.display()))
}

async fn webhook(url: &str, ca: Option<&PathBuf>, warn_within: Duration) -> Check {
    const NAME: &str = "injection webhook";
    match probe_webhook(url, ca).await {
        Err(e) => check(NAME, Status::Fail, format!("{url}: {e}")),
        Ok((leaf, health)) => {
            let mut c = expiry(NAME, "serving certificate", &leaf, warn_within, now());
            if c.status == Status::Pass {
                match health {
                    Ok(()) => c.detail.push_str(", /healthz ok"),
                    Err(e) => {
                        c.status = Status::Fail;
                        c.detail = format!("{url}: /healthz: {e}");
                    }
                }
            }
            c
        }
    }
}

/// Connects to the webhook: its leaf certificate's validity and its `/healthz` answer.
async fn probe_webhook(
    url: &str,
    ca: Option<&PathBuf>,
) -> Result<(Validity, Result<(), String>), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("expected https://host:port".to_owned());
    }
    let host = uri
        .host()
        .ok_or("no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(RecordChain {
        provider: Arc::clone(&provider),
        chain: Mutex::new(Vec::new()),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(
            Arc::clone(&recorder) as Arc<dyn rustls::client::danger::ServerCertVerifier>
        )
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let deadline = Duration::from_secs(10);
    let tcp = tokio::time::timeout(
        deadline,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| format!("cannot connect: {e}"))?;
    let mut tls = tokio::time::timeout(
        deadline,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_owned())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    let chain = recorder
        .chain
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let leaf = validity(chain.first().ok_or("no certificate presented")?)?;
    if let Some(ca) = ca {
        verify_chain(&chain, &host, ca)?;
    }
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let health = async {
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        // The answer is a few bytes; at most 64 KiB are read.
        while answer.len() < 64 << 10 {
            let n = tls.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let status = text.lines().next().unwrap_or_default().to_owned();
        if status.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("answered {status:?}"))
        }
    };
    let health = tokio::time::timeout(deadline, health)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
    Ok((leaf, health))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checklist_is_one_line_per_check_and_a_summary() {
        let checks = vec![
            check("control plane reachable", Status::Pass, "https://cp:15011"),
            check("CA root", Status::Warn, "root x expires in 12 days"),
            check(
                "proxies in sync",
                Status::Fail,
                "1 of 2 proxies behind: web-1 stale (routes)",
            ),
            check("injection webhook", Status::Skip, "not checked"),
        ];
        let out = render(&checks, &summary(&checks));
        assert_eq!(
            out,
            "\
✔ control plane reachable  https://cp:15011
! CA root                  root x expires in 12 days
✘ proxies in sync          1 of 2 proxies behind: web-1 stale (routes)
- injection webhook        not checked
✘ 1 failed, 1 warning, 1 passed, 1 not checked
"
        );
        let ok = vec![check("a", Status::Pass, "x"), check("b", Status::Pass, "y")];
        assert_eq!(summary(&ok), "all 2 checks passed");
    }

    #[test]
    fn expiry_warns_within_the_window_and_fails_when_expired() {
        let now = 1_000_000_000;
        let v = |not_after| Validity {
            subject: "CN=x".into(),
            not_before: now - 10,
            not_after,
        };
        let window = Duration::from_secs(30 * 86_400);
        assert_eq!(
            expiry("c", "root", &v(now + 365 * 86_400), window, now).status,
            Status::Pass
        );
        let warn = expiry("c", "root", &v(now + 10 * 86_400), window, now);
        assert_eq!(warn.status, Status::Warn);
        assert!(
            warn.detail.contains("expires in 10 days"),
            "{}",
            warn.detail
        );
        let expired = expiry("c", "root", &v(now - 1), window, now);
        assert_eq!(expired.status, Status::Fail);
        assert!(expired.detail.contains("EXPIRED"), "{}", expired.detail);
        let early = Validity {
            not_before: now + 100,
            ..v(now + 86_400 * 90)
        };
        assert_eq!(
            expiry("c", "root", &early, window, now).status,
            Status::Fail
        );
    }

    #[test]
    fn stale_and_nacking_proxies_are_named() {
        let statuses = json!([
            {"id": "a", "state": "connected", "nacking": false, "versions": {"routes": "r1", "clusters": "c1"}},
            {"id": "b", "state": "connected", "nacking": false, "versions": {"routes": "r0", "clusters": "c1"}},
            {"id": "c", "state": "connected", "nacking": true, "last_nack": "routes: bad\nregex", "versions": {}},
            {"id": "d", "state": "disconnected", "versions": {}},
            {"id": "e", "state": "connected", "replica": "other", "versions": {}}
        ]);
        let diff = json!({"proxies": [
            {"id": "a", "types": {"routes": {"version": "r1"}, "clusters": {"version": "c1"}}},
            {"id": "b", "types": {"routes": {"version": "r1"}, "clusters": {"version": "c1"}}},
            {"id": "c", "types": {"routes": {"version": "r1"}}}
        ]});
        let (connected, stale, nacking) = proxy_problems(&statuses, &diff);
        assert_eq!(connected, 3);
        assert_eq!(stale, ["b stale (routes)"]);
        assert_eq!(nacking, ["c NACKing: routes: bad regex"]);
    }
}
