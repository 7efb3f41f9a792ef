//! The crypto provider every TLS object of the process is built with: ring,
//! named explicitly (the AWS SDK compiles aws-lc-rs in as well, so the
//! process default is not left to chance).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider every TLS object of the process is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
