//! What a purge names, how it travels, and how it matches a stored object.
//!
//! A purge has an id, the region that accepted it and the time it was
//! accepted; the same three travel on both paths (the direct fan-out to
//! peers and the replicated table), so each region applies an id once.
//! Keys and prefixes are URLs as the cache keys them: scheme, host as
//! routing validates it (lowercase, no port, no trailing dot), path as
//! routed (normalised with the server's path rules), query.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::host::validate_host;
use crate::path::{normalize_path, PathRules};
use crate::tables::{Attr, Item, EXPIRES_AT};

/// Most targets (keys + prefixes + tags) one purge may name.
pub const MAX_TARGETS: usize = 1000;
/// Longest key, prefix or tag.
const MAX_TARGET_LEN: usize = 8 * 1024;

/// The body of `POST /purge`, and the `spec` attribute of a row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeSpec {
    /// Exact URLs (every `Vary` variant).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// URL prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Tags from `Surrogate-Key` / `Cache-Tag`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Everything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Mark stale (revalidate on next use) instead of deleting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub soft: bool,
}

impl PurgeSpec {
    /// Check limits and put keys and prefixes in the form the cache keys
    /// use (`rules`: the server's path normalisation, as routing applies it).
    pub fn normalized(mut self, rules: PathRules) -> Result<PurgeSpec, String> {
        let n = self.keys.len() + self.prefixes.len() + self.tags.len();
        if n == 0 && !self.all {
            return Err("a purge needs at least one of keys, prefixes, tags or all".into());
        }
        if n > MAX_TARGETS {
            return Err(format!(
                "at most {MAX_TARGETS} keys, prefixes and tags per purge"
            ));
        }
        for t in self.keys.iter().chain(&self.prefixes).chain(&self.tags) {
            if t.is_empty() || t.len() > MAX_TARGET_LEN {
                return Err(format!(
                    "keys, prefixes and tags must be 1 to {MAX_TARGET_LEN} bytes"
                ));
            }
        }
        for k in &mut self.keys {
            *k = normalize_url(k, rules)?;
        }
        for p in &mut self.prefixes {
            *p = normalize_url(p, rules)?;
        }
        Ok(self)
    }

    /// Does this purge cover an object stored under `url` with `tags`?
    pub fn matches(&self, url: &str, tags: &[Box<str>]) -> bool {
        self.all
            || self.keys.iter().any(|k| k == url)
            || self.prefixes.iter().any(|p| url.starts_with(p.as_str()))
            || self
                .tags
                .iter()
                .any(|t| tags.iter().any(|have| have.as_ref() == t.as_str()))
    }

    /// A purge of these URLs only (unsafe methods, `Location`).
    pub fn urls(keys: Vec<String>) -> PurgeSpec {
        PurgeSpec {
            keys,
            ..PurgeSpec::default()
        }
    }
}

/// `http://Host:8080/a/./b?c` => `http://host/a/b?c`: the form cache keys take.
pub fn normalize_url(url: &str, rules: PathRules) -> Result<String, String> {
    let bad = || format!("`{url}` is not an absolute http(s) URL (http://host/path)");
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(bad());
    }
    let (authority, rest) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = validate_host(authority).map_err(|e| format!("`{url}`: {e}"))?;
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let path = normalize_path(path, rules).map_err(|e| format!("`{url}`: {e}"))?;
    let mut pq = path.into_owned();
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    // Every listener is plain HTTP today, so every key says `http`: an
    // `https://` URL names the same object.
    Ok(cache_url(&host.name, &pq))
}

/// The cache's primary key: `http://host/path?query`, `host` as
/// `validate_host` gives it (lowercase, no port, no trailing dot).
pub fn cache_url(host: &str, path_and_query: &str) -> String {
    let mut s = String::with_capacity(host.len() + path_and_query.len() + 7);
    s.push_str("http://");
    s.push_str(host);
    s.push_str(path_and_query);
    s
}

/// One purge as it travels: the same id, region and time on both paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    /// Unique id (random, hex).
    pub id: String,
    /// Region that accepted it.
    pub region: String,
    /// Unix ms when it was accepted.
    pub time_ms: u64,
    /// What it removes.
    pub spec: PurgeSpec,
    /// Ids of purges folded into this one (rows written after the table was
    /// unreachable): a region that applied all of them already skips it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<String>,
}

impl Purge {
    /// A new purge accepted now in `region`.
    pub fn new(region: &str, time_ms: u64, spec: PurgeSpec) -> Purge {
        let mut id = String::with_capacity(24);
        for b in rand::random::<[u8; 12]>() {
            let _ = write!(id, "{b:02x}");
        }
        Purge {
            id,
            region: region.to_string(),
            time_ms,
            spec,
            also: Vec::new(),
        }
    }

    /// The row for the table: `inv#<shard>`, sort key `<time>#<region>#<id>`.
    pub fn to_row(&self, shards: u32, retention_s: u64) -> Item {
        let shard = shard_of(&self.id, shards);
        let spec = serde_json::to_string(&self.spec).unwrap_or_default();
        let expires = (self.time_ms / 1000 + retention_s) as i64;
        Item::new(
            format!("inv#{shard}"),
            sort_key(self.time_ms, &self.region, &self.id),
        )
        .with("spec", Attr::S(spec))
        .with(EXPIRES_AT, Attr::N(expires))
        .with("also", Attr::S(self.also.join(",")))
    }

    /// Read a row back; `None` for rows this version cannot read.
    pub fn from_row(item: &Item) -> Option<Purge> {
        let mut parts = item.sk.splitn(3, '#');
        let time_ms = parts.next()?.parse().ok()?;
        let region = parts.next()?.to_string();
        let id = parts.next()?.to_string();
        let spec: PurgeSpec = serde_json::from_str(item.s("spec")?).ok()?;
        let also = item
            .s("also")
            .filter(|a| !a.is_empty())
            .map(|a| a.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        Some(Purge {
            id,
            region,
            time_ms,
            spec,
            also,
        })
    }
}

/// Sort keys order by time: 13 digits of Unix ms cover every date until 2286.
pub fn sort_key(time_ms: u64, region: &str, id: &str) -> String {
    format!("{time_ms:013}#{region}#{id}")
}

fn shard_of(id: &str, shards: u32) -> u32 {
    let h = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    h % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_keyed_as_routing_sees_them() {
        let n = |u: &str| normalize_url(u, PathRules::default());
        assert_eq!(
            n("HTTP://Example.COM.:8080/A/./b//c/%7Ex?Q=1").as_deref(),
            Ok("http://example.com/A/b/c/~x?Q=1")
        );
        assert_eq!(n("http://h").as_deref(), Ok("http://h/"));
        assert_eq!(n("http://h?x").as_deref(), Ok("http://h/?x"));
        assert_eq!(n("http://[::1]:80/x").as_deref(), Ok("http://[::1]/x"));
        assert_eq!(n("https://h/x").as_deref(), Ok("http://h/x"));
        for bad in [
            "/path",
            "ftp://h/x",
            "http:///x",
            "http://u@h/x",
            "http://h/a b",
        ] {
            assert!(n(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_purge_needs_a_target_and_matches_keys_prefixes_tags() {
        assert!(PurgeSpec::default()
            .normalized(PathRules::default())
            .is_err());
        let spec = PurgeSpec {
            keys: vec!["http://h:1/a".into()],
            prefixes: vec!["http://h/p/".into()],
            tags: vec!["t".into()],
            ..PurgeSpec::default()
        }
        .normalized(PathRules::default())
        .unwrap();
        let none: &[Box<str>] = &[];
        assert!(spec.matches("http://h/a", none));
        assert!(!spec.matches("http://h/a?x", none));
        assert!(spec.matches("http://h/p/x", none));
        assert!(!spec.matches("http://h/px", none));
        assert!(spec.matches("http://h/z", &["u".into(), "t".into()]));
        assert!(!spec.matches("http://h/z", &["tt".into()]));
    }

    #[test]
    fn rows_round_trip_and_sort_by_time() {
        let p = Purge::new(
            "eu-west-1",
            1_700_000_000_123,
            PurgeSpec::urls(vec!["http://h/a".into()]),
        );
        let row = p.to_row(4, 3600);
        assert!(row.pk.starts_with("inv#"));
        let mut folded = p.clone();
        folded.also = vec!["a1".into(), "b2".into()];
        assert_eq!(Purge::from_row(&folded.to_row(4, 3600)), Some(folded));
        assert!(row.sk.starts_with("1700000000123#eu-west-1#"));
        assert_eq!(Purge::from_row(&row), Some(p));
        assert!(sort_key(999, "a", "x") < sort_key(1000, "a", "x"));
    }
}
