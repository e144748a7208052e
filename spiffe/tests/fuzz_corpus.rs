//! Replays the `spiffe_id` fuzz corpus and its minimized crashes (`fuzz/corpus/spiffe_id/`,
//! `fuzz/regressions/spiffe_id/`) through [`weft_spiffe::fuzzing::parse_never_panics`], on the
//! stable toolchain.
//!
//! `write_seeds` (ignored) regenerates the seeds:
//! `cargo test -p weft-spiffe --test fuzz_corpus -- --ignored write_seeds`.

use std::fs;

use weft_spiffe::fuzzing::parse_never_panics;
use weft_testkit::fuzz_corpus::{fuzz_dir, replay};

#[test]
fn spiffe_id_corpus() {
    replay("spiffe_id", parse_never_panics);
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
