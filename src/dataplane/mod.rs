//! The I/O shell around [`crate::proto::server::Server`]: one thread, a mio (epoll) loop
//! over the listening sockets and one UDP socket per relayed transport address.
//!
//! This is the simple, correct first data plane; the per-core io_uring shards replace it.
//! It never logs per packet: drops are counted in [`Stats`] and summarised on exit.

pub mod port_pool;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::proto::channel_data::{ChannelData, HEADER_LEN as CD_HEADER};
use crate::proto::server::{ClientAction, DropReason, Event, PeerAction, RelayError, Server};
use crate::proto::stun::AddressFamily;
use port_pool::PortPool;

/// Largest UDP payload received, in bytes.
const MAX_DATAGRAM: usize = 65_535;
/// Bytes kept free in front of received peer data for a ChannelData header.
const HEADROOM: usize = CD_HEADER;
/// Candidate ports tried per Allocate before answering 508.
const BIND_TRIES: usize = 64;
/// How long a port reserved by EVEN-PORT's R bit stays reserved (RFC 8656 §7.2: about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Longest sleep of the loop, so shutdown requests are seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(250);

/// Packet and drop counters.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Datagrams received from clients.
    pub client_rx: u64,
    /// Datagrams received from peers.
    pub peer_rx: u64,
    /// Datagrams relayed to peers.
    pub to_peer: u64,
    /// Datagrams relayed to clients.
    pub to_client: u64,
    /// Responses sent.
    pub responses: u64,
    /// Drops by reason.
    pub drops: HashMap<DropReason, u64>,
    /// Sends that failed (buffer full, unreachable).
    pub send_errors: u64,
}

struct Relay {
    socket: UdpSocket,
    addr: SocketAddr,
}

struct RelayIps {
    ip: IpAddr,
    pool: PortPool,
}

/// The running server: sockets, the sans-IO core and the counters.
pub struct Runtime {
    poll: Poll,
    listeners: Vec<(UdpSocket, SocketAddr)>,
    relays: HashMap<Token, Relay>,
    relay_tokens: HashMap<SocketAddr, Token>,
    relay_ips: Vec<RelayIps>,
    next_relay_ip: usize,
    next_token: usize,
    server: Server,
    reservations: HashMap<[u8; 8], SocketAddr>,
    reservation_expiry: std::collections::VecDeque<(Instant, [u8; 8])>,
    token_state: u64,
    stats: Stats,
    buf: Vec<u8>,
    out: Vec<u8>,
}

fn bind_udp(addr: SocketAddr, buffer: Option<usize>) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if let Some(size) = buffer {
        // Best effort: the kernel caps these at net.core.{r,w}mem_max.
        let _ = socket.set_recv_buffer_size(size);
        let _ = socket.set_send_buffer_size(size);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into()))
}

impl Runtime {
    /// Binds the listening sockets and builds the server.
    ///
    /// # Errors
    /// When a listening socket cannot be bound.
    pub fn new(config: Config) -> Result<Self> {
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        for (i, addr) in config.listen.iter().enumerate() {
            let mut s = bind_udp(*addr, Some(config.socket_buffer)).with_context(|| format!("binding {addr}"))?;
            let local = s.local_addr()?;
            poll.registry().register(&mut s, Token(i), Interest::READABLE)?;
            listeners.push((s, local));
        }
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let seed = u64::from_le_bytes(secret[8..16].try_into().expect("8 bytes"));
        let relay_ips = config
            .relay_ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| RelayIps {
                ip,
                pool: PortPool::new(config.ports.0, config.ports.1, seed ^ i as u64),
            })
            .collect();
        let bound: Vec<SocketAddr> = listeners.iter().map(|(_, a)| *a).collect();
        let policy = config.peer_policy(&bound);
        let server = Server::new(config.server, config.credentials, policy, secret, Instant::now(), unix);
        Ok(Runtime {
            poll,
            next_token: listeners.len(),
            listeners,
            relays: HashMap::new(),
            relay_tokens: HashMap::new(),
            relay_ips,
            next_relay_ip: 0,
            server,
            reservations: HashMap::new(),
            reservation_expiry: std::collections::VecDeque::new(),
            token_state: seed.rotate_left(17) | 1,
            stats: Stats::default(),
            buf: vec![0u8; HEADROOM + MAX_DATAGRAM],
            out: Vec::with_capacity(MAX_DATAGRAM + 64),
        })
    }

    /// The bound listening addresses (useful with port 0).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(_, a)| *a).collect()
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Runs until `shutdown` is set; then releases every relay socket.
    ///
    /// # Errors
    /// Only when polling itself fails.
    pub fn run(&mut self, shutdown: &AtomicBool) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        while !shutdown.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = self
                .server
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now).min(MAX_WAIT))
                .unwrap_or(MAX_WAIT);
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for event in events.iter() {
                let token = event.token();
                if token.0 < self.listeners.len() {
                    self.drain_listener(token.0);
                } else {
                    self.drain_relay(token);
                }
            }
            let now = Instant::now();
            self.server.handle_timeout(now);
            self.handle_events();
            self.expire_reservations(now);
        }
        Ok(())
    }

    fn drop(&mut self, reason: DropReason) {
        *self.stats.drops.entry(reason).or_insert(0) += 1;
    }

    fn drain_listener(&mut self, index: usize) {
        loop {
            let (len, from) = match self.listeners[index].0.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue, // ICMP errors surface here on some kernels; keep draining
            };
            self.stats.client_rx += 1;
            let now = Instant::now();
            let ft = crate::proto::allocation::FiveTuple::udp(from, self.listeners[index].1);
            let action = self.server.handle_client(now, ft, &self.buf[..len], &mut self.out);
            match action {
                ClientAction::Respond => {
                    self.stats.responses += 1;
                    send(&self.listeners[index].0, &self.out, from, &mut self.stats.send_errors);
                }
                ClientAction::Relay { relayed, peer, payload } => {
                    match self.relay_tokens.get(&relayed).and_then(|t| self.relays.get(t)) {
                        Some(relay) => {
                            self.stats.to_peer += 1;
                            send(&relay.socket, payload, peer, &mut self.stats.send_errors);
                        }
                        None => self.drop(DropReason::NoAllocation),
                    }
                }
                ClientAction::Allocate(mut request) => {
                    let result = match request.reservation_token {
                        Some(token) => self.open_reserved(token),
                        None => self.open_relay(request.family, request.even_port, request.reserve_next),
                    };
                    if let (Ok(addr), true) = (result, request.reserve_next) {
                        let token = self.reserve(SocketAddr::new(addr.ip(), addr.port() + 1), now);
                        request.grant_reservation(token);
                    }
                    let released = self.server.complete_allocate(now, request, result, &mut self.out);
                    if let Some(addr) = released {
                        self.close_relay(addr);
                    }
                    self.stats.responses += 1;
                    send(&self.listeners[index].0, &self.out, from, &mut self.stats.send_errors);
                }
                ClientAction::Drop(reason) => self.drop(reason),
                ClientAction::Nothing => {}
            }
        }
    }

    fn drain_relay(&mut self, token: Token) {
        loop {
            let Some(relay) = self.relays.get(&token) else { return };
            let relayed = relay.addr;
            let (len, peer) = match relay.socket.recv_from(&mut self.buf[HEADROOM..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            self.stats.peer_rx += 1;
            let now = Instant::now();
            match self.server.handle_peer(now, relayed, peer) {
                PeerAction::Forward { five_tuple, channel } => {
                    let Some(listener) = self.listeners.iter().find(|(_, a)| *a == five_tuple.server) else {
                        self.drop(DropReason::NoAllocation);
                        continue;
                    };
                    let datagram: &[u8] = match channel {
                        Some(ch) => {
                            // Zero-copy framing: the header goes into the headroom.
                            self.buf[..HEADROOM].copy_from_slice(&ChannelData::header(ch, len as u16));
                            &self.buf[..HEADROOM + len]
                        }
                        None => {
                            self.server.encode_data_indication(
                                peer,
                                &self.buf[HEADROOM..HEADROOM + len],
                                &mut self.out,
                            );
                            &self.out
                        }
                    };
                    self.stats.to_client += 1;
                    send(&listener.0, datagram, five_tuple.client, &mut self.stats.send_errors);
                }
                PeerAction::Drop(reason) => self.drop(reason),
            }
        }
    }

    /// Records a reservation of `addr` (already taken from its pool) and returns its token.
    fn reserve(&mut self, addr: SocketAddr, now: Instant) -> [u8; 8] {
        let mut x = self.token_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.token_state = x;
        let token = x.to_be_bytes();
        self.reservations.insert(token, addr);
        self.reservation_expiry.push_back((now + RESERVATION_LIFETIME, token));
        token
    }

    fn expire_reservations(&mut self, now: Instant) {
        while let Some(&(t, token)) = self.reservation_expiry.front() {
            if t > now {
                break;
            }
            self.reservation_expiry.pop_front();
            if let Some(addr) = self.reservations.remove(&token) {
                self.release_port(addr);
            }
        }
    }

    /// Binds the relay socket reserved under `token` (RESERVATION-TOKEN, RFC 8656 §7.2).
    fn open_reserved(&mut self, token: [u8; 8]) -> Result<SocketAddr, RelayError> {
        let addr = self
            .reservations
            .remove(&token)
            .ok_or(RelayError::BadReservationToken)?;
        self.bind_relay(addr).inspect_err(|_| self.release_port(addr))
    }

    fn bind_relay(&mut self, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
        let mut socket = bind_udp(addr, None).map_err(|_| RelayError::Exhausted)?;
        let token = Token(self.next_token);
        self.next_token += 1;
        self.poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
            .map_err(|_| RelayError::Exhausted)?;
        self.relays.insert(token, Relay { socket, addr });
        self.relay_tokens.insert(addr, token);
        Ok(addr)
    }

    /// Binds a relay socket for an Allocate: the next relay IP of the family, a port from
    /// its pool (even if asked; with the next one taken too when `pair`).
    fn open_relay(&mut self, family: AddressFamily, even: bool, pair: bool) -> Result<SocketAddr, RelayError> {
        let candidates: Vec<usize> = (0..self.relay_ips.len())
            .map(|i| (self.next_relay_ip + i) % self.relay_ips.len())
            .filter(|&i| AddressFamily::of(&self.relay_ips[i].ip) == family)
            .collect();
        if candidates.is_empty() {
            return Err(RelayError::FamilyNotSupported);
        }
        self.next_relay_ip = (self.next_relay_ip + 1) % self.relay_ips.len();
        for i in candidates {
            for _ in 0..BIND_TRIES {
                let Some(port) = self.relay_ips[i].pool.take(even, pair, BIND_TRIES) else {
                    break;
                };
                let addr = SocketAddr::new(self.relay_ips[i].ip, port);
                match self.bind_relay(addr) {
                    Ok(addr) => return Ok(addr),
                    // In use by another process: put it back at the end and try another.
                    Err(_) => {
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

    fn close_relay(&mut self, addr: SocketAddr) {
        if let Some(token) = self.relay_tokens.remove(&addr) {
            if let Some(mut relay) = self.relays.remove(&token) {
                let _ = self.poll.registry().deregister(&mut relay.socket);
            }
        }
        self.release_port(addr);
    }

    fn release_port(&mut self, addr: SocketAddr) {
        if let Some(r) = self.relay_ips.iter_mut().find(|r| r.ip == addr.ip()) {
            r.pool.put(addr.port());
        }
    }

    fn handle_events(&mut self) {
        while let Some(event) = self.server.poll_event() {
            match event {
                Event::AllocationClosed { relayed, .. } => self.close_relay(relayed),
            }
        }
    }

    /// Live allocations and relay ports in use, for accounting checks.
    pub fn allocations(&self) -> (usize, usize) {
        let ports = self.relay_ips.iter().map(|r| r.pool.in_use()).sum();
        (self.server.allocation_count(), ports)
    }
}

fn send(socket: &UdpSocket, data: &[u8], to: SocketAddr, errors: &mut u64) {
    if socket.send_to(data, to).is_err() {
        *errors += 1;
    }
}
