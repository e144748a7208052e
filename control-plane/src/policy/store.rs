//! The policy directory of the file store ([`crate::store::file`]): `*.yaml` / `*.yml` files.
//!
//! Writes are atomic (temporary file + rename) so a reader (the watcher, a restart) never sees
//! a half-written file. Hidden files (`.name`) are ignored, which also hides our temporaries
//! and editors' lock/swap files.

use std::io;
use std::path::{Path, PathBuf};

use super::SourceFile;

pub use crate::store::StoreError;

/// Whether `name` may name a policy file in the store.
pub fn is_valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['/', '\\', '\0'])
        && !name.contains("..")
        && !name.starts_with('.')
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
        && name.len() > ".yml".len()
}

/// A policy directory.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    dir: PathBuf,
}

impl PolicyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Every policy file in the directory, sorted by name.
    pub fn read_files(&self) -> Result<Vec<SourceFile>, StoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(Self::io_error(&self.dir))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Self::io_error(&self.dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !is_valid_file_name(&name) {
                continue;
            }
            let path = entry.path();
            // Follow symlinks (ConfigMap mounts are symlinks) but skip directories.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    // Refused before it is read into memory.
                    if m.len() > super::MAX_FILE_BYTES as u64 {
                        return Err(StoreError::TooLarge {
                            path,
                            size: m.len(),
                        });
                    }
                }
                _ => continue,
            }
            let content = match std::fs::read_to_string(&path) {
                Ok(c) => c,
                // Removed between listing and reading: a later watch event reloads again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Io { path, source }),
            };
            files.push(SourceFile { name, content });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// Writes `name` atomically.
    pub fn write(&self, name: &str, content: &str) -> Result<(), StoreError> {
        if !is_valid_file_name(name) {
            return Err(StoreError::InvalidName(name.to_owned()));
        }
        let tmp = self
            .dir
            .join(format!(".{name}.tmp-{}", rand::random::<u32>()));
        let target = self.dir.join(name);
        std::fs::write(&tmp, content).map_err(Self::io_error(&tmp))?;
        if let Err(source) = std::fs::rename(&tmp, &target) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::Io {
                path: target,
                source,
            });
        }
        Ok(())
    }

    /// Removes `name`.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        if !is_valid_file_name(name) {
            return Err(StoreError::InvalidName(name.to_owned()));
        }
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(name.to_owned()))
            }
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert!(is_valid_file_name("a.yaml"));
        assert!(is_valid_file_name("10-routes.yml"));
        for bad in [
            "",
            ".yaml",
            "a/b.yaml",
            "../a.yaml",
            "a..yaml",
            ".a.yaml",
            "a.json",
            "a",
        ] {
            assert!(!is_valid_file_name(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path());
        store.write("b.yaml", "routes: []\n").unwrap();
        store.write("a.yml", "services: []\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "x").unwrap();
        let files = store.read_files().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.yml", "b.yaml"]);
        store.remove("a.yml").unwrap();
        assert!(matches!(
            store.remove("a.yml"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.write("../x.yaml", ""),
            Err(StoreError::InvalidName(_))
        ));
        assert_eq!(store.read_files().unwrap().len(), 1);
    }
}
