//! Which etcd members the replica's client sends its requests to: the ones that answer.
//!
//! The client balances requests over every `--etcd-endpoints` member, and a member that is down
//! stays in the balancer: each request the balancer hands it fails ("connection refused")
//! although the others would have answered. So, with several endpoints, a task probes each
//! member every [`PROBE_INTERVAL`] (a count-only read of the CA key, through a client of that
//! member alone, with `--etcd-require-leader` semantics: a member cut off from the quorum does
//! not count) and keeps only the members that answered in the balancer; one that answers again
//! goes back in. When none answers, all stay (requests then say etcd is unavailable, and the
//! first member back is used at once).
//!
//! Between a member's death and the next probe, requests that could not even connect to it,
//! or were still queued on its connection when that closed (they never reached etcd, so
//! repeating them is safe, compare-and-swap included), are tried again ([`retry_unsent`]).

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use futures::future::join_all;

use super::{classify, AbortOnDrop, StoreError};

/// How often every member is probed.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The longest a probe may take (at most the request timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times a request that never reached etcd is sent (the balancer picks a member for
/// each try).
const UNSENT_TRIES: u32 = 6;

/// Starts the probing task for `client` (every member of `endpoints`); `None` with a single
/// endpoint (nothing to choose from). `key` is read by the probes.
pub(crate) fn spawn(
    client: &Client,
    endpoints: &[String],
    options: &ConnectOptions,
    request_timeout: Duration,
    key: String,
) -> Option<AbortOnDrop> {
    if endpoints.len() < 2 {
        return None;
    }
    let task = tokio::spawn(run(
        client.clone(),
        endpoints.to_vec(),
        options.clone(),
        request_timeout.min(PROBE_TIMEOUT),
        key,
    ));
    Some(AbortOnDrop(task))
}

/// Which members to keep in the balancer, given which answered: those, or every one when
/// none did.
pub(crate) fn wanted(healthy: &[bool]) -> Vec<bool> {
    if healthy.iter().any(|h| *h) {
        healthy.to_vec()
    } else {
        vec![true; healthy.len()]
    }
}

async fn run(
    client: Client,
    endpoints: Vec<String>,
    options: ConnectOptions,
    timeout: Duration,
    key: String,
) {
    let mut probes: Vec<Option<Client>> = vec![None; endpoints.len()];
    let mut in_balancer = vec![true; endpoints.len()];
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let healthy = join_all(
            endpoints
                .iter()
                .zip(probes.iter_mut())
                .map(|(url, probe)| answers(url, probe, &options, timeout, &key)),
        )
        .await;
        for (i, want) in wanted(&healthy).into_iter().enumerate() {
            if want == in_balancer[i] {
                continue;
            }
            let url = &endpoints[i];
            let changed = if want {
                client.add_endpoint(url).await
            } else {
                client.remove_endpoint(url).await
            };
            match changed {
                Ok(()) => {
                    in_balancer[i] = want;
                    if want {
                        tracing::info!(member = %url, "etcd member answers again: sending it requests");
                    } else {
                        tracing::warn!(member = %url, "etcd member does not answer: sending its requests to the other members");
                    }
                }
                Err(e) => {
                    tracing::warn!(member = %url, "cannot change the etcd client's members: {e}")
                }
            }
        }
    }
}

/// Whether the member at `url` answers a read within `timeout` (its client made on first use).
async fn answers(
    url: &str,
    probe: &mut Option<Client>,
    options: &ConnectOptions,
    timeout: Duration,
    key: &str,
) -> bool {
    if probe.is_none() {
        match tokio::time::timeout(timeout, Client::connect([url], Some(options.clone()))).await {
            Ok(Ok(c)) => *probe = Some(c),
            _ => return false,
        }
    }
    let Some(c) = probe else { return false };
    let mut kv = c.kv_client();
    matches!(
        tokio::time::timeout(
            timeout,
            kv.get(key, Some(GetOptions::new().with_count_only()))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Whether `e` says the request never reached etcd: the connection to the member the
/// balancer picked could not be made, or was found closed before the request was written.
pub(crate) fn never_sent(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return false;
    };
    let mut text = s.message().to_owned();
    let mut source = std::error::Error::source(s);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        // hyper's `Canceled`: the request was handed back before the connection took it, so
        // nothing of it was written: "connection was not ready" (the connection was already
        // closed when the request was queued), or "connection closed" (it closed with the
        // request still queued, as when the member dies between the balancer's pick and the
        // write). Any other hyper error (a reset, "connection closed before message
        // completed", an h2 error) may come after the request was written: not this.
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    // "tcp connect error": the connection to the member could not be made. "connection was
    // not ready": hyper found the member's connection closed when it went to write the request
    // (its `Canceled` error: the request was handed back unsent), as right after a member died.
    text.contains("tcp connect error") || text.contains("connection was not ready")
}

/// `op()` within `limit`, sent again (up to [`UNSENT_TRIES`] times, within the same limit)
/// while it fails before reaching etcd; its error classified.
pub(crate) async fn retry_unsent<T, Fut>(
    store: &str,
    limit: Duration,
    what: &str,
    mut op: impl FnMut() -> Fut,
) -> Result<T, StoreError>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut tries = 0;
    loop {
        tries += 1;
        match tokio::time::timeout_at(deadline, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if tries < UNSENT_TRIES && never_sent(&e) => {
                tracing::debug!(
                    what,
                    "the request did not reach an etcd member (refused or closed connection); trying another: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20) * tries).await;
            }
            Ok(Err(e)) => return Err(classify(store, what, &e)),
            Err(_) => {
                return Err(StoreError::Unavailable {
                    store: store.to_owned(),
                    reason: format!(
                        "{what}: no answer within {} (--etcd-timeout)",
                        humantime::format_duration(limit)
                    ),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_members_that_answer_or_all_when_none_does() {
        assert_eq!(wanted(&[true, false, true]), [true, false, true]);
        assert_eq!(wanted(&[false, false, true]), [false, false, true]);
        assert_eq!(wanted(&[false, false, false]), [true, true, true]);
    }

    #[test]
    fn only_errors_before_sending_are_retried() {
        let refused = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        )));
        assert!(never_sent(&etcd_client::Error::GRpcStatus(refused)));
        let connect = tonic::Status::unavailable("tcp connect error");
        assert!(never_sent(&etcd_client::Error::GRpcStatus(connect)));
        // What a read right after a member's death got in a CI run (hyper's Canceled).
        let not_ready = tonic::Status::unknown(
            "operation was canceled: transport error: connection was not ready",
        );
        assert!(never_sent(&etcd_client::Error::GRpcStatus(not_ready)));
        // Sent, and maybe applied: never repeated.
        for s in [
            tonic::Status::unavailable("etcdserver: leader changed"),
            tonic::Status::deadline_exceeded("timeout"),
            tonic::Status::unknown("connection reset"),
        ] {
            assert!(!never_sent(&etcd_client::Error::GRpcStatus(s)));
        }
        assert!(!never_sent(&etcd_client::Error::InvalidArgs("x".into())));
    }

    type Body = http_body_util::Empty<bytes::Bytes>;

    fn request() -> http::Request<Body> {
        http::Request::post("http://member/etcdserverpb.KV/Range")
            .body(Body::new())
            .unwrap()
    }

    /// How tonic hands a hyper error to etcd-client: a `Status` found in its source chain.
    fn as_etcd_error(e: hyper::Error) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(e)))
    }

    /// A client HTTP/2 connection (real hyper) over an in-memory pipe; the pipe's other end.
    async fn h2_client() -> (
        hyper::client::conn::http2::SendRequest<Body>,
        hyper::client::conn::http2::Connection<
            hyper_util::rt::TokioIo<tokio::io::DuplexStream>,
            Body,
            hyper_util::rt::TokioExecutor,
        >,
        tokio::io::DuplexStream,
    ) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(near),
        )
        .await
        .unwrap();
        (send, conn, far)
    }

    #[tokio::test]
    async fn a_request_hyper_handed_back_unsent_is_retried() {
        // The member's connection closed with the request still queued on it (what a read
        // right after a member's SIGKILL got: "operation was canceled: transport error:
        // connection closed").
        let (mut send, conn, _far) = h2_client().await;
        let queued = send.send_request(request());
        drop(conn);
        let e = queued.await.unwrap_err();
        assert!(e.is_canceled(), "{e:?}");
        assert_eq!(
            std::error::Error::source(&e).map(ToString::to_string),
            Some("connection closed".to_owned())
        );
        assert!(never_sent(&as_etcd_error(e)));

        // The connection was closed already when the request was handed to it.
        let (mut send, conn, _far) = h2_client().await;
        drop(conn);
        let e = send.send_request(request()).await.unwrap_err();
        assert!(e.is_canceled(), "{e:?}");
        assert!(never_sent(&as_etcd_error(e)));
    }

    #[tokio::test]
    async fn a_request_the_member_received_is_not_retried_when_its_connection_dies() {
        // A real HTTP/2 server (the member) gets the request, then its connection ends before
        // it answers: the request may have been applied.
        let (mut send, conn, far) = h2_client().await;
        let client = tokio::spawn(conn);
        let (received_tx, received) = tokio::sync::oneshot::channel::<()>();
        let received_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(received_tx)));
        let service = hyper::service::service_fn(move |_req| {
            if let Some(tx) = received_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
        });
        let server = tokio::spawn(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(far), service),
        );
        let answer = tokio::spawn(send.send_request(request()));
        received.await.expect("the server got the request");
        server.abort();
        let e = answer.await.unwrap().unwrap_err();
        assert!(!e.is_canceled(), "{e:?}");
        assert!(!never_sent(&as_etcd_error(e)));
        client.abort();
    }
}
