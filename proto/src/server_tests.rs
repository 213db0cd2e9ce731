//! Unit tests for the sans-IO TURN server, driven the way the shell drives it: bytes and a
//! virtual `Instant` in, actions and bytes out. Nothing sleeps; time is `t0 + n seconds`.
//!
//! A small test client encodes real requests (with the 401 -> credentials flow, MD5 or
//! SHA-256 long-term keys, MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256, FINGERPRINT) and
//! checks the integrity of every authenticated response with the same key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::{
    AllocateRequest, ClientAction, CloseReason, DropReason, Event, PeerAction, PeerConnectionAction, RelayError,
    Server, ServerConfig, BIND_TIMEOUT,
};
use crate::allocation::{FiveTuple, Usage};
use crate::auth::{self, Credentials, NONCE_COOKIE};
use crate::channel_data::ChannelData;
use crate::peer_policy::PeerPolicy;
use crate::stun::attribute::{kind, password_algorithms};
use crate::stun::integrity::{self, IntegrityError, LongTermKey};
use crate::stun::{
    AddressFamily, Attribute, Class, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

const REALM: &str = "turnpike";
const UNIX_NOW: u64 = 1_700_000_000;
const SECRET: [u8; 32] = [7; 32];
const SERVER_ADDR: &str = "192.0.2.9:3478";

/// Public peers, allowed by `PeerPolicy::default()`.
const P1: &str = "8.8.8.8:4000";
const P2: &str = "1.1.1.1:5000";
const P3: &str = "9.9.9.9:6000";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn five_tuple(client: &str) -> FiveTuple {
    FiveTuple::udp(sa(client), sa(SERVER_ADDR))
}

/// A made-up relayed transport address (192.0.2.0/24 is refused as a peer, fine as a relay).
fn relay(n: u16) -> SocketAddr {
    SocketAddr::new("192.0.2.200".parse().unwrap(), 50_000 + n)
}

fn fresh_tid() -> TransactionId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut t = [0xA5u8; 12];
    t[4..].copy_from_slice(&n.to_be_bytes());
    TransactionId(t)
}

/// Encodes one STUN message.
fn build(method: Method, class: Class, tid: TransactionId, fill: impl FnOnce(&mut MessageBuilder<'_>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, MessageType::new(method, class), tid);
    fill(&mut b);
    out
}

fn algorithms_value(algs: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    for a in algs {
        v.extend_from_slice(&a.to_be_bytes());
        v.extend_from_slice(&[0, 0]);
    }
    v
}

fn send_indication(peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
    build(Method::Send, Class::Indication, fresh_tid(), |b| {
        b.attribute(&Attribute::XorPeerAddress(peer));
        b.attribute(&Attribute::Data(payload));
    })
}

fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    ChannelData { channel, payload }.encode(&mut v);
    v
}

fn decode(resp: &[u8]) -> Message<'_> {
    Message::decode(resp).expect("the response decodes")
}

fn get<'a>(m: &Message<'a>, k: u16) -> Attribute<'a> {
    m.get(k)
        .unwrap_or_else(|| panic!("attribute 0x{k:04x} present"))
        .expect("attribute valid")
}

fn err_code(resp: &[u8]) -> Option<u16> {
    match decode(resp).get(kind::ERROR_CODE) {
        None => None,
        Some(Ok(Attribute::ErrorCode { code, .. })) => Some(code.0),
        Some(other) => panic!("bad ERROR-CODE {other:?}"),
    }
}

#[track_caller]
fn assert_success(resp: &[u8], method: Method) {
    let m = decode(resp);
    assert_eq!(
        (m.method(), m.class(), err_code(resp)),
        (method, Class::Success, None),
        "expected a {method:?} success"
    );
}

#[track_caller]
fn assert_error(resp: &[u8], method: Method, code: u16) {
    let m = decode(resp);
    assert_eq!(
        (m.method(), m.class(), err_code(resp)),
        (method, Class::Error, Some(code))
    );
}

fn nonce_of(resp: &[u8]) -> String {
    match get(&decode(resp), kind::NONCE) {
        Attribute::Nonce(n) => n.to_string(),
        a => panic!("{a:?}"),
    }
}

fn lifetime_of(resp: &[u8]) -> u32 {
    match get(&decode(resp), kind::LIFETIME) {
        Attribute::Lifetime(s) => s,
        a => panic!("{a:?}"),
    }
}

fn relayed_of(resp: &[u8]) -> SocketAddr {
    match get(&decode(resp), kind::XOR_RELAYED_ADDRESS) {
        Attribute::XorRelayedAddress(a) => a,
        a => panic!("{a:?}"),
    }
}

fn unknown_attributes_of(resp: &[u8]) -> Vec<u16> {
    match get(&decode(resp), kind::UNKNOWN_ATTRIBUTES) {
        Attribute::UnknownAttributes(v) => v.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect(),
        a => panic!("{a:?}"),
    }
}

fn has(resp: &[u8], k: u16) -> bool {
    decode(resp).raw(k).is_some()
}

/// A client datagram's outcome, owned (the server's actions borrow the input).
#[derive(Debug)]
enum Outcome {
    Respond(Vec<u8>),
    Allocate(AllocateRequest),
    Relay {
        relayed: SocketAddr,
        peer: SocketAddr,
        payload: Vec<u8>,
    },
    Drop(DropReason),
    Nothing,
    Connect {
        connection_id: u32,
        relayed: SocketAddr,
        peer: SocketAddr,
    },
    Elsewhere(u8),
}

impl Outcome {
    #[track_caller]
    fn response(self) -> Vec<u8> {
        match self {
            Outcome::Respond(r) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[track_caller]
    fn allocate(self) -> AllocateRequest {
        match self {
            Outcome::Allocate(r) => r,
            Outcome::Respond(r) => {
                panic!("expected Allocate, got response with {:?}", err_code(&r))
            }
            other => panic!("expected Allocate, got {other:?}"),
        }
    }
}

/// The test client: one 5-tuple, one set of long-term credentials.
#[derive(Debug, Clone)]
struct Client {
    ft: FiveTuple,
    username: String,
    password: String,
    realm: String,
    /// The algorithm the key is derived with.
    key_alg: PasswordAlgorithm,
    /// MESSAGE-INTEGRITY-SHA256 instead of MESSAGE-INTEGRITY.
    mi_sha256: bool,
    /// PASSWORD-ALGORITHM to send, if any.
    password_algorithm: Option<u16>,
    /// PASSWORD-ALGORITHMS to send, if any.
    password_algorithms: Option<Vec<u16>>,
    send_username: bool,
    send_realm: bool,
    send_nonce: bool,
    fingerprint: bool,
    nonce: Option<String>,
}

impl Client {
    fn new(client: &str, username: &str, password: &str) -> Self {
        Client {
            ft: five_tuple(client),
            username: username.into(),
            password: password.into(),
            realm: REALM.into(),
            key_alg: PasswordAlgorithm::Md5,
            mi_sha256: false,
            password_algorithm: None,
            password_algorithms: None,
            send_username: true,
            send_realm: true,
            send_nonce: true,
            fingerprint: true,
            nonce: None,
        }
    }

    fn alice() -> Self {
        Client::new("203.0.113.10:40000", "alice", "alice-pw")
    }

    fn bob() -> Self {
        Client::new("203.0.113.20:40000", "bob", "bob-pw")
    }

    /// SHA-256 key, MESSAGE-INTEGRITY-SHA256, PASSWORD-ALGORITHM 2 and the offered list.
    fn sha256(mut self) -> Self {
        self.key_alg = PasswordAlgorithm::Sha256;
        self.mi_sha256 = true;
        self.password_algorithm = Some(2);
        self.password_algorithms = Some(vec![1, 2]);
        self
    }

    fn key(&self) -> LongTermKey {
        LongTermKey::derive(self.key_alg, &self.username, &self.realm, &self.password)
    }

    fn unauthenticated(&self, method: Method, tid: TransactionId, attrs: &[Attribute<'_>]) -> Vec<u8> {
        build(method, Class::Request, tid, |b| {
            for a in attrs {
                b.attribute(a);
            }
            if self.fingerprint {
                b.fingerprint();
            }
        })
    }

    fn authenticated(&self, method: Method, tid: TransactionId, attrs: &[Attribute<'_>]) -> Vec<u8> {
        self.authenticated_with_raw(method, tid, attrs, &[])
    }

    /// [`Client::authenticated`] with attributes given as raw (type, value) pairs after
    /// `attrs` (code points the codec has no variant for).
    fn authenticated_with_raw(
        &self,
        method: Method,
        tid: TransactionId,
        attrs: &[Attribute<'_>],
        raw: &[(u16, &[u8])],
    ) -> Vec<u8> {
        let nonce = self.nonce.clone().expect("the client has a nonce");
        let key = self.key();
        let algs = self.password_algorithms.as_deref().map(algorithms_value);
        build(method, Class::Request, tid, |b| {
            if self.send_username {
                b.attribute(&Attribute::Username(&self.username));
            }
            if self.send_realm {
                b.attribute(&Attribute::Realm(&self.realm));
            }
            if self.send_nonce {
                b.attribute(&Attribute::Nonce(&nonce));
            }
            if let Some(v) = &algs {
                b.attribute(&Attribute::PasswordAlgorithms(
                    password_algorithms(v).expect("valid list"),
                ));
            }
            if let Some(a) = self.password_algorithm {
                b.attribute(&Attribute::PasswordAlgorithm {
                    algorithm: a,
                    params: &[],
                });
            }
            for a in attrs {
                b.attribute(a);
            }
            for (kind, value) in raw {
                b.raw_attribute(*kind, value);
            }
            if self.mi_sha256 {
                b.message_integrity_sha256(key.as_bytes());
            } else {
                b.message_integrity(key.as_bytes());
            }
            if self.fingerprint {
                b.fingerprint();
            }
        })
    }

    /// Checks an authenticated response: the integrity variant the request used, verified
    /// with the client's key, and a valid FINGERPRINT when the request had one.
    #[track_caller]
    fn verify(&self, resp: &[u8]) {
        let m = decode(resp);
        let key = self.key();
        if self.mi_sha256 {
            assert_eq!(integrity::verify_message_integrity_sha256(&m, key.as_bytes()), Ok(()));
            assert_eq!(
                m.integrity_offset(),
                None,
                "no MESSAGE-INTEGRITY next to MESSAGE-INTEGRITY-SHA256"
            );
        } else {
            assert_eq!(integrity::verify_message_integrity(&m, key.as_bytes()), Ok(()));
            assert_eq!(
                m.integrity_sha256_offset(),
                None,
                "no MESSAGE-INTEGRITY-SHA256 for a SHA-1 request"
            );
        }
        if self.fingerprint {
            assert_eq!(integrity::verify_fingerprint(&m), Ok(()));
        }
    }
}

struct Harness {
    server: Server,
    t0: Instant,
}

fn default_credentials() -> Credentials {
    Credentials::new(
        [
            ("alice".to_string(), "alice-pw".to_string()),
            ("bob".to_string(), "bob-pw".to_string()),
        ],
        vec![],
        REALM,
    )
}

impl Harness {
    fn new() -> Self {
        Harness::with(ServerConfig::default(), PeerPolicy::default())
    }

    fn with_config(config: ServerConfig) -> Self {
        Harness::with(config, PeerPolicy::default())
    }

    fn with(config: ServerConfig, policy: PeerPolicy) -> Self {
        Harness::build(config, default_credentials(), policy, SECRET)
    }

    fn build(config: ServerConfig, credentials: Credentials, policy: PeerPolicy, secret: [u8; 32]) -> Self {
        let t0 = Instant::now();
        Harness {
            server: Server::new(config, credentials, policy, secret, t0, UNIX_NOW),
            t0,
        }
    }

    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    fn send(&mut self, now: Instant, ft: FiveTuple, data: &[u8]) -> Outcome {
        let mut out = vec![0xEE; 7]; // the server must clear it
        match self.server.handle_client(now, ft, data, &mut out) {
            ClientAction::Respond(_) | ClientAction::RespondFrom(..) => Outcome::Respond(out),
            ClientAction::Allocate(r) => Outcome::Allocate(r),
            ClientAction::Relay { relayed, peer, payload } => Outcome::Relay {
                relayed,
                peer,
                payload: payload.to_vec(),
            },
            ClientAction::Drop(r) => Outcome::Drop(r),
            ClientAction::Nothing => Outcome::Nothing,
            ClientAction::Connect {
                connection_id,
                relayed,
                peer,
            } => Outcome::Connect {
                connection_id,
                relayed,
                peer,
            },
            ClientAction::ConnectionElsewhere { tag } => Outcome::Elsewhere(tag),
        }
    }

    /// Sends the request without credentials and expects the 401 challenge; stores the nonce.
    fn challenge(&mut self, now: Instant, c: &mut Client) -> Vec<u8> {
        let tid = fresh_tid();
        let resp = self
            .send(
                now,
                c.ft,
                &c.unauthenticated(Method::Allocate, tid, &[Attribute::RequestedTransport(17)]),
            )
            .response();
        assert_error(&resp, Method::Allocate, 401);
        assert_eq!(decode(&resp).transaction_id(), tid);
        c.nonce = Some(nonce_of(&resp));
        resp
    }

    /// An authenticated request, after the 401 round trip if the client has no nonce yet
    /// and retried once on 438. Responses that carry integrity are verified.
    fn request(
        &mut self,
        now: Instant,
        c: &mut Client,
        method: Method,
        tid: TransactionId,
        attrs: &[Attribute<'_>],
    ) -> Outcome {
        if c.nonce.is_none() {
            self.challenge(now, c);
        }
        let mut outcome = self.send(now, c.ft, &c.authenticated(method, tid, attrs));
        if let Outcome::Respond(r) = &outcome {
            if err_code(r) == Some(438) {
                c.nonce = Some(nonce_of(r));
                outcome = self.send(now, c.ft, &c.authenticated(method, tid, attrs));
            }
        }
        if let Outcome::Respond(r) = &outcome {
            let m = decode(r);
            assert_eq!(m.transaction_id(), tid);
            assert_eq!(m.method(), method);
            if m.class() == Class::Success || m.integrity_offset().is_some() || m.integrity_sha256_offset().is_some() {
                c.verify(r);
            }
        }
        outcome
    }

    fn complete(
        &mut self,
        now: Instant,
        c: &Client,
        req: AllocateRequest,
        result: Result<SocketAddr, RelayError>,
    ) -> (Vec<u8>, Option<SocketAddr>) {
        assert_eq!(req.five_tuple, c.ft);
        let mut out = vec![0xEE; 3];
        let completion = self.server.complete_allocate(now, req, result, &mut out);
        c.verify(&out);
        assert_eq!(completion.response.method, Method::Allocate);
        assert_eq!(completion.response.error.map(|e| e.0), err_code(&out));
        (out, completion.release)
    }

    /// Allocate and complete it with `relayed`: the response (success or error).
    fn allocate_with(&mut self, now: Instant, c: &mut Client, attrs: &[Attribute<'_>], relayed: SocketAddr) -> Vec<u8> {
        let mut all = vec![Attribute::RequestedTransport(17)];
        all.extend_from_slice(attrs);
        let req = self.request(now, c, Method::Allocate, fresh_tid(), &all).allocate();
        let (resp, released) = self.complete(now, c, req, Ok(relayed));
        assert_eq!(released, None);
        resp
    }

    fn allocate_ok(&mut self, now: Instant, c: &mut Client, relayed: SocketAddr) -> Vec<u8> {
        let resp = self.allocate_with(now, c, &[], relayed);
        assert_success(&resp, Method::Allocate);
        assert_eq!(relayed_of(&resp), relayed);
        resp
    }

    fn respond(&mut self, now: Instant, c: &mut Client, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        self.request(now, c, method, fresh_tid(), attrs).response()
    }

    fn refresh(&mut self, now: Instant, c: &mut Client, lifetime: Option<u32>) -> Vec<u8> {
        let attrs: Vec<Attribute<'_>> = lifetime.map(Attribute::Lifetime).into_iter().collect();
        self.respond(now, c, Method::Refresh, &attrs)
    }

    fn create_permission(&mut self, now: Instant, c: &mut Client, peers: &[SocketAddr]) -> Vec<u8> {
        let attrs: Vec<Attribute<'_>> = peers.iter().map(|&p| Attribute::XorPeerAddress(p)).collect();
        self.respond(now, c, Method::CreatePermission, &attrs)
    }

    fn channel_bind(&mut self, now: Instant, c: &mut Client, channel: u16, peer: SocketAddr) -> Vec<u8> {
        self.respond(
            now,
            c,
            Method::ChannelBind,
            &[Attribute::ChannelNumber(channel), Attribute::XorPeerAddress(peer)],
        )
    }

    /// The AllocationClosed events as (5-tuple, relayed address, reason); the other events
    /// are drained and dropped.
    fn events(&mut self) -> Vec<(FiveTuple, SocketAddr, CloseReason)> {
        self.all_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::AllocationClosed {
                    five_tuple,
                    relayed,
                    reason,
                    ..
                } => Some((five_tuple, relayed, reason)),
                _ => None,
            })
            .collect()
    }

    fn all_events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// 1. Binding
// ---------------------------------------------------------------------------------------

#[test]
fn binding_returns_xor_mapped_address_and_fingerprint() {
    let mut h = Harness::new();
    let now = h.t0;
    for client in ["203.0.113.10:40000", "[2001:db8::7]:1234"] {
        let ft = five_tuple(client);
        let tid = fresh_tid();
        let req = build(Method::Binding, Class::Request, tid, |b| {
            b.fingerprint();
        });
        let resp = h.send(now, ft, &req).response();
        assert_success(&resp, Method::Binding);
        let m = decode(&resp);
        assert_eq!(m.transaction_id(), tid);
        assert_eq!(
            get(&m, kind::XOR_MAPPED_ADDRESS),
            Attribute::XorMappedAddress(sa(client))
        );
        assert_eq!(integrity::verify_fingerprint(&m), Ok(()));
        assert!(!has(&resp, kind::SOFTWARE), "no SOFTWARE by default");
        assert_eq!(m.integrity_offset(), None);
    }
    // Without FINGERPRINT in the request, none in the response.
    let ft = five_tuple("203.0.113.10:40000");
    let resp = h
        .send(now, ft, &build(Method::Binding, Class::Request, fresh_tid(), |_| {}))
        .response();
    assert_success(&resp, Method::Binding);
    assert_eq!(decode(&resp).fingerprint_offset(), None);
    assert_eq!(
        integrity::verify_fingerprint(&decode(&resp)),
        Err(IntegrityError::Missing)
    );
}

#[test]
fn software_only_in_authenticated_responses() {
    let mut h = Harness::with_config(ServerConfig {
        software: Some("turnpike-test".into()),
        ..ServerConfig::default()
    });
    let resp = h
        .send(
            h.t0,
            five_tuple("203.0.113.10:40000"),
            &build(Method::Binding, Class::Request, fresh_tid(), |_| {}),
        )
        .response();
    assert_success(&resp, Method::Binding);
    // Unauthenticated answers stay within the request plus an XOR-MAPPED-ADDRESS.
    assert!(!has(&resp, kind::SOFTWARE));
    let mut c = Client::alice();
    let r = h.respond(h.t0, &mut c, Method::Refresh, &[]);
    assert_error(&r, Method::Refresh, 437);
    assert_eq!(get(&decode(&r), kind::SOFTWARE), Attribute::Software("turnpike-test"));
}

#[test]
fn binding_with_bad_fingerprint_is_dropped_and_binding_indication_ignored() {
    let mut h = Harness::new();
    let ft = five_tuple("203.0.113.10:40000");
    let mut req = build(Method::Binding, Class::Request, fresh_tid(), |b| {
        b.fingerprint();
    });
    let n = req.len();
    req[n - 1] ^= 1;
    assert!(matches!(
        h.send(h.t0, ft, &req),
        Outcome::Drop(DropReason::BadFingerprint)
    ));
    let ind = build(Method::Binding, Class::Indication, fresh_tid(), |_| {});
    assert!(matches!(h.send(h.t0, ft, &ind), Outcome::Nothing));
    assert!(matches!(
        h.send(h.t0, ft, b"\x00\x01junk"),
        Outcome::Drop(DropReason::Malformed)
    ));
}

// ---------------------------------------------------------------------------------------
// 2-3. Allocate with MD5 / SHA-256 credentials
// ---------------------------------------------------------------------------------------

#[test]
fn allocate_md5_flow() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();

    // Unauthenticated: 401 with REALM, NONCE and PASSWORD-ALGORITHMS, no integrity.
    let challenge = h.challenge(now, &mut c);
    let m = decode(&challenge);
    assert_eq!(get(&m, kind::REALM), Attribute::Realm(REALM));
    let nonce = nonce_of(&challenge);
    assert!(nonce.starts_with(NONCE_COOKIE), "{nonce}");
    assert!(nonce.starts_with("obMatJos2"));
    match get(&m, kind::PASSWORD_ALGORITHMS) {
        Attribute::PasswordAlgorithms(p) => {
            assert_eq!(p.iter().collect::<Vec<_>>(), vec![(1u16, &[][..]), (2u16, &[][..])]);
        }
        a => panic!("{a:?}"),
    }
    assert_eq!(m.integrity_offset(), None);
    assert_eq!(m.integrity_sha256_offset(), None);
    assert_eq!(integrity::verify_fingerprint(&m), Ok(()));

    // Authenticated: the shell is asked for a relayed address.
    let tid = fresh_tid();
    let req = h
        .request(now, &mut c, Method::Allocate, tid, &[Attribute::RequestedTransport(17)])
        .allocate();
    assert_eq!(req.five_tuple, c.ft);
    assert_eq!(req.family, AddressFamily::V4);
    assert!(!req.even_port);
    assert_eq!(
        h.server.allocation_count(),
        0,
        "nothing allocated before complete_allocate"
    );

    let (resp, released) = h.complete(now, &c, req, Ok(relay(1)));
    assert_eq!(released, None);
    assert_success(&resp, Method::Allocate);
    let m = decode(&resp);
    assert_eq!(m.transaction_id(), tid);
    assert_eq!(relayed_of(&resp), relay(1));
    assert_eq!(
        get(&m, kind::XOR_MAPPED_ADDRESS),
        Attribute::XorMappedAddress(c.ft.client)
    );
    assert_eq!(lifetime_of(&resp), 600);
    assert_eq!(integrity::verify_message_integrity(&m, c.key().as_bytes()), Ok(()));
    let wrong = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", REALM, "nope");
    assert_eq!(
        integrity::verify_message_integrity(&m, wrong.as_bytes()),
        Err(IntegrityError::Mismatch)
    );

    assert_eq!(h.server.allocation_count(), 1);
    let a = h.server.allocation(&c.ft).expect("allocation");
    assert_eq!(a.relayed, relay(1));
    assert_eq!(&*a.username, "alice");
    assert_eq!(a.expires, h.at(600));
    assert_eq!(h.server.five_tuple_for_relay(&relay(1)), Some(c.ft));
}

#[test]
fn allocate_sha256_flow() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice().sha256();
    let resp = h.allocate_ok(now, &mut c, relay(1));
    let m = decode(&resp);
    assert!(m.integrity_sha256_offset().is_some());
    assert_eq!(
        m.integrity_offset(),
        None,
        "MESSAGE-INTEGRITY-SHA256, not MESSAGE-INTEGRITY"
    );
    let key = LongTermKey::derive(PasswordAlgorithm::Sha256, "alice", REALM, "alice-pw");
    assert_eq!(key.as_bytes().len(), 32);
    assert_eq!(integrity::verify_message_integrity_sha256(&m, key.as_bytes()), Ok(()));
    let md5 = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", REALM, "alice-pw");
    assert_eq!(
        integrity::verify_message_integrity_sha256(&m, md5.as_bytes()),
        Err(IntegrityError::Mismatch)
    );
    assert_eq!(lifetime_of(&resp), 600);

    // Later requests on the allocation are answered with SHA-256 integrity too.
    let resp = h.create_permission(now, &mut c, &[sa(P1)]);
    assert_success(&resp, Method::CreatePermission);
    assert!(decode(&resp).integrity_sha256_offset().is_some());
}

#[test]
fn sha256_password_algorithm_negotiation_errors() {
    let mut h = Harness::new();
    let now = h.t0;
    let base = {
        let mut c = Client::alice().sha256();
        h.challenge(now, &mut c);
        c
    };
    let transport = [Attribute::RequestedTransport(17)];

    // PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS.
    let mut c = base.clone();
    c.password_algorithms = None;
    let r = h
        .send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport))
        .response();
    assert_error(&r, Method::Allocate, 400);

    // PASSWORD-ALGORITHMS without PASSWORD-ALGORITHM.
    let mut c = base.clone();
    c.password_algorithm = None;
    let r = h
        .send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport))
        .response();
    assert_error(&r, Method::Allocate, 400);

    // PASSWORD-ALGORITHMS that differs from the offer (downgrade protection).
    for list in [vec![2, 1], vec![2], vec![1], vec![1, 2, 3]] {
        let mut c = base.clone();
        c.password_algorithms = Some(list.clone());
        let r = h
            .send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport))
            .response();
        assert_error(&r, Method::Allocate, 400);
    }

    // An algorithm that was not offered.
    let mut c = base.clone();
    c.password_algorithm = Some(3);
    let r = h
        .send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport))
        .response();
    assert_error(&r, Method::Allocate, 400);

    // PASSWORD-ALGORITHM=1 (MD5) with the list: MD5 key, fine.
    let mut c = base.clone();
    c.key_alg = PasswordAlgorithm::Md5;
    c.mi_sha256 = false;
    c.password_algorithm = Some(1);
    let out = h.send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport));
    assert!(matches!(out, Outcome::Allocate(_)), "{out:?}");

    // The correct SHA-256 request still works.
    let out = h.send(
        now,
        base.ft,
        &base.authenticated(Method::Allocate, fresh_tid(), &transport),
    );
    assert!(matches!(out, Outcome::Allocate(_)), "{out:?}");
    assert_eq!(h.server.allocation_count(), 0);
}

// ---------------------------------------------------------------------------------------
// 4. Authentication failures
// ---------------------------------------------------------------------------------------

#[track_caller]
fn assert_challenge(resp: &[u8], method: Method, code: u16) {
    assert_error(resp, method, code);
    let m = decode(resp);
    assert_eq!(get(&m, kind::REALM), Attribute::Realm(REALM));
    assert!(nonce_of(resp).starts_with(NONCE_COOKIE));
    assert!(m.get(kind::PASSWORD_ALGORITHMS).is_some());
    assert_eq!(m.integrity_offset(), None, "a challenge carries no integrity");
    assert_eq!(m.integrity_sha256_offset(), None);
}

#[test]
fn wrong_password_and_unknown_user_get_401() {
    let mut h = Harness::new();
    let now = h.t0;
    let transport = [Attribute::RequestedTransport(17)];
    let mut wrong = Client::new("203.0.113.10:40000", "alice", "not-alice-pw");
    h.challenge(now, &mut wrong);
    let r = h
        .send(
            now,
            wrong.ft,
            &wrong.authenticated(Method::Allocate, fresh_tid(), &transport),
        )
        .response();
    assert_challenge(&r, Method::Allocate, 401);

    let mut wrong256 = Client::new("203.0.113.10:40000", "alice", "not-alice-pw").sha256();
    wrong256.nonce = wrong.nonce.clone();
    let r = h
        .send(
            now,
            wrong256.ft,
            &wrong256.authenticated(Method::Allocate, fresh_tid(), &transport),
        )
        .response();
    assert_challenge(&r, Method::Allocate, 401);

    let mut unknown = Client::new("203.0.113.10:40000", "mallory", "alice-pw");
    unknown.nonce = wrong.nonce.clone();
    let r = h
        .send(
            now,
            unknown.ft,
            &unknown.authenticated(Method::Allocate, fresh_tid(), &transport),
        )
        .response();
    assert_challenge(&r, Method::Allocate, 401);

    // A tampered request (integrity computed, then a byte changed) is refused as well.
    let mut good = Client::alice();
    good.nonce = wrong.nonce.clone();
    good.fingerprint = false;
    let mut req = good.authenticated(
        Method::Allocate,
        fresh_tid(),
        &[Attribute::Lifetime(600), Attribute::RequestedTransport(17)],
    );
    let lifetime_off = decode(&req).raw(kind::LIFETIME).unwrap().offset;
    req[lifetime_off + 7] ^= 1;
    let r = h.send(now, good.ft, &req).response();
    assert_challenge(&r, Method::Allocate, 401);
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn missing_username_realm_or_nonce_with_integrity_is_400() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut base = Client::alice();
    h.challenge(now, &mut base);
    let transport = [Attribute::RequestedTransport(17)];
    for which in 0..3 {
        let mut c = base.clone();
        match which {
            0 => c.send_nonce = false,
            1 => c.send_realm = false,
            _ => c.send_username = false,
        }
        let r = h
            .send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport))
            .response();
        assert_error(&r, Method::Allocate, 400);
        assert_eq!(decode(&r).integrity_offset(), None);
    }
}

#[test]
fn wrong_realm_is_401() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.challenge(now, &mut c);
    c.realm = "other-realm".into(); // the key is derived with it, consistently
    let r = h
        .send(
            now,
            c.ft,
            &c.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
        )
        .response();
    assert_challenge(&r, Method::Allocate, 401);
}

#[test]
fn nonce_from_another_server_secret_is_438_with_fresh_nonce() {
    let mut other = Harness::build(
        ServerConfig::default(),
        default_credentials(),
        PeerPolicy::default(),
        [9; 32],
    );
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    other.challenge(now, &mut c);
    let foreign = c.nonce.clone().unwrap();

    let transport = [Attribute::RequestedTransport(17)];
    let r = h
        .send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport))
        .response();
    assert_challenge(&r, Method::Allocate, 438);
    let fresh = nonce_of(&r);
    assert_ne!(fresh, foreign);

    c.nonce = Some(fresh);
    let out = h.send(now, c.ft, &c.authenticated(Method::Allocate, fresh_tid(), &transport));
    assert!(matches!(out, Outcome::Allocate(_)), "{out:?}");
}

#[test]
fn nonce_is_bound_to_the_client_ip() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.challenge(now, &mut c);
    let mut moved = c.clone();
    moved.ft = five_tuple("203.0.113.99:40000");
    let r = h
        .send(
            now,
            moved.ft,
            &moved.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
        )
        .response();
    assert_challenge(&r, Method::Allocate, 438);
    // Defect 2 of the review: another port on the same IP could reuse it, so an
    // authenticated request captured on one port was accepted byte for byte from another
    // (with a user quota of 1 that locked the victim out with 486). RFC 8489 §9.2.4: "The
    // server MUST NOT choose the same NONCE for two requests unless they have the same
    // source IP address and port."
    let mut port = c.clone();
    port.ft = five_tuple("203.0.113.10:40001");
    let captured = c.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]);
    let r = h.send(now, port.ft, &captured).response();
    assert_challenge(&r, Method::Allocate, 438);
    assert_ne!(nonce_of(&r), c.nonce.clone().unwrap(), "each port gets its own nonce");
    assert!(matches!(h.send(now, c.ft, &captured), Outcome::Allocate(_)));
}

#[test]
fn expired_nonce_is_438() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.challenge(h.t0, &mut c);
    let old = c.nonce.clone().unwrap();

    // Still valid one second before nonce_lifetime: authenticated (437, as there is no allocation).
    let r = h
        .send(h.at(599), c.ft, &c.authenticated(Method::Refresh, fresh_tid(), &[]))
        .response();
    assert_error(&r, Method::Refresh, 437);
    c.verify(&r);

    // Expired at nonce_lifetime (600 s).
    let r = h
        .send(h.at(600), c.ft, &c.authenticated(Method::Refresh, fresh_tid(), &[]))
        .response();
    assert_challenge(&r, Method::Refresh, 438);
    let fresh = nonce_of(&r);
    assert_ne!(fresh, old);
    c.nonce = Some(fresh);
    let r = h
        .send(h.at(600), c.ft, &c.authenticated(Method::Refresh, fresh_tid(), &[]))
        .response();
    assert_error(&r, Method::Refresh, 437);

    // And an expired nonce also fails on a live allocation's requests.
    let r = h.allocate_with(h.at(600), &mut c, &[Attribute::Lifetime(3600)], relay(1));
    assert_success(&r, Method::Allocate);
    let r = h
        .send(h.at(1199), c.ft, &c.authenticated(Method::Refresh, fresh_tid(), &[]))
        .response();
    assert_success(&r, Method::Refresh);
    let r = h
        .send(h.at(1200), c.ft, &c.authenticated(Method::Refresh, fresh_tid(), &[]))
        .response();
    assert_challenge(&r, Method::Refresh, 438);
    assert_eq!(h.server.allocation_count(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. TURN REST API credentials
// ---------------------------------------------------------------------------------------

fn rest_harness() -> Harness {
    let creds = Credentials::new(vec![], vec!["secret-a".into(), "secret-b".into()], REALM);
    Harness::build(ServerConfig::default(), creds, PeerPolicy::default(), SECRET)
}

#[test]
fn rest_api_credentials_with_secret_rotation() {
    let mut h = rest_harness();
    let now = h.t0;
    let username = format!("{}:bob", UNIX_NOW + 3600);
    for (i, secret) in ["secret-a", "secret-b"].into_iter().enumerate() {
        let client = format!("203.0.113.{}:40000", 30 + i);
        let mut c = Client::new(&client, &username, &auth::rest_api_password(secret, &username));
        h.allocate_ok(now, &mut c, relay(i as u16));
        assert_eq!(*h.server.allocation(&c.ft).unwrap().username, *username);

        let mut c256 = Client::new(
            &client.replace(":40000", ":40001"),
            &username,
            &auth::rest_api_password(secret, &username),
        )
        .sha256();
        h.allocate_ok(now, &mut c256, relay(10 + i as u16));
    }
    assert_eq!(h.server.allocation_count(), 4);

    // A password from an unknown secret does not work.
    let mut c = Client::new(
        "203.0.113.40:40000",
        &username,
        &auth::rest_api_password("secret-c", &username),
    );
    let out = h.request(
        now,
        &mut c,
        Method::Allocate,
        fresh_tid(),
        &[Attribute::RequestedTransport(17)],
    );
    assert_challenge(&out.response(), Method::Allocate, 401);
}

#[test]
fn rest_api_expired_username_is_401() {
    let mut h = rest_harness();
    let transport = [Attribute::RequestedTransport(17)];

    let expired = format!("{}:bob", UNIX_NOW - 1);
    let mut c = Client::new(
        "203.0.113.30:40000",
        &expired,
        &auth::rest_api_password("secret-a", &expired),
    );
    let r = h
        .request(h.t0, &mut c, Method::Allocate, fresh_tid(), &transport)
        .response();
    assert_challenge(&r, Method::Allocate, 401);

    // Valid now, expired 100 s later on the server's (virtual) wall clock.
    let soon = format!("{}:bob", UNIX_NOW + 100);
    let mut c = Client::new("203.0.113.31:40000", &soon, &auth::rest_api_password("secret-b", &soon));
    h.challenge(h.t0, &mut c);
    let out = h.send(
        h.at(99),
        c.ft,
        &c.authenticated(Method::Allocate, fresh_tid(), &transport),
    );
    assert!(matches!(out, Outcome::Allocate(_)), "{out:?}");
    let r = h
        .send(
            h.at(100),
            c.ft,
            &c.authenticated(Method::Allocate, fresh_tid(), &transport),
        )
        .response();
    assert_challenge(&r, Method::Allocate, 401);
}

// ---------------------------------------------------------------------------------------
// 6. Allocation mismatch and retransmissions
// ---------------------------------------------------------------------------------------

#[test]
fn second_allocate_is_437_and_retransmission_gets_same_answer() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.challenge(now, &mut c);
    let tid = fresh_tid();
    let original = c.authenticated(Method::Allocate, tid, &[Attribute::RequestedTransport(17)]);
    let req = h.send(now, c.ft, &original).allocate();
    let (first, _) = h.complete(now, &c, req, Ok(relay(1)));
    assert_success(&first, Method::Allocate);

    // A new transaction on the same 5-tuple: 437, integrity-protected.
    let r = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17)],
        )
        .response();
    assert_error(&r, Method::Allocate, 437);
    c.verify(&r);

    // The same bytes again (a retransmission), a little later: success, same relayed address.
    let r = h.send(h.at(10), c.ft, &original).response();
    assert_success(&r, Method::Allocate);
    c.verify(&r);
    assert_eq!(decode(&r).transaction_id(), tid);
    assert_eq!(relayed_of(&r), relay(1));
    assert_eq!(lifetime_of(&r), 590, "the remaining lifetime");
    assert_eq!(h.server.allocation_count(), 1);

    // Another user replaying alice's transaction ID on that 5-tuple gets 437 as well.
    let mut bob = Client::bob();
    bob.ft = c.ft;
    bob.nonce = c.nonce.clone();
    let r = h
        .send(
            now,
            bob.ft,
            &bob.authenticated(Method::Allocate, tid, &[Attribute::RequestedTransport(17)]),
        )
        .response();
    assert_error(&r, Method::Allocate, 437);
    bob.verify(&r);
}

#[test]
fn retransmission_racing_complete_allocate_releases_the_second_address() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.challenge(now, &mut c);
    let tid = fresh_tid();
    let original = c.authenticated(Method::Allocate, tid, &[Attribute::RequestedTransport(17)]);
    let first = h.send(now, c.ft, &original).allocate();
    assert!(matches!(
        h.send(now, c.ft, &original),
        Outcome::Drop(DropReason::AllocatePending)
    ));
    // After 5 s the retransmission is taken as a lost ticket and sent again.
    let second = h.send(now + Duration::from_secs(5), c.ft, &original).allocate();
    let (r1, rel1) = h.complete(now, &c, first, Ok(relay(1)));
    assert_eq!(rel1, None);
    assert_success(&r1, Method::Allocate);
    let (r2, rel2) = h.complete(now, &c, second, Ok(relay(2)));
    assert_eq!(rel2, Some(relay(2)), "the shell must release the second address");
    assert_success(&r2, Method::Allocate);
    assert_eq!(relayed_of(&r2), relay(1));
    assert_eq!(h.server.five_tuple_for_relay(&relay(2)), None);
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn two_pending_allocates_on_one_five_tuple() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let transport = [Attribute::RequestedTransport(17)];
    let first = h
        .request(now, &mut c, Method::Allocate, fresh_tid(), &transport)
        .allocate();
    let second = h
        .request(now, &mut c, Method::Allocate, fresh_tid(), &transport)
        .allocate();
    let (r1, rel1) = h.complete(now, &c, first, Ok(relay(1)));
    assert_success(&r1, Method::Allocate);
    assert_eq!(rel1, None);
    let (r2, rel2) = h.complete(now, &c, second, Ok(relay(2)));
    assert_error(&r2, Method::Allocate, 437);
    assert_eq!(rel2, Some(relay(2)));
    assert_eq!(h.server.allocation(&c.ft).unwrap().relayed, relay(1));
}

#[test]
fn even_port_reservation_is_handed_to_the_shell() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let mut req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17), Attribute::EvenPort(true)],
        )
        .allocate();
    assert!(req.even_port && req.reserve_next);
    assert_eq!(req.reservation_token, None);
    req.grant_reservation([5; 8]);
    let (r, _) = h.complete(now, &c, req, Ok(relay(2)));
    assert_success(&r, Method::Allocate);
    assert_eq!(
        get(&decode(&r), kind::RESERVATION_TOKEN),
        Attribute::ReservationToken([5; 8])
    );

    let mut d = Client::bob();
    let req = h
        .request(
            now,
            &mut d,
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17), Attribute::EvenPort(false)],
        )
        .allocate();
    assert!(req.even_port && !req.reserve_next);
    let (r, _) = h.complete(now, &d, req, Ok(relay(4)));
    assert_success(&r, Method::Allocate);
    assert!(!has(&r, kind::RESERVATION_TOKEN));
}

// ---------------------------------------------------------------------------------------
// 7. Allocate request validation
// ---------------------------------------------------------------------------------------

#[test]
fn rfc8656_7_2_unauthenticated_allocate_is_401_and_ipv4_is_the_default_family() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    // "the server MUST require that the request be authenticated"
    let r = h.challenge(now, &mut c);
    assert_error(&r, Method::Allocate, 401);
    assert_eq!(h.server.allocation_count(), 0);
    // Without REQUESTED-ADDRESS-FAMILY "the server MUST allocate an IPv4 relayed transport address".
    let req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17)],
        )
        .allocate();
    assert_eq!(req.family, AddressFamily::V4);
}

#[test]
fn rfc8656_7_2_allocate_request_validation() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let alloc_err = |h: &mut Harness, c: &mut Client, attrs: &[Attribute<'_>], code: u16| {
        let r = h.respond(now, c, Method::Allocate, attrs);
        assert_error(&r, Method::Allocate, code);
        r
    };
    alloc_err(&mut h, &mut c, &[Attribute::RequestedTransport(132)], 442);
    // TCP (RFC 6062 §5.1) needs a TCP or TLS client connection: 400 over UDP.
    alloc_err(&mut h, &mut c, &[Attribute::RequestedTransport(6)], 400);
    alloc_err(&mut h, &mut c, &[], 400);
    alloc_err(
        &mut h,
        &mut c,
        &[Attribute::Unknown {
            kind: kind::REQUESTED_TRANSPORT,
            value: &[17, 0],
        }],
        400,
    );
    let r = alloc_err(
        &mut h,
        &mut c,
        &[Attribute::RequestedTransport(17), Attribute::DontFragment],
        420,
    );
    assert_eq!(unknown_attributes_of(&r), vec![0x001A]);
    let r = alloc_err(
        &mut h,
        &mut c,
        &[
            Attribute::RequestedTransport(17),
            Attribute::Unknown {
                kind: 0x7FF0,
                value: b"abcd",
            },
        ],
        420,
    );
    assert_eq!(unknown_attributes_of(&r), vec![0x7FF0]);
    // RESERVATION-TOKEN: no reservation exists for this token, so 508, whether the server
    // refuses it itself or hands the token to the shell, which reports it unknown.
    match h.request(
        now,
        &mut c,
        Method::Allocate,
        fresh_tid(),
        &[Attribute::RequestedTransport(17), Attribute::ReservationToken([1; 8])],
    ) {
        Outcome::Respond(r) => assert_error(&r, Method::Allocate, 508),
        Outcome::Allocate(req) => {
            assert_eq!(req.reservation_token, Some([1; 8]));
            let (r, released) = h.complete(now, &c, req, Err(RelayError::BadReservationToken));
            assert_error(&r, Method::Allocate, 508);
            assert_eq!(released, None);
        }
        other => panic!("{other:?}"),
    }
    alloc_err(
        &mut h,
        &mut c,
        &[
            Attribute::RequestedTransport(17),
            Attribute::EvenPort(false),
            Attribute::ReservationToken([1; 8]),
        ],
        400,
    );
    alloc_err(
        &mut h,
        &mut c,
        &[
            Attribute::RequestedTransport(17),
            Attribute::RequestedAddressFamily(AddressFamily::V4),
            Attribute::AdditionalAddressFamily(AddressFamily::V6),
        ],
        400,
    );
    alloc_err(
        &mut h,
        &mut c,
        &[
            Attribute::RequestedTransport(17),
            Attribute::AdditionalAddressFamily(AddressFamily::V4),
        ],
        400,
    );
    assert_eq!(h.server.allocation_count(), 0);

    // Unknown comprehension-optional attributes are ignored; EVEN-PORT and
    // REQUESTED-ADDRESS-FAMILY reach the shell.
    let req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[
                Attribute::RequestedTransport(17),
                Attribute::Unknown {
                    kind: 0xC001,
                    value: b"x",
                },
                Attribute::EvenPort(true),
                Attribute::RequestedAddressFamily(AddressFamily::V6),
            ],
        )
        .allocate();
    assert!(req.even_port);
    assert_eq!(req.family, AddressFamily::V6);
}

#[test]
fn unknown_comprehension_required_attribute_in_binding_is_420() {
    let mut h = Harness::new();
    let tid = fresh_tid();
    let req = build(Method::Binding, Class::Request, tid, |b| {
        b.attribute(&Attribute::Unknown {
            kind: 0x7FF0,
            value: &[1, 2, 3],
        });
        b.attribute(&Attribute::Unknown {
            kind: 0x0FFF,
            value: &[],
        });
        b.attribute(&Attribute::Unknown {
            kind: 0xC0DE,
            value: &[],
        });
        b.fingerprint();
    });
    let r = h.send(h.t0, five_tuple("203.0.113.10:40000"), &req).response();
    assert_error(&r, Method::Binding, 420);
    assert_eq!(decode(&r).transaction_id(), tid);
    assert_eq!(unknown_attributes_of(&r), vec![0x7FF0, 0x0FFF]);
    assert_eq!(integrity::verify_fingerprint(&decode(&r)), Ok(()));
}

#[test]
fn rfc8656_7_2_relay_refusals_are_440_and_508() {
    let mut h = Harness::new();
    let now = h.t0;
    for (err, code) in [(RelayError::FamilyNotSupported, 440), (RelayError::Exhausted, 508)] {
        let mut c = Client::alice();
        let req = h
            .request(
                now,
                &mut c,
                Method::Allocate,
                fresh_tid(),
                &[Attribute::RequestedTransport(17)],
            )
            .allocate();
        let (r, released) = h.complete(now, &c, req, Err(err));
        assert_eq!(released, None);
        assert_error(&r, Method::Allocate, code);
        assert_eq!(h.server.allocation_count(), 0);
    }
    // SHA-256 error responses are protected with MESSAGE-INTEGRITY-SHA256.
    let mut c = Client::alice().sha256();
    let req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17)],
        )
        .allocate();
    let (r, _) = h.complete(now, &c, req, Err(RelayError::Exhausted));
    assert_error(&r, Method::Allocate, 508);
}

// ---------------------------------------------------------------------------------------
// 8. Quotas live in the relay allocator (src/control/allocator.rs); here only how the
//    server answers its refusals and races between tickets of one transaction.
// ---------------------------------------------------------------------------------------

#[test]
fn relay_refusals_are_486_and_508() {
    let mut h = Harness::new();
    let now = h.t0;
    for (err, code) in [
        (RelayError::UserQuota, 486),
        (RelayError::TotalQuota, 508),
        (RelayError::Exhausted, 508),
        (RelayError::BadReservationToken, 508),
        (RelayError::FamilyNotSupported, 440),
    ] {
        let mut c = Client::alice();
        let req = h
            .request(
                now,
                &mut c,
                Method::Allocate,
                fresh_tid(),
                &[Attribute::RequestedTransport(17)],
            )
            .allocate();
        let (r, released) = h.complete(now, &c, req, Err(err));
        assert_error(&r, Method::Allocate, code);
        assert_eq!(released, None);
    }
    assert_eq!(h.server.allocation_count(), 0);
}

/// Defect 4 of the review: one Allocate transaction was answered both success and 486 when
/// a retransmission raced the first ticket through the control thread under a quota.
/// RFC 8656 §7.2: a retransmission gets the first answer, whatever the quota says.
#[test]
fn regression_allocate_retransmission_race_gets_one_answer() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let tid = fresh_tid();
    let first = h
        .request(now, &mut c, Method::Allocate, tid, &[Attribute::RequestedTransport(17)])
        .allocate();
    // The retransmission while the ticket is out sends no second ticket.
    let again = h.request(now, &mut c, Method::Allocate, tid, &[Attribute::RequestedTransport(17)]);
    assert!(matches!(again, Outcome::Drop(DropReason::AllocatePending)), "{again:?}");
    assert_eq!(h.server.table_sizes().pending, 1);
    let (ok, _) = h.complete(now, &c, first, Ok(relay(1)));
    assert_success(&ok, Method::Allocate);
    assert_eq!(h.server.table_sizes().pending, 0);
    // A second ticket of the same transaction (sent after the first was presumed lost)
    // that the allocator refused for quota still gets the first answer.
    let late = now + Duration::from_secs(6);
    let mut c2 = c.clone();
    let second = {
        let mut h2 = Harness::new();
        h2.request(
            late,
            &mut c2,
            Method::Allocate,
            tid,
            &[Attribute::RequestedTransport(17)],
        )
        .allocate()
    };
    let (r, released) = h.complete(late, &c, second, Err(RelayError::UserQuota));
    assert_success(&r, Method::Allocate);
    assert_eq!(relayed_of(&r), relay(1));
    assert_eq!(released, None);
    assert_eq!(h.server.allocation_count(), 1);
}

/// A ticket lost on the way (full control queue) does not block the transaction forever:
/// after 5 s a retransmission sends a new one.
#[test]
fn lost_allocate_ticket_is_resent_after_timeout() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let tid = fresh_tid();
    let _lost = h
        .request(now, &mut c, Method::Allocate, tid, &[Attribute::RequestedTransport(17)])
        .allocate();
    let r = h.request(
        now + Duration::from_secs(4),
        &mut c,
        Method::Allocate,
        tid,
        &[Attribute::RequestedTransport(17)],
    );
    assert!(matches!(r, Outcome::Drop(DropReason::AllocatePending)));
    let later = now + Duration::from_secs(5);
    let req = h
        .request(
            later,
            &mut c,
            Method::Allocate,
            tid,
            &[Attribute::RequestedTransport(17)],
        )
        .allocate();
    let (ok, _) = h.complete(later, &c, req, Ok(relay(1)));
    assert_success(&ok, Method::Allocate);
}

// ---------------------------------------------------------------------------------------
// 9. Lifetimes and Refresh
// ---------------------------------------------------------------------------------------

#[test]
fn allocate_lifetime_is_clamped() {
    let mut h = Harness::new();
    let now = h.t0;
    for (i, (asked, granted)) in [
        (Some(5000), 3600),
        (Some(60), 600),
        (Some(1800), 1800),
        (Some(0), 600),
        (None, 600),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Client::new(&format!("203.0.113.10:{}", 41_000 + i), "alice", "alice-pw");
        let attrs: Vec<Attribute<'_>> = asked.map(Attribute::Lifetime).into_iter().collect();
        let r = h.allocate_with(now, &mut c, &attrs, relay(i as u16));
        assert_success(&r, Method::Allocate);
        assert_eq!(lifetime_of(&r), granted, "asked {asked:?}");
        assert_eq!(
            h.server.allocation(&c.ft).unwrap().expires,
            now + Duration::from_secs(granted as u64)
        );
    }
}

#[test]
fn rfc8656_8_2_refresh_lifetimes_delete_and_family_mismatch_443() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));

    let r = h.refresh(h.at(10), &mut c, Some(5000));
    assert_success(&r, Method::Refresh);
    assert_eq!(lifetime_of(&r), 3600);
    assert_eq!(h.server.allocation(&c.ft).unwrap().expires, h.at(3610));

    let r = h.refresh(h.at(20), &mut c, Some(60));
    assert_eq!(lifetime_of(&r), 600);
    assert_eq!(h.server.allocation(&c.ft).unwrap().expires, h.at(620));

    let r = h.refresh(h.at(30), &mut c, None);
    assert_eq!(lifetime_of(&r), 600);

    // A REQUESTED-ADDRESS-FAMILY that does not match: 443.
    let r = h.respond(
        h.at(30),
        &mut c,
        Method::Refresh,
        &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
    );
    assert_error(&r, Method::Refresh, 443);

    assert!(h.events().is_empty());
    let r = h.refresh(h.at(40), &mut c, Some(0));
    assert_success(&r, Method::Refresh);
    assert_eq!(lifetime_of(&r), 0);
    assert_eq!(h.events(), vec![(c.ft, relay(1), CloseReason::Deleted)]);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.five_tuple_for_relay(&relay(1)), None);

    let r = h.refresh(h.at(41), &mut c, Some(0));
    assert_error(&r, Method::Refresh, 437);
    let r = h.refresh(h.at(41), &mut c, Some(600));
    assert_error(&r, Method::Refresh, 437);
    assert!(h.events().is_empty(), "closed exactly once");
    // The old timer fires harmlessly.
    h.server.handle_timeout(h.at(10_000));
    assert!(h.events().is_empty());
}

#[test]
fn refresh_with_another_users_credentials_is_441() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut a = Client::alice();
    h.allocate_ok(now, &mut a, relay(1));
    let mut b = Client::bob();
    b.ft = a.ft;
    for method in [Method::Refresh, Method::CreatePermission, Method::ChannelBind] {
        let attrs: Vec<Attribute<'_>> = match method {
            Method::Refresh => vec![Attribute::Lifetime(0)],
            Method::CreatePermission => vec![Attribute::XorPeerAddress(sa(P1))],
            _ => vec![Attribute::ChannelNumber(0x4000), Attribute::XorPeerAddress(sa(P1))],
        };
        let r = h.respond(now, &mut b, method, &attrs);
        assert_error(&r, method, 441);
        b.verify(&r);
    }
    assert_eq!(
        h.server.allocation_count(),
        1,
        "bob could not delete alice's allocation"
    );
    assert!(h.server.allocation(&a.ft).unwrap().permission_count() == 0);
}

#[test]
fn requests_without_allocation_are_437() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    assert_error(&h.refresh(now, &mut c, None), Method::Refresh, 437);
    assert_error(
        &h.create_permission(now, &mut c, &[sa(P1)]),
        Method::CreatePermission,
        437,
    );
    assert_error(&h.channel_bind(now, &mut c, 0x4000, sa(P1)), Method::ChannelBind, 437);
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa(P1), b"x")),
        Outcome::Drop(DropReason::NoAllocation)
    ));
    assert!(matches!(
        h.send(now, c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoAllocation)
    ));
    assert_eq!(
        h.server.handle_peer(now, relay(1), sa(P1), 0),
        PeerAction::Drop(DropReason::NoAllocation)
    );
}

// ---------------------------------------------------------------------------------------
// 10. Expiry under virtual time
// ---------------------------------------------------------------------------------------

#[test]
fn allocation_expires_exactly_at_its_lifetime() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    assert_eq!(h.server.poll_timeout(), None);
    h.allocate_ok(h.t0, &mut c, relay(1));
    let deadline = h.server.poll_timeout().expect("a timer");
    assert!(deadline <= h.at(600), "{:?}", deadline - h.t0);

    h.server.handle_timeout(h.at(599));
    assert_eq!(h.server.allocation_count(), 1);
    assert!(h.events().is_empty());

    h.server.handle_timeout(h.at(600));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.events(), vec![(c.ft, relay(1), CloseReason::Expired)]);
    h.server.handle_timeout(h.at(601));
    h.server.handle_timeout(h.at(100_000));
    assert!(h.events().is_empty(), "AllocationClosed exactly once");
    assert_eq!(h.server.five_tuple_for_relay(&relay(1)), None);
    assert_eq!(
        h.server.handle_peer(h.at(601), relay(1), sa(P1), 0),
        PeerAction::Drop(DropReason::NoAllocation)
    );
}

#[test]
fn refresh_moves_expiry() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    let r = h.refresh(h.at(500), &mut c, Some(600));
    assert_success(&r, Method::Refresh);
    assert_eq!(lifetime_of(&r), 600);
    assert_eq!(h.server.allocation(&c.ft).unwrap().expires, h.at(1100));

    // Drive timers the way the shell does: always up to poll_timeout.
    h.server.handle_timeout(h.at(600));
    assert_eq!(h.server.allocation_count(), 1, "not removed at the old expiry");
    assert!(h.events().is_empty());
    let next = h.server.poll_timeout().expect("a timer");
    assert!(next > h.at(600) && next <= h.at(1100), "{:?}", next - h.t0);
    h.server.handle_timeout(h.at(1099));
    assert_eq!(h.server.allocation_count(), 1);
    h.server.handle_timeout(h.at(1100));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.events(), vec![(c.ft, relay(1), CloseReason::Expired)]);
}

#[test]
fn shortening_refresh_is_honoured_by_the_timer() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let r = h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(3600)], relay(1));
    assert_eq!(lifetime_of(&r), 3600);
    h.refresh(h.at(10), &mut c, Some(600));
    assert!(h.server.poll_timeout().unwrap() <= h.at(610));
    h.server.handle_timeout(h.at(609));
    assert_eq!(h.server.allocation_count(), 1);
    h.server.handle_timeout(h.at(610));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.events().len(), 1);
}

#[test]
fn many_allocations_expire_in_order() {
    let mut h = Harness::new();
    for i in 0..20u16 {
        let mut c = Client::new(&format!("203.0.113.10:{}", 42_000 + i), "alice", "alice-pw");
        h.allocate_with(h.at(i as u64), &mut c, &[], relay(i));
    }
    assert_eq!(h.server.allocation_count(), 20);
    for i in 0..20u64 {
        h.server.handle_timeout(h.at(600 + i));
        assert_eq!(h.server.allocation_count(), 19 - i as usize);
        let ev = h.events();
        assert_eq!(ev.len(), 1);
        assert!(matches!(ev[0], (_, relayed, CloseReason::Expired) if relayed == relay(i as u16)));
    }
    assert!(h.server.poll_timeout().is_none_or(|t| t <= h.at(620)));
}

/// An allocation past its expiry is gone for every request, even before the shell has
/// called `handle_timeout` (the datagram may be handled first in the same loop turn).
#[test]
fn expired_allocation_is_gone_before_handle_timeout() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    h.create_permission(h.t0, &mut c, &[sa(P1)]);
    // No handle_timeout: at t0+600 the allocation has expired.
    assert!(matches!(
        h.send(h.at(600), c.ft, &send_indication(sa(P1), b"x")),
        Outcome::Drop(DropReason::NoAllocation)
    ));
    let r = h.refresh(h.at(600), &mut c, Some(600));
    assert_error(&r, Method::Refresh, 437);
    assert_eq!(h.events(), vec![(c.ft, relay(1), CloseReason::Expired)]);
    // A fresh Allocate on the same 5-tuple succeeds.
    h.allocate_ok(h.at(600), &mut c, relay(2));
    h.server.handle_timeout(h.at(600));
    assert!(h.events().is_empty());
    assert_eq!(h.server.allocation_count(), 1);
}

// ---------------------------------------------------------------------------------------
// 11. Permissions, Send and Data indications
// ---------------------------------------------------------------------------------------

#[test]
fn rfc8656_11_2_and_11_3_send_and_data_indications() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let (p1, p2, p3) = (sa(P1), sa(P2), sa(P3));

    assert_success(&h.create_permission(now, &mut c, &[p1, p2]), Method::CreatePermission);
    for (peer, payload) in [(p1, &b"hello p1"[..]), (p2, &b""[..]), (p2, &[0u8; 1200][..])] {
        match h.send(now, c.ft, &send_indication(peer, payload)) {
            Outcome::Relay {
                relayed,
                peer: to,
                payload: got,
            } => {
                assert_eq!((relayed, to), (relay(1), peer));
                assert_eq!(got, payload);
            }
            other => panic!("{other:?}"),
        }
    }
    // Permissions are per IP: another port of a permitted IP is fine.
    let other_port = SocketAddr::new(p1.ip(), 9999);
    assert!(matches!(
        h.send(now, c.ft, &send_indication(other_port, b"x")),
        Outcome::Relay { .. }
    ));

    // No permission for p3.
    assert!(matches!(
        h.send(now, c.ft, &send_indication(p3, b"x")),
        Outcome::Drop(DropReason::NoPermission)
    ));
    // A denied peer and a family mismatch.
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa("127.0.0.1:4000"), b"x")),
        Outcome::Drop(DropReason::PeerDenied)
    ));
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa("[2606:4700::1111]:4000"), b"x")),
        Outcome::Drop(DropReason::FamilyMismatch)
    ));
    // Send without DATA is malformed; from another 5-tuple there is no allocation.
    let no_data = build(Method::Send, Class::Indication, fresh_tid(), |b| {
        b.attribute(&Attribute::XorPeerAddress(p1));
    });
    assert!(matches!(
        h.send(now, c.ft, &no_data),
        Outcome::Drop(DropReason::Malformed)
    ));
    assert!(matches!(
        h.send(now, five_tuple("203.0.113.10:1"), &send_indication(p1, b"x")),
        Outcome::Drop(DropReason::NoAllocation)
    ));

    // Peer to client: permitted, no channel -> Data indication.
    assert_eq!(
        h.server.handle_peer(now, relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: None
        }
    );
    assert_eq!(
        h.server.handle_peer(now, relay(1), other_port, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: None
        }
    );
    assert_eq!(
        h.server.handle_peer(now, relay(1), p3, 0),
        PeerAction::Drop(DropReason::NoPermission)
    );
    assert_eq!(
        h.server.handle_peer(now, relay(2), p1, 0),
        PeerAction::Drop(DropReason::NoAllocation)
    );

    let mut out = vec![1, 2, 3];
    h.server.encode_data_indication(p1, b"from the peer", &mut out);
    let m = decode(&out);
    assert_eq!((m.class(), m.method()), (Class::Indication, Method::Data));
    assert_eq!(get(&m, kind::XOR_PEER_ADDRESS), Attribute::XorPeerAddress(p1));
    assert_eq!(get(&m, kind::DATA), Attribute::Data(b"from the peer"));
    let tid1 = m.transaction_id();
    let mut out2 = Vec::new();
    h.server
        .encode_data_indication("[2606:4700::1111]:443".parse().unwrap(), b"v6", &mut out2);
    let m2 = decode(&out2);
    assert_ne!(m2.transaction_id(), tid1, "fresh transaction IDs");
    assert_eq!(
        get(&m2, kind::XOR_PEER_ADDRESS),
        Attribute::XorPeerAddress(sa("[2606:4700::1111]:443"))
    );
    assert_eq!(get(&m2, kind::DATA), Attribute::Data(b"v6"));
}

#[test]
fn rfc8656_9_permission_expires_after_300s() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    let p1 = sa(P1);
    h.create_permission(h.t0, &mut c, &[p1]);
    let deadline = h.server.poll_timeout().unwrap();
    assert!(
        deadline <= h.at(300),
        "the permission has a timer: {:?}",
        deadline - h.t0
    );

    assert!(matches!(
        h.send(h.at(299), c.ft, &send_indication(p1, b"x")),
        Outcome::Relay { .. }
    ));
    assert!(matches!(
        h.server.handle_peer(h.at(299), relay(1), p1, 0),
        PeerAction::Forward { .. }
    ));
    // Expired at 300 s, with or without handle_timeout.
    assert!(matches!(
        h.send(h.at(300), c.ft, &send_indication(p1, b"x")),
        Outcome::Drop(DropReason::NoPermission)
    ));
    assert_eq!(
        h.server.handle_peer(h.at(300), relay(1), p1, 0),
        PeerAction::Drop(DropReason::NoPermission)
    );
    h.server.handle_timeout(h.at(300));
    assert!(h.server.allocation(&c.ft).unwrap().permission_count() == 0);
    assert_eq!(h.server.allocation_count(), 1);
    assert!(h.events().is_empty());

    // Refreshing a permission before it expires extends it.
    h.create_permission(h.at(310), &mut c, &[p1]);
    h.create_permission(h.at(500), &mut c, &[p1]);
    assert!(matches!(
        h.send(h.at(599), c.ft, &send_indication(p1, b"x")),
        Outcome::Relay { .. }
    ));
    // (The allocation itself ends at 600 s.)
    assert!(matches!(
        h.send(h.at(799), c.ft, &send_indication(p1, b"x")),
        Outcome::Drop(DropReason::NoAllocation)
    ));
}

#[test]
fn rfc8656_10_2_create_permission_validation() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    // No XOR-PEER-ADDRESS.
    assert_error(&h.create_permission(now, &mut c, &[]), Method::CreatePermission, 400);
    // One good and one refused peer: nothing is installed.
    let r = h.create_permission(now, &mut c, &[sa(P1), sa("10.0.0.1:80")]);
    assert_error(&r, Method::CreatePermission, 403);
    assert!(h.server.allocation(&c.ft).unwrap().permission_count() == 0);
    // Port 0 is fine for a permission (ports do not matter).
    assert_success(
        &h.create_permission(now, &mut c, &[sa("8.8.4.4:0")]),
        Method::CreatePermission,
    );
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa("8.8.4.4:53"), b"q")),
        Outcome::Relay { .. }
    ));
}

// ---------------------------------------------------------------------------------------
// 12. Channels
// ---------------------------------------------------------------------------------------

#[test]
fn rfc8656_12_2_channel_bind_and_12_5_channel_data() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let (p1, p2) = (sa(P1), sa(P2));

    assert_success(&h.channel_bind(now, &mut c, 0x4000, p1), Method::ChannelBind);
    match h.send(now, c.ft, &channel_data(0x4000, b"over the channel")) {
        Outcome::Relay { relayed, peer, payload } => {
            assert_eq!((relayed, peer), (relay(1), p1));
            assert_eq!(payload, b"over the channel");
        }
        other => panic!("{other:?}"),
    }
    // With UDP padding.
    let mut padded = channel_data(0x4000, b"abc");
    padded.push(0);
    assert!(matches!(h.send(now, c.ft, &padded), Outcome::Relay { payload, .. } if payload == b"abc"));
    // ChannelBind installs a permission: Send indications work too.
    assert!(matches!(
        h.send(now, c.ft, &send_indication(p1, b"x")),
        Outcome::Relay { .. }
    ));

    assert_eq!(
        h.server.handle_peer(now, relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4000)
        }
    );
    // Same IP, other port: permitted, but not the bound transport address.
    let p1_other = SocketAddr::new(p1.ip(), 4001);
    assert_eq!(
        h.server.handle_peer(now, relay(1), p1_other, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: None
        }
    );

    assert!(matches!(
        h.send(now, c.ft, &channel_data(0x4001, b"x")),
        Outcome::Drop(DropReason::NoChannel)
    ));
    assert!(matches!(
        h.send(now, c.ft, &[0x40, 0x00, 0x00, 0x09, 1]),
        Outcome::Drop(DropReason::Malformed)
    ));

    // Conflicts: the number to another peer, the peer to another number.
    assert_error(&h.channel_bind(now, &mut c, 0x4000, p2), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(now, &mut c, 0x4001, p1), Method::ChannelBind, 400);
    // Another port of the same IP is another transport address: its own channel is fine.
    assert_success(&h.channel_bind(now, &mut c, 0x4001, p1_other), Method::ChannelBind);
    assert_eq!(
        h.server.handle_peer(now, relay(1), p1_other, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4001)
        }
    );
    // Refreshing the same binding succeeds and moves its expiry.
    assert_success(&h.channel_bind(h.at(100), &mut c, 0x4000, p1), Method::ChannelBind);
    let a = h.server.allocation(&c.ft).unwrap();
    assert_eq!(a.binding(0x4000).unwrap().expires, h.at(700));
    assert_eq!(a.binding(0x4001).unwrap().expires, h.at(600));
    assert_eq!(
        a.permission(p1.ip()).unwrap(),
        h.at(400),
        "ChannelBind refreshes the permission"
    );

    // Missing attributes.
    let r = h.respond(now, &mut c, Method::ChannelBind, &[Attribute::ChannelNumber(0x4002)]);
    assert_error(&r, Method::ChannelBind, 400);
    let r = h.respond(now, &mut c, Method::ChannelBind, &[Attribute::XorPeerAddress(p2)]);
    assert_error(&r, Method::ChannelBind, 400);
}

#[test]
fn rfc8656_12_2_channel_number_ranges() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let peers = [
        "8.8.8.8:1",
        "8.8.8.8:2",
        "8.8.8.8:3",
        "8.8.8.8:4",
        "8.8.8.8:5",
        "8.8.8.8:6",
    ]
    .map(sa);
    assert_error(&h.channel_bind(now, &mut c, 0x3FFF, peers[0]), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(now, &mut c, 0x8000, peers[1]), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(now, &mut c, 0x0000, peers[1]), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(now, &mut c, 0xFFFF, peers[1]), Method::ChannelBind, 400);
    assert_success(&h.channel_bind(now, &mut c, 0x4000, peers[2]), Method::ChannelBind);
    assert_success(&h.channel_bind(now, &mut c, 0x4FFF, peers[3]), Method::ChannelBind);
    assert_success(&h.channel_bind(now, &mut c, 0x5000, peers[4]), Method::ChannelBind);
    assert_success(&h.channel_bind(now, &mut c, 0x7FFF, peers[5]), Method::ChannelBind);
    assert!(matches!(h.send(now, c.ft, &channel_data(0x7FFF, b"z")), Outcome::Relay { peer, .. } if peer == peers[5]));

    let mut h = Harness::with_config(ServerConfig {
        strict_channel_numbers: true,
        ..ServerConfig::default()
    });
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    assert_error(&h.channel_bind(now, &mut c, 0x5000, peers[4]), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(now, &mut c, 0x7FFF, peers[5]), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(now, &mut c, 0x3FFF, peers[0]), Method::ChannelBind, 400);
    assert_success(&h.channel_bind(now, &mut c, 0x4000, peers[2]), Method::ChannelBind);
    assert_success(&h.channel_bind(now, &mut c, 0x4FFF, peers[3]), Method::ChannelBind);
    assert!(h.server.allocation(&c.ft).unwrap().channel_count() == 2);
}

#[test]
fn channel_binding_expires_after_600s() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(3600)], relay(1));
    let p1 = sa(P1);
    assert_success(&h.channel_bind(h.t0, &mut c, 0x4000, p1), Method::ChannelBind);
    // Keep the permission alive independently of the channel.
    h.create_permission(h.at(250), &mut c, &[p1]);
    h.server.handle_timeout(h.at(300));
    h.create_permission(h.at(500), &mut c, &[p1]);
    h.server.handle_timeout(h.at(599));

    assert!(matches!(
        h.send(h.at(599), c.ft, &channel_data(0x4000, b"x")),
        Outcome::Relay { .. }
    ));
    assert_eq!(
        h.server.handle_peer(h.at(599), relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4000)
        }
    );

    // At 600 s the binding is gone (checked before and after handle_timeout).
    assert!(matches!(
        h.send(h.at(600), c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoChannel)
    ));
    assert_eq!(
        h.server.handle_peer(h.at(600), relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: None
        }
    );
    h.server.handle_timeout(h.at(600));
    let a = h.server.allocation(&c.ft).unwrap();
    assert!(a.channel_count() == 0);
    assert!(matches!(
        h.send(h.at(601), c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoChannel)
    ));
    // Send indications still work through the refreshed permission.
    assert!(matches!(
        h.send(h.at(601), c.ft, &send_indication(p1, b"x")),
        Outcome::Relay { .. }
    ));
    assert!(h.events().is_empty());

    // Without a permission refresh, ChannelData stops with the permission (300 s).
    let mut d = Client::bob();
    h.allocate_with(h.at(1000), &mut d, &[Attribute::Lifetime(3600)], relay(2));
    h.channel_bind(h.at(1000), &mut d, 0x4000, p1);
    assert!(matches!(
        h.send(h.at(1299), d.ft, &channel_data(0x4000, b"x")),
        Outcome::Relay { .. }
    ));
    assert!(matches!(
        h.send(h.at(1300), d.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoPermission)
    ));
}

#[test]
fn rfc8656_12_6_channel_data_refreshes_neither_binding_nor_permission() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(3600)], relay(1));
    let p1 = sa(P1);
    assert_success(&h.channel_bind(h.t0, &mut c, 0x4000, p1), Method::ChannelBind);
    // ChannelData all along does not move the permission's expiry (300 s after ChannelBind).
    for s in [1, 100, 200, 299] {
        assert!(matches!(
            h.send(h.at(s), c.ft, &channel_data(0x4000, b"x")),
            Outcome::Relay { .. }
        ));
    }
    assert!(matches!(
        h.send(h.at(300), c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoPermission)
    ));
    // With the permission refreshed by CreatePermission, ChannelData does not move the
    // binding's expiry either (600 s after ChannelBind).
    assert_success(&h.create_permission(h.at(300), &mut c, &[p1]), Method::CreatePermission);
    for s in [301, 450, 599] {
        assert!(matches!(
            h.send(h.at(s), c.ft, &channel_data(0x4000, b"x")),
            Outcome::Relay { .. }
        ));
    }
    assert!(matches!(
        h.send(h.at(600), c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoChannel)
    ));
}

#[test]
fn rfc8656_10_2_and_12_2_peer_of_another_family_is_443() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let v6 = sa("[2606:4700::1111]:443");
    assert_error(&h.create_permission(now, &mut c, &[v6]), Method::CreatePermission, 443);
    assert_error(&h.channel_bind(now, &mut c, 0x4000, v6), Method::ChannelBind, 443);
    let a = h.server.allocation(&c.ft).unwrap();
    assert!(a.permission_count() == 0 && a.channel_count() == 0);
}

// ---------------------------------------------------------------------------------------
// 13. Peer policy through the server
// ---------------------------------------------------------------------------------------

#[test]
fn default_policy_refuses_special_ipv4_peers() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    for peer in [
        "127.0.0.1:5000",
        "0.0.0.0:5000",
        "169.254.169.254:80",
        "10.0.0.1:5000",
        "192.168.1.1:5000",
        "192.0.2.200:50001",
    ] {
        let r = h.create_permission(now, &mut c, &[sa(peer)]);
        assert_error(&r, Method::CreatePermission, 403);
        c.verify(&r);
    }
    // ::ffff:127.0.0.1 is an IPv6 address on an IPv4 allocation: the family check comes
    // first, so the server answers 443 Peer Address Family Mismatch (refused either way).
    let r = h.create_permission(now, &mut c, &[sa("[::ffff:127.0.0.1]:5000")]);
    let code = err_code(&r).expect("an error");
    assert!(code == 403 || code == 443, "{code}");
    assert_eq!(code, 443);

    assert_error(
        &h.channel_bind(now, &mut c, 0x4000, sa("127.0.0.1:5000")),
        Method::ChannelBind,
        403,
    );
    assert_error(
        &h.channel_bind(now, &mut c, 0x4000, sa("8.8.8.8:0")),
        Method::ChannelBind,
        403,
    );
    assert_error(
        &h.channel_bind(now, &mut c, 0x4000, sa("[::ffff:127.0.0.1]:5000")),
        Method::ChannelBind,
        443,
    );
    let a = h.server.allocation(&c.ft).unwrap();
    assert!(a.permission_count() == 0 && a.channel_count() == 0);
    // Data from a denied peer is dropped before the permission check.
    assert_eq!(
        h.server.handle_peer(now, relay(1), sa("127.0.0.1:5000"), 0),
        PeerAction::Drop(DropReason::PeerDenied)
    );
}

#[test]
fn default_policy_refuses_special_ipv6_peers_and_ipv4_in_ipv6_spellings() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let v6_relay: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
    let req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[
                Attribute::RequestedTransport(17),
                Attribute::RequestedAddressFamily(AddressFamily::V6),
            ],
        )
        .allocate();
    assert_eq!(req.family, AddressFamily::V6);
    let (r, _) = h.complete(now, &c, req, Ok(v6_relay));
    assert_success(&r, Method::Allocate);
    assert_eq!(relayed_of(&r), v6_relay);

    for peer in [
        "[::ffff:127.0.0.1]:5000",
        "[::127.0.0.1]:5000",
        "[64:ff9b::7f00:1]:5000",
        "[2002:7f00:1::1]:5000",
        "[fe80::1]:5000",
        "[fd00::1]:5000",
        "[::1]:5000",
        "[::]:5000",
        "[::ffff:10.0.0.1]:5000",
    ] {
        let r = h.create_permission(now, &mut c, &[sa(peer)]);
        assert_error(&r, Method::CreatePermission, 403);
        c.verify(&r);
        assert_error(&h.channel_bind(now, &mut c, 0x4000, sa(peer)), Method::ChannelBind, 403);
    }
    // An IPv4 peer on an IPv6 allocation: 443.
    assert_error(
        &h.create_permission(now, &mut c, &[sa(P1)]),
        Method::CreatePermission,
        443,
    );
    // A public IPv6 peer is fine.
    let public = sa("[2606:4700:4700::1111]:53");
    assert_success(&h.create_permission(now, &mut c, &[public]), Method::CreatePermission);
    assert!(
        matches!(h.send(now, c.ft, &send_indication(public, b"q")), Outcome::Relay { relayed, .. } if relayed == v6_relay)
    );
    assert_eq!(h.server.allocation(&c.ft).unwrap().permission_count(), 1);
    // Refresh with REQUESTED-ADDRESS-FAMILY IPv6 matches this allocation.
    let r = h.respond(
        now,
        &mut c,
        Method::Refresh,
        &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
    );
    assert_success(&r, Method::Refresh);
}

#[test]
fn loopback_allowed_by_operator_policy() {
    let policy = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec![], vec![]);
    let mut h = Harness::with(ServerConfig::default(), policy);
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let lo = sa("127.0.0.1:5000");
    assert_success(&h.create_permission(now, &mut c, &[lo]), Method::CreatePermission);
    assert!(matches!(h.send(now, c.ft, &send_indication(lo, b"x")), Outcome::Relay { peer, .. } if peer == lo));
    assert_eq!(
        h.server.handle_peer(now, relay(1), lo, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: None
        }
    );
    assert_success(&h.channel_bind(now, &mut c, 0x4000, lo), Method::ChannelBind);
    // Other special ranges stay refused.
    assert_error(
        &h.create_permission(now, &mut c, &[sa("10.0.0.1:5000")]),
        Method::CreatePermission,
        403,
    );
}

// ---------------------------------------------------------------------------------------
// 14. Per-allocation limits
// ---------------------------------------------------------------------------------------

#[test]
fn permission_limit_is_508() {
    let mut h = Harness::with_config(ServerConfig {
        max_permissions_per_allocation: 2,
        ..ServerConfig::default()
    });
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    assert_success(&h.create_permission(now, &mut c, &[sa(P1)]), Method::CreatePermission);
    assert_success(&h.create_permission(now, &mut c, &[sa(P2)]), Method::CreatePermission);
    let r = h.create_permission(now, &mut c, &[sa(P3)]);
    assert_error(&r, Method::CreatePermission, 508);
    c.verify(&r);
    // Refreshing existing ones (another port of the same IP too) is fine.
    assert_success(
        &h.create_permission(now, &mut c, &[sa(P1), sa("1.1.1.1:1")]),
        Method::CreatePermission,
    );
    // A ChannelBind needs a permission slot for a new peer IP too.
    assert_error(&h.channel_bind(now, &mut c, 0x4000, sa(P3)), Method::ChannelBind, 508);
    assert_success(&h.channel_bind(now, &mut c, 0x4000, sa(P1)), Method::ChannelBind);
    // Expired permissions free their slots.
    assert_success(
        &h.create_permission(h.at(300), &mut c, &[sa(P3)]),
        Method::CreatePermission,
    );
    assert_eq!(h.server.allocation(&c.ft).unwrap().permission_count(), 1);
    // Two new peers at once when one slot is left: refused, and nothing is installed.
    let r = h.create_permission(h.at(300), &mut c, &[sa(P1), sa(P2)]);
    assert_error(&r, Method::CreatePermission, 508);
    assert_eq!(h.server.allocation(&c.ft).unwrap().permission_count(), 1);
}

#[test]
fn channel_limit_is_508() {
    let mut h = Harness::with_config(ServerConfig {
        max_channels_per_allocation: 1,
        ..ServerConfig::default()
    });
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    assert_success(&h.channel_bind(now, &mut c, 0x4000, sa(P1)), Method::ChannelBind);
    let r = h.channel_bind(now, &mut c, 0x4001, sa(P2));
    assert_error(&r, Method::ChannelBind, 508);
    c.verify(&r);
    // Refreshing the existing binding is not a new channel.
    assert_success(&h.channel_bind(now, &mut c, 0x4000, sa(P1)), Method::ChannelBind);
    let a = h.server.allocation(&c.ft).unwrap();
    assert_eq!(a.channel_count(), 1);
    assert!(
        a.permission(sa(P2).ip()).is_none(),
        "a refused ChannelBind installs no permission"
    );
}

// ---------------------------------------------------------------------------------------
// 16. Unexpected messages
// ---------------------------------------------------------------------------------------

#[test]
fn responses_and_stray_indications_from_clients_are_dropped() {
    let mut h = Harness::new();
    let ft = five_tuple("203.0.113.10:40000");
    for (method, class) in [
        (Method::Binding, Class::Success),
        (Method::Binding, Class::Error),
        (Method::Allocate, Class::Success),
        (Method::Data, Class::Indication),
        (Method::Allocate, Class::Indication),
    ] {
        let msg = build(method, class, fresh_tid(), |b| {
            b.attribute(&Attribute::XorMappedAddress(sa("198.51.100.1:1")));
        });
        assert!(
            matches!(h.send(h.t0, ft, &msg), Outcome::Drop(DropReason::UnexpectedMessage)),
            "{method:?} {class:?}"
        );
    }
}

#[test]
fn unknown_method_request_is_400() {
    let mut h = Harness::new();
    let ft = five_tuple("203.0.113.10:40000");
    for method in [
        Method::Other(0x0FF),
        Method::Send,
        Method::Data,
        Method::ConnectionAttempt,
    ] {
        let tid = fresh_tid();
        let r = h.send(
            h.t0,
            ft,
            &build(method, Class::Request, tid, |b| {
                b.fingerprint();
            }),
        );
        let r = r.response();
        assert_error(&r, method, 400);
        let m = decode(&r);
        assert_eq!(m.transaction_id(), tid);
        assert_eq!(m.method().number(), method.number());
        assert_eq!(integrity::verify_fingerprint(&m), Ok(()));
    }
}

// ---------------------------------------------------------------------------------------
// Malformed integrity attributes
// ---------------------------------------------------------------------------------------

/// A MESSAGE-INTEGRITY shorter than 20 bytes at the end of an otherwise valid request
/// (valid nonce, known user) must be refused cleanly, not crash the server.
#[test]
fn short_message_integrity_is_refused_without_panic() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.challenge(now, &mut c);
    let nonce = c.nonce.clone().unwrap();
    for len in [0usize, 4, 16] {
        let tid = fresh_tid();
        let req = build(Method::Allocate, Class::Request, tid, |b| {
            b.attribute(&Attribute::Username("alice"));
            b.attribute(&Attribute::Realm(REALM));
            b.attribute(&Attribute::Nonce(&nonce));
            b.attribute(&Attribute::RequestedTransport(17));
            b.raw_attribute(kind::MESSAGE_INTEGRITY, &vec![0u8; len]);
        });
        let r = h.send(now, c.ft, &req).response();
        let m = decode(&r);
        assert_eq!((m.transaction_id(), m.class()), (tid, Class::Error));
        let code = err_code(&r).unwrap();
        assert!(code == 400 || code == 401, "{code}");
    }
    for len in [0usize, 8, 36] {
        let req = build(Method::Allocate, Class::Request, fresh_tid(), |b| {
            b.attribute(&Attribute::Username("alice"));
            b.attribute(&Attribute::Realm(REALM));
            b.attribute(&Attribute::Nonce(&nonce));
            b.raw_attribute(kind::MESSAGE_INTEGRITY_SHA256, &vec![0u8; len]);
        });
        let r = h.send(now, c.ft, &req).response();
        let code = err_code(&r).unwrap();
        assert!(code == 400 || code == 401, "{code}");
    }
}

// ---------------------------------------------------------------------------------------
// 15. Robustness
// ---------------------------------------------------------------------------------------

/// A server with a live allocation (permission for P1, channel 0x4000 to P1) and a set of
/// valid requests and indications for it.
fn fuzz_fixture() -> (Harness, Client, Vec<Vec<u8>>) {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    h.channel_bind(now, &mut c, 0x4000, sa(P1));
    let mut c256 = Client::new("203.0.113.10:40000", "alice", "alice-pw").sha256();
    c256.nonce = c.nonce.clone();
    let p2 = sa(P2);
    let v6 = sa("[2606:4700::1]:1");
    let valid = vec![
        c.authenticated(
            Method::CreatePermission,
            fresh_tid(),
            &[Attribute::XorPeerAddress(p2), Attribute::XorPeerAddress(sa(P3))],
        ),
        c.authenticated(
            Method::ChannelBind,
            fresh_tid(),
            &[Attribute::ChannelNumber(0x4001), Attribute::XorPeerAddress(p2)],
        ),
        c.authenticated(Method::Refresh, fresh_tid(), &[Attribute::Lifetime(1200)]),
        c.authenticated(Method::Refresh, fresh_tid(), &[Attribute::Lifetime(0)]),
        c.authenticated(
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17), Attribute::Lifetime(300)],
        ),
        c256.authenticated(Method::CreatePermission, fresh_tid(), &[Attribute::XorPeerAddress(v6)]),
        c256.authenticated(
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(17), Attribute::EvenPort(true)],
        ),
        c.unauthenticated(Method::Binding, fresh_tid(), &[]),
        send_indication(sa(P1), b"payload"),
        channel_data(0x4000, b"channel payload"),
    ];
    (h, c, valid)
}

/// Feeds `data` to `handle_client` and checks the invariants: no panic; a decodable
/// request is always answered (or handed to the shell as an Allocate), with its
/// transaction ID, method and (if it had one) a valid FINGERPRINT.
fn check_client_datagram(h: &mut Harness, ft: FiveTuple, now: Instant, data: &[u8]) -> Result<(), TestCaseError> {
    let request = Message::decode(data).ok().filter(|m| m.class() == Class::Request);
    let bad_fingerprint = request
        .as_ref()
        .is_some_and(|m| m.fingerprint_offset().is_some() && integrity::verify_fingerprint(m).is_err());
    let outcome = h.send(now, ft, data);
    let Some(req) = request else { return Ok(()) };
    if bad_fingerprint {
        prop_assert!(
            matches!(outcome, Outcome::Drop(DropReason::BadFingerprint)),
            "{:?}",
            outcome
        );
        return Ok(());
    }
    let resp = match outcome {
        Outcome::Respond(r) => r,
        Outcome::Allocate(a) => {
            let mut out = Vec::new();
            h.server.complete_allocate(now, a, Ok(relay(99)), &mut out);
            out
        }
        other => return Err(TestCaseError::fail(format!("request not answered: {other:?}"))),
    };
    let m = Message::decode(&resp).map_err(|e| TestCaseError::fail(format!("response does not decode: {e}")))?;
    prop_assert_eq!(m.transaction_id(), req.transaction_id());
    prop_assert_eq!(m.method(), req.method());
    prop_assert!(matches!(m.class(), Class::Success | Class::Error));
    if req.fingerprint_offset().is_some() {
        prop_assert_eq!(integrity::verify_fingerprint(&m), Ok(()));
    }
    if let Some(Ok(Attribute::ErrorCode { code, .. })) = m.get(kind::ERROR_CODE) {
        prop_assert!((300..700).contains(&code.0));
    }
    Ok(())
}

/// One mutation of a datagram.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        mask: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Cut at an attribute boundary and append one attribute of this kind and value.
    Append {
        boundary: usize,
        kind: u16,
        value: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let kinds = prop_oneof![
        Just(kind::MESSAGE_INTEGRITY),
        Just(kind::MESSAGE_INTEGRITY_SHA256),
        Just(kind::FINGERPRINT),
        Just(kind::XOR_PEER_ADDRESS),
        Just(kind::CHANNEL_NUMBER),
        Just(kind::LIFETIME),
        Just(kind::REQUESTED_TRANSPORT),
        Just(kind::PASSWORD_ALGORITHM),
        Just(kind::PASSWORD_ALGORITHMS),
        Just(kind::USERHASH),
        Just(kind::DATA),
        any::<u16>(),
    ];
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), kinds, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(boundary, kind, value)| Mutation::Append { boundary, kind, value }),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip { at, mask } if !data.is_empty() => {
            let i = at % data.len();
            data[i] ^= mask;
        }
        Mutation::Set { at, value } if !data.is_empty() => {
            let i = at % data.len();
            data[i] = *value;
        }
        Mutation::Truncate { at } => {
            let n = at % (data.len() + 1);
            data.truncate(n);
        }
        Mutation::Insert { at, bytes } => {
            let i = at % (data.len() + 1);
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Append { boundary, kind, value } => {
            let Ok(m) = Message::decode(data) else { return };
            let mut bounds: Vec<usize> = m.attributes().map(|a| a.offset).collect();
            bounds.push(data.len());
            let cut = bounds[boundary % bounds.len()];
            data.truncate(cut);
            data.extend_from_slice(&kind.to_be_bytes());
            data.extend_from_slice(&(value.len() as u16).to_be_bytes());
            data.extend_from_slice(value);
            data.resize(data.len() + (4 - value.len() % 4) % 4, 0);
            let len = (data.len() - 20) as u16;
            data[2..4].copy_from_slice(&len.to_be_bytes());
        }
        _ => {}
    }
}

/// Makes a byte string look like a STUN header (top bits, cookie, length), so that more
/// random inputs get past the header checks.
fn stunify(data: &mut Vec<u8>) {
    if data.len() >= 20 {
        data[0] &= 0x3F;
        data.truncate(20 + ((data.len() - 20) & !3));
        let len = (data.len() - 20) as u16;
        data[2..4].copy_from_slice(&len.to_be_bytes());
        data[4..8].copy_from_slice(&crate::stun::MAGIC_COOKIE.to_be_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_datagrams_never_panic(
        mut data in proptest::collection::vec(any::<u8>(), 0..400),
        stunlike in any::<bool>(),
        secs in 0u64..1500,
        same_tuple in any::<bool>(),
    ) {
        let (mut h, c, _) = fuzz_fixture();
        if stunlike {
            stunify(&mut data);
        }
        let ft = if same_tuple { c.ft } else { five_tuple("198.51.100.77:999") };
        let now = h.at(secs);
        check_client_datagram(&mut h, ft, now, &data)?;
        h.server.handle_timeout(now);
        while h.server.poll_event().is_some() {}
    }

    #[test]
    fn mutated_valid_requests_never_panic(
        which in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
        fix_header in any::<bool>(),
        secs in prop_oneof![Just(0u64), 0u64..1300],
    ) {
        let (mut h, c, valid) = fuzz_fixture();
        let mut data = valid[which.index(valid.len())].clone();
        for m in &mutations {
            apply(&mut data, m);
        }
        if fix_header && data.len() >= 20 && data[0] & 0xC0 == 0 {
            stunify(&mut data);
        }
        let now = h.at(secs);
        check_client_datagram(&mut h, c.ft, now, &data)?;
        // And the server keeps working afterwards.
        let b = h.send(now, c.ft, &c.unauthenticated(Method::Binding, fresh_tid(), &[]));
        prop_assert!(matches!(b, Outcome::Respond(_)));
    }

    #[test]
    fn unmutated_fixture_requests_are_answered(which in any::<prop::sample::Index>(), secs in 0u64..700) {
        let (mut h, c, valid) = fuzz_fixture();
        let data = valid[which.index(valid.len())].clone();
        let now = h.at(secs);
        check_client_datagram(&mut h, c.ft, now, &data)?;
    }

    #[test]
    fn handle_peer_never_panics(
        relay_port in 49_990u16..50_010,
        v6 in any::<bool>(),
        ip4 in any::<u32>(),
        ip6 in any::<u128>(),
        port in any::<u16>(),
        secs in 0u64..1500,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (mut h, c, _) = fuzz_fixture();
        let relayed = SocketAddr::new("192.0.2.200".parse().unwrap(), relay_port);
        let peer = if v6 {
            SocketAddr::new(std::net::Ipv6Addr::from(ip6).into(), port)
        } else {
            SocketAddr::new(std::net::Ipv4Addr::from(ip4).into(), port)
        };
        let now = h.at(secs);
        let action = h.server.handle_peer(now, relayed, peer, 0);
        if let PeerAction::Forward { five_tuple, channel } = action {
            prop_assert_eq!(relayed, relay(1));
            prop_assert_eq!(five_tuple, c.ft);
            prop_assert!(peer.is_ipv4());
            prop_assert!(channel.is_none() || channel == Some(0x4000));
            let mut out = Vec::new();
            h.server.encode_data_indication(peer, &payload, &mut out);
            let m = Message::decode(&out).unwrap();
            prop_assert_eq!(m.get(kind::XOR_PEER_ADDRESS), Some(Ok(Attribute::XorPeerAddress(peer))));
            prop_assert_eq!(m.get(kind::DATA), Some(Ok(Attribute::Data(&payload[..]))));
        }
        h.server.handle_timeout(now);
    }
}

#[path = "server_abuse_tests.rs"]
mod abuse;

#[path = "server_limits_tests.rs"]
mod limits;

// ---------------------------------------------------------------------------------------
// A retransmitted Allocate gets the first answer again (RFC 8656 §7.2)
// ---------------------------------------------------------------------------------------

#[test]
fn retransmitted_allocate_repeats_reservation_token_and_address_error() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let tid = fresh_tid();
    let attrs = [
        Attribute::RequestedTransport(17),
        Attribute::EvenPort(true),
        Attribute::AdditionalAddressFamily(AddressFamily::V6),
    ];
    let mut req = h.request(now, &mut c, Method::Allocate, tid, &attrs).allocate();
    req.grant_reservation([7; 8]);
    let (first, _) = h.complete(now, &c, req, Ok(relay(3)));
    assert_success(&first, Method::Allocate);
    // The same request again (a retransmission: same transaction ID) 10 s later.
    let later = h.at(10);
    let again = h
        .send(later, c.ft, &c.authenticated(Method::Allocate, tid, &attrs))
        .response();
    assert_success(&again, Method::Allocate);
    c.verify(&again);
    let m = decode(&again);
    assert_eq!(get(&m, kind::RESERVATION_TOKEN), Attribute::ReservationToken([7; 8]));
    assert!(matches!(
        get(&m, kind::ADDRESS_ERROR_CODE),
        Attribute::AddressErrorCode {
            family: AddressFamily::V6,
            code: crate::stun::ErrorCode(440),
            ..
        }
    ));
    assert_eq!(relayed_of(&again), relay(3));
    assert_eq!(lifetime_of(&again), 590, "the lifetime that remains");
}

// ---------------------------------------------------------------------------------------
// Defects of the outside review (issue 9), one regression test each
// ---------------------------------------------------------------------------------------

/// Defect 5: authenticated requests on an existing allocation were charged to the per-IP
/// request limiter before authentication, so a Binding flood from another port of the
/// owner's IP dropped most of the owner's Refreshes.
#[test]
fn regression_owner_refresh_not_starved_by_binding_flood() {
    let mut h = Harness::with_config(ServerConfig {
        request_rate: 10,
        ..ServerConfig::default()
    });
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let flooder = five_tuple("203.0.113.10:40001");
    let binding = build(Method::Binding, Class::Request, fresh_tid(), |_| {});
    let dropped = (0..200)
        .filter(|_| matches!(h.send(now, flooder, &binding), Outcome::Drop(DropReason::RateLimited)))
        .count();
    assert!(dropped >= 150, "the flood is limited ({dropped})");
    for _ in 0..20 {
        let r = h.refresh(now, &mut c, Some(600));
        assert_success(&r, Method::Refresh);
    }
    // The owner's 5-tuple without valid integrity is still limited.
    let unsigned = c.unauthenticated(Method::Refresh, fresh_tid(), &[]);
    assert!(matches!(
        h.send(now, c.ft, &unsigned),
        Outcome::Drop(DropReason::RateLimited)
    ));
    let mut forged = c.clone();
    forged.password = "wrong".into();
    let r = h.send(now, c.ft, &forged.authenticated(Method::Refresh, fresh_tid(), &[]));
    assert!(matches!(r, Outcome::Drop(DropReason::RateLimited)), "{r:?}");
}

/// Defect 6: unauthenticated answers amplified up to 6.6x (20-byte Allocate → 132-byte 401;
/// unknown method → 40-byte 400 with a reason phrase). Every unauthenticated answer but the
/// 401/438 challenge is now at most the request plus an XOR-MAPPED-ADDRESS (12 bytes); the
/// challenge to a minimal well-formed Allocate (28 bytes) is 88 bytes (3.1x), capped by
/// `challenge_rate` per source prefix.
#[test]
fn regression_unauthenticated_answers_do_not_amplify() {
    let mut h = Harness::with_config(ServerConfig {
        software: Some("turnpike/0.1 with a long software string".into()),
        ..ServerConfig::default()
    });
    let now = h.t0;
    let ft = five_tuple("203.0.113.50:4000");
    let mut c = Client::new("203.0.113.50:4000", "alice", "alice-pw");
    c.fingerprint = false;
    let bare = |m| build(m, Class::Request, fresh_tid(), |_| {});
    let unknown_method = {
        let mut v = bare(Method::Binding);
        v[0..2].copy_from_slice(&0x002fu16.to_be_bytes());
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Allocate without REQUESTED-TRANSPORT", bare(Method::Allocate)),
        ("unknown method", unknown_method),
        ("Binding", bare(Method::Binding)),
        ("Refresh without integrity", bare(Method::Refresh)),
        ("MESSAGE-INTEGRITY without REALM", {
            let mut c2 = c.clone();
            c2.nonce = Some("x".into());
            c2.send_realm = false;
            c2.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)])
        }),
    ];
    for (what, req) in cases {
        let r = match h.send(now, ft, &req) {
            Outcome::Respond(r) => r,
            other => panic!("{what}: {other:?}"),
        };
        let code = err_code(&r);
        if code == Some(401) {
            continue; // the challenge, checked below
        }
        assert!(
            r.len() <= req.len() + 12,
            "{what}: {} bytes for {} ({code:?})",
            r.len(),
            req.len()
        );
    }
    let allocate = c.unauthenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]);
    assert_eq!(allocate.len(), 28);
    let r = h.send(now, ft, &allocate).response();
    assert_error(&r, Method::Allocate, 401);
    assert_eq!(
        r.len(),
        88,
        "REALM, a 29-character NONCE and PASSWORD-ALGORITHMS, no reason phrase"
    );
    assert!(!has(&r, kind::SOFTWARE));
}

/// Defect 8: a Send indication with an unknown comprehension-required attribute was
/// relayed; RFC 8489 §6.3.2 says discard it.
#[test]
fn regression_send_with_unknown_comprehension_required_attribute_is_discarded() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    assert_success(&h.create_permission(now, &mut c, &[sa(P1)]), Method::CreatePermission);
    let with_unknown = build(Method::Send, Class::Indication, fresh_tid(), |b| {
        b.attribute(&Attribute::XorPeerAddress(sa(P1)));
        b.raw_attribute(0x0031, b"abcd");
        b.attribute(&Attribute::Data(b"payload"));
    });
    assert!(matches!(
        h.send(now, c.ft, &with_unknown),
        Outcome::Drop(DropReason::UnknownAttribute)
    ));
    // Unknown comprehension-optional attributes are ignored.
    let with_optional = build(Method::Send, Class::Indication, fresh_tid(), |b| {
        b.attribute(&Attribute::XorPeerAddress(sa(P1)));
        b.raw_attribute(0x8031, b"abcd");
        b.attribute(&Attribute::Data(b"payload"));
    });
    assert!(matches!(h.send(now, c.ft, &with_optional), Outcome::Relay { .. }));
}

/// Defect 10: Data indication transaction IDs were an xorshift sequence seeded from bytes of
/// the nonce key, the same on every shard. RFC 8489 §5 asks for cryptographically random
/// ones: each shard now has a ChaCha8 generator seeded from the OS CSPRNG.
#[test]
fn regression_data_indication_transaction_ids_are_random_per_shard() {
    let tids = |seed: Option<[u8; 32]>| {
        let mut server = Server::new(
            ServerConfig::default(),
            default_credentials(),
            PeerPolicy::default(),
            SECRET,
            Instant::now(),
            UNIX_NOW,
        );
        if let Some(seed) = seed {
            server = server.with_tid_seed(seed);
        }
        (0..1000)
            .map(|_| {
                let mut out = Vec::new();
                server.encode_data_indication(sa(P1), b"x", &mut out);
                decode(&out).transaction_id()
            })
            .collect::<Vec<_>>()
    };
    let shard0 = tids(Some([1; 32]));
    let shard1 = tids(Some([2; 32]));
    assert!(
        shard0.iter().zip(&shard1).all(|(a, b)| a != b),
        "shards share no sequence"
    );
    let unique: std::collections::HashSet<_> = shard0.iter().map(|t| t.0).collect();
    assert_eq!(unique.len(), shard0.len());
    // Without a seed the generator is keyed by the secret, not by its bytes: the first ID
    // is not the secret's first bytes run through xorshift.
    let unseeded = tids(None);
    let secret_word = u64::from_le_bytes(SECRET[..8].try_into().unwrap()) | 1;
    assert!(unseeded.iter().all(|t| t.0[8..] != (secret_word as u32).to_le_bytes()));
    // Bits are balanced (a weak check that no byte is constant).
    let ones: u32 = unseeded.iter().flat_map(|t| t.0).map(|b| b.count_ones()).sum();
    let bits = unseeded.len() as u32 * 96;
    assert!((ones as f64 / bits as f64 - 0.5).abs() < 0.01, "{ones}/{bits}");
}

/// Defect 11: a duplicate IP in one CreatePermission counted twice against
/// `max_permissions_per_allocation` (a spurious 508).
#[test]
fn regression_duplicate_ip_in_create_permission_counts_once() {
    let mut h = Harness::with_config(ServerConfig {
        max_permissions_per_allocation: 1,
        ..ServerConfig::default()
    });
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let same_ip_twice = [sa("8.8.8.8:4000"), sa("8.8.8.8:5000")];
    assert_success(
        &h.create_permission(now, &mut c, &same_ip_twice),
        Method::CreatePermission,
    );
    let two_ips = [sa("8.8.8.8:4000"), sa("1.1.1.1:5000")];
    assert_error(
        &h.create_permission(now, &mut c, &two_ips),
        Method::CreatePermission,
        508,
    );
}

/// Defect 9 at the server: with `0.0.0.0/0` allowed, CreatePermission and ChannelBind for
/// `0.0.0.0:<listen port>` are 403 (the relay would reach its own listener).
#[test]
fn regression_unspecified_address_of_own_listener_is_403() {
    let policy = PeerPolicy::new(
        vec!["0.0.0.0/0".parse().unwrap()],
        vec![],
        vec![sa(SERVER_ADDR).ip()],
        vec![sa(SERVER_ADDR)],
    );
    let mut h = Harness::with(ServerConfig::default(), policy);
    let now = h.t0;
    let mut c = Client::alice();
    h.allocate_ok(now, &mut c, relay(1));
    let own = sa("0.0.0.0:3478");
    assert_error(&h.create_permission(now, &mut c, &[own]), Method::CreatePermission, 403);
    assert_error(&h.channel_bind(now, &mut c, 0x4000, own), Method::ChannelBind, 403);
    assert!(matches!(
        h.send(now, c.ft, &send_indication(own, b"loop")),
        Outcome::Drop(DropReason::PeerDenied)
    ));
}

// ---------------------------------------------------------------------------------------
// The typed output model: every event, at its exact virtual instant
// ---------------------------------------------------------------------------------------

#[test]
fn events_of_an_allocation_life() {
    let mut h = Harness::new();
    let t0 = h.t0;
    let mut c = Client::alice();
    let ft = c.ft;
    let relayed = relay(1);
    h.allocate_ok(t0, &mut c, relayed);
    assert_eq!(
        h.all_events(),
        vec![Event::AllocationCreated {
            five_tuple: ft,
            additional: None,
            relayed,
            lifetime: Duration::from_secs(600)
        }]
    );
    // CreatePermission: one event per IP (the duplicate IP once).
    let r = h.create_permission(h.at(10), &mut c, &[sa(P1), sa(P2), sa("8.8.8.8:9")]);
    assert_success(&r, Method::CreatePermission);
    assert_eq!(
        h.all_events(),
        vec![
            Event::PermissionInstalled {
                five_tuple: ft,
                relayed,
                peer: sa(P1).ip(),
                expires: h.at(310)
            },
            Event::PermissionInstalled {
                five_tuple: ft,
                relayed,
                peer: sa(P2).ip(),
                expires: h.at(310)
            },
        ]
    );
    // ChannelBind: bound, with its implicit permission; again: rebound (refreshed).
    assert_success(&h.channel_bind(h.at(20), &mut c, 0x4001, sa(P3)), Method::ChannelBind);
    assert_eq!(
        h.all_events(),
        vec![
            Event::ChannelBound {
                five_tuple: ft,
                relayed,
                channel: 0x4001,
                peer: sa(P3),
                expires: h.at(620)
            },
            Event::PermissionInstalled {
                five_tuple: ft,
                relayed,
                peer: sa(P3).ip(),
                expires: h.at(320)
            },
        ]
    );
    assert_success(&h.channel_bind(h.at(30), &mut c, 0x4001, sa(P3)), Method::ChannelBind);
    assert_eq!(
        h.all_events()[0],
        Event::ChannelRebound {
            five_tuple: ft,
            relayed,
            channel: 0x4001,
            peer: sa(P3),
            expires: h.at(630)
        }
    );
    // Refused requests emit nothing.
    assert_error(
        &h.channel_bind(h.at(30), &mut c, 0x4001, sa(P1)),
        Method::ChannelBind,
        400,
    );
    assert!(h.all_events().is_empty());
    // Refresh.
    assert_success(&h.refresh(h.at(40), &mut c, Some(3000)), Method::Refresh);
    assert_eq!(
        h.all_events(),
        vec![Event::AllocationRefreshed {
            five_tuple: ft,
            additional: None,
            relayed,
            lifetime: Duration::from_secs(3000)
        }]
    );
    // Permissions of P1 and P2 expire at exactly 310 s, not a tick earlier.
    h.server.handle_timeout(h.at(309));
    assert!(h.all_events().is_empty());
    assert_eq!(h.server.poll_timeout(), Some(h.at(310)));
    h.server.handle_timeout(h.at(310));
    let mut expired = h.all_events();
    expired.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        expired,
        vec![
            Event::PermissionExpired {
                five_tuple: ft,
                relayed,
                peer: sa(P2).ip()
            },
            Event::PermissionExpired {
                five_tuple: ft,
                relayed,
                peer: sa(P1).ip()
            },
        ]
    );
    // P3's permission (refreshed by the rebind at 30 s) at 330 s, the channel at 630 s.
    h.server.handle_timeout(h.at(329));
    assert!(h.all_events().is_empty());
    h.server.handle_timeout(h.at(330));
    assert_eq!(
        h.all_events(),
        vec![Event::PermissionExpired {
            five_tuple: ft,
            relayed,
            peer: sa(P3).ip()
        }]
    );
    h.server.handle_timeout(h.at(629));
    assert!(h.all_events().is_empty());
    h.server.handle_timeout(h.at(630));
    assert_eq!(
        h.all_events(),
        vec![Event::ChannelExpired {
            five_tuple: ft,
            relayed,
            channel: 0x4001,
            peer: sa(P3)
        }]
    );
    // Expiry of the allocation itself at 40 + 3000 s.
    h.server.handle_timeout(h.at(3039));
    assert!(h.all_events().is_empty());
    h.server.handle_timeout(h.at(3040));
    assert_eq!(
        h.all_events(),
        vec![Event::AllocationClosed {
            five_tuple: ft,
            additional: None,
            relayed,
            reason: CloseReason::Expired,
            age: Duration::from_secs(3040),
            usage: Usage::default(),
            username: "alice".into(),
        }]
    );
}

#[test]
fn refresh_zero_closes_with_reason_deleted_and_nothing_else() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    assert_success(&h.channel_bind(h.t0, &mut c, 0x4000, sa(P1)), Method::ChannelBind);
    h.all_events();
    assert_success(&h.refresh(h.at(1), &mut c, Some(0)), Method::Refresh);
    assert_eq!(
        h.all_events(),
        vec![Event::AllocationClosed {
            five_tuple: c.ft,
            additional: None,
            relayed: relay(1),
            reason: CloseReason::Deleted,
            age: Duration::from_secs(1),
            usage: Usage::default(),
            username: "alice".into(),
        }]
    );
    // Its channel and permission went with it: no expiry events later.
    h.server.handle_timeout(h.at(10_000));
    assert!(h.all_events().is_empty());
}

#[test]
fn responses_name_their_method_and_code() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let mut out = Vec::new();
    let unauth = c.unauthenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]);
    let action = h.server.handle_client(h.t0, c.ft, &unauth, &mut out);
    let ClientAction::Respond(resp) = action else {
        panic!("{action:?}")
    };
    assert_eq!((resp.method, resp.error.map(|e| e.0)), (Method::Allocate, Some(401)));
    c.nonce = Some(nonce_of(&out));
    let refresh = c.authenticated(Method::Refresh, fresh_tid(), &[]);
    let ClientAction::Respond(resp) = h.server.handle_client(h.t0, c.ft, &refresh, &mut out) else {
        panic!()
    };
    assert_eq!((resp.method, resp.error.map(|e| e.0)), (Method::Refresh, Some(437)));
    let binding = build(Method::Binding, Class::Request, fresh_tid(), |_| {});
    let ClientAction::Respond(resp) = h.server.handle_client(h.t0, c.ft, &binding, &mut out) else {
        panic!()
    };
    assert_eq!((resp.method, resp.error), (Method::Binding, None));
}

/// Drain (graceful scale-in): new Allocates get 300 with ALTERNATE-SERVER (RFC 8489 §10), or
/// 403 without an alternate, within the request plus 12 bytes; the allocations held keep
/// refreshing and relaying.
#[test]
fn draining_refuses_new_allocates_and_keeps_the_old() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut old = Client::alice();
    h.allocate_ok(now, &mut old, relay(1));
    assert_success(&h.channel_bind(now, &mut old, 0x4000, sa(P1)), Method::ChannelBind);
    let alternate = sa("198.51.100.7:3478");
    h.server.drain(Some(alternate));
    assert!(h.server.is_draining());
    let new = Client::bob();
    let req = new.unauthenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]);
    let r = h.send(now, new.ft, &req).response();
    assert_error(&r, Method::Allocate, 300);
    assert_eq!(
        get(&decode(&r), kind::ALTERNATE_SERVER),
        Attribute::AlternateServer(alternate)
    );
    assert!(r.len() <= req.len() + 12, "{} for {}", r.len(), req.len());
    assert_eq!(h.server.table_sizes().pending, 0, "no state for a refused Allocate");
    // The allocation held goes on.
    assert_success(&h.refresh(h.at(10), &mut old, Some(600)), Method::Refresh);
    assert!(matches!(
        h.send(h.at(10), old.ft, &channel_data(0x4000, b"still relaying")),
        Outcome::Relay { .. }
    ));
    // Without an alternate: 403.
    h.server.drain(None);
    let r = h.send(now, new.ft, &req).response();
    assert_error(&r, Method::Allocate, 403);
    assert!(!has(&r, kind::ALTERNATE_SERVER));
}

/// SIGHUP's sans-IO half: new credentials and limits take effect at once, a removed user
/// gets 401, and the allocations held keep relaying.
#[test]
fn reload_swaps_credentials_and_keeps_allocations() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut alice = Client::alice();
    h.allocate_ok(now, &mut alice, relay(1));
    assert_success(&h.channel_bind(now, &mut alice, 0x4000, sa(P1)), Method::ChannelBind);
    let creds = Credentials::new(
        [
            ("alice".to_string(), "alice-pw".to_string()),
            ("carol".to_string(), "carol-pw".to_string()),
        ],
        vec![],
        REALM,
    );
    let config = ServerConfig {
        max_permissions_per_allocation: 7,
        ..ServerConfig::default()
    };
    h.server.reload(config, creds, PeerPolicy::default(), now);
    assert_eq!(h.server.config().max_permissions_per_allocation, 7);
    let mut carol = Client::new("203.0.113.30:40000", "carol", "carol-pw");
    h.allocate_ok(h.at(1), &mut carol, relay(2));
    let mut bob = Client::bob();
    let r = h.respond(
        h.at(1),
        &mut bob,
        Method::Allocate,
        &[Attribute::RequestedTransport(17)],
    );
    assert_error(&r, Method::Allocate, 401);
    assert!(matches!(
        h.send(h.at(2), alice.ft, &channel_data(0x4000, b"after the reload")),
        Outcome::Relay { .. }
    ));
    assert_success(&h.refresh(h.at(2), &mut alice, Some(600)), Method::Refresh);
}

// ---------------------------------------------------------------------------------------
// Dual allocation (RFC 8656 §7.2, ADDITIONAL-ADDRESS-FAMILY)
// ---------------------------------------------------------------------------------------

fn all_relayed_of(resp: &[u8]) -> Vec<SocketAddr> {
    let m = decode(resp);
    m.attributes()
        .filter(|a| a.kind == kind::XOR_RELAYED_ADDRESS)
        .map(|a| match Attribute::decode(a.kind, a.value, &m.transaction_id()) {
            Ok(Attribute::XorRelayedAddress(x)) => x,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn rfc8656_7_2_dual_allocation_relays_each_family_from_its_own_address() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let v6_relay: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
    let mut req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[
                Attribute::RequestedTransport(17),
                Attribute::AdditionalAddressFamily(AddressFamily::V6),
            ],
        )
        .allocate();
    assert_eq!(req.family, AddressFamily::V4);
    assert_eq!(req.additional_family(), Some(AddressFamily::V6));
    req.grant_additional(Ok(v6_relay));
    let (r, released) = h.complete(now, &c, req, Ok(relay(1)));
    assert_success(&r, Method::Allocate);
    assert_eq!(released, None);
    // One XOR-RELAYED-ADDRESS per family, IPv4 first; no ADDRESS-ERROR-CODE.
    assert_eq!(all_relayed_of(&r), vec![relay(1), v6_relay]);
    assert!(decode(&r).raw(kind::ADDRESS_ERROR_CODE).is_none());
    assert!(h.all_events().iter().any(|e| matches!(
        e,
        Event::AllocationCreated { relayed, additional: Some(a), .. } if *relayed == relay(1) && *a == v6_relay
    )));

    // Permissions and channels for both families (no 443); each installs on its own
    // relayed address.
    let v6_peer = sa("[2606:4700::1111]:443");
    assert_success(
        &h.create_permission(now, &mut c, &[sa(P1), v6_peer]),
        Method::CreatePermission,
    );
    let installed: Vec<(std::net::IpAddr, SocketAddr)> = h
        .all_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::PermissionInstalled { peer, relayed, .. } => Some((peer, relayed)),
            _ => None,
        })
        .collect();
    assert_eq!(installed, vec![(sa(P1).ip(), relay(1)), (v6_peer.ip(), v6_relay)]);
    assert_success(&h.channel_bind(now, &mut c, 0x4001, v6_peer), Method::ChannelBind);

    // Send to each family leaves from that family's relayed address.
    for (peer, from) in [(sa(P1), relay(1)), (v6_peer, v6_relay)] {
        match h.send(now, c.ft, &send_indication(peer, b"hi")) {
            Outcome::Relay { relayed, peer: to, .. } => assert_eq!((relayed, to), (from, peer)),
            other => panic!("{other:?}"),
        }
    }
    // ChannelData on the IPv6 peer's channel too.
    match h.send(now, c.ft, &[0x40, 0x01, 0x00, 0x02, 7, 7]) {
        Outcome::Relay { relayed, peer, .. } => assert_eq!((relayed, peer), (v6_relay, v6_peer)),
        other => panic!("{other:?}"),
    }
    // The IPv6 peer's datagrams to the IPv6 relayed address reach the client on its channel.
    assert_eq!(
        h.server.handle_peer(now, v6_relay, v6_peer, 10),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4001)
        }
    );
    // A Refresh naming either family is fine (RFC 8656 §8.2: 443 only for a family the
    // allocation does not have).
    for f in [AddressFamily::V4, AddressFamily::V6] {
        let r = h.respond(
            now,
            &mut c,
            Method::Refresh,
            &[Attribute::Lifetime(600), Attribute::RequestedAddressFamily(f)],
        );
        assert_success(&r, Method::Refresh);
    }
    // Deleting it releases both addresses.
    h.all_events();
    assert_success(&h.refresh(now, &mut c, Some(0)), Method::Refresh);
    let closed: Vec<_> = h
        .all_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::AllocationClosed {
                relayed, additional, ..
            } => Some((relayed, additional)),
            _ => None,
        })
        .collect();
    assert_eq!(closed, vec![(relay(1), Some(v6_relay))]);
    assert_eq!(h.server.five_tuple_for_relay(&v6_relay), None);
    assert_eq!(h.server.table_sizes().relays, 0);
}

#[test]
fn rfc8656_7_2_dual_allocation_refused_family_gets_address_error_code() {
    let mut h = Harness::new();
    let now = h.t0;
    for (i, (grant, code)) in [
        (None, 440),
        (Some(Err(RelayError::FamilyNotSupported)), 440),
        (Some(Err(RelayError::UserQuota)), 486),
        (Some(Err(RelayError::Exhausted)), 508),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Client::alice();
        c.ft = five_tuple(&format!("203.0.113.10:{}", 41000 + i));
        let mut req = h
            .request(
                now,
                &mut c,
                Method::Allocate,
                fresh_tid(),
                &[
                    Attribute::RequestedTransport(17),
                    Attribute::AdditionalAddressFamily(AddressFamily::V6),
                ],
            )
            .allocate();
        if let Some(g) = grant {
            req.grant_additional(g);
        }
        let (r, _) = h.complete(now, &c, req, Ok(relay(i as u16)));
        assert_success(&r, Method::Allocate);
        assert_eq!(all_relayed_of(&r), vec![relay(i as u16)]);
        match get(&decode(&r), kind::ADDRESS_ERROR_CODE) {
            Attribute::AddressErrorCode { family, code: got, .. } => {
                assert_eq!((family, got.0), (AddressFamily::V6, code))
            }
            other => panic!("{other:?}"),
        }
        // An IPv6 peer on what is an IPv4-only allocation: 443.
        assert_error(
            &h.create_permission(now, &mut c, &[sa("[2606:4700::1111]:443")]),
            Method::CreatePermission,
            443,
        );
    }
}

#[test]
fn dual_allocation_whose_first_family_fails_releases_the_second() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    let v6_relay: SocketAddr = "[2001:db8::1]:50002".parse().unwrap();
    let mut req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[
                Attribute::RequestedTransport(17),
                Attribute::AdditionalAddressFamily(AddressFamily::V6),
            ],
        )
        .allocate();
    req.grant_additional(Ok(v6_relay));
    let mut out = Vec::new();
    let completion = h
        .server
        .complete_allocate(now, req, Err(RelayError::UserQuota), &mut out);
    assert_error(&out, Method::Allocate, 486);
    assert_eq!(completion.release, None);
    assert_eq!(completion.release_additional, Some(v6_relay));
    assert_eq!(h.server.five_tuple_for_relay(&v6_relay), None);
}

#[test]
fn coturn_draft_code_point_of_additional_address_family_is_accepted() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = Client::alice();
    h.challenge(now, &mut c);
    let msg = c.authenticated_with_raw(
        Method::Allocate,
        fresh_tid(),
        &[Attribute::RequestedTransport(17)],
        &[(kind::ADDITIONAL_ADDRESS_FAMILY_DRAFT, &[2, 0, 0, 0])],
    );
    let req = match h.send(now, c.ft, &msg) {
        Outcome::Allocate(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(req.additional_family(), Some(AddressFamily::V6));
}

// ---------------------------------------------------------------------------------------
// RFC 6062: TCP allocations, Connect, ConnectionBind, ConnectionAttempt
// ---------------------------------------------------------------------------------------

fn tcp_five_tuple(client: &str) -> FiveTuple {
    FiveTuple::new(sa(client), sa(SERVER_ADDR), crate::allocation::Transport::Tcp)
}

/// Alice on a TCP control connection with a TCP allocation on `relay(7)`.
fn tcp_allocation(h: &mut Harness, now: Instant) -> Client {
    let mut c = Client::alice();
    c.ft = tcp_five_tuple("203.0.113.10:40000");
    let req = h
        .request(
            now,
            &mut c,
            Method::Allocate,
            fresh_tid(),
            &[Attribute::RequestedTransport(6)],
        )
        .allocate();
    assert_eq!(req.relay_transport, crate::server::RelayTransport::Tcp);
    let (r, _) = h.complete(now, &c, req, Ok(relay(7)));
    assert_success(&r, Method::Allocate);
    c
}

#[test]
fn rfc6062_5_1_tcp_allocation_needs_a_stream_and_refuses_udp_only_attributes() {
    let mut h = Harness::new();
    let now = h.t0;
    // Over UDP: 400.
    let mut c = Client::alice();
    let r = h.respond(now, &mut c, Method::Allocate, &[Attribute::RequestedTransport(6)]);
    assert_error(&r, Method::Allocate, 400);
    // Over TCP with EVEN-PORT, RESERVATION-TOKEN or DONT-FRAGMENT: 400.
    let mut c = Client::alice();
    c.ft = tcp_five_tuple("203.0.113.10:40001");
    for extra in [
        Attribute::EvenPort(false),
        Attribute::ReservationToken([1; 8]),
        Attribute::DontFragment,
    ] {
        let r = h.respond(
            now,
            &mut c,
            Method::Allocate,
            &[Attribute::RequestedTransport(6), extra],
        );
        assert_error(&r, Method::Allocate, 400);
    }
    // Other protocols: 442.
    let r = h.respond(now, &mut c, Method::Allocate, &[Attribute::RequestedTransport(132)]);
    assert_error(&r, Method::Allocate, 442);
    // A TCP allocation has no channels and takes no Send indications.
    let mut c = tcp_allocation(&mut h, now);
    assert_success(&h.create_permission(now, &mut c, &[sa(P1)]), Method::CreatePermission);
    assert_error(&h.channel_bind(now, &mut c, 0x4000, sa(P1)), Method::ChannelBind, 400);
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa(P1), b"x")),
        Outcome::Drop(DropReason::UnexpectedMessage)
    ));
}

#[test]
fn rfc6062_5_2_connect_446_447_and_success_with_connection_id() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = tcp_allocation(&mut h, now);
    // No XOR-PEER-ADDRESS: 400. A denied peer: 403.
    assert_error(&h.respond(now, &mut c, Method::Connect, &[]), Method::Connect, 400);
    let denied = h.respond(
        now,
        &mut c,
        Method::Connect,
        &[Attribute::XorPeerAddress(sa("10.0.0.1:80"))],
    );
    assert_error(&denied, Method::Connect, 403);
    // A valid Connect: the shell connects from the relayed address.
    let tid = fresh_tid();
    let (id, relayed, peer) = match h.request(now, &mut c, Method::Connect, tid, &[Attribute::XorPeerAddress(sa(P1))]) {
        Outcome::Connect {
            connection_id,
            relayed,
            peer,
        } => (connection_id, relayed, peer),
        other => panic!("{other:?}"),
    };
    assert_eq!((relayed, peer), (relay(7), sa(P1)));
    assert_eq!(id & 0xFF, 0, "the default tag");
    // Another Connect to the same peer while connecting: 446.
    let again = h.respond(now, &mut c, Method::Connect, &[Attribute::XorPeerAddress(sa(P1))]);
    assert_error(&again, Method::Connect, 446);
    // Connected: success with CONNECTION-ID, signed, same transaction.
    let mut out = Vec::new();
    let (control, response) = h.server.complete_connect(now, id, true, &mut out).expect("known");
    assert_eq!((control, response.error), (c.ft, None));
    c.verify(&out);
    let m = decode(&out);
    assert_eq!(m.transaction_id(), tid);
    assert_eq!(get(&m, kind::CONNECTION_ID), Attribute::ConnectionId(id));
    // Still 446 while pending.
    let again = h.respond(now, &mut c, Method::Connect, &[Attribute::XorPeerAddress(sa(P1))]);
    assert_error(&again, Method::Connect, 446);
    // A failed Connect: 447, and the peer may be tried again.
    let id2 = match h.request(
        now,
        &mut c,
        Method::Connect,
        fresh_tid(),
        &[Attribute::XorPeerAddress(sa(P2))],
    ) {
        Outcome::Connect { connection_id, .. } => connection_id,
        other => panic!("{other:?}"),
    };
    let mut out = Vec::new();
    let (_, response) = h.server.complete_connect(now, id2, false, &mut out).expect("known");
    assert_eq!(response.error.map(|e| e.0), Some(447));
    assert!(
        h.server.complete_connect(now, id2, true, &mut out).is_none(),
        "forgotten"
    );
    assert!(matches!(
        h.request(
            now,
            &mut c,
            Method::Connect,
            fresh_tid(),
            &[Attribute::XorPeerAddress(sa(P2))]
        ),
        Outcome::Connect { .. }
    ));
    // Connect on a UDP allocation: 400.
    let mut u = Client::bob();
    h.allocate_ok(now, &mut u, relay(8));
    let r = h.respond(now, &mut u, Method::Connect, &[Attribute::XorPeerAddress(sa(P1))]);
    assert_error(&r, Method::Connect, 400);
}

#[test]
fn rfc6062_5_3_and_5_4_peer_connection_attempt_bind_and_timeouts() {
    let mut h = Harness::new();
    let now = h.t0;
    let mut c = tcp_allocation(&mut h, now);
    let peer = sa(P1);
    // RFC 6062 §5.3: no permission, the connection is closed.
    let mut out = Vec::new();
    assert_eq!(
        h.server.peer_connection(now, relay(7), peer, &mut out),
        PeerConnectionAction::Refuse(DropReason::NoPermission)
    );
    assert_eq!(
        h.server.peer_connection(now, relay(9), peer, &mut out),
        PeerConnectionAction::Refuse(DropReason::NoAllocation)
    );
    assert_success(&h.create_permission(now, &mut c, &[peer]), Method::CreatePermission);
    let id = match h.server.peer_connection(now, relay(7), peer, &mut out) {
        PeerConnectionAction::Attempt { control, connection_id } => {
            assert_eq!(control, c.ft);
            connection_id
        }
        other => panic!("{other:?}"),
    };
    // The ConnectionAttempt indication: XOR-PEER-ADDRESS and CONNECTION-ID.
    let m = decode(&out);
    assert_eq!(m.method(), Method::ConnectionAttempt);
    assert_eq!(m.class(), Class::Indication);
    assert_eq!(get(&m, kind::XOR_PEER_ADDRESS), Attribute::XorPeerAddress(peer));
    assert_eq!(get(&m, kind::CONNECTION_ID), Attribute::ConnectionId(id));
    h.all_events();

    // ConnectionBind on the control connection: 400 (it holds the allocation).
    let bind = [Attribute::ConnectionId(id)];
    assert_error(
        &h.respond(now, &mut c, Method::ConnectionBind, &bind),
        Method::ConnectionBind,
        400,
    );
    // On a new TCP connection of the same user: success, and the event to link them.
    let mut d = Client::alice();
    d.ft = tcp_five_tuple("203.0.113.10:40002");
    // RFC 6062 clients reuse one nonce across their connections: accepted over TCP.
    d.nonce = c.nonce.clone();
    let r = h.respond(now, &mut d, Method::ConnectionBind, &bind);
    assert_success(&r, Method::ConnectionBind);
    let events = h.all_events();
    assert!(events.contains(&Event::ConnectionBound {
        connection_id: id,
        data: d.ft,
        peer
    }));
    // Bound: a second bind is 400; an unknown id is 400; another user's is 441.
    let mut d2 = Client::alice();
    d2.ft = tcp_five_tuple("203.0.113.10:40003");
    assert_error(
        &h.respond(now, &mut d2, Method::ConnectionBind, &bind),
        Method::ConnectionBind,
        400,
    );
    let unknown = [Attribute::ConnectionId(id ^ 0x100)];
    assert_error(
        &h.respond(now, &mut d2, Method::ConnectionBind, &unknown),
        Method::ConnectionBind,
        400,
    );
    let id2 = match h.server.peer_connection(now, relay(7), sa("8.8.8.8:4001"), &mut out) {
        PeerConnectionAction::Attempt { connection_id, .. } => connection_id,
        other => panic!("{other:?}"),
    };
    let mut b = Client::bob();
    b.ft = tcp_five_tuple("203.0.113.20:40002");
    let r = h.respond(now, &mut b, Method::ConnectionBind, &[Attribute::ConnectionId(id2)]);
    assert_error(&r, Method::ConnectionBind, 441);
    // A ConnectionBind over UDP: 400.
    let mut u = Client::alice();
    u.ft = five_tuple("203.0.113.10:40004");
    assert_error(
        &h.respond(now, &mut u, Method::ConnectionBind, &[Attribute::ConnectionId(id2)]),
        Method::ConnectionBind,
        400,
    );
    // Another shard's CONNECTION-ID: the shell moves the connection there.
    let foreign = [Attribute::ConnectionId((id2 & !0xFF) | 3)];
    assert!(matches!(
        h.request(now, &mut d2, Method::ConnectionBind, fresh_tid(), &foreign),
        Outcome::Elsewhere(3)
    ));

    // RFC 6062 §5.3: not bound within 30 s, the peer data connection is closed.
    h.server.handle_timeout(now + BIND_TIMEOUT - Duration::from_millis(1));
    assert!(!h
        .all_events()
        .contains(&Event::PeerConnectionClosed { connection_id: id2 }));
    h.server.handle_timeout(now + BIND_TIMEOUT);
    assert!(h
        .all_events()
        .contains(&Event::PeerConnectionClosed { connection_id: id2 }));
    assert_eq!(h.server.tcp_connection_count(), 1, "the bound one stays");

    // The allocation ends: its connections end with it.
    let later = now + BIND_TIMEOUT;
    assert_success(&h.refresh(later, &mut c, Some(0)), Method::Refresh);
    assert!(h
        .all_events()
        .contains(&Event::PeerConnectionClosed { connection_id: id }));
    assert_eq!(h.server.tcp_connection_count(), 0);
}

#[test]
fn nonces_are_bound_to_ip_and_port_over_udp_and_to_the_ip_over_tcp() {
    let mut h = Harness::new();
    let now = h.t0;
    // UDP: a nonce from one port is stale on another (RFC 8489 §9.2.4, defect 2).
    let mut a = Client::alice();
    h.challenge(now, &mut a);
    let mut b = Client::alice();
    b.ft = five_tuple("203.0.113.10:40009");
    b.nonce = a.nonce.clone();
    let r = h
        .send(
            now,
            b.ft,
            &b.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
        )
        .response();
    assert_error(&r, Method::Allocate, 438);
    // TCP: the same IP's other connection may use it.
    let mut a = Client::alice();
    a.ft = tcp_five_tuple("203.0.113.10:41000");
    h.challenge(now, &mut a);
    let mut b = Client::alice();
    b.ft = tcp_five_tuple("203.0.113.10:41001");
    b.nonce = a.nonce.clone();
    assert!(matches!(
        h.send(
            now,
            b.ft,
            &b.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)])
        ),
        Outcome::Allocate(_)
    ));
    // Another IP: stale.
    let mut e = Client::alice();
    e.ft = tcp_five_tuple("203.0.113.11:41001");
    e.nonce = a.nonce.clone();
    let r = h
        .send(
            now,
            e.ft,
            &e.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
        )
        .response();
    assert_error(&r, Method::Allocate, 438);
}
