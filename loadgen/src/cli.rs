//! Command-line options and their validation into a [`Plan`].

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::Duration;

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use rustls::pki_types::{CertificateDer, ServerName};

/// What loadgen talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A TURN server (RFC 8656): Allocate, ChannelBind or CreatePermission, ChannelData or
    /// Send/Data indications.
    Turn,
    /// loadgen's `bare-forwarder` (plain UDP, no TURN): each channel registers its echo peer
    /// once, then datagrams go unchanged client → forwarder → peer → forwarder → client.
    Raw,
}

/// How the clients reach the server (RFC 8656 §3.1). The relayed addresses are UDP whatever
/// the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One UDP socket per allocation (recvmmsg/sendmmsg).
    Udp,
    /// One TCP connection per allocation; messages framed on the stream, ChannelData padded to
    /// 4 bytes (RFC 8656 §12.5).
    Tcp,
    /// One TLS connection per allocation (rustls, TLS 1.2 or 1.3, ALPN `stun.turn`), framed
    /// as over TCP. Needs `--ca`.
    Tls,
}

impl Transport {
    /// `udp`, `tcp` or `tls`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Whether this is a byte stream (TCP or TLS).
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

/// TLS versions loadgen offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsVersion {
    /// TLS 1.3 and 1.2 (the server picks).
    Any,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    V13,
    /// TLS 1.2 only.
    #[value(name = "1.2")]
    V12,
}

/// Sending rate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rate {
    /// A fixed total rate in packets/s (client → relay), spread evenly over all channels.
    Pps(f64),
    /// Closed loop: as fast as the path allows, at most `--window` packets in flight per thread.
    Max,
}

/// Parses a rate: a number of packets/s (`_` separators and a `pps` suffix allowed) or `max`.
///
/// # Errors
/// Anything else, and rates that are not finite and positive.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    let v = s
        .trim_end_matches("pps")
        .replace('_', "")
        .parse::<f64>()
        .map_err(|e| format!("rate {s:?}: {e} (a number of packets/s or \"max\")"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("rate {s:?} must be > 0"));
    }
    Ok(Rate::Pps(v))
}

/// `loadgen`: drives any TURN server over UDP, TCP or TLS with many allocations and channels,
/// runs the echo peers itself, and reports throughput, loss and round-trip latency.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, about, long_about = None)]
pub struct Args {
    /// TURN server (or bare forwarder) address, IPv4: UDP, or TCP/TLS with `--transport`.
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub server: String,
    /// Transport to the server: `udp`, `tcp` (TURN over TCP) or `tls` (TURN over TLS, needs
    /// `--ca`). Each allocation has its own socket or connection; relaying to the peers is
    /// UDP in every case.
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    /// PEM file of the CA certificate(s) that verify the server's certificate (`--transport
    /// tls`).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Name the server's certificate must carry (`--transport tls`): a DNS name or an IP
    /// address. Default: the host part of `--server`.
    #[arg(long)]
    pub tls_name: Option<String>,
    /// TLS versions offered (`--transport tls`): `any` (1.3 and 1.2), `1.3` or `1.2` (to
    /// compare servers on the same version).
    #[arg(long, value_enum, default_value_t = TlsVersion::Any)]
    pub tls_version: TlsVersion,
    /// `turn` for any TURN server, `raw` for loadgen's bare-forwarder.
    #[arg(long, value_enum, default_value_t = Mode::Turn)]
    pub mode: Mode,
    /// Total number of channels (client → peer flows).
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Channels per allocation; each allocation is a distinct client 5-tuple (one socket).
    /// Must not exceed `--peers` (each channel of an allocation goes to a different peer).
    #[arg(long, default_value_t = 1)]
    pub channels_per_allocation: usize,
    /// Long-term credential `NAME:PASSWORD`; with `--secret`, just the NAME part of the
    /// TURN REST API username `EXPIRY:NAME`.
    #[arg(long, default_value = "alice:secret")]
    pub user: String,
    /// TURN REST API shared secret (coturn's static-auth-secret): password =
    /// base64(HMAC-SHA1(secret, "EXPIRY:NAME")), expiry one day ahead.
    #[arg(long)]
    pub secret: Option<String>,
    /// Allocation setup rate in allocations/s (new Allocate transactions started per second).
    #[arg(long, default_value_t = 20_000.0)]
    pub setup_rate: f64,
    /// Most allocations being set up at once (outstanding transactions).
    #[arg(long, default_value_t = 2_000)]
    pub setup_concurrency: usize,
    /// Send the first Allocate with the realm and nonce learned by an earlier allocation from
    /// the same thread (one round trip instead of two when the server's nonces allow it;
    /// turnpike's are bound to the client's IP and port, RFC 8489 §9.2.4, so against it this
    /// costs a 438 instead; browsers always start unauthenticated, which is the default).
    #[arg(long)]
    pub reuse_nonce: bool,
    /// Local IPs for client sockets: comma-separated IPs, `A-B` ranges or `A/N` CIDRs in
    /// 127.0.0.0/8 (or 198.18.0.0/15, the benchmarking range, for bench/xdp.sh's namespaces). `auto`: one IP of 127.1.0.1, 127.1.0.2, ... per 20,000 allocations
    /// (kept apart from servers' relay IPs, whose ports overlap Linux's ephemeral range).
    #[arg(long, default_value = "auto")]
    pub local_ip: String,
    /// Number of echo peer sockets loadgen runs itself.
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
    /// IPs the echo peers bind (same syntax as `--local-ip`); peers are spread over them.
    #[arg(long, default_value = "127.2.0.1")]
    pub peer_ip: String,
    /// Total send rate client → relay in packets/s, or `max` (closed loop, `--window`).
    #[arg(long, default_value = "1000", value_parser = parse_rate)]
    pub rate: Rate,
    /// Packets allowed in flight per thread with `--rate max`.
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Packets sent back to back on each channel per turn (1-64): a video frame is a burst
    /// of same-size packets to one peer. The rate (`--rate`) still counts packets; each
    /// burst is written with one sendmmsg, and the echo peers answer each burst as it
    /// arrives.
    #[arg(long, default_value_t = 1)]
    pub burst: usize,
    /// Payload size in bytes (at least 20: channel index, sequence, timestamp, magic).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Traffic duration in seconds (after setup).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Use Send/Data indications (with CreatePermission) instead of ChannelData.
    #[arg(long)]
    pub send_indications: bool,
    /// Worker threads; each owns a share of the allocations and peers, sends with sendmmsg
    /// and receives with recvmmsg.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Requested allocation lifetime in seconds (LIFETIME attribute); the server's answer
    /// decides.
    #[arg(long, default_value_t = 600)]
    pub lifetime: u32,
    /// Refresh allocations, permissions and channels this often, in seconds (default: half
    /// the granted lifetime, at most 240 s because permissions last 300 s).
    #[arg(long)]
    pub refresh_interval: Option<f64>,
    /// Initial STUN retransmission timeout in milliseconds (doubles; 5 transmissions). Over
    /// TCP and TLS requests are not retransmitted; the same schedule only bounds the wait
    /// (31 x this for a request).
    #[arg(long, default_value_t = 500)]
    pub rto_ms: u64,
    /// Time after the last send to wait for packets still in flight, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub drain_ms: u64,
    /// Give up setting up allocations after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub setup_timeout: f64,
    /// After setup, write the flows (client address, channel number, peer, relayed address)
    /// as JSON to this file, for another sender (`xdp-gen`). UDP with ChannelData or `--mode
    /// raw` only.
    #[arg(long)]
    pub flows_out: Option<std::path::PathBuf>,
    /// After setup (and `--flows-out`), keep the allocations open (refreshed) without sending
    /// for this many seconds, or until SIGINT/SIGTERM (which then skips the traffic); then
    /// traffic, if `--duration` is above 0, and the release.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Process ID of the server, to report its CPU seconds during traffic and its resident
    /// memory per allocation (read from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Validated, resolved options.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Server address.
    pub server: SocketAddrV4,
    /// Transport to the server.
    pub transport: Transport,
    /// The TLS client configuration and the name to verify (`Transport::Tls`).
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// Mode.
    pub mode: Mode,
    /// Number of allocations (client sockets).
    pub allocations: usize,
    /// Channels per allocation.
    pub per_alloc: usize,
    /// USERNAME sent.
    pub username: String,
    /// Password (long-term, or derived from the REST secret).
    pub password: String,
    /// Allocations/s.
    pub setup_rate: f64,
    /// Outstanding setups at most.
    pub setup_concurrency: usize,
    /// Reuse the nonce across allocations.
    pub reuse_nonce: bool,
    /// Client socket IPs.
    pub local_ips: Vec<Ipv4Addr>,
    /// Echo peer count.
    pub peers: usize,
    /// Echo peer IPs.
    pub peer_ips: Vec<Ipv4Addr>,
    /// Rate.
    pub rate: Rate,
    /// Window per thread for `Rate::Max`, in packets.
    pub window: usize,
    /// Packets per channel per turn, back to back.
    pub burst: usize,
    /// Payload bytes.
    pub size: usize,
    /// Traffic time.
    pub duration: Duration,
    /// Send indications instead of ChannelData.
    pub send_indications: bool,
    /// Worker threads.
    pub threads: usize,
    /// Requested lifetime, seconds.
    pub lifetime: u32,
    /// Refresh period override.
    pub refresh_interval: Option<Duration>,
    /// Initial RTO.
    pub rto: Duration,
    /// Drain time.
    pub drain: Duration,
    /// Setup deadline.
    pub setup_timeout: Duration,
    /// Where to write the flows after setup.
    pub flows_out: Option<std::path::PathBuf>,
    /// Idle time with the allocations open after setup.
    pub hold: Duration,
    /// Server PID for /proc sampling.
    pub server_pid: Option<u32>,
}

/// Allocations per local IP in the `auto` choice (below the 28,232 ephemeral ports of
/// Linux's default range).
pub const ALLOCATIONS_PER_IP: usize = 20_000;

/// Whether loadgen may use `ip`: loopback (127.0.0.0/8), or the benchmarking range
/// 198.18.0.0/15 (RFC 2544, never routed), which bench/xdp.sh puts on a veth pair between two
/// network namespaces. Anything else could send load to a real network.
pub fn is_lab_address(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback() || (a == 198 && (b & 0xfe) == 18)
}

/// Parses `127.0.0.1,127.0.0.5-127.0.0.9,127.3.0.0/30` into a list of IPv4 addresses.
///
/// # Errors
/// Malformed items, reversed ranges, or more than 65,536 addresses.
pub fn parse_ip_list(s: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().with_context(|| format!("IP range start {a:?}"))?;
            let b: Ipv4Addr = b.trim().parse().with_context(|| format!("IP range end {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a >= 65_536 {
                bail!("IP range {item:?} is reversed or longer than 65,536 addresses");
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else if let Some((ip, len)) = item.split_once('/') {
            let ip: Ipv4Addr = ip.parse().with_context(|| format!("CIDR address {ip:?}"))?;
            let len: u32 = len.parse().with_context(|| format!("CIDR length {len:?}"))?;
            if !(16..=32).contains(&len) {
                bail!("CIDR {item:?}: prefix length must be 16-32");
            }
            let size = 1u32 << (32 - len);
            let net = u32::from(ip) & !(size - 1);
            if size <= 2 {
                out.extend((net..net + size).map(Ipv4Addr::from));
            } else {
                // Skip the network and broadcast addresses, as an operator would expect.
                out.extend((net + 1..net + size - 1).map(Ipv4Addr::from));
            }
        } else {
            out.push(item.parse().with_context(|| format!("IP address {item:?}"))?);
        }
    }
    if out.is_empty() {
        bail!("empty IP list {s:?}");
    }
    if out.len() > 65_536 {
        bail!("more than 65,536 IPs in {s:?}");
    }
    Ok(out)
}

fn resolve_v4(s: &str) -> Result<SocketAddrV4> {
    for a in s.to_socket_addrs().with_context(|| format!("server address {s:?}"))? {
        if let SocketAddr::V4(v4) = a {
            return Ok(v4);
        }
    }
    bail!("server address {s:?} has no IPv4 address (loadgen is IPv4-only)")
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The ALPN protocol ID of TURN (RFC 7443 §3), offered in every TLS ClientHello.
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";

/// A rustls client configuration that trusts the certificates in the PEM file `ca` (TLS 1.2
/// and 1.3, ALPN `stun.turn`, ring as the crypto provider), and the name to verify.
///
/// # Errors
/// Unreadable file, no certificate in it, or a name that is neither a DNS name nor an IP.
pub fn tls_client_config(
    ca: &std::path::Path,
    name: &str,
    version: TlsVersion,
) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>)> {
    let pem = std::fs::read(ca).with_context(|| format!("reading --ca {}", ca.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", ca.display()))?;
    if certs.is_empty() {
        bail!("--ca {} holds no PEM certificate", ca.display());
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("a certificate in {} is not a usable CA", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match version {
        TlsVersion::Any => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V13 => &[&rustls::version::TLS13],
        TlsVersion::V12 => &[&rustls::version::TLS12],
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_STUN_TURN.to_vec()];
    let name = ServerName::try_from(name.to_string()).map_err(|e| anyhow!("TLS server name {name:?}: {e}"))?;
    Ok((Arc::new(config), name))
}

/// Seconds since the epoch (for REST API usernames).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Args {
    /// `--flows-out` and `--hold`.
    fn check_hold(&self) -> Result<()> {
        if !(self.hold >= 0.0 && self.hold <= 86_400.0) {
            bail!("--hold must be 0-86400 seconds");
        }
        if self.flows_out.is_some() && (self.transport != Transport::Udp || self.send_indications) {
            bail!("--flows-out is for UDP with ChannelData (or --mode raw)");
        }
        Ok(())
    }

    /// Checks the options and resolves addresses and credentials.
    ///
    /// # Errors
    /// Inconsistent or out-of-range options.
    pub fn plan(&self) -> Result<Plan> {
        if self.channels == 0 {
            bail!("--channels must be at least 1");
        }
        if self.channels_per_allocation == 0 || self.channels_per_allocation > 4096 {
            bail!("--channels-per-allocation must be 1-4096");
        }
        if !self.channels.is_multiple_of(self.channels_per_allocation) {
            bail!("--channels must be a multiple of --channels-per-allocation");
        }
        if self.peers == 0 {
            bail!("--peers must be at least 1");
        }
        if self.channels_per_allocation > self.peers {
            bail!(
                "--channels-per-allocation must not exceed --peers (each channel of an allocation needs its own peer)"
            );
        }
        if self.size < crate::payload::MIN_SIZE || self.size > 65_000 {
            bail!("--size must be {}-65000 bytes", crate::payload::MIN_SIZE);
        }
        if self.threads == 0 || self.threads > 64 {
            bail!("--threads must be 1-64");
        }
        if self.setup_rate.is_nan() || self.setup_rate <= 0.0 {
            bail!("--setup-rate must be > 0");
        }
        if !(self.duration >= 0.0 && self.duration.is_finite()) {
            bail!("--duration must be >= 0");
        }
        if self.window == 0 {
            bail!("--window must be at least 1");
        }
        if self.burst == 0 || self.burst > 64 {
            bail!("--burst must be 1-64");
        }
        if self.mode == Mode::Raw && self.send_indications {
            bail!("--send-indications is for --mode turn");
        }
        if self.mode == Mode::Raw && self.transport != Transport::Udp {
            bail!("--mode raw (bare-forwarder) is UDP only");
        }
        self.check_hold()?;
        if self.transport != Transport::Tls
            && (self.ca.is_some() || self.tls_name.is_some() || self.tls_version != TlsVersion::Any)
        {
            bail!("--ca, --tls-name and --tls-version are for --transport tls");
        }
        let tls = match (self.transport, &self.ca) {
            (Transport::Tls, Some(ca)) => Some(tls_client_config(
                ca,
                self.tls_name.as_deref().unwrap_or_else(|| host_of(&self.server)),
                self.tls_version,
            )?),
            (Transport::Tls, None) => {
                bail!("--transport tls needs --ca FILE (the CA that signed the server's certificate)")
            }
            _ => None,
        };
        let allocations = self.channels / self.channels_per_allocation;
        let local_ips = if self.local_ip == "auto" {
            if allocations <= ALLOCATIONS_PER_IP {
                vec![Ipv4Addr::LOCALHOST]
            } else {
                let n = allocations.div_ceil(ALLOCATIONS_PER_IP) as u32;
                (1..=n)
                    .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i))
                    .collect()
            }
        } else {
            parse_ip_list(&self.local_ip)?
        };
        let peer_ips = parse_ip_list(&self.peer_ip)?;
        for ip in local_ips.iter().chain(&peer_ips) {
            if !is_lab_address(*ip) {
                bail!("{ip} is not a loopback or benchmarking address: loadgen only sends to 127.0.0.0/8 and 198.18.0.0/15");
            }
        }
        let server = resolve_v4(&self.server)?;
        if !is_lab_address(*server.ip()) {
            bail!("--server {server} is not on loopback or 198.18.0.0/15: loadgen only sends to 127.0.0.0/8 and 198.18.0.0/15");
        }
        let (username, password) = match &self.secret {
            Some(secret) => {
                let name = self.user.split(':').next().unwrap_or("loadgen");
                let username = format!("{}:{name}", unix_now() + 86_400);
                let password = turnpike::proto::auth::rest_api_password(secret, &username);
                (username, password)
            }
            None => match self.user.split_once(':') {
                Some((u, p)) => (u.to_string(), p.to_string()),
                None => bail!("--user must be NAME:PASSWORD without --secret"),
            },
        };
        Ok(Plan {
            server,
            transport: self.transport,
            tls,
            mode: self.mode,
            allocations,
            per_alloc: self.channels_per_allocation,
            username,
            password,
            setup_rate: self.setup_rate,
            setup_concurrency: self.setup_concurrency.max(1),
            reuse_nonce: self.reuse_nonce,
            local_ips,
            peers: self.peers,
            peer_ips,
            rate: self.rate,
            window: self.window,
            burst: self.burst,
            size: self.size,
            duration: Duration::from_secs_f64(self.duration),
            send_indications: self.send_indications,
            threads: self.threads.min(allocations.max(1)),
            lifetime: self.lifetime,
            refresh_interval: self.refresh_interval.map(Duration::from_secs_f64),
            rto: Duration::from_millis(self.rto_ms.max(10)),
            drain: Duration::from_millis(self.drain_ms),
            setup_timeout: Duration::from_secs_f64(self.setup_timeout.max(1.0)),
            flows_out: self.flows_out.clone(),
            hold: Duration::from_secs_f64(self.hold),
            server_pid: self.server_pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_lists() {
        let v = parse_ip_list("127.0.0.1, 127.0.0.5-127.0.0.7,127.3.0.0/30").unwrap();
        let s: Vec<String> = v.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            s,
            [
                "127.0.0.1",
                "127.0.0.5",
                "127.0.0.6",
                "127.0.0.7",
                "127.3.0.1",
                "127.3.0.2"
            ]
        );
        assert!(parse_ip_list("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_ip_list("").is_err());
        assert!(parse_ip_list("127.0.0.0/8").is_err());
    }

    #[test]
    fn lab_addresses() {
        for ok in ["127.0.0.1", "127.255.0.9", "198.18.0.1", "198.19.255.254"] {
            assert!(is_lab_address(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.0.0.1", "198.17.255.255", "198.20.0.0", "192.0.2.1", "8.8.8.8"] {
            assert!(!is_lab_address(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("150_000"), Ok(Rate::Pps(150_000.0)));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn plan_checks() {
        let args = |extra: &[&str]| {
            let mut v = vec!["loadgen"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap()
        };
        let p = args(&["--channels", "100000"]).plan().unwrap();
        assert_eq!(p.allocations, 100_000);
        assert_eq!(p.local_ips.len(), 5);
        assert_eq!(p.local_ips[0], Ipv4Addr::new(127, 1, 0, 1));
        let p = args(&["--channels", "40", "--channels-per-allocation", "4"])
            .plan()
            .unwrap();
        assert_eq!(p.allocations, 10);
        assert!(args(&["--channels", "40", "--channels-per-allocation", "5"])
            .plan()
            .is_err());
        assert!(
            args(&["--peers", "2", "--channels", "30", "--channels-per-allocation", "3"])
                .plan()
                .is_err()
        );
        assert!(args(&["--server", "8.8.8.8:3478"]).plan().is_err());
        assert!(args(&["--local-ip", "10.0.0.1"]).plan().is_err());
        let p = args(&["--secret", "s3", "--user", "bob"]).plan().unwrap();
        assert!(p.username.ends_with(":bob"));
        assert_eq!(p.password, turnpike::proto::auth::rest_api_password("s3", &p.username));
    }

    #[test]
    fn hold_checks() {
        let args = |extra: &[&str]| {
            let mut v = vec!["loadgen"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap()
        };
        let p = args(&["--flows-out", "/tmp/f.json", "--hold", "30"]).plan().unwrap();
        assert_eq!(p.hold, Duration::from_secs(30));
        assert!(p.flows_out.is_some());
        assert!(args(&["--hold=-1"]).plan().is_err());
        assert!(args(&["--flows-out", "f", "--send-indications"]).plan().is_err());
        assert!(args(&["--flows-out", "f", "--transport", "tcp"]).plan().is_err());
    }

    #[test]
    fn transport_checks() {
        let args = |extra: &[&str]| {
            let mut v = vec!["loadgen"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap()
        };
        let p = args(&[]).plan().unwrap();
        assert_eq!(p.transport, Transport::Udp);
        assert!(p.tls.is_none());
        assert_eq!(args(&["--transport", "tcp"]).plan().unwrap().transport, Transport::Tcp);
        assert!(args(&["--transport", "tls"]).plan().is_err(), "TLS needs --ca");
        assert!(args(&["--ca", "/nonexistent"]).plan().is_err(), "--ca without TLS");
        assert!(
            args(&["--tls-version", "1.2"]).plan().is_err(),
            "--tls-version without TLS"
        );
        assert!(args(&["--transport", "tls", "--ca", "/nonexistent/ca.pem"])
            .plan()
            .is_err());
        assert!(args(&["--mode", "raw", "--transport", "tcp"]).plan().is_err());
        assert_eq!(p.burst, 1);
        assert_eq!(args(&["--burst", "16"]).plan().unwrap().burst, 16);
        assert!(args(&["--burst", "0"]).plan().is_err());
        assert!(args(&["--burst", "65"]).plan().is_err());
        assert_eq!(host_of("127.0.0.1:5349"), "127.0.0.1");
        assert_eq!(host_of("localhost:443"), "localhost");
        assert_eq!(host_of("[::1]:5349"), "::1");
    }
}
