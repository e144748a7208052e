//! `observability.metrics.requests: false` turns request recording off process-wide. In its own
//! test binary (its own process): flipping the switch inside the library's unit tests would race
//! with the tests that record metrics on other threads.

use weft_proxy::metrics::Metrics;
use weft_proxy::observe::{request_metrics_enabled, set_request_metrics};

#[test]
fn request_metrics_switch_stops_and_resumes_recording() {
    let metrics = Metrics::new().expect("metric families");
    let handle = metrics.request_metrics("outbound", "r", "c");
    assert!(request_metrics_enabled());
    handle.record(http::StatusCode::OK, "", 0.001);

    set_request_metrics(false);
    assert!(!request_metrics_enabled());
    handle.record(http::StatusCode::OK, "", 0.001);
    set_request_metrics(true);

    handle.record(http::StatusCode::OK, "", 0.001);
    let text = String::from_utf8(metrics.encode()).expect("utf-8 exposition");
    let count: f64 = text
        .lines()
        .find(|l| l.starts_with("weft_requests_total{") && l.contains("route=\"r\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("a weft_requests_total series for route r");
    assert_eq!(
        count, 2.0,
        "the request recorded while off is not counted:\n{text}"
    );
}
