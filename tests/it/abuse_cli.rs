//! Malformed `--allowed-peer-ip` / `--denied-peer-ip` entries (flags or TOML) abort startup
//! with a message naming the flag and the value, before any socket is bound.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs turnpike with `args`; it must exit on its own within 10 s with a failure status.
/// Returns its stderr.
fn startup_fails(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn turnpike");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("turnpike {args:?} is still running: it accepted the configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "turnpike {args:?} exited successfully");
    assert!(!stderr.contains("panicked"), "turnpike {args:?} panicked: {stderr}");
    assert!(
        !stderr.contains("listening on udp"),
        "turnpike {args:?} started listening: {stderr}"
    );
    stderr
}

const BASE: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--relay-ip",
    "127.0.0.1",
    "--user",
    "alice:wonderland",
];

/// Entries that are not an IP range in CIDR notation.
const MALFORMED: &[&str] = &[
    "",
    "nonsense",
    "10.0.0.0/33",
    "10.0.0.0/",
    "10.0.0.0/08",
    "10.0.0.0/-1",
    "10.0.0.0/+8",
    "10.0.0.0/8/8",
    "10.0.0/8",
    "256.0.0.0/8",
    "0x0a000000/8",
    " 10.0.0.0/8",
    "10.0.0.0/8 ",
    "10.0.0.0/8,192.168.0.0/16",
    "10.0.0.0 /8",
    "::1/129",
    "2001:db8::/",
    "2001:db8:::/32",
    "fe80::1%eth0/64",
    "[::1]/128",
    "::ffff:127.0.0.1/200",
    "127.0.0.1:3478",
    "*",
    "localhost",
    "10.0.0.0/4294967304",
];

#[test]
fn malformed_peer_ranges_on_the_command_line_abort_startup() {
    for flag in ["--allowed-peer-ip", "--denied-peer-ip"] {
        for value in MALFORMED {
            let mut args = BASE.to_vec();
            args.extend([flag, value]);
            let stderr = startup_fails(&args);
            assert!(
                stderr.contains(flag),
                "{flag} {value:?}: message without the flag: {stderr}"
            );
            assert!(
                stderr.contains(&format!("{value:?}")),
                "{flag} {value:?}: message without the value: {stderr}"
            );
            assert!(stderr.contains("CIDR"), "{flag} {value:?}: {stderr}");
        }
    }
}

/// One malformed entry among good ones is enough.
#[test]
fn one_malformed_entry_among_valid_ones_aborts_startup() {
    let mut args = BASE.to_vec();
    args.extend([
        "--allowed-peer-ip",
        "127.0.0.0/8",
        "--allowed-peer-ip",
        "10.0.0.0/33",
        "--denied-peer-ip",
        "192.168.0.0/16",
    ]);
    let stderr = startup_fails(&args);
    assert!(stderr.contains("\"10.0.0.0/33\""), "{stderr}");
}

#[test]
fn malformed_peer_ranges_in_the_config_file_abort_startup() {
    let dir = std::env::temp_dir().join(format!("turnpike-abuse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (key, flag) in [
        ("allowed-peer-ip", "--allowed-peer-ip"),
        ("denied-peer-ip", "--denied-peer-ip"),
    ] {
        for value in ["10.0.0.0/33", "nonsense", "fe80::1%eth0/64"] {
            let path = dir.join(format!("{key}.toml"));
            std::fs::write(&path, format!("{key} = [\"127.0.0.0/8\", {value:?}]\n")).unwrap();
            let mut args = BASE.to_vec();
            let p = path.to_str().unwrap().to_string();
            args.extend(["--config", &p]);
            let stderr = startup_fails(&args);
            assert!(stderr.contains(flag), "{key} = {value:?}: {stderr}");
            assert!(stderr.contains(&format!("{value:?}")), "{key} = {value:?}: {stderr}");
        }
        // Not a list at all.
        let path = dir.join("scalar.toml");
        std::fs::write(&path, format!("{key} = 10\n")).unwrap();
        let p = path.to_str().unwrap().to_string();
        let mut args = BASE.to_vec();
        args.extend(["--config", &p]);
        let stderr = startup_fails(&args);
        assert!(stderr.contains(key), "{key} = 10: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Well-formed entries, host bits included, start the server.
#[test]
fn well_formed_peer_ranges_start() {
    let server = crate::harness::Server::start(&[
        "--allowed-peer-ip",
        "10.1.2.3/8",
        "--allowed-peer-ip",
        "::1",
        "--denied-peer-ip",
        "127.0.0.53/32",
        "--denied-peer-ip",
        "2001:db8::/32",
    ]);
    let log = server.stop();
    assert!(log.iter().any(|l| l.contains("shut down")), "clean shutdown: {log:?}");
}
