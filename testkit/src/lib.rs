//! Test support for Weft's end-to-end tests: start the real binaries on loopback, stop them by
//! PID, wait with deadlines, and talk to them (HTTP/1.1, h2c, gRPC, raw TCP, admin APIs).
//!
//! The building blocks ([`ProcessGuard`], [`bin_path`], [`free_port`], [`next_loopback_ip`],
//! [`wait_until`], [`HttpClient`]) know nothing about Weft; [`ControlPlane`], [`Proxy`] and
//! [`DemoApp`] put them together the way ARCHITECTURE.md describes the processes.
//!
//! The binaries must be built before the tests run: `cargo build --workspace --bins`.

pub mod admin;
pub mod bins;
pub mod control;
pub mod demo;
pub mod etcd;
pub mod fuzz_corpus;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod policy;
pub mod process;
pub mod proxy;
pub mod replicas;
pub mod security;
pub mod wait;

pub use admin::AdminAccess;
pub use bins::bin_path;
pub use control::{ControlPlane, ControlPlaneConfig};
pub use demo::{DemoApp, DemoAppConfig};
pub use grpc::{echo, grpc_channel};
pub use http::{
    http_delete, http_get, http_post, http_put, raw_exchange, HttpClient, HttpResponse, RawOutcome,
};
pub use metrics::{Metrics, Sample};
pub use net::{free_addr, free_addrs, free_port, loopback_ips, next_loopback_ip};
pub use policy::{write_file_atomic, PolicyDir};
pub use process::ProcessGuard;
pub use proxy::{ConfigVersions, Proxy, ProxyConfig};
pub use wait::{wait_until, DEFAULT_WAIT};
