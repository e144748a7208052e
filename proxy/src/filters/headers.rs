//! Request and response header mutation (`filters.request_headers` / `response_headers`):
//! remove, then set (replace), then add (append), in that order as Envoy applies its
//! `*_headers_to_remove` before `*_headers_to_add`; a filter can thus replace a header it removes.
//!
//! Values may hold `${peer_identity}`, `${route}` and `${request_id}`. They are split once, when
//! the snapshot is built, into literal and variable parts ([`Template`]); `${route}` is known
//! then and becomes literal, so only values using the other two are assembled per request.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use weft_proto::v1;

use super::FilterErrors;

/// Per-request values of the variables.
#[derive(Debug, Default, Clone)]
pub struct Vars {
    /// The caller's verified SPIFFE ID (inbound mTLS); `None` renders as "".
    pub peer_identity: Option<HeaderValue>,
    /// The request's `x-request-id` (generated when absent).
    pub request_id: Option<HeaderValue>,
}

/// A variable resolved per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    PeerIdentity,
    RequestId,
}

#[derive(Debug)]
enum Part {
    Literal(Bytes),
    Var(Var),
}

/// A header value, pre-validated and pre-split.
#[derive(Debug)]
enum Template {
    /// No per-request variable: cloned as is (a reference count).
    Static(HeaderValue),
    /// Literal and variable parts, concatenated per request.
    Parts(Box<[Part]>),
}

impl Template {
    /// Parses `value` for route `route`; `Err` says what is wrong.
    fn parse(value: &str, route: &str) -> Result<Self, String> {
        // The raw value is checked whole: its literal pieces are then valid too, and so is any
        // concatenation with the variables' values (header values themselves) or the route
        // name (checked here as well, since it is substituted now).
        if HeaderValue::from_str(value).is_err() || HeaderValue::from_str(route).is_err() {
            return Err(format!("{value:?} is not a valid header value"));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(format!("{value:?}: unclosed ${{"));
            };
            let var = match &after[..end] {
                "route" => None,
                "peer_identity" => Some(Var::PeerIdentity),
                "request_id" => Some(Var::RequestId),
                other => {
                    return Err(format!(
                        "unknown variable ${{{other}}} (known: ${{peer_identity}}, ${{route}}, \
                         ${{request_id}})"
                    ))
                }
            };
            match var {
                None => literal.push_str(route),
                Some(var) => {
                    if !literal.is_empty() {
                        parts.push(Part::Literal(Bytes::from(std::mem::take(&mut literal))));
                    }
                    parts.push(Part::Var(var));
                }
            }
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if parts.is_empty() {
            return HeaderValue::from_str(&literal)
                .map(Self::Static)
                .map_err(|_| format!("{value:?} is not a valid header value"));
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(Bytes::from(literal)));
        }
        Ok(Self::Parts(parts.into()))
    }

    fn uses(&self, var: Var) -> bool {
        match self {
            Self::Static(_) => false,
            Self::Parts(parts) => parts.iter().any(|p| matches!(p, Part::Var(v) if *v == var)),
        }
    }

    /// The value for this request.
    fn render(&self, vars: &Vars) -> Option<HeaderValue> {
        let parts = match self {
            Self::Static(v) => return Some(v.clone()),
            Self::Parts(parts) => parts,
        };
        let value = |v: &Var| match v {
            Var::PeerIdentity => vars.peer_identity.as_ref(),
            Var::RequestId => vars.request_id.as_ref(),
        };
        let len = parts
            .iter()
            .map(|p| match p {
                Part::Literal(b) => b.len(),
                Part::Var(v) => value(v).map_or(0, HeaderValue::len),
            })
            .sum();
        let mut out = BytesMut::with_capacity(len);
        for p in parts.iter() {
            match p {
                Part::Literal(b) => out.put_slice(b),
                Part::Var(v) => {
                    if let Some(x) = value(v) {
                        out.put_slice(x.as_bytes());
                    }
                }
            }
        }
        // Valid pieces make a valid value; a failure would only drop this one header.
        HeaderValue::from_maybe_shared(out.freeze()).ok()
    }
}

/// Header names no filter may touch: the proxy owns framing and the host (`rewrite.host`).
const RESERVED: [&str; 5] = [
    "host",
    "connection",
    "transfer-encoding",
    "content-length",
    "upgrade",
];

/// A compiled `HeaderMutation`.
#[derive(Debug, Default)]
pub struct HeaderMutation {
    remove: Box<[HeaderName]>,
    set: Box<[(HeaderName, Template)]>,
    add: Box<[(HeaderName, Template)]>,
}

impl HeaderMutation {
    /// Compiles `m`; problems go to `errors` under `field`.
    pub fn build(
        m: &v1::HeaderMutation,
        field: &str,
        route: &str,
        request: bool,
        errors: &mut FilterErrors,
    ) -> Self {
        let name = |what: &str, i: usize, raw: &str, errors: &mut FilterErrors| {
            let f = format!("{field}.{what}[{i}]");
            let n: Option<HeaderName> = match HeaderName::from_bytes(raw.as_bytes()) {
                Err(_) => {
                    errors.push(f, format!("{raw:?} is not a valid header name"));
                    None
                }
                Ok(n) if RESERVED.contains(&n.as_str()) => {
                    errors.push(f, format!("{raw:?} cannot be changed by a filter"));
                    None
                }
                Ok(n) if request && n == crate::authz::X_WEFT_PEER_IDENTITY => {
                    errors.push(f, format!("{raw:?} is set by the callee's sidecar only"));
                    None
                }
                Ok(n) => Some(n),
            };
            n
        };
        let remove: Vec<HeaderName> = m
            .remove
            .iter()
            .enumerate()
            .filter_map(|(i, n)| name("remove", i, n, errors))
            .collect();
        let pairs = |what: &str, list: &[v1::HeaderValueOption], errors: &mut FilterErrors| {
            let mut out = Vec::new();
            for (i, o) in list.iter().enumerate() {
                let Some(n) = name(what, i, &o.name, errors) else {
                    continue;
                };
                match Template::parse(&o.value, route) {
                    Ok(t) => out.push((n, t)),
                    Err(reason) => errors.push(format!("{field}.{what}[{i}].value"), reason),
                }
            }
            out
        };
        let set = pairs("set", &m.set, errors);
        let add = pairs("add", &m.add, errors);
        Self {
            remove: remove.into(),
            set: set.into(),
            add: add.into(),
        }
    }

    /// Whether any value uses `${peer_identity}`.
    pub fn uses_peer_identity(&self) -> bool {
        self.templates().any(|t| t.uses(Var::PeerIdentity))
    }

    /// Whether any value uses `${request_id}`.
    pub fn uses_request_id(&self) -> bool {
        self.templates().any(|t| t.uses(Var::RequestId))
    }

    fn templates(&self) -> impl Iterator<Item = &Template> {
        self.set.iter().chain(self.add.iter()).map(|(_, t)| t)
    }

    /// Applies the mutation to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap, vars: &Vars) {
        for n in self.remove.iter() {
            headers.remove(n);
        }
        for (n, t) in self.set.iter() {
            if let Some(v) = t.render(vars) {
                headers.insert(n.clone(), v);
            }
        }
        for (n, t) in self.add.iter() {
            if let Some(v) = t.render(vars) {
                headers.append(n.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: &str, value: &str) -> v1::HeaderValueOption {
        v1::HeaderValueOption {
            name: name.into(),
            value: value.into(),
        }
    }

    fn vars() -> Vars {
        Vars {
            peer_identity: Some(HeaderValue::from_static("spiffe://td/ns/default/sa/web")),
            request_id: Some(HeaderValue::from_static("rid-1")),
        }
    }

    #[test]
    fn templates_split_once_and_render_per_request() {
        let t = Template::parse("static", "r").unwrap();
        assert!(matches!(t, Template::Static(_)));
        // ${route} is known at build time: still static.
        let t = Template::parse("route=${route}!", "checkout").unwrap();
        match &t {
            Template::Static(v) => assert_eq!(v, "route=checkout!"),
            other => panic!("{other:?}"),
        }
        let t = Template::parse("${peer_identity}|${request_id}|${route}", "r").unwrap();
        assert!(t.uses(Var::PeerIdentity) && t.uses(Var::RequestId));
        assert_eq!(
            t.render(&vars()).unwrap(),
            "spiffe://td/ns/default/sa/web|rid-1|r"
        );
        // No peer: the variable renders as "".
        assert_eq!(t.render(&Vars::default()).unwrap(), "||r");
        assert!(Template::parse("${nope}", "r")
            .unwrap_err()
            .contains("unknown variable ${nope}"));
        assert!(Template::parse("${route", "r")
            .unwrap_err()
            .contains("unclosed"));
        assert!(Template::parse("a\nb", "r").is_err());
    }

    #[test]
    fn remove_then_set_then_add() {
        let mut errors = FilterErrors::default();
        let m = HeaderMutation::build(
            &v1::HeaderMutation {
                add: vec![opt("x-add", "a-${request_id}"), opt("x-set", "appended")],
                set: vec![opt("x-set", "${route}"), opt("x-gone", "back")],
                remove: vec!["x-gone".into(), "x-remove".into()],
            },
            "request_headers",
            "r1",
            true,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert!(m.uses_request_id() && !m.uses_peer_identity());
        let mut h = HeaderMap::new();
        h.insert("x-set", HeaderValue::from_static("old"));
        h.insert("x-remove", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        h.insert("x-add", HeaderValue::from_static("first"));
        m.apply(&mut h, &vars());
        assert!(!h.contains_key("x-remove"));
        assert_eq!(h["x-gone"], "back");
        let set: Vec<_> = h.get_all("x-set").iter().collect();
        assert_eq!(set, ["r1", "appended"]);
        let add: Vec<_> = h.get_all("x-add").iter().collect();
        assert_eq!(add, ["first", "a-rid-1"]);
    }

    #[test]
    fn refuses_reserved_and_invalid_names() {
        let mut errors = FilterErrors::default();
        HeaderMutation::build(
            &v1::HeaderMutation {
                add: vec![opt("bad name", "x"), opt("host", "x")],
                set: vec![opt("x-weft-peer-identity", "x"), opt("x-ok", "${what}")],
                remove: vec!["content-length".into()],
            },
            "request_headers",
            "r",
            true,
            &mut errors,
        );
        let text = errors.to_string();
        for want in [
            "request_headers.add[0]",
            "request_headers.add[1]",
            "request_headers.set[0]",
            "request_headers.set[1].value",
            "request_headers.remove[0]",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
