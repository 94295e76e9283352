//! The vendor SDKs (boto3, alibabacloud_iot20180120) run from the Python virtualenv that
//! `scripts/python-venv.sh` makes, against a [`TestServer`].
use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::TestServer;

/// The virtualenv's interpreter: `$IOTUNNEL_PYTHON`, else the script's default path. Fails
/// (never skips) when it is missing.
pub fn python() -> PathBuf {
    let path = std::env::var_os("IOTUNNEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/iotunnel-venv/bin/python"));
    assert!(
        path.exists(),
        "{} is missing: the vendor SDK tests need the Python virtualenv; run \
         scripts/python-venv.sh (or set IOTUNNEL_PYTHON to its bin/python)",
        path.display()
    );
    path
}

/// A script of tests/vendor/.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vendor")
        .join(name)
}

/// Creates an access key pair for the account of `api_key`: (id, secret).
pub async fn access_key(t: &TestServer, api_key: &str) -> (String, String) {
    let (s, v) = t.post("/v1/access-keys", api_key, json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (
        v["access_key_id"].as_str().unwrap().to_string(),
        v["secret_access_key"].as_str().unwrap().to_string(),
    )
}

/// boto3's `iotsecuretunneling` client pointed at a test server.
#[derive(Clone)]
pub struct Aws {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id.
    pub key_id: String,
    /// Secret access key.
    pub secret: String,
    /// Region name signed for.
    pub region: String,
    /// Sent as `aws_session_token` when set.
    pub session_token: Option<String>,
}

impl Aws {
    /// A client of `t` signing with the key pair.
    pub fn new(t: &TestServer, (key_id, secret): (String, String)) -> Self {
        Self {
            endpoint: t.base.clone(),
            key_id,
            secret,
            region: "eu-west-1".into(),
            session_token: None,
        }
    }

    /// Runs the operations in one boto3 client, in order; one outcome each
    /// (`{"ok": ...}` or `{"error": {"class", "code", "message", "status", "modeled"}}`).
    pub async fn calls(&self, ops: &[(&str, Value)]) -> Vec<Value> {
        let ops: Vec<Value> = ops.iter().map(|(op, p)| json!([op, p])).collect();
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(script("aws_call.py"))
            .arg(Value::Array(ops.clone()).to_string())
            .env("IOTUNNEL_ENDPOINT", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", &self.region)
            // Nothing from the machine's own AWS setup may leak in.
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN");
        if let Some(token) = &self.session_token {
            cmd.env("AWS_SESSION_TOKEN", token);
        }
        let out = cmd.output().await.expect("run the boto3 script");
        json_lines(&out, "boto3 script", ops.len())
    }

    /// Runs one operation; its response, failing the test on an error.
    pub async fn ok(&self, op: &str, params: Value) -> Value {
        let r = self.calls(&[(op, params)]).await.remove(0);
        assert!(r.get("ok").is_some(), "{op} failed: {r}");
        r["ok"].clone()
    }

    /// Runs one operation that must fail; its error.
    pub async fn err(&self, op: &str, params: Value) -> Value {
        let r = self.calls(&[(op, params)]).await.remove(0);
        assert!(r.get("error").is_some(), "{op} should have failed: {r}");
        r["error"].clone()
    }
}

/// Which signature the Alibaba SDK uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliyunSignature {
    /// ACS3-HMAC-SHA256, the SDK's default.
    Acs3,
    /// The RPC HMAC-SHA1 `Signature` parameter (`signature_algorithm='v2'`).
    Sha1,
}

/// The `alibabacloud_iot20180120` client pointed at a test server.
#[derive(Clone)]
pub struct Aliyun {
    /// `127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id.
    pub key_id: String,
    /// Secret.
    pub secret: String,
    /// Signature scheme.
    pub signature: AliyunSignature,
}

impl Aliyun {
    /// A client of `t` signing with the key pair.
    pub fn new(
        t: &TestServer,
        (key_id, secret): (String, String),
        signature: AliyunSignature,
    ) -> Self {
        Self {
            endpoint: t.base.trim_start_matches("http://").to_string(),
            key_id,
            secret,
            signature,
        }
    }

    /// Runs the actions in one SDK client, in order; one outcome each (`{"ok": body,
    /// "status"}` or `{"error": {"class", "code", "message", "status"}}`).
    pub async fn calls(&self, ops: &[(&str, Value)]) -> Vec<Value> {
        let ops: Vec<Value> = ops.iter().map(|(op, p)| json!([op, p])).collect();
        let out = tokio::process::Command::new(python())
            .arg(script("aliyun_call.py"))
            .arg(Value::Array(ops.clone()).to_string())
            .env("IOTUNNEL_ENDPOINT", &self.endpoint)
            .env("ALIBABA_KEY_ID", &self.key_id)
            .env("ALIBABA_KEY_SECRET", &self.secret)
            .env(
                "IOTUNNEL_SIGNATURE",
                match self.signature {
                    AliyunSignature::Acs3 => "acs3",
                    AliyunSignature::Sha1 => "sha1",
                },
            )
            .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
            .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
            .output()
            .await
            .expect("run the Alibaba SDK script");
        json_lines(&out, "Alibaba SDK script", ops.len())
    }

    /// Runs one action that must succeed (`Success: true`); its `Data` (Null when none).
    pub async fn ok(&self, action: &str, params: Value) -> Value {
        let r = self.calls(&[(action, params)]).await.remove(0);
        assert_eq!(r["ok"]["Success"], true, "{action} failed: {r}");
        assert!(r["ok"]["RequestId"].is_string(), "{r}");
        r["ok"].get("Data").cloned().unwrap_or(Value::Null)
    }

    /// Runs one action that must fail as a business error (`Success: false`, HTTP 200);
    /// its `Code`.
    pub async fn biz_err(&self, action: &str, params: Value) -> String {
        let r = self.calls(&[(action, params)]).await.remove(0);
        assert_eq!(
            r["ok"]["Success"], false,
            "{action} should have failed: {r}"
        );
        assert_eq!(r["status"], 200, "{r}");
        assert!(r["ok"]["ErrorMessage"].is_string(), "{r}");
        r["ok"]["Code"].as_str().unwrap().to_string()
    }

    /// Runs one action the SDK must raise for; the error.
    pub async fn raised(&self, action: &str, params: Value) -> Value {
        let r = self.calls(&[(action, params)]).await.remove(0);
        assert!(r.get("error").is_some(), "{action} should have raised: {r}");
        r["error"].clone()
    }
}

/// The results of a script run by `calls`: one JSON line per call, `calls` of them; fails the
/// test, with the script's output, when it failed or printed otherwise.
fn json_lines(out: &std::process::Output, what: &str, calls: usize) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON line per call"))
        .collect();
    assert_eq!(results.len(), calls, "{stdout}");
    results
}
