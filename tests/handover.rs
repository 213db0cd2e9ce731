//! A datagram that reaches a shard which does not own its allocation (after a change of the
//! shard set, the kernel's SO_REUSEPORT hash may send a client elsewhere) is handed to the
//! owning shard over its queue and relayed, not dropped.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use turnpike::config::{Config, Settings};
use turnpike::dataplane::Runtime;
use turnpike::proto::allocation::FiveTuple;
use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::stun::{Class, PasswordAlgorithm};

#[path = "it/client.rs"]
#[allow(dead_code)]
mod client;

#[test]
fn datagram_on_a_non_owner_shard_is_handed_over() {
    let settings = Settings::load(<Settings as clap::Parser>::parse_from([
        "turnpike",
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--user",
        "alice:wonderland",
        "--allowed-peer-ip",
        "127.0.0.0/8",
        "--shards",
        "2",
        "--no-pin",
        "--io-backend",
        "mmsg",
    ]))
    .unwrap();
    let runtime = Runtime::new(Config::resolve(settings).unwrap()).unwrap();
    let server = runtime.listen_addrs()[0];
    let (shards, control) = runtime.into_parts();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_ctl = stop.clone();
    let control = thread::spawn(move || control.run(&stop_ctl));
    // Both shards run on threads of their own; the test takes them back afterwards.
    let mut handles = Vec::new();
    for mut shard in shards {
        let stop = stop.clone();
        handles.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                shard.turn(Duration::from_millis(5)).unwrap();
            }
            shard
        }));
    }

    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = client::Client::new(server, "alice", "wonderland", PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    assert_eq!(c.channel_bind(0x4000, peer_addr).class(), Class::Success);
    let ft = FiveTuple::udp(c.sock.local_addr().unwrap(), server);

    // Stop the shards, find the one that owns the allocation, and inject a ChannelData
    // datagram into the other one.
    stop.store(true, Ordering::Relaxed);
    let mut shards: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let owner = shards
        .iter()
        .position(|s| s.allocation_count() == 1)
        .expect("one shard owns it");
    let other = 1 - owner;
    assert_eq!(shards[other].allocation_count(), 0);
    let mut datagram = Vec::new();
    ChannelData {
        channel: 0x4000,
        payload: b"handed over",
    }
    .encode(&mut datagram);
    shards[other].inject(ft, &datagram);
    assert_eq!(shards[other].stats().handovers, 1, "the non-owner handed it over");
    // The owner relays it when it next turns.
    let deadline = Instant::now() + Duration::from_secs(2);
    while shards[owner].stats().handovers == 0 {
        assert!(Instant::now() < deadline, "the owner never received the handover");
        shards[owner].turn(Duration::from_millis(5)).unwrap();
    }
    let mut buf = [0u8; 64];
    let (n, from) = peer
        .recv_from(&mut buf)
        .expect("the peer receives the handed-over datagram");
    assert_eq!(&buf[..n], b"handed over");
    assert_eq!(from.ip(), server.ip());
    assert_eq!(shards[owner].stats().to_peer, 1);
    control.join().unwrap();
}
