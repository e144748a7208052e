//! Replays the fuzz corpora and their minimized crashes (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) of the proxy's fuzz targets through their entry points
//! (`weft_proxy::fuzzing`), on the stable toolchain.
//!
//! `write_seeds` (ignored) regenerates the seeds of `detect` and `normalize_path`:
//! `cargo test -p weft-proxy --test fuzz_corpus -- --ignored write_seeds`
//! (`snapshot_from_proto`'s come from the control plane's compiler: see
//! `control-plane/tests/fuzz_corpus.rs`).

use std::fs;
use std::sync::Arc;

use prost::Message;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use weft_proto::v1::DiscoveryResponse;
use weft_proxy::detect::{classify, Detection, H2_PREFACE};
use weft_proxy::fuzzing;
use weft_proxy::metrics::Metrics;
use weft_proxy::snapshot::{nack_reason, Resources, Snapshot};
use weft_testkit::fuzz_corpus::{fuzz_dir, inputs, replay};

#[test]
fn detect_corpus() {
    replay("detect", fuzzing::detect);
}

#[test]
fn normalize_path_corpus() {
    replay("normalize_path", fuzzing::normalize);
}

#[test]
fn snapshot_from_proto_corpus() {
    replay("snapshot_from_proto", fuzzing::snapshot);
}

/// The seeds the control plane compiled are accepted: the fuzzer starts from valid snapshots.
#[test]
fn compiled_snapshot_seeds_are_accepted() {
    let metrics = Metrics::new().unwrap();
    let compiled: Vec<_> = inputs("snapshot_from_proto")
        .into_iter()
        .filter(|(p, _)| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("compiled-"))
        })
        .collect();
    assert!(!compiled.is_empty());
    for (path, data) in compiled {
        let resp = DiscoveryResponse::decode(&data[..]).unwrap();
        let resources = Resources::default().merge(&resp);
        if let Err(e) = Snapshot::build(resources, None, &metrics) {
            panic!("{}: {}", path.display(), nack_reason(&e));
        }
    }
}

/// The detect seeds classify as their names say.
#[test]
fn detect_seeds_classify_as_named() {
    for (path, data) in inputs("detect") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let expected = match name.split('-').next().unwrap() {
            "tls" => match classify(&data) {
                Detection::Tls { .. } => continue,
                other => panic!("{name}: {other:?}"),
            },
            "h2" => Detection::Http2,
            "http1" => Detection::Http1,
            "opaque" => Detection::Opaque,
            _ => continue,
        };
        assert_eq!(classify(&data), expected, "{name}");
    }
}

fn client_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

/// Regenerates the seeds of `detect` (named `<kind>-...` as `detect_seeds_classify_as_named`
/// checks) and `normalize_path` (first byte: options, see `fuzz_normalize`).
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_seeds() {
    write(
        "detect",
        "tls-client-hello-sni",
        &client_hello("api.example.com", &[b"h2", b"http/1.1"]),
    );
    write(
        "detect",
        "tls-client-hello-ip",
        &client_hello("10.1.2.3", &[]),
    );
    write(
        "detect",
        "http1-curl-get",
        b"GET /api/items?id=1 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    );
    write(
        "detect",
        "http1-absolute-form",
        b"PROPFIND http://api.example.com/dav/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    );
    write(
        "detect",
        "http1-connect",
        b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n",
    );
    let mut h2 = H2_PREFACE.to_vec();
    h2.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
    write("detect", "h2-preface-settings", &h2);
    write(
        "detect",
        "opaque-ssh",
        b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n",
    );
    write(
        "detect",
        "opaque-mysql-greeting",
        b"\x4a\x00\x00\x00\x0a8.0.36\x00\x08\x00\x00\x00\x3b\x2f\x61\x16\x1b\x5c\x1e\x63\x00\xff\xff\xff\x02\x00\xff\xdf\x15\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x12\x4c\x30\x4b\x44\x7a\x41\x54\x55\x69\x42\x4d\x00caching_sha2_password\x00",
    );

    for (name, data) in [
        ("reject-dots", &b"\x00/a/./b/../c?x=/../y"[..]),
        ("redirect-escaped-slash", b"\x01/a%2fb/%2E%2e/c"),
        ("keep-backslash", b"\x02/a\\b/%5c/d"),
        ("no-merge-slashes", b"\x80//a///b//"),
        ("unreserved-escapes", b"\x00/%7euser/%41%62c/%e2%82%ac"),
        ("absolute-form", b"\x00http://h/a/../b"),
    ] {
        write("normalize_path", name, data);
    }
}
