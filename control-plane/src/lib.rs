//! Weft's control plane: policies in, per-proxy configuration out.
//!
//! ```text
//! store (file directory | etcd), watched -> policy::PolicySet (validated, versioned)
//! registry (static endpoints + connected sidecars), persisted by the store across restarts
//! compile(policy, registry, node) -> listeners, routes, clusters, endpoints
//! discovery: push only changed types, track ACK/NACK per proxy
//! diff: what a policy change would do, per proxy   inventory: compiled clusters + endpoints
//! admin HTTP: policy CRUD, status, metrics          ctl: the weftctl client
//! ca + token + identity: Identity.Certify (CSR -> SPIFFE SVID)   tls: the gRPC port's TLS
//! inject: the Kubernetes sidecar injection webhook (Pod -> JSON Patch, its HTTPS server)
//! fuzzing: entry points of the fuzz/ targets (replayed by tests/fuzz_corpus.rs)
//! ```

pub mod admin;
pub mod admission;
pub mod ca;
pub mod compile;
pub mod ctl;
pub mod diff;
pub mod discovery;
pub mod fuzzing;
pub mod hash;
pub mod identity;
pub mod inject;
pub mod inventory;
pub mod metrics;
pub mod persist;
pub mod policy;
pub mod private_file;
pub mod push;
pub mod registry;
pub mod server;
pub mod state;
pub mod store;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod token;
pub mod watch;

pub use server::{Config, ServeError, Server, StoreConfig};
