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

use crate::dir::{load_dir, CertInfo, CertSet};
use crate::CertError;

/// A `ResolvesServerCert` over a directory of pairs, reloadable.
#[derive(Debug)]
pub struct DirResolver {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertSet>,
}

impl DirResolver {
    /// Load `dir` now; an error here means the listener cannot start.
    pub fn load(dir: &Path, provider: Arc<CryptoProvider>) -> Result<DirResolver, CertError> {
        let set = load_dir(dir, &provider)?;
        Ok(DirResolver {
            dir: dir.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(set),
        })
    }

    /// Load the directory again; on success the next handshake uses it, on
    /// error the current set keeps serving and the error says why.
    pub fn reload(&self) -> Result<(), CertError> {
        let set = load_dir(&self.dir, &self.provider)?;
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// What is serving now.
    pub fn certs(&self) -> Vec<CertInfo> {
        self.current.load().certs.clone()
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
