//! STUN and TURN attributes (RFC 8489 §14, RFC 8656 §18, RFC 5780 §7, RFC 6062 §6.2).
//!
//! [`Attribute`] is a borrowed, typed view of one attribute's value. Decoding validates
//! every length and field; strings must be UTF-8 within the RFC's size limits.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{TransactionId, MAGIC_COOKIE};

/// Attribute type numbers (RFC 8489 §18.3, RFC 8656 §18, RFC 5780 §9, RFC 6062 §6.2).
#[allow(missing_docs)]
pub mod kind {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDITIONAL-ADDRESS-FAMILY's code point in draft-ietf-tram-turnbis, still sent by
    /// coturn 4.6's clients (`turnutils_uclient -Z`). Not decoded by `Attribute::decode`
    /// (whose values keep their own type); the server reads its value as
    /// ADDITIONAL-ADDRESS-FAMILY's.
    pub const ADDITIONAL_ADDRESS_FAMILY_DRAFT: u16 = 0x8032;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const CACHE_TIMEOUT: u16 = 0x8027;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;

    /// Whether an attribute type is comprehension-required (RFC 8489 §14: 0x0000-0x7FFF).
    pub const fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }

    /// Whether this codec knows the attribute type (unknown comprehension-required types
    /// make a request fail with 420).
    pub const fn is_known(t: u16) -> bool {
        matches!(
            t,
            MAPPED_ADDRESS
                | CHANGE_REQUEST
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | CHANNEL_NUMBER
                | LIFETIME
                | XOR_PEER_ADDRESS
                | DATA
                | REALM
                | NONCE
                | XOR_RELAYED_ADDRESS
                | REQUESTED_ADDRESS_FAMILY
                | EVEN_PORT
                | REQUESTED_TRANSPORT
                | DONT_FRAGMENT
                | MESSAGE_INTEGRITY_SHA256
                | PASSWORD_ALGORITHM
                | USERHASH
                | XOR_MAPPED_ADDRESS
                | RESERVATION_TOKEN
                | PRIORITY
                | USE_CANDIDATE
                | PADDING
                | RESPONSE_PORT
                | CONNECTION_ID
        ) || t >= 0x8000
    }
}

/// Maximum USERNAME length in bytes (RFC 8489 §14.3).
pub const MAX_USERNAME_LEN: usize = 512;
/// Maximum REALM, NONCE, SOFTWARE and reason phrase length in bytes (RFC 8489 §14.8-14.10).
pub const MAX_TEXT_LEN: usize = 763;

/// IP address family codes used in address attributes and REQUESTED-ADDRESS-FAMILY
/// (RFC 8489 §14.1, RFC 8656 §18.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    /// 0x01
    V4,
    /// 0x02
    V6,
}

impl AddressFamily {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            AddressFamily::V4 => 1,
            AddressFamily::V6 => 2,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(AddressFamily::V4),
            2 => Some(AddressFamily::V6),
            _ => None,
        }
    }

    /// The family of an IP address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => AddressFamily::V4,
            IpAddr::V6(_) => AddressFamily::V6,
        }
    }
}

/// A password algorithm (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    /// 0x0001: key = MD5(username ":" realm ":" password), MESSAGE-INTEGRITY (HMAC-SHA1).
    Md5,
    /// 0x0002: key = SHA-256(username ":" realm ":" password), MESSAGE-INTEGRITY-SHA256.
    Sha256,
}

impl PasswordAlgorithm {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => 1,
            PasswordAlgorithm::Sha256 => 2,
        }
    }

    /// From the wire value.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(PasswordAlgorithm::Md5),
            2 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }
}

/// A STUN error code: class (3-6) times 100 plus number (RFC 8489 §14.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// 300 Try Alternate.
    pub const TRY_ALTERNATE: ErrorCode = ErrorCode(300);
    /// 400 Bad Request.
    pub const BAD_REQUEST: ErrorCode = ErrorCode(400);
    /// 401 Unauthenticated.
    pub const UNAUTHENTICATED: ErrorCode = ErrorCode(401);
    /// 403 Forbidden (RFC 8656).
    pub const FORBIDDEN: ErrorCode = ErrorCode(403);
    /// 420 Unknown Attribute.
    pub const UNKNOWN_ATTRIBUTE: ErrorCode = ErrorCode(420);
    /// 437 Allocation Mismatch (RFC 8656).
    pub const ALLOCATION_MISMATCH: ErrorCode = ErrorCode(437);
    /// 438 Stale Nonce.
    pub const STALE_NONCE: ErrorCode = ErrorCode(438);
    /// 440 Address Family not Supported (RFC 8656).
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: ErrorCode = ErrorCode(440);
    /// 441 Wrong Credentials (RFC 8656).
    pub const WRONG_CREDENTIALS: ErrorCode = ErrorCode(441);
    /// 442 Unsupported Transport Protocol (RFC 8656).
    pub const UNSUPPORTED_TRANSPORT: ErrorCode = ErrorCode(442);
    /// 443 Peer Address Family Mismatch (RFC 8656).
    pub const PEER_ADDRESS_FAMILY_MISMATCH: ErrorCode = ErrorCode(443);
    /// 446 Connection Already Exists (RFC 6062).
    pub const CONNECTION_ALREADY_EXISTS: ErrorCode = ErrorCode(446);
    /// 447 Connection Timeout or Failure (RFC 6062).
    pub const CONNECTION_TIMEOUT_OR_FAILURE: ErrorCode = ErrorCode(447);
    /// 486 Allocation Quota Reached (RFC 8656).
    pub const ALLOCATION_QUOTA_REACHED: ErrorCode = ErrorCode(486);
    /// 500 Server Error.
    pub const SERVER_ERROR: ErrorCode = ErrorCode(500);
    /// 508 Insufficient Capacity (RFC 8656).
    pub const INSUFFICIENT_CAPACITY: ErrorCode = ErrorCode(508);

    /// The RFC's reason phrase for this code.
    pub fn reason(self) -> &'static str {
        match self.0 {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthenticated",
            403 => "Forbidden",
            420 => "Unknown Attribute",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            446 => "Connection Already Exists",
            447 => "Connection Timeout or Failure",
            486 => "Allocation Quota Reached",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "Error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.reason())
    }
}

/// Why an attribute value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeError {
    /// The value has the wrong length for its type.
    BadLength {
        /// The attribute type.
        kind: u16,
    },
    /// An address attribute has an unknown family byte.
    BadFamily {
        /// The attribute type.
        kind: u16,
    },
    /// A text attribute is not UTF-8 or is longer than the RFC allows.
    BadText {
        /// The attribute type.
        kind: u16,
    },
    /// A field holds a value the RFC forbids (e.g. an ERROR-CODE class outside 3-6).
    BadValue {
        /// The attribute type.
        kind: u16,
    },
}

impl fmt::Display for AttributeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttributeError::BadLength { kind } => write!(f, "attribute 0x{kind:04x}: bad length"),
            AttributeError::BadFamily { kind } => write!(f, "attribute 0x{kind:04x}: bad address family"),
            AttributeError::BadText { kind } => write!(f, "attribute 0x{kind:04x}: bad text"),
            AttributeError::BadValue { kind } => write!(f, "attribute 0x{kind:04x}: bad value"),
        }
    }
}

impl std::error::Error for AttributeError {}

/// A list of (algorithm number, parameters) entries, as carried by PASSWORD-ALGORITHMS
/// (RFC 8489 §14.11). The value is validated on decode; iterate with [`PasswordAlgorithms::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordAlgorithms<'a>(&'a [u8]);

impl<'a> PasswordAlgorithms<'a> {
    /// Wraps a validated value. Use [`Attribute::decode`] for untrusted bytes.
    fn new(value: &'a [u8]) -> Option<Self> {
        let mut rest = value;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return None;
            }
            let plen = u16::from_be_bytes([rest[2], rest[3]]) as usize;
            let padded = 4 + plen.div_ceil(4) * 4;
            if rest.len() < padded {
                return None;
            }
            rest = &rest[padded..];
        }
        Some(PasswordAlgorithms(value))
    }

    /// The raw value bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Iterates over (algorithm number, parameters).
    pub fn iter(&self) -> impl Iterator<Item = (u16, &'a [u8])> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest.len() < 4 {
                return None;
            }
            let alg = u16::from_be_bytes([rest[0], rest[1]]);
            let plen = u16::from_be_bytes([rest[2], rest[3]]) as usize;
            let params = &rest[4..4 + plen];
            rest = &rest[4 + plen.div_ceil(4) * 4..];
            Some((alg, params))
        })
    }
}

/// A typed, borrowed attribute value.
///
/// Address-carrying variants hold the decoded (un-XORed) [`SocketAddr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute<'a> {
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    XorMappedAddress(SocketAddr),
    /// USERNAME, UTF-8, at most 512 bytes (RFC 8489 §14.3).
    Username(&'a str),
    /// USERHASH, 32 bytes (RFC 8489 §14.4).
    Userhash(&'a [u8; 32]),
    /// MESSAGE-INTEGRITY, 20-byte HMAC-SHA1 (RFC 8489 §14.5).
    MessageIntegrity(&'a [u8; 20]),
    /// MESSAGE-INTEGRITY-SHA256, 16 to 32 bytes, a multiple of 4 (RFC 8489 §14.6).
    MessageIntegritySha256(&'a [u8]),
    /// FINGERPRINT, CRC-32 XOR 0x5354554e (RFC 8489 §14.7).
    Fingerprint(u32),
    /// ERROR-CODE (RFC 8489 §14.8).
    ErrorCode {
        /// The code, 300-699.
        code: ErrorCode,
        /// The reason phrase.
        reason: &'a str,
    },
    /// REALM (RFC 8489 §14.9).
    Realm(&'a str),
    /// NONCE (RFC 8489 §14.10).
    Nonce(&'a str),
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
    PasswordAlgorithms(PasswordAlgorithms<'a>),
    /// PASSWORD-ALGORITHM: algorithm number and parameters (RFC 8489 §14.12).
    PasswordAlgorithm {
        /// Algorithm number (1 MD5, 2 SHA-256).
        algorithm: u16,
        /// Parameters (empty for both defined algorithms).
        params: &'a [u8],
    },
    /// UNKNOWN-ATTRIBUTES: a list of big-endian u16 types (RFC 8489 §14.13).
    UnknownAttributes(&'a [u8]),
    /// SOFTWARE (RFC 8489 §14.14).
    Software(&'a str),
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    AlternateServer(SocketAddr),
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    AlternateDomain(&'a str),
    /// CHANNEL-NUMBER (RFC 8656 §18.1).
    ChannelNumber(u16),
    /// LIFETIME in seconds (RFC 8656 §18.2).
    Lifetime(u32),
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    XorPeerAddress(SocketAddr),
    /// DATA (RFC 8656 §18.4).
    Data(&'a [u8]),
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    XorRelayedAddress(SocketAddr),
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
    RequestedAddressFamily(AddressFamily),
    /// EVEN-PORT; `true` when the R bit asks to reserve the next port (RFC 8656 §18.7).
    EvenPort(bool),
    /// REQUESTED-TRANSPORT: an IANA protocol number, 17 for UDP (RFC 8656 §18.8).
    RequestedTransport(u8),
    /// DONT-FRAGMENT, empty (RFC 8656 §18.9).
    DontFragment,
    /// RESERVATION-TOKEN, 8 bytes (RFC 8656 §18.10).
    ReservationToken([u8; 8]),
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
    AdditionalAddressFamily(AddressFamily),
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    AddressErrorCode {
        /// The family the error is about.
        family: AddressFamily,
        /// The code.
        code: ErrorCode,
        /// The reason phrase.
        reason: &'a str,
    },
    /// ICMP (RFC 8656 §18.13).
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        icmp_code: u8,
        /// Error data.
        data: u32,
    },
    /// PRIORITY (RFC 8445 §16.1).
    Priority(u32),
    /// USE-CANDIDATE (RFC 8445 §16.1).
    UseCandidate,
    /// ICE-CONTROLLED tie-breaker (RFC 8445 §16.1).
    IceControlled(u64),
    /// ICE-CONTROLLING tie-breaker (RFC 8445 §16.1).
    IceControlling(u64),
    /// CHANGE-REQUEST flags: change IP 0x4, change port 0x2 (RFC 5780 §7.2).
    ChangeRequest(u32),
    /// RESPONSE-ORIGIN (RFC 5780 §7.3).
    ResponseOrigin(SocketAddr),
    /// OTHER-ADDRESS (RFC 5780 §7.4).
    OtherAddress(SocketAddr),
    /// CONNECTION-ID (RFC 6062 §6.2.1).
    ConnectionId(u32),
    /// Any other attribute, with its raw value.
    Unknown {
        /// Attribute type.
        kind: u16,
        /// Raw value, without padding.
        value: &'a [u8],
    },
}

fn text(kind: u16, v: &[u8], max: usize) -> Result<&str, AttributeError> {
    if v.len() > max {
        return Err(AttributeError::BadText { kind });
    }
    std::str::from_utf8(v).map_err(|_| AttributeError::BadText { kind })
}

fn fixed<const N: usize>(kind: u16, v: &[u8]) -> Result<&[u8; N], AttributeError> {
    v.try_into().map_err(|_| AttributeError::BadLength { kind })
}

fn be32(kind: u16, v: &[u8]) -> Result<u32, AttributeError> {
    Ok(u32::from_be_bytes(*fixed::<4>(kind, v)?))
}

/// Decodes a (possibly XORed) address attribute value (RFC 8489 §14.1, §14.2).
fn decode_address(kind: u16, v: &[u8], xor: Option<&TransactionId>) -> Result<SocketAddr, AttributeError> {
    if v.len() < 4 {
        return Err(AttributeError::BadLength { kind });
    }
    let family = AddressFamily::from_u8(v[1]).ok_or(AttributeError::BadFamily { kind })?;
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match family {
        AddressFamily::V4 => {
            let mut a: [u8; 4] = *fixed::<4>(kind, &v[4..])?;
            if xor.is_some() {
                for (b, k) in a.iter_mut().zip(MAGIC_COOKIE.to_be_bytes()) {
                    *b ^= k;
                }
            }
            IpAddr::V4(Ipv4Addr::from(a))
        }
        AddressFamily::V6 => {
            let mut a: [u8; 16] = *fixed::<16>(kind, &v[4..])?;
            if let Some(tid) = xor {
                let key = xor_key(tid);
                for (b, k) in a.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    Ok(SocketAddr::new(ip, port))
}

fn xor_key(tid: &TransactionId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(&tid.0);
    key
}

/// Appends an address attribute value, XORed when `xor` is given.
fn encode_address(out: &mut Vec<u8>, addr: SocketAddr, xor: Option<&TransactionId>) {
    let mut port = addr.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    out.push(0);
    out.push(AddressFamily::of(&addr.ip()).to_u8());
    out.extend_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            let mut a = ip.octets();
            if xor.is_some() {
                for (b, k) in a.iter_mut().zip(MAGIC_COOKIE.to_be_bytes()) {
                    *b ^= k;
                }
            }
            out.extend_from_slice(&a);
        }
        IpAddr::V6(ip) => {
            let mut a = ip.octets();
            if let Some(tid) = xor {
                for (b, k) in a.iter_mut().zip(xor_key(tid)) {
                    *b ^= k;
                }
            }
            out.extend_from_slice(&a);
        }
    }
}

fn decode_error_code(kind: u16, v: &[u8]) -> Result<(ErrorCode, &str), AttributeError> {
    if v.len() < 4 {
        return Err(AttributeError::BadLength { kind });
    }
    let class = (v[2] & 0x07) as u16;
    let number = v[3] as u16;
    if !(3..=6).contains(&class) || number > 99 {
        return Err(AttributeError::BadValue { kind });
    }
    Ok((ErrorCode(class * 100 + number), text(kind, &v[4..], MAX_TEXT_LEN)?))
}

impl<'a> Attribute<'a> {
    /// Decodes the value of an attribute of type `kind`. `tid` is the message's
    /// transaction ID, needed for XOR-encoded IPv6 addresses.
    ///
    /// # Errors
    /// [`AttributeError`] when the value is malformed for its type. Unknown types decode
    /// as [`Attribute::Unknown`] and never fail.
    pub fn decode(kind: u16, v: &'a [u8], tid: &TransactionId) -> Result<Self, AttributeError> {
        use kind::*;
        let bad_len = AttributeError::BadLength { kind };
        Ok(match kind {
            MAPPED_ADDRESS => Attribute::MappedAddress(decode_address(kind, v, None)?),
            XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(decode_address(kind, v, Some(tid))?),
            USERNAME => Attribute::Username(text(kind, v, MAX_USERNAME_LEN)?),
            USERHASH => Attribute::Userhash(fixed::<32>(kind, v)?),
            MESSAGE_INTEGRITY => Attribute::MessageIntegrity(fixed::<20>(kind, v)?),
            MESSAGE_INTEGRITY_SHA256 => {
                if v.len() < 16 || v.len() > 32 || v.len() % 4 != 0 {
                    return Err(bad_len);
                }
                Attribute::MessageIntegritySha256(v)
            }
            FINGERPRINT => Attribute::Fingerprint(be32(kind, v)?),
            ERROR_CODE => {
                let (code, reason) = decode_error_code(kind, v)?;
                Attribute::ErrorCode { code, reason }
            }
            REALM => Attribute::Realm(text(kind, v, MAX_TEXT_LEN)?),
            NONCE => Attribute::Nonce(text(kind, v, MAX_TEXT_LEN)?),
            PASSWORD_ALGORITHMS => Attribute::PasswordAlgorithms(PasswordAlgorithms::new(v).ok_or(bad_len)?),
            PASSWORD_ALGORITHM => {
                if v.len() < 4 {
                    return Err(bad_len);
                }
                let plen = u16::from_be_bytes([v[2], v[3]]) as usize;
                if v.len() != 4 + plen {
                    return Err(bad_len);
                }
                Attribute::PasswordAlgorithm {
                    algorithm: u16::from_be_bytes([v[0], v[1]]),
                    params: &v[4..],
                }
            }
            UNKNOWN_ATTRIBUTES => {
                if v.len() % 2 != 0 {
                    return Err(bad_len);
                }
                Attribute::UnknownAttributes(v)
            }
            SOFTWARE => Attribute::Software(text(kind, v, MAX_TEXT_LEN)?),
            ALTERNATE_SERVER => Attribute::AlternateServer(decode_address(kind, v, None)?),
            ALTERNATE_DOMAIN => Attribute::AlternateDomain(text(kind, v, MAX_TEXT_LEN)?),
            CHANNEL_NUMBER => Attribute::ChannelNumber((be32(kind, v)? >> 16) as u16),
            LIFETIME => Attribute::Lifetime(be32(kind, v)?),
            XOR_PEER_ADDRESS => Attribute::XorPeerAddress(decode_address(kind, v, Some(tid))?),
            DATA => Attribute::Data(v),
            XOR_RELAYED_ADDRESS => Attribute::XorRelayedAddress(decode_address(kind, v, Some(tid))?),
            REQUESTED_ADDRESS_FAMILY | ADDITIONAL_ADDRESS_FAMILY => {
                let f = AddressFamily::from_u8(fixed::<4>(kind, v)?[0]).ok_or(AttributeError::BadFamily { kind })?;
                if kind == REQUESTED_ADDRESS_FAMILY {
                    Attribute::RequestedAddressFamily(f)
                } else {
                    Attribute::AdditionalAddressFamily(f)
                }
            }
            EVEN_PORT => Attribute::EvenPort(fixed::<1>(kind, v)?[0] & 0x80 != 0),
            REQUESTED_TRANSPORT => Attribute::RequestedTransport(fixed::<4>(kind, v)?[0]),
            DONT_FRAGMENT => {
                if !v.is_empty() {
                    return Err(bad_len);
                }
                Attribute::DontFragment
            }
            RESERVATION_TOKEN => Attribute::ReservationToken(*fixed::<8>(kind, v)?),
            ADDRESS_ERROR_CODE => {
                if v.len() < 4 {
                    return Err(bad_len);
                }
                let family = AddressFamily::from_u8(v[0]).ok_or(AttributeError::BadFamily { kind })?;
                let (code, reason) = decode_error_code(kind, v)?;
                Attribute::AddressErrorCode { family, code, reason }
            }
            ICMP => {
                let b = fixed::<8>(kind, v)?;
                Attribute::Icmp {
                    icmp_type: b[2],
                    icmp_code: b[3],
                    data: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                }
            }
            PRIORITY => Attribute::Priority(be32(kind, v)?),
            USE_CANDIDATE => {
                if !v.is_empty() {
                    return Err(bad_len);
                }
                Attribute::UseCandidate
            }
            ICE_CONTROLLED => Attribute::IceControlled(u64::from_be_bytes(*fixed::<8>(kind, v)?)),
            ICE_CONTROLLING => Attribute::IceControlling(u64::from_be_bytes(*fixed::<8>(kind, v)?)),
            CHANGE_REQUEST => Attribute::ChangeRequest(be32(kind, v)?),
            RESPONSE_ORIGIN => Attribute::ResponseOrigin(decode_address(kind, v, None)?),
            OTHER_ADDRESS => Attribute::OtherAddress(decode_address(kind, v, None)?),
            CONNECTION_ID => Attribute::ConnectionId(be32(kind, v)?),
            _ => Attribute::Unknown { kind, value: v },
        })
    }

    /// The attribute type number.
    pub fn kind(&self) -> u16 {
        use kind::*;
        match self {
            Attribute::MappedAddress(_) => MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => XOR_MAPPED_ADDRESS,
            Attribute::Username(_) => USERNAME,
            Attribute::Userhash(_) => USERHASH,
            Attribute::MessageIntegrity(_) => MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => FINGERPRINT,
            Attribute::ErrorCode { .. } => ERROR_CODE,
            Attribute::Realm(_) => REALM,
            Attribute::Nonce(_) => NONCE,
            Attribute::PasswordAlgorithms(_) => PASSWORD_ALGORITHMS,
            Attribute::PasswordAlgorithm { .. } => PASSWORD_ALGORITHM,
            Attribute::UnknownAttributes(_) => UNKNOWN_ATTRIBUTES,
            Attribute::Software(_) => SOFTWARE,
            Attribute::AlternateServer(_) => ALTERNATE_SERVER,
            Attribute::AlternateDomain(_) => ALTERNATE_DOMAIN,
            Attribute::ChannelNumber(_) => CHANNEL_NUMBER,
            Attribute::Lifetime(_) => LIFETIME,
            Attribute::XorPeerAddress(_) => XOR_PEER_ADDRESS,
            Attribute::Data(_) => DATA,
            Attribute::XorRelayedAddress(_) => XOR_RELAYED_ADDRESS,
            Attribute::RequestedAddressFamily(_) => REQUESTED_ADDRESS_FAMILY,
            Attribute::EvenPort(_) => EVEN_PORT,
            Attribute::RequestedTransport(_) => REQUESTED_TRANSPORT,
            Attribute::DontFragment => DONT_FRAGMENT,
            Attribute::ReservationToken(_) => RESERVATION_TOKEN,
            Attribute::AdditionalAddressFamily(_) => ADDITIONAL_ADDRESS_FAMILY,
            Attribute::AddressErrorCode { .. } => ADDRESS_ERROR_CODE,
            Attribute::Icmp { .. } => ICMP,
            Attribute::Priority(_) => PRIORITY,
            Attribute::UseCandidate => USE_CANDIDATE,
            Attribute::IceControlled(_) => ICE_CONTROLLED,
            Attribute::IceControlling(_) => ICE_CONTROLLING,
            Attribute::ChangeRequest(_) => CHANGE_REQUEST,
            Attribute::ResponseOrigin(_) => RESPONSE_ORIGIN,
            Attribute::OtherAddress(_) => OTHER_ADDRESS,
            Attribute::ConnectionId(_) => CONNECTION_ID,
            Attribute::Unknown { kind, .. } => *kind,
        }
    }

    /// Appends the attribute's value (without type, length or padding) to `out`.
    pub fn encode_value(&self, tid: &TransactionId, out: &mut Vec<u8>) {
        match *self {
            Attribute::MappedAddress(a)
            | Attribute::AlternateServer(a)
            | Attribute::ResponseOrigin(a)
            | Attribute::OtherAddress(a) => encode_address(out, a, None),
            Attribute::XorMappedAddress(a) | Attribute::XorPeerAddress(a) | Attribute::XorRelayedAddress(a) => {
                encode_address(out, a, Some(tid))
            }
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s)
            | Attribute::AlternateDomain(s) => out.extend_from_slice(s.as_bytes()),
            Attribute::Userhash(h) => out.extend_from_slice(h),
            Attribute::MessageIntegrity(h) => out.extend_from_slice(h),
            Attribute::MessageIntegritySha256(h) => out.extend_from_slice(h),
            Attribute::Fingerprint(v) | Attribute::Lifetime(v) | Attribute::Priority(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Attribute::ChangeRequest(v) | Attribute::ConnectionId(v) => out.extend_from_slice(&v.to_be_bytes()),
            Attribute::ErrorCode { code, reason } => {
                out.extend_from_slice(&[0, 0, (code.0 / 100) as u8, (code.0 % 100) as u8]);
                out.extend_from_slice(reason.as_bytes());
            }
            Attribute::AddressErrorCode { family, code, reason } => {
                out.extend_from_slice(&[family.to_u8(), 0, (code.0 / 100) as u8, (code.0 % 100) as u8]);
                out.extend_from_slice(reason.as_bytes());
            }
            Attribute::PasswordAlgorithms(p) => out.extend_from_slice(p.as_bytes()),
            Attribute::PasswordAlgorithm { algorithm, params } => {
                out.extend_from_slice(&algorithm.to_be_bytes());
                out.extend_from_slice(&(params.len() as u16).to_be_bytes());
                out.extend_from_slice(params);
            }
            Attribute::UnknownAttributes(v) | Attribute::Data(v) => out.extend_from_slice(v),
            Attribute::ChannelNumber(n) => out.extend_from_slice(&[(n >> 8) as u8, n as u8, 0, 0]),
            Attribute::RequestedAddressFamily(f) | Attribute::AdditionalAddressFamily(f) => {
                out.extend_from_slice(&[f.to_u8(), 0, 0, 0])
            }
            Attribute::EvenPort(r) => out.push(if r { 0x80 } else { 0 }),
            Attribute::RequestedTransport(p) => out.extend_from_slice(&[p, 0, 0, 0]),
            Attribute::DontFragment | Attribute::UseCandidate => {}
            Attribute::ReservationToken(t) => out.extend_from_slice(&t),
            Attribute::Icmp {
                icmp_type,
                icmp_code,
                data,
            } => {
                out.extend_from_slice(&[0, 0, icmp_type, icmp_code]);
                out.extend_from_slice(&data.to_be_bytes());
            }
            Attribute::IceControlled(v) | Attribute::IceControlling(v) => out.extend_from_slice(&v.to_be_bytes()),
            Attribute::Unknown { value, .. } => out.extend_from_slice(value),
        }
    }
}

/// Encodes a PASSWORD-ALGORITHMS value listing `algs` without parameters into `out`
/// (RFC 8489 §14.11).
pub fn encode_password_algorithms(algs: &[PasswordAlgorithm], out: &mut Vec<u8>) {
    for a in algs {
        out.extend_from_slice(&a.to_u16().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
}

/// Builds a [`PasswordAlgorithms`] view over an encoded value, `None` if malformed.
pub fn password_algorithms(value: &[u8]) -> Option<PasswordAlgorithms<'_>> {
    PasswordAlgorithms::new(value)
}
