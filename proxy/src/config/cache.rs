//! `[cache]` and the routes' cache keys, validated.

use std::time::Duration;

use super::diag::{Locator, Seg};
use super::raw::{RawCache, RawRoute, RawSize};
use super::{ConfigError, TablesConfig};

/// Largest single object: the store weighs entries in `u32` bytes.
const MAX_OBJECT_LIMIT: u64 = 1 << 31;

/// `[cache]`, validated.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes the store may hold.
    pub max_bytes: u64,
    /// Larger bodies stream through uncached.
    pub max_object_size: u64,
    /// Hits stop after this long without reading the invalidation rows.
    pub max_unsynced: Duration,
    /// TTL of invalidation rows; a longer outage clears the cache.
    pub purge_retention: Duration,
    /// Cache lock wait.
    pub lock_timeout: Duration,
    /// Direct purge fan-out timeout per peer.
    pub fanout_timeout: Duration,
}

/// A route's cache settings (present when `cache = true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteCache {
    /// Heuristic freshness (RFC 9111 4.2.2) for responses without explicit freshness.
    pub heuristic: bool,
    /// Store responses carrying `Set-Cookie` (without it).
    pub set_cookie: bool,
}

/// Parse `"256MiB"`, `"8MB"`, `"512KiB"`, `"1GiB"` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. \"256MiB\", \"8MB\", 1048576)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}` (use B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn size(raw: &RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Bytes(b) => Ok(*b),
        RawSize::Text(t) => parse_size(t),
    }
}

pub(super) fn validate_cache(
    loc: &Locator<'_>,
    raw: RawCache,
    tables: &TablesConfig,
    errors: &mut Vec<ConfigError>,
) -> CacheConfig {
    let at = |k: &str| vec![Seg::from("cache"), Seg::from(k)];
    let mut read = |key: &str, raw: &RawSize, fallback: u64| match size(raw) {
        Ok(v) => v,
        Err(msg) => {
            errors.push(loc.at_path(&at(key), msg));
            fallback
        }
    };
    let max_bytes = read("max_bytes", &raw.max_bytes, 256 << 20);
    let max_object_size = read("max_object_size", &raw.max_object_size, 8 << 20);
    if max_bytes < 1 << 20 {
        errors.push(loc.at_path(&at("max_bytes"), "max_bytes must be at least 1MiB"));
    }
    if max_object_size == 0 || max_object_size > MAX_OBJECT_LIMIT {
        errors.push(loc.at_path(
            &at("max_object_size"),
            "max_object_size must be 1 byte to 2GiB",
        ));
    } else if max_object_size > max_bytes {
        errors.push(loc.at_path(
            &at("max_object_size"),
            "max_object_size is larger than max_bytes: such an object could never be stored",
        ));
    }
    if raw.max_unsynced > Duration::from_secs(3600) {
        errors.push(loc.at_path(&at("max_unsynced"), "max_unsynced must be at most 1h"));
    }
    if raw.max_unsynced < tables.poll_interval * 2 {
        errors.push(loc.at_path(
            &at("max_unsynced"),
            format!(
                "max_unsynced must be at least two tables.poll_interval ({:?}), or every slow poll stops the cache",
                tables.poll_interval
            ),
        ));
    }
    if raw.purge_retention < Duration::from_secs(60) || raw.purge_retention <= raw.max_unsynced {
        errors.push(loc.at_path(
            &at("purge_retention"),
            "purge_retention must be at least 1m and longer than max_unsynced",
        ));
    }
    if raw.purge_retention > Duration::from_secs(30 * 86_400) {
        errors.push(loc.at_path(&at("purge_retention"), "purge_retention above 30d"));
    }
    for (key, d) in [
        ("lock_timeout", raw.lock_timeout),
        ("fanout_timeout", raw.fanout_timeout),
    ] {
        if d.is_zero() || d > Duration::from_secs(300) {
            errors.push(loc.at_path(&at(key), format!("{key} must be above 0 and at most 5m")));
        }
    }
    CacheConfig {
        max_bytes,
        max_object_size,
        max_unsynced: raw.max_unsynced,
        purge_retention: raw.purge_retention,
        lock_timeout: raw.lock_timeout,
        fanout_timeout: raw.fanout_timeout,
    }
}

/// The route's cache settings; an opt-in without `cache = true` is an error,
/// so a config cannot look like it caches when it does not.
pub(super) fn route_cache(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    errors: &mut Vec<ConfigError>,
) -> Option<RouteCache> {
    if !raw.cache {
        for (key, set) in [
            ("cache_heuristic", raw.cache_heuristic),
            ("cache_set_cookie", raw.cache_set_cookie),
        ] {
            if set {
                errors.push(loc.at_path(
                    &[Seg::from("routes"), Seg::from(i), Seg::from(key)],
                    format!("`{key}` needs `cache = true` on this route"),
                ));
            }
        }
        return None;
    }
    Some(RouteCache {
        heuristic: raw.cache_heuristic,
        set_cookie: raw.cache_set_cookie,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("8MB"), Ok(8_000_000));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1_024"), Ok(1024));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
