//! RFC 5780 on the real binary: with `--alt-listen` a Binding carries OTHER-ADDRESS and
//! RESPONSE-ORIGIN and CHANGE-REQUEST is answered from the other IP and/or port on all four
//! addresses; without it CHANGE-REQUEST gets 420; TURN works on the alternate listener too;
//! `turnpike probe` classifies loopback as "open internet".

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{
    Attribute, Class, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

use crate::client::Client;
use crate::harness::{free_udp_port, Server, PASSWORD, USER};

fn binding(to: SocketAddr, change: Option<u32>) -> Option<(SocketAddr, Vec<u8>)> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Binding, Class::Request),
        TransactionId([3; 12]),
    );
    if let Some(flags) = change {
        b.attribute(&Attribute::ChangeRequest(flags));
    }
    for _ in 0..3 {
        sock.send_to(&out, to).unwrap();
        let mut buf = [0u8; 512];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            return Some((from, buf[..n].to_vec()));
        }
    }
    None
}

fn addr_attr(m: &Message<'_>, k: u16) -> Option<SocketAddr> {
    match m.get(k)? {
        Ok(Attribute::ResponseOrigin(a) | Attribute::OtherAddress(a) | Attribute::XorMappedAddress(a)) => Some(a),
        _ => None,
    }
}

fn nat_server() -> (Server, SocketAddr, SocketAddr) {
    let (p1, p2) = (free_udp_port(), free_udp_port());
    let primary: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let alternate: SocketAddr = format!("127.0.0.2:{p2}").parse().unwrap();
    let args: Vec<String> = [
        "--listen",
        &primary.to_string(),
        "--alt-listen",
        &alternate.to_string(),
        "--relay-ip",
        "127.0.0.1",
        "--user",
        &format!("{USER}:{PASSWORD}"),
        "--allowed-peer-ip",
        "127.0.0.0/8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    (Server::start_with(&args), primary, alternate)
}

#[test]
fn change_request_is_answered_from_the_other_address() {
    let (_server, primary, alternate) = nat_server();
    let (ip1, p1, ip2, p2) = (primary.ip(), primary.port(), alternate.ip(), alternate.port());
    let all = [primary, SocketAddr::new(ip1, p2), SocketAddr::new(ip2, p1), alternate];
    for local in all {
        let other_ip = if local.ip() == ip1 { ip2 } else { ip1 };
        let other_port = if local.port() == p1 { p2 } else { p1 };
        for (flags, ip, port) in [
            (0, local.ip(), local.port()),
            (0x4, other_ip, local.port()),
            (0x2, local.ip(), other_port),
            (0x6, other_ip, other_port),
        ] {
            let expected = SocketAddr::new(ip, port);
            let (from, bytes) = binding(local, Some(flags)).unwrap_or_else(|| panic!("no answer from {local}"));
            assert_eq!(from, expected, "Binding to {local} with CHANGE-REQUEST {flags:#x}");
            let m = Message::decode(&bytes).unwrap();
            assert_eq!(m.class(), Class::Success);
            assert_eq!(addr_attr(&m, kind::RESPONSE_ORIGIN), Some(expected));
            assert_eq!(
                addr_attr(&m, kind::OTHER_ADDRESS),
                Some(SocketAddr::new(other_ip, other_port))
            );
            assert!(addr_attr(&m, kind::XOR_MAPPED_ADDRESS).is_some());
        }
    }
}

#[test]
fn without_alt_listen_change_request_gets_420() {
    let server = Server::start(&[]);
    let (_, bytes) = binding(server.addr, Some(0x6)).expect("answer");
    let m = Message::decode(&bytes).unwrap();
    assert_eq!(m.class(), Class::Error);
    match m.get(kind::ERROR_CODE) {
        Some(Ok(Attribute::ErrorCode { code, .. })) => assert_eq!(code.0, 420),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        m.get(kind::UNKNOWN_ATTRIBUTES),
        Some(Ok(Attribute::UnknownAttributes(&[0x00, 0x03])))
    );
    // A plain Binding says nothing of other addresses.
    let (_, bytes) = binding(server.addr, None).expect("answer");
    let m = Message::decode(&bytes).unwrap();
    assert!(m.get(kind::OTHER_ADDRESS).is_none() && m.get(kind::RESPONSE_ORIGIN).is_none());
}

#[test]
fn turn_works_on_the_alternate_listener() {
    let (_server, _primary, alternate) = nat_server();
    let mut c = Client::new(alternate, USER, PASSWORD, PasswordAlgorithm::Md5);
    let r = c.allocate();
    assert_eq!(r.class(), Class::Success, "{:?}", r.error_code());
}

#[test]
fn probe_classifies_loopback_as_open_internet() {
    let (_server, primary, alternate) = nat_server();
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["probe", "--server", &primary.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("server other address {alternate}")), "{text}");
    assert!(text.contains("mapping behaviour    none (no NAT)"), "{text}");
    assert!(text.contains("filtering behaviour  endpoint-independent"), "{text}");
    assert!(text.contains("NAT type             open internet"), "{text}");
}

#[test]
fn alt_listen_misconfigurations_abort_startup() {
    for (args, needle) in [
        (vec!["--alt-listen", "127.0.0.2:4000"], "concrete IPs"),
        (
            vec!["--listen", "127.0.0.1:3478", "--alt-listen", "127.0.0.1:4000"],
            "differ",
        ),
        (
            vec!["--listen", "127.0.0.1:3478", "--alt-listen", "127.0.0.2:3478"],
            "differ",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:3478",
                "--listen",
                "127.0.0.3:3478",
                "--alt-listen",
                "127.0.0.2:4000",
            ],
            "exactly one",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
