//! What the loadtest's integration tests share: an in-process server on loopback and its key.
use std::path::Path;
use std::sync::Arc;

use iotunnel::clock::{Clock, SystemClock};
use iotunnel::config::{Secret, Settings};
use iotunnel::server::{Listeners, Server};

/// The admin key of [`server`].
pub const ADMIN_KEY: &str = "itk_loadtest-admin-key-0123456789abcdef";

/// A real server on 127.0.0.1:0 with 2 shards, its relay on ws:// when `plaintext`.
pub async fn server(dir: &Path, plaintext: bool) -> Server {
    let mut settings = Settings::for_tests(dir.to_path_buf());
    settings.admin_key = Some(Secret(ADMIN_KEY.into()));
    settings.relay_plaintext = plaintext;
    settings.shards = 2;
    settings.max_open_tunnels_per_device = 1_000;
    let listeners = Listeners::bind(&settings).await.unwrap();
    Server::start(settings, Arc::new(SystemClock) as Arc<dyn Clock>, listeners)
        .await
        .unwrap()
}
