//! The sans-IO TURN server (RFC 8656 over UDP) and STUN Binding server (RFC 8489).
//!
//! # Driving it
//! Inputs take `now: Instant` and bytes; outputs are written into caller-owned buffers or
//! returned as routing decisions that borrow the input, so the shell forwards payloads
//! without copying them:
//!
//! - [`Server::handle_client`] for every datagram from a client on a listening socket. It
//!   returns a [`ClientAction`]: a response in `out`, a payload to relay to a peer, an
//!   Allocate for the shell to reserve a relayed transport address for (then
//!   [`Server::complete_allocate`]), or a counted drop.
//! - [`Server::handle_peer`] for every datagram arriving on a relayed transport address. It
//!   returns a [`PeerAction`]: which client gets it and whether as ChannelData or as a Data
//!   indication ([`Server::encode_data_indication`]).
//! - [`Server::poll_timeout`] / [`Server::handle_timeout`] drive expiry of allocations,
//!   permissions and channel bindings; [`Server::poll_event`] then yields the allocations
//!   the shell must close. After any input, drain `poll_event` and re-read `poll_timeout`.
//!
//! ```
//! use std::time::Instant;
//! use turnpike_proto::{allocation::FiveTuple, auth::Credentials, peer_policy::PeerPolicy};
//! use turnpike_proto::server::{ClientAction, Server, ServerConfig};
//!
//! let now = Instant::now();
//! let config = ServerConfig::default();
//! let creds = Credentials::new([("alice".into(), "pw".into())], vec![], &config.realm);
//! let mut server = Server::new(config, creds, PeerPolicy::default(), [1; 32], now, 1_700_000_000);
//! let ft = FiveTuple::udp("192.0.2.1:5000".parse().unwrap(), "192.0.2.9:3478".parse().unwrap());
//! let mut out = Vec::new();
//! // A datagram that is neither STUN nor ChannelData is dropped, and the reason returned.
//! assert!(matches!(server.handle_client(now, ft, b"junk", &mut out), ClientAction::Drop(_)));
//! ```

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::allocation::{Allocation, ChannelBinding, Expired, FiveTuple, Transport, Usage};
use super::auth::{Authenticated, Credentials, NonceError, NonceIssuer};
use super::channel_data::{self, ChannelData, MAX_CHANNEL_RFC5766, MAX_CHANNEL_STRICT, MIN_CHANNEL};
use super::errors::{
    AllocateError, AllocationError, ChannelBindError, PeerError, PermissionError, RefreshError, RequestError,
};
pub use super::errors::{AuthError, RelayError};
use super::peer_policy::PeerPolicy;
use super::rate_limit::{burst_for, PrefixLimiter, TokenBucket};
use super::stun::attribute::{encode_password_algorithms, kind, password_algorithms};
use super::stun::integrity::{self, LongTermKey};
use super::stun::{
    AddressFamily, Attribute, Class, ErrorCode, Message, MessageBuilder, MessageType, Method, PasswordAlgorithm,
    TransactionId,
};

/// UDP's IANA protocol number, REQUESTED-TRANSPORT of UDP allocations (RFC 8656 §7.2).
pub const PROTOCOL_UDP: u8 = 17;
/// TCP's IANA protocol number, REQUESTED-TRANSPORT of TCP allocations (RFC 6062 §5.1).
pub const PROTOCOL_TCP: u8 = 6;

#[path = "tcp_relay.rs"]
mod tcp_relay;
pub use tcp_relay::{PeerConnectionAction, BIND_TIMEOUT, MAX_CONNECTIONS_PER_ALLOCATION};

/// The client address a nonce is bound to: IP and port over UDP (RFC 8489 §9.2.4; a
/// request captured on one port and replayed from another gets 438), the IP alone over TCP
/// and TLS. Deviation for interoperability: an RFC 6062 client authenticates its control
/// connection and each data connection (each from its own port) with one nonce (coturn's
/// `turnutils_uclient -T` does), and a stream cannot be spoofed from another port.
fn nonce_address(ft: FiveTuple) -> SocketAddr {
    if ft.transport.is_stream() {
        SocketAddr::new(ft.client.ip(), 0)
    } else {
        ft.client
    }
}

/// The transport of a relayed transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTransport {
    /// UDP (RFC 8656).
    Udp,
    /// TCP (RFC 6062): a listening socket on the relayed transport address, peer data
    /// connections made by Connect or accepted from peers.
    Tcp,
}

/// How long a retransmitted Allocate waits for its first transmission's ticket before a new
/// ticket is sent (the first was lost in a full queue).
const PENDING_TIMEOUT: Duration = Duration::from_secs(5);
/// Outstanding Allocate tickets per server at most (each from an authenticated request).
const MAX_PENDING_ALLOCATES: usize = 4096;

/// Server settings that the protocol logic needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The realm of the long-term credentials (RFC 8489 §9.2).
    pub realm: String,
    /// Allocation lifetime when the client asks for none or for less (RFC 8656 §6: 600 s).
    pub default_lifetime: Duration,
    /// The longest allocation lifetime granted (RFC 8656 §7.2: 3600 s recommended).
    pub max_lifetime: Duration,
    /// Permission lifetime. RFC 8656 §9: "The Permission Lifetime MUST be 300 seconds (= 5 minutes)."
    /// The default is 300 s; only tests set another value (the daemon's configuration has no
    /// such setting).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (RFC 8656 §12: 600 s).
    pub channel_lifetime: Duration,
    /// How long a nonce stays valid before 438 Stale Nonce.
    pub nonce_lifetime: Duration,
    /// Accept only RFC 8656 channel numbers 0x4000-0x4FFF. Off by default: RFC 5766 clients
    /// in the field pick from 0x4000-0x7FFF.
    pub strict_channel_numbers: bool,
    /// Permissions per allocation (508 beyond).
    pub max_permissions_per_allocation: usize,
    /// Channel bindings per allocation (508 beyond).
    pub max_channels_per_allocation: usize,
    /// SOFTWARE attribute for responses; `None` (the default) omits it.
    pub software: Option<String>,
    /// RFC 5780 NAT behaviour discovery, when the server has a second IP and port.
    pub nat_discovery: Option<NatDiscovery>,
    /// 401/438 challenges per second per source prefix (0: no limit); beyond it requests
    /// without valid credentials are dropped silently, so spoofed requests cannot turn the
    /// server into a reflector.
    pub challenge_rate: u32,
    /// STUN requests per second per source prefix, authenticated or not (0: no limit).
    pub request_rate: u32,
    /// Prefix length that groups IPv4 sources for both rates (32: one bucket per address).
    pub rate_limit_v4_prefix: u8,
    /// Prefix length that groups IPv6 sources for both rates (64: one bucket per /64).
    pub rate_limit_v6_prefix: u8,
    /// Bandwidth cap per allocation and direction in bits/s, payload bytes counted (0: none).
    pub max_bitrate: u64,
}

/// The two addresses of RFC 5780 NAT behaviour discovery: the server listens on all four
/// combinations of {primary IP, alternate IP} x {primary port, alternate port}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatDiscovery {
    /// The primary transport address (IP1:P1).
    pub primary: SocketAddr,
    /// The alternate transport address (IP2:P2), advertised as OTHER-ADDRESS.
    pub alternate: SocketAddr,
}

impl NatDiscovery {
    /// The four listening transport addresses, primary first.
    pub fn addresses(&self) -> [SocketAddr; 4] {
        let (ip1, p1, ip2, p2) = (
            self.primary.ip(),
            self.primary.port(),
            self.alternate.ip(),
            self.alternate.port(),
        );
        [
            self.primary,
            SocketAddr::new(ip1, p2),
            SocketAddr::new(ip2, p1),
            self.alternate,
        ]
    }

    /// The address a response to a Binding received on `local` comes from, given the
    /// CHANGE-REQUEST flags (RFC 5780 §6.1: 0x4 change IP, 0x2 change port); `None` when
    /// `local` is not one of the four addresses.
    pub fn response_origin(&self, local: SocketAddr, change_ip: bool, change_port: bool) -> Option<SocketAddr> {
        let other = self.other_address(local)?;
        let ip = if change_ip { other.ip() } else { local.ip() };
        let port = if change_port { other.port() } else { local.port() };
        Some(SocketAddr::new(ip, port))
    }

    /// OTHER-ADDRESS for a Binding received on `local`: the other IP and the other port
    /// (RFC 5780 §7.4).
    pub fn other_address(&self, local: SocketAddr) -> Option<SocketAddr> {
        let (ip1, p1, ip2, p2) = (
            self.primary.ip(),
            self.primary.port(),
            self.alternate.ip(),
            self.alternate.port(),
        );
        let ip = if local.ip() == ip1 {
            ip2
        } else if local.ip() == ip2 {
            ip1
        } else {
            return None;
        };
        let port = if local.port() == p1 {
            p2
        } else if local.port() == p2 {
            p1
        } else {
            return None;
        };
        Some(SocketAddr::new(ip, port))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            realm: "turnpike".into(),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            nonce_lifetime: Duration::from_secs(600),
            strict_channel_numbers: false,
            max_permissions_per_allocation: 256,
            max_channels_per_allocation: 1024,
            software: None,
            nat_discovery: None,
            challenge_rate: 1000,
            request_rate: 5000,
            rate_limit_v4_prefix: 32,
            rate_limit_v6_prefix: 64,
            max_bitrate: 0,
        }
    }
}

/// Why a datagram was dropped without an answer. The shell counts these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed STUN or ChannelData message.
    Malformed,
    /// FINGERPRINT present and wrong.
    BadFingerprint,
    /// A STUN response or an indication other than Send from a client.
    UnexpectedMessage,
    /// ChannelData, Send indication or peer datagram for no (live) allocation.
    NoAllocation,
    /// ChannelData on a channel that is not bound.
    NoChannel,
    /// No permission for the peer's IP.
    NoPermission,
    /// The peer address is refused by the peer address policy.
    PeerDenied,
    /// A Send indication whose peer address family differs from the relayed address's.
    FamilyMismatch,
    /// The source prefix exceeded its request rate or its 401/438 challenge rate.
    RateLimited,
    /// The allocation exceeded its bandwidth cap in this direction.
    BandwidthExceeded,
    /// An indication with an unknown comprehension-required attribute (RFC 8489 §6.3.2).
    UnknownAttribute,
    /// A retransmitted Allocate whose first transmission is still waiting for its relayed
    /// transport address; the client retransmits again and gets that answer (RFC 8656 §7.2).
    AllocatePending,
}

/// What the shell does with a client datagram after [`Server::handle_client`].
#[derive(Debug)]
pub enum ClientAction<'a> {
    /// Send the response in `out` to the 5-tuple's client, from its server address.
    Respond(Response),
    /// Send the response in `out` to the 5-tuple's client from this other local transport
    /// address (RFC 5780 CHANGE-REQUEST).
    RespondFrom(SocketAddr, Response),
    /// Send `payload` (a slice of the input) from the relayed transport address to `peer`.
    Relay {
        /// Relayed transport address to send from.
        relayed: SocketAddr,
        /// Peer transport address to send to.
        peer: SocketAddr,
        /// The application data.
        payload: &'a [u8],
    },
    /// An authenticated, valid Allocate: reserve a relayed transport address as asked and
    /// call [`Server::complete_allocate`].
    Allocate(AllocateRequest),
    /// An authenticated, valid Connect (RFC 6062 §5.2): open a TCP connection from
    /// `relayed` to `peer` (at least 30 s before giving up) and call
    /// [`Server::complete_connect`] with the result.
    Connect {
        /// The CONNECTION-ID of the new peer data connection.
        connection_id: u32,
        /// The relayed transport address to connect from.
        relayed: SocketAddr,
        /// The peer to connect to.
        peer: SocketAddr,
    },
    /// A ConnectionBind (RFC 6062 §5.4) for a connection of another server (the shard
    /// whose [`Server::with_connection_tag`] is `tag`): hand the client connection, with
    /// this message, to that shard.
    ConnectionElsewhere {
        /// The owning server's tag.
        tag: u8,
    },
    /// Nothing to send; count the reason.
    Drop(DropReason),
    /// Nothing to send (an indication that needs no answer).
    Nothing,
}

/// What a response in `out` carries: its method and, for an error response, the code (for
/// counting responses by method and code without decoding them again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Response {
    /// The request's method.
    pub method: Method,
    /// `None` for a success response, else the ERROR-CODE.
    pub error: Option<ErrorCode>,
    /// Why authentication refused the request, when it did (401, 438 or 400).
    pub auth_error: Option<AuthError>,
}

/// The result of [`Server::complete_allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocateCompletion {
    /// The response written to `out` (always send it).
    pub response: Response,
    /// A relayed transport address the shell must release again: the allocation could not
    /// take it (another ticket of the same 5-tuple got there first).
    pub release: Option<SocketAddr>,
    /// The additional (IPv6) relayed transport address of a dual allocation to release
    /// again, for the same reason or because the first family failed.
    pub release_additional: Option<SocketAddr>,
    /// How long the Allocate waited for its relayed transport address (from the ticket to
    /// this answer), when its ticket was this server's.
    pub waited: Option<Duration>,
}

/// An Allocate that passed every check and now needs a relayed transport address
/// (RFC 8656 §7.2). Opaque except for what the shell needs to pick the address.
#[derive(Debug, Clone)]
pub struct AllocateRequest {
    /// The client 5-tuple.
    pub five_tuple: FiveTuple,
    /// UDP, or TCP for an RFC 6062 TCP allocation.
    pub relay_transport: RelayTransport,
    /// The address family the relayed transport address must have.
    pub family: AddressFamily,
    /// Whether the port must be even (EVEN-PORT, RFC 8656 §7.2).
    pub even_port: bool,
    /// EVEN-PORT's R bit: also reserve the next higher port and answer with a
    /// RESERVATION-TOKEN ([`AllocateRequest::grant_reservation`]).
    pub reserve_next: bool,
    /// The RESERVATION-TOKEN the client presented: the relayed transport address must be
    /// the one reserved under it ([`RelayError::BadReservationToken`] if unknown or expired).
    pub reservation_token: Option<[u8; 8]>,
    granted_token: Option<[u8; 8]>,
    tid: TransactionId,
    auth: Auth,
    lifetime: Duration,
    fingerprint: bool,
    /// ADDITIONAL-ADDRESS-FAMILY (IPv6): the client asks for a dual allocation.
    additional_family: Option<AddressFamily>,
    /// The shell's result for the additional family ([`AllocateRequest::grant_additional`]).
    additional: Option<Result<SocketAddr, RelayError>>,
}

impl AllocateRequest {
    /// The family of the second relayed transport address of a dual allocation
    /// (ADDITIONAL-ADDRESS-FAMILY, RFC 8656 §7.2), if the client asked for one. The shell
    /// reserves an address of it too and reports with [`AllocateRequest::grant_additional`];
    /// without a report the family is refused with ADDRESS-ERROR-CODE 440.
    pub fn additional_family(&self) -> Option<AddressFamily> {
        self.additional_family
    }

    /// Records the shell's result for [`AllocateRequest::additional_family`]: the address,
    /// or why none (answered with ADDRESS-ERROR-CODE: 440, 486 or 508, RFC 8656 §7.2).
    pub fn grant_additional(&mut self, result: Result<SocketAddr, RelayError>) {
        self.additional = Some(result);
    }

    /// Records the token under which the shell reserved the next port (for
    /// [`AllocateRequest::reserve_next`]); the success response carries it.
    pub fn grant_reservation(&mut self, token: [u8; 8]) {
        self.granted_token = Some(token);
    }

    /// The authenticated user, for quotas kept outside the server (a control thread
    /// shared by several shards).
    pub fn username(&self) -> &str {
        &self.auth.username
    }
}

/// Where a peer datagram goes, from [`Server::handle_peer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAction {
    /// Send to the 5-tuple's client, from its server address, framed as ChannelData on
    /// `channel` (4-byte header, [`ChannelData::header`]) or, when `None`, as a Data
    /// indication ([`Server::encode_data_indication`]).
    Forward {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// The bound channel, if any.
        channel: Option<u16>,
    },
    /// Drop and count.
    Drop(DropReason),
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Its lifetime ran out (RFC 8656 §8).
    Expired,
    /// A Refresh with LIFETIME 0 deleted it (RFC 8656 §8).
    Deleted,
    /// Its TCP or TLS connection closed (RFC 8656 §3.1: the allocation lives no longer than
    /// the connection it was made on).
    ConnectionClosed,
}

/// What the server decided, for the shell and whatever it feeds (metrics, a kernel fast
/// path, usage records), from [`Server::poll_event`]. Requests, timeouts and completed
/// Allocates emit events; the per-packet paths (ChannelData, Send, peer data) never do.
///
/// Every event names the allocation by its 5-tuple and relayed transport address. When an
/// allocation closes, its permissions and channel bindings go with it: no separate
/// expiry events are emitted for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An Allocate succeeded (RFC 8656 §7.2).
    AllocationCreated {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The IPv6 relayed transport address of a dual allocation.
        additional: Option<SocketAddr>,
        /// The granted lifetime.
        lifetime: Duration,
    },
    /// A Refresh with a non-zero LIFETIME succeeded (RFC 8656 §8).
    AllocationRefreshed {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The IPv6 relayed transport address of a dual allocation.
        additional: Option<SocketAddr>,
        /// The granted lifetime, from now.
        lifetime: Duration,
    },
    /// The allocation is gone: close the relayed transport address's socket and return
    /// its port.
    AllocationClosed {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address to release.
        relayed: SocketAddr,
        /// The IPv6 relayed transport address of a dual allocation, to release too.
        additional: Option<SocketAddr>,
        /// Why.
        reason: CloseReason,
        /// How long it lived.
        age: Duration,
        /// What it relayed.
        usage: Usage,
        /// The user that created it (for usage records).
        username: Box<str>,
    },
    /// A ConnectionBind succeeded (RFC 6062 §5.4): after its response, relay the bytes of the
    /// client data connection `data` and of the peer data connection `connection_id` as-is
    /// both ways.
    ConnectionBound {
        /// The CONNECTION-ID.
        connection_id: u32,
        /// The client data connection's 5-tuple.
        data: FiveTuple,
        /// The peer.
        peer: SocketAddr,
    },
    /// A peer data connection ended on the server's side (not bound within 30 s, or its
    /// allocation ended): close its socket and its client data connection, if any.
    PeerConnectionClosed {
        /// The CONNECTION-ID.
        connection_id: u32,
    },
    /// A permission was installed or refreshed (RFC 8656 §9) by CreatePermission or
    /// ChannelBind.
    PermissionInstalled {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The peer IP it permits (ports do not matter).
        peer: IpAddr,
        /// When it expires unless refreshed.
        expires: Instant,
    },
    /// A permission expired (RFC 8656 §9: 300 s without refresh).
    PermissionExpired {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The peer IP.
        peer: IpAddr,
    },
    /// A channel was bound to a peer (RFC 8656 §12).
    ChannelBound {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The channel number.
        channel: u16,
        /// The peer transport address.
        peer: SocketAddr,
        /// When the binding expires unless refreshed.
        expires: Instant,
    },
    /// A ChannelBind on a live binding (same number, same peer) refreshed it (RFC 8656 §12).
    ChannelRebound {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The channel number.
        channel: u16,
        /// The peer transport address.
        peer: SocketAddr,
        /// The new expiry.
        expires: Instant,
    },
    /// A channel binding expired (RFC 8656 §12: 600 s without refresh).
    ChannelExpired {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The relayed transport address.
        relayed: SocketAddr,
        /// The channel number.
        channel: u16,
        /// The peer transport address it was bound to.
        peer: SocketAddr,
    },
}

/// What the server holds, by the family of the relayed transport address (`[IPv4, IPv6]`),
/// from [`Server::gauges`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Allocations.
    pub allocations: [usize; 2],
    /// Allocations by the client transport (`[UDP, TCP, TLS]`), all families together.
    pub by_transport: [usize; 3],
    /// Permissions.
    pub permissions: [usize; 2],
    /// Channel bindings.
    pub channels: [usize; 2],
}

/// Entry counts of the server's tables, from [`Server::table_sizes`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// Allocations.
    pub allocations: usize,
    /// Relayed transport address index.
    pub relays: usize,
    /// Allocate tickets awaiting a relayed transport address.
    pub pending: usize,
    /// Timer heap entries, superseded ones included.
    pub timers: usize,
    /// Events not yet polled.
    pub events: usize,
}

impl TableSizes {
    /// All entries together.
    pub fn total(&self) -> usize {
        self.allocations + self.relays + self.pending + self.timers + self.events
    }
}

/// Why authentication did not let a request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// An error response (400, 401, 438) is in `out`.
    Responded,
    /// The source prefix used up its challenge rate: drop silently.
    RateLimited,
}

/// Which MESSAGE-INTEGRITY variant protected a request; its response uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mac {
    Sha1,
    Sha256,
}

#[derive(Debug, Clone)]
struct Auth {
    username: String,
    key: LongTermKey,
    mac: Mac,
}

/// The relayed transport addresses of an allocation (two for a dual allocation), copied out
/// of it while the server's tables are borrowed.
#[derive(Debug, Clone, Copy)]
struct RelayedPair(SocketAddr, Option<SocketAddr>);

impl RelayedPair {
    fn of(alloc: &Allocation) -> Self {
        RelayedPair(alloc.relayed, alloc.additional)
    }

    /// The address that talks to peers of `peer`'s family (RFC 8656 §7.2, dual allocation).
    fn for_peer(self, peer: SocketAddr) -> Option<SocketAddr> {
        if peer.is_ipv4() == self.0.is_ipv4() {
            Some(self.0)
        } else {
            self.1.filter(|a| a.is_ipv4() == peer.is_ipv4())
        }
    }
}

/// What an Allocate success response reports (RFC 8656 §7.2).
struct Grant {
    relayed: SocketAddr,
    additional: Option<SocketAddr>,
    lifetime: Duration,
    refused_family: Option<(AddressFamily, ErrorCode)>,
    token: Option<[u8; 8]>,
}

impl Grant {
    /// The answer to a retransmission of the Allocate that created `alloc`: the same
    /// attributes as the first answer, with the lifetime that remains (RFC 8656 §7.2).
    fn repeated(alloc: &Allocation, now: Instant) -> Grant {
        Grant {
            relayed: alloc.relayed,
            additional: alloc.additional,
            lifetime: alloc.expires.saturating_duration_since(now),
            refused_family: alloc.refused_family,
            token: alloc.reservation_token,
        }
    }
}

/// How to answer one request: the request's identity plus the integrity to apply.
struct Reply<'r> {
    method: Method,
    tid: TransactionId,
    fingerprint: bool,
    auth: Option<&'r Auth>,
}

/// The sans-IO TURN server. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    credentials: Credentials,
    policy: PeerPolicy,
    nonces: NonceIssuer,
    epoch: Instant,
    epoch_unix: u64,
    allocations: AHashMap<FiveTuple, Allocation>,
    by_relay: AHashMap<SocketAddr, FiveTuple>,
    timers: BinaryHeap<Reverse<(Instant, FiveTuple)>>,
    events: VecDeque<Event>,
    /// Transaction IDs of Data indications (RFC 8489 §5: cryptographically random).
    tid_rng: ChaCha8Rng,
    /// Allocate tickets with the control thread: 5-tuple to (transaction ID, when sent).
    pending_allocates: AHashMap<FiveTuple, (TransactionId, Instant)>,
    challenge_limiter: Option<RefCell<PrefixLimiter>>,
    /// The secret of nonces and limiter seeds, kept for [`Server::reload`].
    secret: [u8; 32],
    /// What the last response written carries.
    response: Cell<Response>,
    /// Draining: `Some(alternate server)` refuses new Allocates (300 with it, or 403).
    draining: Option<Option<SocketAddr>>,
    /// RFC 6062 peer data connections.
    tcp: tcp_relay::TcpRelayState,
    request_limiter: Option<PrefixLimiter>,
}

impl Server {
    /// A server with its settings, credentials, peer policy and a random 32-byte secret
    /// (for nonces and indication transaction IDs). `now` and `unix_now` (seconds since
    /// 1970) anchor the wall clock that nonces and TURN REST API usernames need; later
    /// wall-clock times are derived from the `Instant`s passed in.
    pub fn new(
        config: ServerConfig,
        credentials: Credentials,
        policy: PeerPolicy,
        secret: [u8; 32],
        now: Instant,
        unix_now: u64,
    ) -> Self {
        let nonces = NonceIssuer::new(secret, config.nonce_lifetime.as_secs());
        let (challenge_limiter, request_limiter) = limiters(&config, &secret, now);
        Server {
            secret,
            config,
            credentials,
            policy,
            nonces,
            epoch: now,
            epoch_unix: unix_now,
            allocations: AHashMap::new(),
            by_relay: AHashMap::new(),
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            tid_rng: ChaCha8Rng::from_seed(derive_seed(&secret)),
            pending_allocates: AHashMap::new(),
            challenge_limiter,
            draining: None,
            tcp: tcp_relay::TcpRelayState::default(),
            response: Cell::new(Response {
                method: Method::Binding,
                error: None,
                auth_error: None,
            }),
            request_limiter,
        }
    }

    /// Takes a new configuration (SIGHUP): settings, credentials and peer policy. The
    /// allocations held keep relaying; their permissions and channels stay as granted (the
    /// new peer policy applies to every new permission and to each peer datagram from now
    /// on). Rate limiters start afresh when their settings changed; nonces issued before stay
    /// valid unless the nonce lifetime shrank.
    pub fn reload(&mut self, config: ServerConfig, credentials: Credentials, policy: PeerPolicy, now: Instant) {
        let limits = |c: &ServerConfig| {
            (
                c.challenge_rate,
                c.request_rate,
                c.rate_limit_v4_prefix,
                c.rate_limit_v6_prefix,
            )
        };
        if limits(&config) != limits(&self.config) {
            let (challenge, request) = limiters(&config, &self.secret, now);
            self.challenge_limiter = challenge;
            self.request_limiter = request;
        }
        self.nonces = NonceIssuer::new(self.secret, config.nonce_lifetime.as_secs());
        self.config = config;
        self.credentials = credentials;
        self.policy = policy;
    }

    /// Seeds the generator of Data indication transaction IDs (ChaCha8) with `seed`; the
    /// shell gives each shard its own from the OS CSPRNG. Without it the seed is derived
    /// from the server secret, which every shard shares.
    pub fn with_tid_seed(mut self, seed: [u8; 32]) -> Self {
        self.tid_rng = ChaCha8Rng::from_seed(seed);
        self
    }

    /// Starts draining (graceful scale-in and upgrade): new Allocates are answered 300 (Try
    /// Alternate) with ALTERNATE-SERVER `alternate` (RFC 8489 §10), or 403 without one;
    /// Refresh, permissions, channels and relaying go on for the allocations held.
    pub fn drain(&mut self, alternate: Option<SocketAddr>) {
        self.draining = Some(alternate);
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The allocation of a 5-tuple.
    pub fn allocation(&self, five_tuple: &FiveTuple) -> Option<&Allocation> {
        self.allocations.get(five_tuple)
    }

    /// The 5-tuple owning a relayed transport address.
    pub fn five_tuple_for_relay(&self, relayed: &SocketAddr) -> Option<FiveTuple> {
        self.by_relay.get(relayed).copied()
    }

    /// Allocations, permissions and channel bindings held, by the family of the relayed
    /// transport address (`[IPv4, IPv6]`); permissions and bindings past their expiry that
    /// no timer has purged yet are included. Walks every allocation: call it at most about
    /// once a second, not per packet.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for (ft, a) in &self.allocations {
            let f = usize::from(a.relayed.is_ipv6());
            g.allocations[f] += 1;
            g.by_transport[ft_transport_index(ft.transport)] += 1;
            g.permissions[f] += a.permission_count();
            g.channels[f] += a.channel_count();
        }
        g
    }

    /// How many entries the server's tables hold, for tests and fuzzing: unauthenticated
    /// input must never grow them, and they stay proportional to the live allocations.
    #[doc(hidden)]
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            allocations: self.allocations.len(),
            relays: self.by_relay.len(),
            pending: self.pending_allocates.len(),
            timers: self.timers.len(),
            events: self.events.len(),
        }
    }

    fn unix_now(&self, now: Instant) -> u64 {
        self.epoch_unix + now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Handles one datagram from a client: STUN requests and indications, and ChannelData
    /// (RFC 8656 §12 and §12.6, demultiplexed on the first two bits).
    ///
    /// Responses are written to `out` (cleared first) and signalled by
    /// [`ClientAction::Respond`]; relayed payloads borrow from `data`.
    pub fn handle_client<'a>(
        &mut self,
        now: Instant,
        five_tuple: FiveTuple,
        data: &'a [u8],
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        if channel_data::is_channel_data(data) {
            return self.client_channel_data(now, five_tuple, data);
        }
        let msg = match Message::decode(data) {
            Ok(m) => m,
            Err(_) => return ClientAction::Drop(DropReason::Malformed),
        };
        if msg.fingerprint_offset().is_some() && integrity::verify_fingerprint(&msg).is_err() {
            return ClientAction::Drop(DropReason::BadFingerprint);
        }
        match (msg.class(), msg.method()) {
            (Class::Request, _) => self.handle_request(now, five_tuple, &msg, out),
            (Class::Indication, Method::Send) => self.send_indication(now, five_tuple, &msg),
            (Class::Indication, Method::Binding) => ClientAction::Nothing,
            _ => ClientAction::Drop(DropReason::UnexpectedMessage),
        }
    }

    fn client_channel_data<'a>(&mut self, now: Instant, ft: FiveTuple, data: &'a [u8]) -> ClientAction<'a> {
        let Ok(cd) = ChannelData::decode(data) else {
            return ClientAction::Drop(DropReason::Malformed);
        };
        let Some(alloc) = self.allocations.get_mut(&ft).filter(|a| a.expires > now) else {
            return ClientAction::Drop(DropReason::NoAllocation);
        };
        let Some(&binding) = alloc.channel(cd.channel, now) else {
            return ClientAction::Drop(DropReason::NoChannel);
        };
        if !alloc.has_permission(binding.peer.ip(), now) {
            return ClientAction::Drop(DropReason::NoPermission);
        }
        // RFC 8656 §12.6: "On the server, the receipt of a ChannelData message MUST NOT refresh
        // either the channel binding or the permission towards the peer." Nothing here writes
        // an expiry (test rfc8656_12_6_channel_data_refreshes_neither_binding_nor_permission).
        if !charge(
            &mut alloc.budgets,
            TO_PEER,
            self.config.max_bitrate,
            cd.payload.len(),
            now,
        ) {
            return ClientAction::Drop(DropReason::BandwidthExceeded);
        }
        alloc.usage.to_peer_packets += 1;
        alloc.usage.to_peer_bytes += cd.payload.len() as u64;
        ClientAction::Relay {
            // A bound peer's family always has a relayed address (checked at ChannelBind); a
            // single-family allocation has only its own.
            relayed: match alloc.additional {
                None => alloc.relayed,
                Some(_) => alloc.relayed_for(binding.peer).unwrap_or(alloc.relayed),
            },
            peer: binding.peer,
            payload: cd.payload,
        }
    }

    fn send_indication<'a>(&mut self, now: Instant, ft: FiveTuple, msg: &Message<'a>) -> ClientAction<'a> {
        let Some(alloc) = self.allocations.get_mut(&ft).filter(|a| a.expires > now) else {
            return ClientAction::Drop(DropReason::NoAllocation);
        };
        // RFC 8489 §6.3.2: "If the indication contains unknown comprehension-required
        // attributes, the indication is discarded and processing ceases."
        if msg.has_unknown_comprehension_required() {
            return ClientAction::Drop(DropReason::UnknownAttribute);
        }
        // RFC 8656 §11.2: "The Send indication MUST contain both an XOR-PEER-ADDRESS attribute
        // and a DATA attribute. If one of these attributes is missing or invalid, then the
        // message is discarded." (test rfc8656_11_2_and_11_3_send_and_data_indications)
        let (Some(Ok(Attribute::XorPeerAddress(peer))), Some(Ok(Attribute::Data(payload)))) =
            (msg.get(kind::XOR_PEER_ADDRESS), msg.get(kind::DATA))
        else {
            return ClientAction::Drop(DropReason::Malformed);
        };
        if alloc.tcp_relay {
            return ClientAction::Drop(DropReason::UnexpectedMessage);
        }
        let Some(relayed) = alloc.relayed_for(peer) else {
            return ClientAction::Drop(DropReason::FamilyMismatch);
        };
        if self.policy.check(peer).is_err() {
            return ClientAction::Drop(DropReason::PeerDenied);
        }
        if !alloc.has_permission(peer.ip(), now) {
            return ClientAction::Drop(DropReason::NoPermission);
        }
        if !charge(&mut alloc.budgets, TO_PEER, self.config.max_bitrate, payload.len(), now) {
            return ClientAction::Drop(DropReason::BandwidthExceeded);
        }
        alloc.usage.to_peer_packets += 1;
        alloc.usage.to_peer_bytes += payload.len() as u64;
        ClientAction::Relay { relayed, peer, payload }
    }

    fn handle_request<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        if let Some(limiter) = &mut self.request_limiter {
            if !limiter.allow(ft.client.ip(), now) && !self.is_owner_request(ft, msg) {
                return ClientAction::Drop(DropReason::RateLimited);
            }
        }
        let mut reply = Reply {
            method: msg.method(),
            tid: msg.transaction_id(),
            fingerprint: msg.fingerprint_offset().is_some(),
            auth: None,
        };
        match msg.method() {
            Method::Binding => {
                if self.unknown_attributes(msg, &reply, out) {
                    return ClientAction::Respond(self.response.get());
                }
                self.binding(ft, msg, &reply, out)
            }
            Method::Allocate if self.draining.is_some() && !self.allocations.contains_key(&ft) => {
                // Draining: no new allocations. RFC 8489 §10: 300 (Try Alternate) with
                // ALTERNATE-SERVER sends the client elsewhere; without an alternate, 403. Before
                // authentication, so that no state is created and the answer stays within the
                // request plus 12 bytes (ERROR-CODE without reason, ALTERNATE-SERVER). A
                // retransmission of an Allocate that succeeded before the drain still gets its
                // answer (the 5-tuple has its allocation).
                match self.draining.expect("checked") {
                    Some(alternate) => self.respond(out, &reply, Class::Error, |b| {
                        b.attribute(&Attribute::ErrorCode {
                            code: AllocateError::Draining.into(),
                            reason: "",
                        });
                        b.attribute(&Attribute::AlternateServer(alternate));
                    }),
                    None => self.error(out, &reply, AllocateError::DrainingNoAlternate),
                }
                ClientAction::Respond(self.response.get())
            }
            Method::Allocate if msg.raw(kind::REQUESTED_TRANSPORT).is_none() => {
                // RFC 8656 §7.2 bullet 3: 400 without REQUESTED-TRANSPORT. Checked before
                // authentication so that the answer carries no REALM and NONCE: 28 bytes, not
                // a 401 of 88 bytes for a 20-byte request.
                self.error(out, &reply, AllocateError::NoRequestedTransport);
                ClientAction::Respond(self.response.get())
            }
            Method::Allocate
            | Method::Refresh
            | Method::CreatePermission
            | Method::ChannelBind
            | Method::Connect
            | Method::ConnectionBind => {
                // An expired allocation is gone even before `handle_timeout` has run, as for
                // Send, ChannelData and peer data: no Refresh may revive it (RFC 8656 §8).
                if self.allocations.get(&ft).is_some_and(|a| a.expires <= now) {
                    self.remove_allocation(ft, CloseReason::Expired, now);
                }
                // RFC 8656 §7.2: "the server MUST require that the request be authenticated.
                // If the request is authenticated, the authentication MUST be done either using
                // the long-term credential mechanism of [RFC8489] or [...]": every Allocate (and
                // every other request needing an allocation) passes the long-term credential
                // check; turnpike has no unauthenticated mode (test
                // rfc8656_7_2_unauthenticated_allocate_is_401_and_ipv4_is_the_default_family).
                let auth = match self.authenticate(now, ft, msg, &reply, out) {
                    Ok(a) => a,
                    Err(Refusal::Responded) => return ClientAction::Respond(self.response.get()),
                    Err(Refusal::RateLimited) => return ClientAction::Drop(DropReason::RateLimited),
                };
                reply.auth = Some(&auth);
                if self.unknown_attributes(msg, &reply, out) {
                    return ClientAction::Respond(self.response.get());
                }
                match msg.method() {
                    Method::Allocate => self.allocate(now, ft, msg, &reply, out),
                    Method::Refresh => self.refresh(now, ft, msg, &reply, out),
                    Method::CreatePermission => self.create_permission(now, ft, msg, &reply, out),
                    Method::Connect => self.connect(now, ft, msg, &reply, out),
                    Method::ConnectionBind => self.connection_bind(ft, msg, &reply, out),
                    _ => self.channel_bind(now, ft, msg, &reply, out),
                }
            }
            _ => {
                self.error(out, &reply, RequestError::UnknownMethod);
                ClientAction::Respond(self.response.get())
            }
        }
    }

    /// Whether `msg` comes from the 5-tuple of a live allocation and carries integrity that
    /// verifies with the allocation's key: such a request passes the per-source request
    /// limit, so a flood from another port of the owner's IP (or spoofed from it) cannot
    /// starve the owner's Refreshes. Costs one HMAC, only for 5-tuples with an allocation.
    fn is_owner_request(&self, ft: FiveTuple, msg: &Message<'_>) -> bool {
        let Some(alloc) = self.allocations.get(&ft) else {
            return false;
        };
        if msg.integrity_sha256_offset().is_some() {
            integrity::verify_message_integrity_sha256(msg, alloc.key.as_bytes()).is_ok()
        } else {
            matches!(
                msg.get(kind::MESSAGE_INTEGRITY),
                Some(Ok(Attribute::MessageIntegrity(_)))
            ) && integrity::verify_message_integrity(msg, alloc.key.as_bytes()).is_ok()
        }
    }

    /// A Binding request (RFC 8489 §3; RFC 5780 §6.1 when NAT discovery is configured):
    /// XOR-MAPPED-ADDRESS only, or with OTHER-ADDRESS and RESPONSE-ORIGIN, answered from the
    /// address CHANGE-REQUEST asks for. Without a second address, a CHANGE-REQUEST that asks
    /// for a change gets 420 (RFC 5780 §6.1).
    fn binding<'a>(&self, ft: FiveTuple, msg: &Message<'_>, reply: &Reply<'_>, out: &mut Vec<u8>) -> ClientAction<'a> {
        let (change_ip, change_port) = match msg.get(kind::CHANGE_REQUEST) {
            None => (false, false),
            Some(Ok(Attribute::ChangeRequest(flags))) => (flags & 0x4 != 0, flags & 0x2 != 0),
            Some(_) => {
                // No reason phrase: unauthenticated, so no amplification (see below).
                self.respond(out, reply, Class::Error, |b| {
                    b.attribute(&Attribute::ErrorCode {
                        code: RequestError::MalformedChangeRequest.into(),
                        reason: "",
                    });
                });
                return ClientAction::Respond(self.response.get());
            }
        };
        let Some(nat) = self
            .config
            .nat_discovery
            .filter(|n| n.other_address(ft.server).is_some())
        else {
            if change_ip || change_port {
                // No reason phrase: the 420 stays within the request plus an
                // XOR-MAPPED-ADDRESS, as every unauthenticated answer (no amplification).
                self.respond(out, reply, Class::Error, |b| {
                    b.attribute(&Attribute::ErrorCode {
                        code: RequestError::ChangeRequestUnsupported.into(),
                        reason: "",
                    });
                    b.attribute(&Attribute::UnknownAttributes(&kind::CHANGE_REQUEST.to_be_bytes()));
                });
                return ClientAction::Respond(self.response.get());
            }
            self.respond(out, reply, Class::Success, |b| {
                b.attribute(&Attribute::XorMappedAddress(ft.client));
            });
            return ClientAction::Respond(self.response.get());
        };
        let origin = nat
            .response_origin(ft.server, change_ip, change_port)
            .expect("checked above");
        let other = nat.other_address(ft.server).expect("checked above");
        self.respond(out, reply, Class::Success, |b| {
            b.attribute(&Attribute::XorMappedAddress(ft.client));
            b.attribute(&Attribute::ResponseOrigin(origin));
            b.attribute(&Attribute::OtherAddress(other));
        });
        if origin == ft.server {
            ClientAction::Respond(self.response.get())
        } else {
            ClientAction::RespondFrom(origin, self.response.get())
        }
    }

    /// Writes 420 with UNKNOWN-ATTRIBUTES when the request has unknown
    /// comprehension-required attributes (RFC 8489 §6.3.1). Returns whether it did.
    fn unknown_attributes(&self, msg: &Message<'_>, reply: &Reply<'_>, out: &mut Vec<u8>) -> bool {
        let mut list = [0u8; 64];
        let mut n = 0;
        for k in msg.unknown_comprehension_required() {
            if n + 2 <= list.len() {
                list[n..n + 2].copy_from_slice(&k.to_be_bytes());
                n += 2;
            }
        }
        if n == 0 {
            return false;
        }
        // Unauthenticated (a Binding): no reason phrase, so that the 420 is never larger
        // than the request plus an XOR-MAPPED-ADDRESS and cannot amplify reflected traffic.
        let code: ErrorCode = RequestError::UnknownAttributes.into();
        let reason = if reply.auth.is_some() { code.reason() } else { "" };
        self.respond(out, reply, Class::Error, |b| {
            b.attribute(&Attribute::ErrorCode { code, reason });
            b.attribute(&Attribute::UnknownAttributes(&list[..n]));
        });
        true
    }

    /// Writes a response of `class` for `reply`: `fill` adds the body, then SOFTWARE,
    /// integrity (when authenticated) and FINGERPRINT (when the request had one).
    fn respond(&self, out: &mut Vec<u8>, reply: &Reply<'_>, class: Class, fill: impl FnOnce(&mut MessageBuilder)) {
        let mut b = MessageBuilder::new(out, MessageType::new(reply.method, class), reply.tid);
        fill(&mut b);
        if let Some(auth) = reply.auth {
            // SOFTWARE only where the sender proved who it is (no amplification).
            if let Some(sw) = &self.config.software {
                b.attribute(&Attribute::Software(sw));
            }
            match auth.mac {
                Mac::Sha1 => b.message_integrity(auth.key.as_bytes()),
                Mac::Sha256 => b.message_integrity_sha256(auth.key.as_bytes()),
            };
        }
        if reply.fingerprint {
            b.fingerprint();
        }
        // Every error response starts with its ERROR-CODE (RFC 8489 §14.8: class in the
        // low 3 bits of byte 2, number in byte 3 of the value).
        let error = (class == Class::Error && out.len() >= 28 && out[20..22] == kind::ERROR_CODE.to_be_bytes())
            .then(|| ErrorCode((out[26] & 7) as u16 * 100 + out[27] as u16));
        self.response.set(Response {
            method: reply.method,
            error,
            auth_error: None,
        });
    }

    /// An error response with `code`. The reason phrase goes only into authenticated
    /// answers: an unauthenticated sender never gets an answer larger than its request plus
    /// an XOR-MAPPED-ADDRESS (no amplification), except the 401/438 challenge.
    fn error(&self, out: &mut Vec<u8>, reply: &Reply<'_>, error: impl Into<ErrorCode>) {
        let code = error.into();
        let reason = if reply.auth.is_some() { code.reason() } else { "" };
        self.respond(out, reply, Class::Error, |b| {
            b.attribute(&Attribute::ErrorCode { code, reason });
        });
    }

    /// 401 or 438 with REALM, a fresh NONCE and PASSWORD-ALGORITHMS (RFC 8489 §9.2.4),
    /// unless the source prefix has used up its challenge rate (then nothing is sent, so the
    /// server cannot be used to reflect traffic at a spoofed source).
    fn challenge(
        &self,
        now: Instant,
        ft: FiveTuple,
        reply: &Reply<'_>,
        error: AuthError,
        out: &mut Vec<u8>,
    ) -> Refusal {
        let code: ErrorCode = error.into();
        if let Some(limiter) = &self.challenge_limiter {
            if !limiter.borrow_mut().allow(ft.client.ip(), now) {
                return Refusal::RateLimited;
            }
        }
        let nonce = self.nonces.issue(self.unix_now(now), nonce_address(ft));
        let mut algs = Vec::with_capacity(8);
        encode_password_algorithms(&[PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256], &mut algs);
        let unauthenticated = Reply { auth: None, ..*reply };
        self.respond(out, &unauthenticated, Class::Error, |b| {
            b.attribute(&Attribute::ErrorCode { code, reason: "" });
            b.attribute(&Attribute::Realm(&self.config.realm));
            b.attribute(&Attribute::Nonce(&nonce));
            b.attribute(&Attribute::PasswordAlgorithms(
                password_algorithms(&algs).expect("valid list"),
            ));
        });
        self.note_auth_error(error);
        Refusal::Responded
    }

    /// Records in the last [`Response`] why authentication refused the request.
    fn note_auth_error(&self, error: AuthError) {
        self.response.set(Response {
            auth_error: Some(error),
            ..self.response.get()
        });
    }

    /// Long-term credential check (RFC 8489 §9.2.4). On failure the error response is in
    /// `out`.
    fn authenticate(
        &self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Auth, Refusal> {
        let mac = if msg.integrity_sha256_offset().is_some() {
            Mac::Sha256
        } else if msg.integrity_offset().is_some() {
            Mac::Sha1
        } else {
            return Err(self.challenge(now, ft, reply, AuthError::NoIntegrity, out));
        };
        let bad_request = |out: &mut Vec<u8>| {
            self.error(out, reply, AuthError::Malformed);
            self.note_auth_error(AuthError::Malformed);
            Err(Refusal::Responded)
        };
        // A MESSAGE-INTEGRITY that is not 20 bytes is malformed (RFC 8489 §14.5); refusing
        // it here keeps `verify_message_integrity` from slicing past the end of the message.
        if mac == Mac::Sha1
            && !matches!(
                msg.get(kind::MESSAGE_INTEGRITY),
                Some(Ok(Attribute::MessageIntegrity(_)))
            )
        {
            return bad_request(out);
        }
        let realm = match msg.get(kind::REALM) {
            Some(Ok(Attribute::Realm(r))) => r,
            _ => return bad_request(out),
        };
        let nonce = match msg.get(kind::NONCE) {
            Some(Ok(Attribute::Nonce(n))) => n,
            _ => return bad_request(out),
        };
        let username = match (msg.get(kind::USERNAME), msg.get(kind::USERHASH)) {
            (Some(Ok(Attribute::Username(u))), _) => Some(u),
            (None, Some(Ok(Attribute::Userhash(h)))) => self.credentials.username_for_hash(h),
            _ => return bad_request(out),
        };
        match self.nonces.check(nonce, self.unix_now(now), nonce_address(ft)) {
            Ok(()) => {}
            Err(NonceError::Expired | NonceError::Invalid) => {
                return Err(self.challenge(now, ft, reply, AuthError::StaleNonce, out));
            }
        }
        // PASSWORD-ALGORITHM must come with PASSWORD-ALGORITHMS repeating our offer
        // (downgrade protection, RFC 8489 §9.2.4 bullet 5); neither means MD5.
        let algorithm = match (msg.get(kind::PASSWORD_ALGORITHM), msg.get(kind::PASSWORD_ALGORITHMS)) {
            (None, None) => PasswordAlgorithm::Md5,
            (
                Some(Ok(Attribute::PasswordAlgorithm { algorithm, .. })),
                Some(Ok(Attribute::PasswordAlgorithms(list))),
            ) => {
                let offered = [PasswordAlgorithm::Md5.to_u16(), PasswordAlgorithm::Sha256.to_u16()];
                if !list.iter().map(|(a, _)| a).eq(offered.iter().copied()) {
                    return bad_request(out);
                }
                match PasswordAlgorithm::from_u16(algorithm) {
                    Some(a) => a,
                    None => return bad_request(out),
                }
            }
            _ => return bad_request(out),
        };
        if realm != self.config.realm {
            return Err(self.challenge(now, ft, reply, AuthError::WrongRealm, out));
        }
        let found = username.and_then(|user| {
            self.credentials
                .candidate_keys(user, realm, algorithm, self.unix_now(now))
                .into_iter()
                .find(|key| match mac {
                    Mac::Sha1 => integrity::verify_message_integrity(msg, key.as_bytes()).is_ok(),
                    Mac::Sha256 => integrity::verify_message_integrity_sha256(msg, key.as_bytes()).is_ok(),
                })
                .map(|key| Authenticated {
                    username: user.to_string(),
                    key,
                })
        });
        match found {
            Some(a) => Ok(Auth {
                username: a.username,
                key: a.key,
                mac,
            }),
            None => Err(self.challenge(now, ft, reply, AuthError::BadCredentials, out)),
        }
    }

    /// The granted lifetime for a requested one (RFC 8656 §7.2 and §8): the request capped
    /// at the maximum, and never below the default; 0 stays 0 for Refresh.
    fn granted_lifetime(&self, requested: Option<u32>) -> Duration {
        // LIFETIME has 32 bits on the wire: longer configured lifetimes are capped there
        // (instead of being reported truncated, or overflowing the clock).
        let max = self.config.max_lifetime.min(Duration::from_secs(u32::MAX as u64));
        let default = self.config.default_lifetime.min(max);
        match requested {
            None => default,
            Some(0) => Duration::ZERO,
            Some(s) => Duration::from_secs(s as u64).min(max).max(default),
        }
    }

    fn allocate<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        let auth = reply.auth.expect("authenticated");
        if let Some(alloc) = self.allocations.get(&ft) {
            if alloc.allocate_tid == reply.tid && *alloc.username == *auth.username {
                // A retransmission of the Allocate that created it: same answer (RFC 8656 §7.2).
                let grant = Grant::repeated(alloc, now);
                self.allocate_success(out, reply, ft, grant);
            } else {
                self.error(out, reply, AllocateError::AllocationExists);
            }
            return ClientAction::Respond(self.response.get());
        }
        if self
            .pending_allocates
            .get(&ft)
            .is_some_and(|&(tid, sent)| tid == reply.tid && now.saturating_duration_since(sent) < PENDING_TIMEOUT)
        {
            // RFC 8656 §7.2: a retransmission gets the first transmission's answer, which is
            // not known yet: no second ticket (it could be answered differently, e.g. 486).
            return ClientAction::Drop(DropReason::AllocatePending);
        }
        let mut err = |code| {
            self.error(out, reply, code);
            ClientAction::Respond(self.response.get())
        };
        let relay_transport = match msg.get(kind::REQUESTED_TRANSPORT) {
            Some(Ok(Attribute::RequestedTransport(PROTOCOL_UDP))) => RelayTransport::Udp,
            Some(Ok(Attribute::RequestedTransport(PROTOCOL_TCP))) => RelayTransport::Tcp,
            Some(Ok(Attribute::RequestedTransport(_))) => return err(AllocateError::UnsupportedTransport),
            _ => return err(AllocateError::NoRequestedTransport),
        };
        let (even_port, reserve_next) = match msg.get(kind::EVEN_PORT) {
            None => (false, false),
            Some(Ok(Attribute::EvenPort(r))) => (true, r),
            Some(_) => return err(AllocateError::MalformedAttribute),
        };
        let requested_family = match msg.get(kind::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::RequestedAddressFamily(f))) => Some(f),
            Some(_) => return err(AllocateError::MalformedAttribute),
        };
        // Deviation for interoperability: coturn 4.6's clients send the attribute under its
        // draft code point (0x8032); both are accepted.
        let draft = || {
            msg.raw(kind::ADDITIONAL_ADDRESS_FAMILY_DRAFT)
                .map(|a| Attribute::decode(kind::ADDITIONAL_ADDRESS_FAMILY, a.value, &msg.transaction_id()))
        };
        let additional = match msg.get(kind::ADDITIONAL_ADDRESS_FAMILY).or_else(draft) {
            None => None,
            Some(Ok(Attribute::AdditionalAddressFamily(AddressFamily::V6))) => Some(AddressFamily::V6),
            Some(_) => return err(AllocateError::MalformedAttribute),
        };
        if additional.is_some() && requested_family.is_some() {
            return err(AllocateError::ConflictingAttributes);
        }
        let reservation_token = match msg.get(kind::RESERVATION_TOKEN) {
            None => None,
            Some(Ok(Attribute::ReservationToken(t))) => Some(t),
            Some(_) => return err(AllocateError::MalformedAttribute),
        };
        // RFC 8656 §7.2: RESERVATION-TOKEN excludes EVEN-PORT and the family attributes.
        if reservation_token.is_some() && (even_port || requested_family.is_some() || additional.is_some()) {
            return err(AllocateError::ConflictingAttributes);
        }
        // RFC 6062 §5.1: "If the client connection transport is not TCP or TLS, the server
        // MUST reject the request with a 400 (Bad Request) error. If the request contains the
        // DONT-FRAGMENT, EVEN-PORT, or RESERVATION-TOKEN attribute, the server MUST reject the
        // request with a 400 (Bad Request) error." A dual TCP allocation is refused alike.
        if relay_transport == RelayTransport::Tcp
            && (!ft.transport.is_stream()
                || even_port
                || reservation_token.is_some()
                || additional.is_some()
                || msg.raw(kind::DONT_FRAGMENT).is_some())
        {
            return err(AllocateError::BadTcpAllocation);
        }
        if msg.raw(kind::DONT_FRAGMENT).is_some() {
            // Not supported: answered as an unknown comprehension-required attribute, 420
            // with UNKNOWN-ATTRIBUTES (RFC 8656 §7.2 item 4, no MUST there), so the client can
            // retry without it. turnpike cannot set the DF bit on relayed datagrams (test
            // rfc8656_7_2_allocate_request_validation).
            self.respond(out, reply, Class::Error, |b| {
                error_code(b, AllocateError::DontFragment.into());
                b.attribute(&Attribute::UnknownAttributes(&kind::DONT_FRAGMENT.to_be_bytes()));
            });
            return ClientAction::Respond(self.response.get());
        }
        let requested = match msg.get(kind::LIFETIME) {
            None => None,
            Some(Ok(Attribute::Lifetime(s))) => Some(s),
            Some(_) => return err(AllocateError::MalformedAttribute),
        };
        let lifetime = match self.granted_lifetime(requested) {
            Duration::ZERO => self.granted_lifetime(None),
            l => l,
        };
        if self.pending_allocates.len() >= MAX_PENDING_ALLOCATES {
            // Tickets lost on the way (a full queue) leave entries behind: drop the stale ones.
            self.pending_allocates
                .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < PENDING_TIMEOUT);
        }
        if self.pending_allocates.len() >= MAX_PENDING_ALLOCATES {
            return ClientAction::Drop(DropReason::AllocatePending);
        }
        self.pending_allocates.insert(ft, (reply.tid, now));
        ClientAction::Allocate(AllocateRequest {
            five_tuple: ft,
            relay_transport,
            // RFC 8656 §7.2: "If the REQUESTED-ADDRESS-FAMILY attribute is absent and the server
            // supports the IPv4 address family, the server MUST allocate an IPv4 relayed transport
            // address for the TURN client." The 440 MUSTs of item 7 (family not supported, or
            // absent and no IPv4) are met by the relay allocator, which refuses a family without a
            // relay IP with `RelayError::FamilyNotSupported` (src/control/allocator.rs; tests
            // rfc8656_7_2_relay_refusals_are_440_and_508, family_without_relay_ip_is_refused_with_440).
            family: requested_family.unwrap_or(AddressFamily::V4),
            even_port,
            reserve_next,
            reservation_token,
            granted_token: None,
            tid: reply.tid,
            auth: auth.clone(),
            lifetime,
            fingerprint: reply.fingerprint,
            additional_family: additional,
            additional: None,
        })
    }

    fn allocate_success(&self, out: &mut Vec<u8>, reply: &Reply<'_>, ft: FiveTuple, grant: Grant) {
        self.respond(out, reply, Class::Success, |b| {
            b.attribute(&Attribute::XorRelayedAddress(grant.relayed));
            // RFC 8656 §7.2 (dual allocation): the success response carries one
            // XOR-RELAYED-ADDRESS per family allocated.
            if let Some(additional) = grant.additional {
                b.attribute(&Attribute::XorRelayedAddress(additional));
            }
            b.attribute(&Attribute::Lifetime(grant.lifetime.as_secs() as u32));
            b.attribute(&Attribute::XorMappedAddress(ft.client));
            if let Some(t) = grant.token {
                b.attribute(&Attribute::ReservationToken(t));
            }
            if let Some((family, code)) = grant.refused_family {
                b.attribute(&Attribute::AddressErrorCode {
                    family,
                    code,
                    reason: code.reason(),
                });
            }
        });
    }

    /// Finishes an Allocate once the shell has reserved a relayed transport address (or
    /// failed to: 440, 486 or 508). Writes the response to `out` (always send it) and
    /// returns what it carries and whether the shell must release the address again.
    pub fn complete_allocate(
        &mut self,
        now: Instant,
        request: AllocateRequest,
        result: Result<SocketAddr, RelayError>,
        out: &mut Vec<u8>,
    ) -> AllocateCompletion {
        let waited = self
            .pending_allocates
            .get(&request.five_tuple)
            .filter(|&&(tid, _)| tid == request.tid)
            .map(|&(_, sent)| now.saturating_duration_since(sent));
        let additional = request.additional.and_then(Result::ok);
        let kept = self.finish_allocate(now, request, result, out);
        // What the shell reserved and the server did not keep goes back.
        let release = match (kept, result) {
            (false, Ok(a)) => Some(a),
            _ => None,
        };
        let release_additional = additional.filter(|_| !kept);
        AllocateCompletion {
            response: self.response.get(),
            release,
            release_additional,
            waited,
        }
    }

    /// Answers the Allocate; returns whether a new allocation now holds the reserved
    /// address(es).
    fn finish_allocate(
        &mut self,
        now: Instant,
        request: AllocateRequest,
        result: Result<SocketAddr, RelayError>,
        out: &mut Vec<u8>,
    ) -> bool {
        let ft = request.five_tuple;
        let reply = Reply {
            method: Method::Allocate,
            tid: request.tid,
            fingerprint: request.fingerprint,
            auth: Some(&request.auth),
        };
        if self
            .pending_allocates
            .get(&ft)
            .is_some_and(|&(tid, _)| tid == request.tid)
        {
            self.pending_allocates.remove(&ft);
        }
        if let Some(existing) = self.allocations.get(&ft) {
            // Another ticket of this 5-tuple got there first: the same transaction gets that
            // answer whatever this ticket's result (RFC 8656 §7.2), another one 437.
            if existing.allocate_tid == request.tid {
                let grant = Grant::repeated(existing, now);
                self.allocate_success(out, &reply, ft, grant);
            } else {
                self.error(out, &reply, AllocateError::AllocationExists);
            }
            return false;
        }
        let relayed = match result {
            Ok(a) => a,
            Err(e) => {
                self.error(out, &reply, AllocateError::Relay(e));
                return false;
            }
        };
        let expires = now + request.lifetime;
        // RFC 8656 §7.2: a family of a dual allocation that cannot be allocated is reported
        // with ADDRESS-ERROR-CODE in the success response (440 when not supported).
        let (additional, refused_family) = match (request.additional_family, request.additional) {
            (None, _) => (None, None),
            (Some(_), Some(Ok(a))) => (Some(a), None),
            (Some(f), Some(Err(e))) => (None, Some((f, e.into()))),
            (Some(f), None) => (None, Some((f, RelayError::FamilyNotSupported.into()))),
        };
        let grant = Grant {
            relayed,
            additional,
            lifetime: request.lifetime,
            refused_family,
            token: request.granted_token,
        };
        self.allocate_success(out, &reply, ft, grant);
        self.by_relay.insert(relayed, ft);
        if let Some(a) = additional {
            self.by_relay.insert(a, ft);
        }
        let mut alloc = Allocation::new(
            relayed,
            request.auth.username.into_boxed_str(),
            request.auth.key,
            request.tid,
            now,
            expires,
        );
        alloc.reservation_token = request.granted_token;
        alloc.refused_family = refused_family;
        alloc.additional = additional;
        alloc.tcp_relay = request.relay_transport == RelayTransport::Tcp;
        self.allocations.insert(ft, alloc);
        self.push_timer(expires, ft);
        self.events.push_back(Event::AllocationCreated {
            five_tuple: ft,
            relayed,
            additional,
            lifetime: request.lifetime,
        });
        true
    }

    /// The allocation for a request that needs one: 437 if none, 441 if another user's.
    fn owned_allocation(&mut self, ft: FiveTuple, reply: &Reply<'_>, out: &mut Vec<u8>) -> Option<&mut Allocation> {
        let user = &reply.auth.expect("authenticated").username;
        match self.allocations.get(&ft) {
            None => {
                self.error(out, reply, AllocationError::NoAllocation);
                None
            }
            Some(a) if *a.username != **user => {
                self.error(out, reply, AllocationError::WrongCredentials);
                None
            }
            Some(_) => self.allocations.get_mut(&ft),
        }
    }

    fn refresh<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        let requested = match msg.get(kind::LIFETIME) {
            None => None,
            Some(Ok(Attribute::Lifetime(s))) => Some(s),
            Some(_) => {
                self.error(out, reply, RefreshError::MalformedAttribute);
                return ClientAction::Respond(self.response.get());
            }
        };
        let family = match msg.get(kind::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::RequestedAddressFamily(f))) => Some(f),
            Some(_) => {
                self.error(out, reply, RefreshError::MalformedAttribute);
                return ClientAction::Respond(self.response.get());
            }
        };
        let lifetime = self.granted_lifetime(requested);
        let Some(alloc) = self.owned_allocation(ft, reply, out) else {
            return ClientAction::Respond(self.response.get());
        };
        // RFC 8656 §8.2: "If the server receives a Refresh Request with a REQUESTED-ADDRESS-FAMILY
        // attribute and the attribute value does not match the address family of the
        // allocation, the server MUST reply with a 443 (Peer Address Family Mismatch) Refresh
        // error response." (test rfc8656_8_2_refresh_lifetimes_delete_and_family_mismatch_443)
        // A dual allocation has both families.
        let has_family = |f: AddressFamily| {
            f == AddressFamily::of(&alloc.relayed.ip())
                || alloc.additional.is_some_and(|a| f == AddressFamily::of(&a.ip()))
        };
        if family.is_some_and(|f| !has_family(f)) {
            self.error(out, reply, RefreshError::FamilyMismatch);
            return ClientAction::Respond(self.response.get());
        }
        if lifetime.is_zero() {
            self.remove_allocation(ft, CloseReason::Deleted, now);
        } else {
            alloc.expires = now + lifetime;
            let relayed = alloc.relayed;
            let additional = alloc.additional;
            self.events.push_back(Event::AllocationRefreshed {
                additional,
                five_tuple: ft,
                relayed,
                lifetime,
            });
            self.reschedule(ft);
        }
        self.respond(out, reply, Class::Success, |b| {
            b.attribute(&Attribute::Lifetime(lifetime.as_secs() as u32));
        });
        ClientAction::Respond(self.response.get())
    }

    /// Checks a peer address for CreatePermission and ChannelBind: 443 on a family
    /// mismatch with the relayed address, 403 when the policy refuses it.
    fn check_peer(&self, relayed: RelayedPair, peer: SocketAddr) -> Result<(), PeerError> {
        // RFC 8656 §10.2 (and §12.2 alike): "If an XOR-PEER-ADDRESS attribute contains an
        // address of an address family that is not the same as that of a relayed transport
        // address for the allocation, the server MUST generate an error response with the 443
        // (Peer Address Family Mismatch) response code." (test
        // rfc8656_10_2_and_12_2_peer_of_another_family_is_443)
        if relayed.for_peer(peer).is_none() {
            return Err(PeerError::FamilyMismatch);
        }
        self.policy.check(peer).map_err(PeerError::Denied)
    }

    fn create_permission<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        let Some(alloc) = self.owned_allocation(ft, reply, out) else {
            return ClientAction::Respond(self.response.get());
        };
        let relayed = RelayedPair::of(alloc);
        let tid = msg.transaction_id();
        let mut peers: Vec<IpAddr> = Vec::new();
        let mut failure = None;
        for raw in msg.attributes().filter(|a| a.kind == kind::XOR_PEER_ADDRESS) {
            match Attribute::decode(raw.kind, raw.value, &tid) {
                Ok(Attribute::XorPeerAddress(peer)) => {
                    // Ports do not matter for permissions (RFC 8656 §9); check with the
                    // given port, or a neutral one when the client sent 0.
                    let probe = if peer.port() == 0 {
                        SocketAddr::new(peer.ip(), 9)
                    } else {
                        peer
                    };
                    if let Err(e) = self.check_peer(relayed, probe) {
                        failure.get_or_insert(PermissionError::Peer(e));
                    }
                    if !peers.contains(&peer.ip()) {
                        peers.push(peer.ip());
                    }
                }
                _ => {
                    failure = Some(PermissionError::MalformedPeer);
                }
            }
        }
        // RFC 8656 §10.2: "The CreatePermission request MUST contain at least one
        // XOR-PEER-ADDRESS attribute and MAY contain multiple such attributes. If no such
        // attribute exists, or if any of these attributes are invalid, then a 400 (Bad
        // Request) error is returned." (test rfc8656_10_2_create_permission_validation)
        if peers.is_empty() {
            failure = Some(PermissionError::MalformedPeer);
        }
        if let Some(e) = failure {
            self.error(out, reply, e);
            return ClientAction::Respond(self.response.get());
        }
        let max = self.config.max_permissions_per_allocation;
        let lifetime = self.config.permission_lifetime;
        self.purge(ft, now);
        let alloc = self.allocations.get_mut(&ft).expect("checked above");
        let new = peers.iter().filter(|&&ip| alloc.permission(ip).is_none()).count();
        if alloc.permission_count() + new > max {
            self.error(out, reply, PermissionError::TooManyPermissions);
            return ClientAction::Respond(self.response.get());
        }
        for ip in peers {
            alloc.set_permission(ip, now + lifetime);
            self.events.push_back(Event::PermissionInstalled {
                five_tuple: ft,
                relayed: relayed.for_peer(SocketAddr::new(ip, 0)).unwrap_or(relayed.0),
                peer: ip,
                expires: now + lifetime,
            });
        }
        self.reschedule(ft);
        self.respond(out, reply, Class::Success, |_| {});
        ClientAction::Respond(self.response.get())
    }

    fn channel_bind<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        reply: &Reply<'_>,
        out: &mut Vec<u8>,
    ) -> ClientAction<'a> {
        // RFC 8656 §12.2 checks the range 0x4000 through 0x4FFF (400 otherwise; no MUST).
        // Deviation: by default turnpike accepts RFC 5766's 0x4000-0x7FFF, as deployed clients
        // use it; `strict_channel_numbers` gives the RFC 8656 range (test
        // rfc8656_12_2_channel_number_ranges).
        let max_channel = if self.config.strict_channel_numbers {
            MAX_CHANNEL_STRICT
        } else {
            MAX_CHANNEL_RFC5766
        };
        let (channel, peer) = match (msg.get(kind::CHANNEL_NUMBER), msg.get(kind::XOR_PEER_ADDRESS)) {
            (Some(Ok(Attribute::ChannelNumber(c))), Some(Ok(Attribute::XorPeerAddress(p))))
                if (MIN_CHANNEL..=max_channel).contains(&c) =>
            {
                (c, p)
            }
            _ => {
                self.error(out, reply, ChannelBindError::Malformed);
                return ClientAction::Respond(self.response.get());
            }
        };
        let Some(alloc) = self.owned_allocation(ft, reply, out) else {
            return ClientAction::Respond(self.response.get());
        };
        // Channels are a UDP relaying mechanism; a TCP allocation relays on data connections
        // (RFC 6062 §4).
        if alloc.tcp_relay {
            self.error(out, reply, ChannelBindError::Malformed);
            return ClientAction::Respond(self.response.get());
        }
        let relayed = RelayedPair::of(alloc);
        if let Err(e) = self.check_peer(relayed, peer) {
            self.error(out, reply, ChannelBindError::Peer(e));
            return ClientAction::Respond(self.response.get());
        }
        let (max_ch, max_perm) = (
            self.config.max_channels_per_allocation,
            self.config.max_permissions_per_allocation,
        );
        let (ch_life, perm_life) = (self.config.channel_lifetime, self.config.permission_lifetime);
        self.purge(ft, now);
        let alloc = self.allocations.get_mut(&ft).expect("checked above");
        // RFC 8656 §12.2: the number must not be bound to another peer, nor the peer to
        // another number (400 otherwise; test rfc8656_12_2_channel_bind_and_12_5_channel_data).
        let conflict = alloc.binding(channel).is_some_and(|b| b.peer != peer)
            || alloc.channel_of_peer(peer).is_some_and(|c| c != channel);
        let over = (alloc.binding(channel).is_none() && alloc.channel_count() >= max_ch)
            || (alloc.permission(peer.ip()).is_none() && alloc.permission_count() >= max_perm);
        let code = if conflict {
            Some(ChannelBindError::Conflict)
        } else if over {
            Some(ChannelBindError::TooManyChannels)
        } else {
            let rebound = alloc.binding(channel).is_some();
            let expires = now + ch_life;
            alloc.bind_channel(channel, ChannelBinding { peer, expires });
            alloc.set_permission(peer.ip(), now + perm_life);
            let (five_tuple, relayed) = (ft, relayed.for_peer(peer).unwrap_or(relayed.0));
            self.events.push_back(if rebound {
                Event::ChannelRebound {
                    five_tuple,
                    relayed,
                    channel,
                    peer,
                    expires,
                }
            } else {
                Event::ChannelBound {
                    five_tuple,
                    relayed,
                    channel,
                    peer,
                    expires,
                }
            });
            self.events.push_back(Event::PermissionInstalled {
                five_tuple,
                relayed,
                peer: peer.ip(),
                expires: now + perm_life,
            });
            None
        };
        match code {
            Some(code) => self.error(out, reply, code),
            None => {
                self.reschedule(ft);
                self.respond(out, reply, Class::Success, |_| {});
            }
        }
        ClientAction::Respond(self.response.get())
    }

    /// Handles a datagram of `len` payload bytes from `peer` arriving on the relayed transport
    /// address `relayed` (RFC 8656 §11.3): checks the peer policy, the permission and the
    /// bandwidth cap, then says which client gets it and how it is framed.
    pub fn handle_peer(&mut self, now: Instant, relayed: SocketAddr, peer: SocketAddr, len: usize) -> PeerAction {
        let Some(ft) = self.by_relay.get(&relayed) else {
            return PeerAction::Drop(DropReason::NoAllocation);
        };
        let Some(alloc) = self.allocations.get_mut(ft).filter(|a| a.expires > now) else {
            return PeerAction::Drop(DropReason::NoAllocation);
        };
        if self.policy.check(peer).is_err() {
            return PeerAction::Drop(DropReason::PeerDenied);
        }
        if !alloc.has_permission(peer.ip(), now) {
            return PeerAction::Drop(DropReason::NoPermission);
        }
        if !charge(&mut alloc.budgets, TO_CLIENT, self.config.max_bitrate, len, now) {
            return PeerAction::Drop(DropReason::BandwidthExceeded);
        }
        alloc.usage.to_client_packets += 1;
        alloc.usage.to_client_bytes += len as u64;
        // RFC 8656 §12.5: "The server, on the other hand, MUST use the ChannelData message if a
        // channel has been bound to the peer." `channel` is `Some` exactly then, and the shell
        // frames ChannelData; otherwise a Data indication (§11.3; tests
        // rfc8656_12_2_channel_bind_and_12_5_channel_data, channel_binding_expires_after_600s).
        PeerAction::Forward {
            five_tuple: *ft,
            channel: alloc.channel_for_peer(peer, now),
        }
    }

    /// Writes a Data indication carrying `payload` from `peer` into `out` (RFC 8656 §11.3),
    /// with a fresh transaction ID.
    pub fn encode_data_indication(&mut self, peer: SocketAddr, payload: &[u8], out: &mut Vec<u8>) {
        let tid = self.next_tid();
        // RFC 8656 §11.3: "The Data indication MUST contain both an XOR-PEER-ADDRESS and a DATA
        // attribute." (test rfc8656_11_2_and_11_3_send_and_data_indications)
        let mut b = MessageBuilder::new(out, MessageType::new(Method::Data, Class::Indication), tid);
        b.attribute(&Attribute::XorPeerAddress(peer));
        b.attribute(&Attribute::Data(payload));
    }

    fn next_tid(&mut self) -> TransactionId {
        // RFC 8489 §5: the transaction ID "MUST be uniformly and randomly chosen from the
        // interval 0 .. 2**96-1, and MUST be cryptographically random".
        let mut tid = [0u8; 12];
        self.tid_rng.fill_bytes(&mut tid);
        TransactionId(tid)
    }

    fn reschedule(&mut self, ft: FiveTuple) {
        if let Some(alloc) = self.allocations.get_mut(&ft) {
            let t = alloc.next_deadline();
            if t != alloc.timer {
                alloc.timer = t;
                self.push_timer(t, ft);
            }
        }
    }

    /// Pushes a timer entry. Superseded entries (an allocation rescheduled or gone) stay
    /// in the heap until popped, so once they outnumber the live allocations they are
    /// dropped: refreshes and allocate/delete cycles cannot grow the heap.
    fn push_timer(&mut self, t: Instant, ft: FiveTuple) {
        if self.timers.len() >= 2 * self.allocations.len() + 64 {
            let allocations = &self.allocations;
            self.timers
                .retain(|Reverse((t, ft))| allocations.get(ft).is_some_and(|a| a.timer == *t));
        }
        self.timers.push(Reverse((t, ft)));
    }

    /// Removes the expired permissions and channel bindings of `ft`'s allocation, with an
    /// event for each.
    fn purge(&mut self, ft: FiveTuple, now: Instant) {
        let Some(alloc) = self.allocations.get_mut(&ft) else {
            return;
        };
        let relayed = RelayedPair::of(alloc);
        let events = &mut self.events;
        alloc.purge(now, |expired| {
            events.push_back(match expired {
                Expired::Permission(peer) => Event::PermissionExpired {
                    five_tuple: ft,
                    relayed: relayed.for_peer(SocketAddr::new(peer, 0)).unwrap_or(relayed.0),
                    peer,
                },
                Expired::Channel(channel, peer) => Event::ChannelExpired {
                    five_tuple: ft,
                    relayed: relayed.for_peer(peer).unwrap_or(relayed.0),
                    channel,
                    peer,
                },
            })
        });
    }

    fn remove_allocation(&mut self, ft: FiveTuple, reason: CloseReason, now: Instant) {
        if let Some(alloc) = self.allocations.remove(&ft) {
            if alloc.tcp_relay {
                // RFC 6062: the allocation's peer and client data connections end with it.
                self.close_connections_of(ft);
            }
            self.by_relay.remove(&alloc.relayed);
            if let Some(a) = alloc.additional {
                self.by_relay.remove(&a);
            }
            self.events.push_back(Event::AllocationClosed {
                five_tuple: ft,
                relayed: alloc.relayed,
                additional: alloc.additional,
                reason,
                age: now.saturating_duration_since(alloc.created),
                usage: alloc.usage,
                username: alloc.username,
            });
        }
    }

    /// Deletes the allocation of a TCP or TLS 5-tuple whose connection closed (RFC 8656
    /// §3.1); emits [`Event::AllocationClosed`] with [`CloseReason::ConnectionClosed`]. Does
    /// nothing when the 5-tuple has no allocation.
    pub fn connection_closed(&mut self, now: Instant, five_tuple: FiveTuple) {
        self.remove_allocation(five_tuple, CloseReason::ConnectionClosed, now);
    }

    /// The next instant at which [`Server::handle_timeout`] has work, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let allocations = self.timers.peek().map(|Reverse((t, _))| *t);
        match (allocations, self.tcp.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires allocations, permissions and channel bindings due at `now`, and peer data
    /// connections not bound in time (RFC 6062).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_connections(now);
        while let Some(&Reverse((t, ft))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(alloc) = self.allocations.get_mut(&ft) else {
                continue;
            };
            if alloc.timer != t {
                continue; // superseded by a later schedule
            }
            if alloc.expires <= now {
                self.remove_allocation(ft, CloseReason::Expired, now);
            } else {
                alloc.timer = now; // force a new entry
                self.purge(ft, now);
                self.reschedule(ft);
            }
        }
    }

    /// The next event for the shell, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

fn ft_transport_index(t: Transport) -> usize {
    match t {
        Transport::Udp => 0,
        Transport::Tcp => 1,
        Transport::Tls => 2,
    }
}

/// Index of the client → peer budget in [`Allocation::budgets`].
const TO_PEER: usize = 0;
/// Index of the peer → client budget.
const TO_CLIENT: usize = 1;

/// Charges `len` payload bytes to an allocation's bucket for one direction (`TO_PEER` or
/// `TO_CLIENT`) under a cap of `max_bitrate` bits/s (0: no cap, nothing charged, nothing
/// allocated); the bucket holds 100 ms of traffic (at least 64 KiB) so bursts of a video
/// frame pass.
fn charge(
    budgets: &mut Option<Box<[Option<TokenBucket>; 2]>>,
    dir: usize,
    max_bitrate: u64,
    len: usize,
    now: Instant,
) -> bool {
    if max_bitrate == 0 {
        return true;
    }
    let rate = max_bitrate as f64 / 8.0;
    let burst = burst_for(max_bitrate / 8, Duration::from_millis(100));
    budgets.get_or_insert_with(Default::default)[dir]
        .get_or_insert_with(|| TokenBucket::new(burst, now))
        .take(len, now, rate, burst)
}

/// The challenge and request limiters of `config` (`None` where the rate is 0), keyed from
/// the server secret.
fn limiters(
    config: &ServerConfig,
    secret: &[u8; 32],
    now: Instant,
) -> (Option<RefCell<PrefixLimiter>>, Option<PrefixLimiter>) {
    let seed = u64::from_le_bytes(secret[16..24].try_into().expect("8 bytes"));
    let limiter = |rate: u32| {
        (rate > 0).then(|| {
            let (v4, v6) = (config.rate_limit_v4_prefix, config.rate_limit_v6_prefix);
            PrefixLimiter::new(rate, rate.saturating_mul(2), v4, v6, now, seed ^ rate as u64)
        })
    };
    (
        limiter(config.challenge_rate).map(RefCell::new),
        limiter(config.request_rate),
    )
}

/// A ChaCha seed derived from the server secret (HMAC-SHA256 with a label), so that it
/// reveals nothing of the nonce key.
fn derive_seed(secret: &[u8; 32]) -> [u8; 32] {
    use hmac::{Hmac, Mac as _};
    let mut mac = <Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"turnpike data indication transaction ids");
    mac.finalize().into_bytes().into()
}

fn error_code(b: &mut MessageBuilder, code: ErrorCode) {
    b.attribute(&Attribute::ErrorCode {
        code,
        reason: code.reason(),
    });
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
