//! turnpike: a TURN relay (RFC 8656) and STUN server (RFC 8489).
pub mod proto;
