//! turnpike: a TURN relay (RFC 8656) and STUN server (RFC 8489).
//!
//! - [`proto`]: the sans-IO protocol core (codec, authentication, allocations, peer policy).
//! - [`dataplane`]: sockets and the event loop around the core.
//! - [`config`]: the TOML file and command-line flags.
pub mod config;
pub mod dataplane;
pub mod proto;
