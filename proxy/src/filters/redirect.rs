//! Redirects (`filters.redirect`): the route answers with a 3xx whose `Location` is built from
//! the request, with the configured parts replaced (the Gateway API `RequestRedirect` model).
//!
//! - scheme: as configured, else `http`: the scheme the client used towards its sidecar
//!   (outbound listeners are plaintext; an inbound request was plaintext HTTP to its caller's
//!   sidecar too);
//! - host: as configured, else the request's host (its port split off);
//! - port: as configured, else the request's port, unless the scheme changed (then the new
//!   scheme's default); never written when it is the scheme's default (80, 443);
//! - path: replaced whole, or its matched prefix replaced ([`PathRewrite`]), else kept; the
//!   query is always kept.

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use weft_proto::v1;

use super::rewrite::PathRewrite;
use super::FilterErrors;
use crate::http::body::ResponseBody;

/// A compiled redirect.
#[derive(Debug)]
pub struct Redirect {
    scheme: Option<Box<str>>,
    host: Option<Box<str>>,
    port: Option<u16>,
    path: PathRewrite,
    status: StatusCode,
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

impl Redirect {
    /// Compiles `r` for a route matching `matched_prefix`.
    pub fn build(
        r: &v1::Redirect,
        matched_prefix: Option<&str>,
        errors: &mut FilterErrors,
    ) -> Self {
        let scheme = match r.scheme.as_str() {
            "" => None,
            s @ ("http" | "https") => Some(s.into()),
            s => {
                errors.push("redirect.scheme", format!("{s:?}: http or https"));
                None
            }
        };
        let host = if r.host.is_empty() {
            None
        } else if Authority::try_from(r.host.as_str()).is_ok_and(|a| a.port().is_none())
            && !r.host.contains('@')
        {
            Some(r.host.to_ascii_lowercase().into())
        } else {
            errors.push(
                "redirect.host",
                format!("{:?} is not a host name (the port goes in port)", r.host),
            );
            None
        };
        let port = match r.port {
            0 => None,
            p => match u16::try_from(p) {
                Ok(p) => Some(p),
                Err(_) => {
                    errors.push("redirect.port", format!("{p} is out of range 1..=65535"));
                    None
                }
            },
        };
        let status = match r.status {
            0 => StatusCode::FOUND,
            s @ (301 | 302 | 303 | 307 | 308) => {
                // One of the listed codes: valid.
                StatusCode::from_u16(u16::try_from(s).unwrap_or(302)).unwrap_or(StatusCode::FOUND)
            }
            s => {
                errors.push(
                    "redirect.status",
                    format!("{s}: one of 301, 302, 303, 307, 308"),
                );
                StatusCode::FOUND
            }
        };
        let path = PathRewrite::build(&r.path, &r.path_prefix, matched_prefix, "redirect", errors);
        Self {
            scheme,
            host,
            port,
            path,
            status,
        }
    }

    /// The `Location` for `req`.
    pub fn location<B>(&self, req: &Request<B>) -> String {
        let raw_host = req
            .uri()
            .authority()
            .map(Authority::as_str)
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let (req_host, req_port) = match Authority::try_from(raw_host) {
            Ok(a) => (a.host().to_owned(), a.port_u16()),
            Err(_) => (String::new(), None),
        };
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let host = self.host.as_deref().unwrap_or(&req_host);
        // A changed scheme implies its default port (Gateway API); otherwise the client's.
        let port = self
            .port
            .or(if self.scheme.as_deref().is_some_and(|s| s != "http") {
                None
            } else {
                req_port
            })
            .filter(|p| *p != default_port(scheme));
        let path = req.uri().path();
        let new_path = self.path.apply(path);
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            out.push(':');
            out.push_str(&p.to_string());
        }
        out.push_str(new_path.as_deref().unwrap_or(path));
        if let Some(q) = req.uri().query() {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    /// The redirect answering `req` (empty body).
    pub fn respond<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::empty());
        match HeaderValue::from_str(&self.location(req)) {
            Ok(location) => {
                *resp.status_mut() = self.status;
                resp.headers_mut().insert(header::LOCATION, location);
            }
            // Built from the request's own (valid) host and path and validated config: only a
            // host header that is no authority gets here, which hyper refuses before us.
            Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(r: &v1::Redirect, prefix: Option<&str>) -> Redirect {
        let mut errors = FilterErrors::default();
        let out = Redirect::build(r, prefix, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        out
    }

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn location_keeps_what_is_not_configured() {
        let r = redirect(&v1::Redirect::default(), None);
        assert_eq!(
            r.location(&req("/a/b?x=1", Some("api:8080"))),
            "http://api:8080/a/b?x=1"
        );
        assert_eq!(r.location(&req("/", Some("api:80"))), "http://api/");
        // HTTP/2: the authority.
        assert_eq!(r.location(&req("http://api/p", None)), "http://api/p");
        let resp = r.respond(&req("/", Some("api")));
        assert_eq!(resp.status(), 302);
        assert_eq!(resp.headers()["location"], "http://api/");
    }

    #[test]
    fn location_replaces_scheme_host_port_and_path() {
        let r = redirect(
            &v1::Redirect {
                scheme: "https".into(),
                host: "new.example.com".into(),
                status: 301,
                path_prefix: "/v2".into(),
                ..Default::default()
            },
            Some("/v1"),
        );
        // The scheme changed: the request's port is not carried over.
        assert_eq!(
            r.location(&req("/v1/items?q=a%20b", Some("api:8080"))),
            "https://new.example.com/v2/items?q=a%20b"
        );
        assert_eq!(r.respond(&req("/v1", Some("api"))).status(), 301);
        let r = redirect(
            &v1::Redirect {
                port: 8443,
                scheme: "https".into(),
                path: "/login".into(),
                ..Default::default()
            },
            None,
        );
        assert_eq!(
            r.location(&req("/account?next=1", Some("api"))),
            "https://api:8443/login?next=1"
        );
        let r = redirect(
            &v1::Redirect {
                port: 443,
                scheme: "https".into(),
                ..Default::default()
            },
            None,
        );
        assert_eq!(r.location(&req("/x", Some("api"))), "https://api/x");
    }

    #[test]
    fn build_errors() {
        let mut errors = FilterErrors::default();
        Redirect::build(
            &v1::Redirect {
                scheme: "ftp".into(),
                host: "a:80".into(),
                port: 70_000,
                status: 200,
                path: "x".into(),
                ..Default::default()
            },
            None,
            &mut errors,
        );
        let text = errors.to_string();
        for want in [
            "redirect.scheme",
            "redirect.host",
            "redirect.port",
            "redirect.status",
            "redirect.path",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
