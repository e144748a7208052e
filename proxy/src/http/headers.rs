//! Header and URI rewriting between downstream and upstream: hop-by-hop headers are removed and
//! the request target is put in the form the upstream HTTP version wants (origin-form + `Host`
//! for HTTP/1.1, scheme + authority in the URI for HTTP/2), keeping the host the client sent.
//!
//! `Upgrade` and `Connection` are hop-by-hop too: an upgrade request (`crate::http::upgrade`)
//! loses them like any request and gets exactly `Connection: upgrade` and the protocols it asked
//! for back ([`prepare_upgrade_request`], [`upgrade_protocols`]); `h2c` is never among them
//! (RFC 9113 §3.1 deprecates the h2c upgrade: such a request is served as plain HTTP/1.1).

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Parts, PathAndQuery, Scheme, Uri};
use http::{Request, Version};

use crate::upstream::Wire;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Which hop-by-hop headers a header map holds, found in one pass over its names.
#[derive(Default)]
struct HopByHop {
    connection: bool,
    te: bool,
    /// Any of keep-alive, proxy-connection, transfer-encoding, upgrade.
    other: bool,
}

impl HopByHop {
    fn scan(headers: &HeaderMap) -> Self {
        let mut found = Self::default();
        for name in headers.keys() {
            if name == header::CONNECTION {
                found.connection = true;
            } else if name == header::TE {
                found.te = true;
            } else if name == header::TRANSFER_ENCODING
                || name == header::UPGRADE
                || name == KEEP_ALIVE
                || name == PROXY_CONNECTION
            {
                found.other = true;
            }
        }
        found
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) and any named in `Connection`; keeps
/// `te: trailers` (gRPC needs it) and drops other `te` values.
///
/// Runs on every request and response: one pass over the header names decides what to do, so a
/// message without hop-by-hop headers costs no hashing and no removal.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = HopByHop::scan(headers);
    if found.connection {
        if let Some(conn) = headers.remove(header::CONNECTION) {
            if let Ok(list) = conn.to_str() {
                remove_connection_options(headers, list);
            }
        }
    }
    if found.other {
        headers.remove(KEEP_ALIVE);
        headers.remove(PROXY_CONNECTION);
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::UPGRADE);
    }
    if found.te {
        if let Some(te) = headers.get(header::TE) {
            let trailers = te.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            } else {
                headers.remove(header::TE);
            }
        }
    }
}

/// Removes the headers a `Connection` value names (except `te`). Options are matched against the
/// names present rather than parsed into header names: the usual `keep-alive` / `close` options
/// then cost a few byte comparisons.
fn remove_connection_options(headers: &mut HeaderMap, list: &str) {
    for option in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let named = headers
            .keys()
            .find(|k| *k != header::TE && k.as_str().eq_ignore_ascii_case(option))
            .cloned();
        if let Some(name) = named {
            headers.remove(name);
        }
    }
}

/// Whether a `Connection` header of `headers` lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|list| {
            list.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// The protocols an HTTP/1.1 upgrade request asks for: its `Upgrade` values without `h2c`, if
/// `Connection` lists `upgrade` (RFC 9110 §7.8) and any protocol is left. `None`: not an upgrade
/// the proxy carries (the request is forwarded as a plain request, without `Upgrade`).
pub fn upgrade_protocols(headers: &HeaderMap) -> Option<HeaderValue> {
    // Asked of every HTTP/1.1 request: a usual head has a few fields, and comparing their
    // (standard) names is cheaper than hashing `upgrade` for a lookup.
    let has_upgrade = if headers.len() <= 16 {
        headers.keys().any(|k| k == header::UPGRADE)
    } else {
        headers.contains_key(header::UPGRADE)
    };
    if !has_upgrade || !connection_has(headers, "upgrade") {
        return None;
    }
    let mut kept = String::new();
    for v in headers.get_all(header::UPGRADE) {
        let list = v.to_str().ok()?;
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            // `h2c` and `h2c/<version>`: refused, see the module docs.
            let name = p.split('/').next().unwrap_or(p);
            if name.eq_ignore_ascii_case("h2c") {
                continue;
            }
            if !kept.is_empty() {
                kept.push_str(", ");
            }
            kept.push_str(p);
        }
    }
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept).ok()
}

/// Rewrites a downstream upgrade request for its dedicated HTTP/1.1 upstream connection: like
/// [`prepare_request`] for HTTP/1.1 (hop-by-hop headers removed, origin-form, `Host`), then
/// `Connection: upgrade` and `Upgrade: <protocols>` set again.
pub fn prepare_upgrade_request<B>(
    req: &mut Request<B>,
    protocols: HeaderValue,
    endpoint: SocketAddr,
) {
    prepare_request(req, Wire::H1, endpoint);
    set_upgrade(req.headers_mut(), protocols);
}

/// Sets `Connection: upgrade` and `Upgrade: protocols` (after hop-by-hop headers were removed).
pub fn set_upgrade(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocols);
}

/// Rewrites a downstream request for the upstream `wire`; `endpoint` is the authority of last
/// resort when the client sent no host at all.
pub fn prepare_request<B>(req: &mut Request<B>, wire: Wire, endpoint: SocketAddr) {
    strip_hop_by_hop(req.headers_mut());
    if wire == Wire::H1 && req.uri().scheme().is_none() && req.uri().authority().is_none() {
        // Already origin-form (every HTTP/1.1 request but absolute-form ones): nothing to move.
        *req.version_mut() = Version::HTTP_11;
        return;
    }
    let uri = std::mem::take(req.uri_mut());
    let Parts {
        authority,
        path_and_query,
        ..
    } = uri.into_parts();
    let path_and_query = path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/"));
    match wire {
        Wire::H1 => {
            if !req.headers().contains_key(header::HOST) {
                if let Some(a) = &authority {
                    if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
            }
            *req.uri_mut() = Uri::from(path_and_query);
            *req.version_mut() = Version::HTTP_11;
        }
        Wire::H2 => {
            let host = req.headers_mut().remove(header::HOST);
            let authority = authority
                .or_else(|| host.and_then(|h| Authority::try_from(h.as_bytes()).ok()))
                .or_else(|| Authority::try_from(endpoint.to_string()).ok());
            let mut parts = Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = authority;
            parts.path_and_query = Some(path_and_query);
            // from_parts only fails for scheme without authority; the endpoint fallback above
            // always yields one, but fall back to origin-form rather than panicking.
            *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> SocketAddr {
        "10.0.0.1:80".parse().unwrap()
    }

    #[test]
    fn strips_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-keep"], "1");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn upgrade_protocols_need_connection_upgrade_and_drop_h2c() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocols(&ws).unwrap(), "websocket");
        // Without `Connection: upgrade`, `Upgrade` is not an upgrade request.
        assert!(upgrade_protocols(&headers(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_protocols(&headers(&[("connection", "upgrade")])).is_none());
        // h2c alone: refused (served as plain HTTP/1.1); with others: dropped from the list.
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(upgrade_protocols(&h2c).is_none());
        let mixed = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "H2C, foo/2"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocols(&mixed).unwrap(), "foo/2, websocket");
        assert!(connection_has(&mixed, "UPGRADE"));
        assert!(!connection_has(&mixed, "close"));
    }

    #[test]
    fn upgrade_request_keeps_exactly_its_upgrade_headers() {
        let mut req = Request::builder()
            .uri("http://backend:80/chat?room=1")
            .header(header::CONNECTION, "Upgrade, x-private, keep-alive")
            .header(header::UPGRADE, "websocket")
            .header("x-private", "1")
            .header("keep-alive", "timeout=5")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap();
        let protocols = upgrade_protocols(req.headers()).unwrap();
        prepare_upgrade_request(&mut req, protocols, ep());
        assert_eq!(req.uri(), "/chat?room=1");
        assert_eq!(req.version(), Version::HTTP_11);
        let h = req.headers();
        assert_eq!(h[header::HOST], "backend:80");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(h["sec-websocket-version"], "13");
        assert!(!h.contains_key("x-private"));
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn h2_downstream_to_h1_upstream_gets_host() {
        let mut req = Request::builder()
            .uri("http://api.example.com:8080/a?b=1")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        prepare_request(&mut req, Wire::H1, ep());
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()[header::HOST], "api.example.com:8080");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn h1_downstream_to_h2_upstream_gets_authority() {
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "backend")
            .body(())
            .unwrap();
        prepare_request(&mut req, Wire::H2, ep());
        assert_eq!(req.uri(), "http://backend/a?b=1");
        assert!(!req.headers().contains_key(header::HOST));
        assert_eq!(req.version(), Version::HTTP_2);
        let mut req = Request::builder().uri("/").body(()).unwrap();
        prepare_request(&mut req, Wire::H2, ep());
        assert_eq!(req.uri(), "http://10.0.0.1:80/");
    }

    #[test]
    fn h1_keeps_client_host() {
        let mut req = Request::builder()
            .uri("/x")
            .header(header::HOST, "Backend:9")
            .body(())
            .unwrap();
        prepare_request(&mut req, Wire::H1, ep());
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()[header::HOST], "Backend:9");
    }
}
