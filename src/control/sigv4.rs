//! AWS Signature Version 4, the server's half: parse the `Authorization` header, rebuild the
//! canonical request from what arrived, and compare signatures in constant time. Pure: no I/O;
//! the caller looks up the secret of the key id and supplies the time.
//!
//! Reference: "Create a signed AWS API request" (AWS IAM user guide). The request carries
//! `Authorization: AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/SERVICE/aws4_request,
//! SignedHeaders=h1;h2, Signature=HEX` and `X-Amz-Date: YYYYMMDDTHHMMSSZ`.
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Millis;
use crate::token::hmac_sha256;

/// The only algorithm AWS SDKs use for SigV4 headers.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far the request's time may be from the server's (the issue: 5 minutes; AWS services
/// allow 5 to 15).
pub const CLOCK_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Why a request's signature is refused, each worded as AWS words it, with AWS's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigError {
    /// No `Authorization` header at all.
    Missing,
    /// The header is not a well-formed SigV4 authorization.
    Incomplete(String),
    /// Temporary credentials: we issue none.
    SecurityToken,
    /// The time is outside the window.
    Expired(String),
    /// The credential scope names another service.
    WrongService(String),
    /// The signature does not match.
    Mismatch,
}

impl SigError {
    /// AWS's error code (`__type`).
    pub fn code(&self) -> &'static str {
        match self {
            SigError::Missing => "MissingAuthenticationTokenException",
            SigError::Incomplete(_) => "IncompleteSignatureException",
            SigError::SecurityToken => "UnrecognizedClientException",
            SigError::Expired(_) | SigError::WrongService(_) | SigError::Mismatch => {
                "InvalidSignatureException"
            }
        }
    }

    /// The message, as AWS words it where AWS has one.
    pub fn message(&self) -> String {
        match self {
            SigError::Missing => "Missing Authentication Token".into(),
            SigError::Incomplete(m) | SigError::Expired(m) => m.clone(),
            SigError::SecurityToken => "The security token included in the request is invalid. \
                 iotunnel issues no temporary credentials (X-Amz-Security-Token): sign with an \
                 access key from POST /v1/access-keys"
                .into(),
            SigError::WrongService(s) => {
                format!("Credential should be scoped to correct service: '{s}'. ")
            }
            SigError::Mismatch => "The request signature we calculated does not match the \
                 signature you provided. Check your AWS Secret Access Key and signing method. \
                 Consult the service documentation for details."
                .into(),
        }
    }
}

/// A parsed `Authorization` header and the request time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The access key id.
    pub key_id: String,
    /// `YYYYMMDD` of the credential scope.
    pub date: String,
    /// Region of the scope (any name is accepted).
    pub region: String,
    /// Service of the scope.
    pub service: String,
    /// Signed header names, lowercase, as listed.
    pub signed_headers: Vec<String>,
    /// The signature, lowercase hex.
    pub signature: String,
    /// The `X-Amz-Date` value.
    pub amz_date: String,
    /// The request time, ms since the epoch.
    pub at_ms: Millis,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Parses the SigV4 headers and checks the scope's service and the clock window.
pub fn parse(headers: &HeaderMap, service: &str, now: Millis) -> Result<Authorization, SigError> {
    let auth = header(headers, "authorization").ok_or(SigError::Missing)?;
    if headers.contains_key("x-amz-security-token") {
        return Err(SigError::SecurityToken);
    }
    let rest = auth
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| {
            SigError::Incomplete(format!(
                "Authorization header must use the {ALGORITHM} algorithm"
            ))
        })?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let mut missing = String::new();
    for (name, v) in [
        ("Credential", credential),
        ("Signature", signature),
        ("SignedHeaders", signed),
    ] {
        if v.is_none() {
            missing.push_str(&format!(
                "Authorization header requires '{name}' parameter. "
            ));
        }
    }
    let amz_date = header(headers, "x-amz-date");
    if amz_date.is_none() {
        missing.push_str(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' \
             header. ",
        );
    }
    let (Some(credential), Some(signed), Some(signature), Some(amz_date)) =
        (credential, signed, signature, amz_date)
    else {
        return Err(SigError::Incomplete(format!(
            "{missing}Authorization={auth_kind}",
            auth_kind = ALGORITHM
        )));
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, scope_service, "aws4_request"] = scope[..] else {
        return Err(SigError::Incomplete(format!(
            "Credential should be scoped to a valid region, service and terminator \
             (KEY/YYYYMMDD/REGION/SERVICE/aws4_request), not '{credential}'. "
        )));
    };
    if !scope_service.eq_ignore_ascii_case(service) {
        return Err(SigError::WrongService(service.into()));
    }
    let at_ms = parse_amz_date(amz_date).ok_or_else(|| {
        SigError::Incomplete(format!(
            "X-Amz-Date '{amz_date}' is not in the ISO 8601 basic format YYYYMMDDTHHMMSSZ"
        ))
    })?;
    if !amz_date.starts_with(date) {
        return Err(SigError::Incomplete(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date \
             from HTTP: '{date}' != '{}', from '{amz_date}'.",
            &amz_date[..8]
        )));
    }
    let minutes = CLOCK_WINDOW_MS / 60_000;
    if at_ms < now - CLOCK_WINDOW_MS {
        return Err(SigError::Expired(format!(
            "Signature expired: {amz_date} is now earlier than {} ({} - {minutes} min.)",
            format_amz_date(now - CLOCK_WINDOW_MS),
            format_amz_date(now)
        )));
    }
    if at_ms > now + CLOCK_WINDOW_MS {
        return Err(SigError::Expired(format!(
            "Signature not yet current: {amz_date} is still later than {} ({} + {minutes} \
             min.)",
            format_amz_date(now + CLOCK_WINDOW_MS),
            format_amz_date(now)
        )));
    }
    let signed_headers: Vec<String> = signed.split(';').map(str::to_ascii_lowercase).collect();
    // The host and the time must be covered, or a signature could be replayed elsewhere or
    // later; so must the operation, or one could be replayed as another.
    for required in ["host", "x-amz-date", "x-amz-target"] {
        if headers.contains_key(required) && !signed_headers.iter().any(|h| h == required) {
            return Err(SigError::Incomplete(format!(
                "'{required}' must be a 'SignedHeader' in the AWS Authorization."
            )));
        }
    }
    Ok(Authorization {
        key_id: key_id.into(),
        date: date.into(),
        region: region.into(),
        service: scope_service.into(),
        signed_headers,
        signature: signature.to_ascii_lowercase(),
        amz_date: amz_date.into(),
        at_ms,
    })
}

/// `YYYYMMDDTHHMMSSZ` -> ms since the epoch.
fn parse_amz_date(s: &str) -> Option<Millis> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(4..6)?, num(6..8)?)?;
    let time = date.and_hms_opt(num(9..11)?, num(11..13)?, num(13..15)?)?;
    Some(time.and_utc().timestamp_millis())
}

/// ms since the epoch -> `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(ms: Millis) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    use chrono::{Datelike, Timelike};
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, as SigV4 wants.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `%XX` escapes (`+` stays as it is: SigV4 clients encode spaces as `%20`).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The canonical query string: each name and value decoded, re-encoded, sorted.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A header's values joined by commas, each trimmed with inner runs of spaces collapsed.
fn canonical_value(headers: &HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The canonical request of SigV4.
pub fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    signed_headers: &[String],
    body: &[u8],
) -> String {
    let path = if path.is_empty() { "/" } else { path };
    let canonical_path = uri_encode(&percent_decode(path), true);
    let mut canonical_headers = String::new();
    for h in signed_headers {
        canonical_headers.push_str(h);
        canonical_headers.push(':');
        canonical_headers.push_str(&canonical_value(headers, h));
        canonical_headers.push('\n');
    }
    format!(
        "{method}\n{canonical_path}\n{}\n{canonical_headers}\n{}\n{}",
        canonical_query(query),
        signed_headers.join(";"),
        hex::encode(Sha256::digest(body))
    )
}

/// The signature of a canonical request under `secret` and the authorization's scope.
pub fn signature(secret: &str, auth: &Authorization, canonical: &str) -> String {
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        auth.amz_date,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    let k_region = hmac_sha256(&k_date, auth.region.as_bytes());
    let k_service = hmac_sha256(&k_region, auth.service.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    hex::encode(hmac_sha256(&k_signing, string_to_sign.as_bytes()))
}

/// Checks the request's signature against `secret`, in constant time.
pub fn verify(
    secret: &str,
    auth: &Authorization,
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), SigError> {
    let canonical = canonical_request(method, path, query, headers, &auth.signed_headers, body);
    let expected = signature(secret, auth, &canonical);
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(())
    } else {
        Err(SigError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    /// AWS's published example ("get-vanilla" of the SigV4 test suite): secret
    /// `wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY`, 20150830T123600Z, us-east-1, service.
    #[test]
    fn matches_the_aws_test_suite_get_vanilla() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.amazonaws.com"));
        h.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
        h.insert(
            "authorization",
            HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
        );
        let now = parse_amz_date("20150830T123600Z").unwrap();
        let auth = parse(&h, "service", now).unwrap();
        assert_eq!(auth.key_id, "AKIDEXAMPLE");
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        assert_eq!(verify(secret, &auth, "GET", "/", "", &h, b""), Ok(()));
        assert_eq!(
            verify("wrong", &auth, "GET", "/", "", &h, b""),
            Err(SigError::Mismatch)
        );
        assert_eq!(
            verify(secret, &auth, "POST", "/", "", &h, b""),
            Err(SigError::Mismatch)
        );
        // Five minutes and a second later the same request has expired.
        let late = parse(&h, "service", now + CLOCK_WINDOW_MS + 1000).unwrap_err();
        assert_eq!(late.code(), "InvalidSignatureException");
        assert!(
            late.message().starts_with(
                "Signature expired: 20150830T123600Z is now earlier than 20150830T123601Z"
            ),
            "{}",
            late.message()
        );
        let early = parse(&h, "service", now - CLOCK_WINDOW_MS - 1000).unwrap_err();
        assert!(
            early.message().starts_with("Signature not yet current"),
            "{}",
            early.message()
        );
        assert_eq!(
            parse(&h, "other", now).unwrap_err(),
            SigError::WrongService("other".into())
        );
    }

    #[test]
    fn refuses_incomplete_and_temporary_credentials() {
        let mut h = HeaderMap::new();
        assert_eq!(parse(&h, "s", 0).unwrap_err(), SigError::Missing);
        h.insert(
            "authorization",
            HeaderValue::from_static("AWS4-HMAC-SHA256 Signature=00"),
        );
        let e = parse(&h, "s", 0).unwrap_err();
        assert_eq!(e.code(), "IncompleteSignatureException");
        assert!(e.message().contains("requires 'Credential' parameter"));
        assert!(e.message().contains("'X-Amz-Date'"));
        h.insert("x-amz-security-token", HeaderValue::from_static("t"));
        assert_eq!(parse(&h, "s", 0).unwrap_err(), SigError::SecurityToken);
        assert_eq!(parse_amz_date("20150830T123600"), None);
        assert_eq!(parse_amz_date("2015083xT123600Z"), None);
        assert_eq!(parse_amz_date("20151330T123600Z"), None);
        assert_eq!(
            format_amz_date(parse_amz_date("20150830T123600Z").unwrap()),
            "20150830T123600Z"
        );
    }

    #[test]
    fn canonical_query_sorts_and_encodes() {
        assert_eq!(canonical_query("b=2&a=x%20y&c"), "a=x%20y&b=2&c=");
        assert_eq!(percent_decode("%41%zz%4"), "A%zz%4");
        assert_eq!(percent_decode("%é%"), "%é%");
    }
}
