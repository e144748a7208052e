//! Handshakes between two [`MeshTls`] contexts over in-memory pipes.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::spiffe::SpiffeId;
use super::testing::TestCa;
use super::trust::TrustBundle;
use super::*;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn mesh(ca: &TestCa, id: &str) -> Arc<MeshTls> {
    let tls = MeshTls::new(SecurityMetrics::unregistered()).unwrap();
    tls.trust().set_discovery(&ca.bundle());
    tls.certs().install(ca.leaf(id, 3600).issued());
    Arc::new(tls)
}

type Pair = (
    std::io::Result<Accepted<DuplexStream>>,
    std::io::Result<client::TlsStream<DuplexStream>>,
);

async fn handshake(server: &MeshTls, client: &MeshTls, expected: &str, alpn: Alpn) -> Pair {
    let (a, b) = duplex(64 * 1024);
    let expected = SpiffeId::parse(expected).unwrap();
    let (s, c) = tokio::join!(server.accept(a), client.connect(b, IP, &expected, alpn));
    (s, c)
}

/// Under TLS 1.3 the server's verdict on the client cert arrives after the client's handshake
/// completes: exchange a byte to see it.
async fn exchange(pair: Pair) -> Result<SpiffeId, String> {
    let (s, c) = pair;
    let mut c = c.map_err(|e| format!("client: {e}"))?;
    let mut s = s.map_err(|e| format!("server: {e}"))?;
    c.write_all(b"x").await.map_err(|e| e.to_string())?;
    c.flush().await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1];
    s.stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    Ok(s.peer)
}

#[tokio::test]
async fn mutual_auth_records_the_client_identity_and_alpn() {
    let ca = TestCa::new("cluster.local");
    let (server, client) = (mesh(&ca, WEB), mesh(&ca, CLIENT));
    let (s, c) = handshake(&server, &client, WEB, Alpn::H2).await;
    let (s, c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.peer.as_str(), CLIENT);
    assert!(s.h2);
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(
        c.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        "sidecars prefer AES-128-GCM"
    );
    let (s, _c) = handshake(&server, &client, WEB, Alpn::Http1).await;
    assert!(!s.unwrap().h2);
    assert_eq!(server.handshakes.inbound_ok.get(), 2);
    assert_eq!(client.handshakes.outbound_ok.get(), 2);
}

#[tokio::test]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let ca = TestCa::new("cluster.local");
    let (server, client) = (mesh(&ca, WEB), mesh(&ca, CLIENT));
    let (_s, c) = handshake(
        &server,
        &client,
        "spiffe://cluster.local/ns/default/sa/db",
        Alpn::Http1,
    )
    .await;
    let e = c.unwrap_err().to_string();
    assert!(e.contains("WrongIdentity"), "{e}");
    assert_eq!(client.handshakes.outbound_err.get(), 1);
}

#[tokio::test]
async fn server_refuses_a_client_from_another_trust_domain() {
    let ca = TestCa::new("cluster.local");
    let other = TestCa::new("evil.example");
    let server = mesh(&ca, WEB);
    let client = mesh(&other, "spiffe://evil.example/ns/default/sa/client");
    // The client trusts our root so that only the server's verdict is tested.
    client.trust().set_discovery(&ca.bundle());
    let r = exchange(handshake(&server, &client, WEB, Alpn::Http1).await).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(server.handshakes.inbound_err.get(), 1);
}

#[tokio::test]
async fn server_refuses_a_foreign_domain_id_even_from_a_trusted_root() {
    let ca = TestCa::new("cluster.local");
    let server = mesh(&ca, WEB);
    let client = mesh(&ca, "spiffe://elsewhere/ns/default/sa/client");
    let r = exchange(handshake(&server, &client, WEB, Alpn::Http1).await).await;
    assert!(r.unwrap_err().contains("server"));
}

#[tokio::test]
async fn server_refuses_an_expired_client_certificate() {
    let ca = TestCa::new("cluster.local");
    let server = mesh(&ca, WEB);
    let client = mesh(&ca, CLIENT);
    let now = time::OffsetDateTime::now_utc();
    let expired = ca.leaf_between(
        CLIENT,
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    );
    client.certs().install(expired.issued());
    let r = exchange(handshake(&server, &client, WEB, Alpn::Http1).await).await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ca = TestCa::new("cluster.local");
    let server = mesh(&ca, WEB);
    let client = MeshTls::new(SecurityMetrics::unregistered()).unwrap();
    client.trust().set_discovery(&ca.bundle());
    let r = exchange(handshake(&server, &client, WEB, Alpn::Http1).await).await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn rotation_affects_new_handshakes_only() {
    let ca = TestCa::new("cluster.local");
    let (server, client) = (mesh(&ca, WEB), mesh(&ca, CLIENT));
    let (s, c) = handshake(&server, &client, WEB, Alpn::Http1).await;
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    let first = c.get_ref().1.peer_certificates().unwrap()[0].clone();

    server.certs().install(ca.leaf(WEB, 3600).issued());
    // The open connection keeps working.
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // A new one sees the new certificate.
    let (_s2, c2) = handshake(&server, &client, WEB, Alpn::Http1).await;
    let second = c2.unwrap().get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first, second);
}

#[tokio::test]
async fn root_rotation_with_overlap_then_removal() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::new("cluster.local");
    let server = mesh(&old, WEB);
    let client = mesh(&new, CLIENT);
    let both = TrustBundle::from_pem("cluster.local", &[old.root_pem(), new.root_pem()]).unwrap();
    server.trust().set_discovery(&both);
    client.trust().set_discovery(&both);
    // Overlap: a client certified by the new root and a server by the old one talk.
    let r = exchange(handshake(&server, &client, WEB, Alpn::Http1).await).await;
    assert_eq!(r.unwrap().as_str(), CLIENT);
    // The old root is withdrawn: the server's old-root certificate no longer verifies.
    client.trust().set_discovery(&new.bundle());
    let (_s, c) = handshake(&server, &client, WEB, Alpn::Http1).await;
    assert!(c.is_err());
    // Until the server is re-certified by the new root.
    server.certs().install(new.leaf(WEB, 3600).issued());
    let r = exchange(handshake(&server, &client, WEB, Alpn::Http1).await).await;
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn detects_client_hello() {
    assert!(looks_like_tls(&[0x16, 0x03, 0x01, 0x02]));
    assert!(looks_like_tls(&[0x16]));
    assert!(!looks_like_tls(b"GET / HTTP/1.1"));
    assert!(!looks_like_tls(b"PRI * HTTP/2.0"));
    assert!(!looks_like_tls(&[0x16, 0x41]));
    assert!(!looks_like_tls(&[]));
}
