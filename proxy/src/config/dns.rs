//! How names in backends and peers become addresses. Every address a name
//! resolves to is a backend (Envoy's STRICT_DNS); the reloader resolves the
//! names again every `server.dns_refresh`, and a lookup that fails then
//! keeps the addresses the name had (a DNS outage must not empty an
//! upstream). Addresses written as IP literals are never looked up.
//!
//! Whoever controls a zone controls these answers, every refresh, with no
//! operator watching; so an answer is refused (at start: a config error;
//! later: treated as a failed lookup) when it has more than
//! [`MAX_ADDRESSES`] or an unspecified or multicast address, or when it
//! newly (unlike the name's previous answer) holds one of this proxy's own
//! listeners or a loopback or link-local address (the cloud metadata
//! service is link-local).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};

use parking_lot::Mutex;

/// Names (`host:port` as written) and the addresses they resolved to.
pub type Answers = BTreeMap<String, Vec<SocketAddr>>;

/// The most addresses one name may bring (each is a probed backend).
pub const MAX_ADDRESSES: usize = 64;

/// Why `addrs`, the answer for `authority`, must not be used. `last` is the
/// name's previous answer (None at start), `own` this proxy's listeners.
pub fn refused(
    authority: &str,
    addrs: &[SocketAddr],
    last: Option<&[SocketAddr]>,
    own: &[SocketAddr],
) -> Option<String> {
    refused_as(authority, addrs, last, own, false)
}

/// [`refused`]; `backend`: the name is a backend's, which may never be one
/// of our own listeners (a request loop), even as the file wrote it.
fn refused_as(
    authority: &str,
    addrs: &[SocketAddr],
    last: Option<&[SocketAddr]>,
    own: &[SocketAddr],
    backend: bool,
) -> Option<String> {
    // `::ffff:127.0.0.1` is 127.0.0.1.
    let addrs: Vec<SocketAddr> = addrs
        .iter()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .collect();
    let addrs = addrs.as_slice();
    if addrs.len() > MAX_ADDRESSES {
        return Some(format!(
            "`{authority}` resolves to {} addresses, more than {MAX_ADDRESSES}",
            addrs.len()
        ));
    }
    if let Some(a) = addrs
        .iter()
        .find(|a| a.ip().is_unspecified() || a.ip().is_multicast())
    {
        return Some(format!(
            "`{authority}` resolves to {a}, which is not a backend's address"
        ));
    }
    let ours = |a: &SocketAddr| {
        own.iter().any(|l| {
            l == a || (l.port() == a.port() && l.ip().is_unspecified() && a.ip().is_loopback())
        })
    };
    // What the file's names answered at start is the operator's choice (a
    // region's own peer URL is its own listener); a later answer that
    // turns inward is not.
    if backend && last.is_none() {
        if let Some(a) = addrs.iter().find(|a| ours(a)) {
            return Some(format!(
                "`{authority}` resolves to {a}, one of this proxy's own listeners: requests would loop"
            ));
        }
    }
    if let Some(last) = last.filter(|l| !l.iter().any(ours)) {
        if let Some(a) = addrs.iter().find(|a| ours(a)) {
            return Some(format!(
                "`{authority}` now resolves to {a}, one of this proxy's own listeners, which its earlier answer {last:?} did not"
            ));
        }
    }
    let inward = |a: &SocketAddr| a.ip().is_loopback() || is_link_local(a);
    if let Some(last) = last.filter(|l| !l.iter().any(inward)) {
        if let Some(a) = addrs.iter().find(|a| inward(a)) {
            return Some(format!(
                "`{authority}` now resolves to {a} (loopback or link-local), which its earlier answer {last:?} did not"
            ));
        }
    }
    None
}

fn is_link_local(a: &SocketAddr) -> bool {
    match a.ip() {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Whether two answers hold the same addresses (DNS may rotate their order).
pub fn same(a: &Answers, b: &Answers) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same_addresses(va, vb))
}

/// Whether two answers for one name hold the same addresses, in any order.
pub fn same_addresses(a: &[SocketAddr], b: &[SocketAddr]) -> bool {
    let sorted = |v: &[SocketAddr]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    sorted(a) == sorted(b)
}

/// A way to look names up.
pub trait Resolve {
    /// Every address of `authority` (`host:port`), in the resolver's order.
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
        dedup_keeping_order(&mut addrs);
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
    own: &'a [SocketAddr],
    failures: Mutex<Vec<(String, String)>>,
}

impl<'a> KeepLastGood<'a> {
    /// Asks `inner`, and falls back on `last`; `own` are this proxy's listeners.
    pub fn new(
        inner: &'a dyn Resolve,
        last: &'a Answers,
        own: &'a [SocketAddr],
    ) -> KeepLastGood<'a> {
        KeepLastGood {
            inner,
            last,
            own,
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
        let last = self.last.get(authority);
        let answer = self.inner.lookup(authority).and_then(|addrs| {
            match refused(authority, &addrs, last.map(Vec::as_slice), self.own) {
                Some(why) => Err(format!("answer refused: {why}")),
                None => Ok(addrs),
            }
        });
        match answer {
            Ok(addrs) => Ok(addrs),
            Err(why) => match last {
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
    own: RefCell<Vec<SocketAddr>>,
}

impl<'a> Recorder<'a> {
    pub(super) fn new(inner: &'a dyn Resolve) -> Recorder<'a> {
        Recorder {
            inner,
            answers: RefCell::new(Answers::new()),
            own: RefCell::new(Vec::new()),
        }
    }

    /// This proxy's listeners, which no name may resolve to.
    pub(super) fn set_own(&self, own: Vec<SocketAddr>) {
        *self.own.borrow_mut() = own;
    }

    /// The addresses of `host:port`: an IP literal as it is, a name as the
    /// resolver answers it.
    pub(super) fn resolve(&self, authority: &str) -> Result<Vec<SocketAddr>, String> {
        self.resolve_as(authority, false)
    }

    /// [`Recorder::resolve`] for a backend (never one of our own listeners).
    pub(super) fn resolve_backend(&self, authority: &str) -> Result<Vec<SocketAddr>, String> {
        self.resolve_as(authority, true)
    }

    fn resolve_as(&self, authority: &str, backend: bool) -> Result<Vec<SocketAddr>, String> {
        super::port_error(authority)?;
        if let Ok(a) = authority.parse::<SocketAddr>() {
            return Ok(vec![a]);
        }
        let addrs = self.inner.lookup(authority)?;
        if let Some(why) = refused_as(authority, &addrs, None, &self.own.borrow(), backend) {
            return Err(why);
        }
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
        let dns = KeepLastGood::new(&down, &last, &[]);
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
    fn answers_that_point_inward_or_flood_are_refused() {
        let own = [addr("0.0.0.0:8080"), addr("127.0.0.1:9901")];
        let ok = |v: &[&str], last: Option<&[SocketAddr]>| {
            let v: Vec<SocketAddr> = v.iter().map(|s| addr(s)).collect();
            refused("n:80", &v, last, &own)
        };
        assert_eq!(ok(&["10.0.0.1:80"], None), None);
        assert!(ok(&["0.0.0.0:80"], None).is_some());
        assert!(ok(&["[::ffff:0.0.0.0]:80"], None).is_some(), "mapped");
        let was = [addr("10.0.0.1:80")];
        assert!(
            ok(&["[::ffff:169.254.169.254]:80"], Some(&was)).is_some(),
            "mapped"
        );
        assert!(
            refused_as("n:80", &[addr("127.0.0.1:9901")], None, &own, true).is_some(),
            "a backend loop"
        );
        assert!(ok(&["224.0.0.1:80"], None).is_some());
        // At start, the file's own choice (a region's peer URL is its own listener).
        assert_eq!(ok(&["127.0.0.1:9901"], None), None);
        let was_loopback = [addr("127.0.0.5:80")];
        assert!(
            ok(&["127.0.0.1:9901"], Some(&was_loopback)).is_some(),
            "newly the admin listener"
        );
        assert!(
            ok(&["127.0.0.1:8080"], Some(&was_loopback)).is_some(),
            "newly a wildcard listener's port"
        );
        // Loopback at start is the operator's choice; turning inward later is not.
        assert_eq!(ok(&["127.0.0.5:80"], None), None);
        let was = [addr("10.0.0.1:80")];
        assert!(ok(&["127.0.0.5:80"], Some(&was)).is_some());
        assert!(ok(&["169.254.169.254:80"], Some(&was)).is_some());
        let many: Vec<String> = (0..=MAX_ADDRESSES)
            .map(|i| format!("10.0.{}.{}:80", i / 250, i % 250))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(ok(&many, None).is_some());
    }

    #[test]
    fn a_rotated_answer_is_the_same_answer() {
        let mut a = Answers::new();
        a.insert(
            "n:80".into(),
            vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")],
        );
        let mut b = Answers::new();
        b.insert(
            "n:80".into(),
            vec![addr("10.0.0.2:80"), addr("10.0.0.1:80")],
        );
        assert!(same(&a, &b));
        b.insert("n:80".into(), vec![addr("10.0.0.2:80")]);
        assert!(!same(&a, &b));
    }

    #[test]
    fn repeated_addresses_count_once() {
        let mut v = vec![addr("10.0.0.2:1"), addr("10.0.0.1:1"), addr("10.0.0.2:1")];
        dedup_keeping_order(&mut v);
        assert_eq!(v, vec![addr("10.0.0.2:1"), addr("10.0.0.1:1")]);
    }
}
