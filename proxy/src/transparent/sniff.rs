//! Protocol detection of a captured connection: peek (nothing consumed) at its first bytes
//! until [`crate::detect::classify`] decides or the deadline passes.
//!
//! `peek` on a socket that already holds bytes returns them again at once, so waiting for *more*
//! bytes (a request line or ClientHello split over segments) is a short sleep between peeks,
//! doubling from 1 ms up to 16 ms, never past the deadline. A client that sent nothing by then is
//! [`Sniffed::Timeout`] (opaque TCP); one that sent an undecided prefix is classified on what it
//! sent (a TLS record prefix is TLS without SNI, anything else opaque).

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::detect::{classify, is_tls_prefix, Detection, MAX_DETECT_BYTES};

/// What a captured connection's first bytes are, as counted in
/// `weft_protocol_detections_total{result}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1 request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS ClientHello, with its SNI.
    Tls {
        /// The hello's server name.
        sni: Option<String>,
    },
    /// Anything else.
    Opaque,
    /// Nothing within the timeout.
    Timeout,
    /// Not looked at: a server-first or opaque port, or an opaque destination.
    Skipped,
    /// The client closed (or the socket failed) before sending anything.
    Closed,
}

impl Sniffed {
    /// The `result` label; `None` for a connection that closed (not counted).
    pub fn label(&self) -> Option<&'static str> {
        Some(match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Tls { .. } => "tls",
            Self::Opaque => "opaque",
            Self::Timeout => "timeout",
            Self::Skipped => "skipped",
            Self::Closed => return None,
        })
    }

    /// HTTP/1 or HTTP/2 (the HTTP path serves it).
    pub fn is_http(&self) -> bool {
        matches!(self, Self::Http1 | Self::Http2)
    }

    /// The ClientHello's SNI, if this is TLS with one.
    pub fn sni(&self) -> Option<&str> {
        match self {
            Self::Tls { sni } => sni.as_deref(),
            _ => None,
        }
    }

    fn from_detection(d: Detection) -> Self {
        match d {
            Detection::Http1 => Self::Http1,
            Detection::Http2 => Self::Http2,
            Detection::Tls { sni } => Self::Tls { sni },
            Detection::Opaque | Detection::NeedMore => Self::Opaque,
        }
    }
}

/// The first peek's buffer; grown to [`MAX_DETECT_BYTES`] only for a ClientHello that needs it.
const FIRST_PEEK: usize = 2048;
/// Longest pause between two peeks waiting for more bytes.
const MAX_PAUSE: Duration = Duration::from_millis(16);

/// Peeks at `stream` until its first bytes decide what it is, for at most `timeout`.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0;
    let mut pause = Duration::from_millis(1);
    // Bounded by the deadline: every round either returns, or sleeps at least 1 ms (or grows
    // the buffer, at most once).
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return undecided(&buf[..seen]),
            Ok(Ok(0) | Err(_)) => return Sniffed::Closed,
            Ok(Ok(n)) => n,
        };
        seen = n;
        match classify(&buf[..n]) {
            Detection::NeedMore if n == buf.len() && buf.len() < MAX_DETECT_BYTES => {
                buf.resize(MAX_DETECT_BYTES, 0);
            }
            Detection::NeedMore => {
                let now = Instant::now();
                if now >= deadline {
                    return undecided(&buf[..n]);
                }
                tokio::time::sleep_until((now + pause).min(deadline)).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            d => return Sniffed::from_detection(d),
        }
    }
}

/// The answer at the deadline for what was seen so far.
fn undecided(seen: &[u8]) -> Sniffed {
    if seen.is_empty() {
        Sniffed::Timeout
    } else if is_tls_prefix(seen) {
        Sniffed::Tls { sni: None }
    } else {
        Sniffed::Opaque
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn decides_as_soon_as_the_bytes_do() {
        let (mut c, s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(sniff(&s, LONG).await, Sniffed::Http1);
        let (mut c, s) = pair().await;
        c.write_all(crate::detect::H2_PREFACE).await.unwrap();
        assert_eq!(sniff(&s, LONG).await, Sniffed::Http2);
        let (mut c, s) = pair().await;
        c.write_all(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
            .await
            .unwrap();
        assert_eq!(sniff(&s, LONG).await, Sniffed::Opaque);
    }

    #[tokio::test]
    async fn a_split_request_line_waits_for_its_second_part() {
        let (mut c, s) = pair().await;
        c.write_all(b"PROP").await.unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            c.write_all(b"FIND /dav HTTP/1.1\r\n").await.unwrap();
            c
        });
        assert_eq!(sniff(&s, LONG).await, Sniffed::Http1);
        drop(later.await.unwrap());
    }

    #[tokio::test]
    async fn silence_and_undecided_prefixes_end_at_the_deadline() {
        let short = Duration::from_millis(50);
        let (_c, s) = pair().await;
        assert_eq!(sniff(&s, short).await, Sniffed::Timeout);
        let (mut c, s) = pair().await;
        c.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
        assert_eq!(sniff(&s, short).await, Sniffed::Tls { sni: None });
        let (mut c, s) = pair().await;
        c.write_all(b"GE").await.unwrap();
        assert_eq!(sniff(&s, short).await, Sniffed::Opaque);
    }

    #[tokio::test]
    async fn a_closed_client_is_not_counted() {
        let (c, s) = pair().await;
        drop(c);
        let got = sniff(&s, LONG).await;
        assert_eq!(got, Sniffed::Closed);
        assert_eq!(got.label(), None);
    }
}
