//! Lookups into a [`super::PolicySet`] in O(1): services by key and by name, each service's
//! routes (declared order) and its authorization policy. Built once with the set, so compiling
//! a proxy's resources costs time proportional to what it compiles, not to the mesh squared
//! (every route used to resolve its service by scanning every service).

use std::collections::HashMap;
use std::sync::Arc;

use super::{resolve_among, AuthorizationPolicy, ReferenceError, Route, Service, ServiceKey};

/// The index of one policy set.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct PolicyIndex {
    by_key: HashMap<ServiceKey, usize>,
    by_name: HashMap<String, Vec<usize>>,
    routes_by_service: HashMap<ServiceKey, Vec<usize>>,
    authorization_by_service: HashMap<ServiceKey, usize>,
}

impl PolicyIndex {
    pub(super) fn build(
        services: &[Service],
        routes: &[Route],
        authorization: &[AuthorizationPolicy],
    ) -> Self {
        let mut index = Self::default();
        for (i, s) in services.iter().enumerate() {
            index
                .by_key
                .insert(ServiceKey::new(&s.name, &s.namespace), i);
            index.by_name.entry(s.name.clone()).or_default().push(i);
        }
        for (i, r) in routes.iter().enumerate() {
            if let Ok(key) = index.resolve(services, &r.service, None) {
                index.routes_by_service.entry(key).or_default().push(i);
            }
        }
        for (i, p) in authorization.iter().enumerate() {
            if let Ok(key) = index.resolve(services, &p.service, None) {
                index.authorization_by_service.entry(key).or_insert(i);
            }
        }
        index
    }

    /// The previous set's index, if it is the one [`PolicyIndex::build`] gives for the new
    /// lists. The caller has checked that the services' names and namespaces are, in order,
    /// the previous set's (`validate_cache::same_facts`); the rest of what `build` reads is
    /// each route's and each authorization policy's `service`, in order, compared here.
    pub(super) fn reuse(
        previous: &Arc<Self>,
        previous_routes: &[Route],
        previous_authorization: &[AuthorizationPolicy],
        routes: &[Route],
        authorization: &[AuthorizationPolicy],
    ) -> Option<Arc<Self>> {
        let same_routes = previous_routes.len() == routes.len()
            && previous_routes
                .iter()
                .zip(routes)
                .all(|(a, b)| a.service == b.service);
        let same_authorization = previous_authorization.len() == authorization.len()
            && previous_authorization
                .iter()
                .zip(authorization)
                .all(|(a, b)| a.service == b.service);
        (same_routes && same_authorization).then(|| Arc::clone(previous))
    }

    /// [`super::resolve_reference`], without scanning.
    pub(super) fn resolve(
        &self,
        services: &[Service],
        reference: &str,
        context_namespace: Option<&str>,
    ) -> Result<ServiceKey, ReferenceError> {
        if let Some((name, ns)) = reference.split_once('.') {
            let key = ServiceKey::new(name, ns);
            return if self.by_key.contains_key(&key) {
                Ok(key)
            } else {
                Err(ReferenceError::Unknown(reference.to_owned()))
            };
        }
        let candidates = self.by_name.get(reference).map_or(&[][..], Vec::as_slice);
        resolve_among(
            reference,
            context_namespace,
            candidates.iter().map(|&i| &services[i]),
        )
    }

    pub(super) fn service(&self, key: &ServiceKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    pub(super) fn routes_of(&self, key: &ServiceKey) -> &[usize] {
        self.routes_by_service.get(key).map_or(&[], Vec::as_slice)
    }

    pub(super) fn authorization_of(&self, key: &ServiceKey) -> Option<usize> {
        self.authorization_by_service.get(key).copied()
    }
}
