//! TLS for the relay: rustls (TLS 1.2 and 1.3 only) driven by hand over monoio's owned-buffer
//! I/O, so the session state can travel with its socket in a hand-off.
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Builds the relay's TLS configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid certificate {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Feeds received ciphertext to the session and moves the decrypted bytes into `out`, record
/// by record (rustls holds at most a few records of plaintext, so it must be drained as it
/// goes). Returns whether the session wants to write (alerts, handshake messages, key updates)
/// and whether it is still open (no close_notify seen).
pub fn absorb(
    conn: &mut rustls::ServerConnection,
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
fn drain_plaintext(conn: &mut rustls::ServerConnection, out: &mut bytes::BytesMut) -> bool {
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
pub fn seal(
    conn: &mut rustls::ServerConnection,
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
