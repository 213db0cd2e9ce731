//! The NAT lab (`tests/natlab/natlab.py`): turnpike on a public segment in a network namespace,
//! two private sites behind NAT routers (full cone, restricted cone, port-restricted cone,
//! symmetric; netfilter or the lab's user-space NAT), two aioice ICE agents gathering host,
//! server-reflexive and relayed candidates from turnpike. For all 16 combinations: each router
//! measures as configured, data flows, and ICE selects a direct pair exactly when the documents
//! predict hole punching works (type numbers 1..4 adding up to at most 6), else a pair through
//! turnpike's relay, which turnpike's counters confirm.
//!
//! The `probe_classifies_*` tests run the lab's probe mode: one site behind one router, turnpike
//! with its RFC 5780 alternate address (`--alt-listen`), and `turnpike probe` from the site's
//! host must name the router's mapping, filtering, hairpinning and classic NAT type.
//!
//! Needs root (CI has it) and iproute2, iptables, conntrack, aioice: `scripts/test.sh`
//! installs them. A missing one fails the test.

use std::collections::HashMap;
use std::process::Command;

use crate::harness::require;

const NATS: [&str; 4] = ["full-cone", "restricted-cone", "port-restricted-cone", "symmetric"];
const MESSAGES: u64 = 100;

fn rank(nat: &str) -> usize {
    NATS.iter().position(|n| *n == nat).expect("known NAT") + 1
}

fn behaviour(nat: &str) -> &'static str {
    match nat {
        "full-cone" => "endpoint-independent/endpoint-independent",
        "restricted-cone" => "endpoint-independent/address-dependent",
        "port-restricted-cone" => "endpoint-independent/address-and-port-dependent",
        _ => "address-and-port-dependent/address-and-port-dependent",
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Namespaces of this lab whose creating process is gone: there must be none after a run.
fn leftover_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("tpnl"))
        .filter(|name| {
            let pid = name["tpnl".len()..].split('-').next().unwrap_or("");
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
        .map(str::to_string)
        .collect()
}

/// Runs natlab.py with `args` (root and tools checked first) under a time limit; returns its
/// stdout once it succeeded and left no namespace behind.
fn natlab(limit_s: u32, lab_args: &[&str]) -> String {
    assert!(
        is_root(),
        "the NAT lab needs root for network namespaces (CI runs scripts/test.sh as root)"
    );
    for program in ["ip", "iptables", "conntrack", "python3"] {
        require(program);
    }
    let aioice = Command::new("python3").args(["-c", "import aioice"]).status();
    assert!(
        aioice.map(|s| s.success()).unwrap_or(false),
        "aioice is missing: run scripts/test.sh"
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/natlab/natlab.py");
    let mut args: Vec<String> = vec![
        "-k".into(),
        "10".into(),
        limit_s.to_string(),
        "python3".into(),
        script.into(),
    ];
    args.extend(["--turnpike", env!("CARGO_BIN_EXE_turnpike")].map(String::from));
    args.extend(lab_args.iter().map(|a| a.to_string()));
    // The data-plane configuration the rest of the suite runs under, as the harness does.
    if let Ok(extra) = std::env::var("TURNPIKE_TEST_SERVER_ARGS") {
        args.extend(extra.split_whitespace().map(|w| format!("--turnpike-arg={w}")));
    }
    let out = Command::new("timeout").args(&args).output().expect("run natlab.py");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("{stdout}");
    let leftovers = leftover_namespaces();
    assert!(leftovers.is_empty(), "namespaces left behind: {leftovers:?}");
    assert!(
        out.status.success(),
        "natlab.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Probe mode for one router: `turnpike probe` from the host behind it must print `expected`
/// (mapping behaviour, filtering behaviour, hairpinning, NAT type).
fn probe_classifies(nat: &str, expected: [&str; 4]) {
    let stdout = natlab(60, &["--probe-router", nat]);
    let row: HashMap<&str, &str> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("NATPROBE "))
        .unwrap_or_else(|| panic!("no NATPROBE line:\n{stdout}"))
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(row.get("nat"), Some(&nat), "{stdout}");
    assert_eq!(
        row.get("router"),
        Some(&behaviour(nat)),
        "router measured by natcheck.py"
    );
    // The probe's own lines, as it printed them.
    let probe: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("  probe: ")).collect();
    let field = |label: &str| {
        probe
            .iter()
            .find_map(|l| l.strip_prefix(label).filter(|rest| rest.starts_with(' ')))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {label:?} line in the probe's output:\n{stdout}"))
    };
    assert_eq!(
        field("server other address"),
        "198.51.100.2:3479",
        "turnpike's --alt-listen"
    );
    assert!(field("mapped address").starts_with("198.51.100.11:"), "{stdout}");
    let got = [
        field("mapping behaviour"),
        field("filtering behaviour"),
        field("hairpinning"),
        field("NAT type"),
    ];
    assert_eq!(
        got, expected,
        "{nat}: mapping, filtering, hairpinning, NAT type:\n{stdout}"
    );
    assert_eq!(row.get("ok"), Some(&"true"), "natlab.py's own verdict");
}

#[test]
fn probe_classifies_full_cone() {
    let ei = "endpoint-independent";
    probe_classifies("full-cone", [ei, ei, "yes", "full cone"]);
}

#[test]
fn probe_classifies_restricted_cone() {
    let ei = "endpoint-independent";
    probe_classifies("restricted-cone", [ei, "address-dependent", "no", "restricted cone"]);
}

#[test]
fn probe_classifies_port_restricted_cone() {
    let ei = "endpoint-independent";
    probe_classifies(
        "port-restricted-cone",
        [ei, "address-and-port-dependent", "no", "port-restricted cone"],
    );
}

#[test]
fn probe_classifies_symmetric() {
    let apd = "address-and-port-dependent";
    probe_classifies("symmetric", [apd, apd, "no", "symmetric"]);
}

#[test]
fn nat_lab_matrix() {
    let stdout = natlab(150, &[]);

    let rows: Vec<HashMap<&str, &str>> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("NATLAB "))
        .map(|l| l.split_whitespace().filter_map(|kv| kv.split_once('=')).collect())
        .collect();
    assert_eq!(rows.len(), 16, "one row per combination:\n{stdout}");
    let mut seen = Vec::new();
    for row in &rows {
        let get = |k: &str| *row.get(k).unwrap_or_else(|| panic!("no {k} in {row:?}"));
        let num = |k: &str| get(k).parse::<i64>().unwrap_or_else(|_| panic!("{k} in {row:?}"));
        let (a, b) = (get("site_a"), get("site_b"));
        seen.push((a.to_string(), b.to_string()));
        let name = format!("{a} x {b}");
        assert_eq!(get("router_a"), behaviour(a), "{name}: router A measured");
        assert_eq!(get("router_b"), behaviour(b), "{name}: router B measured");
        assert_eq!(num("sent"), MESSAGES as i64, "{name}");
        assert_eq!(num("received"), MESSAGES as i64, "{name}: every message came back");
        assert!(num("echoed") >= MESSAGES as i64, "{name}: echoed");

        let predicted = if rank(a) + rank(b) <= 6 { "direct" } else { "relay" };
        let pair = get("pair");
        let relayed = pair.split('/').any(|t| t == "relay");
        assert_eq!(
            if relayed { "relay" } else { "direct" },
            predicted,
            "{name}: ICE selected {pair}"
        );
        assert_eq!(get("via"), predicted, "{name}");
        // Both agents agree: each one's remote candidate is the other's view of it.
        assert_eq!(
            relayed,
            get("b_local").starts_with("relay:") || get("b_remote").starts_with("relay:")
        );

        // turnpike's counters: the data went through it exactly when the pair is relayed.
        let (to_peer, to_client) = (num("turnpike_to_peer"), num("turnpike_to_client"));
        if relayed {
            assert!(
                to_peer >= MESSAGES as i64 && to_client >= MESSAGES as i64,
                "{name}: relayed pair but turnpike relayed to_peer={to_peer} to_client={to_client}"
            );
        } else {
            assert!(
                to_peer >= 0 && to_client >= 0 && to_peer + to_client < MESSAGES as i64,
                "{name}: direct pair but turnpike relayed to_peer={to_peer} to_client={to_client}"
            );
        }
        assert_eq!(get("ok"), "true", "{name}: natlab.py's own verdict");
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 16, "every combination once");
}
