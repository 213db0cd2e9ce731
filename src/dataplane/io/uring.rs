//! The io_uring backend (being written).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{Datagram, IoStats, SocketId, Verdict};

/// Checks that io_uring and the needed opcodes are available.
pub fn probe() -> Result<(), String> {
    Err("io_uring backend not built yet".into())
}

/// io_uring backend.
pub struct UringIo {
    /// Counters.
    pub stats: IoStats,
}

impl UringIo {
    /// Creates the ring.
    ///
    /// # Errors
    /// Always, for now.
    pub fn new(_entries: u32) -> io::Result<Self> {
        Err(io::Error::other("io_uring backend not built yet"))
    }
    /// Registers a socket.
    ///
    /// # Errors
    /// Never.
    pub fn register(&mut self, _id: SocketId, _fd: RawFd) -> io::Result<()> {
        Ok(())
    }
    /// Deregisters a socket.
    pub fn deregister(&mut self, _id: SocketId) {}
    /// Whether a socket is released.
    pub fn is_released(&self, _id: SocketId) -> bool {
        true
    }
    /// The waker.
    pub fn waker(&self) -> RawFd {
        -1
    }
    /// Waits.
    ///
    /// # Errors
    /// Never.
    pub fn wait<F>(&mut self, _timeout: Option<Duration>, _scratch: &mut Vec<u8>, _handler: F) -> io::Result<()>
    where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        Ok(())
    }
}
