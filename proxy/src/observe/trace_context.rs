//! W3C Trace Context (`traceparent`, <https://www.w3.org/TR/trace-context/>): parsing with the
//! spec's validation rules, formatting, fresh ids and the sampling decision.
//!
//! Only `traceparent` is interpreted. `tracestate` and B3 headers (`b3`, `x-b3-*`) are forwarded
//! untouched: the proxy never removes them, so they reach the next hop as the client sent them.

use std::fmt;

/// `traceparent`.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// A 16-byte trace id; all zeroes is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span (parent) id; all zeroes is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random, valid trace id.
    pub fn random() -> Self {
        loop {
            let id: [u8; 16] = rand::random();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }
}

impl SpanId {
    /// A random, valid span id.
    pub fn random() -> Self {
        loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }
}

fn write_hex(f: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        f.write_char(char::from(HEX[usize::from(b >> 4)]))?;
        f.write_char(char::from(HEX[usize::from(b & 0xf)]))?;
    }
    Ok(())
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The `sampled` bit of the trace flags.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: `version-traceid-parentid-flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: TraceId,
    /// The span of the sender (the parent of the receiver's span).
    pub parent_id: SpanId,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Lower-case hex only: the spec forbids upper case in `traceparent`.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

impl TraceParent {
    /// A new root context: fresh trace and span ids.
    pub fn new_root(sampled: bool) -> Self {
        Self {
            trace_id: TraceId::random(),
            parent_id: SpanId::random(),
            flags: if sampled { FLAG_SAMPLED } else { 0 },
        }
    }

    /// Parses a `traceparent` value; `None` if it is invalid by the spec (then the receiver
    /// treats the request as having none):
    /// - version `ff` is invalid; version `00` must be exactly 55 characters; a higher version
    ///   may append `-`-separated fields after the four known ones;
    /// - all fields lower-case hex of their exact lengths; trace id and parent id not all zero.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let value = value.trim_ascii();
        if value.len() < 55 {
            return None;
        }
        let version = parse_hex::<1>(&value[0..2])?[0];
        if version == 0xff {
            return None;
        }
        if version == 0 && value.len() != 55 {
            return None;
        }
        if value.len() > 55 && value[55] != b'-' {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let trace_id = parse_hex::<16>(&value[3..35])?;
        let parent_id = parse_hex::<8>(&value[36..52])?;
        let flags = parse_hex::<1>(&value[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id: TraceId(trace_id),
            parent_id: SpanId(parent_id),
            flags,
        })
    }

    /// Whether the sender sampled (recorded) this trace.
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// This context with `span` as the parent id: what a hop sends on after starting its span.
    pub fn child(&self, span: SpanId) -> Self {
        Self {
            parent_id: span,
            ..*self
        }
    }

    /// The version-00 header value (55 characters).
    pub fn to_header(&self) -> http::HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        let mut put = |at: usize, bytes: &[u8]| {
            for (i, b) in bytes.iter().enumerate() {
                out[at + 2 * i] = HEX[usize::from(b >> 4)];
                out[at + 2 * i + 1] = HEX[usize::from(b & 0xf)];
            }
        };
        put(3, &self.trace_id.0);
        put(36, &self.parent_id.0);
        put(53, &[self.flags]);
        // Only hex digits and '-': always a valid header value.
        http::HeaderValue::from_bytes(&out).unwrap_or_else(|_| http::HeaderValue::from_static(""))
    }
}

/// Whether to start a sampled trace, with probability `ratio` (0 = never, 1 = always).
pub fn sample(ratio: f64) -> bool {
    if ratio <= 0.0 {
        false
    } else if ratio >= 1.0 {
        true
    } else {
        rand::random::<f64>() < ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let tp = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert!(tp.sampled());
        assert_eq!(tp.to_header(), VALID);
        let unsampled =
            TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());
        // Surrounding whitespace (OWS) is tolerated.
        assert!(TraceParent::parse(format!(" {VALID} ").as_bytes()).is_some());
    }

    #[test]
    fn rejects_invalid_values() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // upper case
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero trace id / parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // version 00 with extra fields
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // wrong separators / lengths / non-hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b:?}");
        }
    }

    #[test]
    fn future_versions_may_append_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        let tp = TraceParent::parse(v.as_bytes()).unwrap();
        assert!(tp.sampled());
        // ...but only after a '-'.
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(v.as_bytes()), None);
        // We always send version 00.
        assert!(tp.to_header().to_str().unwrap().starts_with("00-"));
    }

    #[test]
    fn child_keeps_trace_and_flags() {
        let tp = TraceParent::parse(VALID.as_bytes()).unwrap();
        let span = SpanId([1, 2, 3, 4, 5, 6, 7, 8]);
        let child = tp.child(span);
        assert_eq!(child.trace_id, tp.trace_id);
        assert_eq!(child.flags, tp.flags);
        assert_eq!(
            child.to_header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
    }

    #[test]
    fn new_roots_are_valid_and_distinct() {
        let a = TraceParent::new_root(true);
        let b = TraceParent::new_root(false);
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.sampled() && !b.sampled());
        let round = TraceParent::parse(a.to_header().as_bytes()).unwrap();
        assert_eq!(round, a);
    }

    #[test]
    fn sampling_ratio() {
        assert!((0..1000).all(|_| !sample(0.0)));
        assert!((0..1000).all(|_| sample(1.0)));
        let hits = (0..10_000).filter(|_| sample(0.25)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
    }
}
