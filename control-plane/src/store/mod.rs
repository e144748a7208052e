//! Where the control plane keeps what must outlive it: the policy files and the registry of
//! proxies. One trait, [`Store`], and its backends:
//!
//! - [`file`] (the default, one replica): a directory of policy files, watched, and
//!   `registry.json` in the state directory;
//! - [`etcd`] (several replicas): the same policy files and every registration in etcd v3, so
//!   every replica serves the same policy revision and computes the same endpoints.
//!
//! The rest of the control plane never knows which backend runs: it reads and writes policies
//! through [`Store`], learns of changes through [`Store::watch_policies`], and hands its registry
//! to the backend as a [`RegistryHost`].

pub mod etcd;
pub mod file;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::policy::SourceFile;
use crate::registry::PersistedProxy;

pub use etcd::{EtcdConfig, EtcdStore};
pub use file::FileStore;

/// The policy files of a store, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct StoredPolicies {
    /// Sorted by name.
    pub files: Vec<SourceFile>,
    /// The store's revision of the policy files (etcd: the highest modification revision of
    /// the policy keys); `None` for a store without revisions (a directory).
    pub revision: Option<i64>,
}

/// One change of a policy write: the file's new content, or `None` to remove it.
pub type PolicyWrite = (String, Option<String>);

/// Errors of the policy and registry stores. They say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid policy file name {0:?}: use <name>.yaml or <name>.yml, without '/' or '..'")]
    InvalidName(String),
    #[error("policy file {0:?} does not exist")]
    NotFound(String),
    #[error(
        "{path}: {size} bytes, more than the {}-byte limit of a policy file",
        crate::policy::MAX_FILE_BYTES
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A compare-and-swap lost: another writer changed the policies after this change was
    /// validated. Nothing was written.
    #[error(
        "conflict: the policies changed while this change was validated (it was validated \
         against revision {base}; the store is now at revision {current}): nothing was \
         applied; re-read revision {current} and apply again"
    )]
    Conflict { base: i64, current: i64 },
    /// The backend cannot be reached (etcd down or without quorum).
    #[error("the policy store is unavailable ({store}): {reason}")]
    Unavailable { store: String, reason: String },
    /// The backend answered something this control plane cannot use.
    #[error("the policy store ({store}): {reason}")]
    Backend { store: String, reason: String },
}

/// Keeps a store's watch alive; dropping it stops watching.
pub struct WatchGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl WatchGuard {
    pub fn new(inner: impl Send + Sync + 'static) -> Self {
        Self(Box::new(inner))
    }
}

impl fmt::Debug for WatchGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WatchGuard")
    }
}

/// The registry's side of registration persistence, implemented by
/// [`crate::state::ControlPlane`]: what a backend reads to persist this replica's
/// registrations, and where it reports what it found in the store.
pub trait RegistryHost: Send + Sync {
    /// Notified after every change of the registry.
    fn registry_changes(&self) -> &tokio::sync::Notify;

    /// The registrations this replica owns, as stored, sorted by id: every registration with
    /// one replica; with several, those whose proxies are (or were, within their grace)
    /// connected to this replica.
    fn own_registrations(&self) -> Vec<PersistedProxy>;

    /// Registrations a previous run of this replica persisted: brought back as disconnected
    /// within the restart grace. Returns how many were restored.
    fn restore_registrations(&self, entries: Vec<PersistedProxy>) -> usize;

    /// Other replicas' registrations as the store holds them now (each with its `replica`):
    /// the host's remote registrations become these; one it had that is missing is gone (a
    /// connected one gets the deregistration grace from now). Returns how many there are.
    fn replace_remote_registrations(&self, entries: Vec<PersistedProxy>) -> usize;

    /// One registration of another replica was written (`Some`; it replaces a local one of the
    /// same id: that replica has the proxy now) or its key went away (`None`).
    fn remote_registration(&self, id: &str, entry: Option<PersistedProxy>);

    /// This replica's registration `id`, if it has one.
    fn own_registration(&self, id: &str) -> Option<OwnRegistration>;

    /// The store holds another log level for this replica's registration `id` (set through
    /// another replica).
    fn set_own_log_level(&self, id: &str, level: Option<String>);
}

/// A registration this replica owns, as far as deciding who keeps it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnRegistration {
    /// Its proxy's stream is open here (else it is within its grace).
    pub connected: bool,
    /// When that stream started.
    pub connected_since: SystemTime,
}

/// A backend of the policy store and the registry's persistence.
#[tonic::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// What and where, for logs: `directory /etc/weft/policies`, `etcd http://... (prefix /weft)`.
    fn describe(&self) -> String;

    /// This replica's name when several share the store (etcd `--replica-id`); `None` for a
    /// store of one replica.
    fn replica(&self) -> Option<&str> {
        None
    }

    /// Writes log level `level` into registration `id`, which another replica owns (that
    /// replica pushes it to its proxy). `Ok(false)`: the store holds no such registration. A
    /// store of one replica has no other replicas' registrations.
    async fn set_remote_log_level(
        &self,
        id: &str,
        level: Option<&str>,
    ) -> Result<bool, StoreError> {
        let _ = (id, level);
        Ok(false)
    }

    /// Every policy file, sorted by name, with the revision they were read at.
    async fn read_policies(&self) -> Result<StoredPolicies, StoreError>;

    /// Writes `changes` at once, only if the policies are still at `base` (the revision they
    /// were read at: [`StoreError::Conflict`] otherwise); returns the new revision. A store
    /// without revisions writes unconditionally (its writers are serialized by the caller).
    async fn write_policies(
        &self,
        base: Option<i64>,
        changes: &[PolicyWrite],
    ) -> Result<Option<i64>, StoreError>;

    /// Sends on `changed` whenever the policies may have changed (bursts may be several
    /// sends), until the guard is dropped.
    fn watch_policies(&self, changed: mpsc::UnboundedSender<()>) -> Result<WatchGuard, StoreError>;

    /// At start: reads the registrations the store holds and hands them to `host`. Returns how
    /// many there were.
    async fn load_registrations(&self, host: Arc<dyn RegistryHost>) -> Result<usize, StoreError>;

    /// Keeps the store in line with `host`'s registrations (and, with several replicas, `host`
    /// in line with the others'), until the task is aborted.
    async fn sync_registrations(&self, host: Arc<dyn RegistryHost>);

    /// At shutdown: persists `host`'s registrations a last time and stops persisting them
    /// (streams ending afterwards end because of the shutdown, not because their proxies went
    /// away).
    async fn close_registrations(&self, host: Arc<dyn RegistryHost>);
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;
