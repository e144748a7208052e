//! The control plane's shared state: the serving policy set, the registry, per-proxy push
//! status, metrics, and the generation counter that wakes discovery streams.
//!
//! Every change that can alter some proxy's resources (a new policy set, a registry change, a
//! new trust bundle) bumps the generation and wakes the discovery streams it may affect: a new
//! trust bundle every stream, a new policy set the streams of the scopes one of whose recorded
//! reads it answers differently, a registry change the streams whose scope holds the changed
//! service's endpoints (`wake`, `crate::push`). A woken stream recompiles its proxy's resources
//! and pushes whatever differs. The instant of each recent generation is kept so a stream can
//! measure convergence (change -> ACK) for `weft_control_push_duration_seconds`.
//!
//! A proxy's status outlives its stream by the deregistration grace: it is listed as
//! disconnected (with the time left before removal) until its registration expires.
//!
//! The policies and the registry's persistence live in a [`crate::store::Store`] backend: every
//! registry change wakes the backend's sync task ([`crate::store::Store::sync_registrations`]
//! through [`crate::store::RegistryHost`]), and at start the backend hands back what it holds
//! ([`crate::store::Store::load_registrations`]: the file backend's registrations come back as
//! disconnected, within the restart grace).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use weft_proto::v1::Node;

use crate::compile::{compile, Resources, TrustBundle};
use crate::diff::{policy_changes, resource_diff, PolicyDiff, ProxyDiff};
use crate::metrics::Metrics;
use crate::policy::store::is_valid_file_name;
use crate::policy::{PolicyErrors, PolicySet, SourceFile};
use crate::registry::{PersistedProxy, Registry};
use crate::store::{PolicyWrite, SharedStore, StoreError};

mod host;
mod proxies;
mod remote;
mod wake;

pub use proxies::{LogLevelError, ProxyState, ProxyStatus};

/// Why an admin change to the policy store was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] PolicyErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a policy store read or write produced.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyOutcome {
    /// Version of the resulting set.
    pub version: String,
    /// Human-readable changes, e.g. `service/backend.default created`.
    pub changed: Vec<String>,
    /// The store's revision of the policies after the write (etcd; absent for a directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// Default `--restart-grace`: longer than the proxies' longest reconnect backoff (5 s).
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(15);

/// Default pause between a change and compiling it, which coalesces bursts.
pub const DEFAULT_PUSH_DEBOUNCE: Duration = Duration::from_millis(10);

/// Default time a push may stay unanswered before it is considered lost.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How many recent generation instants are kept for convergence timing. A stream that falls
/// further behind measures from the oldest one kept (an underestimate, never a panic).
const CHANGE_HISTORY: usize = 1024;

/// Shared state of one control plane.
#[derive(Debug)]
pub struct ControlPlane {
    store: SharedStore,
    policy: ArcSwap<PolicySet>,
    /// The store's revision of the policies served (etcd; `None` for a directory).
    policy_revision: Mutex<Option<i64>>,
    policy_error: Mutex<Option<String>>,
    /// The CA's trust domain and roots, pushed to every proxy as TRUST.
    trust: ArcSwap<TrustBundle>,
    registry: Mutex<Registry>,
    /// Notified on every registry change (the store's sync task waits on it).
    registry_changes: tokio::sync::Notify,
    /// How long registrations restored at start keep their endpoints for their proxies to
    /// reconnect.
    restart_grace: Duration,
    statuses: Mutex<BTreeMap<String, ProxyStatus>>,
    generation: watch::Sender<u64>,
    /// Instants of recent generations, oldest first: `(generation, when it was bumped)`.
    changes: Mutex<VecDeque<(u64, Instant)>>,
    /// Serializes store reads+writes (admin API and watcher reloads).
    apply_lock: tokio::sync::Mutex<()>,
    push_timeout: Duration,
    push_debounce: Duration,
    /// Bounds on registrations ([`crate::admission`]).
    limits: crate::admission::Limits,
    /// Compiled scopes, shared by the proxies of a service.
    scopes: crate::push::ScopeCache,
    /// Per-scope wake channels of the discovery streams.
    wakers: crate::push::Wakers,
    metrics: Metrics,
}

/// Locks a mutex, recovering from poisoning: every critical section leaves the data
/// consistent, so a panic elsewhere must not take the control plane down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ControlPlane {
    pub fn new(store: SharedStore, deregister_grace: Duration, metrics: Metrics) -> Self {
        let policy = PolicySet::empty();
        metrics.set_policy_version(policy.version());
        Self {
            store,
            policy: ArcSwap::from_pointee(policy),
            policy_revision: Mutex::new(None),
            policy_error: Mutex::new(None),
            trust: ArcSwap::from_pointee(TrustBundle::default()),
            registry: Mutex::new(Registry::new(deregister_grace)),
            registry_changes: tokio::sync::Notify::new(),
            restart_grace: DEFAULT_RESTART_GRACE,
            statuses: Mutex::new(BTreeMap::new()),
            generation: watch::Sender::new(0),
            changes: Mutex::new(VecDeque::new()),
            apply_lock: tokio::sync::Mutex::new(()),
            push_timeout: DEFAULT_PUSH_TIMEOUT,
            push_debounce: DEFAULT_PUSH_DEBOUNCE,
            limits: crate::admission::Limits::default(),
            scopes: crate::push::ScopeCache::new(
                metrics.compilations_total.with_label_values(&["compiled"]),
                metrics.compilations_total.with_label_values(&["reused"]),
                metrics.compilations_total.with_label_values(&["patched"]),
            ),
            wakers: crate::push::Wakers::new(),
            metrics,
        }
    }

    /// Sets how long a push may stay unanswered before the stream considers it lost.
    #[must_use]
    pub fn with_push_timeout(mut self, timeout: Duration) -> Self {
        // Bounded so `Instant + timeout` can't overflow.
        self.push_timeout = timeout.min(Duration::from_secs(365 * 24 * 3600));
        self
    }

    /// Bounds registrations (sizes, counts, the Hello deadline).
    #[must_use]
    pub fn with_limits(mut self, limits: crate::admission::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The registration bounds in force.
    pub fn limits(&self) -> &crate::admission::Limits {
        &self.limits
    }

    /// How long a stream waits after a change before compiling, so a burst becomes one push.
    #[must_use]
    pub fn with_push_debounce(mut self, debounce: Duration) -> Self {
        self.push_debounce = debounce;
        self
    }

    pub fn push_debounce(&self) -> Duration {
        self.push_debounce
    }

    pub fn push_timeout(&self) -> Duration {
        self.push_timeout
    }

    /// How long registrations restored at start (file backend) keep their endpoints.
    #[must_use]
    pub fn with_restart_grace(mut self, grace: Duration) -> Self {
        self.restart_grace = grace;
        self
    }

    /// Notified after every registry change.
    pub fn registry_changes(&self) -> &tokio::sync::Notify {
        &self.registry_changes
    }

    fn registry_changed(&self) {
        self.registry_changes.notify_one();
    }

    /// Brings registrations a previous run persisted back as disconnected proxies whose
    /// endpoints stay until the restart grace ends, unless the same node id reconnects first.
    /// Returns how many were restored.
    pub fn restore_registry(&self, entries: Vec<PersistedProxy>) -> usize {
        let restart_grace = self.restart_grace;
        let (now, wall_now) = (Instant::now(), SystemTime::now());
        let disconnected_since = humantime::format_rfc3339_seconds(wall_now).to_string();
        let mut registry = lock(&self.registry);
        let ids = registry.restore(entries, now, wall_now, restart_grace);
        let changed = registry.take_changed();
        let mut statuses = lock(&self.statuses);
        for id in &ids {
            let Some(p) = registry.get(id) else { continue };
            statuses.insert(
                id.clone(),
                ProxyStatus {
                    id: id.clone(),
                    service: p.node.service.clone(),
                    namespace: p.node.namespace.clone(),
                    inbound_address: p.node.inbound_address.clone(),
                    build_version: p.node.build_version.clone(),
                    connected_since: humantime::format_rfc3339_seconds(p.connected_since)
                        .to_string(),
                    state: ProxyState::Disconnected,
                    disconnected_since: Some(disconnected_since.clone()),
                    removing_in_seconds: None,
                    versions: BTreeMap::new(),
                    last_nack: None,
                    last_nack_at: None,
                    nacking: false,
                    replica: None,
                    session: p.session,
                    remove_at: p.remove_at,
                },
            );
        }
        drop(statuses);
        drop(registry);
        // At start: every stream (if any) looks again.
        if !changed.is_empty() {
            self.bump();
        }
        ids.len()
    }

    /// The registry as a store persists it.
    pub fn persisted_registry(&self) -> Vec<PersistedProxy> {
        let (now, wall_now) = (Instant::now(), SystemTime::now());
        lock(&self.registry).persisted(now, wall_now)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store backend.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// The serving policy set.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.policy.load_full()
    }

    /// The trust bundle compiled into every proxy's TRUST set.
    pub fn trust(&self) -> Arc<TrustBundle> {
        self.trust.load_full()
    }

    /// Serves a new trust bundle (CA start-up, root rotation); returns whether it changed. A
    /// change bumps the generation, so every proxy is pushed the new TRUST set (and, if the
    /// trust domain changed, the identities derived from it).
    pub fn set_trust(&self, bundle: TrustBundle) -> bool {
        let changed = **self.trust.load() != bundle;
        if changed {
            tracing::info!(
                trust_domain = %bundle.trust_domain,
                roots = bundle.roots_pem.len(),
                "serving trust bundle"
            );
            self.trust.store(Arc::new(bundle));
            self.bump();
        }
        changed
    }

    /// The store's revision of the policies served (etcd: every replica serving the same
    /// revision serves the same set); `None` for a directory.
    pub fn policy_revision(&self) -> Option<i64> {
        *lock(&self.policy_revision)
    }

    /// Why the store's current content was rejected, if it was.
    pub fn policy_error(&self) -> Option<String> {
        lock(&self.policy_error).clone()
    }

    /// A receiver woken by every change that may affect every proxy (policy, trust); see
    /// [`ControlPlane::subscribe_scope`] for registry changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Bumps the generation and wakes every stream.
    fn bump(&self) {
        self.publish(|next| {
            self.generation.send_replace(next);
        });
    }

    /// When the first change after generation `seen` happened (`None`: no later change is
    /// recorded). Discovery streams measure convergence from it.
    pub fn first_change_after(&self, seen: u64) -> Option<Instant> {
        let changes = lock(&self.changes);
        changes.iter().find(|(g, _)| *g > seen).map(|(_, at)| *at)
    }

    fn set_error(&self, error: Option<String>) {
        self.metrics.policy_errors.set(i64::from(error.is_some()));
        *lock(&self.policy_error) = error;
    }

    /// Serves `set`; returns whether the version changed.
    fn install(&self, set: PolicySet) -> bool {
        let changed = self.policy.load().version() != set.version();
        if changed {
            self.metrics.set_policy_version(set.version());
            tracing::info!(
                version = set.version(),
                files = set.files().len(),
                services = set.services().len(),
                routes = set.routes().len(),
                authorization = set.authorization().len(),
                "serving policy set"
            );
            let old = self.policy.swap(Arc::new(set));
            self.bump_policy(&old);
        }
        changed
    }

    /// Reloads the store: serves it if valid, else keeps the last good set and records the
    /// error. Returns the new version on success.
    pub async fn reload(&self) -> Result<String, ApplyError> {
        let _guard = self.apply_lock.lock().await;
        let result = self.store.read_policies().await.map_err(ApplyError::from);
        let result = match result {
            Ok(stored) => {
                PolicySet::from_files_reusing_blocking(stored.files, self.policy.load_full())
                    .await
                    .map(|set| (set, stored.revision))
                    .map_err(ApplyError::from)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((set, revision)) => {
                let version = set.version().to_owned();
                *lock(&self.policy_revision) = revision;
                self.install(set);
                self.set_error(None);
                self.metrics
                    .policy_reloads_total
                    .with_label_values(&["ok"])
                    .inc();
                Ok(version)
            }
            Err(e) => {
                let message = match &e {
                    ApplyError::Invalid(errors) => errors.messages().join("\n"),
                    ApplyError::Store(s) => s.to_string(),
                };
                for line in message.lines() {
                    tracing::error!(
                        "policy rejected, keeping version {}: {line}",
                        self.policy.load().version()
                    );
                }
                self.set_error(Some(message));
                self.metrics
                    .policy_reloads_total
                    .with_label_values(&["error"])
                    .inc();
                Err(e)
            }
        }
    }

    /// Validates the store with `name` replaced by `content` (`None`: removed) and, unless
    /// `dry_run`, writes the file and serves the result at once.
    pub async fn apply(
        &self,
        name: &str,
        content: Option<&str>,
        dry_run: bool,
    ) -> Result<ApplyOutcome, ApplyError> {
        self.apply_many(&[(name.to_owned(), content.map(str::to_owned))], dry_run)
            .await
    }

    /// Like [`ControlPlane::apply`] for several files at once: the set is validated with every
    /// change applied, so files that reference each other can be applied together.
    pub async fn apply_many(
        &self,
        changes: &[(String, Option<String>)],
        dry_run: bool,
    ) -> Result<ApplyOutcome, ApplyError> {
        let _guard = self.apply_lock.lock().await;
        let (files, writes, base) = self.merged_files(changes).await?;
        let set = PolicySet::from_files_reusing_blocking(files, self.policy.load_full()).await?;
        let changed = policy_changes(&self.policy.load(), &set);
        let mut outcome = ApplyOutcome {
            version: set.version().to_owned(),
            changed,
            revision: base,
        };
        if dry_run {
            return Ok(outcome);
        }
        if !writes.is_empty() {
            outcome.revision = self.store.write_policies(base, &writes).await?;
        }
        *lock(&self.policy_revision) = outcome.revision;
        let names: Vec<&str> = changes.iter().map(|(n, _)| n.as_str()).collect();
        tracing::info!(files = ?names, version = %outcome.version, changes = ?outcome.changed, "policy applied via admin API");
        self.install(set);
        self.set_error(None);
        self.metrics
            .policy_reloads_total
            .with_label_values(&["ok"])
            .inc();
        Ok(outcome)
    }

    /// Validates the store with `changes` applied (like [`ControlPlane::apply_many`] with
    /// `dry_run`) and reports, for every connected proxy, how its compiled snapshot would
    /// change. Writes nothing.
    pub async fn diff_many(
        &self,
        changes: &[(String, Option<String>)],
    ) -> Result<PolicyDiff, ApplyError> {
        let proposed = {
            let _guard = self.apply_lock.lock().await;
            let (files, _, _) = self.merged_files(changes).await?;
            PolicySet::from_files_reusing_blocking(files, self.policy.load_full()).await?
        };
        let current = self.policy.load_full();
        let trust = self.trust.load_full();
        let registry = lock(&self.registry);
        let proxies = registry
            .proxies()
            .filter(|p| p.is_connected())
            .map(|p| {
                let before = compile(&current, &registry, &trust, &p.node);
                let after = compile(&proposed, &registry, &trust, &p.node);
                let types = resource_diff(&before, &after);
                ProxyDiff {
                    id: p.node.id.clone(),
                    service: p.service.name.clone(),
                    namespace: p.service.namespace.clone(),
                    changes: types.values().any(|t| t.version_changes),
                    types,
                }
            })
            .collect();
        Ok(PolicyDiff {
            current_version: current.version().to_owned(),
            version: proposed.version().to_owned(),
            changed: policy_changes(&current, &proposed),
            proxies,
        })
    }

    /// The store's files with `changes` applied (`None` content: removed), the writes that
    /// would make it so (unchanged files are not rewritten), and the revision the files were
    /// read at (the base of the write). Call with `apply_lock` held.
    async fn merged_files(
        &self,
        changes: &[(String, Option<String>)],
    ) -> Result<(Vec<SourceFile>, Vec<PolicyWrite>, Option<i64>), ApplyError> {
        for (name, _) in changes {
            if !is_valid_file_name(name) {
                return Err(StoreError::InvalidName(name.clone()).into());
            }
        }
        let stored = self.store.read_policies().await?;
        let mut files = stored.files;
        let mut writes = Vec::new();
        for (name, content) in changes {
            let existing = files.iter().position(|f| &f.name == name);
            match (existing, content) {
                (Some(i), Some(c)) => {
                    if files[i].content != *c {
                        writes.push((name.clone(), Some(c.clone())));
                    }
                    files[i].content.clone_from(c);
                }
                (None, Some(c)) => {
                    writes.push((name.clone(), Some(c.clone())));
                    files.push(SourceFile {
                        name: name.clone(),
                        content: c.clone(),
                    });
                }
                (Some(i), None) => {
                    writes.push((name.clone(), None));
                    files.remove(i);
                }
                (None, None) => return Err(StoreError::NotFound(name.clone()).into()),
            }
        }
        Ok((files, writes, stored.revision))
    }

    /// A snapshot of the registry, for read-only views (`GET /v1/clusters`).
    pub fn with_registry<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        f(&lock(&self.registry))
    }

    /// The current resources of `node`: its scope's shared part from the scope cache
    /// (`crate::push`: compiled once per scope and change), then its own.
    pub fn compile_for(&self, node: &Node) -> Resources {
        self.compile_for_at(node).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store as _;
    use crate::testing::sidecar_node as node;
    use std::collections::HashMap;

    fn cp(dir: &std::path::Path) -> ControlPlane {
        ControlPlane::new(
            Arc::new(crate::store::FileStore::in_dir(dir)),
            Duration::from_secs(5),
            Metrics::new().unwrap(),
        )
    }

    #[tokio::test]
    async fn apply_validates_writes_and_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        cp.reload().await.unwrap();
        let mut rx = cp.subscribe();
        rx.borrow_and_update();
        let generation = cp.generation();

        let bad = cp
            .apply("a.yaml", Some("services:\n  - name: Bad\n"), false)
            .await;
        assert!(matches!(bad, Err(ApplyError::Invalid(_))));
        assert!(!dir.path().join("a.yaml").exists());
        assert!(!rx.has_changed().unwrap());
        assert_eq!(cp.generation(), generation);

        let dry = cp
            .apply("a.yaml", Some("services:\n  - name: a\n"), true)
            .await
            .unwrap();
        assert_eq!(dry.changed, ["service/a.default created"]);
        assert!(!dir.path().join("a.yaml").exists());

        let out = cp
            .apply("a.yaml", Some("services:\n  - name: a\n"), false)
            .await
            .unwrap();
        assert_eq!(out.changed, ["service/a.default created"]);
        assert_eq!(cp.policy().version(), out.version);
        // A policy change bumps the generation (and wakes the streams of the scopes it
        // changes: none is compiled here; see `state::wake`).
        assert_eq!(cp.generation(), generation + 1);
        assert!(dir.path().join("a.yaml").exists());

        let out = cp.apply("a.yaml", None, false).await.unwrap();
        assert_eq!(out.changed, ["service/a.default deleted"]);
        assert!(matches!(
            cp.apply("a.yaml", None, false).await,
            Err(ApplyError::Store(StoreError::NotFound(_)))
        ));
        assert!(matches!(
            cp.apply("../a.yaml", Some(""), false).await,
            Err(ApplyError::Store(StoreError::InvalidName(_)))
        ));
    }

    #[tokio::test]
    async fn apply_many_validates_files_together() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        let routes = "routes:\n  - name: r\n    service: a\n    destinations: [{service: a}]\n";
        assert!(cp.apply("r.yaml", Some(routes), false).await.is_err());
        let out = cp
            .apply_many(
                &[
                    ("r.yaml".into(), Some(routes.into())),
                    ("s.yaml".into(), Some("services: [{name: a}]\n".into())),
                ],
                false,
            )
            .await
            .unwrap();
        assert_eq!(
            out.changed,
            ["service/a.default created", "route/r created"]
        );
        assert_eq!(cp.store().read_policies().await.unwrap().files.len(), 2);
    }

    #[tokio::test]
    async fn invalid_store_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        std::fs::write(dir.path().join("a.yaml"), "services:\n  - name: a\n").unwrap();
        let good = cp.reload().await.unwrap();
        std::fs::write(dir.path().join("b.yaml"), "services:\n  - name: a\n").unwrap();
        assert!(cp.reload().await.is_err());
        assert_eq!(cp.policy().version(), good);
        let err = cp.policy_error().unwrap();
        assert!(
            err.contains("b.yaml:2: services[0].name: duplicate service"),
            "{err}"
        );
        assert_eq!(cp.metrics().policy_errors.get(), 1);
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        cp.reload().await.unwrap();
        assert_eq!(cp.policy_error(), None);
        assert_eq!(cp.metrics().policy_errors.get(), 0);
    }

    #[test]
    fn disconnected_proxies_stay_listed_until_their_grace_expires() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::new(
            Arc::new(crate::store::FileStore::in_dir(dir.path())),
            Duration::from_millis(300),
            Metrics::new().unwrap(),
        );
        let s = cp.connect(&node("a-1", "a", "127.0.0.2:15006")).unwrap();
        assert_eq!(cp.metrics().proxies_connected.get(), 1);
        cp.update_status("a-1", s, &HashMap::new(), Some("routes: bad regex".into()));
        assert_eq!(cp.metrics().proxies_nacking.get(), 1);
        let st = &cp.proxy_statuses()[0];
        assert!(st.nacking);
        assert_eq!(st.last_nack.as_deref(), Some("routes: bad regex"));
        assert!(st.last_nack_at.is_some());
        // An ACK ends the NACKing streak but keeps the last reason.
        cp.update_status("a-1", s, &HashMap::new(), None);
        assert_eq!(cp.metrics().proxies_nacking.get(), 0);
        assert_eq!(
            cp.proxy_statuses()[0].last_nack.as_deref(),
            Some("routes: bad regex")
        );

        cp.disconnect("a-1", s);
        assert_eq!(cp.metrics().proxies_connected.get(), 0);
        let st = &cp.proxy_statuses()[0];
        assert_eq!(st.state, ProxyState::Disconnected);
        assert_eq!(st.removing_in_seconds, Some(1));
        let json = serde_json::to_value(st).unwrap();
        assert_eq!(json["state"], "disconnected");
        cp.expire_registrations();
        assert_eq!(cp.proxy_statuses().len(), 1, "kept during the grace");
        std::thread::sleep(Duration::from_millis(350));
        cp.expire_registrations();
        assert!(cp.proxy_statuses().is_empty());

        // A reconnect within the grace is listed as connected again.
        let s1 = cp.connect(&node("b-1", "b", "")).unwrap();
        cp.disconnect("b-1", s1);
        let s2 = cp.connect(&node("b-1", "b", "")).unwrap();
        assert_ne!(s1, s2);
        assert_eq!(cp.proxy_statuses()[0].state, ProxyState::Connected);
        assert_eq!(cp.proxy_statuses()[0].removing_in_seconds, None);
        assert_eq!(cp.metrics().proxies_connected.get(), 1);
    }

    #[test]
    fn set_trust_bumps_only_on_change_and_reaches_compiled_resources() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        let mut rx = cp.subscribe();
        rx.borrow_and_update();
        assert!(!cp.set_trust(TrustBundle::default()), "same as the default");
        assert!(!rx.has_changed().unwrap());
        let rotated = TrustBundle {
            trust_domain: "example.org".into(),
            roots_pem: vec!["OLD".into(), "NEW".into()],
        };
        assert!(cp.set_trust(rotated.clone()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*cp.trust(), rotated);
        let r = cp.compile_for(&node("a-1", "a", "127.0.0.2:15006"));
        assert_eq!(r.trust.trust_domain, "example.org");
        assert_eq!(r.trust.roots_pem, ["OLD", "NEW"]);
        rx.borrow_and_update();
        assert!(!cp.set_trust(rotated));
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn change_instants_are_recorded_per_generation() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cp(dir.path());
        let rx = cp.subscribe();
        let g0 = *rx.borrow();
        assert_eq!(cp.first_change_after(g0), None);
        let before = Instant::now();
        cp.apply("a.yaml", Some("services: [{name: a}]\n"), false)
            .await
            .unwrap();
        let first = cp.first_change_after(g0).unwrap();
        assert!(first >= before);
        cp.apply("a.yaml", Some("services: [{name: b}]\n"), false)
            .await
            .unwrap();
        // Still the first change after g0; the second one is found after g0 + 1.
        assert_eq!(cp.first_change_after(g0), Some(first));
        assert!(cp.first_change_after(g0 + 1).unwrap() >= first);
        assert_eq!(cp.first_change_after(g0 + 2), None);
    }

    #[tokio::test]
    async fn diff_reports_per_proxy_changes_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "services:\n  - {name: web, dependencies: [api]}\n  - name: api\n  - name: other\n",
        )
        .unwrap();
        let cp = cp(dir.path());
        cp.reload().await.unwrap();
        let version = cp.policy().version().to_owned();
        cp.connect(&node("web-1", "web", "127.0.0.2:15006"))
            .unwrap();
        cp.connect(&node("other-1", "other", "127.0.0.3:15006"))
            .unwrap();
        let routes = "routes:\n  - name: r\n    service: api\n    match: {path: {prefix: /v2}}\n    destinations: [{service: other}]\n";
        let d = cp
            .diff_many(&[("r.yaml".into(), Some(routes.into()))])
            .await
            .unwrap();
        assert_eq!(d.current_version, version);
        assert_ne!(d.version, version);
        assert_eq!(d.changed, ["route/r created"]);
        let ids: Vec<&str> = d.proxies.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["other-1", "web-1"]);
        let web = &d.proxies[1];
        assert!(web.changes);
        assert_eq!(web.types["routes"].added, ["outbound/r"]);
        assert_eq!(web.types["clusters"].added, ["other.default"]);
        assert!(!web.types["listeners"].version_changes);
        // `other` has no dependencies (it may call everything), so it sees the route too.
        assert!(d.proxies[0].changes);
        assert!(!dir.path().join("r.yaml").exists());
        assert_eq!(cp.policy().version(), version);

        // Invalid input: the same errors as apply.
        let bad = cp
            .diff_many(&[("r.yaml".into(), Some(routes.replace("other", "nope")))])
            .await;
        assert!(matches!(bad, Err(ApplyError::Invalid(_))));
    }

    #[tokio::test]
    async fn restored_registrations_are_listed_disconnected_until_reclaimed_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "services: [{name: web}, {name: a}, {name: b}]\n",
        )
        .unwrap();
        let state = dir.path().join(".weft-state");
        let with_state = || {
            let store = Arc::new(crate::store::FileStore::in_dir(dir.path()));
            let cp = Arc::new(
                ControlPlane::new(
                    Arc::clone(&store) as SharedStore,
                    Duration::from_secs(5),
                    Metrics::new().unwrap(),
                )
                .with_restart_grace(Duration::from_millis(300)),
            );
            (store, cp)
        };
        let (store, before) = with_state();
        assert_eq!(
            store
                .load_registrations(Arc::clone(&before) as _)
                .await
                .unwrap(),
            0,
            "no file yet"
        );
        before
            .connect(&node("a-1", "a", "127.0.0.2:15006"))
            .unwrap();
        before
            .connect(&node("b-1", "b", "127.0.0.3:15006"))
            .unwrap();
        store.close_registrations(Arc::clone(&before) as _).await;
        // Closed: a stream ending during shutdown does not persist its proxy as disconnected.
        before.disconnect("a-1", 1);
        store.persist(&*before);
        drop(before);

        let (store, after) = with_state();
        after.reload().await.unwrap();
        let mut rx = after.subscribe();
        rx.borrow_and_update();
        assert_eq!(
            store
                .load_registrations(Arc::clone(&after) as _)
                .await
                .unwrap(),
            2
        );
        assert!(rx.has_changed().unwrap());
        let statuses = after.proxy_statuses();
        assert_eq!(statuses.len(), 2);
        for s in &statuses {
            assert_eq!(s.state, ProxyState::Disconnected);
            assert_eq!(s.removing_in_seconds, Some(1));
        }
        assert_eq!(statuses[0].inbound_address, "127.0.0.2:15006");
        assert_eq!(after.metrics().proxies_connected.get(), 0);
        let web = node("web-1", "web", "127.0.0.4:15006");
        let endpoints = |cp: &Arc<ControlPlane>| {
            let r = cp.compile_for(&web);
            r.endpoints
                .clusters
                .iter()
                .flat_map(|c| c.endpoints.iter().map(|e| e.address.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(endpoints(&after), ["127.0.0.2:15006", "127.0.0.3:15006"]);

        after.connect(&node("a-1", "a", "127.0.0.2:15006")).unwrap();
        // web's proxy is connected (a scope no registered proxy has is dropped from the cache).
        after.connect(&web).unwrap();
        std::thread::sleep(Duration::from_millis(350));
        // The removal of b-1 wakes the streams of the scopes holding b's endpoints (web's),
        // and not a's (a holds none: no scope of it was compiled).
        let mut web_rx = after.subscribe_scope(&crate::policy::ServiceKey::new("web", "default"));
        let mut a_rx = after.subscribe_scope(&crate::policy::ServiceKey::new("a", "default"));
        rx.borrow_and_update();
        after.expire_registrations();
        assert!(web_rx.has_changed().unwrap(), "the removal is pushed");
        assert!(!a_rx.has_changed().unwrap());
        assert!(!rx.has_changed().unwrap(), "not to every stream");
        web_rx.borrow_and_update();
        a_rx.borrow_and_update();
        assert_eq!(endpoints(&after), ["127.0.0.2:15006", "127.0.0.4:15006"]);
        let statuses = after.proxy_statuses();
        assert_eq!(statuses.len(), 2);
        assert_eq!(statuses[0].state, ProxyState::Connected);
        store.persist(&*after);
        let persisted = crate::persist::load_registry(&state).unwrap();
        assert_eq!(persisted.len(), 2);
        assert_eq!(persisted[0].id, "a-1");
    }
}
