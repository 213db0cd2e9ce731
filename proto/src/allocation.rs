//! Allocation state: permissions and channel bindings (RFC 8656 §6, §9, §12).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use smallvec::SmallVec;

use super::rate_limit::TokenBucket;
use super::stun::integrity::LongTermKey;
use super::stun::TransactionId;

/// The transport protocol between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// UDP (RFC 8656).
    Udp,
    /// TCP (RFC 8656 §3.1): messages framed on the connection, ChannelData padded to a
    /// multiple of 4 bytes (§12.5).
    Tcp,
    /// TLS over TCP (RFC 8656 §3.1): framed as over TCP. The 5-tuple's protocol is TCP; the
    /// variant is kept apart for counters and logs.
    Tls,
}

impl Transport {
    /// Whether messages are framed on a byte stream (TCP or TLS): ChannelData is then padded
    /// to a multiple of 4 bytes (RFC 8656 §12.5) and the allocation ends with the connection.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The name used in logs and metric labels: `udp`, `tcp` or `tls`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// The 5-tuple that identifies an allocation (RFC 8656 §2 and §6): client transport address,
/// server transport address and transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    /// The client's transport address as the server sees it (its server-reflexive address).
    pub client: SocketAddr,
    /// The server transport address the client sends to.
    pub server: SocketAddr,
    /// The transport protocol.
    pub transport: Transport,
}

impl FiveTuple {
    /// A 5-tuple over `transport`.
    pub fn new(client: SocketAddr, server: SocketAddr, transport: Transport) -> Self {
        FiveTuple {
            client,
            server,
            transport,
        }
    }

    /// A UDP 5-tuple.
    pub fn udp(client: SocketAddr, server: SocketAddr) -> Self {
        FiveTuple {
            client,
            server,
            transport: Transport::Udp,
        }
    }
}

/// A channel binding: channel number to peer transport address, with its expiry
/// (RFC 8656 §12: 10 minutes unless refreshed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding {
    /// The peer transport address.
    pub peer: SocketAddr,
    /// When the binding expires.
    pub expires: Instant,
}

/// What [`Allocation::purge`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The permission for this peer IP.
    Permission(IpAddr),
    /// The binding of this channel number to this peer transport address.
    Channel(u16, SocketAddr),
}

/// What an allocation relayed, for usage records (billing): packets and payload bytes each
/// way, counted on the forwarding path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Datagrams relayed client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes relayed client → peer.
    pub to_peer_bytes: u64,
    /// Datagrams relayed peer → client.
    pub to_client_packets: u64,
    /// Payload bytes relayed peer → client.
    pub to_client_bytes: u64,
}

/// One allocation: a relayed transport address bound to a client 5-tuple (its key in the
/// server's table), with its permissions and channel bindings.
///
/// Memory: permissions and channel bindings live in small sorted vectors, inline for the
/// common case (two permissions, one channel) and on the heap beyond; lookups are binary
/// searches by peer IP and channel number, the reverse lookup peer → channel a scan of the
/// bindings. That replaced three hash maps per allocation (about 1 KB each allocation).
#[derive(Debug, Clone)]
pub struct Allocation {
    /// The relayed transport address on the server (the IPv4 one of a dual allocation).
    pub relayed: SocketAddr,
    /// The IPv6 relayed transport address of a dual allocation (RFC 8656 §7.2,
    /// ADDITIONAL-ADDRESS-FAMILY).
    pub additional: Option<SocketAddr>,
    /// The user that created it; later requests must come from the same user (441).
    pub username: Box<str>,
    /// The key that authenticated the Allocate.
    pub key: LongTermKey,
    /// The transaction ID of the Allocate that created it (a retransmission gets the same answer).
    pub allocate_tid: TransactionId,
    /// When the allocation expires.
    pub expires: Instant,
    /// When it was created.
    pub created: Instant,
    /// What it relayed so far.
    pub usage: Usage,
    /// Installed permissions, sorted by peer IP: (peer IP, expiry) (RFC 8656 §9: 300 s).
    permissions: SmallVec<[(IpAddr, Instant); 2]>,
    /// Channel bindings, sorted by channel number.
    channels: SmallVec<[(u16, ChannelBinding); 1]>,
    /// The instant the server's timer for this allocation is set to.
    pub(crate) timer: Instant,
    /// Bandwidth budgets client → peer and peer → client, when a cap is configured.
    pub(crate) budgets: Option<Box<[Option<TokenBucket>; 2]>>,
    /// The RESERVATION-TOKEN of the first success response, repeated on a retransmission.
    pub(crate) reservation_token: Option<[u8; 8]>,
    /// An RFC 6062 TCP allocation (its relayed transport address is a TCP listener).
    pub tcp_relay: bool,
    /// The family refused with ADDRESS-ERROR-CODE in the first success response, and the code.
    pub(crate) refused_family: Option<(super::stun::AddressFamily, super::stun::ErrorCode)>,
}

impl Allocation {
    /// A new allocation without permissions or channels.
    pub(crate) fn new(
        relayed: SocketAddr,
        username: Box<str>,
        key: LongTermKey,
        allocate_tid: TransactionId,
        created: Instant,
        expires: Instant,
    ) -> Self {
        Allocation {
            relayed,
            additional: None,
            username,
            key,
            allocate_tid,
            expires,
            created,
            usage: Usage::default(),
            permissions: SmallVec::new(),
            channels: SmallVec::new(),
            timer: expires,
            budgets: None,
            reservation_token: None,
            refused_family: None,
            tcp_relay: false,
        }
    }

    /// The relayed transport address that talks to peers of `peer`'s family: the
    /// allocation's own, or the additional one of a dual allocation; `None` when the
    /// allocation has no address of that family.
    #[inline]
    pub fn relayed_for(&self, peer: SocketAddr) -> Option<SocketAddr> {
        if peer.is_ipv4() == self.relayed.is_ipv4() {
            Some(self.relayed)
        } else {
            self.additional.filter(|a| a.is_ipv4() == peer.is_ipv4())
        }
    }

    /// Whether a live permission exists for `ip` at `now`.
    #[inline]
    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permission(ip).is_some_and(|t| t > now)
    }

    /// The expiry of the permission for `ip`, live or not yet purged.
    #[inline]
    pub fn permission(&self, ip: IpAddr) -> Option<Instant> {
        let i = self.permissions.binary_search_by(|(p, _)| p.cmp(&ip)).ok()?;
        Some(self.permissions[i].1)
    }

    /// Installs or refreshes the permission for `ip` until `expires`.
    pub fn set_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.binary_search_by(|(p, _)| p.cmp(&ip)) {
            Ok(i) => self.permissions[i].1 = expires,
            Err(i) => self.permissions.insert(i, (ip, expires)),
        }
    }

    /// Permissions (peer IP, expiry), sorted by IP.
    pub fn permissions(&self) -> impl Iterator<Item = (IpAddr, Instant)> + '_ {
        self.permissions.iter().copied()
    }

    /// Number of permissions held (live or not yet purged).
    pub fn permission_count(&self) -> usize {
        self.permissions.len()
    }

    /// The live channel binding for `channel` at `now`.
    #[inline]
    pub fn channel(&self, channel: u16, now: Instant) -> Option<&ChannelBinding> {
        self.binding(channel).filter(|b| b.expires > now)
    }

    /// The binding of `channel`, live or not yet purged.
    #[inline]
    pub fn binding(&self, channel: u16) -> Option<&ChannelBinding> {
        let i = self.channels.binary_search_by_key(&channel, |(c, _)| *c).ok()?;
        Some(&self.channels[i].1)
    }

    /// The channel bound to `peer` (live or not yet purged).
    #[inline]
    pub fn channel_of_peer(&self, peer: SocketAddr) -> Option<u16> {
        self.channels.iter().find(|(_, b)| b.peer == peer).map(|(c, _)| *c)
    }

    /// The live channel bound to `peer` at `now`.
    #[inline]
    pub fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|(_, b)| b.peer == peer && b.expires > now)
            .map(|(c, _)| *c)
    }

    /// Binds `channel` to `binding` (or refreshes it). The caller checks that neither the
    /// number nor the peer is bound otherwise (RFC 8656 §12.2).
    pub fn bind_channel(&mut self, channel: u16, binding: ChannelBinding) {
        match self.channels.binary_search_by_key(&channel, |(c, _)| *c) {
            Ok(i) => self.channels[i].1 = binding,
            Err(i) => self.channels.insert(i, (channel, binding)),
        }
    }

    /// Channel bindings (number, binding), sorted by number.
    pub fn channels(&self) -> impl Iterator<Item = (u16, ChannelBinding)> + '_ {
        self.channels.iter().copied()
    }

    /// Number of channel bindings held (live or not yet purged).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Removes permissions and channel bindings that have expired at `now`, reporting each
    /// to `expired`.
    pub fn purge(&mut self, now: Instant, mut expired: impl FnMut(Expired)) {
        self.permissions.retain(|&mut (ip, t)| {
            let live = t > now;
            if !live {
                expired(Expired::Permission(ip));
            }
            live
        });
        self.channels.retain(|&mut (number, b)| {
            let live = b.expires > now;
            if !live {
                expired(Expired::Channel(number, b.peer));
            }
            live
        });
    }

    /// The earliest instant at which something in this allocation expires.
    pub fn next_deadline(&self) -> Instant {
        let p = self.permissions.iter().map(|(_, t)| *t);
        let c = self.channels.iter().map(|(_, b)| b.expires);
        p.chain(c).fold(self.expires, Instant::min)
    }
}
