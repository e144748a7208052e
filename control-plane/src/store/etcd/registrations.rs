//! Registrations in etcd: one key per proxy, `<prefix>/registrations/<node id>`, whose value is
//! the registration as [`PersistedProxy`] JSON (node, connected since, the removal deadline of a
//! proxy within its grace, its log level, the owning replica), attached to the owning replica's
//! lease.
//!
//! One task per replica ([`EtcdStore::run_registration_sync`]) keeps etcd in step with the
//! replica and the replica in step with etcd, in sessions:
//!
//! 1. keep the lease alive, or grant a new one (`--etcd-lease-ttl`) if etcd let it expire;
//! 2. read every registration: the ones under this lease are what this replica wrote; the others
//!    become the registry's remote entries (one that disappeared meanwhile gets the grace);
//! 3. write this replica's own registrations that differ from what etcd holds: a proxy connected
//!    here unconditionally (its stream is here, so this replica has it; batched), one within
//!    its grace and removals only while the key is still under this lease (a proxy that moved to
//!    another replica is that replica's);
//! 4. watch from the revision read, applying other replicas' writes, and write again after every
//!    registry change.
//!
//! Any error ends the session; the next starts after a jittered backoff capped at a third of
//! the lease TTL (so that once etcd is back the lease is kept alive before it expires).
//! Meanwhile the replica keeps serving what it has.
//!
//! **Who has a proxy.** A key belongs to the replica whose lease it is under. When another
//! replica writes the key of a proxy this replica also has, the proxy moved: this replica keeps
//! it only if its own stream is open and newer (or the other replica's copy is disconnected),
//! and then writes it back; otherwise it takes the other replica's copy as remote. Events older
//! than this replica's own last write of a key are stale and ignored.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

use super::{unix_ms, Backoff, EtcdStore};
use crate::registry::PersistedProxy;
use crate::store::{OwnRegistration, RegistryHost, Store as _, StoreError};

/// Most operations in one transaction of connected registrations (etcd's default
/// `--max-txn-ops` is 128).
const BATCH: usize = 64;

/// The registration sync's state: this replica's lease, and its keys as last written (or seen).
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    lease: Option<i64>,
    written: HashMap<String, Written>,
}

#[derive(Debug)]
struct Written {
    value: PersistedProxy,
    /// The key's modification revision for that value (0: the write did not happen).
    mod_revision: i64,
}

/// A registration as etcd holds it.
#[derive(Debug)]
pub(crate) struct StoredRegistration {
    pub(crate) entry: PersistedProxy,
    pub(crate) lease: i64,
    pub(crate) mod_revision: i64,
}

/// Every registration, read at `revision`.
#[derive(Debug)]
pub(crate) struct StoredRegistrations {
    pub(crate) entries: Vec<StoredRegistration>,
    pub(crate) revision: i64,
}

/// What to do when another replica wrote the key of a proxy this replica may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// This replica has the proxy (its stream here is open and newer): write it back.
    Keep,
    /// The other replica has it: take its copy as a remote registration.
    Yield,
}

/// Who has a proxy both this replica (`own`, as `me`) and another replica's write (`theirs`)
/// claim: an open stream beats a proxy within its grace; between two open streams the newer
/// one (the other is a half-open leftover), then the greater replica id.
pub(crate) fn decide(own: Option<OwnRegistration>, theirs: &PersistedProxy, me: &str) -> Decision {
    let Some(own) = own else {
        return Decision::Yield;
    };
    if !own.connected {
        return Decision::Yield;
    }
    if !theirs.is_connected() {
        return Decision::Keep;
    }
    let mine = (unix_ms(own.connected_since), me);
    let other = (
        theirs.connected_since_unix_ms,
        theirs.replica.as_deref().unwrap_or(""),
    );
    if other > mine {
        Decision::Yield
    } else {
        Decision::Keep
    }
}

impl EtcdStore {
    fn registration_key(&self, id: &str) -> String {
        format!("{}{id}", self.registrations_prefix())
    }

    /// The registration in `value` of key `key`, its id taken from the key; `None` (logged)
    /// for a key that is not one.
    fn parse_registration(&self, key: &[u8], value: &[u8]) -> Option<PersistedProxy> {
        let prefix = self.registrations_prefix();
        let key = std::str::from_utf8(key).ok()?;
        let id = key.strip_prefix(&prefix)?;
        match serde_json::from_slice::<PersistedProxy>(value) {
            Ok(mut entry) => {
                entry.id = id.to_owned();
                if entry.replica.is_none() {
                    entry.replica = Some("unknown".to_owned());
                }
                Some(entry)
            }
            Err(e) => {
                tracing::warn!(
                    key,
                    "ignoring a registration etcd holds that does not parse: {e}"
                );
                None
            }
        }
    }

    /// Every registration.
    pub(crate) async fn read_registrations(&self) -> Result<StoredRegistrations, StoreError> {
        let mut resp = self
            .get(
                "reading the registrations",
                &self.registrations_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let revision = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        let entries = resp
            .take_kvs()
            .into_iter()
            .filter_map(|kv| {
                let entry = self.parse_registration(kv.key(), kv.value())?;
                Some(StoredRegistration {
                    entry,
                    lease: kv.lease(),
                    mod_revision: kv.mod_revision(),
                })
            })
            .collect();
        Ok(StoredRegistrations { entries, revision })
    }

    /// Keeps etcd and `host` in step until aborted (see the module docs).
    pub(crate) async fn run_registration_sync(&self, host: Arc<dyn RegistryHost>) {
        // Retry at least as often as the lease is kept alive: once etcd is back (a new leader
        // gives every lease its TTL again) the next session must keep this replica's lease
        // alive before it expires, or every other replica would see its proxies go.
        let mut backoff = Backoff::capped(self.config.lease_ttl / 3);
        let mut failing: Option<String> = None;
        loop {
            if self.is_closed() {
                return;
            }
            let error = {
                let mut state = self.sync.lock().await;
                match self
                    .session(&mut state, &host, &mut backoff, &mut failing)
                    .await
                {
                    Err(e) => e,
                    Ok(never) => match never {},
                }
            };
            let message = error.to_string();
            if failing.as_deref() != Some(message.as_str()) {
                tracing::warn!("registrations: {message}; serving the registry as it is, retrying");
                failing = Some(message);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The lease in force: the current one while etcd has it, else a new one. Its keep-alive
    /// stream comes with it.
    async fn lease(
        &self,
        state: &mut SyncState,
    ) -> Result<
        (
            i64,
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
        ),
        StoreError,
    > {
        let store = self.describe();
        let limit = self.config.request_timeout;
        let mut leases = self.client.lease_client();
        if let Some(id) = state.lease {
            match tokio::time::timeout(limit, leases.keep_alive(id)).await {
                Ok(Ok((keeper, stream))) => return Ok((id, keeper, stream)),
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(reason))) => {
                    tracing::warn!(
                        lease = %format!("{id:x}"),
                        "this replica's lease expired ({reason}): other replicas saw its proxies go; granting a new one and putting them back"
                    );
                    state.lease = None;
                }
                Ok(Err(e)) => return Err(super::classify(&store, "keeping the lease alive", &e)),
                Err(_) => {
                    return Err(StoreError::Unavailable {
                        store,
                        reason: "keeping the lease alive: no answer".to_owned(),
                    })
                }
            }
        }
        let ttl = i64::try_from(self.config.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = self
            .timed("granting a lease", leases.grant(ttl, None))
            .await?;
        let id = granted.id();
        tracing::info!(
            lease = %format!("{id:x}"),
            ttl = granted.ttl(),
            "granted this replica's lease for its registrations"
        );
        state.lease = Some(id);
        // Nothing is under the new lease yet.
        state.written.clear();
        let (keeper, stream) = self
            .timed("keeping the lease alive", leases.keep_alive(id))
            .await?;
        Ok((id, keeper, stream))
    }

    /// One session (see the module docs); returns only with the error that ended it.
    async fn session(
        &self,
        state: &mut SyncState,
        host: &Arc<dyn RegistryHost>,
        backoff: &mut Backoff,
        failing: &mut Option<String>,
    ) -> Result<Infallible, StoreError> {
        let (lease, mut keeper, mut keepalive) = self.lease(state).await?;
        let me = self.config.replica_id.clone();

        let snapshot = self.read_registrations().await?;
        state.written.clear();
        let mut remote = Vec::new();
        for s in snapshot.entries {
            let id = s.entry.id.clone();
            if s.lease == lease {
                state.written.insert(
                    id,
                    Written {
                        value: s.entry,
                        mod_revision: s.mod_revision,
                    },
                );
            } else if decide(host.own_registration(&id), &s.entry, &me) == Decision::Yield {
                remote.push(s.entry);
            }
        }
        host.replace_remote_registrations(remote);
        self.push_own(state, host).await?;

        let mut watcher = self.client.watch_client();
        let mut watch = self
            .timed(
                "watching the registrations",
                watcher.watch(
                    self.registrations_prefix(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(snapshot.revision + 1),
                    ),
                ),
            )
            .await?;
        backoff.reset();
        if failing.take().is_some() {
            tracing::info!(store = %self.describe(), "registrations in step with etcd again");
        }

        let ttl = self.config.lease_ttl;
        let period = (ttl / 3).max(Duration::from_millis(500));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut last_answer = Instant::now();
        loop {
            tokio::select! {
                () = host.registry_changes().notified() => {
                    self.push_own(state, host).await?;
                }
                message = watch.message() => {
                    let resp = message
                        .map_err(|e| super::classify(&self.describe(), "watching the registrations", &e))?
                        .ok_or_else(|| self.unavailable("the registrations watch ended"))?;
                    if resp.canceled() {
                        return Err(self.unavailable(&format!(
                            "the registrations watch was cancelled ({}; compacted at {}): reading them again",
                            resp.cancel_reason(),
                            resp.compact_revision()
                        )));
                    }
                    let mut dirty = false;
                    for event in resp.events() {
                        dirty |= self.on_event(state, host, lease, event);
                    }
                    if dirty {
                        self.push_own(state, host).await?;
                    }
                }
                _ = tick.tick() => {
                    if last_answer.elapsed() > ttl {
                        return Err(self.unavailable("the lease keep-alive went unanswered for its TTL"));
                    }
                    keeper
                        .keep_alive()
                        .await
                        .map_err(|e| super::classify(&self.describe(), "keeping the lease alive", &e))?;
                }
                answer = keepalive.message() => {
                    match answer {
                        Ok(Some(r)) if r.ttl() > 0 => last_answer = Instant::now(),
                        Ok(Some(_)) => {
                            tracing::warn!(
                                lease = %format!("{lease:x}"),
                                "this replica's lease expired: other replicas saw its proxies go; granting a new one and putting them back"
                            );
                            state.lease = None;
                            return Err(self.unavailable("the lease expired"));
                        }
                        Ok(None) => return Err(self.unavailable("the lease keep-alive stream ended")),
                        Err(e) => return Err(super::classify(&self.describe(), "keeping the lease alive", &e)),
                    }
                }
            }
        }
    }

    fn unavailable(&self, reason: &str) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            reason: reason.to_owned(),
        }
    }

    /// Applies one watched event; returns whether this replica must write its registrations
    /// again (one of its keys was taken or removed while it still has the proxy).
    fn on_event(
        &self,
        state: &mut SyncState,
        host: &Arc<dyn RegistryHost>,
        lease: i64,
        event: &etcd_client::Event,
    ) -> bool {
        let Some(kv) = event.kv() else { return false };
        let Ok(key) = kv.key_str() else { return false };
        let Some(id) = key.strip_prefix(&self.registrations_prefix()) else {
            return false;
        };
        let revision = kv.mod_revision();
        if state
            .written
            .get(id)
            .is_some_and(|w| revision <= w.mod_revision)
        {
            // Older than this replica's own last write of the key.
            return false;
        }
        match event.event_type() {
            EventType::Put => {
                let Some(entry) = self.parse_registration(kv.key(), kv.value()) else {
                    return false;
                };
                if kv.lease() == lease {
                    // Ours; another replica may have set its log level.
                    if let Some(w) = state.written.get_mut(id) {
                        if w.value.log_level != entry.log_level {
                            host.set_own_log_level(id, entry.log_level.clone());
                        }
                        *w = Written {
                            value: entry,
                            mod_revision: revision,
                        };
                    }
                    return false;
                }
                state.written.remove(id);
                match decide(host.own_registration(id), &entry, &self.config.replica_id) {
                    Decision::Keep => true,
                    Decision::Yield => {
                        host.remote_registration(id, Some(entry));
                        false
                    }
                }
            }
            EventType::Delete => {
                if state.written.remove(id).is_some() {
                    // Our key went (our lease expired, or someone deleted it): put it back
                    // while we still have the proxy.
                    return host.own_registration(id).is_some();
                }
                host.remote_registration(id, None);
                false
            }
        }
    }

    /// Writes this replica's registrations that differ from what etcd holds, and removes the
    /// keys of the ones it no longer has (while they are still under its lease).
    async fn push_own(
        &self,
        state: &mut SyncState,
        host: &Arc<dyn RegistryHost>,
    ) -> Result<(), StoreError> {
        if self.is_closed() {
            return Ok(());
        }
        let Some(lease) = state.lease else {
            return Err(self.unavailable("no lease"));
        };
        let me = self.config.replica_id.clone();
        let desired: BTreeMap<String, PersistedProxy> = host
            .own_registrations()
            .into_iter()
            .map(|mut e| {
                e.replica = Some(me.clone());
                (e.id.clone(), e)
            })
            .collect();
        let mut batch: Vec<PersistedProxy> = Vec::new();
        for (id, value) in &desired {
            if state.written.get(id).is_some_and(|w| &w.value == value) {
                continue;
            }
            if value.is_connected() {
                batch.push(value.clone());
                if batch.len() == BATCH {
                    self.put_connected(state, lease, std::mem::take(&mut batch))
                        .await?;
                }
            } else {
                self.put_if_ours(state, lease, value.clone()).await?;
            }
        }
        if !batch.is_empty() {
            self.put_connected(state, lease, batch).await?;
        }
        let gone: Vec<String> = state
            .written
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            let key = self.registration_key(&id);
            let txn = Txn::new()
                .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            self.txn("removing a registration", txn).await?;
            state.written.remove(&id);
        }
        Ok(())
    }

    fn encode(value: &PersistedProxy) -> Vec<u8> {
        // A struct of strings, numbers and a string map: serializing cannot fail.
        serde_json::to_vec(value).unwrap_or_default()
    }

    /// Puts registrations of proxies connected here, under `lease`, in one transaction.
    async fn put_connected(
        &self,
        state: &mut SyncState,
        lease: i64,
        values: Vec<PersistedProxy>,
    ) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = values
            .iter()
            .map(|v| {
                TxnOp::put(
                    self.registration_key(&v.id),
                    Self::encode(v),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        let resp = self
            .txn("writing registrations", Txn::new().and_then(ops))
            .await?;
        let revision = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        for value in values {
            state.written.insert(
                value.id.clone(),
                Written {
                    value,
                    mod_revision: revision,
                },
            );
        }
        Ok(())
    }

    /// Puts a registration within its grace here, only while its key is under `lease`.
    async fn put_if_ours(
        &self,
        state: &mut SyncState,
        lease: i64,
        value: PersistedProxy,
    ) -> Result<(), StoreError> {
        let key = self.registration_key(&value.id);
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key.as_str(),
                Self::encode(&value),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.txn("writing a registration", txn).await?;
        let mod_revision = if resp.succeeded() {
            resp.header()
                .map_or(0, etcd_client::ResponseHeader::revision)
        } else {
            // Another replica has the proxy now (its write reaches us by the watch), or the
            // key is gone: either way not ours to write.
            0
        };
        state.written.insert(
            value.id.clone(),
            Written {
                value,
                mod_revision,
            },
        );
        Ok(())
    }

    /// Sets the log level in registration `id`, keeping its lease (its owner pushes it).
    pub(crate) async fn write_log_level(
        &self,
        id: &str,
        level: Option<&str>,
    ) -> Result<bool, StoreError> {
        let key = self.registration_key(id);
        for _ in 0..5 {
            let mut resp = self.get("reading a registration", &key, None).await?;
            let Some(current) = resp.take_kvs().into_iter().next() else {
                return Ok(false);
            };
            let Some(mut entry) = self.parse_registration(current.key(), current.value()) else {
                return Ok(false);
            };
            entry.log_level = level.map(str::to_owned);
            let options =
                (current.lease() != 0).then(|| PutOptions::new().with_lease(current.lease()));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    current.mod_revision(),
                )])
                .and_then([TxnOp::put(key.as_str(), Self::encode(&entry), options)]);
            let resp = self.txn("writing a registration", txn).await?;
            if resp.succeeded() {
                return Ok(true);
            }
        }
        Err(StoreError::Backend {
            store: self.describe(),
            reason: format!(
                "registration {id:?} kept changing while its log level was set; try again"
            ),
        })
    }

    /// At shutdown: writes what changed a last time (within the request timeout) and stops
    /// writing. The lease is left to expire: the proxies of this replica keep their endpoints
    /// for the lease TTL plus the grace, time to reconnect to another replica or to this one
    /// restarted.
    pub(crate) async fn close_registration_sync(&self, host: Arc<dyn RegistryHost>) {
        let mut state = self.sync.lock().await;
        if state.lease.is_some() {
            let flushed = tokio::time::timeout(
                self.config.request_timeout,
                self.push_own(&mut state, &host),
            )
            .await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!("writing the registrations a last time: {e}");
            }
        }
        self.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn theirs(connected_since_ms: u64, connected: bool, replica: &str) -> PersistedProxy {
        PersistedProxy {
            id: "a-1".into(),
            service: "a".into(),
            namespace: "default".into(),
            labels: BTreeMap::new(),
            inbound_address: "127.0.0.2:15006".into(),
            outbound_address: String::new(),
            app_address: String::new(),
            tcp_bind_ip: String::new(),
            build_version: String::new(),
            instance_ip: String::new(),
            app_ports: Vec::new(),
            connected_since_unix_ms: connected_since_ms,
            remove_at_unix_ms: (!connected).then_some(connected_since_ms + 5000),
            log_level: None,
            replica: Some(replica.into()),
        }
    }

    #[test]
    fn an_open_stream_beats_a_grace_and_the_newer_stream_wins() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(10_000);
        let own = |connected| {
            Some(OwnRegistration {
                connected,
                connected_since: t,
            })
        };
        // Nothing here, or only a grace here: the other replica has it.
        assert_eq!(decide(None, &theirs(1, true, "b"), "a"), Decision::Yield);
        assert_eq!(
            decide(own(false), &theirs(1, false, "b"), "a"),
            Decision::Yield
        );
        // Open here, within its grace there: ours.
        assert_eq!(
            decide(own(true), &theirs(20_000, false, "b"), "a"),
            Decision::Keep
        );
        // Two open streams: the newer one, then the greater replica id.
        assert_eq!(
            decide(own(true), &theirs(9_999, true, "b"), "a"),
            Decision::Keep
        );
        assert_eq!(
            decide(own(true), &theirs(10_001, true, "b"), "a"),
            Decision::Yield
        );
        assert_eq!(
            decide(own(true), &theirs(10_000, true, "b"), "a"),
            Decision::Yield
        );
        assert_eq!(
            decide(own(true), &theirs(10_000, true, "a"), "b"),
            Decision::Keep
        );
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
        assert!(b.next_delay() >= Duration::from_millis(2500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // The registration sync's: capped at a third of the lease TTL (2 s in the tests).
        let mut b = Backoff::capped(Duration::from_secs(2) / 3);
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2) / 3);
        }
        assert!(b.next_delay() >= Duration::from_secs(2) / 6);
    }
}
