//! `weftctl get` and `weftctl status`: listing what the control plane serves, as tables or
//! structured output.

use serde_json::Value;

use super::table::Table;
use super::{
    get_json, list, one_line, or_dash, print_structured, s, AdminClient, CtlError, Kind, Output,
};

pub(super) async fn get(client: &AdminClient, kind: Kind, output: Output) -> Result<(), CtlError> {
    let path = match kind {
        Kind::Policies => "/v1/policies",
        Kind::Services => "/v1/services",
        Kind::Routes => "/v1/routes",
        Kind::Clusters => "/v1/clusters",
        Kind::Endpoints => "/v1/endpoints",
        Kind::Proxies => "/v1/proxies",
    };
    let value = get_json(client, path).await?;
    if output != Output::Table {
        return print_structured(&value, output);
    }
    let empty = Vec::new();
    let items = value.as_array().unwrap_or(&empty);
    let rendered = match kind {
        Kind::Policies => {
            let mut t = Table::new(&["FILE", "LINES", "BYTES"]);
            for f in list(&value, "files") {
                let content = s(f, "content");
                t.row(vec![
                    s(f, "name"),
                    content.lines().count().to_string(),
                    content.len().to_string(),
                ]);
            }
            let mut out = format!("version: {}\n", s(&value, "version"));
            if let Some(e) = value.get("error").and_then(Value::as_str) {
                out.push_str(
                    "error: the store holds an invalid policy; serving the last good set:\n",
                );
                for line in e.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            }
            out.push('\n');
            out + &t.render()
        }
        Kind::Services => {
            let mut t = Table::new(&[
                "NAME",
                "NAMESPACE",
                "PROTOCOL",
                "PORT",
                "ENDPOINTS",
                "DEPENDENCIES",
            ]);
            for v in items {
                let deps = v.get("dependencies").and_then(Value::as_array).map_or_else(
                    || "*".to_owned(),
                    |d| {
                        d.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                );
                let endpoints: Vec<String> = list(v, "endpoints")
                    .iter()
                    .map(|e| s(e, "address"))
                    .collect();
                t.row(vec![
                    s(v, "name"),
                    s(v, "namespace"),
                    s(v, "protocol"),
                    or_dash(s(v, "port")),
                    or_dash(endpoints.join(",")),
                    or_dash(deps),
                ]);
            }
            t.render()
        }
        Kind::Routes => {
            let mut t = Table::new(&["NAME", "SERVICE", "MATCH", "DESTINATIONS", "TIMEOUT"]);
            for v in items {
                t.row(vec![
                    s(v, "name"),
                    s(v, "service"),
                    describe_match(v),
                    list(v, "destinations")
                        .iter()
                        .map(|d| match d.get("weight") {
                            Some(Value::Number(w)) => format!("{}:{w}", s(d, "service")),
                            _ => s(d, "service"),
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    or_dash(s(v, "timeout")),
                ]);
            }
            t.render()
        }
        Kind::Clusters => {
            let mut t = Table::new(&[
                "NAME",
                "PROTOCOL",
                "LB",
                "MTLS",
                "CONNECT TIMEOUT",
                "REQUEST TIMEOUT",
                "ENDPOINTS",
                "ADDRESSES",
            ]);
            for v in items {
                let endpoints = list(v, "endpoints");
                let protocol = match s(v, "upstream_protocol").as_str() {
                    "preserve" | "" => s(v, "protocol"),
                    upstream => format!("{} ({upstream})", s(v, "protocol")),
                };
                t.row(vec![
                    s(v, "name"),
                    protocol,
                    s(v, "lb"),
                    or_dash(s(v, "mtls")),
                    s(v, "connect_timeout"),
                    s(v, "request_timeout"),
                    endpoints.len().to_string(),
                    or_dash(
                        endpoints
                            .iter()
                            .map(|e| s(e, "address"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ]);
            }
            t.render()
        }
        Kind::Endpoints => {
            let mut t = Table::new(&["CLUSTER", "ADDRESS", "WEIGHT", "STATE", "PROXY"]);
            for v in items {
                t.row(vec![
                    s(v, "cluster"),
                    s(v, "address"),
                    s(v, "weight"),
                    s(v, "state"),
                    or_dash(s(v, "proxy_id")),
                ]);
            }
            t.render()
        }
        Kind::Proxies => {
            let mut t = Table::new(&["ID", "SERVICE", "NAMESPACE", "INBOUND", "CONNECTED SINCE"]);
            for v in items {
                t.row(vec![
                    s(v, "id"),
                    s(v, "service"),
                    s(v, "namespace"),
                    or_dash(s(v, "inbound_address")),
                    s(v, "connected_since"),
                ]);
            }
            t.render()
        }
    };
    print!("{rendered}");
    Ok(())
}

pub(super) fn describe_match(route: &Value) -> String {
    let mut parts = Vec::new();
    let hosts: Vec<&str> = list(route, "hosts")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("hosts={}", hosts.join(",")));
    }
    if let Some(m) = route.get("match") {
        if let Some(p) = m.get("path") {
            for k in ["exact", "prefix", "regex"] {
                if let Some(v) = p.get(k).and_then(Value::as_str) {
                    parts.push(format!("path {k} {v}"));
                }
            }
        }
        for h in list(m, "headers") {
            let cond = ["exact", "regex", "present"]
                .iter()
                .find_map(|k| {
                    h.get(*k).map(|v| {
                        format!(
                            "{k} {}",
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                        )
                    })
                })
                .unwrap_or_default();
            let not = if h.get("invert").and_then(Value::as_bool) == Some(true) {
                "not "
            } else {
                ""
            };
            parts.push(format!("header {} {not}{cond}", s(h, "name")));
        }
        let methods: Vec<&str> = list(m, "methods")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if !methods.is_empty() {
            parts.push(format!("methods={}", methods.join(",")));
        }
    }
    if parts.is_empty() {
        "*".to_owned()
    } else {
        parts.join("; ")
    }
}

pub(super) fn short(version: &str) -> String {
    version.chars().take(8).collect()
}

pub(super) async fn status(client: &AdminClient, output: Output) -> Result<(), CtlError> {
    let value = get_json(client, "/v1/proxies").await?;
    if output != Output::Table {
        return print_structured(&value, output);
    }
    print!("{}", status_table(&value));
    Ok(())
}

/// The `weftctl status` table of a `GET /v1/proxies` answer.
pub(super) fn status_table(value: &Value) -> String {
    let mut t = Table::new(&[
        "ID",
        "SERVICE",
        "STATE",
        "LISTENERS",
        "ROUTES",
        "CLUSTERS",
        "ENDPOINTS",
        "POLICIES",
        "TRUST",
        "CONNECTED SINCE",
        "LAST NACK",
    ]);
    let empty = Vec::new();
    let proxies = value.as_array().unwrap_or(&empty);
    for v in proxies {
        let versions = v.get("versions").cloned().unwrap_or(Value::Null);
        let version = |t: &str| or_dash(short(&s(&versions, t)));
        let state = match s(v, "state").as_str() {
            "disconnected" => format!(
                "disconnected, removing in {}s",
                or_dash(s(v, "removing_in_seconds"))
            ),
            _ if v.get("nacking").and_then(Value::as_bool) == Some(true) => {
                "connected, NACKing".to_owned()
            }
            "" => "connected".to_owned(),
            other => other.to_owned(),
        };
        let last_nack = match (s(v, "last_nack"), s(v, "last_nack_at")) {
            (reason, _) if reason.is_empty() => "-".to_owned(),
            (reason, at) if at.is_empty() => one_line(&reason),
            (reason, at) => format!("{at} {}", one_line(&reason)),
        };
        t.row(vec![
            s(v, "id"),
            format!("{}.{}", s(v, "service"), s(v, "namespace")),
            state,
            version("listeners"),
            version("routes"),
            version("clusters"),
            version("endpoints"),
            version("policies"),
            version("trust"),
            s(v, "connected_since"),
            last_nack,
        ]);
    }
    if proxies.is_empty() {
        return "no proxies connected\n".to_owned();
    }
    t.render()
}
