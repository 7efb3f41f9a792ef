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

/// `--resolve HOST:PORT:ADDR`, as curl has: connect to ADDR for HOST:PORT
/// instead of resolving HOST (the URL's name still goes in SNI and Host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolve {
    /// The URL's host, as written (no brackets for IPv6).
    pub host: String,
    /// The URL's port.
    pub port: u16,
    /// Where to connect instead.
    pub addr: std::net::IpAddr,
}

impl std::str::FromStr for Resolve {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Resolve> {
        let bad = || anyhow!("`{s}` is not HOST:PORT:ADDR");
        let (host, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, addr) = rest.split_once(':').ok_or_else(bad)?;
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        Ok(Resolve {
            host: host.to_ascii_lowercase(),
            port: port.parse().map_err(|_| bad())?,
            addr: addr.parse().map_err(|_| bad())?,
        })
    }
}

impl Target {
    /// Parse and resolve `http://host:port/path?query` or `https://…`.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        Target::parse_with(url, &[])
    }

    /// [`Target::parse`], connecting to a `--resolve` address when one names
    /// the URL's host and port.
    pub fn parse_with(url: &str, resolve: &[Resolve]) -> anyhow::Result<Target> {
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
        let pinned = resolve
            .iter()
            .find(|r| r.port == port && r.host.eq_ignore_ascii_case(&host));
        let addr = match pinned {
            Some(r) => SocketAddr::new(r.addr, port),
            None => (host.as_str(), port)
                .to_socket_addrs()
                .with_context(|| format!("resolving `{host}`"))?
                .next()
                .ok_or_else(|| anyhow!("`{host}` resolves to no address"))?,
        };
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

    /// Send `host` as the Host header (HTTP/1.1) or `:authority` (HTTP/2)
    /// instead of the URL's, as `-H 'Host: …'` asks; the connection and SNI
    /// still follow the URL (and `--resolve`).
    pub fn set_host(&mut self, host: &str) -> anyhow::Result<()> {
        let scheme = if self.tls { "https" } else { "http" };
        self.absolute_form = format!("{scheme}://{host}{}", self.path_and_query)
            .parse()
            .with_context(|| format!("`{host}` is not a valid Host"))?;
        self.authority = host.to_string();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_pins_the_address_and_a_host_replaces_the_authority() {
        let pin: Resolve = "example.test:8443:127.0.0.1".parse().unwrap();
        let mut t = Target::parse_with("https://example.test:8443/p?q=1", &[pin]).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(t.server_name, "example.test");
        assert_eq!(t.authority, "example.test:8443");
        t.set_host("api.example.test").unwrap();
        assert_eq!(t.authority, "api.example.test");
        assert_eq!(
            t.absolute_form.to_string(),
            "https://api.example.test/p?q=1"
        );
        assert_eq!(t.server_name, "example.test", "SNI follows the URL");
        let v6: Resolve = "h:80:[::1]".parse().unwrap();
        assert_eq!(v6.addr, "::1".parse::<std::net::IpAddr>().unwrap());
    }

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
        assert!("a:1".parse::<Resolve>().is_err());
        assert!("a:x:127.0.0.1".parse::<Resolve>().is_err());
        assert!(Target::parse("not a url").is_err());
    }
}
