//! The control-plane scale benchmark's load generator (`weft-scale attach`, benches/scale) run
//! against a real control plane with 20 simulated proxies, so the generator can't rot: every
//! simulated proxy gets its SVID from `Identity.Certify`, opens its own authenticated
//! discovery stream, converges from cold, and ACKs both applies (a change of every service and
//! one of a single service); the proxies that cannot call the changed service are pushed
//! nothing. No timing is asserted.

use std::time::Duration;

use weft_testkit::{bin_path, ControlPlane, PolicyDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_simulated_proxies_converge_and_ack_every_apply() {
    let policies = PolicyDir::new();
    let cp = ControlPlane::start(policies.path()).await;
    let ca_dir = cp.ca_dir().expect("the control plane runs a CA");
    let work = tempfile::tempdir().unwrap();
    let report_path = work.path().join("report.json");
    let weftctl = bin_path("weftctl");
    let bin_dir = weftctl.parent().expect("weftctl has a directory");
    // 20 proxies over 5 services, each calling the next 2: service 0 is called by services 3
    // and 4 (8 proxies).
    let mut cmd = tokio::process::Command::new(bin_path("weft-scale"));
    cmd.arg("attach")
        .args(["--n", "20", "--services", "5", "--deps", "2"])
        .args(["--phase-timeout", "60s", "--quiet", "300ms"])
        .arg("--grpc")
        .arg(cp.grpc_url())
        .arg("--admin")
        .arg(cp.admin_url(""))
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--work")
        .arg(work.path())
        .arg("--json")
        .arg(&report_path)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("weft-scale attach did not finish within 240 s")
        .expect("cannot run weft-scale");
    assert!(
        out.status.success(),
        "weft-scale attach exited {}\nstderr:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        cp.process.describe()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let phase = |name: &str| {
        report["phases"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == name))
            .unwrap_or_else(|| panic!("no phase {name} in {report:#}"))
            .clone()
    };

    let cold = phase("cold");
    assert_eq!(cold["affected"], 20, "{cold:#}");
    assert_eq!(
        cold["converged"], 20,
        "every proxy held the whole mesh: {cold:#}"
    );
    assert!(cold["pushes"]["count"].as_u64().unwrap() >= 20, "{cold:#}");
    assert!(cold["pushes"]["bytes"].as_u64().unwrap() > 0, "{cold:#}");

    let mesh = phase("mesh-wide");
    assert_eq!(mesh["affected"], 20, "{mesh:#}");
    assert_eq!(
        mesh["converged"], 20,
        "every proxy ACKed the change: {mesh:#}"
    );
    assert!(
        mesh["compilations"].as_f64().unwrap() >= 5.0,
        "one per scope: {mesh:#}"
    );

    let one = phase("one-service");
    assert_eq!(one["affected"], 8, "the callers of svc-0: {one:#}");
    assert_eq!(one["converged"], 8, "{one:#}");
    assert_eq!(one["pushes_to_unaffected"], 0, "{one:#}");

    assert_eq!(report["stream_failures"], 0, "{report:#}");
    // The control plane issued their certificates and admitted every stream.
    let metrics = cp.metrics().await;
    let issued = metrics.sum(
        "weft_control_certificates_issued_total",
        &[("result", "ok")],
    );
    assert!(
        issued >= 20.0,
        "{}",
        metrics.lines_for("weft_control_certificates_issued_total")
    );
    assert_eq!(
        metrics.sum("weft_control_registrations_refused_total", &[]),
        0.0,
        "{}",
        metrics.lines_for("weft_control_registrations_refused_total")
    );
}
