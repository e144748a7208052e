//! How long one proxy's compilation takes as the mesh grows: N services, each with 5 static
//! endpoints and one header route, compiled for a proxy whose scope is every service (the
//! default without `dependencies:`). `cargo run --release -p weft-control --example
//! compile_scale -- 250 500 1000 2000`.

use std::time::{Duration, Instant};

use weft_control::compile::{compile, TrustBundle};
use weft_control::policy::{PolicySet, SourceFile};
use weft_control::registry::Registry;
use weft_proto::v1::Node;

fn policy(n: usize) -> PolicySet {
    let mut yaml = String::from("services:\n");
    for i in 0..n {
        yaml.push_str(&format!("  - name: svc-{i}\n    endpoints:\n"));
        for e in 0..5 {
            yaml.push_str(&format!(
                "      - address: 10.{}.{}.{e}:8080\n",
                i / 250,
                i % 250
            ));
        }
    }
    yaml.push_str("routes:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - name: route-{i}\n    service: svc-{i}\n    match: {{headers: [{{name: x-canary, exact: \"true\"}}]}}\n    destinations: [{{service: svc-{}}}]\n",
            (i + 1) % n
        ));
    }
    PolicySet::from_files(vec![SourceFile {
        name: "mesh.yaml".into(),
        content: yaml,
    }])
    .expect("valid policy")
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![250, 500, 1000]
    } else {
        sizes
    };
    for n in sizes {
        let started = Instant::now();
        let p = policy(n);
        let parse = started.elapsed();
        let registry = Registry::new(Duration::from_secs(5));
        let node = Node {
            id: "svc-0-1".into(),
            service: "svc-0".into(),
            namespace: "default".into(),
            inbound_address: "127.0.0.2:15006".into(),
            outbound_address: "127.0.0.2:15001".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let r = compile(&p, &registry, &TrustBundle::default(), &node);
        let took = started.elapsed();
        println!(
            "{n} services: parse+validate {parse:?}, compile {took:?} ({} clusters, {} routes)",
            r.clusters.clusters.len(),
            r.routes.tables[0].routes.len()
        );
    }
}
