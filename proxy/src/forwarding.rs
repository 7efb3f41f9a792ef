//! Header rules for a request leaving the proxy and a response coming back:
//! hop-by-hop headers (RFC 9110 §7.6.1), `x-forwarded-*`, and our own
//! `x-edge-*` namespace, which clients may not set.

use std::net::IpAddr;

use ipnet::IpNet;

/// Hop-by-hop headers never forwarded. `transfer-encoding` is left to Pingora,
/// which owns message framing.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The hop-by-hop headers present in a message: the fixed set plus any named
/// in its `Connection` header (never the framing headers, which Pingora
/// owns). A WebSocket-style upgrade (`upgrade_allowed` and `Connection:
/// upgrade` with an `Upgrade` header) keeps `upgrade` and `connection`.
/// One pass over the names present, no hashing per candidate: usually there
/// is nothing to remove and nothing is allocated.
pub fn hop_by_hop_present(
    headers: &http::HeaderMap,
    upgrade_allowed: bool,
) -> Vec<http::HeaderName> {
    let connection = headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok());
    let listed = |name: &str| {
        connection.is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case(name)))
    };
    let upgrading =
        upgrade_allowed && listed("upgrade") && headers.contains_key(http::header::UPGRADE);
    headers
        .keys()
        .filter(|k| {
            let n = k.as_str();
            let framing = matches!(n, "transfer-encoding" | "content-length" | "host");
            let hop = HOP_BY_HOP.contains(&n) || (!framing && listed(n));
            hop && !(upgrading && (n == "upgrade" || n == "connection"))
        })
        .cloned()
        .collect()
}

/// Whether forwarding headers from this client are believed. `client` is
/// canonical: an IPv4 client on a `[::]` listener is compared as IPv4.
pub fn is_trusted(client: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    client.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip)))
}

/// A peer address as the rules see it: `::ffff:a.b.c.d` is `a.b.c.d`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Every line of a header folded into one comma-separated value, as RFC
/// 9110 5.3 says a list header means (a trusted proxy may add a line).
pub fn joined(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let Ok(v) = v.to_str() else { continue };
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        match out.as_mut() {
            Some(o) => {
                o.push_str(", ");
                o.push_str(v);
            }
            None => out = Some(v.to_string()),
        }
    }
    out
}

/// This hop's RFC 7239 `Forwarded` element.
pub fn forwarded_element(client: Option<IpAddr>, host: &str, proto: &str) -> String {
    let node = match client {
        Some(IpAddr::V4(ip)) => ip.to_string(),
        Some(IpAddr::V6(ip)) => format!("\"[{ip}]\""),
        None => "unknown".to_string(),
    };
    format!("for={node};host=\"{host}\";proto={proto}")
}

/// This proxy's `Via` pseudonym (RFC 9110 7.6.3): one per region, so a
/// request that comes back to a region it already passed is recognised.
pub fn via_pseudonym(region: &str) -> String {
    format!("edge-router.{region}")
}

/// Whether any `Via` entry was received by `pseudonym`.
pub fn via_contains(headers: &http::HeaderMap, pseudonym: &str) -> bool {
    headers
        .get_all(http::header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|entry| {
            // `protocol received-by [comment]`
            entry
                .split_ascii_whitespace()
                .nth(1)
                .is_some_and(|by| by.eq_ignore_ascii_case(pseudonym))
        })
}

/// The `x-forwarded-for` value to send upstream.
pub fn forwarded_for(
    existing: Option<&str>,
    client: Option<IpAddr>,
    trusted: bool,
) -> Option<String> {
    let client = client.map(|ip| ip.to_string());
    match (trusted, existing.filter(|e| !e.trim().is_empty()), client) {
        (true, Some(prev), Some(ip)) => Some(format!("{prev}, {ip}")),
        (true, Some(prev), None) => Some(prev.to_string()),
        (_, _, Some(ip)) => Some(ip),
        (false, _, None) | (true, None, None) => None,
    }
}

/// An `x-request-id` from a client is kept only if it is short and printable.
pub fn acceptable_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A fresh request id: 128 random bits as a UUID-shaped hex string.
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v: u128 = rand::random();
    let mut out = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(HEX[((v >> (124 - 4 * i)) & 0xf) as usize] as char);
    }
    out
}

/// Append `name;dur=MS` with three decimals, from microseconds, without float formatting.
pub fn push_timing(out: &mut String, name: &str, micros: u128) {
    use std::fmt::Write as _;
    if !out.is_empty() {
        out.push_str(", ");
    }
    let _ = write!(out, "{name};dur={}.{:03}", micros / 1000, micros % 1000);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    fn names(h: &http::HeaderMap, upgrade_allowed: bool) -> Vec<String> {
        let mut v: Vec<String> = hop_by_hop_present(h, upgrade_allowed)
            .iter()
            .map(|n| n.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn connection_named_headers_are_removed_but_not_framing() {
        let h = headers(&[
            ("connection", "close, X-Secret, Content-Length"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("content-length", "3"),
            ("accept", "*/*"),
        ]);
        assert_eq!(names(&h, true), ["connection", "keep-alive", "x-secret"]);
    }

    #[test]
    fn nothing_to_remove_is_the_common_case() {
        let h = headers(&[("host", "a"), ("accept", "*/*"), ("user-agent", "t")]);
        assert!(names(&h, true).is_empty());
    }

    #[test]
    fn websocket_upgrade_keeps_upgrade_and_connection() {
        let h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(names(&h, true).is_empty());
        // Not allowed (e.g. a non-101 response): both go.
        assert_eq!(names(&h, false), ["connection", "upgrade"]);
        // Upgrade without Connection: upgrade is not an upgrade.
        let h = headers(&[("upgrade", "websocket")]);
        assert_eq!(names(&h, true), ["upgrade"]);
    }

    #[test]
    fn untrusted_clients_cannot_spoof_forwarded_for() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            forwarded_for(Some("6.6.6.6"), Some(ip), false).as_deref(),
            Some("192.0.2.7")
        );
        assert_eq!(
            forwarded_for(Some("6.6.6.6"), Some(ip), true).as_deref(),
            Some("6.6.6.6, 192.0.2.7")
        );
    }

    #[test]
    fn server_timing_is_milliseconds_with_three_decimals() {
        let mut s = String::new();
        push_timing(&mut s, "edge", 1_234);
        push_timing(&mut s, "upstream", 56);
        assert_eq!(s, "edge;dur=1.234, upstream;dur=0.056");
    }

    #[test]
    fn every_forwarded_for_line_is_read() {
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.1, 10.0.0.2".parse().unwrap());
        assert_eq!(
            joined(&h, "x-forwarded-for").as_deref(),
            Some("6.6.6.6, 10.0.0.1, 10.0.0.2")
        );
        assert_eq!(joined(&h, "forwarded"), None);
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let nets = vec!["10.0.0.0/8".parse().unwrap()];
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(!is_trusted(Some(mapped), &nets));
        assert!(is_trusted(Some(canonical_ip(mapped)), &nets));
    }

    #[test]
    fn forwarded_elements_quote_v6_and_host() {
        assert_eq!(
            forwarded_element(Some("192.0.2.1".parse().unwrap()), "a.test:8080", "http"),
            "for=192.0.2.1;host=\"a.test:8080\";proto=http"
        );
        assert_eq!(
            forwarded_element(Some("2001:db8::1".parse().unwrap()), "a", "https"),
            "for=\"[2001:db8::1]\";host=\"a\";proto=https"
        );
    }

    #[test]
    fn via_loops_are_found_in_any_line_or_entry() {
        let me = via_pseudonym("us-east-1");
        let mut h = http::HeaderMap::new();
        h.append("via", "1.1 cdn.example (x)".parse().unwrap());
        assert!(!via_contains(&h, &me));
        h.append(
            "via",
            "1.0 fred, 1.1 EDGE-ROUTER.us-east-1".parse().unwrap(),
        );
        assert!(via_contains(&h, &me));
        assert!(!via_contains(&h, &via_pseudonym("us-east")));
    }

    #[test]
    fn trust_is_by_network() {
        let nets = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted(Some("10.1.2.3".parse().unwrap()), &nets));
        assert!(!is_trusted(Some("11.1.2.3".parse().unwrap()), &nets));
        assert!(!is_trusted(None, &nets));
    }

    #[test]
    fn request_ids_are_checked_and_generated_unique() {
        assert!(acceptable_request_id("abc-123"));
        assert!(!acceptable_request_id("has space"));
        assert!(!acceptable_request_id(&"x".repeat(200)));
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
