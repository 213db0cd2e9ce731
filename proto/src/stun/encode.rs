//! Encoding STUN messages into a caller-owned buffer (RFC 8489 §5, §14).

use super::attribute::{kind, Attribute};
use super::integrity;
use super::{MessageType, TransactionId, HEADER_LEN, MAGIC_COOKIE};

/// Writes one STUN message into a caller-owned `Vec<u8>`.
///
/// The buffer is cleared first; once it has grown to the largest message, encoding
/// allocates nothing. The header's length field is kept current after every call, so the
/// integrity and fingerprint methods can be called at any point and must come last, in
/// the order MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT (RFC 8489 §14.5-14.7).
///
/// ```
/// use turnpike_proto::stun::{Attribute, Class, MessageBuilder, MessageType, Method, TransactionId};
/// let mut buf = Vec::new();
/// let mut b = MessageBuilder::new(&mut buf, MessageType::new(Method::Binding, Class::Request), TransactionId([7; 12]));
/// b.attribute(&Attribute::Software("example"));
/// b.fingerprint();
/// assert_eq!(buf.len(), 20 + 12 + 8);
/// ```
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    out: &'b mut Vec<u8>,
    tid: TransactionId,
}

impl<'b> MessageBuilder<'b> {
    /// Starts a message of type `typ` with transaction ID `tid` in `out` (cleared first).
    pub fn new(out: &'b mut Vec<u8>, typ: MessageType, tid: TransactionId) -> Self {
        out.clear();
        out.extend_from_slice(&typ.to_u16().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&tid.0);
        MessageBuilder { out, tid }
    }

    /// The transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    fn set_length(&mut self) {
        let len = (self.out.len() - HEADER_LEN) as u16;
        self.out[2..4].copy_from_slice(&len.to_be_bytes());
    }

    fn begin(&mut self, kind: u16) -> usize {
        let start = self.out.len();
        self.out.extend_from_slice(&kind.to_be_bytes());
        self.out.extend_from_slice(&[0, 0]);
        start
    }

    fn end(&mut self, start: usize) {
        let vlen = self.out.len() - start - 4;
        self.out[start + 2..start + 4].copy_from_slice(&(vlen as u16).to_be_bytes());
        let pad = (4 - vlen % 4) % 4;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self.set_length();
    }

    /// Appends a typed attribute.
    pub fn attribute(&mut self, a: &Attribute<'_>) -> &mut Self {
        let start = self.begin(a.kind());
        a.encode_value(&self.tid, self.out);
        self.end(start);
        self
    }

    /// Appends an attribute with a raw value (padding is added).
    pub fn raw_attribute(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let start = self.begin(kind);
        self.out.extend_from_slice(value);
        self.end(start);
        self
    }

    /// Appends MESSAGE-INTEGRITY: HMAC-SHA1 keyed with `key` (RFC 8489 §14.5).
    pub fn message_integrity(&mut self, key: &[u8]) -> &mut Self {
        let start = self.out.len();
        self.out.extend_from_slice(&kind::MESSAGE_INTEGRITY.to_be_bytes());
        self.out.extend_from_slice(&20u16.to_be_bytes());
        let mac = integrity::hmac_sha1(key, self.out, start);
        self.out.extend_from_slice(&mac);
        self.set_length();
        self
    }

    /// Appends MESSAGE-INTEGRITY-SHA256: HMAC-SHA256 (32 bytes) keyed with `key` (RFC 8489 §14.6).
    pub fn message_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let start = self.out.len();
        self.out
            .extend_from_slice(&kind::MESSAGE_INTEGRITY_SHA256.to_be_bytes());
        self.out.extend_from_slice(&32u16.to_be_bytes());
        let mac = integrity::hmac_sha256(key, self.out, start);
        self.out.extend_from_slice(&mac);
        self.set_length();
        self
    }

    /// Appends FINGERPRINT: CRC-32 of the message so far XOR 0x5354554e (RFC 8489 §14.7).
    pub fn fingerprint(&mut self) -> &mut Self {
        let start = self.out.len();
        self.out.extend_from_slice(&kind::FINGERPRINT.to_be_bytes());
        self.out.extend_from_slice(&4u16.to_be_bytes());
        let crc = integrity::fingerprint(self.out, start);
        self.out.extend_from_slice(&crc.to_be_bytes());
        self.set_length();
        self
    }

    /// The message length so far, header included, in bytes.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing beyond the header was written.
    pub fn is_empty(&self) -> bool {
        self.out.len() == HEADER_LEN
    }
}
