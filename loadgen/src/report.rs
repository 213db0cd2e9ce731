//! The end-of-run report: a human table and the JSON document (`--json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Packets in one direction through the relay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Direction {
    /// Packets sent (by the clients, or echoed by the peers), packets.
    pub sent: u64,
    /// Packets that arrived (at the peers, or back at the clients), packets.
    pub received: u64,
    /// `sent - received` after the drain time, packets.
    pub lost: u64,
}

impl Direction {
    /// From sent and received counts.
    pub fn new(sent: u64, received: u64) -> Direction {
        Direction {
            sent,
            received,
            lost: sent.saturating_sub(received),
        }
    }
}

/// Allocation setup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Setup {
    /// Wall time from the first Allocate to the last allocation settled, seconds.
    pub seconds: f64,
    /// Allocations with every channel bound (or permission installed).
    pub allocations_ok: u64,
    /// Allocations that failed (see `errors`).
    pub allocations_failed: u64,
    /// `allocations_ok / seconds`, allocations/s.
    pub allocations_per_s: f64,
    /// Channels ready for traffic.
    pub channels_ready: u64,
}

/// The traffic phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Traffic {
    /// Sending time, seconds.
    pub seconds: f64,
    /// Client → relay → peer.
    pub client_to_peer: Direction,
    /// Peer → relay → client.
    pub peer_to_client: Direction,
    /// Lost packets in both directions over packets sent in both directions (0-1).
    pub loss_ratio: f64,
    /// Echoes back at the clients per second, round trips/s.
    pub round_trips_per_s: f64,
    /// Datagrams the relay delivered in both directions per second (peer arrivals plus
    /// client arrivals over `seconds`), packets/s.
    pub relayed_pps: f64,
    /// Payload carried by `relayed_pps`, Gbit/s.
    pub relayed_gbit_s: f64,
    /// Packets the clients sent per second, packets/s.
    pub send_rate_pps: f64,
    /// Whether the requested fixed rate was sent (at least 97 %); always true for `max`.
    pub rate_kept: bool,
    /// Fixed rate: largest backlog behind the schedule, milliseconds.
    pub max_lag_ms: f64,
    /// Packets the kernel refused to take from loadgen (full socket buffer, ICMP errors).
    pub send_failures: u64,
    /// Payloads that arrived out of order.
    pub reordered: u64,
    /// Datagrams that were neither loadgen payloads nor STUN.
    pub garbage: u64,
    /// `--rate max`: window stalls (20 ms without any echo while the window was full).
    pub window_stalls: u64,
    /// loadgen's own CPU time during traffic over wall time (1.0 = one core busy).
    pub loadgen_cpu_utilization: f64,
    /// Time loadgen's busiest thread was runnable but waiting for a CPU during traffic, over
    /// wall time (other processes on its core; 0 on a quiet machine).
    #[serde(default)]
    pub loadgen_run_queue_wait_fraction: f64,
    /// loadgen used all the CPU its threads can get, or missed the fixed rate: the numbers
    /// describe loadgen's limit, not (only) the server's.
    pub loadgen_saturated: bool,
}

/// Round-trip times client → relay → peer → relay → client, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rtt {
    /// Samples (equals `traffic.peer_to_client.received`).
    pub count: u64,
    /// Minimum, µs.
    pub min: f64,
    /// Mean, µs.
    pub mean: f64,
    /// Median, µs.
    pub p50: f64,
    /// 90th percentile, µs.
    pub p90: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// 99.9th percentile, µs.
    pub p999: f64,
    /// Maximum, µs.
    pub max: f64,
}

impl Rtt {
    /// Summarises a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Rtt {
        if h.is_empty() {
            return Rtt::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Rtt {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// STUN transaction counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stun {
    /// Retransmitted requests.
    pub retransmits: u64,
    /// Requests repeated with a new nonce (438, or 401 with a fresh nonce).
    pub nonce_retries: u64,
    /// Responses matching no outstanding request.
    pub stray_responses: u64,
    /// Refresh cycles (Refresh + ChannelBind/CreatePermission) that succeeded.
    pub refresh_ok: u64,
    /// Refresh cycles that failed.
    pub refresh_failed: u64,
    /// Allocations released with LIFETIME 0.
    pub released: u64,
    /// Releases that failed or timed out.
    pub release_failed: u64,
    /// Answered transactions, first transmission to answer (retransmissions included), µs.
    #[serde(default)]
    pub transaction_us: Rtt,
}

/// TLS handshakes (`--transport tls`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tls {
    /// Handshakes completed (one per connection that got that far).
    pub handshakes: u64,
    /// Of those, TLS 1.3 (the others TLS 1.2).
    pub tls13: u64,
    /// Of those, with ALPN `stun.turn` (RFC 7443) selected by the server.
    pub alpn_stun_turn: u64,
}

/// The server process, sampled from /proc (`--server-pid`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerProcess {
    /// PID.
    pub pid: u32,
    /// User plus system CPU time during traffic, seconds.
    pub cpu_seconds: f64,
    /// `cpu_seconds` over traffic wall time (1.0 = one core).
    pub cpu_utilization: f64,
    /// Time the server's busiest thread was runnable but waiting for a CPU during traffic,
    /// over wall time (competition from other processes or its own threads; 0 on a quiet
    /// machine).
    #[serde(default)]
    pub run_queue_wait_fraction: f64,
    /// `relayed_pps * seconds / cpu_seconds`: datagrams delivered per server CPU-second.
    pub relayed_per_cpu_second: f64,
    /// Resident memory before setup, KiB.
    pub rss_before_kib: u64,
    /// Resident memory with every allocation in place, KiB.
    pub rss_after_setup_kib: u64,
    /// `(after - before) / allocations_ok`, bytes per allocation.
    pub rss_per_allocation_bytes: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// `turn` or `raw`.
    pub mode: String,
    /// Server address.
    pub server: String,
    /// `udp`, `tcp` or `tls`: how the clients reached the server (the relayed side is UDP).
    #[serde(default)]
    pub transport: String,
    /// TLS handshakes (`--transport tls`).
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Channels requested.
    pub channels: usize,
    /// Allocations requested (client 5-tuples).
    pub allocations: usize,
    /// Channels per allocation.
    pub channels_per_allocation: usize,
    /// `channel-data`, `send-indication` or `raw`.
    pub encapsulation: String,
    /// Payload bytes per packet.
    pub size_bytes: usize,
    /// Worker threads.
    pub threads: usize,
    /// Requested rate in packets/s; `null` for `max`.
    pub rate_requested_pps: Option<f64>,
    /// Window per thread for `max`, packets.
    pub window: Option<usize>,
    /// Packets per channel sent back to back (`--burst`).
    #[serde(default = "one")]
    pub burst: usize,
    /// Ctrl-C cut the run short.
    pub interrupted: bool,
    /// Setup.
    pub setup: Setup,
    /// Traffic.
    pub traffic: Traffic,
    /// Round-trip times, µs.
    pub rtt_us: Rtt,
    /// Errors by STUN error code or kind, count.
    pub errors: BTreeMap<String, u64>,
    /// STUN transactions.
    pub stun: Stun,
    /// Server process figures when `--server-pid` was given.
    pub server_process: Option<ServerProcess>,
}

fn one() -> usize {
    1
}

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.3} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.1} ")
    }
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let t = &self.traffic;
        let rate = match self.rate_requested_pps {
            Some(r) => format!("{}packets/s", si(r)),
            None => format!("max (window {} per thread)", self.window.unwrap_or(0)),
        };
        let transport = if self.transport.is_empty() {
            "udp"
        } else {
            &self.transport
        };
        let _ = writeln!(s, "loadgen {} over {transport} → {}", self.mode, self.server);
        let _ = writeln!(
            s,
            "  {} channels on {} allocations ({} per allocation), {}, {} B payload, rate {}{}, {} thread(s){}",
            self.channels,
            self.allocations,
            self.channels_per_allocation,
            self.encapsulation,
            self.size_bytes,
            rate,
            if self.burst > 1 {
                format!(", bursts of {}", self.burst)
            } else {
                String::new()
            },
            self.threads,
            if self.interrupted { ", INTERRUPTED" } else { "" }
        );
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<34} {v}");
        };
        row(
            &mut s,
            "setup",
            format!(
                "{} ok, {} failed in {:.2} s = {}allocations/s",
                self.setup.allocations_ok,
                self.setup.allocations_failed,
                self.setup.seconds,
                si(self.setup.allocations_per_s)
            ),
        );
        if let Some(tls) = &self.tls {
            row(
                &mut s,
                "TLS handshakes",
                format!(
                    "{} ({} TLS 1.3, {} TLS 1.2), ALPN stun.turn on {}",
                    tls.handshakes,
                    tls.tls13,
                    tls.handshakes - tls.tls13,
                    tls.alpn_stun_turn
                ),
            );
        }
        row(&mut s, "traffic time", format!("{:.2} s", t.seconds));
        for (name, d) in [
            ("client → peer", &t.client_to_peer),
            ("peer → client", &t.peer_to_client),
        ] {
            row(
                &mut s,
                name,
                format!("sent {}  received {}  lost {}", d.sent, d.received, d.lost),
            );
        }
        row(&mut s, "loss", format!("{:.4} %", t.loss_ratio * 100.0));
        row(
            &mut s,
            "delivered (both directions)",
            format!("{}packets/s, {:.3} Gbit/s payload", si(t.relayed_pps), t.relayed_gbit_s),
        );
        row(&mut s, "round trips", format!("{}/s", si(t.round_trips_per_s)));
        row(
            &mut s,
            "send rate",
            format!(
                "{}packets/s{}{}",
                si(t.send_rate_pps),
                if t.rate_kept { "" } else { "  (REQUESTED RATE NOT KEPT)" },
                if self.rate_requested_pps.is_some() {
                    format!(", max lag {:.1} ms", t.max_lag_ms)
                } else {
                    String::new()
                }
            ),
        );
        row(
            &mut s,
            "loadgen CPU",
            format!(
                "{:.0} % (waited for a CPU {:.0} % of the time){}",
                t.loadgen_cpu_utilization * 100.0,
                t.loadgen_run_queue_wait_fraction * 100.0,
                if t.loadgen_saturated {
                    "  (LOADGEN SATURATED: this measures loadgen)"
                } else {
                    ""
                }
            ),
        );
        let r = &self.rtt_us;
        row(
            &mut s,
            "RTT µs",
            format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} samples)",
                r.p50, r.p90, r.p99, r.p999, r.max, r.count
            ),
        );
        if t.send_failures + t.reordered + t.garbage + t.window_stalls > 0 {
            row(
                &mut s,
                "anomalies",
                format!(
                    "send refused {}  reordered {}  garbage {}  window stalls {}",
                    t.send_failures, t.reordered, t.garbage, t.window_stalls
                ),
            );
        }
        let st = &self.stun;
        row(
            &mut s,
            "STUN",
            format!(
                "retransmits {}  nonce retries {}  refresh ok/failed {}/{}  released {} (failed {})",
                st.retransmits, st.nonce_retries, st.refresh_ok, st.refresh_failed, st.released, st.release_failed
            ),
        );
        let tr = &st.transaction_us;
        row(
            &mut s,
            "STUN transaction time µs",
            format!(
                "p50 {:.1}  p99 {:.1}  max {:.1}  ({} answered)",
                tr.p50, tr.p99, tr.max, tr.count
            ),
        );
        if self.errors.is_empty() {
            row(&mut s, "errors", "none".into());
        } else {
            let e: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            row(&mut s, "errors", e.join(", "));
        }
        if let Some(p) = &self.server_process {
            row(
                &mut s,
                "server CPU during traffic",
                format!(
                    "{:.2} s ({:.0} % of a core, waited for a CPU {:.0} % of the time), {}packets per CPU-second",
                    p.cpu_seconds,
                    p.cpu_utilization * 100.0,
                    p.run_queue_wait_fraction * 100.0,
                    si(p.relayed_per_cpu_second)
                ),
            );
            row(
                &mut s,
                "server RSS",
                format!(
                    "{} KiB before, {} KiB after setup: {:.0} B per allocation",
                    p.rss_before_kib, p.rss_after_setup_kib, p.rss_per_allocation_bytes
                ),
            );
        }
        s
    }
}
