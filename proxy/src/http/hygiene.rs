//! Request hygiene: the first stage of every HTTP request on every listener, before
//! authorization and routing, so both decide on what the application will act on.
//!
//! - **Host**: the request's authority decides. An HTTP/1.1 absolute-form target
//!   (`GET http://api/x`) wins over the `Host` header, which is rewritten to match (RFC 9112
//!   §3.2.2: otherwise the proxy routes to one service while the app sees another `Host`); an
//!   HTTP/2 request whose `host` header differs from `:authority` is refused.
//! - **Header names with `_`** are dropped (default), refused, or allowed: proxies and frameworks
//!   disagree on whether `x_weft_peer_identity` is `x-weft-peer-identity` (CGI maps both to
//!   `HTTP_X_WEFT_PEER_IDENTITY`), so a header the mesh strips could reach the app under another
//!   spelling.
//! - **Path** ([`super::normalize`]): dot segments removed, unreserved escapes decoded, slashes
//!   merged, escaped slashes and backslashes refused (or redirected), and the normalized path is
//!   what gets forwarded.
//!
//! A refusal is 400 `x-weft-error: invalid-request` with the reason. The common request (an
//! origin-form target, a normal path, no `_` in a header name) is checked in one pass over the
//! path and one over the header names, without allocating.

use http::header::{HeaderValue, HOST, LOCATION};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use weft_proto::v1;

use super::body::ResponseBody;
use super::normalize::{self, EscapedSlashes, Normalized, PathOptions};

/// What to do with header names containing `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Underscores {
    #[default]
    Drop,
    Reject,
    Allow,
}

/// A listener's hygiene settings (from `Listener.hygiene`; absent = these defaults).
#[derive(Debug, Clone, Default)]
pub struct Hygiene {
    path: PathOptions,
    underscores: Underscores,
}

impl Hygiene {
    /// From the listener's resource.
    pub fn from_proto(h: Option<&v1::RequestHygiene>) -> Self {
        let Some(h) = h else {
            return Self::default();
        };
        let escaped_slashes = match v1::EscapedSlashes::try_from(h.escaped_slashes) {
            Ok(v1::EscapedSlashes::Redirect) => EscapedSlashes::Redirect,
            Ok(v1::EscapedSlashes::Keep) => EscapedSlashes::Keep,
            _ => EscapedSlashes::Reject,
        };
        let underscores = match v1::UnderscoreHeaders::try_from(h.underscore_headers) {
            Ok(v1::UnderscoreHeaders::Reject) => Underscores::Reject,
            Ok(v1::UnderscoreHeaders::Allow) => Underscores::Allow,
            _ => Underscores::Drop,
        };
        Self {
            path: PathOptions {
                escaped_slashes,
                merge_slashes: !h.keep_duplicate_slashes,
            },
            underscores,
        }
    }

    /// Whether header names with `_` are forwarded.
    pub fn allows_underscores(&self) -> bool {
        self.underscores == Underscores::Allow
    }
}

/// Why a request was refused, or where it is redirected.
#[derive(Debug)]
pub enum Outcome {
    /// 400 with this reason.
    Refused(String),
    /// 307 to this path-and-query (escaped slashes with `redirect`).
    Redirect(String),
}

impl Outcome {
    /// The downstream response.
    pub fn to_response(&self) -> Response<ResponseBody> {
        match self {
            Self::Refused(reason) => {
                super::error::ProxyError::InvalidRequest(reason.clone()).to_response()
            }
            Self::Redirect(location) => {
                let mut resp = Response::new(ResponseBody::local(bytes::Bytes::new()));
                *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                if let Ok(v) = HeaderValue::from_str(location) {
                    resp.headers_mut().insert(LOCATION, v);
                }
                resp
            }
        }
    }
}

/// Applies `hygiene` to `req` in place; `Err` is the response to send instead.
pub fn apply<B>(hygiene: &Hygiene, req: &mut Request<B>) -> Result<(), Outcome> {
    reconcile_host(req)?;
    underscores(hygiene.underscores, req)?;
    normalize_path(&hygiene.path, req)
}

fn reconcile_host<B>(req: &mut Request<B>) -> Result<(), Outcome> {
    let Some(authority) = req.uri().authority() else {
        return Ok(());
    };
    if req.version() == Version::HTTP_2 {
        // Every HTTP/2 request has an authority: compared in place, not copied.
        if let Some(host) = req.headers().get(HOST) {
            let authority = authority.as_str();
            if !host.as_bytes().eq_ignore_ascii_case(authority.as_bytes()) {
                return Err(Outcome::Refused(format!(
                    "the host header ({:?}) differs from :authority ({authority:?})",
                    String::from_utf8_lossy(host.as_bytes())
                )));
            }
        }
        return Ok(());
    }
    let authority = authority.as_str().to_owned();
    // HTTP/1.x absolute-form: the target's authority is the host; the app must see it too.
    match HeaderValue::from_str(&authority) {
        Ok(v) => {
            req.headers_mut().insert(HOST, v);
            Ok(())
        }
        Err(_) => Err(Outcome::Refused(format!(
            "unusable authority {authority:?}"
        ))),
    }
}

fn underscores<B>(action: Underscores, req: &mut Request<B>) -> Result<(), Outcome> {
    if action == Underscores::Allow {
        return Ok(());
    }
    let found = req
        .headers()
        .keys()
        .find(|k| k.as_str().contains('_'))
        .cloned();
    let Some(first) = found else {
        return Ok(());
    };
    if action == Underscores::Reject {
        return Err(Outcome::Refused(format!(
            "header name {:?} contains '_'",
            first.as_str()
        )));
    }
    let names: Vec<_> = req
        .headers()
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        req.headers_mut().remove(&name);
    }
    Ok(())
}

fn normalize_path<B>(opts: &PathOptions, req: &mut Request<B>) -> Result<(), Outcome> {
    // CONNECT has an authority-form target and `OPTIONS *` no path: nothing to normalize. An
    // extended CONNECT (RFC 8441, `:protocol`: WebSocket over HTTP/2) has a `:path` like any
    // request, which authorization and routing match: normalized like any path.
    if req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_none() {
        return Ok(());
    }
    let Some(pq) = req.uri().path_and_query() else {
        return Ok(());
    };
    if pq.as_str() == "*" {
        return Ok(());
    }
    match normalize::normalize(pq.as_str(), opts) {
        Ok(Normalized::Unchanged) => Ok(()),
        Ok(Normalized::Rewritten(new)) => {
            let pq = PathAndQuery::try_from(new.as_str())
                .map_err(|e| Outcome::Refused(format!("normalized path {new:?}: {e}")))?;
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.path_and_query = Some(pq);
            *req.uri_mut() = Uri::from_parts(parts)
                .map_err(|e| Outcome::Refused(format!("normalized target: {e}")))?;
            Ok(())
        }
        Ok(Normalized::Redirect(location)) => Err(Outcome::Redirect(location)),
        Err(rejection) => Err(Outcome::Refused(format!("path: {rejection}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn refused(r: Result<(), Outcome>) -> String {
        match r {
            Err(Outcome::Refused(reason)) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn paths_are_normalized_before_anything_sees_them() {
        let h = Hygiene::default();
        for (raw, want) in [
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("//admin", "/admin"),
            ("/a/./b?x=/../", "/a/b?x=/../"),
            ("/ok?q=1", "/ok?q=1"),
        ] {
            let mut r = req(Version::HTTP_11, raw, &[("host", "api")]);
            apply(&h, &mut r).unwrap();
            assert_eq!(r.uri().path_and_query().unwrap().as_str(), want, "{raw}");
        }
        let mut r = req(Version::HTTP_11, "/a%2Fb", &[]);
        assert!(refused(apply(&h, &mut r)).contains("path"));
        let redirect = Hygiene::from_proto(Some(&v1::RequestHygiene {
            escaped_slashes: v1::EscapedSlashes::Redirect as i32,
            ..Default::default()
        }));
        let mut r = req(Version::HTTP_11, "/a%2Fb?x", &[]);
        match apply(&redirect, &mut r) {
            Err(Outcome::Redirect(to)) => assert_eq!(to, "/a/b?x"),
            other => panic!("{other:?}"),
        }
        // h2 and absolute-form keep scheme and authority.
        let mut r = req(Version::HTTP_2, "http://api/x/../y", &[]);
        apply(&h, &mut r).unwrap();
        assert_eq!(r.uri().to_string(), "http://api/y");
    }

    #[test]
    fn extended_connect_paths_are_normalized_plain_connect_is_left_alone() {
        let h = Hygiene::default();
        let mut ws = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("http://chat/public/../admin")
            .body(())
            .unwrap();
        ws.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        apply(&h, &mut ws).unwrap();
        assert_eq!(ws.uri().to_string(), "http://chat/admin");
        let mut tunnel = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .unwrap();
        apply(&h, &mut tunnel).unwrap();
        assert_eq!(tunnel.uri().to_string(), "example.com:443");
    }

    #[test]
    fn the_authority_decides_the_host() {
        let h = Hygiene::default();
        let mut r = req(Version::HTTP_11, "http://api/x", &[("host", "web")]);
        apply(&h, &mut r).unwrap();
        assert_eq!(r.headers()["host"], "api");
        let mut r = req(Version::HTTP_2, "http://api/x", &[("host", "web")]);
        assert!(refused(apply(&h, &mut r)).contains(":authority"));
        let mut r = req(Version::HTTP_2, "http://api/x", &[("host", "API")]);
        apply(&h, &mut r).unwrap();
        let mut r = req(Version::HTTP_11, "/x", &[("host", "web")]);
        apply(&h, &mut r).unwrap();
        assert_eq!(r.headers()["host"], "web");
    }

    #[test]
    fn underscore_headers_are_dropped_refused_or_allowed() {
        let headers = [
            (
                "x_weft_peer_identity",
                "spiffe://cluster.local/ns/default/sa/admin",
            ),
            ("x-ok", "1"),
            ("a_b", "2"),
        ];
        let mut r = req(Version::HTTP_11, "/", &headers);
        apply(&Hygiene::default(), &mut r).unwrap();
        assert!(r.headers().get("x_weft_peer_identity").is_none());
        assert!(r.headers().get("a_b").is_none());
        assert_eq!(r.headers()["x-ok"], "1");
        let reject = Hygiene::from_proto(Some(&v1::RequestHygiene {
            underscore_headers: v1::UnderscoreHeaders::Reject as i32,
            ..Default::default()
        }));
        let mut r = req(Version::HTTP_11, "/", &headers);
        assert!(refused(apply(&reject, &mut r)).contains("'_'"));
        let allow = Hygiene::from_proto(Some(&v1::RequestHygiene {
            underscore_headers: v1::UnderscoreHeaders::Allow as i32,
            ..Default::default()
        }));
        let mut r = req(Version::HTTP_11, "/", &headers);
        apply(&allow, &mut r).unwrap();
        assert_eq!(r.headers()["a_b"], "2");
    }
}
