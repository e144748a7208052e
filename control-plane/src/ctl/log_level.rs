//! `weftctl log-level PROXY_ID LEVEL`: changes one proxy's log filter at run time. The control
//! plane pushes it in the proxy's LISTENERS set, so it reaches a proxy on any host and survives
//! the proxy's reconnects (not a control-plane restart); `--reset` gives the proxy its own
//! setting back.

use http::{Method, StatusCode};

use super::{reply_errors, AdminClient, CtlError};

/// The `log-level` arguments.
#[derive(Debug, clap::Args)]
pub struct LogLevelArgs {
    /// The proxy's node id (`weftctl status` lists them).
    pub proxy: String,
    /// A tracing filter: `debug`, `warn`, `info,weft_proxy=trace`, ...
    #[arg(required_unless_present = "reset")]
    pub level: Option<String>,
    /// Back to the proxy's own filter (its RUST_LOG, or info).
    #[arg(long, conflicts_with = "level")]
    pub reset: bool,
}

pub(super) async fn log_level(client: &AdminClient, args: &LogLevelArgs) -> Result<(), CtlError> {
    let path = format!("/v1/proxies/{}/log-level", args.proxy);
    let body = if args.reset {
        String::new()
    } else {
        args.level.clone().unwrap_or_default()
    };
    let reply = client.send(Method::PUT, &path, Some(body)).await?;
    if reply.status != StatusCode::OK {
        return Err(CtlError::rejected(format!(
            "{}: {}",
            args.proxy,
            reply_errors(&reply).join("; ")
        )));
    }
    match args.level.as_deref().filter(|_| !args.reset) {
        Some(level) => println!("{}: log level {level} (pushed)", args.proxy),
        None => println!(
            "{}: log level reset to its own setting (pushed)",
            args.proxy
        ),
    }
    Ok(())
}
