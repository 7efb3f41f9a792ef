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

/// The headers to drop from a message: the fixed hop-by-hop set plus any named
/// in its `Connection` header. A WebSocket-style upgrade keeps `upgrade` and
/// `connection` so that Pingora can pass it through.
pub fn hop_by_hop_to_remove(connection: Option<&str>, has_upgrade: bool) -> Vec<String> {
    let tokens: Vec<String> = connection
        .unwrap_or("")
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let upgrading = has_upgrade && tokens.iter().any(|t| t == "upgrade");
    let mut out: Vec<String> = HOP_BY_HOP
        .iter()
        .filter(|h| !(upgrading && (**h == "upgrade" || **h == "connection")))
        .map(|h| h.to_string())
        .collect();
    for t in tokens {
        let framing = t == "transfer-encoding" || t == "content-length" || t == "host";
        let keep = upgrading && t == "upgrade";
        if !framing && !keep && !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Whether forwarding headers from this client are believed.
pub fn is_trusted(client: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    client.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip)))
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
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed_but_not_framing() {
        let r = hop_by_hop_to_remove(Some("close, X-Secret, Content-Length"), false);
        assert!(r.contains(&"x-secret".to_string()));
        assert!(r.contains(&"keep-alive".to_string()));
        assert!(!r.contains(&"content-length".to_string()));
    }

    #[test]
    fn websocket_upgrade_keeps_upgrade_and_connection() {
        let r = hop_by_hop_to_remove(Some("Upgrade"), true);
        assert!(!r.contains(&"upgrade".to_string()));
        assert!(!r.contains(&"connection".to_string()));
        let r = hop_by_hop_to_remove(None, true);
        assert!(r.contains(&"upgrade".to_string()));
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
    }
}
