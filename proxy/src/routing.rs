//! Route matching: which route serves a Host and path, nginx-style: the most
//! specific host match wins first (exact, then the longest `*.suffix`, then
//! `*`), then the longest path prefix among that host's routes. Hosts and
//! paths arrive validated and normalised ([`crate::host`], [`crate::path`]);
//! prefixes match whole segments.

use crate::config::{HostMatch, RouteConfig};
use crate::path::prefix_matches;

/// Routes ready for matching.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<RouteConfig>,
}

impl RouteTable {
    /// Build from validated routes.
    pub fn new(routes: Vec<RouteConfig>) -> Self {
        RouteTable { routes }
    }

    /// All routes, in config order.
    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// The index of the route for a validated host name (lower case, no
    /// port, no trailing dot) and a normalised path.
    pub fn find(&self, host: &str, path: &str) -> Option<usize> {
        // Rank of a host match: exact beats any suffix; longer suffix beats shorter; `*` last.
        let rank = |m: &HostMatch| -> Option<usize> {
            match m {
                HostMatch::Exact(h) => (h.eq_ignore_ascii_case(host)).then_some(usize::MAX),
                HostMatch::Suffix(s) => (host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes()))
                .then_some(s.len()),
                HostMatch::Any => Some(0),
            }
        };
        let best_host = self.routes.iter().filter_map(|r| rank(&r.host)).max()?;
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                rank(&r.host) == Some(best_host) && prefix_matches(&r.path_prefix, path)
            })
            .max_by_key(|(_, r)| r.path_prefix.trim_end_matches('/').len())
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_policies::Policy;

    fn route(name: &str, host: HostMatch, prefix: &str) -> RouteConfig {
        RouteConfig {
            name: name.to_string(),
            host,
            path_prefix: prefix.to_string(),
            upstream: Some(0),
            policy: Policy::LocalFirst,
            allowed: edge_policies::RegionSet::ALL,
            cache: None,
            limits: Default::default(),
            static_response: None,
            compress: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route("any", HostMatch::Any, "/"),
            route("wild", HostMatch::Suffix(".example.com".into()), "/"),
            route(
                "deep-wild",
                HostMatch::Suffix(".eu.example.com".into()),
                "/",
            ),
            route("api", HostMatch::Exact("api.example.com".into()), "/"),
            route("api-v2", HostMatch::Exact("api.example.com".into()), "/v2/"),
        ])
    }

    fn name(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        t.find(host, path).map(|i| t.routes()[i].name.clone())
    }

    #[test]
    fn exact_host_beats_wildcards() {
        assert_eq!(
            name(&table(), "api.example.com", "/x").as_deref(),
            Some("api")
        );
    }

    #[test]
    fn longest_path_prefix_wins_within_a_host() {
        assert_eq!(
            name(&table(), "api.example.com", "/v2/users").as_deref(),
            Some("api-v2")
        );
    }

    #[test]
    fn longest_suffix_wins_and_port_and_case_are_ignored() {
        let t = table();
        assert_eq!(
            name(&t, "x.eu.example.com", "/").as_deref(),
            Some("deep-wild")
        );
        assert_eq!(name(&t, "WWW.Example.com", "/").as_deref(), Some("wild"));
        // A suffix does not match the bare domain.
        assert_eq!(name(&t, "example.com", "/").as_deref(), Some("any"));
    }

    #[test]
    fn unknown_host_without_catch_all_matches_nothing() {
        let t = RouteTable::new(vec![route(
            "api",
            HostMatch::Exact("api.example.com".into()),
            "/",
        )]);
        assert_eq!(t.find("evil.test", "/"), None);
        assert_eq!(t.find("api.example.com", "/"), Some(0));
    }

    #[test]
    fn host_match_without_path_match_is_none() {
        let t = RouteTable::new(vec![route("v2", HostMatch::Exact("a.test".into()), "/v2/")]);
        assert_eq!(t.find("a.test", "/v1/"), None);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let t = RouteTable::new(vec![
            route("root", HostMatch::Any, "/"),
            route("admin", HostMatch::Any, "/admin/"),
        ]);
        assert_eq!(name(&t, "a", "/admin").as_deref(), Some("admin"));
        assert_eq!(name(&t, "a", "/admin/x").as_deref(), Some("admin"));
        assert_eq!(name(&t, "a", "/adminx").as_deref(), Some("root"));
    }
}
