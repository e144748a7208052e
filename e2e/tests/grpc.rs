//! gRPC through the sidecars: a tonic client calls the demo app's tonic server via the caller's
//! outbound listener (upstream HTTP/2 for `grpc` services). Messages, status codes, response
//! metadata and trailers must arrive intact.

use bytes::{BufMut, Bytes, BytesMut};
use http::Method;
use prost::Message;
use tonic::Code;
use weft_e2e::{caller_proxy, wait_metric_at_least, Instance};
use weft_testkit::echo::echo_client::EchoClient;
use weft_testkit::echo::{EchoReply, EchoRequest, StreamRequest};
use weft_testkit::{wait_until, ControlPlane, PolicyDir, DEFAULT_WAIT};

const POLICY: &str = "\
services:
  - name: web
  - name: echo
    protocol: grpc
    request_timeout: 0s
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_through_sidecars() {
    let policies = PolicyDir::with_file("grpc.yaml", POLICY);
    let cp = ControlPlane::start(policies.path()).await;
    let echo = Instance::grpc(&cp, "echo", "echo-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(echo.endpoint(), true).await;
    let mut client = EchoClient::new(web.grpc("echo"));

    // Unary: the message and the instance come back, with the server's response metadata.
    let resp = wait_until(
        DEFAULT_WAIT,
        "a unary call to echo through web's sidecar succeeds",
        async || {
            client
                .unary(EchoRequest {
                    message: "hello".into(),
                    status_code: 0,
                })
                .await
        },
    )
    .await;
    assert_eq!(
        resp.metadata()
            .get("x-demo-instance")
            .and_then(|v| v.to_str().ok()),
        Some("echo-1"),
        "response metadata: {:?}",
        resp.metadata()
    );
    let reply = resp.into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.service, "echo");
    assert_eq!(reply.instance, "echo-1");

    // A failing call keeps its grpc-status and grpc-message.
    let status = client
        .unary(EchoRequest {
            message: "no such thing".into(),
            status_code: Code::NotFound as i32,
        })
        .await
        .expect_err("status_code 5 must fail the call");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing", "{status:?}");

    // Server streaming: every message in order, then the custom trailer with grpc-status 0.
    let resp = client
        .server_stream(StreamRequest {
            message: "tick".into(),
            count: 25,
            interval_ms: 20,
        })
        .await
        .expect("ServerStream call");
    assert_eq!(
        resp.metadata()
            .get("x-demo-instance")
            .and_then(|v| v.to_str().ok()),
        Some("echo-1")
    );
    let mut stream = resp.into_inner();
    let mut seqs = Vec::new();
    while let Some(msg) = stream
        .message()
        .await
        .expect("a stream message (or a clean end with grpc-status 0)")
    {
        assert_eq!(msg.message, "tick");
        seqs.push(msg.seq);
    }
    assert_eq!(
        seqs,
        (0..25).collect::<Vec<u32>>(),
        "stream messages in order"
    );
    let trailers = stream
        .trailers()
        .await
        .expect("reading trailers")
        .expect("the stream must end with trailers");
    assert_eq!(
        trailers.get("x-demo-trailer").and_then(|v| v.to_str().ok()),
        Some("done"),
        "custom trailer lost: {trailers:?}"
    );

    // The sidecar labels gRPC requests with their grpc-status.
    wait_metric_at_least(
        "web's sidecar records grpc_status 0 for echo",
        "weft_requests_total",
        &[
            ("direction", "outbound"),
            ("cluster", "echo.default"),
            ("grpc_status", "0"),
        ],
        2.0,
        async || web.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "web's sidecar records grpc_status 5 for echo",
        "weft_requests_total",
        &[
            ("direction", "outbound"),
            ("cluster", "echo.default"),
            ("grpc_status", "5"),
        ],
        1.0,
        async || web.metrics().await,
    )
    .await;
}

/// The same stream read with a plain h2c client: the HTTP/2 trailers frame itself must carry
/// `grpc-status: 0` and the custom trailer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_arrive_as_http2_trailers() {
    let policies = PolicyDir::with_file("grpc.yaml", POLICY);
    let cp = ControlPlane::start(policies.path()).await;
    let echo = Instance::grpc(&cp, "echo", "echo-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(echo.endpoint(), true).await;
    let client = web.h2c();

    let msg = StreamRequest {
        message: "raw".into(),
        count: 3,
        interval_ms: 0,
    }
    .encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + msg.len());
    frame.put_u8(0); // not compressed
    frame.put_u32(msg.len() as u32);
    frame.put_slice(&msg);
    let frame: Bytes = frame.freeze();

    let resp = wait_until(
        DEFAULT_WAIT,
        "a raw h2c gRPC call to echo succeeds",
        async || {
            let r = client
                .request(
                    Method::POST,
                    "echo",
                    "/weft.demo.v1.Echo/ServerStream",
                    &[("content-type", "application/grpc"), ("te", "trailers")],
                    frame.clone(),
                )
                .await?;
            if r.status == 200 && r.trailers.is_some() {
                Ok(r)
            } else {
                Err(anyhow::anyhow!("{} trailers {:?}", r.summary(), r.trailers))
            }
        },
    )
    .await;
    let trailers = resp.trailers.clone().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0"),
        "{trailers:?}"
    );
    assert_eq!(
        trailers.get("x-demo-trailer").and_then(|v| v.to_str().ok()),
        Some("done"),
        "{trailers:?}"
    );

    // Three length-prefixed EchoReply messages in the body.
    let mut body = &resp.body[..];
    let mut seqs = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert!(
            body.len() >= 5 + len,
            "truncated gRPC frame in {:?}",
            resp.body
        );
        let reply = EchoReply::decode(&body[5..5 + len]).expect("an EchoReply");
        seqs.push(reply.seq);
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "trailing bytes after the gRPC frames");
    assert_eq!(seqs, vec![0, 1, 2]);
}
