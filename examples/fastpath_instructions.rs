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
//! `benches/support` (shared with `benches/fastpath.rs`). Instructions per packet are the difference
//! of two runs divided by the difference of their counts, which cancels the setup:
//! (Ir(400000) − Ir(200000)) / 200000. `bench/fastpath-instructions.sh` does all of it.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use turnpike::proto::allocation::FiveTuple;
use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::server::{ClientAction, PeerAction, Server};
use turnpike::proto::stun::{Attribute, Class, MessageBuilder, MessageType, Method, TransactionId};

#[path = "../benches/support/mod.rs"]
mod support;

const USAGE: &str = "usage: fastpath_instructions <channel-data|peer|send> <packets>";

/// Payload size of every forwarded packet, in bytes.
const PAYLOAD: usize = 100;

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
    let (mut server, ft, relayed, peer, now) = support::server_with_channel();
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
