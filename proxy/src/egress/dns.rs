//! A cluster's endpoints declared by DNS name (`Cluster.dns_endpoints`): the names to resolve,
//! the last good addresses of each, and the background task that keeps them fresh.
//!
//! [`DnsEndpoints`] is part of the cluster's long-lived state (created when a snapshot first
//! gives the cluster DNS endpoints, dropped with the cluster or when its DNS endpoints go), like
//! its health checker. Its task runs on the runtime that builds snapshots (the control
//! thread's), off the data path: each name is re-resolved at `min(answer TTL, refresh_ms)`, at
//! least [`MIN_REFRESH`] apart; a failed resolution keeps the last good addresses and is
//! retried sooner (from [`MIN_REFRESH`], doubling up to the refresh period). When a name's
//! addresses change, the task tells the [`EgressContext`], whose refresher rebuilds the
//! snapshot: [`DnsEndpoints::endpoints`] then become the cluster's endpoints like registered
//! ones, and endpoint state keyed by address (pools, load, health) carries over.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;
use weft_proto::v1;

use super::metrics::ClusterDnsMetrics;
use super::resolver::Answer;
use super::EgressContext;

/// The shortest time between two resolutions of a name, whatever its TTL (0 included).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Answers kept for names a cluster no longer lists (see [`DnsEndpoints::update`]).
const MAX_UNLISTED_ANSWERS: usize = 16;

/// The refresh period of an entry whose `refresh_ms` is 0.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);

/// One `dns_endpoints` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// The name, lower-case, without a trailing dot.
    pub host: Arc<str>,
    /// The port every address of the name is called on.
    pub port: u16,
    /// The weight of each of its addresses (0 in the proto counts as 1).
    pub weight: u32,
    /// Re-resolve at least this often.
    pub refresh: Duration,
}

/// Whether `s` is a DNS name: dot-separated labels of letters, digits, `-` and `_`, at most
/// 253 bytes (the control plane is stricter; this keeps garbage out of the resolver).
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl DnsTarget {
    /// From the proto; `Err` names the field.
    pub fn from_proto(p: &v1::DnsEndpoint) -> Result<Self, (&'static str, String)> {
        let host = p.host.trim_end_matches('.').to_ascii_lowercase();
        if !is_dns_name(&host) {
            return Err(("host", format!("{:?} is not a DNS name", p.host)));
        }
        let port = match u16::try_from(p.port) {
            Ok(port) if port > 0 => port,
            _ => return Err(("port", format!("{} is out of range 1..=65535", p.port))),
        };
        let refresh = if p.refresh_ms == 0 {
            DEFAULT_REFRESH
        } else {
            Duration::from_millis(p.refresh_ms).max(MIN_REFRESH)
        };
        Ok(Self {
            host: host.into(),
            port,
            weight: p.weight.max(1),
            refresh,
        })
    }
}

/// An address a target currently resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// The name it was resolved from (the TLS server name when the cluster originates TLS).
    pub host: Arc<str>,
    /// ip:port.
    pub addr: SocketAddr,
    /// The target's weight.
    pub weight: u32,
}

/// A cluster's DNS endpoints (part of its long-lived state).
#[derive(Debug)]
pub struct DnsEndpoints {
    cluster: Arc<str>,
    targets: ArcSwap<Vec<DnsTarget>>,
    /// The last good addresses of each name (sorted).
    answers: Mutex<HashMap<Arc<str>, Vec<IpAddr>>>,
    /// Wakes the task: targets changed, or this state is gone.
    kick: Arc<Notify>,
    running: AtomicBool,
    metrics: ClusterDnsMetrics,
    context: Arc<EgressContext>,
}

impl Drop for DnsEndpoints {
    fn drop(&mut self) {
        // The task sleeps until a name is due: wake it so it sees this state is gone.
        self.kick.notify_one();
    }
}

/// When a name is next resolved after `answer`: its TTL, at most `refresh`, at least
/// [`MIN_REFRESH`].
pub fn next_refresh(ttl: Option<Duration>, refresh: Duration) -> Duration {
    ttl.map_or(refresh, |t| t.min(refresh)).max(MIN_REFRESH)
}

/// When a name is retried after its `failures`-th failure in a row (1 = the first):
/// [`MIN_REFRESH`] doubling, at most `refresh`.
pub fn retry_after(failures: u32, refresh: Duration) -> Duration {
    MIN_REFRESH
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(refresh)
        .max(MIN_REFRESH)
}

impl DnsEndpoints {
    /// The DNS state of `cluster`, resolving through `context`.
    pub fn new(cluster: &str, context: &Arc<EgressContext>) -> Arc<Self> {
        Arc::new(Self {
            cluster: cluster.into(),
            targets: ArcSwap::from_pointee(Vec::new()),
            answers: Mutex::new(HashMap::new()),
            kick: Arc::new(Notify::new()),
            running: AtomicBool::new(false),
            metrics: context.metrics.cluster(cluster),
            context: Arc::clone(context),
        })
    }

    fn answers(&self) -> MutexGuard<'_, HashMap<Arc<str>, Vec<IpAddr>>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a snapshot's DNS endpoints: names no longer listed stop being resolved and
    /// reported, new ones are resolved at once. Starts the task if needed and a runtime is available (the snapshot
    /// builder's). Cheap and without effect when nothing changed (every snapshot rebuild calls
    /// it, including the ones its own answers cause).
    pub fn update(self: &Arc<Self>, targets: Vec<DnsTarget>) {
        if **self.targets.load() != targets {
            // Answers of names no longer listed are kept a while (bounded): a snapshot that
            // drops a name may still be NACKed, and the running one must not lose addresses
            // (endpoints) to it. `endpoints()` only reports listed names.
            let hosts: HashSet<&Arc<str>> = targets.iter().map(|t| &t.host).collect();
            let mut answers = self.answers();
            if answers.len() > hosts.len() + MAX_UNLISTED_ANSWERS {
                answers.retain(|h, _| hosts.contains(h));
            }
            drop(answers);
            self.targets.store(Arc::new(targets));
            self.kick.notify_one();
        }
        if !self.running.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(run(
                        Arc::downgrade(self),
                        Arc::clone(&self.kick),
                        Arc::clone(&self.context),
                    ));
                }
                Err(_) => self.running.store(false, Ordering::Release),
            }
        }
    }

    /// The addresses the targets resolve to now, in target order (each name's addresses
    /// sorted), an address listed once (its first target wins). Names that never resolved
    /// contribute nothing: a cluster with only those has no endpoints (503 `no-endpoints`).
    pub fn endpoints(&self) -> Vec<ResolvedEndpoint> {
        let answers = self.answers();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for t in self.targets.load().iter() {
            for ip in answers.get(&t.host).into_iter().flatten() {
                let addr = SocketAddr::new(*ip, t.port);
                if seen.insert(addr) {
                    out.push(ResolvedEndpoint {
                        host: Arc::clone(&t.host),
                        addr,
                        weight: t.weight,
                    });
                }
            }
        }
        out
    }

    /// The resolution counters (tests).
    pub fn metrics(&self) -> &ClusterDnsMetrics {
        &self.metrics
    }

    /// Records `result` of resolving `host`; `true` if the name's addresses changed.
    fn record(
        &self,
        host: &Arc<str>,
        result: &Result<Answer, super::resolver::ResolveError>,
    ) -> bool {
        match result {
            Ok(answer) => {
                self.metrics.record("ok");
                // A name dropped from the targets while it was being resolved stays dropped.
                if !self.targets.load().iter().any(|t| t.host == *host) {
                    return false;
                }
                let mut answers = self.answers();
                if answers.get(host) == Some(&answer.addrs) {
                    return false;
                }
                tracing::info!(cluster = %self.cluster, %host, addrs = ?answer.addrs, "dns: addresses changed");
                answers.insert(Arc::clone(host), answer.addrs.clone());
                true
            }
            Err(e) => {
                self.metrics.record(e.result_label());
                let kept = self.answers().get(host).map_or(0, Vec::len);
                tracing::warn!(cluster = %self.cluster, error = %e, kept_addresses = kept, "dns: resolution failed; keeping the last good addresses");
                false
            }
        }
    }
}

/// When a name is next due, and how many failures in a row it had.
#[derive(Debug, Clone, Copy)]
struct Due {
    at: Instant,
    failures: u32,
}

/// Resolves the targets of `state` as they fall due until the state is gone.
async fn run(state: Weak<DnsEndpoints>, kick: Arc<Notify>, context: Arc<EgressContext>) {
    let mut schedule: HashMap<Arc<str>, Due> = HashMap::new();
    loop {
        // The names due now, each with its shortest refresh period.
        let due: Vec<(Arc<str>, Duration)> = {
            let Some(s) = state.upgrade() else { return };
            let mut refresh: HashMap<Arc<str>, Duration> = HashMap::new();
            for t in s.targets.load().iter() {
                let r = refresh.entry(Arc::clone(&t.host)).or_insert(t.refresh);
                *r = (*r).min(t.refresh);
            }
            schedule.retain(|h, _| refresh.contains_key(h));
            let now = Instant::now();
            refresh
                .into_iter()
                .filter(|(h, _)| schedule.get(h).is_none_or(|d| d.at <= now))
                .collect()
        };
        // No strong reference while resolving: a dropped cluster ends the task at once.
        let results =
            futures::future::join_all(due.iter().map(|(h, _)| context.resolver.resolve(h))).await;
        let next = {
            let Some(s) = state.upgrade() else { return };
            let now = Instant::now();
            let mut changed = false;
            for ((host, refresh), result) in due.iter().zip(results) {
                changed |= s.record(host, &result);
                let d = schedule.entry(Arc::clone(host)).or_insert(Due {
                    at: now,
                    failures: 0,
                });
                match &result {
                    Ok(a) => {
                        d.failures = 0;
                        d.at = now + next_refresh(a.ttl, *refresh);
                    }
                    Err(_) => {
                        d.failures = d.failures.saturating_add(1);
                        d.at = now + retry_after(d.failures, *refresh);
                    }
                }
            }
            if changed {
                context.changed.notify_one();
            }
            schedule.values().map(|d| d.at).min()
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = kick.notified() => {}
                }
            }
            None => kick.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::resolver::{Resolve, ResolveError};
    use super::*;
    use futures::future::BoxFuture;

    /// A resolver answering from a table the test changes; counts lookups per name.
    #[derive(Default)]
    struct Scripted {
        table: Mutex<HashMap<String, Result<Answer, ResolveError>>>,
        lookups: Mutex<HashMap<String, u32>>,
    }

    impl Scripted {
        fn set(&self, host: &str, r: Result<Answer, ResolveError>) {
            self.table.lock().unwrap().insert(host.into(), r);
        }
        fn lookups(&self, host: &str) -> u32 {
            self.lookups.lock().unwrap().get(host).copied().unwrap_or(0)
        }
    }

    impl Resolve for Scripted {
        fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Answer, ResolveError>> {
            *self.lookups.lock().unwrap().entry(host.into()).or_default() += 1;
            let r = self
                .table
                .lock()
                .unwrap()
                .get(host)
                .cloned()
                .unwrap_or_else(|| Err(ResolveError::NoRecords { host: host.into() }));
            Box::pin(async move { r })
        }
    }

    fn ips(v: &[[u8; 4]], ttl: Option<u64>) -> Result<Answer, ResolveError> {
        Ok(Answer::new(
            v.iter().map(|o| IpAddr::from(*o)).collect(),
            ttl.map(Duration::from_secs),
        ))
    }

    fn target(host: &str, port: u16, refresh_s: u64) -> DnsTarget {
        DnsTarget::from_proto(&v1::DnsEndpoint {
            host: host.into(),
            port: port.into(),
            weight: 2,
            refresh_ms: refresh_s * 1000,
        })
        .unwrap()
    }

    fn setup() -> (Arc<Scripted>, Arc<EgressContext>) {
        let r = Arc::new(Scripted::default());
        let ctx = EgressContext::new(
            Arc::clone(&r) as Arc<dyn Resolve>,
            super::super::metrics::DnsMetrics::unregistered(),
        );
        (r, ctx)
    }

    /// Lets the task run until it waits on time again.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resolves_at_once_then_at_min_ttl_refresh_and_notifies_changes() {
        let (r, ctx) = setup();
        r.set(
            "api.external.test",
            ips(&[[10, 0, 0, 2], [10, 0, 0, 1]], Some(5)),
        );
        let dns = DnsEndpoints::new("stripe.default", &ctx);
        assert!(
            dns.endpoints().is_empty(),
            "nothing before the first answer"
        );
        dns.update(vec![target("API.External.test.", 443, 30)]);
        settle().await;
        // The first answer is a change: the refresher is told.
        tokio::time::timeout(Duration::from_millis(1), ctx.changed())
            .await
            .expect("change notified");
        let eps = dns.endpoints();
        assert_eq!(
            eps.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
            ["10.0.0.1:443", "10.0.0.2:443"]
        );
        assert_eq!(&*eps[0].host, "api.external.test");
        assert_eq!(eps[0].weight, 2);
        assert_eq!(r.lookups("api.external.test"), 1);

        // TTL 5s < refresh 30s: asked again after 5s, not before. Same answer: no change.
        tokio::time::advance(Duration::from_millis(4900)).await;
        settle().await;
        assert_eq!(r.lookups("api.external.test"), 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert_eq!(r.lookups("api.external.test"), 2);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), ctx.changed())
                .await
                .is_err(),
            "an unchanged answer (reordered) is no change"
        );

        // The answer moves: the new addresses replace the old ones.
        r.set("api.external.test", ips(&[[10, 0, 0, 3]], Some(0)));
        tokio::time::advance(Duration::from_secs(5)).await;
        settle().await;
        tokio::time::timeout(Duration::from_millis(1), ctx.changed())
            .await
            .expect("change notified");
        assert_eq!(dns.endpoints()[0].addr.to_string(), "10.0.0.3:443");
        // TTL 0: the floor (1s) applies.
        let before = r.lookups("api.external.test");
        tokio::time::advance(MIN_REFRESH).await;
        settle().await;
        assert_eq!(r.lookups("api.external.test"), before + 1);
        assert_eq!(dns.metrics().count("ok"), u64::from(before) + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_good_addresses_and_retry_with_backoff() {
        let (r, ctx) = setup();
        r.set("a.test", ips(&[[10, 0, 0, 1]], None));
        let dns = DnsEndpoints::new("a.default", &ctx);
        dns.update(vec![target("a.test", 80, 10)]);
        settle().await;
        assert_eq!(dns.endpoints().len(), 1);
        r.set(
            "a.test",
            Err(ResolveError::Failed {
                host: "a.test".into(),
                reason: "timed out".into(),
            }),
        );
        // No TTL: the refresh period (10s) applies.
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(r.lookups("a.test"), 2);
        assert_eq!(dns.metrics().count("error"), 1);
        assert_eq!(dns.endpoints()[0].addr.to_string(), "10.0.0.1:80", "kept");
        // Retries at 1s, then 2s later, then 4s later.
        for (wait, lookups) in [(1, 3), (2, 4), (4, 5)] {
            tokio::time::advance(Duration::from_secs(wait)).await;
            settle().await;
            assert_eq!(r.lookups("a.test"), lookups, "after {wait}s");
        }
        r.set(
            "a.test",
            Err(ResolveError::NoRecords {
                host: "a.test".into(),
            }),
        );
        tokio::time::advance(Duration::from_secs(8)).await;
        settle().await;
        assert_eq!(dns.metrics().count("no_records"), 1);
        assert_eq!(dns.endpoints().len(), 1, "NXDOMAIN keeps the last good too");
    }

    #[tokio::test(start_paused = true)]
    async fn targets_follow_snapshots_and_the_task_ends_with_the_state() {
        let (r, ctx) = setup();
        r.set("a.test", ips(&[[10, 0, 0, 1]], None));
        r.set("b.test", ips(&[[10, 0, 0, 1], [10, 0, 0, 2]], None));
        let dns = DnsEndpoints::new("c", &ctx);
        dns.update(vec![target("a.test", 80, 30)]);
        settle().await;
        // A new name is resolved at once; an address of two names is listed once.
        dns.update(vec![target("a.test", 80, 30), target("b.test", 80, 30)]);
        settle().await;
        assert_eq!(r.lookups("b.test"), 1);
        assert_eq!(
            dns.endpoints()
                .iter()
                .map(|e| (e.host.to_string(), e.addr.to_string()))
                .collect::<Vec<_>>(),
            [
                ("a.test".to_owned(), "10.0.0.1:80".to_owned()),
                ("b.test".to_owned(), "10.0.0.2:80".to_owned())
            ]
        );
        // The same targets again (a rebuild): nothing is asked.
        dns.update(vec![target("a.test", 80, 30), target("b.test", 80, 30)]);
        settle().await;
        assert_eq!((r.lookups("a.test"), r.lookups("b.test")), (1, 1));
        // A dropped name is no longer reported; listed again (a NACKed push reverted), its last
        // answer serves until it is resolved again.
        dns.update(vec![target("b.test", 80, 30)]);
        assert_eq!(dns.endpoints().len(), 2);
        assert!(dns.endpoints().iter().all(|e| &*e.host == "b.test"));
        settle().await;
        dns.update(vec![target("a.test", 80, 30), target("b.test", 80, 30)]);
        assert_eq!(
            dns.endpoints().len(),
            2,
            "a.test's 10.0.0.1 is b.test's first too"
        );
        assert_eq!(&*dns.endpoints()[0].host, "a.test");
        settle().await;
        assert_eq!(
            r.lookups("a.test"),
            2,
            "a re-listed name is resolved at once"
        );
        dns.update(vec![target("b.test", 80, 30)]);
        settle().await;
        // Dropping the state ends the task (nothing is asked any more).
        drop(dns);
        settle().await;
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(r.lookups("b.test"), 1);
    }

    #[test]
    fn refresh_rules_and_target_validation() {
        let s = Duration::from_secs;
        assert_eq!(next_refresh(Some(s(5)), s(30)), s(5));
        assert_eq!(next_refresh(Some(s(300)), s(30)), s(30));
        assert_eq!(next_refresh(Some(s(0)), s(30)), MIN_REFRESH);
        assert_eq!(next_refresh(None, s(30)), s(30));
        assert_eq!(retry_after(1, s(30)), s(1));
        assert_eq!(retry_after(3, s(30)), s(4));
        assert_eq!(retry_after(40, s(30)), s(30));
        let t = DnsTarget::from_proto(&v1::DnsEndpoint {
            host: "Api.Stripe.com.".into(),
            port: 443,
            weight: 0,
            refresh_ms: 0,
        })
        .unwrap();
        assert_eq!(
            (&*t.host, t.port, t.weight, t.refresh),
            ("api.stripe.com", 443, 1, DEFAULT_REFRESH)
        );
        let bad = |host: &str, port| {
            DnsTarget::from_proto(&v1::DnsEndpoint {
                host: host.into(),
                port,
                ..Default::default()
            })
            .unwrap_err()
            .0
        };
        assert_eq!(bad("", 443), "host");
        assert_eq!(bad("a b.test", 443), "host");
        assert_eq!(bad("a..test", 443), "host");
        assert_eq!(bad("a.test", 0), "port");
        assert_eq!(bad("a.test", 70000), "port");
    }
}
