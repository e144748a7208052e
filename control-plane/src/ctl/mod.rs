//! `weftctl`: the command-line client of the control plane's admin API.
//!
//! Exit codes: 0 ok, 1 rejected/invalid (or any server-side failure), 2 usage, 3 server
//! unreachable. `diff` exits 0 whenever it computed a difference (empty or not) and 1 when the
//! files are invalid, like `validate`.

pub mod auth;
pub mod client;
pub mod table;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, StatusCode};
use serde_json::Value;

pub use client::{AdminClient, ClientError, Reply};
use table::Table;

/// Success.
pub const EXIT_OK: i32 = 0;
/// The server rejected the request (invalid policy, unknown file, ...).
pub const EXIT_REJECTED: i32 = 1;
/// Bad command line.
pub const EXIT_USAGE: i32 = 2;
/// The admin API could not be reached.
pub const EXIT_UNREACHABLE: i32 = 3;

/// Command-line client for the Weft control plane.
#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Command-line client of the Weft control plane's admin API (weft-control --admin)",
    after_help = "\
Exit codes:
  0  ok (diff: the difference was computed, whether or not anything would change)
  1  rejected or invalid: the server refused the request (e.g. a policy error, printed as
     file:line: field: reason) and nothing changed
  2  usage: bad arguments, unreadable files, bad --server URL
  3  the control plane's admin API is unreachable"
)]
pub struct Cli {
    /// Admin API of weft-control (https://; http:// only for an --insecure-admin server).
    #[arg(
        long,
        global = true,
        env = "WEFT_CONTROL_ADMIN",
        default_value = "https://127.0.0.1:15011",
        value_name = "URL"
    )]
    pub server: String,
    #[command(flatten)]
    pub credentials: auth::Credentials,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of `get` and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

/// What `get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Policies,
    Services,
    Routes,
    /// Each service's compiled cluster with its current endpoints.
    Clusters,
    /// Every endpoint of every cluster (static and registered sidecars).
    Endpoints,
    Proxies,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List policy files, services, routes, compiled clusters, endpoints or connected proxies.
    Get {
        kind: Kind,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Validate and store policy files (a file, or every *.yaml/*.yml in a directory).
    Apply {
        #[command(flatten)]
        files: PolicyFiles,
    },
    /// Check policy files against the server's current set without storing them.
    Validate {
        #[command(flatten)]
        files: PolicyFiles,
    },
    /// Show what applying policy files would change, per connected proxy, without storing them.
    Diff {
        #[command(flatten)]
        files: PolicyFiles,
        /// Output format (table = human-readable summary).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove a policy file from the store (e.g. `routes.yaml`; `.yaml` is added if missing).
    Delete { name: String },
    /// Every proxy (connected, or disconnected within its grace): the config version it ACKed
    /// per type, its last NACK, and since when it is connected.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// The `-f FILE|DIR` policy files shared by `apply`, `validate` and `diff`.
#[derive(Debug, clap::Args)]
pub struct PolicyFiles {
    /// A policy file, or a directory of *.yaml/*.yml files (repeatable).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR",
        required = true
    )]
    paths: Vec<PathBuf>,
}

/// A failure with its exit code; the message goes to stderr.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    pub code: i32,
    pub message: String,
}

impl CtlError {
    fn rejected(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_REJECTED,
            message: message.into(),
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::BadUrl { .. } => EXIT_USAGE,
            ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

/// Runs one command, printing results to stdout; returns the exit code's error on failure.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let client = AdminClient::with_credentials(&cli.server, &cli.credentials)?;
    match cli.command {
        Command::Get { kind, output } => get(&client, kind, output).await,
        Command::Status { output } => status(&client, output).await,
        Command::Apply { files } => apply(&client, &files.paths, false).await,
        Command::Validate { files } => apply(&client, &files.paths, true).await,
        Command::Diff { files, output } => diff(&client, &files.paths, output).await,
        Command::Delete { name } => delete(&client, &name).await,
    }
}

/// The `errors` of a 4xx/5xx reply, or its text.
fn reply_errors(reply: &Reply) -> Vec<String> {
    let from_json = reply.json().and_then(|v| {
        if let Some(errors) = v.get("errors").and_then(Value::as_array) {
            return Some(
                errors
                    .iter()
                    .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                    .collect(),
            );
        }
        v.get("error")
            .and_then(Value::as_str)
            .map(|e| vec![e.to_owned()])
    });
    from_json.unwrap_or_else(|| vec![format!("{}: {}", reply.status, reply.text().trim())])
}

async fn get_json(client: &AdminClient, path: &str) -> Result<Value, CtlError> {
    let reply = client.send(Method::GET, path, None).await?;
    if reply.status != StatusCode::OK {
        return Err(CtlError::rejected(format!(
            "GET {path}: {}",
            reply_errors(&reply).join("; ")
        )));
    }
    reply
        .json()
        .ok_or_else(|| CtlError::rejected(format!("GET {path}: the server's answer is not JSON")))
}

fn print_structured(value: &Value, output: Output) -> Result<(), CtlError> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
        _ => serde_yaml::to_string(value).map_err(|e| e.to_string()),
    }
    .map_err(|e| CtlError::rejected(format!("formatting output: {e}")))?;
    print!("{text}");
    Ok(())
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s
    }
}

async fn get(client: &AdminClient, kind: Kind, output: Output) -> Result<(), CtlError> {
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

fn describe_match(route: &Value) -> String {
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

fn short(version: &str) -> String {
    version.chars().take(8).collect()
}

async fn status(client: &AdminClient, output: Output) -> Result<(), CtlError> {
    let value = get_json(client, "/v1/proxies").await?;
    if output != Output::Table {
        return print_structured(&value, output);
    }
    print!("{}", status_table(&value));
    Ok(())
}

/// The `weftctl status` table of a `GET /v1/proxies` answer.
fn status_table(value: &Value) -> String {
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

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The policy files named by `paths`: files as given, directories' `*.yaml`/`*.yml` sorted.
fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CtlError> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| CtlError::usage(format!("{}: {e}", path.display())))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && file_name(p).is_some_and(crate::policy::store::is_valid_file_name)
                })
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(CtlError::usage(format!(
                    "{}: no *.yaml or *.yml files",
                    path.display()
                )));
            }
            out.extend(found);
        } else if path.is_file() {
            out.push(path.clone());
        } else {
            return Err(CtlError::usage(format!(
                "{}: no such file or directory",
                path.display()
            )));
        }
    }
    Ok(out)
}

fn file_name(p: &Path) -> Option<&str> {
    p.file_name().and_then(|n| n.to_str())
}

/// Reads the policy files named by `paths` (files, or directories' `*.yaml`/`*.yml`).
fn read_policy_files(paths: &[PathBuf]) -> Result<Vec<crate::policy::SourceFile>, CtlError> {
    let mut files: Vec<crate::policy::SourceFile> = Vec::new();
    for path in collect_files(paths)? {
        let Some(name) = file_name(&path).map(str::to_owned) else {
            return Err(CtlError::usage(format!(
                "{}: not a file name",
                path.display()
            )));
        };
        if !crate::policy::store::is_valid_file_name(&name) {
            return Err(CtlError::usage(format!(
                "{}: policy files must be named <name>.yaml or <name>.yml",
                path.display()
            )));
        }
        if files.iter().any(|f| f.name == name) {
            return Err(CtlError::usage(format!(
                "{name} given twice: policy files are stored by file name"
            )));
        }
        let content = std::fs::read_to_string(&path)
            .map_err(|e| CtlError::usage(format!("{}: {e}", path.display())))?;
        files.push(crate::policy::SourceFile { name, content });
    }
    Ok(files)
}

/// How output names a set of files: the file's name, or `N files`.
fn label_of(files: &[crate::policy::SourceFile]) -> String {
    match files {
        [one] => one.name.clone(),
        many => format!("{} files", many.len()),
    }
}

/// Applies (or, with `dry_run`, validates) the files: one file with `PUT
/// /v1/policies/<name>`, several at once with the multi-file endpoint so that files which
/// reference each other are validated together.
async fn apply(client: &AdminClient, paths: &[PathBuf], dry_run: bool) -> Result<(), CtlError> {
    let files = read_policy_files(paths)?;
    let label = label_of(&files);
    let reply = match files.as_slice() {
        [one] => {
            let (method, url) = if dry_run {
                (Method::POST, format!("/v1/validate/{}", one.name))
            } else {
                (Method::PUT, format!("/v1/policies/{}", one.name))
            };
            client.send(method, &url, Some(one.content.clone())).await?
        }
        many => {
            let (method, url) = if dry_run {
                (Method::POST, "/v1/validate")
            } else {
                (Method::PUT, "/v1/policies")
            };
            let body = serde_json::json!({ "files": many }).to_string();
            client.send(method, url, Some(body)).await?
        }
    };
    match reply.status {
        StatusCode::OK => {
            let v = reply.json().unwrap_or(Value::Null);
            let changes: Vec<&str> = list(&v, "changed")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let verb = match (dry_run, changes.is_empty()) {
                (true, _) => "valid",
                (false, true) => "unchanged",
                (false, false) => "applied",
            };
            println!("{label}: {verb} (version {})", s(&v, "version"));
            for c in changes {
                if dry_run {
                    println!("  would be: {c}");
                } else {
                    println!("  {c}");
                }
            }
            Ok(())
        }
        StatusCode::UNPROCESSABLE_ENTITY => {
            for e in reply_errors(&reply) {
                eprintln!("{e}");
            }
            Err(CtlError::rejected(if dry_run {
                format!("{label}: invalid")
            } else {
                format!("{label}: rejected, nothing changed")
            }))
        }
        _ => Err(CtlError::rejected(format!(
            "{label}: {}",
            reply_errors(&reply).join("; ")
        ))),
    }
}

/// Shows what applying the files would change: the policy-level changes, then per connected
/// proxy the resource types that would be pushed and the resources added/removed/changed.
async fn diff(client: &AdminClient, paths: &[PathBuf], output: Output) -> Result<(), CtlError> {
    let files = read_policy_files(paths)?;
    let label = label_of(&files);
    let body = serde_json::json!({ "files": files }).to_string();
    let reply = client.send(Method::POST, "/v1/diff", Some(body)).await?;
    match reply.status {
        StatusCode::OK => {
            let v = reply.json().ok_or_else(|| {
                CtlError::rejected("POST /v1/diff: the server's answer is not JSON")
            })?;
            if output != Output::Table {
                return print_structured(&v, output);
            }
            print!("{}", render_diff(&label, &v));
            Ok(())
        }
        StatusCode::UNPROCESSABLE_ENTITY => {
            for e in reply_errors(&reply) {
                eprintln!("{e}");
            }
            Err(CtlError::rejected(format!(
                "{label}: invalid, no difference computed"
            )))
        }
        _ => Err(CtlError::rejected(format!(
            "{label}: {}",
            reply_errors(&reply).join("; ")
        ))),
    }
}

/// The human-readable form of a `POST /v1/diff` answer.
fn render_diff(label: &str, v: &Value) -> String {
    let mut out = String::new();
    let (current, proposed) = (s(v, "current_version"), s(v, "version"));
    let changes: Vec<&str> = list(v, "changed")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if current == proposed {
        out.push_str(&format!(
            "{label}: no change (policy version {current} already serving)\n"
        ));
    } else {
        out.push_str(&format!(
            "{label}: policy version {current} -> {proposed}\n"
        ));
    }
    for c in &changes {
        out.push_str(&format!("  {c}\n"));
    }
    let proxies = list(v, "proxies");
    if proxies.is_empty() {
        out.push_str("no proxies connected: nothing would be pushed\n");
        return out;
    }
    let affected = proxies
        .iter()
        .filter(|p| p.get("changes").and_then(Value::as_bool) == Some(true))
        .count();
    out.push_str(&format!(
        "{affected} of {} connected proxies would receive a push\n",
        proxies.len()
    ));
    for p in proxies {
        let name = format!("{} ({}.{})", s(p, "id"), s(p, "service"), s(p, "namespace"));
        if p.get("changes").and_then(Value::as_bool) != Some(true) {
            out.push_str(&format!("\n{name}: unchanged\n"));
            continue;
        }
        out.push_str(&format!("\n{name}:\n"));
        let Some(types) = p.get("types").and_then(Value::as_object) else {
            continue;
        };
        for t in [
            "listeners",
            "routes",
            "clusters",
            "endpoints",
            "policies",
            "trust",
        ] {
            let Some(d) = types.get(t) else { continue };
            if d.get("version_changes").and_then(Value::as_bool) != Some(true) {
                continue;
            }
            out.push_str(&format!(
                "  {t}: {} -> {}\n",
                short(&s(d, "version")),
                short(&s(d, "proposed_version"))
            ));
            for (key, mark) in [("added", '+'), ("removed", '-'), ("changed", '~')] {
                for name in list(d, key).iter().filter_map(Value::as_str) {
                    out.push_str(&format!("    {mark} {name}\n"));
                }
            }
        }
    }
    out
}

async fn delete(client: &AdminClient, name: &str) -> Result<(), CtlError> {
    let name = if name.ends_with(".yaml") || name.ends_with(".yml") {
        name.to_owned()
    } else {
        format!("{name}.yaml")
    };
    if !crate::policy::store::is_valid_file_name(&name) {
        return Err(CtlError::usage(format!(
            "invalid policy file name {name:?}"
        )));
    }
    let reply = client
        .send(Method::DELETE, &format!("/v1/policies/{name}"), None)
        .await?;
    match reply.status {
        StatusCode::OK => {
            let v = reply.json().unwrap_or(Value::Null);
            println!("{name}: deleted (version {})", s(&v, "version"));
            for c in list(&v, "changed").iter().filter_map(Value::as_str) {
                println!("  {c}");
            }
            Ok(())
        }
        StatusCode::UNPROCESSABLE_ENTITY => {
            eprintln!("{name}: deleting it would leave an invalid policy set (nothing changed):");
            for e in reply_errors(&reply) {
                eprintln!("  {e}");
            }
            Err(CtlError::rejected(format!("deleting {name} was rejected")))
        }
        _ => Err(CtlError::rejected(format!(
            "{name}: {}",
            reply_errors(&reply).join("; ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from(["weftctl", "get", "services", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Get {
                kind: Kind::Services,
                output: Output::Json
            }
        ));
        let cli =
            Cli::try_parse_from(["weftctl", "--server", "http://h:1", "apply", "-f", "x.yaml"])
                .unwrap();
        assert_eq!(cli.server, "http://h:1");
        assert!(Cli::try_parse_from(["weftctl", "apply"]).is_err());
        assert!(Cli::try_parse_from(["weftctl", "get", "nothing"]).is_err());
    }

    #[test]
    fn rejects_non_http_urls() {
        assert!(AdminClient::new("https://x:1").is_err(), "https needs a CA");
        assert!(AdminClient::new("ftp://x:1").is_err());
        assert!(AdminClient::new("127.0.0.1:15011").is_err());
        assert!(AdminClient::new("http://127.0.0.1:15011/").is_ok());
    }

    #[tokio::test]
    async fn unreachable_server_exits_3_naming_the_url() {
        // Port 1 on loopback: nothing listens there.
        let client = AdminClient::new("http://127.0.0.1:1").unwrap();
        let err = CtlError::from(
            client
                .send(Method::GET, "/healthz", None)
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code, EXIT_UNREACHABLE);
        assert!(
            err.message.contains("http://127.0.0.1:1"),
            "{}",
            err.message
        );
    }

    #[test]
    fn status_shows_state_versions_and_last_nack() {
        let value = serde_json::json!([
            {"id": "api-1", "service": "api", "namespace": "default", "state": "disconnected",
             "removing_in_seconds": 3, "versions": {"routes": "0123456789abcdef"},
             "connected_since": "2024-01-01T00:00:00Z", "last_nack": null, "nacking": false},
            {"id": "web-1", "service": "web", "namespace": "default", "state": "connected",
             "versions": {}, "connected_since": "2024-01-01T00:00:00Z",
             "last_nack": "routes: bad\nregex", "last_nack_at": "2024-01-01T00:01:00Z",
             "nacking": true}
        ]);
        let out = status_table(&value);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("ID "), "{out}");
        assert!(lines[1].contains("disconnected, removing in 3s"), "{out}");
        assert!(lines[1].contains("01234567 "), "{out}");
        assert!(lines[2].contains("connected, NACKing"), "{out}");
        assert!(
            lines[2].ends_with("2024-01-01T00:01:00Z routes: bad regex"),
            "{out}"
        );
        assert_eq!(
            status_table(&serde_json::json!([])),
            "no proxies connected\n"
        );
    }

    #[test]
    fn diff_is_printed_per_proxy() {
        let value = serde_json::json!({
            "current_version": "aaaa", "version": "bbbb", "changed": ["route/r created"],
            "proxies": [
                {"id": "api-1", "service": "api", "namespace": "default", "changes": false, "types": {}},
                {"id": "web-1", "service": "web", "namespace": "default", "changes": true, "types": {
                    "routes": {"version": "1111111111", "proposed_version": "2222222222",
                               "version_changes": true, "added": ["outbound/r"], "removed": [],
                               "changed": ["outbound/default-api.default"]},
                    "listeners": {"version": "x", "proposed_version": "x", "version_changes": false,
                                  "added": [], "removed": [], "changed": []}
                }}
            ]
        });
        assert_eq!(
            render_diff("b.yaml", &value),
            "\
b.yaml: policy version aaaa -> bbbb
  route/r created
1 of 2 connected proxies would receive a push

api-1 (api.default): unchanged

web-1 (web.default):
  routes: 11111111 -> 22222222
    + outbound/r
    ~ outbound/default-api.default
"
        );
        let none = serde_json::json!({"current_version": "a", "version": "a", "changed": [], "proxies": []});
        assert_eq!(
            render_diff("x.yaml", &none),
            "x.yaml: no change (policy version a already serving)\nno proxies connected: nothing would be pushed\n"
        );
    }

    #[test]
    fn help_documents_exit_codes_and_new_commands() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for needle in ["Exit codes:", "3  the control plane", "diff", "status"] {
            assert!(help.contains(needle), "{needle} missing from\n{help}");
        }
        let cli = Cli::try_parse_from(["weftctl", "diff", "-f", "x.yaml", "-o", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Diff {
                output: Output::Json,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["weftctl", "get", "clusters"]).is_ok());
        assert!(Cli::try_parse_from(["weftctl", "get", "endpoints"]).is_ok());
    }
}
