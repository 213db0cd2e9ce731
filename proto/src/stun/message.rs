//! Zero-copy decoding of STUN messages (RFC 8489 §5, §14).

use std::fmt;

use super::attribute::{kind, Attribute, AttributeError};
use super::{Class, MessageType, Method, TransactionId, HEADER_LEN, MAGIC_COOKIE};

/// Why bytes are not a valid STUN message. Decoding errors allocate nothing; the caller
/// drops the datagram and counts the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than 20 bytes, or an attribute runs past the end.
    Truncated,
    /// One of the two most significant bits of the message type is set.
    NotStun,
    /// The magic cookie is not 0x2112A442.
    BadMagicCookie,
    /// The header length is not a multiple of 4 or does not match the datagram size.
    BadLength,
    /// An attribute other than FINGERPRINT follows FINGERPRINT, or a second
    /// MESSAGE-INTEGRITY(-SHA256) of the same kind appears.
    BadAttributeOrder,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeError::Truncated => "truncated STUN message",
            DecodeError::NotStun => "not a STUN message",
            DecodeError::BadMagicCookie => "bad magic cookie",
            DecodeError::BadLength => "bad STUN message length",
            DecodeError::BadAttributeOrder => "attribute after FINGERPRINT or repeated integrity",
        })
    }
}

impl std::error::Error for DecodeError {}

/// One attribute as it sits in the message: type, value (without padding) and the offset of
/// its 4-byte header from the start of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// Attribute type.
    pub kind: u16,
    /// Value bytes, padding excluded.
    pub value: &'a [u8],
    /// Offset of the attribute header within the message, in bytes.
    pub offset: usize,
}

/// A validated, borrowed view of one STUN message.
///
/// Attributes that follow MESSAGE-INTEGRITY are ignored except MESSAGE-INTEGRITY-SHA256 and
/// FINGERPRINT, and those after MESSAGE-INTEGRITY-SHA256 except FINGERPRINT (RFC 8489 §14.5,
/// §14.6); iteration skips them.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    typ: MessageType,
    tid: TransactionId,
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
    fingerprint: Option<usize>,
    /// An unknown comprehension-required attribute before any MESSAGE-INTEGRITY(-SHA256).
    unknown_required: bool,
}

/// Returns `true` when `buf` starts like a STUN message: top two bits zero and the magic
/// cookie in place (RFC 8489 §5). Used to tell STUN from ChannelData (RFC 8656 §12).
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] & 0xC0 == 0 && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
}

impl<'a> Message<'a> {
    /// Decodes and validates a whole datagram as one STUN message.
    ///
    /// Checks the header, the length (must equal `buf.len() - 20`, a multiple of 4) and that
    /// every attribute fits; attribute values are decoded lazily by [`Message::get`].
    ///
    /// # Errors
    /// [`DecodeError`] for anything that is not a well-formed STUN message.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        let typ = MessageType::from_u16(u16::from_be_bytes([buf[0], buf[1]])).ok_or(DecodeError::NotStun)?;
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if buf[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(DecodeError::BadMagicCookie);
        }
        if len % 4 != 0 || HEADER_LEN + len != buf.len() {
            return Err(DecodeError::BadLength);
        }
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&buf[8..20]);
        let mut msg = Message {
            buf,
            typ,
            tid: TransactionId(tid),
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
            unknown_required: false,
        };
        let mut off = HEADER_LEN;
        while off < buf.len() {
            if buf.len() - off < 4 {
                return Err(DecodeError::Truncated);
            }
            let k = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let vlen = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            let padded = vlen.div_ceil(4) * 4;
            if buf.len() - off - 4 < padded {
                return Err(DecodeError::Truncated);
            }
            if msg.fingerprint.is_some() {
                return Err(DecodeError::BadAttributeOrder);
            }
            match k {
                kind::MESSAGE_INTEGRITY if msg.integrity.is_none() && msg.integrity_sha256.is_none() => {
                    msg.integrity = Some(off)
                }
                kind::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => msg.integrity_sha256 = Some(off),
                kind::FINGERPRINT => msg.fingerprint = Some(off),
                _ if msg.integrity.is_none()
                    && msg.integrity_sha256.is_none()
                    && kind::is_comprehension_required(k)
                    && !kind::is_known(k) =>
                {
                    msg.unknown_required = true
                }
                _ => {}
            }
            off += 4 + padded;
        }
        Ok(msg)
    }

    /// The whole message bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Message type.
    pub fn message_type(&self) -> MessageType {
        self.typ
    }

    /// Method.
    pub fn method(&self) -> Method {
        self.typ.method
    }

    /// Class.
    pub fn class(&self) -> Class {
        self.typ.class
    }

    /// Transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// Offset of the MESSAGE-INTEGRITY attribute header, if present.
    pub fn integrity_offset(&self) -> Option<usize> {
        self.integrity
    }

    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if present.
    pub fn integrity_sha256_offset(&self) -> Option<usize> {
        self.integrity_sha256
    }

    /// Offset of the FINGERPRINT attribute header, if present.
    pub fn fingerprint_offset(&self) -> Option<usize> {
        self.fingerprint
    }

    /// Iterates over the attributes that count, in order (see the type's doc for which are
    /// skipped).
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            buf: self.buf,
            off: HEADER_LEN,
            after_integrity: false,
            after_integrity_sha256: false,
        }
    }

    /// The first attribute of type `kind`, raw.
    pub fn raw(&self, kind: u16) -> Option<RawAttribute<'a>> {
        self.attributes().find(|a| a.kind == kind)
    }

    /// The first attribute of type `kind`, decoded.
    ///
    /// # Errors
    /// `Some(Err(_))` when present but malformed.
    pub fn get(&self, kind: u16) -> Option<Result<Attribute<'a>, AttributeError>> {
        self.raw(kind).map(|a| Attribute::decode(a.kind, a.value, &self.tid))
    }

    /// Whether the message has a comprehension-required attribute this codec does not know
    /// (RFC 8489 §6.3.1: a request gets 420, an indication is discarded); found during
    /// decoding, so asking costs nothing.
    pub fn has_unknown_comprehension_required(&self) -> bool {
        self.unknown_required
    }

    /// The comprehension-required attribute types this codec does not know
    /// (RFC 8489 §6.3.1: a request carrying any gets 420 with UNKNOWN-ATTRIBUTES).
    pub fn unknown_comprehension_required(&self) -> impl Iterator<Item = u16> + 'a {
        self.attributes()
            .map(|a| a.kind)
            .filter(|&k| kind::is_comprehension_required(k) && !kind::is_known(k))
    }
}

/// Iterator over a message's attributes, see [`Message::attributes`].
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    off: usize,
    after_integrity: bool,
    after_integrity_sha256: bool,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<RawAttribute<'a>> {
        // The buffer was validated by Message::decode, so every header and value fits.
        while self.off + 4 <= self.buf.len() {
            let off = self.off;
            let k = u16::from_be_bytes([self.buf[off], self.buf[off + 1]]);
            let vlen = u16::from_be_bytes([self.buf[off + 2], self.buf[off + 3]]) as usize;
            self.off = off + 4 + vlen.div_ceil(4) * 4;
            let value = &self.buf[off + 4..off + 4 + vlen];
            let visible = match k {
                kind::FINGERPRINT => true,
                kind::MESSAGE_INTEGRITY_SHA256 => !self.after_integrity_sha256,
                _ => !self.after_integrity && !self.after_integrity_sha256,
            };
            if k == kind::MESSAGE_INTEGRITY && !self.after_integrity_sha256 {
                self.after_integrity = true;
            }
            if k == kind::MESSAGE_INTEGRITY_SHA256 {
                self.after_integrity_sha256 = true;
            }
            if visible {
                return Some(RawAttribute {
                    kind: k,
                    value,
                    offset: off,
                });
            }
        }
        None
    }
}
