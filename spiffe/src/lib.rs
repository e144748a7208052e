//! Workload identity for Weft: SPIFFE IDs and the X.509-SVIDs that carry them.
//!
//! This crate owns two things and nothing else:
//!
//! * [`SpiffeId`], a strict parser for workload SPIFFE IDs following the
//!   SPIFFE ID specification (section 2), shared by the sidecar proxy and the
//!   control plane so both sides agree byte-for-byte on what an identity is;
//! * extraction of that ID (and the validity window) from a DER-encoded
//!   X.509-SVID: [`from_cert_der`] and [`validity`].
//!
//! It deliberately does **not** verify certificates. Chain building, signature
//! and expiry checks belong to the TLS stack; only call [`from_cert_der`] on a
//! certificate that has already been authenticated, otherwise the returned ID
//! is just an unverified claim.
//!
//! [`fuzzing::parse_never_panics`] is the entry point for `cargo fuzz`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;

mod cert;
mod id;

pub use cert::{from_cert_der, validity};
pub use id::SpiffeId;

/// Why a string or certificate does not yield a workload SPIFFE ID.
///
/// Every parse variant keeps the offending input so that a log line on its
/// own is enough to tell which peer or config entry was wrong. Inputs are
/// printed with `{:?}` because they often come from untrusted certificates
/// and must not be able to inject control characters into logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeError {
    /// The ID does not start with the lowercase scheme `spiffe://`.
    #[error("{input:?}: must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme {
        /// The rejected input.
        input: String,
    },

    /// The whole ID is longer than 2048 bytes.
    #[error("{}: SPIFFE ID is {len} bytes, the maximum is 2048", Excerpt(.input))]
    TooLong {
        /// The start of the rejected input; the rest is dropped so that an
        /// oversized input cannot also bloat the error.
        input: String,
        /// Length of the full input in bytes.
        len: usize,
    },

    /// Nothing between `spiffe://` and the path.
    #[error("{input:?}: trust domain is empty")]
    EmptyTrustDomain {
        /// The rejected input.
        input: String,
    },

    /// The trust domain alone is longer than 255 bytes.
    #[error("{input:?}: trust domain is {len} bytes, the maximum is 255")]
    TrustDomainTooLong {
        /// The rejected input.
        input: String,
        /// Length of the trust domain in bytes.
        len: usize,
    },

    /// The trust domain has a character outside `a-z 0-9 . - _`.
    #[error(
        "{input:?}: trust domain contains an uppercase letter or a character other than \
         a-z 0-9 . - _ (found {ch:?})"
    )]
    BadTrustDomainChar {
        /// The rejected input.
        input: String,
        /// The first offending character.
        ch: char,
    },

    /// A query (`?`) or fragment (`#`) appears in the ID.
    #[error("{input:?}: SPIFFE IDs cannot have a query ('?') or fragment ('#')")]
    QueryOrFragment {
        /// The rejected input.
        input: String,
    },

    /// The ID has no path, i.e. it names a trust domain, not a workload.
    #[error("{input:?}: missing path; the mesh only accepts workload IDs (spiffe://<trust-domain>/<path>)")]
    MissingPath {
        /// The rejected input.
        input: String,
    },

    /// The path has an empty segment (`//`).
    #[error("{input:?}: path contains an empty segment (\"//\")")]
    EmptySegment {
        /// The rejected input.
        input: String,
    },

    /// The path ends with `/`.
    #[error("{input:?}: path must not end with '/'")]
    TrailingSlash {
        /// The rejected input.
        input: String,
    },

    /// A path segment is `.` or `..`.
    #[error("{input:?}: path contains a '.' or '..' segment")]
    DotSegment {
        /// The rejected input.
        input: String,
    },

    /// A path segment has a character outside `A-Z a-z 0-9 . - _`.
    #[error(
        "{input:?}: path segment contains {ch:?}; only A-Z a-z 0-9 . - _ are allowed \
         (no percent-encoding)"
    )]
    BadPathChar {
        /// The rejected input.
        input: String,
        /// The first offending character.
        ch: char,
    },

    /// The bytes are not a DER X.509 certificate, or its extensions are malformed.
    #[error("not a valid X.509 certificate: {0}")]
    BadCertificate(String),

    /// The certificate has no `spiffe://` URI subjectAltName.
    #[error("certificate has no spiffe:// URI subjectAltName")]
    Missing,

    /// The certificate has more than one URI subjectAltName; an X.509-SVID
    /// must have exactly one, so picking one would be guessing.
    #[error(
        "certificate has {n} URI subjectAltNames, an X.509-SVID must have exactly one: {uris:?}",
        n = .0.len(),
        uris = .0
    )]
    Ambiguous(Vec<String>),
}

/// Bytes of an over-long input kept in [`SpiffeError::TooLong`].
pub(crate) const EXCERPT_BYTES: usize = 64;

/// Cuts `input` to at most [`EXCERPT_BYTES`] without splitting a character.
pub(crate) fn excerpt(input: &str) -> String {
    let mut end = input.len().min(EXCERPT_BYTES);
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    input[..end].to_owned()
}

/// Shows a truncated input so that readers do not mistake it for the full ID.
struct Excerpt<'a>(&'a String);

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}...", self.0)
    }
}

pub mod fuzzing {
    //! Entry points for `cargo fuzz`, kept in the library so the invariants are
    //! also exercised by the normal test suite.

    use crate::SpiffeId;

    /// Parses arbitrary bytes as a SPIFFE ID and panics if an accepted ID breaks
    /// one of the type's invariants. Rejections are fine; panics are the bug.
    pub fn parse_never_panics(data: &[u8]) {
        let input = String::from_utf8_lossy(data);
        let id = match SpiffeId::parse(&input) {
            Ok(id) => id,
            Err(err) => {
                // Formatting the error must not panic either (e.g. excerpts must
                // respect char boundaries).
                let _ = err.to_string();
                return;
            }
        };

        assert_eq!(id.as_str(), input, "parse must not normalise");
        let text = id.to_string();
        let reparsed = SpiffeId::parse(&text).ok();
        assert_eq!(reparsed.as_ref(), Some(&id), "Display must round-trip");
        assert!(text.len() <= 2048);

        let td = id.trust_domain();
        assert!(!td.is_empty() && td.len() <= 255);
        assert!(td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')));

        let path = id.path();
        assert!(path.starts_with('/'));
        for segment in path[1..].split('/') {
            assert!(!segment.is_empty() && segment != "." && segment != "..");
            assert!(segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
        }

        if let Some(ns) = id.namespace() {
            assert!(!ns.is_empty());
        }
        if let Some((ns, sa)) = id.workload() {
            assert!(!ns.is_empty() && !sa.is_empty());
            assert_eq!(id.namespace(), Some(ns));
            assert_eq!(path, format!("/ns/{ns}/sa/{sa}"));
        }
    }
}
