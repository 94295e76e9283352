//! Secrets: API keys, tunnel tokens and device secrets. Only SHA-256 hashes of API keys and
//! tunnel tokens are stored; comparisons are constant time.
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A SHA-256 digest of a secret: what the store and the tunnel index keep.
pub type SecretHash = [u8; 32];

/// Bytes of entropy in every token and key: 256 bits, as DESIGN.md requires.
const SECRET_BYTES: usize = 32;

/// A fresh 256-bit random secret, base64url without padding (43 characters).
pub fn random_secret() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<SECRET_BYTES>())
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// A random string of `len` characters from `[A-Za-z0-9]`.
pub fn random_alnum(len: usize) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::rngs::OsRng, len)
}

/// SHA-256 of a secret as presented on the wire.
pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time equality of two hashes.
pub fn hashes_equal(a: &SecretHash, b: &SecretHash) -> bool {
    a.ct_eq(b).into()
}

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Derives a tunnel's device token from the server's token key and the tunnel's seed.
///
/// The device token must be re-sent on every device-channel reconnect (DESIGN.md: "replay"),
/// yet tokens are never stored in clear. Deriving it as HMAC(server key, tunnel id, seed) keeps
/// only the hash and a random seed in the store: the store alone cannot produce a token.
pub fn derive_device_token(token_key: &[u8], tunnel_id: &str, seed: &[u8]) -> String {
    let mut msg = Vec::with_capacity(tunnel_id.len() + seed.len() + 8);
    msg.extend_from_slice(b"device\n");
    msg.extend_from_slice(tunnel_id.as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(seed);
    URL_SAFE_NO_PAD.encode(hmac_sha256(token_key, &msg))
}

/// A tunnel id: 128 random bits in the familiar 8-4-4-4-12 hex layout.
pub fn new_tunnel_id() -> String {
    let b = hex::encode(random_bytes::<16>());
    format!(
        "{}-{}-{}-{}-{}",
        &b[..8],
        &b[8..12],
        &b[12..16],
        &b[16..20],
        &b[20..]
    )
}

/// An API key's public id: 64 random bits, enough to never collide among one fleet's keys.
pub fn new_key_id() -> String {
    format!("key_{}", hex::encode(random_bytes::<8>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_bit_and_distinct() {
        let a = random_secret();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_ne!(a, random_secret());
    }

    #[test]
    fn device_token_depends_on_key_tunnel_and_seed() {
        let t = derive_device_token(b"k1", "t", b"s");
        assert_eq!(t, derive_device_token(b"k1", "t", b"s"));
        assert_ne!(t, derive_device_token(b"k2", "t", b"s"));
        assert_ne!(t, derive_device_token(b"k1", "u", b"s"));
        assert_ne!(t, derive_device_token(b"k1", "t", b"r"));
    }

    #[test]
    fn hash_compare() {
        assert!(hashes_equal(&hash_secret("a"), &hash_secret("a")));
        assert!(!hashes_equal(&hash_secret("a"), &hash_secret("b")));
    }
}
