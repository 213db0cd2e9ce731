//! The control thread: the slow work of an Allocate that must not stall forwarding.
//!
//! Shards authenticate and validate an Allocate in their sans-IO server, then hand the
//! ticket ([`AllocateRequest`]) here over a bounded queue. The control thread is a thin shell
//! around the sans-IO [`allocator::RelayAllocator`], which checks the global quotas (per
//! user, in total), picks a relay port from the shared pools and keeps EVEN-PORT
//! reservations and their RESERVATION-TOKENs. The shell binds the sockets the allocator asks
//! for, draws tokens from the OS CSPRNG, applies the allocator's changes to the 5-tuple →
//! shard [`Routes`], and hands the socket back to the owning shard, which installs the
//! allocation and answers. When an allocation ends, the shard closes its socket and sends
//! [`ControlRequest::Release`].

pub mod allocator;
pub mod port_pool;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::stats::ControlPublished;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::allocation::FiveTuple;
use crate::proto::server::{AllocateRequest, RelayError, RelayTransport};
use crate::proto::stun::AddressFamily;
use crate::sys;
use allocator::{AllocatorConfig, RelayAllocator, RouteChange, Ticket};

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
    /// The allocation on this relayed transport address ended; its socket is closed. Its
    /// quota units (and its unredeemed reservation) are freed as soon as this is handled.
    Release {
        /// The relayed transport address.
        relayed: SocketAddr,
    },
    /// New quotas from a configuration reload (SIGHUP).
    SetQuotas {
        /// Allocations per user, 0 for no limit.
        user_quota: usize,
        /// Allocations in total, 0 for no limit.
        total_quota: usize,
    },
}

/// A message to a shard.
#[derive(Debug)]
pub enum ShardMessage {
    /// The control thread's answer to [`ControlRequest::Allocate`].
    Allocated {
        /// The ticket (with a reservation token granted, when asked for).
        request: Box<AllocateRequest>,
        /// The bound relay socket and its address, or why there is none.
        result: Result<(RelaySocket, SocketAddr), RelayError>,
        /// For a dual allocation (ADDITIONAL-ADDRESS-FAMILY) whose first family was granted:
        /// the second relay socket and address, or why there is none.
        additional: Option<Result<(RelaySocket, SocketAddr), RelayError>>,
    },
    /// A TCP or TLS client connection that carries a ConnectionBind for a peer data
    /// connection of this shard (RFC 6062 §5.4): the shard adopts it and handles `pending`
    /// (the plaintext from the ConnectionBind on) as if read from it.
    AdoptConnection(Box<Adopted>),
    /// A datagram that reached another shard's listener but belongs to an allocation here.
    Handover {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The datagram.
        data: Vec<u8>,
    },
    /// A configuration reload (SIGHUP): settings, credentials and peer policy.
    Reload(Box<Reload>),
    /// Start draining: new Allocates get 300 with this ALTERNATE-SERVER, or 403 without.
    Drain {
        /// The server to send new clients to.
        alternate: Option<SocketAddr>,
    },
}

/// What a shard's server takes from a reloaded configuration.
#[derive(Debug, Clone)]
pub struct Reload {
    /// Protocol settings.
    pub config: crate::proto::server::ServerConfig,
    /// Users and REST secrets.
    pub credentials: crate::proto::auth::Credentials,
    /// The peer address policy.
    pub policy: crate::proto::peer_policy::PeerPolicy,
    /// The TLS certificate and key, re-read (new TLS connections use them; open ones keep
    /// theirs).
    pub tls: Option<crate::tls::TlsConfig>,
}

/// A client connection moved between shards (RFC 6062 ConnectionBind).
#[derive(Debug)]
pub struct Adopted {
    /// The socket (non-blocking).
    pub socket: TcpStream,
    /// Its TLS session, when it is a TLS connection.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// Its 5-tuple.
    pub five_tuple: FiveTuple,
    /// Plaintext read but not handled yet, starting with the ConnectionBind message.
    pub pending: Vec<u8>,
    /// Bytes queued for the client and not written yet.
    pub unsent: Vec<u8>,
}

/// The socket of a relayed transport address: UDP (RFC 8656), or a TCP listener for an
/// RFC 6062 TCP allocation.
#[derive(Debug)]
pub enum RelaySocket {
    /// A UDP socket.
    Udp(UdpSocket),
    /// A listening TCP socket (SO_REUSEADDR and SO_REUSEPORT, so that connections to peers
    /// can be made from the same address and port).
    Tcp(TcpListener),
}

/// Binds the listening socket of an RFC 6062 TCP allocation.
fn bind_tcp_relay(addr: SocketAddr) -> std::io::Result<TcpListener> {
    sys::tcp_listener(addr, 128)
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
/// Longest wait for a request before the shutdown flag is checked again.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Settings of the control thread.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Relay IPs, port range, quotas.
    pub allocator: AllocatorConfig,
    /// SO_RCVBUF/SO_SNDBUF of relay sockets, bytes.
    pub relay_socket_buffer: usize,
}

/// What the control thread holds when it stops (for accounting checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlReport {
    /// Allocations granted and not yet released.
    pub allocations: usize,
    /// EVEN-PORT reservations neither redeemed, released nor expired.
    pub reservations: usize,
    /// Relay ports taken from the pools (allocations plus reservations).
    pub relay_ports_in_use: usize,
    /// Allocate tickets answered with 486/508 for quota.
    pub quota_refusals: u64,
    /// Allocate tickets answered with 508 for want of a port.
    pub port_refusals: u64,
}

/// The control thread: the shell around a [`RelayAllocator`] that binds relay sockets,
/// updates the shared [`Routes`] and answers the shards.
pub struct Control {
    allocator: RelayAllocator<RelaySocket>,
    relay_socket_buffer: usize,
    routes: Routes,
    shards: Vec<ShardHandle>,
    metrics: Option<Arc<Mutex<ControlPublished>>>,
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

/// 8 bytes from the OS CSPRNG, for RESERVATION-TOKENs.
fn os_token() -> Option<[u8; 8]> {
    let mut token = [0u8; 8];
    getrandom::getrandom(&mut token).ok()?;
    Some(token)
}

impl Control {
    /// The control state for `shards` (their inboxes) sharing `routes`.
    pub fn new(config: ControlConfig, shards: Vec<ShardHandle>, routes: Routes) -> Self {
        Control {
            allocator: RelayAllocator::new(config.allocator, Box::new(os_token)),
            relay_socket_buffer: config.relay_socket_buffer,
            routes,
            shards,
            metrics: None,
        }
    }

    /// Publishes the accounting into `slot` for the metrics endpoint after every batch.
    pub fn with_metrics(mut self, slot: Arc<Mutex<ControlPublished>>) -> Self {
        self.metrics = Some(slot);
        self
    }

    /// Copies the accounting into the metrics slot unless the exporter holds it.
    fn publish(&self) {
        if let Some(slot) = &self.metrics {
            if let Ok(mut p) = slot.try_lock() {
                *p = self.allocator.published();
            }
        }
    }

    /// Serves requests until `shutdown` is set and the queue is drained.
    pub fn run(mut self, rx: Receiver<ControlRequest>, shutdown: &AtomicBool) -> ControlReport {
        let mut woken = vec![false; self.shards.len()];
        loop {
            let wait = self.allocator.poll_timeout().map_or(IDLE_WAIT, |t| {
                t.saturating_duration_since(Instant::now()).min(IDLE_WAIT)
            });
            match rx.recv_timeout(wait) {
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
            // Closes the sockets of the reservations that expired.
            drop(self.allocator.handle_timeout(Instant::now()));
            self.publish();
        }
        while let Ok(req) = rx.try_recv() {
            self.handle(req, Instant::now());
        }
        self.report()
    }

    /// The current accounting.
    pub fn report(&self) -> ControlReport {
        self.allocator.report()
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
                // A dual allocation (RFC 8656 §7.2): the additional family is a second grant
                // of the same user and 5-tuple, with its own port and quota unit.
                let additional = match (granted, request.additional_family()) {
                    (Some(_), Some(family)) => Some(self.allocate_additional(shard, &request, family, now)),
                    _ => None,
                };
                let granted_additional = additional.as_ref().and_then(|r| r.as_ref().ok()).map(|(_, addr)| *addr);
                let delivered = self.shards.get(shard).is_some_and(|h| {
                    h.queue(ShardMessage::Allocated {
                        request: Box::new(request),
                        result,
                        additional,
                    })
                });
                if let Some(w) = woken.get_mut(shard) {
                    *w |= delivered;
                }
                if !delivered {
                    // The shard's inbox is full: the client retransmits and gets a fresh
                    // attempt. Give back what was taken for this one (the socket is closed).
                    tracing::warn!(shard, "shard inbox full, Allocate answer dropped");
                    for addr in granted.into_iter().chain(granted_additional) {
                        self.release(addr);
                    }
                }
            }
            ControlRequest::Release { relayed } => self.release(relayed),
            ControlRequest::SetQuotas {
                user_quota,
                total_quota,
            } => self.allocator.set_quotas(user_quota, total_quota),
        }
    }

    fn allocate(
        &mut self,
        shard: usize,
        request: &mut AllocateRequest,
        now: Instant,
    ) -> Result<(RelaySocket, SocketAddr), RelayError> {
        let buffer = self.relay_socket_buffer;
        let tcp = request.relay_transport == RelayTransport::Tcp;
        let granted = self
            .allocator
            .allocate(&Ticket::new(shard, request), now, |addr, next| {
                if tcp {
                    return Ok((RelaySocket::Tcp(bind_tcp_relay(addr)?), None));
                }
                let socket = RelaySocket::Udp(bind_udp(addr, buffer)?);
                let reserved = next.map(|next| bind_udp(next, buffer)).transpose()?;
                Ok((socket, reserved.map(RelaySocket::Udp)))
            })?;
        if let Some(token) = granted.token {
            request.grant_reservation(token);
        }
        self.change_route(granted.route);
        Ok((granted.socket, granted.relayed))
    }

    /// The second relayed transport address of a dual allocation: a plain grant of
    /// `family` (no EVEN-PORT, no reservation).
    fn allocate_additional(
        &mut self,
        shard: usize,
        request: &AllocateRequest,
        family: AddressFamily,
        now: Instant,
    ) -> Result<(RelaySocket, SocketAddr), RelayError> {
        let buffer = self.relay_socket_buffer;
        let ticket = Ticket {
            family,
            even_port: false,
            reserve_next: false,
            reservation_token: None,
            ..Ticket::new(shard, request)
        };
        let granted = self.allocator.allocate(&ticket, now, |addr, _| {
            let socket = bind_udp(addr, buffer)?;
            Ok((RelaySocket::Udp(socket), None))
        })?;
        self.change_route(granted.route);
        Ok((granted.socket, granted.relayed))
    }

    /// Releases `relayed`, closing its reservation's socket if it had one.
    fn release(&mut self, relayed: SocketAddr) {
        let released = self.allocator.release(relayed);
        self.change_route(released.route);
    }

    fn change_route(&self, change: Option<RouteChange>) {
        let Some(change) = change else {
            return;
        };
        let mut routes = self.routes.write().expect("routes lock");
        match change {
            RouteChange::Set { five_tuple, shard } => routes.insert(five_tuple, shard),
            RouteChange::Remove(five_tuple) => routes.remove(&five_tuple),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_tokens_come_from_the_os_and_differ() {
        let tokens: Vec<[u8; 8]> = (0..16).map(|_| os_token().expect("getrandom")).collect();
        for (i, t) in tokens.iter().enumerate() {
            assert!(!tokens[i + 1..].contains(t), "token {t:?} repeated");
        }
    }
}
