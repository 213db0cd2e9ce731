//! Wildcard listeners on hosts with several addresses (IP_PKTINFO / IPV6_PKTINFO): the
//! 5-tuple's server address is the address the client sent to, and every answer (responses,
//! relayed ChannelData) leaves from it. The clients use *connected* UDP sockets, which the
//! kernel only lets datagrams from that exact address reach: an answer from another source
//! address is lost and the test fails.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use crate::client::Client;
use crate::harness::{free_udp_port, require, Netns, Server, PASSWORD, USER};
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{Class, PasswordAlgorithm};

fn start_wildcard(listen: &str, relay: &str, peers: &str) -> Server {
    let args: Vec<String> = [
        "--listen",
        listen,
        "--relay-ip",
        relay,
        "--allowed-peer-ip",
        peers,
        "--user",
        &format!("{USER}:{PASSWORD}"),
        "--user-quota",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_with(&args)
}

#[test]
fn wildcard_ipv4_listener_answers_and_relays_from_the_address_asked() {
    let port = free_udp_port();
    let server = start_wildcard(&format!("0.0.0.0:{port}"), "127.0.0.1", "127.0.0.0/8");
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.1"].iter().enumerate() {
        let target: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let mut c = Client::new(target, USER, PASSWORD, PasswordAlgorithm::Md5);
        c.sock.connect(target).unwrap();
        let alloc = c.allocate();
        assert_eq!(alloc.class(), Class::Success, "Allocate to {target}");
        let relayed = alloc.addr(kind::XOR_RELAYED_ADDRESS).expect("relayed address");
        let channel = 0x4000 + i as u16;
        assert_eq!(
            c.channel_bind(channel, peer.local_addr().unwrap()).class(),
            Class::Success
        );
        // Client → peer through the channel, and the peer's answer back: ChannelData that
        // must come from `target` to pass the connected socket.
        c.send_channel_data(channel, b"ping");
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).expect("the peer got the ping");
        assert_eq!((&buf[..n], from), (&b"ping"[..], relayed));
        peer.send_to(b"pong", relayed).unwrap();
        let (data, ch) = c.recv_data().expect("the pong came back from the address asked");
        assert_eq!((data, ch), (b"pong".to_vec(), Some(channel)));
    }
    server.stop();
}

/// The same for IPv6 in a network namespace of the test's own with two documentation
/// addresses (2001:db8::1 and ::2, `nodad`) on one veth; the client is Python's socket
/// module run inside the namespace (this process cannot enter it).
#[test]
fn wildcard_ipv6_listener_in_a_namespace_answers_from_each_address() {
    require("ip");
    require("python3");
    // ::1 and ::2 for the server, ::3 for the client: the kernel's own source address
    // choice for answers to ::3 would be ::2 (longest matching prefix), whatever was asked.
    let netns = Netns::new(
        &format!("tp-wild6-{}", std::process::id()),
        &["2001:db8::1/64", "2001:db8::2/64", "2001:db8::3/64"],
    );
    let ns = netns.0.clone();
    let args: Vec<String> = [
        "--listen",
        "[::]:3478",
        "--relay-ip",
        "2001:db8::1",
        "--user",
        &format!("{USER}:{PASSWORD}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_in_netns(&ns, &args);
    // A STUN Binding from a connected socket to each address; prints the address asked, the
    // connected peer (the only source the socket accepts) and whether the answer matched.
    let script = r#"
import os, socket, struct
for dst in ["2001:db8::1", "2001:db8::2"]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.bind(("2001:db8::3", 0))
    s.connect((dst, 3478))
    tid = os.urandom(12)
    s.send(struct.pack("!HHI", 1, 0, 0x2112A442) + tid)
    data = s.recv(2048)
    ok = data[:2] == b"\x01\x01" and data[8:20] == tid
    print(dst, s.getpeername()[0], "ok" if ok else "bad")
"#;
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", &ns, "python3", "-c", script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    server.stop();
    assert!(
        out.status.success(),
        "the client in the namespace failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["2001:db8::1 2001:db8::1 ok", "2001:db8::2 2001:db8::2 ok"]
    );
}
