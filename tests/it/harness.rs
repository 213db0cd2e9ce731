//! Starts the real `turnpike` binary on loopback and stops it on drop.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A running turnpike process.
pub struct Server {
    child: Child,
    /// The listening address it bound.
    pub addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
pub const SECRET: &str = "rest-secret";

impl Server {
    /// Starts turnpike on 127.0.0.1 with an ephemeral port, relaying on 127.0.0.1 and
    /// allowing loopback peers, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--relay-ip".into(),
            "127.0.0.1".into(),
            "--allowed-peer-ip".into(),
            "127.0.0.0/8".into(),
            "--user".into(),
            format!("{USER}:{PASSWORD}"),
            "--static-auth-secret".into(),
            SECRET.into(),
            // The tests run many clients as one user; the default quota (10) has its own test.
            "--user-quota".into(),
            "0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(&args)
    }

    /// Starts turnpike with `args`, waiting for its "listening on udp" line. Unless `args`
    /// is empty (the no-argument test), the words of `TURNPIKE_TEST_SERVER_ARGS` are
    /// appended, so CI runs the whole suite per I/O backend and shard count
    /// (e.g. `--io-backend mmsg --shards 1`).
    pub fn start_with(args: &[String]) -> Server {
        let mut args = args.to_vec();
        if !args.is_empty() {
            if let Ok(extra) = std::env::var("TURNPIKE_TEST_SERVER_ARGS") {
                args.extend(extra.split_whitespace().map(String::from));
            }
        }
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_turnpike")).args(&args))
    }

    /// Starts turnpike with `args` inside the network namespace `netns` (`ip netns exec`).
    pub fn start_in_netns(netns: &str, args: &[String]) -> Server {
        Self::spawn(
            Command::new("ip")
                .args(["netns", "exec", netns, env!("CARGO_BIN_EXE_turnpike")])
                .args(args),
        )
    }

    fn spawn(command: &mut Command) -> Server {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn turnpike");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut seen = Vec::new();
        while addr.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("turnpike did not start ({e}); its log:\n{}", seen.join("\n")));
            seen.push(line.clone());
            if let Some(rest) = line.split("listening on udp ").nth(1) {
                let first = rest.split([' ', ',']).next().unwrap();
                addr = Some(first.parse().expect("listen address"));
            }
        }
        Server {
            child,
            addr: addr.unwrap(),
            log: rx,
        }
    }

    /// The process ID (for `/proc/<pid>/status` in the resource tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a log line containing `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Sends `signal` (e.g. "USR1") to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits up to `timeout` for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM and waits for the exit; returns the remaining log.
    pub fn stop(mut self) -> Vec<String> {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "turnpike exited with {status}");
        let mut lines = Vec::new();
        while let Ok(l) = self.log.recv_timeout(Duration::from_secs(2)) {
            lines.push(l);
        }
        lines
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1 for UDP and for TCP (turnpike listens
/// on both by default).
pub fn free_udp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether a program is on PATH; tests that need it fail loudly when it is missing (the
/// README test command installs it).
pub fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: run the README test command (scripts/test.sh) which installs it"
    );
}

/// A network namespace of the test's own with a veth pair inside it (v0, v1: this kernel has
/// no dummy module), `lo` up and `addrs` (CIDR; IPv6 ones without duplicate address detection)
/// on v0; deleted on drop. Its name is `ns.0`.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str, addrs: &[&str]) -> Netns {
        let ns = Netns(name.to_string());
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ip(&["-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        for a in addrs {
            ip(&["-n", name, "addr", "add", a, "dev", "v0", "nodad"]);
        }
        ip(&["-n", name, "link", "set", "v0", "up"]);
        ip(&["-n", name, "link", "set", "v1", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The value of counter `key` in turnpike's "shut down" log line (from [`Server::stop`]).
pub fn shutdown_value(lines: &[String], key: &str) -> u64 {
    let line = lines.iter().find(|l| l.contains("shut down")).expect("shutdown line");
    let rest = line
        .split(&format!(" {key}="))
        .nth(1)
        .unwrap_or_else(|| panic!("{key} in {line}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
