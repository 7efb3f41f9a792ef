//! Keys derived per purpose from the one configured secret. A hop signature
//! and a consistency token never share a key (HKDF-SHA256 with a label per
//! purpose), so a value signed for one can never verify as the other. Every
//! signed value names the id of its key, and the previous secret is accepted
//! during a rotation (`EDGE_HOP_SECRET_PREVIOUS`).

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// HMAC-SHA256, the MAC of every signed value.
pub type HmacSha256 = Hmac<Sha256>;

/// Fixed HKDF salt: the secret is high-entropy, the salt only separates us from other users of it.
const SALT: &[u8] = b"edge-router key derivation v1";

/// What a derived key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `x-edge-hop` between peer edge-routers.
    Hop,
    /// Consistency tokens given to clients.
    ConsistencyToken,
    /// Purges sent straight to peer edge-routers.
    Purge,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Hop => b"edge-router hop v1",
            Purpose::ConsistencyToken => b"edge-router consistency-token v1",
            Purpose::Purge => b"edge-router purge v1",
        }
    }
}

/// One derived key and its public id.
#[derive(Clone)]
pub struct DerivedKey {
    id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl DerivedKey {
    /// Derive the key for `purpose` from `secret`.
    pub fn derive(purpose: Purpose, secret: &[u8]) -> DerivedKey {
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
        let _ = Hkdf::<Sha256>::new(Some(SALT), secret).expand(purpose.label(), &mut key);
        // The id is a hash of the derived key: it names the key without revealing it.
        let digest = Sha256::digest(key);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        DerivedKey { id, key }
    }

    /// The key id carried by values this key signs (8 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A MAC keyed with this key.
    pub fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }
}

/// The keys of one purpose: the current one signs, both verify.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: DerivedKey,
    previous: Option<DerivedKey>,
}

impl KeyRing {
    /// Keys for `purpose` from the current secret and, during a rotation, the previous one.
    pub fn new(purpose: Purpose, secret: &[u8], previous: Option<&[u8]>) -> KeyRing {
        KeyRing {
            current: DerivedKey::derive(purpose, secret),
            previous: previous.map(|p| DerivedKey::derive(purpose, p)),
        }
    }

    /// The key new values are signed with.
    pub fn current(&self) -> &DerivedKey {
        &self.current
    }

    /// The key a value names, if it is one of ours.
    pub fn find(&self, id: &str) -> Option<&DerivedKey> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| k.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_and_secrets_give_different_keys() {
        let hop = DerivedKey::derive(Purpose::Hop, b"s");
        let tok = DerivedKey::derive(Purpose::ConsistencyToken, b"s");
        let hop2 = DerivedKey::derive(Purpose::Hop, b"t");
        assert_ne!(hop.key, tok.key);
        assert_ne!(hop.id, tok.id);
        assert_ne!(hop.key, hop2.key);
        // Deterministic, so every region derives the same key.
        assert_eq!(hop.key, DerivedKey::derive(Purpose::Hop, b"s").key);
        assert_eq!(hop.id.len(), 8);
    }

    #[test]
    fn a_ring_finds_current_and_previous_only() {
        let ring = KeyRing::new(Purpose::Hop, b"new", Some(b"old"));
        let old = DerivedKey::derive(Purpose::Hop, b"old");
        assert_eq!(
            ring.find(ring.current().id()).map(|k| k.key),
            Some(ring.current().key)
        );
        assert_eq!(ring.find(old.id()).map(|k| k.key), Some(old.key));
        let other = DerivedKey::derive(Purpose::Hop, b"other");
        assert!(ring.find(other.id()).is_none());
        let token_key = DerivedKey::derive(Purpose::ConsistencyToken, b"new");
        assert!(ring.find(token_key.id()).is_none());
    }
}
