//! The control plane as its store backend sees it ([`RegistryHost`]): the registrations to
//! persist, and where restored ones go.

use super::ControlPlane;
use crate::registry::PersistedProxy;
use crate::store::{OwnRegistration, RegistryHost};

impl RegistryHost for ControlPlane {
    fn registry_changes(&self) -> &tokio::sync::Notify {
        ControlPlane::registry_changes(self)
    }

    fn own_registrations(&self) -> Vec<PersistedProxy> {
        self.persisted_registry()
    }

    fn restore_registrations(&self, entries: Vec<PersistedProxy>) -> usize {
        self.restore_registry(entries)
    }

    fn replace_remote_registrations(&self, entries: Vec<PersistedProxy>) -> usize {
        ControlPlane::replace_remote_registrations(self, entries)
    }

    fn remote_registration(&self, id: &str, entry: Option<PersistedProxy>) {
        ControlPlane::remote_registration(self, id, entry);
    }

    fn own_registration(&self, id: &str) -> Option<OwnRegistration> {
        ControlPlane::own_registration(self, id)
    }

    fn set_own_log_level(&self, id: &str, level: Option<String>) {
        ControlPlane::set_own_log_level(self, id, level);
    }
}
