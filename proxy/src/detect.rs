//! Protocol detection: what a connection's first bytes are, before anything is consumed.
//!
//! This module owns one pure function, [`classify`], from the bytes peeked at the start of a
//! connection to a [`Detection`]: a TLS handshake (with the ClientHello's SNI when the hello is
//! complete), the HTTP/2 prior-knowledge preface, an HTTP/1 request line, or opaque bytes. It does
//! no I/O and keeps no state, so the caller decides how long to wait and how much to peek: peek,
//! classify, and on [`Detection::NeedMore`] peek again with more bytes (or give up on a timeout).
//! The inbound mTLS decision ([`crate::tls::inbound::detect`]) is made here; a transparent
//! proxy that routes by SNI or by protocol builds on the same function.
//!
//! Why a separate module: the first bytes of a connection are the most hostile input the proxy
//! parses (anyone who can open a socket chooses them), so the parsing lives in one small,
//! fuzzed function (`fuzz/`, target `detect`) rather than spread over the accept paths.
//!
//! # Rules
//!
//! Only the first [`MAX_DETECT_BYTES`] bytes are considered; [`classify`] never answers
//! [`Detection::NeedMore`] for an input that long, so a peek buffer of that size always
//! ends detection.
//!
//! - **TLS**: a handshake record (content type 22) with a legacy record version `3.x` (the check
//!   rustls' record layer makes). `0x16` alone, or `0x16 0x03` with an incomplete record, is
//!   [`Detection::NeedMore`]: the SNI is not known yet. Once the first record is complete the
//!   records are handed to rustls' own ClientHello parser ([`rustls::server::Acceptor`]; no TLS
//!   parsing is written here), and the answer is final: `Tls { sni: Some(name) }` for a hello
//!   with a host name, `Tls { sni: None }` for one without (clients send none for an IP
//!   address), for a hello rustls rejects, and for a hello that would not fit in
//!   [`MAX_DETECT_BYTES`]. So `Tls { .. }` is only returned when nothing more will change it,
//!   and a caller that only needs "TLS or not" may decide on `0x16 0x03` already (see
//!   [`is_tls_prefix`]).
//! - **HTTP/2**: the exact prior-knowledge preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`; a proper
//!   prefix of it is [`Detection::NeedMore`]. A `PRI * ...` line that departs from the preface
//!   is an HTTP/1 request line by the rule below (and left to the HTTP/1 server to refuse).
//! - **HTTP/1**: a request line's method and the space after it: one of `GET POST PUT DELETE
//!   HEAD OPTIONS PATCH CONNECT TRACE` followed by `' '` (any request target, so `CONNECT
//!   host:port` counts), or another token of 1 to 16 upper-case ASCII letters followed by `' '`
//!   and a request target starting with `'/'`, `'*'` or a URI scheme and its `':'` (at most 32
//!   scheme characters). A prefix of such a line is [`Detection::NeedMore`], which includes an
//!   empty input and any run of up to 16 upper-case letters.
//! - **Opaque**: anything else, e.g. `SSH-2.0-...` (the `-` ends the token), or a MySQL server
//!   greeting (`0x4a 0x00 ...`).
//!
//! Answers other than [`Detection::NeedMore`] are stable: appending bytes to an input never
//! changes them (the `detect` fuzz target checks it).
//!
//! # Original destination
//!
//! A connection redirected by the capture rules ([`crate::capture`]) arrives at a proxy
//! listener; where the app meant it to go is the conntrack entry's original destination,
//! [`original_destination`] (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST` for IPv6), read through
//! socket2's safe wrappers.

use std::net::SocketAddr;

use rustls::server::Acceptor;

/// The most bytes [`classify`] looks at: one maximal TLS plaintext record (a 2^14-byte
/// fragment and its 5-byte header), so a ClientHello that fits in one record is always parsed.
/// 16 KiB covers far more than any HTTP/1 method or the HTTP/2 preface.
pub const MAX_DETECT_BYTES: usize = TLS_RECORD_HEADER + TLS_MAX_FRAGMENT;

/// A TLS record header: content type, legacy version (2 bytes), length (2 bytes).
const TLS_RECORD_HEADER: usize = 5;
/// The largest TLS plaintext fragment (RFC 8446 5.1, RFC 5246 6.2.1).
const TLS_MAX_FRAGMENT: usize = 16 * 1024;
/// TLS content type `handshake`.
const TLS_HANDSHAKE: u8 = 0x16;
/// The major byte of every TLS/SSLv3 record version.
const TLS_MAJOR: u8 = 0x03;

/// The HTTP/2 client connection preface (RFC 9113 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods recognised with any request target (RFC 9110 9.3, RFC 5789).
const HTTP1_METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
/// The longest method token recognised.
const MAX_METHOD_LEN: usize = 16;
/// The longest URI scheme recognised in an absolute-form request target of another method.
const MAX_SCHEME_LEN: usize = 32;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// A prefix of something recognised: more bytes could decide.
    NeedMore,
    /// A TLS handshake record; `sni` is the complete ClientHello's server name, if any.
    Tls {
        /// The host name of the ClientHello's `server_name` extension.
        sni: Option<String>,
    },
    /// The HTTP/2 prior-knowledge connection preface.
    Http2,
    /// An HTTP/1 request line.
    Http1,
    /// Anything else.
    Opaque,
}

/// Classifies the first bytes of a connection (only the first [`MAX_DETECT_BYTES`] count).
///
/// Allocates only to run rustls' ClientHello parser, once a complete TLS record is present.
pub fn classify(first: &[u8]) -> Detection {
    let first = &first[..first.len().min(MAX_DETECT_BYTES)];
    // The non-TLS rules decide within 50 bytes; `tls` decides at the bound at the latest.
    match first.first() {
        None => Detection::NeedMore,
        Some(&TLS_HANDSHAKE) => tls(first),
        Some(_) if first.starts_with(H2_PREFACE) => Detection::Http2,
        Some(_) if H2_PREFACE.starts_with(first) => Detection::NeedMore,
        Some(_) => http1(first),
    }
}

/// Whether `first` is, or may still become, TLS: `0x16`, or `0x16 0x03` and anything after.
/// Decides on the first 2 bytes, so a 3-byte peek is enough (as the inbound listener does).
pub fn is_tls_prefix(first: &[u8]) -> bool {
    match classify(first) {
        Detection::Tls { .. } => true,
        Detection::NeedMore => first.first() == Some(&TLS_HANDSHAKE),
        _ => false,
    }
}

/// Where a connection accepted on `stream` was addressed before the capture rules redirected
/// it: `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6, by the socket's family). For a
/// connection that was not redirected this is its local address (when conntrack tracks it) or
/// an error (`ENOENT`: no NAT entry), so callers compare with the listener's own address.
pub fn original_destination<S: std::os::fd::AsFd>(stream: &S) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    original
        .as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

fn tls(first: &[u8]) -> Detection {
    match first.get(1) {
        None => return Detection::NeedMore,
        Some(&TLS_MAJOR) => {}
        Some(_) => return Detection::Opaque,
    }
    let no_sni = Detection::Tls { sni: None };
    let Some(header) = first.get(..TLS_RECORD_HEADER) else {
        return Detection::NeedMore;
    };
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len == 0 || len > TLS_MAX_FRAGMENT {
        // rustls refuses such a record: no hello will come out of it.
        return no_sni;
    }
    // Only whole records go to rustls: a partial one is "need more", whatever its contents.
    let mut complete = 0;
    while let Some(h) = first.get(complete..complete + TLS_RECORD_HEADER) {
        let end = complete + TLS_RECORD_HEADER + usize::from(u16::from_be_bytes([h[3], h[4]]));
        if end > first.len() {
            break;
        }
        complete = end;
    }
    if complete == 0 {
        return Detection::NeedMore;
    }
    let mut acceptor = Acceptor::default();
    let mut records = &first[..complete];
    while !records.is_empty() {
        match acceptor.read_tls(&mut records) {
            Ok(0) | Err(_) => return no_sni,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Detection::Tls {
            sni: accepted.client_hello().server_name().map(str::to_owned),
        },
        // The hello continues in a record not received yet.
        Ok(None) if first.len() < MAX_DETECT_BYTES => Detection::NeedMore,
        Ok(None) | Err(_) => no_sni,
    }
}

fn http1(first: &[u8]) -> Detection {
    let token = first
        .iter()
        .take(MAX_METHOD_LEN + 1)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    if token == 0 || token > MAX_METHOD_LEN {
        return Detection::Opaque;
    }
    let Some((&sep, target)) = first[token..].split_first() else {
        return Detection::NeedMore;
    };
    if sep != b' ' {
        return Detection::Opaque;
    }
    if HTTP1_METHODS.contains(&&first[..token]) {
        return Detection::Http1;
    }
    match target.first() {
        None => Detection::NeedMore,
        Some(b'/' | b'*') => Detection::Http1,
        Some(b) if b.is_ascii_alphabetic() => {
            // absolute-form: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then ':'.
            let scheme = target
                .iter()
                .take(MAX_SCHEME_LEN + 1)
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
                .count();
            match target.get(scheme) {
                _ if scheme > MAX_SCHEME_LEN => Detection::Opaque,
                None => Detection::NeedMore,
                Some(b':') => Detection::Http1,
                Some(_) => Detection::Opaque,
            }
        }
        Some(_) => Detection::Opaque,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    /// The first flight of a real rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn tls(sni: Option<&str>) -> Detection {
        Detection::Tls {
            sni: sni.map(str::to_owned),
        }
    }

    #[test]
    fn client_hello_with_sni() {
        let hello = client_hello("api.example.com");
        assert_eq!(classify(&hello), tls(Some("api.example.com")));
        // Bytes after the hello (say, early data) change nothing.
        let mut more = hello;
        more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        assert_eq!(classify(&more), tls(Some("api.example.com")));
    }

    #[test]
    fn partial_client_hello_needs_more() {
        // Decision: the record header alone (or any incomplete record) is NeedMore, not
        // Tls { sni: None }: Tls is final, and the SNI is not known until the record is whole.
        let hello = client_hello("api.example.com");
        for n in [1, 2, 3, 4, 5, 6, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..n]), Detection::NeedMore, "{n} bytes");
            assert!(is_tls_prefix(&hello[..n]));
        }
    }

    #[test]
    fn client_hello_for_an_ip_address_has_no_sni() {
        assert_eq!(classify(&client_hello("10.1.2.3")), tls(None));
        assert_eq!(classify(&client_hello("::1")), tls(None));
    }

    #[test]
    fn hello_split_over_two_records() {
        let hello = client_hello("api.example.com");
        let body = &hello[TLS_RECORD_HEADER..];
        let (a, b) = body.split_at(body.len() / 2);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&hello[..3]);
            split.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            split.extend_from_slice(part);
        }
        let first_record = TLS_RECORD_HEADER + a.len();
        assert_eq!(classify(&split[..first_record]), Detection::NeedMore);
        assert_eq!(classify(&split), tls(Some("api.example.com")));
    }

    #[test]
    fn malformed_tls_is_final_without_sni() {
        // Empty and oversized records, and a complete record that is not a ClientHello.
        assert_eq!(classify(b"\x16\x03\x01\x00\x00"), tls(None));
        assert_eq!(classify(b"\x16\x03\x01\x40\x01"), tls(None));
        assert_eq!(classify(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"), tls(None));
        // A handshake message header cut by the record end may go on in the next record.
        assert_eq!(classify(b"\x16\x03\x01\x00\x01\x01"), Detection::NeedMore);
        // Not a TLS record version.
        assert_eq!(classify(b"\x16\x02\x01\x00\x10"), Detection::Opaque);
        assert_eq!(classify(b"\x16A"), Detection::Opaque);
        // A record announcing more than arrives within the bound ends at the bound.
        let mut long = b"\x16\x03\x01\x40\x00".to_vec();
        long.resize(MAX_DETECT_BYTES - 1, 0);
        assert_eq!(classify(&long), Detection::NeedMore);
    }

    #[test]
    fn http1_request_lines() {
        for line in [
            &b"GET / HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"[..],
            b"GET /",
            b"GET ",
            b"HEAD /healthz HTTP/1.1\r\n",
            b"POST /api/v1/items HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT api.example.com:443 HTTP/1.1\r\n",
            b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n",
            b"GET http://api.example.com/ HTTP/1.1\r\n",
            b"PROPFIND /dav/ HTTP/1.1\r\n",
            b"MKCOL http://h/x HTTP/1.1\r\n",
            b"PURGE * HTTP/1.1\r\n",
            b"PRI * HTTP/1.1\r\n",
        ] {
            assert_eq!(
                classify(line),
                Detection::Http1,
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert!(!is_tls_prefix(line));
        }
    }

    #[test]
    fn http1_prefixes_and_near_misses() {
        for prefix in [
            &b""[..],
            b"G",
            b"GE",
            b"GET",
            b"DELET",
            b"PROPFIND",
            b"FOO ",
            b"FOO ht",
        ] {
            assert_eq!(classify(prefix), Detection::NeedMore, "{prefix:?}");
        }
        for other in [
            &b"get / HTTP/1.1\r\n"[..],
            b"GET\t/",
            b"G3T /",
            b"ABCDEFGHIJKLMNOPQ /",
            b"FOO bar baz",
            b"FOO 1.2.3.4:80",
            b"FOO -/",
            b"FOO aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:",
            b" GET /",
            b"\r\n",
        ] {
            assert_eq!(classify(other), Detection::Opaque, "{other:?}");
        }
        // A 32-character scheme is still one.
        assert_eq!(
            classify(b"FOO aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:"),
            Detection::Http1
        );
    }

    #[test]
    fn h2_preface_and_its_prefixes() {
        assert_eq!(classify(H2_PREFACE), Detection::Http2);
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&with_settings), Detection::Http2);
        for n in 0..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), Detection::NeedMore, "{n} bytes");
        }
    }

    #[test]
    fn other_protocols_are_opaque() {
        assert_eq!(
            classify(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"),
            Detection::Opaque
        );
        // A MySQL 8 server greeting: 3-byte length, sequence 0, protocol 10, version.
        let mysql = b"\x4a\x00\x00\x00\x0a8.0.36\x00\x08\x00\x00\x00\x3b\x2f\x61\x16\x1b\x5c\x1e\x63\x00\xff\xff\xff\x02\x00\xff\xdf\x15\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x12\x4c\x30\x4b\x44\x7a\x41\x54\x55\x69\x42\x4d\x00caching_sha2_password\x00";
        assert_eq!(classify(mysql), Detection::Opaque);
        // PostgreSQL SSLRequest, a Redis inline command, a NUL.
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Detection::Opaque
        );
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Detection::Opaque);
        assert_eq!(classify(b"\x00"), Detection::Opaque);
    }

    #[test]
    fn empty_input_needs_more() {
        assert_eq!(classify(b""), Detection::NeedMore);
        assert!(!is_tls_prefix(b""));
    }

    #[test]
    fn never_needs_more_at_the_bound() {
        let mut long = b"\x16\x03\x01\x40\x00".to_vec();
        long.resize(MAX_DETECT_BYTES + 100, 0);
        assert_eq!(classify(&long), tls(None));
    }

    /// The inbound listener's 3-byte decision is what `tls::looks_like_tls` always said.
    #[test]
    fn tls_prefix_agrees_with_looks_like_tls_on_short_peeks() {
        use crate::tls::looks_like_tls;
        let check = |b: &[u8]| assert_eq!(is_tls_prefix(b), looks_like_tls(b), "{b:?}");
        check(&[]);
        for a in 0..=255u8 {
            check(&[a]);
            for b in 0..=255u8 {
                check(&[a, b]);
            }
        }
        for b in 0..=255u8 {
            for c in 0..=255u8 {
                check(&[0x16, b, c]);
                check(&[b'G', b, c]);
                check(&[b, 0x03, c]);
            }
        }
    }
}
