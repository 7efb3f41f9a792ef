//! Consistency tokens: proof that a client wrote in region W at time t, so
//! a later read is served by a replica that has seen that write. The value
//! is `v1.<key id>.<base64url("W:t")>.<base64url(HMAC)>`, signed with the
//! token key (never the hop key, see [`crate::keys`]). Clients send it back
//! in `x-edge-consistency` or the `edge_ct` cookie; a token that does not
//! verify is ignored and counted, never an error.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::Mac;

use crate::keys::{DerivedKey, HmacSha256, KeyRing, Purpose};

/// Request and response header carrying the token.
pub const TOKEN_HEADER: &str = "x-edge-consistency";
/// Cookie carrying the token.
pub const TOKEN_COOKIE: &str = "edge_ct";

/// Longest token value looked at; anything longer is malformed without parsing.
const MAX_TOKEN_LEN: usize = 256;

/// A token that verified: where and when the client wrote (Unix ms, writer's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Region that served the write.
    pub region: String,
    /// When (Unix ms).
    pub written_ms: u64,
}

/// What checking a presented token found; the metric label of `edge_consistency_tokens_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    /// Signed by one of our keys, not expired.
    Valid(VerifiedToken),
    /// Well-formed but the signature (or key id) is not ours.
    Forged,
    /// Signed by us, older than the token lifetime.
    Expired,
    /// Not a token at all (or a time too far in the future).
    Malformed,
}

impl TokenCheck {
    /// Label for `edge_consistency_tokens_total{result}`.
    pub fn label(&self) -> &'static str {
        match self {
            TokenCheck::Valid(_) => "valid",
            TokenCheck::Forged => "forged",
            TokenCheck::Expired => "expired",
            TokenCheck::Malformed => "malformed",
        }
    }
}

/// Issues and checks tokens.
#[derive(Debug, Clone)]
pub struct TokenSigner {
    keys: KeyRing,
    ttl: Duration,
    /// Allowed clock difference for tokens from the future (another region's clock).
    skew: Duration,
}

impl TokenSigner {
    /// Tokens live `ttl`; `previous` is the secret being rotated out.
    pub fn new(secret: &[u8], previous: Option<&[u8]>, ttl: Duration, skew: Duration) -> Self {
        TokenSigner {
            keys: KeyRing::new(Purpose::ConsistencyToken, secret, previous),
            ttl,
            skew,
        }
    }

    /// How long a token is honoured (the cookie's Max-Age).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(key: &DerivedKey, payload: &str) -> HmacSha256 {
        let mut mac = key.mac();
        mac.update(b"v1.");
        mac.update(key.id().as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for a write served in `region` at `written_ms`.
    pub fn issue(&self, region: &str, written_ms: u64) -> String {
        let key = self.keys.current();
        let payload = URL_SAFE_NO_PAD.encode(format!("{region}:{written_ms}"));
        let sig = Self::mac(key, &payload).finalize().into_bytes();
        format!("v1.{}.{payload}.{}", key.id(), URL_SAFE_NO_PAD.encode(sig))
    }

    /// Check a presented token at `now_ms`.
    pub fn check(&self, value: &str, now_ms: u64) -> TokenCheck {
        if value.len() > MAX_TOKEN_LEN {
            return TokenCheck::Malformed;
        }
        let mut parts = value.split('.');
        let (Some("v1"), Some(kid), Some(payload), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return TokenCheck::Malformed;
        };
        let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
            return TokenCheck::Malformed;
        };
        let Some(key) = self.keys.find(kid) else {
            return TokenCheck::Forged;
        };
        if Self::mac(key, payload).verify_slice(&sig).is_err() {
            return TokenCheck::Forged;
        }
        // Signed by us: what follows can only fail for a bug or an old format.
        let Some((region, written_ms)) = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| String::from_utf8(p).ok())
            .and_then(|p| {
                let (r, t) = p.rsplit_once(':')?;
                let t: u64 = t.parse().ok()?;
                (!r.is_empty()).then(|| (r.to_string(), t))
            })
        else {
            return TokenCheck::Malformed;
        };
        if written_ms > now_ms.saturating_add(self.skew.as_millis() as u64) {
            return TokenCheck::Malformed;
        }
        if now_ms.saturating_sub(written_ms) > self.ttl.as_millis() as u64 {
            return TokenCheck::Expired;
        }
        TokenCheck::Valid(VerifiedToken { region, written_ms })
    }
}

/// The `name=value` pairs of a `Cookie` header value, as raw bytes: other
/// cookies may hold bytes that are not ASCII, and they pass through as sent.
fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    header
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// The name of one `name=value` pair.
fn cookie_name(pair: &[u8]) -> &[u8] {
    let end = pair.iter().position(|&b| b == b'=').unwrap_or(pair.len());
    pair[..end].trim_ascii()
}

/// The value of cookie `name` in a `Cookie` header value (`a=1; b=2`), if it is text.
pub fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a str> {
    cookie_pairs(header).find_map(|pair| {
        if cookie_name(pair) != name.as_bytes() {
            return None;
        }
        let value = &pair[pair.iter().position(|&b| b == b'=')? + 1..];
        std::str::from_utf8(value.trim_ascii())
            .ok()
            .map(|v| v.trim_matches('"'))
    })
}

/// True when a `Set-Cookie` value sets cookie `name` (the name as a browser
/// reads it: up to `=`, whitespace trimmed).
pub fn sets_cookie(set_cookie: &[u8], name: &str) -> bool {
    set_cookie.contains(&b'=')
        && cookie_name(set_cookie.split(|&b| b == b';').next().unwrap_or_default())
            == name.as_bytes()
}

/// True when the header value carries cookie `name`.
pub fn has_cookie(header: &[u8], name: &str) -> bool {
    cookie_pairs(header).any(|pair| cookie_name(pair) == name.as_bytes())
}

/// A `Cookie` header value without cookie `name`; `None` when nothing is left.
pub fn without_cookie(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(header.len());
    for pair in cookie_pairs(header).filter(|pair| cookie_name(pair) != name.as_bytes()) {
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(pair);
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const SKEW: Duration = Duration::from_secs(60);

    fn signer() -> TokenSigner {
        TokenSigner::new(b"secret", None, HOUR, SKEW)
    }

    #[test]
    fn an_issued_token_verifies() {
        let t = signer().issue("eu-west-1", 1_700_000_000_000);
        assert_eq!(
            signer().check(&t, 1_700_000_001_000),
            TokenCheck::Valid(VerifiedToken {
                region: "eu-west-1".into(),
                written_ms: 1_700_000_000_000
            })
        );
    }

    #[test]
    fn forged_expired_and_malformed_are_told_apart() {
        let t = signer().issue("eu-west-1", 1_000_000);
        let other = TokenSigner::new(b"other", None, HOUR, SKEW);
        assert_eq!(other.check(&t, 1_000_000), TokenCheck::Forged);
        assert_eq!(
            signer().check(&t, 1_000_000 + HOUR.as_millis() as u64 + 1),
            TokenCheck::Expired
        );
        // A token from further in the future than the skew allows.
        assert_eq!(
            signer().check(&t, 1_000_000 - 61_000),
            TokenCheck::Malformed
        );
        // The payload changed (a client moving its write to another region).
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        parts[2] = URL_SAFE_NO_PAD.encode("us-east-1:1000000");
        assert_eq!(
            signer().check(&parts.join("."), 1_000_000),
            TokenCheck::Forged
        );
        for junk in [
            "",
            "v1",
            "v1...",
            "v2.a.b.c",
            "v1.a.b.!!",
            "v1.a.b.c.d",
            &"x".repeat(300),
        ] {
            let got = signer().check(junk, 1_000_000);
            assert!(
                matches!(got, TokenCheck::Malformed | TokenCheck::Forged),
                "{junk}: {got:?}"
            );
        }
    }

    #[test]
    fn a_hop_signature_never_verifies_as_a_token() {
        // Same secret, other purpose: the key id is not the token key's.
        let hop = crate::hop::HopSigner::new(b"secret", None, HOUR);
        let v = hop.sign(
            "eu-west-1",
            1_000_000,
            crate::hop::SignedRequest {
                method: "GET",
                host: "h",
                path: "/",
            },
        );
        assert!(!matches!(
            signer().check(&v, 1_000_000),
            TokenCheck::Valid(_)
        ));
    }

    #[test]
    fn rotation_accepts_the_previous_secret() {
        let old = TokenSigner::new(b"old", None, HOUR, SKEW);
        let rotating = TokenSigner::new(b"new", Some(b"old"), HOUR, SKEW);
        let t = old.issue("a", 1_000_000);
        assert!(matches!(
            rotating.check(&t, 1_000_000),
            TokenCheck::Valid(_)
        ));
        let after = TokenSigner::new(b"new", None, HOUR, SKEW);
        assert_eq!(after.check(&t, 1_000_000), TokenCheck::Forged);
    }

    #[test]
    fn cookies_are_found_and_removed() {
        let h = b"a=1; edge_ct=v1.x.y.z; b=\"2\"";
        assert_eq!(cookie_value(h, "edge_ct"), Some("v1.x.y.z"));
        assert_eq!(cookie_value(h, "b"), Some("2"));
        assert_eq!(cookie_value(h, "edge"), None);
        assert!(has_cookie(h, "edge_ct") && !has_cookie(h, "edge"));
        assert_eq!(
            without_cookie(h, "edge_ct").as_deref(),
            Some(&b"a=1; b=\"2\""[..])
        );
        assert_eq!(without_cookie(b"edge_ct=1", "edge_ct"), None);
        assert_eq!(
            without_cookie(b"xedge_ct=1;;", "edge_ct").as_deref(),
            Some(&b"xedge_ct=1"[..])
        );
        // Bytes that are not ASCII in another cookie: found, and kept as sent.
        let h = b"n=caf\xc3\xa9\xff; edge_ct=tok";
        assert_eq!(cookie_value(h, "edge_ct"), Some("tok"));
        assert_eq!(
            without_cookie(h, "edge_ct").as_deref(),
            Some(&b"n=caf\xc3\xa9\xff"[..])
        );
        assert!(sets_cookie(b"edge_ct =x; Path=/", "edge_ct"));
        assert!(sets_cookie(b" edge_ct=x", "edge_ct"));
        assert!(
            !sets_cookie(b"edge_ctx=1", "edge_ct") && !sets_cookie(b"a=1; edge_ct=2", "edge_ct")
        );
        // A flag cookie without `=` is a name only.
        assert_eq!(
            without_cookie(b"flag; edge_ct=1", "edge_ct").as_deref(),
            Some(&b"flag"[..])
        );
    }
}
