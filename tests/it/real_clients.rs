//! Independent clients against the real server: coturn's turnutils_uclient (Debian's
//! coturn package) with turnutils_peer as the echo peer, and aioice's TURN client (PyPI).

use std::process::{Child, Command, Stdio};

use crate::harness::{free_udp_port, require, Server, PASSWORD, SECRET, USER};

pub(crate) struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_peer() -> (Peer, u16) {
    require("turnutils_peer");
    let port = free_udp_port();
    let child = Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn turnutils_peer");
    std::thread::sleep(std::time::Duration::from_millis(200));
    (Peer(child), port)
}

/// What a uclient run printed at the end.
#[derive(Debug)]
pub(crate) struct UclientReport {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) rtt_line: String,
    pub(crate) output: String,
}

/// Runs `turnutils_uclient ARGS` (at most 90 s; inside network namespace `netns` when given)
/// and parses what it printed.
pub(crate) fn run_uclient(netns: Option<&str>, args: &[&str]) -> UclientReport {
    let mut cmd = Command::new("timeout");
    cmd.arg("90");
    if let Some(ns) = netns {
        cmd.args(["ip", "netns", "exec", ns]);
    }
    let out = cmd.arg("turnutils_uclient").args(args).output().expect("run uclient");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let report = parse_uclient(&text);
    eprintln!(
        "uclient {args:?}: sent {} received {} lost {} | {}",
        report.sent, report.received, report.lost, report.rtt_line
    );
    report
}

pub(crate) fn parse_uclient(output: &str) -> UclientReport {
    let mut r = UclientReport {
        sent: 0,
        received: 0,
        lost: u64::MAX,
        rtt_line: String::new(),
        output: output.into(),
    };
    for line in output.lines() {
        if let Some(rest) = line.split("tot_send_msgs=").nth(1) {
            if !line.contains("msz=") {
                let mut parts = rest.split(", tot_recv_msgs=");
                r.sent = parts.next().unwrap().trim().parse().unwrap_or(0);
                r.received = parts.next().unwrap_or("0").trim().parse().unwrap_or(0);
            }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            r.lost = rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        if line.contains("Average round trip delay") {
            r.rtt_line = line.split(": : ").last().unwrap_or(line).to_string();
        }
    }
    r
}

/// Runs turnutils_uclient with 10 clients x 50 messages through a fresh server.
fn uclient(mode: &[&str], credentials: &[&str]) -> UclientReport {
    require("turnutils_uclient");
    let server = Server::start(&[]);
    let (_peer, peer_port) = start_peer();
    let port = server.addr.port().to_string();
    let peer_port = peer_port.to_string();
    let mut args = vec![
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port,
        "-p",
        &port,
        "-m",
        "10",
        "-n",
        "50",
        "-l",
        "120",
    ];
    args.extend_from_slice(mode);
    args.extend_from_slice(credentials);
    args.push("127.0.0.1");
    let report = run_uclient(None, &args);
    let stats = server.stop();
    eprintln!("turnpike: {}", stats.last().cloned().unwrap_or_default());
    report
}

fn assert_clean(r: &UclientReport) {
    assert!(r.sent >= 500, "expected at least 10 clients x 50 messages, got {r:?}");
    assert_eq!(r.received, r.sent, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
    assert!(!r.output.contains("error"), "uclient reported an error:\n{}", r.output);
}

#[test]
fn uclient_channels() {
    assert_clean(&uclient(&[], &["-u", USER, "-w", PASSWORD]));
}

#[test]
fn uclient_send_indications() {
    assert_clean(&uclient(&["-s"], &["-u", USER, "-w", PASSWORD]));
}

#[test]
fn uclient_client_to_client() {
    assert_clean(&uclient(&["-y"], &["-u", USER, "-w", PASSWORD]));
}

#[test]
fn uclient_rest_api_secret() {
    assert_clean(&uclient(&[], &["-u", "dave", "-W", SECRET]));
}

#[test]
fn uclient_wrong_password_is_refused() {
    let r = uclient(&["-c"], &["-u", USER, "-w", "not-the-password"]);
    assert_eq!(
        r.received, 0,
        "nothing may be relayed with a wrong password: {}",
        r.output
    );
}

#[test]
fn aioice_send_data_and_channel() {
    require("python3");
    let server = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/aioice_turn.py");
    let out = Command::new("timeout")
        .args([
            "60",
            "python3",
            script,
            "127.0.0.1",
            &server.addr.port().to_string(),
            USER,
            PASSWORD,
            "50",
        ])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("aioice: {stdout}");
    assert!(
        out.status.success(),
        "aioice client failed:\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("\"via_data_indication\": 50") || stdout.contains("\"via_data_indication\": 5"));
}
