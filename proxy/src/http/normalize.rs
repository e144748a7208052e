//! Request-path normalization, done once per request before route matching
//! and authorization, so that every later decision sees the path the
//! application will act on.
//!
//! # Why this exists
//!
//! Routing and authorization rules are written against paths such as
//! `/admin` or `/api`. If they are matched against the raw request target,
//! a client can reach a protected resource under a spelling no rule
//! mentions, while the application behind the sidecar resolves it to the
//! protected resource anyway:
//!
//! * `/public/../admin`: the application resolves the dot segment;
//! * `/public/%2e%2e/admin`: the same, hidden behind percent-encoding;
//! * `//admin`: many frameworks merge slashes, a prefix rule on `/admin`
//!   does not;
//! * `/api-internal`: a naive string prefix `/api` matches it.
//!
//! This is the class of Istio's CVE-2021-31920 (authorization policies
//! bypassed with `%2F`, `%5C` and dot segments). The fix, here as there, is
//! to normalize first and to forward the normalized path, so the proxy and
//! the application agree on which resource is addressed. The behaviour
//! follows Envoy's `normalize_path` (RFC 3986 normalization),
//! `merge_slashes`, and `path_with_escaped_slashes_action`
//! (reject / unescape-and-redirect / keep-unchanged), and
//! [`prefix_matches`] gives rules a prefix test that respects segment
//! boundaries.
//!
//! Only the path is normalized; the query is forwarded byte for byte,
//! because its meaning belongs to the application.
//!
//! # Cost
//!
//! Most requests already carry a normal path. [`normalize`] detects that in
//! one linear scan without allocating and returns [`Normalized::Unchanged`];
//! only paths that really change pay for building a new string.

use std::error::Error;
use std::fmt;

/// What to do with `%2F`, `%5C` (any case) and a literal `\` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Refuse the request (400). The default: the app and the proxy could
    /// disagree on where segments end.
    #[default]
    Reject,
    /// Unescape them to `/` (and `\` to `/`), normalize, and answer with a
    /// redirect to the result (the caller sends a 307/308 with Location).
    Redirect,
    /// Leave `%2F`/`%5C` escaped (opaque bytes inside one segment, like
    /// Envoy's KEEP_UNCHANGED); a literal `\` is still refused.
    Keep,
}

/// How [`normalize`] treats the parts of a path that applications disagree
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathOptions {
    /// See [`EscapedSlashes`].
    pub escaped_slashes: EscapedSlashes,
    /// Merge runs of `/` into one. On by default because most frameworks
    /// merge them, so `//admin` reaches `/admin` whether or not a rule
    /// saw it that way.
    pub merge_slashes: bool,
}

impl Default for PathOptions {
    fn default() -> Self {
        PathOptions {
            escaped_slashes: EscapedSlashes::default(),
            merge_slashes: true,
        }
    }
}

/// The outcome for an acceptable request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normalized {
    /// Already normal: forward as is (nothing was allocated).
    Unchanged,
    /// Forward this path-and-query instead.
    Rewritten(String),
    /// [`EscapedSlashes::Redirect`] and the path had escaped slashes (or a
    /// backslash): redirect the client to this path-and-query.
    Redirect(String),
}

/// Why a request target was refused; every variant maps to a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRejection {
    /// `%2F` or `%5C` under [`EscapedSlashes::Reject`].
    EscapedSlash,
    /// A literal `\` under [`EscapedSlashes::Reject`] or
    /// [`EscapedSlashes::Keep`].
    Backslash,
    /// The target does not start with `/` (origin-form is required; `*`
    /// is the caller's business).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// A control character (0x00-0x1F, 0x7F), a space, `#`, or a byte
    /// >= 0x80 that is not percent-encoded.
    InvalidByte,
}

impl fmt::Display for PathRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            PathRejection::EscapedSlash => {
                "the request path contains an encoded slash or backslash (%2F or %5C), \
                 which is refused because servers disagree on whether it separates \
                 segments; use a literal '/' between segments"
            }
            PathRejection::Backslash => {
                "the request path contains a backslash ('\\'); use '/' to separate \
                 path segments"
            }
            PathRejection::NotAbsolute => {
                "the request target must be an absolute path starting with '/'"
            }
            PathRejection::BadPercentEncoding => {
                "the request path contains a '%' that is not followed by two hex \
                 digits; encode a literal '%' as %25"
            }
            PathRejection::InvalidByte => {
                "the request path contains a character that must be percent-encoded \
                 (a control character, space, '#' or non-ASCII byte); encode it, \
                 e.g. a space as %20"
            }
        };
        f.write_str(msg)
    }
}

impl Error for PathRejection {}

/// Normalizes `path_and_query` (e.g. "/a/./b/../c?x=%2e"): only the part
/// before the first `?` is changed; the query is kept byte for byte.
///
/// In order: validate bytes, decode escapes of unreserved characters and
/// uppercase the hex of the others, handle escaped slashes per
/// [`PathOptions::escaped_slashes`], merge slashes, remove dot segments
/// (RFC 3986 sections 2.3, 6.2.2 and 5.2.4). The result is idempotent:
/// normalizing a `Rewritten` or `Redirect` target again yields `Unchanged`.
pub fn normalize(path_and_query: &str, opts: &PathOptions) -> Result<Normalized, PathRejection> {
    let scan = scan(path_and_query, opts)?;
    if !scan.needs_rewrite {
        return Ok(Normalized::Unchanged);
    }
    // `path_end` is the index of an ASCII '?' or the end, and the scan
    // refused every non-ASCII byte before it, so this is a char boundary.
    let (path, query) = path_and_query.split_at(scan.path_end);
    let mut out = rewrite_path(path, opts);
    if out == path {
        return Ok(Normalized::Unchanged);
    }
    out.push_str(query);
    if scan.escaped_slash && opts.escaped_slashes == EscapedSlashes::Redirect {
        Ok(Normalized::Redirect(out))
    } else {
        Ok(Normalized::Rewritten(out))
    }
}

/// Whether `path` (already normalized, no query) is under `prefix` by whole
/// segments:
/// "/api" matches "/api", "/api/", "/api/x" but never "/api-internal" or
/// "/apix"; a prefix ending in '/' ("/api/") matches "/api/" and "/api/x"
/// (and NOT "/api"); "" and "/" match everything.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() || prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        // A prefix ending in '/' already ends on a segment boundary; any
        // other prefix must be followed by one, or `/api` would admit
        // `/api-internal`.
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Fuzz entry point: never panics on any input, and panics (so a fuzzer
/// reports it) when a successful result breaks an invariant.
///
/// The first byte chooses the options; the rest is the request target,
/// decoded as lossy UTF-8.
pub fn fuzz_normalize(data: &[u8]) {
    let (opts, rest) = match data.split_first() {
        Some((&first, rest)) => {
            let escaped_slashes = match first % 3 {
                0 => EscapedSlashes::Reject,
                1 => EscapedSlashes::Redirect,
                _ => EscapedSlashes::Keep,
            };
            let merge_slashes = first & 0x80 == 0;
            let opts = PathOptions {
                escaped_slashes,
                merge_slashes,
            };
            (opts, rest)
        }
        None => (PathOptions::default(), data),
    };
    let input = String::from_utf8_lossy(rest);
    let input: &str = &input;

    let result = normalize(input, &opts);
    let out: &str = match &result {
        Err(PathRejection::EscapedSlash) => {
            assert_eq!(opts.escaped_slashes, EscapedSlashes::Reject, "{input:?}");
            return;
        }
        Err(PathRejection::Backslash) => {
            assert_ne!(opts.escaped_slashes, EscapedSlashes::Redirect, "{input:?}");
            return;
        }
        Err(_) => return,
        Ok(Normalized::Unchanged) => input,
        Ok(Normalized::Rewritten(s)) => s,
        Ok(Normalized::Redirect(s)) => {
            assert_eq!(opts.escaped_slashes, EscapedSlashes::Redirect, "{input:?}");
            s
        }
    };

    let split = |s: &str| -> (usize, usize) { (s.find('?').unwrap_or(s.len()), s.len()) };
    let (in_end, in_len) = split(input);
    let (out_end, out_len) = split(out);
    let in_query = input.get(in_end..in_len).unwrap_or_default();
    let out_path = out.get(..out_end).unwrap_or_default();
    let out_query = out.get(out_end..out_len).unwrap_or_default();

    assert_eq!(in_query, out_query, "query changed: {input:?} -> {out:?}");
    assert!(out_path.starts_with('/'), "{input:?} -> {out:?}");
    assert!(!out_path.contains("/./"), "{input:?} -> {out:?}");
    assert!(!out_path.contains("/../"), "{input:?} -> {out:?}");
    assert!(!out_path.ends_with("/."), "{input:?} -> {out:?}");
    assert!(!out_path.ends_with("/.."), "{input:?} -> {out:?}");
    if opts.merge_slashes {
        assert!(!out_path.contains("//"), "{input:?} -> {out:?}");
    }
    assert!(!out_path.contains('\\'), "{input:?} -> {out:?}");

    let bytes = out_path.as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, &b)| b == b'%') {
        let hi = bytes.get(i + 1).copied().unwrap_or(0);
        let lo = bytes.get(i + 2).copied().unwrap_or(0);
        assert!(
            hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit(),
            "bad escape in {out:?}"
        );
        assert!(
            !hi.is_ascii_lowercase() && !lo.is_ascii_lowercase(),
            "lowercase escape in {out:?}"
        );
        let decoded = (hex_value(hi).unwrap_or(0) << 4) | hex_value(lo).unwrap_or(0);
        assert!(
            !is_unreserved(decoded),
            "encoded unreserved char in {out:?}"
        );
        if opts.escaped_slashes == EscapedSlashes::Redirect {
            assert!(
                !is_slash_like(decoded),
                "escaped slash left in redirect {out:?}"
            );
        }
    }

    assert_eq!(
        normalize(out, &opts),
        Ok(Normalized::Unchanged),
        "not idempotent: {input:?} -> {out:?}"
    );
    // The fast path must only say "unchanged" when the full rewrite agrees,
    // otherwise a path could skip normalization.
    if result == Ok(Normalized::Unchanged) {
        let in_path = input.get(..in_end).unwrap_or_default();
        assert_eq!(
            rewrite_path(in_path, &opts),
            in_path,
            "fast path missed a rewrite"
        );
    }
}

/// What the single validating pass learned.
struct Scan {
    /// Index of the first `?`, or the length: where the path ends.
    path_end: usize,
    /// The path differs from its normal form; false is the no-allocation
    /// fast path.
    needs_rewrite: bool,
    /// `%2F`, `%5C` or `\` was seen.
    escaped_slash: bool,
}

/// Validates the path and decides whether it is already normal, in one pass
/// over the bytes that allocates nothing.
///
/// Byte-level errors are reported at the first offending byte; an escaped
/// slash under `Reject` only after the whole path validated, so a target
/// with both problems reports the byte problem, as the order of the
/// normalization steps says.
fn scan(input: &str, opts: &PathOptions) -> Result<Scan, PathRejection> {
    let bytes = input.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathRejection::NotAbsolute);
    }
    let mut needs_rewrite = false;
    let mut escaped_slash = false;
    // Start of the current segment: the byte after the last '/'.
    let mut seg_start = 1;
    let mut i = 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'?' => break,
            b'/' => {
                let segment = bytes.get(seg_start..i).unwrap_or_default();
                // An empty segment before this '/' means "//".
                if is_dot_segment(segment) || (opts.merge_slashes && segment.is_empty()) {
                    needs_rewrite = true;
                }
                seg_start = i + 1;
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).copied().unwrap_or(0);
                let lo = bytes.get(i + 2).copied().unwrap_or(0);
                let decoded = match (hex_value(hi), hex_value(lo)) {
                    (Some(h), Some(l)) => (h << 4) | l,
                    _ => return Err(PathRejection::BadPercentEncoding),
                };
                if is_slash_like(decoded) {
                    escaped_slash = true;
                    if opts.escaped_slashes == EscapedSlashes::Redirect {
                        needs_rewrite = true;
                    }
                }
                // Encoded dots land here too, so "%2e%2e" is caught without
                // a separate check.
                if is_unreserved(decoded) || hi.is_ascii_lowercase() || lo.is_ascii_lowercase() {
                    needs_rewrite = true;
                }
                i += 3;
            }
            b'\\' => {
                if opts.escaped_slashes != EscapedSlashes::Redirect {
                    return Err(PathRejection::Backslash);
                }
                escaped_slash = true;
                needs_rewrite = true;
                i += 1;
            }
            0x00..=0x20 | 0x7F | b'#' | 0x80..=0xFF => return Err(PathRejection::InvalidByte),
            _ => i += 1,
        }
    }
    let path_end = i;
    if is_dot_segment(bytes.get(seg_start..path_end).unwrap_or_default()) {
        needs_rewrite = true;
    }
    if escaped_slash && opts.escaped_slashes == EscapedSlashes::Reject {
        return Err(PathRejection::EscapedSlash);
    }
    Ok(Scan {
        path_end,
        needs_rewrite,
        escaped_slash,
    })
}

/// Builds the normal form of a path that [`scan`] accepted (no query).
///
/// Kept total on any input (an unvalidated byte is copied through) so that
/// misuse cannot panic the proxy.
fn rewrite_path(path: &str, opts: &PathOptions) -> String {
    let decoded = decode(path, opts.escaped_slashes);
    remove_dot_segments(&decoded, opts.merge_slashes)
}

/// Percent-decoding per RFC 3986 6.2.2.2: only unreserved characters are
/// decoded, because decoding anything else (e.g. `%3F`, `%25`) would change
/// what the path means; the hex of the remaining escapes is uppercased
/// (6.2.2.1) so equal paths compare equal. Under `Redirect`, escaped
/// slashes and `\` become real separators here, before dot segments are
/// removed, so `a%2F..%2Fb` cannot smuggle a `..` past that step.
fn decode(path: &str, escaped_slashes: EscapedSlashes) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).copied().unwrap_or(0);
                let lo = bytes.get(i + 2).copied().unwrap_or(0);
                if let (Some(h), Some(l)) = (hex_value(hi), hex_value(lo)) {
                    let decoded = (h << 4) | l;
                    if is_unreserved(decoded) {
                        out.push(char::from(decoded));
                    } else if is_slash_like(decoded) && escaped_slashes == EscapedSlashes::Redirect
                    {
                        out.push('/');
                    } else {
                        out.push('%');
                        out.push(char::from(hi.to_ascii_uppercase()));
                        out.push(char::from(lo.to_ascii_uppercase()));
                    }
                    i += 3;
                    continue;
                }
                out.push('%');
                i += 1;
            }
            b'\\' if escaped_slashes == EscapedSlashes::Redirect => {
                out.push('/');
                i += 1;
            }
            _ if b.is_ascii() => {
                out.push(char::from(b));
                i += 1;
            }
            _ => {
                // Not reachable after `scan`; copy the whole character so
                // the function stays total and never splits UTF-8.
                let ch = path.get(i..).and_then(|s| s.chars().next());
                match ch {
                    Some(ch) => {
                        out.push(ch);
                        i += ch.len_utf8();
                    }
                    None => i += 1,
                }
            }
        }
    }
    out
}

/// RFC 3986 5.2.4 over whole segments, optionally merging empty ones.
///
/// `..` above the root stays at the root rather than failing, as browsers
/// and the RFC do; a trailing `.` or `..` leaves a trailing slash, because
/// `/a/b/..` names the directory `/a/`, not the resource `/a`.
fn remove_dot_segments(path: &str, merge_slashes: bool) -> String {
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut stack: Vec<&str> = Vec::new();
    let mut segments = body.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                stack.pop();
            }
            "" if merge_slashes && !last => continue,
            _ => {
                stack.push(segment);
                continue;
            }
        }
        if last {
            stack.push("");
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for segment in &stack {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Whether a raw segment is `.` or `..`; encoded dots are handled by the
/// decoding rule instead.
fn is_dot_segment(segment: &[u8]) -> bool {
    segment == b"." || segment == b".."
}

/// RFC 3986 2.3: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_slash_like(b: u8) -> bool {
    b == b'/' || b == b'\\'
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(escaped_slashes: EscapedSlashes, merge_slashes: bool) -> PathOptions {
        PathOptions {
            escaped_slashes,
            merge_slashes,
        }
    }

    fn norm(input: &str) -> Result<Normalized, PathRejection> {
        normalize(input, &PathOptions::default())
    }

    fn rewritten(s: &str) -> Result<Normalized, PathRejection> {
        Ok(Normalized::Rewritten(s.to_owned()))
    }

    fn redirect(s: &str) -> Result<Normalized, PathRejection> {
        Ok(Normalized::Redirect(s.to_owned()))
    }

    const UNCHANGED: Result<Normalized, PathRejection> = Ok(Normalized::Unchanged);

    /// (input, expected output) under the default options; shared by the
    /// behaviour test and the idempotence test so every rewrite is checked
    /// twice.
    const REWRITES: &[(&str, &str)] = &[
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2e/admin", "/admin"),
        ("/public/.%2e/admin", "/admin"),
        ("/public/%2e./admin", "/admin"),
        ("//admin", "/admin"),
        ("/a//b///c", "/a/b/c"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/../", "/a/"),
        ("/..", "/"),
        ("/.", "/"),
        ("/../x", "/x"),
        ("/../../x/../..", "/"),
        ("/%7Euser/%41bc", "/~user/Abc"),
        ("/%7euser", "/~user"),
        ("/a%3f", "/a%3F"),
        ("/%c3%a9", "/%C3%A9"),
        ("/a%25", "/a%25"),
        ("/a/../b?q=%2e", "/b?q=%2e"),
        ("/a/./b?x=/../&y=//", "/a/b?x=/../&y=//"),
        ("//?x", "/?x"),
        ("/a/%2e/b/%2E%2E/c", "/a/c"),
        ("/%252e%252e/x", "/%252e%252e/x"),
        ("/a%2525", "/a%2525"),
    ];

    #[test]
    fn rewrites_with_default_options() {
        for &(input, expected) in REWRITES {
            let want = if input == expected {
                UNCHANGED
            } else {
                rewritten(expected)
            };
            assert_eq!(norm(input), want, "{input}");
        }
    }

    #[test]
    fn rewritten_outputs_are_idempotent() {
        for &(input, expected) in REWRITES {
            assert_eq!(norm(expected), UNCHANGED, "{input} -> {expected}");
        }
        for esc in [
            EscapedSlashes::Reject,
            EscapedSlashes::Redirect,
            EscapedSlashes::Keep,
        ] {
            for merge in [true, false] {
                let o = opts(esc, merge);
                for input in [
                    "/x%2fy/../z",
                    "/x%5cy//./",
                    "/a\\..\\b",
                    "/a//b/..",
                    "/.%2E/%2e",
                ] {
                    if let Ok(Normalized::Rewritten(out) | Normalized::Redirect(out)) =
                        normalize(input, &o)
                    {
                        assert_eq!(normalize(&out, &o), UNCHANGED, "{input} -> {out} {o:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn dot_dot_bypass_is_closed() {
        assert_eq!(norm("/public/../admin"), rewritten("/admin"));
    }

    #[test]
    fn encoded_dot_dot_bypass_is_closed() {
        assert_eq!(norm("/public/%2e%2e/admin"), rewritten("/admin"));
        assert_eq!(norm("/public/%2E%2e/admin"), rewritten("/admin"));
        assert_eq!(norm("/public/.%2e/admin"), rewritten("/admin"));
    }

    #[test]
    fn double_slash_bypass_is_closed() {
        assert_eq!(norm("//admin"), rewritten("/admin"));
    }

    #[test]
    fn merge_slashes_can_be_disabled() {
        let o = opts(EscapedSlashes::Reject, false);
        assert_eq!(norm("/a//b///c"), rewritten("/a/b/c"));
        assert_eq!(normalize("/a//b///c", &o), UNCHANGED);
        assert_eq!(normalize("//admin", &o), UNCHANGED);
        // RFC 3986 5.2.4 treats the empty segment like any other.
        assert_eq!(normalize("/a//b/..", &o), rewritten("/a//"));
        assert_eq!(normalize("/a//..", &o), rewritten("/a/"));
        assert_eq!(normalize("/a//./b", &o), rewritten("/a//b"));
    }

    #[test]
    fn dot_segments() {
        assert_eq!(norm("/a/./b"), rewritten("/a/b"));
        assert_eq!(norm("/a/b/.."), rewritten("/a/"));
        assert_eq!(norm("/.."), rewritten("/"));
        assert_eq!(norm("/../x"), rewritten("/x"));
        // Dots inside a segment are ordinary characters.
        assert_eq!(norm("/a/.../b/..c/.d"), UNCHANGED);
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        assert_eq!(norm("/%7Euser/%41bc"), rewritten("/~user/Abc"));
        assert_eq!(norm("/%2D%5F%30"), rewritten("/-_0"));
    }

    #[test]
    fn other_escapes_are_uppercased_not_decoded() {
        assert_eq!(norm("/%c3%a9"), rewritten("/%C3%A9"));
        assert_eq!(norm("/a%3fb"), rewritten("/a%3Fb"));
        assert_eq!(norm("/%C3%A9"), UNCHANGED);
        assert_eq!(norm("/%25"), UNCHANGED);
    }

    #[test]
    fn escaped_slash_per_option() {
        for input in ["/x%2fy", "/x%2Fy"] {
            assert_eq!(norm(input), Err(PathRejection::EscapedSlash), "{input}");
            let redirect_opts = opts(EscapedSlashes::Redirect, true);
            assert_eq!(
                normalize(input, &redirect_opts),
                redirect("/x/y"),
                "{input}"
            );
            let keep = opts(EscapedSlashes::Keep, true);
            let want = if input == "/x%2Fy" {
                UNCHANGED
            } else {
                rewritten("/x%2Fy")
            };
            assert_eq!(normalize(input, &keep), want, "{input}");
        }
    }

    #[test]
    fn escaped_backslash_per_option() {
        for input in ["/x%5cy", "/x%5Cy"] {
            assert_eq!(norm(input), Err(PathRejection::EscapedSlash), "{input}");
            let redirect_opts = opts(EscapedSlashes::Redirect, true);
            assert_eq!(
                normalize(input, &redirect_opts),
                redirect("/x/y"),
                "{input}"
            );
            let keep = opts(EscapedSlashes::Keep, true);
            let want = if input == "/x%5Cy" {
                UNCHANGED
            } else {
                rewritten("/x%5Cy")
            };
            assert_eq!(normalize(input, &keep), want, "{input}");
        }
    }

    #[test]
    fn literal_backslash_per_option() {
        let keep = opts(EscapedSlashes::Keep, true);
        let redirect_opts = opts(EscapedSlashes::Redirect, true);
        assert_eq!(norm("/x\\y"), Err(PathRejection::Backslash));
        assert_eq!(normalize("/x\\y", &keep), Err(PathRejection::Backslash));
        assert_eq!(normalize("/x\\y", &redirect_opts), redirect("/x/y"));
    }

    #[test]
    fn redirect_normalizes_after_unescaping() {
        let o = opts(EscapedSlashes::Redirect, true);
        assert_eq!(normalize("/public%2F..%2Fadmin", &o), redirect("/admin"));
        assert_eq!(normalize("/a%2F%2Fb?q=%2F", &o), redirect("/a/b?q=%2F"));
        assert_eq!(normalize("/a\\..\\b", &o), redirect("/b"));
        // No escaped slash: an ordinary rewrite, not a redirect.
        assert_eq!(normalize("/a/../b", &o), rewritten("/b"));
    }

    #[test]
    fn keep_treats_escaped_slash_as_segment_data() {
        let o = opts(EscapedSlashes::Keep, true);
        assert_eq!(normalize("/a/..%2F/b", &o), UNCHANGED);
        assert_eq!(normalize("/a/x%2f../..", &o), rewritten("/a/"));
    }

    #[test]
    fn bad_percent_encoding() {
        assert_eq!(norm("/a%zz"), Err(PathRejection::BadPercentEncoding));
        assert_eq!(norm("/a%"), Err(PathRejection::BadPercentEncoding));
        assert_eq!(norm("/a%2"), Err(PathRejection::BadPercentEncoding));
        assert_eq!(norm("/a%2?x"), Err(PathRejection::BadPercentEncoding));
        assert_eq!(norm("/a%?41"), Err(PathRejection::BadPercentEncoding));
    }

    #[test]
    fn not_absolute() {
        assert_eq!(norm("a/b"), Err(PathRejection::NotAbsolute));
        assert_eq!(norm(""), Err(PathRejection::NotAbsolute));
        assert_eq!(norm("?x"), Err(PathRejection::NotAbsolute));
        assert_eq!(norm("*"), Err(PathRejection::NotAbsolute));
    }

    #[test]
    fn invalid_bytes() {
        for input in [
            "/a b", "/a\x01", "/a#frag", "/a\x7f", "/\u{0}", "/é", "/a\tb",
        ] {
            assert_eq!(norm(input), Err(PathRejection::InvalidByte), "{input:?}");
        }
        assert_eq!(norm("/%C3%A9"), UNCHANGED);
    }

    #[test]
    fn byte_errors_win_over_escaped_slash() {
        assert_eq!(norm("/a%2Fb c"), Err(PathRejection::InvalidByte));
        assert_eq!(norm("/a%2Fb%"), Err(PathRejection::BadPercentEncoding));
    }

    #[test]
    fn query_is_untouched() {
        assert_eq!(norm("/api/v1/items?id=3&x=/../"), UNCHANGED);
        assert_eq!(norm("/a/../b?q=%2e"), rewritten("/b?q=%2e"));
        // The query is the application's; even bytes refused in a path pass.
        assert_eq!(norm("/a?x=%zz%2f\\ #"), UNCHANGED);
        assert_eq!(norm("/a/.?%2F"), rewritten("/a/?%2F"));
    }

    #[test]
    fn already_normal_paths_are_unchanged() {
        for input in [
            "/",
            "/?x",
            "/?",
            "/api/v1/items?id=3",
            "/a/",
            "/a/b/c.html",
            "/~user/%20x",
            "/a:b@c!$&'()*+,;=",
        ] {
            assert_eq!(norm(input), UNCHANGED, "{input}");
        }
    }

    #[test]
    fn prefix_matches_whole_segments() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/api-internal"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
        assert!(!prefix_matches("/api", "/"));
        assert!(prefix_matches("/api/", "/api/"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(!prefix_matches("/api/", "/api-internal/x"));
        for path in ["/", "/api", "/anything/at/all", ""] {
            assert!(prefix_matches("", path), "{path}");
            assert!(prefix_matches("/", path), "{path}");
        }
    }

    #[test]
    fn rejection_messages_are_actionable() {
        assert!(PathRejection::BadPercentEncoding
            .to_string()
            .contains("%25"));
        assert!(PathRejection::NotAbsolute.to_string().contains('/'));
        let err: Box<dyn Error> = Box::new(PathRejection::InvalidByte);
        assert!(err.to_string().contains("%20"));
    }

    #[test]
    fn fuzz_handles_edge_inputs() {
        fuzz_normalize(b"");
        fuzz_normalize(b"\x00");
        fuzz_normalize(b"\x01/a\\..\\b");
        fuzz_normalize(b"\x02/a%2f..%2F");
        fuzz_normalize(b"\x80//a//..");
        fuzz_normalize(b"\x00/\xff\xfe");
        fuzz_normalize(b"\x00/%");
    }

    /// Deterministic so a failure reproduces; the fragments are the pieces
    /// bypasses are made of.
    #[test]
    fn fuzz_generated_inputs_never_panic() {
        const FRAGMENTS: &[&str] = &[
            "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "%", "a", "b",
            "%41", "%7e", "%c3%a9", "?", "%zz", "é", "\u{0}", " ", "#", "%25", "%2", "~", "-",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64: tiny, deterministic, good enough to mix fragments.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut buf = Vec::with_capacity(64);
        let mut accepted = 0;
        for _ in 0..20_000 {
            buf.clear();
            buf.push((next() & 0xFF) as u8);
            // Most real targets start with '/', so bias towards it to get
            // past NotAbsolute and exercise the normalizer.
            if next() % 8 != 0 {
                buf.push(b'/');
            }
            let len = next() % 10;
            for _ in 0..len {
                let idx = (next() % FRAGMENTS.len() as u64) as usize;
                buf.extend_from_slice(FRAGMENTS[idx].as_bytes());
            }
            // Occasionally add raw bytes, which may not be UTF-8.
            if next() % 16 == 0 {
                buf.push((next() & 0xFF) as u8);
            }
            fuzz_normalize(&buf);
            if let Some((&first, rest)) = buf.split_first() {
                let o = PathOptions {
                    escaped_slashes: match first % 3 {
                        0 => EscapedSlashes::Reject,
                        1 => EscapedSlashes::Redirect,
                        _ => EscapedSlashes::Keep,
                    },
                    merge_slashes: first & 0x80 == 0,
                };
                if normalize(&String::from_utf8_lossy(rest), &o).is_ok() {
                    accepted += 1;
                }
            }
        }
        // Guard against a generator that only produces rejected inputs.
        assert!(accepted > 2_000, "only {accepted} inputs were accepted");
    }
}
