//! A blocking TURN client for tests: a socket and retransmissions around the sans-IO
//! `turnpike::proto::client::Client` (long-term credentials with MD5 or SHA-256, RFC 8489
//! §9.2), and helpers for the TURN methods.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::client::{self as proto, Reply};
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::integrity;
use turnpike::proto::stun::{Attribute, Class, Message, Method, PasswordAlgorithm, TransactionId};

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
            Ok(
                Attribute::XorRelayedAddress(a)
                | Attribute::XorMappedAddress(a)
                | Attribute::XorPeerAddress(a)
                | Attribute::AlternateServer(a),
            ) => Some(a),
            _ => None,
        }
    }
}

pub struct Client {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    /// The sans-IO client: credentials, realm, nonce, request encoding, response checks.
    proto: proto::Client,
    counter: u64,
}

impl Client {
    pub fn new(server: SocketAddr, user: &str, password: &str, algorithm: PasswordAlgorithm) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        Client {
            sock,
            server,
            proto: proto::Client::new(user, password, algorithm),
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
    /// Authenticates after a 401 and refreshes the nonce after a 438; the response's
    /// FINGERPRINT and, for signed requests, its integrity are verified.
    pub fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Response {
        for _ in 0..3 {
            let tid = self.tid();
            let mut out = Vec::new();
            let signed = self.proto.encode_request(method, tid, attrs, &mut out);
            let resp = self.transact(&out, tid);
            let m = resp.msg();
            assert_eq!(m.transaction_id(), tid);
            integrity::verify_fingerprint(&m).expect("response FINGERPRINT");
            match self.proto.handle_response(&m, signed) {
                Reply::Retry => continue,
                Reply::IntegrityFailed => panic!("response integrity does not verify"),
                Reply::Success | Reply::Error(_) | Reply::Unauthorized => return resp,
            }
        }
        panic!("authentication loop did not settle");
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
