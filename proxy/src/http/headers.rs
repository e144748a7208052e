//! Header and URI rewriting between downstream and upstream: hop-by-hop headers are removed and
//! the request target is put in the form the upstream HTTP version wants (origin-form + `Host`
//! for HTTP/1.1, scheme + authority in the URI for HTTP/2), keeping the host the client sent.

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
