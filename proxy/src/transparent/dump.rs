//! The `transparent` part of `/config_dump`: what an operator needs to see of transparent mode
//! in one place: the captured listeners (every address each is bound on, its IPv6 twin
//! included) with their detection settings, the service VIPs, the per-port destinations
//! captured connections are routed to, and the app ports served inbound. The mesh DNS server's
//! part is added by the caller (`crate::dns::config_dump`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::snapshot::Snapshot;

/// The section for `snapshot` (`{}`-like empty lists before the first one).
pub fn config_dump(snapshot: Option<&Snapshot>) -> Value {
    let Some(s) = snapshot else {
        return json!({"listeners": [], "vips": [], "destinations": [], "inbound_ports": []});
    };
    // Captured listeners by name, with every address they are bound on (sorted).
    let mut listeners: BTreeMap<&str, (Vec<String>, Value)> = BTreeMap::new();
    for (addr, l) in &s.listeners {
        let Some(cap) = &l.capture else { continue };
        let entry = listeners.entry(&l.name).or_insert_with(|| {
            (
                Vec::new(),
                json!({
                    "direction": l.direction.as_str(),
                    "detection": {
                        "timeout_ms": u64::try_from(cap.detect_timeout.as_millis()).unwrap_or(u64::MAX),
                        "skip_ports": cap.skip_ports,
                    },
                }),
            )
        });
        entry.0.push(addr.to_string());
    }
    let listeners: Vec<Value> = listeners
        .into_iter()
        .map(|(name, (mut addrs, mut v))| {
            addrs.sort();
            v["name"] = json!(name);
            v["addresses"] = json!(addrs);
            v
        })
        .collect();
    let protos: Vec<_> = s
        .resources
        .clusters
        .iter()
        .flat_map(|set| &set.clusters)
        .collect();
    let endpoints = |name: &str| -> Vec<String> {
        s.clusters.get(name).map_or_else(Vec::new, |c| {
            let mut e: Vec<String> = c.endpoints.iter().map(|e| e.addr.to_string()).collect();
            e.sort();
            e
        })
    };
    let vips: Vec<Value> = protos
        .iter()
        .filter(|c| !c.vip.is_empty())
        .map(|c| json!({"service": c.name, "vip": c.vip}))
        .collect();
    let destinations: Vec<Value> = protos
        .iter()
        .filter(|c| !c.service.is_empty() && c.port != 0)
        .map(|c| {
            json!({
                "cluster": c.name,
                "port": c.port,
                "http_routes": s.tables.contains_key(c.name.as_str()),
                "endpoints": endpoints(&c.name),
            })
        })
        .collect();
    let inbound_ports: Vec<Value> = protos
        .iter()
        .filter(|c| c.service.is_empty() && c.port != 0)
        .map(|c| json!({"port": c.port, "cluster": c.name, "endpoints": endpoints(&c.name)}))
        .collect();
    json!({
        "listeners": listeners,
        "vips": vips,
        "destinations": destinations,
        "inbound_ports": inbound_ports,
    })
}
