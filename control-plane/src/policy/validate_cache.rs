//! Which validation checks an apply can skip because the set in force already passed them with
//! the same inputs (an endpoint change of one service re-validates that one file).
//!
//! A [`super::PolicySet`] exists only if its validation found no error, so it is the cache: a
//! file it holds with the same name and content passed every check that reads only that file
//! and the *name index* (which services exist, in which namespace, with which protocol: what
//! `ServiceLookup::resolve`, `get` and `with_key` can tell validation). When the new set's
//! services carry exactly the previous set's `(name, namespace, protocol)`, in the same order
//! ([`same_facts`]), those per-file checks (`validate_service`, `validate_route`, an
//! authorization policy's rules) give the same result as before, no error, and are skipped for
//! that file.
//!
//! Cross-file checks are skipped only where the previous set proves them clean:
//! - duplicate services: the services' names and namespaces are, in order, those of a set
//!   without duplicates ([`Reuse::facts_unchanged`]);
//! - duplicate route names and routes that match the same requests: every file holding routes
//!   is unchanged, so the routes are a subset of the previous set's, and their services resolve
//!   the same; a subset of routes without duplicates has none ([`Reuse::all_declaring_unchanged`]);
//! - duplicate authorization policy names and two policies for one service: likewise
//!   (the same).
//!
//! The mesh checks and the virtual IPs run every time (they are few, or depend on every
//! service's content). Skipped checks would have pushed no error and the checks still run in
//! the same order, so the errors of an invalid set are byte for byte those of a validation from
//! scratch.

use super::Service;

/// What the set being validated shares with the set in force (all `false` without one).
#[derive(Debug, Clone, Default)]
pub(super) struct Reuse {
    /// The services' `(name, namespace, protocol)` are, in order, the previous set's.
    pub(super) facts_unchanged: bool,
    /// `unchanged[i]`: file `i` is held by the previous set with the same name and content,
    /// and the facts are unchanged (its per-file checks are known to pass).
    pub(super) unchanged: Vec<bool>,
}

impl Reuse {
    /// Nothing known: every check runs.
    pub(super) fn none(files: usize) -> Self {
        Self {
            facts_unchanged: false,
            unchanged: vec![false; files],
        }
    }

    /// `reused[i]`: file `i`'s parse was taken from `previous_services`' set (same name and
    /// content); `services`: the new set's services, in order.
    pub(super) fn new(
        reused: &[bool],
        previous_services: &[Service],
        services: &[Service],
    ) -> Self {
        let facts_unchanged = same_facts(previous_services, services);
        Self {
            facts_unchanged,
            unchanged: reused.iter().map(|r| *r && facts_unchanged).collect(),
        }
    }

    /// Every file that declares what is checked across files (routes, or authorization
    /// policies) is unchanged. `declares[i]`: file `i` declares some.
    pub(super) fn all_declaring_unchanged(&self, declares: impl IntoIterator<Item = bool>) -> bool {
        self.facts_unchanged
            && declares
                .into_iter()
                .zip(&self.unchanged)
                .all(|(declares, unchanged)| *unchanged || !declares)
    }
}

/// Whether the two lists hold the same `(name, namespace, protocol)`, in order: everything a
/// service lookup during validation can observe.
pub(super) fn same_facts(previous: &[Service], services: &[Service]) -> bool {
    previous.len() == services.len()
        && previous.iter().zip(services).all(|(a, b)| {
            a.name == b.name && a.namespace == b.namespace && a.protocol == b.protocol
        })
}
