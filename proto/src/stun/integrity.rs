//! MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT and key derivation
//! (RFC 8489 §9.2.2, §14.5-14.7, §18.5).
//!
//! Passwords are used as given: the OpaqueString profile (RFC 8265) that RFC 8489 asks for
//! is not applied, as deployed clients (browsers, coturn, pion) do not apply it either; for
//! ASCII passwords both are the same.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;

use super::attribute::PasswordAlgorithm;
use super::message::Message;

/// The value XORed into the CRC-32 for FINGERPRINT (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// A long-term credential key (RFC 8489 §9.2.2): 16 bytes for MD5, 32 for SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub enum LongTermKey {
    /// MD5(username ":" realm ":" password).
    Md5([u8; 16]),
    /// SHA-256(username ":" realm ":" password).
    Sha256([u8; 32]),
}

impl std::fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LongTermKey::Md5(_) => "LongTermKey::Md5(..)",
            LongTermKey::Sha256(_) => "LongTermKey::Sha256(..)",
        })
    }
}

impl LongTermKey {
    /// Derives the key for `algorithm` (RFC 8489 §9.2.2).
    pub fn derive(algorithm: PasswordAlgorithm, username: &str, realm: &str, password: &str) -> Self {
        match algorithm {
            PasswordAlgorithm::Md5 => {
                let mut h = Md5::new();
                h.update(username.as_bytes());
                h.update(b":");
                h.update(realm.as_bytes());
                h.update(b":");
                h.update(password.as_bytes());
                LongTermKey::Md5(h.finalize().into())
            }
            PasswordAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                h.update(username.as_bytes());
                h.update(b":");
                h.update(realm.as_bytes());
                h.update(b":");
                h.update(password.as_bytes());
                LongTermKey::Sha256(h.finalize().into())
            }
        }
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            LongTermKey::Md5(k) => k,
            LongTermKey::Sha256(k) => k,
        }
    }

    /// The algorithm this key was derived with.
    pub fn algorithm(&self) -> PasswordAlgorithm {
        match self {
            LongTermKey::Md5(_) => PasswordAlgorithm::Md5,
            LongTermKey::Sha256(_) => PasswordAlgorithm::Sha256,
        }
    }
}

/// USERHASH = SHA-256(username ":" realm) (RFC 8489 §14.4).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// Why an integrity or fingerprint check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityError {
    /// The message carries no such attribute.
    Missing,
    /// The HMAC or CRC does not match.
    Mismatch,
}

impl std::fmt::Display for IntegrityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IntegrityError::Missing => "integrity attribute missing",
            IntegrityError::Mismatch => "integrity check failed",
        })
    }
}

impl std::error::Error for IntegrityError {}

/// Feeds the bytes that an integrity attribute at `attr_offset` covers: the message up to
/// the attribute, with the header length set as if the attribute (of `attr_len` value
/// bytes) ended the message.
fn covered(buf: &[u8], attr_offset: usize, attr_len: usize, mut feed: impl FnMut(&[u8])) {
    let len = (attr_offset + 4 + attr_len - super::HEADER_LEN) as u16;
    feed(&buf[..2]);
    feed(&len.to_be_bytes());
    feed(&buf[4..attr_offset]);
}

/// HMAC-SHA1 over `buf[..attr_offset]` as MESSAGE-INTEGRITY at `attr_offset` covers it.
pub fn hmac_sha1(key: &[u8], buf: &[u8], attr_offset: usize) -> [u8; 20] {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    covered(buf, attr_offset, 20, |b| mac.update(b));
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 as a 32-byte MESSAGE-INTEGRITY-SHA256 at `attr_offset` covers it.
pub fn hmac_sha256(key: &[u8], buf: &[u8], attr_offset: usize) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    covered(buf, attr_offset, 32, |b| mac.update(b));
    mac.finalize().into_bytes().into()
}

/// CRC-32 of `buf[..attr_offset]` XOR 0x5354554e, with the length set to cover a
/// FINGERPRINT attribute at `attr_offset` (RFC 8489 §14.7).
pub fn fingerprint(buf: &[u8], attr_offset: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    covered(buf, attr_offset, 4, |b| h.update(b));
    h.finalize() ^ FINGERPRINT_XOR
}

/// Verifies MESSAGE-INTEGRITY (HMAC-SHA1) with `key`, in constant time.
///
/// # Errors
/// [`IntegrityError::Missing`] without the attribute, [`IntegrityError::Mismatch`] when wrong.
pub fn verify_message_integrity(msg: &Message<'_>, key: &[u8]) -> Result<(), IntegrityError> {
    let off = msg.integrity_offset().ok_or(IntegrityError::Missing)?;
    let buf = msg.as_bytes();
    if u16::from_be_bytes([buf[off + 2], buf[off + 3]]) != 20 {
        return Err(IntegrityError::Mismatch);
    }
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    covered(buf, off, 20, |b| mac.update(b));
    mac.verify_slice(&buf[off + 4..off + 24])
        .map_err(|_| IntegrityError::Mismatch)
}

/// Verifies MESSAGE-INTEGRITY-SHA256 with `key`, in constant time; a value truncated to
/// 16..32 bytes compares that many leading bytes (RFC 8489 §14.6).
///
/// # Errors
/// [`IntegrityError::Missing`] without the attribute, [`IntegrityError::Mismatch`] when wrong.
pub fn verify_message_integrity_sha256(msg: &Message<'_>, key: &[u8]) -> Result<(), IntegrityError> {
    let off = msg.integrity_sha256_offset().ok_or(IntegrityError::Missing)?;
    let buf = msg.as_bytes();
    let len = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
    if !(16..=32).contains(&len) || len % 4 != 0 {
        return Err(IntegrityError::Mismatch);
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    covered(buf, off, len, |b| mac.update(b));
    mac.verify_truncated_left(&buf[off + 4..off + 4 + len])
        .map_err(|_| IntegrityError::Mismatch)
}

/// Verifies FINGERPRINT.
///
/// # Errors
/// [`IntegrityError::Missing`] without the attribute, [`IntegrityError::Mismatch`] when wrong.
pub fn verify_fingerprint(msg: &Message<'_>) -> Result<(), IntegrityError> {
    let off = msg.fingerprint_offset().ok_or(IntegrityError::Missing)?;
    let buf = msg.as_bytes();
    if u16::from_be_bytes([buf[off + 2], buf[off + 3]]) != 4 {
        return Err(IntegrityError::Mismatch);
    }
    let want = u32::from_be_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
    if fingerprint(buf, off) == want {
        Ok(())
    } else {
        Err(IntegrityError::Mismatch)
    }
}
