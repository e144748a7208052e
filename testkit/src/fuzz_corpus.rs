//! The fuzz targets' seed corpora and minimized crashes (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`), replayed on the stable toolchain by each crate's
//! `tests/fuzz_corpus.rs` through the same entry points the fuzz targets call.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The repository's `fuzz/` directory.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every input of `target`: its seed corpus (which must not be empty) and its regressions,
/// sorted by path.
pub fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_file() && !name.starts_with('.') && name != "README.md" {
                let data = fs::read(&path).unwrap();
                out.push((path, data));
            }
        }
    }
    out.sort();
    assert!(out
        .iter()
        .any(|(p, _)| p.starts_with(fuzz_dir().join("corpus"))));
    out
}

/// Runs `f` on every input of `target`, naming each one that panics.
pub fn replay(target: &str, f: impl Fn(&[u8])) {
    let failed: Vec<String> = inputs(target)
        .into_iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| f(data))).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: panicked on {failed:#?}");
}
