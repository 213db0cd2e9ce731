//! The test payload and the bare forwarder's registration messages.
//!
//! Payload layout (little-endian), then zero filler up to `--size` bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | global channel index (the bare forwarder routes on it) |
//! | 4..8 | sequence number within the channel |
//! | 8..16 | send time, nanoseconds since the run's clock base |
//! | 16..20 | magic `LGv1` |

use std::net::{Ipv4Addr, SocketAddrV4};

/// Smallest payload in bytes.
pub const MIN_SIZE: usize = 20;
/// The magic in bytes 16..20.
pub const MAGIC: [u8; 4] = *b"LGv1";

/// Registration request client → bare forwarder: magic, u32 id, peer IPv4, peer port (BE).
pub const REG_MAGIC: [u8; 8] = *b"LGFWDREG";
/// Registration answer bare forwarder → client: magic, u32 id.
pub const ACK_MAGIC: [u8; 8] = *b"LGFWDACK";
/// Length of a registration request in bytes.
pub const REG_LEN: usize = 18;
/// Length of a registration answer in bytes.
pub const ACK_LEN: usize = 12;

/// A decoded payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Global channel index.
    pub channel: u32,
    /// Sequence number.
    pub seq: u32,
    /// Send timestamp, ns since the clock base.
    pub sent_ns: u64,
}

/// Writes the header into the first [`MIN_SIZE`] bytes of `buf` (which must be that long).
pub fn write(buf: &mut [u8], h: Header) {
    buf[0..4].copy_from_slice(&h.channel.to_le_bytes());
    buf[4..8].copy_from_slice(&h.seq.to_le_bytes());
    buf[8..16].copy_from_slice(&h.sent_ns.to_le_bytes());
    buf[16..20].copy_from_slice(&MAGIC);
}

/// Reads a header; `None` when short or without the magic.
pub fn read(buf: &[u8]) -> Option<Header> {
    if buf.len() < MIN_SIZE || buf[16..20] != MAGIC {
        return None;
    }
    Some(Header {
        channel: u32::from_le_bytes(buf[0..4].try_into().ok()?),
        seq: u32::from_le_bytes(buf[4..8].try_into().ok()?),
        sent_ns: u64::from_le_bytes(buf[8..16].try_into().ok()?),
    })
}

/// The first four bytes as the routing id (the bare forwarder's only look at the data).
pub fn route_id(buf: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?))
}

/// Encodes a registration of channel `id` with echo peer `peer`.
pub fn registration(id: u32, peer: SocketAddrV4) -> [u8; REG_LEN] {
    let mut b = [0u8; REG_LEN];
    b[0..8].copy_from_slice(&REG_MAGIC);
    b[8..12].copy_from_slice(&id.to_le_bytes());
    b[12..16].copy_from_slice(&peer.ip().octets());
    b[16..18].copy_from_slice(&peer.port().to_be_bytes());
    b
}

/// Decodes a registration.
pub fn parse_registration(buf: &[u8]) -> Option<(u32, SocketAddrV4)> {
    if buf.len() != REG_LEN || buf[0..8] != REG_MAGIC {
        return None;
    }
    let id = u32::from_le_bytes(buf[8..12].try_into().ok()?);
    let ip = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    let port = u16::from_be_bytes([buf[16], buf[17]]);
    Some((id, SocketAddrV4::new(ip, port)))
}

/// Encodes a registration answer.
pub fn ack(id: u32) -> [u8; ACK_LEN] {
    let mut b = [0u8; ACK_LEN];
    b[0..8].copy_from_slice(&ACK_MAGIC);
    b[8..12].copy_from_slice(&id.to_le_bytes());
    b
}

/// Decodes a registration answer.
pub fn parse_ack(buf: &[u8]) -> Option<u32> {
    if buf.len() != ACK_LEN || buf[0..8] != ACK_MAGIC {
        return None;
    }
    Some(u32::from_le_bytes(buf[8..12].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut b = [0u8; 64];
        let h = Header {
            channel: 99_999,
            seq: 7,
            sent_ns: 123_456_789_000,
        };
        write(&mut b, h);
        assert_eq!(read(&b), Some(h));
        assert_eq!(route_id(&b), Some(99_999));
        assert_eq!(read(&b[..19]), None);
        b[17] ^= 1;
        assert_eq!(read(&b), None);
        let peer: SocketAddrV4 = "127.0.0.3:40001".parse().unwrap();
        assert_eq!(parse_registration(&registration(5, peer)), Some((5, peer)));
        assert_eq!(parse_ack(&ack(5)), Some(5));
        assert_eq!(parse_ack(&registration(5, peer)), None);
    }
}
