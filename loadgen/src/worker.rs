//! Worker threads. Each owns a contiguous share of the allocations (one client socket or
//! connection each) and every `threads`-th echo peer, runs their STUN transactions (setup,
//! refresh, release), sends the traffic with sendmmsg and receives with recvmmsg (UDP) or
//! writes and reads framed messages on the connections (TCP, TLS: [`crate::stream`]), all
//! from one level-triggered epoll loop. The main thread steers the phases through
//! [`Shared`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, Socket, Type};
use turnpike::proto::channel_data::{self, ChannelData};
use turnpike::proto::client::{Client, Reply};
use turnpike::proto::framing::{self, Frame};
use turnpike::proto::stun::attribute::kind;
use turnpike::proto::stun::{
    Attribute, Class, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm, TransactionId,
};

use crate::cli::{Mode, Plan, Rate};
use crate::payload;
use crate::stream::{Conn, Input};
use crate::sys::{self, Epoll, RecvBatch, MAX_BATCH};

mod export;

/// Phase: set up allocations.
pub const PH_SETUP: u8 = 0;
/// Phase: set up finished, waiting for traffic (refreshes continue).
pub const PH_IDLE: u8 = 1;
/// Phase: send traffic until `traffic_end_ns`.
pub const PH_TRAFFIC: u8 = 2;
/// Phase: stop sending, keep receiving.
pub const PH_DRAIN: u8 = 3;
/// Phase: release allocations (Refresh LIFETIME 0).
pub const PH_RELEASE: u8 = 4;
/// Phase: exit.
pub const PH_DONE: u8 = 5;

/// State shared between the main thread and the workers.
pub struct Shared {
    /// Clock base of payload timestamps.
    pub base: Instant,
    /// Current phase (`PH_*`).
    pub phase: AtomicU8,
    /// Traffic start, ns since `base`.
    pub traffic_start_ns: AtomicU64,
    /// Traffic end, ns since `base`.
    pub traffic_end_ns: AtomicU64,
    /// One entry per worker.
    pub progress: Vec<Progress>,
}

/// Live counters of one worker, read by the main thread for the progress bar and phase
/// decisions.
#[derive(Default)]
pub struct Progress {
    /// Allocations fully set up.
    pub setup_ok: AtomicU64,
    /// Allocations that failed to set up.
    pub setup_failed: AtomicU64,
    /// Every allocation of this worker is set up or failed.
    pub setup_settled: AtomicBool,
    /// When `setup_settled` became true, ns since the clock base.
    pub setup_settled_ns: AtomicU64,
    /// Packets sent client → relay.
    pub sent: AtomicU64,
    /// Packets received relay → client.
    pub received: AtomicU64,
    /// Every allocation of this worker is released (or gave up).
    pub release_settled: AtomicBool,
    /// `--flows-out`: the flows of this worker's allocations that were set up, filled just
    /// before `setup_settled` becomes true.
    pub flows: std::sync::Mutex<Vec<crate::flows::Flow>>,
}

/// Final counters of one worker (summed over workers for the report).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Allocations set up (every channel bound).
    pub setup_ok: u64,
    /// Allocations that failed to set up.
    pub setup_failed: u64,
    /// Channels (or permissions, or raw registrations) in place.
    pub channels_ready: u64,
    /// Packets sent client → relay during traffic.
    pub client_tx: u64,
    /// Packets received relay → client (valid payloads).
    pub client_rx: u64,
    /// Packets the echo peers received (valid payloads).
    pub peer_rx: u64,
    /// Packets the echo peers sent back.
    pub peer_tx: u64,
    /// Datagrams at peers or clients that were not loadgen payloads or STUN.
    pub garbage: u64,
    /// Payloads that arrived with a sequence number not above the channel's highest seen.
    pub reordered: u64,
    /// sendmmsg refusals (socket buffer full, ECONNREFUSED, ...), in packets.
    pub send_failures: u64,
    /// Allocation refresh cycles completed.
    pub refresh_ok: u64,
    /// Allocation refresh cycles that failed.
    pub refresh_failed: u64,
    /// Allocations released with LIFETIME 0.
    pub released: u64,
    /// Releases that failed or timed out.
    pub release_failed: u64,
    /// Requests repeated after 438 Stale Nonce (or 401 with a new nonce).
    pub nonce_retries: u64,
    /// STUN retransmissions.
    pub retransmits: u64,
    /// Responses that matched no outstanding transaction.
    pub stray_responses: u64,
    /// `--rate max`: times the window stalled for 20 ms and its packets were written off.
    pub window_stalls: u64,
    /// Fixed rate: packets scheduled by the clock (sent or not).
    pub scheduled: u64,
    /// Fixed rate: the largest backlog behind the schedule, ns.
    pub max_lag_ns: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// Of those, TLS 1.3.
    pub tls13: u64,
    /// Of those, with ALPN `stun.turn` selected by the server.
    pub alpn_stun_turn: u64,
    /// Errors by STUN code or kind ("486", "timeout", "integrity", "bind", ...).
    pub errors: BTreeMap<String, u64>,
}

impl Counters {
    /// Adds `o` into `self`.
    pub fn merge(&mut self, o: &Counters) {
        self.setup_ok += o.setup_ok;
        self.setup_failed += o.setup_failed;
        self.channels_ready += o.channels_ready;
        self.client_tx += o.client_tx;
        self.client_rx += o.client_rx;
        self.peer_rx += o.peer_rx;
        self.peer_tx += o.peer_tx;
        self.garbage += o.garbage;
        self.reordered += o.reordered;
        self.send_failures += o.send_failures;
        self.refresh_ok += o.refresh_ok;
        self.refresh_failed += o.refresh_failed;
        self.released += o.released;
        self.release_failed += o.release_failed;
        self.nonce_retries += o.nonce_retries;
        self.retransmits += o.retransmits;
        self.stray_responses += o.stray_responses;
        self.window_stalls += o.window_stalls;
        self.scheduled += o.scheduled;
        self.max_lag_ns = self.max_lag_ns.max(o.max_lag_ns);
        self.tls_handshakes += o.tls_handshakes;
        self.tls13 += o.tls13;
        self.alpn_stun_turn += o.alpn_stun_turn;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

/// What a worker hands back when it exits.
pub struct Outcome {
    /// Counters.
    pub counters: Counters,
    /// Round-trip times in ns.
    pub rtt: Histogram<u64>,
    /// STUN transaction times (first transmission to answer) in ns.
    pub stun_rtt: Histogram<u64>,
}

/// A new RTT histogram: 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Idle,
    Setup,
    Ready,
    Refresh,
    Failed,
    Releasing,
    Released,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Allocate,
    Bind(u16),
    Permission,
    Refresh,
    Register(u16),
    Release,
}

struct Txn {
    tid: [u8; 12],
    first_sent: Instant,
    serial: u32,
    tries: u8,
    authed: bool,
}

struct Alloc {
    sock: Option<Socket>,
    /// The TCP or TLS connection (stream transports; `sock` is then `None`).
    conn: Option<Box<Conn>>,
    /// The socket's or connection's descriptor; -1 before it opens and after a connection
    /// died.
    fd: RawFd,
    st: St,
    step: Step,
    txn: Option<Txn>,
    req: Vec<u8>,
    /// The sans-IO client of this allocation's 5-tuple: credentials, realm and nonce.
    client: Client,
    relayed: bool,
    /// The XOR-RELAYED-ADDRESS of the allocation (IPv4), for `--flows-out`.
    relayed_addr: Option<SocketAddrV4>,
    lifetime: u32,
    auth_tries: u8,
}

#[derive(Default, Clone, Copy)]
struct Chan {
    next_seq: u32,
    rx: u32,
    max_seq: u32,
}

const TIMER_RTX: u8 = 0;
const TIMER_REFRESH: u8 = 1;
const PEER_TOKEN: u64 = 1 << 40;
const MAX_TRIES: u8 = 5;
const RELEASE_TRIES: u8 = 2;
const WINDOW_STALL: Duration = Duration::from_millis(20);
/// Stream transports: output queued beyond what the kernel took, per connection, above
/// which traffic packets are refused (counted as send failures, as a full UDP socket buffer
/// refuses datagrams).
const STREAM_TX_LIMIT: usize = 64 * 1024;
/// Stream transports: the read buffer (more than one `read_tls`'s plaintext).
const STREAM_READ_BUF: usize = 64 * 1024;
/// Stream transports: reads per readiness event.
const STREAM_READS: usize = 4;
/// Longest message accepted on a stream (a STUN header plus the largest length field).
const STREAM_MAX_FRAME: usize = 20 + 65_535;

/// One worker thread's state.
pub struct Worker {
    id: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    peer_addrs: Arc<Vec<SocketAddrV4>>,
    first_alloc: usize,
    allocs: Vec<Alloc>,
    chans: Vec<Chan>,
    peers: Vec<UdpSocket>,
    ep: Epoll,
    /// The realm and nonce of the last challenge, for `--reuse-nonce`.
    last_challenge: Option<(String, String)>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32, u8)>>,
    serial: u32,
    c: Counters,
    rtt: Histogram<u64>,
    stun_rtt: Histogram<u64>,
    // setup bookkeeping
    started: usize,
    settled: usize,
    outstanding: usize,
    setup_t0: Option<Instant>,
    setup_rate: f64,
    setup_conc: usize,
    // release bookkeeping
    release_t0: Option<Instant>,
    release_cursor: usize,
    release_started: usize,
    release_pending: usize,
    // traffic
    rate: f64,
    cursor: usize,
    written_off: u64,
    last_rx: Instant,
    send_tid: u64,
    tx_bufs: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    /// Stream transports: the read buffer (empty for UDP).
    stream_rx: Vec<u8>,
}

fn token_alloc(a: usize) -> u64 {
    a as u64
}

impl Worker {
    /// A worker for allocations `first..first + count` (global indices) and the given peer
    /// sockets.
    pub fn new(
        id: usize,
        plan: Arc<Plan>,
        shared: Arc<Shared>,
        peer_addrs: Arc<Vec<SocketAddrV4>>,
        first: usize,
        count: usize,
        peers: Vec<UdpSocket>,
    ) -> anyhow::Result<Worker> {
        let ep = Epoll::new(1024)?;
        for (i, p) in peers.iter().enumerate() {
            ep.add(p.as_raw_fd(), PEER_TOKEN + i as u64)?;
        }
        let share = count as f64 / plan.allocations.max(1) as f64;
        let rate = match plan.rate {
            Rate::Pps(r) => r * share,
            Rate::Max => 0.0,
        };
        let allocs = (0..count)
            .map(|_| Alloc {
                sock: None,
                conn: None,
                fd: -1,
                st: St::Idle,
                step: Step::Allocate,
                txn: None,
                req: Vec::new(),
                client: Client::new(&plan.username, &plan.password, PasswordAlgorithm::Md5),
                relayed: false,
                relayed_addr: None,
                lifetime: 0,
                auth_tries: 0,
            })
            .collect();
        let k = plan.per_alloc;
        Ok(Worker {
            id,
            setup_rate: (plan.setup_rate * share).max(1e-3),
            setup_conc: ((plan.setup_concurrency as f64 * share).ceil() as usize).max(1),
            shared,
            peer_addrs,
            first_alloc: first,
            allocs,
            chans: vec![Chan::default(); count * k],
            peers,
            ep,
            last_challenge: None,
            timers: BinaryHeap::new(),
            serial: 0,
            c: Counters::default(),
            rtt: new_histogram(),
            stun_rtt: new_histogram(),
            started: 0,
            settled: 0,
            outstanding: 0,
            setup_t0: None,
            release_t0: None,
            release_cursor: 0,
            release_started: 0,
            release_pending: 0,
            rate,
            cursor: 0,
            written_off: 0,
            last_rx: Instant::now(),
            send_tid: 0,
            tx_bufs: vec![Vec::new(); k * plan.burst],
            scratch: Vec::new(),
            stream_rx: if plan.transport.is_stream() {
                vec![0; STREAM_READ_BUF]
            } else {
                Vec::new()
            },
            plan,
        })
    }

    fn now_ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.shared.base).as_nanos() as u64
    }

    fn err(&mut self, what: impl Into<String>) {
        *self.c.errors.entry(what.into()).or_default() += 1;
    }

    fn peer_of(&self, a: usize, j: usize) -> SocketAddrV4 {
        let p = &self.peer_addrs;
        p[(self.first_alloc + a + j) % p.len()]
    }

    fn global_chan(&self, a: usize, j: usize) -> u32 {
        ((self.first_alloc + a) * self.plan.per_alloc + j) as u32
    }

    /// Runs the loop until the main thread sets [`PH_DONE`].
    pub fn run(mut self) -> anyhow::Result<Outcome> {
        sys::tight_timer_slack();
        let cap = (self.plan.size + 128).max(2048);
        let mut rb = RecvBatch::new(cap);
        let mut tokens = Vec::with_capacity(1024);
        let mut traffic_started = false;
        loop {
            let phase = self.shared.phase.load(Relaxed);
            let now = Instant::now();
            let mut wait = Duration::from_millis(2);
            match phase {
                PH_SETUP => wait = wait.min(self.setup_tick(now)),
                PH_TRAFFIC => {
                    if !traffic_started {
                        traffic_started = true;
                        self.last_rx = now;
                    }
                    wait = wait.min(self.traffic_tick(now));
                }
                PH_RELEASE => wait = wait.min(self.release_tick(now)),
                PH_DONE => break,
                _ => {}
            }
            wait = wait.min(self.fire_timers(now, phase));
            let p = &self.shared.progress[self.id];
            p.sent.store(self.c.client_tx, Relaxed);
            p.received.store(self.c.client_rx, Relaxed);
            self.ep.wait(wait, &mut tokens)?;
            let now = Instant::now();
            for &t in &tokens {
                if t >= PEER_TOKEN {
                    self.on_peer_readable((t - PEER_TOKEN) as usize, &mut rb);
                } else {
                    self.on_client_readable(t as usize, &mut rb, now);
                }
            }
        }
        for al in &mut self.allocs {
            if let Some(conn) = &mut al.conn {
                conn.close();
            }
        }
        Ok(Outcome {
            counters: self.c,
            rtt: self.rtt,
            stun_rtt: self.stun_rtt,
        })
    }

    // ---------------------------------------------------------------- setup

    fn setup_tick(&mut self, now: Instant) -> Duration {
        let t0 = *self.setup_t0.get_or_insert(now);
        let n = self.allocs.len();
        let mut wait = Duration::from_millis(2);
        if self.started < n {
            let allowed = (now.duration_since(t0).as_secs_f64() * self.setup_rate) as usize + 1;
            while self.started < n && self.started < allowed && self.outstanding < self.setup_conc {
                let a = self.started;
                self.started += 1;
                self.start_alloc(a, now);
            }
            if self.started < n {
                let next = t0 + Duration::from_secs_f64(self.started as f64 / self.setup_rate);
                wait = wait.min(next.saturating_duration_since(now));
            }
        }
        self.check_settled();
        wait
    }

    fn check_settled(&mut self) {
        let p = &self.shared.progress[self.id];
        if self.settled == self.allocs.len() && !p.setup_settled.load(Relaxed) {
            if self.plan.flows_out.is_some() {
                self.export_flows();
            }
            p.setup_settled_ns.store(self.now_ns(Instant::now()), Relaxed);
            p.setup_settled.store(true, Relaxed);
        }
    }

    fn start_alloc(&mut self, a: usize, now: Instant) {
        let ip = self.plan.local_ips[(self.first_alloc + a) % self.plan.local_ips.len()];
        if self.plan.transport.is_stream() {
            return self.start_stream_alloc(a, ip, now);
        }
        let sock = match open_client_socket(ip, self.plan.server) {
            Ok(s) => s,
            Err(e) => {
                self.err(format!("socket: {}", e.kind()));
                self.allocs[a].st = St::Failed;
                self.c.setup_failed += 1;
                self.settled += 1;
                self.shared.progress[self.id]
                    .setup_failed
                    .store(self.c.setup_failed, Relaxed);
                return;
            }
        };
        let fd = sock.as_raw_fd();
        if let Err(e) = self.ep.add(fd, token_alloc(a)) {
            self.err(format!("epoll: {}", e.kind()));
            self.allocs[a].st = St::Failed;
            self.c.setup_failed += 1;
            self.settled += 1;
            return;
        }
        let al = &mut self.allocs[a];
        al.sock = Some(sock);
        al.fd = fd;
        self.begin_setup(a, now);
    }

    /// Opens allocation `a`'s TCP or TLS connection (its first request waits in the output
    /// until the connection, and the TLS handshake, are up).
    fn start_stream_alloc(&mut self, a: usize, ip: std::net::Ipv4Addr, now: Instant) {
        let conn = match Conn::connect(ip, self.plan.server, self.plan.tls.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                self.err(format!("connect: {}", e.kind()));
                self.allocs[a].st = St::Failed;
                self.c.setup_failed += 1;
                self.settled += 1;
                self.shared.progress[self.id]
                    .setup_failed
                    .store(self.c.setup_failed, Relaxed);
                return;
            }
        };
        let fd = conn.fd();
        // Writable interest until the connection is up and the first bytes are out.
        if let Err(e) = self.ep.watch(fd, token_alloc(a), true, true) {
            self.err(format!("epoll: {}", e.kind()));
            self.allocs[a].st = St::Failed;
            self.c.setup_failed += 1;
            self.settled += 1;
            return;
        }
        let al = &mut self.allocs[a];
        al.conn = Some(Box::new(conn));
        al.conn.as_mut().expect("just set").watching_out = true;
        al.fd = fd;
        self.begin_setup(a, now);
    }

    fn begin_setup(&mut self, a: usize, now: Instant) {
        self.allocs[a].st = St::Setup;
        self.outstanding += 1;
        if let (true, Some((realm, nonce))) = (self.plan.reuse_nonce, &self.last_challenge) {
            self.allocs[a].client.set_realm_and_nonce(realm, nonce);
        }
        let first = match self.plan.mode {
            Mode::Turn => Step::Allocate,
            Mode::Raw => Step::Register(0),
        };
        self.send_step(a, first, now);
    }

    fn setup_done(&mut self, a: usize, ok: bool, now: Instant) {
        self.outstanding -= 1;
        self.settled += 1;
        let p = &self.shared.progress[self.id];
        if ok {
            self.c.setup_ok += 1;
            self.c.channels_ready += self.plan.per_alloc as u64;
            p.setup_ok.store(self.c.setup_ok, Relaxed);
            self.allocs[a].st = St::Ready;
            self.schedule_refresh(a, now);
        } else {
            self.c.setup_failed += 1;
            p.setup_failed.store(self.c.setup_failed, Relaxed);
            self.allocs[a].st = St::Failed;
        }
        self.check_settled();
    }

    fn schedule_refresh(&mut self, a: usize, now: Instant) {
        if self.plan.mode == Mode::Raw {
            return;
        }
        let lifetime = self.allocs[a].lifetime.max(1);
        let every = self
            .plan
            .refresh_interval
            .unwrap_or_else(|| Duration::from_secs((lifetime as u64 / 2).min(240)));
        self.timers.push(Reverse((now + every, a as u32, 0, TIMER_REFRESH)));
    }

    // ---------------------------------------------------------------- transactions

    fn send_step(&mut self, a: usize, step: Step, now: Instant) {
        self.serial = self.serial.wrapping_add(1);
        let serial = self.serial;
        let mut tid = [0u8; 12];
        tid[0] = self.id as u8;
        tid[1..5].copy_from_slice(&(a as u32).to_be_bytes());
        tid[5..9].copy_from_slice(&serial.to_be_bytes());
        tid[9..12].copy_from_slice(&(std::process::id() as u32).to_be_bytes()[1..]);
        let mut req = std::mem::take(&mut self.allocs[a].req);
        let authed = self.build_request(a, step, TransactionId(tid), &mut req);
        let al = &mut self.allocs[a];
        al.req = req;
        al.step = step;
        al.txn = Some(Txn {
            tid,
            first_sent: now,
            serial,
            tries: 1,
            authed,
        });
        self.transmit(a);
        self.timers
            .push(Reverse((now + self.plan.rto, a as u32, serial, TIMER_RTX)));
    }

    fn transmit(&mut self, a: usize) {
        let al = &mut self.allocs[a];
        if let Some(conn) = &mut al.conn {
            let r = conn.queue(&al.req).and_then(|()| conn.flush());
            self.after_stream_write(a, r);
            return;
        }
        if al.fd < 0 {
            // A connection that died: its transaction times out.
            return;
        }
        if let Err(e) = sys::send_batch(al.fd, &[(&al.req[..], None)]) {
            self.err(format!("send: {}", e.kind()));
        }
    }

    /// Encodes the request for `step` into `out`; returns whether it carries credentials.
    fn build_request(&mut self, a: usize, step: Step, tid: TransactionId, out: &mut Vec<u8>) -> bool {
        if let Step::Register(j) = step {
            let id = self.global_chan(a, j as usize);
            let peer = self.peer_of(a, j as usize);
            out.clear();
            out.extend_from_slice(&payload::registration(id, peer));
            return false;
        }
        let method = match step {
            Step::Allocate => Method::Allocate,
            Step::Bind(_) => Method::ChannelBind,
            Step::Permission => Method::CreatePermission,
            Step::Refresh | Step::Release => Method::Refresh,
            Step::Register(_) => unreachable!("handled above"),
        };
        let peers: Vec<SocketAddrV4> = match step {
            Step::Bind(j) => vec![self.peer_of(a, j as usize)],
            Step::Permission => (0..self.plan.per_alloc).map(|j| self.peer_of(a, j)).collect(),
            _ => Vec::new(),
        };
        let attrs: Vec<Attribute<'_>> = match step {
            Step::Allocate => vec![
                Attribute::RequestedTransport(17),
                Attribute::Lifetime(self.plan.lifetime),
            ],
            Step::Bind(j) => vec![
                Attribute::ChannelNumber(channel_data::MIN_CHANNEL + j),
                Attribute::XorPeerAddress(SocketAddr::V4(peers[0])),
            ],
            Step::Permission => peers
                .iter()
                .map(|p| Attribute::XorPeerAddress(SocketAddr::V4(*p)))
                .collect(),
            Step::Refresh => vec![Attribute::Lifetime(self.plan.lifetime)],
            Step::Release => vec![Attribute::Lifetime(0)],
            Step::Register(_) => Vec::new(),
        };
        self.allocs[a].client.encode_request(method, tid, &attrs, out)
    }

    fn fire_timers(&mut self, now: Instant, phase: u8) -> Duration {
        while let Some(&Reverse((t, a, serial, what))) = self.timers.peek() {
            if t > now {
                return t - now;
            }
            self.timers.pop();
            let a = a as usize;
            if what == TIMER_REFRESH {
                if self.allocs[a].st == St::Ready && phase < PH_RELEASE {
                    self.allocs[a].st = St::Refresh;
                    self.allocs[a].auth_tries = 0;
                    self.send_step(a, Step::Refresh, now);
                }
                continue;
            }
            let limit = if self.allocs[a].step == Step::Release {
                RELEASE_TRIES
            } else {
                MAX_TRIES
            };
            let Some(txn) = &mut self.allocs[a].txn else { continue };
            if txn.serial != serial {
                continue;
            }
            if txn.tries < limit {
                txn.tries += 1;
                let backoff = self.plan.rto * (1u32 << (txn.tries - 1));
                // Over TCP and TLS a request is sent once (RFC 8489 §6.2.2); the timer
                // only bounds the wait, with the same total as the UDP retransmissions.
                if !self.plan.transport.is_stream() {
                    self.c.retransmits += 1;
                    self.transmit(a);
                }
                self.timers.push(Reverse((now + backoff, a as u32, serial, TIMER_RTX)));
            } else {
                self.allocs[a].txn = None;
                self.step_failed(a, "timeout".to_string(), now);
            }
        }
        Duration::from_millis(2)
    }

    fn step_failed(&mut self, a: usize, what: String, now: Instant) {
        let step = self.allocs[a].step;
        let st = self.allocs[a].st;
        self.err(what);
        match st {
            St::Setup => self.setup_done(a, false, now),
            St::Refresh => {
                self.c.refresh_failed += 1;
                self.allocs[a].st = St::Failed;
            }
            St::Releasing => {
                self.c.release_failed += 1;
                self.allocs[a].st = St::Released;
                self.release_pending -= 1;
            }
            _ => {
                let _ = step;
            }
        }
    }

    fn step_succeeded(&mut self, a: usize, msg: &Message<'_>, now: Instant) {
        let step = self.allocs[a].step;
        let k = self.plan.per_alloc as u16;
        let bind_first = if self.plan.send_indications {
            Step::Permission
        } else {
            Step::Bind(0)
        };
        match step {
            Step::Allocate => {
                self.allocs[a].relayed = matches!(msg.get(kind::XOR_RELAYED_ADDRESS), Some(Ok(_)));
                if let Some(Ok(Attribute::XorRelayedAddress(SocketAddr::V4(r)))) = msg.get(kind::XOR_RELAYED_ADDRESS) {
                    self.allocs[a].relayed_addr = Some(r);
                }
                self.allocs[a].lifetime = match msg.get(kind::LIFETIME) {
                    Some(Ok(Attribute::Lifetime(l))) => l,
                    _ => 600,
                };
                if !self.allocs[a].relayed {
                    self.step_failed(a, "no XOR-RELAYED-ADDRESS".into(), now);
                    return;
                }
                self.send_step(a, bind_first, now);
            }
            Step::Refresh => {
                if let Some(Ok(Attribute::Lifetime(l))) = msg.get(kind::LIFETIME) {
                    self.allocs[a].lifetime = l;
                }
                self.send_step(a, bind_first, now);
            }
            Step::Bind(j) if j + 1 < k => self.send_step(a, Step::Bind(j + 1), now),
            Step::Register(j) if j + 1 < k => self.send_step(a, Step::Register(j + 1), now),
            Step::Bind(_) | Step::Permission | Step::Register(_) => self.finish(a, now),
            Step::Release => {
                self.c.released += 1;
                self.allocs[a].st = St::Released;
                self.release_pending -= 1;
            }
        }
    }

    fn finish(&mut self, a: usize, now: Instant) {
        match self.allocs[a].st {
            St::Setup => self.setup_done(a, true, now),
            St::Refresh => {
                self.c.refresh_ok += 1;
                self.allocs[a].st = St::Ready;
                self.schedule_refresh(a, now);
            }
            _ => {}
        }
    }

    fn on_response(&mut self, a: usize, msg: &Message<'_>, now: Instant) {
        let tid = msg.transaction_id().0;
        let authed = match &self.allocs[a].txn {
            Some(t) if t.tid == tid => {
                let ns = now.saturating_duration_since(t.first_sent).as_nanos() as u64;
                self.stun_rtt.saturating_record(ns.max(1));
                t.authed
            }
            _ => {
                self.c.stray_responses += 1;
                return;
            }
        };
        let step = self.allocs[a].step;
        self.allocs[a].txn = None;
        match self.allocs[a].client.handle_response(msg, authed) {
            Reply::Success => self.step_succeeded(a, msg, now),
            Reply::IntegrityFailed => self.step_failed(a, "integrity".into(), now),
            Reply::Retry => {
                if self.plan.reuse_nonce {
                    let c = &self.allocs[a].client;
                    if let (Some(realm), Some(nonce)) = (c.realm(), c.nonce()) {
                        self.last_challenge = Some((realm.to_string(), nonce.to_string()));
                    }
                }
                let al = &mut self.allocs[a];
                if al.auth_tries < 4 {
                    al.auth_tries += 1;
                    if authed {
                        self.c.nonce_retries += 1;
                    }
                    self.send_step(a, step, now);
                } else {
                    self.step_failed(a, "401".into(), now);
                }
            }
            // A 401 to a request that already carried the current nonce: wrong credentials.
            Reply::Unauthorized => self.step_failed(a, "401".into(), now),
            Reply::Error(code) if code.0 == 437 && step == Step::Release => {
                self.c.released += 1;
                self.allocs[a].st = St::Released;
                self.release_pending -= 1;
            }
            Reply::Error(code) => self.step_failed(a, code.0.to_string(), now),
        }
    }

    // ---------------------------------------------------------------- release

    fn release_tick(&mut self, now: Instant) -> Duration {
        let t0 = *self.release_t0.get_or_insert(now);
        let n = self.allocs.len();
        if self.plan.mode == Mode::Raw {
            self.shared.progress[self.id].release_settled.store(true, Relaxed);
            return Duration::from_millis(2);
        }
        let rate = self.setup_rate * 2.0;
        let allowed = (now.duration_since(t0).as_secs_f64() * rate) as usize + 1;
        while self.release_cursor < n && self.release_started < allowed && self.release_pending < self.setup_conc {
            let a = self.release_cursor;
            self.release_cursor += 1;
            let al = &mut self.allocs[a];
            if !al.relayed || matches!(al.st, St::Released | St::Releasing) || al.fd < 0 {
                continue;
            }
            al.st = St::Releasing;
            al.txn = None;
            al.auth_tries = 0;
            self.release_started += 1;
            self.release_pending += 1;
            self.send_step(a, Step::Release, now);
        }
        if self.release_cursor >= n && self.release_pending == 0 {
            self.shared.progress[self.id].release_settled.store(true, Relaxed);
        }
        Duration::from_millis(1)
    }

    // ---------------------------------------------------------------- traffic

    fn traffic_tick(&mut self, now: Instant) -> Duration {
        let now_ns = self.now_ns(now);
        let start = self.shared.traffic_start_ns.load(Relaxed);
        let end = self.shared.traffic_end_ns.load(Relaxed);
        if now_ns >= end || self.allocs.is_empty() {
            return Duration::from_millis(2);
        }
        // Packets one turn of an allocation sends.
        let k = (self.plan.per_alloc * self.plan.burst) as u64;
        match self.plan.rate {
            Rate::Pps(_) => {
                let expected = ((now_ns.saturating_sub(start)) as f64 * 1e-9 * self.rate) as u64;
                let due = expected.saturating_sub(self.c.scheduled);
                if due > 0 {
                    let lag = (due as f64 / self.rate * 1e9) as u64;
                    self.c.max_lag_ns = self.c.max_lag_ns.max(lag);
                    let budget = due.min(256) as usize;
                    let n = self.send_traffic(budget, now_ns);
                    self.c.scheduled += n as u64;
                    if n == 0 {
                        // Nothing live to send on: do not spin.
                        self.c.scheduled = expected;
                        return Duration::from_millis(1);
                    }
                }
                if expected.saturating_sub(self.c.scheduled) > 0 {
                    return Duration::ZERO;
                }
                let next_ns = start + (((self.c.scheduled + k) as f64 / self.rate) * 1e9) as u64;
                Duration::from_nanos(next_ns.saturating_sub(now_ns)).min(Duration::from_millis(2))
            }
            Rate::Max => {
                let inflight = (self.c.client_tx as i64) - (self.c.client_rx as i64) - (self.written_off as i64);
                let window = self.plan.window as i64;
                if inflight >= window {
                    if now.duration_since(self.last_rx) > WINDOW_STALL {
                        self.c.window_stalls += 1;
                        self.written_off += inflight.max(0) as u64;
                        self.last_rx = now;
                    }
                    return Duration::from_millis(1);
                }
                let budget = (window - inflight).min(256) as usize;
                let n = self.send_traffic(budget, now_ns);
                self.c.scheduled += n as u64;
                if n == 0 {
                    return Duration::from_millis(1);
                }
                Duration::ZERO
            }
        }
    }

    /// Sends about `budget` packets round-robin over the live allocations (all channels of
    /// an allocation, `--burst` packets each, back to back in one sendmmsg). Returns the packets scheduled (sent or refused).
    fn send_traffic(&mut self, budget: usize, now_ns: u64) -> usize {
        let n = self.allocs.len();
        let k = self.plan.per_alloc;
        let burst = self.plan.burst;
        let size = self.plan.size;
        let stream = self.plan.transport.is_stream();
        let pad = if stream { framing::channel_data_padding(size) } else { 0 };
        let mut done = 0;
        let mut skipped = 0;
        while done < budget && skipped < n {
            let a = self.cursor;
            self.cursor += 1;
            if self.cursor == n {
                self.cursor = 0;
            }
            if !matches!(self.allocs[a].st, St::Ready | St::Refresh) {
                skipped += 1;
                continue;
            }
            skipped = 0;
            for m in 0..k * burst {
                let j = m / burst;
                let gidx = self.global_chan(a, j);
                let ch = &mut self.chans[a * k + j];
                let h = payload::Header {
                    channel: gidx,
                    seq: ch.next_seq,
                    sent_ns: now_ns,
                };
                ch.next_seq = ch.next_seq.wrapping_add(1);
                let mut buf = std::mem::take(&mut self.tx_bufs[m]);
                match (self.plan.mode, self.plan.send_indications) {
                    (Mode::Raw, _) => {
                        buf.clear();
                        buf.resize(size, 0);
                        payload::write(&mut buf, h);
                    }
                    (Mode::Turn, false) => {
                        buf.clear();
                        buf.extend_from_slice(&ChannelData::header(channel_data::MIN_CHANNEL + j as u16, size as u16));
                        // RFC 8656 §12.5: padded to a multiple of 4 bytes over TCP and TLS.
                        buf.resize(channel_data::HEADER_LEN + size + pad, 0);
                        payload::write(&mut buf[channel_data::HEADER_LEN..], h);
                    }
                    (Mode::Turn, true) => {
                        let peer = self.peer_of(a, j);
                        self.scratch.clear();
                        self.scratch.resize(size, 0);
                        payload::write(&mut self.scratch, h);
                        self.send_tid = self.send_tid.wrapping_add(1);
                        let mut tid = [0u8; 12];
                        tid[0] = 0xFF;
                        tid[1] = self.id as u8;
                        tid[4..12].copy_from_slice(&self.send_tid.to_be_bytes());
                        let mut b = MessageBuilder::new(
                            &mut buf,
                            MessageType::new(Method::Send, Class::Indication),
                            TransactionId(tid),
                        );
                        b.attribute(&Attribute::XorPeerAddress(SocketAddr::V4(peer)));
                        b.attribute(&Attribute::Data(&self.scratch));
                    }
                }
                self.tx_bufs[m] = buf;
            }
            let total = k * burst;
            if stream {
                let sent = self.send_stream_traffic(a, total);
                self.c.client_tx += sent as u64;
                self.c.send_failures += (total - sent) as u64;
                done += total;
                continue;
            }
            let fd = self.allocs[a].fd;
            let mut msgs: [(&[u8], Option<SocketAddrV4>); MAX_BATCH] = [(&[], None); MAX_BATCH];
            let mut sent = 0;
            for chunk in self.tx_bufs[..total].chunks(MAX_BATCH) {
                for (i, b) in chunk.iter().enumerate() {
                    msgs[i] = (&b[..], None);
                }
                match sys::send_batch(fd, &msgs[..chunk.len()]) {
                    Ok(m) => sent += m,
                    Err(e) => {
                        *self.c.errors.entry(format!("send: {}", e.kind())).or_default() += 1;
                    }
                }
            }
            self.c.client_tx += sent as u64;
            self.c.send_failures += (total - sent) as u64;
            done += total;
        }
        done
    }

    // ---------------------------------------------------------------- receive

    fn on_client_readable(&mut self, a: usize, rb: &mut RecvBatch, now: Instant) {
        if self.plan.transport.is_stream() {
            return self.on_stream_ready(a, now);
        }
        let Some(fd) = self.allocs.get(a).map(|al| al.fd) else {
            return;
        };
        for _ in 0..4 {
            let n = match rb.recv(fd, MAX_BATCH) {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors surface here on connected sockets (ECONNREFUSED).
                    self.err(format!("recv: {}", e.kind()));
                    0
                }
            };
            let now_ns = self.now_ns(now);
            for i in 0..n {
                let (d, _) = rb.get(i);
                self.on_client_datagram(a, d, now, now_ns);
            }
            if n < MAX_BATCH {
                break;
            }
        }
    }

    // ---------------------------------------------------------------- streams

    /// Queues allocation `a`'s `k` traffic messages (`tx_bufs[..k]`, bursts included) on its connection and
    /// flushes; returns how many were taken (none while more than [`STREAM_TX_LIMIT`] bytes
    /// wait for the kernel).
    fn send_stream_traffic(&mut self, a: usize, k: usize) -> usize {
        let Some(conn) = self.allocs[a].conn.as_mut() else {
            return 0;
        };
        if conn.pending() > STREAM_TX_LIMIT {
            return 0;
        }
        let mut taken = 0;
        let mut r = Ok(());
        for b in &self.tx_bufs[..k] {
            r = conn.queue(b);
            if r.is_err() {
                break;
            }
            taken += 1;
        }
        if r.is_ok() {
            r = conn.flush();
        }
        self.after_stream_write(a, r);
        taken
    }

    /// After queueing or flushing on allocation `a`'s connection: a failed connection is
    /// closed; otherwise the socket is watched for writability exactly while bytes wait.
    fn after_stream_write(&mut self, a: usize, r: std::io::Result<()>) {
        let Some(conn) = self.allocs[a].conn.as_mut() else {
            return;
        };
        if let Err(e) = r {
            let what = format!("conn: {}", e.kind());
            self.stream_died(a, what, Instant::now());
            return;
        }
        let want = conn.pending() > 0;
        if want != conn.watching_out {
            conn.watching_out = want;
            let fd = conn.fd();
            if let Err(e) = self.ep.watch(fd, token_alloc(a), want, false) {
                self.err(format!("epoll: {}", e.kind()));
            }
        }
    }

    /// Allocation `a`'s connection is readable or writable: writes what waits, reads, and
    /// hands each complete message to [`Worker::on_client_datagram`].
    fn on_stream_ready(&mut self, a: usize, now: Instant) {
        let Some(conn) = self.allocs.get_mut(a).and_then(|al| al.conn.as_mut()) else {
            return;
        };
        let r = conn.flush();
        self.after_stream_write(a, r);
        let now_ns = self.now_ns(now);
        let mut buf = std::mem::take(&mut self.stream_rx);
        for _ in 0..STREAM_READS {
            let Some(conn) = self.allocs[a].conn.as_mut() else {
                break;
            };
            let input = conn.read(&mut buf);
            if let Some(hs) = conn.take_handshake() {
                self.c.tls_handshakes += 1;
                self.c.tls13 += hs.tls13 as u64;
                self.c.alpn_stun_turn += hs.alpn_stun_turn as u64;
            }
            match input {
                Ok(Input::Data(n)) => self.on_stream_bytes(a, &buf[..n], now, now_ns),
                Ok(Input::WouldBlock) => break,
                Ok(Input::Eof) => {
                    self.stream_died(a, "conn: closed by server".into(), now);
                    break;
                }
                Err(e) => {
                    let what = match e.get_ref() {
                        // TLS failures by kind (certificate, alert, ...).
                        Some(inner) if e.kind() == std::io::ErrorKind::InvalidData => format!("tls: {inner}"),
                        _ => format!("conn: {}", e.kind()),
                    };
                    self.stream_died(a, what, now);
                    break;
                }
            }
        }
        self.stream_rx = buf;
        // Handshake records, and requests rustls held until the handshake ended, queued
        // while reading.
        if let Some(conn) = self.allocs[a].conn.as_mut() {
            if conn.pending() > 0 {
                let r = conn.flush();
                self.after_stream_write(a, r);
            }
        }
    }

    /// Frames the plaintext `data` (after the connection's incomplete message, if any) into
    /// messages; keeps an incomplete tail for the next read.
    fn on_stream_bytes(&mut self, a: usize, data: &[u8], now: Instant, now_ns: u64) {
        let Some(conn) = self.allocs[a].conn.as_mut() else {
            return;
        };
        let mut partial = std::mem::take(&mut conn.partial);
        let carried = !partial.is_empty();
        if carried {
            partial.extend_from_slice(data);
        }
        let bytes: &[u8] = if carried { &partial } else { data };
        let mut at = 0;
        let mut dead = None;
        // Each message is at least 4 bytes: at most len / 4 rounds.
        while at < bytes.len() {
            match framing::next_frame(&bytes[at..], STREAM_MAX_FRAME) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::Stun(n)) | Ok(Frame::ChannelData(n)) => {
                    self.on_client_datagram(a, &bytes[at..at + n], now, now_ns);
                    at += n;
                }
                Err(e) => {
                    dead = Some(format!("framing: {}", e.as_str()));
                    break;
                }
            }
        }
        if let Some(what) = dead {
            self.stream_died(a, what, now);
            return;
        }
        if carried {
            partial.drain(..at);
        } else {
            partial.extend_from_slice(&data[at..]);
        }
        if let Some(conn) = self.allocs[a].conn.as_mut() {
            conn.partial = partial;
        }
    }

    /// Allocation `a`'s connection ended (closed by the server, reset, TLS failure,
    /// unframeable bytes): it is closed, and its allocation fails unless it was already
    /// released or failed (then nothing is counted).
    fn stream_died(&mut self, a: usize, what: String, now: Instant) {
        let al = &mut self.allocs[a];
        if let Some(conn) = al.conn.take() {
            self.ep.remove(conn.fd());
        }
        al.fd = -1;
        let st = al.st;
        if matches!(st, St::Released | St::Failed | St::Idle) {
            return;
        }
        al.txn = None;
        match st {
            St::Setup | St::Refresh | St::Releasing => self.step_failed(a, what, now),
            _ => {
                self.err(what);
                self.allocs[a].st = St::Failed;
            }
        }
    }

    fn on_client_datagram(&mut self, a: usize, d: &[u8], now: Instant, now_ns: u64) {
        match self.plan.mode {
            Mode::Raw => {
                if let Some(id) = payload::parse_ack(d) {
                    let expect = match self.allocs[a].step {
                        Step::Register(j) => Some(self.global_chan(a, j as usize)),
                        _ => None,
                    };
                    if self.allocs[a].txn.is_some() && expect == Some(id) {
                        if let Some(t) = self.allocs[a].txn.take() {
                            let ns = now.saturating_duration_since(t.first_sent).as_nanos() as u64;
                            self.stun_rtt.saturating_record(ns.max(1));
                        }
                        self.step_succeeded(a, &dummy_message(), now);
                    } else {
                        self.c.stray_responses += 1;
                    }
                } else {
                    self.on_payload(a, d, None, now, now_ns);
                }
            }
            Mode::Turn => {
                if channel_data::is_channel_data(d) {
                    match ChannelData::decode(d) {
                        Ok(cd) => self.on_payload(a, cd.payload, Some(cd.channel), now, now_ns),
                        Err(_) => self.c.garbage += 1,
                    }
                    return;
                }
                let Ok(msg) = Message::decode(d) else {
                    self.c.garbage += 1;
                    return;
                };
                match msg.class() {
                    Class::Indication if msg.method() == Method::Data => match msg.get(kind::DATA) {
                        Some(Ok(Attribute::Data(p))) => self.on_payload(a, p, None, now, now_ns),
                        _ => self.c.garbage += 1,
                    },
                    Class::Success | Class::Error => self.on_response(a, &msg, now),
                    _ => self.c.garbage += 1,
                }
            }
        }
    }

    fn on_payload(&mut self, a: usize, p: &[u8], channel: Option<u16>, now: Instant, now_ns: u64) {
        let Some(h) = payload::read(p) else {
            self.c.garbage += 1;
            return;
        };
        let k = self.plan.per_alloc;
        let base = ((self.first_alloc + a) * k) as u32;
        if h.channel < base || h.channel >= base + k as u32 {
            self.c.garbage += 1;
            return;
        }
        let j = (h.channel - base) as usize;
        if let Some(c) = channel {
            if c != channel_data::MIN_CHANNEL + j as u16 {
                self.c.garbage += 1;
                return;
            }
        }
        let ch = &mut self.chans[a * k + j];
        if ch.rx > 0 && h.seq <= ch.max_seq {
            self.c.reordered += 1;
        } else {
            ch.max_seq = h.seq;
        }
        ch.rx += 1;
        self.c.client_rx += 1;
        self.last_rx = now;
        self.rtt.saturating_record(now_ns.saturating_sub(h.sent_ns).max(1));
    }

    fn on_peer_readable(&mut self, i: usize, rb: &mut RecvBatch) {
        let Some(fd) = self.peers.get(i).map(|p| p.as_raw_fd()) else {
            return;
        };
        for _ in 0..8 {
            let n = match rb.recv(fd, MAX_BATCH) {
                Ok(n) => n,
                Err(e) => {
                    self.err(format!("peer recv: {}", e.kind()));
                    0
                }
            };
            let mut msgs: [(&[u8], Option<SocketAddrV4>); MAX_BATCH] = [(&[], None); MAX_BATCH];
            let mut m = 0;
            for k in 0..n {
                let (d, src) = rb.get(k);
                if payload::read(d).is_some() {
                    msgs[m] = (d, Some(src));
                    m += 1;
                } else {
                    self.c.garbage += 1;
                }
            }
            self.c.peer_rx += m as u64;
            if m > 0 {
                match sys::send_batch(fd, &msgs[..m]) {
                    Ok(s) => self.c.peer_tx += s as u64,
                    Err(e) => {
                        *self.c.errors.entry(format!("peer send: {}", e.kind())).or_default() += 1;
                    }
                }
            }
            if n < MAX_BATCH {
                break;
            }
        }
    }
}

/// A placeholder message for steps whose answer is not STUN (raw registrations).
fn dummy_message() -> Message<'static> {
    static EMPTY: [u8; 20] = [0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    Message::decode(&EMPTY).expect("valid empty STUN message")
}

/// A non-blocking UDP socket bound to `ip` (ephemeral port) and connected to `server`.
fn open_client_socket(ip: std::net::Ipv4Addr, server: SocketAddrV4) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
    s.connect(&SocketAddr::V4(server).into())?;
    Ok(s)
}
