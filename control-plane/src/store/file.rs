//! The file backend (the default, one replica): policies are the `*.yaml` / `*.yml` files of a
//! directory ([`crate::policy::PolicyStore`]), watched with inotify; the registry is
//! `registry.json` in the state directory ([`crate::persist`]), rewritten after registry changes
//! and restored at start.
//!
//! The directory has no revision of its own: writes are unconditional, serialized by the control
//! plane's apply lock (a hand edit racing an apply is decided by whichever rename comes last).
//!
//! The watcher reports any create/modify/remove/rename of a policy file in the directory.
//! Access events are ignored (reading the files ourselves would otherwise retrigger it forever),
//! and so is anything under a dot-file or dot-directory (our temporaries, editors' swap files,
//! the state directory `.weft-state`, whose registry writes must never reload policies).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{PolicyWrite, RegistryHost, Store, StoreError, StoredPolicies, WatchGuard};
use crate::persist::StateStore;
use crate::policy::store::is_valid_file_name;
use crate::policy::PolicyStore;

/// Minimum time between two writes of the state file.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(100);

/// A policy directory and a state directory.
#[derive(Debug)]
pub struct FileStore {
    policies: PolicyStore,
    state: Arc<StateStore>,
}

impl FileStore {
    /// Policies in `policies`, the registry in `state_dir`.
    pub fn new(policies: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            policies: PolicyStore::new(policies),
            state: Arc::new(StateStore::new(state_dir)),
        }
    }

    /// Policies in `policies`, the registry in its default state directory
    /// (`<policies>/.weft-state`).
    pub fn in_dir(policies: impl Into<PathBuf>) -> Self {
        let policies = policies.into();
        let state = crate::persist::default_state_dir(&policies);
        Self::new(policies, state)
    }

    /// The policy directory.
    pub fn dir(&self) -> &Path {
        self.policies.dir()
    }

    /// The state directory (`registry.json`).
    pub fn state_dir(&self) -> &Path {
        self.state.dir()
    }

    /// Writes `host`'s registry now (blocking file I/O).
    pub fn persist(&self, host: &dyn RegistryHost) {
        self.state.write(|| host.own_registrations());
    }
}

#[tonic::async_trait]
impl Store for FileStore {
    fn describe(&self) -> String {
        format!("directory {}", self.policies.dir().display())
    }

    async fn read_policies(&self) -> Result<StoredPolicies, StoreError> {
        let dir = self.policies.clone();
        let files = tokio::task::spawn_blocking(move || dir.read_files())
            .await
            .map_err(|e| StoreError::Backend {
                store: self.describe(),
                reason: format!("reading the directory: {e}"),
            })??;
        Ok(StoredPolicies {
            files,
            revision: None,
        })
    }

    async fn write_policies(
        &self,
        _base: Option<i64>,
        changes: &[PolicyWrite],
    ) -> Result<Option<i64>, StoreError> {
        for (name, content) in changes {
            match content {
                Some(c) => self.policies.write(name, c)?,
                None => self.policies.remove(name)?,
            }
        }
        Ok(None)
    }

    fn watch_policies(&self, changed: mpsc::UnboundedSender<()>) -> Result<WatchGuard, StoreError> {
        let dir = self.policies.dir().to_owned();
        let watch_error = |e: notify::Error| StoreError::Backend {
            store: format!("directory {}", dir.display()),
            reason: format!("watching it: {e}"),
        };
        let mut dirs = vec![dir.clone()];
        if let Ok(canonical) = dir.canonicalize() {
            if canonical != dir {
                dirs.push(canonical);
            }
        }
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) if is_relevant(&event, &dirs) => {
                    let _ = changed.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "policy watcher error; reloading");
                    let _ = changed.send(());
                }
            })
            .map_err(watch_error)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(WatchGuard::new(watcher))
    }

    async fn load_registrations(&self, host: Arc<dyn RegistryHost>) -> Result<usize, StoreError> {
        let state = Arc::clone(&self.state);
        let restored = tokio::task::spawn_blocking(move || {
            let entries = state.load();
            host.restore_registrations(entries)
        })
        .await
        .map_err(|e| StoreError::Backend {
            store: self.describe(),
            reason: format!("restoring the registry: {e}"),
        })?;
        if restored > 0 {
            tracing::info!(
                restored,
                dir = %self.state.dir().display(),
                "restored the persisted registry: endpoints are kept until their proxies reconnect or the restart grace ends"
            );
        }
        Ok(restored)
    }

    async fn sync_registrations(&self, host: Arc<dyn RegistryHost>) {
        loop {
            host.registry_changes().notified().await;
            let (state, host) = (Arc::clone(&self.state), Arc::clone(&host));
            let _ =
                tokio::task::spawn_blocking(move || state.write(|| host.own_registrations())).await;
            tokio::time::sleep(WRITE_INTERVAL).await;
        }
    }

    async fn close_registrations(&self, host: Arc<dyn RegistryHost>) {
        let state = Arc::clone(&self.state);
        let _ = tokio::task::spawn_blocking(move || state.close(|| host.own_registrations())).await;
    }
}

/// Whether `path` (reported by the watcher of the store `dirs`: as given and canonical) may be
/// a policy file: directly in the store, with a policy file name (not hidden). A path outside
/// the store's spellings is judged by its name alone.
fn is_policy_path(path: &Path, dirs: &[PathBuf]) -> bool {
    let name_ok = |name: &std::ffi::OsStr| name.to_str().is_some_and(is_valid_file_name);
    match dirs.iter().find_map(|d| path.strip_prefix(d).ok()) {
        Some(rest) => {
            let mut components = rest.components();
            matches!(
                (components.next(), components.next()),
                (Some(Component::Normal(name)), None) if name_ok(name)
            )
        }
        None => path.file_name().is_some_and(name_ok),
    }
}

fn is_relevant(event: &notify::Event, dirs: &[PathBuf]) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    // No paths: the backend lost track (queue overflow); reload to be safe.
    event.paths.is_empty() || event.paths.iter().any(|p| is_policy_path(p, dirs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        e.paths = paths.iter().map(PathBuf::from).collect();
        e
    }

    #[test]
    fn only_policy_files_directly_in_the_store_are_relevant() {
        let dirs = [PathBuf::from("/etc/.weft/policies")];
        let modify = EventKind::Modify(ModifyKind::Any);
        for relevant in [
            "/etc/.weft/policies/a.yaml",
            "/etc/.weft/policies/10-routes.yml",
            // Another spelling of the directory: judged by the name.
            "/elsewhere/a.yaml",
        ] {
            assert!(
                is_relevant(&event(modify, &[relevant]), &dirs),
                "{relevant}"
            );
        }
        for ignored in [
            "/etc/.weft/policies/.weft-state",
            "/etc/.weft/policies/.weft-state/registry.json",
            "/etc/.weft/policies/.weft-state/.registry.json.tmp-1-2",
            "/etc/.weft/policies/.weft-state/x.yaml",
            "/etc/.weft/policies/.a.yaml.tmp-7",
            "/etc/.weft/policies/sub/a.yaml",
            "/etc/.weft/policies/README.md",
        ] {
            assert!(!is_relevant(&event(modify, &[ignored]), &dirs), "{ignored}");
        }
        assert!(is_relevant(
            &event(EventKind::Create(CreateKind::Any), &[]),
            &dirs
        ));
        assert!(!is_relevant(
            &event(
                EventKind::Access(notify::event::AccessKind::Any),
                &["/etc/.weft/policies/a.yaml"]
            ),
            &dirs
        ));
    }

    #[tokio::test]
    async fn writes_are_unconditional_and_read_back_sorted_without_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::in_dir(dir.path());
        assert_eq!(
            store
                .write_policies(Some(7), &[("b.yaml".into(), Some("routes: []\n".into()))])
                .await
                .unwrap(),
            None
        );
        store
            .write_policies(None, &[("a.yaml".into(), Some("services: []\n".into()))])
            .await
            .unwrap();
        let read = store.read_policies().await.unwrap();
        assert_eq!(read.revision, None);
        let names: Vec<&str> = read.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.yaml", "b.yaml"]);
        assert!(matches!(
            store
                .write_policies(None, &[("a.yaml".into(), None), ("z.yaml".into(), None)])
                .await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            store.describe(),
            format!("directory {}", dir.path().display())
        );
    }
}
