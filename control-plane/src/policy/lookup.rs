//! Service lookups for validation: services by `(name, namespace)` and by name, built once per
//! validation over the set being validated (which may hold duplicates and invalid names), so
//! resolving every route, dependency, authorization policy and mirror costs O(1) each instead
//! of a scan of every service (O(services²) per apply at mesh scale).
//!
//! Semantics are exactly those of [`super::resolve_reference`]'s linear scan: on duplicates the
//! first declared service wins, and an ambiguity lists sorted, deduplicated namespaces.

use std::collections::HashMap;

use super::{resolve_among, ReferenceError, Service, ServiceKey};

/// An index of a slice of services, borrowing their names (no copies).
pub(super) struct ServiceLookup<'a> {
    services: &'a [Service],
    /// Every service of each name and namespace (more than one: a duplicate), declared order.
    by_key: HashMap<&'a str, HashMap<&'a str, Vec<usize>>>,
    /// Every service of each name, in declared order.
    by_name: HashMap<&'a str, Vec<usize>>,
}

impl<'a> ServiceLookup<'a> {
    pub(super) fn new(services: &'a [Service]) -> Self {
        let mut by_key: HashMap<&str, HashMap<&str, Vec<usize>>> =
            HashMap::with_capacity(services.len());
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::with_capacity(services.len());
        for (i, s) in services.iter().enumerate() {
            by_key
                .entry(s.name.as_str())
                .or_default()
                .entry(s.namespace.as_str())
                .or_default()
                .push(i);
            by_name.entry(s.name.as_str()).or_default().push(i);
        }
        Self {
            services,
            by_key,
            by_name,
        }
    }

    /// The first service with this name and namespace.
    pub(super) fn get(&self, name: &str, namespace: &str) -> Option<&'a Service> {
        self.with_key(name, namespace).next()
    }

    /// Every service with this name and namespace (several only in an invalid set).
    pub(super) fn with_key(
        &self,
        name: &str,
        namespace: &str,
    ) -> impl Iterator<Item = &'a Service> + '_ {
        self.by_key
            .get(name)
            .and_then(|namespaces| namespaces.get(namespace))
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|&i| &self.services[i])
    }

    /// [`super::resolve_reference`] over the indexed services, without scanning.
    pub(super) fn resolve(
        &self,
        reference: &str,
        context_namespace: Option<&str>,
    ) -> Result<ServiceKey, ReferenceError> {
        if let Some((name, ns)) = reference.split_once('.') {
            return self
                .get(name, ns)
                .map(|s| ServiceKey::new(&s.name, &s.namespace))
                .ok_or_else(|| ReferenceError::Unknown(reference.to_owned()));
        }
        let candidates = self.by_name.get(reference).map_or(&[][..], Vec::as_slice);
        resolve_among(
            reference,
            context_namespace,
            candidates.iter().map(|&i| &self.services[i]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{resolve_reference, Service};
    use super::ServiceLookup;

    fn svc(name: &str, namespace: &str) -> Service {
        serde_yaml::from_str(&format!("{{name: {name}, namespace: {namespace}}}")).unwrap()
    }

    fn services() -> Vec<Service> {
        vec![
            svc("web", "default"),
            svc("api", "shop"),
            svc("api", "billing"),
            svc("api", "shop"), // a duplicate (a validation error of its own)
            svc("db", "billing"),
            svc("solo", "ops"),
            svc("twin", "b"),
            svc("twin", "a"),
            svc("twin", "b"),
        ]
    }

    /// Every reference form against the linear function, with every context namespace.
    #[test]
    fn resolves_exactly_like_the_linear_scan() {
        let all = services();
        let lookup = ServiceLookup::new(&all);
        let references = [
            "web",
            "web.default",
            "web.shop",
            "api",
            "api.shop",
            "api.billing",
            "api.ops",
            "db",
            "db.billing",
            "solo",
            "twin",
            "twin.a",
            "missing",
            "missing.default",
            "",
            ".",
            "api.",
            ".shop",
            "a.b.c",
        ];
        let contexts = [
            None,
            Some("default"),
            Some("shop"),
            Some("billing"),
            Some("a"),
            Some("b"),
            Some("nowhere"),
        ];
        for reference in references {
            for context in contexts {
                assert_eq!(
                    lookup.resolve(reference, context),
                    resolve_reference(&all, reference, context),
                    "{reference:?} in {context:?}"
                );
            }
        }
    }

    #[test]
    fn qualified_unqualified_context_ambiguous_and_unknown() {
        let all = services();
        let lookup = ServiceLookup::new(&all);
        let key = |r: &str, ctx: Option<&str>| lookup.resolve(r, ctx).map(|k| k.to_string());
        assert_eq!(key("api.billing", None), Ok("api.billing".to_owned()));
        assert_eq!(key("web", None), Ok("web.default".to_owned()));
        assert_eq!(key("api", Some("billing")), Ok("api.billing".to_owned()));
        assert_eq!(key("db", Some("shop")), Ok("db.billing".to_owned()));
        assert_eq!(
            lookup.resolve("api", None).unwrap_err().to_string(),
            "service \"api\" exists in several namespaces (billing, shop); write <name>.<namespace>"
        );
        assert_eq!(
            lookup.resolve("twin", Some("c")).unwrap_err().to_string(),
            "service \"twin\" exists in several namespaces (a, b); write <name>.<namespace>"
        );
        assert_eq!(
            lookup
                .resolve("nope", Some("shop"))
                .unwrap_err()
                .to_string(),
            "unknown service \"nope\""
        );
        assert_eq!(
            lookup.resolve("api.ops", None).unwrap_err().to_string(),
            "unknown service \"api.ops\""
        );
    }

    #[test]
    fn a_duplicate_key_finds_the_first_declared_service() {
        let mut all = services();
        all[3].port = Some(9); // the second "api.shop"
        let lookup = ServiceLookup::new(&all);
        assert_eq!(lookup.get("api", "shop").unwrap().port, None);
        let ports: Vec<Option<u32>> = lookup.with_key("api", "shop").map(|s| s.port).collect();
        assert_eq!(ports, [None, Some(9)]);
        assert!(lookup.get("api", "nowhere").is_none());
    }
}
