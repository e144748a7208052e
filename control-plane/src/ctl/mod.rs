//! `weftctl`: the command-line client of the control plane's admin API.
//!
//! Exit codes: 0 ok, 1 rejected/invalid (or any server-side failure), 2 usage, 3 server
//! unreachable. `diff` exits 0 whenever it computed a difference (empty or not) and 1 when the
//! files are invalid, like `validate`.

mod apply;
pub mod auth;
pub mod check;
pub mod client;
mod get;
pub mod log_level;
pub mod table;

use apply::{apply, delete, diff};
use get::{get, status};

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, StatusCode};
use serde_json::Value;

pub use client::{AdminClient, ClientError, Reply};

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
    /// Change one proxy's log filter at run time (pushed through the control plane).
    LogLevel(log_level::LogLevelArgs),
    /// Check the mesh without a kubeconfig: control plane reachable and ready, CA expiry,
    /// policies valid, every proxy on the current config, the injection webhook's certificate.
    /// Exit 0 only when every check passes.
    Check(check::CheckArgs),
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
        Command::LogLevel(args) => log_level::log_level(&client, &args).await,
        Command::Delete { name } => delete(&client, &name).await,
        Command::Check(args) => check::run(&client, &cli.credentials, &args).await,
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

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::apply::render_diff;
    use super::get::status_table;
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
