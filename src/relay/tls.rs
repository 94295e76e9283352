//! TLS for the relay (TLS 1.2 and 1.3), with at most one payload copy per direction in user
//! space.
//!
//! rustls runs each handshake (its unbuffered API, driven over monoio's owned-buffer I/O) and
//! then keeps the secrets (its kernel API: key updates, session tickets); the records after the
//! handshake are ours, sealed and opened with ring's AEADs. A record is decrypted in the
//! buffer it was read into, its payload written by the decryption itself right behind the
//! plaintext already there (no copy in); plaintext is copied into the write buffer and
//! encrypted there (the one copy out). A [`Session`] is plain data: it travels with its socket in a hand-off, with the
//! ciphertext read past the last whole record.
//!
//! The mesh's TLS (TLS 1.3 only, both ends authenticated by the fleet CA) is driven the same
//! way, as a client for forwarding and as a server on the mesh listener.
use std::io;
use std::ops::DerefMut;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedConnectionCommon};
use rustls::{ClientConfig, ExtractedSecrets, RootCertStore, ServerConfig};

mod record;

pub use record::{alert, Session, TlsError, MAX_RECORD, MAX_RECORD_PLAIN, RECORD_OVERHEAD};
use record::{HEADER, MAX_BODY_12};

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
    // The relay does the records itself once rustls has run the handshake.
    config.enable_secret_extraction = true;
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
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("mesh certificate and key do not match")?;
        client.alpn_protocols = vec![MESH_ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_secret_extraction = true;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// `config` with secret extraction on (the relay's record layer needs it): the same `Arc`
/// when it already is.
pub fn with_extraction(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    if config.enable_secret_extraction {
        return config;
    }
    let mut config = (*config).clone();
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// Ciphertext read per call during a handshake: one full record and its header.
const HANDSHAKE_READ: usize = HEADER + MAX_BODY_12;
/// Ciphertext a handshake may hold unprocessed before it is refused (rustls takes messages
/// of up to 64 KiB, spread over records).
const MAX_HANDSHAKE_BUFFERED: usize = 96 * 1024;

/// What differs between the relay's server sessions and the mesh's client sessions.
pub trait Role: Sized {
    /// The rustls connection that runs the handshake.
    type Handshake: DerefMut<Target = UnbufferedConnectionCommon<Self>>;

    /// Processes the records in `incoming` (rustls' `process_tls_records`).
    fn process<'c, 'i>(
        conn: &'c mut Self::Handshake,
        incoming: &'i mut [u8],
    ) -> rustls::unbuffered::UnbufferedStatus<'c, 'i, Self>;

    /// The secrets and the key schedule, once the handshake is over.
    fn into_kernel(
        conn: Self::Handshake,
    ) -> Result<(ExtractedSecrets, KernelConnection<Self>), rustls::Error>;

    /// A TLS 1.3 NewSessionTicket from the server (only a client may get one).
    fn new_session_ticket(
        kernel: &mut KernelConnection<Self>,
        message: &[u8],
    ) -> Result<(), rustls::Error>;
}

impl Role for ServerConnectionData {
    type Handshake = UnbufferedServerConnection;

    fn process<'c, 'i>(
        conn: &'c mut Self::Handshake,
        incoming: &'i mut [u8],
    ) -> rustls::unbuffered::UnbufferedStatus<'c, 'i, Self> {
        conn.process_tls_records(incoming)
    }

    fn into_kernel(
        conn: Self::Handshake,
    ) -> Result<(ExtractedSecrets, KernelConnection<Self>), rustls::Error> {
        conn.dangerous_into_kernel_connection()
    }

    fn new_session_ticket(_: &mut KernelConnection<Self>, _: &[u8]) -> Result<(), rustls::Error> {
        Err(rustls::Error::General(
            "a client sent a session ticket".into(),
        ))
    }
}

impl Role for ClientConnectionData {
    type Handshake = UnbufferedClientConnection;

    fn process<'c, 'i>(
        conn: &'c mut Self::Handshake,
        incoming: &'i mut [u8],
    ) -> rustls::unbuffered::UnbufferedStatus<'c, 'i, Self> {
        conn.process_tls_records(incoming)
    }

    fn into_kernel(
        conn: Self::Handshake,
    ) -> Result<(ExtractedSecrets, KernelConnection<Self>), rustls::Error> {
        conn.dangerous_into_kernel_connection()
    }

    fn new_session_ticket(
        kernel: &mut KernelConnection<Self>,
        message: &[u8],
    ) -> Result<(), rustls::Error> {
        kernel.handle_new_session_ticket(message)
    }
}

/// A relay (server) session past its handshake.
pub type ServerSession = Session<ServerConnectionData>;
/// A mesh (client) session past its handshake.
pub type ClientSession = Session<ClientConnectionData>;

/// Runs a server handshake on `stream` with `config`; plaintext the client sent with its
/// last flight is appended to `plain`.
pub async fn accept(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
    plain: &mut BytesMut,
) -> io::Result<Box<ServerSession>> {
    let conn =
        UnbufferedServerConnection::new(with_extraction(config)).map_err(io::Error::other)?;
    handshake::<ServerConnectionData>(stream, conn, plain).await
}

/// Runs a client handshake on `stream` with `config` for `name`; plaintext the server sent
/// with its last flight is appended to `plain`.
pub async fn connect(
    stream: &mut TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    plain: &mut BytesMut,
) -> io::Result<Box<ClientSession>> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(io::Error::other)?;
    handshake::<ClientConnectionData>(stream, conn, plain).await
}

/// What a handshake does after a `process_tls_records`.
enum Step {
    /// Ask rustls again.
    Again,
    /// Send what was encoded, then ask again.
    Transmit,
    /// Read more from the peer.
    Read,
    /// The handshake is over and everything is sent.
    Done,
    /// The peer closed the connection.
    Closed,
    /// The handshake failed (rustls queued its alert).
    Failed(rustls::Error),
}

/// Drives rustls through a handshake, then takes the secrets for our record layer. On a TLS
/// error rustls's alert is sent (as far as the peer listens).
async fn handshake<R: Role>(
    stream: &mut TcpStream,
    mut conn: R::Handshake,
    plain: &mut BytesMut,
) -> io::Result<Box<Session<R>>> {
    let mut incoming: Vec<u8> = Vec::with_capacity(HANDSHAKE_READ);
    let mut outgoing: Vec<u8> = Vec::new();
    loop {
        // rustls keeps offsets into `incoming` between calls: it always gets all of it. Past
        // the handshake it decrypts the whole records there (the peer's first plaintext); the
        // records after them are ours.
        let status = R::process(&mut conn, &mut incoming);
        let mut extra_discard = 0;
        let step = match status.state {
            Ok(ConnectionState::EncodeTlsData(mut encoder)) => {
                encode(|out| encoder.encode(out), &mut outgoing)?;
                Step::Again
            }
            Ok(ConnectionState::TransmitTlsData(sent)) => {
                sent.done();
                Step::Transmit
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    let record =
                        record.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    extra_discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
                Step::Again
            }
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            Ok(_) => Step::Closed,
            Err(e) => Step::Failed(e),
        };
        let discard = status.discard + extra_discard;
        incoming.drain(..discard);
        match step {
            Step::Again => {}
            Step::Transmit => {
                let (res, out) = stream.write_all(std::mem::take(&mut outgoing)).await;
                outgoing = out;
                outgoing.clear();
                res?;
            }
            Step::Read => {
                if incoming.len() >= MAX_HANDSHAKE_BUFFERED {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS handshake too large",
                    ));
                }
                incoming.reserve(HANDSHAKE_READ);
                let len = incoming.len();
                let cap = incoming.capacity();
                let (res, slice) = stream
                    .read(monoio::buf::IoBufMut::slice_mut(incoming, len..cap))
                    .await;
                incoming = slice.into_inner();
                if res? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Step::Done => break,
            Step::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
            Step::Failed(e) => {
                // rustls queued its alert: the next call hands it over before looking at the
                // input again (which, past a failure, it must not: it would fail once more).
                let status = R::process(&mut conn, &mut incoming);
                if let Ok(ConnectionState::EncodeTlsData(mut encoder)) = status.state {
                    let _ = encode(|out| encoder.encode(out), &mut outgoing);
                }
                if !outgoing.is_empty() {
                    let _ = stream.write_all(outgoing).await;
                }
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
    let (secrets, kernel) = R::into_kernel(conn).map_err(io::Error::other)?;
    let mut session = Box::new(Session::new(secrets, kernel)?);
    // Records that came with the peer's last flight (its request, in TLS 1.3).
    let mut rest = BytesMut::from(&incoming[..]);
    let n = session.open_in_place(&mut rest, 0)?;
    plain.extend_from_slice(&rest[..n]);
    let _ = rest.split_to(n);
    session.incoming = rest;
    if session.wants_write() {
        let mut out = Vec::new();
        session.flush(&mut out);
        let (res, _) = stream.write_all(out).await;
        res?;
    }
    Ok(session)
}

/// Appends what `encode` writes to `out`, growing `out` as rustls asks.
fn encode(
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = 1024;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
            Err(e) => {
                out.truncate(start);
                return Err(io::Error::other(e.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Echoes what one client sends, reading at most `read` bytes at a time (so records arrive
    /// in pieces), sealing its own records with a key that wears out after `tx_limit` of them.
    fn echo_server(config: Arc<ServerConfig>, read: usize, tx_limit: u64) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = monoio::net::TcpListener::from_std(listener).unwrap();
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = BytesMut::new();
                let Ok(mut tls) = accept(&mut stream, config, &mut buf).await else {
                    return;
                };
                tls.tx_limit = tx_limit;
                buf.extend_from_slice(&std::mem::take(&mut tls.incoming));
                let mut plain = 0;
                loop {
                    let mut out = Vec::new();
                    let echoed = tls.seal(&buf[..plain], &mut out);
                    let _ = buf.split_to(plain);
                    if echoed.is_err() || tls.peer_closed() {
                        tls.close(&mut out);
                    }
                    if !out.is_empty() {
                        let (res, _) = stream.write_all(out).await;
                        res.unwrap();
                    }
                    if echoed.is_err() || tls.peer_closed() {
                        return;
                    }
                    buf.reserve(read);
                    let len = buf.len();
                    let (res, slice) = stream
                        .read(monoio::buf::IoBufMut::slice_mut(buf, len..len + read))
                        .await;
                    buf = slice.into_inner();
                    if res.unwrap() == 0 {
                        return;
                    }
                    match tls.open_in_place(&mut buf, 0) {
                        Ok(n) => plain = n,
                        Err(_) => {
                            let mut alert = Vec::new();
                            tls.flush(&mut alert);
                            let _ = stream.write_all(alert).await;
                            return;
                        }
                    }
                }
            });
        });
        addr
    }

    fn configs(
        suite: rustls::SupportedCipherSuite,
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let paths = crate::tls::ensure_material(dir.path(), "localhost").unwrap();
        let server = server_config(&paths.server_cert, &paths.server_key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(read_chain(&paths.ca_cert).unwrap());
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let client = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[suite.version()])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client), dir)
    }

    fn client(
        config: &Arc<ClientConfig>,
        addr: std::net::SocketAddr,
    ) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        let sock = std::net::TcpStream::connect(addr).unwrap();
        rustls::StreamOwned::new(conn, sock)
    }

    fn echo(c: &mut impl Read, w: usize, data: &[u8]) {
        let mut back = vec![0; w];
        c.read_exact(&mut back).unwrap();
        assert!(back == data, "the echo differs");
    }

    #[test]
    fn every_suite_echoes_through_partial_records_key_updates_and_close_notify() {
        use rustls::crypto::ring::cipher_suite as cs;
        let suites = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        for suite in suites {
            let tls13 = suite.version() == &rustls::version::TLS13;
            let (server, client_cfg, _dir) = configs(suite);
            // TLS 1.3: the server's key wears out every 5 records and is updated; TLS 1.2
            // has no key update, so its limit stays out of reach.
            let limit = if tls13 { 5 } else { u64::MAX };
            for read in [7, 64 * 1024] {
                let addr = echo_server(server.clone(), read, limit);
                let mut c = client(&client_cfg, addr);
                let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
                for size in [1, 100, MAX_RECORD_PLAIN, MAX_RECORD_PLAIN + 1, 100_000] {
                    c.write_all(&data[..size]).unwrap();
                    echo(&mut c, size, &data[..size]);
                    if tls13 {
                        // The client updates its keys and asks the server to update its own.
                        c.conn.refresh_traffic_keys().unwrap();
                    }
                }
                c.conn.send_close_notify();
                c.flush().unwrap();
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
                assert!(
                    rest.is_empty(),
                    "{suite:?}: the server closes with close_notify"
                );
            }
        }
    }

    #[test]
    fn a_tampered_record_gets_bad_record_mac() {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let (server, client_cfg, _dir) = configs(suite);
        let addr = echo_server(server, 64 * 1024, u64::MAX);
        let mut c = client(&client_cfg, addr);
        c.write_all(b"hello").unwrap();
        echo(&mut c, 5, b"hello");
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend([0x5a; 40]);
        c.sock.write_all(&forged).unwrap();
        let err = c.read(&mut [0; 16]).unwrap_err();
        assert!(err.to_string().contains("BadRecordMac"), "{err}");
    }
}
