use std::fmt;
use std::str::FromStr;

use crate::{excerpt, SpiffeError};

const SCHEME: &str = "spiffe://";
const MAX_ID_BYTES: usize = 2048;
const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// A validated workload SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/web`.
///
/// Only workload IDs (with a non-empty path) are representable; trust-domain
/// IDs such as `spiffe://cluster.local` are rejected by [`SpiffeId::parse`].
/// The ID is kept exactly as given (no normalisation), so equality and hashing
/// are plain byte comparisons of the URI.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    // Byte offset where the path starts. It is derived from `uri`, so the
    // derived comparisons above still only depend on the URI text.
    path_start: usize,
}

impl SpiffeId {
    /// Parses a workload SPIFFE ID, rejecting anything the SPIFFE ID
    /// specification does not allow and any ID without a path.
    pub fn parse(input: &str) -> Result<Self, SpiffeError> {
        let path_start = validate(input)?;
        Ok(Self {
            uri: input.to_owned(),
            path_start,
        })
    }

    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service>`.
    ///
    /// Each part is checked on its own, because a `/` inside `namespace` or
    /// `service` would still give a syntactically valid ID, just a different
    /// (and possibly more privileged) identity than the caller meant.
    pub fn workload_id(
        trust_domain: &str,
        namespace: &str,
        service: &str,
    ) -> Result<Self, SpiffeError> {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service}");
        check_trust_domain(&uri, trust_domain)?;
        check_segment(&uri, namespace, false)?;
        check_segment(&uri, service, true)?;
        let path_start = validate(&uri)?;
        Ok(Self { uri, path_start })
    }

    /// The full URI, e.g. `spiffe://cluster.local/ns/default/sa/web`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain, e.g. `cluster.local`. Never empty, always lowercase.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The path including its leading `/`, e.g. `/ns/default/sa/web`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The namespace when the path has the form `/ns/<namespace>/...`.
    pub fn namespace(&self) -> Option<&str> {
        let mut segments = self.segments();
        match (segments.next(), segments.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }

    /// `(namespace, service_account)` when the path is exactly
    /// `/ns/<namespace>/sa/<service_account>`.
    ///
    /// Longer paths return `None` on purpose: treating
    /// `/ns/a/sa/b/extra` as service account `b` would let one identity
    /// impersonate another in authorization policies.
    pub fn workload(&self) -> Option<(&str, &str)> {
        let mut segments = self.segments();
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    fn segments(&self) -> std::str::Split<'_, char> {
        // The path always starts with '/', so skipping one byte is safe and
        // avoids yielding a leading empty segment.
        self.path()[1..].split('/')
    }
}

/// Checks `input` and returns the byte offset where its path starts.
fn validate(input: &str) -> Result<usize, SpiffeError> {
    // Length first, so an oversized input is rejected before any scanning.
    if input.len() > MAX_ID_BYTES {
        return Err(SpiffeError::TooLong {
            input: excerpt(input),
            len: input.len(),
        });
    }
    let Some(rest) = input.strip_prefix(SCHEME) else {
        return Err(SpiffeError::WrongScheme {
            input: input.to_owned(),
        });
    };
    // Checked on the whole remainder because '?' or '#' would end the URI
    // authority or path early, so a per-part check would give a misleading
    // message.
    if rest.contains(['?', '#']) {
        return Err(SpiffeError::QueryOrFragment {
            input: input.to_owned(),
        });
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    check_trust_domain(input, trust_domain)?;
    let Some(path_without_slash) = path.strip_prefix('/') else {
        return Err(SpiffeError::MissingPath {
            input: input.to_owned(),
        });
    };
    let mut segments = path_without_slash.split('/').peekable();
    while let Some(segment) = segments.next() {
        check_segment(input, segment, segments.peek().is_none())?;
    }
    Ok(SCHEME.len() + trust_domain.len())
}

fn check_trust_domain(input: &str, trust_domain: &str) -> Result<(), SpiffeError> {
    if trust_domain.is_empty() {
        return Err(SpiffeError::EmptyTrustDomain {
            input: input.to_owned(),
        });
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(SpiffeError::TrustDomainTooLong {
            input: input.to_owned(),
            len: trust_domain.len(),
        });
    }
    if let Some(ch) = trust_domain
        .chars()
        .find(|&c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeError::BadTrustDomainChar {
            input: input.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// `is_last` only decides which error an empty segment gets: at the end of
/// the path it is a trailing slash, elsewhere a `//`.
fn check_segment(input: &str, segment: &str, is_last: bool) -> Result<(), SpiffeError> {
    if segment.is_empty() {
        let input = input.to_owned();
        return Err(if is_last {
            SpiffeError::TrailingSlash { input }
        } else {
            SpiffeError::EmptySegment { input }
        });
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeError::DotSegment {
            input: input.to_owned(),
        });
    }
    if let Some(ch) = segment
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeError::BadPathChar {
            input: input.to_owned(),
            ch,
        });
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.uri).finish()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeError;

    /// Like [`SpiffeId::parse`] but reuses the string's allocation.
    fn try_from(uri: String) -> Result<Self, Self::Error> {
        let path_start = validate(&uri)?;
        Ok(Self { uri, path_start })
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_split_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
    }

    #[test]
    fn excerpt_never_splits_a_character() {
        let s = "é".repeat(100);
        let e = excerpt(&s);
        assert!(e.len() <= crate::EXCERPT_BYTES);
        assert!(s.starts_with(&e));
    }
}
