//! TLS material for the relay: a self-signed CA and a server certificate it signs, generated
//! into `{data-dir}/tls/` on first start. `ca.pem` is what clients and devices trust.
//!
//! The same CA (in a fleet, the fleet's CA from the database) also signs this node's mesh
//! certificate, `mesh.pem`: its only name is [`MESH_SERVER_NAME`] and it serves both ends of
//! a mesh link (the owner's listener and the forwarding node's client), so nodes verify each
//! other by the CA alone, whatever addresses they advertise (see `relay::mesh`).
use std::fs;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The one server name of every node's mesh certificate, which forwarding nodes verify: the
/// mesh trusts the fleet CA, not the addresses nodes advertise.
pub const MESH_SERVER_NAME: &str = "iotunnel-mesh";

/// What to do when a server's certificate comes from a CA this program does not trust: the
/// relay of a server with its own CA (the default) is trusted only through `--ca-file`.
pub const CA_FILE_HINT: &str = "pass --ca-file with the server's CA certificate: the server \
keeps it in its data dir as tls/ca.pem (./iotunnel-data/tls/ca.pem by default, or \
{--data-dir}/tls/ca.pem); copy that file to this machine";

/// A TLS client configuration trusting the certificates in `ca_file` (PEM), or else the public
/// web PKI roots. ring only: another crate in the graph may enable a second provider.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.with_context(|| format!("bad certificate in {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("unusable CA certificate in {}", path.display()))?;
            }
            if roots.is_empty() {
                bail!("no certificate in the CA file {}", path.display());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether `e`, or an error under it, is a server certificate from a CA we do not trust.
pub fn is_unknown_issuer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) =
            e.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        // io::Error's source() skips the error it wraps: look inside it first.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if is_unknown_issuer(inner) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Paths of the generated TLS files.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// The CA certificate clients trust.
    pub ca_cert: PathBuf,
    /// The CA private key.
    pub ca_key: PathBuf,
    /// The relay's certificate chain (server certificate, then CA).
    pub server_cert: PathBuf,
    /// The relay's private key.
    pub server_key: PathBuf,
    /// This node's mesh certificate chain (mesh certificate, then CA).
    pub mesh_cert: PathBuf,
    /// The mesh certificate's private key.
    pub mesh_key: PathBuf,
    /// The SANs the server certificate was issued for, one per line.
    server_sans: PathBuf,
}

impl TlsPaths {
    /// The files under `{data_dir}/tls/`.
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("tls");
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            mesh_cert: dir.join("mesh.pem"),
            mesh_key: dir.join("mesh.key"),
            server_sans: dir.join("server.sans"),
        }
    }
}

/// Ensures the CA, a server certificate valid for localhost, 127.0.0.1 and `public_host`, and
/// a mesh certificate exist, generating what is missing. An existing CA is kept, so clients
/// keep trusting it.
pub fn ensure_material(data_dir: &Path, public_host: &str) -> anyhow::Result<TlsPaths> {
    let paths = TlsPaths::new(data_dir);
    let dir = paths.ca_cert.parent().expect("tls dir has a parent");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let (ca_pem, ca_key) = if paths.ca_cert.exists() && paths.ca_key.exists() {
        let key = KeyPair::from_pem(&fs::read_to_string(&paths.ca_key)?)
            .context("cannot parse tls/ca.key")?;
        (fs::read_to_string(&paths.ca_cert)?, key)
    } else {
        let (cert, key) = new_ca()?;
        install_ca(data_dir, &cert, &key)?;
        (cert, KeyPair::from_pem(&key)?)
    };

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !sans.iter().any(|s| s == public_host) {
        sans.push(public_host.to_string());
    }
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("cannot load tls/ca.pem")?;
    ensure_mesh_cert(&paths, &ca_pem, &issuer)?;

    let wanted = sans.join("\n");
    let current = fs::read_to_string(&paths.server_sans).unwrap_or_default();
    if current == wanted && paths.server_cert.exists() && paths.server_key.exists() {
        return Ok(paths);
    }

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    // A unique CN: localproxy and some TLS stacks reject a leaf whose CN equals its issuer's
    // or that is the generic "localhost" (PROTOCOLS.md).
    params.distinguished_name.push(
        DnType::CommonName,
        format!("iotunnel relay {}", unique_suffix()),
    );
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&paths.server_key, &key.serialize_pem())?;
    write_atomic(
        &paths.server_cert,
        &format!("{}{}", cert.pem(), ca_pem),
        0o644,
    )?;
    write_atomic(&paths.server_sans, &wanted, 0o644)?;
    Ok(paths)
}

/// Issues the mesh certificate unless `mesh.pem` already chains to the CA `ca_pem` (a chain
/// ends with its CA's PEM, so a new CA, like a fleet's installed over a node's own, re-issues).
fn ensure_mesh_cert(
    paths: &TlsPaths,
    ca_pem: &str,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<()> {
    let current = fs::read_to_string(&paths.mesh_cert).unwrap_or_default();
    if current.ends_with(ca_pem) && paths.mesh_key.exists() {
        return Ok(());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![MESH_SERVER_NAME.to_string()])?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("iotunnel mesh {}", unique_suffix()),
    );
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate for both ends of a mesh link.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.signed_by(&key, issuer)?;
    write_private(&paths.mesh_key, &key.serialize_pem())?;
    write_atomic(
        &paths.mesh_cert,
        &format!("{}{}", cert.pem(), ca_pem),
        0o644,
    )?;
    Ok(())
}

/// A new self-signed CA: its certificate and private key, PEM.
pub fn new_ca() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "iotunnel");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("iotunnel CA {}", unique_suffix()),
    );
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes `cert`/`key` the CA of `{data_dir}/tls/` (a fleet's shared CA); a changed CA makes
/// [`ensure_material`] issue a new server certificate.
pub fn install_ca(data_dir: &Path, cert: &str, key: &str) -> anyhow::Result<()> {
    let paths = TlsPaths::new(data_dir);
    let dir = paths.ca_cert.parent().expect("tls dir has a parent");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let same = fs::read_to_string(&paths.ca_cert).is_ok_and(|c| c == cert)
        && fs::read_to_string(&paths.ca_key).is_ok_and(|k| k == key);
    if same {
        return Ok(());
    }
    write_private(&paths.ca_key, key)?;
    write_atomic(&paths.ca_cert, cert, 0o644)?;
    // A new CA invalidates any server certificate signed by an older one.
    let _ = fs::remove_file(&paths.server_sans);
    Ok(())
}

fn unique_suffix() -> String {
    hex::encode(crate::token::random_bytes::<6>())
}

/// Writes a file readable by its owner only, atomically (see [`write_atomic`]).
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes a file through a synced temp file and a rename, so a crash leaves the old file or
/// the new one, never half of one.
pub fn write_atomic(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_certificate_is_kept_until_the_ca_changes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = ensure_material(dir.path(), "relay.example").unwrap();
        let first = fs::read_to_string(&paths.mesh_cert).unwrap();
        let ca = fs::read_to_string(&paths.ca_cert).unwrap();
        assert!(first.ends_with(&ca) && first.len() > ca.len());
        ensure_material(dir.path(), "other.example").unwrap();
        assert_eq!(fs::read_to_string(&paths.mesh_cert).unwrap(), first);

        // A fleet's CA installed over the node's own: a new mesh certificate under it.
        let (fleet_ca, fleet_key) = new_ca().unwrap();
        install_ca(dir.path(), &fleet_ca, &fleet_key).unwrap();
        ensure_material(dir.path(), "other.example").unwrap();
        let second = fs::read_to_string(&paths.mesh_cert).unwrap();
        assert_ne!(second, first);
        assert!(second.ends_with(&fleet_ca));
        crate::relay::MeshTls::load(&paths.ca_cert, &paths.mesh_cert, &paths.mesh_key).unwrap();
    }
}
