//! A sans-IO STUN/TURN client: builds requests and reads their responses, with the
//! long-term credential mechanism (RFC 8489 §9.2) done once for every user of it: the
//! integration tests' blocking client, `turnpike probe` and loadgen. Sockets, timers and
//! retransmissions stay with the caller.
//!
//! ```
//! use turnpike_proto::client::{Client, Reply};
//! use turnpike_proto::stun::{Attribute, Message, Method, PasswordAlgorithm, TransactionId};
//!
//! let mut client = Client::new("alice", "pw", PasswordAlgorithm::Md5);
//! let mut out = Vec::new();
//! // The first request goes without credentials; the server answers 401 with REALM and
//! // NONCE, `handle_response` learns them and says to send the request again (signed).
//! let signed = client.encode_request(Method::Allocate, TransactionId([1; 12]), &[Attribute::RequestedTransport(17)], &mut out);
//! assert!(!signed);
//! # let _ = Message::decode(&out).unwrap();
//! ```

use crate::stun::attribute::kind;
use crate::stun::integrity::{self, LongTermKey};
use crate::stun::{
    Attribute, Class, ErrorCode, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

/// What a response means for the request it answers, from [`Client::handle_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A success response (its integrity verified when the request was signed).
    Success,
    /// An error response other than a challenge the client can answer.
    Error(ErrorCode),
    /// A 401 to an unsigned request, a 401 with a new nonce, or a 438: the client learned
    /// REALM and NONCE; send the request again (a new transaction) and it will be signed.
    Retry,
    /// A 401 to a request already signed with the current nonce: wrong credentials.
    Unauthorized,
    /// A response to a signed request whose MESSAGE-INTEGRITY(-SHA256) does not verify,
    /// or a success response to a signed request without any: not from the server.
    IntegrityFailed,
}

/// A TURN client's long-term credentials and what it learned from the server (realm,
/// nonce, offered password algorithms). One per client 5-tuple: the server binds each
/// nonce to the client's IP and port (RFC 8489 §9.2.4).
#[derive(Clone)]
pub struct Client {
    username: String,
    password: String,
    algorithm: PasswordAlgorithm,
    realm: Option<String>,
    nonce: Option<String>,
    /// The PASSWORD-ALGORITHMS value of the last challenge, repeated with SHA-256
    /// (RFC 8489 §9.2.4 bullet 5, downgrade protection).
    offered: Vec<u8>,
    key: Option<LongTermKey>,
    fingerprint: bool,
    /// No credentials: STUN Binding only (RFC 8489 §3); a challenge is an error.
    anonymous: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("username", &self.username)
            .field("algorithm", &self.algorithm)
            .field("realm", &self.realm)
            .field("nonce", &self.nonce)
            .finish()
    }
}

impl Client {
    /// A client for `username` with `password`, deriving its key with `algorithm` (MD5, or
    /// SHA-256 with MESSAGE-INTEGRITY-SHA256 and PASSWORD-ALGORITHM, RFC 8489 §9.2.2).
    /// Requests carry FINGERPRINT unless [`Client::without_fingerprint`].
    pub fn new(username: &str, password: &str, algorithm: PasswordAlgorithm) -> Self {
        Client {
            username: username.into(),
            password: password.into(),
            algorithm,
            realm: None,
            nonce: None,
            offered: Vec::new(),
            key: None,
            fingerprint: true,
            anonymous: false,
        }
    }

    /// A client without credentials, for STUN Binding (e.g. RFC 5780 NAT behaviour
    /// discovery): it never signs, and a 401 or 438 is [`Reply::Error`].
    pub fn anonymous() -> Self {
        Client {
            anonymous: true,
            ..Client::new("", "", PasswordAlgorithm::Md5)
        }
    }

    /// The same client sending no FINGERPRINT.
    pub fn without_fingerprint(mut self) -> Self {
        self.fingerprint = false;
        self
    }

    /// The nonce learned last, if any.
    pub fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref()
    }

    /// The realm learned last, if any.
    pub fn realm(&self) -> Option<&str> {
        self.realm.as_deref()
    }

    /// Takes a realm and nonce learned elsewhere, so that the next request is signed (one
    /// round trip fewer where the server's nonces allow it; turnpike's are bound to the
    /// client's IP and port, so there it costs a 438 instead).
    pub fn set_realm_and_nonce(&mut self, realm: &str, nonce: &str) {
        if self.realm.as_deref() != Some(realm) {
            self.learn_realm(realm);
        }
        self.nonce = Some(nonce.into());
    }

    /// Whether requests will be signed (a realm and nonce are known).
    pub fn is_authenticated(&self) -> bool {
        self.key.is_some() && self.nonce.is_some()
    }

    /// Writes a request of `method` with `attrs` into `out` (cleared first), then USERNAME,
    /// REALM, NONCE (and PASSWORD-ALGORITHM(S) for SHA-256) and the integrity attribute when
    /// a realm and nonce are known, then FINGERPRINT. Returns whether it is signed (pass
    /// that to [`Client::handle_response`]).
    pub fn encode_request(
        &self,
        method: Method,
        tid: TransactionId,
        attrs: &[Attribute<'_>],
        out: &mut Vec<u8>,
    ) -> bool {
        let mut b = MessageBuilder::new(out, MessageType::new(method, Class::Request), tid);
        for a in attrs {
            b.attribute(a);
        }
        let signed = match (&self.key, &self.realm, &self.nonce) {
            (Some(key), Some(realm), Some(nonce)) => {
                b.attribute(&Attribute::Username(&self.username));
                b.attribute(&Attribute::Realm(realm));
                b.attribute(&Attribute::Nonce(nonce));
                match self.algorithm {
                    PasswordAlgorithm::Sha256 => {
                        b.attribute(&Attribute::PasswordAlgorithm {
                            algorithm: PasswordAlgorithm::Sha256.to_u16(),
                            params: &[],
                        });
                        b.raw_attribute(kind::PASSWORD_ALGORITHMS, &self.offered);
                        b.message_integrity_sha256(key.as_bytes());
                    }
                    PasswordAlgorithm::Md5 => {
                        b.message_integrity(key.as_bytes());
                    }
                }
                true
            }
            _ => false,
        };
        if self.fingerprint {
            b.fingerprint();
        }
        signed
    }

    /// Reads the response to a request built by [`Client::encode_request`] (`signed` is what
    /// that returned). Learns REALM, NONCE and PASSWORD-ALGORITHMS from 401 and 438.
    pub fn handle_response(&mut self, msg: &Message<'_>, signed: bool) -> Reply {
        let code = match msg.get(kind::ERROR_CODE) {
            Some(Ok(Attribute::ErrorCode { code, .. })) => Some(code),
            _ => None,
        };
        match (msg.class(), code.map(|c| c.0)) {
            (Class::Error, Some(401 | 438)) if self.anonymous => Reply::Error(code.expect("matched")),
            (Class::Error, Some(401)) => {
                let fresh = self.learn(msg);
                if !signed || fresh {
                    Reply::Retry
                } else {
                    Reply::Unauthorized
                }
            }
            (Class::Error, Some(438)) => {
                self.learn(msg);
                Reply::Retry
            }
            (class, _) => {
                if signed && !self.verifies(msg, class == Class::Success) {
                    return Reply::IntegrityFailed;
                }
                match (class, code) {
                    (Class::Error, Some(code)) => Reply::Error(code),
                    (Class::Error, None) => Reply::Error(ErrorCode(0)),
                    _ => Reply::Success,
                }
            }
        }
    }

    /// Verifies the integrity of a response to a signed request with the variant the
    /// request used; `required`: a missing integrity attribute fails too.
    fn verifies(&self, msg: &Message<'_>, required: bool) -> bool {
        let Some(key) = &self.key else {
            return false;
        };
        match self.algorithm {
            PasswordAlgorithm::Sha256 if msg.integrity_sha256_offset().is_some() => {
                integrity::verify_message_integrity_sha256(msg, key.as_bytes()).is_ok()
            }
            PasswordAlgorithm::Md5 if msg.integrity_offset().is_some() => {
                matches!(
                    msg.get(kind::MESSAGE_INTEGRITY),
                    Some(Ok(Attribute::MessageIntegrity(_)))
                ) && integrity::verify_message_integrity(msg, key.as_bytes()).is_ok()
            }
            // The other variant, or none: an error response may come unsigned (e.g. 400 for
            // a malformed request); a success response may not.
            _ => !required && msg.integrity_offset().is_none() && msg.integrity_sha256_offset().is_none(),
        }
    }

    /// Takes REALM, NONCE and PASSWORD-ALGORITHMS from a challenge; returns whether the
    /// nonce changed.
    fn learn(&mut self, msg: &Message<'_>) -> bool {
        if let Some(Ok(Attribute::Realm(r))) = msg.get(kind::REALM) {
            if self.realm.as_deref() != Some(r) {
                self.learn_realm(r);
            }
        }
        if let Some(raw) = msg.raw(kind::PASSWORD_ALGORITHMS) {
            self.offered = raw.value.to_vec();
        }
        match msg.get(kind::NONCE) {
            Some(Ok(Attribute::Nonce(n))) => {
                let fresh = self.nonce.as_deref() != Some(n);
                self.nonce = Some(n.into());
                fresh
            }
            _ => false,
        }
    }

    fn learn_realm(&mut self, realm: &str) {
        self.key = Some(LongTermKey::derive(
            self.algorithm,
            &self.username,
            realm,
            &self.password,
        ));
        self.realm = Some(realm.into());
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use super::*;
    use crate::allocation::FiveTuple;
    use crate::auth::Credentials;
    use crate::peer_policy::PeerPolicy;
    use crate::server::{ClientAction, Server, ServerConfig};

    fn server() -> (Server, FiveTuple, Instant) {
        let now = Instant::now();
        let config = ServerConfig::default();
        let creds = Credentials::new([("alice".to_string(), "pw".to_string())], vec![], &config.realm);
        let server = Server::new(config, creds, PeerPolicy::default(), [5; 32], now, 1_700_000_000);
        let ft = FiveTuple::udp(
            "203.0.113.1:5000".parse::<SocketAddr>().unwrap(),
            "192.0.2.9:3478".parse().unwrap(),
        );
        (server, ft, now)
    }

    /// One request through the real sans-IO server: the response bytes (or None for a ticket
    /// or drop).
    fn exchange(server: &mut Server, ft: FiveTuple, now: Instant, req: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match server.handle_client(now, ft, req, &mut out) {
            ClientAction::Respond(_) => Some(out),
            _ => None,
        }
    }

    fn refresh_round(algorithm: PasswordAlgorithm, password: &str) -> Vec<Reply> {
        let (mut server, ft, now) = server();
        let mut c = Client::new("alice", password, algorithm);
        let mut replies = Vec::new();
        let mut out = Vec::new();
        for i in 0..3u8 {
            let signed = c.encode_request(Method::Refresh, TransactionId([i; 12]), &[], &mut out);
            let resp = exchange(&mut server, ft, now, &out).expect("answered");
            let reply = c.handle_response(&Message::decode(&resp).unwrap(), signed);
            replies.push(reply);
            if reply != Reply::Retry {
                break;
            }
        }
        replies
    }

    #[test]
    fn challenge_then_signed_request_md5_and_sha256() {
        for alg in [PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256] {
            // No allocation: the signed Refresh is answered 437, with verified integrity.
            let replies = refresh_round(alg, "pw");
            assert_eq!(replies, vec![Reply::Retry, Reply::Error(ErrorCode(437))], "{alg:?}");
        }
    }

    #[test]
    fn wrong_password_is_unauthorized_not_a_loop() {
        let replies = refresh_round(PasswordAlgorithm::Md5, "wrong");
        assert_eq!(replies, vec![Reply::Retry, Reply::Unauthorized]);
    }

    #[test]
    fn anonymous_client_gets_errors_not_retries() {
        let (mut server, ft, now) = server();
        let mut c = Client::anonymous();
        let mut out = Vec::new();
        let signed = c.encode_request(
            Method::Allocate,
            TransactionId([9; 12]),
            &[Attribute::RequestedTransport(17)],
            &mut out,
        );
        assert!(!signed);
        let resp = exchange(&mut server, ft, now, &out).unwrap();
        assert_eq!(
            c.handle_response(&Message::decode(&resp).unwrap(), signed),
            Reply::Error(ErrorCode(401))
        );
        assert!(!c.is_authenticated());
    }

    #[test]
    fn tampered_success_fails_integrity() {
        let (mut server, ft, now) = server();
        let mut c = Client::new("alice", "pw", PasswordAlgorithm::Md5);
        let mut out = Vec::new();
        let signed = c.encode_request(Method::Binding, TransactionId([1; 12]), &[], &mut out);
        assert!(!signed);
        let resp = exchange(&mut server, ft, now, &out).unwrap();
        assert_eq!(
            c.handle_response(&Message::decode(&resp).unwrap(), signed),
            Reply::Success
        );
        // A success without integrity answering a signed request is refused.
        let unsigned_success = resp.clone();
        c.set_realm_and_nonce("turnpike", "n");
        assert!(c.is_authenticated());
        assert_eq!(
            c.handle_response(&Message::decode(&unsigned_success).unwrap(), true),
            Reply::IntegrityFailed
        );
    }
}
