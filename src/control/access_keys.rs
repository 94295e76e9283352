//! Access key pairs: the credentials the vendor facades' SDKs sign with (AWS SigV4, Alibaba's
//! ACS3 and HMAC-SHA1 signatures), managed on `/v1/access-keys` with the native Bearer API.
//!
//! Signature schemes need the secret itself (both ends compute the same HMAC), so it cannot be
//! stored as a hash like API keys. It is sealed instead: AES-256-GCM under the server's
//! access-key encryption key, with the key id as associated data (a sealed secret copied onto
//! another key's row does not open). That key lives outside the database: generated into
//! `{data-dir}/access-key.key` on a single node, and given to every node of a fleet by
//! `--access-key-encryption-key`. A copy of the database alone reveals no secret.
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{ApiPath, Caller};
use super::error::{ApiError, ErrorEnvelope};
use super::ControlPlane;
use crate::clock::rfc3339;
use crate::store::{AccessKey, Account};
use crate::token;

/// Prefix of access key ids (AWS ids start `AKIA`, Alibaba's `LTAI`; ours say whose they are).
pub const KEY_ID_PREFIX: &str = "IOTK";
/// Random characters after the prefix: 20 in all, the length of an AWS access key id.
const KEY_ID_RANDOM: usize = 16;
/// Characters of a secret: 40, as AWS's, of 62 symbols (about 238 bits).
const SECRET_LEN: usize = 40;
/// Most access keys per account (AWS allows 2 per IAM user; a few more for rotation).
pub const MAX_KEYS_PER_ACCOUNT: usize = 10;

/// Seals and opens access-key secrets with the server's access-key encryption key.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    /// A sealer under a 256-bit key.
    pub fn new(key: &[u8; 32]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key");
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// The sealed form of `secret` for key `key_id`: a random 96-bit nonce, then the
    /// ciphertext and its tag (random nonces are safe far beyond the keys an account holds).
    pub fn seal(&self, key_id: &str, secret: &str) -> Vec<u8> {
        let nonce_bytes = token::random_bytes::<NONCE_LEN>();
        let mut out = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(key_id.as_bytes()),
                &mut out,
            )
            .expect("sealing a short secret cannot fail");
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&out);
        sealed
    }

    /// The secret sealed for `key_id`, or `None` when it was sealed under another server key
    /// (or for another key id, or altered).
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Option<String> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(key_id.as_bytes()), &mut buf)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

/// An access key's verified owner and its secret in clear, for checking one signature.
#[derive(Clone)]
pub struct Credential {
    /// The access key id.
    pub key_id: String,
    /// The secret access key.
    pub secret: String,
    /// The account it belongs to.
    pub account: Account,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Why a signing key could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialError {
    /// No such key id (never created, or revoked).
    Unknown,
    /// This node has no access-key encryption key (a fleet without the flag) or another one.
    Unavailable(String),
}

impl ControlPlane {
    fn sealer(&self) -> Result<&Sealer, ApiError> {
        self.access_keys.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "access_keys_unavailable",
                "access keys need --access-key-encryption-key (the same on every node of the \
                 fleet)",
            )
        })
    }

    /// The credential of an access key id, read from the store on every call so that a
    /// revocation applies at once on every node.
    pub async fn credential(&self, key_id: &str) -> Result<Credential, CredentialError> {
        let sealer = self.access_keys.as_deref().ok_or_else(|| {
            CredentialError::Unavailable("this server has no access-key encryption key".into())
        })?;
        let found = self
            .store
            .access_key(key_id.to_string())
            .await
            .map_err(|e| CredentialError::Unavailable(e.to_string()))?;
        let (key, account) = found.ok_or(CredentialError::Unknown)?;
        let secret = sealer.open(&key.id, &key.sealed_secret).ok_or_else(|| {
            tracing::error!(key_id = %key.id, "access key does not open with this server's \
                access-key encryption key");
            CredentialError::Unavailable("access key sealed under another server key".into())
        })?;
        Ok(Credential {
            key_id: key.id,
            secret,
            account,
        })
    }
}

/// A new access key pair; the secret is shown only now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessKeyCreated {
    /// The access key id (AWS `aws_access_key_id`, Alibaba `access_key_id`).
    pub access_key_id: String,
    /// The secret (AWS `aws_secret_access_key`, Alibaba `access_key_secret`); shown only now.
    pub secret_access_key: String,
    /// Creation time.
    pub created_at: String,
}

/// An access key, without its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessKeyView {
    /// The access key id.
    pub access_key_id: String,
    /// Creation time.
    pub created_at: String,
}

/// `GET /v1/access-keys`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessKeyList {
    /// The account's access keys, oldest first.
    pub access_keys: Vec<AccessKeyView>,
}

impl From<AccessKey> for AccessKeyView {
    fn from(k: AccessKey) -> Self {
        Self {
            access_key_id: k.id,
            created_at: rfc3339(k.created_at),
        }
    }
}

type Cp = State<Arc<ControlPlane>>;

/// Creates an access key pair for the caller's account; the secret is shown once.
#[utoipa::path(post, path = "/v1/access-keys", tag = "access-keys",
    responses((status = 201, body = AccessKeyCreated), (status = 409, body = ErrorEnvelope),
        (status = 503, body = ErrorEnvelope)))]
pub async fn create_access_key(
    State(cp): Cp,
    Caller(me): Caller,
) -> Result<impl IntoResponse, ApiError> {
    let sealer = cp.sealer()?;
    if cp.store.list_access_keys(me.id.clone()).await?.len() >= MAX_KEYS_PER_ACCOUNT {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "access_key_limit",
            format!("an account holds at most {MAX_KEYS_PER_ACCOUNT} access keys; delete one"),
        ));
    }
    let id = format!(
        "{KEY_ID_PREFIX}{}",
        token::random_alnum(KEY_ID_RANDOM).to_uppercase()
    );
    let secret = token::random_alnum(SECRET_LEN);
    let key = AccessKey {
        sealed_secret: sealer.seal(&id, &secret),
        id,
        account_id: me.id,
        created_at: cp.clock.now_ms(),
    };
    cp.store
        .create_access_key(key.clone())
        .await
        .map_err(|e| ApiError::from_store(e, "access key"))?;
    tracing::info!(access_key_id = %key.id, account_id = %key.account_id, "access key created");
    Ok((
        StatusCode::CREATED,
        Json(AccessKeyCreated {
            access_key_id: key.id,
            secret_access_key: secret,
            created_at: rfc3339(key.created_at),
        }),
    ))
}

/// Lists the caller's access keys (ids only).
#[utoipa::path(get, path = "/v1/access-keys", tag = "access-keys",
    responses((status = 200, body = AccessKeyList)))]
pub async fn list_access_keys(
    State(cp): Cp,
    Caller(me): Caller,
) -> Result<Json<AccessKeyList>, ApiError> {
    let keys = cp.store.list_access_keys(me.id).await?;
    Ok(Json(AccessKeyList {
        access_keys: keys.into_iter().map(Into::into).collect(),
    }))
}

/// Revokes an access key of the caller's account: requests signed with it fail at once.
#[utoipa::path(delete, path = "/v1/access-keys/{access_key_id}", tag = "access-keys",
    params(("access_key_id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorEnvelope)))]
pub async fn delete_access_key(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(key_id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    cp.store
        .delete_access_key(me.id, key_id.clone())
        .await
        .map_err(|e| ApiError::from_store(e, "access key"))?;
    tracing::info!(access_key_id = %key_id, "access key revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_id() {
        let a = Sealer::new(&[1; 32]);
        let b = Sealer::new(&[2; 32]);
        let sealed = a.seal("IOTK1", "s3cret");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(a.open("IOTK1", &sealed).as_deref(), Some("s3cret"));
        assert_eq!(a.open("IOTK2", &sealed), None);
        assert_eq!(b.open("IOTK1", &sealed), None);
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(a.open("IOTK1", &altered), None);
        assert_eq!(a.open("IOTK1", &sealed[..5]), None);
    }
}
