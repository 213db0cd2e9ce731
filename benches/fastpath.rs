//! Micro-benchmarks of the codec and the sans-IO fast path (criterion). For noise-free
//! numbers on a busy machine, count instructions instead:
//! `valgrind --tool=callgrind target/release/deps/fastpath-* --bench --profile-time 1 NAME`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turnpike::proto::allocation::FiveTuple;
use turnpike::proto::auth::Credentials;
use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::peer_policy::PeerPolicy;
use turnpike::proto::server::{ClientAction, PeerAction, Server, ServerConfig};
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::integrity::LongTermKey;
use turnpike::proto::stun::{
    Attribute, Class, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

const RFC5769_2_1: &str = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A server with one allocation (relayed 198.51.100.1:50000) and channel 0x4000 bound to
/// peer 8.8.8.8:4000, as a real client would set them up.
fn server_with_channel() -> (Server, FiveTuple, SocketAddr, SocketAddr, Instant) {
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

fn codec(c: &mut Criterion) {
    let binding = unhex(RFC5769_2_1);
    c.bench_function("stun_decode_rfc5769_request", |b| {
        b.iter(|| {
            let m = Message::decode(black_box(&binding)).unwrap();
            black_box(m.get(kind::USERNAME));
        })
    });
    let mut cd = Vec::new();
    ChannelData {
        channel: 0x4000,
        payload: &[7u8; 1200],
    }
    .encode(&mut cd);
    c.bench_function("channel_data_decode", |b| {
        b.iter(|| black_box(ChannelData::decode(black_box(&cd)).unwrap()))
    });
}

fn fast_path(c: &mut Criterion) {
    let (mut server, ft, relayed, peer, now) = server_with_channel();
    let mut out = Vec::with_capacity(2048);
    let mut cd = Vec::new();
    ChannelData {
        channel: 0x4000,
        payload: &[7u8; 100],
    }
    .encode(&mut cd);
    let mut group = c.benchmark_group("fast_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("channel_data_client_to_peer", |b| {
        b.iter(|| match server.handle_client(now, ft, black_box(&cd), &mut out) {
            ClientAction::Relay { payload, .. } => {
                black_box(payload);
            }
            other => panic!("{other:?}"),
        })
    });
    group.bench_function("peer_to_client_channel", |b| {
        b.iter(
            || match server.handle_peer(now, black_box(relayed), black_box(peer), 100) {
                PeerAction::Forward { channel: Some(ch), .. } => {
                    black_box(ChannelData::header(ch, 100));
                }
                other => panic!("{other:?}"),
            },
        )
    });
    let mut send = Vec::new();
    let mut b = MessageBuilder::new(
        &mut send,
        MessageType::new(Method::Send, Class::Indication),
        TransactionId([9; 12]),
    );
    b.attribute(&Attribute::XorPeerAddress(peer));
    b.attribute(&Attribute::Data(&[7u8; 100]));
    group.bench_function("send_indication_client_to_peer", |b| {
        b.iter(|| match server.handle_client(now, ft, black_box(&send), &mut out) {
            ClientAction::Relay { payload, .. } => {
                black_box(payload);
            }
            other => panic!("{other:?}"),
        })
    });
    let other: SocketAddr = "1.1.1.1:5000".parse().unwrap();
    group.bench_function("data_indication_encode", |b| {
        b.iter(|| {
            server.encode_data_indication(black_box(other), black_box(&[7u8; 100]), &mut out);
            black_box(out.len());
        })
    });
    group.finish();
}

#[allow(missing_docs)]
mod groups {
    use super::*;
    criterion_group!(benches, codec, fast_path);
}
criterion_main!(groups::benches);
