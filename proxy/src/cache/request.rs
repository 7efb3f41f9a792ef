//! Cache decisions of one request, kept out of the Pingora hooks so that
//! they read as rules: when the cache may be used, which URLs a write
//! invalidates, and whether a purge sent by a peer is genuine.

use pingora::http::{RequestHeader, ResponseHeader};

use super::invalidation::SyncState;
use super::purge::{cache_url, normalize_url, Purge};
use super::signing::PurgeSigner;
use crate::path::PathRules;

/// Why this request does not use the cache (it gets `x-cache: BYPASS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not GET or HEAD.
    Method,
    /// The client sent `Cache-Control: no-store`.
    ClientNoStore,
    /// The decision serves it in another region.
    NotLocal,
    /// Invalidations unread for longer than `max_unsynced`.
    Unsynced,
    /// A token from another region, newer than the last read of invalidations.
    TokenAhead,
}

/// What the request path knows when it decides on the cache.
pub struct CacheFacts<'a> {
    /// GET or HEAD.
    pub cacheable_method: bool,
    /// The client's `no-store`.
    pub client_no_store: bool,
    /// The decision is this region.
    pub local: bool,
    /// A verified token names another region.
    pub foreign_token: bool,
    /// When heartbeats were last read (the lag snapshot the decision used).
    pub lag_read_ms: Option<u64>,
    /// Invalidation state.
    pub sync: &'a SyncState,
    /// Now, Unix ms.
    pub now_ms: u64,
}

/// May this request be answered from (and fill) the cache?
///
/// A token from another region was checked against heartbeats read at
/// `lag_read_ms`; purges from that region up to the token's write are in
/// the replica from then on, but only applied once a poll has started
/// after it. Until then the read is served by the origin, not the cache.
pub fn use_cache(f: &CacheFacts<'_>) -> Result<(), Bypass> {
    if !f.cacheable_method {
        return Err(Bypass::Method);
    }
    if f.client_no_store {
        return Err(Bypass::ClientNoStore);
    }
    if !f.local {
        return Err(Bypass::NotLocal);
    }
    if !f.sync.synced(f.now_ms) {
        return Err(Bypass::Unsynced);
    }
    if f.foreign_token {
        let polled = f.sync.last_ok_ms().unwrap_or(0);
        if f.lag_read_ms.is_none_or(|h| polled < h) {
            return Err(Bypass::TokenAhead);
        }
    }
    Ok(())
}

/// URLs a successful unsafe request invalidates (RFC 9111 4.4): its own,
/// and `Location` / `Content-Location` when they name the same host.
/// `host` is the request's validated host name; its path is already routed.
pub fn invalidated_urls(
    req: &RequestHeader,
    resp: &ResponseHeader,
    host: &str,
    rules: PathRules,
) -> Vec<String> {
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut urls = vec![cache_url(host, pq)];
    let same_host = cache_url(host, "/");
    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
        let Some(v) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let absolute = if v.starts_with('/') && !v.starts_with("//") {
            format!("http://{host}{v}")
        } else {
            v.to_string()
        };
        // Another host's cache entries are not ours to drop on this
        // origin's word (RFC 9111 4.4).
        let url = normalize_url(&absolute, rules)
            .ok()
            .filter(|u| u.starts_with(&same_host));
        if let Some(u) = url {
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
    }
    urls
}

/// Why a purge from a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPurgeError {
    /// Missing or wrong signature: not from a region sharing our secret.
    Signature,
    /// Signed, but not a purge this version reads.
    Malformed,
    /// Signed long ago (or far ahead): a replay.
    Stale,
}

/// Verify and read a purge a peer sent to `/.edge/purge`.
pub fn peer_purge(
    signer: &PurgeSigner,
    signature: Option<&str>,
    body: &[u8],
    now_ms: u64,
    rules: PathRules,
) -> Result<Purge, PeerPurgeError> {
    if !signature.is_some_and(|s| signer.verify(s, body)) {
        return Err(PeerPurgeError::Signature);
    }
    let purge: Purge = serde_json::from_slice(body).map_err(|_| PeerPurgeError::Malformed)?;
    if !PurgeSigner::fresh(purge.time_ms, now_ms) {
        return Err(PeerPurgeError::Stale);
    }
    // The sender normalised it; the same rules (every region's config
    // normalises paths alike) leave it as it is, and limits are re-checked.
    let spec = purge
        .spec
        .clone()
        .normalized(rules)
        .map_err(|_| PeerPurgeError::Malformed)?;
    Ok(Purge { spec, ..purge })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::purge::PurgeSpec;

    fn req(path: &str) -> RequestHeader {
        RequestHeader::build("PUT", path.as_bytes(), None).unwrap()
    }

    fn resp(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(201, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn a_write_invalidates_itself_and_same_host_locations() {
        let rules = PathRules::default();
        let urls = invalidated_urls(
            &req("/a?x=1"),
            &resp(&[
                ("location", "/x/../b"),
                ("content-location", "http://Shop.example:8080/c"),
            ]),
            "shop.example",
            rules,
        );
        assert_eq!(
            urls,
            [
                "http://shop.example/a?x=1",
                "http://shop.example/b",
                "http://shop.example/c"
            ]
        );
        let other = invalidated_urls(
            &req("/a"),
            &resp(&[
                ("location", "http://evil.example/a"),
                ("content-location", "//evil/x"),
            ]),
            "shop.example",
            rules,
        );
        assert_eq!(other, ["http://shop.example/a"]);
        let prefix_host = invalidated_urls(
            &req("/a"),
            &resp(&[("location", "http://shop.example.evil/a")]),
            "shop.example",
            rules,
        );
        assert_eq!(prefix_host, ["http://shop.example/a"]);
    }

    #[test]
    fn peers_purges_need_the_signature_and_a_recent_time() {
        let signer = PurgeSigner::new(&[1; 32], None);
        let p = Purge::new(
            "us-east-1",
            1_000_000,
            PurgeSpec::urls(vec!["http://h/a".into()]),
        );
        let body = serde_json::to_vec(&p).unwrap();
        let sig = signer.sign(&body);
        assert_eq!(
            peer_purge(&signer, Some(&sig), &body, 1_000_500, PathRules::default()),
            Ok(p)
        );
        assert_eq!(
            peer_purge(&signer, None, &body, 1_000_500, PathRules::default()),
            Err(PeerPurgeError::Signature)
        );
        assert_eq!(
            peer_purge(
                &signer,
                Some(&sig),
                &body,
                1_000_000_000,
                PathRules::default()
            ),
            Err(PeerPurgeError::Stale)
        );
        let junk = b"{}";
        assert_eq!(
            peer_purge(
                &signer,
                Some(&signer.sign(junk)),
                junk,
                1,
                PathRules::default()
            ),
            Err(PeerPurgeError::Malformed)
        );
    }
}
