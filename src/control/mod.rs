//! The control thread: the slow work of an Allocate that must not stall forwarding.
//!
//! Shards authenticate and validate an Allocate in their sans-IO server, then hand the
//! ticket ([`AllocateRequest`]) here over a bounded queue. The control thread checks the
//! global quotas (per user, in total), reserves a relay port from the shared pool (with
//! EVEN-PORT pairs and RESERVATION-TOKENs), binds the relay socket, records which shard owns
//! the 5-tuple, and hands the socket back to the owning shard, which installs the allocation
//! and answers. When an allocation ends, the shard closes its socket and sends
//! [`ControlRequest::Release`].

pub mod port_pool;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use socket2::{Domain, Protocol, Socket, Type};

use crate::dataplane::io::sys;
use crate::proto::allocation::FiveTuple;
use crate::proto::server::{AllocateRequest, RelayError};
use crate::proto::stun::AddressFamily;
use port_pool::PortPool;

/// How long a port reserved by EVEN-PORT's R bit stays reserved (RFC 8656 §7.2: about 30 s).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Candidate ports tried per Allocate before answering 508.
const BIND_TRIES: usize = 64;

/// A bound relay socket, its address, and (for EVEN-PORT's R bit) the bound next port.
type Opened = (UdpSocket, SocketAddr, Option<(UdpSocket, SocketAddr)>);

/// Which shard owns each 5-tuple with an allocation; read by shards only when a packet
/// arrives at a shard that does not own it (never on the forwarding path).
pub type Routes = Arc<RwLock<AHashMap<FiveTuple, usize>>>;

/// A request from a shard to the control thread.
#[derive(Debug)]
pub enum ControlRequest {
    /// Reserve a relayed transport address for this authenticated Allocate.
    Allocate {
        /// The requesting (and owning) shard.
        shard: usize,
        /// The ticket from the sans-IO server.
        request: AllocateRequest,
    },
    /// The allocation on this relayed transport address ended; its socket is closed.
    Release {
        /// The relayed transport address.
        relayed: SocketAddr,
    },
}

/// A message to a shard.
#[derive(Debug)]
pub enum ShardMessage {
    /// The control thread's answer to [`ControlRequest::Allocate`].
    Allocated {
        /// The ticket (with a reservation token granted, when asked for).
        request: AllocateRequest,
        /// The bound relay socket and its address, or why there is none.
        result: Result<(UdpSocket, SocketAddr), RelayError>,
    },
    /// A datagram that reached another shard's listener but belongs to an allocation here.
    Handover {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The datagram.
        data: Vec<u8>,
    },
}

/// A shard's inbox: the queue and the eventfd that wakes the shard.
#[derive(Debug, Clone)]
pub struct ShardHandle {
    /// The queue.
    pub tx: Sender<ShardMessage>,
    /// Write 8 bytes here after sending to wake the shard.
    pub waker: RawFd,
}

impl ShardHandle {
    /// Queues `msg` and wakes the shard; `false` when the queue is full (counted by the caller).
    pub fn send(&self, msg: ShardMessage) -> bool {
        let queued = self.queue(msg);
        if queued {
            self.wake();
        }
        queued
    }

    /// Queues `msg` without waking the shard (call [`ShardHandle::wake`] after a batch).
    pub fn queue(&self, msg: ShardMessage) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Wakes the shard.
    pub fn wake(&self) {
        sys::wake(self.waker);
    }
}

/// Requests handled before the shards that got answers are woken (one wake-up each).
const BATCH: usize = 256;

/// Settings of the control thread.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Relay IPs.
    pub relay_ips: Vec<IpAddr>,
    /// Relay port range, inclusive.
    pub ports: (u16, u16),
    /// Allocations per user, 0 for no limit.
    pub user_quota: usize,
    /// Allocations in total, 0 for no limit.
    pub total_quota: usize,
    /// SO_RCVBUF/SO_SNDBUF of relay sockets, bytes.
    pub relay_socket_buffer: usize,
    /// Seed for port shuffling and reservation tokens.
    pub seed: u64,
}

struct RelayIp {
    ip: IpAddr,
    pool: PortPool,
}

/// What the control thread holds when it stops (for accounting checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlReport {
    /// Allocations granted and not yet released.
    pub allocations: usize,
    /// Relay ports taken from the pools (allocations plus reservations).
    pub relay_ports_in_use: usize,
    /// Allocate tickets answered with 486/508 for quota.
    pub quota_refusals: u64,
    /// Allocate tickets answered with 508 for want of a port.
    pub port_refusals: u64,
}

/// The control thread's state.
pub struct Control {
    config: ControlConfig,
    relay_ips: Vec<RelayIp>,
    next_relay_ip: usize,
    /// Sockets bound for EVEN-PORT reservations, held so no other process takes the port.
    reservations: HashMap<[u8; 8], (UdpSocket, SocketAddr)>,
    reservation_expiry: VecDeque<(Instant, [u8; 8])>,
    token_state: u64,
    per_user: HashMap<String, usize>,
    owners: HashMap<SocketAddr, (String, FiveTuple)>,
    routes: Routes,
    shards: Vec<ShardHandle>,
    report: ControlReport,
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl Control {
    /// The control state for `shards` (their inboxes) sharing `routes`.
    pub fn new(config: ControlConfig, shards: Vec<ShardHandle>, routes: Routes) -> Self {
        let relay_ips = config
            .relay_ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| RelayIp {
                ip,
                pool: PortPool::new(config.ports.0, config.ports.1, config.seed ^ i as u64),
            })
            .collect();
        Control {
            token_state: config.seed.rotate_left(17) | 1,
            config,
            relay_ips,
            next_relay_ip: 0,
            reservations: HashMap::new(),
            reservation_expiry: VecDeque::new(),
            per_user: HashMap::new(),
            owners: HashMap::new(),
            routes,
            shards,
            report: ControlReport::default(),
        }
    }

    /// Serves requests until `shutdown` is set and the queue is drained.
    pub fn run(mut self, rx: Receiver<ControlRequest>, shutdown: &AtomicBool) -> ControlReport {
        let mut woken = vec![false; self.shards.len()];
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(req) => {
                    // Take what else is queued, then wake each answered shard once: a burst
                    // of Allocates costs one wake-up per batch, not one per answer.
                    let now = Instant::now();
                    self.handle_batched(req, now, &mut woken);
                    for _ in 1..BATCH {
                        match rx.try_recv() {
                            Ok(req) => self.handle_batched(req, now, &mut woken),
                            Err(_) => break,
                        }
                    }
                    for (i, w) in woken.iter_mut().enumerate() {
                        if std::mem::take(w) {
                            self.shards[i].wake();
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if shutdown.load(Ordering::Relaxed) && rx.is_empty() {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.expire_reservations(Instant::now());
        }
        while let Ok(req) = rx.try_recv() {
            self.handle(req, Instant::now());
        }
        self.report()
    }

    /// The current accounting.
    pub fn report(&self) -> ControlReport {
        ControlReport {
            allocations: self.owners.len(),
            relay_ports_in_use: self.relay_ips.iter().map(|r| r.pool.in_use()).sum(),
            ..self.report
        }
    }

    /// Handles one request and wakes the shard it answers.
    pub fn handle(&mut self, req: ControlRequest, now: Instant) {
        let mut woken = vec![false; self.shards.len()];
        self.handle_batched(req, now, &mut woken);
        for (i, w) in woken.iter().enumerate() {
            if *w {
                self.shards[i].wake();
            }
        }
    }

    /// Handles one request; marks in `woken` the shard that must be woken for its answer.
    fn handle_batched(&mut self, req: ControlRequest, now: Instant, woken: &mut [bool]) {
        match req {
            ControlRequest::Allocate { shard, mut request } => {
                let result = self.allocate(shard, &mut request, now);
                let granted = result.as_ref().ok().map(|(_, addr)| *addr);
                let delivered = self
                    .shards
                    .get(shard)
                    .is_some_and(|h| h.queue(ShardMessage::Allocated { request, result }));
                if let Some(w) = woken.get_mut(shard) {
                    *w |= delivered;
                }
                if !delivered {
                    // The shard's inbox is full: the client retransmits and gets a fresh
                    // attempt. Give back what was taken for this one (the socket is closed).
                    tracing::warn!(shard, "shard inbox full, Allocate answer dropped");
                    if let Some(addr) = granted {
                        self.release(addr);
                    }
                }
            }
            ControlRequest::Release { relayed } => self.release(relayed),
        }
    }

    fn allocate(
        &mut self,
        shard: usize,
        request: &mut AllocateRequest,
        now: Instant,
    ) -> Result<(UdpSocket, SocketAddr), RelayError> {
        let user = request.username().to_string();
        let held = self.per_user.get(&user).copied().unwrap_or(0);
        if self.config.user_quota != 0 && held >= self.config.user_quota {
            self.report.quota_refusals += 1;
            return Err(RelayError::UserQuota);
        }
        if self.config.total_quota != 0 && self.owners.len() >= self.config.total_quota {
            self.report.quota_refusals += 1;
            return Err(RelayError::TotalQuota);
        }
        let bound = match request.reservation_token {
            Some(token) => self.open_reserved(token),
            None => self.open_relay(request.family, request.even_port, request.reserve_next),
        };
        let (socket, addr, reserved) = bound.inspect_err(|e| {
            if *e == RelayError::Exhausted {
                self.report.port_refusals += 1;
            }
        })?;
        if let Some(next) = reserved {
            let token = self.reserve(next, now);
            request.grant_reservation(token);
        }
        *self.per_user.entry(user.clone()).or_insert(0) += 1;
        self.owners.insert(addr, (user, request.five_tuple));
        self.routes
            .write()
            .expect("routes lock")
            .insert(request.five_tuple, shard);
        Ok((socket, addr))
    }

    fn release(&mut self, relayed: SocketAddr) {
        if let Some((user, ft)) = self.owners.remove(&relayed) {
            if let Some(n) = self.per_user.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(&user);
                }
            }
            let mut routes = self.routes.write().expect("routes lock");
            routes.remove(&ft);
        }
        self.release_port(relayed);
    }

    fn release_port(&mut self, addr: SocketAddr) {
        if let Some(r) = self.relay_ips.iter_mut().find(|r| r.ip == addr.ip()) {
            r.pool.put(addr.port());
        }
    }

    /// Holds the bound socket of a reserved port under a fresh RESERVATION-TOKEN.
    fn reserve(&mut self, reserved: (UdpSocket, SocketAddr), now: Instant) -> [u8; 8] {
        let mut x = self.token_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.token_state = x;
        let token = x.to_be_bytes();
        self.reservations.insert(token, reserved);
        self.reservation_expiry.push_back((now + RESERVATION_LIFETIME, token));
        token
    }

    fn expire_reservations(&mut self, now: Instant) {
        while let Some(&(t, token)) = self.reservation_expiry.front() {
            if t > now {
                break;
            }
            self.reservation_expiry.pop_front();
            if let Some((socket, addr)) = self.reservations.remove(&token) {
                drop(socket);
                self.release_port(addr);
            }
        }
    }

    /// The socket reserved under `token` (RESERVATION-TOKEN, RFC 8656 §7.2).
    fn open_reserved(&mut self, token: [u8; 8]) -> Result<Opened, RelayError> {
        let (socket, addr) = self
            .reservations
            .remove(&token)
            .ok_or(RelayError::BadReservationToken)?;
        Ok((socket, addr, None))
    }

    /// Binds a relay socket: the next relay IP of the family, a port from its pool (even if
    /// asked). With `pair`, the next port is bound too and returned for a reservation.
    fn open_relay(&mut self, family: AddressFamily, even: bool, pair: bool) -> Result<Opened, RelayError> {
        let n = self.relay_ips.len();
        let candidates: Vec<usize> = (0..n)
            .map(|i| (self.next_relay_ip + i) % n)
            .filter(|&i| AddressFamily::of(&self.relay_ips[i].ip) == family)
            .collect();
        if candidates.is_empty() {
            return Err(RelayError::FamilyNotSupported);
        }
        self.next_relay_ip = (self.next_relay_ip + 1) % n;
        for i in candidates {
            for _ in 0..BIND_TRIES {
                let Some(port) = self.relay_ips[i].pool.take(even, pair, BIND_TRIES) else {
                    break;
                };
                let ip = self.relay_ips[i].ip;
                let buffer = self.config.relay_socket_buffer;
                let addr = SocketAddr::new(ip, port);
                let next = SocketAddr::new(ip, port.wrapping_add(1));
                let first = bind_udp(addr, buffer);
                let second = if pair { Some(bind_udp(next, buffer)) } else { None };
                match (first, second) {
                    (Ok(s), None) => return Ok((s, addr, None)),
                    (Ok(s), Some(Ok(r))) => return Ok((s, addr, Some((r, next)))),
                    // In use by another process: back to the end of the pool, try another.
                    _ => {
                        self.relay_ips[i].pool.put(port);
                        if pair {
                            self.relay_ips[i].pool.put(port + 1);
                        }
                    }
                }
            }
        }
        Err(RelayError::Exhausted)
    }
}
