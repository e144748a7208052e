//! The names the mesh DNS server answers for, built from one snapshot: every service cluster
//! the snapshot holds (the services this sidecar may call) under
//!
//! - `<svc>.<ns>.svc.<cluster domain>`, `<svc>.<ns>.svc`, `<svc>.<ns>`;
//! - `<svc>` for a service of this sidecar's own namespace, else for the only service of that
//!   name (the control plane's rule for a bare service reference).
//!
//! Each name maps to the service's VIP (`Cluster.vip`, declared in policy or allocated from
//! `mesh.vip_range` by the control plane), or to "no VIP". Matching ignores case and the
//! trailing dot. The table is built lazily, on the first query a snapshot serves, and kept
//! until a query finds a newer snapshot in force (the snapshot never builds or imports it).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwapOption;

use crate::snapshot::{Snapshot, SnapshotStore};

/// What a name is to the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A mesh service with this VIP.
    Vip(IpAddr),
    /// A mesh service without a VIP: no address records at all.
    NoVip,
    /// Not a mesh name: forwarded.
    NotMesh,
}

/// One service's entry (for `/config_dump`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNames {
    /// `<svc>.<ns>` (the cluster name).
    pub service: String,
    /// Its VIP, if it has one.
    pub vip: Option<IpAddr>,
    /// Every name answered for it, longest first.
    pub names: Vec<String>,
}

/// The name table of one snapshot.
#[derive(Debug)]
pub struct MeshNames {
    snapshot: Weak<Snapshot>,
    names: HashMap<Box<str>, Option<IpAddr>>,
    services: Vec<ServiceNames>,
}

impl MeshNames {
    /// The table of `snapshot` for a sidecar in `namespace`, with the cluster `domain`
    /// (lower-case, no trailing dot).
    pub fn build(snapshot: &Snapshot, domain: &str, namespace: &str) -> Self {
        // (namespace, name) -> VIP, of service clusters only (not per-port `svc.ns:port`, not
        // subsets `svc.ns~k=v`, not the local app's `inbound*`).
        let mut services: BTreeMap<(&str, &str), Option<IpAddr>> = BTreeMap::new();
        for c in snapshot
            .resources
            .clusters
            .iter()
            .flat_map(|s| &s.clusters)
            .filter(|c| !c.service.is_empty() && c.port == 0 && !c.name.contains('~'))
        {
            let vip = c.vip.parse::<IpAddr>().ok();
            services.insert((c.namespace.as_str(), c.service.as_str()), vip);
        }
        let mut by_short: HashMap<&str, Vec<&str>> = HashMap::new();
        for (ns, name) in services.keys() {
            by_short.entry(name).or_default().push(ns);
        }
        let mut names = HashMap::new();
        let mut entries = Vec::new();
        for ((ns, name), vip) in &services {
            let mut own = vec![
                format!("{name}.{ns}.svc.{domain}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}"),
            ];
            let namesakes = by_short.get(name).map_or(0, Vec::len);
            if *ns == namespace || namesakes == 1 {
                own.push((*name).to_owned());
            }
            for n in &own {
                names.insert(n.to_ascii_lowercase().into_boxed_str(), *vip);
            }
            entries.push(ServiceNames {
                service: format!("{name}.{ns}"),
                vip: *vip,
                names: own,
            });
        }
        Self {
            snapshot: Weak::new(),
            names,
            services: entries,
        }
    }

    /// What `name` (as asked: any case, with or without the trailing dot) is.
    pub fn lookup(&self, name: &str) -> Lookup {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.lookup(&name.to_ascii_lowercase());
        }
        match self.names.get(name) {
            Some(Some(ip)) => Lookup::Vip(*ip),
            Some(None) => Lookup::NoVip,
            None => Lookup::NotMesh,
        }
    }

    /// Every service answered for, by name.
    pub fn services(&self) -> &[ServiceNames] {
        &self.services
    }

    fn is_of(&self, snapshot: &Arc<Snapshot>) -> bool {
        // The weak reference keeps the allocation, so an equal address is the same snapshot.
        std::ptr::eq(self.snapshot.as_ptr(), Arc::as_ptr(snapshot))
    }
}

/// The table of the snapshot in force, rebuilt when a newer one is found.
pub struct NameCache {
    store: Arc<SnapshotStore>,
    domain: String,
    namespace: String,
    current: ArcSwapOption<MeshNames>,
}

impl std::fmt::Debug for NameCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameCache")
            .field("domain", &self.domain)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl NameCache {
    /// Names of the snapshots in `store`, for a sidecar in `namespace`.
    pub fn new(store: Arc<SnapshotStore>, domain: String, namespace: String) -> Self {
        Self {
            store,
            domain,
            namespace,
            current: ArcSwapOption::empty(),
        }
    }

    /// The table of the snapshot in force; `None` before the first snapshot.
    pub fn get(&self) -> Option<Arc<MeshNames>> {
        let snapshot = self.store.load_full()?;
        if let Some(t) = self.current.load_full().filter(|t| t.is_of(&snapshot)) {
            return Some(t);
        }
        let mut built = MeshNames::build(&snapshot, &self.domain, &self.namespace);
        built.snapshot = Arc::downgrade(&snapshot);
        let built = Arc::new(built);
        self.current.store(Some(Arc::clone(&built)));
        Some(built)
    }

    /// The cluster domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The sidecar's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use weft_proto::v1;

    use super::*;
    use crate::metrics::Metrics;
    use crate::snapshot::Resources;

    fn cluster(name: &str, service: &str, ns: &str, vip: &str, port: u32) -> v1::Cluster {
        v1::Cluster {
            name: name.into(),
            service: service.into(),
            namespace: ns.into(),
            vip: vip.into(),
            port,
            ..Default::default()
        }
    }

    /// A snapshot with `api.default` (VIP 10.96.0.10, a per-port cluster and a subset),
    /// `db.default` (no VIP), `web.shop` (IPv6 VIP), `api.shop` (a namesake) and the local
    /// app's `inbound`.
    pub(crate) fn snapshot() -> Arc<Snapshot> {
        let r = Resources {
            clusters: Some(v1::ClusterSet {
                version: "c".into(),
                clusters: vec![
                    cluster("api.default", "api", "default", "10.96.0.10", 0),
                    cluster("api.default:8080", "api", "default", "", 8080),
                    cluster("api.default~v=2", "api", "default", "", 0),
                    cluster("db.default", "db", "default", "", 0),
                    cluster("web.shop", "web", "shop", "fd00:96::7", 0),
                    cluster("api.shop", "api", "shop", "10.96.0.11", 0),
                    cluster("inbound", "", "", "", 0),
                    cluster("inbound:8080", "", "", "", 8080),
                ],
            }),
            ..Default::default()
        };
        Arc::new(Snapshot::build(r, None, &Metrics::new().unwrap()).unwrap())
    }

    #[test]
    fn every_form_of_a_service_name_resolves_to_its_vip() {
        let s = snapshot();
        let t = MeshNames::build(&s, "cluster.local", "default");
        let api = Lookup::Vip("10.96.0.10".parse().unwrap());
        for name in [
            "api",
            "api.default",
            "api.default.svc",
            "api.default.svc.cluster.local",
            "API.Default.SVC.cluster.local.",
            "api.",
        ] {
            assert_eq!(t.lookup(name), api, "{name}");
        }
        // The other namespace's namesake only by its qualified names.
        assert_eq!(
            t.lookup("api.shop.svc.cluster.local"),
            Lookup::Vip("10.96.0.11".parse().unwrap())
        );
        // Unique in its namespace: the bare name too.
        assert_eq!(t.lookup("web"), Lookup::Vip("fd00:96::7".parse().unwrap()));
        assert_eq!(t.lookup("db.default"), Lookup::NoVip);
        assert_eq!(t.lookup("db"), Lookup::NoVip);
        for other in [
            "example.com",
            "api.default.svc.other.domain",
            "inbound",
            "api.default:8080",
            "x.api.default",
            "default",
            "",
        ] {
            assert_eq!(t.lookup(other), Lookup::NotMesh, "{other}");
        }
        let services: Vec<&str> = t.services().iter().map(|s| s.service.as_str()).collect();
        assert_eq!(
            services,
            ["api.default", "db.default", "api.shop", "web.shop"]
        );
    }

    #[test]
    fn the_cluster_domain_and_namespace_are_the_sidecars() {
        let s = snapshot();
        let t = MeshNames::build(&s, "mesh.internal", "shop");
        assert_eq!(
            t.lookup("api"),
            Lookup::Vip("10.96.0.11".parse().unwrap()),
            "own namespace first"
        );
        assert_eq!(
            t.lookup("api.default.svc.mesh.internal"),
            Lookup::Vip("10.96.0.10".parse().unwrap())
        );
        assert_eq!(t.lookup("api.default.svc.cluster.local"), Lookup::NotMesh);
        // `db` is unique (default) though not in the sidecar's namespace.
        assert_eq!(t.lookup("db"), Lookup::NoVip);
    }

    #[test]
    fn the_cache_follows_the_snapshot() {
        let store = Arc::new(SnapshotStore::empty());
        let cache = NameCache::new(Arc::clone(&store), "cluster.local".into(), "default".into());
        assert!(cache.get().is_none(), "no snapshot, no names");
        store.store(Some(snapshot()));
        let first = cache.get().unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get().unwrap()));
        store.store(Some(snapshot()));
        let second = cache.get().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.lookup("api"), first.lookup("api"));
    }
}
