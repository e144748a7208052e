//! A set's version ([`super::version_of`]: FNV-1a 64 over the sorted file names and contents)
//! without hashing again the files it shares with the set in force.
//!
//! FNV-1a is a running state over the bytes, so the state after the first `k` files depends on
//! those files alone: a set keeps the state after each of its files, and a new set whose first
//! `k` files (sorted by name) are the previous set's, same names and contents, resumes from the
//! previous state after file `k` and hashes only the rest. The version is exactly the one a
//! hash from scratch gives (a proxy reconnecting to a restarted control plane sees the same).

use crate::hash::StableHasher;

use super::SourceFile;

/// The version of `files` (sorted by name) and the hash state after each file. `shared`: how
/// many of the first files are, in order, those of the set whose states are `previous`.
pub(super) fn versions(
    files: &[SourceFile],
    shared: usize,
    previous: &[StableHasher],
) -> (String, Vec<StableHasher>) {
    let shared = shared.min(previous.len()).min(files.len());
    let mut states = Vec::with_capacity(files.len());
    states.extend_from_slice(&previous[..shared]);
    let mut h = states.last().copied().unwrap_or_default();
    for f in &files[shared..] {
        hash_file(&mut h, f);
        states.push(h);
    }
    (h.finish_hex(), states)
}

/// What one file adds to a version: its name, then its content.
pub(super) fn hash_file(h: &mut StableHasher, f: &SourceFile) {
    h.write_field(f.name.as_bytes());
    h.write_field(f.content.as_bytes());
}
