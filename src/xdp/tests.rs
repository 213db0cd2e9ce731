//! The program in the kernel without an interface (BPF_PROG_TEST_RUN): for each case, a
//! frame built here goes in, and the verdict and the exact frame that comes out are checked;
//! IP and UDP checksums of the output are verified from scratch by this file's own code.
//! The maps are filled through [`XdpOffload::on_event`] with the server's events, so the
//! user-space side is tested with the program. Tests skip (with a printed reason) when the
//! kernel refuses the `bpf()` syscall; CI runs as root, where they run.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions};

use super::*;

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Runs the program once on `frame`: (verdict, output frame).
fn run(p: &mut XdpProgram, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let prog = program(&mut p.ebpf).expect("program");
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

// ---- Frames, built and checked here, independently of the program ----

const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

/// A UDP datagram in an Ethernet frame.
#[derive(Debug, Clone)]
struct Pkt {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
    /// TTL / hop limit.
    ttl: u8,
    /// IPv4 TOS / IPv6 traffic class.
    tos: u8,
    /// IPv4 identification.
    id: u16,
    /// IPv4 flags and fragment offset (0x4000: DF).
    frag: u16,
    /// IPv6 flow label.
    flow: u32,
    /// Send UDP checksum 0 (IPv4: none).
    zero_csum: bool,
    /// IPv4 options (a multiple of 4 bytes).
    options: Vec<u8>,
}

impl Pkt {
    fn new(src_mac: [u8; 6], dst_mac: [u8; 6], src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) -> Pkt {
        Pkt {
            src_mac,
            dst_mac,
            src,
            dst,
            payload,
            ttl: 64,
            tos: 0xb8,
            id: 0x1234,
            frag: 0x4000,
            flow: 0x5_4321,
            zero_csum: false,
            options: Vec::new(),
        }
    }

    fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        let udp_len = (8 + self.payload.len()) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&self.src.port().to_be_bytes());
        udp.extend_from_slice(&self.dst.port().to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let csum = if self.zero_csum {
            0
        } else {
            match udp_checksum(self.src.ip(), self.dst.ip(), &udp) {
                0 => 0xffff,
                c => c,
            }
        };
        udp[6..8].copy_from_slice(&csum.to_be_bytes());
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&[0x08, 0x00]);
                let hlen = 20 + self.options.len();
                let mut ip = vec![0x40 | (hlen / 4) as u8, self.tos];
                ip.extend_from_slice(&((hlen + udp.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&self.id.to_be_bytes());
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.extend_from_slice(&[self.ttl, 17, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.options);
                let c = !fold(sum(&ip, 0));
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&[0x86, 0xdd]);
                let vtc = (6u32 << 28) | (u32::from(self.tos) << 20) | self.flow;
                f.extend_from_slice(&vtc.to_be_bytes());
                f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
                f.extend_from_slice(&[17, self.ttl]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend_from_slice(&udp);
        f
    }
}

/// Ones'-complement sum of 16-bit big-endian words (an odd last byte padded with 0).
fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        acc += u32::from(w);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The UDP checksum of `udp` (header with checksum field 0, and payload) under the
/// pseudo-header of RFC 768 / RFC 8200 §8.1.
fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => panic!("mixed families"),
    }
    !fold(sum(udp, sum(&pseudo, 0)))
}

/// Checks a frame's IPv4 header checksum and its UDP checksum from scratch (sum over the
/// header, or pseudo-header and datagram, including the checksum field, must be 0xffff),
/// and that the lengths agree with the frame. Returns whether the UDP checksum was 0.
fn verify_checksums(f: &[u8]) -> bool {
    let (src, dst, udp) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => {
            let ip = &f[14..];
            let hlen = usize::from(ip[0] & 0xf) * 4;
            assert_eq!(fold(sum(&ip[..hlen], 0)), 0xffff, "IPv4 header checksum");
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let s = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let d = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            (IpAddr::V4(s), IpAddr::V4(d), &ip[hlen..tot])
        }
        0x86dd => {
            let ip = &f[14..];
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let d = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (IpAddr::V6(s), IpAddr::V6(d), &ip[40..40 + plen])
        }
        t => panic!("ethertype {t:#x}"),
    };
    assert_eq!(
        usize::from(u16::from_be_bytes([udp[4], udp[5]])),
        udp.len(),
        "UDP length"
    );
    let csum = u16::from_be_bytes([udp[6], udp[7]]);
    if csum == 0 {
        assert!(src.is_ipv4(), "UDP checksum 0 over IPv6");
        return true;
    }
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => unreachable!(),
    }
    assert_eq!(fold(sum(udp, sum(&pseudo, 0))), 0xffff, "UDP checksum");
    false
}

fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut v = channel.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Payload bytes that are not all alike (so that a misplaced byte shows).
fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

// ---- Addresses and the server's events ----

struct Net {
    client: SocketAddr,
    server: SocketAddr,
    relayed: SocketAddr,
    peer: SocketAddr,
}

fn v4() -> Net {
    Net {
        client: "192.0.2.10:50000".parse().unwrap(),
        server: "198.51.100.1:3478".parse().unwrap(),
        relayed: "198.51.100.2:49200".parse().unwrap(),
        peer: "203.0.113.5:6001".parse().unwrap(),
    }
}

fn v6() -> Net {
    Net {
        client: "[2001:db8:1::10]:50000".parse().unwrap(),
        server: "[2001:db8:2::1]:3478".parse().unwrap(),
        relayed: "[2001:db8:2::2]:49200".parse().unwrap(),
        peer: "[2001:db8:3::5]:6001".parse().unwrap(),
    }
}

const CH: u16 = 0x4001;

impl Net {
    fn ft(&self) -> FiveTuple {
        FiveTuple::udp(self.client, self.server)
    }

    /// ChannelData from the client to the listening address.
    fn client_sends(&self, channel: u16, payload: &[u8]) -> Pkt {
        Pkt::new(
            CLIENT_MAC,
            SERVER_MAC,
            self.client,
            self.server,
            channel_data(channel, payload),
        )
    }

    /// What the relay sends to the peer for it.
    fn relayed_to_peer(&self, payload: &[u8]) -> Pkt {
        let mut p = Pkt::new(SERVER_MAC, CLIENT_MAC, self.relayed, self.peer, payload.to_vec());
        p.ttl = 63;
        p.flow = 0;
        p
    }

    /// A datagram from the peer to the relayed address.
    fn peer_sends(&self, payload: &[u8]) -> Pkt {
        Pkt::new(PEER_MAC, SERVER_MAC, self.peer, self.relayed, payload.to_vec())
    }

    /// What the relay sends to the client for it.
    fn relayed_to_client(&self, channel: u16, payload: &[u8]) -> Pkt {
        let mut p = Pkt::new(
            SERVER_MAC,
            PEER_MAC,
            self.server,
            self.client,
            channel_data(channel, payload),
        );
        p.ttl = 63;
        p.flow = 0;
        p
    }
}

/// A loaded program with lo's MTU recorded (BPF_PROG_TEST_RUN runs as if received on lo),
/// and one shard's offload.
struct Rig {
    prog: XdpProgram,
    off: XdpOffload,
    now: Instant,
}

fn lo_ifindex() -> u32 {
    read_sys_u32("lo", "ifindex").expect("/sys/class/net/lo/ifindex")
}

fn rig_with(force_tail_grow: bool, capped: bool) -> Option<Rig> {
    let mut prog = match XdpProgram::load_with(LoadOptions {
        max_channels: 1024,
        force_tail_grow,
    }) {
        Ok(p) => p,
        Err(e) if e.is_refused() => {
            eprintln!("skipped: the kernel refused the bpf() syscall ({e}); run as root");
            return None;
        }
        Err(e) => panic!("loading the XDP program failed: {e:?}"),
    };
    prog.set_mtu(lo_ifindex(), 1500).expect("mtu entry");
    let off = prog.offload(capped).expect("offload");
    Some(Rig {
        prog,
        off,
        now: Instant::now(),
    })
}

fn rig() -> Option<Rig> {
    rig_with(false, false)
}

impl Rig {
    fn ev(&mut self, e: Event) -> Option<Usage> {
        self.off.on_event(self.now, &e)
    }

    /// Allocation, channel and permission as the server reports a ChannelBind.
    fn bind(&mut self, n: &Net, channel: u16, chan_life: Duration, perm_life: Duration) {
        let (ft, relayed, now) = (n.ft(), n.relayed, self.now);
        self.ev(Event::AllocationCreated {
            five_tuple: ft,
            additional: None,
            relayed,
            lifetime: Duration::from_secs(600),
        });
        self.ev(Event::ChannelBound {
            five_tuple: ft,
            relayed,
            channel,
            peer: n.peer,
            expires: now + chan_life,
        });
        self.ev(Event::PermissionInstalled {
            five_tuple: ft,
            relayed,
            peer: n.peer.ip(),
            expires: now + perm_life,
        });
    }

    fn bind_default(&mut self, n: &Net) {
        self.bind(n, CH, Duration::from_secs(600), Duration::from_secs(300));
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(&mut self.prog, frame)
    }

    /// Runs `input` and asserts XDP_TX with exactly `expected` out, checksums verified.
    fn assert_tx(&mut self, input: &[u8], expected: &[u8]) {
        let (verdict, out) = self.run(input);
        assert_eq!(verdict, XDP_TX, "verdict");
        assert_eq!(hex::encode(&out), hex::encode(expected), "output frame");
        verify_checksums(&out);
    }

    /// Runs `input` and asserts XDP_PASS with the frame unchanged.
    fn assert_pass(&mut self, input: &[u8]) {
        let (verdict, out) = self.run(input);
        assert_eq!(verdict, XDP_PASS, "verdict");
        assert_eq!(hex::encode(&out), hex::encode(input), "a passed frame is unchanged");
    }
}

// ---- Forwarded ----

#[test]
fn client_to_peer_ipv4_and_ipv6() {
    for n in [v4(), v6()] {
        let Some(mut r) = rig() else { return };
        r.bind_default(&n);
        assert_eq!(r.off.installed(), 1);
        // Odd, even, empty and 1,400-byte payloads.
        for len in [5, 0, 1, 2, 3, 255, 256, 257, 1399, 1400] {
            let d = data(len);
            r.assert_tx(&n.client_sends(CH, &d).frame(), &n.relayed_to_peer(&d).frame());
        }
    }
}

#[test]
fn peer_to_client_ipv4_and_ipv6() {
    for n in [v4(), v6()] {
        let Some(mut r) = rig() else { return };
        r.bind_default(&n);
        for len in [7, 0, 1, 2, 3, 255, 256, 257, 1399, 1400] {
            let d = data(len);
            r.assert_tx(&n.peer_sends(&d).frame(), &n.relayed_to_client(CH, &d).frame());
        }
    }
}

/// Where the driver leaves no headroom, the tail grows and the payload moves by 4 bytes (the
/// program is loaded with `force_tail_grow` to take that path): the same frames come out.
#[test]
fn peer_to_client_by_growing_the_tail() {
    for n in [v4(), v6()] {
        let Some(mut r) = rig_with(true, false) else { return };
        r.bind_default(&n);
        for len in [0, 1, 3, 4, 5, 255, 256, 257, 511, 512, 513, 1399, 1400] {
            let d = data(len);
            r.assert_tx(&n.peer_sends(&d).frame(), &n.relayed_to_client(CH, &d).frame());
        }
        // ChannelData from the client does not use the path.
        let d = data(9);
        r.assert_tx(&n.client_sends(CH, &d).frame(), &n.relayed_to_peer(&d).frame());
    }
}

#[test]
fn udp_checksum_zero_over_ipv4_stays_zero() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    for len in [0, 1, 100] {
        let d = data(len);
        let mut input = n.client_sends(CH, &d);
        input.zero_csum = true;
        let mut expected = n.relayed_to_peer(&d);
        expected.zero_csum = true;
        r.assert_tx(&input.frame(), &expected.frame());
        let (_, out) = r.run(&input.frame());
        assert!(verify_checksums(&out), "checksum stays 0");

        let mut input = n.peer_sends(&d);
        input.zero_csum = true;
        let mut expected = n.relayed_to_client(CH, &d);
        expected.zero_csum = true;
        r.assert_tx(&input.frame(), &expected.frame());
    }
}

/// A checksum that comes out as 0 is sent as 0xffff (0 means "none" over IPv4).
#[test]
fn computed_udp_checksum_zero_is_sent_as_ffff() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    // Find a 2-byte payload whose relayed datagram sums to a checksum of 0.
    let d = (0..=u16::MAX)
        .map(|w| w.to_be_bytes().to_vec())
        .find(|d| {
            let f = n.relayed_to_peer(d).frame();
            let mut udp = f[34..].to_vec();
            udp[6] = 0;
            udp[7] = 0;
            udp_checksum(n.relayed.ip(), n.peer.ip(), &udp) == 0
        })
        .expect("some payload gives checksum 0");
    let (verdict, out) = r.run(&n.client_sends(CH, &d).frame());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&out[40..42], &[0xff, 0xff]);
    assert_eq!(out, n.relayed_to_peer(&d).frame());
    verify_checksums(&out);
}

/// Real NICs pad short frames to 60 bytes: the IP length counts, the padding rides along.
#[test]
fn ethernet_padding_is_ignored() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    let mut input = n.client_sends(CH, &[]).frame();
    input.resize(60, 0);
    let mut expected = n.relayed_to_peer(&[]).frame();
    expected.resize(56, 0);
    r.assert_tx(&input, &expected);

    let mut input = n.peer_sends(&[1]).frame();
    input.resize(60, 0);
    let mut expected = n.relayed_to_client(CH, &[1]).frame();
    expected.resize(64, 0);
    r.assert_tx(&input, &expected);
}

#[test]
fn counters_follow_the_forwarded_datagrams() {
    let n = v6();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    for _ in 0..3 {
        r.run(&n.client_sends(CH, &data(5)).frame());
    }
    for _ in 0..2 {
        r.run(&n.peer_sends(&data(7)).frame());
    }
    r.assert_pass(&n.client_sends(CH + 1, &data(5)).frame()); // not counted
    let want = Usage {
        to_peer_packets: 3,
        to_peer_bytes: 15,
        to_client_packets: 2,
        to_client_bytes: 14,
    };
    let c = r.off.counters();
    assert_eq!(c.len(), 1);
    assert_eq!(
        c[0],
        ChannelCounters {
            five_tuple: n.ft(),
            relayed: n.relayed,
            channel: CH,
            peer: n.peer,
            usage: want,
        }
    );
    // A refresh rewrites the entries and keeps the counts.
    r.ev(Event::ChannelRebound {
        five_tuple: n.ft(),
        relayed: n.relayed,
        channel: CH,
        peer: n.peer,
        expires: r.now + Duration::from_secs(600),
    });
    r.run(&n.client_sends(CH, &data(1)).frame());
    let mut want2 = want;
    want2.to_peer_packets += 1;
    want2.to_peer_bytes += 1;
    assert_eq!(r.off.counters()[0].usage, want2);
    assert_eq!(r.off.totals(), want2);
    // The allocation closes: its usage is returned, its entries are gone, the totals stay.
    let closed = r.ev(Event::AllocationClosed {
        five_tuple: n.ft(),
        additional: None,
        relayed: n.relayed,
        reason: turnpike_proto::server::CloseReason::Deleted,
        age: Duration::from_secs(1),
        usage: Usage::default(),
        username: "u".into(),
    });
    assert_eq!(closed, Some(want2));
    assert_eq!(r.off.installed(), 0);
    assert!(r.off.counters().is_empty());
    assert_eq!(r.off.totals(), want2);
    r.assert_pass(&n.client_sends(CH, &data(5)).frame());
    r.assert_pass(&n.peer_sends(&data(5)).frame());
    assert_eq!(map_len(&r), (0, 0));
    assert_eq!(r.off.errors(), 0);
}

fn map_len(r: &Rig) -> (usize, usize) {
    (r.off.maps.channels.keys().count(), r.off.maps.peers.keys().count())
}

// ---- Passed to the kernel, unchanged ----

#[test]
fn unknown_channel_and_unknown_peer_pass() {
    for n in [v4(), v6()] {
        let Some(mut r) = rig() else { return };
        r.bind_default(&n);
        r.assert_pass(&n.client_sends(CH + 1, &data(10)).frame());
        // Another client port: another 5-tuple.
        let mut p = n.client_sends(CH, &data(10));
        p.src.set_port(50001);
        r.assert_pass(&p.frame());
        // A peer without an entry: another port, another address.
        let mut p = n.peer_sends(&data(10));
        p.src.set_port(6002);
        r.assert_pass(&p.frame());
        let mut p = n.peer_sends(&data(10));
        p.src = match p.src {
            SocketAddr::V4(_) => "203.0.113.6:6001".parse().unwrap(),
            SocketAddr::V6(_) => "[2001:db8:3::6]:6001".parse().unwrap(),
        };
        r.assert_pass(&p.frame());
    }
}

#[test]
fn padded_or_inconsistent_channel_data_passes() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    // Padded to a multiple of 4 (as over TCP, RFC 8656 §12.5): length 5, 8 bytes follow.
    let mut payload = channel_data(CH, &data(5));
    payload.extend_from_slice(&[0, 0, 0]);
    r.assert_pass(&Pkt::new(CLIENT_MAC, SERVER_MAC, n.client, n.server, payload).frame());
    // Length beyond the datagram.
    let mut payload = channel_data(CH, &data(5));
    payload.truncate(7);
    r.assert_pass(&Pkt::new(CLIENT_MAC, SERVER_MAC, n.client, n.server, payload).frame());
    // Shorter than a ChannelData header.
    r.assert_pass(&Pkt::new(CLIENT_MAC, SERVER_MAC, n.client, n.server, vec![0x40, 0x01, 0]).frame());
    // UDP length disagreeing with the IP length.
    let mut f = n.client_sends(CH, &data(5)).frame();
    f[38..40].copy_from_slice(&(8u16 + 4 + 4).to_be_bytes());
    r.assert_pass(&f);
    // Not ChannelData at all (first two bits 10 or 11): the program checks the range.
    r.assert_pass(&n.client_sends(0x8000, &data(5)).frame());
    r.assert_pass(&n.client_sends(0xC000, &data(5)).frame());
    // RFC 5766's numbers 0x5000-0x7FFF, which the server binds outside strict mode (coturn's
    // uclient picks from 0x4000-0x7FFF), are forwarded like RFC 8656's.
    r.bind(&n, 0x7FFF, Duration::from_secs(600), Duration::from_secs(300));
    assert_eq!(r.off.installed(), 2);
    let (verdict, _) = r.run(&n.client_sends(0x7FFF, &data(5)).frame());
    assert_eq!(verdict, XDP_TX, "0x7FFF is forwarded");
}

#[test]
fn stun_and_indications_pass() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    // A Binding request: type 0x0001, length 0, the magic cookie, a transaction ID.
    let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7; 12]);
    r.assert_pass(&Pkt::new(CLIENT_MAC, SERVER_MAC, n.client, n.server, stun.clone()).frame());
    // A Send indication (0x0016) with a 4-byte attribute.
    let mut send = vec![0x00, 0x16, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    send.extend_from_slice(&[9; 12]);
    send.extend_from_slice(&[0x00, 0x13, 0x00, 0x04, 1, 2, 3, 4]);
    r.assert_pass(&Pkt::new(CLIENT_MAC, SERVER_MAC, n.client, n.server, send).frame());
}

#[test]
fn fragments_options_extension_headers_and_vlan_pass() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    // More fragments; a non-zero offset.
    let mut p = n.client_sends(CH, &data(20));
    p.frag = 0x2000;
    r.assert_pass(&p.frame());
    let mut p = n.peer_sends(&data(20));
    p.frag = 0x0003;
    r.assert_pass(&p.frame());
    // IPv4 options (ihl 6: four NOPs... as one no-op option word).
    let mut p = n.client_sends(CH, &data(20));
    p.options = vec![1, 1, 1, 0];
    r.assert_pass(&p.frame());
    let mut p = n.peer_sends(&data(20));
    p.options = vec![1, 1, 1, 0];
    r.assert_pass(&p.frame());
    // TTL 1: the kernel's (it would leave with 0).
    let mut p = n.client_sends(CH, &data(20));
    p.ttl = 1;
    r.assert_pass(&p.frame());
    // A VLAN tag (802.1Q) in front of the IPv4 header.
    let f = n.client_sends(CH, &data(20)).frame();
    let mut tagged = f[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&f[12..]);
    r.assert_pass(&tagged);

    let n = v6();
    r.bind_default(&n);
    r.assert_tx(
        &n.client_sends(CH, &data(20)).frame(),
        &n.relayed_to_peer(&data(20)).frame(),
    );
    // A hop-by-hop options header before UDP.
    let f = n.client_sends(CH, &data(20)).frame();
    let mut ext = f[..54].to_vec();
    ext[20] = 0; // next header: hop-by-hop
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    ext[18..20].copy_from_slice(&plen.to_be_bytes());
    ext.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    ext.extend_from_slice(&f[54..]);
    r.assert_pass(&ext);
    // A fragment header.
    ext[20] = 44;
    ext[54..62].copy_from_slice(&[17, 0, 0, 0, 0, 0, 0, 1]);
    r.assert_pass(&ext);
    // Hop limit 1.
    let mut p = n.peer_sends(&data(20));
    p.ttl = 1;
    r.assert_pass(&p.frame());
    // UDP checksum 0 over IPv6 (not allowed, RFC 8200 §8.1): the kernel decides.
    let mut p = n.client_sends(CH, &data(20));
    p.zero_csum = true;
    r.assert_pass(&p.frame());
}

/// Peer datagrams that would not fit the link's MTU once framed go to the kernel.
#[test]
fn peer_datagram_over_the_mtu_passes() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    r.prog.set_mtu(lo_ifindex(), 1280).unwrap();
    // 20 + 8 + 4 + 1248 = 1280 fits; one more byte does not.
    r.assert_tx(
        &n.peer_sends(&data(1248)).frame(),
        &n.relayed_to_client(CH, &data(1248)).frame(),
    );
    r.assert_pass(&n.peer_sends(&data(1249)).frame());
    // Without an MTU for the interface nothing is framed.
    r.prog.mtu.remove(&lo_ifindex()).unwrap();
    r.assert_pass(&n.peer_sends(&data(10)).frame());
    // ChannelData from the client only shrinks.
    r.assert_tx(
        &n.client_sends(CH, &data(1300)).frame(),
        &n.relayed_to_peer(&data(1300)).frame(),
    );
}

// ---- Expiry, permissions, rebinding, caps ----

/// The kernel checks the stored deadline itself: an entry past it is not used, whether the
/// channel, the permission or the allocation ends first.
#[test]
fn expired_entries_pass() {
    let n = v4();
    let short = Duration::from_millis(150);
    let long = Duration::from_secs(600);
    for case in 0..3 {
        let Some(mut r) = rig() else { return };
        match case {
            0 => r.bind(&n, CH, short, long),
            1 => r.bind(&n, CH, long, short),
            _ => {
                r.bind(&n, CH, long, long);
                r.ev(Event::AllocationRefreshed {
                    five_tuple: n.ft(),
                    additional: None,
                    relayed: n.relayed,
                    lifetime: short,
                });
            }
        }
        r.assert_tx(
            &n.client_sends(CH, &data(3)).frame(),
            &n.relayed_to_peer(&data(3)).frame(),
        );
        r.assert_tx(
            &n.peer_sends(&data(3)).frame(),
            &n.relayed_to_client(CH, &data(3)).frame(),
        );
        std::thread::sleep(short + Duration::from_millis(50));
        // No event came (the server's timer has not run yet): the entry is still there.
        assert_eq!(r.off.installed(), 1, "case {case}");
        r.assert_pass(&n.client_sends(CH, &data(3)).frame());
        r.assert_pass(&n.peer_sends(&data(3)).frame());
    }
}

/// The stored deadline is min(channel, permission, allocation) on the kernel's clock.
#[test]
fn entry_deadline_is_the_earliest_expiry() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind(&n, CH, Duration::from_secs(600), Duration::from_secs(300));
    let (ck, _) = chan_entry(&n.ft(), n.relayed, CH, n.peer, 0, 0, Usage::default());
    let (pk, _) = peer_entry(&n.ft(), n.relayed, CH, n.peer, 0, 0, Usage::default());
    let deadline = |r: &Rig| {
        let c = u64_at(&r.off.maps.channels.get(&ck, 0).unwrap(), 40);
        let p = u64_at(&r.off.maps.peers.get(&pk, 0).unwrap(), 40);
        assert_eq!(c, p);
        c
    };
    let clock = r.off.clock;
    assert_eq!(deadline(&r), clock.ns(r.now + Duration::from_secs(300)));
    // A permission refresh to beyond the channel: the channel's expiry.
    r.ev(Event::PermissionInstalled {
        five_tuple: n.ft(),
        relayed: n.relayed,
        peer: n.peer.ip(),
        expires: r.now + Duration::from_secs(900),
    });
    assert_eq!(deadline(&r), clock.ns(r.now + Duration::from_secs(600)));
    // The allocation's lifetime shrinks below both.
    r.ev(Event::AllocationRefreshed {
        five_tuple: n.ft(),
        additional: None,
        relayed: n.relayed,
        lifetime: Duration::from_secs(60),
    });
    assert_eq!(deadline(&r), clock.ns(r.now + Duration::from_secs(60)));
    // The kernel's clock agrees with the conversion (bpf_ktime_get_ns is CLOCK_MONOTONIC).
    let k = clock.ns(Instant::now());
    let m = monotonic_ns();
    assert!(m.abs_diff(k) < 1_000_000, "{m} vs {k}");
}

#[test]
fn permission_governs_the_offload() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    // A channel without a permission event yet (the server reports the bind first).
    r.ev(Event::ChannelBound {
        five_tuple: n.ft(),
        relayed: n.relayed,
        channel: CH,
        peer: n.peer,
        expires: r.now + Duration::from_secs(600),
    });
    assert_eq!(r.off.installed(), 0);
    r.assert_pass(&n.peer_sends(&data(4)).frame());
    // A permission for another peer IP does not count.
    r.ev(Event::PermissionInstalled {
        five_tuple: n.ft(),
        relayed: n.relayed,
        peer: "203.0.113.99".parse().unwrap(),
        expires: r.now + Duration::from_secs(300),
    });
    assert_eq!(r.off.installed(), 0);
    r.ev(Event::PermissionInstalled {
        five_tuple: n.ft(),
        relayed: n.relayed,
        peer: n.peer.ip(),
        expires: r.now + Duration::from_secs(300),
    });
    assert_eq!(r.off.installed(), 1);
    r.assert_tx(
        &n.peer_sends(&data(4)).frame(),
        &n.relayed_to_client(CH, &data(4)).frame(),
    );
    // The permission expires: both directions go back to user space.
    r.ev(Event::PermissionExpired {
        five_tuple: n.ft(),
        relayed: n.relayed,
        peer: n.peer.ip(),
    });
    assert_eq!(r.off.installed(), 0);
    assert_eq!(map_len(&r), (0, 0));
    r.assert_pass(&n.peer_sends(&data(4)).frame());
    r.assert_pass(&n.client_sends(CH, &data(4)).frame());
    // The channel is still bound: a new permission brings it back.
    r.ev(Event::PermissionInstalled {
        five_tuple: n.ft(),
        relayed: n.relayed,
        peer: n.peer.ip(),
        expires: r.now + Duration::from_secs(300),
    });
    r.assert_tx(
        &n.client_sends(CH, &data(4)).frame(),
        &n.relayed_to_peer(&data(4)).frame(),
    );
    // The channel expires.
    r.ev(Event::ChannelExpired {
        five_tuple: n.ft(),
        relayed: n.relayed,
        channel: CH,
        peer: n.peer,
    });
    assert_eq!(map_len(&r), (0, 0));
    r.assert_pass(&n.client_sends(CH, &data(4)).frame());
    // An event already past its time installs nothing.
    r.ev(Event::ChannelBound {
        five_tuple: n.ft(),
        relayed: n.relayed,
        channel: CH,
        peer: n.peer,
        expires: r.now,
    });
    assert_eq!(map_len(&r), (0, 0));
}

/// After a channel number is bound to another peer, nothing reaches the old one through XDP.
#[test]
fn rebinding_to_another_peer_moves_the_entries() {
    let n = v4();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    let other = Net {
        peer: "203.0.113.7:7000".parse().unwrap(),
        ..v4()
    };
    for expire_first in [true, false] {
        let (from, to) = if expire_first { (&n, &other) } else { (&other, &n) };
        if expire_first {
            r.ev(Event::ChannelExpired {
                five_tuple: n.ft(),
                relayed: n.relayed,
                channel: CH,
                peer: from.peer,
            });
        }
        // (Without the expiry first: the offload replaces a binding to another peer itself.)
        r.bind(to, CH, Duration::from_secs(600), Duration::from_secs(300));
        assert_eq!(map_len(&r), (1, 1));
        r.assert_tx(
            &n.client_sends(CH, &data(6)).frame(),
            &to.relayed_to_peer(&data(6)).frame(),
        );
        r.assert_pass(&from.peer_sends(&data(6)).frame());
        r.assert_tx(
            &to.peer_sends(&data(6)).frame(),
            &to.relayed_to_client(CH, &data(6)).frame(),
        );
    }
}

#[test]
fn bandwidth_capped_allocations_stay_in_user_space() {
    let n = v4();
    let Some(mut r) = rig_with(false, true) else { return };
    r.bind_default(&n);
    assert_eq!(r.off.installed(), 0);
    r.assert_pass(&n.client_sends(CH, &data(8)).frame());
    r.off.set_bandwidth_capped(r.now, false);
    assert_eq!(r.off.installed(), 1);
    r.assert_tx(
        &n.client_sends(CH, &data(8)).frame(),
        &n.relayed_to_peer(&data(8)).frame(),
    );
    r.off.set_bandwidth_capped(r.now, true);
    assert_eq!(map_len(&r), (0, 0));
    r.assert_pass(&n.peer_sends(&data(8)).frame());
    // The program checks the flag too, should an entry carry it.
    let far = r.off.clock.ns(r.now + Duration::from_secs(60));
    let (ck, cv) = chan_entry(
        &n.ft(),
        n.relayed,
        CH,
        n.peer,
        far,
        FLAG_BANDWIDTH_CAPPED,
        Usage::default(),
    );
    let (pk, pv) = peer_entry(
        &n.ft(),
        n.relayed,
        CH,
        n.peer,
        far,
        FLAG_BANDWIDTH_CAPPED,
        Usage::default(),
    );
    r.off.maps.channels.insert(ck, cv, 0).unwrap();
    r.off.maps.peers.insert(pk, pv, 0).unwrap();
    r.assert_pass(&n.client_sends(CH, &data(8)).frame());
    r.assert_pass(&n.peer_sends(&data(8)).frame());
    // Without the flag the same entries forward.
    let (_, cv) = chan_entry(&n.ft(), n.relayed, CH, n.peer, far, 0, Usage::default());
    r.off.maps.channels.insert(ck, cv, 0).unwrap();
    r.assert_tx(
        &n.client_sends(CH, &data(8)).frame(),
        &n.relayed_to_peer(&data(8)).frame(),
    );
}

/// Allocations whose client and relayed addresses differ in family change header sizes:
/// left to user space.
#[test]
fn mixed_family_allocations_are_not_offloaded() {
    let Some(mut r) = rig() else { return };
    let n = Net {
        relayed: v6().relayed,
        peer: v6().peer,
        ..v4()
    };
    r.bind_default(&n);
    assert_eq!(r.off.installed(), 0);
    r.assert_pass(&v6().peer_sends(&data(3)).frame());
    r.assert_pass(&n.client_sends(CH, &data(3)).frame());
}

#[test]
fn xdp_never_aborts_on_short_frames() {
    let n = v6();
    let Some(mut r) = rig() else { return };
    r.bind_default(&n);
    let full = n.client_sends(CH, &data(4)).frame();
    for len in 14..full.len() {
        let (verdict, out) = r.run(&full[..len]);
        assert_eq!(verdict, XDP_PASS, "{len} bytes");
        assert_eq!(out, &full[..len]);
        assert_ne!(verdict, XDP_ABORTED);
    }
}

// ---- Attaching ----

/// Runs [`attach_in_namespace`] in a network namespace of its own (`ip netns exec` also
/// mounts that namespace's /sys, which `attach` reads) with a veth pair, whose driver runs
/// XDP natively, and its loopback interface, which only takes generic XDP.
#[test]
fn xdp_attach_native_or_generic() {
    if load(false).is_none() {
        return;
    }
    let ns = format!("tpxdp{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ip(&["netns", "add", &ns]) {
        eprintln!("skipped: `ip netns add` failed (iproute2 and root needed)");
        return;
    }
    let setup = ip(&[
        "-n", &ns, "link", "add", "tpv0", "mtu", "1400", "type", "veth", "peer", "name", "tpv1",
    ]) && ip(&["-n", &ns, "link", "set", "tpv0", "up"])
        && ip(&["-n", &ns, "link", "set", "tpv1", "up"])
        && ip(&["-n", &ns, "link", "set", "lo", "up"]);
    let out = setup.then(|| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().expect("test binary"))
            .args(["--exact", "xdp::tests::attach_in_namespace", "--ignored", "--nocapture"])
            .env("TURNPIKE_XDP_NETNS", "1")
            .output()
            .expect("ip netns exec")
    });
    ip(&["netns", "del", &ns]);
    let out = out.expect("creating the interfaces failed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

fn load(force_tail_grow: bool) -> Option<XdpProgram> {
    rig_with(force_tail_grow, false).map(|r| r.prog)
}

/// Run by [`xdp_attach_native_or_generic`] inside its namespace.
#[test]
#[ignore = "run by xdp_attach_native_or_generic in a network namespace"]
fn attach_in_namespace() {
    assert!(
        std::env::var_os("TURNPIKE_XDP_NETNS").is_some(),
        "run by xdp_attach_native_or_generic"
    );
    let mut p = XdpProgram::load(16).expect("load");
    assert_eq!(p.attach("tpv0").expect("veth"), AttachMode::Native);
    assert_eq!(p.attach("lo").expect("loopback"), AttachMode::Generic);
    let veth = read_sys_u32("tpv0", "ifindex").unwrap();
    let lo = read_sys_u32("lo", "ifindex").unwrap();
    assert_eq!(p.mtu.get(&veth, 0).unwrap(), 1400);
    assert_eq!(p.mtu.get(&lo, 0).unwrap(), 65536);
    // The program is attached: `ip link` shows it, in the mode reported.
    let show = |dev: &str| {
        let o = std::process::Command::new("ip")
            .args(["-d", "link", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        show("tpv0").contains("xdp") && !show("tpv0").contains("xdpgeneric"),
        "{}",
        show("tpv0")
    );
    assert!(show("lo").contains("xdpgeneric"), "{}", show("lo"));
    match p.attach("tpnone0") {
        Err(XdpError::Interface { interface, .. }) => assert_eq!(interface, "tpnone0"),
        other => panic!("{other:?}"),
    }
    // Dropping the program detaches it.
    drop(p);
    assert!(!show("tpv0").contains("prog/xdp"), "{}", show("tpv0"));
    assert!(!show("lo").contains("xdpgeneric"), "{}", show("lo"));
}

/// Each shard thread owns its offload; the program may live on the main thread.
#[test]
fn xdp_handles_move_between_threads() {
    fn send<T: Send>() {}
    send::<XdpOffload>();
    send::<XdpProgram>();
    send::<XdpError>();
}
