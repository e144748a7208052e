//! The etcd v3 backend (`--store etcd`): several replicas share the policies and the registry.
//!
//! Keys under the prefix (default `/weft`):
//!
//! | key | value |
//! |---|---|
//! | `<prefix>/policies/<name>.yaml` | one policy file, as applied |
//! | `<prefix>/policies/.meta` | JSON: who applied last, when, which files (rewritten by every apply) |
//! | `<prefix>/registrations/<node id>` | JSON [`PersistedProxy`]: one proxy, under its replica's lease |
//! | `<prefix>/ca` | JSON: the fingerprint of the CA every replica must share ([`ca`]) |
//!
//! **Policies.** The revision of the policies is the highest modification revision of the keys
//! under `policies/`. An apply is one transaction: if no key under `policies/` was modified
//! after the revision the change was validated against, write every changed file and `.meta`;
//! else nothing is written and the apply fails with [`StoreError::Conflict`] naming the current
//! revision. Every apply writes `.meta`, so a concurrent apply that only removes files moves the
//! revision too. Every replica watches `policies/` and reloads.
//!
//! **Registrations** ([`registrations`]): each replica puts one key per proxy connected to it
//! (or within its grace there), attached to its own lease, and learns the others' by watching.
//!
//! **etcd unreachable.** Requests time out after `--etcd-timeout` and fail with
//! [`StoreError::Unavailable`] naming etcd (an apply answers 503); the watches and the
//! registration sync reconnect with jittered backoff, re-grant the lease if it expired and
//! re-put this replica's registrations. Meanwhile the replica serves what it last had.
//!
//! **A member down.** With several `--etcd-endpoints`, requests go only to the members that
//! answer ([`members`]: a dead member is taken out of the client's balancer within a probe
//! interval), and a request that never reached a member (it could not connect, or was still
//! queued on the member's connection when that closed) is sent to another.

pub mod ca;
mod members;
mod registrations;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, Txn, TxnOp, TxnResponse,
    WatchOptions,
};
use tokio::sync::mpsc;

use super::{PolicyWrite, RegistryHost, Store, StoreError, StoredPolicies, WatchGuard};
use crate::policy::store::is_valid_file_name;
use crate::policy::SourceFile;

/// Default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/weft";

/// Default `--etcd-lease-ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Default `--etcd-timeout`: one request (a leader election in a healthy cluster takes less).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Default `--etcd-start-timeout`: how long a starting replica waits for etcd.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the key every apply rewrites, among the policy keys (never a policy file name:
/// those do not start with a dot).
const META: &str = ".meta";

/// How to reach etcd and where under it this mesh lives.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// Key prefix, `/weft` by default: starts with `/`, no trailing `/`.
    pub prefix: String,
    /// TTL of this replica's lease: its registrations disappear this long after it died or
    /// lost etcd.
    pub lease_ttl: Duration,
    /// This replica's name, unique among the replicas (recorded in its registrations).
    pub replica_id: String,
    /// Time limit of one request.
    pub request_timeout: Duration,
    /// How long a starting replica waits for etcd to answer.
    pub start_timeout: Duration,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
    /// etcd authentication (user and password).
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("replica_id", &self.replica_id)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish_non_exhaustive()
    }
}

/// TLS settings for `https://` etcd endpoints.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// PEM of the CA that signed etcd's server certificates.
    pub ca: PathBuf,
    /// A client certificate and its key (PEM), for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    /// `endpoints` with the defaults; `replica_id` must be unique among the replicas.
    pub fn new(endpoints: Vec<String>, replica_id: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
            replica_id: replica_id.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            start_timeout: DEFAULT_START_TIMEOUT,
            tls: None,
            user: None,
        }
    }

    /// Checks the settings; says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("--etcd-endpoints: at least one endpoint".to_owned());
        }
        for e in &self.endpoints {
            let https = e.starts_with("https://");
            if !(https || e.starts_with("http://")) {
                return Err(format!(
                    "--etcd-endpoints: {e:?}: expected http://host:port or https://host:port"
                ));
            }
            if https != self.tls.is_some() {
                return Err(format!(
                    "--etcd-endpoints: {e:?}: https:// endpoints need --etcd-ca (and the etcd TLS \
                     options need https:// endpoints, all of them)"
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 || self.prefix.ends_with('/') {
            return Err(format!(
                "--etcd-prefix {:?}: expected a key prefix like /weft (leading '/', no trailing '/')",
                self.prefix
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(format!(
                "--etcd-lease-ttl {}: expected whole seconds, at least 2s",
                humantime::format_duration(self.lease_ttl)
            ));
        }
        if self.replica_id.is_empty()
            || self.replica_id.len() > 253
            || !self.replica_id.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(format!(
                "--replica-id {:?}: 1..=253 printable ASCII characters",
                self.replica_id
            ));
        }
        Ok(())
    }
}

/// Policies and registrations in etcd.
pub struct EtcdStore {
    config: EtcdConfig,
    client: Client,
    /// The registration sync's state (lease, what was written), shared with the shutdown.
    sync: tokio::sync::Mutex<registrations::SyncState>,
    /// Set at shutdown: nothing is written afterwards.
    closed: AtomicBool,
    /// Probes the members and keeps the balancer to those that answer ([`members`]).
    _members: Option<AbortOnDrop>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Aborts a task when dropped (the watch guard of the policy watcher).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Jittered exponential backoff between reconnection attempts: 100 ms doubling to 5 s (or a
/// lower cap).
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self::capped(Self::MAX)
    }

    /// Steps doubling up to `max` (at least the first step).
    pub(crate) fn capped(max: Duration) -> Self {
        Self {
            next: Self::FIRST,
            max: max.clamp(Self::FIRST, Self::MAX),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The next pause: half to all of the current step, which then doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step / 2 + step.mul_f64(rand::random::<f64>() / 2.0)
    }
}

impl EtcdStore {
    /// A client for `config` (connections are made on first use: etcd need not be up yet; see
    /// [`EtcdStore::wait_ready`]).
    pub async fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        config.validate().map_err(|reason| StoreError::Backend {
            store: "etcd".to_owned(),
            reason,
        })?;
        let describe = describe(&config);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            // Find a dead member on a silent connection (a partition, not just a crash).
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // A member that lost its leader fails watches and requests instead of serving
            // stale data.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| StoreError::Backend {
                    store: describe.clone(),
                    reason: format!("{}: {e}", path.display()),
                })
            };
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let client = tokio::time::timeout(
            config.request_timeout,
            Client::connect(&config.endpoints, Some(options.clone())),
        )
        .await
        .map_err(|_| StoreError::Unavailable {
            store: describe.clone(),
            reason: format!(
                "no answer within {}",
                humantime::format_duration(config.request_timeout)
            ),
        })?
        .map_err(|e| classify(&describe, "connecting", &e))?;
        let members = members::spawn(
            &client,
            &config.endpoints,
            &options,
            config.request_timeout,
            format!("{}/ca", config.prefix),
        );
        Ok(Self {
            config,
            client,
            sync: tokio::sync::Mutex::new(registrations::SyncState::default()),
            closed: AtomicBool::new(false),
            _members: members,
        })
    }

    /// Waits until etcd answers (at most `--etcd-start-timeout`), logging while it does not.
    pub async fn wait_ready(&self) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut backoff = Backoff::new();
        loop {
            let mut kv = self.client.kv_client();
            let probe = self
                .timed(
                    "reading",
                    kv.get(self.key("ca"), Some(GetOptions::new().with_count_only())),
                )
                .await;
            match probe {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Unavailable {
                        store: self.describe(),
                        reason: format!(
                            "not reachable within --etcd-start-timeout {}: {e}",
                            humantime::format_duration(self.config.start_timeout)
                        ),
                    })
                }
                Err(e) => tracing::warn!("waiting for etcd: {e}"),
            }
            tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(500))).await;
        }
    }

    /// The settings.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// `<prefix>/<rest>`.
    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.config.prefix)
    }

    fn policies_prefix(&self) -> String {
        self.key("policies/")
    }

    fn registrations_prefix(&self) -> String {
        self.key("registrations/")
    }

    /// `fut` within the request timeout, its error classified.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        timed(&self.describe(), self.config.request_timeout, what, fut).await
    }

    /// Runs `txn` within the request timeout; sent again while it could not reach a member
    /// ([`members::retry_unsent`]: never after it may have been applied).
    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        members::retry_unsent(&self.describe(), self.config.request_timeout, what, || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Reads `key` within the request timeout, like [`EtcdStore::txn`].
    async fn get(
        &self,
        what: &str,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        members::retry_unsent(&self.describe(), self.config.request_timeout, what, || {
            let (mut kv, options) = (self.client.kv_client(), options.clone());
            let key = key.to_owned();
            async move { kv.get(key, options).await }
        })
        .await
    }
}

/// `etcd http://a:2379,http://b:2379 (prefix /weft)`.
fn describe(config: &EtcdConfig) -> String {
    format!(
        "etcd {} (prefix {})",
        config.endpoints.join(","),
        config.prefix
    )
}

/// `fut` within `limit`, its error classified.
async fn timed<T>(
    store: &str,
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(|e| classify(store, what, &e)),
        Err(_) => Err(StoreError::Unavailable {
            store: store.to_owned(),
            reason: format!(
                "{what}: no answer within {} (--etcd-timeout)",
                humantime::format_duration(limit)
            ),
        }),
    }
}

/// An etcd client error as a [`StoreError`]: unreachable or leaderless etcd is
/// [`StoreError::Unavailable`] (retry later), anything else [`StoreError::Backend`], with a hint
/// for etcd's request limits.
fn classify(store: &str, what: &str, e: &etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    let message = match e {
        E::GRpcStatus(s) => {
            // tonic's "transport error" says little; its source says what (refused, reset).
            let mut m = s.message().to_owned();
            let mut source = std::error::Error::source(s);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !m.contains(&text) {
                    m = format!("{m}: {text}");
                }
                source = cause.source();
            }
            m
        }
        other => other.to_string(),
    };
    let unavailable = match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => {
            matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted
            ) || (s.code() == Code::Unknown && message.contains("transport error"))
        }
        E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        _ => false,
    };
    if unavailable {
        return StoreError::Unavailable {
            store: store.to_owned(),
            reason: format!("{what}: {message}"),
        };
    }
    let hint = if message.contains("too many operations") {
        " (etcd's --max-txn-ops, 128 by default, bounds the files of one apply)"
    } else if message.contains("request is too large") {
        " (etcd's --max-request-bytes, 1.5 MiB by default, bounds one apply)"
    } else {
        ""
    };
    StoreError::Backend {
        store: store.to_owned(),
        reason: format!("{what}: {message}{hint}"),
    }
}

/// The highest modification revision among `kvs` (0: none).
fn highest_revision(kvs: &[etcd_client::KeyValue]) -> i64 {
    kvs.iter()
        .map(etcd_client::KeyValue::mod_revision)
        .max()
        .unwrap_or(0)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[tonic::async_trait]
impl Store for EtcdStore {
    fn describe(&self) -> String {
        describe(&self.config)
    }

    fn replica(&self) -> Option<&str> {
        Some(&self.config.replica_id)
    }

    async fn read_policies(&self) -> Result<StoredPolicies, StoreError> {
        let prefix = self.policies_prefix();
        let mut resp = self
            .get(
                "reading the policies",
                &prefix,
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let kvs = resp.take_kvs();
        let revision = highest_revision(&kvs);
        let mut files = Vec::new();
        for entry in kvs {
            let Ok(key) = entry.key_str() else { continue };
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            if !is_valid_file_name(name) {
                // `.meta`, or a key someone else put here.
                continue;
            }
            if entry.value().len() > crate::policy::MAX_FILE_BYTES {
                return Err(StoreError::TooLarge {
                    path: PathBuf::from(key),
                    size: entry.value().len() as u64,
                });
            }
            let name = name.to_owned();
            let content =
                String::from_utf8(entry.value().to_vec()).map_err(|_| StoreError::Backend {
                    store: self.describe(),
                    reason: format!("{key}: not UTF-8"),
                })?;
            files.push(SourceFile { name, content });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(StoredPolicies {
            files,
            revision: Some(revision),
        })
    }

    async fn write_policies(
        &self,
        base: Option<i64>,
        changes: &[PolicyWrite],
    ) -> Result<Option<i64>, StoreError> {
        for (name, _) in changes {
            if !is_valid_file_name(name) {
                return Err(StoreError::InvalidName(name.clone()));
            }
        }
        let prefix = self.policies_prefix();
        let mut ops: Vec<TxnOp> = changes
            .iter()
            .map(|(name, content)| {
                let key = format!("{prefix}{name}");
                match content {
                    Some(c) => TxnOp::put(key, c.as_bytes(), None),
                    None => TxnOp::delete(key, None),
                }
            })
            .collect();
        let meta = serde_json::json!({
            "replica": self.config.replica_id,
            "at_unix_ms": unix_ms(SystemTime::now()),
            "base_revision": base,
            "files": changes.iter().map(|(n, c)| serde_json::json!({
                "name": n, "removed": c.is_none(),
            })).collect::<Vec<_>>(),
        });
        ops.push(TxnOp::put(
            format!("{prefix}{META}"),
            meta.to_string(),
            None,
        ));
        let txn = match base {
            // Nothing under policies/ modified after `base` (every apply rewrites .meta, so
            // removals count too).
            Some(base) => Txn::new()
                .when([
                    Compare::mod_revision(prefix.as_str(), CompareOp::Less, base + 1).with_prefix(),
                ])
                .and_then(ops)
                .or_else([TxnOp::get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )]),
            None => Txn::new().and_then(ops),
        };
        let resp = self.txn("writing the policies", txn).await?;
        if resp.succeeded() {
            let revision = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
            return Ok(Some(revision));
        }
        let current = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => Some(highest_revision(g.kvs())),
                _ => None,
            })
            .unwrap_or(0);
        Err(StoreError::Conflict {
            base: base.unwrap_or(0),
            current,
        })
    }

    fn watch_policies(&self, changed: mpsc::UnboundedSender<()>) -> Result<WatchGuard, StoreError> {
        let client = self.client.clone();
        let prefix = self.policies_prefix();
        let store = self.describe();
        let limit = self.config.request_timeout;
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new();
            let mut failing: Option<String> = None;
            loop {
                let mut watcher = client.watch_client();
                let opened = timed(
                    &store,
                    limit,
                    "watching the policies",
                    watcher.watch(prefix.as_str(), Some(WatchOptions::new().with_prefix())),
                )
                .await;
                let error = match opened {
                    Ok(mut stream) => {
                        if failing.take().is_some() {
                            tracing::info!(store = %store, "watching the policies again");
                        }
                        backoff.reset();
                        // Whatever changed while not watching (or before the first watch).
                        let _ = changed.send(());
                        loop {
                            match stream.message().await {
                                Ok(Some(resp)) if resp.canceled() => {
                                    break format!(
                                        "the watch was cancelled: {}",
                                        resp.cancel_reason()
                                    )
                                }
                                Ok(Some(resp)) => {
                                    if !resp.events().is_empty() && changed.send(()).is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => break "the watch stream ended".to_owned(),
                                Err(e) => {
                                    break classify(&store, "watching the policies", &e).to_string()
                                }
                            }
                        }
                    }
                    Err(e) => e.to_string(),
                };
                if failing.as_deref() != Some(error.as_str()) {
                    tracing::warn!(
                        "policy watch: {error}; serving the last policies, reconnecting"
                    );
                    failing = Some(error);
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        });
        Ok(WatchGuard::new(AbortOnDrop(task)))
    }

    async fn load_registrations(&self, host: Arc<dyn RegistryHost>) -> Result<usize, StoreError> {
        let entries = self.read_registrations().await?.entries;
        let n = host.replace_remote_registrations(entries.into_iter().map(|e| e.entry).collect());
        if n > 0 {
            tracing::info!(
                registrations = n,
                "loaded the registrations of the replicas from etcd"
            );
        }
        Ok(n)
    }

    async fn sync_registrations(&self, host: Arc<dyn RegistryHost>) {
        self.run_registration_sync(host).await;
    }

    async fn close_registrations(&self, host: Arc<dyn RegistryHost>) {
        self.close_registration_sync(host).await;
    }

    async fn set_remote_log_level(
        &self,
        id: &str,
        level: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.write_log_level(id, level).await
    }
}

impl EtcdStore {
    /// Whether the store was closed (shutdown).
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests;
