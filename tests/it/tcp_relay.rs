//! RFC 6062 TCP allocations against the real server: coturn's `turnutils_uclient -T` (over
//! TCP and TLS: client-to-client, so both Connect and peer-initiated connections with
//! ConnectionAttempt), and our own stream client for a Connect to a closed port (447), a
//! peer connecting without a permission (closed), and the peer-initiated flow byte for byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{Attribute, Class, Method};

use crate::harness::{require, PASSWORD, USER};
use crate::real_clients::{run_uclient, UclientReport};
use crate::transport_support::*;

/// uclient -T (TCP relaying between pairs of its own clients) through `relay`.
fn uclient_tcp_relay(relay: &Relay, tls: bool) -> UclientReport {
    require("turnutils_uclient");
    let port = if tls { relay.tls().port() } else { relay.addr.port() }.to_string();
    let mut args = vec![
        "-T",
        "-m",
        "5",
        "-n",
        "20",
        "-l",
        "171",
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-p",
        &port,
    ];
    if tls {
        args.push("-S");
    }
    args.push("127.0.0.1");
    run_uclient(None, &args)
}

fn assert_tcp_relayed(r: &UclientReport, shutdown: &str) {
    assert!(r.sent >= 100, "5 pairs x 20 messages: {r:?}");
    assert_eq!((r.received, r.lost), (r.sent, 0), "{}", r.output);
    assert!(
        !r.output.contains("not enough"),
        "data connections missing:\n{}",
        r.output
    );
    let errors: Vec<&str> = r
        .output
        .lines()
        .filter(|l| l.to_lowercase().contains("error"))
        // uclient -S also tries TLS 1.0/1.1-only contexts, which TLS 1.2+ servers refuse.
        .filter(|l| !(l.contains("tls_connect: cannot connect") || (l.contains("SSL routines") && l.contains("alert"))))
        .collect();
    assert!(errors.is_empty(), "uclient reported errors: {errors:#?}");
    // Everything went over TCP relaying (no UDP relay involved), connection by connection.
    let connections = counter(shutdown, "tcp_relay_connections").expect("tcp_relay_connections");
    let bytes = counter(shutdown, "tcp_relayed_bytes").expect("tcp_relayed_bytes");
    assert!(connections >= 10, "peer data connections: {shutdown}");
    assert!(bytes >= 2 * 171 * r.sent, "relayed bytes: {shutdown}");
    assert_eq!(counter(shutdown, "to_peer"), Some(0), "{shutdown}");
}

#[test]
fn uclient_rfc6062_tcp_relay_over_tcp() {
    let relay = Relay::turnpike(None, &[]);
    let r = uclient_tcp_relay(&relay, false);
    let shutdown = relay.stop().unwrap();
    assert_tcp_relayed(&r, &shutdown);
}

#[test]
fn uclient_rfc6062_tcp_relay_over_tls() {
    let pki = Pki::new();
    let relay = Relay::turnpike(Some(&pki.good), &[]);
    let r = uclient_tcp_relay(&relay, true);
    let shutdown = relay.stop().unwrap();
    assert_tcp_relayed(&r, &shutdown);
}

/// A TCP allocation on a fresh control connection: the client and its relayed address.
fn tcp_allocation(relay: &Relay) -> (StreamClient, SocketAddr) {
    let mut control = StreamClient::connect(relay.addr);
    let r = control.request(Method::Allocate, &[Attribute::RequestedTransport(6)]);
    assert_eq!(r.class(), Class::Success, "TCP Allocate: {:?}", r.error_code());
    let relayed = r.addr(kind::XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS");
    (control, relayed)
}

#[test]
fn rfc6062_connect_to_a_closed_port_is_447_and_to_a_listener_relays_both_ways() {
    let relay = Relay::turnpike(None, &[]);
    let (mut control, relayed) = tcp_allocation(&relay);
    // A port nobody listens on: the connection is refused at once.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let r = control.request(Method::Connect, &[Attribute::XorPeerAddress(closed)]);
    assert_eq!(r.error_code(), Some(447), "Connect to a closed port");

    // A listening peer: Connect succeeds with a CONNECTION-ID; the peer sees a connection
    // from the relayed transport address (RFC 6062 §5.2).
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = control.request(
        Method::Connect,
        &[Attribute::XorPeerAddress(peer.local_addr().unwrap())],
    );
    assert_eq!(r.class(), Class::Success, "Connect: {:?}", r.error_code());
    let id = match r.msg().get(kind::CONNECTION_ID) {
        Some(Ok(Attribute::ConnectionId(id))) => id,
        other => panic!("no CONNECTION-ID: {other:?}"),
    };
    let (mut peer_side, from) = peer.accept().unwrap();
    assert_eq!(from, relayed, "the server connects from the relayed transport address");
    peer_side.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // Again to the same peer while the first is pending: 446.
    let r = control.request(
        Method::Connect,
        &[Attribute::XorPeerAddress(peer.local_addr().unwrap())],
    );
    assert_eq!(r.error_code(), Some(446));

    // ConnectionBind on a new connection, then bytes as-is both ways.
    let mut data = StreamClient::connect(relay.addr);
    let r = data.request(Method::ConnectionBind, &[Attribute::ConnectionId(id)]);
    assert_eq!(r.class(), Class::Success, "ConnectionBind: {:?}", r.error_code());
    relay_both_ways(&mut data.stream, &mut peer_side);
    // The peer closes: the client data connection is closed too (RFC 6062 §5.5).
    drop(peer_side);
    let mut buf = [0u8; 16];
    assert!(
        matches!(data.stream.read(&mut buf), Ok(0) | Err(_)),
        "the data connection must close with its peer"
    );
    relay.stop();
}

/// Writes distinct bytes each way (not STUN-framed: odd sizes) and checks they arrive whole.
fn relay_both_ways(client: &mut TcpStream, peer: &mut TcpStream) {
    client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let up: Vec<u8> = (0..5001u32).map(|i| (i * 7) as u8).collect();
    client.write_all(&up).unwrap();
    let mut got = vec![0u8; up.len()];
    peer.read_exact(&mut got).expect("the peer gets the client's bytes");
    assert_eq!(got, up);
    let down: Vec<u8> = (0..3333u32).map(|i| (i * 13 + 1) as u8).collect();
    peer.write_all(&down).unwrap();
    let mut got = vec![0u8; down.len()];
    client.read_exact(&mut got).expect("the client gets the peer's bytes");
    assert_eq!(got, down);
}

#[test]
fn rfc6062_peer_initiated_connection_needs_a_permission_and_then_relays() {
    let relay = Relay::turnpike(None, &[]);
    let (mut control, relayed) = tcp_allocation(&relay);
    // No permission: the server closes the peer's connection (RFC 6062 §5.3).
    let mut refused = TcpStream::connect(relayed).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 8];
    assert!(
        matches!(refused.read(&mut buf), Ok(0) | Err(_)),
        "closed without a permission"
    );

    let r = control.request(
        Method::CreatePermission,
        &[Attribute::XorPeerAddress("127.0.0.1:9".parse().unwrap())],
    );
    assert_eq!(r.class(), Class::Success);
    let mut peer = TcpStream::connect(relayed).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // ConnectionAttempt on the control connection: XOR-PEER-ADDRESS and CONNECTION-ID.
    let id = match read_frame(&mut control.stream) {
        Some(Frame::Stun(m)) => {
            let m = decode(&m);
            assert_eq!((m.method(), m.class()), (Method::ConnectionAttempt, Class::Indication));
            assert_eq!(
                m.get(kind::XOR_PEER_ADDRESS),
                Some(Ok(Attribute::XorPeerAddress(peer.local_addr().unwrap())))
            );
            match m.get(kind::CONNECTION_ID) {
                Some(Ok(Attribute::ConnectionId(id))) => id,
                other => panic!("{other:?}"),
            }
        }
        other => panic!("expected ConnectionAttempt, got {other:?}"),
    };
    // The peer's early bytes wait in the kernel until the bind.
    peer.write_all(b"early").unwrap();
    let mut data = StreamClient::connect(relay.addr);
    let r = data.request(Method::ConnectionBind, &[Attribute::ConnectionId(id)]);
    assert_eq!(r.class(), Class::Success, "ConnectionBind: {:?}", r.error_code());
    let mut early = [0u8; 5];
    data.stream.read_exact(&mut early).expect("the early bytes");
    assert_eq!(&early, b"early");
    relay_both_ways(&mut data.stream, &mut peer);
    // Deleting the allocation closes its data connections.
    let r = control.request(Method::Refresh, &[Attribute::Lifetime(0)]);
    assert_eq!(r.class(), Class::Success);
    assert!(
        matches!(peer.read(&mut buf), Ok(0) | Err(_)),
        "the peer connection ends with the allocation"
    );
    relay.stop();
}
