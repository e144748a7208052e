//! One measured run against running replicas: apply the generated policy, certify every
//! simulated proxy, then the phases, each bounded by the phase timeout:
//!
//! 1. **cold**: every simulated proxy connects (at most `--connect-concurrency` handshakes in
//!    flight); over when each one has ACKed a config holding every endpoint of every service
//!    it may call (the whole mesh registered). Times count from the first connect.
//! 2. **mesh-wide**: `weftctl apply` of `services.yaml` with every service's `retry.attempts`
//!    raised by one: every scope changes; over when every proxy ACKed routes carrying it.
//! 3. **one-service**: the same for one service (`svc-0`): only the proxies that may call it
//!    are affected; the others must be pushed nothing. Times count from starting `weftctl`.
//!
//! After each phase the run waits until no push arrived for a second (and no replica has a
//! push pending), so the next phase starts from a quiet control plane and a phase's CPU and
//! compilations include its whole tail. Control-plane CPU and compilations are read from
//! `/proc/<pid>/stat` and `/metrics` before and after each phase.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use weft_proto::v1::identity_client::IdentityClient;

use crate::control::Replica;
use crate::mesh::{Plan, INITIAL_RETRIES, NAMESPACE, SERVICES_FILE};
use crate::procs::{self, Etcd};
use crate::sim::{self, Board, Phase, Pushes, Sim, Target};

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub n: usize,
    pub services: usize,
    pub deps: usize,
    pub connect_concurrency: usize,
    pub certify_concurrency: usize,
    pub phase_timeout: Duration,
    /// How long without any push ends a phase's tail.
    pub quiet: Duration,
    pub threads: usize,
}

/// The processes and paths of a run.
pub struct Setup {
    pub replicas: Vec<Replica>,
    pub etcd: Option<Etcd>,
    pub ca_dir: PathBuf,
    /// Where weftctl is.
    pub bin_dir: PathBuf,
    /// Scratch directory (the policy files applied).
    pub work: PathBuf,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: String,
    pub loadavg_before: String,
    /// Proxies the phase is about, and how many of them converged within the timeout.
    pub affected: usize,
    pub converged: usize,
    /// Per affected proxy, from the phase start (cold: the first connect; apply: starting
    /// `weftctl apply`) to its ACK of the push that completed it, in milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Cold start: when the last stream was open.
    pub all_connected_ms: Option<f64>,
    /// Apply: how long `weftctl apply` took (it returns once the replica serves the change).
    pub weftctl_ms: Option<f64>,
    /// Every push received during the phase (start to the end of its quiet tail).
    pub pushes: Pushes,
    pub pushes_to_unaffected: u64,
    pub compilations: f64,
    pub compilations_reused: f64,
    /// Scope lookups answered by patching the endpoints of a cached scope.
    #[serde(default)]
    pub compilations_patched: f64,
    /// Control-plane CPU seconds during the phase, summed over replicas.
    pub cp_cpu_s: f64,
    pub etcd_cpu_s: f64,
    pub generator_cpu_s: f64,
    /// Phase start to the end of its quiet tail.
    pub wall_s: f64,
    pub stream_failures: u64,
    pub timed_out: bool,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub n: usize,
    pub services: usize,
    /// 0 = no `dependencies:` (every proxy may call every service).
    pub deps: usize,
    pub replicas: usize,
    pub store: String,
    pub started: String,
    pub loadavg_start: String,
    pub fd_limit: u64,
    pub generator_threads: usize,
    pub certify_s: f64,
    pub phases: Vec<PhaseReport>,
    /// Peak RSS (VmHWM) of each replica this run started, in MB.
    pub cp_peak_rss_mb: Vec<f64>,
    pub cp_cpu_total_s: f64,
    pub generator_cpu_total_s: f64,
    pub generator_peak_rss_mb: f64,
    /// Simulated proxies whose stream ever failed, and the last error seen.
    pub stream_failures: u64,
    pub last_stream_error: Option<String>,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Control-plane counters at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu: f64,
    etcd_cpu: f64,
    generator_cpu: f64,
    compiled: f64,
    reused: f64,
    patched: f64,
}

async fn counters(setup: &Setup) -> anyhow::Result<Counters> {
    let mut c = Counters {
        cpu: setup
            .replicas
            .iter()
            .filter_map(|r| r.process.as_ref())
            .map(procs::Guard::cpu_seconds)
            .sum(),
        etcd_cpu: setup.etcd.as_ref().map_or(0.0, Etcd::cpu_seconds),
        generator_cpu: procs::cpu_seconds(std::process::id()).unwrap_or(0.0),
        ..Counters::default()
    };
    for r in &setup.replicas {
        let m = r.metrics().await?;
        c.compiled += m.value("weft_control_compilations_total", "result=\"compiled\"");
        c.reused += m.value("weft_control_compilations_total", "result=\"reused\"");
        c.patched += m.value("weft_control_compilations_total", "result=\"patched\"");
    }
    Ok(c)
}

/// Fails if a replica or etcd member this run started has exited.
fn check_processes(setup: &mut Setup) -> anyhow::Result<()> {
    for r in &mut setup.replicas {
        if let Some(p) = &mut r.process {
            p.check_running()?;
        }
    }
    if let Some(etcd) = &mut setup.etcd {
        for m in &mut etcd.members {
            m.check_running()?;
        }
    }
    Ok(())
}

/// Writes the policy files (retries as given) into `dir`.
fn write_policy(plan: &Plan, dir: &Path, retries: &[u32]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, content) in plan.policy_files(retries) {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

/// Waits until every replica serves the same policy version as the first.
async fn wait_same_version(setup: &Setup, bound: Duration) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let mut versions = Vec::new();
        for r in &setup.replicas {
            versions.push(r.policy_version().await?);
        }
        if versions.iter().all(|v| *v == versions[0]) {
            return Ok(versions[0].clone());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the replicas serve different policy versions after {bound:?}: {versions:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no push arrived for `quiet` and no replica has a push pending (bounded by
/// `bound`); returns whether it got there.
async fn settle(board: &Board, setup: &Setup, quiet: Duration, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let (last, _) = board.last_push();
        let since = board.now().saturating_sub(last);
        if since >= quiet {
            let mut pending = 0.0;
            for r in &setup.replicas {
                pending += r
                    .metrics()
                    .await
                    .map_or(1.0, |m| m.value("weft_control_pushes_pending", ""));
            }
            if pending == 0.0 {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        let wait = quiet.saturating_sub(since).max(Duration::from_millis(50));
        tokio::time::sleep(wait.min(Duration::from_millis(250))).await;
    }
}

/// Waits until `want` proxies converged in the current phase, or `bound`.
async fn wait_converged(
    board: &Board,
    setup: &mut Setup,
    want: usize,
    bound: Duration,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if board.converged() >= want {
            return Ok(true);
        }
        check_processes(setup)?;
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), board.changed.notified()).await;
    }
}

/// Figures of phase `index` from every record.
fn summarize(
    board: &Board,
    phase: &Phase,
    start: Duration,
    name: &str,
    loadavg_before: String,
) -> PhaseReport {
    let mut latencies = Vec::new();
    let mut pushes = Pushes::default();
    let mut unaffected = 0;
    let mut failures = 0;
    let mut connected_max: Option<Duration> = None;
    for (i, &affected) in phase.affected.iter().enumerate() {
        let r = board.record(i);
        pushes.merge(&r.pushes[phase.index]);
        failures += u64::from(r.stream_failures);
        if let Some(at) = r.connected_at {
            connected_max = Some(connected_max.map_or(at, |m| m.max(at)));
        }
        if !affected {
            unaffected += r.pushes[phase.index].count;
            continue;
        }
        if let Some(at) = r.converged_at[phase.index] {
            latencies.push(ms(at.saturating_sub(start)));
        }
    }
    latencies.sort_by(f64::total_cmp);
    PhaseReport {
        name: name.to_owned(),
        loadavg_before,
        affected: phase.affected.iter().filter(|a| **a).count(),
        converged: latencies.len(),
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied(),
        all_connected_ms: (phase.index == 0)
            .then(|| connected_max.map(|c| ms(c.saturating_sub(start))))
            .flatten(),
        weftctl_ms: None,
        pushes,
        pushes_to_unaffected: unaffected,
        compilations: 0.0,
        compilations_reused: 0.0,
        compilations_patched: 0.0,
        cp_cpu_s: 0.0,
        etcd_cpu_s: 0.0,
        generator_cpu_s: 0.0,
        wall_s: 0.0,
        stream_failures: failures,
        timed_out: false,
    }
}

fn with_counters(mut p: PhaseReport, before: Counters, after: Counters) -> PhaseReport {
    p.compilations = after.compiled - before.compiled;
    p.compilations_reused = after.reused - before.reused;
    p.compilations_patched = after.patched - before.patched;
    p.cp_cpu_s = round2(after.cpu - before.cpu);
    p.etcd_cpu_s = round2(after.etcd_cpu - before.etcd_cpu);
    p.generator_cpu_s = round2(after.generator_cpu - before.generator_cpu);
    p
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Which proxies a change of retries from `old` to `new` affects: those whose service may
/// call a service whose retry changed.
fn affected_by(plan: &Plan, old: &[u32], new: &[u32]) -> Vec<bool> {
    let changed: Vec<bool> = old.iter().zip(new).map(|(a, b)| a != b).collect();
    let by_service: Vec<bool> = (0..plan.services())
        .map(|j| plan.callable(j).into_iter().any(|c| changed[c]))
        .collect();
    (0..plan.proxies())
        .map(|p| by_service[plan.service_of(p)])
        .collect()
}

/// Runs every phase against `setup`'s replicas.
pub async fn execute(opts: &Options, mut setup: Setup, fd_limit: u64) -> anyhow::Result<Report> {
    let plan = Arc::new(Plan::new(opts.n, opts.services, opts.deps)?);
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let (_, loadavg_start) = procs::loadavg();
    let replicas = setup.replicas.len();
    anyhow::ensure!(replicas >= 1, "no control-plane replica");
    let first = &setup.replicas[0];
    eprintln!(
        "weft-scale: N={} services={} deps={} replicas={} (apply through {}); loadavg {loadavg_start}",
        opts.n,
        opts.services,
        if opts.deps == 0 { "none".to_owned() } else { opts.deps.to_string() },
        replicas,
        first.admin_url
    );

    // The initial policy, applied like any other.
    let apply_dir = setup.work.join("apply");
    let mut retries = vec![INITIAL_RETRIES; plan.services()];
    write_policy(&plan, &apply_dir, &retries)?;
    first
        .weftctl_apply(&setup.bin_dir, &setup.ca_dir, &apply_dir)
        .await
        .context("applying the initial policy")?;
    wait_same_version(&setup, Duration::from_secs(60)).await?;

    // Join tokens, derived from the CA directory's secret as `weft-control token` does.
    let secret = weft_control::token::TokenSecret::load(&setup.ca_dir)?;
    let tokens: Vec<String> = (0..plan.services())
        .map(|j| secret.token(NAMESPACE, &Plan::service_name(j)))
        .collect();
    let roots_pem = std::fs::read_to_string(setup.ca_dir.join("roots.pem"))?;
    let targets: Vec<Target> = setup
        .replicas
        .iter()
        .map(|r| Target {
            url: r.grpc_url.clone(),
            roots_pem: roots_pem.clone(),
        })
        .collect();

    // Every simulated proxy's SVID, through the replica it will connect to.
    let certify_start = std::time::Instant::now();
    let mut identity = Vec::new();
    for t in &targets {
        identity.push(IdentityClient::new(sim::identity_channel(t).await?));
    }
    let plan_ref = &plan;
    let tokens_ref = &tokens;
    let identity_ref = &identity;
    let svids: Vec<anyhow::Result<sim::Svid>> = futures::stream::iter(0..plan.proxies())
        .map(|i| async move {
            let service = plan_ref.service_of(i);
            let mut client = identity_ref[i % identity_ref.len()].clone();
            sim::certify(
                &mut client,
                &Plan::service_name(service),
                &tokens_ref[service],
            )
            .await
        })
        .buffered(opts.certify_concurrency.max(1))
        .collect()
        .await;
    let certify_s = round2(certify_start.elapsed().as_secs_f64());
    eprintln!(
        "weft-scale: {} certificates in {certify_s} s",
        plan.proxies()
    );

    // Cold start.
    let cold = Phase {
        index: 0,
        endpoints_complete: true,
        retries: None,
        affected: vec![true; plan.proxies()],
    };
    let (_, loadavg_cold) = procs::loadavg();
    let before = counters(&setup).await?;
    let board = Arc::new(Board::new(plan.proxies(), cold.clone()));
    let connects = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let mut tasks = Vec::new();
    for (i, svid) in svids.into_iter().enumerate() {
        let service = plan.service_of(i);
        let s = Sim {
            index: i,
            service,
            node: Sim::node(i, service),
            target: targets[i % targets.len()].clone(),
            svid: svid?,
        };
        tasks.push(tokio::spawn(s.run(
            Arc::clone(&plan),
            Arc::clone(&board),
            Arc::clone(&connects),
        )));
    }
    let outcome = run_phases(
        opts,
        &mut setup,
        &plan,
        &board,
        &mut retries,
        cold,
        before,
        loadavg_cold,
    )
    .await;
    for t in &tasks {
        t.abort();
    }
    let phases = outcome?;

    let mut stream_failures = 0;
    let mut last_stream_error = None;
    for i in 0..plan.proxies() {
        let r = board.record(i);
        stream_failures += u64::from(r.stream_failures);
        if r.last_error.is_some() {
            last_stream_error = r.last_error;
        }
    }
    let report = Report {
        n: opts.n,
        services: opts.services,
        deps: opts.deps,
        replicas,
        store: if setup.etcd.is_some() || replicas > 1 {
            "etcd".to_owned()
        } else {
            "files".to_owned()
        },
        started,
        loadavg_start,
        fd_limit,
        generator_threads: opts.threads,
        certify_s,
        phases,
        cp_peak_rss_mb: setup
            .replicas
            .iter()
            .filter_map(|r| r.process.as_ref())
            .map(|p| mb(p.peak_rss()))
            .collect(),
        cp_cpu_total_s: round2(
            setup
                .replicas
                .iter()
                .filter_map(|r| r.process.as_ref())
                .map(procs::Guard::cpu_seconds)
                .sum(),
        ),
        generator_cpu_total_s: round2(procs::cpu_seconds(std::process::id()).unwrap_or(0.0)),
        generator_peak_rss_mb: mb(
            procs::status_kb(std::process::id(), "VmHWM:").unwrap_or(0) * 1024
        ),
        stream_failures,
        last_stream_error,
    };
    Ok(report)
}

/// A change to the services' `retry.attempts` (indexed by service).
type Change = fn(&mut [u32]);

#[allow(clippy::too_many_arguments)]
async fn run_phases(
    opts: &Options,
    setup: &mut Setup,
    plan: &Plan,
    board: &Board,
    retries: &mut [u32],
    cold: Phase,
    before: Counters,
    loadavg_cold: String,
) -> anyhow::Result<Vec<PhaseReport>> {
    let mut phases = Vec::new();
    let start = Duration::ZERO;
    let ok = wait_converged(board, setup, plan.proxies(), opts.phase_timeout).await?;
    settle(board, setup, opts.quiet, opts.phase_timeout).await;
    let wall = board.now();
    let after = counters(setup).await?;
    let mut report = with_counters(
        summarize(board, &cold, start, "cold", loadavg_cold),
        before,
        after,
    );
    report.timed_out = !ok;
    report.wall_s = round2(wall.as_secs_f64());
    eprintln!("weft-scale: {}", line(&report));
    phases.push(report);

    // The applies.
    let changes: [(&str, Change); 2] = [
        ("mesh-wide", |r| r.iter_mut().for_each(|x| *x += 1)),
        ("one-service", |r| r[0] += 1),
    ];
    for (k, (name, change)) in changes.iter().enumerate() {
        let old = retries.to_vec();
        change(retries);
        let phase = Phase {
            index: k + 1,
            endpoints_complete: false,
            retries: Some(retries.to_vec()),
            affected: affected_by(plan, &old, retries),
        };
        let want = phase.affected.iter().filter(|a| **a).count();
        let file = setup.work.join("apply").join(SERVICES_FILE);
        std::fs::write(&file, plan.services_yaml(retries))?;
        let (_, loadavg) = procs::loadavg();
        let before = counters(setup).await?;
        board.set_phase(phase.clone());
        let t0 = board.now();
        setup.replicas[0]
            .weftctl_apply(&setup.bin_dir, &setup.ca_dir, &file)
            .await
            .with_context(|| format!("applying the {name} change"))?;
        let cli = board.now().saturating_sub(t0);
        let ok = wait_converged(board, setup, want, opts.phase_timeout).await?;
        settle(board, setup, opts.quiet, opts.phase_timeout).await;
        let wall = board.now().saturating_sub(t0);
        let after = counters(setup).await?;
        let mut report = with_counters(summarize(board, &phase, t0, name, loadavg), before, after);
        report.weftctl_ms = Some(ms(cli));
        report.timed_out = !ok;
        report.wall_s = round2(wall.as_secs_f64());
        eprintln!("weft-scale: {}", line(&report));
        phases.push(report);
    }
    Ok(phases)
}

/// One phase on one line, for the log.
pub fn line(p: &PhaseReport) -> String {
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
    format!(
        "{}: {}/{} converged, p50 {} ms, p99 {} ms, max {} ms; {} pushes ({} to unaffected), {} B/push mean, max {} B; {} compilations ({} reused, {} patched); control plane {:.2} CPU s{}",
        p.name,
        p.converged,
        p.affected,
        f(p.p50_ms),
        f(p.p99_ms),
        f(p.max_ms),
        p.pushes.count,
        p.pushes_to_unaffected,
        p.pushes.bytes.checked_div(p.pushes.count).unwrap_or(0),
        p.pushes.max_bytes,
        p.compilations,
        p.compilations_reused,
        p.compilations_patched,
        p.cp_cpu_s,
        if p.timed_out { " (TIMED OUT)" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn a_change_affects_the_callers_of_what_changed() {
        let plan = Plan::new(10, 5, 1).unwrap();
        // Service 0 is called by service 4 only (each calls the next one).
        let affected = affected_by(&plan, &[2; 5], &[3, 2, 2, 2, 2]);
        let expected: Vec<bool> = (0..10).map(|p| plan.service_of(p) == 4).collect();
        assert_eq!(affected, expected);
        assert!(affected_by(&plan, &[2; 5], &[3; 5]).iter().all(|a| *a));
        let all = Plan::new(10, 5, 0).unwrap();
        assert!(affected_by(&all, &[2; 5], &[3, 2, 2, 2, 2])
            .iter()
            .all(|a| *a));
    }
}
