//! The control plane as its store backend sees it ([`RegistryHost`]): the registrations to
//! persist, and where restored ones go.

use super::ControlPlane;
use crate::registry::PersistedProxy;
use crate::store::RegistryHost;

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
}
