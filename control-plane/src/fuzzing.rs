//! Fuzz entry points (the `fuzz/` targets call these), kept in the library so the seed corpora
//! and the minimized crashes replay in the normal test suite (`tests/fuzz_corpus.rs`).
//!
//! Each function takes arbitrary bytes and panics only when an invariant is broken: errors and
//! rejections are fine.

use std::time::Duration;

use weft_proto::v1::Node;

use crate::compile::{compile, TrustBundle};
use crate::policy::{PolicySet, SourceFile};
use crate::registry::Registry;

/// Separates the policy files of one fuzz input.
pub const FILE_SEPARATOR: u8 = 0;

/// Splits `data` into up to 3 policy files on [`FILE_SEPARATOR`] (lossy UTF-8), parses and
/// validates them as one set, and when that succeeds compiles the set for a proxy of its first
/// service (empty registry, default trust bundle), twice: compilation must be deterministic.
pub fn policy(data: &[u8]) {
    let files = data
        .splitn(3, |&b| b == FILE_SEPARATOR)
        .enumerate()
        .map(|(i, content)| SourceFile {
            name: format!("{i}.yaml"),
            content: String::from_utf8_lossy(content).into_owned(),
        })
        .collect();
    let set = match PolicySet::from_files(files) {
        Ok(set) => set,
        Err(e) => {
            assert!(!e.0.is_empty(), "rejected without a reason");
            let _ = e.to_string();
            return;
        }
    };
    let Some(service) = set.services().first() else {
        return;
    };
    let node = Node {
        id: format!("{}-fuzz", service.name),
        service: service.name.clone(),
        namespace: service.namespace.clone(),
        inbound_address: "127.0.0.2:15006".into(),
        outbound_address: "127.0.0.2:15001".into(),
        app_address: "127.0.0.2:8080".into(),
        tcp_bind_ip: "127.0.0.2".into(),
        ..Node::default()
    };
    let registry = Registry::new(Duration::from_secs(5));
    let trust = TrustBundle::default();
    let first = compile(&set, &registry, &trust, &node);
    let again = compile(&set, &registry, &trust, &node);
    assert!(first == again, "compilation is not deterministic");
}
