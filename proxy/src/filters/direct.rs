//! Direct responses (`filters.direct_response`): the route answers with a fixed status, body
//! and content type, and no upstream is called. The body is built once (a shared `Bytes`), so
//! answering costs a reference count.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use weft_proto::v1;

use super::FilterErrors;
use crate::http::body::ResponseBody;

/// Largest body (the control plane's limit too).
const MAX_BODY: usize = 64 * 1024;

/// A compiled direct response.
#[derive(Debug)]
pub struct DirectResponse {
    status: StatusCode,
    body: Bytes,
    content_type: HeaderValue,
}

impl DirectResponse {
    /// Compiles `d`.
    pub fn build(d: &v1::DirectResponse, errors: &mut FilterErrors) -> Self {
        let status = match u16::try_from(d.status)
            .ok()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(s) => s,
            None => {
                errors.push(
                    "direct_response.status",
                    format!("{} is out of range 200..=599", d.status),
                );
                StatusCode::OK
            }
        };
        if d.body.len() > MAX_BODY {
            errors.push(
                "direct_response.body",
                format!("{} bytes, at most {MAX_BODY}", d.body.len()),
            );
        }
        let content_type = if d.content_type.is_empty() {
            HeaderValue::from_static("text/plain; charset=utf-8")
        } else {
            HeaderValue::from_str(&d.content_type).unwrap_or_else(|_| {
                errors.push(
                    "direct_response.content_type",
                    format!("{:?} is not a header value", d.content_type),
                );
                HeaderValue::from_static("text/plain; charset=utf-8")
            })
        };
        Self {
            status,
            body: Bytes::from(d.body.clone()),
            content_type,
        }
    }

    /// The response.
    pub fn respond(&self) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::local(self.body.clone()));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, self.content_type.clone());
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fixed_status_body_and_type() {
        let mut errors = FilterErrors::default();
        let d = DirectResponse::build(
            &v1::DirectResponse {
                status: 503,
                body: "{\"down\":true}".into(),
                content_type: "application/json".into(),
            },
            &mut errors,
        );
        assert!(errors.is_empty());
        let r = d.respond();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["content-type"], "application/json");
        let d = DirectResponse::build(
            &v1::DirectResponse {
                status: 200,
                ..Default::default()
            },
            &mut errors,
        );
        assert_eq!(
            d.respond().headers()["content-type"],
            "text/plain; charset=utf-8"
        );
        DirectResponse::build(
            &v1::DirectResponse {
                status: 99,
                body: "x".repeat(MAX_BODY + 1),
                content_type: "a\nb".into(),
            },
            &mut errors,
        );
        let text = errors.to_string();
        assert!(text.contains("direct_response.status"), "{text}");
        assert!(text.contains("direct_response.body"), "{text}");
        assert!(text.contains("direct_response.content_type"), "{text}");
    }
}
