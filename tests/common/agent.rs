//! The device agent running in-process against a [`TestServer`], for the agent tests.
use std::net::SocketAddr;
use std::time::Duration;

use iotunnel::agent::device::{self, AgentArgs, AgentOptions, RelayArgs};
use iotunnel::config::Secret;
use ring::digest::{Context, Digest, SHA256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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

// ---------------------------------------------------------------------------------------------
// Hashed streams both ways at once (agent_scale.rs, fleet.rs)
// ---------------------------------------------------------------------------------------------

/// The write size.
const CHUNK: usize = 1 << 20;
/// Every STAMP bytes the stream carries its own offset, so that a dropped, repeated or
/// reordered piece changes the hash even though the chunks otherwise repeat.
const STAMP: usize = 4096;

/// Writes `total` bytes of a stream seeded by `seed` to `w` and returns their SHA-256: 1 MiB
/// of xorshift noise, repeated, with the offset stamped every [`STAMP`] bytes.
pub async fn send_stream(w: &mut (impl AsyncWrite + Unpin), total: u64, seed: u64) -> Digest {
    let mut chunk = vec![0u8; CHUNK];
    let mut x = seed | 1;
    for word in chunk.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    let mut hash = Context::new(&SHA256);
    let mut offset: u64 = 0;
    while offset < total {
        let len = CHUNK.min(usize::try_from(total - offset).unwrap_or(CHUNK));
        for (i, piece) in chunk[..len].chunks_mut(STAMP).enumerate() {
            let at = (offset + (i * STAMP) as u64).to_be_bytes();
            let n = piece.len().min(8);
            piece[..n].copy_from_slice(&at[..n]);
        }
        hash.update(&chunk[..len]);
        w.write_all(&chunk[..len]).await.expect("write the stream");
        offset += len as u64;
    }
    hash.finish()
}

/// Reads exactly `total` bytes from `r` and returns their SHA-256.
pub async fn recv_stream(r: &mut (impl AsyncRead + Unpin), total: u64) -> Option<Digest> {
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match r.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => {
                hash.update(&buf[..n]);
                left -= n as u64;
            }
        }
    }
    Some(hash.finish())
}

/// The device's service for the 1 GiB test: reads an 8-byte big-endian length L, then at the
/// same time reads L bytes (hashing them) and writes L bytes of its own stream (seed 2,
/// hashing them too), and answers with the SHA-256 of what it read followed by the SHA-256 of
/// what it wrote. It echoes nothing.
pub async fn hash_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(len) = socket.read_u64().await else {
                    return;
                };
                let (mut r, mut w) = socket.split();
                let (got, sent) =
                    tokio::join!(recv_stream(&mut r, len), send_stream(&mut w, len, 2));
                let Some(got) = got else { return };
                let _ = w.write_all(got.as_ref()).await;
                let _ = w.write_all(sent.as_ref()).await;
            });
        }
    });
    addr
}

/// The client side of [`hash_service`] over `conn`: sends `total` bytes (seed 1) while
/// receiving the service's `total` bytes, then checks both SHA-256s against the service's.
pub async fn hash_through(conn: &mut TcpStream, total: u64) {
    conn.write_u64(total).await.expect("write the length");
    let (mut r, mut w) = conn.split();
    let (sent, got) = tokio::join!(send_stream(&mut w, total, 1), recv_stream(&mut r, total));
    let got = got.expect("the device's bytes arrive");
    let mut theirs = [0u8; 64];
    r.read_exact(&mut theirs)
        .await
        .expect("the device answers with its hashes");
    assert_eq!(
        hex::encode(&theirs[..32]),
        hex::encode(sent.as_ref()),
        "the device received other bytes than the client's app sent"
    );
    assert_eq!(
        hex::encode(&theirs[32..]),
        hex::encode(got.as_ref()),
        "the client's app received other bytes than the device sent"
    );
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
