//! API keys: authentication with a short-lived cache, last-used times, and the `/v1/keys`
//! routes to list, create and revoke them.
//!
//! A key authenticates from the cache for at most [`KEY_CACHE_TTL_MS`] before the store is
//! asked again, so a revoke reaches every node of a fleet within that time even if its bus
//! message is lost; normally the revoking node forgets the key at once and the others as soon
//! as the bus tells them.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::api::{ApiJson, ApiPath, ApiQuery};
use super::error::{ApiError, ErrorEnvelope};
use super::views::validate_display_name;
use super::{fleet, ControlPlane};
use crate::clock::{rfc3339, Millis};
use crate::store::{Account, ApiKey, KeyOrigin, NewApiKey};
use crate::token::{self, SecretHash};

/// How long a key is trusted from the cache before the store is asked again: the longest a
/// revoke whose bus message was lost goes unnoticed on another node.
pub const KEY_CACHE_TTL_MS: i64 = 10_000;
/// A key's last-used time is written at most once a minute per key and node: "last used" to
/// the minute is what people read it for, and a write per request would be a write per request.
pub const LAST_USED_WRITE_MS: i64 = 60_000;

/// An authenticated key, as cached.
#[derive(Debug, Clone)]
struct CachedKey {
    account: Account,
    key_id: String,
    /// When the store last confirmed the key.
    checked_at: Millis,
    /// The last-used time last written (or read) for the key.
    used_written_at: Millis,
}

/// API key hash -> the key's account, filled on use and expired after [`KEY_CACHE_TTL_MS`].
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: DashMap<SecretHash, CachedKey>,
    /// Counts forgets: a key read from the store before a revoke is not cached after it.
    forgets: AtomicU64,
}

impl KeyCache {
    /// Forgets a key (revoked here or on another node).
    pub fn forget(&self, key_id: &str) {
        self.forgets.fetch_add(1, Ordering::SeqCst);
        self.keys.retain(|_, k| k.key_id != key_id);
    }

    /// Forgets every key (after a gap in the fleet bus: revokes may have been missed).
    pub fn clear(&self) {
        self.forgets.fetch_add(1, Ordering::SeqCst);
        self.keys.clear();
    }
}

/// The authenticated caller and the key it used.
#[derive(Debug, Clone)]
pub struct KeyCaller {
    /// The account.
    pub account: Account,
    /// The id of the key in the request.
    pub key_id: String,
}

impl ControlPlane {
    /// The account an API key belongs to, and the key's id.
    pub async fn authenticate_key(&self, api_key: &str) -> Result<KeyCaller, ApiError> {
        let hash = token::hash_secret(api_key);
        let now = self.clock.now_ms();
        let fresh = |k: &CachedKey| (0..KEY_CACHE_TTL_MS).contains(&(now - k.checked_at));
        let forgets = self.keys.forgets.load(Ordering::SeqCst);
        let cached = self
            .keys
            .keys
            .get(&hash)
            .filter(|k| fresh(k))
            .map(|k| k.clone());
        let (mut key, mut changed) = match cached {
            Some(k) => (k, false),
            None => match self.store.account_by_key(hash).await? {
                Some((account, key)) => {
                    let key = CachedKey {
                        account,
                        used_written_at: key.last_used_at.unwrap_or(Millis::MIN),
                        key_id: key.id,
                        checked_at: now,
                    };
                    (key, true)
                }
                None => {
                    self.keys.keys.remove(&hash);
                    return Err(ApiError::unauthorized("invalid API key"));
                }
            },
        };
        if now.saturating_sub(key.used_written_at) >= LAST_USED_WRITE_MS {
            key.used_written_at = now;
            changed = true;
            // Awaited, so a list right after shows the use; this happens once a minute per
            // key, and a failure only delays the record.
            if let Err(e) = self.store.touch_api_key(key.key_id.clone(), now).await {
                tracing::warn!(error = %e, key_id = %key.key_id, "cannot record a key's use");
            }
        }
        let caller = KeyCaller {
            account: key.account.clone(),
            key_id: key.key_id.clone(),
        };
        if changed {
            self.keys.keys.insert(hash, key);
            // A forget since the store was read may have missed this entry (it came after):
            // drop it. One after this check sees the entry and drops it itself.
            if self.keys.forgets.load(Ordering::SeqCst) != forgets {
                self.keys.keys.remove(&hash);
            }
        }
        Ok(caller)
    }

    /// Revokes a key: of the caller's account, or of any account for the admin. Every node
    /// stops accepting it (here at once, elsewhere when the bus tells them).
    pub async fn revoke_key(&self, caller: &Account, key_id: &str) -> Result<ApiKey, ApiError> {
        let scope = (!caller.is_admin).then(|| caller.id.clone());
        let key = self
            .store
            .revoke_api_key(scope, key_id.into(), self.clock.now_ms())
            .await
            .map_err(|e| ApiError::from_store(e, "API key"))?;
        self.keys.forget(&key.id);
        self.publish(fleet::FleetMsg::KeyRevoked {
            key_id: key.id.clone(),
        })
        .await;
        tracing::info!(key_id = %key.id, account_id = %key.account_id, "API key revoked");
        Ok(key)
    }
}

impl FromRequestParts<Arc<ControlPlane>> for KeyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, ApiError> {
        let key = super::api::bearer_key(parts)?;
        cp.authenticate_key(key).await
    }
}

/// `POST /v1/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A label for people, e.g. what uses the key.
    pub name: String,
    /// The account the key is for (admin only); default the caller's.
    pub account_id: Option<String>,
}

/// `GET /v1/keys` query.
#[derive(Debug, Deserialize, IntoParams)]
pub struct KeyQuery {
    /// Only this account's keys (admin only; others always see only their own).
    pub account_id: Option<String>,
}

/// An API key as listed: never its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    /// Public id, what `DELETE /v1/keys/{key_id}` takes.
    pub key_id: String,
    /// The account it authenticates as.
    pub account_id: String,
    /// Its label.
    pub name: String,
    /// `env` (IOTUNNEL_ADMIN_KEY), `generated` (first start), `account` (with the account) or
    /// `api` (POST /v1/keys).
    pub origin: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339 time of its last use, recorded at most once a minute; absent if never used.
    pub last_used_at: Option<String>,
    /// Whether this is the key of the request that lists it.
    pub current: bool,
}

impl KeyView {
    fn new(k: ApiKey, current_key: &str) -> Self {
        Self {
            current: k.id == current_key,
            key_id: k.id,
            account_id: k.account_id,
            name: k.name,
            origin: k.origin.as_str().into(),
            created_at: rfc3339(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// `GET /v1/keys`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// The unrevoked keys, oldest first.
    pub keys: Vec<KeyView>,
}

/// A created key, with its secret (shown once).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyCreated {
    /// Public id.
    pub key_id: String,
    /// The account it authenticates as.
    pub account_id: String,
    /// Its label.
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// The API key; shown only now.
    pub api_key: String,
}

fn forbidden(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("only the admin key may {what}"),
    )
}

/// Lists unrevoked API keys: the caller's account's, or every account's for the admin.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(KeyQuery),
    responses((status = 200, body = KeyList), (status = 403, body = ErrorEnvelope)))]
pub(super) async fn list_keys(
    State(cp): State<Arc<ControlPlane>>,
    me: KeyCaller,
    ApiQuery(q): ApiQuery<KeyQuery>,
) -> Result<Json<KeyList>, ApiError> {
    let wanted = q.account_id.filter(|a| !a.is_empty());
    let scope = match (me.account.is_admin, wanted) {
        (true, wanted) => wanted,
        (false, Some(a)) if a != me.account.id => {
            return Err(forbidden("list other accounts' keys"))
        }
        (false, _) => Some(me.account.id.clone()),
    };
    let keys = cp.store.list_api_keys(scope).await?;
    Ok(Json(KeyList {
        keys: keys
            .into_iter()
            .map(|k| KeyView::new(k, &me.key_id))
            .collect(),
    }))
}

/// Creates an API key for the caller's account (or, admin only, another's); shown once.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = KeyCreated), (status = 400, body = ErrorEnvelope),
        (status = 403, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
pub(super) async fn create_key(
    State(cp): State<Arc<ControlPlane>>,
    me: KeyCaller,
    ApiJson(req): ApiJson<CreateKey>,
) -> Result<impl IntoResponse, ApiError> {
    let name = validate_display_name("name", &req.name)?;
    let account_id = match req.account_id.filter(|a| !a.is_empty()) {
        Some(a) if a != me.account.id && !me.account.is_admin => {
            return Err(forbidden("create keys for other accounts"))
        }
        Some(a) => a,
        None => me.account.id.clone(),
    };
    let api_key = format!("itk_{}", token::random_secret());
    let new = NewApiKey {
        id: token::new_key_id(),
        account_id,
        name,
        origin: KeyOrigin::Api,
        key_hash: token::hash_secret(&api_key),
        created_at: cp.clock.now_ms(),
    };
    let key = cp
        .store
        .add_api_key(new)
        .await
        .map_err(|e| ApiError::from_store(e, "account"))?;
    tracing::info!(key_id = %key.id, account_id = %key.account_id, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            key_id: key.id,
            account_id: key.account_id,
            name: key.name,
            created_at: rfc3339(key.created_at),
            api_key,
        }),
    ))
}

/// Revokes an API key at once: of the caller's account, or of any account for the admin.
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "keys",
    params(("key_id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorEnvelope)))]
pub(super) async fn revoke_key(
    State(cp): State<Arc<ControlPlane>>,
    me: KeyCaller,
    ApiPath(key_id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    cp.revoke_key(&me.account, &key_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
