//! TLS for the relay: rustls (TLS 1.2 and 1.3 only) driven by hand over monoio's owned-buffer
//! I/O, so the session state can travel with its socket in a hand-off. The mesh's TLS
//! (TLS 1.3 only, both ends authenticated by the fleet CA) is driven the same way.
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ConnectionCommon, RootCertStore, ServerConfig, SideData};

/// The ALPN protocol of a mesh link: a mesh endpoint refuses a client speaking anything else.
const MESH_ALPN: &[u8] = b"iotunnel-mesh/1";

fn read_chain(cert: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid certificate {}", cert.display()))
}

fn read_key(key: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read private key {}", key.display()))
}

/// Builds the relay's TLS configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let certs = read_chain(cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The two ends of this node's mesh TLS: TLS 1.3 only, this node's mesh certificate on both,
/// and only the fleet CA trusted for the other end's.
#[derive(Clone)]
pub struct MeshTls {
    /// For the mesh listener: requires a client certificate from the CA.
    pub server: Arc<ServerConfig>,
    /// For forwarding: verifies the owner's certificate for `tls::MESH_SERVER_NAME`.
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls").finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Builds both ends from the CA certificate `ca` and this node's mesh chain and key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for ca_cert in read_chain(ca)? {
            roots
                .add(ca_cert)
                .with_context(|| format!("invalid CA certificate {}", ca.display()))?;
        }
        anyhow::ensure!(!roots.is_empty(), "no CA certificate in {}", ca.display());
        let roots = Arc::new(roots);
        let (chain, key) = (read_chain(cert)?, read_key(key)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .context("cannot build the mesh's client certificate verifier")?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("mesh certificate and key do not match")?;
        server.alpn_protocols = vec![MESH_ALPN.to_vec()];
        // One link per peer connection, never resumed: no tickets to send or keep.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("mesh certificate and key do not match")?;
        client.alpn_protocols = vec![MESH_ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Feeds received ciphertext to the session and moves the decrypted bytes into `out`, record
/// by record (rustls holds at most a few records of plaintext, so it must be drained as it
/// goes). Returns whether the session wants to write (alerts, handshake messages, key updates)
/// and whether it is still open (no close_notify seen).
pub fn absorb<D: SideData>(
    conn: &mut ConnectionCommon<D>,
    mut cipher: &[u8],
    out: &mut bytes::BytesMut,
) -> std::io::Result<(bool, bool)> {
    let mut open = true;
    while !cipher.is_empty() {
        conn.read_tls(&mut cipher)?;
        conn.process_new_packets()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        open &= drain_plaintext(conn, out);
    }
    Ok((conn.wants_write(), open))
}

/// Moves the session's decrypted bytes into `out`; returns false once the peer sent
/// close_notify.
fn drain_plaintext<D: SideData>(conn: &mut ConnectionCommon<D>, out: &mut bytes::BytesMut) -> bool {
    loop {
        let mut reader = conn.reader();
        let n = match reader.fill_buf() {
            Ok([]) => return false,
            Ok(chunk) => {
                out.extend_from_slice(chunk);
                chunk.len()
            }
            Err(_) => return true, // WouldBlock: nothing more buffered.
        };
        reader.consume(n);
    }
}

/// Encrypts `plain` (if any) and appends every pending TLS record to `out`. rustls buffers a
/// bounded amount of plaintext, so large frames go in pieces, draining records in between.
pub fn seal<D: SideData>(
    conn: &mut ConnectionCommon<D>,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut rest = plain;
    loop {
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
        if rest.is_empty() {
            return Ok(());
        }
        let n = conn.writer().write(rest)?;
        if n == 0 && !conn.wants_write() {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
}
