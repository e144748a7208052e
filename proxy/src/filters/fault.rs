//! Fault injection (`filters.fault`), before the upstream is called: a fixed delay and/or an
//! abort, each drawn per request with its own probability (in millionths, so 0.1% is exact).
//! A delayed request that is also aborted waits first, then gets the abort.
//!
//! An abort answers a gRPC request (`content-type: application/grpc*`) with a trailers-only
//! response, HTTP 200 and `grpc-status` (`abort_grpc_status`; when only an HTTP status is
//! configured, gRPC requests get that HTTP status too), and other requests with
//! `abort_http_status` (when only a gRPC status is configured, its HTTP equivalent, as Envoy
//! maps it). Aborts carry `x-weft-error: fault-abort` (access-log flag `FI`); delays set the flag
//! `DI`. Both count in `weft_faults_injected_total{route,kind}`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use weft_proto::v1;

use super::{draw, FilterErrors, PPM_ALL};
use crate::http::body::ResponseBody;
use crate::http::error::X_WEFT_ERROR;
use crate::metrics::{LeasedCounter, Metrics};

/// The `x-weft-error` code of an injected abort.
pub const FAULT_ABORT: &str = "fault-abort";

/// The `grpc_status` metric label of each code.
const GRPC_LABELS: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// A compiled fault.
#[derive(Debug)]
pub struct Fault {
    delay: Option<Delay>,
    abort: Option<Abort>,
}

#[derive(Debug)]
struct Delay {
    after: Duration,
    ppm: u32,
    injected: LeasedCounter,
}

#[derive(Debug)]
struct Abort {
    http: StatusCode,
    /// 1..=16, for gRPC requests.
    grpc: Option<u8>,
    ppm: u32,
    injected: LeasedCounter,
}

/// An injected abort: the response and its `grpc_status` metric label.
#[derive(Debug)]
pub struct Aborted {
    /// The response.
    pub response: Response<ResponseBody>,
    /// `grpc_status` label ("" for an HTTP abort).
    pub grpc_status: &'static str,
}

/// The HTTP status Envoy answers a non-gRPC request with for a gRPC status
/// (`Grpc::Utility::grpcToHttpStatus`).
fn http_of_grpc(code: u8) -> u16 {
    match code {
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

fn check_ppm(ppm: u32, field: &str, errors: &mut FilterErrors) -> u32 {
    if ppm > PPM_ALL {
        errors.push(
            field.to_owned(),
            format!("{ppm} is more than {PPM_ALL} (millionths)"),
        );
    }
    ppm.min(PPM_ALL)
}

impl Fault {
    /// Compiles `f` for route `route`; `None` when it injects nothing.
    pub fn build(
        f: &v1::Fault,
        route: &str,
        metrics: &Metrics,
        errors: &mut FilterErrors,
    ) -> Option<Self> {
        let counter = |kind: &str, errors: &mut FilterErrors| match super::metrics::fault(
            metrics, route, kind,
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push("fault", e.to_string());
                None
            }
        };
        let delay = if f.delay_ms == 0 {
            if f.delay_ppm > 0 {
                errors.push("fault.delay_ms", "a delayed share needs a delay > 0");
            }
            None
        } else {
            let ppm = check_ppm(f.delay_ppm, "fault.delay_ppm", errors);
            counter("delay", errors).map(|injected| Delay {
                after: Duration::from_millis(f.delay_ms),
                ppm,
                injected,
            })
        };
        let grpc = match f.abort_grpc_status {
            0 => None,
            g @ 1..=16 => u8::try_from(g).ok(),
            g => {
                errors.push(
                    "fault.abort_grpc_status",
                    format!("{g} is out of range 1..=16"),
                );
                None
            }
        };
        let http = match f.abort_http_status {
            0 => grpc.map(http_of_grpc),
            s => match u16::try_from(s).ok().filter(|s| (200..=599).contains(s)) {
                Some(s) => Some(s),
                None => {
                    errors.push(
                        "fault.abort_http_status",
                        format!("{s} is out of range 200..=599"),
                    );
                    None
                }
            },
        };
        let abort = match http.and_then(|s| StatusCode::from_u16(s).ok()) {
            None => {
                if f.abort_ppm > 0 && f.abort_http_status == 0 && f.abort_grpc_status == 0 {
                    errors.push(
                        "fault.abort_ppm",
                        "an aborted share needs abort_http_status or abort_grpc_status",
                    );
                }
                None
            }
            Some(http) => {
                let ppm = check_ppm(f.abort_ppm, "fault.abort_ppm", errors);
                counter("abort", errors).map(|injected| Abort {
                    http,
                    grpc,
                    ppm,
                    injected,
                })
            }
        };
        (delay.is_some() || abort.is_some()).then_some(Self { delay, abort })
    }

    /// The delay this request gets, if drawn (counted).
    pub fn draw_delay(&self) -> Option<Duration> {
        let d = self.delay.as_ref()?;
        draw(d.ppm).then(|| {
            d.injected.inc();
            d.after
        })
    }

    /// The abort this request gets, if drawn (counted).
    pub fn draw_abort<B>(&self, req: &Request<B>) -> Option<Aborted> {
        let a = self.abort.as_ref()?;
        if !draw(a.ppm) {
            return None;
        }
        a.injected.inc();
        let is_grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut resp;
        let mut grpc_status = "";
        match (is_grpc, a.grpc) {
            (true, Some(code)) => {
                // Trailers-only: the status travels in the response head, nothing follows
                // (HTTP/2: one HEADERS frame that ends the stream).
                resp = Response::new(ResponseBody::empty());
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.insert("grpc-status", HeaderValue::from(u16::from(code)));
                h.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
                grpc_status = GRPC_LABELS[usize::from(code)];
            }
            _ => {
                resp = Response::new(ResponseBody::local(Bytes::from_static(
                    b"fault filter abort\n",
                )));
                *resp.status_mut() = a.http;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
        }
        resp.headers_mut()
            .insert(X_WEFT_ERROR, HeaderValue::from_static(FAULT_ABORT));
        Some(Aborted {
            response: resp,
            grpc_status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(f: v1::Fault) -> (Option<Fault>, FilterErrors) {
        let mut errors = FilterErrors::default();
        let m = Metrics::new().unwrap();
        (Fault::build(&f, "r", &m, &mut errors), errors)
    }

    fn req(grpc: bool) -> Request<()> {
        let mut b = Request::builder().uri("/");
        if grpc {
            b = b.header("content-type", "application/grpc+proto");
        }
        b.body(()).unwrap()
    }

    #[test]
    fn always_and_never() {
        let (f, errors) = build(v1::Fault {
            delay_ms: 250,
            delay_ppm: PPM_ALL,
            abort_http_status: 503,
            abort_ppm: 0,
            ..Default::default()
        });
        assert!(errors.is_empty(), "{errors:?}");
        let f = f.unwrap();
        assert_eq!(f.draw_delay(), Some(Duration::from_millis(250)));
        assert!(f.draw_abort(&req(false)).is_none());
        assert_eq!(f.delay.as_ref().unwrap().injected.get(), 1);
        assert_eq!(f.abort.as_ref().unwrap().injected.get(), 0);
    }

    #[test]
    fn aborts_http_and_grpc() {
        let (f, _) = build(v1::Fault {
            abort_http_status: 418,
            abort_grpc_status: 14,
            abort_ppm: PPM_ALL,
            ..Default::default()
        });
        let f = f.unwrap();
        let a = f.draw_abort(&req(false)).unwrap();
        assert_eq!(a.response.status(), 418);
        assert_eq!(a.response.headers()["x-weft-error"], "fault-abort");
        assert_eq!(a.grpc_status, "");
        let a = f.draw_abort(&req(true)).unwrap();
        assert_eq!(a.response.status(), 200);
        assert_eq!(a.response.headers()["grpc-status"], "14");
        assert_eq!(a.grpc_status, "14");
        // Only a gRPC status: plain HTTP requests get its HTTP equivalent.
        let (f, _) = build(v1::Fault {
            abort_grpc_status: 14,
            abort_ppm: PPM_ALL,
            ..Default::default()
        });
        let a = f.unwrap().draw_abort(&req(false)).unwrap();
        assert_eq!(a.response.status(), 503);
        // Only an HTTP status: gRPC requests get it as is.
        let (f, _) = build(v1::Fault {
            abort_http_status: 500,
            abort_ppm: PPM_ALL,
            ..Default::default()
        });
        let a = f.unwrap().draw_abort(&req(true)).unwrap();
        assert_eq!(a.response.status(), 500);
        assert!(a.response.headers().get("grpc-status").is_none());
    }

    #[test]
    fn half_the_requests_within_tolerance() {
        let (f, _) = build(v1::Fault {
            abort_http_status: 503,
            abort_ppm: PPM_ALL / 2,
            ..Default::default()
        });
        let f = f.unwrap();
        let n = 10_000;
        let aborted = (0..n)
            .filter(|_| f.draw_abort(&req(false)).is_some())
            .count();
        // sd = 50; +-500 is 10 sd.
        assert!((4_500..=5_500).contains(&aborted), "{aborted}/{n}");
    }

    #[test]
    fn build_errors() {
        let (f, errors) = build(v1::Fault {
            delay_ppm: 5,
            abort_http_status: 700,
            abort_grpc_status: 17,
            abort_ppm: PPM_ALL + 1,
            ..Default::default()
        });
        assert!(f.is_none());
        let text = errors.to_string();
        for want in [
            "fault.delay_ms",
            "fault.abort_http_status",
            "fault.abort_grpc_status",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
