//! `weftctl`: the command-line client of the control plane's admin API.
//!
//! Exit codes: 0 ok, 1 rejected/invalid (or any server-side failure), 2 usage, 3 server
//! unreachable.

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
    about,
    after_help = "Exit codes: 0 ok, 1 rejected or invalid, 2 usage, 3 server unreachable."
)]
pub struct Cli {
    /// Admin API of weft-control.
    #[arg(
        long,
        global = true,
        env = "WEFT_CONTROL_ADMIN",
        default_value = "http://127.0.0.1:15011",
        value_name = "URL"
    )]
    pub server: String,
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
    Proxies,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List policy files, services, routes or connected proxies.
    Get {
        kind: Kind,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Validate and store policy files (a file, or every *.yaml/*.yml in a directory).
    Apply {
        #[arg(
            short = 'f',
            long = "filename",
            value_name = "FILE|DIR",
            required = true
        )]
        files: Vec<PathBuf>,
    },
    /// Check policy files against the server's current set without storing them.
    Validate {
        #[arg(
            short = 'f',
            long = "filename",
            value_name = "FILE|DIR",
            required = true
        )]
        files: Vec<PathBuf>,
    },
    /// Remove a policy file from the store (e.g. `routes.yaml`; `.yaml` is added if missing).
    Delete { name: String },
    /// Which config version each connected proxy runs.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
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
    let client = AdminClient::new(&cli.server)?;
    match cli.command {
        Command::Get { kind, output } => get(&client, kind, output).await,
        Command::Status { output } => status(&client, output).await,
        Command::Apply { files } => apply(&client, &files, false).await,
        Command::Validate { files } => apply(&client, &files, true).await,
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
    let mut t = Table::new(&[
        "ID",
        "SERVICE",
        "LISTENERS",
        "ROUTES",
        "CLUSTERS",
        "ENDPOINTS",
        "LAST NACK",
        "CONNECTED SINCE",
    ]);
    let empty = Vec::new();
    for v in value.as_array().unwrap_or(&empty) {
        let versions = v.get("versions").cloned().unwrap_or(Value::Null);
        let version = |t: &str| or_dash(short(&s(&versions, t)));
        t.row(vec![
            s(v, "id"),
            format!("{}.{}", s(v, "service"), s(v, "namespace")),
            version("listeners"),
            version("routes"),
            version("clusters"),
            version("endpoints"),
            or_dash(s(v, "last_nack")),
            s(v, "connected_since"),
        ]);
    }
    print!("{}", t.render());
    Ok(())
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

/// Applies (or, with `dry_run`, validates) the files: one file with `PUT
/// /v1/policies/<name>`, several at once with the multi-file endpoint so that files which
/// reference each other are validated together.
async fn apply(client: &AdminClient, paths: &[PathBuf], dry_run: bool) -> Result<(), CtlError> {
    let mut files = Vec::new();
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
        if files
            .iter()
            .any(|f: &crate::policy::SourceFile| f.name == name)
        {
            return Err(CtlError::usage(format!(
                "{name} given twice: policy files are stored by file name"
            )));
        }
        let content = std::fs::read_to_string(&path)
            .map_err(|e| CtlError::usage(format!("{}: {e}", path.display())))?;
        files.push(crate::policy::SourceFile { name, content });
    }
    let label = match files.as_slice() {
        [one] => one.name.clone(),
        many => format!("{} files", many.len()),
    };
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
        assert!(AdminClient::new("https://x:1").is_err());
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
}
