//! Watches the policy directory and reloads the policy set on change.
//!
//! Any create/modify/remove/rename of a policy file in the directory schedules one full reload
//! after a short quiet period, so a burst of events (an editor's write-temp-then-rename, a `cp`
//! of many files) costs one reload. Access events are ignored: reading the files ourselves
//! would otherwise retrigger the watcher forever.

use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::policy::store::is_valid_file_name;
use crate::state::ControlPlane;

/// Quiet period before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

fn is_relevant(event: &notify::Event) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    // No paths: the backend lost track (queue overflow); reload to be safe.
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_valid_file_name)
        })
}

/// Starts watching the store directory; the returned watcher must be kept alive.
pub fn spawn_watcher(cp: Arc<ControlPlane>) -> notify::Result<RecommendedWatcher> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if is_relevant(&event) => {
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
