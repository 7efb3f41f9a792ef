//! How names in backends and peers become addresses. Every address a name
//! resolves to is a backend (Envoy's STRICT_DNS); the reloader resolves the
//! names again every `server.dns_refresh`, and a lookup that fails then
//! keeps the addresses the name had (a DNS outage must not empty an
//! upstream). Addresses written as IP literals are never looked up.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};

use parking_lot::Mutex;

/// Names (`host:port` as written) and the addresses they resolved to.
pub type Answers = BTreeMap<String, Vec<SocketAddr>>;

/// A way to look names up.
pub trait Resolve {
    /// Every address of `authority` (`host:port`), sorted.
    fn lookup(&self, authority: &str) -> Result<Vec<SocketAddr>, String>;
}

/// The system's resolver (`getaddrinfo`: /etc/hosts, then DNS).
pub struct SystemDns;

impl Resolve for SystemDns {
    fn lookup(&self, authority: &str) -> Result<Vec<SocketAddr>, String> {
        let mut addrs: Vec<SocketAddr> = authority
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{authority}`: {e}"))?
            .collect();
        // In order, so that round-robin DNS rotating its answer is not a change.
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(format!("`{authority}` resolves to no address"));
        }
        Ok(addrs)
    }
}

/// Looks names up again, and answers a name whose lookup fails with the
/// addresses it had (noting the failure).
pub struct KeepLastGood<'a> {
    inner: &'a dyn Resolve,
    last: &'a Answers,
    failures: Mutex<Vec<(String, String)>>,
}

impl<'a> KeepLastGood<'a> {
    /// Asks `inner`, and falls back on `last`.
    pub fn new(inner: &'a dyn Resolve, last: &'a Answers) -> KeepLastGood<'a> {
        KeepLastGood {
            inner,
            last,
            failures: Mutex::new(Vec::new()),
        }
    }

    /// Names whose lookup failed, with why (their last answer was used).
    pub fn failures(self) -> Vec<(String, String)> {
        self.failures.into_inner()
    }
}

impl Resolve for KeepLastGood<'_> {
    fn lookup(&self, authority: &str) -> Result<Vec<SocketAddr>, String> {
        match self.inner.lookup(authority) {
            Ok(addrs) => Ok(addrs),
            Err(why) => match self.last.get(authority) {
                Some(addrs) => {
                    self.failures.lock().push((authority.to_string(), why));
                    Ok(addrs.clone())
                }
                None => Err(why),
            },
        }
    }
}

/// Resolves for one parse and remembers each name's answer.
pub(super) struct Recorder<'a> {
    inner: &'a dyn Resolve,
    answers: RefCell<Answers>,
}

impl<'a> Recorder<'a> {
    pub(super) fn new(inner: &'a dyn Resolve) -> Recorder<'a> {
        Recorder {
            inner,
            answers: RefCell::new(Answers::new()),
        }
    }

    /// The addresses of `host:port`: an IP literal as it is, a name as the
    /// resolver answers it.
    pub(super) fn resolve(&self, authority: &str) -> Result<Vec<SocketAddr>, String> {
        super::port_error(authority)?;
        if let Ok(a) = authority.parse::<SocketAddr>() {
            return Ok(vec![a]);
        }
        let addrs = self.inner.lookup(authority)?;
        self.answers
            .borrow_mut()
            .insert(authority.to_string(), addrs.clone());
        Ok(addrs)
    }

    pub(super) fn answers(self) -> Answers {
        self.answers.into_inner()
    }
}

/// Drop repeated addresses, keeping the first of each.
pub(super) fn dedup_keeping_order(addrs: &mut Vec<SocketAddr>) {
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scripted(Result<Vec<SocketAddr>, String>);

    impl Resolve for Scripted {
        fn lookup(&self, _: &str) -> Result<Vec<SocketAddr>, String> {
            self.0.clone()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn literals_are_not_looked_up_and_names_are_remembered() {
        let dns = Scripted(Ok(vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")]));
        let r = Recorder::new(&dns);
        assert_eq!(r.resolve("127.0.0.1:9").unwrap(), vec![addr("127.0.0.1:9")]);
        assert_eq!(r.resolve("api.internal:80").unwrap().len(), 2);
        assert!(r.resolve("api.internal").is_err(), "no port");
        let answers = r.answers();
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers["api.internal:80"].len(), 2);
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_answer_and_says_so() {
        let mut last = Answers::new();
        last.insert("gone.invalid:80".into(), vec![addr("10.0.0.1:80")]);
        let down = Scripted(Err("no answer".into()));
        let dns = KeepLastGood::new(&down, &last);
        assert_eq!(
            dns.lookup("gone.invalid:80").unwrap(),
            vec![addr("10.0.0.1:80")]
        );
        assert!(dns.lookup("other.invalid:80").is_err(), "nothing to keep");
        let failures = dns.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, "gone.invalid:80");
    }

    #[test]
    fn repeated_addresses_count_once() {
        let mut v = vec![addr("10.0.0.2:1"), addr("10.0.0.1:1"), addr("10.0.0.2:1")];
        dedup_keeping_order(&mut v);
        assert_eq!(v, vec![addr("10.0.0.2:1"), addr("10.0.0.1:1")]);
    }
}
