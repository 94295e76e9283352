//! The programs that run beside the server: the device agent (and, later, the client proxy).
pub mod device;
