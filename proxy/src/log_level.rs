//! The proxy's log filter, changeable at run time: through the admin port
//! (`PUT /log_level`, loopback callers only) or by an operator through the control plane
//! (`weftctl log-level PROXY LEVEL`, pushed in the LISTENERS set). The binary installs a
//! reloadable `EnvFilter` at start ([`install`]); the filter it started with (`RUST_LOG`, else
//! `info`) is what a reset returns to.

use std::sync::{Mutex, OnceLock, PoisonError};

/// Reloads the process's filter.
type Reload = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

struct Control {
    reload: Reload,
    initial: String,
    current: Mutex<String>,
    /// The last filter the control plane pushed ("" = none), so a repeated push (every
    /// LISTENERS update carries it) does not undo a local change.
    pushed: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Makes `reload` the way to change the filter; `initial` is the filter in force now.
pub fn install(initial: &str, reload: Reload) {
    let _ = CONTROL.set(Control {
        reload,
        initial: initial.to_owned(),
        current: Mutex::new(initial.to_owned()),
        pushed: Mutex::new(String::new()),
    });
}

/// The filter in force ("" when nothing was installed, e.g. in tests).
pub fn current() -> String {
    CONTROL.get().map_or_else(String::new, |c| {
        c.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    })
}

/// Sets the filter (`""`: the one the process started with).
pub fn set(filter: &str) -> Result<String, String> {
    let control = CONTROL
        .get()
        .ok_or_else(|| "the log filter is not reloadable in this process".to_owned())?;
    let wanted = if filter.trim().is_empty() {
        control.initial.clone()
    } else {
        filter.trim().to_owned()
    };
    let parsed = tracing_subscriber::EnvFilter::try_new(&wanted)
        .map_err(|e| format!("{wanted:?} is not a log filter: {e}"))?;
    (control.reload)(parsed)?;
    *control
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = wanted.clone();
    tracing::info!(filter = %wanted, "log filter changed");
    Ok(wanted)
}

/// Applies the filter the control plane pushed (`""` = none), if it changed since the last push.
pub fn from_control_plane(filter: &str) {
    let Some(control) = CONTROL.get() else {
        return;
    };
    {
        let mut pushed = control
            .pushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *pushed == filter {
            return;
        }
        *pushed = filter.to_owned();
    }
    if let Err(e) = set(filter) {
        tracing::warn!("log filter from the control plane: {e}");
    }
}
