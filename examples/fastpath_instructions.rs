//! Runs N packets through one branch of the sans-IO fast path, for counting instructions per
//! forwarded packet with callgrind (exact and stable on a busy machine, unlike wall time).
//!
//! ```sh
//! cargo build --release --example fastpath_instructions
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
//!     target/release/examples/fastpath_instructions channel-data 200000
//! ```
//!
//! Modes: `channel-data` (a 100-byte ChannelData frame from the client on its bound channel,
//! `Server::handle_client` → `Relay`), `peer` (100 bytes from the bound peer,
//! `Server::handle_peer` → `Forward` on the channel), `send` (a Send indication with 100 bytes
//! of data to the bound peer, `Server::handle_client` → `Relay`). The setup is the same as
//! `server_with_channel()` in `benches/fastpath.rs`. Instructions per packet are the difference
//! of two runs divided by the difference of their counts, which cancels the setup:
//! (Ir(400000) − Ir(200000)) / 200000. `bench/fastpath-instructions.sh` does all of it.

use std::hint::black_box;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Instant;

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

const USAGE: &str = "usage: fastpath_instructions <channel-data|peer|send> <packets>";

/// Payload size of every forwarded packet, in bytes.
const PAYLOAD: usize = 100;

/// A server with one allocation (relayed 198.51.100.1:50000) and channel 0x4000 bound to
/// peer 8.8.8.8:4000, as a real client would set them up (the same as `benches/fastpath.rs`).
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

/// Which branch of the fast path to drive.
#[derive(Clone, Copy)]
enum Mode {
    ChannelData,
    Peer,
    Send,
}

fn parse_args() -> Option<(Mode, u64)> {
    let mut args = std::env::args().skip(1);
    let mode = match args.next()?.as_str() {
        "channel-data" => Mode::ChannelData,
        "peer" => Mode::Peer,
        "send" => Mode::Send,
        _ => return None,
    };
    let packets = args.next()?.parse().ok()?;
    args.next().is_none().then_some((mode, packets))
}

/// Client → peer through `handle_client`: `frame` must come back as a `Relay` to `peer`.
fn client_to_peer(server: &mut Server, now: Instant, ft: FiveTuple, frame: &[u8], packets: u64) {
    let mut out = Vec::with_capacity(2048);
    for _ in 0..packets {
        match server.handle_client(black_box(now), black_box(ft), black_box(frame), &mut out) {
            ClientAction::Relay { relayed, peer, payload } => {
                black_box((relayed, peer, payload));
            }
            other => panic!("expected Relay, got {other:?}"),
        }
    }
    black_box(&out);
}

fn main() -> ExitCode {
    let Some((mode, packets)) = parse_args() else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let (mut server, ft, relayed, peer, now) = server_with_channel();
    let payload = [7u8; PAYLOAD];
    match mode {
        Mode::ChannelData => {
            let mut frame = Vec::new();
            ChannelData {
                channel: 0x4000,
                payload: &payload,
            }
            .encode(&mut frame);
            client_to_peer(&mut server, now, ft, &frame, packets);
        }
        Mode::Send => {
            let mut frame = Vec::new();
            let mut b = MessageBuilder::new(
                &mut frame,
                MessageType::new(Method::Send, Class::Indication),
                TransactionId([9; 12]),
            );
            b.attribute(&Attribute::XorPeerAddress(peer));
            b.attribute(&Attribute::Data(&payload));
            client_to_peer(&mut server, now, ft, &frame, packets);
        }
        Mode::Peer => {
            for _ in 0..packets {
                match server.handle_peer(black_box(now), black_box(relayed), black_box(peer), black_box(PAYLOAD)) {
                    PeerAction::Forward {
                        five_tuple,
                        channel: Some(ch),
                    } => {
                        black_box((five_tuple, ChannelData::header(ch, PAYLOAD as u16)));
                    }
                    other => panic!("expected Forward on a channel, got {other:?}"),
                }
            }
        }
    }
    println!("{packets}");
    ExitCode::SUCCESS
}
