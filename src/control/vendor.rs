//! `POST /`: the vendor control APIs, told apart by their own markers: `X-Amz-Target` for AWS
//! IoT Secure Tunneling ([`super::aws`]), an `Action` parameter for Alibaba IoT.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{aliyun, aws, ControlPlane};

/// Routes a `POST /` to the facade whose marker it carries.
pub async fn dispatch(
    State(cp): State<Arc<ControlPlane>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if headers.contains_key("x-amz-target") {
        return aws::serve(cp, method, uri, headers, &body).await;
    }
    if aliyun::is_aliyun(&uri, &headers) {
        return aliyun::serve(cp, method, uri, headers, &body).await;
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unknown_vendor_request",
        "POST / serves the vendor APIs: an AWS request carries X-Amz-Target, an Alibaba one \
         an Action parameter",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::{aliyun, aws};
    use crate::metrics::API_ROUTES;

    /// Every label the facades put on a response is a route the exporter knows from start-up
    /// (an unknown one would be counted as `unmatched`).
    #[test]
    fn every_vendor_route_label_is_exported() {
        let labels = (aws::OPERATIONS.iter())
            .chain(aliyun::ACTIONS)
            .map(|(_, label)| *label)
            .chain([aws::UNKNOWN_LABEL, aliyun::UNKNOWN_LABEL]);
        for label in labels {
            assert!(API_ROUTES.contains(&label), "{label} is not in API_ROUTES");
        }
    }
}
