//! Sans-IO protocol logic: bytes and an `Instant` in, bytes, routing decisions and timers
//! out. Nothing here touches a socket, a clock or a thread: this crate's dependencies are
//! hashing and encoding only, and it forbids `unsafe`.
#![forbid(unsafe_code)]
pub mod allocation;
pub mod auth;
pub mod channel_data;
pub mod client;
pub mod errors;
pub mod framing;
pub mod peer_policy;
pub mod rate_limit;
pub mod server;
pub mod stun;
