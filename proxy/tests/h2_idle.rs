//! The shared upstream HTTP/2 connection of an endpoint is closed once no request used it for
//! the pool's idle timeout, and re-established by the next request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_proxy::retry::RequestBody;
use weft_proxy::upstream::{EndpointPool, Wire};

/// An h2c server counting connections accepted and closed.
async fn h2_server() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (Arc::clone(&opened), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new()))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, opened, closed)
}

fn get() -> Request<RequestBody> {
    Request::builder()
        .uri("http://backend/")
        .version(http::Version::HTTP_2)
        .body(RequestBody::Buffered {
            data: None,
            trailers: None,
        })
        .unwrap()
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}");
}

#[tokio::test]
async fn idle_h2_connection_is_closed_and_reopened_on_demand() {
    let (addr, opened, closed) = h2_server().await;
    let pool = Arc::new(EndpointPool::new(addr));
    pool.set_idle_timeout(Some(Duration::from_millis(300)));
    let errors = prometheus::IntCounter::new("e", "e").unwrap();
    let send = || pool.send(get(), Wire::H2, Duration::from_secs(2), &errors);

    // Requests in a row share one connection, and it stays while in use.
    for _ in 0..5 {
        let resp = send().await.expect("h2 request");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 0, "closed while in use");

    // Idle past the timeout: closed.
    eventually("the idle h2 connection closes", || {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
    // The next request opens a new one.
    let resp = send().await.expect("h2 request after the idle close");
    assert_eq!(resp.status(), 200);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}
