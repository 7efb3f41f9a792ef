//! The cache store: Pingora's `Storage` over a `moka` map weighed by bytes.
//!
//! Pingora's own `MemCache` is for tests (unbounded, no eviction) and its
//! purge removes one exact key, so `Vary` variants survive it. This store
//! is bounded by `max_bytes` (moka evicts least recently used entries),
//! keeps an index from URL to every variant stored under it, and applies a
//! purge by key, prefix, tag or all, hard (remove) or soft (mark stale).
//! A fill that started before a purge and finishes after it is dropped.
//!
//! Partial (streaming) reads of an object still being written are not
//! offered (`support_streaming_partial_write` is false): concurrent misses
//! wait on Pingora's cache lock for the finished object instead.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use parking_lot::Mutex;
use pingora::cache::key::{CacheHashKey, CacheKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheMeta, Storage};
use pingora::{Error, ErrorType, Result};

use super::purge::PurgeSpec;
use super::rules::response_tags;
use crate::metrics::Metrics;

/// Bytes counted per entry on top of body, headers, URL and tags (map
/// slots, the index, the Arc): keeps many tiny objects inside `max_bytes` too.
const ENTRY_OVERHEAD: usize = 256;

/// Purges remembered for fills in flight; a fill older than all of them is dropped.
const RECENT_PURGES: usize = 4096;

/// `Vary` variants kept per URL: request headers choose the variant, so a
/// client could otherwise mint one per request. The oldest goes first.
const MAX_VARIANTS: usize = 32;

/// One stored response.
struct Entry {
    /// Distinguishes this entry from a later one under the same key (the
    /// index must not forget a key when an older entry of it is evicted).
    id: u64,
    /// Serialized `CacheMeta` (Pingora's two parts).
    meta: (Vec<u8>, Vec<u8>),
    body: Bytes,
    /// The primary key: `scheme://host/path?query`.
    url: Arc<str>,
    tags: Box<[Box<str>]>,
}

impl Entry {
    fn weight(&self) -> u32 {
        let tags: usize = self.tags.iter().map(|t| t.len() + 16).sum();
        let n = self.meta.0.len()
            + self.meta.1.len()
            + self.body.len()
            + self.url.len()
            + tags
            + ENTRY_OVERHEAD;
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// What a purge did here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeResult {
    /// Objects removed or marked stale.
    pub objects: u64,
}

type UrlIndex = HashMap<Arc<str>, Vec<(HashBinary, u64)>>;

/// The store. One per region; `'static` because Pingora's cache holds it so.
pub struct MemoryStore {
    map: moka::sync::Cache<HashBinary, Arc<Entry>>,
    /// URL => keys (and entry ids) of every variant stored under it.
    by_url: Arc<Mutex<UrlIndex>>,
    next_id: AtomicU64,
    /// Applied purges, newest last, with their sequence numbers.
    recent: Mutex<VecDeque<(u64, Arc<PurgeSpec>)>>,
    purge_seq: AtomicU64,
    max_object_size: usize,
}

impl MemoryStore {
    /// A store of at most `max_bytes`, objects up to `max_object_size`.
    pub fn new(max_bytes: u64, max_object_size: u64, metrics: Arc<Metrics>) -> MemoryStore {
        let by_url: Arc<Mutex<UrlIndex>> = Arc::default();
        let index = by_url.clone();
        let map = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &HashBinary, v: &Arc<Entry>| v.weight())
            // LRU, not TinyLFU: a new object is admitted even into a full
            // cache, as nginx and Varnish do; a one-hit wonder is evicted first.
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<HashBinary>, entry: Arc<Entry>, cause| {
                let label = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Explicit => "purge",
                    RemovalCause::Expired => "expired",
                    // The index already names this key: nothing to undo.
                    RemovalCause::Replaced => return,
                };
                metrics.cache_evictions.with_label_values(&[label]).inc();
                let mut idx = index.lock();
                if let Some(keys) = idx.get_mut(&entry.url) {
                    keys.retain(|(k, id)| !(k == key.as_ref() && *id == entry.id));
                    if keys.is_empty() {
                        idx.remove(&entry.url);
                    }
                }
            })
            .build();
        MemoryStore {
            map,
            by_url,
            next_id: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            purge_seq: AtomicU64::new(0),
            max_object_size: usize::try_from(max_object_size).unwrap_or(usize::MAX),
        }
    }

    /// Objects stored (approximate while moka has work pending).
    pub fn objects(&self) -> u64 {
        self.map.entry_count()
    }

    /// Bytes stored, as weighed.
    pub fn bytes(&self) -> u64 {
        self.map.weighted_size()
    }

    /// Let moka finish evictions and counts (for gauges).
    pub fn settle(&self) {
        self.map.run_pending_tasks();
    }

    /// Remove everything (an outage longer than the purge rows' retention).
    pub fn clear(&self) {
        self.note_purge(PurgeSpec {
            all: true,
            ..PurgeSpec::default()
        });
        self.map.invalidate_all();
        self.by_url.lock().clear();
    }

    /// Apply a purge: remove (or, soft, mark stale) every object it covers.
    pub fn apply(&self, spec: &PurgeSpec) -> PurgeResult {
        // Recorded before the scan: a fill that finishes after this line
        // sees the purge; one that finished before it is found by the scan.
        self.note_purge(spec.clone());
        let mut objects = 0;
        if spec.all && !spec.soft {
            objects = self.map.entry_count();
            self.map.invalidate_all();
            return PurgeResult { objects };
        }
        let mut keys: Vec<HashBinary> = Vec::new();
        if spec.prefixes.is_empty() && spec.tags.is_empty() && !spec.all {
            let idx = self.by_url.lock();
            for k in &spec.keys {
                if let Some(v) = idx.get(k.as_str()) {
                    keys.extend(v.iter().map(|(k, _)| *k));
                }
            }
        } else {
            for (k, e) in self.map.iter() {
                if spec.matches(&e.url, &e.tags) {
                    keys.push(*k);
                }
            }
        }
        for k in keys {
            if spec.soft {
                if self.expire(&k) {
                    objects += 1;
                }
            } else if self.map.remove(&k).is_some() {
                objects += 1;
            }
        }
        PurgeResult { objects }
    }

    /// The purge sequence now: a request notes it when it enters the cache.
    pub fn purge_seq(&self) -> u64 {
        self.purge_seq.load(Ordering::SeqCst)
    }

    fn note_purge(&self, spec: PurgeSpec) {
        let mut recent = self.recent.lock();
        let seq = self.purge_seq.fetch_add(1, Ordering::SeqCst) + 1;
        recent.push_back((seq, Arc::new(spec)));
        while recent.len() > RECENT_PURGES {
            recent.pop_front();
        }
    }

    /// Was an object for `url` with `tags`, whose fill began at `since`,
    /// purged after that? Unknown (too many purges since) counts as yes.
    pub fn purged_since(&self, since: u64, url: &str, tags: &[Box<str>]) -> bool {
        let recent = self.recent.lock();
        if let Some((oldest, _)) = recent.front() {
            if *oldest > since + 1 {
                return true;
            }
        }
        recent
            .iter()
            .filter(|(seq, _)| *seq > since)
            .any(|(_, spec)| spec.matches(url, tags))
    }

    /// Mark one entry stale now (soft purge); false when absent.
    fn expire(&self, key: &HashBinary) -> bool {
        let Some(e) = self.map.get(key) else {
            return false;
        };
        let Ok(mut meta) = CacheMeta::deserialize(&e.meta.0, &e.meta.1) else {
            self.map.invalidate(key);
            return true;
        };
        meta.expire_at(SystemTime::now());
        match meta.serialize() {
            Ok(bin) => {
                self.insert(*key, bin, e.body.clone(), e.url.clone(), e.tags.clone());
            }
            Err(_) => self.map.invalidate(key),
        }
        true
    }

    fn insert(
        &self,
        key: HashBinary,
        meta: (Vec<u8>, Vec<u8>),
        body: Bytes,
        url: Arc<str>,
        tags: Box<[Box<str>]>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            id,
            meta,
            body,
            url: url.clone(),
            tags,
        });
        self.map.insert(key, entry);
        let evict = {
            let mut idx = self.by_url.lock();
            let keys = idx.entry(url).or_default();
            match keys.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => {
                    slot.1 = id;
                    None
                }
                None => {
                    keys.push((key, id));
                    (keys.len() > MAX_VARIANTS).then(|| keys.remove(0).0)
                }
            }
        };
        // Outside the index lock: removal runs the eviction listener, which takes it.
        if let Some(oldest) = evict {
            self.map.remove(&oldest);
        }
    }

    /// Store, unless a purge applied since `since` covers it (it is then
    /// removed again: inserted first, checked second, so a purge applied
    /// in between either found the entry in its scan or is seen here).
    fn insert_checked(
        &self,
        since: u64,
        key: HashBinary,
        meta: (Vec<u8>, Vec<u8>),
        body: Bytes,
        url: Arc<str>,
        tags: Box<[Box<str>]>,
    ) {
        self.insert(key, meta, body, url.clone(), tags.clone());
        if self.purged_since(since, &url, &tags) {
            self.map.remove(&key);
        }
    }
}

/// A hit: the whole body, sliced for ranges.
struct Hit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.body.len() {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start out of range {start} >= {}", self.body.len()),
            );
        }
        self.start = start;
        self.end = end.map_or(self.body.len(), |e| e.min(self.body.len()));
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A fill in progress: the body is buffered and stored whole at the end.
struct Fill {
    store: &'static MemoryStore,
    key: HashBinary,
    url: Arc<str>,
    tags: Box<[Box<str>]>,
    meta: (Vec<u8>, Vec<u8>),
    body: BytesMut,
    /// The purge sequence when the fill began.
    since: u64,
}

#[async_trait]
impl HandleMiss for Fill {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if self.body.len() + data.len() > self.store.max_object_size {
            // Pingora stops filling at max_file_size itself; this guards the store anyway.
            return Error::e_explain(
                ErrorType::InternalError,
                "object larger than max_object_size",
            );
        }
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let fill = *self;
        // Exactly the bytes counted: a grown buffer can hold up to twice its length.
        let body = if fill.body.capacity() > fill.body.len() + fill.body.len() / 8 {
            Bytes::copy_from_slice(&fill.body)
        } else {
            fill.body.freeze()
        };
        let size = body.len();
        fill.store
            .insert_checked(fill.since, fill.key, fill.meta, body, fill.url, fill.tags);
        Ok(MissFinishType::Created(size))
    }
}

/// The URL purges match against: the key's, with `https://` written
/// `http://` (a purge names an object, whichever scheme fetched it).
pub fn url_of(key: &CacheKey) -> Arc<str> {
    let primary = String::from_utf8_lossy(key.primary_key());
    match primary.strip_prefix("https://") {
        Some(rest) => Arc::from(format!("http://{rest}")),
        None => Arc::from(primary.as_ref()),
    }
}

#[async_trait]
impl Storage for MemoryStore {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(e) = self.map.get(&key.combined_bin()) else {
            return Ok(None);
        };
        let meta = CacheMeta::deserialize(&e.meta.0, &e.meta.1)?;
        let hit = Hit {
            body: e.body.clone(),
            start: 0,
            end: e.body.len(),
            done: false,
        };
        Ok(Some((meta, Box::new(hit))))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let tags = response_tags(meta.headers());
        // Sized once from Content-Length when it is known and allowed.
        let expected = meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n <= self.max_object_size)
            .unwrap_or(0);
        Ok(Box::new(Fill {
            store: self,
            key: key.combined_bin(),
            url: url_of(key),
            tags,
            meta: meta.serialize()?,
            body: BytesMut::with_capacity(expected),
            since: self.purge_seq.load(Ordering::SeqCst),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key().combined_bin();
        Ok(match self.map.remove(&key) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let since = self.purge_seq.load(Ordering::SeqCst);
        let k = key.combined_bin();
        let Some(old) = self.map.get(&k) else {
            // Purged while revalidating: nothing to refresh.
            return Ok(false);
        };
        let tags = response_tags(meta.headers());
        self.insert_checked(
            since,
            k,
            meta.serialize()?,
            old.body.clone(),
            old.url.clone(),
            tags,
        );
        Ok(true)
    }

    fn support_streaming_partial_write(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::trace::Span;
    use pingora::http::ResponseHeader;

    fn store() -> &'static MemoryStore {
        let metrics = Arc::new(Metrics::new("test").unwrap());
        Box::leak(Box::new(MemoryStore::new(1 << 20, 64 << 10, metrics)))
    }

    fn meta(headers: &[(&str, &str)]) -> CacheMeta {
        let mut h = ResponseHeader::build(200, None).unwrap();
        for (k, v) in headers {
            h.append_header(k.to_string(), *v).unwrap();
        }
        let now = SystemTime::now();
        CacheMeta::new(now + std::time::Duration::from_secs(60), now, 0, 0, h)
    }

    async fn fill(s: &'static MemoryStore, key: &CacheKey, m: &CacheMeta, body: &str) {
        let span = Span::inactive().handle();
        let mut miss = s.get_miss_handler(key, m, &span).await.unwrap();
        miss.write_body(Bytes::from(body.to_string()), true)
            .await
            .unwrap();
        miss.finish().await.unwrap();
    }

    async fn has(s: &'static MemoryStore, key: &CacheKey) -> bool {
        s.lookup(key, &Span::inactive().handle())
            .await
            .unwrap()
            .is_some()
    }

    fn variant(url: &str, v: u8) -> CacheKey {
        let mut k = CacheKey::new(url, "");
        k.set_variance_key([v; 16]);
        k
    }

    #[tokio::test]
    async fn a_key_purge_removes_every_variant_and_tags_and_prefixes_match() {
        let s = store();
        let (a, gz, b) = (
            CacheKey::new("http://h/a", ""),
            variant("http://h/a", 1),
            CacheKey::new("http://h/p/b", ""),
        );
        fill(s, &a, &meta(&[]), "a").await;
        fill(s, &gz, &meta(&[]), "a-gz").await;
        fill(s, &b, &meta(&[("surrogate-key", "t1 t2")]), "b").await;
        let by_key = PurgeSpec::urls(vec!["http://h/a".into()]);
        assert_eq!(s.apply(&by_key).objects, 2);
        assert!(!has(s, &a).await && !has(s, &gz).await && has(s, &b).await);
        let by_tag = PurgeSpec {
            tags: vec!["t2".into()],
            ..PurgeSpec::default()
        };
        assert_eq!(s.apply(&by_tag).objects, 1);
        assert!(!has(s, &b).await);
        fill(s, &b, &meta(&[]), "b").await;
        let by_prefix = PurgeSpec {
            prefixes: vec!["http://h/p/".into()],
            soft: true,
            ..PurgeSpec::default()
        };
        assert_eq!(s.apply(&by_prefix).objects, 1);
        let (m, _) = s
            .lookup(&b, &Span::inactive().handle())
            .await
            .unwrap()
            .unwrap();
        assert!(!m.is_fresh(SystemTime::now()), "soft purge keeps it, stale");
    }

    #[tokio::test]
    async fn a_fill_that_began_before_a_purge_is_not_kept() {
        let s = store();
        let key = CacheKey::new("http://h/race", "");
        let span = Span::inactive().handle();
        let mut miss = s.get_miss_handler(&key, &meta(&[]), &span).await.unwrap();
        miss.write_body(Bytes::from_static(b"old"), true)
            .await
            .unwrap();
        s.apply(&PurgeSpec::urls(vec!["http://h/race".into()]));
        miss.finish().await.unwrap();
        assert!(!has(s, &key).await, "the purge outranks the fill in flight");
        fill(s, &key, &meta(&[]), "new").await;
        assert!(has(s, &key).await, "a fill after the purge is kept");
    }

    #[tokio::test]
    async fn a_url_keeps_at_most_its_share_of_variants() {
        let s = store();
        for v in 0..(MAX_VARIANTS as u8 + 8) {
            fill(s, &variant("http://h/v", v), &meta(&[]), "v").await;
        }
        assert!(
            !has(s, &variant("http://h/v", 0)).await,
            "the oldest went first"
        );
        assert!(has(s, &variant("http://h/v", MAX_VARIANTS as u8 + 7)).await);
        let n = s.apply(&PurgeSpec::urls(vec!["http://h/v".into()])).objects;
        assert_eq!(n, MAX_VARIANTS as u64);
    }

    #[tokio::test]
    async fn the_store_stays_within_max_bytes() {
        let s = store();
        let body = "x".repeat(32 << 10);
        for i in 0..200 {
            fill(
                s,
                &CacheKey::new(format!("http://h/{i}"), ""),
                &meta(&[]),
                &body,
            )
            .await;
        }
        s.settle();
        assert!(s.bytes() <= 1 << 20, "{} bytes", s.bytes());
        assert!(s.objects() < 200);
        assert!(
            has(s, &CacheKey::new("http://h/199", "")).await,
            "LRU admits the newest"
        );
    }
}
