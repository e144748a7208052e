//! The real server on real sockets: discovery push/ACK/NACK, resync, the admin API, health.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::{Ack, DiscoveryRequest, Nack, ResourceType, TypeVersion};

#[tokio::test]
async fn push_ack_and_incremental_updates() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_millis(200)).await;
    let mut web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let first = next(&mut web).await;
    assert!(first.listeners.is_some() && first.routes.is_some());
    assert!(first.clusters.is_some() && first.endpoints.is_some());
    let mut held = Vec::new();
    ack(&web, &first, &mut held).await;
    assert_silent(&mut web).await;

    // The proxy's status shows its ACKed versions.
    let proxies = get_json(&cp.admin, "/v1/proxies").await;
    assert_eq!(proxies[0]["id"], "web-1");
    assert_eq!(
        proxies[0]["versions"]["routes"],
        first.routes.as_ref().unwrap().version.as_str()
    );

    // A backend sidecar registers: web gets only new endpoints.
    let mut backend = connect(
        &cp.grpc,
        hello(node("backend-1", "backend", "127.0.0.3:15006"), vec![]),
    )
    .await;
    let b_first = next(&mut backend).await;
    let update = next(&mut web).await;
    assert!(update.listeners.is_none() && update.routes.is_none() && update.clusters.is_none());
    let eps = update.endpoints.as_ref().unwrap();
    let backend_eps = eps
        .clusters
        .iter()
        .find(|c| c.cluster == "backend.default")
        .unwrap();
    let addrs: Vec<&str> = backend_eps
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect();
    assert_eq!(addrs, ["10.0.0.1:80", "127.0.0.3:15006"]);
    ack(&web, &update, &mut held).await;

    // A policy change via the admin API: only the changed types are pushed.
    let r = cp
        .admin
        .send(
            Method::PUT,
            "/v1/policies/b.yaml",
            Some("routes:\n  - name: r\n    service: backend\n    match: {path: {prefix: /x}}\n    destinations: [{service: web}]\n".into()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json().unwrap()["changed"][0], "route/r created");
    let update = next(&mut web).await;
    assert!(update.routes.is_some());
    assert!(update.listeners.is_none() && update.clusters.is_none() && update.endpoints.is_none());
    ack(&web, &update, &mut held).await;

    // The backend goes away: its endpoint is removed after the grace period.
    let mut b_held = Vec::new();
    ack(&backend, &b_first, &mut b_held).await;
    drop(backend);
    let update = next(&mut web).await;
    let eps = update.endpoints.as_ref().unwrap();
    let backend_eps = eps
        .clusters
        .iter()
        .find(|c| c.cluster == "backend.default")
        .unwrap();
    assert_eq!(backend_eps.endpoints.len(), 1);

    let metrics = cp
        .admin
        .send(Method::GET, "/metrics", None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("weft_control_proxies_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_control_pushes_total{result=\"ack\",type=\"routes\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn resync_skips_held_types_and_nack_is_not_resent() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_millis(200)).await;
    let mut p = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let first = next(&mut p).await;
    let all = versions(&first);
    drop(p);

    // Reconnect holding everything but the endpoints.
    let held: Vec<TypeVersion> = all
        .iter()
        .filter(|tv| tv.r#type != ResourceType::Endpoints as i32)
        .cloned()
        .collect();
    let mut p = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), held),
    )
    .await;
    let r = next(&mut p).await;
    assert!(r.listeners.is_none() && r.routes.is_none() && r.clusters.is_none());
    assert!(r.endpoints.is_some());

    // NACK it: the same versions are not pushed again while nothing changes.
    p.tx.send(DiscoveryRequest {
        kind: Some(Kind::Nack(Nack {
            nonce: r.nonce.clone(),
            error: "endpoints: bad address".into(),
            rejected: versions(&r),
        })),
    })
    .await
    .unwrap();
    assert_silent(&mut p).await;
    let proxies = get_json(&cp.admin, "/v1/proxies").await;
    assert_eq!(proxies[0]["last_nack"], "endpoints: bad address");
}

#[tokio::test]
async fn first_message_must_be_hello() {
    let cp = start(&[], Duration::from_millis(200)).await;
    let mut p = connect(
        &cp.grpc,
        DiscoveryRequest {
            kind: Some(Kind::Ack(Ack::default())),
        },
    )
    .await;
    let err = tokio::time::timeout(Duration::from_secs(5), p.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn admin_api_rejects_invalid_policies_with_lines() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_millis(200)).await;
    let before = get_json(&cp.admin, "/v1/policies").await;
    let r = cp
        .admin
        .send(
            Method::PUT,
            "/v1/policies/r.yaml",
            Some("routes:\n  - name: r\n    service: backend\n    destinations:\n      - service: paymnts\n".into()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.json().unwrap()["errors"][0],
        "r.yaml:5: routes[0].destinations[0].service: unknown service \"paymnts\""
    );
    let after = get_json(&cp.admin, "/v1/policies").await;
    assert_eq!(before["version"], after["version"]);
    assert_eq!(after["files"].as_array().unwrap().len(), 1);

    let r = cp
        .admin
        .send(Method::PUT, "/v1/policies/..%2Fx.yaml", Some(String::new()))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = cp
        .admin
        .send(Method::DELETE, "/v1/policies/a.yaml", None)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let services = get_json(&cp.admin, "/v1/services").await;
    assert_eq!(services, serde_json::json!([]));
    let r = cp.admin.send(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!(r.text(), "ok\n");
}

#[tokio::test]
async fn invalid_store_at_start_serves_empty_and_reports() {
    let cp = start(
        &[("a.yaml", "services:\n  - name: Web\n")],
        Duration::from_millis(200),
    )
    .await;
    let p = get_json(&cp.admin, "/v1/policies").await;
    assert_eq!(p["files"], serde_json::json!([]));
    let err = p["error"].as_str().unwrap();
    assert!(err.starts_with("a.yaml:2: services[0].name:"), "{err}");
    let metrics = cp
        .admin
        .send(Method::GET, "/metrics", None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("weft_control_policy_errors 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn watcher_reloads_on_file_change() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_millis(200)).await;
    let dir = cp._dir.as_ref().unwrap().path().to_owned();
    // An editor-style replace: write a temporary file, then rename it over the target.
    std::fs::write(dir.join(".a.yaml.swp"), "services:\n  - name: web\n").unwrap();
    std::fs::rename(dir.join(".a.yaml.swp"), dir.join("a.yaml")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let services = get_json(&cp.admin, "/v1/services").await;
        if services.as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher never reloaded: {services}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let cp = start(&[], Duration::from_millis(200)).await;
    let channel = tonic::transport::Channel::from_shared(cp.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    for service in ["", "weft.v1.Discovery"] {
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{service:?} not SERVING");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let cp = start(&[], Duration::from_millis(200)).await;
    let channel = tonic::transport::Channel::from_shared(cp.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["weft.v1.Discovery", "grpc.health.v1.Health"] {
        assert!(names.contains(&expected), "{names:?}");
    }
}
