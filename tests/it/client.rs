//! A blocking TURN client on turnpike's own codec, for tests: long-term credentials with
//! MD5 or SHA-256 (RFC 8489 §9.2), retransmission, and helpers for the TURN methods.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::integrity::{self, LongTermKey};
use turnpike::proto::stun::{
    Attribute, Class, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

/// An owned STUN response.
pub struct Response(pub Vec<u8>);

impl Response {
    pub fn msg(&self) -> Message<'_> {
        Message::decode(&self.0).expect("valid STUN response")
    }

    pub fn class(&self) -> Class {
        self.msg().class()
    }

    pub fn error_code(&self) -> Option<u16> {
        match self.msg().get(kind::ERROR_CODE) {
            Some(Ok(Attribute::ErrorCode { code, .. })) => Some(code.0),
            _ => None,
        }
    }

    pub fn addr(&self, k: u16) -> Option<SocketAddr> {
        match self.msg().get(k)? {
            Ok(Attribute::XorRelayedAddress(a) | Attribute::XorMappedAddress(a) | Attribute::XorPeerAddress(a)) => {
                Some(a)
            }
            _ => None,
        }
    }
}

pub struct Client {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    user: String,
    password: String,
    algorithm: PasswordAlgorithm,
    realm: Option<String>,
    nonce: Option<String>,
    offered: Vec<u8>,
    key: Option<LongTermKey>,
    counter: u64,
}

impl Client {
    pub fn new(server: SocketAddr, user: &str, password: &str, algorithm: PasswordAlgorithm) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        Client {
            sock,
            server,
            user: user.into(),
            password: password.into(),
            algorithm,
            realm: None,
            nonce: None,
            offered: Vec::new(),
            key: None,
            counter: 0,
        }
    }

    /// A client on an IPv6 loopback socket.
    pub fn new6(server: SocketAddr, user: &str, password: &str) -> Client {
        let mut c = Client::new(server, user, password, PasswordAlgorithm::Md5);
        c.sock = UdpSocket::bind("[::1]:0").unwrap();
        c.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        c
    }

    fn tid(&mut self) -> TransactionId {
        self.counter += 1;
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.counter.to_be_bytes());
        t[8..].copy_from_slice(&std::process::id().to_be_bytes());
        TransactionId(t)
    }

    /// Sends a request with `attrs` and returns the response (retransmitting up to 5 times).
    /// Authenticates after a 401 and refreshes the nonce after a 438, once each.
    pub fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Response {
        for _ in 0..3 {
            let tid = self.tid();
            let mut out = Vec::new();
            let mut b = MessageBuilder::new(&mut out, MessageType::new(method, Class::Request), tid);
            for a in attrs {
                b.attribute(a);
            }
            let with_auth = self.key.is_some();
            if let (Some(key), Some(realm), Some(nonce)) = (&self.key, &self.realm, &self.nonce) {
                b.attribute(&Attribute::Username(&self.user));
                b.attribute(&Attribute::Realm(realm));
                b.attribute(&Attribute::Nonce(nonce));
                if self.algorithm == PasswordAlgorithm::Sha256 {
                    b.attribute(&Attribute::PasswordAlgorithm {
                        algorithm: 2,
                        params: &[],
                    });
                    b.raw_attribute(kind::PASSWORD_ALGORITHMS, &self.offered);
                    b.message_integrity_sha256(key.as_bytes());
                } else {
                    b.message_integrity(key.as_bytes());
                }
            }
            b.fingerprint();
            let resp = self.transact(&out, tid);
            let m = resp.msg();
            assert_eq!(m.transaction_id(), tid);
            integrity::verify_fingerprint(&m).expect("response FINGERPRINT");
            match resp.error_code() {
                Some(401) if !with_auth => self.learn(&resp),
                Some(438) => self.learn(&resp),
                _ => {
                    if with_auth && resp.error_code() != Some(401) {
                        let key = self.key.as_ref().unwrap().as_bytes();
                        match self.algorithm {
                            PasswordAlgorithm::Sha256 => {
                                assert!(m.integrity_offset().is_none(), "SHA-256 request answered with SHA-1 MI");
                                integrity::verify_message_integrity_sha256(&m, key)
                                    .expect("response MESSAGE-INTEGRITY-SHA256")
                            }
                            PasswordAlgorithm::Md5 => {
                                integrity::verify_message_integrity(&m, key).expect("response MESSAGE-INTEGRITY")
                            }
                        }
                    }
                    return resp;
                }
            }
        }
        panic!("authentication loop did not settle");
    }

    fn learn(&mut self, resp: &Response) {
        let m = resp.msg();
        if let Some(Ok(Attribute::Realm(r))) = m.get(kind::REALM) {
            self.realm = Some(r.to_string());
        }
        if let Some(Ok(Attribute::Nonce(n))) = m.get(kind::NONCE) {
            self.nonce = Some(n.to_string());
        }
        if let Some(raw) = m.raw(kind::PASSWORD_ALGORITHMS) {
            self.offered = raw.value.to_vec();
        }
        let realm = self.realm.as_deref().expect("REALM in 401");
        self.key = Some(LongTermKey::derive(self.algorithm, &self.user, realm, &self.password));
    }

    fn transact(&self, request: &[u8], tid: TransactionId) -> Response {
        let mut buf = [0u8; 2048];
        for _ in 0..5 {
            self.sock.send_to(request, self.server).unwrap();
            while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                if let Ok(m) = Message::decode(&buf[..n]) {
                    if m.transaction_id() == tid {
                        return Response(buf[..n].to_vec());
                    }
                }
            }
        }
        panic!("no response from {}", self.server);
    }

    /// Allocate (UDP); returns the success response.
    pub fn allocate(&mut self) -> Response {
        self.request(Method::Allocate, &[Attribute::RequestedTransport(17)])
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Response {
        self.request(Method::CreatePermission, &[Attribute::XorPeerAddress(peer)])
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Response {
        self.request(
            Method::ChannelBind,
            &[Attribute::ChannelNumber(channel), Attribute::XorPeerAddress(peer)],
        )
    }

    pub fn send_channel_data(&self, channel: u16, payload: &[u8]) {
        let mut out = Vec::new();
        ChannelData { channel, payload }.encode(&mut out);
        self.sock.send_to(&out, self.server).unwrap();
    }

    /// Receives the next ChannelData or Data indication payload from the server.
    pub fn recv_data(&self) -> Option<(Vec<u8>, Option<u16>)> {
        let mut buf = [0u8; 2048];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        if let Ok(cd) = ChannelData::decode(&buf[..n]) {
            return Some((cd.payload.to_vec(), Some(cd.channel)));
        }
        let m = Message::decode(&buf[..n]).ok()?;
        match m.get(kind::DATA) {
            Some(Ok(Attribute::Data(d))) if m.method() == Method::Data => Some((d.to_vec(), None)),
            _ => None,
        }
    }
}
