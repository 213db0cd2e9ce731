//! A shard's TCP and TLS client connections (RFC 8656 §3.1): listening sockets, accepted
//! connections, their read and write buffers and their TLS sessions (rustls).
//!
//! Connections are owned by the shard that accepted them, as UDP 5-tuples are: every shard
//! has its own SO_REUSEPORT listening socket per address, and the kernel spreads
//! connections over them. A shard watches its connections with an epoll descriptor of its
//! own, which the I/O backend watches in turn ([`super::io::Io::watch`]); the sockets are
//! non-blocking and read and written with plain `read`/`writev` calls.
//!
//! This module moves bytes; what the bytes mean is the shard's business
//! ([`super::shard`]): it frames messages with [`crate::proto::framing`] and hands them to
//! the sans-IO server with the connection's 5-tuple.
//!
//! Limits against exhaustion and slow clients (counted in [`StreamStats`]): connections in
//! total and per client IP (checked at accept), a TLS handshake timeout, an idle timeout for
//! connections without an allocation, a maximum message size, and a write budget per
//! connection (messages beyond it are dropped and counted; a client that reads nothing for
//! the idle timeout is disconnected).

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use rustls::server::{Acceptor, ServerConnection};

use crate::config::StreamLimits;
use crate::proto::allocation::{FiveTuple, Transport};
use crate::stats::{StreamClose, StreamStats};
use crate::tls::TlsConfig;

/// Bytes queued for one connection at most (responses and relayed data not yet taken by the
/// kernel); a message that does not fit is dropped.
pub const WRITE_BUDGET: usize = 256 * 1024;
/// Bytes read per `read` call (one shard-wide buffer).
const READ_CHUNK: usize = 64 * 1024;
/// Reads per connection per readiness report before the next connection gets its turn.
pub const READS_PER_TURN: usize = 4;
/// Connections accepted per listener per readiness report.
const ACCEPTS_PER_TURN: usize = 64;
/// epoll events handled per poll.
const EVENTS: usize = 256;
/// epoll token bit of a listening socket (connections use their slot number).
const LISTENER_BIT: u64 = 1 << 32;
/// epoll token bit of an RFC 6062 relay listener (a TCP allocation's relayed address).
const RELAY_BIT: u64 = 1 << 33;
/// How long a Connect may take (RFC 6062 §5.2: "The timeout value MUST be at least 30
/// seconds").
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often connections are checked for timeouts.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// A listening TCP socket of one shard.
#[derive(Debug)]
pub struct StreamListener {
    /// The bound address.
    pub addr: SocketAddr,
    /// [`Transport::Tcp`] or [`Transport::Tls`].
    pub transport: Transport,
    /// The socket (non-blocking, SO_REUSEPORT).
    pub socket: TcpListener,
}

/// Connection counts shared by all shards: the limits are per process.
#[derive(Debug, Default)]
pub struct StreamShared {
    total: AtomicUsize,
    per_ip: Mutex<AHashMap<IpAddr, usize>>,
}

impl StreamShared {
    /// Takes a connection slot for `ip`, or says no when a limit is reached.
    fn admit(&self, ip: IpAddr, limits: &StreamLimits) -> bool {
        if self.total.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// The TLS state of a connection.
enum Tls {
    /// Plain TCP.
    None,
    /// Waiting for the ClientHello (the ALPN offer picks the configuration).
    Accepting(Box<Acceptor>),
    /// Handshaking or established.
    Session(Box<ServerConnection>),
}

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// A TURN client connection: STUN and ChannelData messages.
    Client,
    /// An RFC 6062 client data connection, relaying as-is to the peer data connection in
    /// slot `peer`.
    ClientData {
        /// The CONNECTION-ID.
        connection_id: u32,
        /// The peer data connection's slot.
        peer: u32,
    },
    /// An RFC 6062 peer data connection.
    Peer {
        /// The CONNECTION-ID.
        connection_id: u32,
        /// Where it stands.
        state: PeerState,
    },
}

/// The state of a peer data connection (RFC 6062).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Connecting to the peer (Connect) since then.
    Connecting(Instant),
    /// Connected or accepted, waiting for the client's ConnectionBind (nothing is read from
    /// the peer meanwhile: the kernel's receive window holds its data).
    Waiting,
    /// Relaying to the client data connection in this slot.
    Linked(u32),
}

impl ConnKind {
    /// The CONNECTION-ID and the partner's slot of a linked data connection.
    pub fn link(self) -> Option<(u32, u32)> {
        match self {
            ConnKind::ClientData { connection_id, peer } => Some((connection_id, peer)),
            ConnKind::Peer {
                connection_id,
                state: PeerState::Linked(client),
            } => Some((connection_id, client)),
            _ => None,
        }
    }

    /// The CONNECTION-ID of an RFC 6062 data connection.
    pub fn connection_id(self) -> Option<u32> {
        match self {
            ConnKind::ClientData { connection_id, .. } | ConnKind::Peer { connection_id, .. } => Some(connection_id),
            ConnKind::Client => None,
        }
    }
}

/// What a read produced.
pub enum ReadOutcome {
    /// Bytes for the framer: `plain[..n]` (TLS) or `raw[..n]` (TCP).
    Data {
        /// Whether the bytes are in the plaintext buffer (TLS) rather than the raw one.
        plain: bool,
        /// Length.
        len: usize,
    },
    /// Nothing more to read now.
    WouldBlock,
    /// The connection is over.
    Closed(StreamClose),
}

/// One client connection.
pub struct Conn {
    socket: TcpStream,
    /// The connection's 5-tuple: client address, the local address it reached, TCP or TLS.
    pub five_tuple: FiveTuple,
    tls: Tls,
    /// Bytes of an incomplete message, kept between reads.
    pub rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// A message's parts gathered into one TLS record.
    gather: Vec<u8>,
    /// When the last complete message arrived (or the connection opened).
    pub last_message: Instant,
    opened: Instant,
    stalled_since: Option<Instant>,
    /// The epoll events registered.
    interest: u32,
    dead: Option<StreamClose>,
    /// What it carries.
    pub kind: ConnKind,
    /// Reading suspended until the linked connection's queue drains (RFC 6062 relaying).
    pub paused: bool,
    /// Set when a ConnectionBind must be handled by the shard with this index.
    pub handover: Option<u8>,
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No such connection (it closed).
    NoConnection,
    /// The write budget is used up.
    Full,
}

impl Conn {
    fn new(socket: TcpStream, five_tuple: FiveTuple, tls: Tls, now: Instant) -> Conn {
        Conn {
            socket,
            five_tuple,
            tls,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            gather: Vec::new(),
            last_message: now,
            opened: now,
            stalled_since: None,
            interest: READ_EVENTS,
            dead: None,
            kind: ConnKind::Client,
            paused: false,
            handover: None,
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.pending()
    }

    /// The epoll events this connection needs now.
    fn wanted_interest(&self) -> u32 {
        let read = if self.paused
            || matches!(
                self.kind,
                ConnKind::Peer {
                    state: PeerState::Waiting,
                    ..
                }
            ) {
            0
        } else {
            READ_EVENTS
        };
        let write = if self.pending() > 0
            || matches!(
                self.kind,
                ConnKind::Peer {
                    state: PeerState::Connecting(_),
                    ..
                }
            ) {
            libc::EPOLLOUT as u32
        } else {
            0
        };
        read | write
    }

    /// Whether a non-blocking connect finished, and how: `Some(true)` connected,
    /// `Some(false)` failed, `None` still going.
    pub fn connect_result(&self) -> Option<bool> {
        match self.socket.take_error() {
            Ok(Some(_)) | Err(_) => Some(false),
            Ok(None) => match self.socket.peer_addr() {
                Ok(_) => Some(true),
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => None,
                Err(_) => Some(false),
            },
        }
    }

    /// Takes the parts a shard needs to adopt this connection (RFC 6062 ConnectionBind
    /// reaching another shard): socket, TLS session, 5-tuple, unhandled plaintext, unsent
    /// bytes.
    fn into_adopted(self) -> crate::control::Adopted {
        let tls = match self.tls {
            Tls::Session(s) => Some(s),
            _ => None,
        };
        crate::control::Adopted {
            socket: self.socket,
            tls,
            five_tuple: self.five_tuple,
            pending: self.rbuf,
            unsent: self.wbuf[self.wpos..].to_vec(),
        }
    }

    fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Marks the connection for closing (the shard closes it after the current step).
    pub fn kill(&mut self, why: StreamClose) {
        self.dead.get_or_insert(why);
    }

    /// Whether the connection is to be closed, and why.
    pub fn dead(&self) -> Option<StreamClose> {
        self.dead
    }

    /// Queues `parts` (one message) and writes what the kernel takes now. Over TLS the
    /// parts are encrypted first; over TCP an empty queue writes them with one `writev`.
    ///
    /// # Errors
    /// [`SendError::Full`] when the message does not fit in [`WRITE_BUDGET`] (nothing is
    /// queued), or the connection is not ready for data (TLS handshake not started).
    pub fn send(&mut self, parts: &[&[u8]], now: Instant) -> Result<(), SendError> {
        if self.dead.is_some() {
            return Err(SendError::NoConnection);
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let pending = self.pending();
        if pending + len > WRITE_BUDGET {
            return Err(SendError::Full);
        }
        match &mut self.tls {
            Tls::Accepting(_) => return Err(SendError::Full),
            Tls::Session(session) => {
                // One message, one TLS record: some clients (coturn's uclient) take each
                // record they read for a whole message.
                let message: &[u8] = if let [one] = parts {
                    one
                } else {
                    self.gather.clear();
                    for part in parts {
                        self.gather.extend_from_slice(part);
                    }
                    &self.gather
                };
                if session.writer().write_all(message).is_err() {
                    self.kill(StreamClose::TlsError);
                    return Err(SendError::NoConnection);
                }
                // Records go to our own queue at once, so rustls's buffer stays small.
                while session.wants_write() {
                    if session.write_tls(&mut self.wbuf).is_err() {
                        break;
                    }
                }
            }
            Tls::None if pending == 0 => {
                let slices: [IoSlice<'_>; 4] =
                    std::array::from_fn(|i| IoSlice::new(parts.get(i).copied().unwrap_or(&[])));
                let written = loop {
                    match (&self.socket).write_vectored(&slices[..parts.len().min(4)]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                        Err(_) => {
                            self.kill(StreamClose::Reset);
                            return Err(SendError::NoConnection);
                        }
                    }
                };
                if written == len {
                    return Ok(());
                }
                self.wbuf.clear();
                self.wpos = 0;
                let mut skip = written;
                for part in parts {
                    let s = skip.min(part.len());
                    skip -= s;
                    self.wbuf.extend_from_slice(&part[s..]);
                }
            }
            Tls::None => {
                for part in parts {
                    self.wbuf.extend_from_slice(part);
                }
            }
        }
        self.flush(now);
        Ok(())
    }

    /// Writes queued bytes until the kernel refuses more.
    pub fn flush(&mut self, now: Instant) {
        while self.wpos < self.wbuf.len() {
            match (&self.socket).write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    self.kill(StreamClose::Reset);
                    return;
                }
                Ok(n) => {
                    self.wpos += n;
                    self.stalled_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stalled_since.get_or_insert(now);
                    return;
                }
                Err(_) => {
                    self.kill(StreamClose::Reset);
                    return;
                }
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.stalled_since = None;
        if self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = Vec::new();
        }
    }

    /// Reads once from the socket. Over TLS the ciphertext goes through rustls (the
    /// handshake advances, its answers are queued and written) and the plaintext lands in
    /// `plain`; over TCP the bytes stay in `raw`.
    pub fn read(&mut self, raw: &mut [u8], plain: &mut [u8], tls: Option<&TlsConfig>, now: Instant) -> ReadOutcome {
        let n = loop {
            match (&self.socket).read(raw) {
                Ok(0) => return ReadOutcome::Closed(StreamClose::Eof),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
                Err(_) => return ReadOutcome::Closed(StreamClose::Reset),
            }
        };
        if matches!(self.tls, Tls::None) {
            return ReadOutcome::Data { plain: false, len: n };
        }
        let mut input = &raw[..n];
        let mut got = 0;
        while !input.is_empty() {
            if let Tls::Accepting(acceptor) = &mut self.tls {
                if acceptor.read_tls(&mut input).is_err() {
                    return ReadOutcome::Closed(StreamClose::TlsError);
                }
                match acceptor.accept() {
                    Ok(None) => continue,
                    Ok(Some(accepted)) => {
                        let Some(tls) = tls else {
                            return ReadOutcome::Closed(StreamClose::TlsError);
                        };
                        let config = tls.for_client_hello(accepted.client_hello().alpn());
                        match accepted.into_connection(config) {
                            Ok(session) => self.tls = Tls::Session(Box::new(session)),
                            Err((_, mut alert)) => {
                                let _ = alert.write_all(&mut self.wbuf);
                                self.flush(now);
                                return ReadOutcome::Closed(StreamClose::TlsError);
                            }
                        }
                    }
                    Err((_, mut alert)) => {
                        let _ = alert.write_all(&mut self.wbuf);
                        self.flush(now);
                        return ReadOutcome::Closed(StreamClose::TlsError);
                    }
                }
            }
            let Tls::Session(session) = &mut self.tls else {
                continue;
            };
            if session.read_tls(&mut input).is_err() {
                return ReadOutcome::Closed(StreamClose::TlsError);
            }
            let state = match session.process_new_packets() {
                Ok(state) => state,
                Err(_) => {
                    // The alert rustls prepared goes out before the close.
                    while session.wants_write() && session.write_tls(&mut self.wbuf).is_ok() {}
                    self.flush(now);
                    return ReadOutcome::Closed(StreamClose::TlsError);
                }
            };
            let closed = state.peer_has_closed();
            loop {
                if got == plain.len() {
                    break;
                }
                match session.reader().read(&mut plain[got..]) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(_) => break,
                }
            }
            while session.wants_write() && session.write_tls(&mut self.wbuf).is_ok() {}
            if closed && got == 0 {
                self.flush(now);
                return ReadOutcome::Closed(StreamClose::Eof);
            }
            if got == plain.len() {
                break;
            }
        }
        self.flush(now);
        if got == 0 {
            // Handshake bytes only: nothing for the framer yet, more may be readable.
            return ReadOutcome::Data { plain: true, len: 0 };
        }
        ReadOutcome::Data { plain: true, len: got }
    }

    /// Ends a TLS session cleanly before the socket closes (a close_notify alert, best
    /// effort: whatever the kernel takes now), so that the client reads an orderly end
    /// rather than a truncation.
    fn close_notify(&mut self) {
        if let Tls::Session(session) = &mut self.tls {
            if self.dead != Some(StreamClose::Reset) && self.dead != Some(StreamClose::TlsError) {
                session.send_close_notify();
                while session.wants_write() && session.write_tls(&mut self.wbuf).is_ok() {}
                let now = self.last_message;
                self.flush(now);
            }
        }
    }

    /// Whether the TLS handshake is still going on.
    fn handshaking(&self) -> bool {
        match &self.tls {
            Tls::None => false,
            Tls::Accepting(_) => true,
            Tls::Session(s) => s.is_handshaking(),
        }
    }
}

/// Where an epoll event points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// A listening socket (index into the shard's stream listeners).
    Listener(usize),
    /// A connection slot.
    Conn(u32),
    /// An RFC 6062 relay listener (index into the shard's relay listeners).
    RelayListener(usize),
}

/// A shard's stream listeners and connections.
pub struct Streams {
    epfd: OwnedFd,
    listeners: Vec<StreamListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    by_tuple: AHashMap<FiveTuple, u32>,
    limits: StreamLimits,
    shared: Arc<StreamShared>,
    tls: Option<TlsConfig>,
    events: Vec<libc::epoll_event>,
    ready: usize,
    /// Shard-wide read buffer for ciphertext or TCP bytes.
    pub raw: Vec<u8>,
    /// Shard-wide buffer for TLS plaintext.
    pub plain: Vec<u8>,
    /// Work was left for the next turn (a read budget ran out, or more events than fit).
    pub pending: bool,
    next_sweep: Instant,
    dead: Vec<u32>,
    /// RFC 6062 relay listeners of this shard's TCP allocations: (relayed address, socket).
    relay_listeners: Vec<Option<(SocketAddr, TcpListener)>>,
    relay_by_addr: AHashMap<SocketAddr, usize>,
    /// Peer data connections by CONNECTION-ID.
    by_connection_id: AHashMap<u32, u32>,
    /// Counters.
    pub stats: StreamStats,
}

use crate::sys::epoll_ctl;

const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

impl Streams {
    /// A shard's stream layer over `listeners`.
    ///
    /// # Errors
    /// When epoll refuses.
    pub fn new(
        listeners: Vec<StreamListener>,
        limits: StreamLimits,
        shared: Arc<StreamShared>,
        tls: Option<TlsConfig>,
    ) -> io::Result<Streams> {
        let epfd = crate::sys::epoll_create()?;
        for (i, l) in listeners.iter().enumerate() {
            epoll_ctl(
                epfd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                l.socket.as_raw_fd(),
                libc::EPOLLIN as u32,
                LISTENER_BIT | i as u64,
            )?;
        }
        Ok(Streams {
            epfd,
            listeners,
            conns: Vec::new(),
            free: Vec::new(),
            by_tuple: AHashMap::new(),
            limits,
            shared,
            tls,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
            ready: 0,
            raw: vec![0; READ_CHUNK],
            plain: vec![0; READ_CHUNK],
            pending: false,
            next_sweep: Instant::now() + SWEEP_PERIOD,
            dead: Vec::new(),
            relay_listeners: Vec::new(),
            relay_by_addr: AHashMap::new(),
            by_connection_id: AHashMap::new(),
            stats: StreamStats::default(),
        })
    }

    /// The epoll descriptor to watch.
    pub fn fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    /// Whether the shard has stream listeners or connections at all.
    pub fn is_active(&self) -> bool {
        !self.listeners.is_empty()
    }

    /// The limits in force.
    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    /// The TLS configuration for new connections.
    pub fn tls(&self) -> Option<&TlsConfig> {
        self.tls.as_ref()
    }

    /// The TLS listeners' and TCP listeners' bound addresses, with their transports.
    pub fn listen_addrs(&self) -> impl Iterator<Item = (SocketAddr, Transport)> + '_ {
        self.listeners.iter().map(|l| (l.addr, l.transport))
    }

    /// Replaces the TLS configuration for connections accepted from now on (SIGHUP);
    /// connections keep theirs.
    pub fn set_tls(&mut self, tls: TlsConfig) {
        self.tls = Some(tls);
    }

    /// Collects ready descriptors without waiting; returns how many.
    pub fn poll(&mut self) -> usize {
        self.ready = crate::sys::epoll_poll(self.epfd.as_raw_fd(), &mut self.events);
        self.pending = self.ready == EVENTS;
        self.ready
    }

    /// The `i`-th ready descriptor of the last [`Streams::poll`], with its epoll flags.
    pub fn event(&self, i: usize) -> (Token, u32) {
        let e = self.events[i];
        let token = if e.u64 & RELAY_BIT != 0 {
            Token::RelayListener((e.u64 & !RELAY_BIT) as usize)
        } else if e.u64 & LISTENER_BIT != 0 {
            Token::Listener((e.u64 & !LISTENER_BIT) as usize)
        } else {
            Token::Conn(e.u64 as u32)
        };
        (token, e.events)
    }

    /// Accepts waiting connections on listener `index`, within the limits.
    pub fn accept(&mut self, index: usize, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            let listener = &self.listeners[index];
            let transport = listener.transport;
            let (socket, client) = match listener.socket.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EMFILE and friends: the connection stays in the backlog; try next turn.
                Err(_) => {
                    self.pending = true;
                    return;
                }
            };
            if !self.shared.admit(client.ip(), &self.limits) {
                self.stats.closed[StreamClose::Refused as usize] += 1;
                continue;
            }
            let local = socket.local_addr().unwrap_or(listener.addr);
            if socket.set_nonblocking(true).is_err() {
                self.shared.release(client.ip());
                continue;
            }
            let _ = socket.set_nodelay(true);
            let tls = match transport {
                Transport::Tls => Tls::Accepting(Box::default()),
                _ => Tls::None,
            };
            let five_tuple = FiveTuple::new(client, local, transport);
            let conn = Conn::new(socket, five_tuple, tls, now);
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    self.conns.push(None);
                    (self.conns.len() - 1) as u32
                }
            };
            if epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                conn.socket.as_raw_fd(),
                READ_EVENTS,
                id as u64,
            )
            .is_err()
            {
                self.shared.release(client.ip());
                self.free.push(id);
                continue;
            }
            let t = transport_index(transport);
            self.stats.accepted[t] += 1;
            self.stats.open[t] += 1;
            self.by_tuple.insert(five_tuple, id);
            self.conns[id as usize] = Some(conn);
        }
        self.pending = true;
    }

    /// Takes connection `id` out of its slot to work on it; give it back with
    /// [`Streams::put`].
    pub fn take(&mut self, id: u32) -> Option<Conn> {
        self.conns.get_mut(id as usize).and_then(Option::take)
    }

    /// Puts a connection back after [`Streams::take`] and updates its write interest. A
    /// dead connection is closed instead; its 5-tuple and the reason are returned so that
    /// the shard can end its allocation.
    pub fn put(&mut self, id: u32, mut conn: Conn) -> Option<(FiveTuple, StreamClose)> {
        if let Some(why) = conn.dead {
            return Some((self.close(id, conn, why), why));
        }
        self.update_interest(id, &mut conn);
        self.conns[id as usize] = Some(conn);
        None
    }

    fn update_interest(&mut self, id: u32, conn: &mut Conn) {
        let want = conn.wanted_interest();
        if want != conn.interest
            && epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                conn.socket.as_raw_fd(),
                want,
                id as u64,
            )
            .is_ok()
        {
            conn.interest = want;
        }
    }

    /// Queues one message for the connection of `five_tuple`.
    ///
    /// # Errors
    /// [`SendError`]: no such connection, or its write budget is used up (counted).
    pub fn send_to(&mut self, five_tuple: &FiveTuple, parts: &[&[u8]], now: Instant) -> Result<(), SendError> {
        let Some(&id) = self.by_tuple.get(five_tuple) else {
            return Err(SendError::NoConnection);
        };
        let Some(mut conn) = self.take(id) else {
            return Err(SendError::NoConnection);
        };
        let result = conn.send(parts, now);
        if result == Err(SendError::Full) {
            self.stats.backpressure_drops += 1;
        }
        // A connection that died while writing stays in its slot, marked: the shard closes
        // it (and its allocation) at the end of the turn.
        if conn.dead.is_some() {
            self.dead.push(id);
        }
        self.update_interest(id, &mut conn);
        self.conns[id as usize] = Some(conn);
        result
    }

    /// Connections marked dead outside [`Streams::take`]/[`Streams::put`] (a write failed
    /// while relaying): closes them and returns their 5-tuples.
    pub fn reap(&mut self, closed: &mut Vec<(FiveTuple, ConnKind)>) {
        while let Some(id) = self.dead.pop() {
            let Some(conn) = self.take(id) else { continue };
            match conn.dead {
                Some(why) => {
                    let kind = conn.kind;
                    closed.push((self.close(id, conn, why), kind));
                }
                None => self.conns[id as usize] = Some(conn),
            }
        }
    }

    /// Every [`SWEEP_PERIOD`]: closes connections whose TLS handshake, idleness or stalled
    /// writes exceed the limits. `has_allocation` says whether a 5-tuple holds one (such a
    /// connection is never idle: its allocation's lifetime governs).
    pub fn sweep(
        &mut self,
        now: Instant,
        has_allocation: impl Fn(&FiveTuple) -> bool,
        closed: &mut Vec<(FiveTuple, ConnKind)>,
    ) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_PERIOD;
        let limits = self.limits;
        for id in 0..self.conns.len() as u32 {
            let why = match &self.conns[id as usize] {
                None => continue,
                Some(c) if c.handshaking() && now.saturating_duration_since(c.opened) > limits.handshake_timeout => {
                    StreamClose::HandshakeTimeout
                }
                Some(Conn {
                    kind:
                        ConnKind::Peer {
                            state: PeerState::Connecting(since),
                            ..
                        },
                    ..
                }) if now.saturating_duration_since(*since) > CONNECT_TIMEOUT => StreamClose::Reset,
                Some(c)
                    if c.stalled_since
                        .is_some_and(|t| now.saturating_duration_since(t) > limits.idle_timeout) =>
                {
                    StreamClose::WriteStalled
                }
                Some(c)
                    if c.kind == ConnKind::Client
                        && now.saturating_duration_since(c.last_message) > limits.idle_timeout
                        && !has_allocation(&c.five_tuple) =>
                {
                    StreamClose::IdleTimeout
                }
                Some(c) if c.dead.is_some() => c.dead.unwrap_or(StreamClose::Reset),
                Some(_) => continue,
            };
            if let Some(conn) = self.take(id) {
                let kind = conn.kind;
                closed.push((self.close(id, conn, why), kind));
            }
        }
    }

    /// Closes connection `id` (taken out of its slot) and returns its 5-tuple.
    fn close(&mut self, id: u32, mut conn: Conn, why: StreamClose) -> FiveTuple {
        conn.close_notify();
        let ft = conn.five_tuple;
        let kind = conn.kind;
        // Closing the socket removes it from the epoll set (no other descriptor refers to it).
        drop(conn);
        self.free.push(id);
        if let ConnKind::Peer { connection_id, .. } = kind {
            self.by_connection_id.remove(&connection_id);
            self.stats.peer_open = self.stats.peer_open.saturating_sub(1);
            return ft;
        }
        self.by_tuple.remove(&ft);
        self.shared.release(ft.client.ip());
        let t = transport_index(ft.transport);
        self.stats.open[t] = self.stats.open[t].saturating_sub(1);
        self.stats.closed[why as usize] += 1;
        ft
    }

    /// Closes the connection in slot `id` (not taken) and returns it's 5-tuple and kind.
    pub fn close_slot(&mut self, id: u32, why: StreamClose) -> Option<(FiveTuple, ConnKind)> {
        let conn = self.take(id)?;
        let kind = conn.kind;
        Some((self.close(id, conn, why), kind))
    }

    /// Closes `conn` (taken from slot `id`).
    pub fn close_taken(&mut self, id: u32, conn: Conn, why: StreamClose) -> FiveTuple {
        self.close(id, conn, why)
    }

    /// Takes a slot for `conn` and adds its socket to the epoll set with the events it needs.
    fn register(&mut self, conn: &mut Conn) -> io::Result<u32> {
        let id = self.new_slot();
        let want = conn.wanted_interest();
        if let Err(e) = epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            conn.socket.as_raw_fd(),
            want,
            id as u64,
        ) {
            self.free.push(id);
            return Err(e);
        }
        conn.interest = want;
        Ok(id)
    }

    fn new_slot(&mut self) -> u32 {
        match self.free.pop() {
            Some(id) => id,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        }
    }

    /// Starts accepting peer connections on the TCP relayed transport address `relayed`.
    ///
    /// # Errors
    /// When epoll refuses the socket.
    pub fn add_relay_listener(&mut self, relayed: SocketAddr, listener: TcpListener) -> io::Result<()> {
        let index = match self.relay_listeners.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.relay_listeners.push(None);
                self.relay_listeners.len() - 1
            }
        };
        epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            libc::EPOLLIN as u32,
            RELAY_BIT | index as u64,
        )?;
        self.relay_listeners[index] = Some((relayed, listener));
        self.relay_by_addr.insert(relayed, index);
        Ok(())
    }

    /// Whether `relayed` is a TCP relayed transport address of this shard.
    pub fn has_relay_listener(&self, relayed: &SocketAddr) -> bool {
        self.relay_by_addr.contains_key(relayed)
    }

    /// Closes the relay listener of `relayed` (its allocation ended).
    pub fn remove_relay_listener(&mut self, relayed: &SocketAddr) {
        if let Some(index) = self.relay_by_addr.remove(relayed) {
            self.relay_listeners[index] = None;
        }
    }

    /// Accepts one waiting peer connection on relay listener `index`: the socket
    /// (non-blocking), the peer and the relayed address; `None` when none waits.
    pub fn accept_peer(&mut self, index: usize) -> Option<(TcpStream, SocketAddr, SocketAddr)> {
        let (relayed, listener) = self.relay_listeners.get(index)?.as_ref()?;
        loop {
            match listener.accept() {
                Ok((socket, peer)) => {
                    if socket.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = socket.set_nodelay(true);
                    return Some((socket, peer, *relayed));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }

    /// Adds a peer data connection (accepted, or being connected) under `connection_id`.
    ///
    /// # Errors
    /// When epoll refuses the socket.
    pub fn add_peer(
        &mut self,
        socket: TcpStream,
        relayed: SocketAddr,
        peer: SocketAddr,
        connection_id: u32,
        state: PeerState,
        now: Instant,
    ) -> io::Result<u32> {
        let mut conn = Conn::new(socket, FiveTuple::new(peer, relayed, Transport::Tcp), Tls::None, now);
        conn.kind = ConnKind::Peer { connection_id, state };
        let id = self.register(&mut conn)?;
        self.by_connection_id.insert(connection_id, id);
        self.conns[id as usize] = Some(conn);
        self.stats.peer_open += 1;
        Ok(id)
    }

    /// Opens a TCP connection from the relayed transport address `relayed` to `peer`
    /// (RFC 6062 §5.2: "the server MUST initiate a TCP connection to the peer from the
    /// relayed transport address"), non-blocking; its result comes as a writable event.
    ///
    /// # Errors
    /// When the socket cannot be made, bound or started (the Connect then fails: 447).
    pub fn connect_peer(
        &mut self,
        connection_id: u32,
        relayed: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) -> io::Result<u32> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))?;
        if peer.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&relayed.into())?;
        match socket.connect(&peer.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        self.add_peer(
            socket.into(),
            relayed,
            peer,
            connection_id,
            PeerState::Connecting(now),
            now,
        )
    }

    /// The slot of the peer data connection `connection_id`.
    pub fn peer_slot(&self, connection_id: u32) -> Option<u32> {
        self.by_connection_id.get(&connection_id).copied()
    }

    /// Mutable access to the connection in slot `id` (not taken).
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// Links the client data connection in slot `client` (not taken) with the peer data
    /// connection `connection_id` (RFC 6062 §5.4): both relay as-is from now on. Bytes the
    /// client sent after its ConnectionBind go to the peer. `false` when either is gone.
    pub fn link(&mut self, client: u32, connection_id: u32, now: Instant) -> bool {
        let Some(peer) = self.peer_slot(connection_id) else {
            return false;
        };
        let Some(mut c) = self.take(client) else {
            return false;
        };
        let Some(mut p) = self.take(peer) else {
            self.conns[client as usize] = Some(c);
            return false;
        };
        c.kind = ConnKind::ClientData { connection_id, peer };
        p.kind = ConnKind::Peer {
            connection_id,
            state: PeerState::Linked(client),
        };
        // The client connection is no longer a TURN 5-tuple that responses go to.
        self.by_tuple.remove(&c.five_tuple);
        let early = std::mem::take(&mut c.rbuf);
        if !early.is_empty() {
            let _ = p.send(&[&early], now);
        }
        self.update_interest(client, &mut c);
        self.update_interest(peer, &mut p);
        self.conns[client as usize] = Some(c);
        self.conns[peer as usize] = Some(p);
        true
    }

    /// Relays `data` read from a linked data connection (`from`, taken) to its partner in
    /// slot `to`; pauses reading from `from` while the partner's queue is over half the
    /// write budget.
    pub fn relay(&mut self, from: &mut Conn, to: u32, data: &[u8], now: Instant) {
        let Some(mut partner) = self.take(to) else {
            from.kill(StreamClose::Eof);
            return;
        };
        if partner.send(&[data], now).is_err() {
            partner.kill(StreamClose::Reset);
            self.dead.push(to);
        }
        if partner.pending() > WRITE_BUDGET / 2 {
            from.paused = true;
        }
        self.update_interest(to, &mut partner);
        self.conns[to as usize] = Some(partner);
    }

    /// After connection `id` (not taken) wrote some of its queue: resumes reading from its
    /// partner when the queue is down to a quarter of the write budget.
    pub fn resume_partner(&mut self, id: u32) {
        let Some((_, partner)) = self
            .conns
            .get(id as usize)
            .and_then(Option::as_ref)
            .and_then(|c| (c.pending() <= WRITE_BUDGET / 4).then_some(c.kind.link()).flatten())
        else {
            return;
        };
        if let Some(mut p) = self.take(partner) {
            if p.paused {
                p.paused = false;
                self.update_interest(partner, &mut p);
                self.pending = true;
            }
            self.conns[partner as usize] = Some(p);
        }
    }

    /// Removes the client connection `conn` (taken from slot `id`) from this shard without
    /// closing it, for another shard to adopt (RFC 6062 ConnectionBind there).
    pub fn detach(&mut self, id: u32, conn: Conn) -> crate::control::Adopted {
        let _ = epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            conn.socket.as_raw_fd(),
            0,
            0,
        );
        self.by_tuple.remove(&conn.five_tuple);
        self.free.push(id);
        let t = transport_index(conn.five_tuple.transport);
        self.stats.open[t] = self.stats.open[t].saturating_sub(1);
        conn.into_adopted()
    }

    /// Takes over a client connection another shard detached; returns its slot, taken out
    /// (the caller handles `rbuf`, the plaintext not yet handled, and puts it back).
    ///
    /// # Errors
    /// When epoll refuses the socket (the connection is closed).
    pub fn adopt(&mut self, a: crate::control::Adopted, now: Instant) -> io::Result<(u32, Conn)> {
        let tls = match a.tls {
            Some(s) => Tls::Session(s),
            None => Tls::None,
        };
        let mut conn = Conn::new(a.socket, a.five_tuple, tls, now);
        conn.rbuf = a.pending;
        conn.wbuf = a.unsent;
        let id = match self.register(&mut conn) {
            Ok(id) => id,
            Err(e) => {
                self.shared.release(conn.five_tuple.client.ip());
                return Err(e);
            }
        };
        let t = transport_index(conn.five_tuple.transport);
        self.stats.open[t] += 1;
        self.by_tuple.insert(conn.five_tuple, id);
        Ok((id, conn))
    }

    /// The slot of the client connection of `five_tuple`.
    pub fn slot_of(&self, five_tuple: &FiveTuple) -> Option<u32> {
        self.by_tuple.get(five_tuple).copied()
    }

    /// Gives back the per-IP and total connection slots of a connection that was detached
    /// and could not be handed to another shard (it is closed).
    pub fn forget(&mut self, client: IpAddr) {
        self.shared.release(client);
    }

    /// Open connections on this shard.
    pub fn len(&self) -> usize {
        self.by_tuple.len()
    }

    /// Whether no connection is open on this shard.
    pub fn is_empty(&self) -> bool {
        self.by_tuple.is_empty()
    }
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Tls => 1,
        _ => 0,
    }
}
