//! The relay's only `unsafe`: adopting a file descriptor handed over from another shard, and
//! shutting a socket down to wake its reader.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of a socket fd that another shard released with `into_raw_fd`.
pub fn adopt_socket(fd: RawFd) -> std::net::TcpStream {
    // SAFETY: `fd` comes from `monoio::net::TcpStream::into_raw_fd` on the accepting shard,
    // which deregistered it and gave up ownership; it is sent over a channel exactly once, so
    // nothing else owns or closes it.
    std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `shutdown(fd, SHUT_RDWR)`: ends the connection both ways, waking a blocked read with EOF.
pub fn shutdown_both(fd: RawFd) {
    // SAFETY: shutdown(2) only reads its integer arguments; on a closed or bad fd it returns an
    // error that we ignore: the connection is being torn down either way.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}
