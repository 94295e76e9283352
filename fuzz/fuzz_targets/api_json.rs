//! Deserializes arbitrary bytes into each request body of the native API (and the tunnel
//! search query), then runs the handler's validation on what parses: nothing panics, what
//! validates keeps the documented limits, and what parses once parses the same again.
#![no_main]

use iotunnel::control::api::check_batch;
use iotunnel::control::views::*;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => account_or_product(body),
        1 => device(body),
        2 => tunnel(body),
        3 => batch(body),
        4 => rotate(body),
        5 => search(body),
        _ => page_token(body),
    }
});

fn account_or_product(body: &[u8]) {
    let names = [
        serde_json::from_slice::<CreateAccount>(body).map(|r| r.name),
        serde_json::from_slice::<CreateProduct>(body).map(|r| r.name),
    ];
    for name in names.into_iter().flatten() {
        if let Ok(v) = validate_display_name("name", &name) {
            assert!(!v.is_empty() && v.chars().count() <= MAX_NAME);
            assert!(!v.chars().any(char::is_control) && v == v.trim());
        }
    }
}

fn device(body: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<CreateDevice>(body) {
        if validate_device_name(&req.name).is_ok() {
            assert!((1..=MAX_NAME).contains(&req.name.len()));
        }
    }
}

fn tunnel(body: &[u8]) {
    let Ok(req) = serde_json::from_slice::<CreateTunnel>(body) else {
        return;
    };
    // Written out again, the body parses to the same request.
    let again: CreateTunnel = serde_json::from_value(json!({
        "product_key": req.product_key,
        "device_name": req.device_name,
        "custom_info": req.custom_info,
        "description": req.description,
        "services": req.services,
        "lifetime_seconds": req.lifetime_seconds,
    }))
    .expect("a parsed tunnel request parses again");
    assert_eq!(
        (&again.product_key, &again.device_name, &again.custom_info),
        (&req.product_key, &req.device_name, &req.custom_info)
    );
    assert_eq!(
        (&again.description, &again.services, again.lifetime_seconds),
        (&req.description, &req.services, req.lifetime_seconds)
    );
    if let Ok(Some(info)) = validate_text("custom_info", req.custom_info, MAX_CUSTOM_INFO_BYTES) {
        assert!(info.len() <= MAX_CUSTOM_INFO_BYTES);
    }
    if let Ok(Some(d)) = validate_text("description", req.description, MAX_DESCRIPTION_BYTES) {
        assert!(d.len() <= MAX_DESCRIPTION_BYTES);
    }
    if let Ok(services) = validate_services(req.services) {
        assert!((1..=MAX_SERVICES).contains(&services.len()));
        let distinct: std::collections::HashSet<_> = services.iter().collect();
        assert_eq!(distinct.len(), services.len());
        assert!(services
            .iter()
            .all(|s| (1..=MAX_SERVICE_NAME).contains(&s.len())));
    }
}

fn batch(body: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<BatchRequest>(body) {
        let valid = check_batch(&req).is_ok();
        assert_eq!(valid, (1..=MAX_BATCH).contains(&req.tunnel_ids.len()));
        let again: BatchRequest =
            serde_json::from_value(json!({ "tunnel_ids": req.tunnel_ids })).expect("parses again");
        assert_eq!(again.tunnel_ids, req.tunnel_ids);
    }
}

fn rotate(body: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<RotateRequest>(body) {
        assert!(!req.side.sides().is_empty());
    }
}

fn search(query: &[u8]) {
    if let Ok(q) = serde_urlencoded::from_bytes::<SearchQuery>(query) {
        if let Some(token) = q.page_token {
            if let Ok(seq) = decode_page_token(&token) {
                assert_eq!(decode_page_token(&encode_page_token(seq)).ok(), Some(seq));
            }
        }
    }
}

fn page_token(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = decode_page_token(text);
    }
    if let Ok(n) = <[u8; 8]>::try_from(bytes) {
        let seq = i64::from_be_bytes(n);
        assert_eq!(decode_page_token(&encode_page_token(seq)).ok(), Some(seq));
    }
}
