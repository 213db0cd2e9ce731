//! The XDP lab (feature `xdp`): turnpike with `--xdp r0` in one network namespace, the client
//! and peer hosts in another, joined by a veth pair (r0 / h0):
//!
//! ```text
//!  hosts namespace                                relay namespace
//!  h0: 198.18.0.2 client      2001:db8::2         r0: 198.18.0.1  2001:db8::1
//!      198.18.0.3 peer A      2001:db8::3             turnpike --xdp r0 (native mode)
//!      198.18.0.4 peer B      2001:db8::4             metrics on 198.18.0.1:9100
//!      198.18.0.5 peer C      2001:db8::5
//!  (an XDP_PASS program on h0: a veth delivers XDP_TX'd frames only to a peer with XDP;
//!   tx checksum offload off on both ends, else the frames carry partial checksums)
//! ```
//!
//! The program sends what it forwards back out of r0 with the Ethernet addresses swapped, so
//! clients and peers sit behind the same veth, as the module documentation of `src/xdp`
//! requires. The tests count what arrives against `turnpike_relayed_packets_total`
//! (`datapath="xdp"` vs `"userspace"`), capture every UDP frame in the hosts namespace with an
//! AF_PACKET socket and verify its IPv4 header and UDP checksums from scratch (a UDP socket would
//! drop a bad one silently), and check that no datagram reaches a peer the server would not
//! relay to: after Refresh 0, after the allocation expired, after a permission expired and
//! after a channel number was bound to another peer; never to a peer without permission;
//! and nothing in XDP when the server has a bandwidth cap.
//!
//! Needs root (CI has it; without it each test prints why it skips), iproute2 with libbpf,
//! ethtool, clang, and coturn's turnutils for the uclient tests (scripts/test.sh installs
//! them). Namespaces are deleted on drop; the only processes stopped are the ones started here,
//! by PID.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use turnpike::proto::stun::{
    AddressFamily, Attribute, Class, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

use crate::client::Client;
use crate::harness::{require, Server, PASSWORD, USER};

/// Addresses of the lab, one family.
#[derive(Clone, Copy)]
struct Net {
    relay: &'static str,
    client: &'static str,
    peer_a: &'static str,
    peer_b: &'static str,
    peer_c: &'static str,
}

const V4: Net = Net {
    relay: "198.18.0.1",
    client: "198.18.0.2",
    peer_a: "198.18.0.3",
    peer_b: "198.18.0.4",
    peer_c: "198.18.0.5",
};

const V6: Net = Net {
    relay: "2001:db8::1",
    client: "2001:db8::2",
    peer_a: "2001:db8::3",
    peer_b: "2001:db8::4",
    peer_c: "2001:db8::5",
};

const PORT: u16 = 3478;
const METRICS: &str = "198.18.0.1:9100";

/// The XDP_PASS program for h0.
const PASS_PROGRAM: &str = r#"
#include <linux/bpf.h>
__attribute__((section("xdp"), used)) int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
char _license[] __attribute__((section("license"), used)) = "GPL";
"#;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("an IP"), port)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// Why the lab cannot run here, if it cannot (printed by the skipping test).
fn unprivileged() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    (uid != "0").then(|| {
        format!(
            "skipped: the XDP lab needs root (network namespaces, BPF, XDP attach); running as uid {uid} (CI runs as root)"
        )
    })
}

/// Runs `f` on a thread that entered the network namespace `ns`: sockets it creates belong
/// to that namespace for their whole life, whichever thread uses them afterwards.
#[allow(unsafe_code)]
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("open /run/netns/{ns}: {e}"));
    thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) takes an open descriptor (the namespace file, alive for the
            // call) and a flag; with CLONE_NEWNET it moves only the calling thread, a scoped
            // thread that ends when `f` returns, into that network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({ns}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Two namespaces joined by a veth pair; both deleted on drop.
struct Lab {
    hosts: String,
    relay: String,
    dir: PathBuf,
}

impl Lab {
    /// Builds the topology, or returns `None` after printing why it cannot run here.
    fn new() -> Option<Lab> {
        if let Some(reason) = unprivileged() {
            eprintln!("{reason}");
            return None;
        }
        for program in ["ip", "ethtool", "clang"] {
            require(program);
        }
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let base = format!("tpxl{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&base);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let lab = Lab {
            hosts: format!("{base}-h"),
            relay: format!("{base}-r"),
            dir,
        };
        let (h, r) = (lab.hosts.as_str(), lab.relay.as_str());
        ip(&["netns", "add", h]);
        ip(&["netns", "add", r]);
        ip(&[
            "-n", h, "link", "add", "h0", "type", "veth", "peer", "name", "r0", "netns", r,
        ]);
        for ns in [h, r] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for addr in [V4.client, V4.peer_a, V4.peer_b, V4.peer_c] {
            ip(&["-n", h, "addr", "add", &format!("{addr}/24"), "dev", "h0"]);
        }
        for addr in [V6.client, V6.peer_a, V6.peer_b, V6.peer_c] {
            ip(&["-n", h, "addr", "add", &format!("{addr}/64"), "dev", "h0", "nodad"]);
        }
        ip(&["-n", r, "addr", "add", &format!("{}/24", V4.relay), "dev", "r0"]);
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("{}/64", V6.relay),
            "dev",
            "r0",
            "nodad",
        ]);
        // Checksums complete in software on both ends: with tx offload a frame carries a
        // partial checksum that XDP's incremental update would turn into a wrong one.
        run(Command::new("ip").args(["netns", "exec", h, "ethtool", "-K", "h0", "tx", "off"]));
        run(Command::new("ip").args(["netns", "exec", r, "ethtool", "-K", "r0", "tx", "off"]));
        // A veth delivers frames sent by XDP_TX on r0 only when h0 runs an XDP program.
        let src = lab.dir.join("pass.bpf.c");
        let obj = lab.dir.join("pass.bpf.o");
        std::fs::write(&src, PASS_PROGRAM).expect("write pass.bpf.c");
        run(Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj));
        let obj = obj.to_str().expect("UTF-8 path");
        ip(&["-n", h, "link", "set", "dev", "h0", "xdpdrv", "obj", obj, "sec", "xdp"]);
        ip(&["-n", h, "link", "set", "h0", "up"]);
        ip(&["-n", r, "link", "set", "r0", "up"]);
        Some(lab)
    }

    /// Starts turnpike in the relay namespace with `--xdp r0` and `extra` flags; checks that
    /// the program sits on r0 in native mode.
    fn turnpike(&self, extra: &[&str]) -> Server {
        let mut args: Vec<String> = [
            "--listen",
            &format!("{}:{PORT}", V4.relay),
            "--listen",
            &format!("[{}]:{PORT}", V6.relay),
            "--relay-ip",
            V4.relay,
            "--relay-ip",
            V6.relay,
            "--allowed-peer-ip",
            "198.18.0.0/15",
            "--allowed-peer-ip",
            "2001:db8::/32",
            "--user",
            &format!("{USER}:{PASSWORD}"),
            "--user-quota",
            "0",
            "--metrics-listen",
            METRICS,
            "--xdp",
            "r0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server::start_in_netns(&self.relay, &args);
        let link = ip(&["-n", &self.relay, "link", "show", "r0"]);
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(
            link.contains(" xdp ") && link.contains("prog/xdp"),
            "turnpike's program is not attached to r0 in native mode:\n{link}"
        );
        server
    }

    /// A UDP socket bound to `addr` in the hosts namespace.
    fn udp(&self, addr: SocketAddr) -> UdpSocket {
        let s = in_ns(&self.hosts, || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s
    }

    /// A TURN client (turnpike's sans-IO client) on `net.client` in the hosts namespace.
    fn client(&self, net: Net) -> Client {
        let mut c = Client::new(sa(net.relay, PORT), USER, PASSWORD, PasswordAlgorithm::Md5);
        c.sock = self.udp(sa(net.client, 0));
        c
    }

    /// The relayed packet counters, summed over shards.
    fn relayed(&self) -> Relayed {
        let body = in_ns(&self.relay, || {
            let mut s = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).expect("read metrics");
            body
        });
        let mut r = Relayed::default();
        for line in body
            .lines()
            .filter(|l| l.starts_with("turnpike_relayed_packets_total{"))
        {
            let value: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let xdp = line.contains("datapath=\"xdp\"");
            let to_peer = line.contains("direction=\"client_to_peer\"");
            *match (xdp, to_peer) {
                (true, true) => &mut r.xdp_to_peer,
                (true, false) => &mut r.xdp_to_client,
                (false, true) => &mut r.user_to_peer,
                (false, false) => &mut r.user_to_client,
            } += value;
        }
        r
    }

    /// The counters once they stopped moving: shards publish what XDP relayed about once a
    /// second, so two reads 1.5 s apart must agree (at most 10 s).
    fn settled(&self) -> Relayed {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.relayed();
        loop {
            thread::sleep(Duration::from_millis(1500));
            let now = self.relayed();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// UDP checksum errors counted by the hosts namespace's kernel (IPv4 + IPv6).
    fn csum_errors(&self) -> u64 {
        let snmp = |file: &str, key: &str| -> u64 {
            let out = ip(&["netns", "exec", &self.hosts, "cat", file]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if file.ends_with("snmp6") {
                return text
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no {key} in {file}"));
            }
            let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
            let (names, values) = (udp.next().expect("Udp header"), udp.next().expect("Udp values"));
            let at = names.split_whitespace().position(|n| n == key).expect("column");
            values
                .split_whitespace()
                .nth(at)
                .and_then(|v| v.parse().ok())
                .expect("value")
        };
        snmp("/proc/net/snmp", "InCsumErrors") + snmp("/proc/net/snmp6", "Udp6InCsumErrors")
    }

    /// Starts capturing every UDP frame in the hosts namespace.
    fn capture(&self) -> Capture {
        let sock = in_ns(&self.hosts, || {
            // AF_PACKET, cooked (frames from the network header on), every protocol
            // (ETH_P_ALL in network byte order).
            Socket::new(Domain::PACKET, Type::DGRAM, Some(Protocol::from(0x0300)))
        })
        .expect("AF_PACKET socket");
        sock.set_recv_buffer_size(16 << 20).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut stats = CaptureStats::default();
            let mut buf = vec![0u8; 65536];
            // Bounded: at most 10 minutes, and until stopped.
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                match (&sock).read(&mut buf) {
                    Ok(n) => stats.frame(&buf[..n]),
                    Err(_) if flag.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            stats
        });
        Capture {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting the namespaces deletes the veth pair; processes started in them were
        // stopped by their own guards (declared after the lab, so dropped first).
        for ns in [&self.relay, &self.hosts] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `turnpike_relayed_packets_total` summed over shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Relayed {
    xdp_to_peer: u64,
    xdp_to_client: u64,
    user_to_peer: u64,
    user_to_client: u64,
}

impl Relayed {
    fn since(self, before: Relayed) -> Relayed {
        Relayed {
            xdp_to_peer: self.xdp_to_peer - before.xdp_to_peer,
            xdp_to_client: self.xdp_to_client - before.xdp_to_client,
            user_to_peer: self.user_to_peer - before.user_to_peer,
            user_to_client: self.user_to_client - before.user_to_client,
        }
    }
}

/// What the capture saw.
#[derive(Debug, Default)]
struct CaptureStats {
    /// UDP datagrams from the relay's addresses (what turnpike or its XDP program sent).
    from_relay: u64,
    /// UDP datagrams to the relay's addresses (what the hosts sent).
    to_relay: u64,
    bad_ip_checksum: u64,
    bad_udp_checksum: u64,
    /// IPv4 datagrams without a UDP checksum (0), not verifiable.
    no_udp_checksum: u64,
    /// Malformed frames (lengths that disagree).
    malformed: u64,
    /// ChannelData on the listening port by channel number: client → server, server → client.
    cd_to_server: HashMap<u16, u64>,
    cd_to_client: HashMap<u16, u64>,
    /// The first few bad frames, described.
    bad: Vec<String>,
}

fn sum16(data: &[u8]) -> u32 {
    let mut acc = 0u32;
    for pair in data.chunks(2) {
        let w = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from(pair[0]) << 8
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

fn is_relay(a: IpAddr) -> bool {
    a == V4.relay.parse::<IpAddr>().unwrap() || a == V6.relay.parse::<IpAddr>().unwrap()
}

impl CaptureStats {
    /// Takes one frame from the network header on: checks the IPv4 header checksum and the
    /// UDP checksum (pseudo-header included) from scratch.
    fn frame(&mut self, f: &[u8]) {
        let Some(&first) = f.first() else { return };
        let (src, dst, l4, pseudo, ip_ok) = match first >> 4 {
            4 => {
                if f.len() < 20 || f[9] != 17 {
                    return;
                }
                let ihl = usize::from(f[0] & 0xf) * 4;
                let total = usize::from(u16::from_be_bytes([f[2], f[3]]));
                if total != f.len() || ihl < 20 || total < ihl + 8 {
                    self.malformed += 1;
                    return;
                }
                let src = IpAddr::from(<[u8; 4]>::try_from(&f[12..16]).unwrap());
                let dst = IpAddr::from(<[u8; 4]>::try_from(&f[16..20]).unwrap());
                let ip_ok = fold(sum16(&f[..ihl])) == 0xffff;
                let l4 = &f[ihl..];
                let pseudo = sum16(&f[12..20]) + 17 + l4.len() as u32;
                (src, dst, l4, pseudo, ip_ok)
            }
            6 => {
                if f.len() < 48 || f[6] != 17 {
                    return;
                }
                let plen = usize::from(u16::from_be_bytes([f[4], f[5]]));
                if plen + 40 != f.len() || plen < 8 {
                    self.malformed += 1;
                    return;
                }
                let src = IpAddr::from(<[u8; 16]>::try_from(&f[8..24]).unwrap());
                let dst = IpAddr::from(<[u8; 16]>::try_from(&f[24..40]).unwrap());
                let l4 = &f[40..];
                let pseudo = sum16(&f[8..40]) + 17 + l4.len() as u32;
                (src, dst, l4, pseudo, true)
            }
            _ => return,
        };
        let (from_relay, to_relay) = (is_relay(src), is_relay(dst));
        if !from_relay && !to_relay {
            return;
        }
        if from_relay {
            self.from_relay += 1;
        } else {
            self.to_relay += 1;
        }
        let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        if ulen != l4.len() {
            self.malformed += 1;
            return;
        }
        let describe = |what: &str, bad: &mut Vec<String>| {
            if bad.len() < 5 {
                bad.push(format!(
                    "{what}: {src} -> {dst}, {} bytes: {:02x?}",
                    f.len(),
                    &f[..f.len().min(64)]
                ));
            }
        };
        if !ip_ok {
            self.bad_ip_checksum += 1;
            describe("bad IPv4 header checksum", &mut self.bad);
        }
        let csum = u16::from_be_bytes([l4[6], l4[7]]);
        if csum == 0 && first >> 4 == 4 {
            self.no_udp_checksum += 1;
        } else if fold(pseudo + sum16(l4)) != 0xffff {
            self.bad_udp_checksum += 1;
            describe("bad UDP checksum", &mut self.bad);
        }
        // ChannelData on the listening port (RFC 8656 §12.4: the first two bits are 01).
        let (sport, dport) = (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]));
        let payload = &l4[8..];
        if payload.len() >= 4 && payload[0] & 0xc0 == 0x40 {
            let channel = u16::from_be_bytes([payload[0], payload[1]]);
            if to_relay && dport == PORT {
                *self.cd_to_server.entry(channel).or_default() += 1;
            } else if from_relay && sport == PORT {
                *self.cd_to_client.entry(channel).or_default() += 1;
            }
        }
    }

    /// Asserts that every frame verified.
    fn assert_clean(&self) {
        assert_eq!(
            (self.bad_ip_checksum, self.bad_udp_checksum, self.malformed),
            (0, 0, 0),
            "frames with bad checksums or lengths: {:#?}",
            self.bad
        );
    }
}

/// The capture thread; `finish` stops it and returns what it saw.
struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<CaptureStats>>,
}

impl Capture {
    fn finish(mut self) -> CaptureStats {
        // Let the last frames arrive, then stop at the next read timeout.
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().expect("running").join().expect("capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A child process stopped (by its PID) on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A distinct payload for message `i`: sizes cycle through edge cases (0, 1, odd, around
/// the 256-byte chunk of the tail-moving path, 1,400).
fn payload(i: usize) -> Vec<u8> {
    const SIZES: [usize; 14] = [0, 1, 2, 3, 5, 64, 127, 255, 256, 257, 511, 1000, 1399, 1400];
    let len = SIZES[i % SIZES.len()];
    let tag = (i as u32).to_be_bytes();
    (0..len)
        .map(|k| if k < 4 { tag[k] } else { (k * 7 + i) as u8 })
        .collect()
}

/// Sets up an allocation with `channel` bound to `peer`; returns the relayed address.
fn allocate_and_bind(c: &mut Client, channel: u16, peer: SocketAddr) -> SocketAddr {
    // The relayed address in the peer's family (RFC 8656 §7.1: IPv4 unless asked).
    let family = if peer.is_ipv6() {
        AddressFamily::V6
    } else {
        AddressFamily::V4
    };
    let r = c.request(
        Method::Allocate,
        &[
            Attribute::RequestedTransport(17),
            Attribute::RequestedAddressFamily(family),
        ],
    );
    assert_eq!(r.class(), Class::Success, "Allocate: {:?}", r.error_code());
    let relayed = r
        .addr(turnpike::proto::stun::attribute::kind::XOR_RELAYED_ADDRESS)
        .expect("XOR-RELAYED-ADDRESS");
    let r = c.channel_bind(channel, peer);
    assert_eq!(r.class(), Class::Success, "ChannelBind: {:?}", r.error_code());
    relayed
}

/// Sends `n` ChannelData messages on `channel` in bursts of 16; `peer` echoes each burst
/// back to `relayed`. Asserts that every payload arrives intact both ways.
fn echo_through(c: &Client, channel: u16, peer: &UdpSocket, relayed: SocketAddr, n: usize) {
    let mut buf = [0u8; 2048];
    for start in (0..n).step_by(16) {
        let burst: Vec<usize> = (start..n.min(start + 16)).collect();
        for &i in &burst {
            c.send_channel_data(channel, &payload(i));
        }
        for &i in &burst {
            let (len, from) = peer
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("peer: message {i} did not arrive: {e}"));
            assert_eq!(from, relayed, "message {i} comes from the relayed address");
            assert_eq!(&buf[..len], &payload(i)[..], "message {i} intact at the peer");
        }
        for &i in &burst {
            peer.send_to(&payload(i), relayed).unwrap();
        }
        for &i in &burst {
            let (data, ch) = c
                .recv_data()
                .unwrap_or_else(|| panic!("client: echo {i} did not arrive"));
            assert_eq!(ch, Some(channel), "echo {i} comes as ChannelData on its channel");
            assert_eq!(data, payload(i), "echo {i} intact at the client");
        }
    }
}

/// Reads whatever arrives at `sock` within `wait`; the number of datagrams.
fn drain(sock: &UdpSocket, wait: Duration) -> usize {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + wait;
    let mut n = 0;
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while Instant::now() < deadline {
        if sock.recv_from(&mut buf).is_ok() {
            n += 1;
        }
    }
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    n
}

/// Sends 50 datagrams each way on channel 0x4000 (client → peer, peer → relayed address) and
/// asserts that none arrives at the other end: `to_peer` and `to_client` say why it must not.
fn assert_nothing_relayed(c: &Client, peer: &UdpSocket, relayed: SocketAddr, to_peer: &str, to_client: &str) {
    for i in 0..50 {
        c.send_channel_data(0x4000, &payload(i));
        peer.send_to(&payload(i), relayed).unwrap();
    }
    assert_eq!(drain(peer, Duration::from_secs(1)), 0, "{to_peer}");
    assert_eq!(drain(&c.sock, Duration::from_millis(500)), 0, "{to_client}");
}

/// A Send indication from `c` to `peer` carrying `data`.
fn send_indication(c: &Client, peer: SocketAddr, data: &[u8]) {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::Send, Class::Indication),
        TransactionId(*b"xdp-lab-send"),
    );
    b.attribute(&Attribute::XorPeerAddress(peer));
    b.attribute(&Attribute::Data(data));
    b.fingerprint();
    c.sock.send_to(&out, c.server).unwrap();
}

/// Own client, IPv4 and IPv6: 500 messages of edge-case sizes each way through XDP (the xdp
/// counters account for every one, user space for none), every frame's checksums verified by
/// the capture and by the receiving kernel, every payload intact.
fn checksums_and_counts(net: Net) {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&[]);
    let csum_before = lab.csum_errors();
    let capture = lab.capture();
    let mut c = lab.client(net);
    let peer = lab.udp(sa(net.peer_a, 40000));
    let relayed = allocate_and_bind(&mut c, 0x4000, peer.local_addr().unwrap());
    let before = lab.settled();
    const N: usize = 500;
    echo_through(&c, 0x4000, &peer, relayed, N);
    let d = lab.settled().since(before);
    let seen = capture.finish();
    eprintln!("relayed: {d:?}\ncapture: {seen:?}");
    seen.assert_clean();
    assert_eq!(
        lab.csum_errors() - csum_before,
        0,
        "UDP checksum errors in the hosts namespace"
    );
    assert_eq!(
        d,
        Relayed {
            xdp_to_peer: N as u64,
            xdp_to_client: N as u64,
            user_to_peer: 0,
            user_to_client: 0,
        },
        "every datagram through XDP"
    );
    assert_eq!(seen.cd_to_client.get(&0x4000), Some(&(N as u64)), "echoes captured");
    // All of the relay's frames verified, the XDP-made ones among them.
    assert!(seen.from_relay >= 2 * N as u64, "{seen:?}");
}

#[test]
fn checksums_and_counts_ipv4() {
    checksums_and_counts(V4);
}

#[test]
fn checksums_and_counts_ipv6() {
    checksums_and_counts(V6);
}

/// A peer datagram that would exceed the MTU once framed as ChannelData is the kernel's: it
/// arrives at the client (fragmented by the relay's kernel) through user space.
#[test]
fn oversized_peer_datagram_goes_through_user_space() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&[]);
    let mut c = lab.client(V4);
    let peer = lab.udp(sa(V4.peer_a, 40000));
    let relayed = allocate_and_bind(&mut c, 0x4000, peer.local_addr().unwrap());
    let before = lab.settled();
    // 1,472 bytes fill a 1,500-byte IPv4 MTU exactly; with the 4-byte header they do not.
    let big = vec![0x5a; 1472];
    peer.send_to(&big, relayed).unwrap();
    let (data, ch) = c.recv_data().expect("the oversized datagram arrives");
    assert_eq!((data.len(), ch), (1472, Some(0x4000)));
    let d = lab.settled().since(before);
    assert_eq!((d.xdp_to_client, d.user_to_client), (0, 1), "{d:?}");
}

/// Refresh with LIFETIME 0 deletes the allocation: from the response on, no ChannelData
/// reaches the old peer and no peer datagram the client, through XDP or otherwise.
#[test]
fn nothing_forwarded_after_refresh_0() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&[]);
    let mut c = lab.client(V4);
    let peer = lab.udp(sa(V4.peer_a, 40000));
    let relayed = allocate_and_bind(&mut c, 0x4000, peer.local_addr().unwrap());
    echo_through(&c, 0x4000, &peer, relayed, 32);
    let r = c.request(Method::Refresh, &[Attribute::Lifetime(0)]);
    assert_eq!(r.class(), Class::Success);
    let before = lab.settled();
    assert_nothing_relayed(
        &c,
        &peer,
        relayed,
        "the old peer got ChannelData after Refresh 0",
        "the client got data after Refresh 0",
    );
    let d = lab.settled().since(before);
    assert_eq!(d, Relayed::default(), "nothing relayed after Refresh 0");
}

/// An allocation that is not refreshed ends at its lifetime (`--default-lifetime 3`); its
/// kernel entries end with it (the deadline stored in them, and the deletion on the
/// server's event).
#[test]
fn nothing_forwarded_after_the_allocation_expired() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&["--default-lifetime", "3"]);
    let mut c = lab.client(V4);
    let peer = lab.udp(sa(V4.peer_a, 40000));
    let t0 = Instant::now();
    let relayed = allocate_and_bind(&mut c, 0x4000, peer.local_addr().unwrap());
    let before = lab.relayed();
    echo_through(&c, 0x4000, &peer, relayed, 32);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the setup took too long to test expiry"
    );
    thread::sleep(Duration::from_secs(4).saturating_sub(t0.elapsed()));
    assert_nothing_relayed(
        &c,
        &peer,
        relayed,
        "the peer got ChannelData after expiry",
        "the client got data after expiry",
    );
    let d = lab.settled().since(before);
    assert_eq!(
        d,
        Relayed {
            xdp_to_peer: 32,
            xdp_to_client: 32,
            user_to_peer: 0,
            user_to_client: 0
        },
        "only the traffic before expiry, all of it through XDP"
    );
}

/// A peer without permission never receives anything and is never relayed to the client: a
/// Send indication to it, ChannelData on an unbound channel, its own datagrams to the
/// relayed address. A ChannelBind of the bound number to another peer is refused (400) and
/// the channel keeps its peer.
#[test]
fn peer_without_permission_gets_nothing() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&[]);
    let capture = lab.capture();
    let mut c = lab.client(V4);
    let a = lab.udp(sa(V4.peer_a, 40000));
    let b = lab.udp(sa(V4.peer_b, 40000));
    let stranger = lab.udp(sa(V4.peer_c, 40000));
    let relayed = allocate_and_bind(&mut c, 0x4000, a.local_addr().unwrap());
    echo_through(&c, 0x4000, &a, relayed, 16);
    let r = c.channel_bind(0x4000, b.local_addr().unwrap());
    assert_eq!(r.error_code(), Some(400), "binding a bound number to another peer");
    let before = lab.settled();
    for i in 0..20 {
        send_indication(&c, stranger.local_addr().unwrap(), &payload(i));
        c.send_channel_data(0x4001, &payload(i)); // never bound
        stranger.send_to(&payload(i), relayed).unwrap();
        b.send_to(&payload(i), relayed).unwrap();
    }
    // The channel still goes to A, and to A only.
    for i in 0..20 {
        c.send_channel_data(0x4000, &payload(i));
    }
    assert_eq!(
        drain(&stranger, Duration::from_secs(1)),
        0,
        "the peer without permission got data"
    );
    assert_eq!(drain(&b, Duration::from_millis(300)), 0, "peer B got data");
    assert_eq!(drain(&a, Duration::from_millis(300)), 20, "peer A got its 20 datagrams");
    assert_eq!(
        drain(&c.sock, Duration::from_millis(300)),
        0,
        "the client got data from unpermitted peers"
    );
    let d = lab.settled().since(before);
    assert_eq!(
        d,
        Relayed {
            xdp_to_peer: 20,
            ..Relayed::default()
        }
    );
    capture.finish().assert_clean();
}

/// With `--max-bitrate`, the cap is enforced in user space only: nothing is offloaded.
#[test]
fn bandwidth_cap_keeps_everything_in_user_space() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&["--max-bitrate", "100000000"]);
    let mut c = lab.client(V4);
    let peer = lab.udp(sa(V4.peer_a, 40000));
    let relayed = allocate_and_bind(&mut c, 0x4000, peer.local_addr().unwrap());
    let before = lab.settled();
    echo_through(&c, 0x4000, &peer, relayed, 100);
    let d = lab.settled().since(before);
    assert_eq!(
        d,
        Relayed {
            user_to_peer: 100,
            user_to_client: 100,
            ..Relayed::default()
        }
    );
}

/// The server's short-lifetime flags, when this build has them (`--permission-lifetime`,
/// `--channel-lifetime`, hidden or not): those flags and the two lifetimes. Without them the
/// default lifetimes (300 s, 600 s) are used when `TURNPIKE_XDP_LAB_SLOW=1`, else `None` (the
/// test prints why it skips).
fn lifetimes() -> Option<(Vec<&'static str>, Duration, Duration)> {
    let flags = vec!["--permission-lifetime", "3", "--channel-lifetime", "6"];
    // clap refuses unknown flags before it prints the help: exit 0 means both are known.
    let known = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(&flags)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("turnpike --help")
        .success();
    if known {
        return Some((flags, Duration::from_secs(3), Duration::from_secs(6)));
    }
    if std::env::var("TURNPIKE_XDP_LAB_SLOW").as_deref() == Ok("1") {
        return Some((Vec::new(), Duration::from_secs(300), Duration::from_secs(600)));
    }
    eprintln!(
        "skipped: turnpike has no --permission-lifetime/--channel-lifetime flags, and with the \
         default lifetimes (300 s, 600 s) this test takes up to 11 minutes: set TURNPIKE_XDP_LAB_SLOW=1 to run it"
    );
    None
}

/// When the permission ends (the channel binding outliving it), XDP stops forwarding both
/// ways at once: ChannelData no longer reaches the peer, the peer no longer the client.
#[test]
fn nothing_forwarded_after_the_permission_expired() {
    let Some(lab) = Lab::new() else { return };
    let Some((flags, permission, _)) = lifetimes() else {
        return;
    };
    // The allocation must outlive the permission.
    let mut args = flags.clone();
    args.extend(["--default-lifetime", "3600"]);
    let _server = lab.turnpike(&args);
    let mut c = lab.client(V4);
    let peer = lab.udp(sa(V4.peer_a, 40000));
    let t0 = Instant::now();
    let relayed = allocate_and_bind(&mut c, 0x4000, peer.local_addr().unwrap());
    let before = lab.relayed();
    echo_through(&c, 0x4000, &peer, relayed, 32);
    thread::sleep((permission + Duration::from_secs(1)).saturating_sub(t0.elapsed()));
    assert_nothing_relayed(
        &c,
        &peer,
        relayed,
        "the peer got ChannelData after its permission expired",
        "the client got data after the permission expired",
    );
    let d = lab.settled().since(before);
    assert_eq!((d.xdp_to_peer, d.xdp_to_client), (32, 32), "{d:?}");
    assert_eq!((d.user_to_peer, d.user_to_client), (0, 0), "{d:?}");
}

/// A channel number bound to another peer after its binding expired: ChannelData on it goes
/// to the new peer only, through XDP, never to the old one.
#[test]
fn rebound_channel_never_reaches_the_old_peer() {
    let Some(lab) = Lab::new() else { return };
    let Some((flags, _, channel)) = lifetimes() else { return };
    let mut args = flags.clone();
    args.extend(["--default-lifetime", "3600"]);
    let _server = lab.turnpike(&args);
    let mut c = lab.client(V4);
    let a = lab.udp(sa(V4.peer_a, 40000));
    let b = lab.udp(sa(V4.peer_b, 40000));
    let t0 = Instant::now();
    let relayed = allocate_and_bind(&mut c, 0x4000, a.local_addr().unwrap());
    echo_through(&c, 0x4000, &a, relayed, 32);
    thread::sleep((channel + Duration::from_secs(1)).saturating_sub(t0.elapsed()));
    let mut rebound = None;
    // RFC 8656 §12: a server may hold the number for a while after expiry; retry a bounded
    // number of times, for at most the channel lifetime again.
    let deadline = Instant::now() + channel;
    while Instant::now() < deadline {
        let r = c.channel_bind(0x4000, b.local_addr().unwrap());
        if r.class() == Class::Success {
            rebound = Some(());
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    assert!(
        rebound.is_some(),
        "0x4000 could not be bound to B after A's binding expired"
    );
    let before = lab.settled();
    echo_through(&c, 0x4000, &b, relayed, 64);
    assert_eq!(
        drain(&a, Duration::from_secs(1)),
        0,
        "the old peer got datagrams of the rebound channel"
    );
    a.send_to(b"from the old peer", relayed).unwrap();
    assert_eq!(
        drain(&c.sock, Duration::from_millis(500)),
        0,
        "the old peer reached the client"
    );
    let d = lab.settled().since(before);
    assert_eq!((d.xdp_to_peer, d.xdp_to_client), (64, 64), "{d:?}");
}

/// What turnutils_uclient printed.
#[derive(Debug, Default)]
struct Uclient {
    sent: u64,
    received: u64,
    lost: Option<u64>,
    channels: Vec<u16>,
    output: String,
}

fn uclient(lab: &Lab, mode: &[&str]) -> Uclient {
    require("turnutils_uclient");
    require("turnutils_peer");
    let peer = Guard(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.hosts,
                "turnutils_peer",
                "-L",
                V4.peer_a,
                "-p",
                "5000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnutils_peer"),
    );
    thread::sleep(Duration::from_millis(300));
    let port = PORT.to_string();
    let mut args = vec![
        "90",
        "ip",
        "netns",
        "exec",
        &lab.hosts,
        "turnutils_uclient",
        "-v",
        "-e",
        V4.peer_a,
        "-r",
        "5000",
        "-p",
        &port,
        "-m",
        "10",
        "-n",
        "50",
        "-l",
        "120",
        "-u",
        USER,
        "-w",
        PASSWORD,
    ];
    args.extend_from_slice(mode);
    args.push(V4.relay);
    let out = Command::new("timeout").args(&args).output().expect("run uclient");
    drop(peer);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut r = Uclient::default();
    for line in text.lines() {
        if let Some(rest) = line.split("tot_send_msgs=").nth(1) {
            if !line.contains("msz=") {
                let mut parts = rest.split(", tot_recv_msgs=");
                r.sent = parts.next().unwrap().trim().parse().unwrap_or(0);
                r.received = parts.next().unwrap_or("0").trim().parse().unwrap_or(0);
            }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            r.lost = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
        if let Some(hex) = line.split("success: 0x").nth(1) {
            if let Ok(ch) = u16::from_str_radix(hex.trim(), 16) {
                r.channels.push(ch);
            }
        }
    }
    r.channels.sort_unstable();
    r.channels.dedup();
    r.output = text;
    assert!(out.status.success(), "uclient failed ({}):\n{}", out.status, r.output);
    r
}

/// The channel numbers the XDP program handles (`CHANNELS` in src/xdp and the check in
/// xdp/turnpike.bpf.c): RFC 8656 §12's 0x4000-0x4FFF and RFC 5766's 0x5000-0x7FFF, which the
/// server binds outside strict mode (coturn's uclient picks from the whole range); keep this in
/// step with the program.
fn offloaded(channel: u16) -> bool {
    (0x4000..=0x7FFF).contains(&channel)
}

/// coturn's uclient with channels, 10 clients x 50 messages through turnpike with XDP: no
/// loss; every data packet is counted once, by XDP or by user space; XDP relays all the
/// ChannelData on channels it handles (the capture counts them per channel), user space the
/// rest (messages before the binding); every frame verifies.
#[test]
fn uclient_channels_through_xdp() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&[]);
    let csum_before = lab.csum_errors();
    let capture = lab.capture();
    let before = lab.relayed();
    let u = uclient(&lab, &[]);
    let d = lab.settled().since(before);
    let seen = capture.finish();
    let count = |m: &HashMap<u16, u64>, xdp: bool| -> u64 {
        m.iter().filter(|(ch, _)| offloaded(**ch) == xdp).map(|(_, n)| n).sum()
    };
    let (in_range_c2s, in_range_s2c) = (count(&seen.cd_to_server, true), count(&seen.cd_to_client, true));
    eprintln!(
        "uclient: sent {} received {} lost {:?}; channels {:x?}\nrelayed: {d:?}\n\
         ChannelData captured on channels XDP handles: {in_range_c2s} to the server, {in_range_s2c} to the client; \
         on others: {} / {}\nXDP share: {:.0} % to peers, {:.0} % to the client",
        u.sent,
        u.received,
        u.lost,
        u.channels,
        count(&seen.cd_to_server, false),
        count(&seen.cd_to_client, false),
        100.0 * d.xdp_to_peer as f64 / u.sent.max(1) as f64,
        100.0 * d.xdp_to_client as f64 / u.received.max(1) as f64,
    );
    assert!(u.sent >= 500, "10 clients x 50 messages: {}", u.output);
    assert_eq!(u.lost, Some(0), "{}", u.output);
    assert_eq!(u.received, u.sent, "{}", u.output);
    seen.assert_clean();
    assert_eq!(
        lab.csum_errors() - csum_before,
        0,
        "UDP checksum errors in the hosts namespace"
    );
    // Every data packet once, by one datapath or the other.
    assert_eq!(d.xdp_to_peer + d.user_to_peer, u.sent, "{d:?}");
    assert_eq!(d.xdp_to_client + d.user_to_client, u.received, "{d:?}");
    // XDP relayed the ChannelData on the channels it handles (all of it, but for the few
    // that raced the binding), nothing else.
    assert!(d.xdp_to_peer <= in_range_c2s, "{d:?} vs {in_range_c2s}");
    assert!(d.xdp_to_client <= in_range_s2c, "{d:?} vs {in_range_s2c}");
    assert!(d.xdp_to_peer * 100 >= in_range_c2s * 98, "{d:?} vs {in_range_c2s}");
    assert!(d.xdp_to_client * 100 >= in_range_s2c * 98, "{d:?} vs {in_range_s2c}");
    if u.channels.iter().any(|&ch| offloaded(ch)) {
        assert!(d.xdp_to_peer > 0 && d.xdp_to_client > 0, "{d:?}");
    }
}

/// uclient with Send indications (`-s`): no channels, so everything stays in user space, with
/// no loss.
#[test]
fn uclient_send_indications_in_user_space() {
    let Some(lab) = Lab::new() else { return };
    let _server = lab.turnpike(&[]);
    let before = lab.relayed();
    let u = uclient(&lab, &["-s"]);
    let d = lab.settled().since(before);
    eprintln!(
        "uclient -s: sent {} received {} lost {:?}; relayed: {d:?}",
        u.sent, u.received, u.lost
    );
    assert!(u.sent >= 500, "{}", u.output);
    assert_eq!(u.lost, Some(0), "{}", u.output);
    assert_eq!(u.received, u.sent, "{}", u.output);
    assert_eq!((d.xdp_to_peer, d.xdp_to_client), (0, 0), "{d:?}");
    assert_eq!((d.user_to_peer, d.user_to_client), (u.sent, u.received), "{d:?}");
}
