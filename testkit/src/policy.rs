//! Policy directories the control plane watches, written atomically (temp file + rename) so the
//! watcher never reads a half-written file.

use std::fs;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically: a hidden `.tmp` sibling (which the control plane
/// ignores: it reads only `*.yaml`/`*.yml`), then a rename over `path`.
pub fn write_file_atomic(path: &Path, contents: &str) {
    let dir = path
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", path.display()));
    let file_name = path
        .file_name()
        .unwrap_or_else(|| panic!("{} has no file name", path.display()))
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), path.display()));
}

/// A temporary policy directory, removed on drop.
#[derive(Debug)]
pub struct PolicyDir {
    dir: tempfile::TempDir,
}

impl PolicyDir {
    /// An empty directory.
    pub fn new() -> PolicyDir {
        let dir = tempfile::Builder::new()
            .prefix("weft-policies-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a policy dir: {e}"));
        PolicyDir { dir }
    }

    /// A directory holding one file, `name`, with `yaml`.
    pub fn with_file(name: &str, yaml: &str) -> PolicyDir {
        let dir = PolicyDir::new();
        dir.write(name, yaml);
        dir
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path of file `name` in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates or replaces file `name` atomically.
    pub fn write(&self, name: &str, yaml: &str) {
        write_file_atomic(&self.file(name), yaml);
    }

    /// Removes file `name`.
    pub fn remove(&self, name: &str) {
        let path = self.file(name);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("cannot remove {}: {e}", path.display()));
    }

    /// Reads file `name`.
    pub fn read(&self, name: &str) -> String {
        let path = self.file(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }
}

impl Default for PolicyDir {
    fn default() -> Self {
        PolicyDir::new()
    }
}
