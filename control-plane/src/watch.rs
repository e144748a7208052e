//! Reloads the policy set when the store reports a change ([`crate::store::Store::watch_policies`]:
//! inotify on the directory, an etcd watch).
//!
//! Changes schedule one full reload after a short quiet period, so a burst (an editor's
//! write-temp-then-rename, a `cp` of many files, a multi-file apply) costs one reload. A
//! ConfigMap volume reports only the kubelet's swap of `..data` (see [`crate::store::file`]):
//! one reload per update, of the whole new version.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::state::ControlPlane;
use crate::store::{StoreError, WatchGuard};

/// Quiet period before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Starts watching the store; the returned guard must be kept alive.
pub fn spawn_watcher(cp: Arc<ControlPlane>) -> Result<WatchGuard, StoreError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let guard = cp.store().watch_policies(tx)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            tracing::debug!("the policy store changed; reloading");
            // Errors are logged and recorded by reload itself.
            let _ = cp.reload().await;
        }
    });
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileStore, RegistryHost, SharedStore};

    #[tokio::test]
    async fn state_writes_never_reload_policies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "services: [{name: a}]\n").unwrap();
        let store = Arc::new(FileStore::in_dir(dir.path()));
        let state = store.state_dir().to_owned();
        let cp = Arc::new(ControlPlane::new(
            Arc::clone(&store) as SharedStore,
            Duration::from_secs(5),
            crate::metrics::Metrics::new().unwrap(),
        ));
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
            store.persist(&*cp as &dyn RegistryHost);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Including a state file that looks like a policy.
        std::fs::write(state.join("x.yaml"), "not: [a policy").unwrap();
        assert!(state.join(crate::persist::REGISTRY_FILE).exists());
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert_eq!(reloads(), 1, "state writes reloaded the policies");
        assert_eq!(
            cp.store().read_policies().await.unwrap().files.len(),
            1,
            "only a.yaml"
        );
        assert_eq!(cp.policy_error(), None);

        // A policy change still reloads.
        std::fs::write(dir.path().join("b.yaml"), "services: [{name: b}]\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while reloads() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no reload");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every update of a ConfigMap volume, written as the kubelet writes it, is one reload
    /// that serves exactly the new version: a changed file, a key added, a key removed.
    #[tokio::test]
    async fn each_configmap_update_is_one_reload_of_the_whole_version() {
        use crate::store::file::atomic_writer::AtomicWriter;
        let dir = tempfile::tempdir().unwrap();
        let writer = AtomicWriter::new(dir.path());
        let version = |files: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            files
                .iter()
                .map(|(n, c)| ((*n).to_owned(), (*c).to_owned()))
                .collect()
        };
        writer
            .write(&version(&[("a.yaml", "services: [{name: a}]\n")]))
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path(), state.path()));
        let cp = Arc::new(ControlPlane::new(
            store as SharedStore,
            Duration::from_secs(5),
            crate::metrics::Metrics::new().unwrap(),
        ));
        let _watcher = spawn_watcher(Arc::clone(&cp)).unwrap();
        cp.reload().await.unwrap();
        let reloads = || {
            cp.metrics()
                .policy_reloads_total
                .with_label_values(&["ok"])
                .get()
        };
        let services = || -> Vec<String> {
            cp.policy()
                .services()
                .iter()
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(services(), ["a"]);
        let updates: [&[(&str, &str)]; 3] = [
            &[("a.yaml", "services: [{name: a}, {name: a2}]\n")],
            &[
                ("a.yaml", "services: [{name: a}, {name: a2}]\n"),
                ("b.yaml", "services: [{name: b}]\n"),
            ],
            &[("b.yaml", "services: [{name: b}, {name: b2}]\n")],
        ];
        let expected: [&[&str]; 3] = [&["a", "a2"], &["a", "a2", "b"], &["b", "b2"]];
        for (i, (update, expected)) in updates.iter().zip(expected).enumerate() {
            let before = reloads();
            writer.write(&version(update)).unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while reloads() == before {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "update {i} was never reloaded"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Quiet for several debounce periods: no second reload of the same update.
            tokio::time::sleep(DEBOUNCE * 4).await;
            assert_eq!(reloads(), before + 1, "update {i}: reloads");
            assert_eq!(services(), expected, "update {i}");
            assert_eq!(cp.policy_error(), None);
        }
    }
}
