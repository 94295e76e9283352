//! The device agent running in-process against a [`TestServer`], for the agent tests.
use std::net::SocketAddr;
use std::time::Duration;

use iotunnel::agent::device::{self, AgentArgs, AgentOptions, RelayArgs};
use iotunnel::config::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::peers::{within, within_for};

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

/// A TCP echo server; returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A deterministic byte pattern of `len` bytes, varied by `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Sends `len` bytes through `conn` while reading them back; checks they come back intact.
pub async fn echo_through(conn: &mut TcpStream, len: usize, seed: u8) {
    let data = pattern(len, seed);
    let (mut r, mut w) = conn.split();
    let send = async { w.write_all(&data).await.expect("write to the client") };
    let recv = async {
        let mut got = vec![0u8; len];
        r.read_exact(&mut got).await.expect("echo comes back");
        got
    };
    let ((), got) = within_for(Duration::from_secs(60), "echo through the tunnel", async {
        tokio::join!(send, recv)
    })
    .await;
    assert!(got == data, "echo of {len} bytes (seed {seed}) differs");
}

/// Connects to a client listener (bounded wait).
pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect to the client's listener", TcpStream::connect(addr))
        .await
        .expect("the client listens")
}
