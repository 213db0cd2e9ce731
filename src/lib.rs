//! turnpike: a TURN relay (RFC 8656) and STUN server (RFC 8489).
//!
//! - [`proto`]: the sans-IO protocol core (codec, authentication, allocations, peer policy).
//! - [`dataplane`]: per-core shards (sockets, io_uring or recvmmsg/sendmmsg) around the core.
//! - [`control`]: the control thread (relay ports and sockets, global quotas).
//! - [`probe`]: `turnpike probe`, RFC 5780 NAT behaviour discovery from the client side.
//! - [`config`]: the TOML file and command-line flags.
//! - [`sys`]: small safe wrappers over the system calls the backends and the control thread share.
//! - `xdp` (feature `xdp`): the XDP fast path for bound channels and its kernel maps.
pub mod config;
pub mod control;
pub mod dataplane;
/// Fuzz target bodies, shared by `fuzz/` (cargo-fuzz builds with `--cfg fuzzing`) and the
/// bounded property tests; not compiled into the server otherwise.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod probe;
pub mod stats;
pub mod sys;
pub mod tls;
#[cfg(feature = "xdp")]
pub mod xdp;
/// The sans-IO protocol core, its own crate (`turnpike-proto`) so that the build enforces the
/// rule: no socket, clock, thread or io_uring dependency, and `#![forbid(unsafe_code)]`.
pub use turnpike_proto as proto;
