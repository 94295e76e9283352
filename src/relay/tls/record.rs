//! The record layer past the handshake (RFC 8446 5, RFC 5246 6.2): records opened in place
//! where they were read and sealed in place where they are written, with ring's AEADs (the
//! ones rustls uses); rustls's kernel connection keeps the key schedule (key updates, tickets).
use std::io;

use bytes::BytesMut;
use ring::aead;
use rustls::kernel::KernelConnection;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};

use super::Role;

/// TLS record header: content type, legacy version, length (RFC 8446 5.1).
pub(super) const HEADER: usize = 5;
/// Largest plaintext in one record, 2^14 (RFC 8446 5.1, RFC 5246 6.2.1).
pub const MAX_RECORD_PLAIN: usize = 16 * 1024;
const MAX_PLAIN: usize = MAX_RECORD_PLAIN;
/// Largest record body a TLS 1.3 peer may send: 2^14 + 256 (RFC 8446 5.2).
const MAX_BODY_13: usize = MAX_PLAIN + 256;
/// Largest record body a TLS 1.2 peer may send: 2^14 + 2048 (RFC 5246 6.2.3).
pub(super) const MAX_BODY_12: usize = MAX_PLAIN + 2048;
/// AEAD tag of every suite we offer (AES-GCM, ChaCha20-Poly1305).
const TAG: usize = 16;
/// The explicit nonce in front of a TLS 1.2 AES-GCM record body (RFC 5288 3).
const EXPLICIT_NONCE: usize = 8;
/// The longest record a peer may send, header included.
pub const MAX_RECORD: usize = HEADER + MAX_BODY_12;
/// Most bytes a record adds to its payload: header, explicit nonce, inner content type, tag.
pub const RECORD_OVERHEAD: usize = HEADER + EXPLICIT_NONCE + 1 + TAG;
/// rustls's own soft limit on sequence numbers (record_layer.rs), for suites without one.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;

/// Record content types (RFC 8446 B.1).
mod content {
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

/// Alert descriptions we send or act on (RFC 8446 6).
pub mod alert {
    /// The end of the stream.
    pub const CLOSE_NOTIFY: u8 = 0;
    /// A record or message not allowed here.
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    /// A record that does not decrypt.
    pub const BAD_RECORD_MAC: u8 = 20;
    /// A record longer than allowed.
    pub const RECORD_OVERFLOW: u8 = 22;
    /// A field out of range.
    pub const ILLEGAL_PARAMETER: u8 = 47;
    /// A message that does not parse.
    pub const DECODE_ERROR: u8 = 50;
    /// Our side failed (key schedule).
    pub const INTERNAL_ERROR: u8 = 80;
    /// A warning that may precede close_notify.
    pub const USER_CANCELED: u8 = 90;
}

/// Handshake message types after the handshake (RFC 8446 4).
mod handshake_type {
    pub const NEW_SESSION_TICKET: u8 = 4;
    pub const KEY_UPDATE: u8 = 24;
}

/// Why a session ended badly; "need more bytes" is not an error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The peer broke the protocol; this fatal alert waits in the session to be sent.
    #[error("TLS protocol violation (alert {0} queued)")]
    Refused(u8),
    /// The peer sent a fatal alert.
    #[error("the peer sent TLS alert {0}")]
    PeerAlert(u8),
    /// The session cannot seal any more (TLS 1.2 keys used up, or it failed before).
    #[error("the TLS session cannot send any more")]
    Exhausted,
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The protocol version past the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

/// One direction's AEAD key and nonce state.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    /// TLS 1.2 AES-GCM: the record carries the nonce's last 8 bytes.
    explicit_nonce: bool,
}

impl Keys {
    fn new(secrets: ConnectionTrafficSecrets, seq: u64, version: Version) -> io::Result<Self> {
        let (alg, key, iv, explicit_nonce) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, version == Version::Tls12)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, version == Version::Tls12)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => return Err(io::Error::other("unsupported TLS cipher")),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("invalid TLS traffic key"))?;
        let iv = <[u8; aead::NONCE_LEN]>::try_from(iv.as_ref())
            .map_err(|_| io::Error::other("invalid TLS traffic IV"))?;
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
            explicit_nonce,
        })
    }

    /// The IV with the sequence number xored into its last 8 bytes (RFC 8446 5.3, RFC 7905 2).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }
}

/// A TLS session past its handshake: rustls's key schedule and our record layer.
pub struct Session<R> {
    kernel: KernelConnection<R>,
    version: Version,
    rx: Keys,
    tx: Keys,
    /// Records sealed here to precede whatever is sealed next: key updates, alerts.
    pending: Vec<u8>,
    /// Ciphertext read past the last whole record; carried with the session (hand-off).
    pub incoming: BytesMut,
    /// Records sealed with one key before it must be replaced (TLS 1.3) or the session end.
    pub(super) tx_limit: u64,
    peer_closed: bool,
    sent_close: bool,
    failed: bool,
}

impl<R> std::fmt::Debug for Session<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("version", &self.version)
            .field("incoming", &self.incoming.len())
            .finish_non_exhaustive()
    }
}

impl<R: Role> Session<R> {
    /// The session rustls handed over after its handshake.
    pub(super) fn new(secrets: ExtractedSecrets, kernel: KernelConnection<R>) -> io::Result<Self> {
        let version = match kernel.protocol_version() {
            rustls::ProtocolVersion::TLSv1_3 => Version::Tls13,
            rustls::ProtocolVersion::TLSv1_2 => Version::Tls12,
            v => return Err(io::Error::other(format!("unsupported TLS version {v:?}"))),
        };
        let limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        Ok(Self {
            rx: Keys::new(rx, rx_seq, version)?,
            tx: Keys::new(tx, tx_seq, version)?,
            kernel,
            version,
            pending: Vec::new(),
            incoming: BytesMut::new(),
            tx_limit: limit.min(SEQ_SOFT_LIMIT),
            peer_closed: false,
            sent_close: false,
            failed: false,
        })
    }

    /// Whether the peer sent close_notify (nothing it sends after counts).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether records wait to be sent (key updates, alerts).
    pub fn wants_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Decrypts the whole records in `buf[plain..]` in place, each payload written (in the
    /// decrypting pass) right behind the plaintext before it; a partial record stays after
    /// them. Returns the plaintext's new length. Alerts and post-handshake messages are handled
    /// here; records they ask for are queued for the writer ([`Self::wants_write`]).
    pub fn open_in_place(&mut self, buf: &mut BytesMut, plain: usize) -> Result<usize, TlsError> {
        let mut at = plain;
        let mut out = plain;
        while !self.peer_closed && buf.len() - at >= HEADER {
            let len = usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]]));
            let max = match self.version {
                Version::Tls13 => MAX_BODY_13,
                Version::Tls12 => MAX_BODY_12,
            };
            if len > max {
                return Err(self.fail(alert::RECORD_OVERFLOW));
            }
            if buf.len() - at < HEADER + len {
                break;
            }
            // The record is decrypted straight to `out`, behind the plaintext before it.
            let (typ, n) = self.open_record(&mut buf[out..at + HEADER + len], at - out)?;
            match typ {
                content::APPLICATION_DATA => out += n,
                content::ALERT => self.on_alert(&buf[out..out + n])?,
                content::HANDSHAKE => {
                    let message = buf[out..out + n].to_vec();
                    self.on_handshake(&message)?;
                }
                _ => return Err(self.fail(alert::UNEXPECTED_MESSAGE)),
            }
            at += HEADER + len;
        }
        if self.peer_closed {
            // Nothing after close_notify is read.
            buf.truncate(out);
            return Ok(out);
        }
        if at != out {
            buf.copy_within(at.., out);
            buf.truncate(buf.len() - (at - out));
        }
        Ok(out)
    }

    /// Opens the whole record at `region[record..]`, its payload decrypted to the start of
    /// `region` in the same pass (ring's AEADs take overlapping input and output); returns its
    /// content type and payload length.
    fn open_record(&mut self, region: &mut [u8], record: usize) -> Result<(u8, usize), TlsError> {
        let header: [u8; HEADER] = region[record..record + HEADER]
            .try_into()
            .expect("a whole record has its header");
        let typ = header[0];
        let body_len = region.len() - record - HEADER;
        match self.version {
            Version::Tls13 => {
                // After the handshake every TLS 1.3 record is an encrypted application_data
                // record (a change_cipher_spec, type 20, only comes before the peer's Finished).
                if typ != content::APPLICATION_DATA {
                    return Err(self.fail(alert::UNEXPECTED_MESSAGE));
                }
                if body_len < TAG + 1 {
                    return Err(self.fail(alert::BAD_RECORD_MAC));
                }
                let nonce = aead::Nonce::assume_unique_for_key(self.rx.nonce());
                let opened = self
                    .rx
                    .key
                    .open_within(nonce, aead::Aad::from(header), region, record + HEADER..)
                    .map(|p| p.len());
                let Ok(inner_len) = opened else {
                    return Err(self.fail(alert::BAD_RECORD_MAC));
                };
                self.rx.seq += 1;
                // The inner plaintext: content, its type, then zero padding (RFC 8446 5.4).
                let inner = &region[..inner_len];
                let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
                    return Err(self.fail(alert::UNEXPECTED_MESSAGE));
                };
                if type_at > MAX_PLAIN {
                    return Err(self.fail(alert::RECORD_OVERFLOW));
                }
                Ok((inner[type_at], type_at))
            }
            Version::Tls12 => {
                if !matches!(
                    typ,
                    content::APPLICATION_DATA | content::ALERT | content::HANDSHAKE
                ) {
                    return Err(self.fail(alert::UNEXPECTED_MESSAGE));
                }
                let explicit = if self.rx.explicit_nonce {
                    EXPLICIT_NONCE
                } else {
                    0
                };
                if body_len < explicit + TAG {
                    return Err(self.fail(alert::BAD_RECORD_MAC));
                }
                let plain_len = body_len - explicit - TAG;
                if plain_len > MAX_PLAIN {
                    return Err(self.fail(alert::RECORD_OVERFLOW));
                }
                let mut nonce = self.rx.nonce();
                if explicit > 0 {
                    let body = record + HEADER;
                    nonce[..4].copy_from_slice(&self.rx.iv[..4]);
                    nonce[4..].copy_from_slice(&region[body..body + EXPLICIT_NONCE]);
                }
                let aad = aad12(self.rx.seq, typ, [header[1], header[2]], plain_len);
                let opened = self.rx.key.open_within(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(aad),
                    region,
                    record + HEADER + explicit..,
                );
                if opened.is_err() {
                    return Err(self.fail(alert::BAD_RECORD_MAC));
                }
                self.rx.seq += 1;
                Ok((typ, plain_len))
            }
        }
    }

    fn on_alert(&mut self, payload: &[u8]) -> Result<(), TlsError> {
        match *payload {
            [_, alert::CLOSE_NOTIFY] => {
                self.peer_closed = true;
                Ok(())
            }
            [_, alert::USER_CANCELED] => Ok(()),
            // TLS 1.2 warnings are not fatal (TLS 1.3 has none besides the two above).
            [1, _] if self.version == Version::Tls12 => Ok(()),
            [_, desc] => {
                self.failed = true;
                Err(TlsError::PeerAlert(desc))
            }
            _ => Err(self.fail(alert::DECODE_ERROR)),
        }
    }

    /// Post-handshake messages: TLS 1.3 key updates and session tickets; TLS 1.2 has none
    /// (renegotiation is refused, as rustls refuses it). A message must end in its record.
    fn on_handshake(&mut self, mut messages: &[u8]) -> Result<(), TlsError> {
        if self.version == Version::Tls12 || messages.is_empty() {
            return Err(self.fail(alert::UNEXPECTED_MESSAGE));
        }
        while !messages.is_empty() {
            let [typ, a, b, c, ..] = *messages else {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE));
            };
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            let Some(body) = messages.get(4..4 + len) else {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE));
            };
            match typ {
                handshake_type::KEY_UPDATE => {
                    let requested = match *body {
                        [0] => false,
                        [1] => true,
                        [_] => return Err(self.fail(alert::ILLEGAL_PARAMETER)),
                        _ => return Err(self.fail(alert::DECODE_ERROR)),
                    };
                    // A key update must end its record: what follows uses the new key.
                    if messages.len() != 4 + len {
                        return Err(self.fail(alert::UNEXPECTED_MESSAGE));
                    }
                    let Ok((_, secrets)) = self.kernel.update_rx_secret() else {
                        return Err(self.fail(alert::INTERNAL_ERROR));
                    };
                    let Ok(keys) = Keys::new(secrets, 0, self.version) else {
                        return Err(self.fail(alert::INTERNAL_ERROR));
                    };
                    self.rx = keys;
                    if requested {
                        let mut pending = std::mem::take(&mut self.pending);
                        let updated = self.update_tx(&mut pending);
                        self.pending = pending;
                        updated?;
                    }
                }
                handshake_type::NEW_SESSION_TICKET => {
                    if R::new_session_ticket(&mut self.kernel, body).is_err() {
                        return Err(self.fail(alert::UNEXPECTED_MESSAGE));
                    }
                }
                _ => return Err(self.fail(alert::UNEXPECTED_MESSAGE)),
            }
            messages = &messages[4 + len..];
        }
        Ok(())
    }

    /// Sends a key update (not asking the peer for one) and switches to the next key.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_record(
            content::HANDSHAKE,
            &[handshake_type::KEY_UPDATE, 0, 0, 1, 0],
            out,
        );
        let Ok((_, secrets)) = self.kernel.update_tx_secret() else {
            return Err(self.fail(alert::INTERNAL_ERROR));
        };
        let Ok(keys) = Keys::new(secrets, 0, self.version) else {
            return Err(self.fail(alert::INTERNAL_ERROR));
        };
        self.tx = keys;
        Ok(())
    }

    /// Marks the session failed and queues the fatal `alert` (sent by [`Self::flush`]).
    fn fail(&mut self, desc: u8) -> TlsError {
        if !self.failed {
            self.failed = true;
            let mut pending = std::mem::take(&mut self.pending);
            self.seal_record(content::ALERT, &[2, desc], &mut pending);
            self.pending = pending;
        }
        TlsError::Refused(desc)
    }

    /// Moves the records waiting to be sent into `out`.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pending);
        self.pending.clear();
    }

    /// Appends the records waiting to be sent and then `plain`, encrypted, to `out`: the
    /// payload's one copy is into `out`, where it is encrypted in place.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.flush(out);
        if self.failed || self.sent_close {
            return Err(TlsError::Exhausted);
        }
        out.reserve(plain.len() + plain.len().div_ceil(MAX_PLAIN) * RECORD_OVERHEAD);
        for chunk in plain.chunks(MAX_PLAIN) {
            if self.tx.seq >= self.tx_limit {
                match self.version {
                    Version::Tls13 => self.update_tx(out)?,
                    Version::Tls12 => {
                        self.failed = true;
                        return Err(TlsError::Exhausted);
                    }
                }
            }
            self.seal_record(content::APPLICATION_DATA, chunk, out);
        }
        Ok(())
    }

    /// Appends the records waiting to be sent and a close_notify to `out` (once).
    pub fn close(&mut self, out: &mut Vec<u8>) {
        self.flush(out);
        if !self.failed && !self.sent_close {
            self.sent_close = true;
            self.seal_record(content::ALERT, &[1, alert::CLOSE_NOTIFY], out);
        }
    }

    /// Seals one record of at most [`MAX_PLAIN`] bytes onto `out`.
    fn seal_record(&mut self, typ: u8, payload: &[u8], out: &mut Vec<u8>) {
        debug_assert!(payload.len() <= MAX_PLAIN);
        let start = out.len();
        let nonce = self.tx.nonce();
        let (outer, explicit, inner_type, aad) = match self.version {
            Version::Tls13 => {
                let len = payload.len() + 1 + TAG;
                let header = record_header(content::APPLICATION_DATA, len);
                (header, 0, Some(typ), Aad::Header(header))
            }
            Version::Tls12 => {
                let explicit = if self.tx.explicit_nonce {
                    EXPLICIT_NONCE
                } else {
                    0
                };
                let header = record_header(typ, explicit + payload.len() + TAG);
                let aad = aad12(self.tx.seq, typ, [3, 3], payload.len());
                (header, explicit, None, Aad::Tls12(aad))
            }
        };
        out.extend_from_slice(&outer);
        out.extend_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
        out.extend_from_slice(payload);
        out.extend(inner_type);
        let body = &mut out[start + HEADER + explicit..];
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        let sealed = match aad {
            Aad::Header(h) => {
                self.tx
                    .key
                    .seal_in_place_separate_tag(nonce, aead::Aad::from(h), body)
            }
            Aad::Tls12(a) => {
                self.tx
                    .key
                    .seal_in_place_separate_tag(nonce, aead::Aad::from(a), body)
            }
        };
        // ring fails only for inputs far over a record (about 64 GiB for AES-GCM).
        let tag = sealed.expect("a TLS record is within the AEAD's input limit");
        out.extend_from_slice(tag.as_ref());
        self.tx.seq += 1;
    }
}

/// The additional data of a record: its header (TLS 1.3) or the TLS 1.2 pseudo-header.
enum Aad {
    Header([u8; HEADER]),
    Tls12([u8; 13]),
}

fn record_header(typ: u8, len: usize) -> [u8; HEADER] {
    let [hi, lo] = u16::try_from(len)
        .expect("a TLS record body fits in 16 bits")
        .to_be_bytes();
    [typ, 3, 3, hi, lo]
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length (RFC 5246
/// 6.2.3.3).
fn aad12(seq: u64, typ: u8, version: [u8; 2], plain_len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
    aad
}
