//! `weft-proxy`: Weft's sidecar proxy, the data plane.
//!
//! Module map (ARCHITECTURE.md describes the behaviour):
//! - [`config`]: the bootstrap file.
//! - [`capture`]: transparent mode's capture rules (`weft-proxy init`: iptables, IPv4 + IPv6).
//! - [`detect`]: protocol detection from a connection's first bytes (TLS + SNI, HTTP/2, HTTP/1).
//! - [`dns`]: transparent mode's mesh DNS server (service names -> VIPs, other names
//!   forwarded upstream), on its own thread.
//! - [`discovery`]: the control-plane client (Hello, ACK/NACK, reconnect with backoff).
//! - [`egress`]: services outside the mesh: endpoints by DNS name (resolver, refresh), and
//!   [`egress::is_declared`] for egress policy.
//! - [`snapshot`]: held resource sets and the validated, immutable [`snapshot::Snapshot`].
//! - [`listen`]: binding, swapping and draining listeners; accept loops.
//! - [`pipeline`]: **the HTTP request path, assembled in one place**.
//! - [`http`]: the hyper server connection, response bodies, header rewriting, error responses.
//! - [`route`]: route tables and matching.
//! - [`filters`]: route filters (header mutation, rewrites, redirects, direct responses, fault
//!   injection, mirroring), compiled with the route and applied by the pipeline.
//! - [`balance`]: weighted destination pick and weighted round robin.
//! - [`cluster`]: clusters, endpoints and the state that survives snapshot swaps.
//! - [`upstream`]: per-endpoint connection pools (HTTP/1.1 idle pool, shared HTTP/2).
//! - [`tcp`]: opaque TCP proxying with half-close.
//! - [`transparent`]: transparent mode's data path: captured connections routed by original
//!   destination (service VIP, registered instance, passthrough), protocol detection.
//! - [`drain`]: drain signalling between listeners and connections.
//! - [`metrics`]: Prometheus families and pre-resolved handles.
//! - [`observe`]: access logs, trace propagation and OTLP span export.
//! - [`admin`]: `/metrics`, `/ready`, `/live`, `/config_dump`.
//! - [`tls`]: mesh mTLS (certificates, trust bundle, verifiers, renewal).
//! - [`authz`]: authorization policies for the inbound side.
//! - [`app`]: runtimes, threads, signals.
//! - [`app_health`]: the app's kubelet probes, rewritten by the injection webhook, answered on
//!   the admin port.
//! - [`attempts`]: one request's tries against a cluster (breaker, balancer, retries, outlier reports).
//! - [`h1client`]: the HTTP/1.1 client of pooled upstream connections, driven by the request's task.
//! - [`lb`]: endpoint load balancing (P2C over peak EWMA, round robin, least request, ring hash).
//! - [`retry`]: retry policy, retry budget, replayable request bodies.
//! - [`breaker`]: per-cluster circuit-breaker limits.
//! - [`outlier`]: outlier detection (ejection) and the panic threshold.
//! - [`health`]: active HTTP/TCP health checks.
//! - [`ratelimit`]: local token-bucket rate limits.
//! - [`resilience_metrics`]: the metric families of the above.
//! - [`fuzzing`]: entry points of the `fuzz/` targets, replayed by `tests/fuzz_corpus.rs`.

pub mod admin;
pub mod alloc;
pub mod app;
pub mod app_health;
pub mod attempts;
pub mod authz;
pub mod balance;
pub mod breaker;
pub mod capture;
pub mod cluster;
pub mod config;
pub mod conn_limit;
pub mod detect;
pub mod discovery;
pub mod dns;
pub mod drain;
pub mod egress;
pub mod filters;
pub mod fuzzing;
pub mod h1client;
pub mod health;
pub mod http;
pub mod lb;
pub mod listen;
pub mod log_level;
pub mod metrics;
pub mod observe;
pub mod outlier;
pub mod pipeline;
pub mod plane;
pub mod ratelimit;
pub mod resilience_metrics;
pub mod retry;
pub mod route;
pub mod snapshot;
pub mod tcp;
pub mod tls;
pub mod transparent;
pub mod tunnel;
pub mod upstream;
