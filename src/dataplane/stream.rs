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
    out_interest: bool,
    dead: Option<StreamClose>,
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
            out_interest: false,
            dead: None,
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
        let token = if e.u64 & LISTENER_BIT != 0 {
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
        let want = conn.pending() > 0;
        if want != conn.out_interest {
            let events = if want {
                READ_EVENTS | libc::EPOLLOUT as u32
            } else {
                READ_EVENTS
            };
            if epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                conn.socket.as_raw_fd(),
                events,
                id as u64,
            )
            .is_ok()
            {
                conn.out_interest = want;
            }
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
    pub fn reap(&mut self, closed: &mut Vec<(FiveTuple, StreamClose)>) {
        while let Some(id) = self.dead.pop() {
            let Some(conn) = self.take(id) else { continue };
            match conn.dead {
                Some(why) => closed.push((self.close(id, conn, why), why)),
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
        closed: &mut Vec<(FiveTuple, StreamClose)>,
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
                Some(c)
                    if c.stalled_since
                        .is_some_and(|t| now.saturating_duration_since(t) > limits.idle_timeout) =>
                {
                    StreamClose::WriteStalled
                }
                Some(c)
                    if now.saturating_duration_since(c.last_message) > limits.idle_timeout
                        && !has_allocation(&c.five_tuple) =>
                {
                    StreamClose::IdleTimeout
                }
                Some(c) if c.dead.is_some() => c.dead.unwrap_or(StreamClose::Reset),
                Some(_) => continue,
            };
            if let Some(conn) = self.take(id) {
                closed.push((self.close(id, conn, why), why));
            }
        }
    }

    /// Closes connection `id` (taken out of its slot) and returns its 5-tuple.
    fn close(&mut self, id: u32, conn: Conn, why: StreamClose) -> FiveTuple {
        let ft = conn.five_tuple;
        // Closing the socket removes it from the epoll set (no other descriptor refers to it).
        drop(conn);
        self.by_tuple.remove(&ft);
        self.free.push(id);
        self.shared.release(ft.client.ip());
        let t = transport_index(ft.transport);
        self.stats.open[t] = self.stats.open[t].saturating_sub(1);
        self.stats.closed[why as usize] += 1;
        ft
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
