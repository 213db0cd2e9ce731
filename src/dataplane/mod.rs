//! The data plane: per-core shards around the sans-IO server, and the control thread.
//!
//! Each shard ([`shard::Shard`]) is one pinned thread with its own SO_REUSEPORT listening
//! socket per listen address (the kernel's reuseport hash keeps a client 5-tuple on one
//! shard), the relay sockets of its allocations, a [`crate::proto::server::Server`] for their
//! tables and timers, and an I/O backend ([`io`]: io_uring or recvmmsg/sendmmsg). The
//! control thread ([`crate::control`]) reserves relay ports and creates relay sockets, so a
//! burst of Allocates never stalls forwarding.

pub mod io;
pub mod shard;
pub mod stream;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{BackendChoice, Config};
use crate::control::allocator::AllocatorConfig;
use crate::control::{Control, ControlConfig, ControlReport, ControlRequest, ShardHandle, ShardMessage};
use crate::metrics::{Metrics, Slot, State};
use crate::proto::allocation::Transport;
use crate::proto::server::{DropReason, Server};
use crate::stats::ControlPublished;
use crate::stats::{kernel_udp_buffer_errors, ShardStats, DROP_REASONS};
use io::{BackendKind, Io};
use shard::{Shard, ShardParts};
use stream::{StreamListener, StreamShared, Streams};

/// Capacity of each shard's inbox and of the control queue.
const QUEUE: usize = 4096;

/// Totals over all shards, and the control thread's accounting, at shutdown.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Summed shard counters.
    pub stats: ShardStats,
    /// Drops by reason.
    pub drops: HashMap<DropReason, u64>,
    /// The control thread's accounting.
    pub control: ControlReport,
    /// UDP datagrams the kernel dropped for a full receive buffer while the server ran
    /// (`RcvbufErrors` of /proc/net/snmp: host-wide, so other UDP users count too).
    pub kernel_rcvbuf_errors: u64,
    /// UDP datagrams the kernel dropped for a full send buffer while the server ran
    /// (`SndbufErrors`, host-wide).
    pub kernel_sndbuf_errors: u64,
}

/// The configured server, bound and ready to run.
pub struct Runtime {
    shards: Vec<Shard>,
    control: Control,
    control_rx: crossbeam_channel::Receiver<crate::control::ControlRequest>,
    listen: Vec<SocketAddr>,
    stream_listen: Vec<(SocketAddr, Transport)>,
    backend: BackendKind,
    backend_reason: String,
    pin: bool,
    metrics: Option<Metrics>,
    state: Arc<State>,
    handles: Vec<ShardHandle>,
    drain: Option<Arc<AtomicBool>>,
    reload: Option<(Arc<AtomicBool>, Reloader)>,
    control_tx: crossbeam_channel::Sender<ControlRequest>,
    restart_only: String,
    alternate_server: Option<SocketAddr>,
    drain_timeout: std::time::Duration,
    /// The loaded and attached XDP program; dropping it detaches it.
    #[cfg(feature = "xdp")]
    xdp: Option<crate::xdp::XdpProgram>,
}

fn bind_reuseport(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_port(true)?;
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if addr.ip().is_unspecified() {
        // A wildcard listener learns each datagram's destination address (the 5-tuple's
        // server address) and answers from it.
        crate::sys::enable_pktinfo(std::os::fd::AsRawFd::as_raw_fd(&socket), addr.is_ipv6())?;
    }
    Ok(socket.into())
}

fn bind_tcp_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    crate::sys::tcp_listener(addr, 1024)
}

/// Binds shard 0's UDP listener on `addr` and, with `tcp`, a TCP listener on the same
/// address and port. For port 0 the kernel's choice for UDP may be taken for TCP: then
/// another port is tried (up to 32 times).
fn bind_udp_and_tcp(addr: SocketAddr, buffer: usize, tcp: bool) -> Result<(UdpSocket, Option<std::net::TcpListener>)> {
    let tries = if addr.port() == 0 && tcp { 32 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = bind_reuseport(addr, buffer).with_context(|| format!("binding udp {addr}"))?;
        if !tcp {
            return Ok((udp, None));
        }
        let bound = udp.local_addr()?;
        match bind_tcp_reuseport(bound) {
            Ok(listener) => return Ok((udp, Some(listener))),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("binding tcp {bound}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("binding tcp {addr}")))
}

/// Entries of the XDP channel maps (bound channels over all allocations).
#[cfg(feature = "xdp")]
const XDP_MAX_CHANNELS: u32 = 1 << 18;

/// Loads the XDP program and attaches it to `--xdp` interfaces; one offload per shard.
/// Anything failing is logged in one line and the user-space path relays everything.
#[cfg(feature = "xdp")]
fn start_xdp(config: &Config, shards: usize) -> (Option<crate::xdp::XdpProgram>, Vec<Option<crate::xdp::XdpOffload>>) {
    let none = || (None, (0..shards).map(|_| None).collect());
    if config.xdp.is_empty() {
        return none();
    }
    let mut program = match crate::xdp::XdpProgram::load(XDP_MAX_CHANNELS) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("xdp: {e}; relaying in user space");
            return none();
        }
    };
    for interface in &config.xdp {
        if let Err(e) = program.attach(interface) {
            tracing::warn!("xdp: {e}; relaying in user space");
            return none();
        }
    }
    let capped = config.server.max_bitrate != 0;
    let mut offloads = Vec::new();
    for _ in 0..shards {
        match program.offload(capped) {
            Ok(o) => offloads.push(Some(o)),
            Err(e) => {
                tracing::warn!("xdp: {e}; relaying in user space");
                return none();
            }
        }
    }
    (Some(program), offloads)
}

/// Picks the backend: the configured one, or io_uring when the probe passes (mmsg with
/// `--udp-gro`, which io_uring's 4 KiB provided buffers cannot serve).
fn choose_backend(choice: BackendChoice, udp_gro: bool) -> Result<(BackendKind, String)> {
    match choice {
        BackendChoice::IoUring if udp_gro => bail!("--udp-gro needs --io-backend mmsg (or auto)"),
        BackendChoice::Auto if udp_gro => Ok((BackendKind::Mmsg, "selected by --udp-gro".into())),
        BackendChoice::Mmsg => Ok((BackendKind::Mmsg, "selected with --io-backend mmsg".into())),
        BackendChoice::IoUring => match io::probe_uring() {
            Ok(()) => Ok((BackendKind::IoUring, "selected with --io-backend io-uring".into())),
            Err(why) => bail!("--io-backend io-uring: {why}"),
        },
        BackendChoice::Auto => match io::probe_uring() {
            Ok(()) => Ok((BackendKind::IoUring, "io_uring probe passed".into())),
            Err(why) => Ok((BackendKind::Mmsg, format!("io_uring unavailable: {why}"))),
        },
    }
}

impl Runtime {
    /// Binds every shard's listening sockets, creates the backends and the control state.
    ///
    /// # Errors
    /// When a socket cannot be bound or a backend cannot be created.
    pub fn new(config: Config) -> Result<Runtime> {
        let (backend, backend_reason) = choose_backend(config.io_backend, config.udp_gro)?;
        let shards = config.shards.max(1);
        // Shard 0 binds first so that port 0 resolves; the others join its address.
        let mut per_shard: Vec<Vec<(SocketAddr, UdpSocket)>> = (0..shards).map(|_| Vec::new()).collect();
        let mut listen = Vec::new();
        let mut tcp_first = Vec::new();
        for addr in &config.listen {
            let (first, tcp) = bind_udp_and_tcp(*addr, config.socket_buffer, config.tcp)?;
            tcp_first.extend(tcp);
            let bound = first.local_addr()?;
            listen.push(bound);
            per_shard[0].push((bound, first));
            for list in per_shard.iter_mut().skip(1) {
                let s = bind_reuseport(bound, config.socket_buffer).with_context(|| format!("binding {bound}"))?;
                list.push((bound, s));
            }
        }
        // TCP on the UDP listening addresses (same ports), and TLS: one SO_REUSEPORT listener
        // per shard each.
        let mut stream_per_shard: Vec<Vec<StreamListener>> = (0..shards).map(|_| Vec::new()).collect();
        let mut stream_listen = Vec::new();
        let mut tls_first = Vec::new();
        for addr in &config.tls_listen {
            tls_first.push(bind_tcp_reuseport(*addr).with_context(|| format!("binding tls {addr}"))?);
        }
        let firsts = tcp_first
            .into_iter()
            .map(|l| (l, Transport::Tcp))
            .chain(tls_first.into_iter().map(|l| (l, Transport::Tls)));
        for (first, transport) in firsts {
            let name = transport.name();
            let bound = first.local_addr()?;
            stream_listen.push((bound, transport));
            stream_per_shard[0].push(StreamListener {
                addr: bound,
                transport,
                socket: first,
            });
            for list in stream_per_shard.iter_mut().skip(1) {
                let socket = bind_tcp_reuseport(bound).with_context(|| format!("binding {name} {bound}"))?;
                list.push(StreamListener {
                    addr: bound,
                    transport,
                    socket,
                });
            }
        }
        let stream_shared = Arc::new(StreamShared::default());
        #[cfg(feature = "xdp")]
        let (xdp, mut xdp_offloads) = start_xdp(&config, shards);
        #[cfg(not(feature = "xdp"))]
        if !config.xdp.is_empty() {
            tracing::warn!("xdp: this build has no XDP support (the xdp cargo feature); relaying in user space");
        }
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| anyhow!("reading random bytes: {e}"))?;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let epoch = Instant::now();
        let policy = config.peer_policy(&listen);
        let server_config = config.server.clone();

        let (control_tx, control_rx) = crossbeam_channel::bounded(QUEUE);
        let routes = Arc::new(RwLock::new(ahash::AHashMap::new()));
        let mut ios = Vec::new();
        let mut handles = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..shards {
            let io = Io::new(backend, config.ring_entries, config.udp_gso, config.udp_gro)
                .context("creating the I/O backend")?;
            let (tx, rx) = crossbeam_channel::bounded(QUEUE);
            handles.push(ShardHandle { tx, waker: io.waker() });
            inboxes.push(rx);
            ios.push(io);
        }
        // With a metrics endpoint: one publication slot per shard and one for the control
        // thread, read by the exporter.
        let state = Arc::new(State::default());
        let control_slot = Arc::new(Mutex::new(ControlPublished::default()));
        let slots: Vec<Slot> = (0..shards).map(|_| Slot::default()).collect();
        let metrics = match config.metrics_listen {
            None => None,
            Some(_) => Some(Metrics::new(
                slots.clone(),
                control_slot.clone(),
                state.clone(),
                &config.server.realm,
                backend.name(),
                config.metrics_coturn_names,
            )?),
        };
        let mut built = Vec::new();
        for (index, (((io, inbox), listeners), stream_listeners)) in ios
            .into_iter()
            .zip(inboxes)
            .zip(per_shard)
            .zip(stream_per_shard)
            .enumerate()
        {
            // The same secret on every shard: a nonce issued by one validates on another.
            // Each shard's Data indication transaction IDs from its own CSPRNG seed.
            let mut tid_seed = [0u8; 32];
            getrandom::getrandom(&mut tid_seed).map_err(|e| anyhow!("reading random bytes: {e}"))?;
            let server = Server::new(
                server_config.clone(),
                config.credentials.clone(),
                policy.clone(),
                secret,
                epoch,
                unix,
            )
            .with_tid_seed(tid_seed)
            // RFC 6062 CONNECTION-IDs name their shard, for ConnectionBinds arriving elsewhere.
            .with_connection_tag(u8::try_from(index).map_err(|_| anyhow!("at most 256 shards"))?);
            built.push(Shard::new(ShardParts {
                index,
                server,
                io,
                listeners,
                control: control_tx.clone(),
                inbox,
                peers: handles.clone(),
                routes: routes.clone(),
                metrics: metrics.as_ref().map(|m| (slots[index].clone(), m.histograms())),
                streams: Streams::new(
                    stream_listeners,
                    config.streams,
                    stream_shared.clone(),
                    config.tls.clone(),
                )?,
                #[cfg(feature = "xdp")]
                xdp: xdp_offloads[index].take(),
            })?);
        }
        let shard_handles = handles.clone();
        let control = Control::new(
            ControlConfig {
                allocator: AllocatorConfig {
                    relay_ips: config.relay_ips.clone(),
                    ports: config.ports,
                    user_quota: config.user_quota,
                    total_quota: config.total_quota,
                    seed: u64::from_le_bytes(secret[8..16].try_into()?),
                },
                relay_socket_buffer: config.relay_socket_buffer,
            },
            handles,
            routes,
        );
        let control = if metrics.is_some() {
            control.with_metrics(control_slot)
        } else {
            control
        };
        Ok(Runtime {
            shards: built,
            control,
            control_rx,
            listen,
            stream_listen,
            backend,
            backend_reason,
            pin: config.pin_cores,
            metrics,
            state,
            handles: shard_handles,
            drain: None,
            reload: None,
            control_tx: control_tx.clone(),
            restart_only: restart_only(&config),
            alternate_server: config.alternate_server,
            drain_timeout: config.drain_timeout,
            #[cfg(feature = "xdp")]
            xdp,
        })
    }

    /// The bound listening addresses (port 0 resolved).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// The bound TCP and TLS listening addresses (port 0 resolved).
    pub fn stream_listen_addrs(&self) -> &[(SocketAddr, Transport)] {
        &self.stream_listen
    }

    /// Drains when `signal` is set (SIGUSR1): the shards refuse new Allocates (300 with
    /// `--alternate-server`, else 403), `/readyz` answers 503, and [`Runtime::run`] returns
    /// once the last allocation is gone or `--drain-timeout` has passed.
    pub fn drain_on(&mut self, signal: Arc<AtomicBool>) {
        self.drain = Some(signal);
    }

    /// Reloads when `signal` is set (SIGHUP): `reloader` re-reads the configuration, and
    /// users, REST secrets, limits, quotas, the peer policy and the drain settings take
    /// effect without dropping an allocation; a configuration that does not load keeps the
    /// running one (counted in `turnpike_config_reloads_total{result="failure"}`).
    pub fn reload_on(&mut self, signal: Arc<AtomicBool>, reloader: Reloader) {
        self.reload = Some((signal, reloader));
    }

    /// The metrics of this runtime (with `--metrics-listen`), to serve on an
    /// [`crate::metrics::Endpoint`].
    pub fn take_metrics(&mut self) -> Option<Metrics> {
        self.metrics.take()
    }

    /// The backend in use and why it was chosen.
    pub fn backend(&self) -> (BackendKind, &str) {
        (self.backend, &self.backend_reason)
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shards and the control thread's work, for callers that drive them on threads of
    /// their own (tests that count a shard thread's heap allocations, benchmarks).
    pub fn into_parts(self) -> (Vec<Shard>, ControlRunner) {
        (
            self.shards,
            ControlRunner {
                control: self.control,
                rx: self.control_rx,
            },
        )
    }

    /// Runs every shard on its own thread (pinned to the allowed cores in turn) and the
    /// control thread until `shutdown` is set; returns the totals.
    ///
    /// # Errors
    /// When a shard's backend fails.
    pub fn run(self, shutdown: Arc<AtomicBool>) -> Result<Report> {
        let kernel_before = kernel_udp_buffer_errors();
        let cores = if self.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut signals = Signals {
            drain: self.drain,
            reload: self.reload,
            state: self.state,
            handles: self.handles,
            control: self.control_tx,
            listen: self.listen.clone(),
            restart_only: self.restart_only,
            alternate: self.alternate_server,
            timeout: self.drain_timeout,
        };
        // The XDP program stays attached while the shards run.
        #[cfg(feature = "xdp")]
        let _xdp = self.xdp;
        let control = self.control;
        let control_rx = self.control_rx;
        // The control thread outlives the shards so that their last releases are counted.
        let shards_done = Arc::new(AtomicBool::new(false));
        let shards_done_ctl = shards_done.clone();
        let control_thread = thread::Builder::new()
            .name("turnpike-control".into())
            .spawn(move || control.run(control_rx, &shards_done_ctl))?;
        let mut threads = Vec::new();
        for (i, mut shard) in self.shards.into_iter().enumerate() {
            let stop = shutdown.clone();
            let allocations = shard.allocation_counter();
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            threads.push((
                thread::Builder::new()
                    .name(format!("turnpike-shard-{i}"))
                    .spawn(move || {
                        if let Some(core) = core {
                            core_affinity::set_for_current(core);
                        }
                        let result = shard.run(&stop);
                        (shard.stats(), result)
                    })?,
                allocations,
            ));
        }
        let counters: Vec<_> = threads.iter().map(|(_, c)| c.clone()).collect();
        signals.watch(&shutdown, &counters, &threads);
        let threads: Vec<_> = threads.into_iter().map(|(t, _)| t).collect();
        let mut report = Report::default();
        let mut failure = None;
        for t in threads {
            let (s, result) = t.join().map_err(|_| anyhow!("a shard thread panicked"))?;
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
            report.stats.add(&s);
        }
        shards_done.store(true, std::sync::atomic::Ordering::Relaxed);
        report.control = control_thread
            .join()
            .map_err(|_| anyhow!("the control thread panicked"))?;
        for (i, r) in DROP_REASONS.iter().enumerate() {
            if report.stats.drops[i] > 0 {
                report.drops.insert(*r, report.stats.drops[i]);
            }
        }
        if let (Some(before), Some(after)) = (kernel_before, kernel_udp_buffer_errors()) {
            report.kernel_rcvbuf_errors = after.0.saturating_sub(before.0);
            report.kernel_sndbuf_errors = after.1.saturating_sub(before.1);
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
        Ok(report)
    }
}

/// Re-reads the configuration for a reload (SIGHUP); an error keeps the running one.
pub type Reloader = Box<dyn FnMut() -> Result<Config> + Send>;

/// What [`Runtime::run`] watches besides the shards: drain and reload signals.
struct Signals {
    drain: Option<Arc<AtomicBool>>,
    reload: Option<(Arc<AtomicBool>, Reloader)>,
    state: Arc<State>,
    handles: Vec<ShardHandle>,
    control: crossbeam_channel::Sender<ControlRequest>,
    listen: Vec<SocketAddr>,
    restart_only: String,
    alternate: Option<SocketAddr>,
    timeout: std::time::Duration,
}

type ShardThread = (
    thread::JoinHandle<(ShardStats, std::io::Result<()>)>,
    Arc<std::sync::atomic::AtomicUsize>,
);

/// The settings a reload cannot change (sockets and threads), as text to compare.
fn restart_only(config: &Config) -> String {
    format!(
        "{:?} {:?} {:?} {} {:?} {}",
        config.listen, config.relay_ips, config.ports, config.shards, config.io_backend, config.ring_entries
    )
}

impl Signals {
    /// Until shutdown: applies reloads (SIGHUP); when the drain signal comes, tells every
    /// shard to drain, then sets `shutdown` once no shard holds an allocation or the drain
    /// timeout has passed. Returns at once with neither signal; also when a shard thread
    /// ended.
    fn watch(
        &mut self,
        shutdown: &AtomicBool,
        allocations: &[Arc<std::sync::atomic::AtomicUsize>],
        threads: &[ShardThread],
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.drain.is_none() && self.reload.is_none() {
            return;
        }
        let mut started: Option<Instant> = None;
        while !shutdown.load(Relaxed) && !threads.iter().any(|(t, _)| t.is_finished()) {
            thread::sleep(std::time::Duration::from_millis(50));
            if self.reload.as_ref().is_some_and(|(flag, _)| flag.swap(false, Relaxed)) {
                self.reload_now();
            }
            if started.is_none() && self.drain.as_ref().is_some_and(|d| d.load(Relaxed)) {
                started = Some(Instant::now());
                self.state.draining.store(true, Relaxed);
                for h in &self.handles {
                    h.send(ShardMessage::Drain {
                        alternate: self.alternate,
                    });
                }
                tracing::info!(
                    alternate = ?self.alternate,
                    timeout_s = self.timeout.as_secs(),
                    "draining: new allocations refused, waiting for the held ones to end"
                );
            }
            let Some(t0) = started else { continue };
            let held: usize = allocations.iter().map(|a| a.load(Relaxed)).sum();
            if held == 0 && t0.elapsed() > std::time::Duration::from_millis(200) {
                tracing::info!("drained: no allocation left, exiting");
                shutdown.store(true, Relaxed);
            } else if t0.elapsed() >= self.timeout {
                tracing::info!(held, "drain timeout, exiting");
                shutdown.store(true, Relaxed);
            }
        }
    }

    /// Re-reads the configuration and hands it to the shards and the control thread; a
    /// file that does not parse (or does not resolve) keeps the running configuration.
    fn reload_now(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some((_, reloader)) = &mut self.reload else {
            return;
        };
        let config = match reloader() {
            Ok(c) => c,
            Err(e) => {
                self.state.reloads_failed.fetch_add(1, Relaxed);
                tracing::warn!("configuration reload failed, the running configuration stays: {e:#}");
                return;
            }
        };
        if restart_only(&config) != self.restart_only {
            tracing::warn!("listen addresses, relay IPs, ports, shards and the I/O backend change only on restart");
        }
        let reload = crate::control::Reload {
            config: config.server.clone(),
            credentials: config.credentials.clone(),
            policy: config.peer_policy(&self.listen),
            tls: config.tls.clone(),
        };
        for h in &self.handles {
            h.send(ShardMessage::Reload(Box::new(reload.clone())));
        }
        let _ = self.control.send(ControlRequest::SetQuotas {
            user_quota: config.user_quota,
            total_quota: config.total_quota,
        });
        self.alternate = config.alternate_server;
        self.timeout = config.drain_timeout;
        self.state.reloads_ok.fetch_add(1, Relaxed);
        tracing::info!(
            users = config.user_count,
            secrets = config.secret_count,
            "configuration reloaded"
        );
    }
}

/// The control thread's work, from [`Runtime::into_parts`].
pub struct ControlRunner {
    control: Control,
    rx: crossbeam_channel::Receiver<crate::control::ControlRequest>,
}

impl ControlRunner {
    /// Serves the shards until `stop` is set and the queue is drained.
    pub fn run(self, stop: &AtomicBool) -> ControlReport {
        self.control.run(self.rx, stop)
    }
}
