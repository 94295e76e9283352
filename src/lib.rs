//! iotunnel: a self-hosted secure-tunnel service for IoT fleets.
//!
//! # Glossary
//! - **Tunnel**: a pairing, created through the API, between one device and one client. It is
//!   OPEN until closed, expired or its device is deleted, then CLOSED until deleted.
//! - **Device**: a machine of the fleet, registered under a product. It keeps a device channel to
//!   the control plane and dials the relay when a tunnel is created for it.
//! - **Client**: the person's side of a tunnel (a local proxy, ssh ProxyCommand, a browser...).
//! - **Side**: `device` or `client`; every token belongs to exactly one side of one tunnel.
//! - **Shard**: one data-plane thread, owning the tunnels placed on it (the fewest open wins).
//! - **Hand-off**: moving an accepted relay socket to the tunnel's owner shard.
//! - **Pump**: the loop that forwards frames between the two sides of a tunnel.
//! - **Node**: one `iotunnel server` process. Nodes sharing one PostgreSQL database form a
//!   fleet; a server on SQLite is a fleet of one node.
//! - **Owner**: the node where both sides of a tunnel meet and its frames are pumped (on one of
//!   its shards), chosen at create and changed only when that node dies or drains.
//! - **Mesh**: the node-to-node links over which a node that accepted a peer of another node's
//!   tunnel forwards the connection to the owner: TLS 1.3 mutually authenticated by the fleet
//!   CA, and inside it a preamble signed with the fleet's mesh key ([`relay::mesh`]).
//! - **Lease**: a named, expiring claim in the store that lets one node at a time run a
//!   fleet-wide job.
//! - **Leader**: the node holding the `leader` lease; it sweeps lifecycles and re-places the
//!   tunnels of dead nodes.
//! - **Bus**: messages between nodes through the store (PostgreSQL LISTEN/NOTIFY).
//! - **Access key**: an account's key id and secret that vendor SDKs sign requests with (AWS
//!   SigV4, Alibaba's signatures); the secret is stored only sealed under the server's key.
//! - **Facade**: a vendor's control API (AWS IoT Secure Tunneling, Alibaba IoT) served over
//!   the same control plane on `POST /`.
//!
//! The crate is two planes in one binary: the control plane ([`control`], [`store`]) and the
//! data plane (the relay, which plugs into [`seam`]).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cli;
pub mod cli_docs;
pub mod clock;
pub mod config;
pub mod control;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod proto;
pub mod relay;
pub mod seam;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
pub mod trim;
