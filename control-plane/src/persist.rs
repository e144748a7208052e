//! The state file: the registry of sidecar endpoints, persisted so a restarted control plane
//! serves the endpoints the proxies hold instead of starting empty.
//!
//! `<state dir>/registry.json` (default state dir: `<policies>/.weft-state`, a dot-directory the
//! policy loader and watcher ignore) is rewritten atomically (temporary file + fsync + rename)
//! after registry changes, off the request path and at most every
//! [`crate::store::file::WRITE_INTERVAL`] (changes in between coalesce into one write): the file
//! backend's half of [`crate::store::Store`]. At start the registrations it holds come back
//! as disconnected within the restart grace (see [`crate::registry::Registry::restore`]). A
//! missing file is an empty registry; an unreadable or corrupt one is logged (naming the file)
//! and ignored (it is overwritten by the next write).

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::registry::PersistedProxy;

/// Name of the default state directory inside the policy directory.
pub const DEFAULT_STATE_DIR_NAME: &str = ".weft-state";

/// The registry's file in the state directory.
pub const REGISTRY_FILE: &str = "registry.json";

/// Format version of `registry.json`.
const FORMAT: u32 = 1;

/// `<policies>/.weft-state`.
pub fn default_state_dir(policies: &Path) -> PathBuf {
    policies.join(DEFAULT_STATE_DIR_NAME)
}

/// Errors reading or writing the state file; they name the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a registry state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unsupported format {format} (this control plane reads format {FORMAT})")]
    Format { path: PathBuf, format: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
struct RegistryFile {
    format: u32,
    /// Unix milliseconds (informational).
    #[serde(default)]
    saved_at_unix_ms: u64,
    proxies: Vec<PersistedProxy>,
}

/// Reads `<dir>/registry.json`: `Ok(empty)` when it does not exist.
pub fn load_registry(dir: &Path) -> Result<Vec<PersistedProxy>, StateError> {
    let path = dir.join(REGISTRY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let file: RegistryFile =
        serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
    if file.format != FORMAT {
        return Err(StateError::Format {
            path,
            format: file.format,
        });
    }
    Ok(file.proxies)
}

/// Writes `<dir>/registry.json` atomically (creating `dir`).
pub fn save_registry(dir: &Path, proxies: &[PersistedProxy]) -> Result<(), StateError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let file = RegistryFile {
        format: FORMAT,
        saved_at_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        proxies: proxies.to_vec(),
    };
    let mut json = serde_json::to_vec_pretty(&file).expect("the registry serializes");
    json.push(b'\n');
    let target = dir.join(REGISTRY_FILE);
    let tmp = dir.join(format!(
        ".{REGISTRY_FILE}.tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(StateError::Io { path: tmp, source });
    }
    if let Err(source) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(StateError::Io {
            path: target,
            source,
        });
    }
    // Make the rename durable too (best effort: not every platform can open a directory).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The state directory of one control plane: writes are serialized, so the file always holds
/// the newest snapshot, and stop after [`StateStore::close`].
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    writer: Mutex<Writer>,
}

#[derive(Debug, Default)]
struct Writer {
    closed: bool,
    /// The last write error, logged once until a write succeeds or the error changes.
    failing: Option<String>,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            writer: Mutex::new(Writer::default()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the persisted registry; a corrupt or unreadable file is logged and ignored.
    pub fn load(&self) -> Vec<PersistedProxy> {
        match load_registry(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(
                    "ignoring the registry state file (starting with an empty registry; it is \
                     overwritten on the next registry change): {e}"
                );
                Vec::new()
            }
        }
    }

    /// Writes the registry `snapshot` returns, unless closed. The snapshot is taken under the
    /// write lock, so concurrent writers can't leave an older snapshot on disk.
    pub fn write(&self, snapshot: impl FnOnce() -> Vec<PersistedProxy>) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.closed {
            return;
        }
        match save_registry(&self.dir, &snapshot()) {
            Ok(()) => {
                if w.failing.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "registry state written again");
                }
            }
            Err(e) => {
                let message = e.to_string();
                if w.failing.as_deref() != Some(message.as_str()) {
                    tracing::warn!(
                        "cannot persist the registry (a restart would start with an empty \
                         one): {message}"
                    );
                    w.failing = Some(message);
                }
            }
        }
    }

    /// Writes `snapshot` a last time and stops writing (shutdown: streams ending afterwards
    /// must not persist their proxies as disconnected).
    pub fn close(&self, snapshot: impl FnOnce() -> Vec<PersistedProxy>) {
        self.write(snapshot);
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, service: &str, addr: &str) -> PersistedProxy {
        PersistedProxy {
            id: id.into(),
            service: service.into(),
            namespace: "default".into(),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            inbound_address: addr.into(),
            outbound_address: "127.0.0.1:15001".into(),
            app_address: "127.0.0.1:8080".into(),
            tcp_bind_ip: "127.0.0.1".into(),
            build_version: "0.1.0".into(),
            instance_ip: "10.0.0.2".into(),
            app_ports: vec![8080, 9090],
            connected_since_unix_ms: 1_700_000_000_000,
            remove_at_unix_ms: None,
            log_level: None,
            replica: None,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join(".weft-state");
        assert_eq!(load_registry(&state).unwrap(), [], "no file: empty");
        let mut b = entry("b-1", "b", "127.0.0.3:15006");
        b.remove_at_unix_ms = Some(1_700_000_005_000);
        let entries = vec![entry("a-1", "a", "127.0.0.2:15006"), b];
        save_registry(&state, &entries).unwrap();
        assert_eq!(load_registry(&state).unwrap(), entries);
        // Rewritten in place; no temporaries left behind.
        save_registry(&state, &entries[..1]).unwrap();
        assert_eq!(load_registry(&state).unwrap(), entries[..1]);
        let names: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [REGISTRY_FILE]);
    }

    #[test]
    fn corrupt_or_foreign_files_are_errors_naming_the_file_and_load_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REGISTRY_FILE);
        for content in ["{\"format\": 1, \"proxies\": [{\"id\": ", "not json", "[]"] {
            std::fs::write(&path, content).unwrap();
            let err = load_registry(dir.path()).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(StateStore::new(dir.path()).load().is_empty());
        }
        std::fs::write(&path, "{\"format\": 99, \"proxies\": []}").unwrap();
        let err = load_registry(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unsupported format 99"), "{err}");
        assert!(StateStore::new(dir.path()).load().is_empty());

        // The next write replaces it.
        let store = StateStore::new(dir.path());
        store.write(|| vec![entry("a-1", "a", "127.0.0.2:15006")]);
        assert_eq!(store.load().len(), 1);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(REGISTRY_FILE),
            r#"{"format": 1, "future": true, "proxies": [{"id": "a-1", "service": "a",
                "namespace": "default", "inbound_address": "127.0.0.2:15006", "new": 1}]}"#,
        )
        .unwrap();
        let loaded = load_registry(dir.path()).unwrap();
        assert_eq!(loaded[0].id, "a-1");
        assert_eq!(loaded[0].remove_at_unix_ms, None);
    }

    #[test]
    fn an_unwritable_dir_is_not_fatal_and_close_stops_writing() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the state directory should be.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, "").unwrap();
        let store = StateStore::new(&blocked);
        store.write(|| vec![entry("a-1", "a", "127.0.0.2:15006")]);
        store.write(Vec::new);

        let store = StateStore::new(dir.path().join("s"));
        store.close(|| vec![entry("a-1", "a", "127.0.0.2:15006")]);
        store.write(Vec::new);
        assert_eq!(store.load().len(), 1, "nothing written after close");
    }
}
