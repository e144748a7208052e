//! The control plane's shared state: the serving policy set, the registry, per-proxy push
//! status, metrics, and the generation counter that wakes discovery streams.
//!
//! Every change that can alter some proxy's resources (a new policy set, a registry change)
//! bumps the generation; each discovery stream then recompiles its proxy's resources and pushes
//! whatever differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use weft_proto::v1::Node;

use crate::compile::{compile, Resources};
use crate::metrics::Metrics;
use crate::policy::store::is_valid_file_name;
use crate::policy::{PolicyErrors, PolicySet, PolicyStore, ServiceKey, StoreError};
use crate::registry::Registry;

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
}

/// The push status of one connected proxy, for `GET /v1/proxies` and `weftctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub inbound_address: String,
    pub build_version: String,
    /// RFC 3339, seconds precision.
    pub connected_since: String,
    /// ACKed version by type (`listeners`, `routes`, `clusters`, `endpoints`).
    pub versions: BTreeMap<String, String>,
    pub last_nack: Option<String>,
    #[serde(skip)]
    session: u64,
}

/// Shared state of one control plane.
#[derive(Debug)]
pub struct ControlPlane {
    store: PolicyStore,
    policy: ArcSwap<PolicySet>,
    policy_error: Mutex<Option<String>>,
    registry: Mutex<Registry>,
    statuses: Mutex<BTreeMap<String, ProxyStatus>>,
    generation: watch::Sender<u64>,
    /// Serializes store reads+writes (admin API and watcher reloads).
    apply_lock: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

/// Locks a mutex, recovering from poisoning: every critical section leaves the data
/// consistent, so a panic elsewhere must not take the control plane down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ControlPlane {
    pub fn new(store: PolicyStore, deregister_grace: Duration, metrics: Metrics) -> Self {
        let policy = PolicySet::empty();
        metrics.set_policy_version(policy.version());
        Self {
            store,
            policy: ArcSwap::from_pointee(policy),
            policy_error: Mutex::new(None),
            registry: Mutex::new(Registry::new(deregister_grace)),
            statuses: Mutex::new(BTreeMap::new()),
            generation: watch::Sender::new(0),
            apply_lock: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &PolicyStore {
        &self.store
    }

    /// The serving policy set.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.policy.load_full()
    }

    /// Why the store's current content was rejected, if it was.
    pub fn policy_error(&self) -> Option<String> {
        lock(&self.policy_error).clone()
    }

    /// A receiver of the generation counter (bumped on every relevant change).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
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
                "serving policy set"
            );
            self.policy.store(Arc::new(set));
            self.bump();
        }
        changed
    }

    /// Reloads the store from disk: serves it if valid, else keeps the last good set and
    /// records the error. Returns the new version on success.
    pub async fn reload(&self) -> Result<String, ApplyError> {
        let _guard = self.apply_lock.lock().await;
        let result = self
            .store
            .read_files()
            .map_err(ApplyError::from)
            .and_then(|files| PolicySet::from_files(files).map_err(ApplyError::from));
        match result {
            Ok(set) => {
                let version = set.version().to_owned();
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
        for (name, _) in changes {
            if !is_valid_file_name(name) {
                return Err(StoreError::InvalidName(name.clone()).into());
            }
        }
        let _guard = self.apply_lock.lock().await;
        let mut files = self.store.read_files()?;
        let mut writes = Vec::new();
        for (name, content) in changes {
            let existing = files.iter().position(|f| &f.name == name);
            match (existing, content) {
                (Some(i), Some(c)) => {
                    if files[i].content != *c {
                        writes.push((name, Some(c)));
                    }
                    files[i].content.clone_from(c);
                }
                (None, Some(c)) => {
                    writes.push((name, Some(c)));
                    files.push(crate::policy::SourceFile {
                        name: name.clone(),
                        content: c.clone(),
                    });
                }
                (Some(i), None) => {
                    writes.push((name, None));
                    files.remove(i);
                }
                (None, None) => return Err(StoreError::NotFound(name.clone()).into()),
            }
        }
        let set = PolicySet::from_files(files)?;
        let changed = diff(&self.policy.load(), &set);
        let outcome = ApplyOutcome {
            version: set.version().to_owned(),
            changed,
        };
        if dry_run {
            return Ok(outcome);
        }
        for (name, content) in writes {
            match content {
                Some(c) => self.store.write(name, c)?,
                None => self.store.remove(name)?,
            }
        }
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

    /// Registers a proxy's stream; returns its session.
    pub fn connect(&self, node: &Node) -> u64 {
        let now = SystemTime::now();
        let session = lock(&self.registry).register(node.clone(), now);
        let namespace = if node.namespace.is_empty() {
            "default".to_owned()
        } else {
            node.namespace.clone()
        };
        lock(&self.statuses).insert(
            node.id.clone(),
            ProxyStatus {
                id: node.id.clone(),
                service: node.service.clone(),
                namespace,
                inbound_address: node.inbound_address.clone(),
                build_version: node.build_version.clone(),
                connected_since: humantime::format_rfc3339_seconds(now).to_string(),
                versions: BTreeMap::new(),
                last_nack: None,
                session,
            },
        );
        self.metrics.proxies_connected.inc();
        self.bump();
        session
    }

    /// A proxy's stream ended: its endpoint goes after the grace period.
    pub fn disconnect(&self, id: &str, session: u64) {
        lock(&self.registry).disconnect(id, session, Instant::now());
        let mut statuses = lock(&self.statuses);
        if statuses.get(id).is_some_and(|s| s.session == session) {
            statuses.remove(id);
        }
        self.metrics.proxies_connected.dec();
    }

    /// Drops registrations whose grace expired (and wakes streams if any did).
    pub fn expire_registrations(&self) {
        if lock(&self.registry).expire(Instant::now()) {
            self.bump();
        }
    }

    /// Records what a proxy ACKed / NACKed.
    pub fn update_status(
        &self,
        id: &str,
        session: u64,
        versions: &HashMap<i32, String>,
        last_nack: Option<String>,
    ) {
        let mut statuses = lock(&self.statuses);
        if let Some(s) = statuses.get_mut(id).filter(|s| s.session == session) {
            s.versions = versions
                .iter()
                .filter_map(|(t, v)| {
                    let t = weft_proto::v1::ResourceType::try_from(*t).ok()?;
                    Some((crate::compile::type_name(t).to_owned(), v.clone()))
                })
                .collect();
            if last_nack.is_some() {
                s.last_nack = last_nack;
            }
        }
    }

    /// Every connected proxy's status, sorted by id.
    pub fn proxy_statuses(&self) -> Vec<ProxyStatus> {
        lock(&self.statuses).values().cloned().collect()
    }

    /// Compiles the current resources of `node`.
    pub fn compile_for(&self, node: &Node) -> Resources {
        let policy = self.policy.load();
        let registry = lock(&self.registry);
        compile(&policy, &registry, node)
    }
}

/// Human-readable differences between two policy sets.
fn diff(old: &PolicySet, new: &PolicySet) -> Vec<String> {
    let services = |set: &PolicySet| -> BTreeMap<ServiceKey, crate::policy::Service> {
        set.services()
            .iter()
            .map(|s| (ServiceKey::new(&s.name, &s.namespace), s.clone()))
            .collect()
    };
    let routes = |set: &PolicySet| -> BTreeMap<String, crate::policy::Route> {
        set.routes()
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect()
    };
    let mut out = Vec::new();
    diff_maps(&services(old), &services(new), "service", &mut out);
    diff_maps(&routes(old), &routes(new), "route", &mut out);
    out
}

fn diff_maps<K: Ord + std::fmt::Display, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    kind: &str,
    out: &mut Vec<String>,
) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{kind}/{k} created")),
            Some(o) if o != v => out.push(format!("{kind}/{k} configured")),
            Some(_) => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(k)) {
        out.push(format!("{kind}/{k} deleted"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(dir: &std::path::Path) -> ControlPlane {
        ControlPlane::new(
            PolicyStore::new(dir),
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

        let bad = cp
            .apply("a.yaml", Some("services:\n  - name: Bad\n"), false)
            .await;
        assert!(matches!(bad, Err(ApplyError::Invalid(_))));
        assert!(!dir.path().join("a.yaml").exists());
        assert!(!rx.has_changed().unwrap());

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
        assert!(rx.has_changed().unwrap());
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
        assert_eq!(cp.store().read_files().unwrap().len(), 2);
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
}
