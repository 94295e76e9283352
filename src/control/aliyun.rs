//! Alibaba IoT Platform's device tunnel actions as a facade over the control plane, so that
//! scripts on the `alibabacloud_iot20180120` SDK drive iotunnel with only the endpoint and
//! keys changed.
//!
//! RPC style (the SDK's models are the reference): `POST /` with `Action` (parameter or
//! `x-acs-action` header) and `Version=2018-01-20`, parameters in the query string or a form
//! body, signed with ACS3-HMAC-SHA256 or the HMAC-SHA1 `Signature` parameter ([`super::acs`]).
//! Answers are the IoT envelope `{RequestId, Success, Code, ErrorMessage, Data}`: business
//! errors are HTTP 200 with `Success: false`, as Alibaba IoT answers them; signature and
//! gateway errors are 4xx with `{RequestId, HostId, Code, Message}`, which the SDK raises.
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use dashmap::mapref::entry::Entry;
use serde_json::{json, Value};

use super::acs::{self, AcsError, Scheme};
use super::error::{current_request_id, ApiError};
use super::views::{validate_text, MAX_CUSTOM_INFO_BYTES, MAX_DESCRIPTION_BYTES};
use super::{ControlPlane, TunnelSpec};
use crate::clock::rfc3339;
use crate::metrics::RouteLabel;
use crate::seam::Side;
use crate::store::{Account, StoreError, Tunnel, TunnelState};

/// The API version of Alibaba IoT Platform these actions belong to.
pub const VERSION: &str = "2018-01-20";
/// The actions served, and the metric route label of each (bounded, plus `aliyun:unknown`).
pub const ACTIONS: &[(&str, &str)] = &[
    ("CreateDeviceTunnel", "aliyun:CreateDeviceTunnel"),
    ("CloseDeviceTunnel", "aliyun:CloseDeviceTunnel"),
    ("DeleteDeviceTunnel", "aliyun:DeleteDeviceTunnel"),
    ("QueryDeviceTunnel", "aliyun:QueryDeviceTunnel"),
    ("EnableDeviceTunnel", "aliyun:EnableDeviceTunnel"),
    ("DisableDeviceTunnel", "aliyun:DisableDeviceTunnel"),
    ("GetDeviceTunnelStatus", "aliyun:GetDeviceTunnelStatus"),
];
/// Route label of requests naming no served action.
pub const UNKNOWN_LABEL: &str = "aliyun:unknown";
/// Nonces remembered (per node) before expired ones are dropped.
const MAX_NONCES: usize = 100_000;

/// A business error: HTTP 200, `Success: false`.
#[derive(Debug)]
struct BizError {
    code: &'static str,
    message: String,
}

fn biz(code: &'static str, message: impl Into<String>) -> BizError {
    BizError {
        code,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> BizError {
    biz("iot.common.InvalidParameter", message)
}

impl From<ApiError> for BizError {
    fn from(e: ApiError) -> Self {
        let code = match e.code {
            "device_offline" => "iot.tunnel.DeviceOffline",
            "tunnel_limit" => "iot.tunnel.TunnelLimitExceeded",
            "device_tunnels_disabled" => "iot.tunnel.DeviceTunnelDisabled",
            "tunnel_not_open" | "tunnel_not_closed" => "iot.tunnel.InvalidTunnelState",
            "store_unavailable" => "iot.common.ServiceUnavailable",
            _ => "iot.common.InvalidParameter",
        };
        biz(code, e.message)
    }
}

impl From<StoreError> for BizError {
    fn from(e: StoreError) -> Self {
        ApiError::from_store(e, "object").into()
    }
}

fn with_headers(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/json;charset=utf-8"),
    );
    resp
}

fn gateway_error(e: AcsError) -> Response {
    tracing::info!(code = e.code, message = %e.message, "Alibaba request refused");
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let body = json!({
        "RequestId": current_request_id(),
        "HostId": "iotunnel",
        "Code": e.code,
        "Message": e.message,
    });
    with_headers((status, body.to_string()).into_response())
}

/// The request's parameters: the query string, then a form body.
fn parameters(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let is_form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        params.extend(form_urlencoded::parse(body).into_owned());
    }
    params
}

/// Whether a `POST /` is an Alibaba request.
pub fn is_aliyun(uri: &Uri, headers: &HeaderMap) -> bool {
    headers.contains_key("x-acs-action")
        || form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .any(|(k, _)| k == "Action")
}

/// Serves one Alibaba request, labelled for the API metrics.
pub async fn serve(
    cp: Arc<ControlPlane>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: &[u8],
) -> Response {
    let params = parameters(&uri, &headers, body);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let action = get("Action").or_else(|| {
        headers
            .get("x-acs-action")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let version = get("Version").or_else(|| {
        headers
            .get("x-acs-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let known = action
        .as_deref()
        .and_then(|a| ACTIONS.iter().find(|(name, _)| *name == a));
    let label = known.map_or(UNKNOWN_LABEL, |(_, label)| label);
    let mut resp = match authenticate(&cp, &method, &uri, &headers, &params, body).await {
        Err(e) => gateway_error(e),
        Ok(account) => match (known, version.as_deref()) {
            (None, _) => gateway_error(AcsError {
                status: 404,
                code: "InvalidAction.NotFound",
                message: format!(
                    "Specified api {:?} is not found, please check your url and method.",
                    action.unwrap_or_default()
                ),
            }),
            (Some(_), v) if v != Some(VERSION) => gateway_error(AcsError {
                status: 400,
                code: "InvalidVersion",
                message: format!("Specified parameter Version {v:?} is not valid: use {VERSION}."),
            }),
            (Some((name, _)), _) => {
                let ctx = Ctx {
                    cp: &cp,
                    account,
                    params: &params,
                };
                let envelope = match ctx.run(name).await {
                    Ok(data) => {
                        let mut v = json!({"RequestId": current_request_id(), "Success": true});
                        if !data.is_null() {
                            v["Data"] = data;
                        }
                        v
                    }
                    Err(e) => {
                        tracing::info!(code = e.code, message = %e.message, "Alibaba action failed");
                        json!({
                            "RequestId": current_request_id(),
                            "Success": false,
                            "Code": e.code,
                            "ErrorMessage": e.message,
                        })
                    }
                };
                with_headers((StatusCode::OK, envelope.to_string()).into_response())
            }
        },
    };
    resp.extensions_mut().insert(RouteLabel(label));
    resp
}

/// Checks the signature (either scheme) and the nonce; the caller's account.
async fn authenticate(
    cp: &ControlPlane,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    params: &[(String, String)],
    body: &[u8],
) -> Result<Account, AcsError> {
    let now = cp.clock.now_ms();
    let claim = acs::parse(headers, params, now)?;
    let cred = cp.credential(&claim.key_id).await.map_err(|e| match e {
        super::access_keys::CredentialError::Unknown => AcsError {
            status: 404,
            code: "InvalidAccessKeyId.NotFound",
            message: "Specified access key is not found.".into(),
        },
        super::access_keys::CredentialError::Unavailable(why) => AcsError {
            status: 503,
            code: "ServiceUnavailable",
            message: format!("access keys cannot be checked on this server: {why}"),
        },
    })?;
    match &claim.scheme {
        Scheme::Acs3 {
            signed_headers,
            signature,
        } => {
            // The V3 canonical query is the query string alone (a form body is hashed whole).
            let query: Vec<(String, String)> =
                form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                    .into_owned()
                    .collect();
            let canonical = acs::acs3_canonical(
                method.as_str(),
                uri.path(),
                &query,
                headers,
                signed_headers,
                body,
            );
            acs::verify_acs3(&cred.secret, signature, &canonical, headers, body)?;
        }
        Scheme::Sha1 { signature } => {
            acs::verify_sha1(&cred.secret, signature, method.as_str(), params)?;
        }
    }
    // A signed request is good once: a replay within the clock window is refused (one entry
    // lock decides, so two copies racing in cannot both pass).
    let nonces = &cp.vendor_nonces;
    if nonces.len() > MAX_NONCES {
        nonces.retain(|_, until| *until > now);
    }
    match nonces.entry(format!("{}:{}", claim.key_id, claim.nonce)) {
        Entry::Occupied(e) if *e.get() > now => {
            return Err(AcsError {
                status: 400,
                code: "SignatureNonceUsed",
                message: "Specified signature nonce was used already.".into(),
            })
        }
        Entry::Occupied(mut e) => {
            e.insert(now + acs::CLOCK_WINDOW_MS);
        }
        Entry::Vacant(v) => {
            v.insert(now + acs::CLOCK_WINDOW_MS);
        }
    }
    Ok(cred.account)
}

/// One authenticated action.
struct Ctx<'a> {
    cp: &'a ControlPlane,
    account: Account,
    params: &'a [(String, String)],
}

impl Ctx<'_> {
    fn param(&self, name: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<String, BizError> {
        self.param(name)
            .ok_or_else(|| invalid(format!("{name} is required")))
    }

    async fn run(&self, action: &str) -> Result<Value, BizError> {
        match action {
            "CreateDeviceTunnel" => self.create().await,
            "CloseDeviceTunnel" => self.close().await,
            "DeleteDeviceTunnel" => self.delete().await,
            "QueryDeviceTunnel" => self.query().await,
            "EnableDeviceTunnel" => self.switch(false).await,
            "DisableDeviceTunnel" => self.switch(true).await,
            _ => self.switch_status().await,
        }
    }

    /// The account's device named by ProductKey and DeviceName.
    async fn device(&self) -> Result<(String, String), BizError> {
        if self.param("IotId").is_some() {
            return Err(invalid(
                "iotunnel has no IotId: name the device with ProductKey and DeviceName",
            ));
        }
        let (pk, dn) = (self.required("ProductKey")?, self.required("DeviceName")?);
        let found = self.cp.store.get_device(pk.clone(), dn.clone()).await?;
        match found {
            Some(d) if d.account_id == self.account.id => Ok((pk, dn)),
            _ => Err(biz(
                "iot.device.NotExistedDevice",
                format!("device {pk}/{dn} does not exist"),
            )),
        }
    }

    async fn tunnel(&self) -> Result<Tunnel, BizError> {
        let id = self.required("TunnelId")?;
        self.cp
            .store
            .get_tunnel(self.account.id.clone(), id.clone())
            .await
            .map_err(|e| match e {
                StoreError::NotFound => biz(
                    "iot.tunnel.NotExistedTunnel",
                    format!("tunnel {id} does not exist"),
                ),
                e => e.into(),
            })
    }

    async fn create(&self) -> Result<Value, BizError> {
        let (product_key, device_name) = self.device().await?;
        let spec = TunnelSpec {
            product_key,
            device_name,
            custom_info: validate_text("Udi", self.param("Udi"), MAX_CUSTOM_INFO_BYTES)?,
            description: validate_text(
                "Description",
                self.param("Description"),
                MAX_DESCRIPTION_BYTES,
            )?,
            // Alibaba clients name services as the device's agent knows them; the relay
            // carries whatever service_type a session asks for.
            services: vec!["_SSH".to_string()],
            lifetime_seconds: self.cp.settings.max_lifetime_seconds,
            require_online: true,
        };
        let created = self.cp.create_tunnel(&self.account, spec).await?;
        let t = &created.tunnel;
        Ok(json!({
            "TunnelId": t.id,
            "SourceURI": self.cp.side_url(t, Side::Client),
            "SourceAccessToken": created.client_token,
        }))
    }

    async fn close(&self) -> Result<Value, BizError> {
        let t = self.tunnel().await?;
        self.cp.close_tunnel(&self.account.id, &t.id).await?;
        Ok(Value::Null)
    }

    async fn delete(&self) -> Result<Value, BizError> {
        let t = self.tunnel().await?;
        self.cp.delete_tunnel(&self.account.id, &t.id).await?;
        Ok(Value::Null)
    }

    async fn query(&self) -> Result<Value, BizError> {
        let t = self.tunnel().await?;
        let product_name = self
            .cp
            .store
            .list_products(self.account.id.clone())
            .await?
            .into_iter()
            .find(|p| p.product_key == t.product_key)
            .map(|p| p.name);
        let conn = |connected: bool| {
            if connected {
                "CONNECTED"
            } else {
                "DISCONNECTED"
            }
        };
        let mut data = json!({
            "TunnelId": t.id,
            "TunnelState": t.state.as_str(),
            "ProductKey": t.product_key,
            "DeviceName": t.device_name,
            "ProductName": product_name,
            "DeviceConnState": conn(t.device.connected),
            "SourceConnState": conn(t.client.connected),
            "Description": t.description,
            "Udi": t.custom_info,
            "UtcCreated": rfc3339(t.created_at),
        });
        if t.state == TunnelState::Closed {
            data["UtcClosed"] = json!(t.closed_at.map(rfc3339));
        }
        if let Value::Object(m) = &mut data {
            m.retain(|_, v| !v.is_null());
        }
        Ok(data)
    }

    async fn switch(&self, disabled: bool) -> Result<Value, BizError> {
        let (pk, dn) = self.device().await?;
        self.cp
            .store
            .set_device_tunnels_disabled(self.account.id.clone(), pk.clone(), dn.clone(), disabled)
            .await?;
        tracing::info!(product_key = %pk, device_name = %dn, disabled, "device tunnel switch set");
        Ok(Value::Null)
    }

    async fn switch_status(&self) -> Result<Value, BizError> {
        let (pk, dn) = self.device().await?;
        let disabled = self.cp.store.device_tunnels_disabled(pk, dn).await?;
        Ok(json!(if disabled { "DISABLE" } else { "ENABLE" }))
    }
}
