//! The data plane under churn: a client killed mid-stream, allocations expiring while
//! traffic flows, and 10,000 Allocates while two shards forward. Each test ends by checking
//! the server still relays for a new client and by reading its accounting at shutdown.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use turnpike::proto::stun::{Attribute, Class, Method, PasswordAlgorithm};

use crate::client::Client;
use crate::harness::{require, shutdown_value, Server, PASSWORD, USER};

fn echo_peer(stop: Arc<AtomicBool>) -> (SocketAddr, thread::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let addr = s.local_addr().unwrap();
    let h = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    (addr, h)
}

/// Ping-pong over a channel until `stop`; returns (sent, answered). Refreshes the
/// allocation every `refresh` when given.
fn stream(server: SocketAddr, peer: SocketAddr, stop: Arc<AtomicBool>, refresh: Option<Duration>) -> (u64, u64) {
    let mut c = Client::new(server, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    assert_eq!(c.channel_bind(0x4000, peer).class(), Class::Success);
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(every) = refresh {
            if last_refresh.elapsed() >= every {
                let r = c.request(Method::Refresh, &[Attribute::Lifetime(600)]);
                assert_eq!(r.class(), Class::Success, "refresh failed: {:?}", r.error_code());
                let r = c.channel_bind(0x4000, peer);
                assert_eq!(r.class(), Class::Success);
                last_refresh = Instant::now();
            }
        }
        let payload = sent.to_be_bytes();
        c.send_channel_data(0x4000, &payload);
        sent += 1;
        // One retransmission window: the answer must come back.
        if let Some((data, _)) = c.recv_data() {
            if data == payload {
                answered += 1;
            }
        }
    }
    let _ = c.request(Method::Refresh, &[Attribute::Lifetime(0)]);
    (sent, answered)
}

/// A fresh client can still allocate and relay.
fn assert_healthy(server: SocketAddr, peer: SocketAddr) {
    let mut c = Client::new(server, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    assert_eq!(c.channel_bind(0x4001, peer).class(), Class::Success);
    c.send_channel_data(0x4001, b"still alive");
    assert_eq!(c.recv_data().map(|(d, _)| d), Some(b"still alive".to_vec()));
    let _ = c.request(Method::Refresh, &[Attribute::Lifetime(0)]);
}

/// The `key=value` of the shutdown line.
#[test]
fn client_killed_mid_stream_leaves_server_healthy() {
    require("turnutils_uclient");
    let server = Server::start(&["--default-lifetime", "2", "--max-lifetime", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (peer, echo) = echo_peer(stop.clone());
    let mut uclient = Command::new("turnutils_uclient")
        .args([
            "-c",
            "-e",
            "127.0.0.1",
            "-r",
            &peer.port().to_string(),
            "-p",
            &server.addr.port().to_string(),
        ])
        .args([
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-m",
            "5",
            "-n",
            "100000",
            "-l",
            "200",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    uclient.kill().unwrap();
    uclient.wait().unwrap();
    assert_healthy(server.addr, peer);
    // Its allocations expire (lifetime 2 s) and give their ports back.
    thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let lines = server.stop();
    assert_eq!(shutdown_value(&lines, "allocations"), 0, "{lines:?}");
    assert_eq!(shutdown_value(&lines, "relay_ports_in_use"), 0, "{lines:?}");
    assert!(shutdown_value(&lines, "to_peer") > 0);
}

#[test]
fn allocations_expiring_under_load() {
    let server = Server::start(&["--default-lifetime", "2", "--max-lifetime", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (peer, echo) = echo_peer(stop.clone());
    let streaming = stop.clone();
    let addr = server.addr;
    let streamer = thread::spawn(move || stream(addr, peer, streaming, Some(Duration::from_millis(700))));
    // 200 allocations with traffic, left to expire after 2 s while the stream goes on.
    let mut clients = Vec::new();
    for i in 0..200u16 {
        let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
        assert_eq!(c.allocate().class(), Class::Success);
        assert_eq!(c.channel_bind(0x4000 + (i % 16), peer).class(), Class::Success);
        c.send_channel_data(0x4000 + (i % 16), b"x");
        clients.push(c);
    }
    thread::sleep(Duration::from_millis(3500));
    stop.store(true, Ordering::Relaxed);
    let (sent, answered) = streamer.join().unwrap();
    echo.join().unwrap();
    eprintln!("stream during expiry: sent {sent}, answered {answered}");
    assert!(sent > 100, "the stream made too little progress: {sent}");
    assert_eq!(sent, answered, "datagrams lost while allocations expired");
    drop(clients);
    let lines = server.stop();
    assert_eq!(shutdown_value(&lines, "allocations"), 0, "{lines:?}");
    assert_eq!(shutdown_value(&lines, "relay_ports_in_use"), 0, "{lines:?}");
}

#[test]
fn ten_thousand_allocations_while_two_shards_forward() {
    turnpike::sys::raise_nofile_limit();
    // A relay IP of its own: 10,000 relay ports would crowd the tests that run beside it.
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.9",
        "--allowed-peer-ip",
        "127.0.0.0/8",
        "--user",
        &format!("{USER}:{PASSWORD}"),
        "--shards",
        "2",
        "--user-quota",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_with(&args);
    let echo_stop = Arc::new(AtomicBool::new(false));
    let (peer, echo) = echo_peer(echo_stop.clone());
    let stream_stop = Arc::new(AtomicBool::new(false));
    let streaming = stream_stop.clone();
    let addr = server.addr;
    let streamer = thread::spawn(move || stream(addr, peer, streaming, None));
    let start = Instant::now();
    let mut clients = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
        let r = c.allocate();
        assert_eq!(
            r.class(),
            Class::Success,
            "allocation {} failed: {:?}",
            clients.len(),
            r.error_code()
        );
        clients.push(c);
    }
    let took = start.elapsed();
    stream_stop.store(true, Ordering::Relaxed);
    let (sent, answered) = streamer.join().unwrap();
    eprintln!("10,000 allocations in {took:?} while streaming: sent {sent}, answered {answered}");
    assert!(sent > 100, "the stream made too little progress: {sent}");
    assert_eq!(sent, answered, "datagrams lost during the Allocate burst");
    assert_healthy(server.addr, peer);
    echo_stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let lines = server.stop();
    assert_eq!(shutdown_value(&lines, "allocations"), 10_000, "{lines:?}");
}
