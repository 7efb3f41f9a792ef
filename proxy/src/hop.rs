//! The signed `x-edge-hop` header: proof that a request was forwarded by a
//! peer edge-router, so the receiver serves it locally and never forwards it
//! again. The signature binds the source region, a timestamp, the method, host
//! and path, so a captured header cannot be replayed for another request or
//! long after (clock skew between regions is bounded by NTP; the window absorbs it).
//!
//! The key is the hop key derived from the shared secret (see [`crate::keys`]);
//! the value names its key id, so a region mid-rotation verifies hops signed
//! with the previous secret too.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::Mac;

use crate::keys::{DerivedKey, HmacSha256, KeyRing, Purpose};

/// Header name.
pub const HOP_HEADER: &str = "x-edge-hop";

/// Signs and verifies hop headers with the hop key.
#[derive(Clone)]
pub struct HopSigner {
    keys: KeyRing,
    /// The raw secrets, only to verify `v1` hops from peers still on the
    /// release before per-purpose keys, during a rolling upgrade. Never used
    /// to sign; goes away with `v1` in the next release.
    legacy: Vec<Vec<u8>>,
    /// Sign `v1` hops (peers not upgraded yet can verify only those).
    sign_legacy: bool,
    window: Duration,
}

impl std::fmt::Debug for HopSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopSigner")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// The parts of a request the signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// Method.
    pub method: &'a str,
    /// Host header value.
    pub host: &'a str,
    /// Path and query.
    pub path: &'a str,
}

impl HopSigner {
    /// A signer with the shared secret (and the previous one during a
    /// rotation); hops older (or newer) than `window` are rejected.
    pub fn new(secret: &[u8], previous: Option<&[u8]>, window: Duration) -> Self {
        HopSigner {
            keys: KeyRing::new(Purpose::Hop, secret, previous),
            legacy: std::iter::once(secret)
                .chain(previous)
                .map(<[u8]>::to_vec)
                .collect(),
            sign_legacy: false,
            window,
        }
    }

    /// Sign in the `v1` format (raw secret) while peers still run the
    /// previous release (`server.hop_format = "v1"`); verify accepts both.
    pub fn signing_legacy(mut self, legacy: bool) -> Self {
        self.sign_legacy = legacy;
        self
    }

    fn mac(key: &DerivedKey, region: &str, ts_ms: u64, req: SignedRequest<'_>) -> HmacSha256 {
        Self::fill(key.mac(), region, ts_ms, req)
    }

    fn fill(mut mac: HmacSha256, region: &str, ts_ms: u64, req: SignedRequest<'_>) -> HmacSha256 {
        for part in [region, &ts_ms.to_string(), req.method, req.host, req.path] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The header value for a request leaving `region` at `now_ms` (Unix ms).
    pub fn sign(&self, region: &str, now_ms: u64, req: SignedRequest<'_>) -> String {
        if self.sign_legacy {
            // The first legacy secret is the current one.
            let secret = self.legacy.first().map(Vec::as_slice).unwrap_or_default();
            let mac =
                <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
            let sig = Self::fill(mac, region, now_ms, req).finalize().into_bytes();
            return format!("v1:{region}:{now_ms}:{}", URL_SAFE_NO_PAD.encode(sig));
        }
        let key = self.keys.current();
        let sig = Self::mac(key, region, now_ms, req).finalize().into_bytes();
        format!(
            "v2:{}:{region}:{now_ms}:{}",
            key.id(),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// The source region if `value` is a valid, fresh signature for this request.
    pub fn verify<'v>(
        &self,
        value: &'v str,
        now_ms: u64,
        req: SignedRequest<'_>,
    ) -> Option<&'v str> {
        if let Some(rest) = value.strip_prefix("v1:") {
            return self.verify_legacy(rest, now_ms, req);
        }
        let (kid, rest) = value.strip_prefix("v2:")?.split_once(':')?;
        let key = self.keys.find(kid)?;
        let (region, ts, sig) = self.fields(rest, now_ms)?;
        Self::mac(key, region, ts, req).verify_slice(&sig).ok()?;
        Some(region)
    }

    /// `region:ts:sig` of a fresh hop.
    fn fields<'v>(&self, rest: &'v str, now_ms: u64) -> Option<(&'v str, u64, Vec<u8>)> {
        let mut parts = rest.rsplitn(3, ':');
        let sig = parts.next()?;
        let ts: u64 = parts.next()?.parse().ok()?;
        let region = parts.next()?;
        if region.is_empty() || now_ms.abs_diff(ts) > self.window.as_millis() as u64 {
            return None;
        }
        Some((region, ts, URL_SAFE_NO_PAD.decode(sig).ok()?))
    }

    /// A `v1` hop (HMAC keyed with the raw secret) from a peer that is not
    /// upgraded yet: accepted so a rolling upgrade does not turn its
    /// forwarded requests into client requests.
    fn verify_legacy<'v>(
        &self,
        rest: &'v str,
        now_ms: u64,
        req: SignedRequest<'_>,
    ) -> Option<&'v str> {
        let (region, ts, sig) = self.fields(rest, now_ms)?;
        self.legacy.iter().find_map(|secret| {
            let mac = <HmacSha256 as Mac>::new_from_slice(secret).ok()?;
            Self::fill(mac, region, ts, req).verify_slice(&sig).ok()?;
            Some(region)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: SignedRequest<'static> = SignedRequest {
        method: "GET",
        host: "api.example.com",
        path: "/x?y=1",
    };

    fn signer() -> HopSigner {
        HopSigner::new(b"secret", None, Duration::from_secs(60))
    }

    #[test]
    fn a_signed_hop_verifies_and_names_its_region() {
        let v = signer().sign("eu-west-1", 1_000_000, REQ);
        assert_eq!(signer().verify(&v, 1_000_500, REQ), Some("eu-west-1"));
    }

    #[test]
    fn another_secret_request_or_stale_time_is_rejected() {
        let v = signer().sign("eu-west-1", 1_000_000, REQ);
        let other = HopSigner::new(b"other", None, Duration::from_secs(60));
        assert_eq!(other.verify(&v, 1_000_000, REQ), None);
        let moved = SignedRequest {
            path: "/admin",
            ..REQ
        };
        assert_eq!(signer().verify(&v, 1_000_000, moved), None);
        assert_eq!(signer().verify(&v, 1_000_000 + 61_000, REQ), None);
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        for v in [
            "",
            "v2:",
            "v2:a:b:c",
            "v2::1:AAAA",
            "v1:a:1:AAAA",
            "v3:a:b:1:AAAA",
            "v2:a:1:!!!",
            "v2:a:99999999999999999999:x",
        ] {
            assert_eq!(signer().verify(v, 1, REQ), None, "{v}");
        }
        // A well-formed value with our key id but a broken body.
        let kid = signer().keys.current().id().to_string();
        for body in ["", ":", "a:1", "::", "a:x:AAAA", ":1:AAAA", "a:1:!!!"] {
            let v = format!("v2:{kid}:{body}");
            assert_eq!(signer().verify(&v, 1, REQ), None, "{v}");
        }
    }

    /// What the release before per-purpose keys sent.
    fn legacy_sign(secret: &[u8], region: &str, ts: u64, req: SignedRequest<'_>) -> String {
        let mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("any key length");
        let sig = HopSigner::fill(mac, region, ts, req)
            .finalize()
            .into_bytes();
        format!("v1:{region}:{ts}:{}", URL_SAFE_NO_PAD.encode(sig))
    }

    #[test]
    fn hops_from_a_peer_on_the_previous_release_verify_during_an_upgrade() {
        let v = legacy_sign(b"secret", "eu-west-1", 1_000_000, REQ);
        assert_eq!(signer().verify(&v, 1_000_000, REQ), Some("eu-west-1"));
        let other = legacy_sign(b"other", "eu-west-1", 1_000_000, REQ);
        assert_eq!(signer().verify(&other, 1_000_000, REQ), None);
        assert_eq!(signer().verify(&v, 1_000_000 + 61_000, REQ), None);
        // Signed that way only when asked (peers not upgraded yet).
        assert!(signer()
            .sign("eu-west-1", 1_000_000, REQ)
            .starts_with("v2:"));
        let upgrading = signer().signing_legacy(true);
        assert_eq!(upgrading.sign("eu-west-1", 1_000_000, REQ), v);
        assert_eq!(signer().verify(&v, 1_000_000, REQ), Some("eu-west-1"));
    }

    #[test]
    fn a_rotation_accepts_both_secrets_and_signs_with_the_new_one() {
        let old = HopSigner::new(b"old", None, Duration::from_secs(60));
        let rotating = HopSigner::new(b"new", Some(b"old"), Duration::from_secs(60));
        let new_only = HopSigner::new(b"new", None, Duration::from_secs(60));
        let from_old = old.sign("eu-west-1", 1_000_000, REQ);
        assert_eq!(
            rotating.verify(&from_old, 1_000_000, REQ),
            Some("eu-west-1")
        );
        let from_rotating = rotating.sign("eu-west-1", 1_000_000, REQ);
        assert_eq!(
            new_only.verify(&from_rotating, 1_000_000, REQ),
            Some("eu-west-1")
        );
        assert_eq!(old.verify(&from_rotating, 1_000_000, REQ), None);
        // After the rotation the old secret is refused.
        assert_eq!(new_only.verify(&from_old, 1_000_000, REQ), None);
    }
}
