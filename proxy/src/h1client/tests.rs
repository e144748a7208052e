//! The client against a scripted upstream on an in-memory stream: bytes on the wire, framing
//! both ways, and when a connection is (not) handed back.

use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

/// [`send`] with a whole request.
async fn send<T, B>(
    conn: Box<Conn<T>>,
    req: Request<B>,
    recycle: Arc<dyn Recycle<T>>,
) -> Result<Response<ResponseBody<T, B>>, SendError<B>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    super::send(conn, &parts, body, recycle).await
}

/// Keeps what was handed back (and the stamps of those released with one).
#[derive(Default)]
struct Pool(Mutex<Vec<Conn<DuplexStream>>>, Mutex<Vec<u64>>);

impl Recycle<DuplexStream> for Pool {
    fn recycle(self: Arc<Self>, conn: Box<Conn<DuplexStream>>) {
        self.0.lock().unwrap().push(*conn);
    }

    fn recycle_at(self: Arc<Self>, conn: Box<Conn<DuplexStream>>, now: u64) {
        self.1.lock().unwrap().push(now);
        self.recycle(conn);
    }
}

impl Pool {
    fn take(&self) -> Option<Box<Conn<DuplexStream>>> {
        self.0.lock().unwrap().pop().map(Box::new)
    }
}

fn pair() -> (Box<Conn<DuplexStream>>, DuplexStream) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (Conn::new(a), b)
}

/// Reads from the upstream side until `until` has been seen; returns all of it.
async fn read_until(s: &mut DuplexStream, until: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(until.len()).any(|w| w == until) {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("request bytes in time")
            .unwrap();
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "api")
        .body(Empty::new())
        .unwrap()
}

async fn collect<B>(body: B) -> (Vec<u8>, Option<HeaderMap>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let c = body.collect().await.expect("body");
    let trailers = c.trailers().cloned();
    (c.to_bytes().to_vec(), trailers)
}

#[tokio::test]
async fn get_with_content_length_is_recycled() {
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    let server = tokio::spawn(async move {
        let req = read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\nx-a: 2\r\n\r\nhello")
            .await
            .unwrap();
        (req, up)
    });
    let resp = send(conn, get("/p?q=1"), pool.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_11);
    let all: Vec<_> = resp.headers().get_all("x-a").iter().collect();
    assert_eq!(all, ["1", "2"]);
    let (data, trailers) = collect(resp.into_body()).await;
    assert_eq!(data, b"hello");
    assert!(trailers.is_none());
    let (req, _up) = server.await.unwrap();
    assert_eq!(req, b"GET /p?q=1 HTTP/1.1\r\nhost: api\r\n\r\n");
    assert!(
        pool.take().is_some(),
        "handed back after a complete exchange"
    );
}

#[tokio::test]
async fn connection_carries_a_second_request() {
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    let server = tokio::spawn(async move {
        for body in ["one", "two"] {
            read_until(&mut up, b"\r\n\r\n").await;
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{body}");
            up.write_all(resp.as_bytes()).await.unwrap();
        }
        up
    });
    let resp = send(conn, get("/1"), pool.clone()).await.unwrap();
    assert_eq!(collect(resp.into_body()).await.0, b"one");
    let mut conn = pool.take().expect("reusable");
    assert!(conn.poll_usable(&mut Context::from_waker(Waker::noop())));
    let resp = send(conn, get("/2"), pool.clone()).await.unwrap();
    assert_eq!(collect(resp.into_body()).await.0, b"two");
    assert!(pool.take().is_some());
    let up = server.await.unwrap();
    drop(up);
}

#[tokio::test]
async fn chunked_response_with_trailers() {
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        up.write_all(b"6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n")
            .await
            .unwrap();
        // Keep the stream open: the exchange must end by its framing, not by EOF.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let resp = send(conn, get("/"), pool.clone()).await.unwrap();
    let (data, trailers) = collect(resp.into_body()).await;
    assert_eq!(data, b"hello world");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert!(pool.take().is_some());
}

#[tokio::test]
async fn close_delimited_and_connection_close_are_not_reused() {
    for head in [
        &b"HTTP/1.1 200 OK\r\n\r\nuntil close"[..],
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 11\r\n\r\nuntil close",
        b"HTTP/1.0 200 OK\r\ncontent-length: 11\r\n\r\nuntil close",
    ] {
        let pool = Arc::new(Pool::default());
        let (conn, mut up) = pair();
        let head = head.to_vec();
        tokio::spawn(async move {
            read_until(&mut up, b"\r\n\r\n").await;
            up.write_all(&head).await.unwrap();
            up.shutdown().await.unwrap();
        });
        let resp = send(conn, get("/"), pool.clone()).await.unwrap();
        assert_eq!(collect(resp.into_body()).await.0, b"until close");
        assert!(pool.take().is_none());
    }
}

#[tokio::test]
async fn informational_heads_are_skipped_and_head_has_no_body() {
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let mut req = get("/");
    *req.method_mut() = Method::HEAD;
    let mut resp = send(conn, req, pool.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "99");
    assert!(resp.body().is_end_stream());
    // Free at once: handed back as soon as its owner releases it, with the owner's reading.
    resp.body_mut().release_at(42);
    assert!(
        pool.take().is_some(),
        "a bodiless answer frees the connection once released"
    );
    assert_eq!(*pool.1.lock().unwrap(), [42]);
    // Released once: dropping the body afterwards hands nothing back again.
    drop(resp);
    assert!(pool.take().is_none());
}

#[tokio::test]
async fn bodies_are_framed_like_hyper_does() {
    // Known length: content-length added; unknown length: chunked, with declared trailers only.
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    let server = tokio::spawn(async move {
        let req = read_until(&mut up, b"abc").await;
        up.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        (req, up)
    });
    let req = Request::post("/f")
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    let resp = send(conn, req, pool.clone()).await.unwrap();
    assert_eq!(resp.status(), 204);
    drop(resp);
    let (req, _up) = server.await.unwrap();
    assert_eq!(req, b"POST /f HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
    assert!(pool.take().is_some());

    let (conn, mut up) = pair();
    let server = tokio::spawn(async move {
        let req = read_until(&mut up, b"0\r\nx-sum: 7\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        (req, up)
    });
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", "7".parse().unwrap());
    trailers.insert("x-undeclared", "1".parse().unwrap());
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(http_body::Frame::data(Bytes::from_static(b"!"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures::stream::iter(frames));
    let req = Request::put("/s")
        .header("trailer", "x-sum")
        .body(body)
        .unwrap();
    let resp = send(conn, req, pool.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let (req, _up) = server.await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&req),
        "PUT /s HTTP/1.1\r\ntrailer: x-sum\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\nhello\r\n1\r\n!\r\n0\r\nx-sum: 7\r\n\r\n"
    );
}

#[tokio::test]
async fn response_before_the_request_body_ended_keeps_sending_it() {
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let server = tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let req = read_until(&mut up, b"0\r\n\r\n").await;
        up.write_all(b"4\r\ndone\r\n0\r\n\r\n").await.unwrap();
        (req, up)
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post("/dup").body(body).unwrap();
    let resp = send(conn, req, pool.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"late"))))
        .await
        .unwrap();
    drop(tx);
    let (data, _) = collect(resp.into_body()).await;
    assert_eq!(data, b"done");
    let (req, _up) = server.await.unwrap();
    assert!(String::from_utf8_lossy(&req).ends_with("4\r\nlate\r\n0\r\n\r\n"));
    assert!(pool.take().is_some(), "both directions ended cleanly");
}

#[tokio::test]
async fn failures_before_and_during_the_response() {
    // Closed before any answer.
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        drop(up);
    });
    let e = send(conn, get("/"), pool.clone()).await.unwrap_err();
    assert!(matches!(e.error, Error::IncompleteHead), "{:?}", e.error);
    assert!(e.unsent.is_none(), "the request was written");

    // A body cut short, a malformed chunk, a bad head.
    for (answer, what) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            "short",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "chunk",
        ),
    ] {
        let (conn, mut up) = pair();
        let answer = answer.to_vec();
        tokio::spawn(async move {
            read_until(&mut up, b"\r\n\r\n").await;
            up.write_all(&answer).await.unwrap();
            drop(up);
        });
        let resp = send(conn, get("/"), pool.clone()).await.unwrap();
        assert!(resp.into_body().collect().await.is_err(), "{what}");
        assert!(pool.take().is_none(), "{what}");
    }
    let (conn, mut up) = pair();
    tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
            .await
            .unwrap();
    });
    let e = send(conn, get("/"), pool.clone()).await.unwrap_err();
    assert!(matches!(e.error, Error::Invalid(_)), "{:?}", e.error);

    // A body abandoned half way closes the connection.
    let (conn, mut up) = pair();
    tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let resp = send(conn, get("/"), pool.clone()).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "half");
    drop(body);
    assert!(pool.take().is_none());
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_usable() {
    let (mut conn, up) = pair();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(conn.poll_usable(&mut cx));
    drop(up);
    assert!(!conn.poll_usable(&mut cx));
    let (mut conn, mut up) = pair();
    up.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    assert!(!conn.poll_usable(&mut cx), "unsolicited bytes");
}

#[test]
fn content_length_values() {
    let mut h = HeaderMap::new();
    assert_eq!(content_length(&h), Ok(None));
    h.append("content-length", "12".parse().unwrap());
    h.append("content-length", "12, 12".parse().unwrap());
    assert_eq!(content_length(&h), Ok(Some(12)));
    h.append("content-length", "13".parse().unwrap());
    assert_eq!(content_length(&h), Err(()));
    let mut h = HeaderMap::new();
    h.insert("content-length", "+1".parse().unwrap());
    assert_eq!(content_length(&h), Err(()));
    assert!(is_chunked(&"gzip, chunked".parse().unwrap()));
    assert!(!is_chunked(&"chunked, gzip".parse().unwrap()));
}

#[tokio::test]
async fn hop_by_hop_framing_fields_are_consumed() {
    let pool = Arc::new(Pool::default());
    let (conn, mut up) = pair();
    tokio::spawn(async move {
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\
              transfer-encoding: chunked\r\nx-end: 1\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\nconnection: x-private, close\r\nx-private: 1\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let resp = send(conn, get("/"), pool.clone()).await.unwrap();
    let names: Vec<_> = resp
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .collect();
    assert_eq!(
        names,
        ["x-end"],
        "connection, keep-alive, transfer-encoding consumed"
    );
    assert_eq!(collect(resp.into_body()).await.0, b"ok");
    let conn = pool.take().expect("keep-alive");
    // A Connection naming another field goes on (the proxy strips both); `close` is honoured.
    let resp = send(conn, get("/"), pool.clone()).await.unwrap();
    assert_eq!(resp.headers()["connection"], "x-private, close");
    assert!(resp.headers().contains_key("x-private"));
    drop(resp);
    assert!(pool.take().is_none(), "close: not reused");
}

#[tokio::test]
async fn field_names_of_the_previous_head_are_reused_only_when_they_match() {
    let pool = Arc::new(Pool::default());
    let (mut conn, mut up) = pair();
    let heads: [&[u8]; 3] = [
        b"HTTP/1.1 200 OK\r\nServer: a\r\nX-One: 1\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nSERVER: b\r\nX-Two: 2\r\nx-three: 3\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ];
    tokio::spawn(async move {
        for head in heads {
            read_until(&mut up, b"\r\n\r\n").await;
            up.write_all(head).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let mut seen = Vec::new();
    for _ in 0..3 {
        let resp = send(conn, get("/"), pool.clone()).await.unwrap();
        let fields: Vec<_> = resp
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        seen.push(fields.join(","));
        drop(resp);
        conn = pool.take().expect("reusable");
    }
    assert_eq!(
        seen,
        [
            "server=a,x-one=1,content-length=0",
            "server=b,x-two=2,x-three=3,content-length=0",
            "content-length=0"
        ]
    );
}
