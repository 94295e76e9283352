//! The native control API on axum: routes, authentication, request ids and the OpenAPI document.
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tracing::Instrument;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorEnvelope, REQUEST_ID};
use super::views::*;
use super::{device_channel, keys, ControlPlane, TunnelSpec};
use crate::config::MIN_LIFETIME_SECONDS;
use crate::store::{Account, Device, KeyOrigin, NewApiKey, Product, TunnelFilter, TunnelState};
use crate::token;

/// Largest request body accepted (issue: 64 KiB, then 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

type Cp = State<Arc<ControlPlane>>;
type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections use the error envelope.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// A query string whose rejections use the error envelope.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters whose rejections use the error envelope.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The authenticated caller (`Authorization: Bearer <api key>`).
#[derive(Debug, Clone)]
pub struct Caller(pub Account);

impl FromRequestParts<Arc<ControlPlane>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &Arc<ControlPlane>,
    ) -> Result<Self, ApiError> {
        let key = bearer_key(parts)?;
        cp.authenticate(key).await.map(Caller)
    }
}

/// The API key of `Authorization: Bearer <api key>`.
pub(super) fn bearer_key(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key>"))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "iotunnel control API", description = "Secure tunnels to IoT devices."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorEnvelope)),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The API router with the OpenAPI document of its routes, ready to serve.
pub fn router(cp: Arc<ControlPlane>, metrics: Arc<crate::metrics::ApiMetrics>) -> Router {
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_account))
        .routes(routes!(keys::list_keys, keys::create_key))
        .routes(routes!(keys::revoke_key))
        .routes(routes!(create_product, list_products))
        .routes(routes!(create_device, list_devices))
        .routes(routes!(delete_device))
        .routes(routes!(create_tunnel, search_tunnels))
        .routes(routes!(describe_tunnel, delete_tunnel))
        .routes(routes!(close_tunnel))
        .routes(routes!(batch_close))
        .routes(routes!(batch_delete))
        .routes(routes!(rotate_tunnel))
        .routes(routes!(list_nodes))
        .routes(routes!(
            super::access_keys::create_access_key,
            super::access_keys::list_access_keys
        ))
        .routes(routes!(super::access_keys::delete_access_key))
        .routes(routes!(device_channel::connect))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .split_for_parts();
    let openapi = Arc::new(openapi);
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || async move { Json(openapi.as_ref().clone()) }),
        )
        // The vendor facades (AWS, Alibaba): their operation is in a header or a parameter.
        .route("/", axum::routing::post(super::vendor::dispatch))
        .route_layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            crate::metrics::track_api,
        ))
        // After the metrics layer: the console's pages are not API routes.
        .merge(super::console::router())
        .fallback({
            let metrics = metrics.clone();
            move || async move {
                metrics.unmatched(StatusCode::NOT_FOUND);
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
            }
        })
        .method_not_allowed_fallback(move || async move {
            metrics.unmatched(StatusCode::METHOD_NOT_ALLOWED);
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(request_context))
        .with_state(cp)
}

/// Gives each request an id (in the `x-request-id` header, error bodies and the log line).
async fn request_context(req: Request, next: Next) -> Response {
    let id = format!("req_{}", hex::encode(token::random_bytes::<8>()));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!("request", request_id = %id);
    let start = Instant::now();
    let mut resp = REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    span.in_scope(|| {
        tracing::info!(%method, %path, status = resp.status().as_u16(),
            elapsed_us = start.elapsed().as_micros() as u64, "request")
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Creates an account (admin key only).
#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = CreateAccount,
    responses((status = 201, body = AccountCreated), (status = 403, body = ErrorEnvelope)))]
async fn create_account(
    State(cp): Cp,
    Caller(me): Caller,
    ApiJson(req): ApiJson<CreateAccount>,
) -> ApiResult<impl IntoResponse> {
    if !me.is_admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the admin key may create accounts",
        ));
    }
    let name = validate_display_name("name", &req.name)?;
    let api_key = format!("itk_{}", token::random_secret());
    let id = format!("acc_{}", token::random_alnum(16).to_lowercase());
    let key = NewApiKey {
        id: token::new_key_id(),
        account_id: id.clone(),
        name: "created with the account".into(),
        origin: KeyOrigin::Account,
        key_hash: token::hash_secret(&api_key),
        created_at: cp.clock.now_ms(),
    };
    let account = cp
        .store
        .create_account(id, name, false, key)
        .await
        .map_err(|e| ApiError::from_store(e, "account"))?;
    tracing::info!(account_id = %account.id, "account created");
    Ok((
        StatusCode::CREATED,
        Json(AccountCreated {
            account_id: account.id,
            name: account.name,
            api_key,
        }),
    ))
}

/// The nodes of the fleet (admin key only); a single node lists itself.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, body = NodeList), (status = 403, body = ErrorEnvelope)))]
async fn list_nodes(State(cp): Cp, Caller(me): Caller) -> ApiResult<Json<NodeList>> {
    if !me.is_admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the admin key may list nodes",
        ));
    }
    let now = cp.clock.now_ms();
    let dead_after = cp.settings.node_dead_after_ms as i64;
    let nodes = cp
        .store
        .list_nodes()
        .await?
        .into_iter()
        .map(|n| NodeView::new(n, now, dead_after))
        .collect();
    Ok(Json(NodeList { nodes }))
}

/// Creates a product.
#[utoipa::path(post, path = "/v1/products", tag = "products", request_body = CreateProduct,
    responses((status = 201, body = ProductView), (status = 400, body = ErrorEnvelope)))]
async fn create_product(
    State(cp): Cp,
    Caller(me): Caller,
    ApiJson(req): ApiJson<CreateProduct>,
) -> ApiResult<impl IntoResponse> {
    let name = validate_display_name("name", &req.name)?;
    let product = Product {
        // 11 alphanumerics, the shape of an Alibaba ProductKey: 62^11 ≈ 2^65 keys.
        product_key: token::random_alnum(11),
        account_id: me.id,
        name,
        created_at: cp.clock.now_ms(),
    };
    let p = cp
        .store
        .create_product(product)
        .await
        .map_err(|e| ApiError::from_store(e, "product"))?;
    Ok((StatusCode::CREATED, Json(ProductView::from(p))))
}

/// Lists the caller's products.
#[utoipa::path(get, path = "/v1/products", tag = "products", responses((status = 200, body = ProductList)))]
async fn list_products(State(cp): Cp, Caller(me): Caller) -> ApiResult<Json<ProductList>> {
    let products = cp.store.list_products(me.id).await?;
    Ok(Json(ProductList {
        products: products.into_iter().map(Into::into).collect(),
    }))
}

/// Creates a device; its secret is shown once.
#[utoipa::path(post, path = "/v1/products/{product_key}/devices", tag = "devices", request_body = CreateDevice,
    params(("product_key" = String, Path)),
    responses((status = 201, body = DeviceCreated), (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)))]
async fn create_device(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(product_key): ApiPath<String>,
    ApiJson(req): ApiJson<CreateDevice>,
) -> ApiResult<impl IntoResponse> {
    validate_device_name(&req.name)?;
    let device = Device {
        product_key,
        account_id: me.id,
        name: req.name,
        secret: token::random_secret(),
        created_at: cp.clock.now_ms(),
        open_tunnels: 0,
    };
    let d = cp.store.create_device(device).await.map_err(|e| match e {
        crate::store::StoreError::NotFound => ApiError::not_found("product"),
        e => ApiError::from_store(e, "device"),
    })?;
    tracing::info!(product_key = %d.product_key, device_name = %d.name, "device created");
    Ok((
        StatusCode::CREATED,
        Json(DeviceCreated {
            product_key: d.product_key,
            device_name: d.name,
            device_secret: d.secret,
            created_at: crate::clock::rfc3339(d.created_at),
        }),
    ))
}

/// Lists a product's devices with their online status.
#[utoipa::path(get, path = "/v1/products/{product_key}/devices", tag = "devices",
    params(("product_key" = String, Path)),
    responses((status = 200, body = DeviceList), (status = 404, body = ErrorEnvelope)))]
async fn list_devices(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(product_key): ApiPath<String>,
) -> ApiResult<Json<DeviceList>> {
    let devices = cp
        .store
        .list_devices(me.id, product_key)
        .await
        .map_err(|e| ApiError::from_store(e, "product"))?;
    // Channels on other nodes of the fleet, read once for the whole list.
    let elsewhere = match (cp.fleet.shared, devices.first()) {
        (true, Some(d)) => cp.store.device_channel_nodes(d.product_key.clone()).await?,
        _ => Default::default(),
    };
    let devices = devices
        .into_iter()
        .map(|d| {
            let online = cp.is_online_here(&d.product_key, &d.name)
                || elsewhere
                    .get(&d.name)
                    .is_some_and(|node| cp.node_is_live(node));
            DeviceView::new(d, online)
        })
        .collect();
    Ok(Json(DeviceList { devices }))
}

/// Deletes a device, closing its OPEN tunnels.
#[utoipa::path(delete, path = "/v1/products/{product_key}/devices/{device_name}", tag = "devices",
    params(("product_key" = String, Path), ("device_name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorEnvelope)))]
async fn delete_device(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath((product_key, device_name)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    cp.delete_device(&me.id, &product_key, &device_name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a tunnel to an online device; the client token is shown once.
#[utoipa::path(post, path = "/v1/tunnels", tag = "tunnels", request_body = CreateTunnel,
    responses((status = 201, body = TunnelCreated), (status = 400, body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope), (status = 409, description = "device_offline, or unknown_service (a service the device's agent reported it does not map)", body = ErrorEnvelope),
        (status = 413, body = ErrorEnvelope), (status = 429, description = "tunnel_limit", body = ErrorEnvelope)))]
async fn create_tunnel(
    State(cp): Cp,
    Caller(me): Caller,
    ApiJson(req): ApiJson<CreateTunnel>,
) -> ApiResult<impl IntoResponse> {
    let max = cp.settings.max_lifetime_seconds;
    let lifetime_seconds = req.lifetime_seconds.unwrap_or(max);
    if !(MIN_LIFETIME_SECONDS..=max).contains(&lifetime_seconds) {
        return Err(ApiError::invalid(format!(
            "lifetime_seconds must be from {MIN_LIFETIME_SECONDS} to {max}"
        )));
    }
    let spec = TunnelSpec {
        product_key: req.product_key,
        device_name: req.device_name,
        custom_info: validate_text("custom_info", req.custom_info, MAX_CUSTOM_INFO_BYTES)?,
        description: validate_text("description", req.description, MAX_DESCRIPTION_BYTES)?,
        services: validate_services(req.services)?,
        lifetime_seconds,
        require_online: true,
    };
    let created = cp.create_tunnel(&me, spec).await?;
    let t = &created.tunnel;
    Ok((
        StatusCode::CREATED,
        Json(TunnelCreated {
            tunnel_id: t.id.clone(),
            client_url: cp.side_url(t, crate::seam::Side::Client),
            client_endpoint: cp.relay_endpoint(t),
            client_token: created.client_token,
            state: t.state.as_str().into(),
            created_at: crate::clock::rfc3339(t.created_at),
            expires_at: crate::clock::rfc3339(t.expires_at),
        }),
    ))
}

/// Searches the caller's tunnels, newest first.
#[utoipa::path(get, path = "/v1/tunnels", tag = "tunnels", params(SearchQuery),
    responses((status = 200, body = TunnelList), (status = 400, body = ErrorEnvelope)))]
async fn search_tunnels(
    State(cp): Cp,
    Caller(me): Caller,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> ApiResult<Json<TunnelList>> {
    let page_size = q.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(ApiError::invalid(format!(
            "page_size must be from 1 to {MAX_PAGE_SIZE}"
        )));
    }
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            TunnelState::parse(s)
                .ok_or_else(|| ApiError::invalid("state must be OPEN or CLOSED"))?,
        ),
    };
    let before = q
        .page_token
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(decode_page_token)
        .transpose()?;
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let filter = TunnelFilter {
        product_key: nonempty(q.product_key),
        device_name: nonempty(q.device_name),
        tunnel_id: nonempty(q.tunnel_id),
        state,
    };
    let page = cp
        .store
        .search_tunnels(me.id, filter, before, page_size)
        .await?;
    Ok(Json(TunnelList {
        tunnels: page.tunnels.iter().map(Into::into).collect(),
        next_page_token: page.next_before_seq.map(encode_page_token),
    }))
}

/// Describes a tunnel, with each side's connection.
#[utoipa::path(get, path = "/v1/tunnels/{id}", tag = "tunnels", params(("id" = String, Path)),
    responses((status = 200, body = TunnelView), (status = 404, body = ErrorEnvelope)))]
async fn describe_tunnel(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TunnelView>> {
    let t = cp
        .store
        .get_tunnel(me.id, id)
        .await
        .map_err(|e| ApiError::from_store(e, "tunnel"))?;
    Ok(Json((&t).into()))
}

/// Deletes a CLOSED tunnel.
#[utoipa::path(delete, path = "/v1/tunnels/{id}", tag = "tunnels", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)))]
async fn delete_tunnel(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    cp.delete_tunnel(&me.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Closes an OPEN tunnel: both sides are disconnected at once; it cannot be reopened.
#[utoipa::path(post, path = "/v1/tunnels/{id}/close", tag = "tunnels", params(("id" = String, Path)),
    responses((status = 200, body = TunnelView), (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)))]
async fn close_tunnel(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TunnelView>> {
    let t = cp.close_tunnel(&me.id, &id).await?;
    Ok(Json((&t).into()))
}

/// Checks a batch request: 1 to [`MAX_BATCH`] ids.
pub fn check_batch(req: &BatchRequest) -> ApiResult<()> {
    if req.tunnel_ids.is_empty() || req.tunnel_ids.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "tunnel_ids must list 1 to {MAX_BATCH} ids"
        )));
    }
    Ok(())
}

fn batch_item(tunnel_id: String, r: ApiResult<()>) -> BatchItem {
    BatchItem {
        tunnel_id,
        ok: r.is_ok(),
        error: r.err().map(|e| e.body()),
    }
}

/// Closes up to 100 tunnels; one result per id, in request order.
#[utoipa::path(post, path = "/v1/tunnels/batch-close", tag = "tunnels", request_body = BatchRequest,
    responses((status = 200, body = BatchResults), (status = 400, body = ErrorEnvelope)))]
async fn batch_close(
    State(cp): Cp,
    Caller(me): Caller,
    ApiJson(req): ApiJson<BatchRequest>,
) -> ApiResult<Json<BatchResults>> {
    check_batch(&req)?;
    let mut results = Vec::with_capacity(req.tunnel_ids.len());
    for id in req.tunnel_ids {
        let r = cp.close_tunnel(&me.id, &id).await.map(drop);
        results.push(batch_item(id, r));
    }
    Ok(Json(BatchResults { results }))
}

/// Deletes up to 100 CLOSED tunnels; one result per id, in request order.
#[utoipa::path(post, path = "/v1/tunnels/batch-delete", tag = "tunnels", request_body = BatchRequest,
    responses((status = 200, body = BatchResults), (status = 400, body = ErrorEnvelope)))]
async fn batch_delete(
    State(cp): Cp,
    Caller(me): Caller,
    ApiJson(req): ApiJson<BatchRequest>,
) -> ApiResult<Json<BatchResults>> {
    check_batch(&req)?;
    let mut results = Vec::with_capacity(req.tunnel_ids.len());
    for id in req.tunnel_ids {
        let r = cp.delete_tunnel(&me.id, &id).await;
        results.push(batch_item(id, r));
    }
    Ok(Json(BatchResults { results }))
}

/// Issues new tokens for one or both sides; the rotated sides are disconnected.
#[utoipa::path(post, path = "/v1/tunnels/{id}/rotate", tag = "tunnels", request_body = RotateRequest,
    params(("id" = String, Path)),
    responses((status = 200, body = RotateResponse), (status = 404, body = ErrorEnvelope), (status = 409, body = ErrorEnvelope)))]
async fn rotate_tunnel(
    State(cp): Cp,
    Caller(me): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RotateRequest>,
) -> ApiResult<Json<RotateResponse>> {
    let (client_token, device_token) = cp.rotate(&me.id, &id, req.side.sides()).await?;
    Ok(Json(RotateResponse {
        tunnel_id: id,
        client_token,
        device_token,
    }))
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "health", security(), responses((status = 200)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "health", security(), responses((status = 200), (status = 503, body = ErrorEnvelope)))]
async fn readyz(State(cp): Cp) -> ApiResult<&'static str> {
    cp.store.admin_account().await?;
    Ok("ready")
}
