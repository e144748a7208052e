//! The two streams of an exchange after its head: the request body still being written
//! ([`WriteSide`]) and the response body being read ([`ResponseBody`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{BoxError, Conn, Encoding, Error, Recycle, MAX_HEADERS};

/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;

/// The request's side of an exchange: pending bytes, then the body's frames.
#[derive(Debug)]
pub(super) struct WriteSide<B> {
    body: Option<B>,
    encoding: Encoding,
    /// Trailer fields the request declared (chunked only).
    trailers: Vec<HeaderName>,
    /// Written part of `Conn::write_buf`.
    pos: usize,
    /// Something was written since the last flush.
    unflushed: bool,
    /// Writing failed (the upstream stopped reading); kept to explain a missing response.
    failed: Option<Error>,
}

impl<B> WriteSide<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(body: B, encoding: Encoding, trailers: Vec<HeaderName>) -> Self {
        Self {
            // Kept even when nothing of it goes on the wire (`Empty`): the request may still be
            // handed back unsent.
            body: Some(body),
            encoding,
            trailers,
            pos: 0,
            unflushed: false,
            failed: None,
        }
    }

    /// The body, if it was never polled (the request can still be sent elsewhere).
    pub(super) fn into_body(self) -> Option<B> {
        self.body
    }

    pub(super) fn fail(&mut self, e: Error) {
        self.body = None;
        self.failed = Some(e);
    }

    pub(super) fn failure(self) -> Option<Error> {
        self.failed
    }

    /// Writes the head's first bytes: an error here means nothing was sent.
    pub(super) fn poll_first_write<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<T>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut conn.io).poll_write(cx, &conn.write_buf))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.pos = n;
        self.unflushed = true;
        Poll::Ready(Ok(()))
    }

    /// Writes what is pending and the body's frames as they come; `Ready(Ok)` once all of the
    /// request is written and flushed. Pending for good after a write failure (the exchange
    /// goes on without the rest of the request, and the connection is not reused).
    pub(super) fn poll<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<T>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        if self.failed.is_some() {
            return Poll::Pending;
        }
        if self.encoding == Encoding::Empty {
            // Not sent (as hyper does for a body it has no length for on GET/HEAD/CONNECT).
            self.body = None;
        }
        loop {
            ready!(conn.poll_write_buf(cx, &mut self.pos))?;
            let Some(body) = &mut self.body else {
                if self.unflushed {
                    ready!(conn.poll_flush(cx))?;
                    self.unflushed = false;
                }
                return Poll::Ready(Ok(()));
            };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Pending => {
                    // Waiting for the client: push out what is written (TLS buffers it).
                    if self.unflushed {
                        ready!(conn.poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(frame) => frame,
            };
            self.unflushed = true;
            let out = &mut conn.write_buf;
            let frame = match frame {
                None => {
                    self.body = None;
                    self.end(out, None)?;
                    continue;
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(Error::RequestBody(e.into())));
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => match &mut self.encoding {
                    Encoding::Length(left) => {
                        let n = data.len() as u64;
                        if n > *left {
                            return Poll::Ready(Err(Error::RequestBodyLength));
                        }
                        *left -= n;
                        out.extend_from_slice(&data);
                    }
                    Encoding::Chunked if data.is_empty() => {}
                    Encoding::Chunked => {
                        out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                    Encoding::Empty => {}
                },
                Err(frame) => {
                    // Trailers end the body.
                    self.body = None;
                    self.end(out, frame.into_trailers().ok())?;
                }
            }
        }
    }

    /// Ends the body on the wire (chunked: the last chunk and the declared trailers).
    fn end(&self, out: &mut Vec<u8>, trailers: Option<HeaderMap>) -> Result<(), Error> {
        match self.encoding {
            Encoding::Length(0) | Encoding::Empty => Ok(()),
            Encoding::Length(_) => Err(Error::RequestBodyLength),
            Encoding::Chunked => {
                out.extend_from_slice(b"0\r\n");
                if let Some(t) = trailers {
                    for (name, value) in &t {
                        if self.trailers.contains(name) {
                            out.extend_from_slice(name.as_str().as_bytes());
                            out.extend_from_slice(b": ");
                            out.extend_from_slice(value.as_bytes());
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                }
                out.extend_from_slice(b"\r\n");
                Ok(())
            }
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decode {
    /// This many bytes are left.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// Until the upstream closes.
    Eof,
    /// Ended.
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

impl Decode {
    pub(super) fn chunked() -> Self {
        Self::Chunked(Chunk::Size)
    }
}

/// A response body read from the upstream connection as it is polled; hands the connection
/// back when the exchange ended cleanly (see the module docs).
pub struct ResponseBody<T, B> {
    conn: Option<Box<Conn<T>>>,
    decode: Decode,
    /// The request body still being sent, if the response came first (boxed: rare, and this
    /// body moves through several layers of every response).
    write: Option<Box<WriteSide<B>>>,
    keep_alive: bool,
    recycle: Option<Arc<dyn Recycle<T>>>,
}

impl<T, B> std::fmt::Debug for ResponseBody<T, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("decode", &self.decode)
            .field("keep_alive", &self.keep_alive)
            .field("writing", &self.write.is_some())
            .finish_non_exhaustive()
    }
}

impl<T, B> ResponseBody<T, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(
        conn: Box<Conn<T>>,
        decode: Decode,
        write: Option<WriteSide<B>>,
        keep_alive: bool,
        recycle: Arc<dyn Recycle<T>>,
    ) -> Self {
        // A bodiless response whose request is all sent: the connection is free already (it
        // goes back when the body is released or dropped).
        Self {
            conn: Some(conn),
            decode: if decode == Decode::Length(0) {
                Decode::Done
            } else {
                decode
            },
            write: write.map(Box::new),
            keep_alive,
            recycle: Some(recycle),
        }
    }

    /// Hands the connection back now if the exchange is over and it may be reused, `now` being
    /// the caller's [`crate::lb::load::now_nanos`] reading (the response's end, read anyway for
    /// its metrics: the pool stamps the connection's idle start with it instead of reading the
    /// clock again). A body dropped without this hands a reusable connection back too.
    pub fn release_at(&mut self, now: u64) {
        if !self.reusable() {
            return;
        }
        if let (Some(conn), Some(recycle)) = (self.conn.take(), self.recycle.take()) {
            recycle.recycle_at(conn, now);
        }
    }

    /// The response ended: a reusable connection waits for [`ResponseBody::release_at`] (or
    /// the drop) to go back to the pool; any other is closed now.
    fn end(&mut self) {
        self.decode = Decode::Done;
        if !self.reusable() {
            self.conn = None;
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.decode = Decode::Done;
        self.keep_alive = false;
        self.conn = None;
        self.write = None;
        Poll::Ready(Some(Err(e)))
    }

    fn poll_decode(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(conn) = self.conn.as_deref_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match &mut self.decode {
                Decode::Done => return Poll::Ready(None),
                Decode::Length(left) => {
                    if conn.read_buf.is_empty() {
                        match ready!(conn.poll_read_more(cx)) {
                            Ok(0) => return self.fail(Error::IncompleteBody),
                            Ok(_) => {}
                            Err(e) => return self.fail(e.into()),
                        }
                    }
                    let n = conn
                        .read_buf
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    let data = conn.read_buf.split_to(n).freeze();
                    if *left == 0 {
                        self.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Eof => {
                    if conn.read_buf.is_empty() {
                        match ready!(conn.poll_read_more(cx)) {
                            Ok(0) => {
                                self.end();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return self.fail(e.into()),
                        }
                    }
                    let data = conn.read_buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Chunked(state) => {
                    match poll_chunk(conn, state) {
                        Ok(Some(ChunkOut::Data(data))) => {
                            return Poll::Ready(Some(Ok(Frame::data(data))))
                        }
                        Ok(Some(ChunkOut::Trailers(t))) => {
                            self.end();
                            return Poll::Ready(Some(Ok(Frame::trailers(t))));
                        }
                        Ok(Some(ChunkOut::End)) => {
                            self.end();
                            return Poll::Ready(None);
                        }
                        Ok(None) => {}
                        Err(e) => return self.fail(e),
                    }
                    // More bytes needed.
                    match ready!(conn.poll_read_more(cx)) {
                        Ok(0) => return self.fail(Error::IncompleteBody),
                        Ok(_) => {}
                        Err(e) => return self.fail(e.into()),
                    }
                }
            }
        }
    }
}

/// What the chunked decoder produced from the buffered bytes.
enum ChunkOut {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// Advances the chunked decoder over `conn.read_buf`; `Ok(None)`: more bytes are needed.
fn poll_chunk<T>(conn: &mut Conn<T>, state: &mut Chunk) -> Result<Option<ChunkOut>, Error> {
    let buf = &mut conn.read_buf;
    loop {
        match state {
            Chunk::Size => {
                let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(Error::Invalid("chunk size line too long"));
                    }
                    return Ok(None);
                };
                let line = &buf[..eol];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                let rest = &line[digits..];
                // Optional whitespace, then only chunk extensions (ignored).
                let rest = rest.trim_ascii_start();
                if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
                    return Err(Error::Invalid("malformed chunk size"));
                }
                let size = line[..digits].iter().fold(0u64, |n, b| {
                    n * 16 + u64::from(char::from(*b).to_digit(16).unwrap_or(0))
                });
                buf.advance(eol + 2);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(Some(ChunkOut::Data(data)));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Invalid("missing CRLF after chunk data"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Some(ChunkOut::End));
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| Error::Invalid("malformed trailer name"))?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| Error::Invalid("malformed trailer value"))?;
                            trailers.append(name, value);
                        }
                        buf.advance(len);
                        return Ok(Some(ChunkOut::Trailers(trailers)));
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                        return Err(Error::Invalid("trailers too large"))
                    }
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(Error::Invalid("malformed trailers")),
                }
            }
        }
    }
}

impl<T, B> Body for ResponseBody<T, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        // The rest of the request goes out as the response comes in.
        if let (Some(w), Some(conn)) = (&mut this.write, this.conn.as_deref_mut()) {
            match w.poll(conn, cx) {
                Poll::Ready(Ok(())) => this.write = None,
                Poll::Ready(Err(e)) if e.is_request_body() => return this.fail(e),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "writing the request upstream failed");
                    this.keep_alive = false;
                    w.fail(e);
                }
                Poll::Pending => {}
            }
        }
        this.poll_decode(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.decode == Decode::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length(n) => SizeHint::with_exact(n),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl<T, B> ResponseBody<T, B> {
    /// Whether the exchange is over and the connection may carry another request.
    fn reusable(&self) -> bool {
        self.decode == Decode::Done && self.write.is_none() && self.keep_alive
    }
}

impl<T, B> Drop for ResponseBody<T, B> {
    fn drop(&mut self) {
        // Not released (a bodiless response nobody polled, or an owner that does not release):
        // free the connection if the exchange is over (a body dropped early, or a request
        // still being sent, closes it instead).
        if self.reusable() {
            if let (Some(conn), Some(recycle)) = (self.conn.take(), self.recycle.take()) {
                recycle.recycle(conn);
            }
        }
    }
}
