//! The metrics endpoint under a real Prometheus (Debian's `prometheus`, started here as a
//! plain process on loopback): counters move while traffic flows, the allocation gauge
//! rises and falls, a planted bad datagram shows up as a drop by reason, the exposition
//! passes `promtool check metrics` and holds no series twice.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use turnpike::proto::stun::{Attribute, Class, Method, PasswordAlgorithm};

use crate::client::Client;
use crate::harness::{require, Server, PASSWORD, USER};

/// A TCP port that was free a moment ago on 127.0.0.1.
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET `url` with curl; the body.
fn get(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {url}: {}", out.status);
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// A Prometheus process scraping one target every second, stopped on drop.
struct Prometheus {
    child: Child,
    api: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        require("prometheus");
        let dir = std::env::temp_dir().join(format!("turnpike-prom-{}-{}", std::process::id(), target.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: turnpike\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_tcp_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            child,
            api: format!("http://127.0.0.1:{port}/api/v1/query"),
            _dir: TempDir(dir),
        }
    }

    /// The value of an instant query that returns one sample, if it does.
    fn value(&self, query: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--get", "--data-urlencode"])
            .arg(format!("query={query}"))
            .arg(&self.api)
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let result = v["data"]["result"].as_array()?;
        let sample = result.first()?;
        sample["value"][1].as_str()?.parse().ok()
    }

    /// Whether an instant query returns at least one sample (or a scalar).
    fn has_data(&self, query: &str) -> bool {
        let Ok(out) = Command::new("curl")
            .args(["-s", "--max-time", "5", "--get", "--data-urlencode"])
            .arg(format!("query={query}"))
            .arg(&self.api)
            .output()
        else {
            return false;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        match v["data"]["resultType"].as_str() {
            Some("scalar") => true,
            _ => v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()),
        }
    }

    /// Polls `query` until `ok` holds for its value (at most `timeout`); the last value.
    fn wait(&self, query: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(query);
            if last.is_some_and(&ok) {
                return last;
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!("{query}: last value {last:?} after {timeout:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_live_counters_gauges_and_drops() {
    let mport = free_tcp_port();
    let maddr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    // The endpoint is up before turnpike logs that it listens.
    let server = Server::start(&["--metrics-listen", &maddr.to_string()]);
    assert_eq!(get(&format!("http://{maddr}/healthz")), "ok\n");
    assert_eq!(get(&format!("http://{maddr}/readyz")), "ready\n");
    let prom = Prometheus::start(maddr);
    prom.wait("up", Duration::from_secs(30), |v| v == 1.0);

    // An allocation with a channel to an echo peer, and traffic for a bounded time.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    assert_eq!(c.channel_bind(0x4000, peer_addr).class(), Class::Success);
    let stop = Arc::new(AtomicBool::new(false));
    let echo_stop = stop.clone();
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !echo_stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = peer.recv_from(&mut buf) {
                let _ = peer.send_to(&buf[..n], from);
            }
        }
    });
    let sender = c.sock.try_clone().unwrap();
    let server_addr = server.addr;
    let send_stop = stop.clone();
    let traffic = thread::spawn(move || {
        let mut frame = vec![0x40, 0x00, 0x00, 100];
        frame.extend_from_slice(&[7u8; 100]);
        let deadline = Instant::now() + Duration::from_secs(40);
        while !send_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = sender.send_to(&frame, server_addr);
            thread::sleep(Duration::from_millis(5));
        }
    });

    // Two scrapes during the run: the relayed-packet counter moves between them.
    let relayed = "sum(turnpike_relayed_packets_total)";
    let first = prom.wait(relayed, Duration::from_secs(20), |v| v > 0.0).unwrap();
    prom.wait(relayed, Duration::from_secs(10), |v| v > first);
    prom.wait("sum(turnpike_allocations)", Duration::from_secs(10), |v| v == 1.0);
    prom.wait("sum(turnpike_channels)", Duration::from_secs(10), |v| v == 1.0);
    prom.wait(
        "sum(rate(turnpike_relayed_bytes_total{direction=\"client_to_peer\"}[5s]))",
        Duration::from_secs(15),
        |v| v > 0.0,
    );

    // A planted bad datagram: a drop by reason.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.send_to(b"\x00\x01\x00\x04garbage-that-is-not-stun", server.addr)
        .unwrap();
    prom.wait(
        "sum(turnpike_drops_total{reason=\"malformed\"})",
        Duration::from_secs(15),
        |v| v >= 1.0,
    );
    prom.wait(
        "sum(turnpike_stun_responses_total{method=\"allocate\",code=\"401\"})",
        Duration::from_secs(10),
        |v| v >= 1.0,
    );

    // Deleting the allocation brings the gauge back down. The echoes nobody read fill the
    // client socket's receive buffer: empty it first, or the Refresh response may be dropped by
    // the kernel and its retransmission answered 437.
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    echo.join().unwrap();
    c.sock.set_nonblocking(true).unwrap();
    let mut sink = [0u8; 2048];
    while c.sock.recv_from(&mut sink).is_ok() {}
    c.sock.set_nonblocking(false).unwrap();
    let r = c.request(Method::Refresh, &[Attribute::Lifetime(0)]);
    assert_eq!(r.class(), Class::Success, "Refresh 0: {:?}", r.error_code());
    prom.wait("sum(turnpike_allocations)", Duration::from_secs(15), |v| v == 0.0);
    prom.wait(
        "sum(turnpike_allocations_closed_total{reason=\"deleted\"})",
        Duration::from_secs(10),
        |v| v == 1.0,
    );

    // The exposition itself: promtool accepts it and no series appears twice.
    let text = get(&format!("http://{maddr}/metrics"));
    require("promtool");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = HashSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let series = line.rsplit_once(' ').map(|(s, _)| s).unwrap_or(line);
        assert!(seen.insert(series.to_string()), "series twice: {series}");
    }

    // Every panel and variable query of the Grafana dashboard returns data from this
    // Prometheus after the run (grafana/check/exprs.js prints them, `$__rate_interval` as 1m).
    require("node");
    let exprs = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/check/exprs.js"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/turnpike.json"))
        .output()
        .expect("node grafana/check/exprs.js");
    assert!(exprs.status.success(), "{}", String::from_utf8_lossy(&exprs.stderr));
    let exprs = String::from_utf8(exprs.stdout).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut empty: Vec<&str> = exprs.lines().filter(|e| !e.is_empty()).collect();
    assert!(empty.len() > 20, "the dashboard's expressions: {exprs}");
    while !empty.is_empty() && Instant::now() < deadline {
        empty.retain(|e| !prom.has_data(e));
        if !empty.is_empty() {
            thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(empty.is_empty(), "dashboard expressions without data: {empty:#?}");
    drop(prom);
    server.stop();
}

#[test]
fn metrics_endpoint_is_off_by_default_and_coturn_names_on_request() {
    let mport = free_tcp_port();
    let server = Server::start(&[]);
    // No TCP listener in the process but TURN's own (TCP on the listening address) unless
    // --metrics-listen.
    let ss = Command::new("ss").args(["-ltnpH"]).output().expect("ss");
    let listeners = String::from_utf8_lossy(&ss.stdout);
    let owner = format!("pid={},", server.pid());
    let turn = server.addr.to_string();
    let ours: Vec<&str> = listeners.lines().filter(|l| l.contains(&owner)).collect();
    assert!(!ours.is_empty(), "TURN over TCP is on by default:\n{listeners}");
    assert!(
        ours.iter().all(|l| l.split_whitespace().nth(3) == Some(turn.as_str())),
        "a TCP listener other than TURN's {turn} without --metrics-listen:\n{}",
        ours.join("\n")
    );
    server.stop();
    let maddr = format!("127.0.0.1:{mport}");
    let server = Server::start(&["--metrics-listen", &maddr, "--metrics-coturn-names"]);
    let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success);
    // The gauges are recounted once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = get(&format!("http://{maddr}/metrics"));
        assert!(text.contains("turn_total_traffic_rcvp"), "coturn names served");
        assert!(text.contains("stun_binding_request"));
        if text.contains("turn_total_allocations{type=\"UDP\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "turn_total_allocations never 1:\n{text}");
        thread::sleep(Duration::from_millis(200));
    }
    server.stop();
}

/// Drain: SIGUSR1 to the first of two turnpikes. A new Allocate gets 300 with the second's
/// address as ALTERNATE-SERVER, `/readyz` turns 503 and `turnpike_draining` 1, the allocation
/// held keeps relaying; after its Refresh 0 the process exits 0 by itself.
#[test]
fn drain_redirects_new_allocations_and_exits_when_the_last_one_ends() {
    let second = Server::start(&[]);
    let mport = free_tcp_port();
    let maddr = format!("127.0.0.1:{mport}");
    let mut first = Server::start(&[
        "--metrics-listen",
        &maddr,
        "--alternate-server",
        &second.addr.to_string(),
        "--drain-timeout",
        "60",
    ]);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut held = Client::new(first.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(held.allocate().class(), Class::Success);
    assert_eq!(
        held.channel_bind(0x4000, peer.local_addr().unwrap()).class(),
        Class::Success
    );

    first.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut newcomer = Client::new(first.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    let r = loop {
        let r = newcomer.allocate();
        if r.error_code() == Some(300) || Instant::now() > deadline {
            break r;
        }
        // Not draining yet: give the allocation back and try again on a fresh 5-tuple.
        let _ = newcomer.request(Method::Refresh, &[Attribute::Lifetime(0)]);
        newcomer = Client::new(first.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r.error_code(), Some(300), "Try Alternate");
    assert_eq!(
        r.addr(turnpike::proto::stun::attribute::kind::ALTERNATE_SERVER),
        Some(second.addr)
    );
    // The client follows the redirect.
    let mut redirected = Client::new(second.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(redirected.allocate().class(), Class::Success);
    let readyz = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{maddr}/readyz"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&readyz.stdout), "503");
    assert!(get(&format!("http://{maddr}/metrics")).contains("turnpike_draining 1"));

    // The held allocation keeps relaying, and keeps the process alive.
    let mut buf = [0u8; 256];
    held.send_channel_data(0x4000, b"during the drain");
    let (n, _) = peer.recv_from(&mut buf).expect("relayed while draining");
    assert_eq!(&buf[..n], b"during the drain");
    assert!(
        first.wait_exit(Duration::from_millis(500)).is_none(),
        "exited with an allocation held"
    );
    assert_eq!(
        held.request(Method::Refresh, &[Attribute::Lifetime(0)]).class(),
        Class::Success
    );
    let status = first
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the last allocation");
    assert!(status.success(), "{status}");
    assert_eq!(
        redirected.request(Method::Refresh, &[Attribute::Lifetime(0)]).class(),
        Class::Success
    );
    second.stop();
}

/// Reload (SIGHUP): the file gains a user and a REST secret and loses one of each; the new
/// ones allocate, the removed ones get 401, an allocation held keeps relaying; a file that
/// does not parse changes nothing and is counted.
#[test]
fn sighup_reloads_users_and_secrets_and_keeps_allocations() {
    let dir = std::env::temp_dir().join(format!("turnpike-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("turnpike.toml");
    let mport = free_tcp_port();
    let base = format!(
        "listen = [\"127.0.0.1:0\"]\nrelay-ip = [\"127.0.0.1\"]\nallowed-peer-ip = [\"127.0.0.0/8\"]\nuser-quota = 0\nmetrics-listen = \"127.0.0.1:{mport}\"\n"
    );
    std::fs::write(
        &file,
        format!("{base}user = [\"alice:wonderland\", \"bob:builder\"]\nstatic-auth-secret = [\"s1\"]\n"),
    )
    .unwrap();
    let server = Server::start_with(&["--config".to_string(), file.display().to_string()]);
    let rest = |secret: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let user = format!("{exp}:rest-user");
        let pw = turnpike::proto::auth::rest_api_password(secret, &user);
        (user, pw)
    };
    let allocate = |user: &str, pw: &str| {
        let mut c = Client::new(server.addr, user, pw, PasswordAlgorithm::Md5);
        let r = c.allocate();
        let _ = c.request(Method::Refresh, &[Attribute::Lifetime(0)]);
        r.error_code()
    };
    let (u1, p1) = rest("s1");
    assert_eq!(allocate("bob", "builder"), None);
    assert_eq!(allocate(&u1, &p1), None);
    assert_eq!(allocate("carol", "cat"), Some(401));

    // A live allocation with a channel, relaying across the reload.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut held = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(held.allocate().class(), Class::Success);
    assert_eq!(
        held.channel_bind(0x4000, peer.local_addr().unwrap()).class(),
        Class::Success
    );

    std::fs::write(
        &file,
        format!("{base}user = [\"alice:wonderland\", \"carol:cat\"]\nstatic-auth-secret = [\"s2\"]\n"),
    )
    .unwrap();
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while allocate("carol", "cat").is_some() {
        assert!(Instant::now() < deadline, "carol never allocated after SIGHUP");
        thread::sleep(Duration::from_millis(100));
    }
    let (u2, p2) = rest("s2");
    assert_eq!(allocate(&u2, &p2), None, "the new REST secret");
    assert_eq!(allocate("bob", "builder"), Some(401), "the removed user");
    let (u1, p1) = rest("s1");
    assert_eq!(allocate(&u1, &p1), Some(401), "the removed REST secret");
    let mut buf = [0u8; 64];
    held.send_channel_data(0x4000, b"across the reload");
    let (n, _) = peer.recv_from(&mut buf).expect("relayed after the reload");
    assert_eq!(&buf[..n], b"across the reload");

    // A broken file changes nothing.
    std::fs::write(&file, "this is = = not toml\n").unwrap();
    server.signal("HUP");
    assert!(server
        .wait_for_log("configuration reload failed", Duration::from_secs(5))
        .is_some());
    assert_eq!(allocate("carol", "cat"), None);
    assert_eq!(allocate("bob", "builder"), Some(401));
    let text = get(&format!("http://127.0.0.1:{mport}/metrics"));
    assert!(
        text.contains("turnpike_config_reloads_total{result=\"failure\"} 1"),
        "{text}"
    );
    assert!(text.contains("turnpike_config_reloads_total{result=\"success\"} 1"));
    held.send_channel_data(0x4000, b"still");
    let (n, _) = peer.recv_from(&mut buf).expect("relayed after the failed reload");
    assert_eq!(&buf[..n], b"still");
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
