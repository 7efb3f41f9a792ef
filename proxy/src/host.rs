//! The Host a request names, validated before any route is matched: an RFC
//! 3986 reg-name or IP literal with an optional numeric port. Anything else
//! (a slash, a userinfo `@`, a port that is not a number, percent-escapes)
//! is refused, so a host can never match one route and mean another.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Why a Host value was refused; the text is safe to show a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty, or only a port.
    #[error("empty Host")]
    Empty,
    /// A character outside RFC 3986 reg-name (unreserved / sub-delims).
    #[error("Host contains a character not allowed in a host name")]
    BadChar,
    /// `[...]` that is not an IPv6 address.
    #[error("Host has a malformed IP literal")]
    BadIpLiteral,
    /// A port that is not 1–5 digits up to 65535.
    #[error("Host has a malformed port")]
    BadPort,
}

/// A validated Host: the name as matched (lower case, no trailing dot, no
/// port; borrowed when it was already in that form) and the port, if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidHost<'a> {
    /// Lower-case host name or bracketed IPv6 literal, without port or trailing dot.
    pub name: Cow<'a, str>,
    /// The numeric port, when one was given.
    pub port: Option<u16>,
}

/// Validate a Host header (or `:authority`) value.
pub fn validate_host(raw: &str) -> Result<ValidHost<'_>, HostError> {
    let (host, port) = if raw.starts_with('[') {
        let end = raw.find(']').ok_or(HostError::BadIpLiteral)?;
        let (literal, rest) = raw.split_at(end + 1);
        literal[1..end]
            .parse::<Ipv6Addr>()
            .map_err(|_| HostError::BadIpLiteral)?;
        let port = match rest {
            "" => None,
            r => Some(r.strip_prefix(':').ok_or(HostError::BadPort)?),
        };
        (literal, port)
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    let port = port.map(parse_port).transpose()?;
    if host.starts_with('[') {
        return Ok(ValidHost {
            name: lower(host),
            port,
        });
    }
    // One trailing dot is the fully-qualified form of the same name.
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if !host.bytes().all(reg_name_byte) {
        return Err(HostError::BadChar);
    }
    Ok(ValidHost {
        name: lower(host),
        port,
    })
}

/// RFC 3986 reg-name without pct-encoded: unreserved and sub-delims.
/// Percent-escapes are refused: no client needs them in a DNS name, and a
/// decoded `/` or `.` is exactly how a host is made to mean two things.
fn reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

fn parse_port(p: &str) -> Result<u16, HostError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort);
    }
    p.parse().map_err(|_| HostError::BadPort)
}

fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> Result<String, HostError> {
        validate_host(raw).map(|h| h.name.into_owned())
    }

    #[test]
    fn plain_names_ports_case_and_trailing_dot() {
        assert_eq!(name("api.example.com").as_deref(), Ok("api.example.com"));
        assert_eq!(name("API.Example.COM.").as_deref(), Ok("api.example.com"));
        let h = validate_host("api.example.com:8443").unwrap();
        assert_eq!((h.name.as_ref(), h.port), ("api.example.com", Some(8443)));
        assert!(matches!(
            validate_host("a.test").unwrap().name,
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn ip_literals() {
        assert_eq!(name("127.0.0.1:80").as_deref(), Ok("127.0.0.1"));
        let h = validate_host("[::1]:8080").unwrap();
        assert_eq!((h.name.as_ref(), h.port), ("[::1]", Some(8080)));
        assert_eq!(name("[::1]").as_deref(), Ok("[::1]"));
        assert_eq!(name("[nope]"), Err(HostError::BadIpLiteral));
        assert_eq!(name("[::1]x"), Err(HostError::BadPort));
        assert_eq!(name("[::1"), Err(HostError::BadIpLiteral));
    }

    #[test]
    fn attacks_are_refused() {
        assert_eq!(name("evil.com/.example.com"), Err(HostError::BadChar));
        assert_eq!(name("api.example.com:junk"), Err(HostError::BadPort));
        assert_eq!(name("api.example.com:99999"), Err(HostError::BadPort));
        assert_eq!(name("api.example.com:"), Err(HostError::BadPort));
        assert_eq!(name("user@api.example.com"), Err(HostError::BadChar));
        assert_eq!(name("a%2eb.example.com"), Err(HostError::BadChar));
        assert_eq!(name("a b"), Err(HostError::BadChar));
        assert_eq!(name("a\\b"), Err(HostError::BadChar));
        assert_eq!(name(""), Err(HostError::Empty));
        assert_eq!(name(":80"), Err(HostError::Empty));
        assert_eq!(name("."), Err(HostError::Empty));
        // Only one trailing dot is the same name; two never match `api.example.com`.
        assert_ne!(name("api.example.com..").as_deref(), Ok("api.example.com"));
    }

    proptest::proptest! {
        #[test]
        fn valid_names_never_contain_separators(raw in "\\PC{0,40}") {
            if let Ok(h) = validate_host(&raw) {
                proptest::prop_assert!(!h.name.contains(['/', '@', '?', '#', '%', ' ', '\\']));
            }
        }
    }
}
