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
//!
//! **ConfigMap volumes.** The kubelet's atomic writer lays a ConfigMap out as a timestamped
//! directory holding the files (`..2026_12_01_10_00_00.123456789/a.yaml`), a symlink `..data`
//! to it, and one symlink per key (`a.yaml -> ..data/a.yaml`). An update writes a new timestamped
//! directory, creates the symlinks of new keys, swaps `..data` with a rename (the commit point),
//! removes the symlinks of removed keys, then the old directory ([`atomic_writer`] reproduces
//! it). A directory with `..data` is read through it: `..data` is resolved once and the files of
//! that timestamped directory are read (it never changes after the swap, it is only removed),
//! then `..data` is checked again; if it moved meanwhile the read is repeated. So a reload sees
//! one complete version, never a mix or a key missing. Its watcher reacts to the swap of
//! `..data` alone (one reload per update); the writer's other steps (hidden `..*` entries, the
//! per-key symlinks into `..data/`) are ignored. Such a directory is read-only for the admin
//! API: change the ConfigMap.

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
        let files = tokio::task::spawn_blocking(move || read_consistent(&dir))
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
        if is_atomic_writer_dir(self.policies.dir()) {
            return Err(StoreError::Backend {
                store: self.describe(),
                reason: "it is a Kubernetes ConfigMap volume (it has ..data), which only the \
                         kubelet writes: change the ConfigMap instead (kubectl apply), the \
                         control plane reloads it"
                    .to_owned(),
            });
        }
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
    if event.paths.is_empty() {
        return true;
    }
    // A ConfigMap volume changes when `..data` is swapped, and only then.
    if event.paths.iter().any(|p| is_data_link(p, dirs)) {
        return true;
    }
    let atomic = dirs.first().is_some_and(|d| is_atomic_writer_dir(d));
    !atomic
        && event
            .paths
            .iter()
            .any(|p| is_policy_path(p, dirs) && !is_link_into_data(p))
}

/// The symlink the kubelet's atomic writer swaps to publish a new version.
pub const DATA_LINK: &str = "..data";

/// How many times a read is retried when `..data` moves while it is read.
const CONSISTENT_READ_ATTEMPTS: usize = 10;

/// Whether `dir` is laid out by the kubelet's atomic writer (a ConfigMap or Secret volume).
pub fn is_atomic_writer_dir(dir: &Path) -> bool {
    dir.join(DATA_LINK)
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
}

/// Whether `path` is `..data` directly in the store.
fn is_data_link(path: &Path, dirs: &[PathBuf]) -> bool {
    path.file_name().is_some_and(|n| n == DATA_LINK)
        && path
            .parent()
            .is_some_and(|parent| dirs.iter().any(|d| d == parent))
}

/// Whether `path` is one of the atomic writer's per-key symlinks (`a.yaml -> ..data/a.yaml`):
/// created before `..data` points at its file, so its creation is not a change yet.
fn is_link_into_data(path: &Path) -> bool {
    std::fs::read_link(path).is_ok_and(|target| target.starts_with(DATA_LINK))
}

/// The policy files of `store`, of one version: through `..data` in a ConfigMap volume (see
/// the module docs), else the directory's own files.
fn read_consistent(store: &PolicyStore) -> Result<Vec<crate::policy::SourceFile>, StoreError> {
    let link = store.dir().join(DATA_LINK);
    for _ in 0..CONSISTENT_READ_ATTEMPTS {
        let target = match std::fs::read_link(&link) {
            Ok(target) => target,
            // No `..data` (or not a symlink): a plain directory.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput
                ) =>
            {
                return store.read_files();
            }
            Err(source) => return Err(StoreError::Io { path: link, source }),
        };
        let version = PolicyStore::new(store.dir().join(&target));
        match version.read_files() {
            // The version read is complete only if it was still the current one afterwards: its
            // directory is removed only after `..data` moved away from it.
            Ok(files) if std::fs::read_link(&link).is_ok_and(|now| now == target) => {
                return Ok(files)
            }
            Ok(_) => {}
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
        tracing::debug!(dir = %store.dir().display(), "..data moved while reading; reading again");
    }
    Err(StoreError::Backend {
        store: format!("directory {}", store.dir().display()),
        reason: format!(
            "{DATA_LINK} moved {CONSISTENT_READ_ATTEMPTS} times while it was read; the next change reloads again"
        ),
    })
}

/// The kubelet's atomic writer (`pkg/volume/util/atomic_writer.go`), step by step, for tests
/// of what reads such a directory: this store's unit tests and the e2e test of a ConfigMap
/// store. Not used by the control plane itself.
pub mod atomic_writer {
    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};

    use super::DATA_LINK;

    const DATA_LINK_TMP: &str = "..data_tmp";

    /// A directory the kubelet projects a ConfigMap into.
    #[derive(Debug)]
    pub struct AtomicWriter {
        dir: PathBuf,
    }

    impl AtomicWriter {
        pub fn new(dir: impl Into<PathBuf>) -> Self {
            Self { dir: dir.into() }
        }

        /// Publishes `payload` (key -> content) as the kubelet does: (7) a new timestamped
        /// directory, (8) the files written in it, (10) symlinks of new keys into `..data`,
        /// (11) `..data_tmp` -> the new directory, (12) renamed over `..data`, (13) symlinks of
        /// keys no longer in the payload removed, (14) the old directory removed. `between`
        /// runs after each step (its number given), so a test can read in the middle.
        pub fn write_with(
            &self,
            payload: &BTreeMap<String, String>,
            mut between: impl FnMut(u8),
        ) -> io::Result<()> {
            let old = std::fs::read_link(self.dir.join(DATA_LINK)).ok();
            // (5) the user-visible paths no longer in the payload.
            let mut remove = Vec::new();
            if let Some(old) = &old {
                for entry in std::fs::read_dir(self.dir.join(old))? {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    if !payload.contains_key(&name) {
                        remove.push(name);
                    }
                }
            }
            // (7) `..<UTC timestamp>.<random>`, like Go's MkdirTemp with that prefix.
            let ts = timestamp_dir_name();
            std::fs::create_dir(self.dir.join(&ts))?;
            between(7);
            // (8)
            for (name, content) in payload {
                std::fs::write(self.dir.join(&ts).join(name), content)?;
            }
            between(8);
            // (10)
            for name in payload.keys() {
                let visible = self.dir.join(name);
                if visible.symlink_metadata().is_err() {
                    std::os::unix::fs::symlink(Path::new(DATA_LINK).join(name), visible)?;
                }
            }
            between(10);
            // (11), (12)
            let tmp = self.dir.join(DATA_LINK_TMP);
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&ts, &tmp)?;
            between(11);
            std::fs::rename(&tmp, self.dir.join(DATA_LINK))?;
            between(12);
            // (13)
            for name in remove {
                std::fs::remove_file(self.dir.join(name))?;
            }
            between(13);
            // (14)
            if let Some(old) = old {
                std::fs::remove_dir_all(self.dir.join(old))?;
            }
            between(14);
            Ok(())
        }

        /// [`AtomicWriter::write_with`] without pauses.
        pub fn write(&self, payload: &BTreeMap<String, String>) -> io::Result<()> {
            self.write_with(payload, |_| {})
        }
    }

    fn timestamp_dir_name() -> String {
        let t = time::OffsetDateTime::now_utc();
        format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            rand::random::<u32>()
        )
    }
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

    fn payload(files: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), (*c).to_owned()))
            .collect()
    }

    fn read(dir: &Path) -> Vec<(String, String)> {
        read_consistent(&PolicyStore::new(dir))
            .unwrap()
            .into_iter()
            .map(|f| (f.name, f.content))
            .collect()
    }

    fn pairs(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), (*c).to_owned()))
            .collect()
    }

    /// The kubelet's exact sequence, read after every step: before the swap of `..data` the
    /// old version is read whole, from the swap on the new one, never a mix or a gap.
    #[test]
    fn a_configmap_volume_is_read_one_whole_version_at_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let writer = atomic_writer::AtomicWriter::new(dir.path());
        let versions: [&[(&str, &str)]; 4] = [
            &[("a.yaml", "a: 1\n"), ("b.yaml", "b: 1\n")],
            // Changed content.
            &[("a.yaml", "a: 2\n"), ("b.yaml", "b: 2\n")],
            // A key added and one removed.
            &[("a.yaml", "a: 3\n"), ("c.yaml", "c: 3\n")],
            // Down to one key.
            &[("c.yaml", "c: 4\n")],
        ];
        writer.write(&payload(versions[0])).unwrap();
        assert!(is_atomic_writer_dir(dir.path()));
        assert_eq!(read(dir.path()), pairs(versions[0]));
        for pair in versions.windows(2) {
            let (old, new) = (pair[0], pair[1]);
            let mut steps = Vec::new();
            writer
                .write_with(&payload(new), |step| {
                    let expected = if step >= 12 { new } else { old };
                    assert_eq!(read(dir.path()), pairs(expected), "after step {step}");
                    steps.push(step);
                })
                .unwrap();
            assert_eq!(steps, [7, 8, 10, 11, 12, 13, 14]);
            // Exactly the writer's layout: one timestamped directory, `..data`, one
            // symlink per key.
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let hidden: Vec<&String> = names.iter().filter(|n| n.starts_with("..")).collect();
            assert_eq!(hidden.len(), 2, "{names:?}");
            assert!(hidden[0].starts_with("..2"), "{names:?}");
            assert_eq!(hidden[1], DATA_LINK);
            let visible: Vec<&str> = names
                .iter()
                .filter(|n| !n.starts_with(".."))
                .map(String::as_str)
                .collect();
            let keys: Vec<&str> = new.iter().map(|(n, _)| *n).collect();
            assert_eq!(visible, keys);
        }
    }

    /// A reader racing a writer (bounded: 60 updates) only ever sees complete versions.
    #[test]
    fn a_reader_racing_the_kubelet_never_sees_a_mix() {
        let dir = tempfile::tempdir().unwrap();
        let writer = atomic_writer::AtomicWriter::new(dir.path());
        let version = |i: usize| {
            let mut files = vec![
                ("a.yaml".to_owned(), format!("v: {i}\n")),
                ("b.yaml".to_owned(), format!("v: {i}\n")),
            ];
            // Every third version lacks c.yaml.
            if !i.is_multiple_of(3) {
                files.push(("c.yaml".to_owned(), format!("v: {i}\n")));
            }
            files
        };
        writer.write(&version(0).into_iter().collect()).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (dir, done) = (dir.path().to_owned(), std::sync::Arc::clone(&done));
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) && reads < 1_000_000 {
                    let files = read(&dir);
                    let i: usize = files[0].1.trim_start_matches("v: ").trim().parse().unwrap();
                    assert_eq!(files, version(i), "a mixed or partial read");
                    reads += 1;
                }
                reads
            })
        };
        for i in 1..=60 {
            writer.write(&version(i).into_iter().collect()).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(read(dir.path()), version(60));
    }

    #[test]
    fn only_the_swap_of_data_is_a_change_of_a_configmap_volume() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = [dir.path().to_owned()];
        let modify = EventKind::Modify(ModifyKind::Any);
        let at = |name: &str| dir.path().join(name).display().to_string();
        // A plain directory: policy files are changes.
        assert!(is_relevant(&event(modify, &[&at("a.yaml")]), &dirs));
        atomic_writer::AtomicWriter::new(dir.path())
            .write(&payload(&[("a.yaml", "a: 1\n")]))
            .unwrap();
        assert!(is_relevant(&event(modify, &[&at("..data")]), &dirs));
        assert!(is_relevant(
            &event(modify, &[&at("..data_tmp"), &at("..data")]),
            &dirs
        ));
        for ignored in [
            "a.yaml",
            "b.yaml",
            "..data_tmp",
            "..2026_12_01_10_00_00.1234",
        ] {
            assert!(
                !is_relevant(&event(modify, &[&at(ignored)]), &dirs),
                "{ignored}"
            );
        }
    }

    #[tokio::test]
    async fn a_configmap_volume_is_not_written_through_the_admin_api() {
        let dir = tempfile::tempdir().unwrap();
        atomic_writer::AtomicWriter::new(dir.path())
            .write(&payload(&[("a.yaml", "services: []\n")]))
            .unwrap();
        let store = FileStore::new(dir.path(), dir.path().join(".weft-state"));
        let err = store
            .write_policies(None, &[("b.yaml".into(), Some("routes: []\n".into()))])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ConfigMap"), "{err}");
        assert!(!dir.path().join("b.yaml").exists());
        let read = store.read_policies().await.unwrap();
        assert_eq!(read.files.len(), 1);
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
