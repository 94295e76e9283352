//! The device agent running in-process against a [`TestServer`], for the agent tests.
use iotunnel::agent::device::{self, AgentArgs, AgentOptions, RelayArgs};
use iotunnel::config::Secret;
use tokio::task::JoinHandle;

use super::TestServer;

/// A device with the agent running in-process, serving `services`.
pub struct Device {
    pub key: String,
    pub product_key: String,
    pub options: AgentOptions,
    pub agent: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.agent.abort();
    }
}

pub async fn device(t: &TestServer, services: &[(&str, String)]) -> Device {
    let key = t.account("acme").await;
    let product_key = t.product(&key).await;
    let secret = t.device(&key, &product_key, "dev-1").await;
    let options = AgentOptions {
        channel: AgentArgs {
            api_url: t.base.clone(),
            product_key: Some(product_key.clone()),
            device_name: Some("dev-1".into()),
            device_secret: Some(Secret(secret)),
        },
        relay: RelayArgs {
            services: services
                .iter()
                .map(|(name, addr)| (name.to_string(), addr.clone()))
                .collect(),
            ca_file: Some(t.dir.path().join("tls/ca.pem")),
            config: None,
        },
    };
    let agent = tokio::spawn(device::run(options.clone()));
    t.wait_online(&key, &product_key, "dev-1", true).await;
    Device {
        key,
        product_key,
        options,
        agent,
    }
}
