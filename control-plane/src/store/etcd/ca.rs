//! The CA the replicas share. Every replica must sign with the same root (certificates from any
//! replica then verify everywhere) and hold the same join-token secret (a token works on any
//! replica): give every replica the same CA files (`--ca-dir` with `root.pem`/`root-key.pem`, or
//! `--root-cert`/`--root-key` and the intermediate, and `token.key`). The first replica records
//! the CA's fingerprint in `<prefix>/ca`; a replica whose CA differs refuses to start and says
//! what differs. The intermediate is not part of it (certificates under two intermediates of
//! one root verify alike), nor are the extra roots.
//!
//! To replace the CA on purpose (a root rotation's step 2), delete the key (`etcdctl del
//! <prefix>/ca`) and restart the replicas with the new root: the first records it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{unix_ms, EtcdStore};
use crate::ca::Ca;
use crate::store::{Store as _, StoreError};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

/// What identifies a CA across replicas. Reveals no secret: digests of the root certificate
/// and of a MAC under the join-token secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaFingerprint {
    pub trust_domain: String,
    /// SHA-256 (hex) of the DER of the root the CA signs under.
    pub root_sha256: String,
    /// SHA-256 (hex) of a MAC of a fixed message under the join-token secret: equal exactly
    /// when the secrets are. (The message is no valid identity, so the MAC is no join token.)
    pub token_secret_check: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl CaFingerprint {
    /// The fingerprint of `ca`.
    pub fn of(ca: &Ca) -> Result<Self, String> {
        let trust = ca.trust();
        let root_pem = trust
            .roots_pem
            .first()
            .ok_or_else(|| "the CA has no root".to_owned())?;
        let der = crate::ca::pem_certs(root_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| "the CA's root PEM holds no certificate".to_owned())?;
        let mac = ca.token_secret().token("_weft", "_ca-fingerprint");
        Ok(Self {
            trust_domain: trust.trust_domain,
            root_sha256: hex(&Sha256::digest(&der)),
            token_secret_check: hex(&Sha256::digest(mac.as_bytes())),
        })
    }

    /// What differs between `self` (this replica's) and `recorded`, in words; `None`: nothing.
    pub fn differences(&self, recorded: &Self) -> Option<String> {
        let mut out = Vec::new();
        if self.trust_domain != recorded.trust_domain {
            out.push(format!(
                "trust domain {:?} here, {:?} there",
                self.trust_domain, recorded.trust_domain
            ));
        }
        if self.root_sha256 != recorded.root_sha256 {
            out.push(format!(
                "root certificate sha256 {} here, {} there",
                self.root_sha256, recorded.root_sha256
            ));
        }
        if self.token_secret_check != recorded.token_secret_check {
            out.push("a different join-token secret (token.key)".to_owned());
        }
        (!out.is_empty()).then(|| out.join("; "))
    }
}

/// The record in `<prefix>/ca`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    fingerprint: CaFingerprint,
    replica: String,
    recorded_at_unix_ms: u64,
}

/// The outcome of [`EtcdStore::check_ca`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCheck {
    /// No replica had recorded a CA: this one's is recorded now.
    Recorded,
    /// The CA recorded (by `replica`) is this one.
    Same { replica: String },
    /// Another CA is recorded: the message says what differs and what to do.
    Differs(String),
}

impl EtcdStore {
    /// Records `fingerprint` as the mesh's CA unless a replica already recorded one; else
    /// compares.
    pub async fn check_ca(&self, fingerprint: &CaFingerprint) -> Result<CaCheck, StoreError> {
        let key = self.key("ca");
        let record = Record {
            fingerprint: fingerprint.clone(),
            replica: self.config.replica_id.clone(),
            recorded_at_unix_ms: unix_ms(std::time::SystemTime::now()),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.txn("recording the CA", txn).await?;
        if resp.succeeded() {
            return Ok(CaCheck::Recorded);
        }
        let stored = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        let recorded: Record =
            serde_json::from_slice(&stored).map_err(|e| StoreError::Backend {
                store: self.describe(),
                reason: format!(
                    "{key}: not a CA record: {e} (delete it to record this replica's CA)"
                ),
            })?;
        Ok(match fingerprint.differences(&recorded.fingerprint) {
            None => CaCheck::Same {
                replica: recorded.replica,
            },
            Some(what) => CaCheck::Differs(format!(
                "this replica's CA is not the one the replicas of this mesh share (recorded in \
                 {key} by replica {:?}): {what}. Give every replica the same CA files (the \
                 --ca-dir's root.pem and root-key.pem, or --root-cert/--root-key, and token.key); \
                 to replace the CA on purpose, delete the key (etcdctl del {key}) and restart \
                 the replicas with the new one",
                recorded.replica
            )),
        })
    }
}
