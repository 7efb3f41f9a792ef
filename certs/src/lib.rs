//! TLS material for edge-router.
//!
//! [`SniTable`] *chooses* a certificate for a server name and is pure over a
//! loaded set; [`load_pem`] *loads* a chain and key from PEM files;
//! [`dir`] loads a directory of pairs; [`resolver`] serves them to rustls
//! by SNI and reloads them; [`dev`] writes a development CA and leaf;
//! [`tls`] builds the server configuration with an explicit crypto provider
//! (the process has two compiled in: never rely on a default).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod dev;
pub mod dir;
pub mod resolver;
pub mod tls;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What can go wrong loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file held no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// A server name pattern that is neither a host name nor `*.suffix`.
    #[error("invalid server name pattern `{0}`")]
    BadPattern(String),
    /// A certificate directory could not be listed.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate directory held no `NAME.crt` + `NAME.key` pair.
    #[error("{0}: no certificate pair (NAME.crt or NAME.pem with NAME.key)")]
    Empty(PathBuf),
    /// A certificate that is not X.509 as expected.
    #[error("{path}: not a readable X.509 certificate: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A key that does not load, or does not match its certificate.
    #[error("{path}: {why}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Writing the development CA failed.
    #[error("development certificates: {0}")]
    Dev(String),
}

/// A certificate chain and its private key, as read from PEM.
#[derive(Debug)]
pub struct CertifiedPem {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

/// Read a certificate chain and private key from PEM files.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertifiedPem, CertError> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Pem { path, source }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate(cert.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
    Ok(CertifiedPem { chain, key })
}

/// Chooses which loaded certificate answers a TLS client's server name (SNI).
///
/// Exact names win over wildcards; a wildcard `*.example.com` covers exactly one
/// label (`a.example.com`, not `a.b.example.com`), as RFC 6125 says; names are
/// compared case-insensitively; no match falls back to the default, if any.
#[derive(Debug, Clone)]
pub struct SniTable<T> {
    exact: HashMap<String, T>,
    wildcard: HashMap<String, T>,
    default: Option<T>,
}

impl<T> Default for SniTable<T> {
    fn default() -> Self {
        SniTable {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: None,
        }
    }
}

impl<T> SniTable<T> {
    /// Register `value` for a name pattern: `host.example.com` or `*.example.com`.
    pub fn insert(&mut self, pattern: &str, value: T) -> Result<(), CertError> {
        let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
        if let Some(suffix) = pattern.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(CertError::BadPattern(pattern));
            }
            self.wildcard.insert(suffix.to_string(), value);
        } else if pattern.is_empty() || pattern.contains('*') {
            return Err(CertError::BadPattern(pattern));
        } else {
            self.exact.insert(pattern, value);
        }
        Ok(())
    }

    /// The value served when the client sends no name or one nothing matches.
    pub fn set_default(&mut self, value: T) {
        self.default = Some(value);
    }

    /// Choose for a client's server name (None when the client sent no SNI).
    pub fn choose(&self, server_name: Option<&str>) -> Option<&T> {
        let Some(name) = server_name else {
            return self.default.as_ref();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(v) = self.exact.get(&name) {
            return Some(v);
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(v) = self.wildcard.get(parent) {
                return Some(v);
            }
        }
        self.default.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SniTable<&'static str> {
        let mut t = SniTable::default();
        t.insert("api.example.com", "exact").unwrap();
        t.insert("*.example.com", "wild").unwrap();
        t.set_default("default");
        t
    }

    #[test]
    fn exact_name_beats_wildcard() {
        assert_eq!(table().choose(Some("api.example.com")), Some(&"exact"));
    }

    #[test]
    fn wildcard_covers_one_label_only() {
        let t = table();
        assert_eq!(t.choose(Some("www.example.com")), Some(&"wild"));
        assert_eq!(t.choose(Some("a.b.example.com")), Some(&"default"));
        assert_eq!(t.choose(Some("example.com")), Some(&"default"));
    }

    #[test]
    fn names_compare_case_insensitively_and_ignore_trailing_dot() {
        assert_eq!(table().choose(Some("API.Example.COM.")), Some(&"exact"));
    }

    #[test]
    fn no_sni_gets_default() {
        assert_eq!(table().choose(None), Some(&"default"));
        let empty: SniTable<u8> = SniTable::default();
        assert_eq!(empty.choose(Some("x.example.com")), None);
    }

    #[test]
    fn bad_patterns_are_rejected() {
        let mut t = SniTable::default();
        assert!(t.insert("a.*.com", 1).is_err());
        assert!(t.insert("*.", 1).is_err());
        assert!(t.insert("", 1).is_err());
    }

    #[test]
    fn pem_chain_and_key_load_and_missing_cert_is_an_error() {
        let dir = std::env::temp_dir().join(format!("edge-certs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key, empty) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("e.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(&empty, "").unwrap();
        let loaded = load_pem(&cert, &key).unwrap();
        assert_eq!(loaded.chain.len(), 1);
        assert!(matches!(
            load_pem(&empty, &key),
            Err(CertError::NoCertificate(_))
        ));
        assert!(load_pem(&dir.join("missing.pem"), &key).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
