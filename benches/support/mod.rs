//! The setup shared by `benches/fastpath.rs` (criterion) and
//! `examples/fastpath_instructions.rs` (callgrind): a sans-IO server with one allocation and one
//! channel binding, set up through the same requests a real client sends.

use std::net::SocketAddr;
use std::time::Instant;

use turnpike::proto::allocation::FiveTuple;
use turnpike::proto::auth::Credentials;
use turnpike::proto::peer_policy::PeerPolicy;
use turnpike::proto::server::{ClientAction, Server, ServerConfig};
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::integrity::LongTermKey;
use turnpike::proto::stun::{
    Attribute, Class, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

/// A server with one allocation (relayed 198.51.100.1:50000) and channel 0x4000 bound to
/// peer 8.8.8.8:4000, as a real client would set them up.
pub fn server_with_channel() -> (Server, FiveTuple, SocketAddr, SocketAddr, Instant) {
    let now = Instant::now();
    let config = ServerConfig {
        challenge_rate: 0,
        request_rate: 0,
        ..ServerConfig::default()
    };
    let realm = config.realm.clone();
    let creds = Credentials::new([("alice".to_string(), "pw".to_string())], vec![], &realm);
    let mut server = Server::new(config, creds, PeerPolicy::default(), [5; 32], now, 1_700_000_000);
    let ft = FiveTuple::udp("192.0.2.10:40000".parse().unwrap(), "192.0.2.1:3478".parse().unwrap());
    let relayed: SocketAddr = "198.51.100.1:50000".parse().unwrap();
    let peer: SocketAddr = "8.8.8.8:4000".parse().unwrap();
    let key = LongTermKey::derive(PasswordAlgorithm::Md5, "alice", &realm, "pw");
    let mut out = Vec::new();
    // 401 for the nonce.
    let mut req = Vec::new();
    let mut b = MessageBuilder::new(
        &mut req,
        MessageType::new(Method::Allocate, Class::Request),
        TransactionId([1; 12]),
    );
    b.attribute(&Attribute::RequestedTransport(17));
    assert!(matches!(
        server.handle_client(now, ft, &req, &mut out),
        ClientAction::Respond(_)
    ));
    let nonce = match Message::decode(&out).unwrap().get(kind::NONCE) {
        Some(Ok(Attribute::Nonce(n))) => n.to_string(),
        _ => panic!("no nonce"),
    };
    let authed = |method: Method, tid: u8, attrs: &[Attribute<'_>]| {
        let mut m = Vec::new();
        let mut b = MessageBuilder::new(
            &mut m,
            MessageType::new(method, Class::Request),
            TransactionId([tid; 12]),
        );
        for a in attrs {
            b.attribute(a);
        }
        b.attribute(&Attribute::Username("alice"));
        b.attribute(&Attribute::Realm(&realm));
        b.attribute(&Attribute::Nonce(&nonce));
        b.message_integrity(key.as_bytes());
        m
    };
    let alloc = authed(Method::Allocate, 2, &[Attribute::RequestedTransport(17)]);
    let ClientAction::Allocate(ticket) = server.handle_client(now, ft, &alloc, &mut out) else {
        panic!("allocate")
    };
    server.complete_allocate(now, ticket, Ok(relayed), &mut out);
    let bind = authed(
        Method::ChannelBind,
        3,
        &[Attribute::ChannelNumber(0x4000), Attribute::XorPeerAddress(peer)],
    );
    assert!(matches!(
        server.handle_client(now, ft, &bind, &mut out),
        ClientAction::Respond(_)
    ));
    (server, ft, relayed, peer, now)
}
