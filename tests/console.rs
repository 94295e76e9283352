//! The web console: its assets and headers over HTTP, and its whole flow in a real browser.
//!
//! The browser test runs `node tests/console/scenario.mjs` (playwright-core driving Debian's
//! Chromium) against a real server with its relay. The script signs in, creates a product and a
//! device, and asks this test (a JSON line on its stdout) to start the real device agent with the
//! secret it read from the page, and later the real `iotunnel client` with the token it read from
//! the result dialog; it then checks in the page that both sides connect, closes, deletes and
//! batch-operates tunnels. Screenshots go to `test-output/console/`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_iotunnel");

/// The policy every console response must carry (the wording, verbatim).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The whole browser scenario, Chromium start included, ends well within this on 2 busy cores.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The `src` of each `<script>` of the page; fails on any inline script or handler attribute.
fn external_scripts(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    for attr in [
        " onload=",
        " onerror=",
        " onclick=",
        "javascript:",
        " style=",
    ] {
        assert!(!lower.contains(attr), "the page has inline code: {attr}");
    }
    let mut srcs = Vec::new();
    for tag in lower.split("<script").skip(1) {
        let (open, rest) = tag.split_once('>').expect("a closed <script> tag");
        assert!(
            rest.starts_with("</script>"),
            "a <script> with inline content"
        );
        assert!(open.contains("type=\"module\""), "scripts are modules");
        let src = open
            .split("src=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("every <script> has a src");
        srcs.push(src.to_string());
    }
    srcs
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_api_404s_stay_json() {
    let t = TestServer::start().await;
    let http = &t.http;

    let page = http.get(format!("{}/", t.base)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "content-security-policy"), CSP);
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    let etag = header(&page, "etag").to_string();
    let html = page.text().await.unwrap();
    let scripts = external_scripts(&html);
    assert_eq!(scripts, ["/ui/js/app.js"]);
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no third-party assets"
    );

    // Every asset: its type, the same policy, and nothing fetched from elsewhere.
    for (path, kind) in [
        ("/ui/style.css", "text/css"),
        ("/ui/icon.svg", "image/svg+xml"),
        ("/ui/js/app.js", "text/javascript"),
        ("/ui/js/api.js", "text/javascript"),
        ("/ui/js/dom.js", "text/javascript"),
        ("/ui/js/tunnels.js", "text/javascript"),
        ("/ui/js/inventory.js", "text/javascript"),
    ] {
        let r = http.get(format!("{}{path}", t.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(header(&r, "content-type").starts_with(kind), "{path}");
        assert_eq!(header(&r, "content-security-policy"), CSP, "{path}");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
        let body = r.text().await.unwrap();
        if path.ends_with(".js") {
            assert!(!body.contains("innerHTML"), "{path} writes HTML");
            assert!(!body.contains("eval("), "{path} evaluates code");
        }
        assert!(!body.contains("https://"), "{path} names another origin");
    }

    // Revalidation is cheap.
    let r = http
        .get(format!("{}/", t.base))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    // Unknown API paths and assets still answer the JSON error envelope.
    for path in ["/v1/nope", "/nope", "/ui/nope.js", "/ui/../Cargo.toml"] {
        let (s, v) = t.get(path, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(v["error"]["code"], "not_found", "{path}: {v}");
    }
    let (s, v) = t.get("/v1/nope", "").await;
    assert_eq!(
        (s, v["error"]["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("no such route"))
    );
    // The page is not an API route: the OpenAPI document does not list it.
    let (_, doc) = t.get("/openapi.json", "").await;
    assert!(doc["paths"].get("/").is_none());
}

/// What the browser test needs from the machine; a clear failure when something is missing.
struct Tools {
    node: PathBuf,
    chromium: PathBuf,
    script: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn tools() -> Tools {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node = which("node").expect("the console test needs Node.js: apt-get install nodejs npm");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| which("chromium"))
        .filter(|p| p.is_file())
        .expect("the console test needs Chromium: apt-get install chromium (.ci/run does)");
    let playwright = root.join("tests/console/node_modules/playwright-core/package.json");
    assert!(
        playwright.is_file(),
        "the console test needs playwright-core: npm ci --prefix tests/console (.ci/run does it)"
    );
    Tools {
        node,
        chromium,
        script: root.join("tests/console/scenario.mjs"),
    }
}

/// Where the screenshots go: `test-output/console/`, emptied first.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-output/console");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The real binary with quiet logs, killed when the test ends.
fn binary(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("IOTUNNEL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("event without {k}: {v}"))
}

/// Starts what the script asks for: the device agent or the client.
fn start(t: &TestServer, event: &Value) -> Child {
    let ca = t.dir.path().join("tls/ca.pem");
    let ca = ca.to_str().unwrap();
    match field(event, "event") {
        "device" => binary(&[
            "device",
            "--api",
            &t.base,
            "--product-key",
            field(event, "product_key"),
            "--device-name",
            field(event, "device_name"),
            "--ca-file",
            ca,
        ])
        .env("IOTUNNEL_DEVICE_SECRET", field(event, "device_secret"))
        .spawn()
        .expect("start the device agent"),
        "client" => binary(&[
            "client",
            "--url",
            field(event, "url"),
            "--listen",
            "127.0.0.1:0",
            "--ca-file",
            ca,
        ])
        .env("IOTUNNEL_TOKEN", field(event, "token"))
        .spawn()
        .expect("start the client"),
        other => panic!("unknown event {other}: {event}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secure_tunnel_page_runs_the_whole_flow_in_chromium() {
    let tools = tools();
    let out = screenshot_dir();
    let t = TestServer::start_dialable(Arc::new(tempfile::tempdir().unwrap()), None, |s| {
        // RTTs show up within a second instead of after the default 20 s.
        s.peer_ping_interval_ms = 300;
    })
    .await;
    let key = t.account("console").await;

    let mut node = Command::new(&tools.node)
        .arg(&tools.script)
        .env("CONSOLE_URL", &t.base)
        .env("CONSOLE_API_KEY", &key)
        .env("CONSOLE_OUT", &out)
        .env("CHROMIUM", &tools.chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut started = Vec::new();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let event: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("the script printed {line:?}, not an event: {e}"));
            started.push((field(&event, "event").to_string(), start(&t, &event)));
        }
        node.wait().await.unwrap()
    };
    let status = tokio::time::timeout(SCENARIO_TIMEOUT, run)
        .await
        .expect("the browser scenario finishes in time");
    assert!(
        status.success(),
        "the browser scenario failed ({status}); see its output above and {}",
        out.display()
    );

    // What the page did is what the API holds: of the four tunnels made in the dialog only one
    // was left (with the five made for pagination), and deleting cam-1 closed those six; cam-2
    // stays. The client started with the token from the dialog was cut off when its tunnel
    // closed, and the agent stopped when its device was deleted.
    let (_, v) = t.get("/v1/tunnels", &key).await;
    let tunnels = v["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 6, "{v}");
    assert!(
        tunnels
            .iter()
            .all(|t| t["state"] == "CLOSED" && t["close_reason"] == "device_deleted"),
        "{v}"
    );
    let (_, v) = t.get("/v1/products", &key).await;
    assert_eq!(
        v["products"][0]["name"],
        "Cameras <img src=x onerror=\"window.__xss=1\">"
    );
    let pk = v["products"][0]["product_key"].as_str().unwrap();
    let (_, v) = t.get(&format!("/v1/products/{pk}/devices"), &key).await;
    let names: Vec<_> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cam-2"]);
    let kinds: Vec<_> = started.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["device", "client"]);
    let agent = &mut started[0].1;
    tokio::time::timeout(Duration::from_secs(20), agent.wait())
        .await
        .expect("the agent stops once its device is deleted")
        .unwrap();
    let client = &mut started[1].1;
    let exit = tokio::time::timeout(Duration::from_secs(20), client.wait())
        .await
        .expect("the client ends once its tunnel is closed")
        .unwrap();
    assert!(!exit.success(), "the client reports the closed tunnel");
    for name in [
        "01-signin",
        "09-list-live",
        "18-mobile-tunnels",
        "20b-mobile-device-command",
        "20d-device-delete-confirm",
        "21-signed-out",
    ] {
        assert!(
            out.join(format!("{name}.png")).is_file(),
            "{name}.png saved"
        );
    }
}
