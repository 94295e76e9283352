//! iotunnel: a self-hosted secure-tunnel service for IoT fleets.
//!
//! # Glossary
//! - **Tunnel**: a pairing, created through the API, between one device and one client. It is
//!   OPEN until closed, expired or its device is deleted, then CLOSED until deleted.
//! - **Device**: a machine of the fleet, registered under a product. It keeps a device channel to
//!   the control plane and dials the relay when a tunnel is created for it.
//! - **Client**: the person's side of a tunnel (a local proxy, ssh ProxyCommand, a browser...).
//! - **Side**: `device` or `client`; every token belongs to exactly one side of one tunnel.
//! - **Shard**: one data-plane thread, owning the tunnels whose id hashes to it.
//! - **Hand-off**: moving an accepted relay socket to the tunnel's owner shard.
//! - **Pump**: the loop that forwards frames between the two sides of a tunnel.
//! - **Node**: one `iotunnel server` of a fleet; nodes share one PostgreSQL store (a single
//!   node on SQLite is a fleet of one).
//! - **Owner** (node): the node where a tunnel's sides meet, recorded with the tunnel; a dead
//!   node's OPEN tunnels are re-placed on live owners.
//! - **Lease**: a named, expiring claim in the store that lets one node at a time run a fleet-wide
//!   job (the sweeper, re-placement).
//! - **Bus**: messages between nodes through the store (PostgreSQL LISTEN/NOTIFY).
//!
//! The crate is two planes in one binary: the control plane ([`control`], [`store`]) and the
//! data plane (the relay, which plugs into [`seam`]).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod metrics;
pub mod proto;
pub mod relay;
pub mod seam;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
