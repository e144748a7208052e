//! Path and host rewrites of the forwarded request (`filters.rewrite`), and the path
//! replacement redirects share ([`PathRewrite`]).
//!
//! A rewrite changes only what the upstream sees: routing already happened on the original
//! request. The query is always kept. `path_prefix` replaces the prefix the route matched with
//! the Gateway API `ReplacePrefixMatch` rules (trailing slashes of both ignored, so `/foo` ->
//! `/xyz` maps `/foo/bar` to `/xyz/bar` and `/foo` to `/xyz`, and `/` as the replacement drops
//! the prefix: `/foo/bar` -> `/bar`).

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::Request;

use super::FilterErrors;

/// How a path changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    /// Kept.
    Keep,
    /// Replaced whole.
    Full(Box<str>),
    /// The matched prefix (trailing `/` trimmed) replaced by `with` (trailing `/` trimmed).
    Prefix {
        /// The route's `match.path.prefix`, without a trailing `/` ("" for `/`).
        matched: Box<str>,
        /// The replacement, without a trailing `/` ("" for `/`).
        with: Box<str>,
    },
}

impl PathRewrite {
    /// Compiles `path` / `path_prefix` (`""` = not set) for a route matching `matched_prefix`;
    /// problems go to `errors` under `field.path` / `field.path_prefix`.
    pub fn build(
        path: &str,
        path_prefix: &str,
        matched_prefix: Option<&str>,
        field: &str,
        errors: &mut FilterErrors,
    ) -> Self {
        let valid = |field: String, value: &str, errors: &mut FilterErrors| {
            let ok = value.starts_with('/')
                && !value.contains(['?', '#', ' '])
                && PathAndQuery::try_from(value).is_ok();
            if !ok {
                errors.push(
                    field,
                    format!("{value:?} must be a path starting with '/' without '?', '#' or space"),
                );
            }
            ok
        };
        match (path.is_empty(), path_prefix.is_empty()) {
            (true, true) => Self::Keep,
            (false, false) => {
                errors.push(field.to_owned(), "at most one of path, path_prefix");
                Self::Keep
            }
            (false, true) => {
                if valid(format!("{field}.path"), path, errors) {
                    Self::Full(path.into())
                } else {
                    Self::Keep
                }
            }
            (true, false) => {
                if !valid(format!("{field}.path_prefix"), path_prefix, errors) {
                    return Self::Keep;
                }
                let Some(matched) = matched_prefix else {
                    errors.push(
                        format!("{field}.path_prefix"),
                        "replaces the matched prefix: the route needs match.path.prefix",
                    );
                    return Self::Keep;
                };
                Self::Prefix {
                    matched: matched.trim_end_matches('/').into(),
                    with: path_prefix.trim_end_matches('/').into(),
                }
            }
        }
    }

    /// The new path for `path`; `None` when it is kept.
    pub fn apply(&self, path: &str) -> Option<String> {
        match self {
            Self::Keep => None,
            Self::Full(p) => Some(p.to_string()),
            Self::Prefix { matched, with } => {
                // The route matched whole segments of `matched`, so what follows it is "" or
                // starts with '/'; a path it does not prefix (never routed here) is kept.
                let rest = path.strip_prefix(&**matched)?;
                let mut out = String::with_capacity(with.len() + rest.len() + 1);
                out.push_str(with);
                out.push_str(rest);
                if out.is_empty() {
                    out.push('/');
                }
                Some(out)
            }
        }
    }
}

/// `filters.rewrite`.
#[derive(Debug)]
pub struct Rewrite {
    path: PathRewrite,
    host: Option<(HeaderValue, Authority)>,
}

impl Rewrite {
    /// Compiles the rewrite fields of a route's filters; `None` when nothing is rewritten.
    pub fn build(
        path: &str,
        path_prefix: &str,
        host: &str,
        matched_prefix: Option<&str>,
        errors: &mut FilterErrors,
    ) -> Option<Self> {
        let path = PathRewrite::build(path, path_prefix, matched_prefix, "rewrite", errors);
        let host = if host.is_empty() {
            None
        } else {
            match (HeaderValue::from_str(host), Authority::try_from(host)) {
                (Ok(v), Ok(a)) if !host.contains('@') => Some((v, a)),
                _ => {
                    errors.push("rewrite.host", format!("{host:?} is not a host[:port]"));
                    None
                }
            }
        };
        (path != PathRewrite::Keep || host.is_some()).then_some(Self { path, host })
    }

    /// Rewrites `req`'s path (keeping the query) and host (`Host` and, when the target carries
    /// one, its authority; `forward` then puts them in the form the upstream version wants).
    pub fn apply<B>(&self, req: &mut Request<B>) {
        let new_path = self.path.apply(req.uri().path());
        if new_path.is_none() && self.host.is_none() {
            return;
        }
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        if let Some(p) = new_path {
            let pq = match parts.path_and_query.as_ref().and_then(PathAndQuery::query) {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            // Built from a valid path and a valid query: parses.
            if let Ok(pq) = PathAndQuery::try_from(pq) {
                parts.path_and_query = Some(pq);
            }
        }
        if let Some((value, authority)) = &self.host {
            if parts.authority.is_some() {
                parts.authority = Some(authority.clone());
            }
            if parts.authority.is_none() || req.headers().contains_key(header::HOST) {
                req.headers_mut().insert(header::HOST, value.clone());
            }
        }
        // Only the path or authority changed, each to a valid value: cannot fail.
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(matched: &str, with: &str) -> PathRewrite {
        let mut errors = FilterErrors::default();
        let p = PathRewrite::build("", with, Some(matched), "rewrite", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        p
    }

    #[test]
    fn prefix_replacement_follows_gateway_api() {
        // (matched prefix, request path, replacement, result): the Gateway API's table.
        let cases = [
            ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
            ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo", "/foo/", "/xyz", "/xyz/"),
            ("/foo/", "/foo/", "/xyz", "/xyz/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo", "/foo/", "/", "/"),
            ("/foo", "/foo/bar", "/", "/bar"),
            ("/", "/anything", "/v2", "/v2/anything"),
        ];
        for (matched, path, with, want) in cases {
            assert_eq!(
                prefix(matched, with).apply(path).as_deref(),
                Some(want),
                "{matched} {path} {with}"
            );
        }
    }

    #[test]
    fn rewrites_path_and_host_keeping_the_query() {
        let mut errors = FilterErrors::default();
        let r = Rewrite::build(
            "",
            "/v2",
            "internal.example:8080",
            Some("/api"),
            &mut errors,
        )
        .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        // HTTP/1.1 origin-form: Host changes.
        let mut req = Request::builder()
            .uri("/api/items?x=1&y")
            .header("host", "api")
            .body(())
            .unwrap();
        r.apply(&mut req);
        assert_eq!(req.uri(), "/v2/items?x=1&y");
        assert_eq!(req.headers()["host"], "internal.example:8080");
        // HTTP/2: the authority changes (no Host header added).
        let mut req = Request::builder().uri("http://api/api").body(()).unwrap();
        r.apply(&mut req);
        assert_eq!(req.uri(), "http://internal.example:8080/v2");
        assert!(!req.headers().contains_key("host"));
    }

    #[test]
    fn build_errors() {
        let mut errors = FilterErrors::default();
        assert!(Rewrite::build("/a", "/b", "", Some("/x"), &mut errors).is_none());
        assert!(Rewrite::build("", "/b", "", None, &mut errors).is_none());
        assert!(Rewrite::build("nope", "", "", None, &mut errors).is_none());
        assert!(Rewrite::build("", "", "bad host/x", None, &mut errors).is_none());
        let text = errors.to_string();
        for want in [
            "rewrite: at most one of path, path_prefix",
            "rewrite.path_prefix: replaces the matched prefix",
            "rewrite.path: \"nope\"",
            "rewrite.host:",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
