//! Waiting with a deadline: every wait in the tests says what never happened.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// The deadline most waits use: generous for a loaded CI machine, short enough to fail fast.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Calls `probe` every 100 ms until it returns `Ok`, and returns that value. `Err` carries what
/// was observed instead. Panics after `timeout` with `what` (phrased as the condition that never
/// became true) and the last observation. A probe that hangs counts against the deadline.
pub async fn wait_until<T, E: Display>(
    timeout: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0u32;
    let mut last = String::from("(the probe never completed)");
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining.max(Duration::from_millis(1)), probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("the probe was still running at the deadline; before: {last}"),
        }
        if Instant::now() + POLL_INTERVAL >= deadline {
            panic!(
                "timed out after {:?} ({attempts} attempts) waiting until {what}; last observation: {last}",
                start.elapsed()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
