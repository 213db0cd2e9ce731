//! The binary with no arguments at all runs on the embedded defaults and answers a STUN
//! Binding on port 3478.

use std::net::UdpSocket;
use std::time::Duration;

use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{Attribute, Class, Message, MessageBuilder, MessageType, Method, TransactionId};

use crate::harness::Server;

#[test]
fn no_arguments_answers_binding_on_3478() {
    let server = Server::start_with(&[]);
    assert_eq!(server.addr, "0.0.0.0:3478".parse().unwrap());
    assert!(
        server
            .wait_for_log("--user NAME:PASSWORD", Duration::from_secs(5))
            .is_some(),
        "the banner says how to add a user"
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = Vec::new();
    MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Binding, Class::Request),
        TransactionId([5; 12]),
    );
    sock.send_to(&out, "127.0.0.1:3478").unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).expect("Binding response");
    let m = Message::decode(&buf[..n]).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.transaction_id(), TransactionId([5; 12]));
    match m.get(kind::XOR_MAPPED_ADDRESS) {
        Some(Ok(Attribute::XorMappedAddress(a))) => assert_eq!(a, sock.local_addr().unwrap()),
        other => panic!("no XOR-MAPPED-ADDRESS: {other:?}"),
    }
    assert!(m.get(kind::SOFTWARE).is_none(), "SOFTWARE is omitted by default");
}
