//! One request's attempts against a cluster (the inner part of the request path that
//! `pipeline.rs` assembles). Named `attempts` for what it produces: one or more tries of a request.
//!
//! ```text
//! breaker: active requests -> buffer the body for replay (only if the route retries this
//! method) -> per attempt: pick an endpoint (balancer over available endpoints; a retry avoids
//! the previous one) -> breaker: pending (+ retries for a retry) -> send under the per-try
//! timeout -> outlier report -> retriable and budget/breaker allow? back off (Retry-After or
//! jittered exponential) and go again
//! ```
//!
//! When the route has no retry policy, or the method/body cannot be retried, the request body
//! streams through untouched: nothing is buffered and no header is copied.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response};
use tokio::time::Instant;

use crate::breaker::{Limit, Permit};
use crate::cluster::Cluster;
use crate::http::error::ProxyError;
use crate::retry::body::{buffer_for_replay, Buffered, Replayable};
use crate::retry::policy::{retry_after, MAX_RETRY_AFTER};
use crate::retry::{Outcome, RequestBody, RetryPolicy};
use crate::upstream::{UpstreamBody, UpstreamError, Wire};

/// A response from an endpoint (an HTTP/1.1 connection goes back to its pool when the body
/// has been read to the end).
#[derive(Debug)]
pub struct Answer {
    /// Response head and streaming body.
    pub response: Response<UpstreamBody>,
    /// Its `grpc-status` header field (a trailers-only gRPC response), looked up once for the
    /// retry decision and the request's metrics.
    pub grpc_status: Option<http::HeaderValue>,
    /// When its head arrived (one clock read for the endpoint's load and the metrics).
    pub at: std::time::Instant,
}

/// Looked up in every response: a name parsed once, not per lookup.
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The request as it is sent on each attempt.
enum Sendable {
    /// Sent once (no retries): the downstream body streams through.
    Once(Option<Request<RequestBody>>),
    /// Replayable: the head is lent to each attempt (HTTP/1.1 only reads it) and the buffered
    /// body copied.
    Replay(Parts, Replayable),
}

impl Drop for Sendable {
    fn drop(&mut self) {
        // The lent head's map, emptied, becomes the next response's (`h1client::spare`).
        if let Sendable::Replay(head, _) = self {
            crate::h1client::spare::give(std::mem::take(&mut head.headers));
        }
    }
}

/// Reports a failure to outlier detection if an attempt is abandoned because the request
/// deadline passed (the black-holed endpoint case); a downstream cancel reports nothing.
struct Abandoned<'a> {
    cluster: &'a Cluster,
    endpoint: usize,
    deadline: Option<Instant>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.cluster.report(self.endpoint, false);
        }
    }
}

/// Sends the request `head` + `body` (already prepared for `wire`) to `cluster`, retrying as
/// `policy` allows. `deadline` is when the route/cluster request timeout fires (the caller
/// enforces it). Taken apart: the head is moved once into whatever is sent (no
/// `Request::map`, no second split).
///
/// Clock reads: `arrived_at` (the request's arrival, read by the caller) counts the request in
/// the retry budget and, when the request had no body to wait for, is the first attempt's start
/// (the pick's ejection/EWMA time and the endpoint's RTT start: only this function's own work
/// lies between them); otherwise each attempt reads the clock once for its pick, its RTT start
/// and the pool's idle-connection check (`EndpointPool::send_at`). A response's arrival is read once for its RTT, the outlier report and the metrics.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    head: Parts,
    body: crate::http::body::CountedBody,
    cluster: &Arc<Cluster>,
    policy: Option<&RetryPolicy>,
    hash: Option<u64>,
    wire: Wire,
    deadline: Option<Instant>,
    arrived_at: std::time::Instant,
) -> Result<Answer, ProxyError> {
    // Access log / span: which endpoint each attempt went to (`None` unless observed).
    let observed = crate::observe::note_in(&head.extensions, &head.headers);
    let state = cluster.state();
    let retrying = policy.filter(|p| p.max_retries > 0 && p.allows_method(&head.method));
    // No body to wait for: nothing but this function's work before the first attempt starts.
    let mut attempt_now =
        http_body::Body::is_end_stream(&body).then(|| crate::lb::load::nanos_at(arrived_at));
    let mut sendable = match retrying {
        None => Sendable::Once(Some(Request::from_parts(head, RequestBody::Stream(body)))),
        Some(p) => {
            state
                .budget
                .deposit_at(&p.budget, crate::lb::load::nanos_at(arrived_at));
            match buffer_for_replay(body, p.max_body_bytes).await {
                Ok(Buffered::Replayable(body)) => Sendable::Replay(head, body),
                Ok(Buffered::Once(body)) => Sendable::Once(Some(Request::from_parts(head, body))),
                Err(e) => return Err(ProxyError::BadRequestBody(e)),
            }
        }
    };
    let max_retries = match (&sendable, retrying) {
        (Sendable::Replay(..), Some(p)) => p.max_retries,
        _ => 0,
    };
    let per_try = policy.and_then(|p| p.per_try_timeout);
    let mut last: Option<usize> = None;
    let mut attempt = 0u32;
    loop {
        let now = attempt_now
            .take()
            .unwrap_or_else(crate::lb::load::now_nanos);
        let Some(i) = pick(cluster, hash, last, now) else {
            return Err(ProxyError::NoEndpoints {
                cluster: cluster.name.to_string(),
            });
        };
        last = Some(i);
        let endpoint = &cluster.endpoints[i];
        let _retry: Option<Permit> = if attempt > 0 {
            match state
                .breaker
                .try_acquire(Limit::Retries, cluster.breaker.get(Limit::Retries))
            {
                Ok(p) => Some(p),
                Err(l) => {
                    state.metrics.retry_overloaded.inc();
                    return Err(ProxyError::Overloaded(l));
                }
            }
        } else {
            None
        };
        let pending = state
            .breaker
            .try_acquire(Limit::Pending, cluster.breaker.get(Limit::Pending))
            .map_err(ProxyError::Overloaded)?;
        if let Some(note) = &observed {
            note.attempt(endpoint.addr);
        }
        let load = endpoint.load.start_at(now);
        let mut guard = Abandoned {
            cluster,
            endpoint: i,
            deadline,
        };
        let (pool, timeout, errors) = (
            &endpoint.pool,
            cluster.connect_timeout,
            &cluster.connect_errors,
        );
        let sent = async {
            match &mut sendable {
                Sendable::Once(req) => match req.take() {
                    Some(req) => pool.send_at(req, wire, timeout, errors, now).await,
                    // Unreachable: a `Once` request is never retried (max_retries is 0 for it).
                    None => Err(UpstreamError::Overloaded { addr: pool.addr() }),
                },
                Sendable::Replay(head, body) => {
                    pool.send_head(head, body.body(), wire, timeout, errors, now)
                        .await
                }
            }
        };
        let result: Result<Response<UpstreamBody>, ProxyError> = match per_try {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r.map_err(ProxyError::from),
                Err(_) => Err(ProxyError::PerTryTimeout(t)),
            },
            None => sent.await.map_err(ProxyError::from),
        };
        // Finished in time: nothing to report on drop.
        guard.deadline = None;
        drop(guard);
        drop(pending);
        // Only a response needs the time (its endpoint's RTT, then the request's metrics).
        let mut arrived = None;
        let mut grpc = None;
        let mut ended = 0;
        let outcome = match &result {
            Ok(resp) => {
                let now = std::time::Instant::now();
                arrived = Some(now);
                ended = crate::lb::load::nanos_at(now);
                load.observe_at(ended);
                grpc = resp.headers().get(&GRPC_STATUS).cloned();
                Outcome::Response {
                    status: resp.status(),
                    grpc_status: grpc.as_ref().and_then(|v| v.to_str().ok()?.parse().ok()),
                }
            }
            Err(ProxyError::ConnectFailed(_) | ProxyError::ConnectTimeout(_)) => {
                Outcome::ConnectFailure
            }
            Err(ProxyError::PerTryTimeout(_)) => Outcome::PerTryTimeout,
            Err(ProxyError::BadRequest(_) | ProxyError::Overloaded(_)) => {
                // The client's body broke, or the pool refused: not the endpoint's fault.
                drop(load);
                return finish(result, attempt, state, None, arrived);
            }
            Err(_) => Outcome::Reset,
        };
        drop(load);
        let failed = match outcome {
            Outcome::Response { status, .. } => status.is_server_error(),
            _ => true,
        };
        if ended == 0 {
            cluster.report(i, !failed);
        } else {
            cluster.report_at(i, !failed, ended);
        }
        let retriable = retrying.is_some_and(|p| p.is_retriable(outcome));
        if !retriable || attempt >= max_retries {
            return finish(result, attempt, state, grpc, arrived);
        }
        let Some(p) = retrying else {
            return finish(result, attempt, state, grpc, arrived);
        };
        // The pause: the upstream's Retry-After if it sent one, else jittered backoff.
        let hinted = result
            .as_ref()
            .ok()
            .and_then(|resp| retry_after(resp.headers()));
        let pause = match hinted {
            Some(d) if d > MAX_RETRY_AFTER => return finish(result, attempt, state, grpc, arrived),
            Some(d) => d,
            None => p.backoff(attempt + 1),
        };
        if deadline.is_some_and(|d| Instant::now() + pause >= d) {
            // No time left for another attempt: answer with what we have.
            return finish(result, attempt, state, grpc, arrived);
        }
        if !state.budget.try_withdraw(&p.budget) {
            state.metrics.budget_exhausted.inc();
            state.metrics.retry_budget_exhausted.inc();
            return finish(result, attempt, state, grpc, arrived);
        }
        if attempt > 0 {
            state.metrics.retry_failure.inc();
        }
        drop(result);
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

/// Counts how the last retry ended and returns the attempt's result (`grpc_status`: its
/// `grpc-status` field if it was looked up; `arrived`: when the response arrived).
fn finish(
    result: Result<Response<UpstreamBody>, ProxyError>,
    attempt: u32,
    state: &crate::cluster::ClusterState,
    grpc_status: Option<http::HeaderValue>,
    arrived: Option<std::time::Instant>,
) -> Result<Answer, ProxyError> {
    let ok = matches!(&result, Ok(r) if !r.status().is_server_error());
    if attempt > 0 {
        if ok {
            state.metrics.retry_success.inc();
        } else {
            state.metrics.retry_failure.inc();
        }
    }
    result.map(|response| Answer {
        response,
        grpc_status,
        at: arrived.unwrap_or_else(std::time::Instant::now),
    })
}

/// Picks an endpoint, avoiding the one the previous attempt used when another is available.
fn pick(cluster: &Cluster, hash: Option<u64>, previous: Option<usize>, now: u64) -> Option<usize> {
    let i = cluster.pick_index_at(hash, now)?;
    match previous {
        Some(p) if p == i && cluster.endpoints.len() > 1 => {
            // A ring hash maps the key to the same endpoint again: move on without it.
            cluster.pick_index_at(None, now)
        }
        _ => Some(i),
    }
}

/// How long until `deadline`, if any.
pub fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}
