//! The AWS IoT Secure Tunneling control API as a facade over the control plane, so that boto3,
//! the AWS CLI and other AWS SDKs drive iotunnel with only `endpoint_url` and keys changed.
//!
//! Protocol (botocore's `iotsecuretunneling` 2018-10-05 service model): JSON 1.1, `POST /`,
//! the operation in `X-Amz-Target: IoTSecuredTunneling.<Operation>`, SigV4 with the signing
//! name `IoTSecuredTunneling` and any region, errors as `{"__type", "message"}`, timestamps
//! as epoch seconds. Every operation of the model is served; where iotunnel differs from AWS
//! (README, "AWS and Alibaba SDKs") it says so in the error message.
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{current_request_id, ApiError};
use super::views::{decode_page_token, encode_page_token};
use super::views::{validate_services, validate_text, MAX_DESCRIPTION_BYTES, MAX_PAGE_SIZE};
use super::{sigv4, thing, ControlPlane, TunnelSpec};
use crate::metrics::RouteLabel;
use crate::seam::Side;
use crate::store::{Account, PeerStatus, Tunnel, TunnelFilter};

/// The `X-Amz-Target` prefix of every operation.
pub const TARGET_PREFIX: &str = "IoTSecuredTunneling.";
/// SigV4 signing name of the service.
pub const SIGNING_NAME: &str = "IoTSecuredTunneling";
/// The operations of the model, and the metric route label of each (bounded: one per
/// operation, plus `aws:unknown` for anything else).
pub const OPERATIONS: &[(&str, &str)] = &[
    ("OpenTunnel", "aws:OpenTunnel"),
    ("CloseTunnel", "aws:CloseTunnel"),
    ("DescribeTunnel", "aws:DescribeTunnel"),
    ("ListTunnels", "aws:ListTunnels"),
    ("RotateTunnelAccessToken", "aws:RotateTunnelAccessToken"),
    ("TagResource", "aws:TagResource"),
    ("UntagResource", "aws:UntagResource"),
    ("ListTagsForResource", "aws:ListTagsForResource"),
];
/// Route label of requests naming no known operation.
pub const UNKNOWN_LABEL: &str = "aws:unknown";
/// AWS's default and largest `maxLifetimeTimeoutMinutes` (12 hours).
const MAX_TIMEOUT_MINUTES: u32 = 720;
/// Most tags on one request (AWS allows 50 per resource).
const MAX_TAGS: usize = 50;
/// Most readings of a thing name tried against the store (each is one lookup).
const MAX_THING_READINGS: usize = 8;

const JSON_11: &str = "application/x-amz-json-1.1";

/// An error as AWS sends it: `__type` is what botocore turns into an exception class.
#[derive(Debug, Clone)]
pub struct AwsError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl AwsError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ValidationException", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }
}

impl From<ApiError> for AwsError {
    fn from(e: ApiError) -> Self {
        let (status, code) = match e.code {
            "not_found" => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            "tunnel_limit" => (StatusCode::BAD_REQUEST, "LimitExceededException"),
            "store_unavailable" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
            ),
            _ if e.status.is_server_error() => (e.status, "InternalFailure"),
            _ => (StatusCode::BAD_REQUEST, "ValidationException"),
        };
        Self::new(status, code, e.message)
    }
}

impl From<crate::store::StoreError> for AwsError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from_store(e, "tunnel").into()
    }
}

fn respond(status: StatusCode, body: Value, error_type: Option<&str>) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static(JSON_11));
    if let Ok(v) = HeaderValue::from_str(&current_request_id()) {
        h.insert("x-amzn-requestid", v);
    }
    if let Some(v) = error_type.and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert("x-amzn-errortype", v);
    }
    resp
}

impl IntoResponse for AwsError {
    fn into_response(self) -> Response {
        tracing::info!(code = self.code, message = %self.message, "AWS request refused");
        respond(
            self.status,
            json!({"__type": self.code, "message": self.message}),
            Some(self.code),
        )
    }
}

/// Serves one AWS request (`POST /` with `X-Amz-Target`), labelled for the API metrics.
pub async fn serve(
    cp: Arc<ControlPlane>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: &[u8],
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let op = target
        .strip_prefix(TARGET_PREFIX)
        .and_then(|op| OPERATIONS.iter().find(|(name, _)| *name == op));
    let label = op.map_or(UNKNOWN_LABEL, |(_, label)| label);
    let mut resp = match authenticate(&cp, &method, &uri, &headers, body).await {
        Err(e) => e.into_response(),
        Ok((account, region)) => match op {
            None => AwsError::new(
                StatusCode::BAD_REQUEST,
                "UnknownOperationException",
                format!("unknown operation {target:?}"),
            )
            .into_response(),
            Some((name, _)) => {
                let ctx = Ctx {
                    cp: &cp,
                    account,
                    region,
                };
                match ctx.run(name, body).await {
                    Ok(v) => respond(StatusCode::OK, v, None),
                    Err(e) => e.into_response(),
                }
            }
        },
    };
    resp.extensions_mut().insert(RouteLabel(label));
    resp
}

/// Checks the SigV4 signature; the caller's account and the region it signed for.
async fn authenticate(
    cp: &ControlPlane,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Account, String), AwsError> {
    let sig_err = |e: sigv4::SigError| {
        let status = match e {
            sigv4::SigError::Incomplete(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::FORBIDDEN,
        };
        AwsError::new(status, e.code(), e.message())
    };
    let auth = sigv4::parse(headers, SIGNING_NAME, cp.clock.now_ms()).map_err(sig_err)?;
    let cred = cp.credential(&auth.key_id).await.map_err(|e| match e {
        super::access_keys::CredentialError::Unknown => AwsError::new(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ),
        super::access_keys::CredentialError::Unavailable(why) => AwsError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            format!("access keys cannot be checked on this server: {why}"),
        ),
    })?;
    sigv4::verify(
        &cred.secret,
        &auth,
        method.as_str(),
        uri.path(),
        uri.query().unwrap_or_default(),
        headers,
        body,
    )
    .map_err(sig_err)?;
    Ok((cred.account, auth.region))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AwsError> {
    let body = if body.is_empty() {
        b"{}" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        AwsError::new(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            format!("cannot read the request: {e}"),
        )
    })
}

/// Epoch seconds, as the JSON protocol writes timestamps.
fn epoch(ms: i64) -> Value {
    json!(ms as f64 / 1000.0)
}

/// Drops `null` members: absent is how AWS writes an unset field.
fn compact(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, compact(v)))
                .collect::<Map<_, _>>(),
        ),
        other => other,
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DestinationConfig {
    thing_name: Option<String>,
    #[serde(default)]
    services: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutConfig {
    max_lifetime_timeout_minutes: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Tag {
    key: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenTunnelRequest {
    description: Option<String>,
    tags: Option<Vec<Tag>>,
    destination_config: Option<DestinationConfig>,
    timeout_config: Option<TimeoutConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TunnelIdRequest {
    tunnel_id: String,
    #[serde(default)]
    delete: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListTunnelsRequest {
    thing_name: Option<String>,
    max_results: Option<u32>,
    next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotateRequest {
    tunnel_id: String,
    client_mode: String,
    destination_config: Option<DestinationConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TagResourceRequest {
    resource_arn: String,
    #[serde(default)]
    tags: Vec<Tag>,
    #[serde(default)]
    tag_keys: Vec<String>,
}

/// One authenticated request.
struct Ctx<'a> {
    cp: &'a ControlPlane,
    account: Account,
    region: String,
}

impl Ctx<'_> {
    async fn run(&self, op: &str, body: &[u8]) -> Result<Value, AwsError> {
        match op {
            "OpenTunnel" => self.open_tunnel(parse(body)?).await,
            "CloseTunnel" => self.close_tunnel(parse(body)?).await,
            "DescribeTunnel" => self.describe_tunnel(parse(body)?).await,
            "ListTunnels" => self.list_tunnels(parse(body)?).await,
            "RotateTunnelAccessToken" => self.rotate(parse(body)?).await,
            "TagResource" => self.tag_resource(parse(body)?).await,
            "UntagResource" => self.untag_resource(parse(body)?).await,
            _ => self.list_tags(parse(body)?).await,
        }
    }

    fn arn(&self, tunnel_id: &str) -> String {
        format!(
            "arn:aws:iot:{}:{}:tunnel/{tunnel_id}",
            self.region, self.account.id
        )
    }

    fn thing_of(&self, t: &Tunnel) -> String {
        thing::thing_name(
            &self.cp.settings.thing_template,
            &t.product_key,
            &t.device_name,
        )
    }

    /// The account's device named by a thing name, if any.
    async fn resolve_thing(&self, thing: &str) -> Result<Option<(String, String)>, AwsError> {
        let valid = !thing.is_empty()
            && thing.len() <= 128
            && thing
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":_-".contains(&b));
        if !valid {
            return Err(AwsError::validation(format!(
                "thingName {thing:?} must match [a-zA-Z0-9:_-]{{1,128}}"
            )));
        }
        let store = &self.cp.store;
        let readings = thing::candidates(&self.cp.settings.thing_template, thing);
        for (pk, dn) in readings.into_iter().take(MAX_THING_READINGS) {
            let products = match pk {
                Some(pk) => vec![pk],
                None => store
                    .list_products(self.account.id.clone())
                    .await?
                    .into_iter()
                    .map(|p| p.product_key)
                    .collect(),
            };
            for pk in products {
                let device = store.get_device(pk, dn.clone()).await?;
                if let Some(d) = device.filter(|d| d.account_id == self.account.id) {
                    return Ok(Some((d.product_key, d.name)));
                }
            }
        }
        Ok(None)
    }

    async fn tunnel(&self, tunnel_id: &str) -> Result<Tunnel, AwsError> {
        self.cp
            .store
            .get_tunnel(self.account.id.clone(), tunnel_id.to_string())
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => {
                    AwsError::not_found(format!("Tunnel {tunnel_id} not found"))
                }
                e => e.into(),
            })
    }

    async fn open_tunnel(&self, req: OpenTunnelRequest) -> Result<Value, AwsError> {
        let dest = req.destination_config.ok_or_else(|| {
            AwsError::validation(
                "iotunnel opens tunnels to a device: destinationConfig with a thingName is \
                 required",
            )
        })?;
        let thing = dest.thing_name.ok_or_else(|| {
            AwsError::validation("iotunnel opens tunnels to a device: thingName is required")
        })?;
        let services = validate_services(Some(dest.services))?;
        let minutes = req
            .timeout_config
            .and_then(|t| t.max_lifetime_timeout_minutes)
            .unwrap_or(MAX_TIMEOUT_MINUTES);
        let max = self.cp.settings.max_lifetime_seconds;
        if !(1..=MAX_TIMEOUT_MINUTES).contains(&minutes) || minutes * 60 > max {
            return Err(AwsError::validation(format!(
                "maxLifetimeTimeoutMinutes must be from 1 to {}",
                MAX_TIMEOUT_MINUTES.min(max / 60)
            )));
        }
        let tags = validate_tags(req.tags.unwrap_or_default())?;
        let description = validate_text("description", req.description, MAX_DESCRIPTION_BYTES)?;
        let (product_key, device_name) = self
            .resolve_thing(&thing)
            .await?
            .ok_or_else(|| AwsError::not_found(format!("Thing {thing} not found")))?;
        let spec = TunnelSpec {
            product_key,
            device_name,
            custom_info: None,
            description,
            services,
            lifetime_seconds: minutes * 60,
            require_online: false,
        };
        let created = self.cp.create_tunnel(&self.account, spec).await?;
        let t = &created.tunnel;
        if !tags.is_empty() {
            self.cp
                .store
                .tag_tunnel(self.account.id.clone(), t.id.clone(), tags)
                .await?;
        }
        Ok(json!({
            "tunnelId": t.id,
            "tunnelArn": self.arn(&t.id),
            "sourceAccessToken": created.client_token,
            "destinationAccessToken": self.cp.device_token(t),
        }))
    }

    async fn close_tunnel(&self, req: TunnelIdRequest) -> Result<Value, AwsError> {
        self.tunnel(&req.tunnel_id).await?;
        match self.cp.close_tunnel(&self.account.id, &req.tunnel_id).await {
            // AWS closes a CLOSED tunnel without complaint (and then deletes it if asked).
            Err(e) if e.code == "tunnel_not_open" => {}
            r => drop(r?),
        }
        if req.delete {
            self.cp
                .delete_tunnel(&self.account.id, &req.tunnel_id)
                .await?;
        }
        Ok(json!({}))
    }

    async fn describe_tunnel(&self, req: TunnelIdRequest) -> Result<Value, AwsError> {
        let t = self.tunnel(&req.tunnel_id).await?;
        let tags = self
            .cp
            .store
            .tunnel_tags(self.account.id.clone(), t.id.clone())
            .await?;
        let tags: Vec<Value> = tags
            .into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let state = |p: &PeerStatus| {
            json!({
                "status": if p.connected { "CONNECTED" } else { "DISCONNECTED" },
                "lastUpdatedAt": epoch(p.updated_at.unwrap_or(t.created_at)),
            })
        };
        Ok(compact(json!({"tunnel": {
            "tunnelId": t.id,
            "tunnelArn": self.arn(&t.id),
            "status": t.state.as_str(),
            "sourceConnectionState": state(&t.client),
            "destinationConnectionState": state(&t.device),
            "description": t.description,
            "destinationConfig": {"thingName": self.thing_of(&t), "services": t.services},
            "timeoutConfig": {
                "maxLifetimeTimeoutMinutes": (t.expires_at - t.created_at) / 60_000,
            },
            "tags": (!tags.is_empty()).then_some(tags),
            "createdAt": epoch(t.created_at),
            "lastUpdatedAt": epoch(last_updated(&t)),
        }})))
    }

    async fn list_tunnels(&self, req: ListTunnelsRequest) -> Result<Value, AwsError> {
        let limit = req.max_results.unwrap_or(MAX_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(AwsError::validation(format!(
                "maxResults must be from 1 to {MAX_PAGE_SIZE}"
            )));
        }
        let mut filter = TunnelFilter::default();
        if let Some(thing) = req.thing_name.as_deref() {
            match self.resolve_thing(thing).await? {
                Some((pk, dn)) => {
                    filter.product_key = Some(pk);
                    filter.device_name = Some(dn);
                }
                None => return Ok(json!({"tunnelSummaries": []})),
            }
        }
        let before = req
            .next_token
            .as_deref()
            .map(decode_page_token)
            .transpose()
            .map_err(|_| AwsError::validation("nextToken is not one this service issued"))?;
        let page = self
            .cp
            .store
            .search_tunnels(self.account.id.clone(), filter, before, limit)
            .await?;
        let summaries: Vec<Value> = page
            .tunnels
            .iter()
            .map(|t| {
                compact(json!({
                    "tunnelId": t.id,
                    "tunnelArn": self.arn(&t.id),
                    "status": t.state.as_str(),
                    "description": t.description,
                    "createdAt": epoch(t.created_at),
                    "lastUpdatedAt": epoch(last_updated(t)),
                }))
            })
            .collect();
        Ok(compact(json!({
            "tunnelSummaries": summaries,
            "nextToken": page.next_before_seq.map(encode_page_token),
        })))
    }

    async fn rotate(&self, req: RotateRequest) -> Result<Value, AwsError> {
        let sides: &[Side] = match req.client_mode.as_str() {
            "SOURCE" => &[Side::Client],
            "DESTINATION" => &[Side::Device],
            "ALL" => &[Side::Client, Side::Device],
            other => {
                return Err(AwsError::validation(format!(
                    "clientMode {other:?} must be SOURCE, DESTINATION or ALL"
                )))
            }
        };
        let t = self.tunnel(&req.tunnel_id).await?;
        if let Some(dest) = req.destination_config {
            let same_thing = dest
                .thing_name
                .as_deref()
                .is_none_or(|n| n == self.thing_of(&t));
            if !same_thing || (!dest.services.is_empty() && dest.services != t.services) {
                return Err(AwsError::validation(
                    "iotunnel cannot change a tunnel's thing or services on rotate: open a \
                     new tunnel",
                ));
            }
        }
        let (source, destination) = self
            .cp
            .rotate(&self.account.id, &t.id, sides)
            .await
            .map_err(|e| match e.code {
                "tunnel_not_open" => AwsError::validation(format!(
                    "Tunnel {} is CLOSED: only an OPEN tunnel's tokens can be rotated",
                    t.id
                )),
                _ => e.into(),
            })?;
        Ok(compact(json!({
            "tunnelArn": self.arn(&t.id),
            "sourceAccessToken": source,
            "destinationAccessToken": destination,
        })))
    }

    /// The tunnel id an ARN of this service names.
    fn tunnel_of_arn(&self, arn: &str) -> Result<String, AwsError> {
        arn.strip_prefix("arn:")
            .and_then(|a| a.rsplit_once(":tunnel/"))
            .map(|(_, id)| id.to_string())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                AwsError::validation(format!(
                    "resourceArn {arn:?} is not a tunnel ARN (arn:aws:iot:REGION:ACCOUNT:tunnel/ID)"
                ))
            })
    }

    async fn tag_resource(&self, req: TagResourceRequest) -> Result<Value, AwsError> {
        let id = self.tunnel_of_arn(&req.resource_arn)?;
        self.tunnel(&id).await?;
        let tags = validate_tags(req.tags)?;
        self.cp
            .store
            .tag_tunnel(self.account.id.clone(), id, tags)
            .await?;
        Ok(json!({}))
    }

    async fn untag_resource(&self, req: TagResourceRequest) -> Result<Value, AwsError> {
        let id = self.tunnel_of_arn(&req.resource_arn)?;
        self.tunnel(&id).await?;
        self.cp
            .store
            .untag_tunnel(self.account.id.clone(), id, req.tag_keys)
            .await?;
        Ok(json!({}))
    }

    async fn list_tags(&self, req: TagResourceRequest) -> Result<Value, AwsError> {
        let id = self.tunnel_of_arn(&req.resource_arn)?;
        self.tunnel(&id).await?;
        let tags = self
            .cp
            .store
            .tunnel_tags(self.account.id.clone(), id)
            .await?;
        let tags: Vec<Value> = tags
            .into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        Ok(json!({ "tags": tags }))
    }
}

/// The latest change of a tunnel: created, closed, or either side connecting or leaving.
fn last_updated(t: &Tunnel) -> i64 {
    [
        Some(t.created_at),
        t.closed_at,
        t.device.updated_at,
        t.client.updated_at,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(t.created_at)
}

/// Tags as AWS allows them: keys of 1 to 128 and values of up to 256 letters, digits,
/// spaces and `_.:/=+-@`, no `aws:` keys, at most 50.
fn validate_tags(tags: Vec<Tag>) -> Result<Vec<(String, String)>, AwsError> {
    if tags.len() > MAX_TAGS {
        return Err(AwsError::validation(format!(
            "at most {MAX_TAGS} tags per request"
        )));
    }
    let allowed = |s: &str| {
        s.chars()
            .all(|c| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c))
    };
    tags.into_iter()
        .map(|Tag { key, value }| {
            let key_ok = (1..=128).contains(&key.chars().count()) && allowed(&key);
            if !key_ok || key.starts_with("aws:") {
                return Err(AwsError::validation(format!(
                    "tag key {key:?} must be 1 to 128 letters, digits, spaces or _.:/=+-@, \
                     not starting with aws:"
                )));
            }
            if value.chars().count() > 256 || !allowed(&value) {
                return Err(AwsError::validation(format!(
                    "tag value {value:?} must be up to 256 letters, digits, spaces or _.:/=+-@"
                )));
            }
            Ok((key, value))
        })
        .collect()
}
