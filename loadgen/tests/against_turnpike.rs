//! loadgen against the real turnpike binary (and against bare-forwarder), at low rates:
//! zero loss, a sane histogram, JSON that parses; over UDP, TCP and TLS. Not timed: speed
//! claims come from bench/compare, never from tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use loadgen::report::Report;

/// The turnpike binary: `$TURNPIKE_BIN`, else `<target>/debug/turnpike` (built with
/// `cargo build -p turnpike --bin turnpike` when absent).
fn turnpike_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TURNPIKE_BIN") {
        return PathBuf::from(p);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace.join("target"));
    let bin = target.join("debug").join("turnpike");
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "turnpike", "--bin", "turnpike"])
            .current_dir(&workspace)
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cargo build -p turnpike failed");
    }
    bin
}

/// A child process that is killed on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
    /// TCP and TLS listeners from turnpike's "listening on tcp A, tls B" line.
    streams: Vec<(String, SocketAddr)>,
    /// Every stderr line so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// The listener of transport `name` (`tcp` or `tls`).
    fn stream(&self, name: &str) -> SocketAddr {
        self.streams
            .iter()
            .find(|(t, _)| t == name)
            .unwrap_or_else(|| panic!("no {name} listener in {:?}", self.streams))
            .1
    }

    /// Stops the process with SIGTERM (at most 15 s, then SIGKILL) and returns its "shut
    /// down" log line.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The reader thread sees EOF once the process is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains("shut down")) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no 'shut down' line: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `name=N` field of a log line.
fn field(line: &str, name: &str) -> u64 {
    let key = format!(" {name}=");
    let rest = line.split(&key).nth(1).unwrap_or_else(|| panic!("no {name} in {line}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin args`, waits for "listening on udp ADDR" on stderr.
fn start(bin: &Path, args: &[&str]) -> Proc {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let kept = log.clone();
    // Keeps draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let mut streams = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not start", bin.display());
        };
        if let Some(rest) = line.split("listening on tcp ").nth(1) {
            // "listening on tcp 127.0.0.1:3478, tls 127.0.0.1:5349"
            for item in format!("tcp {rest}").split(", ") {
                if let Some((t, a)) = item.trim().split_once(' ') {
                    streams.push((t.to_string(), a.parse().unwrap()));
                }
            }
        }
        if let Some(rest) = line.split("listening on udp ").nth(1) {
            let addr = rest.split([' ', ',']).next().unwrap().parse().unwrap();
            return Proc {
                child,
                addr,
                streams,
                log,
            };
        }
    }
}

fn turnpike() -> Proc {
    turnpike_with(&[])
}

fn turnpike_with(extra: &[&str]) -> Proc {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--allowed-peer-ip",
        "127.0.0.0/8",
        "--user",
        "alice:secret",
        "--static-auth-secret",
        "s3cret",
        "--log-level",
        "info",
        // loadgen runs thousands of allocations as one user (the default quota is 10).
        "--user-quota",
        "0",
    ];
    args.extend_from_slice(extra);
    start(&turnpike_bin(), &args)
}

/// Runs loadgen with `args` plus `--json --quiet`; returns the parsed report.
fn loadgen(args: &[String]) -> Report {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args(["--json", "--quiet"])
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The JSON parses as a generic document and as the typed report.
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("loadgen --json prints JSON");
    assert!(v["rtt_us"]["p99"].is_number(), "{v}");
    serde_json::from_value(v).expect("JSON matches the report schema")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Zero loss, every echo timed, percentiles ordered, nothing left behind.
fn assert_clean(r: &Report, channels: u64, rate: f64) {
    let t = &r.traffic;
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.setup.allocations_ok * r.channels_per_allocation as u64, channels);
    assert_eq!(r.setup.allocations_failed, 0);
    let expect = rate * t.seconds;
    assert!(
        t.client_to_peer.sent as f64 >= 0.9 * expect,
        "sent {} of {expect}",
        t.client_to_peer.sent
    );
    assert_eq!(t.client_to_peer.lost, 0, "{t:?}");
    assert_eq!(t.peer_to_client.lost, 0, "{t:?}");
    assert_eq!(t.peer_to_client.received, t.client_to_peer.sent);
    assert_eq!(t.garbage, 0);
    let h = &r.rtt_us;
    assert_eq!(h.count, t.peer_to_client.received, "one RTT sample per echo");
    assert!(h.min > 0.0 && h.min <= h.p50, "{h:?}");
    assert!(
        h.p50 <= h.p90 && h.p90 <= h.p99 && h.p99 <= h.p999 && h.p999 <= h.max,
        "{h:?}"
    );
    assert!(h.p50 < 1_000_000.0, "median RTT over a second on loopback: {h:?}");
}

#[test]
fn hundred_channels_through_turnpike_lose_nothing() {
    let server = turnpike();
    let pid = server.child.id().to_string();
    let addr = server.addr.to_string();
    let r = loadgen(&s(&[
        "--server",
        &addr,
        "--channels",
        "100",
        "--rate",
        "2000",
        "--duration",
        "2",
        "--drain-ms",
        "1500",
        "--server-pid",
        &pid,
    ]));
    assert_clean(&r, 100, 2000.0);
    assert_eq!(r.encapsulation, "channel-data");
    assert_eq!(r.stun.released, 100, "every allocation released with LIFETIME 0");
    let p = r.server_process.as_ref().expect("server figures with --server-pid");
    assert!(p.rss_after_setup_kib > 0 && p.cpu_seconds >= 0.0, "{p:?}");
}

#[test]
fn rest_credentials_send_indications_and_refreshes() {
    let server = turnpike();
    let addr = server.addr.to_string();
    let r = loadgen(&s(&[
        "--server",
        &addr,
        "--secret",
        "s3cret",
        "--user",
        "carol",
        "--channels",
        "40",
        "--channels-per-allocation",
        "4",
        "--peers",
        "4",
        "--send-indications",
        "--rate",
        "1000",
        "--duration",
        "2",
        "--refresh-interval",
        "0.5",
        "--drain-ms",
        "1500",
    ]));
    assert_clean(&r, 40, 1000.0);
    assert_eq!(r.encapsulation, "send-indication");
    assert!(r.stun.refresh_ok >= 10, "refreshes ran: {:?}", r.stun);
    assert_eq!(r.stun.refresh_failed, 0);
    assert_eq!(r.stun.released, 10);
}

/// The loss accounting is not blind: a relay that drops (here turnpike's per-allocation
/// bandwidth cap: 80 kbit/s after a 64 KiB burst, against 1.6 Mbit/s offered per channel)
/// shows up as lost packets.
#[test]
fn drops_in_the_relay_are_counted_as_loss() {
    let server = turnpike_with(&["--max-bitrate", "80000"]);
    let addr = server.addr.to_string();
    let r = loadgen(&s(&[
        "--server",
        &addr,
        "--channels",
        "2",
        "--rate",
        "400",
        "--size",
        "1000",
        "--duration",
        "2",
        "--drain-ms",
        "1000",
    ]));
    assert_eq!(r.setup.allocations_ok, 2);
    let t = &r.traffic;
    assert!(t.client_to_peer.lost > 0, "the cap must drop packets: {t:?}");
    assert!(t.loss_ratio > 0.1, "{t:?}");
    assert_eq!(r.rtt_us.count, t.peer_to_client.received);
}

#[test]
fn wrong_password_is_reported_by_code() {
    let server = turnpike();
    let addr = server.addr.to_string();
    let r = loadgen(&s(&[
        "--server",
        &addr,
        "--user",
        "alice:wrong",
        "--channels",
        "5",
        "--duration",
        "0",
    ]));
    assert_eq!(r.setup.allocations_ok, 0);
    assert_eq!(r.setup.allocations_failed, 5);
    assert_eq!(r.errors.get("401"), Some(&5), "{:?}", r.errors);
}

#[test]
fn raw_mode_through_bare_forwarder() {
    let fwd = start(
        Path::new(env!("CARGO_BIN_EXE_bare-forwarder")),
        &["--listen", "127.0.0.1:0"],
    );
    let addr = fwd.addr.to_string();
    let r = loadgen(&s(&[
        "--mode",
        "raw",
        "--server",
        &addr,
        "--channels",
        "100",
        "--rate",
        "2000",
        "--duration",
        "2",
        "--drain-ms",
        "1500",
    ]));
    assert_clean(&r, 100, 2000.0);
    assert_eq!(r.encapsulation, "raw");
}

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1 (P-256), made
/// with the `openssl` CLI in a fresh directory: (dir, ca.pem, server.pem, server.key).
fn test_pki(tag: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("loadgen-pki-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("the openssl CLI is needed to make the test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=loadgen test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    run(&csr);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let p = |f: &str| dir.join(f);
    (p(""), p("ca.pem"), p("server.pem"), p("server.key"))
}

/// The common part of the TCP and TLS runs: 100 channels on 25 connections (4 channels
/// each, from 4 client IPs: turnpike allows 64 connections per IP by default), 2,000
/// packets/s for 2 s, then the server's own count of what it relayed to the clients.
fn stream_run(server: Proc, transport_args: &[&str]) -> (loadgen::report::Report, String) {
    let pid = server.child.id().to_string();
    let mut args = s(transport_args);
    args.extend(s(&[
        "--channels",
        "100",
        "--channels-per-allocation",
        "4",
        "--local-ip",
        "127.1.0.1-127.1.0.4",
        "--rate",
        "2000",
        "--duration",
        "2",
        "--drain-ms",
        "1500",
        "--server-pid",
        &pid,
    ]));
    let r = loadgen(&args);
    assert_clean(&r, 100, 2000.0);
    assert_eq!(r.encapsulation, "channel-data");
    assert_eq!(r.stun.released, 25, "every allocation released with LIFETIME 0");
    assert_eq!(r.stun.retransmits, 0, "no retransmissions over a stream");
    let shutdown = server.stop();
    // What the clients got back went through the server's stream path.
    assert_eq!(
        field(&shutdown, "to_client"),
        r.traffic.peer_to_client.sent,
        "{shutdown}"
    );
    assert_eq!(field(&shutdown, "to_peer"), r.traffic.client_to_peer.sent, "{shutdown}");
    assert_eq!(field(&shutdown, "allocations"), 0, "{shutdown}");
    (r, shutdown)
}

#[test]
fn tcp_through_turnpike_loses_nothing() {
    let server = turnpike();
    let addr = server.stream("tcp").to_string();
    let (r, _) = stream_run(server, &["--transport", "tcp", "--server", &addr]);
    assert_eq!(r.transport, "tcp");
    assert!(r.tls.is_none());
}

#[test]
fn tls_through_turnpike_loses_nothing_and_checks_the_certificate() {
    let (dir, ca, cert, key) = test_pki("tls");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let tls_server = || turnpike_with(&["--tls-listen", "127.0.0.1:0", "--cert", cert, "--pkey", key]);
    let ca = ca.to_str().unwrap();
    // The main run: the default versions (TLS 1.3 chosen), the name from --tls-name.
    let server = tls_server();
    let addr = server.stream("tls").to_string();
    let (r, _) = stream_run(
        server,
        &[
            "--transport",
            "tls",
            "--server",
            &addr,
            "--ca",
            ca,
            "--tls-name",
            "localhost",
        ],
    );
    assert_eq!(r.transport, "tls");
    let tls = r.tls.as_ref().expect("TLS figures");
    assert_eq!((tls.handshakes, tls.tls13, tls.alpn_stun_turn), (25, 25, 25), "{tls:?}");

    let server = tls_server();
    let addr = server.stream("tls").to_string();
    // A name the certificate does not carry: every connection fails in the handshake.
    let bad = loadgen(&s(&[
        "--transport",
        "tls",
        "--server",
        &addr,
        "--ca",
        ca,
        "--tls-name",
        "wrong.example",
        "--channels",
        "3",
        "--duration",
        "0",
    ]));
    assert_eq!(bad.setup.allocations_failed, 3, "{:?}", bad.errors);
    assert!(
        bad.errors
            .keys()
            .any(|k| k.starts_with("tls: invalid peer certificate")),
        "{:?}",
        bad.errors
    );
    // TLS 1.2 only, the name from --server (an IP address).
    let v12 = loadgen(&s(&[
        "--transport",
        "tls",
        "--server",
        &addr,
        "--ca",
        ca,
        "--tls-version",
        "1.2",
        "--channels",
        "4",
        "--rate",
        "200",
        "--duration",
        "1",
        "--drain-ms",
        "1000",
    ]));
    assert_clean(&v12, 4, 200.0);
    let tls = v12.tls.as_ref().expect("TLS figures");
    assert_eq!((tls.handshakes, tls.tls13, tls.alpn_stun_turn), (4, 0, 4), "{tls:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn flows_out_lists_the_channels_and_holds_them() {
    let server = turnpike();
    let addr = server.addr.to_string();
    let dir = std::env::temp_dir().join(format!("loadgen-flows-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flows.json");
    let t0 = Instant::now();
    let r = loadgen(&s(&[
        "--server",
        &addr,
        "--channels",
        "8",
        "--channels-per-allocation",
        "2",
        "--peers",
        "2",
        "--duration",
        "0",
        "--flows-out",
        path.to_str().unwrap(),
        "--hold",
        "0.5",
    ]));
    assert!(t0.elapsed() >= Duration::from_millis(500), "held for --hold");
    assert_eq!(r.stun.released, 4, "released after the hold");
    let list = loadgen::flows::FlowList::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(list.mode, "turn");
    assert_eq!(list.server.to_string(), addr);
    assert_eq!(list.flows.len(), 8);
    for (i, f) in list.flows.iter().enumerate() {
        assert_eq!(f.index as usize, i);
        assert_eq!(f.channel, Some(0x4000 + (i % 2) as u16), "{f:?}");
        assert_eq!(f.client.ip().to_string(), "127.0.0.1");
        assert_eq!(f.relayed.ip().to_string(), "127.0.0.1");
        assert_ne!(f.relayed.port(), list.server.port());
        // Both channels of an allocation share its client and relayed addresses, and go to
        // different peers.
        let other = &list.flows[i ^ 1];
        assert_eq!((f.client, f.relayed), (other.client, other.relayed));
        assert_ne!(f.peer, other.peer);
    }
    let allocations: std::collections::HashSet<_> = list.flows.iter().map(|f| f.relayed).collect();
    assert_eq!(allocations.len(), 4);
    // The frame of a flow carries ChannelData on its channel with the flow's index.
    let f = &list.flows[3];
    let frame = loadgen::frame::client_frame(&list, f, [2; 6], [4; 6], 100);
    let udp = &frame[loadgen::frame::ETH_LEN + loadgen::frame::IPV4_LEN..];
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), list.server.port());
    let cd = &udp[loadgen::frame::UDP_LEN..];
    assert_eq!(u16::from_be_bytes([cd[0], cd[1]]), f.channel.unwrap());
    assert_eq!(loadgen::payload::route_id(&cd[4..]), Some(3));
}
