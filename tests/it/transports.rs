//! TURN over TCP and TLS (issue 11) with real clients and hostile streams.
//!
//! - coturn's turnutils_uclient over TCP (`-t`) and TLS (`-t -S`), channels and Send (`-s`),
//!   10 clients x 50 messages each, 0 loss;
//! - aioice over TCP (`turn_transport="tcp"`) and TLS 1.2 / 1.3 (`turn_ssl` with a context that
//!   trusts only the test CA), Send/Data and channels through a loopback UDP echo peer; a
//!   certificate for the wrong name is refused;
//! - `openssl s_client`: TLS 1.2 and 1.3 handshakes verify against the test CA, ALPN `stun.turn`;
//! - headless Chromium, relay-only: `turn:...?transport=tcp` and `turns:localhost:...` with the
//!   test CA trusted through an NSS database under a temporary HOME; a certificate for the wrong
//!   name yields no relay candidate;
//! - a TURN client on turnpike's codec over one TCP connection (framing: pipelined and split
//!   messages, ChannelData padding, the connection as the allocation's 5-tuple);
//! - hostile streams: garbage, length fields of 65,535, half-open connections, a garbage TLS
//!   ClientHello, thousands of idle connections, per-IP and total caps, slow writers.
//!
//! The test PKI (a CA, a `localhost`/127.0.0.1 certificate and a `wrong.example` one) is made at
//! test time with the `openssl` CLI (`transport_support::Pki`). Tests named `coturn_*` are
//! `#[ignore]`d twins that run the same client side against Debian's coturn (`turnserver`), to
//! check the clients, CA/NSS setup and browser flags independently of turnpike:
//! `cargo nextest run --test integration --run-ignored only -E 'test(/^transports::coturn_/)'`.
//! All traffic stays on 127.0.0.0/8; every wait is bounded.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{Attribute, Class, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId};

use crate::browser::{browser_dir, require_browser, summary};
use crate::client::Client;
use crate::harness::{require, PASSWORD, USER};
use crate::real_clients::{run_uclient, start_peer, UclientReport};
use crate::transport_support::*;

// ---------------------------------------------------------------------------------------------
// turnutils_uclient

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Tcp,
    Tls,
}

/// uclient (10 clients x 50 messages of 120 bytes) over TCP or TLS through `relay`, to a
/// turnutils_peer echo on 127.0.0.1.
fn uclient_stream(relay: &Relay, stream: Stream, send_indications: bool) -> UclientReport {
    require("turnutils_uclient");
    let (_peer, peer_port) = start_peer();
    let port = match stream {
        Stream::Tcp => relay.addr.port(),
        Stream::Tls => relay.tls().port(),
    }
    .to_string();
    let peer_port = peer_port.to_string();
    let mut args = vec![
        "-t",
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
        "-u",
        USER,
        "-w",
        PASSWORD,
    ];
    if stream == Stream::Tls {
        args.push("-S");
    }
    if send_indications {
        args.push("-s");
    }
    args.push("127.0.0.1");
    run_uclient(None, &args)
}

/// uclient's lines that are not errors of the run: with `-S` it picks, per connection, one of
/// several OpenSSL client contexts, some limited to TLS 1.0 or 1.1, which a server that speaks
/// TLS 1.2+ only refuses ("tls_connect: cannot connect" and OpenSSL's alert line); uclient then
/// retries with another context. coturn's OpenSSL refuses them the same way.
fn is_legacy_tls_refusal(line: &str) -> bool {
    line.contains("tls_connect: cannot connect") || (line.contains("SSL routines") && line.contains("alert"))
}

fn assert_uclient_clean(r: &UclientReport, stream: Stream) {
    assert!(r.sent >= 500, "expected at least 10 clients x 50 messages, got {r:?}");
    assert_eq!(r.received, r.sent, "{}", r.output);
    assert_eq!(r.lost, 0, "{}", r.output);
    let errors: Vec<&str> = r
        .output
        .lines()
        .filter(|l| l.to_lowercase().contains("error") && !(stream == Stream::Tls && is_legacy_tls_refusal(l)))
        .collect();
    assert!(errors.is_empty(), "uclient reported errors: {errors:#?}\n{}", r.output);
    if stream == Stream::Tls {
        let sessions = r
            .output
            .lines()
            .filter(|l| l.contains("tls_connect: client session connected"))
            .collect::<Vec<_>>();
        assert!(
            sessions.len() >= 10,
            "expected a TLS session per client, got {sessions:?}\n{}",
            r.output
        );
        assert!(
            sessions.iter().all(|l| l.contains("TLSv1.2") || l.contains("TLSv1.3")),
            "TLS 1.2 or 1.3 only: {sessions:#?}"
        );
    }
}

/// turnpike's counters after a uclient run: the connections were streams, the messages relayed.
fn assert_relayed_over_streams(shutdown: &str, connections: u64, messages: u64) {
    let c = stream_counters(shutdown);
    assert!(
        c.accepted >= connections,
        "expected at least {connections} accepted streams: {c:?} in {shutdown}"
    );
    let to_peer = counter(shutdown, "to_peer").expect("to_peer");
    let to_client = counter(shutdown, "to_client").expect("to_client");
    assert!(
        to_peer >= messages && to_client >= messages,
        "turnpike relayed too little for {messages} messages: {shutdown}"
    );
}

fn uclient_turnpike(stream: Stream, send_indications: bool) {
    let pki = Pki::new();
    let relay = Relay::turnpike(Some(&pki.good), &[]);
    let r = uclient_stream(&relay, stream, send_indications);
    let shutdown = relay.stop().unwrap();
    assert_uclient_clean(&r, stream);
    assert_relayed_over_streams(&shutdown, 10, r.sent);
}

fn uclient_coturn(stream: Stream, send_indications: bool) {
    let pki = Pki::new();
    let relay = Relay::coturn(Some(&pki.good));
    let r = uclient_stream(&relay, stream, send_indications);
    relay.stop();
    assert_uclient_clean(&r, stream);
}

#[test]
fn uclient_tcp_channels() {
    uclient_turnpike(Stream::Tcp, false);
}

#[test]
fn uclient_tcp_send_indications() {
    uclient_turnpike(Stream::Tcp, true);
}

#[test]
fn uclient_tls_channels() {
    uclient_turnpike(Stream::Tls, false);
}

#[test]
fn uclient_tls_send_indications() {
    uclient_turnpike(Stream::Tls, true);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_uclient_tcp_channels() {
    uclient_coturn(Stream::Tcp, false);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_uclient_tcp_send_indications() {
    uclient_coturn(Stream::Tcp, true);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_uclient_tls_channels() {
    uclient_coturn(Stream::Tls, false);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_uclient_tls_send_indications() {
    uclient_coturn(Stream::Tls, true);
}

// ---------------------------------------------------------------------------------------------
// aioice

const AIOICE_COUNT: &str = "50";

/// Runs tests/clients/aioice_turn.py; (success, stdout, stderr).
fn aioice(host: &str, port: u16, transport: &[&str]) -> (bool, String, String) {
    require("python3");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/aioice_turn.py");
    let port = port.to_string();
    let out = Command::new("timeout")
        .args(["60", "python3", script, host, &port, USER, PASSWORD, AIOICE_COUNT])
        .args(transport)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("aioice {transport:?}: {stdout}");
    (out.status.success(), stdout, stderr)
}

fn assert_aioice_ok(ok: bool, stdout: &str, stderr: &str) {
    assert!(ok, "aioice client failed:\nstdout: {stdout}\nstderr: {stderr}");
    for want in [
        "\"send_data\": {\"sent\": 50, \"received\": 50",
        "\"channel\": {\"sent\": 50, \"received\": 50",
    ] {
        assert!(stdout.contains(want), "want {want} in {stdout}");
    }
}

fn aioice_tcp(relay: Relay) {
    let (ok, stdout, stderr) = aioice("127.0.0.1", relay.addr.port(), &["--transport", "tcp"]);
    let shutdown = relay.stop();
    assert_aioice_ok(ok, &stdout, &stderr);
    assert!(stdout.contains("\"transport\": \"tcp\""));
    if let Some(line) = shutdown {
        assert_relayed_over_streams(&line, 1, 100);
    }
}

fn aioice_tls(relay: Relay, pki: &Pki, version: &str) {
    let ca = pki.ca.display().to_string();
    let (ok, stdout, stderr) = aioice(
        "localhost",
        relay.tls().port(),
        &["--transport", "tls", "--ca", &ca, "--tls-version", version],
    );
    let shutdown = relay.stop();
    assert_aioice_ok(ok, &stdout, &stderr);
    let want = format!("\"tls\": {{\"version\": \"TLSv{version}\", \"alpn\": \"stun.turn\"");
    assert!(
        stdout.contains(&want),
        "want {want} (ALPN stun.turn, RFC 7443) in {stdout}"
    );
    if let Some(line) = shutdown {
        assert_relayed_over_streams(&line, 1, 100);
    }
}

/// aioice refuses a server whose certificate (signed by the trusted CA) names another host.
fn aioice_tls_wrong_name(relay: Relay, pki: &Pki) {
    let ca = pki.ca.display().to_string();
    let (ok, stdout, stderr) = aioice("localhost", relay.tls().port(), &["--transport", "tls", "--ca", &ca]);
    relay.stop();
    assert!(
        !ok,
        "aioice accepted a certificate for wrong.example as localhost: {stdout}"
    );
    assert!(
        stderr.contains("CERTIFICATE_VERIFY_FAILED") && stderr.contains("Hostname mismatch"),
        "want a hostname verification failure, got:\n{stderr}"
    );
}

#[test]
fn aioice_tcp_send_data_and_channel() {
    aioice_tcp(Relay::turnpike(None, &[]));
}

#[test]
fn aioice_tls12_send_data_and_channel() {
    let pki = Pki::new();
    aioice_tls(Relay::turnpike(Some(&pki.good), &[]), &pki, "1.2");
}

#[test]
fn aioice_tls13_send_data_and_channel() {
    let pki = Pki::new();
    aioice_tls(Relay::turnpike(Some(&pki.good), &[]), &pki, "1.3");
}

#[test]
fn aioice_tls_wrong_name_is_refused() {
    let pki = Pki::new();
    aioice_tls_wrong_name(Relay::turnpike(Some(&pki.wrong), &[]), &pki);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_aioice_tcp() {
    aioice_tcp(Relay::coturn(None));
}

/// coturn 4.6.1 as packaged by Debian 12 does not negotiate TLS 1.3 (handshake failure), so
/// only the TLS 1.2 twin exists.
#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_aioice_tls12() {
    let pki = Pki::new();
    aioice_tls(Relay::coturn(Some(&pki.good)), &pki, "1.2");
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_aioice_tls_wrong_name() {
    let pki = Pki::new();
    aioice_tls_wrong_name(Relay::coturn(Some(&pki.wrong)), &pki);
}

// ---------------------------------------------------------------------------------------------
// openssl s_client: versions, chain, ALPN

/// `openssl s_client` against `addr` as `name`, trusting only the test CA; (success, output).
fn s_client(addr: SocketAddr, pki: &Pki, name: &str, extra: &[&str]) -> (bool, String) {
    // An IP address is checked against the certificate's IP SANs and sent without SNI.
    let check: Vec<&str> = if name.parse::<std::net::IpAddr>().is_ok() {
        vec!["-noservername", "-verify_ip", name]
    } else {
        vec!["-servername", name, "-verify_hostname", name]
    };
    let ca = pki.ca.display().to_string();
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &addr.to_string()])
        .args(&check)
        .args(["-CAfile", &ca, "-verify_return_error"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn tls_versions_and_alpn(relay: Relay, pki: &Pki, versions: &[&str]) {
    for v in versions {
        let (ok, out) = s_client(
            relay.tls(),
            pki,
            "localhost",
            &[&format!("-tls{v}"), "-alpn", "stun.turn"],
        );
        assert!(ok, "TLS {v} handshake failed:\n{out}");
        let dotted = v.replace('_', ".");
        // "New, TLSv1.3, Cipher is ..." (the SSL-Session block may be missing under TLS 1.3).
        assert!(
            out.contains(&format!("New, TLSv{dotted}, Cipher is")),
            "want TLS {dotted}:\n{out}"
        );
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "chain does not verify:\n{out}"
        );
        assert!(
            out.contains("ALPN protocol: stun.turn"),
            "ALPN stun.turn not selected:\n{out}"
        );
    }
    // Without ALPN the handshake works too (RFC 7443: ALPN is optional for the client).
    let (ok, out) = s_client(relay.tls(), pki, "127.0.0.1", &[]);
    assert!(ok, "handshake without ALPN, by IP, failed:\n{out}");
    relay.stop();
}

#[test]
fn tls_handshake_versions_chain_and_alpn() {
    let pki = Pki::new();
    tls_versions_and_alpn(Relay::turnpike(Some(&pki.good), &[]), &pki, &["1_2", "1_3"]);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_tls_handshake_chain_and_alpn() {
    let pki = Pki::new();
    tls_versions_and_alpn(Relay::coturn(Some(&pki.good)), &pki, &["1_2"]);
}

// ---------------------------------------------------------------------------------------------
// Chromium

const BROWSER_MESSAGES: u64 = 50;

/// relay_test.js through `turn` (HOST:PORT) over `transport`; (exit success, SUMMARY, stdout).
fn run_chromium(
    turn: &str,
    transport: &str,
    ca: Option<&std::path::Path>,
    timeout_ms: u32,
) -> (bool, std::collections::HashMap<String, String>, String) {
    require_browser();
    if ca.is_some() {
        require("certutil");
    }
    let count = BROWSER_MESSAGES.to_string();
    let timeout = timeout_ms.to_string();
    let mut args = vec![
        "60".to_string(),
        "node".into(),
        "relay_test.js".into(),
        "--turn".into(),
        turn.into(),
        "--transport".into(),
        transport.into(),
        "--count".into(),
        count,
        "--timeout-ms".into(),
        timeout,
        "--user".into(),
        USER.into(),
        "--password".into(),
        PASSWORD.into(),
    ];
    if let Some(ca) = ca {
        args.extend(["--ca".to_string(), ca.display().to_string()]);
    }
    let out = Command::new("timeout")
        .args(&args)
        .current_dir(browser_dir())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("relay_test.js stdout:\n{stdout}");
    let s = if stdout.contains("SUMMARY ") {
        summary(&stdout)
    } else {
        panic!(
            "relay_test.js printed no SUMMARY ({}):\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        )
    };
    (out.status.success(), s, stdout + &stderr)
}

fn chromium_relays(relay: Relay, turn: String, transport: &str, ca: Option<&std::path::Path>) {
    let (ok, s, output) = run_chromium(&turn, transport, ca, 20000);
    let shutdown = relay.stop();
    let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
    assert!(ok, "the browser test failed:\n{output}");
    assert_eq!(get("opened"), "true", "the data channel did not open");
    assert_eq!(
        get("received"),
        BROWSER_MESSAGES.to_string(),
        "not every message came back"
    );
    for side in ["a_local", "a_remote", "b_local", "b_remote"] {
        assert!(
            get(side).starts_with("relay:127.0.0.1:"),
            "{side} of the selected pair is {} (want a relay candidate on 127.0.0.1)",
            get(side)
        );
    }
    // Each side's remote is one of the other side's relay candidates (Chromium may gather two
    // relay candidates per connection for a turns: URL naming localhost, and the two sides may
    // then report different pairs, so the pairs need not be mirror images).
    for (side, other) in [("a", "b"), ("b", "a")] {
        let remote_port = get(&format!("{side}_remote"))
            .rsplit(':')
            .next()
            .unwrap_or("")
            .to_string();
        let others = get(&format!("{other}_relay_ports"));
        assert!(
            others.split(',').any(|p| p == remote_port),
            "{side}'s remote port {remote_port} is not among {other}'s relay candidates {others}"
        );
    }
    // The relay candidates were gathered over the transport asked for, from this server's URL.
    let (scheme, protocol) = match transport {
        "tls" => ("turns:", "tls"),
        _ => ("turn:", "tcp"),
    };
    for side in ["a", "b"] {
        assert_eq!(
            get(&format!("{side}_relay_protocol")),
            protocol,
            "{side}'s relayProtocol"
        );
        let url = get(&format!("{side}_url"));
        assert!(
            url.starts_with(scheme) && url.contains(&turn) && url.ends_with("transport=tcp"),
            "{side}_url is {url} (want {scheme}{turn}?transport=tcp)"
        );
    }
    if let Some(line) = shutdown {
        // Two connections (one per RTCPeerConnection) carried every message and echo.
        assert_relayed_over_streams(&line, 2, 2 * BROWSER_MESSAGES);
    }
}

/// turns: to a server whose certificate (signed by the trusted CA) is for wrong.example: the
/// browser must not use it. As a control, the server's TLS works for the name it has.
fn chromium_wrong_name(relay: Relay, pki: &Pki) {
    let turn = format!("localhost:{}", relay.tls().port());
    let (control_ok, control) = s_client(relay.tls(), pki, "wrong.example", &[]);
    let (ok, s, output) = run_chromium(&turn, "tls", Some(&pki.ca), 8000);
    let shutdown = relay.stop();
    assert!(
        control_ok,
        "control: the server's TLS does not work even for wrong.example:\n{control}"
    );
    let get = |k: &str| s.get(k).map(String::as_str).unwrap_or("");
    assert!(
        !ok,
        "the browser relayed through a server with a certificate for the wrong name:\n{output}"
    );
    assert_eq!(get("opened"), "false");
    assert_eq!(
        get("a_relay_candidates"),
        "0",
        "a relay candidate from the wrong-name server"
    );
    assert_eq!(
        get("b_relay_candidates"),
        "0",
        "a relay candidate from the wrong-name server"
    );
    assert_ne!(
        get("candidate_errors"),
        "0",
        "Chromium reported no candidate error:\n{output}"
    );
    if let Some(line) = shutdown {
        // Chromium did reach the TLS port (and gave up in the handshake).
        assert!(stream_counters(&line).accepted >= 1, "Chromium never connected: {line}");
        assert_eq!(counter(&line, "to_peer"), Some(0), "nothing may be relayed: {line}");
    }
}

#[test]
fn chromium_turn_tcp() {
    let relay = Relay::turnpike(None, &[]);
    let turn = relay.addr.to_string();
    chromium_relays(relay, turn, "tcp", None);
}

#[test]
fn chromium_turns_tls_with_trusted_ca() {
    let pki = Pki::new();
    let relay = Relay::turnpike(Some(&pki.good), &[]);
    let turn = format!("localhost:{}", relay.tls().port());
    chromium_relays(relay, turn, "tls", Some(&pki.ca));
}

#[test]
fn chromium_turns_wrong_name_fails() {
    let pki = Pki::new();
    chromium_wrong_name(Relay::turnpike(Some(&pki.wrong), &[]), &pki);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_chromium_turn_tcp() {
    let relay = Relay::coturn(None);
    let turn = relay.addr.to_string();
    chromium_relays(relay, turn, "tcp", None);
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_chromium_turns_tls_with_trusted_ca() {
    let pki = Pki::new();
    let relay = Relay::coturn(Some(&pki.good));
    let turn = format!("localhost:{}", relay.tls().port());
    chromium_relays(relay, turn, "tls", Some(&pki.ca));
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_chromium_turns_wrong_name_fails() {
    let pki = Pki::new();
    chromium_wrong_name(Relay::coturn(Some(&pki.wrong)), &pki);
}

// ---------------------------------------------------------------------------------------------
// turnpike's own codec over TCP: framing and the connection as the 5-tuple

/// Three Binding requests in one write get three responses in order; one request split over
/// two writes (100 ms apart) and one sent a byte at a time are answered.
fn framing_pipelined_and_split(relay: Relay) {
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let tids: Vec<[u8; 12]> = (1..=3u8).map(|i| [i; 12]).collect();
    let batch: Vec<u8> = tids.iter().flat_map(|t| binding_request(*t)).collect();
    s.write_all(&batch).unwrap();
    for t in &tids {
        let m = match read_frame(&mut s) {
            Some(Frame::Stun(m)) => m,
            other => panic!("want a STUN response, got {other:?}"),
        };
        assert_eq!(&m[8..20], t, "responses in request order");
        assert_eq!(decode(&m).class(), Class::Success);
    }
    let split = binding_request([9; 12]);
    s.write_all(&split[..7]).unwrap();
    thread::sleep(Duration::from_millis(100));
    s.write_all(&split[7..]).unwrap();
    assert!(
        read_response(&mut s, &[9; 12], 4).is_some(),
        "split request not answered"
    );
    for b in binding_request([10; 12]) {
        s.write_all(&[b]).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        read_response(&mut s, &[10; 12], 4).is_some(),
        "byte-by-byte request not answered"
    );
    binding_on(&mut s, 11).expect("XOR-MAPPED-ADDRESS is the connection's address");
    drop(s);
    if let Some(shutdown) = relay.stop() {
        let c = stream_counters(&shutdown);
        assert!(c.accepted >= 1, "{shutdown}");
        // 3 + 1 + 1 + 1 Binding requests.
        assert!(
            c.messages >= 6,
            "stream_messages counts every message: {c:?} in {shutdown}"
        );
    }
}

#[test]
fn tcp_framing_pipelined_and_split() {
    framing_pipelined_and_split(Relay::turnpike(None, &[]));
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_tcp_framing_pipelined_and_split() {
    framing_pipelined_and_split(Relay::coturn(None));
}

/// Allocate over TCP; relay to a UDP peer by Send indication and by channel; the server pads
/// ChannelData to 4 bytes on the stream (RFC 8656 §11.5) and accepts a padded one; the
/// allocation belongs to the connection (a second Allocate on it gets 437, another connection
/// gets an allocation of its own).
fn allocation_relays_with_padded_channel_data(relay: Relay) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = StreamClient::connect(relay.addr);

    let a = c.request(Method::Allocate, &[Attribute::RequestedTransport(17)]);
    assert_eq!(a.class(), Class::Success, "Allocate over TCP: {:?}", a.error_code());
    let relayed = a.addr(kind::XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS");
    assert_eq!(a.addr(kind::XOR_MAPPED_ADDRESS), Some(c.stream.local_addr().unwrap()));
    let again = c.request(Method::Allocate, &[Attribute::RequestedTransport(17)]);
    assert_eq!(
        again.error_code(),
        Some(437),
        "a second Allocate on the same connection"
    );

    // Send indication out, Data indication back (over the stream).
    let p = c.request(Method::CreatePermission, &[Attribute::XorPeerAddress(peer_addr)]);
    assert_eq!(p.class(), Class::Success);
    let mut ind = Vec::new();
    MessageBuilder::new(
        &mut ind,
        MessageType::new(Method::Send, Class::Indication),
        TransactionId([0x31; 12]),
    )
    .attribute(&Attribute::XorPeerAddress(peer_addr))
    .attribute(&Attribute::Data(b"hello"))
    .fingerprint();
    c.stream.write_all(&ind).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = peer
        .recv_from(&mut buf)
        .expect("the peer got the Send indication's data");
    assert_eq!((&buf[..n], from), (&b"hello"[..], relayed));
    peer.send_to(b"data-back", relayed).unwrap();
    let m = match read_frame(&mut c.stream) {
        Some(Frame::Stun(m)) => m,
        other => panic!("want a Data indication, got {other:?}"),
    };
    let d = decode(&m);
    assert_eq!((d.method(), d.class()), (Method::Data, Class::Indication));
    assert!(matches!(d.get(kind::DATA), Some(Ok(Attribute::Data(b"data-back")))));

    // Channel: 5-byte payloads both ways; the server's ChannelData carries 3 padding bytes.
    let b = c.request(
        Method::ChannelBind,
        &[Attribute::ChannelNumber(0x4000), Attribute::XorPeerAddress(peer_addr)],
    );
    assert_eq!(b.class(), Class::Success);
    c.send_channel_data(0x4000, b"five!");
    let (n, from) = peer.recv_from(&mut buf).expect("the peer got the ChannelData payload");
    assert_eq!((&buf[..n], from), (&b"five!"[..], relayed));
    peer.send_to(b"back!", relayed).unwrap();
    let mut raw = [0u8; 12];
    std::io::Read::read_exact(&mut c.stream, &mut raw).expect("ChannelData of 4 + 5 + 3 bytes");
    assert_eq!(&raw[..9], b"\x40\x00\x00\x05back!", "ChannelData header and payload");
    // The next frame starts right after the 3 padding bytes: a Binding answers in step.
    binding_on(&mut c.stream, 0x42).expect("framing resumes after the padding");
    peer.send_to(b"again", relayed).unwrap();
    match read_frame(&mut c.stream) {
        Some(Frame::ChannelData(0x4000, p)) => assert_eq!(p, b"again"),
        other => panic!("want ChannelData on 0x4000, got {other:?}"),
    }

    // Another connection is another 5-tuple: an allocation of its own.
    let mut c2 = StreamClient::connect(relay.addr);
    let a2 = c2.request(Method::Allocate, &[Attribute::RequestedTransport(17)]);
    assert_eq!(a2.class(), Class::Success);
    assert_ne!(a2.addr(kind::XOR_RELAYED_ADDRESS), Some(relayed));
    drop((c, c2));
    if let Some(shutdown) = relay.stop() {
        let counters = stream_counters(&shutdown);
        assert!(
            counters.accepted >= 2 && counters.closed >= 2,
            "{counters:?}: {shutdown}"
        );
    }
}

#[test]
fn tcp_allocation_relays_with_padded_channel_data() {
    allocation_relays_with_padded_channel_data(Relay::turnpike(None, &[]));
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_tcp_allocation_relays_with_padded_channel_data() {
    allocation_relays_with_padded_channel_data(Relay::coturn(None));
}

/// `--no-tcp`: the port takes UDP only.
#[test]
fn no_tcp_flag_turns_tcp_off() {
    let port = free_udp_tcp_port();
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--relay-ip",
        "127.0.0.1",
        "--user",
        &format!("{USER}:{PASSWORD}"),
        "--no-tcp",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = crate::harness::Server::start_with(&args);
    let mut c = Client::new(server.addr, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(
        c.request(Method::Binding, &[]).class(),
        Class::Success,
        "UDP still answers"
    );
    let refused = TcpStream::connect_timeout(&server.addr, Duration::from_secs(2));
    assert!(refused.is_err(), "--no-tcp, yet TCP {} accepts", server.addr);
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// Hostile streams

/// Sends `bytes` on a new connection to `addr` and returns what became of it within `wait`.
fn send_and_watch(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Fate {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    let t0 = Instant::now();
    if !bytes.is_empty() {
        // The server may close before everything is written (RST): that is a close too.
        if s.write_all(bytes).is_err() {
            return Fate::Closed {
                after: t0.elapsed(),
                bytes: 0,
            };
        }
    }
    fate(&mut s, t0, wait)
}

/// Garbage on the plain port closes the connection at once (long before the idle timeout), the
/// server keeps answering others, and it counts the drops.
#[test]
fn hostile_garbage_bytes_close_the_connection() {
    let relay = Relay::turnpike(None, &["--stream-idle-timeout", "30"]);
    let cases: [(&str, Vec<u8>); 4] = [
        ("0xFF bytes", vec![0xff; 64]),
        // 'GE' reads as channel 0x4745 and 'T ' as a length of 21,536: over the frame limit.
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()),
        // STUN's first bits, no magic cookie (the whole announced frame is sent, so a framer
        // that checks only complete frames sees it too).
        ("a TLS ClientHello on the plain port", {
            let mut v = vec![0x16, 0x03, 0x01, 0x01, 0x2c];
            v.extend((0..320u32).map(|i| (i * 37) as u8));
            v
        }),
        // First bits 10: neither STUN (00) nor ChannelData (01).
        ("an RTP-like packet", {
            let mut v = vec![0x80, 0x60, 0x00, 0x01];
            v.extend([0x11; 60]);
            v
        }),
    ];
    for (what, bytes) in &cases {
        let f = send_and_watch(relay.addr, bytes, Duration::from_secs(5));
        assert!(
            matches!(f, Fate::Closed { after, .. } if after < Duration::from_secs(3)),
            "{what}: want the connection closed within 3 s (idle timeout is 30 s), got {f:?}"
        );
    }
    binding_over_tcp(relay.addr).expect("a well-behaved connection is still answered");
    let shutdown = relay.stop().unwrap();
    let c = stream_counters(&shutdown);
    assert!(
        c.close(close::BAD_FRAME) >= 3
            && c.close(close::BAD_FRAME) + c.close(close::FRAME_TOO_LONG) >= cases.len() as u64,
        "each garbage connection counted: {c:?} in {shutdown}"
    );
}

/// Length fields of 65,535 (ChannelData and STUN) and of 65,532 (STUN) exceed the default
/// 8,192-byte frame limit: closed at once, without waiting for the body. A frame just under the
/// limit does not close the connection, and the framing resumes after it.
#[test]
fn hostile_length_65535_closes_the_connection() {
    let relay = Relay::turnpike(None, &["--stream-idle-timeout", "30"]);
    let stun = |len: u16| {
        let mut v = vec![0x00, 0x01];
        v.extend(len.to_be_bytes());
        v.extend([0x21, 0x12, 0xa4, 0x42]);
        v.extend([0x61; 12]);
        v.extend([0u8; 100]);
        v
    };
    let mut cd = vec![0x40, 0x00, 0xff, 0xff];
    cd.extend([0u8; 100]);
    for (what, bytes) in [
        ("ChannelData length 65535", cd),
        ("STUN length 65535", stun(65535)),
        ("STUN length 65532", stun(65532)),
    ] {
        let f = send_and_watch(relay.addr, &bytes, Duration::from_secs(5));
        assert!(
            matches!(f, Fate::Closed { after, .. } if after < Duration::from_secs(3)),
            "{what}: want the connection closed within 3 s, got {f:?}"
        );
    }
    // A Binding request with a comprehension-optional attribute making it 8,000 bytes long.
    let mut s = TcpStream::connect(relay.addr).unwrap();
    let mut big = binding_request([0x62; 12]);
    let body = 8000 - 20 - 4;
    big.extend(0x8fffu16.to_be_bytes());
    big.extend((body as u16).to_be_bytes());
    big.extend(vec![0x55; body]);
    let len = (big.len() - 20) as u16;
    big[2..4].copy_from_slice(&len.to_be_bytes());
    s.write_all(&big).unwrap();
    binding_on(&mut s, 0x63).expect("an 8,000-byte frame (under --max-stream-frame 8192) keeps the connection");
    drop(s);
    let shutdown = relay.stop().unwrap();
    let c = stream_counters(&shutdown);
    assert!(
        c.close(close::FRAME_TOO_LONG) >= 2 && c.close(close::FRAME_TOO_LONG) + c.close(close::BAD_FRAME) >= 3,
        "{c:?} in {shutdown}"
    );
}

/// `--max-stream-frame` is honoured when set: a 2,000-byte frame closes under a 1,024 limit.
#[test]
fn hostile_max_stream_frame_flag() {
    let relay = Relay::turnpike(None, &["--stream-idle-timeout", "30", "--max-stream-frame", "1024"]);
    let mut cd = vec![0x40, 0x00];
    cd.extend(2000u16.to_be_bytes());
    cd.extend([0u8; 2000]);
    let f = send_and_watch(relay.addr, &cd, Duration::from_secs(5));
    assert!(
        matches!(f, Fate::Closed { after, .. } if after < Duration::from_secs(3)),
        "want closed, got {f:?}"
    );
    binding_over_tcp(relay.addr).expect("small frames are still answered");
    let shutdown = relay.stop().unwrap();
    assert_eq!(stream_counters(&shutdown).close(close::FRAME_TOO_LONG), 1, "{shutdown}");
}

/// `--stream-idle-timeout 2`: a connection that sends nothing, or a partial header, or stops
/// after one Binding without allocating, is closed after about 2 s (not before 1 s, and within
/// 10 s); a connection that holds an allocation stays open past it.
#[test]
fn hostile_half_open_closed_by_idle_timeout() {
    let relay = Relay::turnpike(None, &["--stream-idle-timeout", "2"]);
    let mut with_allocation = StreamClient::connect(relay.addr);
    let a = with_allocation.request(Method::Allocate, &[Attribute::RequestedTransport(17)]);
    assert_eq!(a.class(), Class::Success);

    let t0 = Instant::now();
    let mut silent = TcpStream::connect(relay.addr).unwrap();
    let mut partial = TcpStream::connect(relay.addr).unwrap();
    partial.write_all(&[0x00, 0x01, 0x00]).unwrap();
    let mut one_binding = TcpStream::connect(relay.addr).unwrap();
    binding_on(&mut one_binding, 0x71).unwrap();
    for (what, s) in [
        ("silent", &mut silent),
        ("partial header", &mut partial),
        ("one Binding then silence", &mut one_binding),
    ] {
        let f = fate(s, t0, Duration::from_secs(10));
        match f {
            Fate::Closed { after, .. } => assert!(
                after >= Duration::from_secs(1),
                "{what}: closed after {after:?}, before the 2 s idle timeout"
            ),
            Fate::Open { .. } => panic!("{what}: still open 10 s after connecting (--stream-idle-timeout 2)"),
        }
    }
    assert!(t0.elapsed() >= Duration::from_secs(2));
    let r = with_allocation.request(Method::Refresh, &[Attribute::Lifetime(600)]);
    assert_eq!(
        r.class(),
        Class::Success,
        "a connection with an allocation outlives the idle timeout"
    );
    drop(with_allocation);
    let shutdown = relay.stop().unwrap();
    let c = stream_counters(&shutdown);
    assert!(c.close(close::IDLE_TIMEOUT) >= 3, "{c:?} in {shutdown}");
}

/// On the TLS port: a ClientHello record of garbage and non-TLS bytes close the connection at
/// once; a silent connection is closed by `--tls-handshake-timeout 2`; a real handshake still
/// works afterwards.
#[test]
fn hostile_tls_garbage_client_hello_closes() {
    let pki = Pki::new();
    let relay = Relay::turnpike(
        Some(&pki.good),
        &["--tls-handshake-timeout", "2", "--stream-idle-timeout", "30"],
    );
    let tls = relay.tls();
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x80];
    hello.extend((0..128u32).map(|i| (i * 97 + 13) as u8));
    for (what, bytes) in [("a garbage ClientHello", hello), ("0xFF bytes", vec![0xff; 64])] {
        let f = send_and_watch(tls, &bytes, Duration::from_secs(5));
        assert!(
            matches!(f, Fate::Closed { after, .. } if after < Duration::from_secs(2)),
            "{what}: want closed at once, got {f:?}"
        );
    }
    let f = send_and_watch(tls, &[], Duration::from_secs(10));
    assert!(
        matches!(f, Fate::Closed { after, .. } if after >= Duration::from_secs(1)),
        "a silent TLS connection: want closed by the 2 s handshake timeout, got {f:?}"
    );
    let (ok, out) = s_client(tls, &pki, "localhost", &["-alpn", "stun.turn"]);
    assert!(ok, "a real TLS client after the garbage:\n{out}");
    let shutdown = relay.stop().unwrap();
    let c = stream_counters(&shutdown);
    assert!(
        c.close(close::TLS_ERROR) >= 2 && c.close(close::HANDSHAKE_TIMEOUT) >= 1,
        "{c:?} in {shutdown}"
    );
}

/// A UDP client relays 20 datagrams through a channel to a UDP echo peer.
fn udp_client_relays(server: SocketAddr) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let echo = peer.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    echo.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let h = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let mut c = Client::new(server, USER, PASSWORD, PasswordAlgorithm::Md5);
    assert_eq!(c.allocate().class(), Class::Success, "UDP Allocate");
    assert_eq!(c.channel_bind(0x4001, peer_addr).class(), Class::Success);
    let mut back = 0;
    for i in 0..20u32 {
        c.send_channel_data(0x4001, format!("udp-{i}").as_bytes());
        if let Some((p, ch)) = c.recv_data() {
            back += (p == format!("udp-{i}").as_bytes() && ch == Some(0x4001)) as u32;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(back, 20, "every UDP datagram came back through the channel");
}

/// Thousands of idle connections (5,000 when the file limit leaves room, as issue 11 asks, else
/// fewer, at least 1,000) with large caps: all stay open, a UDP client still relays and a new
/// TCP connection is answered meanwhile, memory per idle connection is bounded, and closing them
/// gives the file descriptors back.
#[test]
fn hostile_many_idle_connections() {
    let relay = Relay::turnpike(
        None,
        &[
            "--max-connections",
            "20000",
            "--max-connections-per-ip",
            "20000",
            "--stream-idle-timeout",
            "120",
        ],
    );
    many_idle_connections(relay);
}

/// The client side of `hostile_many_idle_connections` against coturn (no stream caps there).
#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_many_idle_connections() {
    many_idle_connections(Relay::coturn(None));
}

fn many_idle_connections(relay: Relay) {
    let limit = nofile_limit();
    let n = 5000usize.min(limit.saturating_sub(1000) as usize);
    assert!(n >= 1000, "RLIMIT_NOFILE {limit} leaves no room for 1,000 connections");
    let pid = relay.pid();
    thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        match TcpStream::connect_timeout(&relay.addr, Duration::from_secs(5)) {
            Ok(s) => conns.push(s),
            Err(e) => panic!("connection {i} of {n}: {e}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "connecting {n} took over 60 s");
    }
    eprintln!("{n} connections in {:?}", t0.elapsed());
    // Wait (bounded) until the server holds them all.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fd_count(pid) < fds0 + n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let (fds1, rss1) = (fd_count(pid), rss_kib(pid));
    eprintln!("server: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB");
    assert!(fds1 >= fds0 + n, "the server holds {} of {n} connections", fds1 - fds0);

    udp_client_relays(relay.addr);
    binding_over_tcp(relay.addr).expect("a new TCP connection is answered beside the idle ones");
    let open = conns.iter().filter(|s| !is_closed_now(s)).count();
    assert_eq!(open, n, "idle connections closed under large caps");
    let per_conn = (rss1.saturating_sub(rss0)) * 1024 / n as u64;
    eprintln!("{per_conn} bytes of RSS per idle connection");
    assert!(per_conn < 64 * 1024, "{per_conn} B of RSS per idle connection");

    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fd_count(pid) > fds0 + 16 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let fds2 = fd_count(pid);
    assert!(
        fds2 <= fds0 + 16,
        "fds {fds0} -> {fds1} -> {fds2}: closed connections not released"
    );
    if let Some(shutdown) = relay.stop() {
        let c = stream_counters(&shutdown);
        assert!(
            c.accepted >= n as u64 && c.closed >= n as u64,
            "{c:?} for {n} connections in {shutdown}"
        );
        assert_eq!(c.drops(), 0, "idle connections under large caps are not dropped: {c:?}");
    }
}

/// A TCP connection from `local` (a 127.0.0.0/8 address) to `addr`.
fn connect_from(local: &str, addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{local}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock.connect_timeout(&addr.into(), Duration::from_secs(3)).unwrap();
    // socket2's connect_timeout leaves the socket non-blocking.
    sock.set_nonblocking(false).unwrap();
    sock.into()
}

/// The `(i+1)`-th connection over a cap is closed (or refused) without an answer.
fn assert_refused(mut s: TcpStream, what: &str) {
    let t0 = Instant::now();
    let _ = s.write_all(&binding_request([0x99; 12]));
    let f = fate(&mut s, t0, Duration::from_secs(5));
    assert!(
        matches!(f, Fate::Closed { bytes: 0, .. }),
        "{what}: want closed without an answer, got {f:?}"
    );
}

/// `--max-connections-per-ip 10`: ten connections from 127.0.0.1 are answered, the eleventh is
/// closed, one from 127.0.0.2 is answered (the cap is per IP), and closing one of the ten makes
/// room again.
#[test]
fn hostile_per_ip_cap() {
    let relay = Relay::turnpike(None, &["--max-connections-per-ip", "10", "--stream-idle-timeout", "60"]);
    let mut ten: Vec<TcpStream> = (0..10).map(|_| connect_from("127.0.0.1", relay.addr)).collect();
    for (i, s) in ten.iter_mut().enumerate() {
        binding_on(s, i as u8).unwrap_or_else(|e| panic!("connection {i} of 10: {e}"));
    }
    assert_refused(connect_from("127.0.0.1", relay.addr), "the 11th from 127.0.0.1");
    let mut other = connect_from("127.0.0.2", relay.addr);
    binding_on(&mut other, 0x20).expect("127.0.0.2 has a cap of its own");
    drop(ten.pop());
    // The server notices the close; retry (bounded) until it has room again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ok = Err(String::from("not tried"));
    while Instant::now() < deadline {
        let mut s = connect_from("127.0.0.1", relay.addr);
        ok = binding_on(&mut s, 0x21);
        if ok.is_ok() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    ok.expect("a closed connection frees its place under the per-IP cap");
    drop((ten, other));
    let shutdown = relay.stop().unwrap();
    let c = stream_counters(&shutdown);
    assert!(
        c.close(close::REFUSED) >= 1,
        "the refused connection is counted: {c:?} in {shutdown}"
    );
}

/// `--max-connections 5` (total): the sixth connection is closed whatever its source, and UDP
/// is not affected.
#[test]
fn hostile_total_connection_cap() {
    let relay = Relay::turnpike(
        None,
        &[
            "--max-connections",
            "5",
            "--max-connections-per-ip",
            "100",
            "--stream-idle-timeout",
            "60",
        ],
    );
    let mut five: Vec<TcpStream> = (0..5)
        .map(|i| connect_from(if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.3" }, relay.addr))
        .collect();
    for (i, s) in five.iter_mut().enumerate() {
        binding_on(s, i as u8).unwrap_or_else(|e| panic!("connection {i} of 5: {e}"));
    }
    assert_refused(connect_from("127.0.0.4", relay.addr), "the 6th connection");
    udp_client_relays(relay.addr);
    drop(five);
    let shutdown = relay.stop().unwrap();
    assert!(stream_counters(&shutdown).close(close::REFUSED) >= 1, "{shutdown}");
}

/// A slow writer under `--stream-idle-timeout 2`: an unauthenticated Allocate sent one byte per
/// 100 ms (2.8 s in all) is either answered (401) or closed, not left hanging.
#[test]
fn hostile_slow_writer() {
    slow_writer(Relay::turnpike(None, &["--stream-idle-timeout", "2"]));
}

#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_slow_writer() {
    slow_writer(Relay::coturn(None));
}

fn slow_writer(relay: Relay) {
    // Allocate with REQUESTED-TRANSPORT UDP, no credentials: 28 bytes.
    let mut req = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    req.extend([0x51; 12]);
    req.extend([0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]);
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_nodelay(true).unwrap();
    let t0 = Instant::now();
    let mut written = 0;
    for b in &req {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        written += 1;
        thread::sleep(Duration::from_millis(100));
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let outcome = if written < req.len() {
        "closed while writing".to_string()
    } else if let Some(m) = read_response(&mut s, &[0x51; 12], 2) {
        format!("answered {:?}", crate::client::Response(m).error_code())
    } else if is_closed_now(&s) {
        "closed".to_string()
    } else {
        "neither answered nor closed within 5 s".to_string()
    };
    eprintln!(
        "slow Allocate ({written} of {} bytes in {:?}): {outcome}",
        req.len(),
        t0.elapsed()
    );
    assert!(
        outcome == "answered Some(401)" || outcome.starts_with("closed"),
        "slow Allocate: {outcome}"
    );
    relay.stop();
}

/// Slowloris: under `--stream-idle-timeout 2`, a 4,000-byte frame dribbled at one byte per
/// 100 ms completes no message within the timeout and is closed (after 1 s, within 10 s).
#[test]
fn hostile_slowloris_frame() {
    let relay = Relay::turnpike(None, &["--stream-idle-timeout", "2"]);
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_nodelay(true).unwrap();
    let t0 = Instant::now();
    let mut frame = vec![0x00, 0x01, 0x0f, 0xa0, 0x21, 0x12, 0xa4, 0x42];
    frame.extend([0x52; 12]);
    frame.extend([0u8; 4000]);
    let mut closed_after = None;
    for b in frame.iter().take(100) {
        if s.write_all(&[*b]).is_err() || is_closed_now(&s) {
            closed_after = Some(t0.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let closed_after = closed_after.unwrap_or_else(|| panic!("a slowloris frame kept its connection 10 s"));
    assert!(closed_after >= Duration::from_secs(1), "closed after {closed_after:?}");
    let shutdown = relay.stop().unwrap();
    assert!(stream_counters(&shutdown).close(close::IDLE_TIMEOUT) >= 1, "{shutdown}");
}

/// The probes above read a close and an open connection correctly: coturn leaves a silent
/// connection open and resets one that sent an HTTP request.
#[test]
#[ignore = "validates the client side against coturn"]
fn coturn_stream_probe_mechanics() {
    let relay = Relay::coturn(None);
    let f = send_and_watch(relay.addr, &[], Duration::from_secs(2));
    assert!(matches!(f, Fate::Open { bytes: 0 }), "{f:?}");
    let f = send_and_watch(relay.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5));
    assert!(f.closed(), "{f:?}");
    binding_over_tcp(relay.addr).expect("coturn answers Binding over TCP");
    let mut c = StreamClient::connect(relay.addr);
    let a = c.request(Method::Allocate, &[Attribute::RequestedTransport(17)]);
    assert_eq!(
        a.class(),
        Class::Success,
        "StreamClient allocates on coturn: {:?}",
        a.error_code()
    );
    relay.stop();
}
