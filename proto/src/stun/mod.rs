//! STUN message codec (RFC 8489) with the TURN attributes of RFC 8656.
//!
//! Decoding is zero-copy: [`Message::decode`] validates the header and every attribute's
//! length once, then hands out borrowed views ([`RawAttribute`], [`Attribute`]) of the
//! caller's buffer. Encoding writes into a caller-owned `Vec<u8>` through [`MessageBuilder`],
//! so a reused buffer allocates nothing once it has grown.
//!
//! Integrity ([`integrity`]) covers MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5),
//! MESSAGE-INTEGRITY-SHA256 (§14.6) and FINGERPRINT (§14.7).

pub mod attribute;
pub mod encode;
pub mod integrity;
pub mod message;

#[cfg(test)]
mod codec_tests;

pub use attribute::{AddressFamily, Attribute, AttributeError, ErrorCode, PasswordAlgorithm};
pub use encode::MessageBuilder;
pub use message::{DecodeError, Message, RawAttribute};

/// The fixed magic cookie in bytes 4..8 of every STUN message (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Size of the STUN header in bytes (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;

/// A 96-bit STUN transaction ID (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

/// The class of a STUN message (RFC 8489 §5), encoded in bits C1 and C0 of the message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request; expects a success or error response.
    Request,
    /// An indication; no response.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

/// A STUN or TURN method (RFC 8489 §18.2, RFC 8656 §18, RFC 6062).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Binding (0x001).
    Binding,
    /// TURN Allocate (0x003).
    Allocate,
    /// TURN Refresh (0x004).
    Refresh,
    /// TURN Send (0x006), indication only.
    Send,
    /// TURN Data (0x007), indication only.
    Data,
    /// TURN CreatePermission (0x008).
    CreatePermission,
    /// TURN ChannelBind (0x009).
    ChannelBind,
    /// RFC 6062 Connect (0x00A).
    Connect,
    /// RFC 6062 ConnectionBind (0x00B).
    ConnectionBind,
    /// RFC 6062 ConnectionAttempt (0x00C).
    ConnectionAttempt,
    /// Any other 12-bit method number.
    Other(u16),
}

impl Method {
    /// The 12-bit method number.
    pub fn number(self) -> u16 {
        match self {
            Method::Binding => 0x001,
            Method::Allocate => 0x003,
            Method::Refresh => 0x004,
            Method::Send => 0x006,
            Method::Data => 0x007,
            Method::CreatePermission => 0x008,
            Method::ChannelBind => 0x009,
            Method::Connect => 0x00A,
            Method::ConnectionBind => 0x00B,
            Method::ConnectionAttempt => 0x00C,
            Method::Other(n) => n & 0x0FFF,
        }
    }

    /// The method for a 12-bit method number.
    pub fn from_number(n: u16) -> Method {
        match n & 0x0FFF {
            0x001 => Method::Binding,
            0x003 => Method::Allocate,
            0x004 => Method::Refresh,
            0x006 => Method::Send,
            0x007 => Method::Data,
            0x008 => Method::CreatePermission,
            0x009 => Method::ChannelBind,
            0x00A => Method::Connect,
            0x00B => Method::ConnectionBind,
            0x00C => Method::ConnectionAttempt,
            n => Method::Other(n),
        }
    }
}

/// A message type: method and class (RFC 8489 §5, figure 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageType {
    /// The method.
    pub method: Method,
    /// The class.
    pub class: Class,
}

impl MessageType {
    /// Builds a message type.
    pub const fn new(method: Method, class: Class) -> Self {
        MessageType { method, class }
    }

    /// Encodes to the 14-bit wire value (the two top bits are zero).
    pub fn to_u16(self) -> u16 {
        let m = self.method.number();
        let c: u16 = match self.class {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        };
        (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    }

    /// Decodes a wire value; `None` if either of the two top bits is set.
    pub fn from_u16(v: u16) -> Option<Self> {
        if v & 0xC000 != 0 {
            return None;
        }
        let m = (v & 0x000F) | ((v >> 1) & 0x0070) | ((v >> 2) & 0x0F80);
        let c = ((v >> 4) & 1) | ((v >> 7) & 2);
        let class = match c {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        };
        Some(MessageType {
            method: Method::from_number(m),
            class,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_wire_values() {
        // RFC 8489 §5: Binding request 0x0001, success 0x0101, error 0x0111; RFC 8656: Data indication 0x0017.
        let cases = [
            (Method::Binding, Class::Request, 0x0001),
            (Method::Binding, Class::Success, 0x0101),
            (Method::Binding, Class::Error, 0x0111),
            (Method::Allocate, Class::Request, 0x0003),
            (Method::Allocate, Class::Success, 0x0103),
            (Method::Allocate, Class::Error, 0x0113),
            (Method::Send, Class::Indication, 0x0016),
            (Method::Data, Class::Indication, 0x0017),
            (Method::ChannelBind, Class::Request, 0x0009),
            (Method::ConnectionAttempt, Class::Indication, 0x001C),
        ];
        for (m, c, v) in cases {
            let t = MessageType::new(m, c);
            assert_eq!(t.to_u16(), v, "{m:?} {c:?}");
            assert_eq!(MessageType::from_u16(v), Some(t));
        }
    }

    #[test]
    fn message_type_round_trips_all_values() {
        for v in 0u16..0x4000 {
            let t = MessageType::from_u16(v).unwrap();
            assert_eq!(t.to_u16(), v);
        }
        assert_eq!(MessageType::from_u16(0x4001), None);
        assert_eq!(MessageType::from_u16(0x8001), None);
    }
}
