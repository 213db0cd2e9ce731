//! Zero heap allocations per forwarded packet, in both directions and on both I/O
//! backends: a counting global allocator counts the allocations made on the shard's thread
//! (this test's main thread drives the shard) while a client and a peer on other threads
//! push thousands of datagrams through it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use turnpike::config::{Config, Settings};
use turnpike::dataplane::Runtime;
use turnpike::proto::stun::{Attribute, Class, Method, PasswordAlgorithm};

#[path = "it/client.rs"]
#[allow(dead_code)]
mod client;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; the bookkeeping touches only const-initialised
// thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNTING.try_with(|on| {
            if on.get() {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        });
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNTING.try_with(|on| {
            if on.get() {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        });
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PACKETS: usize = 5000;

fn forwarded_packets_do_not_allocate(backend: &str) {
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
        "1",
        "--no-pin",
        "--io-backend",
        backend,
    ]))
    .unwrap();
    let runtime = Runtime::new(Config::resolve(settings).unwrap()).unwrap();
    let server = runtime.listen_addrs()[0];
    let (mut shards, control) = runtime.into_parts();
    let mut shard = shards.pop().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_ctl = stop.clone();
    let control = thread::spawn(move || control.run(&stop_ctl));

    // Two echo peers: one reached through a channel, one through Send indications (its
    // answers come back as Data indications, as no channel is bound to it).
    let done = Arc::new(AtomicBool::new(false));
    let mut echoes = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        peers.push(peer.local_addr().unwrap());
        let done_peer = done.clone();
        echoes.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done_peer.load(Ordering::Relaxed) {
                if let Ok((n, from)) = peer.recv_from(&mut buf) {
                    let _ = peer.send_to(&buf[..n], from);
                }
            }
        }));
    }
    let (peer_addr, indication_peer) = (peers[0], peers[1]);

    // The client: allocate, bind a channel, then stream ChannelData and Send indications,
    // each waiting for its echo (so nothing is lost to buffer overflow).
    let setup_done = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let (setup_flag, measure_flag, done_client) = (setup_done.clone(), measuring.clone(), done.clone());
    let client = thread::spawn(move || -> (usize, usize) {
        let mut c = client::Client::new(server, "alice", "wonderland", PasswordAlgorithm::Md5);
        assert_eq!(c.allocate().class(), Class::Success);
        assert_eq!(c.channel_bind(0x4000, peer_addr).class(), Class::Success);
        // Warm up every path once before counting.
        for i in 0..64u32 {
            c.send_channel_data(0x4000, &i.to_be_bytes());
            let _ = c.recv_data();
            send_indication(&c, indication_peer, &i.to_be_bytes());
            let _ = c.recv_data();
        }
        setup_flag.store(true, Ordering::SeqCst);
        while !measure_flag.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        let (mut via_channel, mut via_data) = (0, 0);
        for i in 0..PACKETS as u32 {
            let payload = [i.to_be_bytes(), [0xAB; 4]].concat();
            if i % 2 == 0 {
                c.send_channel_data(0x4000, &payload);
            } else {
                send_indication(&c, indication_peer, &payload);
            }
            if let Some((data, channel)) = c.recv_data() {
                if data == payload {
                    match channel {
                        Some(_) => via_channel += 1,
                        None => via_data += 1,
                    }
                }
            }
        }
        done_client.store(true, Ordering::SeqCst);
        (via_channel, via_data)
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    while !setup_done.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "setup did not finish");
        shard.turn(Duration::from_millis(5)).unwrap();
    }
    let before = shard.stats();
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    measuring.store(true, Ordering::SeqCst);
    while !done.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the stream did not finish");
        shard.turn(Duration::from_millis(5)).unwrap();
    }
    COUNTING.with(|on| on.set(false));
    let allocations = COUNT.with(|c| c.get());
    let after = shard.stats();
    let (via_channel, via_data) = client.join().unwrap();
    for e in echoes {
        e.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    control.join().unwrap();

    let to_peer = after.to_peer - before.to_peer;
    let to_client = after.to_client - before.to_client;
    eprintln!(
        "{backend}: forwarded {to_peer} to the peer and {to_client} to the client \
         ({via_channel} as ChannelData, {via_data} as Data indications); heap allocations on the shard thread: {allocations}"
    );
    assert!(
        to_peer as usize >= PACKETS * 99 / 100,
        "too few forwarded to the peer: {to_peer}"
    );
    assert!(
        to_client as usize >= PACKETS * 99 / 100,
        "too few forwarded to the client: {to_client}"
    );
    assert!(via_channel >= PACKETS * 49 / 100 && via_data >= PACKETS * 49 / 100);
    assert_eq!(allocations, 0, "the shard allocated on the forwarding path");
}

fn send_indication(c: &client::Client, peer: SocketAddr, payload: &[u8]) {
    use turnpike::proto::stun::{MessageBuilder, MessageType, TransactionId};
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Send, Class::Indication),
        TransactionId([9; 12]),
    );
    b.attribute(&Attribute::XorPeerAddress(peer));
    b.attribute(&Attribute::Data(payload));
    c.sock.send_to(&out, c.server).unwrap();
}

#[test]
fn mmsg_forwarding_does_not_allocate() {
    forwarded_packets_do_not_allocate("mmsg");
}

#[test]
fn io_uring_forwarding_does_not_allocate() {
    forwarded_packets_do_not_allocate("io-uring");
}
