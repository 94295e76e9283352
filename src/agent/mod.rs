//! The programs that run beside the server: the device agent ([`device`]) and the client's
//! local proxy ([`client`]). Both speak AWS V3 to the relay through [`dial`] and [`mux`].
pub mod client;
pub mod device;
pub mod dial;
pub mod mqtt;
pub mod mux;
pub mod tunnels;
mod wire;
