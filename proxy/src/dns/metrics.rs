//! `weft_dns_queries_total{result}`: queries the mesh DNS server received, by what became of
//! them (`mesh`, `forwarded`, `nxdomain`, `error`, `refused`; see [`Outcome`]). Every series
//! exists from the start.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::answer::Outcome;
use crate::metrics::MetricsError;

/// The family with its handles resolved.
#[derive(Debug, Clone)]
pub struct DnsQueryMetrics {
    family: IntCounterVec,
    /// In [`Outcome::ALL`] order.
    counters: [IntCounter; 5],
}

impl DnsQueryMetrics {
    /// Registers the family in `r`.
    pub fn register(r: &Registry) -> Result<Self, MetricsError> {
        let m = Self::unregistered();
        r.register(Box::new(m.family.clone()))
            .map_err(|source| MetricsError::Register {
                name: "weft_dns_queries_total",
                source,
            })?;
        Ok(m)
    }

    /// The family, registered nowhere (tests).
    pub fn unregistered() -> Self {
        let family = IntCounterVec::new(
            Opts::new(
                "weft_dns_queries_total",
                "DNS queries the mesh DNS server received, by result",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let counters = Outcome::ALL.map(|o| family.with_label_values(&[o.as_str()]));
        Self { family, counters }
    }

    /// Counts one query.
    pub fn record(&self, outcome: Outcome) {
        self.get(outcome).inc();
    }

    /// The counter of `outcome`.
    pub fn get(&self, outcome: Outcome) -> &IntCounter {
        let i = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        &self.counters[i]
    }
}
