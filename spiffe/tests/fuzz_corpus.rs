//! Replays the `spiffe_id` fuzz corpus and its minimized crashes (`fuzz/corpus/spiffe_id/`,
//! `fuzz/regressions/spiffe_id/`) through [`weft_spiffe::fuzzing::parse_never_panics`], on the
//! stable toolchain.
//!
//! `write_seeds` (ignored) regenerates the seeds:
//! `cargo test -p weft-spiffe --test fuzz_corpus -- --ignored write_seeds`.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use weft_spiffe::fuzzing::parse_never_panics;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every input of `target`: its seed corpus (which must not be empty) and its regressions.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
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

#[test]
fn spiffe_id_corpus() {
    let failed: Vec<String> = inputs("spiffe_id")
        .into_iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| parse_never_panics(data))).is_err())
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "spiffe_id: panicked on {failed:#?}");
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_seeds() {
    let dir = fuzz_dir().join("corpus/spiffe_id");
    fs::create_dir_all(&dir).unwrap();
    for (name, id) in [
        ("workload", "spiffe://cluster.local/ns/default/sa/web"),
        ("admin", "spiffe://cluster.local/weft-admin/write/alice"),
        ("trust-domain-only", "spiffe://example.org"),
        ("odd-chars", "spiffe://a-b_c.d/x.y/-_/Z9"),
        ("dot-segments", "spiffe://td/ns/./sa/.."),
        ("upper-case-td", "SPIFFE://TD/ns/a/sa/b"),
        ("percent-and-query", "spiffe://td/a%2Fb?q#f"),
        ("port-and-userinfo", "spiffe://user@td:443/ns/x/sa/y"),
        ("multibyte", "spiffe://td/ns/é/sa/ü"),
    ] {
        fs::write(dir.join(name), id).unwrap();
    }
}
