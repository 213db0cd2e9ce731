//! Both backends on real loopback sockets: a burst of datagrams forwarded from one socket to
//! one destination arrives whole and in order, with and without UDP GSO, and a GSO send the
//! kernel refuses (segments over the MTU) goes again one datagram at a time.
#![allow(unsafe_code)]

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{BackendKind, Io, IoStats, Verdict, HEADROOM};

fn backends() -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Mmsg];
    if super::probe_uring().is_ok() {
        v.push(BackendKind::IoUring);
    } else {
        eprintln!("io_uring unavailable here: testing mmsg only");
    }
    v
}

/// Datagram `i` of a burst: `len` bytes that say which one it is.
fn datagram(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 31 + k) as u8).collect()
}

/// Sends `lens.len()` datagrams from a client to a socket the backend receives on, which
/// forwards each payload unchanged to a receiver; returns what the receiver got and the
/// backend's counters.
fn forward_burst(kind: BackendKind, gso: bool, lens: &[usize]) -> (Vec<Vec<u8>>, IoStats) {
    let mut io = Io::new(kind, 256, gso, false).expect("backend");
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    relay.set_nonblocking(true).unwrap();
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = receiver.local_addr().unwrap();
    io.register(0, relay.as_raw_fd()).unwrap();
    for (i, &len) in lens.iter().enumerate() {
        client.send_to(&datagram(i, len), relay.local_addr().unwrap()).unwrap();
    }
    let mut scratch = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while io.stats().rx < lens.len() as u64 && Instant::now() < deadline {
        io.wait(Some(Duration::from_millis(10)), &mut scratch, |d, _| Verdict::Forward {
            socket: 0,
            to,
            src: None,
            start: HEADROOM,
            end: HEADROOM + d.len,
        })
        .unwrap();
    }
    // Send completions (io_uring) come back on later waits.
    for _ in 0..5 {
        io.wait(Some(Duration::from_millis(5)), &mut scratch, |_, _| Verdict::Drop)
            .unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < lens.len() {
        match receiver.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    (got, io.stats())
}

fn expected(lens: &[usize]) -> Vec<Vec<u8>> {
    lens.iter().enumerate().map(|(i, &len)| datagram(i, len)).collect()
}

#[test]
fn a_burst_arrives_whole_and_in_order_with_and_without_gso() {
    // 24 equal datagrams and a shorter last one, then a run to break (longer), then more.
    let mut lens = vec![1000; 24];
    lens.push(333);
    lens.extend([1200, 1200, 1200, 0, 7]);
    for kind in backends() {
        for gso in [true, false] {
            let (got, stats) = forward_burst(kind, gso, &lens);
            assert_eq!(got, expected(&lens), "{kind:?} gso={gso}");
            assert_eq!(stats.tx, lens.len() as u64, "{kind:?} gso={gso}");
            assert_eq!(stats.send_errors, 0, "{kind:?} gso={gso}");
            if gso {
                assert!(stats.gso_sends >= 1, "{kind:?}: no GSO send: {stats:?}");
                assert!(stats.gso_datagrams >= 2, "{kind:?}: {stats:?}");
                assert_eq!(stats.gso_fallbacks, 0, "{kind:?}: {stats:?}");
            } else {
                assert_eq!(stats.gso_sends, 0, "{kind:?}: {stats:?}");
            }
        }
    }
}

#[test]
fn a_refused_gso_send_goes_again_one_by_one() {
    // In a network namespace of this thread's own, loopback's MTU below the segment size:
    // the kernel refuses the GSO send (EMSGSIZE) and the datagrams go one by one (IP
    // fragments them).
    let h = std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread, which owns nothing else.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: unshare(CLONE_NEWNET) refused ({}); run as root",
                std::io::Error::last_os_error()
            );
            return;
        }
        let st = std::process::Command::new("ip")
            .args(["link", "set", "lo", "mtu", "1200", "up"])
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("skipped: `ip link set lo mtu 1200 up` failed");
            return;
        }
        let lens = vec![1300; 16];
        for kind in backends() {
            let (got, stats) = forward_burst(kind, true, &lens);
            assert_eq!(got, expected(&lens), "{kind:?}");
            assert!(stats.gso_fallbacks >= 1, "{kind:?}: {stats:?}");
            assert_eq!(stats.gso_sends, 0, "{kind:?}: {stats:?}");
            assert_eq!(stats.tx, lens.len() as u64, "{kind:?}: {stats:?}");
        }
    });
    h.join().unwrap();
}

/// Sends `count` datagrams of `segment` bytes (the last `last` bytes) from `from` to `to` in
/// one sendmsg with UDP_SEGMENT: over loopback they reach a UDP_GRO socket coalesced.
fn send_gso(from: &UdpSocket, to: std::net::SocketAddr, segment: usize, count: usize, last: usize) -> Vec<Vec<u8>> {
    let datagrams: Vec<Vec<u8>> = (0..count)
        .map(|i| datagram(i, if i + 1 == count { last } else { segment }))
        .collect();
    let joined: Vec<u8> = datagrams.concat();
    let mut raw = crate::sys::RawAddr::zeroed();
    let name_len = raw.set(to);
    let mut control = crate::sys::Control::new();
    let control_len = crate::sys::udp_segment(segment as u16, &mut control, 0);
    let mut iov = libc::iovec {
        iov_base: joined.as_ptr() as *mut libc::c_void,
        iov_len: joined.len(),
    };
    // SAFETY: msghdr is a plain C struct; zero is valid.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = (&mut raw as *mut crate::sys::RawAddr).cast();
    hdr.msg_namelen = name_len;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = control_len;
    // SAFETY: every pointer refers to a live local for the call.
    let n = unsafe { libc::sendmsg(from.as_raw_fd(), &hdr, 0) };
    assert_eq!(
        n as usize,
        joined.len(),
        "GSO send: {}",
        std::io::Error::last_os_error()
    );
    datagrams
}

/// The mmsg backend with UDP GRO: what arrives (coalesced or not) is forwarded to a
/// receiver; returns what the receiver got, the handler's view and the counters.
fn gro_forward(send: impl FnOnce(&UdpSocket, std::net::SocketAddr) -> usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, IoStats) {
    let mut io = Io::new(BackendKind::Mmsg, 0, true, true).expect("backend");
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    relay.set_nonblocking(true).unwrap();
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // Room for a whole batch: the kernel doubles this, up to twice net.core.rmem_max.
    socket2::SockRef::from(&receiver).set_recv_buffer_size(1 << 22).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = receiver.local_addr().unwrap();
    io.register(0, relay.as_raw_fd()).unwrap();
    let expected = send(&client, relay.local_addr().unwrap());
    let mut seen = Vec::new();
    let mut scratch = Vec::new();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while io.stats().rx < expected as u64 && Instant::now() < deadline {
        io.wait(Some(Duration::from_millis(10)), &mut scratch, |d, _| {
            seen.push(d.buf[HEADROOM..HEADROOM + d.len].to_vec());
            Verdict::Forward {
                socket: 0,
                to,
                src: None,
                start: HEADROOM,
                end: HEADROOM + d.len,
            }
        })
        .unwrap();
        // Read as it comes: the receiver's buffer holds fewer than the largest test sends.
        receiver.set_nonblocking(true).unwrap();
        while let Ok(n) = receiver.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        receiver.set_nonblocking(false).unwrap();
    }
    while got.len() < expected {
        match receiver.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    (got, seen, io.stats())
}

#[test]
fn coalesced_datagrams_are_split_and_forwarded() {
    // 20 x 1000 bytes and a 123-byte last one: the coalesced payload spans the receive slot
    // and its extra, with one datagram across the boundary.
    let mut sent = Vec::new();
    let (got, seen, stats) = gro_forward(|c, to| {
        sent = send_gso(c, to, 1000, 21, 123);
        sent.len()
    });
    assert_eq!(seen, sent);
    assert_eq!(got, sent);
    assert_eq!(stats.rx, 21, "{stats:?}");
    assert!(stats.gro_receives >= 1, "not coalesced: {stats:?}");
    assert_eq!(stats.gro_datagrams, 21, "{stats:?}");
    assert!(stats.gso_sends >= 1, "the run went out without GSO: {stats:?}");
    assert_eq!(stats.tx, 21);
}

#[test]
fn with_gro_datagrams_over_the_limit_are_still_dropped() {
    // One 5,000-byte datagram, and two coalesced ones of 5,000: all over MAX_PAYLOAD.
    let (got, seen, stats) = gro_forward(|c, to| {
        c.send_to(&datagram(0, 5000), to).unwrap();
        send_gso(c, to, 5000, 2, 5000);
        // Then one that fits, to know when the rest has been read.
        c.send_to(&datagram(9, 100), to).unwrap();
        4
    });
    assert_eq!(seen, vec![datagram(9, 100)]);
    assert_eq!(got, vec![datagram(9, 100)]);
    assert_eq!(stats.truncated, 3, "{stats:?}");
}

#[test]
fn many_coalesced_datagrams_in_one_batch() {
    // Five bursts of 60 coalesced datagrams with single datagrams between them, all read by
    // one recvmmsg: 305 sends queued, more than a batch (64) and more than the segment slots
    // (256), so the queue is flushed part way.
    let mut sent = Vec::new();
    let (got, seen, stats) = gro_forward(|c, to| {
        for b in 0..5 {
            sent.extend(send_gso(c, to, 200, 60, 200));
            let single = datagram(1000 + b, 50);
            c.send_to(&single, to).unwrap();
            sent.push(single);
        }
        sent.len()
    });
    assert_eq!(stats.rx, 305, "{stats:?}");
    assert_eq!(stats.gro_datagrams, 300, "{stats:?}");
    assert_eq!(seen, sent);
    assert_eq!(got, sent);
    assert_eq!(stats.tx, 305);
    assert_eq!(stats.send_errors, 0);
}
