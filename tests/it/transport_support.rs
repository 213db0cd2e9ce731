//! Support for the TCP/TLS transport tests (`transports.rs`): a test PKI made with the `openssl`
//! CLI at test time, a TURN server under test that listens on UDP+TCP and TLS (turnpike, or
//! coturn for the `#[ignore]`d twins that check the client side of each test), a small STUN
//! client over a byte stream, and the names of turnpike's stream counters.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use turnpike::proto::channel_data::ChannelData;
use turnpike::proto::client::{self as proto, Reply};
use turnpike::proto::stun::integrity;
use turnpike::proto::stun::{Attribute, Message, Method, PasswordAlgorithm, TransactionId};

use crate::client::Response;
use crate::harness::{require, Server, PASSWORD, SECRET, USER};

// ---------------------------------------------------------------------------------------------
// Stream counters of turnpike's "shut down" line (src/main.rs, src/stats.rs STREAM_CLOSES):
// `streams_accepted=N streams_closed=N streams_refused=N ... stream_closes=reason:N,reason:N`.
// If the server renames them, this is the one place to change.

/// Connections accepted (TCP and TLS).
pub const STREAMS_ACCEPTED: &str = "streams_accepted";
/// Connections closed, for any reason.
pub const STREAMS_CLOSED: &str = "streams_closed";
/// Messages (STUN and ChannelData) received on streams.
pub const STREAM_MESSAGES: &str = "stream_messages";
/// Closes by reason, `reason:N` joined by commas (reasons with 0 left out).
pub const STREAM_CLOSES: &str = "stream_closes";

/// Close reasons (`turnpike::stats::STREAM_CLOSES`).
pub mod close {
    /// Bytes that cannot start a STUN or ChannelData message.
    pub const BAD_FRAME: &str = "bad_frame";
    /// A message longer than `--max-stream-frame`.
    pub const FRAME_TOO_LONG: &str = "frame_too_long";
    /// No complete message within `--stream-idle-timeout` without an allocation.
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// The TLS handshake took longer than `--tls-handshake-timeout`.
    pub const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";
    /// The TLS layer failed (a ClientHello of garbage, a bad record).
    pub const TLS_ERROR: &str = "tls_error";
    /// The client read nothing of what was queued for it.
    pub const WRITE_STALLED: &str = "write_stalled";
    /// Over `--max-connections` or `--max-connections-per-ip` at accept.
    pub const REFUSED: &str = "refused";
    /// The reasons that are the server's defences (not the client's own close or reset).
    pub const ABUSE: [&str; 7] = [
        BAD_FRAME,
        FRAME_TOO_LONG,
        IDLE_TIMEOUT,
        HANDSHAKE_TIMEOUT,
        TLS_ERROR,
        WRITE_STALLED,
        REFUSED,
    ];
}

/// turnpike's stream counters, read from its "shut down" line.
#[derive(Debug, Clone)]
pub struct StreamCounters {
    pub accepted: u64,
    pub closed: u64,
    pub messages: u64,
    /// (reason, count) from `stream_closes`.
    pub closes: Vec<(String, u64)>,
}

impl StreamCounters {
    /// Connections closed for `reason` (one of [`close`]).
    pub fn close(&self, reason: &str) -> u64 {
        self.closes.iter().find(|(r, _)| r == reason).map_or(0, |(_, n)| *n)
    }

    /// Connections closed by the server's defences (any reason of [`close::ABUSE`]).
    pub fn drops(&self) -> u64 {
        close::ABUSE.iter().map(|r| self.close(r)).sum()
    }
}

/// The `name=N` counter of a `key=value` log line, if there.
pub fn counter(line: &str, name: &str) -> Option<u64> {
    field(line, name).and_then(|v| v.parse().ok())
}

/// The value of `name=` in a `key=value` log line (up to the next space).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// The stream counters of the "shut down" line; panics naming a missing one.
pub fn stream_counters(shutdown: &str) -> StreamCounters {
    let get = |name: &str| {
        counter(shutdown, name).unwrap_or_else(|| {
            panic!("no {name}= in turnpike's shutdown line (renamed? see transport_support.rs): {shutdown}")
        })
    };
    let closes = field(shutdown, STREAM_CLOSES)
        .unwrap_or_else(|| panic!("no {STREAM_CLOSES}= in turnpike's shutdown line: {shutdown}"))
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (r, n) = kv
                .split_once(':')
                .unwrap_or_else(|| panic!("{STREAM_CLOSES} item {kv:?} is not reason:N"));
            (r.to_string(), n.parse().expect("close count"))
        })
        .collect();
    StreamCounters {
        accepted: get(STREAMS_ACCEPTED),
        closed: get(STREAMS_CLOSED),
        messages: get(STREAM_MESSAGES),
        closes,
    }
}

// ---------------------------------------------------------------------------------------------
// Test PKI.

/// A certificate and its key, PEM files.
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway CA and two server certificates signed by it, in a temporary directory removed on
/// drop: `good` for `localhost` and IP 127.0.0.1, `wrong` for `wrong.example` only.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub good: CertPair,
    pub wrong: CertPair,
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary directory of this test process.
pub fn temp_dir(what: &str) -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("turnpike-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// Makes the CA and the two certificates (ECDSA P-256, valid 2 days, serverAuth).
    pub fn new() -> Pki {
        require("openssl");
        let dir = temp_dir("pki");
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=turnpike test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        let leaf = |name: &str, cn: &str, san: &str| -> CertPair {
            let (key, csr, ext, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.ext"),
                format!("{name}.pem"),
            );
            openssl(
                &dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            std::fs::write(
                dir.join(&ext),
                format!(
                    "subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n\
                     keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                ),
            )
            .unwrap();
            let serial = format!(
                "0x{:016x}",
                std::process::id() as u64 * 1_000_003 + DIRS.load(Ordering::Relaxed) as u64
            );
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-set_serial",
                    &serial,
                    "-days",
                    "2",
                    "-out",
                    &pem,
                    "-extfile",
                    &ext,
                ],
            );
            CertPair {
                cert: dir.join(pem),
                key: dir.join(key),
            }
        };
        let good = leaf("good", "localhost", "DNS:localhost,IP:127.0.0.1");
        let wrong = leaf("wrong", "wrong.example", "DNS:wrong.example");
        Pki {
            ca: dir.join("ca.pem"),
            dir,
            good,
            wrong,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Ports and connections.

/// A port free a moment ago on 127.0.0.1 for both UDP and TCP (turnpike's `--listen` takes both).
pub fn free_udp_tcp_port() -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP in 100 tries");
}

/// A TCP port free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits up to `timeout` until `addr` accepts TCP connections.
pub fn wait_tcp(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// What became of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// The server closed it (FIN or RST) after this long, having sent these many bytes first.
    Closed { after: Duration, bytes: usize },
    /// Still open when the wait ended.
    Open { bytes: usize },
}

impl Fate {
    pub fn closed(&self) -> bool {
        matches!(self, Fate::Closed { .. })
    }
}

/// Reads (and discards) from `s` until the server closes it or `wait` passes, counting from `since`.
pub fn fate(s: &mut TcpStream, since: Instant, wait: Duration) -> Fate {
    let deadline = since + wait;
    let mut bytes = 0;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Fate::Open { bytes };
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => {
                return Fate::Closed {
                    after: since.elapsed(),
                    bytes,
                }
            }
            Ok(n) => bytes += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                return Fate::Closed {
                    after: since.elapsed(),
                    bytes,
                }
            }
        }
    }
}

/// Whether the server has closed `s` already (a non-blocking peek; data waiting means open).
pub fn is_closed_now(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Number of open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// This process's soft RLIMIT_NOFILE, from /proc/self/limits (no unsafe getrlimit).
pub fn nofile_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("Max open files")
}

// ---------------------------------------------------------------------------------------------
// STUN over a byte stream (RFC 8489 §6.2.2, RFC 8656 §11.5 framing).

/// A STUN Binding request without attributes, transaction ID `tid`.
pub fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&tid);
    m
}

/// One frame read from a stream: a STUN message or a ChannelData message (its padding consumed).
#[derive(Debug)]
pub enum Frame {
    Stun(Vec<u8>),
    /// Channel number, payload (without the padding).
    ChannelData(u16, Vec<u8>),
}

/// Reads exactly one frame; `None` on close, timeout or an undecodable header.
pub fn read_frame(s: &mut impl Read) -> Option<Frame> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).ok()?;
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    match head[0] >> 6 {
        0 => {
            let mut m = head.to_vec();
            m.resize(20 + len, 0);
            s.read_exact(&mut m[4..]).ok()?;
            Some(Frame::Stun(m))
        }
        1 => {
            let padded = len.div_ceil(4) * 4;
            let mut body = vec![0u8; padded];
            s.read_exact(&mut body).ok()?;
            body.truncate(len);
            Some(Frame::ChannelData(u16::from_be_bytes([head[0], head[1]]), body))
        }
        _ => None,
    }
}

/// Reads frames until a STUN message with transaction ID `tid` (other frames are skipped).
pub fn read_response(s: &mut impl Read, tid: &[u8; 12], max_frames: usize) -> Option<Vec<u8>> {
    for _ in 0..max_frames {
        match read_frame(s)? {
            Frame::Stun(m) if m.len() >= 20 && &m[8..20] == tid => return Some(m),
            _ => continue,
        }
    }
    None
}

/// Connects to `addr` and checks that a Binding request is answered with a success response
/// whose XOR-MAPPED-ADDRESS is the connection's local address.
pub fn binding_over_tcp(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
    binding_on(&mut s, 0x5a)
}

/// A Binding transaction on an open stream.
pub fn binding_on(s: &mut TcpStream, tag: u8) -> Result<(), String> {
    let tid = [tag; 12];
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(&binding_request(tid)).map_err(|e| format!("write: {e}"))?;
    let t0 = Instant::now();
    let m = read_response(s, &tid, 4).ok_or_else(|| {
        let f = fate(s, Instant::now(), Duration::ZERO);
        format!("no Binding response after {:?} ({f:?})", t0.elapsed())
    })?;
    let r = Response(m);
    if r.class() != turnpike::proto::stun::Class::Success {
        return Err(format!("Binding got {:?} {:?}", r.class(), r.error_code()));
    }
    let mapped = r.addr(turnpike::proto::stun::attribute::kind::XOR_MAPPED_ADDRESS);
    if mapped != Some(s.local_addr().unwrap()) {
        return Err(format!(
            "XOR-MAPPED-ADDRESS {mapped:?}, the connection is {}",
            s.local_addr().unwrap()
        ));
    }
    Ok(())
}

/// A TURN client over one TCP connection (the allocation's 5-tuple is the connection), on
/// turnpike's sans-IO client for credentials and integrity.
pub struct StreamClient {
    pub stream: TcpStream,
    proto: proto::Client,
    counter: u64,
}

impl StreamClient {
    pub fn connect(server: SocketAddr) -> StreamClient {
        let stream = TcpStream::connect_timeout(&server, Duration::from_secs(3)).expect("connect over TCP");
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        stream.set_nodelay(true).unwrap();
        StreamClient {
            stream,
            proto: proto::Client::new(USER, PASSWORD, PasswordAlgorithm::Md5),
            counter: 0,
        }
    }

    fn tid(&mut self) -> TransactionId {
        self.counter += 1;
        let mut t = [0x77u8; 12];
        t[..8].copy_from_slice(&self.counter.to_be_bytes());
        TransactionId(t)
    }

    /// A request with `attrs` (no retransmission: TCP is reliable, RFC 8489 §6.2.2); answers a
    /// 401 and 438 with a signed retry. The response's FINGERPRINT and integrity are verified.
    pub fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Response {
        for _ in 0..3 {
            let tid = self.tid();
            let mut out = Vec::new();
            let signed = self.proto.encode_request(method, tid, attrs, &mut out);
            self.stream.write_all(&out).expect("write request");
            let bytes = read_response(&mut self.stream, &tid.0, 64).expect("no response over the stream");
            let resp = Response(bytes);
            let m = resp.msg();
            integrity::verify_fingerprint(&m).expect("response FINGERPRINT");
            match self.proto.handle_response(&m, signed) {
                Reply::Retry => continue,
                Reply::IntegrityFailed => panic!("response integrity does not verify"),
                Reply::Success | Reply::Error(_) | Reply::Unauthorized => return resp,
            }
        }
        panic!("authentication loop did not settle");
    }

    /// ChannelData padded to a multiple of 4 bytes, as RFC 8656 §11.5 requires over TCP.
    pub fn send_channel_data(&mut self, channel: u16, payload: &[u8]) {
        let mut out = Vec::new();
        ChannelData { channel, payload }.encode(&mut out);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        self.stream.write_all(&out).expect("write ChannelData");
    }
}

/// Decodes a STUN message (for checks on raw responses).
pub fn decode(m: &[u8]) -> Message<'_> {
    Message::decode(m).expect("valid STUN message")
}

// ---------------------------------------------------------------------------------------------
// The server under test.

enum Kind {
    Turnpike(Server),
    Coturn(Coturn),
}

/// A TURN server on 127.0.0.1 with UDP and TCP on `addr` and, when started with a certificate,
/// TLS on `tls`.
pub struct Relay {
    kind: Kind,
    pub addr: SocketAddr,
    pub tls: Option<SocketAddr>,
}

impl Relay {
    /// turnpike with the harness's usual flags (`Server::start`'s: relay on 127.0.0.1, loopback
    /// peers allowed, USER/PASSWORD and the REST secret, no user quota), `--listen` on a port
    /// free for UDP and TCP, `--tls-listen` + `--cert`/`--pkey` when `cert` is given, then `extra`.
    pub fn turnpike(cert: Option<&CertPair>, extra: &[&str]) -> Relay {
        let port = free_udp_tcp_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut args: Vec<String> = [
            "--listen",
            &addr.to_string(),
            "--relay-ip",
            "127.0.0.1",
            "--allowed-peer-ip",
            "127.0.0.0/8",
            "--user",
            &format!("{USER}:{PASSWORD}"),
            "--static-auth-secret",
            SECRET,
            "--user-quota",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut tls = None;
        if let Some(c) = cert {
            let t: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
            args.extend([
                "--tls-listen".to_string(),
                t.to_string(),
                "--cert".into(),
                c.cert.display().to_string(),
                "--pkey".into(),
                c.key.display().to_string(),
            ]);
            tls = Some(t);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server::start_with(&args);
        assert_eq!(server.addr, addr, "turnpike listens where it was told");
        assert!(
            wait_tcp(addr, Duration::from_secs(10)),
            "turnpike does not accept TCP on {addr} (--listen takes UDP and TCP, issue 11)"
        );
        if let Some(t) = tls {
            assert!(
                wait_tcp(t, Duration::from_secs(10)),
                "turnpike does not accept TCP on its --tls-listen {t}"
            );
        }
        // wait_tcp's probe connections count against the connection caps until turnpike has
        // read their close; the cap tests start right after this.
        thread::sleep(Duration::from_millis(300));
        Relay {
            kind: Kind::Turnpike(server),
            addr,
            tls,
        }
    }

    /// coturn (Debian's turnserver) with the same users, for the `#[ignore]`d twins that check
    /// the client side of a test against a server known to work.
    pub fn coturn(cert: Option<&CertPair>) -> Relay {
        let c = Coturn::start(cert);
        Relay {
            addr: c.addr,
            tls: c.tls,
            kind: Kind::Coturn(c),
        }
    }

    /// The server's process (for /proc checks).
    pub fn pid(&self) -> u32 {
        match &self.kind {
            Kind::Turnpike(s) => s.pid(),
            Kind::Coturn(c) => c.child.id(),
        }
    }

    /// The TLS address (panics when started without a certificate).
    pub fn tls(&self) -> SocketAddr {
        self.tls.expect("started without a certificate")
    }

    /// Stops the server; turnpike's "shut down" line (`None` for coturn).
    pub fn stop(self) -> Option<String> {
        match self.kind {
            Kind::Turnpike(s) => {
                let log = s.stop();
                let line = log.iter().find(|l| l.contains("shut down")).cloned();
                assert!(line.is_some(), "no 'shut down' line in turnpike's log: {log:?}");
                eprintln!("turnpike: {}", line.as_deref().unwrap_or(""));
                line
            }
            Kind::Coturn(c) => {
                drop(c);
                None
            }
        }
    }
}

/// coturn's turnserver on 127.0.0.1 (UDP+TCP, and TLS with a certificate), long-term
/// credentials USER/PASSWORD, loopback peers allowed; killed by PID on drop.
pub struct Coturn {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
    pub tls: Option<SocketAddr>,
}

impl Coturn {
    pub fn start(cert: Option<&CertPair>) -> Coturn {
        require("turnserver");
        let dir = temp_dir("coturn");
        let port = free_udp_tcp_port();
        let mut args: Vec<String> = [
            "-n",
            "--no-cli",
            "--no-dtls",
            "--lt-cred-mech",
            "--user",
            &format!("{USER}:{PASSWORD}"),
            "--realm",
            "turnpike-test",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
            "--allow-loopback-peers",
            "--listening-port",
            &port.to_string(),
            "--pidfile",
            &dir.join("turnserver.pid").display().to_string(),
            "--userdb",
            &dir.join("turndb").display().to_string(),
            "--log-file",
            &dir.join("turnserver.log").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut tls = None;
        match cert {
            Some(c) => {
                let t = free_udp_tcp_port();
                args.extend([
                    "--tls-listening-port".to_string(),
                    t.to_string(),
                    "--cert".into(),
                    c.cert.display().to_string(),
                    "--pkey".into(),
                    c.key.display().to_string(),
                ]);
                tls = Some(format!("127.0.0.1:{t}").parse().unwrap());
            }
            None => args.push("--no-tls".into()),
        }
        let child = Command::new("turnserver")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnserver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let c = Coturn { child, dir, addr, tls };
        assert!(wait_tcp(addr, Duration::from_secs(10)), "coturn did not start");
        if let Some(t) = tls {
            assert!(wait_tcp(t, Duration::from_secs(10)), "coturn's TLS port did not open");
        }
        c
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
