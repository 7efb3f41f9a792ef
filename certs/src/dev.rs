//! A development CA and a leaf certificate for local names, for
//! `edge-router cert dev` and `edge-router demo --tls`. Private keys are
//! written 0600; the directory is meant to be git-ignored.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::CertError;

/// The names the development leaf answers.
pub const DEV_NAMES: &[&str] = &[
    "localhost",
    "*.localhost",
    "edge-router.test",
    "*.edge-router.test",
];

/// Where `write_dev` put things.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// The CA certificate to trust.
    pub ca_cert: PathBuf,
    /// The CA's key (0600): keep it to issue more leaves, or delete it.
    pub ca_key: PathBuf,
    /// The leaf (`default.crt`) and its key, ready for a listener's `certs` directory.
    pub leaf_cert: PathBuf,
    /// The leaf's key (0600).
    pub leaf_key: PathBuf,
}

/// Create a CA and a leaf for [`DEV_NAMES`], 127.0.0.1 and ::1 in `dir`
/// (created if missing): `default.crt` and `default.key`, ready to be a
/// listener's certificate directory, and the CA in `ca/` (`ca.crt`,
/// `ca.key`), out of the way of the listener.
pub fn write_dev(dir: &Path) -> Result<DevFiles, CertError> {
    let fail = |why: String| CertError::Dev(why);
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).map_err(|e| fail(format!("{}: {e}", ca_dir.display())))?;
    let ca_key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "edge-router development CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| fail(e.to_string()))?;

    let leaf_key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut names: Vec<String> = DEV_NAMES.iter().map(|s| s.to_string()).collect();
    names.push("127.0.0.1".into());
    names.push("::1".into());
    let mut leaf = CertificateParams::new(names).map_err(|e| fail(e.to_string()))?;
    // rcgen writes IP literals as DNS names unless told; make them IP SANs.
    leaf.subject_alt_names = leaf
        .subject_alt_names
        .into_iter()
        .map(|san| match &san {
            SanType::DnsName(n) => match n.as_str().parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => san,
            },
            _ => san,
        })
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    leaf.distinguished_name = dn;
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .map_err(|e| fail(e.to_string()))?;

    let files = DevFiles {
        ca_cert: ca_dir.join("ca.crt"),
        ca_key: ca_dir.join("ca.key"),
        leaf_cert: dir.join("default.crt"),
        leaf_key: dir.join("default.key"),
    };
    write(&files.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write(&files.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    write(&files.leaf_cert, leaf_cert.pem().as_bytes(), false)?;
    write(&files.leaf_key, leaf_key.serialize_pem().as_bytes(), true)?;
    Ok(files)
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), CertError> {
    let fail = |e: std::io::Error| CertError::Dev(format!("{}: {e}", path.display()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(fail)?;
    #[cfg(unix)]
    if private {
        // An existing file keeps its mode through open(): set it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    f.write_all(bytes).map_err(fail)
}
