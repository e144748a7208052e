//! The upstream request body: the downstream body streamed through (no buffering, the default),
//! or a buffered copy that can be sent once per attempt.
//!
//! [`buffer_for_replay`] reads a body up to a limit. A body that fits becomes [`Replayable`]
//! (data + trailers, cheap to clone); one that does not is forwarded as the part already read
//! followed by the rest, and is not retried. A body announcing a larger `content-length` is
//! not read at all.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// A buffered request body that can be replayed.
#[derive(Debug, Clone, Default)]
pub struct Replayable {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replayable {
    /// A fresh body for one attempt (clones are reference counted).
    pub fn body<B>(&self) -> RequestBody<B> {
        RequestBody::Buffered {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether no data is held.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The body sent upstream.
#[derive(Debug)]
pub enum RequestBody<B = crate::http::body::CountedBody> {
    /// The downstream body, streamed through.
    Stream(B),
    /// Data already read from the downstream body, then the rest of it.
    Prefixed {
        /// Already read, sent first.
        prefix: Option<Bytes>,
        /// The remainder.
        rest: B,
    },
    /// A buffered body (one attempt's copy).
    Buffered {
        /// Data left to send.
        data: Option<Bytes>,
        /// Trailers left to send.
        trailers: Option<HeaderMap>,
    },
}

impl<B> From<B> for RequestBody<B> {
    fn from(b: B) -> Self {
        Self::Stream(b)
    }
}

/// What [`buffer_for_replay`] made of a body.
#[derive(Debug)]
pub enum Buffered<B> {
    /// The whole body is held: attempts may be repeated.
    Replayable(Replayable),
    /// Too large: send it once.
    Once(RequestBody<B>),
}

/// Reads `body` for replay if it fits in `limit` bytes (see the module docs). An error reading
/// the downstream body is returned as is.
pub async fn buffer_for_replay<B>(mut body: B, limit: usize) -> Result<Buffered<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.is_end_stream() {
        return Ok(Buffered::Replayable(Replayable::default()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(Buffered::Once(RequestBody::Stream(body)));
    }
    let mut data = BytesMut::new();
    let mut trailers = None;
    // Each frame adds data (bounded by `limit` below) or ends the body: this loop ends.
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    return Ok(Buffered::Once(RequestBody::Prefixed {
                        prefix: Some(data.freeze()),
                        rest: body,
                    }));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(Buffered::Replayable(Replayable {
        data: data.freeze(),
        trailers,
    }))
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            Self::Stream(b) => Pin::new(b).poll_frame(cx),
            Self::Prefixed { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                Poll::Ready(ready!(Pin::new(rest).poll_frame(cx)))
            }
            Self::Buffered { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(b) => b.is_end_stream(),
            Self::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Self::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stream(b) => b.size_hint(),
            Self::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
            Self::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use std::convert::Infallible;

    type Chunks =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn chunks(parts: &[&'static str], trailer: bool) -> Chunks {
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        if trailer {
            let mut t = HeaderMap::new();
            t.insert("x-t", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames))
    }

    async fn collect<B: Body<Data = Bytes> + Unpin>(b: RequestBody<B>) -> (Bytes, Option<HeaderMap>)
    where
        B::Error: std::fmt::Debug,
    {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes(), t)
    }

    #[tokio::test]
    async fn small_body_replays_with_trailers() {
        let Buffered::Replayable(r) = buffer_for_replay(chunks(&["ab", "cd"], true), 10)
            .await
            .unwrap()
        else {
            panic!("not replayable");
        };
        assert_eq!(r.len(), 4);
        for _ in 0..2 {
            let b: RequestBody<Chunks> = r.body();
            assert_eq!(b.size_hint().exact(), Some(4));
            let (data, t) = collect(b).await;
            assert_eq!(&data[..], b"abcd");
            assert_eq!(t.unwrap()["x-t"], "1");
        }
    }

    #[tokio::test]
    async fn large_body_streams_once_intact() {
        let Buffered::Once(b) = buffer_for_replay(chunks(&["abc", "def", "ghi"], false), 4)
            .await
            .unwrap()
        else {
            panic!("should not be replayable");
        };
        assert!(matches!(b, RequestBody::Prefixed { .. }));
        assert_eq!(&collect(b).await.0[..], b"abcdefghi");
        // Known too-large length: not read at all.
        let Buffered::Once(b) = buffer_for_replay(Full::new(Bytes::from_static(b"0123456789")), 4)
            .await
            .unwrap()
        else {
            panic!("should not be replayable");
        };
        assert!(matches!(b, RequestBody::Stream(_)));
        assert_eq!(&collect(b).await.0[..], b"0123456789");
    }

    #[tokio::test]
    async fn empty_body_is_replayable_without_reading() {
        let Buffered::Replayable(r) = buffer_for_replay(Full::new(Bytes::new()), 0).await.unwrap()
        else {
            panic!("not replayable");
        };
        let b: RequestBody<Full<Bytes>> = r.body();
        assert!(b.is_end_stream());
    }
}
