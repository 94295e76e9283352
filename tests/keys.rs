//! API keys against real servers on 127.0.0.1:0: listing (an account's own, the admin's all),
//! creating, revoking (at once, on this node and on the other nodes of a fleet), the last-used
//! time, and the retirement of an earlier `IOTUNNEL_ADMIN_KEY` when a server restarts with a
//! new one.
mod common;

use std::sync::Arc;

use common::pg::TestDatabase;
use common::*;
use iotunnel::clock::{rfc3339, Clock, ManualClock};
use iotunnel::config::{Secret, Settings};
use iotunnel::control::keys::{KEY_CACHE_TTL_MS, LAST_USED_WRITE_MS};
use iotunnel::server::{Listeners, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// The keys `key` may list, as (key_id, account_id, origin) sorted.
async fn listed(t: &TestServer, key: &str, query: &str) -> Vec<(String, String, String)> {
    let (s, v) = t.get(&format!("/v1/keys{query}"), key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut keys: Vec<_> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let f = |n: &str| k[n].as_str().unwrap().to_string();
            (f("key_id"), f("account_id"), f("origin"))
        })
        .collect();
    keys.sort();
    keys
}

/// The listed key marked `current` (the one of the request).
async fn current(t: &TestServer, key: &str) -> Value {
    let (_, v) = t.get("/v1/keys", key).await;
    let mine: Vec<_> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["current"] == true)
        .cloned()
        .collect();
    assert_eq!(mine.len(), 1, "{v}");
    mine[0].clone()
}

async fn account_id(t: &TestServer, key: &str) -> String {
    current(t, key).await["account_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Creates a key with `as_key`; returns the 201 body.
async fn create_key(t: &TestServer, as_key: &str, body: Value) -> Value {
    let (s, v) = t.post("/v1/keys", as_key, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

async fn products_status(t: &TestServer, key: &str) -> StatusCode {
    t.get("/v1/products", key).await.0
}

#[tokio::test]
async fn an_account_lists_and_creates_its_own_keys_and_the_admin_all() {
    let t = TestServer::start().await;
    let a = t.account("a").await;
    let b = t.account("b").await;
    let (acc_a, acc_b) = (account_id(&t, &a).await, account_id(&t, &b).await);

    let ci = create_key(&t, &a, json!({"name": "ci runner"})).await;
    let ci_key = ci["api_key"].as_str().unwrap();
    assert!(ci_key.starts_with("itk_") && ci_key.len() > 40, "{ci}");
    assert!(ci["key_id"].as_str().unwrap().starts_with("key_"));
    assert_eq!(
        (&ci["account_id"], &ci["name"]),
        (&json!(acc_a), &json!("ci runner"))
    );
    // The new key is the same account: it sees a's products, not b's.
    let pk = t.product(ci_key).await;
    let (_, v) = t.get("/v1/products", &a).await;
    assert_eq!(v["products"][0]["product_key"], pk.as_str());
    assert_eq!(t.get("/v1/products", &b).await.1["products"], json!([]));

    // An account lists only its own keys, never a secret.
    let (s, v) = t.get("/v1/keys", &a).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.to_string();
    assert!(
        !text.contains(&a) && !text.contains(ci_key),
        "a secret is listed: {v}"
    );
    // Oldest first; keys made in the same millisecond (this clock stands still) by id.
    let keys = v["keys"].as_array().unwrap();
    let origins: Vec<_> = keys.iter().map(|k| k["origin"].as_str().unwrap()).collect();
    assert!(
        origins == ["account", "api"] || origins == ["api", "account"],
        "{v}"
    );
    let made = keys.iter().find(|k| k["origin"] == "api").unwrap();
    assert_eq!(made["name"], "ci runner");
    assert_eq!(made["last_used_at"], rfc3339(t.clock.now_ms()).as_str());
    assert!(listed(&t, &b, "").await.iter().all(|k| k.1 == acc_b));
    assert_eq!(current(&t, ci_key).await["key_id"], ci["key_id"]);

    // Nothing of another account, and no key for it.
    let (s, v) = t.get(&format!("/v1/keys?account_id={acc_b}"), &a).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    let (s, v) = t
        .post("/v1/keys", &a, json!({"name": "x", "account_id": acc_b}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    let (s, v) = t.post("/v1/keys", &a, json!({"name": ""})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, _) = t
        .post("/v1/keys", &a, json!({"name": "x", "secret": "y"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown fields are refused");

    // The admin sees every account's keys (or one account's) and may make keys for any.
    let all = listed(&t, ADMIN_KEY, "").await;
    let accounts: std::collections::BTreeSet<_> = all.iter().map(|k| k.1.as_str()).collect();
    assert_eq!(
        accounts,
        [acc_a.as_str(), "acc_admin", acc_b.as_str()].into()
    );
    assert!(all.contains(&(
        current(&t, ADMIN_KEY).await["key_id"]
            .as_str()
            .unwrap()
            .into(),
        "acc_admin".into(),
        "env".into()
    )));
    assert_eq!(
        listed(&t, ADMIN_KEY, &format!("?account_id={acc_b}"))
            .await
            .len(),
        1
    );
    let for_b = create_key(&t, ADMIN_KEY, json!({"name": "ops", "account_id": acc_b})).await;
    assert_eq!(for_b["account_id"], acc_b.as_str());
    let (_, v) = t
        .get(&format!("/v1/keys?account_id={acc_b}"), ADMIN_KEY)
        .await;
    let made = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == for_b["key_id"]);
    assert_eq!(
        made.unwrap()["last_used_at"],
        Value::Null,
        "made, never used"
    );
    assert_eq!(
        account_id(&t, for_b["api_key"].as_str().unwrap()).await,
        acc_b
    );
    let (s, v) = t
        .post(
            "/v1/keys",
            ADMIN_KEY,
            json!({"name": "x", "account_id": "acc_ghost"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once() {
    let t = TestServer::start().await;
    let a = t.account("a").await;
    let b = t.account("b").await;
    let spare = create_key(&t, &a, json!({"name": "spare"})).await;
    let (spare_key, spare_id) = (
        spare["api_key"].as_str().unwrap(),
        spare["key_id"].as_str().unwrap(),
    );
    // Used first, so the server holds it in its cache.
    assert_eq!(products_status(&t, spare_key).await, StatusCode::OK);

    // Another account cannot see it to revoke it.
    let (s, v) = t.delete(&format!("/v1/keys/{spare_id}"), &b).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    assert_eq!(products_status(&t, spare_key).await, StatusCode::OK);

    let (s, _) = t.delete(&format!("/v1/keys/{spare_id}"), &a).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t.get("/v1/products", spare_key).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (s, _) = t.delete(&format!("/v1/keys/{spare_id}"), &a).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "revoked once, gone from the list");
    assert_eq!(listed(&t, &a, "").await.len(), 1);

    // An account may revoke the key it calls with; the admin any account's.
    let own = current(&t, &a).await["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        t.delete(&format!("/v1/keys/{own}"), &a).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(products_status(&t, &a).await, StatusCode::UNAUTHORIZED);
    let theirs = current(&t, &b).await["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = t.delete(&format!("/v1/keys/{theirs}"), ADMIN_KEY).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(products_status(&t, &b).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_cache_asks_the_store_again_after_its_ttl() {
    // A revoke this node did not see (its bus message lost): the cache trusts the key for at
    // most KEY_CACHE_TTL_MS more.
    let t = TestServer::start().await;
    let a = t.account("a").await;
    let id = current(&t, &a).await["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let store = t.server().control.store.clone();
    store
        .revoke_api_key(None, id, t.clock.now_ms())
        .await
        .unwrap();
    assert_eq!(
        products_status(&t, &a).await,
        StatusCode::OK,
        "still cached"
    );
    t.clock.advance_ms(KEY_CACHE_TTL_MS);
    assert_eq!(products_status(&t, &a).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn last_use_is_recorded_at_most_once_a_minute() {
    let t = TestServer::start().await;
    let a = t.account("a").await;
    let first = t.clock.now_ms();
    assert_eq!(
        current(&t, &a).await["last_used_at"],
        rfc3339(first).as_str()
    );
    t.clock.advance_ms(LAST_USED_WRITE_MS / 2);
    assert_eq!(products_status(&t, &a).await, StatusCode::OK);
    assert_eq!(
        current(&t, &a).await["last_used_at"],
        rfc3339(first).as_str(),
        "not written again within the minute"
    );
    t.clock.advance_ms(LAST_USED_WRITE_MS / 2);
    let later = t.clock.now_ms();
    assert_eq!(
        current(&t, &a).await["last_used_at"],
        rfc3339(later).as_str()
    );
    // Another node (or a restart) reads what was written.
    let (_, v) = t.get("/v1/keys", ADMIN_KEY).await;
    let a_key = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "created with the account" && k["account_id"] != "acc_admin")
        .cloned()
        .unwrap();
    assert_eq!(a_key["last_used_at"], rfc3339(later).as_str());
}

/// Starts a server on `dir` with `admin_key`; the error when it refuses to start.
async fn start_with_admin_key(
    dir: &Arc<tempfile::TempDir>,
    clock: &ManualClock,
    admin_key: &str,
    keep_previous: bool,
) -> Result<TestServer, String> {
    let mut settings = Settings::for_tests(dir.path().to_path_buf());
    settings.admin_key = Some(Secret(admin_key.into()));
    settings.keep_previous_admin_keys = keep_previous;
    let listeners = Listeners::bind(&settings).await.unwrap();
    match Server::start(settings, Arc::new(clock.clone()), listeners).await {
        Err(e) => Err(format!("{e:#}")),
        Ok(server) => {
            server.shutdown().await;
            let key = admin_key.to_string();
            Ok(TestServer::start_in(dir.clone(), clock.clone(), move |s| {
                s.admin_key = Some(Secret(key));
                s.keep_previous_admin_keys = keep_previous;
            })
            .await)
        }
    }
}

#[tokio::test]
async fn a_restart_with_a_new_admin_key_retires_the_previous_one() {
    let mut t = TestServer::start().await;
    let (dir, clock) = (t.dir.clone(), t.clock.clone());
    let ops = create_key(&t, ADMIN_KEY, json!({"name": "ops"})).await;
    let ops_key = ops["api_key"].as_str().unwrap().to_string();
    let a = t.account("a").await;
    t.stop().await;

    const NEW: &str = "itk_the-new-admin-key-after-a-leak-0000";
    let mut t = start_with_admin_key(&dir, &clock, NEW, false)
        .await
        .unwrap();
    assert_eq!(products_status(&t, NEW).await, StatusCode::OK);
    let (s, v) = t.get("/v1/products", ADMIN_KEY).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "retired"
    );
    // Keys made through the API (the admin's and other accounts') stay.
    assert_eq!(products_status(&t, &ops_key).await, StatusCode::OK);
    assert_eq!(products_status(&t, &a).await, StatusCode::OK);
    let env: Vec<_> = listed(&t, NEW, "?account_id=acc_admin")
        .await
        .into_iter()
        .filter(|k| k.2 == "env")
        .collect();
    assert_eq!(env.len(), 1, "{env:?}");
    assert_eq!(env[0].0, current(&t, NEW).await["key_id"].as_str().unwrap());
    t.stop().await;

    // The retired key does not come back with a restart, and says so.
    let err = start_with_admin_key(&dir, &clock, ADMIN_KEY, false)
        .await
        .err()
        .expect("a revoked IOTUNNEL_ADMIN_KEY is refused");
    assert!(err.contains("IOTUNNEL_ADMIN_KEY was revoked"), "{err}");

    // Told to keep them, a start with a third key leaves the second valid.
    const THIRD: &str = "itk_a-third-admin-key-kept-beside-0000";
    let t = start_with_admin_key(&dir, &clock, THIRD, true)
        .await
        .unwrap();
    assert_eq!(products_status(&t, THIRD).await, StatusCode::OK);
    assert_eq!(products_status(&t, NEW).await, StatusCode::OK);
    assert_eq!(products_status(&t, &ops_key).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_reaches_the_other_nodes_of_a_fleet() {
    let db = TestDatabase::create().await;
    // One clock that never moves: no cache entry expires, so only the bus can tell node B.
    let clock = ManualClock::new(iotunnel::clock::SystemClock.now_ms());
    let mut nodes = Vec::new();
    for i in 0..2 {
        let url = db.url.clone();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        nodes.push(
            TestServer::start_in(dir, clock.clone(), move |s| {
                s.database_url = Some(Secret(url));
                s.node_id = Some(format!("node-{i}"));
                s.heartbeat_interval_ms = 20;
            })
            .await,
        );
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let key = a.account("fleet").await;
    let spare = create_key(a, &key, json!({"name": "spare"})).await;
    let spare_key = spare["api_key"].as_str().unwrap();
    // Both nodes have it cached.
    assert_eq!(products_status(a, spare_key).await, StatusCode::OK);
    assert_eq!(products_status(b, spare_key).await, StatusCode::OK);

    let path = format!("/v1/keys/{}", spare["key_id"].as_str().unwrap());
    assert_eq!(a.delete(&path, &key).await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        products_status(a, spare_key).await,
        StatusCode::UNAUTHORIZED
    );
    wait_for(|| async { products_status(b, spare_key).await == StatusCode::UNAUTHORIZED }).await;
    // The account's other key still works on both.
    assert_eq!(products_status(b, &key).await, StatusCode::OK);
}

#[tokio::test]
async fn the_cli_lists_creates_and_revokes_keys_and_the_env_flag_keeps_old_admin_keys() {
    use common::process::{cli, cli_json, ServerCmd};
    const FIRST: &str = "itk_first-admin-key-of-this-data-dir-000";
    const SECOND: &str = "itk_second-admin-key-of-this-data-dir-00";
    const THIRD: &str = "itk_third-admin-key-of-this-data-dir-000";
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = |key: &str| ServerCmd::new(&data).env("IOTUNNEL_ADMIN_KEY", key);
    let mut p = server(FIRST).start().await;
    let base = p.api_base.clone();

    let made = cli_json(&base, FIRST, &["key", "create", "--name", "ci"]).await;
    let (secret, id) = (
        made["api_key"].as_str().unwrap().to_string(),
        made["key_id"].as_str().unwrap().to_string(),
    );
    let out = cli(&base, &secret, &["key", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.starts_with("KEY ID") && table.contains("LAST USED"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains(" api ")),
        "{table}"
    );
    assert!(
        !table.contains(&secret) && !table.contains(FIRST),
        "no secret: {table}"
    );
    let listed = cli_json(&base, FIRST, &["key", "list", "--account-id", "acc_admin"]).await;
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2, "{listed}");

    let out = cli(&base, FIRST, &["key", "revoke", &id]).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("API key {id} revoked")
    );
    let out = cli(&base, &secret, &["product", "list"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid API key"));
    // The server never wrote a key's secret to its output.
    p.stop().await;
    assert!(!p.output().contains(&secret) && !p.output().contains(FIRST));

    // IOTUNNEL_KEEP_PREVIOUS_ADMIN_KEYS keeps the first key beside the second ...
    let mut p = server(SECOND)
        .env("IOTUNNEL_KEEP_PREVIOUS_ADMIN_KEYS", "true")
        .start()
        .await;
    for key in [FIRST, SECOND] {
        let (s, _) = p
            .call(reqwest::Method::GET, "/v1/products", key, None)
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    p.stop().await;
    // ... and a start without it retires both.
    let mut p = server(THIRD).start().await;
    for (key, want) in [
        (FIRST, StatusCode::UNAUTHORIZED),
        (SECOND, StatusCode::UNAUTHORIZED),
        (THIRD, StatusCode::OK),
    ] {
        let (s, _) = p
            .call(reqwest::Method::GET, "/v1/products", key, None)
            .await;
        assert_eq!(s, want);
    }
    assert!(p
        .output()
        .contains("revoked the IOTUNNEL_ADMIN_KEY of an earlier start"));
    p.stop().await;
}
