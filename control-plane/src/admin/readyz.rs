//! `GET /readyz` (no credential, like `/healthz`): 200 once the control plane can serve its
//! proxies, 503 naming what it waits for otherwise. Kubernetes' readiness probe and `weftctl
//! check` read it.
//!
//! Ready means: a policy set was loaded from the store (an invalid store at start leaves the
//! control plane serving an empty set, which would strip every proxy's config: not ready; a
//! later invalid change keeps the last good set: still ready), and the CA is loaded with an
//! issuing certificate that has not expired (Identity.Certify would refuse every proxy).

use crate::state::ControlPlane;

/// Why `cp` is not ready (empty: ready).
pub fn not_ready(cp: &ControlPlane) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(error) = cp.policy_error() {
        if cp.policy().files().is_empty() {
            let first = error.lines().next().unwrap_or_default();
            reasons.push(format!(
                "no valid policy set has been loaded from the store yet: {first}"
            ));
        }
    }
    if cp.trust().roots_pem.is_empty() {
        reasons.push("the CA is not loaded (no trust bundle)".to_owned());
    } else {
        let expiry = cp.metrics().issuer_expiry_timestamp_seconds.get();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if expiry <= now {
            reasons.push(format!(
                "the CA's issuing certificate expired (unix time {expiry}): proxies cannot get certificates"
            ));
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileStore, SharedStore};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn ready_needs_a_loaded_policy_set_and_a_live_ca() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "services: [{name: a, bad: 1}]\n").unwrap();
        let cp = ControlPlane::new(
            Arc::new(FileStore::in_dir(dir.path())) as SharedStore,
            Duration::from_secs(5),
            crate::metrics::Metrics::new().unwrap(),
        );
        assert!(cp.reload().await.is_err());
        let reasons = not_ready(&cp);
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("no valid policy set"), "{reasons:?}");
        assert!(reasons[1].contains("CA"), "{reasons:?}");

        std::fs::write(dir.path().join("a.yaml"), "services: [{name: a}]\n").unwrap();
        cp.reload().await.unwrap();
        cp.set_trust(crate::compile::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: vec!["-----BEGIN CERTIFICATE-----".into()],
        });
        let in_an_hour = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
        cp.metrics().issuer_expiry_timestamp_seconds.set(in_an_hour);
        assert_eq!(not_ready(&cp), Vec::<String>::new());
        // A later bad change keeps the last good set: still ready.
        std::fs::write(dir.path().join("a.yaml"), "services: [").unwrap();
        assert!(cp.reload().await.is_err());
        assert_eq!(not_ready(&cp), Vec::<String>::new());
        // An expired issuer.
        cp.metrics()
            .issuer_expiry_timestamp_seconds
            .set(in_an_hour - 7200);
        assert!(not_ready(&cp)[0].contains("expired"));
    }
}
