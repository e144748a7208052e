//! Child processes owned by a test: output captured in a log file, stopped by PID.
//!
//! A [`ProcessGuard`] sends SIGTERM to its own child's PID when dropped, gives it a few seconds to
//! exit, then SIGKILLs and reaps it. When the drop happens because the test is panicking, the log
//! tail is printed (the test harness shows it with the failure) and the log file is kept.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// How long a stopped process may take to exit after SIGTERM before it is SIGKILLed.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// How many log lines failure messages show.
pub const LOG_TAIL_LINES: usize = 40;

/// A running child process, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct ProcessGuard {
    name: String,
    child: Child,
    exit: Option<ExitStatus>,
    log_path: PathBuf,
    // Holds the log directory; it is deleted with the guard unless the test failed.
    log_dir: Option<tempfile::TempDir>,
}

impl ProcessGuard {
    /// Spawns `cmd` with stdin closed and stdout and stderr appended to one log file in a new
    /// temporary directory. `name` identifies the process in messages.
    ///
    /// `RUST_LOG` defaults to `info` and `RUST_BACKTRACE` to `1` unless the caller set them.
    pub fn spawn(name: &str, mut cmd: Command) -> ProcessGuard {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("weft-{safe}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a log dir for {name}: {e}"));
        let log_path = log_dir.path().join(format!("{safe}.log"));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone the log handle for {name}: {e}"));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // Plain logs: they end up in files and failure messages, not on a terminal.
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ProcessGuard {
            name: name.to_string(),
            child,
            exit: None,
            log_path,
            log_dir: Some(log_dir),
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the file holding the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the child wrote so far (lossy UTF-8).
    pub fn log(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The last `lines` lines of the log (reads at most the last 64 KiB).
    pub fn log_tail(&self, lines: usize) -> String {
        const MAX: u64 = 64 * 1024;
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
            let _ = f.read_to_end(&mut bytes);
        }
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A block naming the process and showing its log tail, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- {} (pid {}, log {}) last {} lines ---\n{}\n--- end of {} ---",
            self.name,
            self.pid(),
            self.log_path.display(),
            LOG_TAIL_LINES,
            self.log_tail(LOG_TAIL_LINES),
            self.name
        )
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Panics (with the log tail) if the child has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit_status() {
            panic!(
                "{} exited unexpectedly ({status})\n{}",
                self.name,
                self.describe()
            );
        }
    }

    /// Waits (polling, without blocking the async runtime) for the child to exit by itself.
    /// Panics with the log tail if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` to the child's PID (ignored if it has already been reaped).
    fn signal(&mut self, signal: Signal) {
        if self.try_exit_status().is_some() {
            return;
        }
        let pid = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw);
        if let Some(pid) = pid {
            // ESRCH (already gone) is fine: try_wait reaps it below.
            let _ = kill_process(pid, signal);
        }
    }

    /// Stops the child: SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL; reaps it.
    /// Blocks the calling thread (at most a little over `TERM_GRACE`). Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::TERM);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// SIGKILLs the child at once (a crash, as far as its peers can tell) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::KILL);
        if self.exit.is_none() {
            self.exit = self.child.wait().ok();
        }
        self.exit
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let already_exited = self.try_exit_status();
        let status = self.stop();
        if std::thread::panicking() {
            // Keep the whole log for a post-mortem and show its tail with the failure.
            if let Some(dir) = self.log_dir.take() {
                let _ = dir.keep();
            }
            let how = match already_exited {
                Some(s) => format!("had already exited ({s})"),
                None => format!("stopped by the test ({status:?})"),
            };
            eprintln!("{} {how}\n{}", self.name, self.describe());
        }
    }
}

impl std::fmt::Debug for ProcessGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGuard")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("log", &self.log_path)
            .finish()
    }
}
