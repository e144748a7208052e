//! Watches the policy directory and reloads the policy set on change.
//!
//! Any create/modify/remove/rename of a policy file in the directory schedules one full reload
//! after a short quiet period, so a burst of events (an editor's write-temp-then-rename, a `cp`
//! of many files) costs one reload. Access events are ignored: reading the files ourselves
//! would otherwise retrigger the watcher forever. So is anything under a dot-file or
//! dot-directory (our temporaries, editors' swap files, the state directory `.weft-state`, whose
//! registry writes must never reload policies).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::policy::store::is_valid_file_name;
use crate::state::ControlPlane;

/// Quiet period before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

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

/// Starts watching the store directory; the returned watcher must be kept alive.
pub fn spawn_watcher(cp: Arc<ControlPlane>) -> notify::Result<RecommendedWatcher> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let dir = cp.store().dir().to_owned();
    let mut dirs = vec![dir.clone()];
    if let Ok(canonical) = dir.canonicalize() {
        if canonical != dir {
            dirs.push(canonical);
        }
    }
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if is_relevant(&event, &dirs) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "policy watcher error; reloading");
                let _ = tx.send(());
            }
        })?;
    watcher.watch(cp.store().dir(), RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            tracing::debug!("policy directory changed; reloading");
            // Errors are logged and recorded by reload itself.
            let _ = cp.reload().await;
        }
    });
    Ok(watcher)
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
    async fn state_writes_never_reload_policies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "services: [{name: a}]\n").unwrap();
        let state = crate::persist::default_state_dir(dir.path());
        let cp = Arc::new(
            ControlPlane::new(
                crate::policy::PolicyStore::new(dir.path()),
                Duration::from_secs(5),
                crate::metrics::Metrics::new().unwrap(),
            )
            .with_state_store(crate::persist::StateStore::new(&state)),
        );
        let _watcher = spawn_watcher(Arc::clone(&cp)).unwrap();
        cp.reload().await.unwrap();
        let reloads = || {
            cp.metrics()
                .policy_reloads_total
                .with_label_values(&["ok"])
                .get()
        };
        assert_eq!(reloads(), 1);
        let node = weft_proto::v1::Node {
            id: "a-1".into(),
            service: "a".into(),
            inbound_address: "127.0.0.2:15006".into(),
            ..Default::default()
        };
        for _ in 0..5 {
            cp.connect(&node).unwrap();
            cp.persist_registry();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Including a state file that looks like a policy.
        std::fs::write(state.join("x.yaml"), "not: [a policy").unwrap();
        assert!(state.join(crate::persist::REGISTRY_FILE).exists());
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert_eq!(reloads(), 1, "state writes reloaded the policies");
        assert_eq!(cp.store().read_files().unwrap().len(), 1, "only a.yaml");
        assert_eq!(cp.policy_error(), None);

        // A policy change still reloads.
        std::fs::write(dir.path().join("b.yaml"), "services: [{name: b}]\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while reloads() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no reload");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
