//! Alibaba Cloud API signatures, the server's half, for both schemes the SDKs use. Pure: no
//! I/O; the caller looks up the secret and supplies the time.
//!
//! - **ACS3-HMAC-SHA256** (the V3 signature, default of the `alibabacloud_tea_openapi` SDKs):
//!   `Authorization: ACS3-HMAC-SHA256 Credential=KEY,SignedHeaders=h1;h2,Signature=HEX` over
//!   the canonical request `METHOD\nPATH\nQUERY\nHEADERS\nSIGNED\nHEX(SHA256(body))`, with
//!   `x-acs-date` and `x-acs-signature-nonce` headers.
//! - **HMAC-SHA1** (the RPC signature 1.0, `signature_algorithm='v2'` in the SDKs): a
//!   `Signature` parameter, base64 of HMAC-SHA1(secret + "&", `METHOD&%2F&ENC(sorted params)`),
//!   with `AccessKeyId`, `Timestamp` and `SignatureNonce` parameters.
use axum::http::HeaderMap;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Millis;
use crate::token::hmac_sha256;

/// The V3 algorithm name.
pub const ACS3: &str = "ACS3-HMAC-SHA256";
/// How far a request's time may be from the server's (Alibaba allows 15 minutes; the same 5
/// as the AWS facade here).
pub const CLOCK_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Why a signature is refused: Alibaba's HTTP status, code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcsError {
    /// HTTP status.
    pub status: u16,
    /// Alibaba's error code.
    pub code: &'static str,
    /// Its message.
    pub message: String,
}

fn err(status: u16, code: &'static str, message: impl Into<String>) -> AcsError {
    AcsError {
        status,
        code,
        message: message.into(),
    }
}

/// The secret could not be checked because the signature does not match.
pub fn mismatch() -> AcsError {
    err(
        400,
        "SignatureDoesNotMatch",
        "Specified signature is not matched with our calculation.",
    )
}

/// What a signed request claims, before its signature is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The access key id.
    pub key_id: String,
    /// The signature nonce (replays are refused by the caller).
    pub nonce: String,
    /// Which scheme signed it.
    pub scheme: Scheme,
}

/// The signature scheme and what it needs to be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// ACS3-HMAC-SHA256.
    Acs3 {
        /// Signed header names, lowercase.
        signed_headers: Vec<String>,
        /// Lowercase hex signature.
        signature: String,
    },
    /// HMAC-SHA1 in the `Signature` parameter.
    Sha1 {
        /// The base64 signature.
        signature: String,
    },
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `YYYY-MM-DDTHH:MM:SSZ` -> ms since the epoch.
fn parse_utc(s: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn check_time(value: Option<&str>, name: &str, now: Millis) -> Result<(), AcsError> {
    let value = value.ok_or_else(|| {
        err(
            400,
            "MissingParameter",
            format!("The input parameter \"{name}\" that is mandatory for processing this request is not supplied."),
        )
    })?;
    let at = parse_utc(value).ok_or_else(|| {
        err(
            400,
            "InvalidTimeStamp.Format",
            format!("Specified time stamp or date value is not well formatted: {value}"),
        )
    })?;
    if (at - now).abs() > CLOCK_WINDOW_MS {
        return Err(err(
            400,
            "InvalidTimeStamp.Expired",
            format!(
                "Specified time stamp or date value is expired: {value} is more than {} minutes \
                 from the server's time.",
                CLOCK_WINDOW_MS / 60_000
            ),
        ));
    }
    Ok(())
}

/// A signature nonce, which every request must carry so that replays can be refused.
fn required_nonce<'a>(value: Option<&'a str>, name: &str) -> Result<&'a str, AcsError> {
    value.filter(|v| !v.is_empty()).ok_or_else(|| {
        err(
            400,
            "MissingParameter",
            format!("The input parameter \"{name}\" that is mandatory for processing this request is not supplied."),
        )
    })
}

/// Reads the claim of a signed request (either scheme) and checks its time.
pub fn parse(
    headers: &HeaderMap,
    params: &[(String, String)],
    now: Millis,
) -> Result<Claim, AcsError> {
    if header(headers, "x-acs-security-token").is_some() || param(params, "SecurityToken").is_some()
    {
        return Err(err(
            400,
            "InvalidSecurityToken.Malformed",
            "iotunnel issues no STS security tokens: sign with an access key from POST \
             /v1/access-keys",
        ));
    }
    if let Some(auth) = header(headers, "authorization") {
        let rest = auth
            .strip_prefix(ACS3)
            .filter(|r| r.starts_with(' '))
            .ok_or_else(|| {
                err(
                    400,
                    "IncompleteSignature",
                    format!("The request signature does not conform to Aliyun standards: only {ACS3} is supported in the Authorization header."),
                )
            })?;
        let (mut key, mut signed, mut signature) = (None, None, None);
        for part in rest.trim().split(',') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("Credential=") {
                key = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                signature = Some(v);
            }
        }
        let (Some(key), Some(signed), Some(signature)) = (key, signed, signature) else {
            return Err(err(
                400,
                "IncompleteSignature",
                "The request signature does not conform to Aliyun standards: Credential, \
                 SignedHeaders and Signature are required.",
            ));
        };
        check_time(header(headers, "x-acs-date"), "x-acs-date", now)?;
        let nonce = required_nonce(
            header(headers, "x-acs-signature-nonce"),
            "x-acs-signature-nonce",
        )?;
        let signed_headers: Vec<String> = signed.split(';').map(str::to_ascii_lowercase).collect();
        // What makes the request this request must be signed: where, when, which operation.
        for required in [
            "host",
            "x-acs-date",
            "x-acs-action",
            "x-acs-signature-nonce",
        ] {
            if headers.contains_key(required) && !signed_headers.iter().any(|h| h == required) {
                return Err(err(
                    400,
                    "IncompleteSignature",
                    format!("The request signature does not conform to Aliyun standards: header {required} must be signed."),
                ));
            }
        }
        return Ok(Claim {
            key_id: key.into(),
            nonce: nonce.into(),
            scheme: Scheme::Acs3 {
                signed_headers,
                signature: signature.to_ascii_lowercase(),
            },
        });
    }
    let Some(signature) = param(params, "Signature") else {
        return Err(err(
            400,
            "MissingSignature",
            "The input parameter \"Signature\" that is mandatory for processing this request is \
             not supplied.",
        ));
    };
    match param(params, "SignatureMethod") {
        Some("HMAC-SHA1") => {}
        other => {
            return Err(err(
                400,
                "InvalidSignatureMethod",
                format!("Specified signature method {other:?} is not supported: use HMAC-SHA1."),
            ))
        }
    }
    let key = param(params, "AccessKeyId").ok_or_else(|| {
        err(
            400,
            "MissingAccessKeyId",
            "The input parameter \"AccessKeyId\" that is mandatory for processing this request \
             is not supplied.",
        )
    })?;
    check_time(param(params, "Timestamp"), "Timestamp", now)?;
    Ok(Claim {
        key_id: key.into(),
        nonce: required_nonce(param(params, "SignatureNonce"), "SignatureNonce")?.into(),
        scheme: Scheme::Sha1 {
            signature: signature.into(),
        },
    })
}

/// Percent-encoding as Python's `quote(s, safe='~')`: everything but RFC 3986 unreserved.
pub fn encode(s: &str) -> String {
    super::sigv4::uri_encode(s, false)
}

/// The ACS3 canonical request. `raw_query` is the query string as sent.
pub fn acs3_canonical(
    method: &str,
    path: &str,
    params: &[(String, String)],
    headers: &HeaderMap,
    signed_headers: &[String],
    body: &[u8],
) -> String {
    let mut query: Vec<(&String, &String)> = params.iter().map(|(k, v)| (k, v)).collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for h in signed_headers {
        let mut values: Vec<String> = headers
            .get_all(h.as_str())
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            .collect();
        values.sort();
        canonical_headers.push_str(&format!("{h}:{}\n", values.join(",")));
    }
    let path = if path.is_empty() { "/" } else { path };
    format!(
        "{method}\n{path}\n{query}\n{canonical_headers}\n{}\n{}",
        signed_headers.join(";"),
        hex::encode(Sha256::digest(body))
    )
}

/// Checks an ACS3 signature (and that `x-acs-content-sha256` is the body's hash).
pub fn verify_acs3(
    secret: &str,
    signature: &str,
    canonical: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), AcsError> {
    if let Some(claimed) = header(headers, "x-acs-content-sha256") {
        if !claimed.eq_ignore_ascii_case(&hex::encode(Sha256::digest(body))) {
            return Err(mismatch());
        }
    }
    let to_sign = format!(
        "{ACS3}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let expected = hex::encode(hmac_sha256(secret.as_bytes(), to_sign.as_bytes()));
    if bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        Ok(())
    } else {
        Err(mismatch())
    }
}

/// The HMAC-SHA1 string to sign: `METHOD&%2F&ENC(k=v&...)` over every parameter but
/// `Signature`, sorted by name.
pub fn sha1_string_to_sign(method: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> =
        params.iter().filter(|(k, _)| k != "Signature").collect();
    sorted.sort();
    let canonical = sorted
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!("{method}&%2F&{}", encode(&canonical))
}

/// Checks an HMAC-SHA1 `Signature` parameter.
pub fn verify_sha1(
    secret: &str,
    signature: &str,
    method: &str,
    params: &[(String, String)],
) -> Result<(), AcsError> {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(format!("{secret}&").as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(sha1_string_to_sign(method, params).as_bytes());
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    if bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        Ok(())
    } else {
        Err(mismatch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Alibaba's documented RPC signature example (DescribeRegions, secret "testsecret").
    #[test]
    fn sha1_matches_the_documented_example() {
        let params = p(&[
            ("AccessKeyId", "testid"),
            ("Action", "DescribeRegions"),
            ("Format", "XML"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
            ("SignatureVersion", "1.0"),
            ("Timestamp", "2016-02-23T12:46:24Z"),
            ("Version", "2014-05-26"),
        ]);
        assert_eq!(
            sha1_string_to_sign("GET", &params),
            "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML%26\
             SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf\
             %26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D\
             2014-05-26"
        );
        let sig = "OLeaidS1JvxuMvnyHOwuJ+uX5qY=";
        assert_eq!(verify_sha1("testsecret", sig, "GET", &params), Ok(()));
        assert_eq!(verify_sha1("wrong", sig, "GET", &params), Err(mismatch()));
    }

    #[test]
    fn times_outside_the_window_are_refused() {
        let now = parse_utc("2016-02-23T12:46:24Z").unwrap();
        let mut params = p(&[
            ("Signature", "x"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("AccessKeyId", "k"),
            ("Timestamp", "2016-02-23T12:40:00Z"),
            ("SignatureNonce", "n"),
        ]);
        let e = parse(&HeaderMap::new(), &params, now).unwrap_err();
        assert_eq!(e.code, "InvalidTimeStamp.Expired");
        params[3].1 = "2016-02-23T12:45:00Z".into();
        assert_eq!(parse(&HeaderMap::new(), &params, now).unwrap().key_id, "k");
        params[3].1 = "yesterday".into();
        assert_eq!(
            parse(&HeaderMap::new(), &params, now).unwrap_err().code,
            "InvalidTimeStamp.Format"
        );
        assert_eq!(
            parse(&HeaderMap::new(), &[], now).unwrap_err().code,
            "MissingSignature"
        );
    }
}
