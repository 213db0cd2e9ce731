//! Prometheus metrics and the HTTP endpoint that serves them (`--metrics-listen`):
//! `/metrics` (text exposition format), `/healthz` and `/readyz`.
//!
//! Nothing here touches the packet path. Each shard counts in plain integers of its own
//! ([`crate::stats::ShardStats`]) and, once per loop turn, copies them into its
//! [`Published`] slot with `try_lock` (never waiting: when the exporter holds the slot, the
//! copy is skipped until the next turn, at most 100 ms later). At scrape time the exporter
//! copies every slot, brings the `prometheus` counters up to the shards' totals and encodes
//! them; gauges are set, and the two histograms (allocation setup time and lifetime) are
//! observed by the shards directly, once per Allocate and per closed allocation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::proto::server::DropReason;
use crate::proto::stun::{ErrorCode, Method};
use crate::stats::{ControlPublished, ShardStats, DROP_REASONS, STREAM_CLOSES, STREAM_TRANSPORTS};

/// Method label values, in [`method_index`] order.
pub const METHODS: [&str; 6] = [
    "binding",
    "allocate",
    "refresh",
    "create_permission",
    "channel_bind",
    "other",
];

/// Response codes counted per method, in [`code_index`] order (0: success; the last slot
/// counts codes not listed).
pub const CODES: [u16; 17] = [
    0, 300, 400, 401, 403, 420, 437, 438, 441, 442, 443, 446, 447, 486, 500, 508, 1,
];

/// Index of `method` in [`METHODS`].
pub fn method_index(method: Method) -> usize {
    match method {
        Method::Binding => 0,
        Method::Allocate => 1,
        Method::Refresh => 2,
        Method::CreatePermission => 3,
        Method::ChannelBind => 4,
        _ => 5,
    }
}

/// Index of a response's code in [`CODES`] (`None`: success).
pub fn code_index(error: Option<ErrorCode>) -> usize {
    match error {
        None => 0,
        Some(c) => CODES[1..CODES.len() - 1]
            .iter()
            .position(|&k| k == c.0)
            .map_or(CODES.len() - 1, |i| i + 1),
    }
}

fn code_label(i: usize) -> String {
    match CODES[i] {
        0 => "success".into(),
        1 => "other".into(),
        c => c.to_string(),
    }
}

fn drop_label(r: DropReason) -> &'static str {
    match r {
        DropReason::Malformed => "malformed",
        DropReason::BadFingerprint => "bad_fingerprint",
        DropReason::UnexpectedMessage => "unexpected_message",
        DropReason::NoAllocation => "no_allocation",
        DropReason::NoChannel => "no_channel",
        DropReason::NoPermission => "no_permission",
        DropReason::PeerDenied => "peer_denied",
        DropReason::FamilyMismatch => "family_mismatch",
        DropReason::RateLimited => "rate_limited",
        DropReason::BandwidthExceeded => "bandwidth_exceeded",
        DropReason::UnknownAttribute => "unknown_attribute",
        DropReason::AllocatePending => "allocate_pending",
    }
}

/// One shard's counters as of its last loop turn, plus the thread ID for its CPU time.
#[derive(Debug, Default)]
pub struct Published {
    /// The counters.
    pub stats: ShardStats,
    /// The shard thread's Linux thread ID (for `/proc/self/task/TID/stat`), 0 until known.
    pub tid: i32,
}

/// A shard's publication slot.
pub type Slot = Arc<Mutex<Published>>;

/// The histograms shards observe directly (request path only).
#[derive(Clone)]
pub struct Histograms {
    /// Authenticated Allocate received → answered, seconds.
    pub setup: Histogram,
    /// Allocation created → closed, seconds.
    pub lifetime: Histogram,
}

/// Process state the exporter reports besides the counters.
#[derive(Debug, Default)]
pub struct State {
    /// Set while draining (SIGUSR1): `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Config reloads that took effect.
    pub reloads_ok: std::sync::atomic::AtomicU64,
    /// Config reloads refused (the file did not parse or was invalid).
    pub reloads_failed: std::sync::atomic::AtomicU64,
}

/// All metrics of one process, registered in one registry.
pub struct Metrics {
    registry: Registry,
    shards: Vec<Slot>,
    control: Arc<Mutex<ControlPublished>>,
    state: Arc<State>,
    realm: String,
    coturn_names: bool,
    datagrams: IntCounterVec,
    relayed_packets: IntCounterVec,
    relayed_bytes: IntCounterVec,
    requests: IntCounterVec,
    responses: IntCounterVec,
    drops: IntCounterVec,
    auth_failures: IntCounter,
    created: IntCounter,
    closed: IntCounterVec,
    refusals: IntCounterVec,
    control_overflows: IntCounter,
    handovers: IntCounter,
    handover_overflows: IntCounter,
    gso_sends: IntCounter,
    gso_datagrams: IntCounter,
    gso_fallbacks: IntCounter,
    gro_receives: IntCounter,
    gro_datagrams: IntCounter,
    kernel_rcvbuf: IntCounter,
    kernel_sndbuf: IntCounter,
    busy: prometheus::CounterVec,
    reloads: IntCounterVec,
    realm_bytes: IntCounterVec,
    allocations: IntGaugeVec,
    permissions: IntGaugeVec,
    channels: IntGaugeVec,
    relay_ports: IntGaugeVec,
    reservations: IntGauge,
    draining: IntGauge,
    transport_allocations: IntGaugeVec,
    streams_open: IntGaugeVec,
    streams_accepted: IntCounterVec,
    streams_closed: IntCounterVec,
    stream_messages: IntCounter,
    stream_backpressure: IntCounter,
    histograms: Histograms,
    coturn: Option<Coturn>,
}

/// coturn's metric names (`--metrics-coturn-names`), so that an existing coturn dashboard
/// or runbook works unchanged.
struct Coturn {
    allocations: IntGaugeVec,
    rcvp: IntCounter,
    rcvb: IntCounter,
    sentp: IntCounter,
    sentb: IntCounter,
    peer_rcvp: IntCounter,
    peer_rcvb: IntCounter,
    peer_sentp: IntCounter,
    peer_sentb: IntCounter,
    binding_request: IntCounter,
    binding_response: IntCounter,
    binding_error: IntCounter,
}

/// Brings a counter up to `total` (the shards' counters only grow).
fn catch_up(c: &IntCounter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

/// Clock ticks per second of `/proc` CPU times.
fn clock_ticks() -> f64 {
    crate::sys::clock_ticks_per_second() as f64
}

/// utime + stime of a thread of this process, seconds.
fn thread_cpu_seconds(tid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

impl Metrics {
    /// Metrics over `shards` publication slots and the control thread's, for a server of
    /// `realm` running `io_backend`. With `coturn_names`, coturn's metric names are served
    /// too.
    ///
    /// # Errors
    /// A metric that does not register (a bug: names are fixed).
    pub fn new(
        shards: Vec<Slot>,
        control: Arc<Mutex<ControlPublished>>,
        state: Arc<State>,
        realm: &str,
        io_backend: &str,
        coturn_names: bool,
    ) -> Result<Metrics> {
        let r = Registry::new();
        let build = gauge_vec(
            &r,
            "turnpike_build_info",
            "Always 1; the version and I/O backend in labels.",
            &["version", "io_backend"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), io_backend]).set(1);
        let coturn = if coturn_names {
            Some(Coturn {
                allocations: gauge_vec(&r, "turn_total_allocations", "Allocations (coturn's name).", &["type"])?,
                rcvp: counter(
                    &r,
                    "turn_total_traffic_rcvp",
                    "Datagrams received from clients (coturn's name).",
                )?,
                rcvb: counter(
                    &r,
                    "turn_total_traffic_rcvb",
                    "Payload bytes received from clients and relayed (coturn's name).",
                )?,
                sentp: counter(
                    &r,
                    "turn_total_traffic_sentp",
                    "Datagrams sent to clients (coturn's name).",
                )?,
                sentb: counter(
                    &r,
                    "turn_total_traffic_sentb",
                    "Payload bytes sent to clients (coturn's name).",
                )?,
                peer_rcvp: counter(
                    &r,
                    "turn_total_traffic_peer_rcvp",
                    "Datagrams received from peers (coturn's name).",
                )?,
                peer_rcvb: counter(
                    &r,
                    "turn_total_traffic_peer_rcvb",
                    "Payload bytes received from peers and relayed (coturn's name).",
                )?,
                peer_sentp: counter(
                    &r,
                    "turn_total_traffic_peer_sentp",
                    "Datagrams sent to peers (coturn's name).",
                )?,
                peer_sentb: counter(
                    &r,
                    "turn_total_traffic_peer_sentb",
                    "Payload bytes sent to peers (coturn's name).",
                )?,
                binding_request: counter(&r, "stun_binding_request", "STUN Binding requests (coturn's name).")?,
                binding_response: counter(
                    &r,
                    "stun_binding_response",
                    "STUN Binding success responses (coturn's name).",
                )?,
                binding_error: counter(
                    &r,
                    "stun_binding_error",
                    "STUN Binding error responses (coturn's name).",
                )?,
            })
        } else {
            None
        };
        Ok(Metrics {
            datagrams: counter_vec(
                &r,
                "turnpike_datagrams_received_total",
                "Datagrams received, from clients on listening sockets or from peers on relay sockets.",
                &["shard", "source"],
            )?,
            relayed_packets: counter_vec(
                &r,
                "turnpike_relayed_packets_total",
                "Datagrams relayed.",
                &["shard", "direction", "datapath"],
            )?,
            relayed_bytes: counter_vec(
                &r,
                "turnpike_relayed_bytes_total",
                "Payload bytes relayed.",
                &["shard", "direction", "datapath"],
            )?,
            requests: counter_vec(
                &r,
                "turnpike_stun_requests_total",
                "STUN requests received, by method.",
                &["method"],
            )?,
            responses: counter_vec(
                &r,
                "turnpike_stun_responses_total",
                "STUN responses sent, by method and code (success or the error code).",
                &["method", "code"],
            )?,
            drops: counter_vec(
                &r,
                "turnpike_drops_total",
                "Datagrams dropped without an answer, by reason.",
                &["shard", "reason"],
            )?,
            auth_failures: counter(
                &r,
                "turnpike_auth_failures_total",
                "Signed requests whose credentials did not verify (answered 401).",
            )?,
            created: counter(&r, "turnpike_allocations_created_total", "Allocations created.")?,
            closed: counter_vec(
                &r,
                "turnpike_allocations_closed_total",
                "Allocations closed, by reason.",
                &["reason"],
            )?,
            refusals: counter_vec(
                &r,
                "turnpike_allocation_refusals_total",
                "Allocate requests refused by the relay allocator, by reason.",
                &["reason"],
            )?,
            control_overflows: counter(
                &r,
                "turnpike_control_queue_overflows_total",
                "Allocate tickets dropped because the control queue was full.",
            )?,
            transport_allocations: gauge_vec(
                &r,
                "turnpike_allocations_by_transport",
                "Allocations held, by the client's transport (udp, tcp, tls).",
                &["transport"],
            )?,
            streams_open: gauge_vec(
                &r,
                "turnpike_stream_connections",
                "TCP and TLS client connections open.",
                &["transport"],
            )?,
            streams_accepted: counter_vec(
                &r,
                "turnpike_stream_connections_accepted_total",
                "TCP and TLS client connections accepted.",
                &["transport"],
            )?,
            streams_closed: counter_vec(
                &r,
                "turnpike_stream_connections_closed_total",
                "TCP and TLS client connections closed (or refused at accept: reason=\"refused\"), by reason.",
                &["reason"],
            )?,
            stream_messages: counter(
                &r,
                "turnpike_stream_messages_total",
                "STUN and ChannelData messages received on TCP and TLS connections.",
            )?,
            stream_backpressure: counter(
                &r,
                "turnpike_stream_backpressure_drops_total",
                "Messages to TCP and TLS clients dropped because the connection's write buffer was full.",
            )?,
            handovers: counter(
                &r,
                "turnpike_handovers_total",
                "Datagrams handed to the shard owning their allocation.",
            )?,
            handover_overflows: counter(
                &r,
                "turnpike_handover_overflows_total",
                "Handovers dropped because the owning shard's inbox was full.",
            )?,
            gso_sends: counter(
                &r,
                "turnpike_udp_gso_sends_total",
                "UDP GSO sends: runs of two or more equal datagrams to one destination sent with one sendmsg.",
            )?,
            gso_datagrams: counter(
                &r,
                "turnpike_udp_gso_datagrams_total",
                "Datagrams sent in UDP GSO sends.",
            )?,
            gso_fallbacks: counter(
                &r,
                "turnpike_udp_gso_fallbacks_total",
                "UDP GSO sends the kernel refused (a segment over the path MTU, ...), sent again one datagram at a time.",
            )?,
            gro_receives: counter(
                &r,
                "turnpike_udp_gro_receives_total",
                "Coalesced datagrams received with UDP GRO (--udp-gro): two datagrams or more read as one.",
            )?,
            gro_datagrams: counter(
                &r,
                "turnpike_udp_gro_datagrams_total",
                "Datagrams received inside coalesced ones (UDP GRO).",
            )?,
            kernel_rcvbuf: counter(
                &r,
                "turnpike_kernel_udp_receive_buffer_errors_total",
                "UDP datagrams the kernel dropped for a full receive buffer (host-wide, since boot).",
            )?,
            kernel_sndbuf: counter(
                &r,
                "turnpike_kernel_udp_send_buffer_errors_total",
                "UDP datagrams the kernel dropped for a full send buffer (host-wide, since boot).",
            )?,
            busy: {
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        "turnpike_shard_busy_seconds_total",
                        "CPU time of each shard thread, seconds.",
                    ),
                    &["shard"],
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            reloads: counter_vec(
                &r,
                "turnpike_config_reloads_total",
                "Configuration reloads (SIGHUP), by result.",
                &["result"],
            )?,
            realm_bytes: counter_vec(
                &r,
                "turnpike_realm_relayed_bytes_total",
                "Payload bytes relayed, both directions, by realm.",
                &["realm"],
            )?,
            allocations: gauge_vec(
                &r,
                "turnpike_allocations",
                "Allocations held.",
                &["transport", "family"],
            )?,
            permissions: gauge_vec(&r, "turnpike_permissions", "Permissions held.", &["family"])?,
            channels: gauge_vec(&r, "turnpike_channels", "Channel bindings held.", &["family"])?,
            relay_ports: gauge_vec(
                &r,
                "turnpike_relay_ports",
                "Relay ports per relay IP, in use or free.",
                &["relay_ip", "state"],
            )?,
            reservations: {
                let g = IntGauge::new("turnpike_reservations", "EVEN-PORT reservations held.")?;
                r.register(Box::new(g.clone()))?;
                g
            },
            draining: {
                let g = IntGauge::new("turnpike_draining", "1 while draining (SIGUSR1), else 0.")?;
                r.register(Box::new(g.clone()))?;
                g
            },
            histograms: Histograms {
                setup: histogram(
                    &r,
                    "turnpike_allocation_setup_seconds",
                    "Authenticated Allocate received to answered, seconds.",
                    vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ],
                )?,
                lifetime: histogram(
                    &r,
                    "turnpike_allocation_lifetime_seconds",
                    "Allocation created to closed, seconds.",
                    vec![10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0],
                )?,
            },
            registry: r,
            shards,
            control,
            state,
            realm: realm.to_string(),
            coturn_names,
            coturn,
        })
    }

    /// The histograms, for the shards to observe.
    pub fn histograms(&self) -> Histograms {
        self.histograms.clone()
    }

    /// Whether coturn's names are served too.
    pub fn coturn_names(&self) -> bool {
        self.coturn_names
    }

    /// Brings every metric up to date and encodes them in the text exposition format.
    pub fn render(&self) -> String {
        let mut total = ShardStats::default();
        for (i, slot) in self.shards.iter().enumerate() {
            let (s, tid) = {
                let p = slot.lock().unwrap_or_else(|e| e.into_inner());
                (p.stats, p.tid)
            };
            self.shard(i, &s, tid);
            total.add(&s);
        }
        self.totals(&total);
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (ip, in_use, free) in &control.relay_ports {
            let ip = ip.to_string();
            self.relay_ports.with_label_values(&[&ip, "in_use"]).set(*in_use as i64);
            self.relay_ports.with_label_values(&[&ip, "free"]).set(*free as i64);
        }
        self.reservations.set(control.reservations as i64);
        for (reason, n) in [
            ("user_quota", control.user_quota_refusals),
            ("total_quota", control.total_quota_refusals),
            ("no_port", control.port_refusals),
            ("reservation_token", control.token_refusals),
        ] {
            catch_up(&self.refusals.with_label_values(&[reason]), n);
        }
        if let Some((rcv, snd)) = crate::stats::kernel_udp_buffer_errors() {
            catch_up(&self.kernel_rcvbuf, rcv);
            catch_up(&self.kernel_sndbuf, snd);
        }
        self.draining
            .set(i64::from(self.state.draining.load(Ordering::Relaxed)));
        catch_up(
            &self.reloads.with_label_values(&["success"]),
            self.state.reloads_ok.load(Ordering::Relaxed),
        );
        catch_up(
            &self.reloads.with_label_values(&["failure"]),
            self.state.reloads_failed.load(Ordering::Relaxed),
        );
        let mut buf = Vec::new();
        let families = self.registry.gather();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding into a Vec");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    fn shard(&self, i: usize, s: &ShardStats, tid: i32) {
        let shard = i.to_string();
        let sh = shard.as_str();
        catch_up(&self.datagrams.with_label_values(&[sh, "client"]), s.client_rx);
        catch_up(&self.datagrams.with_label_values(&[sh, "peer"]), s.peer_rx);
        catch_up(
            &self
                .relayed_packets
                .with_label_values(&[sh, "client_to_peer", "userspace"]),
            s.to_peer,
        );
        catch_up(
            &self
                .relayed_packets
                .with_label_values(&[sh, "peer_to_client", "userspace"]),
            s.to_client,
        );
        catch_up(
            &self
                .relayed_bytes
                .with_label_values(&[sh, "client_to_peer", "userspace"]),
            s.to_peer_bytes,
        );
        catch_up(
            &self
                .relayed_bytes
                .with_label_values(&[sh, "peer_to_client", "userspace"]),
            s.to_client_bytes,
        );
        for (direction, packets, bytes) in [
            ("client_to_peer", s.xdp.to_peer_packets, s.xdp.to_peer_bytes),
            ("peer_to_client", s.xdp.to_client_packets, s.xdp.to_client_bytes),
        ] {
            catch_up(
                &self.relayed_packets.with_label_values(&[sh, direction, "xdp"]),
                packets,
            );
            catch_up(&self.relayed_bytes.with_label_values(&[sh, direction, "xdp"]), bytes);
        }
        for (k, r) in DROP_REASONS.iter().enumerate() {
            catch_up(&self.drops.with_label_values(&[sh, drop_label(*r)]), s.drops[k]);
        }
        catch_up(&self.drops.with_label_values(&[sh, "send_error"]), s.io.send_errors);
        catch_up(&self.drops.with_label_values(&[sh, "truncated"]), s.io.truncated);
        if tid != 0 {
            if let Some(cpu) = thread_cpu_seconds(tid) {
                let c = self.busy.with_label_values(&[sh]);
                if cpu > c.get() {
                    c.inc_by(cpu - c.get());
                }
            }
        }
    }

    fn totals(&self, t: &ShardStats) {
        for (m, name) in METHODS.iter().enumerate() {
            catch_up(&self.requests.with_label_values(&[name]), t.requests[m]);
            for (c, &n) in t.responses[m].iter().enumerate() {
                if n > 0 {
                    catch_up(&self.responses.with_label_values(&[*name, code_label(c).as_str()]), n);
                }
            }
        }
        catch_up(&self.auth_failures, t.auth_failures);
        catch_up(&self.created, t.allocations_created);
        catch_up(&self.closed.with_label_values(&["expired"]), t.allocations_expired);
        catch_up(&self.closed.with_label_values(&["deleted"]), t.allocations_deleted);
        catch_up(&self.control_overflows, t.control_overflow);
        catch_up(&self.handovers, t.handovers);
        for (i, name) in ["udp", "tcp", "tls"].iter().enumerate() {
            self.transport_allocations
                .with_label_values(&[name])
                .set(t.gauges.by_transport[i] as i64);
        }
        for (i, name) in STREAM_TRANSPORTS.iter().enumerate() {
            self.streams_open
                .with_label_values(&[name])
                .set(t.streams.open[i] as i64);
            catch_up(&self.streams_accepted.with_label_values(&[name]), t.streams.accepted[i]);
        }
        for (i, name) in STREAM_CLOSES.iter().enumerate() {
            catch_up(&self.streams_closed.with_label_values(&[name]), t.streams.closed[i]);
        }
        catch_up(&self.stream_messages, t.streams.messages);
        catch_up(&self.stream_backpressure, t.streams.backpressure_drops);
        catch_up(&self.handover_overflows, t.handover_overflow);
        catch_up(&self.gso_sends, t.io.gso_sends);
        catch_up(&self.gso_datagrams, t.io.gso_datagrams);
        catch_up(&self.gso_fallbacks, t.io.gso_fallbacks);
        catch_up(&self.gro_receives, t.io.gro_receives);
        catch_up(&self.gro_datagrams, t.io.gro_datagrams);
        catch_up(
            &self.realm_bytes.with_label_values(&[&self.realm]),
            t.to_peer_bytes + t.to_client_bytes,
        );
        for (f, family) in ["ipv4", "ipv6"].iter().enumerate() {
            self.allocations
                .with_label_values(&["udp", family])
                .set(t.gauges.allocations[f] as i64);
            self.permissions
                .with_label_values(&[family])
                .set(t.gauges.permissions[f] as i64);
            self.channels
                .with_label_values(&[family])
                .set(t.gauges.channels[f] as i64);
        }
        if let Some(c) = &self.coturn {
            let allocs = t.gauges.allocations[0] + t.gauges.allocations[1];
            c.allocations.with_label_values(&["UDP"]).set(allocs as i64);
            catch_up(&c.rcvp, t.client_rx);
            catch_up(&c.rcvb, t.to_peer_bytes);
            catch_up(&c.sentp, t.to_client + t.responses_sent());
            catch_up(&c.sentb, t.to_client_bytes);
            catch_up(&c.peer_rcvp, t.peer_rx);
            catch_up(&c.peer_rcvb, t.to_client_bytes);
            catch_up(&c.peer_sentp, t.to_peer);
            catch_up(&c.peer_sentb, t.to_peer_bytes);
            catch_up(&c.binding_request, t.requests[0]);
            catch_up(&c.binding_response, t.responses[0][0]);
            catch_up(&c.binding_error, t.responses[0][1..].iter().sum());
        }
    }
}

/// The HTTP endpoint: `/metrics`, `/healthz`, `/readyz` on its own thread.
pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl Endpoint {
    /// Serves `metrics` on `addr`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn start(addr: SocketAddr, metrics: Metrics) -> Result<Endpoint> {
        let server = Arc::new(
            tiny_http::Server::http(addr)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("binding the metrics endpoint {addr}"))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .context("the metrics endpoint has no IP address")?;
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("turnpike-metrics".into())
            .spawn(move || serve(&s, &metrics))?;
        Ok(Endpoint {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The bound address (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, metrics: &Metrics) {
    let text = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4; charset=utf-8"[..])
        .expect("a valid header");
    while let Ok(request) = server.recv() {
        let path = request.url().split('?').next().unwrap_or("");
        let response = match path {
            "/metrics" => tiny_http::Response::from_string(metrics.render()).with_header(text.clone()),
            "/healthz" => tiny_http::Response::from_string("ok\n"),
            "/readyz" if metrics.state.draining.load(Ordering::Relaxed) => {
                tiny_http::Response::from_string("draining\n").with_status_code(503)
            }
            "/readyz" => tiny_http::Response::from_string("ready\n"),
            _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
        };
        let _ = request.respond(response);
    }
}
