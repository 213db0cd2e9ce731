//! Configuration: one TOML file (`--config`) whose every key is also a command-line flag.
//! Flags override the file; the file overrides the built-in defaults, which run a
//! server with no file at all.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;

use crate::proto::auth::{Credentials, RestPolicy, RestUsernameOrder, DEFAULT_REST_MAX_AHEAD_SECS};
use crate::proto::peer_policy::{Cidr, PeerPolicy};
use crate::proto::server::{NatDiscovery, ServerConfig};

/// Settings as given on the command line or in the TOML file. Every field is optional
/// here; [`Config::resolve`] applies the defaults.
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(
    name = "turnpike",
    version,
    args_override_self = true,
    about = "A high-throughput TURN relay (RFC 8656) and STUN server (RFC 8489)"
)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// TOML configuration file; its keys are the long flag names (e.g. `listen = ["0.0.0.0:3478"]`).
    #[arg(long, short = 'c')]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// A client tool instead of the server.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,

    /// UDP transport address to listen on for clients; repeatable [default: 0.0.0.0:3478].
    #[arg(long)]
    pub listen: Vec<SocketAddr>,

    /// RFC 5780 NAT behaviour discovery: the alternate IP:PORT (a second IP of this host and
    /// a second port). The server then listens on all four combinations with `--listen`
    /// (exactly one, with a concrete IP and port), answers Bindings with OTHER-ADDRESS and
    /// RESPONSE-ORIGIN, and honours CHANGE-REQUEST.
    #[arg(long)]
    pub alt_listen: Option<SocketAddr>,

    /// IP address for relayed transport addresses; repeatable (one per family is typical)
    /// [default: the listen IP, or the host's primary IPv4 address when listening on 0.0.0.0].
    #[arg(long)]
    pub relay_ip: Vec<IpAddr>,

    /// Realm of the long-term credentials [default: turnpike].
    #[arg(long)]
    pub realm: Option<String>,

    /// A static user as NAME:PASSWORD; repeatable.
    #[arg(long = "user")]
    #[serde(rename = "user")]
    pub users: Vec<String>,

    /// TURN REST API shared secret (coturn's static-auth-secret); repeatable, all are
    /// accepted at once for rotation.
    #[arg(long)]
    pub static_auth_secret: Vec<String>,

    /// Peer IP range (CIDR) to allow despite the default deny list; repeatable. Loopback
    /// tests need `--allowed-peer-ip 127.0.0.0/8`.
    #[arg(long)]
    pub allowed_peer_ip: Vec<String>,

    /// Peer IP range (CIDR) to deny in addition to the defaults; repeatable; beats allowed.
    #[arg(long)]
    pub denied_peer_ip: Vec<String>,

    /// Lowest relay port [default: 49152].
    #[arg(long)]
    pub min_port: Option<u16>,

    /// Highest relay port [default: 65535].
    #[arg(long)]
    pub max_port: Option<u16>,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info].
    #[arg(long)]
    pub log_level: Option<String>,

    /// Accept only RFC 8656 channel numbers 0x4000-0x4FFF (default: also 0x5000-0x7FFF,
    /// which RFC 5766 clients in the field use).
    #[arg(long)]
    pub strict_channel_numbers: bool,

    /// Allocations one user may hold at once, 0 for no limit (486 beyond); an EVEN-PORT
    /// reservation counts as one until redeemed [default: 10].
    #[arg(long)]
    pub user_quota: Option<usize>,

    /// Allocations the server holds at once, 0 for no limit (508 beyond) [default: 0].
    #[arg(long)]
    pub total_quota: Option<usize>,

    /// Where TURN REST API usernames carry their expiry: `expiry-first` (`EXPIRY:NAME`, as
    /// coturn's use-auth-secret) or `expiry-last` (`NAME:EXPIRY`) [default: expiry-first].
    #[arg(long)]
    pub rest_username_order: Option<String>,

    /// Longest time a TURN REST API expiry may lie ahead of now, seconds; later ones are
    /// refused (401) [default: 604800, 7 days].
    #[arg(long)]
    pub rest_max_ahead: Option<u64>,

    /// Permissions per allocation (508 beyond) [default: 256].
    #[arg(long)]
    pub max_permissions: Option<usize>,

    /// Channel bindings per allocation (508 beyond) [default: 1024].
    #[arg(long)]
    pub max_channels: Option<usize>,

    /// Allocation lifetime in seconds when the client asks for less [default: 600].
    #[arg(long)]
    pub default_lifetime: Option<u64>,

    /// Longest allocation lifetime granted, in seconds [default: 3600].
    #[arg(long)]
    pub max_lifetime: Option<u64>,

    /// Nonce validity in seconds before 438 Stale Nonce [default: 600].
    #[arg(long)]
    pub nonce_lifetime: Option<u64>,

    /// Permission lifetime in seconds (RFC 8656 §9 fixes 300; for tests) [default: 300].
    #[arg(long, hide = true)]
    pub permission_lifetime: Option<u64>,

    /// Channel binding lifetime in seconds (RFC 8656 §12 fixes 600; for tests) [default: 600].
    #[arg(long, hide = true)]
    pub channel_lifetime: Option<u64>,

    /// SOFTWARE attribute to put in responses [default: none].
    #[arg(long)]
    pub software: Option<String>,

    /// Socket receive and send buffer size in bytes for listening sockets [default: 4194304].
    #[arg(long)]
    pub socket_buffer: Option<usize>,

    /// 401/438 challenges per second per source prefix; beyond it unauthenticated requests
    /// are dropped silently (no reflection). 0 for no limit [default: 1000].
    #[arg(long)]
    pub challenge_rate: Option<u32>,

    /// STUN requests per second per source prefix, authenticated or not; 0 for no limit
    /// [default: 5000].
    #[arg(long)]
    pub request_rate: Option<u32>,

    /// Prefix length grouping IPv4 sources for the rate limits [default: 32].
    #[arg(long)]
    pub rate_limit_v4_prefix: Option<u8>,

    /// Prefix length grouping IPv6 sources for the rate limits [default: 64].
    #[arg(long)]
    pub rate_limit_v6_prefix: Option<u8>,

    /// Bandwidth cap per allocation and direction, bits per second of payload; packets
    /// over it are dropped and counted. 0 for no cap [default: 0].
    #[arg(long)]
    pub max_bitrate: Option<u64>,

    /// Socket receive and send buffer size in bytes for each relay socket [default: 524288].
    #[arg(long)]
    pub relay_socket_buffer: Option<usize>,

    /// Number of shards (forwarding threads, one per core) [default: the cores this
    /// process may run on].
    #[arg(long)]
    pub shards: Option<usize>,

    /// I/O backend: auto (io_uring when the probe passes), io-uring, or mmsg
    /// (recvmmsg/sendmmsg with epoll) [default: auto].
    #[arg(long)]
    pub io_backend: Option<String>,

    /// io_uring submission queue entries per shard [default: 4096].
    #[arg(long)]
    pub ring_entries: Option<u32>,

    /// Do not pin shard threads to cores.
    #[arg(long)]
    pub no_pin: bool,

    /// Send every relayed datagram with its own sendmsg instead of UDP GSO (UDP_SEGMENT:
    /// consecutive datagrams of a batch to one destination, of equal length, leave in one
    /// sendmsg; nothing changes on the wire).
    #[arg(long)]
    pub no_udp_gso: bool,

    /// Receive with UDP GRO: datagrams of one flow that the kernel coalesced (a burst the
    /// NIC's GRO merged, or a peer's GSO send) are read as one and split in turnpike.
    /// Needs the mmsg backend (`--io-backend auto` then selects it; `io-uring` is refused).
    #[arg(long)]
    pub udp_gro: bool,

    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at IP:PORT (off by
    /// default; coturn uses 9641).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,

    /// Also serve coturn's metric names (turn_total_allocations, turn_total_traffic_*,
    /// stun_binding_*), so that coturn dashboards work unchanged.
    #[arg(long)]
    pub metrics_coturn_names: bool,

    /// Where new clients go while draining (SIGUSR1): 300 Try Alternate with this
    /// ALTERNATE-SERVER (RFC 8489 §10); without it, 403.
    #[arg(long)]
    pub alternate_server: Option<SocketAddr>,

    /// Longest drain, seconds: after it the process exits even with allocations left
    /// [default: 3600].
    #[arg(long)]
    pub drain_timeout: Option<u64>,

    /// Log format: text or json (one JSON object per line, for log shippers) [default: text].
    #[arg(long)]
    pub log_format: Option<String>,

    /// Do not accept TURN over TCP on the `--listen` addresses (by default each listens on
    /// UDP and TCP, as coturn does).
    #[arg(long)]
    pub no_tcp: bool,

    /// TLS transport address to listen on for TURN over TLS (RFC 8656 §3.1; 5349 and 443 are
    /// the usual ports); repeatable. Needs `--cert` and `--pkey`.
    #[arg(long)]
    pub tls_listen: Vec<SocketAddr>,

    /// PEM certificate chain for TLS, leaf first (re-read on SIGHUP).
    #[arg(long)]
    pub cert: Option<PathBuf>,

    /// PEM private key for `--cert` (PKCS#8, PKCS#1 or SEC1; re-read on SIGHUP).
    #[arg(long)]
    pub pkey: Option<PathBuf>,

    /// TCP and TLS connections held at once, all listeners together; more are closed at
    /// accept [default: 10000].
    #[arg(long)]
    pub max_connections: Option<usize>,

    /// TCP and TLS connections from one client IP at once [default: 64].
    #[arg(long)]
    pub max_connections_per_ip: Option<usize>,

    /// Seconds a TLS handshake may take before the connection is closed [default: 10].
    #[arg(long)]
    pub tls_handshake_timeout: Option<u64>,

    /// Seconds a TCP or TLS connection without an allocation may go without completing a
    /// message before it is closed (slow or idle clients) [default: 60].
    #[arg(long)]
    pub stream_idle_timeout: Option<u64>,

    /// Longest STUN or ChannelData message on a TCP or TLS connection, bytes (header and
    /// padding included); a longer one closes the connection [default: 8192].
    #[arg(long)]
    pub max_stream_frame: Option<usize>,

    /// Forward ChannelData of bound channels in the kernel with XDP on this interface
    /// (repeatable; off by default; needs the `xdp` build feature and CAP_BPF+CAP_NET_ADMIN).
    /// Native mode, else generic (skb) mode; without it the user-space path relays all.
    #[arg(long)]
    pub xdp: Vec<String>,
}

/// Client tools of the `turnpike` binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// RFC 5780 NAT behaviour discovery against a STUN server with two addresses: prints the
    /// mapping and filtering behaviour, hairpinning, the classic NAT type and a verdict on
    /// direct P2P.
    Probe {
        /// The server's primary address, HOST:PORT.
        #[arg(long)]
        server: String,
        /// Local address to send from [default: 0.0.0.0:0].
        #[arg(long, default_value = "0.0.0.0:0")]
        local: SocketAddr,
        /// Retransmission timeout per try, milliseconds.
        #[arg(long, default_value_t = 300)]
        rto_ms: u64,
        /// Tries per transaction (a test expecting no answer waits tries x rto).
        #[arg(long, default_value_t = 3)]
        tries: u32,
    },
}

macro_rules! overlay {
    ($base:ident, $top:ident; opt: $($o:ident),*; vec: $($v:ident),*; flag: $($f:ident),*) => {
        $( if $top.$o.is_some() { $base.$o = $top.$o; } )*
        $( if !$top.$v.is_empty() { $base.$v = $top.$v; } )*
        $( $base.$f |= $top.$f; )*
    };
}

impl Settings {
    /// Reads the file named by `--config`, if any, and lays the command line over it.
    ///
    /// # Errors
    /// When the file cannot be read or is not valid TOML for these keys.
    pub fn load(cli: Settings) -> Result<Settings> {
        let mut base = match &cli.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
                Settings::from_toml(&text).with_context(|| format!("parsing config {}", path.display()))?
            }
            None => Settings::default(),
        };
        base.config = cli.config.clone();
        overlay!(base, cli;
            opt: alt_listen, realm, min_port, max_port, log_level, user_quota, total_quota, rest_username_order,
                 rest_max_ahead, max_permissions, max_channels,
                 default_lifetime, max_lifetime, nonce_lifetime, permission_lifetime, channel_lifetime, software, socket_buffer,
                 relay_socket_buffer, shards, io_backend, ring_entries, challenge_rate, request_rate,
                 rate_limit_v4_prefix, rate_limit_v6_prefix, max_bitrate, metrics_listen, log_format,
                 alternate_server, drain_timeout, cert, pkey, max_connections, max_connections_per_ip,
                 tls_handshake_timeout, stream_idle_timeout, max_stream_frame;
            vec: listen, relay_ip, users, static_auth_secret, allowed_peer_ip, denied_peer_ip, tls_listen, xdp;
            flag: strict_channel_numbers, no_pin, metrics_coturn_names, no_tcp, no_udp_gso, udp_gro);
        Ok(base)
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// Unknown keys and wrongly typed values.
    pub fn from_toml(text: &str) -> Result<Settings> {
        Ok(toml::from_str(text)?)
    }
}

/// Default `--user-quota`: allocations one user may hold at once (eturnal's default; a
/// browser call needs one or two).
pub const DEFAULT_USER_QUOTA: usize = 10;

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening transport addresses.
    pub listen: Vec<SocketAddr>,
    /// Relay IPs.
    pub relay_ips: Vec<IpAddr>,
    /// Relay port range, inclusive.
    pub ports: (u16, u16),
    /// Log filter.
    pub log_level: String,
    /// Log lines as JSON objects.
    pub log_json: bool,
    /// Where to serve metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve coturn's metric names too.
    pub metrics_coturn_names: bool,
    /// ALTERNATE-SERVER for 300 answers while draining.
    pub alternate_server: Option<SocketAddr>,
    /// Longest drain.
    pub drain_timeout: Duration,
    /// Protocol settings.
    pub server: ServerConfig,
    /// Allocations per user, 0 for no limit (enforced by the control thread's relay allocator).
    pub user_quota: usize,
    /// Allocations in total, 0 for no limit.
    pub total_quota: usize,
    /// Users and secrets.
    pub credentials: Credentials,
    /// Number of static users.
    pub user_count: usize,
    /// Number of REST API secrets.
    pub secret_count: usize,
    /// Operator-allowed peer ranges (`--allowed-peer-ip`).
    pub allowed_peers: Vec<Cidr>,
    /// Operator-denied peer ranges (`--denied-peer-ip`).
    pub denied_peers: Vec<Cidr>,
    /// Listening socket buffer size in bytes.
    pub socket_buffer: usize,
    /// Relay socket buffer size in bytes.
    pub relay_socket_buffer: usize,
    /// Number of shards.
    pub shards: usize,
    /// I/O backend choice.
    pub io_backend: BackendChoice,
    /// io_uring submission queue entries per shard.
    pub ring_entries: u32,
    /// Pin shard threads to cores.
    pub pin_cores: bool,
    /// Send runs of equal datagrams to one destination with UDP GSO.
    pub udp_gso: bool,
    /// Receive coalesced datagrams with UDP GRO (mmsg backend).
    pub udp_gro: bool,
    /// Accept TCP on the `listen` addresses.
    pub tcp: bool,
    /// TLS listening addresses.
    pub tls_listen: Vec<SocketAddr>,
    /// The certificate and key (loaded), with `tls_listen`.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Limits of TCP and TLS connections.
    pub streams: StreamLimits,
    /// Interfaces to attach the XDP fast path to.
    pub xdp: Vec<String>,
}

/// Limits of TCP and TLS client connections (the slowloris and exhaustion defences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Connections at once, all listeners and shards together.
    pub max_connections: usize,
    /// Connections at once from one client IP.
    pub max_per_ip: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest time a connection without an allocation goes without a complete message.
    pub idle_timeout: Duration,
    /// Longest message on a stream, bytes (header and padding included).
    pub max_frame: usize,
}

/// The `--io-backend` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the start-up probe passes, else mmsg.
    Auto,
    /// io_uring or fail.
    IoUring,
    /// recvmmsg/sendmmsg with epoll.
    Mmsg,
}

impl Config {
    /// The peer address policy for a server whose listening sockets are bound to
    /// `listeners` (the bound addresses, so that port 0 resolves to the real port).
    pub fn peer_policy(&self, listeners: &[SocketAddr]) -> PeerPolicy {
        let mut own_ips = self.relay_ips.clone();
        own_ips.extend(listeners.iter().map(|a| a.ip()));
        PeerPolicy::new(
            self.allowed_peers.clone(),
            self.denied_peers.clone(),
            own_ips,
            listeners.to_vec(),
        )
    }
}

fn parse_cidrs(list: &[String], flag: &str) -> Result<Vec<Cidr>> {
    list.iter()
        .map(|s| {
            s.parse::<Cidr>()
                .with_context(|| format!("--{flag}: {s:?} is not an IP range in CIDR notation"))
        })
        .collect()
}

/// The host's primary IPv4 address: the source address the kernel picks for a route to a
/// public address. A UDP `connect` sends nothing.
fn primary_ipv4() -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

impl Config {
    /// Applies defaults and checks the settings.
    ///
    /// # Errors
    /// Malformed users, CIDR ranges, an empty or inverted port range.
    pub fn resolve(s: Settings) -> Result<Config> {
        let mut listen = if s.listen.is_empty() {
            vec!["0.0.0.0:3478".parse()?]
        } else {
            s.listen
        };
        let nat_discovery = match s.alt_listen {
            None => None,
            Some(alternate) => {
                let [primary] = listen[..] else {
                    bail!("--alt-listen needs exactly one --listen address (the primary)");
                };
                if primary.ip().is_unspecified() || alternate.ip().is_unspecified() {
                    bail!("--alt-listen and --listen need concrete IPs for NAT discovery, not 0.0.0.0 or ::");
                }
                if primary.port() == 0 || alternate.port() == 0 {
                    bail!("--alt-listen and --listen need fixed ports for NAT discovery");
                }
                if primary.is_ipv4() != alternate.is_ipv4()
                    || primary.ip() == alternate.ip()
                    || primary.port() == alternate.port()
                {
                    bail!("--alt-listen must differ from --listen in both IP and port, in the same family");
                }
                let nat = NatDiscovery { primary, alternate };
                listen = nat.addresses().to_vec();
                Some(nat)
            }
        };
        let relay_ips = if !s.relay_ip.is_empty() {
            s.relay_ip
        } else {
            let specific: Vec<IpAddr> = listen
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified())
                .collect();
            if specific.is_empty() {
                vec![primary_ipv4().unwrap_or(IpAddr::from([127, 0, 0, 1]))]
            } else {
                specific
            }
        };
        if relay_ips.iter().any(|ip| ip.is_unspecified()) {
            bail!("--relay-ip must be a concrete address clients can reach, not 0.0.0.0 or ::");
        }
        for (flag, value) in [
            ("default-lifetime", s.default_lifetime),
            ("max-lifetime", s.max_lifetime),
            ("nonce-lifetime", s.nonce_lifetime),
            ("permission-lifetime", s.permission_lifetime),
            ("channel-lifetime", s.channel_lifetime),
        ] {
            if value == Some(0) {
                bail!("--{flag} must be at least 1 second (0 would expire every allocation or nonce at once)");
            }
        }
        let ports = (s.min_port.unwrap_or(49152), s.max_port.unwrap_or(65535));
        if ports.0 == 0 || ports.0 > ports.1 {
            bail!("relay port range {}-{} is empty or starts at 0", ports.0, ports.1);
        }
        let realm = s.realm.unwrap_or_else(|| "turnpike".into());
        let mut users = Vec::new();
        for u in &s.users {
            match u.split_once(':') {
                Some((name, pw)) if !name.is_empty() => users.push((name.to_string(), pw.to_string())),
                _ => bail!("--user {u:?}: expected NAME:PASSWORD"),
            }
        }
        let allowed = parse_cidrs(&s.allowed_peer_ip, "allowed-peer-ip")?;
        let denied = parse_cidrs(&s.denied_peer_ip, "denied-peer-ip")?;
        let defaults = ServerConfig::default();
        let server = ServerConfig {
            realm: realm.clone(),
            default_lifetime: s
                .default_lifetime
                .map(Duration::from_secs)
                .unwrap_or(defaults.default_lifetime),
            max_lifetime: s.max_lifetime.map(Duration::from_secs).unwrap_or(defaults.max_lifetime),
            nonce_lifetime: s
                .nonce_lifetime
                .map(Duration::from_secs)
                .unwrap_or(defaults.nonce_lifetime),
            permission_lifetime: s
                .permission_lifetime
                .map(Duration::from_secs)
                .unwrap_or(defaults.permission_lifetime),
            channel_lifetime: s
                .channel_lifetime
                .map(Duration::from_secs)
                .unwrap_or(defaults.channel_lifetime),
            strict_channel_numbers: s.strict_channel_numbers,
            max_permissions_per_allocation: s.max_permissions.unwrap_or(defaults.max_permissions_per_allocation),
            max_channels_per_allocation: s.max_channels.unwrap_or(defaults.max_channels_per_allocation),
            software: s.software,
            nat_discovery,
            challenge_rate: s.challenge_rate.unwrap_or(defaults.challenge_rate),
            request_rate: s.request_rate.unwrap_or(defaults.request_rate),
            rate_limit_v4_prefix: s.rate_limit_v4_prefix.unwrap_or(defaults.rate_limit_v4_prefix).min(32),
            rate_limit_v6_prefix: s.rate_limit_v6_prefix.unwrap_or(defaults.rate_limit_v6_prefix).min(128),
            max_bitrate: s.max_bitrate.unwrap_or(defaults.max_bitrate),
        };
        let io_backend = match s.io_backend.as_deref().unwrap_or("auto") {
            "auto" => BackendChoice::Auto,
            "io-uring" | "io_uring" | "uring" => BackendChoice::IoUring,
            "mmsg" => BackendChoice::Mmsg,
            other => bail!("--io-backend {other:?}: expected auto, io-uring or mmsg"),
        };
        let shards = match s.shards {
            Some(0) => bail!("--shards must be at least 1"),
            Some(n) => n,
            None => core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(1).max(1),
        };
        let user_count = users.len();
        let secret_count = s.static_auth_secret.len();
        let log_json = match s.log_format.as_deref().unwrap_or("text") {
            "text" => Ok(false),
            "json" => Ok(true),
            other => Err(anyhow::anyhow!("--log-format {other:?}: expected text or json")),
        };
        let order = match s.rest_username_order.as_deref().unwrap_or("expiry-first") {
            "expiry-first" => RestUsernameOrder::ExpiryFirst,
            "expiry-last" => RestUsernameOrder::ExpiryLast,
            other => bail!("--rest-username-order {other:?}: expected expiry-first or expiry-last"),
        };
        let rest = RestPolicy {
            order,
            max_ahead_secs: s.rest_max_ahead.unwrap_or(DEFAULT_REST_MAX_AHEAD_SECS),
        };
        let credentials = Credentials::new(users, s.static_auth_secret, &realm).with_rest_policy(rest);
        let tls = match (&s.cert, &s.pkey) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsConfig::load(cert, key)?),
            (None, None) if s.tls_listen.is_empty() => None,
            (None, None) => bail!("--tls-listen needs --cert and --pkey"),
            _ => bail!("--cert and --pkey go together"),
        };
        let streams = StreamLimits {
            max_connections: s.max_connections.unwrap_or(10_000),
            max_per_ip: s.max_connections_per_ip.unwrap_or(64),
            handshake_timeout: Duration::from_secs(s.tls_handshake_timeout.unwrap_or(10)),
            idle_timeout: Duration::from_secs(s.stream_idle_timeout.unwrap_or(60)),
            max_frame: s.max_stream_frame.unwrap_or(8192),
        };
        if streams.max_frame < 24 {
            bail!("--max-stream-frame must be at least 24 bytes (a STUN header and one attribute)");
        }
        Ok(Config {
            listen,
            relay_ips,
            ports,
            log_level: s.log_level.unwrap_or_else(|| "info".into()),
            log_json: log_json?,
            metrics_listen: s.metrics_listen,
            metrics_coturn_names: s.metrics_coturn_names,
            alternate_server: s.alternate_server,
            drain_timeout: Duration::from_secs(s.drain_timeout.unwrap_or(3600)),
            server,
            user_quota: s.user_quota.unwrap_or(DEFAULT_USER_QUOTA),
            total_quota: s.total_quota.unwrap_or(0),
            credentials,
            user_count,
            secret_count,
            allowed_peers: allowed,
            denied_peers: denied,
            socket_buffer: s.socket_buffer.unwrap_or(4 << 20),
            relay_socket_buffer: s.relay_socket_buffer.unwrap_or(512 << 10),
            shards,
            io_backend,
            ring_entries: s.ring_entries.unwrap_or(4096),
            pin_cores: !s.no_pin,
            udp_gso: !s.no_udp_gso,
            udp_gro: s.udp_gro,
            tcp: !s.no_tcp,
            tls_listen: s.tls_listen,
            tls,
            streams,
            xdp: s.xdp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let text = include_str!("../deploy/turnpike.toml");
        let s = Settings::from_toml(text).unwrap();
        let c = Config::resolve(s).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:3478".parse::<SocketAddr>().unwrap()]);
        assert_eq!(c.ports, (49152, 65535));
        assert_eq!(c.server.realm, "turnpike");
        assert_eq!(c.server.max_lifetime, Duration::from_secs(3600));
        assert_eq!(c.user_quota, DEFAULT_USER_QUOTA);
        assert!(!c.log_json && c.metrics_listen.is_none());
        // The stream settings in the file are the built-in ones.
        let builtin = Config::resolve(Settings::from_toml("").unwrap()).unwrap();
        assert!(c.tcp && c.tls_listen.is_empty() && c.tls.is_none() && c.xdp.is_empty());
        assert_eq!(c.streams, builtin.streams);
    }

    #[test]
    fn flags_override_file() {
        let file = Settings::from_toml("realm = \"file\"\nmin-port = 50000\nuser = [\"a:b\"]").unwrap();
        let cli = Settings::parse_from(["turnpike", "--realm", "cli", "--user", "c:d"]);
        let mut merged = file;
        overlay!(merged, cli; opt: realm, min_port; vec: users; flag: strict_channel_numbers);
        assert_eq!(merged.realm.as_deref(), Some("cli"));
        assert_eq!(merged.min_port, Some(50000));
        assert_eq!(merged.users, vec!["c:d".to_string()]);
    }

    #[test]
    fn bad_values_are_refused_with_clear_messages() {
        let err = |args: &[&str]| {
            let mut v = vec!["turnpike"];
            v.extend_from_slice(args);
            format!("{:#}", Config::resolve(Settings::parse_from(v)).unwrap_err())
        };
        assert!(err(&["--allowed-peer-ip", "10.0.0.0/33"]).contains("allowed-peer-ip"));
        assert!(err(&["--denied-peer-ip", "nonsense"]).contains("denied-peer-ip"));
        assert!(err(&["--user", "nopassword"]).contains("NAME:PASSWORD"));
        assert!(err(&["--min-port", "6000", "--max-port", "5000"]).contains("port range"));
        assert!(err(&["--default-lifetime", "0"]).contains("default-lifetime"));
        assert!(err(&["--nonce-lifetime", "0"]).contains("nonce-lifetime"));
        assert!(Settings::from_toml("no-such-key = 1").is_err());
    }
}
