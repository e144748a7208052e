//! `weftctl apply`, `validate`, `diff` and `delete`: policy files in, the server's verdict out.

use std::path::{Path, PathBuf};

use http::{Method, StatusCode};
use serde_json::Value;

use super::get::short;
use super::{list, print_structured, reply_errors, s, AdminClient, CtlError, Output};

/// The policy files named by `paths`: files as given, directories' `*.yaml`/`*.yml` sorted.
pub(super) fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CtlError> {
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

pub(super) fn file_name(p: &Path) -> Option<&str> {
    p.file_name().and_then(|n| n.to_str())
}

/// Reads the policy files named by `paths` (files, or directories' `*.yaml`/`*.yml`).
pub(super) fn read_policy_files(
    paths: &[PathBuf],
) -> Result<Vec<crate::policy::SourceFile>, CtlError> {
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
pub(super) fn label_of(files: &[crate::policy::SourceFile]) -> String {
    match files {
        [one] => one.name.clone(),
        many => format!("{} files", many.len()),
    }
}

/// Applies (or, with `dry_run`, validates) the files: one file with `PUT
/// /v1/policies/<name>`, several at once with the multi-file endpoint so that files which
/// reference each other are validated together.
pub(super) async fn apply(
    client: &AdminClient,
    paths: &[PathBuf],
    dry_run: bool,
) -> Result<(), CtlError> {
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
        // The store moved on while this apply was validated: nothing was written.
        StatusCode::CONFLICT => Err(CtlError::rejected(format!(
            "{label}: not applied: {}",
            reply_errors(&reply).join("; ")
        ))),
        _ => Err(CtlError::rejected(format!(
            "{label}: {}",
            reply_errors(&reply).join("; ")
        ))),
    }
}

/// Shows what applying the files would change: the policy-level changes, then per connected
/// proxy the resource types that would be pushed and the resources added/removed/changed.
pub(super) async fn diff(
    client: &AdminClient,
    paths: &[PathBuf],
    output: Output,
) -> Result<(), CtlError> {
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
pub(super) fn render_diff(label: &str, v: &Value) -> String {
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

pub(super) async fn delete(client: &AdminClient, name: &str) -> Result<(), CtlError> {
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
