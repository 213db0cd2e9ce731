//! Counters shared by the data plane, the control thread and the metrics exporter: plain
//! data, so that none of those modules needs another's internals (no import cycles).

use std::net::IpAddr;

use crate::proto::server::{DropReason, Gauges};

/// Drop reasons in counter order.
pub const DROP_REASONS: [DropReason; 12] = [
    DropReason::Malformed,
    DropReason::BadFingerprint,
    DropReason::UnexpectedMessage,
    DropReason::NoAllocation,
    DropReason::NoChannel,
    DropReason::NoPermission,
    DropReason::PeerDenied,
    DropReason::FamilyMismatch,
    DropReason::RateLimited,
    DropReason::BandwidthExceeded,
    DropReason::UnknownAttribute,
    DropReason::AllocatePending,
];

/// Index of `r` in [`DROP_REASONS`].
pub fn drop_index(r: DropReason) -> usize {
    match r {
        DropReason::Malformed => 0,
        DropReason::BadFingerprint => 1,
        DropReason::UnexpectedMessage => 2,
        DropReason::NoAllocation => 3,
        DropReason::NoChannel => 4,
        DropReason::NoPermission => 5,
        DropReason::PeerDenied => 6,
        DropReason::FamilyMismatch => 7,
        DropReason::RateLimited => 8,
        DropReason::BandwidthExceeded => 9,
        DropReason::UnknownAttribute => 10,
        DropReason::AllocatePending => 11,
    }
}

/// Why a TCP or TLS connection was closed, in counter order ([`StreamStats::closed`]).
pub const STREAM_CLOSES: [&str; 9] = [
    "eof",
    "reset",
    "bad_frame",
    "frame_too_long",
    "idle_timeout",
    "handshake_timeout",
    "tls_error",
    "write_stalled",
    "refused",
];

/// Index of a close reason in [`STREAM_CLOSES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum StreamClose {
    /// The client closed (FIN, or TLS close_notify).
    Eof = 0,
    /// A read or write failed (reset, broken pipe).
    Reset = 1,
    /// Bytes that cannot start a STUN or ChannelData message.
    BadFrame = 2,
    /// A message longer than `--max-stream-frame`.
    FrameTooLong = 3,
    /// No complete message within `--stream-idle-timeout` without an allocation.
    IdleTimeout = 4,
    /// The TLS handshake took longer than `--tls-handshake-timeout`.
    HandshakeTimeout = 5,
    /// The TLS layer failed (a ClientHello of garbage, a bad record).
    TlsError = 6,
    /// The client read nothing of what was queued for it for `--stream-idle-timeout`.
    WriteStalled = 7,
    /// Over `--max-connections` or `--max-connections-per-ip` at accept.
    Refused = 8,
}

/// Transports of client streams, in counter order.
pub const STREAM_TRANSPORTS: [&str; 2] = ["tcp", "tls"];

/// Counters of a shard's TCP and TLS client connections.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamStats {
    /// Connections accepted, by [`STREAM_TRANSPORTS`] index.
    pub accepted: [u64; 2],
    /// Connections open now, by transport.
    pub open: [u64; 2],
    /// Connections closed, by [`STREAM_CLOSES`] index.
    pub closed: [u64; 9],
    /// Messages (STUN and ChannelData) received on streams.
    pub messages: u64,
    /// Messages to clients dropped because the connection's write buffer was full.
    pub backpressure_drops: u64,
    /// RFC 6062 peer data connections open.
    pub peer_open: u64,
    /// RFC 6062 peer data connections made by Connect or accepted from peers.
    pub peer_connections: u64,
    /// Bytes relayed on RFC 6062 data connections, both ways.
    pub relayed_bytes: u64,
}

impl StreamStats {
    fn add(&mut self, s: &StreamStats) {
        for t in 0..2 {
            self.accepted[t] += s.accepted[t];
            self.open[t] += s.open[t];
        }
        for r in 0..self.closed.len() {
            self.closed[r] += s.closed[r];
        }
        self.messages += s.messages;
        self.backpressure_drops += s.backpressure_drops;
        self.peer_open += s.peer_open;
        self.peer_connections += s.peer_connections;
        self.relayed_bytes += s.relayed_bytes;
    }

    /// All connections closed, whatever the reason.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }
}

/// A shard's counters: plain integers, summed by the runtime and copied once per loop turn
/// into the shard's metrics slot ([`crate::metrics`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    /// Payload bytes relayed to peers.
    pub to_peer_bytes: u64,
    /// Payload bytes relayed to clients.
    pub to_client_bytes: u64,
    /// STUN requests received, by [`crate::metrics::METHODS`] index.
    pub requests: [u64; 6],
    /// STUN responses sent, by method and [`crate::metrics::CODES`] index.
    pub responses: [[u64; 17]; 6],
    /// Signed requests whose credentials did not verify.
    pub auth_failures: u64,
    /// Allocations created.
    pub allocations_created: u64,
    /// Allocations closed at their expiry.
    pub allocations_expired: u64,
    /// Allocations deleted by Refresh with LIFETIME 0.
    pub allocations_deleted: u64,
    /// Allocations, permissions and channels held (refreshed about once a second).
    pub gauges: Gauges,
    /// Datagrams from clients.
    pub client_rx: u64,
    /// Datagrams from peers.
    pub peer_rx: u64,
    /// Datagrams relayed to peers.
    pub to_peer: u64,
    /// Datagrams relayed to clients.
    pub to_client: u64,
    /// STUN responses sent.
    pub responses_total: u64,
    /// Drops by reason, in [`DROP_REASONS`] order.
    pub drops: [u64; 12],
    /// Allocate tickets the control queue refused (full).
    pub control_overflow: u64,
    /// Datagrams handed to or received from another shard.
    pub handovers: u64,
    /// Handovers refused because the owner's inbox was full.
    pub handover_overflow: u64,
    /// Backend counters.
    pub io: IoStats,
    /// TCP and TLS connections.
    pub streams: StreamStats,
    /// What the XDP fast path relayed for this shard's allocations (refreshed about once a
    /// second; zero without `--xdp`).
    pub xdp: crate::proto::allocation::Usage,
}

impl ShardStats {
    /// Adds another shard's counters (gauges too) to these.
    pub fn add(&mut self, s: &ShardStats) {
        self.client_rx += s.client_rx;
        self.peer_rx += s.peer_rx;
        self.to_peer += s.to_peer;
        self.to_client += s.to_client;
        self.to_peer_bytes += s.to_peer_bytes;
        self.to_client_bytes += s.to_client_bytes;
        self.responses_total += s.responses_total;
        for m in 0..self.requests.len() {
            self.requests[m] += s.requests[m];
            for c in 0..self.responses[m].len() {
                self.responses[m][c] += s.responses[m][c];
            }
        }
        self.auth_failures += s.auth_failures;
        self.allocations_created += s.allocations_created;
        self.allocations_expired += s.allocations_expired;
        self.allocations_deleted += s.allocations_deleted;
        for f in 0..2 {
            self.gauges.allocations[f] += s.gauges.allocations[f];
            self.gauges.by_transport[f] += s.gauges.by_transport[f];
            self.gauges.permissions[f] += s.gauges.permissions[f];
            self.gauges.channels[f] += s.gauges.channels[f];
        }
        for i in 0..self.drops.len() {
            self.drops[i] += s.drops[i];
        }
        self.control_overflow += s.control_overflow;
        self.handovers += s.handovers;
        self.handover_overflow += s.handover_overflow;
        self.gauges.by_transport[2] += s.gauges.by_transport[2];
        self.streams.add(&s.streams);
        self.xdp.to_peer_packets += s.xdp.to_peer_packets;
        self.xdp.to_peer_bytes += s.xdp.to_peer_bytes;
        self.xdp.to_client_packets += s.xdp.to_client_packets;
        self.xdp.to_client_bytes += s.xdp.to_client_bytes;
        self.io.rx += s.io.rx;
        self.io.tx += s.io.tx;
        self.io.send_errors += s.io.send_errors;
        self.io.last_send_errno = self.io.last_send_errno.max(s.io.last_send_errno);
        self.io.sync_sends += s.io.sync_sends;
        self.io.truncated += s.io.truncated;
        self.io.batches += s.io.batches;
        self.io.gso_sends += s.io.gso_sends;
        self.io.gso_datagrams += s.io.gso_datagrams;
        self.io.gso_fallbacks += s.io.gso_fallbacks;
        self.io.gro_receives += s.io.gro_receives;
        self.io.gro_datagrams += s.io.gro_datagrams;
    }

    /// STUN responses sent (all methods and codes).
    pub fn responses_sent(&self) -> u64 {
        self.responses_total
    }
}

/// Counters a backend keeps.
#[derive(Debug, Default, Clone, Copy)]
pub struct IoStats {
    /// Datagrams received.
    pub rx: u64,
    /// Datagrams handed to the kernel for sending.
    pub tx: u64,
    /// Sends the kernel refused (buffer full, unreachable, ...).
    pub send_errors: u64,
    /// The errno of the last refused send (0 if none), to tell the causes apart.
    pub last_send_errno: i32,
    /// Sends made with a plain sendto(2) because every io_uring send slot was in flight.
    pub sync_sends: u64,
    /// Datagrams longer than [`crate::dataplane::io::MAX_PAYLOAD`], dropped.
    pub truncated: u64,
    /// Receive or send batches submitted.
    pub batches: u64,
    /// UDP GSO sends (two datagrams or more in one sendmsg).
    pub gso_sends: u64,
    /// Datagrams sent in GSO sends.
    pub gso_datagrams: u64,
    /// GSO sends the kernel refused and that were sent again one datagram at a time.
    pub gso_fallbacks: u64,
    /// Coalesced datagrams received (UDP GRO: two datagrams or more read as one).
    pub gro_receives: u64,
    /// Datagrams received in coalesced ones.
    pub gro_datagrams: u64,
}

/// The control thread's accounting as of its last batch.
#[derive(Debug, Default, Clone)]
pub struct ControlPublished {
    /// Relay ports per relay IP: (IP, in use, free).
    pub relay_ports: Vec<(IpAddr, usize, usize)>,
    /// EVEN-PORT reservations held.
    pub reservations: usize,
    /// Allocate tickets refused for the user quota.
    pub user_quota_refusals: u64,
    /// Allocate tickets refused for the total quota.
    pub total_quota_refusals: u64,
    /// Allocate tickets refused for want of a port.
    pub port_refusals: u64,
    /// Allocate tickets refused for an unknown, expired or foreign RESERVATION-TOKEN.
    pub token_refusals: u64,
}

/// The kernel's UDP `RcvbufErrors` and `SndbufErrors` counters (/proc/net/snmp).
pub fn kernel_udp_buffer_errors() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i)?.parse().ok())
    };
    Some((get("RcvbufErrors")?, get("SndbufErrors")?))
}
