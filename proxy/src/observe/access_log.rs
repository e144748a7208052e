//! The access log: one line per request (JSON or Envoy-like text), written to stdout or a file
//! by a background thread. The request path only formats the line and `try_send`s it into a
//! bounded channel: when the writer falls behind, lines are dropped and counted
//! (`weft_access_log_dropped_total`) instead of blocking requests.
//!
//! Besides requests (`super::Observation`) and TCP connections (`super::log_tcp_connection`),
//! a tunnel (HTTP/1.1 upgrade, extended CONNECT, CONNECT: `crate::http::upgrade`) gets a line of
//! its own when it closes ([`log_tunnel`]), after the line of the request that opened it.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;

use super::config::{AccessLogConfig, LogFormat, STDOUT};
use super::flags::ResponseFlags;
use super::trace_context::TraceId;

/// Lines that may wait for the writer before new ones are dropped (at [`FLUSH_INTERVAL`], up
/// to ~650k lines/s).
pub const QUEUE_LINES: usize = 32 * 1024;

/// Everything one access log line says about a request.
#[derive(Debug, Clone)]
pub struct AccessLogEntry<'a> {
    /// When the request arrived.
    pub start: SystemTime,
    /// Listener name (`inbound`, `outbound`).
    pub listener: &'a str,
    /// `inbound` / `outbound`.
    pub direction: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Request authority (URI authority or `Host`).
    pub authority: &'a str,
    /// Request path (and query).
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'a str,
    /// Response status; 0 when no response was sent (downstream went away first).
    pub status: u16,
    /// Why the request did not get a plain upstream answer.
    pub flags: ResponseFlags,
    /// Arrival to the end of the response body.
    pub duration: Duration,
    /// Arrival to the response headers (`None`: no response).
    pub response_duration: Option<Duration>,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// Route name ("" when none matched).
    pub route: &'a str,
    /// Cluster name ("" when none was chosen).
    pub cluster: &'a str,
    /// Retries made (attempts - 1).
    pub retries: u32,
    /// The verified peer identity (inbound mTLS).
    pub peer_identity: Option<&'a str>,
    /// The trace the request belongs to, if any.
    pub trace_id: Option<TraceId>,
    /// TCP connections and tunnels: bytes read from and written to the downstream (`None` for
    /// HTTP requests).
    pub bytes: Option<(u64, u64)>,
}

/// What the line of a tunnel that closed says ([`log_tunnel`]).
#[derive(Debug)]
pub struct TunnelLog<'a> {
    /// When the request that opened it arrived.
    pub start: SystemTime,
    /// Arrival of that request to the tunnel's close.
    pub duration: Duration,
    /// Arrival to the upstream's answer (101, or the TCP connect of a CONNECT).
    pub response_duration: Duration,
    /// How it ended: UT = idle timeout, UC = an error on either side, `-` = both sides closed.
    pub flags: ResponseFlags,
    /// The request method (`GET`, `CONNECT`).
    pub method: &'a str,
    /// The request authority (`CONNECT`: the destination host:port).
    pub authority: &'a str,
    /// The request path (`""` for CONNECT).
    pub path: &'a str,
    /// What the tunnel carries: `websocket`, another upgrade token, or `TCP` (CONNECT).
    pub protocol: &'a str,
    /// The status the downstream got (101, or 200).
    pub status: u16,
    /// The endpoint tunneled to.
    pub upstream: Option<SocketAddr>,
    /// Route name ("" for CONNECT).
    pub route: &'a str,
    /// Cluster name ("" for CONNECT).
    pub cluster: &'a str,
    /// The verified peer identity (inbound mTLS).
    pub peer_identity: Option<&'a str>,
    /// Bytes read from the downstream while spliced.
    pub bytes_received: u64,
    /// Bytes written to the downstream while spliced.
    pub bytes_sent: u64,
}

/// Writes the line of a tunnel that closed, if the installed access log covers `listener` (a
/// lookup and nothing else when it does not).
pub fn log_tunnel(listener: &crate::snapshot::Listener, t: &TunnelLog<'_>) {
    let Some(log) = super::INSTALLED
        .get()
        .and_then(|o| o.inner.access_log.as_ref())
    else {
        return;
    };
    if !log.applies_to(&listener.name) {
        return;
    }
    let entry = AccessLogEntry {
        start: t.start,
        listener: &listener.name,
        direction: listener.direction.as_str(),
        method: t.method,
        authority: t.authority,
        path: t.path,
        protocol: t.protocol,
        status: t.status,
        flags: t.flags,
        duration: t.duration,
        response_duration: Some(t.response_duration),
        upstream: t.upstream,
        route: t.route,
        cluster: t.cluster,
        retries: 0,
        peer_identity: t.peer_identity,
        trace_id: None,
        bytes: Some((t.bytes_received, t.bytes_sent)),
    };
    log.sink.send(entry.format(log.format));
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T02:27:15.123Z`.
pub fn rfc3339_millis(t: SystemTime, out: &mut String) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    );
}

#[derive(Serialize)]
struct JsonLine<'a> {
    start_time: &'a str,
    listener: &'a str,
    direction: &'a str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    response_flags: &'a str,
    duration_ms: f64,
    response_duration_ms: Option<f64>,
    upstream: Option<SocketAddr>,
    route: &'a str,
    cluster: &'a str,
    retries: u32,
    peer_identity: Option<&'a str>,
    trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_received: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
}

impl AccessLogEntry<'_> {
    /// The line (without newline) in `format`.
    pub fn format(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Json => self.to_json(),
            LogFormat::Text => self.to_text(),
        }
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        let mut start = String::with_capacity(24);
        rfc3339_millis(self.start, &mut start);
        let mut flags = String::new();
        self.flags.write_to(&mut flags);
        let line = JsonLine {
            start_time: &start,
            listener: self.listener,
            direction: self.direction,
            method: self.method,
            authority: self.authority,
            path: self.path,
            protocol: self.protocol,
            status: self.status,
            response_flags: &flags,
            duration_ms: millis(self.duration),
            response_duration_ms: self.response_duration.map(millis),
            upstream: self.upstream,
            route: self.route,
            cluster: self.cluster,
            retries: self.retries,
            peer_identity: self.peer_identity,
            trace_id: self.trace_id.map(|t| t.to_string()),
            bytes_received: self.bytes.map(|(rx, _)| rx),
            bytes_sent: self.bytes.map(|(_, tx)| tx),
        };
        // Serializing plain strings and numbers into a String cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// Envoy-like text:
    /// `[START] "METHOD PATH PROTOCOL" STATUS FLAGS DURATION_MS RESPONSE_MS "AUTHORITY" "UPSTREAM"
    /// route=.. cluster=.. retries=N peer=.. trace=.. listener=..` (`-` for absent values).
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(256);
        s.push('[');
        rfc3339_millis(self.start, &mut s);
        s.push_str("] \"");
        s.push_str(self.method);
        s.push(' ');
        push_text(&mut s, self.path);
        s.push(' ');
        s.push_str(self.protocol);
        let _ = write!(s, "\" {} ", self.status);
        self.flags.write_to(&mut s);
        let _ = write!(s, " {:.3} ", millis(self.duration));
        match self.response_duration {
            Some(d) => {
                let _ = write!(s, "{:.3}", millis(d));
            }
            None => s.push('-'),
        }
        s.push_str(" \"");
        push_text(&mut s, self.authority);
        s.push_str("\" \"");
        match self.upstream {
            Some(a) => {
                let _ = write!(s, "{a}");
            }
            None => s.push('-'),
        }
        s.push_str("\" route=");
        push_text(&mut s, self.route);
        s.push_str(" cluster=");
        push_text(&mut s, self.cluster);
        let _ = write!(s, " retries={} peer=", self.retries);
        push_text(&mut s, self.peer_identity.unwrap_or(""));
        s.push_str(" trace=");
        match self.trace_id {
            Some(t) => {
                let _ = write!(s, "{t}");
            }
            None => s.push('-'),
        }
        s.push_str(" listener=");
        push_text(&mut s, self.listener);
        if let Some((rx, tx)) = self.bytes {
            let _ = write!(s, " rx={rx} tx={tx}");
        }
        s
    }
}

/// Appends `v` (or `-` when empty) with control characters, quotes and backslashes escaped,
/// so one request is always one line that splits on spaces/quotes as documented.
fn push_text(s: &mut String, v: &str) {
    if v.is_empty() {
        s.push('-');
        return;
    }
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if c.is_control() || c == ' ' => {
                let _ = write!(s, "\\x{:02x}", u32::from(c));
            }
            c => s.push(c),
        }
    }
}

/// Where formatted lines go: a bounded channel to the writer thread.
#[derive(Debug, Clone)]
pub struct AccessLogSink {
    tx: SyncSender<String>,
    dropped: IntCounter,
    progress: Arc<super::Progress>,
}

/// Errors starting the access log.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The log file could not be opened for appending.
    #[error("access log: cannot open {path}: {source}")]
    Open {
        /// The configured path.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// The writer thread could not be spawned.
    #[error("access log: spawning the writer thread: {0}")]
    Thread(std::io::Error),
}

impl AccessLogSink {
    /// Opens `config.path` (or stdout) and starts the writer thread.
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = if config.path == STDOUT {
            Box::new(std::io::stdout())
        } else {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&config.path)
                .map_err(|source| AccessLogError::Open {
                    path: config.path.clone(),
                    source,
                })?;
            Box::new(file)
        };
        Self::with_writer(out, QUEUE_LINES, dropped)
    }

    /// A sink writing to `out` through a queue of `capacity` lines.
    pub fn with_writer(
        out: Box<dyn Write + Send>,
        capacity: usize,
        dropped: IntCounter,
    ) -> Result<Self, AccessLogError> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let progress = Arc::new(super::Progress::default());
        let written = Arc::clone(&progress);
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || {
                write_lines(&rx, out, &written);
                written.stop();
            })
            .map_err(AccessLogError::Thread)?;
        Ok(Self {
            tx,
            dropped,
            progress,
        })
    }

    /// What the writer has been handed and has written.
    pub fn progress(&self) -> &super::Progress {
        &self.progress
    }

    /// Queues `line` (without newline); never blocks. A full queue drops and counts it.
    pub fn send(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => self.progress.queued(),
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            // The writer died (its output failed): count like a full queue.
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// How often the writer wakes to write what was queued. The writer polls instead of blocking
/// on the channel so that queueing a line never has to wake a thread: under load that would be
/// a futex call and a context switch per request.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// The writer thread: every [`FLUSH_INTERVAL`], writes every queued line and flushes, until
/// every sender is gone.
fn write_lines(rx: &Receiver<String>, out: Box<dyn Write + Send>, progress: &super::Progress) {
    use std::sync::mpsc::TryRecvError;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::sleep(FLUSH_INTERVAL);
        let mut ok = true;
        let mut done = false;
        let mut lines = 0u64;
        while ok {
            match rx.try_recv() {
                Ok(line) => {
                    ok = writeln!(out, "{line}").is_ok();
                    lines += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    done = true;
                    break;
                }
            }
        }
        if !ok || out.flush().is_err() {
            tracing::warn!("access log: write failed; access logging stops");
            return;
        }
        progress.done(lines);
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn entry() -> AccessLogEntry<'static> {
        AccessLogEntry {
            start: UNIX_EPOCH + Duration::from_millis(1_795_400_835_123),
            listener: "outbound",
            direction: "outbound",
            method: "GET",
            authority: "backend",
            path: "/api/x?y=1",
            protocol: "HTTP/1.1",
            status: 503,
            flags: ResponseFlags::UPSTREAM_CONNECT_FAILURE,
            duration: Duration::from_micros(1500),
            response_duration: Some(Duration::from_micros(1250)),
            upstream: Some("127.0.0.5:8080".parse().unwrap()),
            route: "default-backend.default",
            cluster: "backend.default",
            retries: 2,
            peer_identity: None,
            trace_id: Some(TraceId([0xab; 16])),
            bytes: None,
        }
    }

    #[test]
    fn tcp_lines_carry_bytes_and_http_lines_do_not() {
        let http = entry().to_json();
        assert!(!http.contains("bytes_"), "{http}");
        let tcp = AccessLogEntry {
            protocol: "TCP",
            method: "",
            path: "",
            authority: "",
            status: 0,
            flags: ResponseFlags::default(),
            bytes: Some((5, 7)),
            ..entry()
        };
        let v: serde_json::Value = serde_json::from_str(&tcp.to_json()).unwrap();
        assert_eq!(v["protocol"], "TCP");
        assert_eq!(v["bytes_received"], 5);
        assert_eq!(v["bytes_sent"], 7);
        assert!(tcp.to_text().ends_with(" rx=5 tx=7"), "{}", tcp.to_text());
    }

    #[test]
    fn rfc3339() {
        let mut s = String::new();
        rfc3339_millis(UNIX_EPOCH, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2000-02-29T12:34:56.789Z (a leap day).
        rfc3339_millis(UNIX_EPOCH + Duration::from_millis(951_827_696_789), &mut s);
        assert_eq!(s, "2000-02-29T12:34:56.789Z");
    }

    #[test]
    fn json_line_has_every_field() {
        let line = entry().to_json();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["start_time"], "2026-11-23T02:27:15.123Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["authority"], "backend");
        assert_eq!(v["path"], "/api/x?y=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 503);
        assert_eq!(v["response_flags"], "UF");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["response_duration_ms"], 1.25);
        assert_eq!(v["upstream"], "127.0.0.5:8080");
        assert_eq!(v["route"], "default-backend.default");
        assert_eq!(v["cluster"], "backend.default");
        assert_eq!(v["retries"], 2);
        assert_eq!(v["peer_identity"], serde_json::Value::Null);
        assert_eq!(v["trace_id"], "ab".repeat(16));
        assert_eq!(v["listener"], "outbound");
        assert_eq!(v["direction"], "outbound");
    }

    #[test]
    fn json_escapes() {
        let mut e = entry();
        e.path = "/a\"b\nc";
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["path"], "/a\"b\nc");
    }

    #[test]
    fn text_line() {
        let line = entry().to_text();
        assert_eq!(
            line,
            format!(
                "[2026-11-23T02:27:15.123Z] \"GET /api/x?y=1 HTTP/1.1\" 503 UF 1.500 1.250 \
                 \"backend\" \"127.0.0.5:8080\" route=default-backend.default \
                 cluster=backend.default retries=2 peer=- trace={} listener=outbound",
                "ab".repeat(16)
            )
        );
        let mut e = entry();
        e.status = 0;
        e.response_duration = None;
        e.upstream = None;
        e.route = "";
        e.trace_id = None;
        e.peer_identity = Some("spiffe://cluster.local/ns/default/sa/web");
        e.path = "/with space\"";
        e.flags = ResponseFlags::DOWNSTREAM_DISCONNECT;
        let line = e.to_text();
        assert!(
            line.contains("\"GET /with\\x20space\\\" HTTP/1.1\" 0 DC 1.500 - "),
            "{line}"
        );
        assert!(line.contains("\"-\" route=- "), "{line}");
        assert!(
            line.contains("peer=spiffe://cluster.local/ns/default/sa/web trace=-"),
            "{line}"
        );
        assert_eq!(e.format(LogFormat::Text), line);
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that blocks until released: the queue fills up behind it.
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_writes_lines_in_order() {
        let out = Shared::default();
        let dropped = IntCounter::new("d", "d").unwrap();
        let sink = AccessLogSink::with_writer(Box::new(out.clone()), 64, dropped.clone()).unwrap();
        for i in 0..10 {
            sink.send(format!("line {i}"));
        }
        let want: String = (0..10).map(|i| format!("line {i}\n")).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            if got == want {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "writer wrote {got:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let dropped = IntCounter::new("d", "d").unwrap();
        let sink =
            AccessLogSink::with_writer(Box::new(Stuck(Arc::clone(&gate))), 4, dropped.clone())
                .unwrap();
        let started = std::time::Instant::now();
        for i in 0..100 {
            sink.send(format!("line {i}"));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "send blocked");
        // At most the queue (4) plus the line being written were accepted.
        assert!(dropped.get() >= 95, "dropped {}", dropped.get());
        let (lock, cv) = &*gate;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}
