//! UDP GSO and GRO through the real server: a client's burst of ChannelData sent with one
//! GSO sendmsg reaches turnpike's listening socket coalesced (`--udp-gro`), is split,
//! relayed to the peer as a GSO run, and the peer's burst comes back the same way; every
//! datagram arrives once, whole and in order, in both directions.

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{MsgHdr, SockAddr, SockRef};
use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::stun::{Class, PasswordAlgorithm};

use crate::client::Client;
use crate::harness::{shutdown_value, Server, PASSWORD, USER};

/// Sends `datagrams` (all of the first one's length, the last possibly shorter) from `sock`
/// to `to` in one sendmsg with UDP_SEGMENT.
fn send_gso(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    let joined = datagrams.concat();
    let mut control = turnpike::sys::Control::new();
    let n = turnpike::sys::udp_segment(datagrams[0].len() as u16, &mut control, 0);
    let addr = SockAddr::from(to);
    let bufs = [IoSlice::new(&joined)];
    let msg = MsgHdr::new()
        .with_addr(&addr)
        .with_buffers(&bufs)
        .with_control(&control.0[..n]);
    let sent = SockRef::from(sock).sendmsg(&msg, 0).expect("GSO sendmsg");
    assert_eq!(sent, joined.len());
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 7 + k) as u8).collect()
}

#[test]
fn bursts_relay_through_gro_and_gso_in_both_directions() {
    let server = Server::start(&["--io-backend", "mmsg", "--udp-gro"]);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    assert_eq!(
        c.channel_bind(0x4000, peer.local_addr().unwrap()).class(),
        Class::Success
    );

    // Client → peer: 16 ChannelData messages of 1,000 bytes and a 10-byte last one.
    let sent: Vec<Vec<u8>> = (0..17).map(|i| payload(i, if i == 16 { 10 } else { 1000 })).collect();
    let frames: Vec<Vec<u8>> = sent
        .iter()
        .map(|p| {
            let mut out = Vec::new();
            ChannelData {
                channel: 0x4000,
                payload: p,
            }
            .encode(&mut out);
            out
        })
        .collect();
    send_gso(&c.sock, server.addr, &frames);
    let mut buf = [0u8; 4096];
    let mut relayed = None;
    for (i, want) in sent.iter().enumerate() {
        let (n, from) = peer
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} to the peer: {e}"));
        assert_eq!(&buf[..n], &want[..], "datagram {i} to the peer");
        relayed = Some(from);
    }
    let relayed = relayed.unwrap();

    // Peer → client: 16 datagrams of 1,200 bytes and a 1-byte last one.
    let back: Vec<Vec<u8>> = (0..17)
        .map(|i| payload(100 + i, if i == 16 { 1 } else { 1200 }))
        .collect();
    send_gso(&peer, relayed, &back);
    for (i, want) in back.iter().enumerate() {
        let (data, channel) = c.recv_data().unwrap_or_else(|| panic!("datagram {i} to the client"));
        assert_eq!(channel, Some(0x4000));
        assert_eq!(data, *want, "datagram {i} to the client");
    }
    let lines = server.stop();
    // Both bursts arrived coalesced and left as GSO runs.
    assert!(shutdown_value(&lines, "gro_receives") >= 2, "{lines:?}");
    assert_eq!(shutdown_value(&lines, "gro_datagrams"), 34, "{lines:?}");
    assert!(shutdown_value(&lines, "gso_sends") >= 2, "{lines:?}");
    assert_eq!(shutdown_value(&lines, "gso_fallbacks"), 0, "{lines:?}");
}

#[test]
fn udp_gro_is_refused_with_io_uring() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--listen", "127.0.0.1:0", "--io-backend", "io-uring", "--udp-gro"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--udp-gro needs --io-backend mmsg"), "{err}");
}
