//! turnpike's own client code against the real server: SHA-256 message integrity end to
//! end (RFC 8489 §9.2), and the peer policy through the real server.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{Attribute, Class, Method, PasswordAlgorithm};

use crate::client::Client;
use crate::harness::{Server, PASSWORD, USER};

fn echo_peer() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

fn relay_round_trip(algorithm: PasswordAlgorithm) {
    let server = Server::start(&[]);
    let mut c = Client::new(server.addr, USER, PASSWORD, algorithm);
    let resp = c.allocate();
    assert_eq!(resp.class(), Class::Success, "allocate: error {:?}", resp.error_code());
    let relayed = resp.addr(kind::XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS");
    assert_eq!(resp.addr(kind::XOR_MAPPED_ADDRESS), Some(c.sock.local_addr().unwrap()));
    let (peer, peer_addr) = echo_peer();
    assert_eq!(c.channel_bind(0x4001, peer_addr).class(), Class::Success);
    let mut buf = [0u8; 1500];
    for i in 0..100u32 {
        let payload = format!("payload-{i}");
        c.send_channel_data(0x4001, payload.as_bytes());
        let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
        assert_eq!(from, relayed, "datagram comes from the relayed transport address");
        assert_eq!(&buf[..n], payload.as_bytes());
        peer.send_to(&buf[..n], from).unwrap();
        let (data, channel) = c.recv_data().expect("client receives");
        assert_eq!(channel, Some(0x4001));
        assert_eq!(data, payload.as_bytes());
    }
    // Refresh with LIFETIME 0 deletes; ChannelData is then dropped.
    let r = c.request(
        turnpike::proto::stun::Method::Refresh,
        &[turnpike::proto::stun::Attribute::Lifetime(0)],
    );
    assert_eq!(r.class(), Class::Success);
    c.send_channel_data(0x4001, b"after delete");
    peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(
        peer.recv_from(&mut buf).is_err(),
        "no relaying after the allocation is deleted"
    );
}

#[test]
fn sha256_message_integrity_allocates_and_relays() {
    relay_round_trip(PasswordAlgorithm::Sha256);
}

#[test]
fn md5_message_integrity_allocates_and_relays() {
    relay_round_trip(PasswordAlgorithm::Md5);
}

#[test]
fn rest_api_credentials_with_rotated_secrets() {
    use turnpike::proto::auth::rest_api_password;
    let server = Server::start(&["--static-auth-secret", "next-secret"]);
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let user = format!("{expiry}:carol");
    for secret in [crate::harness::SECRET, "next-secret"] {
        let mut c = Client::new(
            server.addr,
            &user,
            &rest_api_password(secret, &user),
            PasswordAlgorithm::Md5,
        );
        let resp = c.allocate();
        assert_eq!(resp.class(), Class::Success, "secret {secret}: {:?}", resp.error_code());
    }
    let mut bad = Client::new(
        server.addr,
        &user,
        &rest_api_password("wrong", &user),
        PasswordAlgorithm::Md5,
    );
    assert_eq!(bad.allocate().error_code(), Some(401));
    let expired = format!("{}:carol", expiry - 7200);
    let mut old = Client::new(
        server.addr,
        &expired,
        &rest_api_password(crate::harness::SECRET, &expired),
        PasswordAlgorithm::Md5,
    );
    assert_eq!(old.allocate().error_code(), Some(401));
}

/// Every spelling of an internal address is refused with 403 when not allowed (the
/// server here allows nothing; its relay is 127.0.0.1 and IPv4, so IPv6 spellings are
/// tried on an IPv6 relay when the host has ::1).
#[test]
fn peer_policy_refuses_internal_spellings_with_403() {
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--user",
        "alice:wonderland",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_with(&args);
    let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    for peer in [
        "127.0.0.1:5000",
        "0.0.0.0:5000",
        "169.254.169.254:80",
        "10.0.0.1:5000",
        "192.168.1.1:5000",
        "172.16.0.1:53",
        "100.64.0.1:1",
        "224.0.0.1:5000",
        "255.255.255.255:5000",
    ] {
        let p: SocketAddr = peer.parse().unwrap();
        assert_eq!(
            c.create_permission(p).error_code(),
            Some(403),
            "CreatePermission {peer}"
        );
        assert_eq!(c.channel_bind(0x4000, p).error_code(), Some(403), "ChannelBind {peer}");
    }
    // An IPv6 spelling on an IPv4 allocation is a family mismatch (443), never a success.
    for peer in [
        "[::ffff:127.0.0.1]:5000",
        "[::127.0.0.1]:5000",
        "[64:ff9b::7f00:1]:5000",
        "[2002:7f00:1::1]:5000",
        "[fe80::1]:5000",
        "[fd00::1]:5000",
    ] {
        let p: SocketAddr = peer.parse().unwrap();
        assert_eq!(
            c.create_permission(p).error_code(),
            Some(443),
            "CreatePermission {peer}"
        );
    }
    // The server's own listening address is refused even when loopback is allowed.
    drop(c);
    let server2 = Server::start(&[]);
    let mut c2 = Client::new(server2.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c2.allocate().class(), Class::Success);
    assert_eq!(c2.channel_bind(0x4000, server2.addr).error_code(), Some(403));
    assert_eq!(
        c2.create_permission("127.0.0.1:5000".parse().unwrap()).class(),
        Class::Success
    );
}

/// IPv6 relay: the IPv4-in-IPv6 spellings are canonicalised and refused (needs ::1).
#[test]
fn peer_policy_ipv6_spellings_on_ipv6_relay() {
    if UdpSocket::bind("[::1]:0").is_err() {
        panic!("this test needs IPv6 loopback (::1)");
    }
    let args: Vec<String> = ["--listen", "[::1]:0", "--relay-ip", "::1", "--user", "alice:wonderland"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let server = Server::start_with(&args);
    let mut c = Client::new6(server.addr, USER, PASSWORD);
    let resp = c.request(
        turnpike::proto::stun::Method::Allocate,
        &[
            turnpike::proto::stun::Attribute::RequestedTransport(17),
            turnpike::proto::stun::Attribute::RequestedAddressFamily(turnpike::proto::stun::AddressFamily::V6),
        ],
    );
    assert_eq!(resp.class(), Class::Success, "{:?}", resp.error_code());
    for peer in [
        "[::1]:5000",
        "[::]:5000",
        "[::ffff:127.0.0.1]:5000",
        "[::127.0.0.1]:5000",
        "[64:ff9b::7f00:1]:5000",
        "[64:ff9b:1::7f00:1]:5000",
        "[2002:7f00:1::1]:5000",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]:5000",
        "[::ffff:169.254.169.254]:80",
        "[fe80::1]:5000",
        "[fd00::1]:5000",
        "[fec0::1]:5000",
        "[ff02::1]:5000",
    ] {
        let p: SocketAddr = peer.parse().unwrap();
        assert_eq!(
            c.create_permission(p).error_code(),
            Some(403),
            "CreatePermission {peer}"
        );
    }
}

/// Defect 12 of the review: no per-user allocation limit by default. The default
/// `--user-quota` is 10: the 11th allocation of one user gets 486; another user is not
/// affected, and deleting one frees a place.
#[test]
fn regression_default_user_quota_is_10() {
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--user",
        "alice:wonderland",
        "--user",
        "bob:builder",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_with(&args);
    let mut held: Vec<Client> = (0..10)
        .map(|i| {
            let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
            let r = c.allocate();
            assert_eq!(r.class(), Class::Success, "allocation {i}: {:?}", r.error_code());
            c
        })
        .collect();
    let mut eleventh = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(eleventh.allocate().error_code(), Some(486));
    let mut bob = Client::new(server.addr, "bob", "builder", PasswordAlgorithm::Md5);
    assert_eq!(bob.allocate().class(), Class::Success);
    let r = held[0].request(Method::Refresh, &[Attribute::Lifetime(0)]);
    assert_eq!(r.class(), Class::Success);
    let mut again = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(again.allocate().class(), Class::Success);
    held.clear();
}

/// Defect 13 of the review: per-user accounting lagged deletion across shards, so right
/// after a successful Refresh 0 the same user's next Allocate (another 5-tuple, often
/// another shard) could get 486. After Refresh 0 succeeds, the quota is free.
#[test]
fn regression_quota_free_right_after_refresh_zero_across_shards() {
    let server = Server::start(&["--user-quota", "1", "--shards", "2", "--no-pin"]);
    let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    for i in 0..300 {
        let r = c.request(Method::Refresh, &[Attribute::Lifetime(0)]);
        assert_eq!(r.class(), Class::Success, "round {i}");
        let mut next = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
        let r = next.allocate();
        assert_eq!(r.class(), Class::Success, "round {i}: {:?}", r.error_code());
        c = next;
    }
}
