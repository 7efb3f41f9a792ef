//! The signed `x-edge-hop` header: proof that a request was forwarded by a
//! peer edge-router, so the receiver serves it locally and never forwards it
//! again. The signature binds the source region, a timestamp, the method, host
//! and path, so a captured header cannot be replayed for another request or
//! long after (clock skew between regions is bounded by NTP; the window absorbs it).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Header name.
pub const HOP_HEADER: &str = "x-edge-hop";

/// Signs and verifies hop headers with a shared secret.
#[derive(Clone)]
pub struct HopSigner {
    key: Vec<u8>,
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
    /// A signer with the shared secret; hops older (or newer) than `window` are rejected.
    pub fn new(secret: &[u8], window: Duration) -> Self {
        HopSigner {
            key: secret.to_vec(),
            window,
        }
    }

    fn mac(&self, region: &str, ts_ms: u64, req: SignedRequest<'_>) -> HmacSha256 {
        // new_from_slice accepts any key length for HMAC, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in [region, &ts_ms.to_string(), req.method, req.host, req.path] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The header value for a request leaving `region` at `now_ms` (Unix ms).
    pub fn sign(&self, region: &str, now_ms: u64, req: SignedRequest<'_>) -> String {
        let sig = self.mac(region, now_ms, req).finalize().into_bytes();
        format!("v1:{region}:{now_ms}:{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// The source region if `value` is a valid, fresh signature for this request.
    pub fn verify<'v>(
        &self,
        value: &'v str,
        now_ms: u64,
        req: SignedRequest<'_>,
    ) -> Option<&'v str> {
        let rest = value.strip_prefix("v1:")?;
        let mut parts = rest.rsplitn(3, ':');
        let sig = parts.next()?;
        let ts: u64 = parts.next()?.parse().ok()?;
        let region = parts.next()?;
        if region.is_empty() || now_ms.abs_diff(ts) > self.window.as_millis() as u64 {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        self.mac(region, ts, req).verify_slice(&sig).ok()?;
        Some(region)
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
        HopSigner::new(b"secret", Duration::from_secs(60))
    }

    #[test]
    fn a_signed_hop_verifies_and_names_its_region() {
        let v = signer().sign("eu-west-1", 1_000_000, REQ);
        assert_eq!(signer().verify(&v, 1_000_500, REQ), Some("eu-west-1"));
    }

    #[test]
    fn another_secret_request_or_stale_time_is_rejected() {
        let v = signer().sign("eu-west-1", 1_000_000, REQ);
        let other = HopSigner::new(b"other", Duration::from_secs(60));
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
            "v1:",
            "v1:a:b:c",
            "v1::1:AAAA",
            "v2:a:1:AAAA",
            "v1:a:1:!!!",
            "v1:a:99999999999999999999:x",
        ] {
            assert_eq!(signer().verify(v, 1, REQ), None, "{v}");
        }
    }
}
