//! IPv6 with coturn's `turnutils_uclient`: an IPv6 client with an IPv6 relayed address and an
//! IPv6 peer (`-x`, on ::1 and in a network namespace of the test's own with documentation
//! addresses), and dual allocations (`-Z`, RFC 8656 §7.2: an IPv4 and an IPv6 relayed address,
//! the peer reached through the one of its family).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{free_udp_port, require, Netns, Server, PASSWORD, USER};
use crate::real_clients::{run_uclient, UclientReport};

/// turnutils_peer on `ip`, killed on drop; optionally inside network namespace `netns`.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_peer(netns: Option<&str>, ip: &str, port: u16) -> Peer {
    require("turnutils_peer");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "turnutils_peer"]);
            c
        }
        None => Command::new("turnutils_peer"),
    };
    let child = cmd
        .args(["-L", ip, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn turnutils_peer");
    std::thread::sleep(Duration::from_millis(300));
    Peer(child)
}

/// uclient (10 clients x 50 messages) with `mode` against `server` (HOST, PORT), peer `peer`.
fn uclient(netns: Option<&str>, mode: &[&str], server: (&str, u16), peer: (&str, u16)) -> UclientReport {
    require("turnutils_uclient");
    let (port, peer_port) = (server.1.to_string(), peer.1.to_string());
    let mut args: Vec<&str> = vec![
        "-e", peer.0, "-r", &peer_port, "-p", &port, "-m", "10", "-n", "50", "-l", "121", "-u", USER, "-w", PASSWORD,
    ];
    args.extend_from_slice(mode);
    args.push(server.0);
    run_uclient(netns, &args)
}

fn assert_clean(r: &UclientReport) {
    assert!(r.sent >= 500, "expected at least 10 clients x 50 messages, got {r:?}");
    assert_eq!((r.received, r.lost), (r.sent, 0), "{}", r.output);
    assert!(
        !r.output.lines().any(|l| l.to_lowercase().contains("error")),
        "uclient reported an error:\n{}",
        r.output
    );
}

fn start(args: &[&str]) -> Server {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend([
        "--user".into(),
        format!("{USER}:{PASSWORD}"),
        "--user-quota".into(),
        "0".into(),
    ]);
    Server::start_with(&all)
}

#[test]
fn uclient_ipv6_client_relay_and_peer_on_loopback() {
    let port = free_udp_port();
    let listen = format!("[::1]:{port}");
    let server = start(&["--listen", &listen, "--relay-ip", "::1", "--allowed-peer-ip", "::1/128"]);
    let peer_port = free_udp_port();
    let _peer = start_peer(None, "::1", peer_port);
    for mode in [&["-x"][..], &["-x", "-s"][..]] {
        let r = uclient(None, mode, ("::1", port), ("::1", peer_port));
        assert_clean(&r);
    }
    let log = server.stop();
    let shutdown = log
        .iter()
        .find(|l| l.contains("shut down"))
        .cloned()
        .unwrap_or_default();
    // Both runs (2 x 10 clients x 50 messages) went through this IPv6-only server.
    let to_peer = crate::transport_support::counter(&shutdown, "to_peer");
    assert!(to_peer.is_some_and(|n| n >= 1000), "{log:?}");
}

/// Dual allocation from an IPv4 client: with an IPv6 peer the data goes through the IPv6
/// relayed address, with an IPv4 peer through the IPv4 one; both without loss.
#[test]
fn uclient_dual_allocation_reaches_peers_of_both_families() {
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let server = start(&[
        "--listen",
        &listen,
        "--relay-ip",
        "127.0.0.1",
        "--relay-ip",
        "::1",
        "--allowed-peer-ip",
        "127.0.0.0/8",
        "--allowed-peer-ip",
        "::1/128",
    ]);
    let peer_port = free_udp_port();
    let _peer6 = start_peer(None, "::1", peer_port);
    let _peer4 = start_peer(None, "127.0.0.1", peer_port);
    for (mode, peer) in [
        (&["-Z"][..], "::1"),
        (&["-Z", "-s"][..], "::1"),
        (&["-Z"][..], "127.0.0.1"),
    ] {
        let r = uclient(None, mode, ("127.0.0.1", port), (peer, peer_port));
        assert_clean(&r);
    }
    let log = server.stop();
    // Every allocation was dual: uclient leaves its 3 x 10 allocations to expire, and each
    // holds two relayed transport addresses (an IPv4 and an IPv6 grant of the relay
    // allocator).
    let shutdown = log
        .iter()
        .find(|l| l.contains("shut down"))
        .cloned()
        .unwrap_or_default();
    assert!(shutdown.contains(" allocations=60 "), "{shutdown}");
    assert!(shutdown.contains(" relay_ports_in_use=60 "), "{shutdown}");
}

/// An IPv6-only host in a network namespace (2001:db8::/32 documentation addresses,
/// `nodad`): server, client and peer all on IPv6.
#[test]
fn uclient_ipv6_in_a_namespace_with_documentation_addresses() {
    require("ip");
    let netns = Netns::new(
        &format!("tp-ipv6-{}", std::process::id()),
        &["2001:db8::1/64", "2001:db8::2/64"],
    );
    let ns = netns.0.clone();
    let args: Vec<String> = [
        "--listen",
        "[2001:db8::1]:3478",
        "--relay-ip",
        "2001:db8::1",
        "--allowed-peer-ip",
        "2001:db8::/32",
        "--user",
        &format!("{USER}:{PASSWORD}"),
        "--user-quota",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_in_netns(&ns, &args);
    let _peer = start_peer(Some(&ns), "2001:db8::2", 3480);
    let r = uclient(Some(&ns), &["-x"], ("2001:db8::1", 3478), ("2001:db8::2", 3480));
    server.stop();
    assert_clean(&r);
}
