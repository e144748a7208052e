//! Route filters (policy `routes[].filters`, proto `weft.v1.RouteFilters`; the Gateway API
//! `HTTPRoute` filter set is the model): what a route does to a request besides choosing its
//! destination.
//!
//! A route's filters are compiled **once**, when the snapshot is built ([`RouteFilters::build`]):
//! header names and values validated, values split into literal and variable parts,
//! percentages as integers (millionths), the mirror's cluster resolved, metric series leased.
//! Per request the pipeline applies them in this order:
//!
//! ```text
//! select():   fault delay drawn -> fault abort drawn -> redirect / direct response
//!             (an abort, redirect or direct response answers: no upstream is called)
//! forward:    (wait the delay) -> request header mutation -> path / host rewrite
//!             -> mirror (a copy) -> forward upstream -> response header mutation
//! ```
//!
//! Only `pipeline.rs` calls in here; this module depends on the snapshot's data types
//! (clusters, metrics handles, response bodies) and is never imported back by them.
//!
//! - [`headers`]: header mutation and the `${...}` variables.
//! - [`rewrite`]: path and host rewrites (and the prefix replacement redirects share).
//! - [`redirect`], [`direct`]: the route's own answers.
//! - [`fault`]: delay and abort injection.
//! - [`mirror`]: fire-and-forget copies to another cluster.
//! - [`metrics`]: the filters' metric families.

pub mod direct;
pub mod fault;
pub mod headers;
pub mod metrics;
pub mod mirror;
pub mod redirect;
pub mod rewrite;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body;
use rand::Rng;
use weft_proto::v1;

use crate::cluster::Cluster;
use crate::http::body::{BodyTap, ResponseBody};
use crate::metrics::{Metrics, RequestMetrics};
use crate::observe::ResponseFlags;

use direct::DirectResponse;
use fault::Fault;
use headers::{HeaderMutation, Vars};
use mirror::Mirror;
use redirect::Redirect;
use rewrite::Rewrite;

/// A share of 100% in millionths (the proto's `*_ppm`).
pub const PPM_ALL: u32 = 1_000_000;

/// `x-request-id`, the value of `${request_id}`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether a request drawn now falls in a share of `ppm` millionths.
pub(crate) fn draw(ppm: u32) -> bool {
    match ppm {
        0 => false,
        PPM_ALL.. => true,
        _ => rand::rng().random_range(0..PPM_ALL) < ppm,
    }
}

/// A random request id, formatted like a version-4 UUID.
pub fn new_request_id() -> HeaderValue {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    // Hex digits and dashes: a valid header value.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// What is wrong with a route's filters: `(field under filters, reason)` pairs.
#[derive(Debug, Default)]
pub struct FilterErrors(Vec<(String, String)>);

impl FilterErrors {
    /// Records a problem with `field` (relative to `filters`).
    pub fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push((field.into(), reason.into()));
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems.
    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }
}

impl fmt::Display for FilterErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (field, reason)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{field}: {reason}")?;
        }
        Ok(())
    }
}

/// What a route needs to compile its filters.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The route's name (a metric label, `${route}`).
    pub route: &'a Arc<str>,
    /// The route's `match.path.prefix`, if it matches a prefix.
    pub matched_prefix: Option<&'a str>,
    /// Whether the route has destinations.
    pub has_destinations: bool,
    /// The snapshot's clusters (the mirror's is resolved here).
    pub clusters: &'a HashMap<Arc<str>, Arc<Cluster>>,
    /// Metric families.
    pub metrics: &'a Metrics,
    /// The direction of the listener using the route table (a metric label).
    pub direction: &'static str,
}

/// The route's own answer.
#[derive(Debug)]
enum Answer {
    Redirect(Redirect),
    Direct(DirectResponse),
}

/// A route's compiled filters.
#[derive(Debug)]
pub struct RouteFilters {
    route: Arc<str>,
    fault: Option<Fault>,
    answer: Option<Answer>,
    request_headers: Option<HeaderMutation>,
    response_headers: Option<HeaderMutation>,
    rewrite: Option<Rewrite>,
    mirror: Option<Mirror>,
    uses_peer_identity: bool,
    uses_request_id: bool,
    /// The request handles of a route that answers itself (no destination): `cluster=""`.
    answer_metrics: Option<Arc<RequestMetrics>>,
}

impl RouteFilters {
    /// Compiles `f`; `Ok(None)` when the filters do nothing.
    pub fn build(
        f: &v1::RouteFilters,
        cx: &BuildContext<'_>,
    ) -> Result<Option<Self>, FilterErrors> {
        let mut errors = FilterErrors::default();
        let route = &**cx.route;
        let request_headers = f
            .request_headers
            .as_ref()
            .map(|m| HeaderMutation::build(m, "request_headers", route, true, &mut errors));
        let response_headers = f
            .response_headers
            .as_ref()
            .map(|m| HeaderMutation::build(m, "response_headers", route, false, &mut errors));
        let rewrite = Rewrite::build(
            &f.rewrite_path,
            &f.rewrite_path_prefix,
            &f.rewrite_host,
            cx.matched_prefix,
            &mut errors,
        );
        let answer = match (&f.redirect, &f.direct_response) {
            (Some(_), Some(_)) => {
                errors.push("redirect", "at most one of redirect, direct_response");
                None
            }
            (Some(r), None) => Some(Answer::Redirect(Redirect::build(
                r,
                cx.matched_prefix,
                &mut errors,
            ))),
            (None, Some(d)) => Some(Answer::Direct(DirectResponse::build(d, &mut errors))),
            (None, None) => None,
        };
        let fault = f
            .fault
            .as_ref()
            .and_then(|x| Fault::build(x, route, cx.metrics, &mut errors));
        let mirror = f
            .mirror
            .as_ref()
            .and_then(|m| Mirror::build(m, route, cx.clusters, cx.metrics, &mut errors));
        if answer.is_some() && (rewrite.is_some() || mirror.is_some()) {
            errors.push(
                "redirect",
                "mirror and rewrite need a destination: not with redirect or direct_response",
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mutations = || request_headers.iter().chain(response_headers.iter());
        let uses_peer_identity = mutations().any(HeaderMutation::uses_peer_identity);
        let uses_request_id = mutations().any(HeaderMutation::uses_request_id);
        let nothing = fault.is_none()
            && answer.is_none()
            && request_headers.is_none()
            && response_headers.is_none()
            && rewrite.is_none()
            && mirror.is_none();
        if nothing {
            return Ok(None);
        }
        let answer_metrics = (answer.is_some() && !cx.has_destinations)
            .then(|| cx.metrics.request_metrics(cx.direction, route, ""));
        Ok(Some(Self {
            route: Arc::clone(cx.route),
            fault,
            answer,
            request_headers,
            response_headers,
            rewrite,
            mirror,
            uses_peer_identity,
            uses_request_id,
            answer_metrics,
        }))
    }

    /// Whether the route answers every request itself (a redirect or a direct response): it
    /// needs no destination.
    pub fn is_terminal(&self) -> bool {
        self.answer.is_some()
    }

    /// The request handles a terminal route without destinations records its answers with.
    pub fn answer_metrics(&self) -> Option<&Arc<RequestMetrics>> {
        self.answer_metrics.as_ref()
    }

    /// The variables of `req`: the peer's identity only if a value uses it, the request id
    /// (the request's `x-request-id`, else a new one: `true`) only if a value uses it.
    fn vars<B>(&self, req: &Request<B>, peer: Option<&str>) -> (Vars, bool) {
        let peer_identity = if self.uses_peer_identity {
            peer.and_then(|p| HeaderValue::from_str(p).ok())
        } else {
            None
        };
        let (request_id, generated) = if self.uses_request_id {
            match req.headers().get(X_REQUEST_ID) {
                Some(id) => (Some(id.clone()), false),
                None => (Some(new_request_id()), true),
            }
        } else {
            (None, false)
        };
        (
            Vars {
                peer_identity,
                request_id,
            },
            generated,
        )
    }

    /// The decisions made before anything is awaited (fault, redirect, direct response), for
    /// `req` from `peer` (its verified SPIFFE ID), routed to `cluster` ("" when the route has
    /// no destination).
    pub fn decide<B>(
        self: &Arc<Self>,
        req: &Request<B>,
        peer: Option<&str>,
        cluster: &str,
    ) -> Decision {
        let delay = self.fault.as_ref().and_then(Fault::draw_delay);
        if delay.is_some() {
            crate::observe::note_flags(req, ResponseFlags::DELAY_INJECTED);
        }
        let (vars, generated_id) = self.vars(req, peer);
        let answer = self
            .fault
            .as_ref()
            .and_then(|f| f.draw_abort(req))
            .map(|a| (a.response, a.grpc_status))
            .or_else(|| match &self.answer {
                Some(Answer::Redirect(r)) => Some((r.respond(req), "")),
                Some(Answer::Direct(d)) => Some((d.respond(), "")),
                None => None,
            });
        if let Some((mut response, grpc_status)) = answer {
            crate::observe::note_route(req, &self.route, cluster);
            if let Some(m) = &self.response_headers {
                m.apply(response.headers_mut(), &vars);
            }
            return Decision::Answer(LocalAnswer {
                response,
                grpc_status,
                delay,
            });
        }
        Decision::Forward(Forwarding {
            filters: Arc::clone(self),
            delay,
            vars,
            generated_id,
            mirror: self.mirror.as_ref().is_some_and(Mirror::draw),
        })
    }
}

/// What a route's filters decided in `select`.
// Returned once per request and matched at once: boxing the answer would only add an
// allocation to every answered request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decision {
    /// Answer without calling an upstream: a fault abort, a redirect or a direct response.
    Answer(LocalAnswer),
    /// Forward, with the rest of the filters applied around it.
    Forward(Forwarding),
}

/// A response the route's filters answer with.
#[derive(Debug)]
pub struct LocalAnswer {
    response: Response<ResponseBody>,
    grpc_status: &'static str,
    delay: Option<Duration>,
}

impl LocalAnswer {
    /// `response`, at once (e.g. a rate limit refusing a route that answers itself).
    pub fn immediate(response: Response<ResponseBody>) -> Self {
        Self {
            response,
            grpc_status: "",
            delay: None,
        }
    }

    /// Waits the fault delay (if one was drawn), records the response in `metrics` and returns
    /// it.
    pub async fn respond(
        self,
        metrics: Arc<RequestMetrics>,
        start: Instant,
    ) -> Response<ResponseBody> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        metrics.record(
            self.response.status(),
            self.grpc_status,
            start.elapsed().as_secs_f64(),
        );
        self.response
    }
}

/// The filters of a forwarded request: applied around `forward`.
#[derive(Debug)]
pub struct Forwarding {
    filters: Arc<RouteFilters>,
    delay: Option<Duration>,
    vars: Vars,
    /// The request had no `x-request-id` and `vars` holds a new one: forward it too.
    generated_id: bool,
    /// The request was drawn for mirroring.
    mirror: bool,
}

impl Forwarding {
    /// The fault delay drawn for this request.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// Request header mutation, rewrite and mirror, in that order, on the request about to be
    /// forwarded; returns the tap that copies its body for the mirror, if one is needed.
    pub fn before_forward<B: Body>(&self, req: &mut Request<B>) -> Option<Box<dyn BodyTap>> {
        let f = &*self.filters;
        if self.generated_id {
            if let Some(id) = &self.vars.request_id {
                req.headers_mut().insert(X_REQUEST_ID, id.clone());
            }
        }
        if let Some(m) = &f.request_headers {
            m.apply(req.headers_mut(), &self.vars);
        }
        if let Some(r) = &f.rewrite {
            r.apply(req);
        }
        match &f.mirror {
            Some(m) if self.mirror => m.start(req),
            _ => None,
        }
    }

    /// Response header mutation, on whatever response `forward` produced.
    pub fn after_forward<B>(&self, resp: &mut Response<B>) {
        if let Some(m) = &self.filters.response_headers {
            m.apply(resp.headers_mut(), &self.vars);
        }
    }
}

#[cfg(test)]
mod tests;
