//! Golden tests from RFC 5769 and RFC 8489 Appendix B.1, negative checks, and property
//! round-trips for every attribute.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use super::attribute::{kind, password_algorithms};
use super::integrity::{self, IntegrityError, LongTermKey};
use super::*;

/// RFC 5769 §2.1: Binding request, short-term credentials.
const RFC5769_2_1: &str = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";
/// RFC 5769 §2.2: Binding success response, IPv4.
const RFC5769_2_2: &str = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96";
/// RFC 5769 §2.3: Binding success response, IPv6.
const RFC5769_2_3: &str = "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c";
/// RFC 5769 §2.4: Binding request, long-term credentials.
const RFC5769_2_4: &str = "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe382b900000015001c662f2f3439396b39353464364f4c33346f4c394653547679363473410014000b6578616d706c652e6f72670000080014f67024656dd64a3e02b8e0712e85c9a28ca89666";
/// RFC 8489 Appendix B.1, corrected (length 0x0090, PASSWORD-ALGORITHM added; see tests/README).
const RFC8489_B1: &str = "000100902112a44278ad3433c6ad72c029da412e001e00204a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704001500296f624d61744a6f733241414143662f2f3439396b39353464364f4c33346f4c394653547679363473410000000014000b6578616d706c652e6f726700001d000400020000001c0020b5c7bf005b6c52a21c51c5e892f81924136296cb927c43149309278cc6518e65";

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
const MATRIX_USER: &str = "\u{30de}\u{30c8}\u{30ea}\u{30c3}\u{30af}\u{30b9}";

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn get<'a>(m: &Message<'a>, k: u16) -> Attribute<'a> {
    m.get(k).expect("attribute present").expect("attribute valid")
}

#[test]
fn rfc5769_2_1_request() {
    let buf = unhex(RFC5769_2_1);
    assert_eq!(buf.len(), 108);
    let m = Message::decode(&buf).unwrap();
    assert_eq!(m.method(), Method::Binding);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(get(&m, kind::SOFTWARE), Attribute::Software("STUN test client"));
    assert_eq!(get(&m, kind::PRIORITY), Attribute::Priority(0x6e0001ff));
    assert_eq!(
        get(&m, kind::ICE_CONTROLLED),
        Attribute::IceControlled(0x932ff9b151263b36)
    );
    assert_eq!(get(&m, kind::USERNAME), Attribute::Username("evtj:h6vY"));
    integrity::verify_message_integrity(&m, SHORT_TERM_PASSWORD).unwrap();
    integrity::verify_fingerprint(&m).unwrap();
    assert_eq!(get(&m, kind::FINGERPRINT), Attribute::Fingerprint(0xe57a3bcf));
}

#[test]
fn rfc5769_2_2_response_ipv4() {
    let buf = unhex(RFC5769_2_2);
    assert_eq!(buf.len(), 80);
    let m = Message::decode(&buf).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(get(&m, kind::SOFTWARE), Attribute::Software("test vector"));
    assert_eq!(
        get(&m, kind::XOR_MAPPED_ADDRESS),
        Attribute::XorMappedAddress("192.0.2.1:32853".parse().unwrap())
    );
    integrity::verify_message_integrity(&m, SHORT_TERM_PASSWORD).unwrap();
    integrity::verify_fingerprint(&m).unwrap();
    assert_eq!(get(&m, kind::FINGERPRINT), Attribute::Fingerprint(0xc07d4c96));
}

#[test]
fn rfc5769_2_3_response_ipv6() {
    let buf = unhex(RFC5769_2_3);
    assert_eq!(buf.len(), 92);
    let m = Message::decode(&buf).unwrap();
    assert_eq!(
        get(&m, kind::XOR_MAPPED_ADDRESS),
        Attribute::XorMappedAddress("[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap())
    );
    integrity::verify_message_integrity(&m, SHORT_TERM_PASSWORD).unwrap();
    integrity::verify_fingerprint(&m).unwrap();
    assert_eq!(get(&m, kind::FINGERPRINT), Attribute::Fingerprint(0xc8fb0b4c));
}

#[test]
fn rfc5769_2_4_long_term() {
    let buf = unhex(RFC5769_2_4);
    assert_eq!(buf.len(), 116);
    let m = Message::decode(&buf).unwrap();
    assert_eq!(get(&m, kind::USERNAME), Attribute::Username(MATRIX_USER));
    assert_eq!(get(&m, kind::NONCE), Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"));
    assert_eq!(get(&m, kind::REALM), Attribute::Realm("example.org"));
    assert!(m.fingerprint_offset().is_none());
    // The password "The\u{00ad}M\u{00aa}tr\u{2168}" is "TheMatrIX" after SASLprep/OpaqueString.
    let key = LongTermKey::derive(PasswordAlgorithm::Md5, MATRIX_USER, "example.org", "TheMatrIX");
    assert_eq!(key.as_bytes(), unhex("e8ca7ad59d5eb0518e312911d2dab2a9"));
    integrity::verify_message_integrity(&m, key.as_bytes()).unwrap();
    assert_eq!(integrity::verify_fingerprint(&m), Err(IntegrityError::Missing));
}

#[test]
fn rfc8489_b1_sha256() {
    let buf = unhex(RFC8489_B1);
    assert_eq!(buf.len(), 164);
    let m = Message::decode(&buf).unwrap();
    let uh = integrity::userhash(MATRIX_USER, "example.org");
    assert_eq!(
        uh.to_vec(),
        unhex("4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704")
    );
    assert_eq!(get(&m, kind::USERHASH), Attribute::Userhash(&uh));
    assert_eq!(
        get(&m, kind::NONCE),
        Attribute::Nonce("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA")
    );
    assert_eq!(
        get(&m, kind::PASSWORD_ALGORITHM),
        Attribute::PasswordAlgorithm {
            algorithm: 2,
            params: &[]
        }
    );
    let key = LongTermKey::derive(PasswordAlgorithm::Sha256, MATRIX_USER, "example.org", "TheMatrIX");
    assert_eq!(
        key.as_bytes(),
        unhex("dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1")
    );
    integrity::verify_message_integrity_sha256(&m, key.as_bytes()).unwrap();
    assert_eq!(
        integrity::verify_message_integrity(&m, key.as_bytes()),
        Err(IntegrityError::Missing)
    );
}

/// Flipping any byte the MAC covers (everything before the MESSAGE-INTEGRITY value except
/// the length field, which changes the framing) must make verification fail.
#[test]
fn flipping_a_covered_byte_breaks_integrity() {
    for (hexmsg, key) in [
        (RFC5769_2_1, SHORT_TERM_PASSWORD.to_vec()),
        (RFC5769_2_2, SHORT_TERM_PASSWORD.to_vec()),
        (RFC5769_2_3, SHORT_TERM_PASSWORD.to_vec()),
        (RFC5769_2_4, unhex("e8ca7ad59d5eb0518e312911d2dab2a9")),
    ] {
        let orig = unhex(hexmsg);
        let off = Message::decode(&orig).unwrap().integrity_offset().unwrap();
        for i in (0..off + 24).filter(|i| !(2..4).contains(i)) {
            let mut buf = orig.clone();
            buf[i] ^= 0x01;
            // A flip that breaks the framing is rejected by decode, which is fine too.
            if let Ok(m) = Message::decode(&buf) {
                assert!(
                    integrity::verify_message_integrity(&m, &key).is_err(),
                    "flip at {i} went unnoticed"
                );
            }
        }
    }
}

#[test]
fn flipping_a_byte_breaks_sha256_integrity() {
    let orig = unhex(RFC8489_B1);
    let key = LongTermKey::derive(PasswordAlgorithm::Sha256, MATRIX_USER, "example.org", "TheMatrIX");
    for i in (0..orig.len()).filter(|i| !(2..4).contains(i)) {
        let mut buf = orig.clone();
        buf[i] ^= 0x80;
        if let Ok(m) = Message::decode(&buf) {
            assert!(
                integrity::verify_message_integrity_sha256(&m, key.as_bytes()).is_err(),
                "flip at {i}"
            );
        }
    }
}

#[test]
fn flipping_a_byte_before_fingerprint_breaks_it() {
    for hexmsg in [RFC5769_2_1, RFC5769_2_2, RFC5769_2_3] {
        let orig = unhex(hexmsg);
        let off = Message::decode(&orig).unwrap().fingerprint_offset().unwrap();
        for i in (0..off + 8).filter(|i| !(2..4).contains(i)) {
            let mut buf = orig.clone();
            buf[i] ^= 0x10;
            if let Ok(m) = Message::decode(&buf) {
                assert!(integrity::verify_fingerprint(&m).is_err(), "flip at {i}");
            }
        }
    }
}

/// An attribute appended after MESSAGE-INTEGRITY (with the length fixed up) is ignored and
/// integrity still verifies (RFC 8489 §14.5).
#[test]
fn attribute_after_integrity_is_ignored() {
    let mut buf = unhex(RFC5769_2_4);
    buf.extend_from_slice(&[0x80, 0x22, 0x00, 0x04, b'e', b'v', b'i', b'l']);
    let len = (buf.len() - HEADER_LEN) as u16;
    buf[2..4].copy_from_slice(&len.to_be_bytes());
    let m = Message::decode(&buf).unwrap();
    let key = unhex("e8ca7ad59d5eb0518e312911d2dab2a9");
    integrity::verify_message_integrity(&m, &key).unwrap();
    assert!(
        m.get(kind::SOFTWARE).is_none(),
        "attribute after MI must not be visible"
    );
}

#[test]
fn truncation_at_every_offset_is_a_clean_error() {
    for hexmsg in [RFC5769_2_1, RFC5769_2_2, RFC5769_2_3, RFC5769_2_4, RFC8489_B1] {
        let buf = unhex(hexmsg);
        for cut in 0..buf.len() {
            assert!(Message::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        // Also with the header length fixed up to the truncated size.
        for cut in (HEADER_LEN..buf.len()).step_by(4) {
            let mut t = buf[..cut].to_vec();
            let len = (cut - HEADER_LEN) as u16;
            t[2..4].copy_from_slice(&len.to_be_bytes());
            if let Ok(m) = Message::decode(&t) {
                for a in m.attributes() {
                    let _ = Attribute::decode(a.kind, a.value, &m.transaction_id());
                }
            }
        }
    }
}

/// Regression: a MESSAGE-INTEGRITY shorter than 20 bytes at the end of a message made
/// verification slice past the end (found by the server proptest).
#[test]
fn short_message_integrity_is_a_mismatch_not_a_panic() {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Allocate, Class::Request),
        TransactionId([2; 12]),
    );
    b.raw_attribute(kind::MESSAGE_INTEGRITY, &[0; 4]);
    let m = Message::decode(&out).unwrap();
    assert_eq!(
        integrity::verify_message_integrity(&m, b"key"),
        Err(IntegrityError::Mismatch)
    );
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Allocate, Class::Request),
        TransactionId([2; 12]),
    );
    b.raw_attribute(kind::FINGERPRINT, &[0; 2]);
    let m = Message::decode(&out).unwrap();
    assert_eq!(integrity::verify_fingerprint(&m), Err(IntegrityError::Mismatch));
}

#[test]
fn padding_content_is_ignored() {
    // RFC 5769 2.1 pads with spaces; zero them and the attributes still decode.
    let buf = unhex(RFC5769_2_1);
    let m = Message::decode(&buf).unwrap();
    assert_eq!(get(&m, kind::USERNAME), Attribute::Username("evtj:h6vY"));
}

#[test]
fn builder_reproduces_rfc5769_2_2() {
    let orig = unhex(RFC5769_2_2);
    let m = Message::decode(&orig).unwrap();
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, m.message_type(), m.transaction_id());
    // RFC 5769 pads SOFTWARE with a space; content of padding is not significant, so
    // compare after decoding rather than byte for byte.
    b.attribute(&Attribute::Software("test vector"));
    b.attribute(&Attribute::XorMappedAddress("192.0.2.1:32853".parse().unwrap()));
    b.message_integrity(SHORT_TERM_PASSWORD);
    b.fingerprint();
    let m2 = Message::decode(&out).unwrap();
    integrity::verify_message_integrity(&m2, SHORT_TERM_PASSWORD).unwrap();
    integrity::verify_fingerprint(&m2).unwrap();
    assert_eq!(out.len(), orig.len());
    // Everything except the SOFTWARE pad byte (offset 35) and the MAC/CRC is identical.
    assert_eq!(out[..35], orig[..35]);
    assert_eq!(out[36..48], orig[36..48]);
}

#[test]
fn builder_sha256_integrity_verifies() {
    let key = LongTermKey::derive(PasswordAlgorithm::Sha256, "alice", "turnpike", "secret");
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Allocate, Class::Request),
        TransactionId([3; 12]),
    );
    b.attribute(&Attribute::RequestedTransport(17));
    b.message_integrity_sha256(key.as_bytes());
    b.fingerprint();
    let m = Message::decode(&out).unwrap();
    integrity::verify_message_integrity_sha256(&m, key.as_bytes()).unwrap();
    integrity::verify_fingerprint(&m).unwrap();
    let wrong = LongTermKey::derive(PasswordAlgorithm::Sha256, "alice", "turnpike", "Secret");
    assert_eq!(
        integrity::verify_message_integrity_sha256(&m, wrong.as_bytes()),
        Err(IntegrityError::Mismatch)
    );
}

#[test]
fn rejects_attributes_after_fingerprint() {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Binding, Class::Request),
        TransactionId([1; 12]),
    );
    b.fingerprint();
    b.attribute(&Attribute::Software("x"));
    assert_eq!(Message::decode(&out).unwrap_err(), DecodeError::BadAttributeOrder);
}

#[test]
fn unknown_comprehension_required_are_reported() {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Allocate, Class::Request),
        TransactionId([1; 12]),
    );
    b.raw_attribute(0x7777, b"abc");
    b.raw_attribute(0xC001, b"optional");
    b.attribute(&Attribute::Lifetime(5));
    let m = Message::decode(&out).unwrap();
    assert_eq!(m.unknown_comprehension_required().collect::<Vec<_>>(), vec![0x7777]);
}

// ---- property tests ----

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
        (any::<u128>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
    ]
}

fn arb_family() -> impl Strategy<Value = AddressFamily> {
    prop_oneof![Just(AddressFamily::V4), Just(AddressFamily::V6)]
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    (3u16..=6, 0u16..=99).prop_map(|(c, n)| ErrorCode(c * 100 + n))
}

/// Owned inputs from which every attribute variant is built (attributes borrow).
#[derive(Debug, Clone)]
struct Owned {
    variant: u8,
    addr: SocketAddr,
    text: String,
    bytes: Vec<u8>,
    hash: [u8; 32],
    mi: [u8; 20],
    n32: u32,
    n64: u64,
    n16: u16,
    n8: u8,
    flag: bool,
    family: AddressFamily,
    code: ErrorCode,
}

fn arb_owned() -> impl Strategy<Value = Owned> {
    (
        0u8..38,
        arb_addr(),
        "[a-zA-Z0-9 :./\u{30de}\u{00e9}]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<[u8; 32]>(),
        any::<[u8; 20]>(),
        (any::<u32>(), any::<u64>(), any::<u16>(), any::<u8>(), any::<bool>()),
        arb_family(),
        arb_code(),
    )
        .prop_map(
            |(variant, addr, text, bytes, hash, mi, (n32, n64, n16, n8, flag), family, code)| Owned {
                variant,
                addr,
                text,
                bytes,
                hash,
                mi,
                n32,
                n64,
                n16,
                n8,
                flag,
                family,
                code,
            },
        )
}

fn build<'a>(o: &'a Owned, pa_buf: &'a mut Vec<u8>) -> Attribute<'a> {
    let mut even = o.bytes.clone();
    even.truncate(o.bytes.len() / 2 * 2);
    // PASSWORD-ALGORITHMS: a list of (alg, 0-length params)
    pa_buf.clear();
    for c in o.bytes.chunks(2).take(4) {
        pa_buf.extend_from_slice(&[c[0], *c.get(1).unwrap_or(&0), 0, 0]);
    }
    match o.variant {
        0 => Attribute::MappedAddress(o.addr),
        1 => Attribute::XorMappedAddress(o.addr),
        2 => Attribute::Username(&o.text),
        3 => Attribute::Userhash(&o.hash),
        4 => Attribute::MessageIntegritySha256(&o.hash),
        5 => Attribute::Fingerprint(o.n32),
        6 => Attribute::ErrorCode {
            code: o.code,
            reason: &o.text,
        },
        7 => Attribute::Realm(&o.text),
        8 => Attribute::Nonce(&o.text),
        9 => Attribute::PasswordAlgorithms(password_algorithms(pa_buf).unwrap()),
        10 => Attribute::PasswordAlgorithm {
            algorithm: o.n16,
            params: &o.bytes,
        },
        11 => Attribute::UnknownAttributes(&o.bytes[..o.bytes.len() / 2 * 2]),
        12 => Attribute::Software(&o.text),
        13 => Attribute::AlternateServer(o.addr),
        14 => Attribute::AlternateDomain(&o.text),
        15 => Attribute::ChannelNumber(o.n16),
        16 => Attribute::Lifetime(o.n32),
        17 => Attribute::XorPeerAddress(o.addr),
        18 => Attribute::Data(&o.bytes),
        19 => Attribute::XorRelayedAddress(o.addr),
        20 => Attribute::RequestedAddressFamily(o.family),
        21 => Attribute::EvenPort(o.flag),
        22 => Attribute::RequestedTransport(o.n8),
        23 => Attribute::DontFragment,
        24 => Attribute::ReservationToken(o.n64.to_be_bytes()),
        25 => Attribute::AdditionalAddressFamily(o.family),
        26 => Attribute::AddressErrorCode {
            family: o.family,
            code: o.code,
            reason: &o.text,
        },
        27 => Attribute::Icmp {
            icmp_type: o.n8,
            icmp_code: o.n16 as u8,
            data: o.n32,
        },
        28 => Attribute::Priority(o.n32),
        29 => Attribute::UseCandidate,
        30 => Attribute::IceControlled(o.n64),
        31 => Attribute::IceControlling(o.n64),
        32 => Attribute::ChangeRequest(o.n32),
        33 => Attribute::ResponseOrigin(o.addr),
        34 => Attribute::OtherAddress(o.addr),
        35 => Attribute::ConnectionId(o.n32),
        36 => Attribute::MessageIntegrity(&o.mi),
        _ => Attribute::Unknown {
            kind: 0xC000 | (o.n16 & 0x3FFF),
            value: &o.bytes,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The flag found while decoding says what the attribute walk says: unknown
    /// comprehension-required attributes before any MESSAGE-INTEGRITY.
    #[test]
    fn unknown_comprehension_required_flag_matches_the_walk(
        attrs in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 0..8)), 0..6),
        mi_at in 0usize..7,
    ) {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, MessageType::new(Method::Send, Class::Indication), TransactionId([3; 12]));
        for (i, (k, v)) in attrs.iter().enumerate() {
            if i == mi_at {
                b.message_integrity(b"key");
            }
            if *k != kind::MESSAGE_INTEGRITY && *k != kind::MESSAGE_INTEGRITY_SHA256 && *k != kind::FINGERPRINT {
                b.raw_attribute(*k, v);
            }
        }
        if let Ok(m) = Message::decode(&out) {
            prop_assert_eq!(m.has_unknown_comprehension_required(), m.unknown_comprehension_required().next().is_some());
        }
    }

    /// Every attribute variant survives encode -> decode unchanged.
    #[test]
    fn attribute_round_trip(o in arb_owned(), tid in any::<[u8; 12]>()) {
        let mut pa = Vec::new();
        let a = build(&o, &mut pa);
        let tid = TransactionId(tid);
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, MessageType::new(Method::Allocate, Class::Request), tid);
        b.attribute(&a);
        let m = Message::decode(&out).unwrap();
        prop_assert_eq!(m.transaction_id(), tid);
        let raw = m.attributes().next().unwrap();
        prop_assert_eq!(raw.kind, a.kind());
        let back = Attribute::decode(raw.kind, raw.value, &tid).unwrap();
        prop_assert_eq!(back, a);
    }

    /// Any byte string decodes to a message or a clean error; every attribute of a decoded
    /// message decodes or errors; integrity checks never panic.
    #[test]
    fn decode_never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..300), stunlike in any::<bool>()) {
        if stunlike && data.len() >= 20 {
            data[0] &= 0x3F;
            let len = ((data.len() - 20) & !3) as u16;
            data.truncate(20 + len as usize);
            data[2..4].copy_from_slice(&len.to_be_bytes());
            data[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        }
        if let Ok(m) = Message::decode(&data) {
            for a in m.attributes() {
                let _ = Attribute::decode(a.kind, a.value, &m.transaction_id());
            }
            let _ = integrity::verify_message_integrity(&m, b"k");
            let _ = integrity::verify_message_integrity_sha256(&m, b"k");
            let _ = integrity::verify_fingerprint(&m);
            let _ = m.unknown_comprehension_required().count();
        }
    }

    /// Arbitrary values for every known attribute type decode or error cleanly.
    #[test]
    fn attribute_decode_never_panics(k in prop_oneof![0u16..0x30, 0x8000u16..0x8030], v in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = Attribute::decode(k, &v, &TransactionId([9; 12]));
    }
}
