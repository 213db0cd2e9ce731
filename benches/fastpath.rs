//! Micro-benchmarks of the codec and the sans-IO fast path (criterion). For noise-free
//! numbers on a busy machine, count instructions instead:
//! `valgrind --tool=callgrind target/release/deps/fastpath-* --bench --profile-time 1 NAME`.

use std::hint::black_box;
use std::net::SocketAddr;

mod support;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::server::{ClientAction, PeerAction};
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{Attribute, Class, Message, MessageBuilder, MessageType, Method, TransactionId};

const RFC5769_2_1: &str = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
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
    let (mut server, ft, relayed, peer, now) = support::server_with_channel();
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
