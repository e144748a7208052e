//! Series kept exported while held: [`SeriesLease`] and the leased families (TCP, connect
//! errors, resilience, rate limits, authorization, feature counter families).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::{register, MetricsError};

/// A counter whose series is exported while any holder of it (or of another handle for the
/// same labels) lives.
#[derive(Debug, Clone)]
pub struct LeasedCounter {
    pub(super) counter: IntCounter,
    pub(super) _lease: SeriesLease,
}

impl LeasedCounter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.counter.inc();
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.counter.get()
    }
}

/// A counter family defined by a feature module
/// ([`Metrics::leased_counter`](super::Metrics::leased_counter)).
#[derive(Debug)]
pub struct CounterFamily {
    /// Metric name.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Label names.
    pub labels: &'static [&'static str],
}

/// Leases a cluster's resilience series when it first uses them
/// ([`crate::resilience_metrics::ClusterResilienceMetrics`]): no lease for a cluster never used.
#[derive(Clone)]
pub struct ResilienceLeaser(pub(super) Arc<LeasedSeries>);

impl ResilienceLeaser {
    /// The live lease on `cluster`'s series (or a new one) and its handles, created under the
    /// lease lock (so a dying lease of the same cluster cannot remove them).
    pub fn lease(&self, cluster: &str) -> (SeriesLease, crate::resilience_metrics::ClusterHandles) {
        let f = &self.0;
        f.lease(
            LeaseKey::Resilience {
                cluster: cluster.into(),
            },
            || f.resilience.resolve(cluster),
        )
    }
}

/// The families whose series are held by [`SeriesLease`]s, and the live leases.
pub(super) struct LeasedSeries {
    pub(super) tcp_connections_total: IntCounterVec,
    pub(super) tcp_connections_closed_total: IntCounterVec,
    pub(super) tcp_connections: IntGaugeVec,
    pub(super) tcp_bytes_total: IntCounterVec,
    pub(super) upstream_connect_errors_total: IntCounterVec,
    /// The per-cluster retry / breaker / outlier / health families, and rate-limit refusals.
    pub(super) resilience: crate::resilience_metrics::ResilienceMetrics,
    /// `weft_authz_denied_total`.
    pub(super) security: crate::tls::metrics::SecurityMetrics,
    /// Where feature families are registered, and those registered so far by name.
    pub(super) registry: Registry,
    pub(super) features: Mutex<HashMap<&'static str, IntCounterVec>>,
    pub(super) live: Mutex<HashMap<LeaseKey, Weak<Lease>>>,
}

/// The series one lease keeps exported.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum LeaseKey {
    /// The four `weft_tcp_*` series (five with both flows) of (direction, cluster).
    Tcp {
        direction: Box<str>,
        cluster: Box<str>,
        tls: Box<str>,
        peer: Box<str>,
    },
    /// `weft_upstream_connect_errors_total{cluster}`.
    ConnectErrors { cluster: Box<str> },
    /// Every per-cluster resilience series of `cluster` (retries, breaker, outlier, health).
    Resilience { cluster: Box<str> },
    /// `weft_rate_limited_total{scope,name}`.
    RateLimited { scope: Box<str>, name: Box<str> },
    /// `weft_authz_denied_total{direction,policy,protocol}`.
    AuthzDenied {
        direction: Box<str>,
        policy: Box<str>,
        protocol: Box<str>,
    },
    /// One series of a feature family
    /// ([`Metrics::leased_counter`](super::Metrics::leased_counter)).
    Feature {
        family: &'static str,
        labels: Box<[Box<str>]>,
    },
}

/// Keeps some series exported while held (cloned with what records into them); the last one
/// for the same series removes them. Shared by label set like
/// [`RequestMetrics`](super::RequestMetrics), with the same one-lock rule (see
/// [`RequestSeries::handle_in`](super::request::RequestSeries::handle_in)).
#[derive(Clone)]
pub struct SeriesLease(Arc<Lease>);

pub(super) struct Lease {
    key: LeaseKey,
    families: Arc<LeasedSeries>,
}

impl std::fmt::Debug for SeriesLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SeriesLease").field(&self.0.key).finish()
    }
}

impl LeasedSeries {
    pub(super) fn lock_live(&self) -> MutexGuard<'_, HashMap<LeaseKey, Weak<Lease>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_features(&self) -> MutexGuard<'_, HashMap<&'static str, IntCounterVec>> {
        self.features.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `family`'s vector, registered on first use.
    pub(super) fn feature(
        &self,
        family: &'static CounterFamily,
    ) -> Result<IntCounterVec, MetricsError> {
        let mut features = self.lock_features();
        if let Some(v) = features.get(family.name) {
            return Ok(v.clone());
        }
        let v = register(
            &self.registry,
            family.name,
            IntCounterVec::new(Opts::new(family.name, family.help), family.labels),
        )?;
        features.insert(family.name, v.clone());
        Ok(v)
    }

    /// The live lease on `key` or a new one, and `resolve()`'s handles, resolved under the lock
    /// (so a dying lease cannot remove the series between the two).
    pub(super) fn lease<T>(
        self: &Arc<Self>,
        key: LeaseKey,
        resolve: impl FnOnce() -> T,
    ) -> (SeriesLease, T) {
        let mut live = self.lock_live();
        let lease = match live.get(&key).and_then(Weak::upgrade) {
            Some(lease) => lease,
            None => {
                let lease = Arc::new(Lease {
                    key: key.clone(),
                    families: Arc::clone(self),
                });
                live.insert(key, Arc::downgrade(&lease));
                lease
            }
        };
        (SeriesLease(lease), resolve())
    }

    fn remove_series(&self, key: &LeaseKey) {
        // Errors: the series is already gone (nothing to remove).
        match key {
            LeaseKey::Tcp {
                direction,
                cluster,
                tls,
                peer,
            } => {
                let labels = [&**direction, &**cluster, &**tls, &**peer];
                let _ = self.tcp_connections_total.remove_label_values(&labels);
                let _ = self
                    .tcp_connections_closed_total
                    .remove_label_values(&labels);
                let _ = self.tcp_connections.remove_label_values(&labels);
                for flow in ["rx", "tx"] {
                    let _ = self
                        .tcp_bytes_total
                        .remove_label_values(&[direction, cluster, tls, peer, flow]);
                }
            }
            LeaseKey::ConnectErrors { cluster } => {
                let _ = self
                    .upstream_connect_errors_total
                    .remove_label_values(&[cluster]);
            }
            LeaseKey::Resilience { cluster } => self.resilience.remove_cluster(cluster),
            LeaseKey::RateLimited { scope, name } => {
                self.resilience.remove_rate_limited(scope, name);
            }
            LeaseKey::AuthzDenied {
                direction,
                policy,
                protocol,
            } => self
                .security
                .remove_authz_denied(direction, policy, protocol),
            LeaseKey::Feature { family, labels } => {
                if let Some(v) = self.lock_features().get(family) {
                    let labels: Vec<&str> = labels.iter().map(|l| &**l).collect();
                    let _ = v.remove_label_values(&labels);
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let this: *const Self = self;
        let mut live = self.families.lock_live();
        if live
            .get(&self.key)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), this))
        {
            live.remove(&self.key);
            self.families.remove_series(&self.key);
        }
    }
}
