//! Sans-IO protocol logic: bytes and an `Instant` in, bytes, routing decisions and timers
//! out. Nothing here touches a socket, a clock or a thread.
pub mod allocation;
pub mod auth;
pub mod channel_data;
pub mod peer_policy;
pub mod rate_limit;
pub mod server;
pub mod stun;
