//! Signatures of purges sent straight to peers: an HMAC of the body with a
//! key of its own purpose, so a hop or token signature never verifies as a
//! purge. The body carries the purge's time; old ones are refused.

use hmac::Mac;

use crate::keys::{KeyRing, Purpose};

/// A direct purge older (or newer) than this is refused; applied ids are
/// kept at least this long (consumer.rs), so a replay inside it is a repeat.
const MAX_SKEW_MS: u64 = 60 * 1000;

/// Signs and verifies `x-edge-purge`: `v1.<key id>.<hex hmac(body)>`.
#[derive(Debug)]
pub struct PurgeSigner {
    keys: KeyRing,
}

impl PurgeSigner {
    /// From the hop secret (and the previous one during a rotation).
    pub fn new(secret: &[u8], previous: Option<&[u8]>) -> PurgeSigner {
        PurgeSigner {
            keys: KeyRing::new(Purpose::Purge, secret, previous),
        }
    }

    /// The header value for `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        let key = self.keys.current();
        let mut mac = key.mac();
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        let mut out = format!("v1.{}.", key.id());
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Does `signature` sign `body`?
    pub fn verify(&self, signature: &str, body: &[u8]) -> bool {
        let mut parts = signature.splitn(3, '.');
        let (Some("v1"), Some(id), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let Some(key) = self.keys.find(id) else {
            return false;
        };
        let Some(tag) = decode_hex(hex) else {
            return false;
        };
        let mut mac = key.mac();
        mac.update(body);
        mac.verify_slice(&tag).is_ok()
    }

    /// Is a purge accepted at `time_ms` recent enough to be taken at `now_ms`?
    pub fn fresh(time_ms: u64, now_ms: u64) -> bool {
        time_ms.abs_diff(now_ms) <= MAX_SKEW_MS
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_their_body_and_key() {
        let a = PurgeSigner::new(&[7; 32], None);
        let sig = a.sign(b"{\"id\":\"1\"}");
        assert!(a.verify(&sig, b"{\"id\":\"1\"}"));
        assert!(!a.verify(&sig, b"{\"id\":\"2\"}"));
        assert!(!PurgeSigner::new(&[8; 32], None).verify(&sig, b"{\"id\":\"1\"}"));
        let rotated = PurgeSigner::new(&[8; 32], Some(&[7; 32]));
        assert!(rotated.verify(&sig, b"{\"id\":\"1\"}"));
        for bad in ["", "v1", "v1.x.zz", "v2.abc.00"] {
            assert!(!a.verify(bad, b"x"), "{bad}");
        }
        assert!(PurgeSigner::fresh(1_000_000, 1_030_000));
        assert!(!PurgeSigner::fresh(1_000_000, 1_100_000));
        assert!(!PurgeSigner::fresh(0, 1_000_000_000));
    }
}
