//! AdmissionReview (`admission.k8s.io/v1`) in, AdmissionReview out.
//!
//! The answer echoes the request's `uid`. A pod to inject gets `allowed: true`,
//! `patchType: JSONPatch` and the patch base64-encoded; a pod left alone gets `allowed: true`
//! with the reason as its status message (and, for hostNetwork pods, as a warning the user
//! sees); a pod whose own settings cannot make a sidecar gets `allowed: false`, code 400 and
//! the reason. A body that is not an AdmissionReview is the caller's error: 400 (no review to
//! answer).
//!
//! **The webhook's own failures** (a pod object it cannot read, a patch it cannot build) never
//! deny a pod by default: the pod is admitted without a sidecar and a warning says so, which
//! matches `failurePolicy: Ignore` (the API server admits pods when the webhook is down). With
//! `--inject-fail-closed` they deny the pod instead (code 500), which matches
//! `failurePolicy: Fail`: then no pod of a labelled namespace ever runs without its sidecar.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{json, Value};

use super::pod::{inject, Injector, Outcome};

/// The API version reviewed and answered.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// The parts of an AdmissionReview request the webhook reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    #[serde(default)]
    kind: Option<GroupVersionKind>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// A body that is not a usable AdmissionReview (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an {API_VERSION} AdmissionReview: {0}")]
pub struct Malformed(pub String);

/// How the webhook's own failures are answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Admit the pod unpatched, with a warning (`failurePolicy: Ignore`).
    #[default]
    Open,
    /// Deny the pod (`failurePolicy: Fail`).
    Closed,
}

/// The answer to one review: the response document and the metric result.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub body: Value,
    /// One of [`super::RESULTS`].
    pub result: &'static str,
    /// What happened, for the log.
    pub summary: String,
}

/// Answers the AdmissionReview `body`.
pub fn answer(
    body: &[u8],
    injector: &Injector<'_>,
    policy: FailurePolicy,
) -> Result<Answer, Malformed> {
    let review: Review = serde_json::from_slice(body).map_err(|e| Malformed(e.to_string()))?;
    if review.api_version != API_VERSION {
        return Err(Malformed(format!(
            "apiVersion is {:?} (only {API_VERSION} is served: set admissionReviewVersions: [\"v1\"])",
            review.api_version
        )));
    }
    if review.kind != "AdmissionReview" {
        return Err(Malformed(format!("kind is {:?}", review.kind)));
    }
    let request = review
        .request
        .ok_or_else(|| Malformed("no request".to_owned()))?;
    if request.uid.is_empty() {
        return Err(Malformed("request.uid is empty".to_owned()));
    }
    let uid = request.uid;
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    let operation = request.operation.as_deref().unwrap_or_default();
    if !is_pod || operation != "CREATE" {
        let what = format!(
            "not a pod creation ({} {operation}): nothing to inject",
            request.kind.as_ref().map_or("?", |k| k.kind.as_str())
        );
        return Ok(Answer {
            body: response(&uid, true, None, &[], Some((200, &what))),
            result: "skipped",
            summary: what,
        });
    }
    let namespace = request.namespace.unwrap_or_default();
    let pod = match request
        .object
        .ok_or_else(|| "request.object is missing".to_owned())
        .and_then(|o| {
            serde_json::from_value::<Pod>(o)
                .map_err(|e| format!("request.object is not a Pod: {e}"))
        }) {
        Ok(pod) => pod,
        Err(e) => return Ok(own_failure(&uid, &e, policy)),
    };
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default();
    Ok(match inject(&pod, &namespace, injector) {
        Outcome::Inject { patch, warnings } => {
            let patch_json = match serde_json::to_vec(&patch) {
                Ok(p) => p,
                Err(e) => {
                    return Ok(own_failure(
                        &uid,
                        &format!("encoding the patch: {e}"),
                        policy,
                    ))
                }
            };
            Answer {
                body: response(
                    &uid,
                    true,
                    Some(&STANDARD.encode(patch_json)),
                    &warnings,
                    None,
                ),
                result: "injected",
                summary: format!("injected {namespace}/{name} ({} operations)", patch.len()),
            }
        }
        Outcome::Skip { reason, warning } => {
            let warnings = if warning {
                vec![reason.clone()]
            } else {
                Vec::new()
            };
            Answer {
                body: response(&uid, true, None, &warnings, Some((200, &reason))),
                result: "skipped",
                summary: format!("{namespace}/{name}: {reason}"),
            }
        }
        Outcome::Refuse(reason) => Answer {
            body: response(&uid, false, None, &[], Some((400, &reason))),
            result: "refused",
            summary: format!("{namespace}/{name}: {reason}"),
        },
    })
}

/// The webhook's own failure, answered per `policy` (see the module docs).
fn own_failure(uid: &str, error: &str, policy: FailurePolicy) -> Answer {
    let body = match policy {
        FailurePolicy::Open => {
            let warning = format!(
                "weft: the sidecar was not injected because of a webhook error ({error}); the pod runs without it"
            );
            response(uid, true, None, std::slice::from_ref(&warning), Some((200, &warning)))
        }
        FailurePolicy::Closed => response(
            uid,
            false,
            None,
            &[],
            Some((
                500,
                &format!("weft: the sidecar injection webhook failed ({error}); pods of this namespace are not admitted without it (--inject-fail-closed)"),
            )),
        ),
    };
    Answer {
        body,
        result: "error",
        summary: error.to_owned(),
    }
}

fn response(
    uid: &str,
    allowed: bool,
    patch: Option<&str>,
    warnings: &[String],
    status: Option<(u16, &str)>,
) -> Value {
    let mut response = json!({ "uid": uid, "allowed": allowed });
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(patch);
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    if let Some((code, message)) = status {
        response["status"] = json!({ "code": code, "message": message });
    }
    json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response })
}
