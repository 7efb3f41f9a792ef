//! A directory of PEM certificate/key pairs, loaded into an [`SniTable`]:
//! `NAME.crt` (or `NAME.pem`) with `NAME.key` beside it. Each certificate
//! answers the DNS names in its subject alternative names; the pair named
//! `default` (or, without one, the first by name) answers clients whose
//! server name nothing matches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;

use crate::{load_pem, CertError, SniTable};

/// What was loaded from one pair, for metrics and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The pair's name (the file stem).
    pub name: String,
    /// The DNS names it answers (from its SANs).
    pub dns_names: Vec<String>,
    /// End of its validity, Unix seconds.
    pub not_after: i64,
    /// The certificate file.
    pub path: PathBuf,
}

impl CertInfo {
    /// Seconds until expiry from `now` (negative once expired).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after - now
    }
}

/// Every pair of a directory, ready to answer handshakes.
#[derive(Debug)]
pub struct CertSet {
    /// Chooses a certificate by server name.
    pub table: SniTable<Arc<CertifiedKey>>,
    /// One entry per pair, by name.
    pub certs: Vec<CertInfo>,
    /// Names claimed by more than one pair.
    pub overlaps: Vec<Overlap>,
}

/// Load every pair in `dir`; any unreadable or mismatched pair fails the whole
/// load (a reload then keeps what was serving).
pub fn load_dir(dir: &Path, provider: &CryptoProvider) -> Result<CertSet, CertError> {
    let io = |e: std::io::Error| CertError::Dir {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut pairs: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "crt" && ext != "pem" {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let key = path.with_extension("key");
        if !key.exists() {
            // A CA bundle or a chain kept beside the pairs: not a pair.
            continue;
        }
        pairs.push((stem.to_string(), path.clone(), key));
    }
    pairs.sort();
    if pairs.is_empty() {
        return Err(CertError::Empty(dir.to_path_buf()));
    }
    let mut table = SniTable::default();
    let mut certs = Vec::new();
    let default_at = pairs
        .iter()
        .position(|(n, _, _)| n == "default")
        .unwrap_or(0);
    let mut claims: Vec<Claim> = Vec::new();
    for (i, (name, cert, key)) in pairs.into_iter().enumerate() {
        let pem = load_pem(&cert, &key)?;
        let (dns_names, not_after) = describe(&pem.chain[0]).map_err(|why| CertError::Parse {
            path: cert.clone(),
            why,
        })?;
        let certified =
            CertifiedKey::from_der(pem.chain, pem.key, provider).map_err(|e| CertError::Key {
                path: key.clone(),
                why: e.to_string(),
            })?;
        let certified = Arc::new(certified);
        for n in &dns_names {
            claims.push(Claim {
                not_after,
                pattern: n.clone(),
                pair: name.clone(),
                key: certified.clone(),
            });
        }
        if i == default_at {
            table.set_default(certified);
        }
        certs.push(CertInfo {
            name,
            dns_names,
            not_after,
            path: cert,
        });
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let overlaps = assign_names(&mut table, claims, now)?;
    Ok(CertSet {
        table,
        certs,
        overlaps,
    })
}

/// A pair's claim on a name from its certificate.
struct Claim {
    not_after: i64,
    pattern: String,
    pair: String,
    key: Arc<CertifiedKey>,
}

/// A name several pairs claim, and which pair answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The name (or wildcard pattern).
    pub name: String,
    /// The pair that answers it (valid longest); `None` when the unused
    /// pair's expired claim gave way to a valid certificate's wildcard.
    pub served_by: Option<String>,
    /// The pair that does not.
    pub unused: String,
}

/// Whether `pattern` (a name or `*.suffix`) answers `name`, as
/// [`SniTable`] chooses.
fn covers(pattern: &str, name: &str) -> bool {
    if pattern == name {
        return true;
    }
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => label != "*" && rest == suffix,
        _ => false,
    }
}

/// Put each claim in `table`. A name claimed by several pairs gets the one
/// valid longest, so a renewed certificate placed beside the old one takes
/// over; an expired certificate's name gives way to a valid certificate
/// that covers it, even by a wildcard (exact names otherwise win). Returns
/// every overlap, for the log.
fn assign_names(
    table: &mut SniTable<Arc<CertifiedKey>>,
    mut claims: Vec<Claim>,
    now: i64,
) -> Result<Vec<Overlap>, CertError> {
    claims.sort_by_key(|c| c.not_after);
    let valid: Vec<String> = claims
        .iter()
        .filter(|c| c.not_after > now)
        .map(|c| c.pattern.clone())
        .collect();
    let mut holders: std::collections::HashMap<String, String> = Default::default();
    let mut overlaps = Vec::new();
    for c in claims {
        let expired = c.not_after <= now;
        if expired && valid.iter().any(|p| covers(p, &c.pattern)) && !valid.contains(&c.pattern) {
            overlaps.push(Overlap {
                name: c.pattern,
                served_by: None,
                unused: c.pair,
            });
            continue;
        }
        if let Some(previous) = holders.insert(c.pattern.clone(), c.pair.clone()) {
            if previous != c.pair {
                overlaps.push(Overlap {
                    name: c.pattern.clone(),
                    served_by: Some(c.pair.clone()),
                    unused: previous,
                });
            }
        }
        table.insert(&c.pattern, c.key)?;
    }
    Ok(overlaps)
}

/// The DNS names a leaf certificate answers (its SANs; its subject's common
/// name only when it has no SAN extension) and the end of its validity.
pub fn describe(leaf: &rustls_pki_types::CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| e.to_string())?;
    let not_after = cert.validity().not_after.timestamp();
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_ascii_lowercase)
            .collect(),
        Err(e) => return Err(e.to_string()),
    };
    names.sort();
    names.dedup();
    Ok((names, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::write_dev;
    use crate::resolver::DirResolver;
    use crate::tls::provider;

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edge-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pair(dir: &Path, name: &str, sans: &[&str]) {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), ck.cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), ck.key_pair.serialize_pem()).unwrap();
    }

    /// The leaf certificate of pair `name` in `dir`.
    fn leaf_of(dir: &Path, name: &str) -> rustls_pki_types::CertificateDer<'static> {
        let cert = dir.join(format!("{name}.crt"));
        load_pem(&cert, &dir.join(format!("{name}.key")))
            .unwrap()
            .chain[0]
            .clone()
    }

    /// A self-signed pair for `sans` valid until the start of `year`.
    fn pair_until(dir: &Path, name: &str, sans: &[&str], year: i32) {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_name_claimed_by_several_pairs_gets_the_one_valid_longest() {
        let dir = tmp("overlap");
        // File order and expiry order disagree both ways.
        pair_until(&dir, "a-renewed", &["www.example.com"], 2040);
        pair_until(
            &dir,
            "m-current",
            &["www.example.com", "*.example.com"],
            2035,
        );
        pair_until(&dir, "z-old", &["www.example.com", "*.example.com"], 2030);
        let set = load_dir(&dir, &provider()).unwrap();
        let leaf = |sni: &str| set.table.choose(Some(sni)).map(|k| k.cert[0].clone());
        let of = |name: &str| leaf_of(&dir, name);
        assert_eq!(leaf("www.example.com"), Some(of("a-renewed")));
        assert_eq!(leaf("api.example.com"), Some(of("m-current")));
        assert!(set.overlaps.contains(&Overlap {
            name: "www.example.com".into(),
            served_by: Some("a-renewed".into()),
            unused: "m-current".into()
        }));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_expired_exact_name_gives_way_to_a_valid_wildcard() {
        let dir = tmp("expired-exact");
        let mut params = rcgen::CertificateParams::new(vec!["www.example.com".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("old.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("old.key"), key.serialize_pem()).unwrap();
        pair_until(&dir, "wild", &["*.example.com"], 2035);
        let set = load_dir(&dir, &provider()).unwrap();
        let served = set
            .table
            .choose(Some("www.example.com"))
            .map(|k| k.cert[0].clone());
        let wild = load_pem(&dir.join("wild.crt"), &dir.join("wild.key"))
            .unwrap()
            .chain[0]
            .clone();
        assert_eq!(served, Some(wild));
        assert_eq!(
            set.overlaps,
            vec![Overlap {
                name: "www.example.com".into(),
                served_by: None,
                unused: "old".into()
            }]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_directory_answers_each_certificates_sans_with_a_default() {
        let dir = tmp("sans");
        pair(&dir, "api", &["api.example.com"]);
        pair(&dir, "wild", &["*.example.com", "example.com"]);
        pair(&dir, "default", &["fallback.test"]);
        std::fs::write(dir.join("ca-bundle.pem"), "not a pair").unwrap();
        let set = load_dir(&dir, &provider()).unwrap();
        let names: Vec<&str> = set.certs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["api", "default", "wild"]);
        let leaf = |sni: Option<&str>| set.table.choose(sni).map(|k| k.cert[0].clone());
        let of = |name: &str| leaf_of(&dir, name);
        assert_eq!(leaf(Some("api.example.com")), Some(of("api")));
        assert_eq!(leaf(Some("www.example.com")), Some(of("wild")));
        assert_eq!(leaf(Some("unknown.test")), Some(of("default")));
        assert_eq!(leaf(None), Some(of("default")));
        assert!(set
            .certs
            .iter()
            .all(|c| c.expires_in(SystemTime::now()) > 0));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_broken_reload_keeps_what_was_serving() {
        let dir = tmp("reload");
        pair(&dir, "default", &["a.test"]);
        let r = DirResolver::load(&dir, provider()).unwrap();
        let before = r.certs();
        std::fs::write(
            dir.join("default.crt"),
            "-----BEGIN CERTIFICATE-----\ngarbage\n",
        )
        .unwrap();
        assert!(r.reload().is_err());
        assert_eq!(r.certs(), before);
        pair(&dir, "default", &["b.test"]);
        r.reload().unwrap();
        assert_eq!(r.certs()[0].dns_names, ["b.test"]);
        // A key that is not the certificate's is refused too.
        let other = tmp("other");
        pair(&other, "x", &["c.test"]);
        std::fs::copy(other.join("x.key"), dir.join("default.key")).unwrap();
        assert!(r.reload().is_err(), "mismatched key accepted");
        assert_eq!(r.certs()[0].dns_names, ["b.test"]);
        for d in [dir, other] {
            std::fs::remove_dir_all(&d).ok();
        }
    }

    #[test]
    fn the_dev_ca_signs_a_leaf_for_local_names_with_private_keys_0600() {
        let dir = tmp("dev");
        let files = write_dev(&dir).unwrap();
        let set = load_dir(&dir, &provider()).unwrap();
        assert_eq!(
            set.certs.len(),
            1,
            "ca.crt has no ca.key pair? {:?}",
            set.certs
        );
        assert!(set.certs[0].dns_names.contains(&"localhost".to_string()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&files.ca_key, &files.leaf_key] {
                let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
