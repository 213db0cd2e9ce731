//! loadgen against the real turnpike binary (and against bare-forwarder), at low rates:
//! zero loss, a sane histogram, JSON that parses. Not timed: speed claims come from
//! bench/compare, never from tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin args`, waits for "listening on udp ADDR" on stderr.
fn start(bin: &std::path::Path, args: &[&str]) -> Proc {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not start", bin.display());
        };
        if let Some(rest) = line.split("listening on udp ").nth(1) {
            let addr = rest.split([' ', ',']).next().unwrap().parse().unwrap();
            // Keep draining stderr so the child never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return Proc { child, addr };
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
        std::path::Path::new(env!("CARGO_BIN_EXE_bare-forwarder")),
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
