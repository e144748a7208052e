//! A small HTTP/1.1 client for pooled upstream connections, driven by the request's own task.
//!
//! hyper's client connection runs in a task of its own: every request crosses an mpsc channel to
//! it and its response comes back through a oneshot, and the response body through another
//! channel, each hop waking the other task. Here the request's task (the downstream connection's)
//! writes the head, reads the response head and then reads the body as the downstream pulls it,
//! so no task, channel or wake-up sits between the two sockets (benches/RESULTS.md "Per-request
//! CPU, callgrind").
//!
//! Message framing follows hyper's client (RFC 9112): the request keeps a `Content-Length` it
//! has; a body of known size gets one; a body of unknown size is sent chunked (except on `GET`,
//! `HEAD` and `CONNECT`, which are sent without a body, as hyper does), with the trailers its
//! `Trailer` header declares. The response body is empty for `HEAD`, 1xx, 204 and 304, chunked
//! when `Transfer-Encoding` ends in `chunked` (trailers passed on), sized by `Content-Length`,
//! else read until the upstream closes. Informational (1xx) heads are skipped. A request body
//! still being sent when the response head arrives keeps streaming while the response body is
//! read (full duplex).
//!
//! A connection is handed back ([`Recycle`]) only when its response body was read to the end,
//! the request was sent in full and both sides allow keep-alive, at the body's
//! [`ResponseBody::release_at`] (with the owner's clock reading) or drop; otherwise it is
//! dropped (closed). An idle connection is checked before reuse ([`Conn::poll_usable`]): one the
//! upstream closed (or that has unsolicited bytes) is not used, and the request goes elsewhere
//! untouched.

mod body;
pub mod spare;
#[cfg(test)]
mod tests;

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

pub use body::ResponseBody;
use body::{Decode, WriteSide};

/// Boxed error of a request body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most header fields in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest response head (hyper's default read buffer limit).
const MAX_HEAD: usize = 400 * 1024;
/// First read buffer growth step; doubled while reads fill the buffer (large bodies), up to
/// [`MAX_READ_CHUNK`].
const READ_CHUNK: usize = 8 * 1024;
/// Largest read buffer growth step.
const MAX_READ_CHUNK: usize = 256 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream closed the connection before a whole response head arrived.
    #[error("connection closed before a complete response head")]
    IncompleteHead,
    /// The upstream closed the connection in the middle of the response body.
    #[error("connection closed before the end of the response body")]
    IncompleteBody,
    /// The response head or a chunk is malformed.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The response head is larger than the limit.
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// Reading or writing the connection failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// Reading the request body (the downstream's) failed: the client's fault.
    #[error("request body: {0}")]
    RequestBody(BoxError),
    /// The request body did not match its `Content-Length`.
    #[error("request body length does not match its content-length")]
    RequestBodyLength,
}

impl Error {
    /// Whether reading the request body failed (not the upstream's fault).
    pub fn is_request_body(&self) -> bool {
        matches!(self, Self::RequestBody(_) | Self::RequestBodyLength)
    }
}

/// A failed exchange; `unsent` is the request body back if not a byte of the request was
/// written (it may be sent on another connection).
#[derive(Debug)]
pub struct SendError<B> {
    /// What failed.
    pub error: Error,
    /// The body, untouched, when nothing of the request reached the connection.
    pub unsent: Option<B>,
}

/// Takes back a connection whose exchange ended cleanly (the pool).
pub trait Recycle<T>: Send + Sync {
    /// `conn` is idle and may carry another request.
    fn recycle(self: Arc<Self>, conn: Box<Conn<T>>);

    /// [`Recycle::recycle`] at `now`, a [`crate::lb::load::now_nanos`] reading the caller made
    /// anyway (the pool stamps the connection's idle start with it).
    fn recycle_at(self: Arc<Self>, conn: Box<Conn<T>>, now: u64) {
        let _ = now;
        self.recycle(conn);
    }
}

/// One upstream HTTP/1.1 connection with its buffers (boxed: it moves between the pool and the
/// response body of each request it carries).
#[derive(Debug)]
pub struct Conn<T> {
    io: T,
    read_buf: BytesMut,
    write_buf: Vec<u8>,
    /// How much room the next read gets when the buffer runs low.
    read_chunk: usize,
    /// The field names of the last response head, in order, each with its spelling on the
    /// wire: an upstream sends the same ones in the same order, and comparing the bytes
    /// (`memcmp`) is cheaper than parsing a name again or comparing it case-insensitively.
    names: Vec<(HeaderName, Box<[u8]>)>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    /// A connection over `io` (connected, TLS done).
    pub fn new(io: T) -> Box<Self> {
        Box::new(Self {
            io,
            read_buf: BytesMut::new(),
            write_buf: Vec::new(),
            read_chunk: READ_CHUNK,
            names: Vec::new(),
        })
    }

    /// Whether an idle connection can carry a request: the upstream has not closed it, it has
    /// not failed and sent nothing unsolicited. Reads once (registering `cx` for readiness).
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        // Ready is EOF, an error, or bytes nobody asked for.
        self.poll_read_more(cx).is_pending()
    }

    /// Reads more bytes into the read buffer; `Ok(0)` at EOF.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 8 {
            self.read_buf.reserve(self.read_chunk);
        }
        let room = self.read_buf.capacity() - self.read_buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read_buf
        ))?;
        // A read that filled all the room: more is coming (a large body), read more at once.
        if n == room && self.read_chunk < MAX_READ_CHUNK {
            self.read_chunk *= 2;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes `write_buf[*pos..]`; clears it once all of it is written.
    fn poll_write_buf(&mut self, cx: &mut Context<'_>, pos: &mut usize) -> Poll<io::Result<()>> {
        while *pos < self.write_buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write_buf[*pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *pos += n;
        }
        self.write_buf.clear();
        *pos = 0;
        Poll::Ready(Ok(()))
    }
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// No body is sent.
    Empty,
    /// `Content-Length` bytes still to send.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// The request body's framing, decided as hyper's client does, and the framing header to add
/// to the head, if any. The head is not changed: [`encode_head`] leaves out what the framing
/// replaces.
fn request_encoding<B: Body>(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    body: &B,
) -> (Encoding, Framing) {
    if body.is_end_stream() {
        return (Encoding::Empty, Framing::AsIs);
    }
    let length = content_length(headers);
    if version != Version::HTTP_11 {
        return match (length, body.size_hint().exact()) {
            (Ok(Some(n)), _) => (Encoding::Length(n), Framing::AsIs),
            (_, Some(n)) => (Encoding::Length(n), Framing::ContentLength(n)),
            _ => (Encoding::Empty, Framing::AsIs),
        };
    }
    if let Some(te) = headers.get(header::TRANSFER_ENCODING) {
        let framing = if is_chunked(te) {
            Framing::Chunked
        } else {
            Framing::AddChunked
        };
        return (Encoding::Chunked, framing);
    }
    if let Ok(Some(n)) = length {
        return (Encoding::Length(n), Framing::AsIs);
    }
    if let Some(n) = body.size_hint().exact() {
        return (Encoding::Length(n), Framing::ContentLength(n));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
        return (Encoding::Empty, Framing::AsIs);
    }
    (Encoding::Chunked, Framing::AddTransferEncoding)
}

/// What [`encode_head`] changes in the head's framing headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Written as they are (a bodiless request drops `Transfer-Encoding`).
    AsIs,
    /// `Content-Length: n` added.
    ContentLength(u64),
    /// `Transfer-Encoding` kept (it ends in `chunked`), `Content-Length` dropped.
    Chunked,
    /// `Transfer-Encoding` kept with `, chunked` appended, `Content-Length` dropped.
    AddChunked,
    /// `Transfer-Encoding: chunked` added, `Content-Length` dropped.
    AddTransferEncoding,
}

/// The trailer fields a chunked request may carry: those its `Trailer` header declares (as
/// hyper sends), minus fields that are never valid as trailers.
fn declared_trailers(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| {
            !matches!(
                *n,
                header::CONTENT_LENGTH
                    | header::TRANSFER_ENCODING
                    | header::HOST
                    | header::TRAILER
                    | header::CONTENT_TYPE
                    | header::AUTHORIZATION
                    | header::TE
                    | header::CONNECTION
            )
        })
        .collect()
}

/// Whether a `Transfer-Encoding` value ends in `chunked`.
fn is_chunked(te: &HeaderValue) -> bool {
    te.as_bytes()
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The `Content-Length` of `headers`: `Ok(None)` without one, `Err` if the values are invalid
/// or differ.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut found = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or(())?;
            if found.is_some_and(|f| f != n) {
                return Err(());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Writes the request head into `out`, its framing headers as `framing` says.
fn encode_head(parts: &http::request::Parts, framing: Framing, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // An authority-form or asterisk-form target has no path to speak of.
    match (parts.method == Method::CONNECT, parts.uri.authority()) {
        (true, Some(a)) => out.extend_from_slice(a.as_str().as_bytes()),
        _ if target.is_empty() => out.push(b'/'),
        _ => out.extend_from_slice(target.as_bytes()),
    }
    out.extend_from_slice(if parts.version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let field = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    let chunked = matches!(
        framing,
        Framing::Chunked | Framing::AddChunked | Framing::AddTransferEncoding
    );
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH && chunked {
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            match framing {
                Framing::AddChunked => {
                    out.extend_from_slice(b"transfer-encoding: ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b", chunked\r\n");
                    continue;
                }
                Framing::Chunked => {}
                _ => continue,
            }
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::ContentLength(n) => {
            field(out, b"content-length", n.to_string().as_bytes());
        }
        Framing::AddTransferEncoding => field(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Sends the request `head` + `body` on `conn` and waits for the response head (the head is
/// only read: a request that may be retried is not copied for each attempt). The response body
/// reads the rest of the exchange from the connection and hands it to `recycle` when it ended
/// cleanly (when released or dropped).
pub async fn send<T, B>(
    mut conn: Box<Conn<T>>,
    parts: &http::request::Parts,
    body: B,
    recycle: Arc<dyn Recycle<T>>,
) -> Result<Response<ResponseBody<T, B>>, SendError<B>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (encoding, framing) = request_encoding(&parts.method, parts.version, &parts.headers, &body);
    conn.write_buf.clear();
    encode_head(parts, framing, &mut conn.write_buf);
    let head_request = parts.method == Method::HEAD;
    let trailers = match encoding {
        Encoding::Chunked if parts.headers.contains_key(header::TRAILER) => {
            declared_trailers(&parts.headers)
        }
        _ => Vec::new(),
    };
    let mut write = WriteSide::new(body, encoding, trailers);
    // Until a byte is written the request can go elsewhere.
    let first = poll_fn(|cx| write.poll_first_write(&mut conn, cx)).await;
    if let Err(e) = first {
        return Err(SendError {
            error: e.into(),
            unsent: write.into_body(),
        });
    }
    let mut write = Some(write);
    let head = poll_fn(|cx| {
        // Full duplex: the request body keeps going while the head is awaited.
        if let Some(w) = &mut write {
            match w.poll(&mut conn, cx) {
                Poll::Ready(Ok(())) => write = None,
                Poll::Ready(Err(e)) if e.is_request_body() => return Poll::Ready(Err(e)),
                // The upstream may have answered and stopped reading: look for its answer.
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "writing the request upstream failed");
                    if let Some(w) = &mut write {
                        w.fail(e);
                    }
                }
                Poll::Pending => {}
            }
        }
        poll_head(&mut conn, cx, head_request)
    })
    .await;
    match head {
        Ok((resp, decode, keep_alive)) => {
            let body = ResponseBody::new(conn, decode, write, keep_alive, recycle);
            Ok(resp.map(|()| body))
        }
        Err(e) => {
            // A write failure explains a missing answer better than the EOF that followed it.
            let e = match (e, write.and_then(WriteSide::failure)) {
                (Error::IncompleteHead, Some(w)) => w,
                (e, _) => e,
            };
            Err(SendError {
                error: e,
                unsent: None,
            })
        }
    }
}

/// A parsed response head: the head, how its body is framed, whether the connection may be
/// reused after it.
type ParsedHead = (Response<()>, Decode, bool);

/// Reads until a final (non-1xx) response head is parsed: the head, how its body is framed and
/// whether the connection may be reused after it.
fn poll_head<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<T>,
    cx: &mut Context<'_>,
    head_request: bool,
) -> Poll<Result<ParsedHead, Error>> {
    loop {
        if !conn.read_buf.is_empty() {
            if let Some(parsed) = parse_head(&mut conn.read_buf, &mut conn.names, head_request)? {
                return Poll::Ready(Ok(parsed));
            }
        }
        if conn.read_buf.len() >= MAX_HEAD {
            return Poll::Ready(Err(Error::HeadTooLarge));
        }
        if ready!(conn.poll_read_more(cx))? == 0 {
            return Poll::Ready(Err(Error::IncompleteHead));
        }
    }
}

/// Offsets of one header field in the head: name and value ranges.
#[derive(Clone, Copy, Default)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

/// Parses a response head at the start of `buf` (consumed when complete); skips 1xx heads.
/// `None`: incomplete.
fn parse_head(
    buf: &mut BytesMut,
    names: &mut Vec<(HeaderName, Box<[u8]>)>,
    head_request: bool,
) -> Result<Option<ParsedHead>, Error> {
    loop {
        let mut fields = [Field::default(); MAX_HEADERS];
        let (len, code, minor, count) = {
            let mut headers =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut []);
            let status = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut res, &buf[..], &mut headers)
                .map_err(|e| match e {
                    httparse::Error::TooManyHeaders => Error::Invalid("too many header fields"),
                    _ => Error::Invalid("malformed response head"),
                })?;
            let httparse::Status::Complete(len) = status else {
                return Ok(None);
            };
            let base = buf.as_ptr() as usize;
            let at = |s: &[u8]| {
                let start = (s.as_ptr() as usize - base) as u32;
                (start, start + s.len() as u32)
            };
            for (f, h) in fields.iter_mut().zip(res.headers.iter()) {
                f.name = at(h.name.as_bytes());
                f.value = at(h.value);
            }
            (
                len,
                res.code.unwrap_or(0),
                res.version.unwrap_or(1),
                res.headers.len(),
            )
        };
        if (100..200).contains(&code) && code != 101 {
            // Informational: the final head follows.
            buf.advance(len);
            continue;
        }
        if code == 101 {
            return Err(Error::Invalid(
                "101 Switching Protocols to a request without upgrade",
            ));
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Invalid("malformed status code"))?;
        let head = buf.split_to(len).freeze();
        let version = if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // The framing headers are read here, as the fields go by. Hop-by-hop fields this hop
        // consumes are not passed on (the proxy would strip them): `Transfer-Encoding`,
        // `Keep-Alive`, and a `Connection` that names nothing but `keep-alive` / `close`.
        // The map of a request whose attempts are over, if there is one (`spare`).
        let mut headers = spare::take(count);
        let mut framing = ResponseFraming::default();
        for (i, f) in fields[..count].iter().enumerate() {
            let raw_name = &head[f.name.0 as usize..f.name.1 as usize];
            // The same bytes as the previous head's field at this position: the same name.
            let name = match names.get(i) {
                Some((n, spelled)) if **spelled == *raw_name => n.clone(),
                _ => {
                    let n = HeaderName::from_bytes(raw_name)
                        .map_err(|_| Error::Invalid("malformed header name"))?;
                    names.truncate(i);
                    names.push((n.clone(), raw_name.into()));
                    n
                }
            };
            let raw = &head[f.value.0 as usize..f.value.1 as usize];
            if framing.consumes(&name, raw)? {
                continue;
            }
            let value =
                HeaderValue::from_maybe_shared(head.slice(f.value.0 as usize..f.value.1 as usize))
                    .map_err(|_| Error::Invalid("malformed header value"))?;
            headers.append(name, value);
        }
        let mut keep_alive = if version == Version::HTTP_10 {
            framing.keep_alive_token
        } else {
            !framing.close
        };
        let decode = if head_request || matches!(code, 204 | 304) {
            Decode::Length(0)
        } else if let Some(chunked) = framing.chunked {
            if version == Version::HTTP_10 {
                return Err(Error::Invalid("transfer-encoding in an HTTP/1.0 response"));
            }
            if chunked {
                Decode::chunked()
            } else {
                // Not chunked: the body runs until the upstream closes.
                keep_alive = false;
                Decode::Eof
            }
        } else {
            match framing.length {
                Ok(Some(n)) => Decode::Length(n),
                Ok(None) => {
                    keep_alive = false;
                    Decode::Eof
                }
                Err(()) => return Err(Error::Invalid("invalid content-length")),
            }
        };
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        return Ok(Some((resp, decode, keep_alive)));
    }
}

/// What a response head's framing fields say (RFC 9112 §6.3, §9.3).
#[derive(Debug)]
struct ResponseFraming {
    /// `Transfer-Encoding` present: whether its last value ends in `chunked`.
    chunked: Option<bool>,
    /// `Content-Length`: `Err` if invalid or values differ.
    length: Result<Option<u64>, ()>,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive` (what keeps an HTTP/1.0 connection open).
    keep_alive_token: bool,
}

impl Default for ResponseFraming {
    fn default() -> Self {
        Self {
            chunked: None,
            length: Ok(None),
            close: false,
            keep_alive_token: false,
        }
    }
}

impl ResponseFraming {
    /// Notes a field; `true` if it is consumed here (not passed on).
    fn consumes(&mut self, name: &HeaderName, value: &[u8]) -> Result<bool, Error> {
        if *name == header::CONTENT_LENGTH {
            for part in value.split(|b| *b == b',') {
                let n = parse_decimal(part.trim_ascii());
                self.length = match (self.length, n) {
                    (Ok(None), Some(n)) => Ok(Some(n)),
                    (Ok(Some(m)), Some(n)) if m == n => Ok(Some(n)),
                    _ => Err(()),
                };
            }
            Ok(false)
        } else if *name == header::TRANSFER_ENCODING {
            self.chunked = Some(
                value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked")),
            );
            Ok(true)
        } else if *name == header::CONNECTION {
            let mut only_these = true;
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive_token = true;
                } else if !token.is_empty() {
                    only_these = false;
                }
            }
            // One naming other fields goes on: the proxy strips those fields with it.
            Ok(only_these)
        } else {
            Ok(name.as_str() == "keep-alive")
        }
    }
}
