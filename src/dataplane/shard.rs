//! One shard: a thread that owns a listening socket per listen address (SO_REUSEPORT), the
//! relay sockets of its allocations, a sans-IO [`Server`] with their tables and timers, an
//! I/O backend, and its counters. Nothing here locks, allocates or logs per packet.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Receiver, Sender};

use super::io::{Datagram, Io, SocketId, Verdict, HEADROOM};
use super::stream::{Conn, ConnKind, PeerState, ReadOutcome, SendError, Streams, Token, READS_PER_TURN};
use crate::control::{ControlRequest, RelaySocket, Routes, ShardHandle, ShardMessage};
use crate::metrics::{code_index, method_index, Histograms, Slot as MetricsSlot};
use crate::proto::allocation::FiveTuple;
use crate::proto::channel_data::{self, ChannelData};
use crate::proto::framing::{self, Frame, FrameError};
use crate::proto::server::{
    AuthError, ClientAction, CloseReason, DropReason, Event, PeerAction, PeerConnectionAction, RelayError, Response,
    Server,
};
use crate::proto::stun::{Class, MessageType, Method};
use crate::stats::{drop_index, ShardStats, StreamClose};

/// Longest sleep of a shard, so shutdown requests are seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(100);

enum Slot {
    Free,
    Listener(SocketAddr),
    Relay(SocketAddr),
}

/// The per-packet state a shard's handler needs (separate from the backend so both can be
/// borrowed at once).
struct Core {
    index: usize,
    server: Server,
    slots: Vec<Slot>,
    free_ids: Vec<SocketId>,
    listeners: Vec<(SocketAddr, SocketId, UdpSocket)>,
    relay_ids: AHashMap<SocketAddr, SocketId>,
    relay_sockets: AHashMap<SocketId, UdpSocket>,
    closing: Vec<(SocketId, UdpSocket)>,
    /// Relayed transport addresses released to the control thread whose sockets are still
    /// to be closed (after the backend's wait).
    released: Vec<SocketAddr>,
    control: Sender<ControlRequest>,
    routes: Routes,
    peers: Vec<ShardHandle>,
    now: Instant,
    stats: ShardStats,
    histograms: Option<Histograms>,
    /// TCP and TLS client connections.
    streams: Streams,
    /// Connections closed in this step, whose allocations (or partners) are to end.
    stream_closed: Vec<(FiveTuple, ConnKind)>,
    /// RFC 6062 ConnectionBinds that succeeded: (client data connection, CONNECTION-ID),
    /// to link once the connection is back in its slot.
    links: Vec<(FiveTuple, u32)>,
    /// The XDP fast path's maps for this shard's allocations (`--xdp`).
    #[cfg(feature = "xdp")]
    xdp: Option<crate::xdp::XdpOffload>,
}

/// One shard.
pub struct Shard {
    io: Io,
    /// Whether the listening sockets are registered with the backend (done on the shard's
    /// own thread, see [`Shard::start`]).
    started: bool,
    core: Core,
    slot: Option<MetricsSlot>,
    gauges_at: Instant,
    allocations: Arc<AtomicUsize>,
    inbox: Receiver<ShardMessage>,
    scratch: Vec<u8>,
}

/// Everything a shard is built from.
pub struct ShardParts {
    /// Shard number.
    pub index: usize,
    /// The sans-IO server for this shard's allocations.
    pub server: Server,
    /// The I/O backend.
    pub io: Io,
    /// Listening sockets (bound with SO_REUSEPORT), with their addresses.
    pub listeners: Vec<(SocketAddr, UdpSocket)>,
    /// Requests to the control thread.
    pub control: Sender<ControlRequest>,
    /// This shard's inbox.
    pub inbox: Receiver<ShardMessage>,
    /// The other shards' inboxes (index = shard number; this shard's own entry is unused).
    pub peers: Vec<ShardHandle>,
    /// Which shard owns which 5-tuple.
    pub routes: Routes,
    /// Where to publish the counters, and the histograms to observe (with a metrics
    /// endpoint).
    pub metrics: Option<(MetricsSlot, Histograms)>,
    /// The TCP and TLS listeners and their connections.
    pub streams: Streams,
    /// This shard's view of the XDP maps, with `--xdp`.
    #[cfg(feature = "xdp")]
    pub xdp: Option<crate::xdp::XdpOffload>,
}

/// How often a shard recounts its gauges (allocations, permissions, channels).
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

/// Whether a client datagram is a STUN request that needs an existing allocation (and so
/// its owning shard): every request but Binding and Allocate. ChannelData and Send
/// indications are checked only after the server found no allocation for them, so the
/// forwarding path pays no extra lookup.
fn request_needs_owner(data: &[u8]) -> bool {
    if data.len() < 2 || channel_data::is_channel_data(data) {
        return false;
    }
    match MessageType::from_u16(u16::from_be_bytes([data[0], data[1]])) {
        Some(t) => t.class == Class::Request && !matches!(t.method, Method::Binding | Method::Allocate),
        None => false,
    }
}

impl Shard {
    /// Builds a shard and registers its listening sockets with the backend.
    ///
    /// # Errors
    /// When the backend refuses a socket.
    pub fn new(parts: ShardParts) -> std::io::Result<Shard> {
        let io = parts.io;
        let mut core = Core {
            index: parts.index,
            server: parts.server,
            slots: Vec::new(),
            free_ids: Vec::new(),
            listeners: Vec::new(),
            relay_ids: AHashMap::new(),
            relay_sockets: AHashMap::new(),
            closing: Vec::new(),
            released: Vec::new(),
            control: parts.control,
            routes: parts.routes,
            peers: parts.peers,
            now: Instant::now(),
            stats: ShardStats::default(),
            histograms: parts.metrics.as_ref().map(|(_, h)| h.clone()),
            streams: parts.streams,
            stream_closed: Vec::new(),
            links: Vec::new(),
            #[cfg(feature = "xdp")]
            xdp: parts.xdp,
        };
        for (addr, socket) in parts.listeners {
            let id = core.new_id(Slot::Listener(addr));
            core.listeners.push((addr, id, socket));
        }
        Ok(Shard {
            io,
            started: false,
            core,
            slot: parts.metrics.map(|(slot, _)| slot),
            gauges_at: Instant::now(),
            allocations: Arc::new(AtomicUsize::new(0)),
            inbox: parts.inbox,
            scratch: Vec::with_capacity(64 * 1024),
        })
    }

    /// Runs until `shutdown` is set.
    ///
    /// # Errors
    /// When the backend's wait fails.
    pub fn run(&mut self, shutdown: &AtomicBool) -> std::io::Result<()> {
        if let Some(slot) = &self.slot {
            slot.lock().unwrap_or_else(|e| e.into_inner()).tid = crate::sys::gettid();
        }
        while !shutdown.load(Ordering::Relaxed) {
            self.turn(MAX_WAIT)?;
        }
        // What XDP relayed, for the shutdown report (refreshed once a second only with a
        // metrics endpoint).
        #[cfg(feature = "xdp")]
        if let Some(x) = &self.core.xdp {
            self.core.stats.xdp = x.totals();
        }
        Ok(())
    }

    /// Registers the listening sockets and the stream layer's epoll with the backend, on the
    /// thread that runs the shard. With io_uring this matters: a request's completion work
    /// (task_work: copying a received datagram into its buffer) runs on the thread that
    /// submitted it. Submitted from the thread that built the shard, every datagram on a
    /// listening socket woke that thread (the main thread: 15,000 context switches per
    /// second and a third of the shard's CPU waiting for it when pinned to one core).
    fn start(&mut self) -> std::io::Result<()> {
        self.started = true;
        if self.core.streams.is_active() {
            self.io.watch(self.core.streams.fd())?;
        }
        for (_, id, socket) in &self.core.listeners {
            self.io.register(*id, socket.as_raw_fd())?;
        }
        Ok(())
    }

    /// One turn of the loop: wait up to `max_wait` (less when a timer is due), handle what
    /// arrived, run timers, and apply the inbox.
    ///
    /// # Errors
    /// When the backend's wait fails.
    pub fn turn(&mut self, max_wait: Duration) -> std::io::Result<()> {
        if !self.started {
            self.start()?;
        }
        let now = Instant::now();
        let wait = match self.core.server.poll_timeout() {
            _ if self.core.streams.pending => Duration::ZERO,
            Some(t) => t.saturating_duration_since(now).min(max_wait),
            None => max_wait,
        };
        self.core.now = now;
        let core = &mut self.core;
        self.io
            .wait(Some(wait), &mut self.scratch, |d, out| core.handle(d, out))?;
        let now = Instant::now();
        self.core.now = now;
        if self.io.take_watched() || self.core.streams.pending {
            self.core.poll_streams(&mut self.scratch);
        }
        self.core.stream_housekeeping();
        self.core.server.handle_timeout(now);
        self.core.drain_events();
        while let Ok(msg) = self.inbox.try_recv() {
            self.apply(msg);
        }
        self.close_released();
        self.reap_closing();
        self.allocations
            .store(self.core.server.allocation_count(), Ordering::Relaxed);
        self.publish(now);
        Ok(())
    }

    /// Copies the counters into the metrics slot, unless the exporter holds it (then the
    /// next turn does); recounts the gauges once per [`GAUGE_PERIOD`].
    fn publish(&mut self, now: Instant) {
        let Some(slot) = &self.slot else {
            return;
        };
        if now.saturating_duration_since(self.gauges_at) >= GAUGE_PERIOD {
            self.gauges_at = now;
            self.core.stats.gauges = self.core.server.gauges();
            #[cfg(feature = "xdp")]
            if let Some(x) = &self.core.xdp {
                self.core.stats.xdp = x.totals();
            }
        }
        if let Ok(mut p) = slot.try_lock() {
            p.stats = self.stats();
        }
    }

    /// The live allocation count, published every loop turn (read while draining).
    pub fn allocation_counter(&self) -> Arc<AtomicUsize> {
        self.allocations.clone()
    }

    /// This shard's counters.
    pub fn stats(&self) -> ShardStats {
        let mut s = self.core.stats;
        s.io = self.io.stats();
        // Relays from stream clients are sent outside the backend.
        s.io.send_errors += self.core.stats.io.send_errors;
        // The stream layer counts connections; the shard counts messages and relayed bytes.
        let shard_counted = self.core.stats.streams;
        s.streams = crate::stats::StreamStats {
            messages: shard_counted.messages,
            peer_connections: shard_counted.peer_connections,
            relayed_bytes: shard_counted.relayed_bytes,
            backpressure_drops: self.core.streams.stats.backpressure_drops + shard_counted.backpressure_drops,
            ..self.core.streams.stats
        };
        s
    }

    /// Live allocations on this shard.
    pub fn allocation_count(&self) -> usize {
        self.core.server.allocation_count()
    }

    fn apply(&mut self, msg: ShardMessage) {
        match msg {
            ShardMessage::Drain { alternate } => self.core.server.drain(alternate),
            ShardMessage::Reload(r) => {
                let r = *r;
                self.core
                    .server
                    .reload(r.config, r.credentials, r.policy, Instant::now());
                if let Some(tls) = r.tls {
                    self.core.streams.set_tls(tls);
                }
                #[cfg(feature = "xdp")]
                if let Some(x) = &mut self.core.xdp {
                    x.set_bandwidth_capped(Instant::now(), self.core.server.config().max_bitrate != 0);
                }
            }
            ShardMessage::Allocated {
                mut request,
                result,
                additional,
            } => {
                let ft = request.five_tuple;
                let result = result.and_then(|(socket, addr)| self.install_relay(socket, addr));
                if let Some(additional) = additional {
                    let additional = additional.and_then(|(socket, addr)| self.install_relay(socket, addr));
                    request.grant_additional(additional);
                }
                let now = Instant::now();
                let completion = self
                    .core
                    .server
                    .complete_allocate(now, *request, result, &mut self.scratch);
                self.core.count_response(completion.response);
                if let (Some(h), Some(waited)) = (&self.core.histograms, completion.waited) {
                    h.setup.observe(waited.as_secs_f64());
                }
                self.core.drain_events();
                for addr in completion.release.into_iter().chain(completion.release_additional) {
                    self.core.release(addr);
                }
                if ft.transport.is_stream() {
                    if self.core.streams.send_to(&ft, &[&self.scratch], now).is_ok() {
                        self.core.stats.responses_total += 1;
                    }
                } else if let Some((id, src)) = self.core.listener_for(ft.server) {
                    if let Some(fd) = self.core.fd(id) {
                        self.core.stats.responses_total += 1;
                        self.io.send_now(fd, &self.scratch, ft.client, src);
                    }
                }
            }
            ShardMessage::AdoptConnection(adopted) => {
                let now = Instant::now();
                self.core.now = now;
                if let Ok((id, mut conn)) = self.core.streams.adopt(*adopted, now) {
                    let pending = std::mem::take(&mut conn.rbuf);
                    self.core.stream_bytes(&mut conn, &pending, &mut self.scratch);
                    self.core.finish_service(id, conn);
                }
            }
            ShardMessage::Handover { five_tuple, data } => {
                self.core.stats.handovers += 1;
                self.handle_copied(five_tuple, &data);
            }
        }
    }

    /// Registers a relay socket the control thread bound with the backend; on failure it
    /// goes back to the control thread and the Allocate is answered 508.
    fn install_relay(&mut self, socket: RelaySocket, addr: SocketAddr) -> Result<SocketAddr, RelayError> {
        let socket = match socket {
            RelaySocket::Udp(s) => s,
            RelaySocket::Tcp(listener) => {
                // RFC 6062: a TCP allocation's relayed transport address accepts peers.
                return match self.core.streams.add_relay_listener(addr, listener) {
                    Ok(()) => Ok(addr),
                    Err(_) => {
                        let _ = self.core.control.send(ControlRequest::Release { relayed: addr });
                        Err(RelayError::Exhausted)
                    }
                };
            }
        };
        let id = self.core.new_id(Slot::Relay(addr));
        if self.io.register(id, socket.as_raw_fd()).is_ok() {
            self.core.relay_ids.insert(addr, id);
            self.core.relay_sockets.insert(id, socket);
            Ok(addr)
        } else {
            self.core.free_id(id);
            let _ = self.core.control.send(ControlRequest::Release { relayed: addr });
            Err(RelayError::Exhausted)
        }
    }

    /// Handles a datagram that did not come through this shard's backend (a handover from
    /// another shard) as if it had arrived on the listener of `five_tuple.server`.
    fn handle_copied(&mut self, five_tuple: FiveTuple, data: &[u8]) {
        let Some((listener, local)) = self.core.listener_for(five_tuple.server) else {
            return;
        };
        let mut buf = vec![0u8; HEADROOM + data.len()];
        buf[HEADROOM..].copy_from_slice(data);
        let d = Datagram {
            socket: listener,
            from: five_tuple.client,
            local,
            len: data.len(),
            buf: &mut buf,
        };
        let verdict = self.core.handle(d, &mut self.scratch);
        self.send_verdict(verdict, &buf);
    }

    /// Runs `data` from `five_tuple.client` through this shard as if the kernel had
    /// delivered it to this shard's listener for `five_tuple.server` (for tests of the
    /// hand-over of datagrams that reach a shard not owning their allocation).
    #[doc(hidden)]
    pub fn inject(&mut self, five_tuple: FiveTuple, data: &[u8]) {
        self.handle_copied(five_tuple, data);
    }

    fn send_verdict(&mut self, verdict: Verdict, buf: &[u8]) {
        let (socket, to, src, data) = match verdict {
            Verdict::Drop => return,
            Verdict::Forward {
                socket,
                to,
                src,
                start,
                end,
            } => (socket, to, src, &buf[start..end]),
            Verdict::Reply { socket, to, src } => (socket, to, src, &self.scratch[..]),
        };
        if let Some(fd) = self.core.fd(socket) {
            self.io.send_now(fd, data, to, src);
        }
    }

    /// Closes the relay sockets of allocations that ended (their Release already went to
    /// the control thread).
    fn close_released(&mut self) {
        for relayed in std::mem::take(&mut self.core.released) {
            self.core.streams.remove_relay_listener(&relayed);
            if let Some(id) = self.core.relay_ids.remove(&relayed) {
                if let Some(socket) = self.core.relay_sockets.remove(&id) {
                    self.io.deregister(id, socket.as_raw_fd());
                    self.core.closing.push((id, socket));
                }
            }
        }
    }

    /// Closes sockets the backend no longer uses and recycles their ids.
    fn reap_closing(&mut self) {
        let mut i = 0;
        while i < self.core.closing.len() {
            let id = self.core.closing[i].0;
            if self.io.is_released(id) {
                self.core.closing.swap_remove(i);
                self.core.free_id(id);
            } else {
                i += 1;
            }
        }
    }
}

impl Core {
    fn new_id(&mut self, slot: Slot) -> SocketId {
        match self.free_ids.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as SocketId
            }
        }
    }

    fn free_id(&mut self, id: SocketId) {
        self.slots[id as usize] = Slot::Free;
        self.free_ids.push(id);
    }

    fn listener_id(&self, addr: SocketAddr) -> Option<SocketId> {
        self.listeners.iter().find(|(a, _, _)| *a == addr).map(|(_, id, _)| *id)
    }

    /// The listener that serves server transport address `addr`: the one bound to it, or
    /// one bound to the wildcard address of its family and port, with the source IP its
    /// datagrams must then leave from (IP_PKTINFO).
    fn listener_for(&self, addr: SocketAddr) -> Option<(SocketId, Option<IpAddr>)> {
        if let Some(id) = self.listener_id(addr) {
            return Some((id, None));
        }
        self.listeners
            .iter()
            .find(|(a, _, _)| a.ip().is_unspecified() && a.port() == addr.port() && a.is_ipv4() == addr.is_ipv4())
            .map(|(_, id, _)| (*id, Some(addr.ip())))
    }

    fn fd(&self, id: SocketId) -> Option<i32> {
        if let Some((_, _, s)) = self.listeners.iter().find(|(_, i, _)| *i == id) {
            return Some(s.as_raw_fd());
        }
        self.relay_sockets.get(&id).map(|s| s.as_raw_fd())
    }

    /// Hands the server's events to their consumers. An allocation that closed is released
    /// to the control thread at once, before the response that closed it (a Refresh with
    /// LIFETIME 0) leaves: the user's next Allocate, on any shard, then finds the quota
    /// free. Its socket is closed after the backend's wait.
    fn drain_events(&mut self) {
        while let Some(event) = self.server.poll_event() {
            // The XDP maps follow every event; for a closed allocation it reports what the
            // kernel relayed for it (the server never saw those datagrams).
            #[cfg(feature = "xdp")]
            let xdp_usage = self.xdp.as_mut().and_then(|x| x.on_event(self.now, &event));
            #[cfg(not(feature = "xdp"))]
            let xdp_usage: Option<crate::proto::allocation::Usage> = None;
            match event {
                Event::AllocationCreated { .. } => self.stats.allocations_created += 1,
                Event::ConnectionBound {
                    connection_id, data, ..
                } => self.links.push((data, connection_id)),
                Event::PeerConnectionClosed { connection_id } => {
                    if let Some(slot) = self.streams.peer_slot(connection_id) {
                        if let Some((_, kind)) = self.streams.close_slot(slot, StreamClose::Eof) {
                            if let Some((_, partner)) = kind.link() {
                                self.streams.close_slot(partner, StreamClose::Eof);
                            }
                        }
                    }
                }
                Event::AllocationClosed {
                    five_tuple,
                    relayed,
                    additional,
                    reason,
                    age,
                    mut usage,
                    username,
                } => {
                    if let Some(x) = xdp_usage {
                        usage.to_peer_packets += x.to_peer_packets;
                        usage.to_peer_bytes += x.to_peer_bytes;
                        usage.to_client_packets += x.to_client_packets;
                        usage.to_client_bytes += x.to_client_bytes;
                    }
                    self.release(relayed);
                    if let Some(a) = additional {
                        self.release(a);
                    }
                    let reason = match reason {
                        CloseReason::Expired => {
                            self.stats.allocations_expired += 1;
                            "expired"
                        }
                        CloseReason::Deleted => {
                            self.stats.allocations_deleted += 1;
                            "deleted"
                        }
                        CloseReason::ConnectionClosed => {
                            self.stats.allocations_deleted += 1;
                            "connection_closed"
                        }
                    };
                    if let Some(h) = &self.histograms {
                        h.lifetime.observe(age.as_secs_f64());
                    }
                    // The usage record: one line per closed allocation, for billing.
                    tracing::info!(
                        target: "turnpike::usage",
                        user = %username,
                        realm = %self.server.config().realm,
                        client = %five_tuple.client,
                        relayed = %relayed,
                        duration_s = age.as_secs_f64(),
                        to_peer_packets = usage.to_peer_packets,
                        to_peer_bytes = usage.to_peer_bytes,
                        to_client_packets = usage.to_client_packets,
                        to_client_bytes = usage.to_client_bytes,
                        reason,
                        "allocation closed"
                    );
                }
                _ => {}
            }
        }
    }

    /// Counts a response sent by method and code.
    fn count_response(&mut self, r: Response) {
        self.stats.responses[method_index(r.method)][code_index(r.error)] += 1;
        if r.auth_error == Some(AuthError::BadCredentials) {
            self.stats.auth_failures += 1;
        }
    }

    /// Releases `relayed` to the control thread and queues its socket for closing.
    fn release(&mut self, relayed: SocketAddr) {
        // A full control queue would leak the port and quota: block briefly instead (the
        // queue is drained in batches; this path is a request, not a forwarded packet).
        let _ = self.control.send(ControlRequest::Release { relayed });
        self.released.push(relayed);
    }

    fn count_drop(&mut self, reason: DropReason) {
        self.stats.drops[drop_index(reason)] += 1;
    }

    /// Serves the ready stream listeners and connections.
    fn poll_streams(&mut self, out: &mut Vec<u8>) {
        let n = self.streams.poll();
        for i in 0..n {
            match self.streams.event(i) {
                (Token::Listener(l), _) => self.streams.accept(l, self.now),
                (Token::Conn(id), flags) => self.service_conn(id, flags, out),
                (Token::RelayListener(l), _) => self.accept_peers(l),
            }
        }
    }

    /// Closes connections that timed out or died while relaying, and ends their allocations.
    fn stream_housekeeping(&mut self) {
        let mut closed = std::mem::take(&mut self.stream_closed);
        let server = &self.server;
        self.streams
            .sweep(self.now, |ft| server.allocation(ft).is_some(), &mut closed);
        self.streams.reap(&mut closed);
        for (ft, kind) in closed.drain(..) {
            self.after_close(ft, kind);
        }
        self.stream_closed = closed;
        self.drain_events();
        self.apply_links();
    }

    /// What follows the close of a connection: a TURN client connection ends its
    /// allocation (RFC 8656 §3.1); an RFC 6062 data connection ends its partner (§5.5) and
    /// the server forgets it; a Connect that never connected is answered 447.
    fn after_close(&mut self, ft: FiveTuple, kind: ConnKind) {
        match kind {
            ConnKind::Client => {
                self.server.connection_closed(self.now, ft);
                self.drain_events();
            }
            ConnKind::Peer {
                connection_id,
                state: PeerState::Connecting(_),
            } => {
                let mut buf = Vec::new();
                if let Some((control, response)) =
                    self.server.complete_connect(self.now, connection_id, false, &mut buf)
                {
                    self.count_response(response);
                    let _ = self.streams.send_to(&control, &[&buf], self.now);
                }
            }
            ConnKind::Peer { connection_id, .. } | ConnKind::ClientData { connection_id, .. } => {
                self.server.peer_connection_closed(connection_id);
                if let Some((_, partner)) = kind.link() {
                    self.streams.close_slot(partner, StreamClose::Eof);
                }
            }
        }
    }

    /// Links the client data connections whose ConnectionBind succeeded with their peer
    /// data connections (RFC 6062 §5.4).
    fn apply_links(&mut self) {
        for (data, connection_id) in std::mem::take(&mut self.links) {
            let linked = match self.streams.slot_of(&data) {
                Some(slot) => self.streams.link(slot, connection_id, self.now),
                None => false,
            };
            if !linked {
                self.server.peer_connection_closed(connection_id);
                if let Some(slot) = self.streams.slot_of(&data) {
                    self.streams.close_slot(slot, StreamClose::Eof);
                }
                if let Some(peer) = self.streams.peer_slot(connection_id) {
                    self.streams.close_slot(peer, StreamClose::Eof);
                }
            }
        }
    }

    /// Accepts peers' connections to a TCP relayed transport address (RFC 6062 §5.3): kept
    /// and announced to the client with ConnectionAttempt, or closed.
    fn accept_peers(&mut self, index: usize) {
        for _ in 0..64 {
            let Some((socket, peer, relayed)) = self.streams.accept_peer(index) else {
                return;
            };
            let mut buf = Vec::new();
            let action = self.server.peer_connection(self.now, relayed, peer, &mut buf);
            tracing::debug!(%relayed, %peer, ?action, "rfc6062 peer connection");
            match action {
                PeerConnectionAction::Attempt { control, connection_id } => {
                    match self
                        .streams
                        .add_peer(socket, relayed, peer, connection_id, PeerState::Waiting, self.now)
                    {
                        Ok(_) => {
                            self.stats.streams.peer_connections += 1;
                            let _ = self.streams.send_to(&control, &[&buf], self.now);
                        }
                        Err(_) => self.server.peer_connection_closed(connection_id),
                    }
                }
                PeerConnectionAction::Refuse(reason) => self.count_drop(reason),
            }
        }
        self.streams.pending = true;
    }

    /// A Connect's connection to the peer finished (RFC 6062 §5.2): the response goes to
    /// the control connection; a connected peer data connection waits for its bind.
    fn finish_connect(&mut self, id: u32, mut conn: Conn, connection_id: u32, connected: bool) {
        tracing::debug!(connection_id, connected, "rfc6062 connect finished");
        let mut buf = Vec::new();
        match self
            .server
            .complete_connect(self.now, connection_id, connected, &mut buf)
        {
            Some((control, response)) => {
                self.count_response(response);
                let _ = self.streams.send_to(&control, &[&buf], self.now);
                if connected {
                    self.stats.streams.peer_connections += 1;
                    conn.kind = ConnKind::Peer {
                        connection_id,
                        state: PeerState::Waiting,
                    };
                    self.streams.put(id, conn);
                } else {
                    self.streams.close_taken(id, conn, StreamClose::Reset);
                }
            }
            None => {
                self.streams.close_taken(id, conn, StreamClose::Eof);
            }
        }
    }

    /// Puts a serviced connection back (or closes it, or hands it to another shard) and
    /// applies what its messages caused.
    fn finish_service(&mut self, id: u32, conn: Conn) {
        if let Some(tag) = conn.handover {
            let client = conn.five_tuple.client.ip();
            let owner = tag as usize;
            if owner < self.peers.len() && owner != self.index {
                let adopted = self.streams.detach(id, conn);
                if !self.peers[owner].send(ShardMessage::AdoptConnection(Box::new(adopted))) {
                    self.streams.forget(client);
                    self.stats.handover_overflow += 1;
                }
            } else {
                self.streams.close_taken(id, conn, StreamClose::BadFrame);
            }
            return;
        }
        let kind = conn.kind;
        match self.streams.put(id, conn) {
            Some((ft, _)) => self.after_close(ft, kind),
            None => self.streams.resume_partner(id),
        }
        self.drain_events();
        self.apply_links();
    }

    /// Reads what connection `id` has (a few reads at most), frames it and handles each
    /// message (or relays it as-is on an RFC 6062 data connection); writes what is queued
    /// when the socket is writable again; finishes a Connect's connection attempt.
    fn service_conn(&mut self, id: u32, flags: u32, out: &mut Vec<u8>) {
        let Some(mut conn) = self.streams.take(id) else {
            return;
        };
        if let ConnKind::Peer {
            connection_id,
            state: PeerState::Connecting(_),
        } = conn.kind
        {
            match conn.connect_result() {
                None => {
                    self.streams.put(id, conn);
                }
                Some(connected) => self.finish_connect(id, conn, connection_id, connected),
            }
            return;
        }
        if flags & libc::EPOLLOUT as u32 != 0 {
            conn.flush(self.now);
        }
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if flags & readable != 0 {
            let mut raw = std::mem::take(&mut self.streams.raw);
            let mut plain = std::mem::take(&mut self.streams.plain);
            let tls = self.streams.tls().cloned();
            let kind = conn.kind;
            for round in 0..READS_PER_TURN {
                if conn.dead().is_some() || conn.handover.is_some() || conn.paused || conn.kind != kind {
                    break;
                }
                if matches!(
                    kind,
                    ConnKind::Peer {
                        state: PeerState::Waiting,
                        ..
                    }
                ) {
                    // Not read before its bind; only a hang-up is noticed.
                    if flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                        conn.kill(StreamClose::Eof);
                    }
                    break;
                }
                match conn.read(&mut raw, &mut plain, tls.as_ref(), self.now) {
                    ReadOutcome::Data { plain: p, len } => {
                        let data = if p { &plain[..len] } else { &raw[..len] };
                        match kind.link() {
                            Some((_, partner)) => {
                                self.stats.streams.relayed_bytes += data.len() as u64;
                                self.streams.relay(&mut conn, partner, data, self.now);
                            }
                            None => self.stream_bytes(&mut conn, data, out),
                        }
                    }
                    ReadOutcome::WouldBlock => break,
                    ReadOutcome::Closed(why) => conn.kill(why),
                }
                if round + 1 == READS_PER_TURN {
                    self.streams.pending = true;
                }
            }
            self.streams.raw = raw;
            self.streams.plain = plain;
        }
        self.finish_service(id, conn);
    }

    /// Appends bytes read from a connection to its unframed rest and handles every complete
    /// message.
    fn stream_bytes(&mut self, conn: &mut Conn, data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        if conn.rbuf.is_empty() {
            // The common case: whole messages straight from the read buffer.
            let used = self.stream_frames(conn, data, out);
            if conn.dead().is_none() {
                conn.rbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut conn.rbuf);
            buf.extend_from_slice(data);
            let used = self.stream_frames(conn, &buf, out);
            buf.drain(..used);
            if buf.is_empty() && buf.capacity() > 16 * 1024 {
                buf = Vec::new();
            }
            conn.rbuf = buf;
        }
    }

    /// Handles the complete messages at the front of `data`; returns the bytes consumed. A
    /// stream that cannot be framed marks the connection dead.
    fn stream_frames(&mut self, conn: &mut Conn, data: &[u8], out: &mut Vec<u8>) -> usize {
        let max = self.streams.limits().max_frame;
        let mut at = 0;
        // Framing stops when the connection became an RFC 6062 data connection (what follows
        // its ConnectionBind is the client's data) or must move to another shard.
        while conn.dead().is_none() && conn.kind == ConnKind::Client && conn.handover.is_none() {
            match framing::next_frame(&data[at..], max) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::Stun(n)) | Ok(Frame::ChannelData(n)) => {
                    self.stream_message(conn, &data[at..at + n], out);
                    if conn.handover.is_none() {
                        at += n;
                    }
                }
                Err(FrameError::TooLong(_)) => conn.kill(StreamClose::FrameTooLong),
                Err(_) => conn.kill(StreamClose::BadFrame),
            }
        }
        at
    }

    /// One message from a TCP or TLS client: the same server logic as a datagram, with
    /// responses written back on the connection (RFC 8656 §3.1).
    fn stream_message(&mut self, conn: &mut Conn, data: &[u8], out: &mut Vec<u8>) {
        let ft = conn.five_tuple;
        conn.last_message = self.now;
        self.stats.client_rx += 1;
        self.stats.streams.messages += 1;
        if !channel_data::is_channel_data(data) {
            if let Some(t) = MessageType::from_u16(u16::from_be_bytes([data[0], data[1]])) {
                if t.class == Class::Request {
                    self.stats.requests[method_index(t.method)] += 1;
                }
            }
        }
        match self.server.handle_client(self.now, ft, data, out) {
            ClientAction::Respond(response) | ClientAction::RespondFrom(_, response) => {
                self.count_response(response);
                self.drain_events();
                match conn.send(&[out], self.now) {
                    Ok(()) => self.stats.responses_total += 1,
                    Err(SendError::Full) => self.stats.streams.backpressure_drops += 1,
                    Err(SendError::NoConnection) => {}
                }
                // A successful ConnectionBind (RFC 6062 §5.4): from here on the connection
                // carries the client's data, linked once it is back in its slot.
                if let Some(&(_, connection_id)) = self.links.iter().find(|(d, _)| *d == ft) {
                    conn.kind = ConnKind::ClientData {
                        connection_id,
                        peer: u32::MAX,
                    };
                }
            }
            ClientAction::Connect {
                connection_id,
                relayed,
                peer,
            } => {
                let started = self.streams.connect_peer(connection_id, relayed, peer, self.now);
                tracing::debug!(connection_id, %relayed, %peer, ok = started.is_ok(), "rfc6062 connect");
                if started.is_err() {
                    if let Some((_, response)) = self.server.complete_connect(self.now, connection_id, false, out) {
                        self.count_response(response);
                        let _ = conn.send(&[out], self.now);
                    }
                }
            }
            ClientAction::ConnectionElsewhere { tag } => conn.handover = Some(tag),
            ClientAction::Relay { relayed, peer, payload } => {
                let fd = self
                    .relay_ids
                    .get(&relayed)
                    .and_then(|id| self.relay_sockets.get(id))
                    .map(|s| s.as_raw_fd());
                match fd {
                    Some(fd) => match crate::sys::send_to(fd, payload, peer) {
                        Ok(_) => {
                            self.stats.to_peer += 1;
                            self.stats.to_peer_bytes += payload.len() as u64;
                        }
                        Err(_) => self.stats.io.send_errors += 1,
                    },
                    None => self.count_drop(DropReason::NoAllocation),
                }
            }
            ClientAction::Allocate(request) => self.send_allocate(request),
            ClientAction::Drop(reason) => self.count_drop(reason),
            ClientAction::Nothing => {}
        }
    }

    /// Hands an Allocate ticket to the control thread. A full queue means overload: no
    /// answer, the client retransmits (counted).
    fn send_allocate(&mut self, request: crate::proto::server::AllocateRequest) {
        let ticket = ControlRequest::Allocate {
            shard: self.index,
            request,
        };
        if self.control.try_send(ticket).is_err() {
            self.stats.control_overflow += 1;
        }
    }

    /// The per-datagram handler: the fast path.
    fn handle(&mut self, d: Datagram<'_>, out: &mut Vec<u8>) -> Verdict {
        match self.slots.get(d.socket as usize) {
            Some(&Slot::Listener(server)) => self.client_datagram(d, server, out),
            Some(&Slot::Relay(relayed)) => self.peer_datagram(d, relayed, out),
            _ => Verdict::Drop,
        }
    }

    fn client_datagram(&mut self, d: Datagram<'_>, server: SocketAddr, out: &mut Vec<u8>) -> Verdict {
        self.stats.client_rx += 1;
        // On a wildcard listener the 5-tuple's server address is the one the client sent to
        // (IP_PKTINFO), and answers leave from it.
        let server = match d.local {
            Some(ip) => SocketAddr::new(ip, server.port()),
            None => server,
        };
        let ft = FiveTuple::udp(d.from, server);
        let data = &d.buf[HEADROOM..HEADROOM + d.len];
        let sharded = self.peers.len() > 1;
        if sharded && request_needs_owner(data) && self.server.allocation(&ft).is_none() && self.hand_over(ft, data) {
            return Verdict::Drop;
        }
        if !channel_data::is_channel_data(data) && data.len() >= 2 {
            if let Some(t) = MessageType::from_u16(u16::from_be_bytes([data[0], data[1]])) {
                if t.class == Class::Request {
                    self.stats.requests[method_index(t.method)] += 1;
                }
            }
        }
        let base = d.buf.as_ptr() as usize;
        match self.server.handle_client(self.now, ft, data, out) {
            ClientAction::Respond(response) => {
                self.stats.responses_total += 1;
                self.count_response(response);
                self.drain_events();
                Verdict::Reply {
                    socket: d.socket,
                    to: d.from,
                    src: d.local,
                }
            }
            ClientAction::RespondFrom(origin, response) => match self.listener_for(origin) {
                Some((socket, src)) => {
                    self.stats.responses_total += 1;
                    self.count_response(response);
                    Verdict::Reply {
                        socket,
                        to: d.from,
                        src,
                    }
                }
                None => Verdict::Drop,
            },
            ClientAction::Relay { relayed, peer, payload } => {
                let start = payload.as_ptr() as usize - base;
                let end = start + payload.len();
                match self.relay_ids.get(&relayed) {
                    Some(&socket) => {
                        self.stats.to_peer += 1;
                        self.stats.to_peer_bytes += payload.len() as u64;
                        Verdict::Forward {
                            socket,
                            to: peer,
                            src: None,
                            start,
                            end,
                        }
                    }
                    None => {
                        self.count_drop(DropReason::NoAllocation);
                        Verdict::Drop
                    }
                }
            }
            ClientAction::Allocate(request) => {
                self.send_allocate(request);
                Verdict::Drop
            }
            // Connect needs a TCP allocation and ConnectionBind a TCP or TLS connection: the
            // server refuses both over UDP before they get here.
            ClientAction::Connect { .. } | ClientAction::ConnectionElsewhere { .. } => Verdict::Drop,
            // ChannelData or a Send indication for an allocation another shard may own.
            ClientAction::Drop(DropReason::NoAllocation) if sharded && self.hand_over(ft, data) => Verdict::Drop,
            ClientAction::Drop(reason) => {
                self.count_drop(reason);
                Verdict::Drop
            }
            ClientAction::Nothing => Verdict::Drop,
        }
    }

    /// Hands a datagram for an allocation owned by another shard to that shard. Returns
    /// whether it did (otherwise this shard handles it: 437 or a counted drop).
    fn hand_over(&mut self, ft: FiveTuple, data: &[u8]) -> bool {
        let owner = self.routes.read().ok().and_then(|r| r.get(&ft).copied());
        match owner {
            Some(owner) if owner != self.index => {
                let msg = ShardMessage::Handover {
                    five_tuple: ft,
                    data: data.to_vec(),
                };
                if self.peers[owner].send(msg) {
                    self.stats.handovers += 1;
                } else {
                    self.stats.handover_overflow += 1;
                }
                true
            }
            _ => false,
        }
    }

    fn peer_datagram(&mut self, d: Datagram<'_>, relayed: SocketAddr, out: &mut Vec<u8>) -> Verdict {
        self.stats.peer_rx += 1;
        match self.server.handle_peer(self.now, relayed, d.from, d.len) {
            PeerAction::Forward { five_tuple, channel } if five_tuple.transport.is_stream() => {
                let payload = &d.buf[HEADROOM..HEADROOM + d.len];
                let sent = match channel {
                    Some(ch) => {
                        // RFC 8656 §12.5: "Over TCP and TLS-over-TCP, the ChannelData message
                        // MUST be padded to a multiple of four bytes".
                        let header = ChannelData::header(ch, d.len as u16);
                        let pad = [0u8; 3];
                        let parts: [&[u8]; 3] = [&header, payload, &pad[..framing::channel_data_padding(d.len)]];
                        self.streams.send_to(&five_tuple, &parts, self.now)
                    }
                    None => {
                        self.server.encode_data_indication(d.from, payload, out);
                        self.streams.send_to(&five_tuple, &[out], self.now)
                    }
                };
                match sent {
                    Ok(()) => {
                        self.stats.to_client += 1;
                        self.stats.to_client_bytes += d.len as u64;
                    }
                    Err(SendError::NoConnection) => self.count_drop(DropReason::NoAllocation),
                    // Counted by the stream layer.
                    Err(SendError::Full) => {}
                }
                Verdict::Drop
            }
            PeerAction::Forward { five_tuple, channel } => {
                let Some((listener, src)) = self.listener_for(five_tuple.server) else {
                    self.count_drop(DropReason::NoAllocation);
                    return Verdict::Drop;
                };
                self.stats.to_client += 1;
                self.stats.to_client_bytes += d.len as u64;
                match channel {
                    Some(ch) => {
                        // Zero-copy: the ChannelData header goes into the headroom.
                        d.buf[..HEADROOM].copy_from_slice(&ChannelData::header(ch, d.len as u16));
                        Verdict::Forward {
                            socket: listener,
                            to: five_tuple.client,
                            src,
                            start: 0,
                            end: HEADROOM + d.len,
                        }
                    }
                    None => {
                        self.server
                            .encode_data_indication(d.from, &d.buf[HEADROOM..HEADROOM + d.len], out);
                        Verdict::Reply {
                            socket: listener,
                            to: five_tuple.client,
                            src,
                        }
                    }
                }
            }
            PeerAction::Drop(reason) => {
                self.count_drop(reason);
                Verdict::Drop
            }
        }
    }
}
