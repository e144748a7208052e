//! The simulated mesh: `S` services in one namespace, `N` proxies spread over them round-robin
//! (so `N / S` proxies share each scope), each service calling the next `K` services
//! (`dependencies:`) or, with `K = 0`, every service (no `dependencies:`), one header route
//! and one authorization policy per service. It renders the policy YAML `weftctl apply` stores,
//! and knows what every proxy must end up holding: the endpoint count of each cluster it may
//! call, and the retry of each route.

use std::fmt::Write as _;

/// The namespace of every simulated service.
pub const NAMESPACE: &str = "scale";

/// The mesh-wide default `retry.attempts` (every route's `max_retries` before any change).
pub const INITIAL_RETRIES: u32 = 2;

/// Files of the policy, as applied: services (the file the changes rewrite), routes,
/// authorization.
pub const SERVICES_FILE: &str = "services.yaml";
pub const ROUTES_FILE: &str = "routes.yaml";
pub const AUTHORIZATION_FILE: &str = "authorization.yaml";

/// The shape of the simulated mesh.
#[derive(Debug, Clone)]
pub struct Plan {
    proxies: usize,
    services: usize,
    /// Dependencies per service; 0 = none declared (every service may call every service).
    deps: usize,
}

impl Plan {
    /// `proxies` over `services` services with `deps` dependencies each (0: none declared).
    pub fn new(proxies: usize, services: usize, deps: usize) -> anyhow::Result<Plan> {
        anyhow::ensure!(proxies >= 1, "--n must be at least 1");
        anyhow::ensure!(
            (1..=proxies).contains(&services),
            "--services must be between 1 and --n ({proxies}), got {services}"
        );
        anyhow::ensure!(
            deps < services.max(2),
            "--deps must be less than --services ({services}), got {deps}"
        );
        Ok(Plan {
            proxies,
            services,
            deps,
        })
    }

    pub fn proxies(&self) -> usize {
        self.proxies
    }

    pub fn services(&self) -> usize {
        self.services
    }

    /// The service of simulated proxy `proxy`.
    pub fn service_of(&self, proxy: usize) -> usize {
        proxy % self.services
    }

    pub fn service_name(j: usize) -> String {
        format!("svc-{j}")
    }

    /// The cluster name the control plane gives service `j` (`<service>.<namespace>`).
    #[cfg(test)]
    pub fn cluster_name(j: usize) -> String {
        format!("svc-{j}.{NAMESPACE}")
    }

    /// The service index of a cluster name of this mesh (`None`: `inbound` or anything else).
    pub fn cluster_index(&self, name: &str) -> Option<u32> {
        let j: usize = name
            .strip_prefix("svc-")?
            .strip_suffix(NAMESPACE)?
            .strip_suffix('.')?
            .parse()
            .ok()?;
        (j < self.services).then(|| u32::try_from(j).ok()).flatten()
    }

    /// How many simulated proxies run service `j`.
    pub fn instances(&self, j: usize) -> u32 {
        let base = self.proxies / self.services;
        let extra = usize::from(j < self.proxies % self.services);
        u32::try_from(base + extra).unwrap_or(u32::MAX)
    }

    /// The services a proxy of service `j` may call, sorted.
    pub fn callable(&self, j: usize) -> Vec<usize> {
        if self.deps == 0 {
            return (0..self.services).collect();
        }
        let mut out: Vec<usize> = (1..=self.deps).map(|d| (j + d) % self.services).collect();
        out.sort_unstable();
        out
    }

    /// The services whose proxies may call service `j`, sorted.
    pub fn callers(&self, j: usize) -> Vec<usize> {
        (0..self.services)
            .filter(|&i| self.callable(i).binary_search(&j).is_ok())
            .collect()
    }

    /// The policy files with service `j`'s `retry.attempts` = `retries[j]`.
    pub fn policy_files(&self, retries: &[u32]) -> Vec<(&'static str, String)> {
        vec![
            (SERVICES_FILE, self.services_yaml(retries)),
            (ROUTES_FILE, self.routes_yaml()),
            (AUTHORIZATION_FILE, self.authorization_yaml()),
        ]
    }

    /// `services.yaml`: every service with its retry and dependencies.
    pub fn services_yaml(&self, retries: &[u32]) -> String {
        let mut y = String::from("services:\n");
        for j in 0..self.services {
            let retry = retries.get(j).copied().unwrap_or(INITIAL_RETRIES);
            let _ = writeln!(y, "  - name: {}", Plan::service_name(j));
            let _ = writeln!(y, "    namespace: {NAMESPACE}");
            let _ = writeln!(y, "    retry: {{attempts: {retry}}}");
            if self.deps > 0 {
                let deps: Vec<String> = self
                    .callable(j)
                    .into_iter()
                    .map(Plan::service_name)
                    .collect();
                let _ = writeln!(y, "    dependencies: [{}]", deps.join(", "));
            }
        }
        y
    }

    /// `routes.yaml`: one header route per service, to the service itself (it inherits the
    /// service's retry, as the default route does).
    fn routes_yaml(&self) -> String {
        let mut y = String::from("routes:\n");
        for j in 0..self.services {
            let name = Plan::service_name(j);
            let _ = writeln!(y, "  - name: {name}-canary");
            let _ = writeln!(y, "    service: {name}.{NAMESPACE}");
            let _ = writeln!(y, "    match:");
            let _ = writeln!(y, "      path: {{prefix: /api}}");
            let _ = writeln!(y, "      headers: [{{name: x-canary, exact: \"true\"}}]");
            let _ = writeln!(y, "    destinations: [{{service: {name}.{NAMESPACE}}}]");
            let _ = writeln!(y, "    timeout: 2s");
        }
        y
    }

    /// `authorization.yaml`: each service admits its callers (by service with dependencies,
    /// by namespace without) to GET/POST under /api and denies the rest.
    fn authorization_yaml(&self) -> String {
        let mut y = String::from("authorization:\n");
        for j in 0..self.services {
            let name = Plan::service_name(j);
            let _ = writeln!(y, "  - name: {name}-callers");
            let _ = writeln!(y, "    service: {name}.{NAMESPACE}");
            let _ = writeln!(y, "    default: deny");
            let _ = writeln!(y, "    rules:");
            let _ = writeln!(y, "      - name: callers");
            if self.deps > 0 {
                let callers: Vec<String> = self
                    .callers(j)
                    .into_iter()
                    .map(Plan::service_name)
                    .collect();
                let _ = writeln!(y, "        from: {{services: [{}]}}", callers.join(", "));
            } else {
                let _ = writeln!(y, "        from: {{namespaces: [{NAMESPACE}]}}");
            }
            let _ = writeln!(
                y,
                "        to: {{methods: [GET, POST], paths: [{{prefix: /api}}]}}"
            );
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_control::policy::{PolicySet, SourceFile};

    fn parse(plan: &Plan, retries: &[u32]) -> PolicySet {
        PolicySet::from_files(
            plan.policy_files(retries)
                .into_iter()
                .map(|(name, content)| SourceFile {
                    name: name.into(),
                    content,
                })
                .collect(),
        )
        .unwrap_or_else(|e| panic!("{}", e.messages().join("\n")))
    }

    #[test]
    fn the_policy_is_valid_with_and_without_dependencies() {
        for deps in [0, 3] {
            let plan = Plan::new(100, 10, deps).unwrap();
            let set = parse(&plan, &[INITIAL_RETRIES; 10]);
            assert_eq!(set.services().len(), 10);
            assert_eq!(set.routes().len(), 10);
            assert_eq!(set.authorization().len(), 10);
        }
    }

    #[test]
    fn callers_are_the_inverse_of_dependencies() {
        let plan = Plan::new(50, 5, 2).unwrap();
        assert_eq!(plan.callable(4), [0, 1]);
        assert_eq!(plan.callers(0), [3, 4]);
        for j in 0..5 {
            for c in plan.callers(j) {
                assert!(plan.callable(c).contains(&j));
            }
        }
        let all = Plan::new(50, 5, 0).unwrap();
        assert_eq!(all.callable(2), [0, 1, 2, 3, 4]);
        assert_eq!(all.callers(2), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn instances_cover_every_proxy() {
        let plan = Plan::new(103, 10, 3).unwrap();
        assert_eq!((0..10).map(|j| plan.instances(j)).sum::<u32>(), 103);
        assert_eq!(plan.instances(2), 11);
        assert_eq!(plan.instances(3), 10);
        assert_eq!((0..103).filter(|&p| plan.service_of(p) == 2).count(), 11);
    }

    #[test]
    fn cluster_names_round_trip() {
        let plan = Plan::new(10, 10, 1).unwrap();
        assert_eq!(plan.cluster_index(&Plan::cluster_name(7)), Some(7));
        assert_eq!(plan.cluster_index("inbound"), None);
        assert_eq!(plan.cluster_index("svc-10.scale"), None);
        assert_eq!(plan.cluster_index("svc-1.other"), None);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Plan::new(0, 1, 0).is_err());
        assert!(Plan::new(10, 11, 0).is_err());
        assert!(Plan::new(10, 5, 5).is_err());
        assert!(Plan::new(1, 1, 0).is_ok());
    }
}
