//! RFC 6062, TURN extensions for TCP allocations: the server side of Connect,
//! ConnectionBind and ConnectionAttempt, sans-IO.
//!
//! A TCP allocation (REQUESTED-TRANSPORT 6, only on a TCP or TLS control connection) has a
//! TCP relayed transport address. Its peer data connections are made by the shell: towards a
//! peer after a Connect ([`ClientAction::Connect`], answered through
//! [`Server::complete_connect`]), or accepted from a peer ([`Server::peer_connection`],
//! which writes the ConnectionAttempt indication). Each has a CONNECTION-ID; the client binds
//! it with ConnectionBind on a new TCP/TLS connection (a client data connection, reported as
//! [`Event::ConnectionBound`]), after which the shell relays bytes as-is both ways. The
//! server keeps the state per connection: connecting, pending (30 s to be bound), bound; it
//! tells the shell with [`Event::PeerConnectionClosed`] when a connection ends on its side
//! (bind timeout, allocation gone), and the shell tells it with
//! [`Server::peer_connection_closed`] when a socket closes.
//!
//! CONNECTION-IDs carry the owning server's tag in their low byte
//! ([`Server::with_connection_tag`]): a ConnectionBind reaching another shard's server is
//! answered [`ClientAction::ConnectionElsewhere`] so that the shell can move the connection.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_chacha::rand_core::RngCore;
use smallvec::SmallVec;

use super::{Auth, ClientAction, Event, RelayedPair, Reply, Server};
use crate::allocation::FiveTuple;
use crate::errors::{ConnectError, ConnectionBindError};
use crate::server::DropReason;
use crate::stun::attribute::kind;
use crate::stun::{Attribute, Class, Message, MessageBuilder, MessageType, Method};

/// How long a peer data connection waits for its ConnectionBind. RFC 6062 §5.3: "If the
/// client does not send a ConnectionBind request within 30 seconds, the server MUST close
/// the peer data connection."
pub const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// Peer data connections one TCP allocation may hold at once; a Connect beyond gets 403,
/// a peer's connection beyond is closed.
pub const MAX_CONNECTIONS_PER_ALLOCATION: usize = 64;

/// The state of one peer data connection.
#[derive(Debug, Clone)]
pub(super) enum ConnState {
    /// The shell is connecting to the peer (Connect); the response waits for the result.
    Connecting {
        tid: crate::stun::TransactionId,
        fingerprint: bool,
        auth: Auth,
    },
    /// Connected, waiting for the client's ConnectionBind until the deadline.
    Pending { deadline: Instant },
    /// Bound to a client data connection.
    Bound,
}

/// A peer data connection of a TCP allocation.
#[derive(Debug, Clone)]
pub(super) struct PeerConnection {
    /// The allocation's (control connection's) 5-tuple.
    control: FiveTuple,
    peer: SocketAddr,
    state: ConnState,
}

/// What the shell does with a TCP connection a peer opened to a relayed transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerConnectionAction {
    /// Keep it (do not read from it until it is bound) and send the ConnectionAttempt
    /// indication in `out` on the control connection `control`.
    Attempt {
        /// The allocation's control connection.
        control: FiveTuple,
        /// The new connection's CONNECTION-ID.
        connection_id: u32,
    },
    /// Close it at once (counted): no allocation, no permission, the policy refuses the
    /// peer, or too many connections.
    Refuse(DropReason),
}

/// The RFC 6062 state of a server.
#[derive(Debug, Default)]
pub(super) struct TcpRelayState {
    connections: ahash::AHashMap<u32, PeerConnection>,
    by_allocation: ahash::AHashMap<FiveTuple, SmallVec<[u32; 4]>>,
    timers: std::collections::BinaryHeap<Reverse<(Instant, u32)>>,
    pub(super) tag: u8,
}

impl TcpRelayState {
    fn count(&self, control: &FiveTuple) -> usize {
        self.by_allocation.get(control).map_or(0, |v| v.len())
    }

    fn insert(&mut self, id: u32, c: PeerConnection) {
        self.by_allocation.entry(c.control).or_default().push(id);
        self.connections.insert(id, c);
    }

    fn remove(&mut self, id: u32) -> Option<PeerConnection> {
        let c = self.connections.remove(&id)?;
        if let Some(list) = self.by_allocation.get_mut(&c.control) {
            list.retain(|x| *x != id);
            if list.is_empty() {
                self.by_allocation.remove(&c.control);
            }
        }
        Some(c)
    }

    /// The earliest bind deadline.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Number of peer data connections (all states).
    pub(super) fn len(&self) -> usize {
        self.connections.len()
    }
}

impl Server {
    /// The low byte of this server's CONNECTION-IDs (RFC 6062): the shard index, so that a
    /// ConnectionBind arriving at another shard can be moved to the owner.
    pub fn with_connection_tag(mut self, tag: u8) -> Self {
        self.tcp.tag = tag;
        self
    }

    fn new_connection_id(&mut self) -> u32 {
        loop {
            let id = (self.tid_rng.next_u32() & !0xFF) | u32::from(self.tcp.tag);
            if !self.tcp.connections.contains_key(&id) {
                return id;
            }
        }
    }

    /// A Connect request (RFC 6062 §5.2), authenticated.
    pub(super) fn connect<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        let _ = now;
        let Some(alloc) = self.owned_allocation(ft, reply, out) else {
            return ClientAction::Respond(self.response.get());
        };
        if !alloc.tcp_relay {
            self.error(out, reply, ConnectError::BadRequest);
            return ClientAction::Respond(self.response.get());
        }
        let relayed = RelayedPair::of(alloc);
        // RFC 6062 §5.2: "If the request does not contain an XOR-PEER-ADDRESS attribute, or
        // if such attribute is invalid, the server MUST return a 400 (Bad Request) error."
        let Some(Ok(Attribute::XorPeerAddress(peer))) = msg.get(kind::XOR_PEER_ADDRESS) else {
            self.error(out, reply, ConnectError::BadRequest);
            return ClientAction::Respond(self.response.get());
        };
        if let Err(e) = self.check_peer(relayed, peer) {
            self.error(out, reply, ConnectError::Peer(e));
            return ClientAction::Respond(self.response.get());
        }
        // RFC 6062 §5.2: "If the server is currently processing a Connect request for this
        // allocation with the same XOR-PEER-ADDRESS, it MUST return a 446 (Connection Already
        // Exists) error. If the server has already successfully processed a Connect request
        // for this allocation with the same XOR-PEER-ADDRESS, and the resulting client and
        // peer data connections are either pending or active, it MUST return a 446".
        let exists = self.tcp.by_allocation.get(&ft).is_some_and(|ids| {
            ids.iter()
                .any(|id| self.tcp.connections.get(id).is_some_and(|c| c.peer == peer))
        });
        if exists {
            self.error(out, reply, ConnectError::AlreadyExists);
            return ClientAction::Respond(self.response.get());
        }
        // "If the new connection would exceed the capacity or policy of the server, it MUST
        // return a 403 (Forbidden) error."
        if self.tcp.count(&ft) >= MAX_CONNECTIONS_PER_ALLOCATION {
            self.error(out, reply, ConnectError::TooManyConnections);
            return ClientAction::Respond(self.response.get());
        }
        let id = self.new_connection_id();
        self.tcp.insert(
            id,
            PeerConnection {
                control: ft,
                peer,
                state: ConnState::Connecting {
                    tid: reply.tid,
                    fingerprint: reply.fingerprint,
                    auth: reply.auth.expect("authenticated").clone(),
                },
            },
        );
        ClientAction::Connect {
            connection_id: id,
            relayed: relayed.for_peer(peer).unwrap_or(relayed.0),
            peer,
        }
    }

    /// Finishes a Connect once the shell's TCP connection to the peer succeeded (`true`) or
    /// failed or timed out (`false`; RFC 6062 §5.2: "If the connection attempt fails or
    /// times out, the server MUST return a 447 (Connection Timeout or Failure) error").
    /// Writes the response to `out` and returns the control connection to send it on, or
    /// `None` when the Connect is no longer known (its allocation ended meanwhile: close the
    /// socket).
    pub fn complete_connect(
        &mut self,
        now: Instant,
        connection_id: u32,
        connected: bool,
        out: &mut Vec<u8>,
    ) -> Option<(FiveTuple, super::Response)> {
        let c = self.tcp.connections.get(&connection_id)?;
        let ConnState::Connecting { tid, fingerprint, auth } = c.state.clone() else {
            return None;
        };
        let control = c.control;
        let reply = Reply {
            method: Method::Connect,
            tid,
            fingerprint,
            auth: Some(&auth),
        };
        if connected {
            // RFC 6062 §5.2: "the server MUST respond with a Connect success response ... The
            // response MUST contain a CONNECTION-ID attribute" and waits 30 s for the bind.
            let deadline = now + BIND_TIMEOUT;
            if let Some(c) = self.tcp.connections.get_mut(&connection_id) {
                c.state = ConnState::Pending { deadline };
            }
            self.tcp.timers.push(Reverse((deadline, connection_id)));
            self.respond(out, &reply, Class::Success, |b| {
                b.attribute(&Attribute::ConnectionId(connection_id));
            });
        } else {
            self.tcp.remove(connection_id);
            self.error(out, &reply, ConnectError::Failed);
        }
        Some((control, self.response.get()))
    }

    /// A ConnectionBind request (RFC 6062 §5.4), authenticated, on `ft`.
    pub(super) fn connection_bind<'a>(
        &mut self,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        // RFC 6062 §5.4: "If the client connection transport is not TCP or TLS, the server
        // MUST return a 400 (Bad Request) error. If the request does not contain the
        // CONNECTION-ID attribute, or if this attribute does not refer to an existing pending
        // connection, the server MUST return a 400 (Bad Request) error." A connection that
        // holds an allocation is a control connection, not a data connection: 400 too.
        let id = match msg.get(kind::CONNECTION_ID) {
            Some(Ok(Attribute::ConnectionId(id)))
                if ft.transport.is_stream() && !self.allocations.contains_key(&ft) =>
            {
                id
            }
            _ => {
                self.error(out, reply, ConnectionBindError::BadRequest);
                return ClientAction::Respond(self.response.get());
            }
        };
        let tag = (id & 0xFF) as u8;
        if tag != self.tcp.tag {
            return ClientAction::ConnectionElsewhere { tag };
        }
        let Some(c) = self.tcp.connections.get(&id) else {
            self.error(out, reply, ConnectionBindError::BadRequest);
            return ClientAction::Respond(self.response.get());
        };
        if !matches!(c.state, ConnState::Pending { .. }) {
            self.error(out, reply, ConnectionBindError::BadRequest);
            return ClientAction::Respond(self.response.get());
        }
        let user = &reply.auth.expect("authenticated").username;
        if self.allocations.get(&c.control).is_none_or(|a| *a.username != **user) {
            self.error(out, reply, ConnectionBindError::WrongCredentials);
            return ClientAction::Respond(self.response.get());
        }
        let peer = c.peer;
        if let Some(c) = self.tcp.connections.get_mut(&id) {
            c.state = ConnState::Bound;
        }
        self.events.push_back(Event::ConnectionBound {
            connection_id: id,
            data: ft,
            peer,
        });
        self.respond(out, reply, Class::Success, |_| {});
        ClientAction::Respond(self.response.get())
    }

    /// A peer opened a TCP connection to the relayed transport address `relayed`
    /// (RFC 6062 §5.3). With a live TCP allocation, a permission for the peer's IP and room
    /// for another connection, writes the ConnectionAttempt indication (XOR-PEER-ADDRESS,
    /// CONNECTION-ID) into `out`; the peer data connection must be bound within
    /// [`BIND_TIMEOUT`].
    pub fn peer_connection(
        &mut self,
        now: Instant,
        relayed: SocketAddr,
        peer: SocketAddr,
        out: &mut Vec<u8>,
    ) -> PeerConnectionAction {
        let Some(&control) = self.by_relay.get(&relayed) else {
            return PeerConnectionAction::Refuse(DropReason::NoAllocation);
        };
        let Some(alloc) = self
            .allocations
            .get(&control)
            .filter(|a| a.expires > now && a.tcp_relay)
        else {
            return PeerConnectionAction::Refuse(DropReason::NoAllocation);
        };
        if self.policy.check(peer).is_err() {
            return PeerConnectionAction::Refuse(DropReason::PeerDenied);
        }
        // RFC 6062 §5.3: "If no permission for this peer has been installed for this
        // allocation, the server MUST close the connection with the peer immediately after
        // it has been accepted."
        if !alloc.has_permission(peer.ip(), now) {
            return PeerConnectionAction::Refuse(DropReason::NoPermission);
        }
        if self.tcp.count(&control) >= MAX_CONNECTIONS_PER_ALLOCATION {
            return PeerConnectionAction::Refuse(DropReason::BandwidthExceeded);
        }
        let id = self.new_connection_id();
        let deadline = now + BIND_TIMEOUT;
        self.tcp.insert(
            id,
            PeerConnection {
                control,
                peer,
                state: ConnState::Pending { deadline },
            },
        );
        self.tcp.timers.push(Reverse((deadline, id)));
        // RFC 6062 §5.3: "The indication MUST include an XOR-PEER-ADDRESS attribute
        // containing the peer's transport address, as well as a CONNECTION-ID attribute
        // uniquely identifying the peer data connection."
        let tid = self.next_tid();
        let mut b = MessageBuilder::new(out, MessageType::new(Method::ConnectionAttempt, Class::Indication), tid);
        b.attribute(&Attribute::XorPeerAddress(peer));
        b.attribute(&Attribute::ConnectionId(id));
        PeerConnectionAction::Attempt {
            control,
            connection_id: id,
        }
    }

    /// The shell closed a peer or client data connection (either side ended: RFC 6062 §5.5,
    /// the shell closes the other one too), or gave up connecting. Forgets the connection.
    pub fn peer_connection_closed(&mut self, connection_id: u32) {
        self.tcp.remove(connection_id);
    }

    /// Ends the peer data connections of the allocation of `control` (it is being removed).
    pub(super) fn close_connections_of(&mut self, control: FiveTuple) {
        let ids = self.tcp.by_allocation.remove(&control).unwrap_or_default();
        for id in ids {
            self.tcp.connections.remove(&id);
            self.events.push_back(Event::PeerConnectionClosed { connection_id: id });
        }
    }

    /// Closes pending peer data connections whose bind deadline passed at `now`.
    pub(super) fn expire_connections(&mut self, now: Instant) {
        while let Some(&Reverse((t, id))) = self.tcp.timers.peek() {
            if t > now {
                break;
            }
            self.tcp.timers.pop();
            let due = matches!(
                self.tcp.connections.get(&id).map(|c| &c.state),
                Some(ConnState::Pending { deadline }) if *deadline == t
            );
            if due {
                self.tcp.remove(id);
                self.events.push_back(Event::PeerConnectionClosed { connection_id: id });
            }
        }
    }

    /// Peer data connections held (all states), for tests and gauges.
    pub fn tcp_connection_count(&self) -> usize {
        self.tcp.len()
    }
}
