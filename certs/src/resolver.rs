//! The certificate a TLS listener presents, chosen by SNI from the current
//! [`CertSet`], which a reload swaps atomically: a handshake in progress
//! keeps the set it started with, open connections are untouched, and a
//! directory that does not load leaves the old set serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::dir::{describe, load_dir, CertInfo, CertSet};
use crate::{load_pem, CertError};

fn load_set(
    dir: &Path,
    extra: Option<&(PathBuf, PathBuf)>,
    provider: &CryptoProvider,
) -> Result<CertSet, CertError> {
    let mut set = load_dir(dir, provider)?;
    if let Some((cert, key)) = extra {
        let pem = load_pem(cert, key)?;
        let (names, not_after) = describe(&pem.chain[0]).map_err(|why| CertError::Parse {
            path: cert.clone(),
            why,
        })?;
        let certified = Arc::new(
            CertifiedKey::from_der(pem.chain, pem.key, provider).map_err(|e| CertError::Key {
                path: key.clone(),
                why: e.to_string(),
            })?,
        );
        for n in &names {
            set.table.insert(n, certified.clone())?;
        }
        set.certs.push(CertInfo {
            name: "peer".to_string(),
            dns_names: names,
            not_after,
            path: cert.clone(),
        });
    }
    Ok(set)
}

/// A `ResolvesServerCert` over a directory of pairs, reloadable.
#[derive(Debug)]
pub struct DirResolver {
    dir: PathBuf,
    /// A pair outside the directory that answers its own names first (the
    /// region's certificate towards its peers).
    extra: Option<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertSet>,
}

impl DirResolver {
    /// Load `dir` now; an error here means the listener cannot start.
    pub fn load(dir: &Path, provider: Arc<CryptoProvider>) -> Result<DirResolver, CertError> {
        DirResolver::load_with(dir, None, provider)
    }

    /// Load `dir`, and `extra` (a certificate and key) answering its own
    /// names ahead of the directory's pairs.
    pub fn load_with(
        dir: &Path,
        extra: Option<(PathBuf, PathBuf)>,
        provider: Arc<CryptoProvider>,
    ) -> Result<DirResolver, CertError> {
        let set = load_set(dir, extra.as_ref(), &provider)?;
        Ok(DirResolver {
            dir: dir.to_path_buf(),
            extra,
            provider,
            current: ArcSwap::from_pointee(set),
        })
    }

    /// Load the directory again; on success the next handshake uses it, on
    /// error the current set keeps serving and the error says why.
    pub fn reload(&self) -> Result<(), CertError> {
        let set = load_set(&self.dir, self.extra.as_ref(), &self.provider)?;
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// The files outside the directory that are part of the set.
    pub fn extra_files(&self) -> Vec<PathBuf> {
        self.extra
            .iter()
            .flat_map(|(c, k)| [c.clone(), k.clone()])
            .collect()
    }

    /// What is serving now.
    pub fn certs(&self) -> Vec<CertInfo> {
        self.current.load().certs.clone()
    }

    /// Names more than one pair claims, and which one answers each.
    pub fn overlaps(&self) -> Vec<crate::dir::Overlap> {
        self.current.load().overlaps.clone()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl ResolvesServerCert for DirResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .load()
            .table
            .choose(hello.server_name())
            .cloned()
    }
}
