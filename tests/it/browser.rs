//! A real browser through turnpike: headless Chromium (Debian's `/usr/bin/chromium`, driven by
//! playwright-core from npm, `tests/browser/relay_test.js`) opens two RTCPeerConnections in one
//! page with `iceTransportPolicy: 'relay'` and turnpike on loopback as the only ICE server,
//! opens a data channel and echoes messages. Asserts that both selected candidate pairs are
//! relay<->relay on turnpike's relayed addresses, that the channel opened, that every message
//! came back, and that turnpike's shutdown counters show the relayed traffic. Runs with a static
//! user and with TURN REST API credentials (computed by the node driver with node's crypto).
//!
//! Prerequisites (installed by `scripts/test.sh`): `apt-get install chromium`, node, and
//! `npm ci` in `tests/browser`. A missing one fails the test.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::harness::{require, Netns, Server, PASSWORD, SECRET, USER};

const MESSAGES: u64 = 50;

pub(crate) fn browser_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
}

pub(crate) fn require_browser() {
    require("node");
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/test.sh (apt-get install -y chromium)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core/package.json").exists(),
        "playwright-core is missing: run scripts/test.sh (npm ci in tests/browser)"
    );
}

/// `key=value` pairs of the driver's SUMMARY line.
pub(crate) fn summary(stdout: &str) -> HashMap<String, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("SUMMARY "))
        .unwrap_or_else(|| panic!("no SUMMARY line from relay_test.js:\n{stdout}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `name=N` counter of turnpike's "shut down" log line.
fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

fn run_browser(credentials: &[&str], expect: &str) {
    require_browser();
    let server = Server::start(&[]);
    let turn = server.addr.to_string();
    let count = MESSAGES.to_string();
    let mut args = vec![
        "50",
        "node",
        "relay_test.js",
        "--turn",
        &turn,
        "--count",
        &count,
        "--timeout-ms",
        "20000",
    ];
    args.extend_from_slice(credentials);
    let out = Command::new("timeout")
        .args(&args)
        .current_dir(browser_dir())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let log = server.stop();
    let shutdown = log
        .iter()
        .find(|l| l.contains("shut down"))
        .cloned()
        .unwrap_or_default();
    eprintln!("relay_test.js stdout:\n{stdout}");
    eprintln!("turnpike: {shutdown}");
    assert!(
        out.status.success(),
        "the browser test failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let s = summary(&stdout);
    let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("credentials"), expect);
    assert_eq!(get("opened"), "true", "the data channel did not open");
    assert_eq!(get("received"), count, "not every message came back");

    // Both selected pairs are relay<->relay, on turnpike's relay IP, mirror images of each
    // other, and the local relay candidates were gathered from turnpike's URL.
    for side in ["a_local", "a_remote", "b_local", "b_remote"] {
        assert!(
            get(side).starts_with("relay:127.0.0.1:"),
            "{side} of the selected pair is {} (want a relay candidate on 127.0.0.1)",
            get(side)
        );
    }
    assert_eq!(get("a_local"), get("b_remote"));
    assert_eq!(get("b_local"), get("a_remote"));
    assert_ne!(get("a_local"), get("b_local"), "two allocations, not one");
    for url in ["a_url", "b_url"] {
        assert!(
            get(url).contains(&turn),
            "{url} is {} (want turnpike at {turn})",
            get(url)
        );
    }

    // turnpike's own counters: every message went out to a peer (the other relayed address)
    // and came back to a client, at least once in each direction per message and echo.
    assert!(!shutdown.is_empty(), "no shutdown line in turnpike's log: {log:?}");
    let to_peer = counter(&shutdown, "to_peer");
    let to_client = counter(&shutdown, "to_client");
    let peer_rx = counter(&shutdown, "peer_rx");
    assert!(
        to_peer >= 2 * MESSAGES && to_client >= 2 * MESSAGES && peer_rx >= 2 * MESSAGES,
        "turnpike relayed too little for {MESSAGES} messages and their echoes: {shutdown}"
    );
}

#[test]
fn chromium_data_channel_relay_static_user() {
    run_browser(&["--user", USER, "--password", PASSWORD], "static");
}

#[test]
fn chromium_data_channel_relay_rest_api() {
    run_browser(&["--secret", SECRET, "--name", "chromium"], "rest-api");
}

/// Drain with a real browser: Chromium is configured with the draining turnpike only; its
/// Allocate gets 300 Try Alternate with ALTERNATE-SERVER and Chromium follows it, so the data
/// channel is relayed by the second turnpike and the draining one relays nothing. Everything
/// runs in a network namespace of its own (198.18.0.1 draining, 198.18.0.2 the alternate).
#[test]
fn chromium_follows_the_drain_redirect() {
    require_browser();
    require("ip");
    // Chromium refuses to follow a redirect to a loopback address (crbug.com/649118).
    let ns = Netns::new(
        &format!("tpdrain{}", std::process::id()),
        &["198.18.0.1/24", "198.18.0.2/24"],
    );
    let args = |ip: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--listen",
            &format!("{ip}:3478"),
            "--relay-ip",
            ip,
            "--allowed-peer-ip",
            "198.18.0.0/24",
            "--user",
            &format!("{USER}:{PASSWORD}"),
            "--user-quota",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let second = Server::start_in_netns(&ns.0, &args("198.18.0.2", &[]));
    let draining = Server::start_in_netns(
        &ns.0,
        &args(
            "198.18.0.1",
            &["--alternate-server", "198.18.0.2:3478", "--drain-timeout", "120"],
        ),
    );
    // An allocation held on the draining turnpike keeps it running through the browser run
    // (aioice in the namespace, stopped by PID below).
    require("python3");
    let mut holder = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c"])
        .arg(format!(
            "import asyncio, aioice.turn\n\
             async def main():\n\
             \x20   await aioice.turn.create_turn_endpoint(asyncio.DatagramProtocol, server_addr=('198.18.0.1', 3478), username='{USER}', password='{PASSWORD}', lifetime=600)\n\
             \x20   print('allocated', flush=True)\n\
             \x20   await asyncio.sleep(120)\n\
             asyncio.run(main())\n"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 holder");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "allocated");
    draining.signal("USR1");
    assert!(draining
        .wait_for_log("draining:", std::time::Duration::from_secs(5))
        .is_some());
    let count = MESSAGES.to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "timeout", "50", "node", "relay_test.js"])
        .args(["--turn", "198.18.0.1:3478", "--count", &count, "--timeout-ms", "20000"])
        .args(["--user", USER, "--password", PASSWORD])
        .current_dir(browser_dir())
        .output()
        .expect("run node");
    let _ = holder.kill();
    let _ = holder.wait();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let first_log = draining.stop();
    let log = second.stop();
    let shutdown = log
        .iter()
        .find(|l| l.contains("shut down"))
        .cloned()
        .unwrap_or_default();
    let first = first_log
        .iter()
        .find(|l| l.contains("shut down"))
        .cloned()
        .unwrap_or_default();
    eprintln!("relay_test.js stdout:\n{stdout}\nsecond turnpike: {shutdown}\ndraining turnpike: {first}");
    assert!(
        out.status.success(),
        "the browser test failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let s = summary(&stdout);
    let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("opened"), "true");
    assert_eq!(get("received"), count);
    for side in ["a_local", "b_local"] {
        assert!(
            get(side).starts_with("relay:198.18.0.2:"),
            "{side} is {} (want the alternate's relay)",
            get(side)
        );
    }
    assert!(
        counter(&shutdown, "to_peer") >= 2 * MESSAGES && counter(&shutdown, "to_client") >= 2 * MESSAGES,
        "the second turnpike relayed the browser's traffic: {shutdown}"
    );
    assert_eq!(
        counter(&first, "to_peer"),
        0,
        "the draining turnpike relayed nothing: {first}"
    );
}
