//! A load target: a URL resolved once, before the clock starts.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{anyhow, bail, Context};

/// One URL to load.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// `https`?
    pub tls: bool,
    /// Host header value (`host[:port]` as written).
    pub authority: String,
    /// Name for TLS SNI and certificate checks.
    pub server_name: String,
    /// Path and query sent on the request line.
    pub path_and_query: String,
    /// The URI an HTTP/1.1 request carries (origin form), parsed once.
    pub origin_form: http::Uri,
    /// The URI an HTTP/2 request carries (absolute form), parsed once.
    pub absolute_form: http::Uri,
}

impl Target {
    /// Parse and resolve `http://host:port/path?query` or `https://…`.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("`{url}`: only http:// and https:// URLs are supported"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("`{url}` has no host"))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving `{host}`"))?
            .next()
            .ok_or_else(|| anyhow!("`{host}` resolves to no address"))?;
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        Ok(Target {
            origin_form: path_and_query
                .parse()
                .with_context(|| format!("`{url}`: bad path"))?,
            absolute_form: uri.clone(),
            url: url.to_string(),
            addr,
            tls,
            authority: authority.as_str().to_string(),
            server_name: host,
            path_and_query,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        let t = Target::parse("http://127.0.0.1:8080/a?b=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path_and_query, "/a?b=1");
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert!(!t.tls);
        let t = Target::parse("https://localhost/").unwrap();
        assert!(t.tls);
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.server_name, "localhost");
    }

    #[test]
    fn rejects_other_schemes() {
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("not a url").is_err());
    }
}
