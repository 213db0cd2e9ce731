//! Allocation state: permissions and channel bindings (RFC 8656 §2.2, §9, §12).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ahash::AHashMap;

use super::rate_limit::TokenBucket;
use super::stun::integrity::LongTermKey;
use super::stun::TransactionId;

/// The transport protocol between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// UDP (RFC 8656).
    Udp,
}

/// The 5-tuple that identifies an allocation (RFC 8656 §2.2): client transport address,
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

/// One allocation: a relayed transport address bound to a client 5-tuple, with its
/// permissions and channel bindings.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// The client 5-tuple.
    pub five_tuple: FiveTuple,
    /// The relayed transport address on the server.
    pub relayed: SocketAddr,
    /// The user that created it; later requests must come from the same user (441).
    pub username: String,
    /// The key that authenticated the Allocate.
    pub key: LongTermKey,
    /// The transaction ID of the Allocate that created it (a retransmission gets the same answer).
    pub allocate_tid: TransactionId,
    /// When the allocation expires.
    pub expires: Instant,
    /// Installed permissions: peer IP to expiry (RFC 8656 §9: 300 s).
    pub permissions: AHashMap<IpAddr, Instant>,
    /// Channel bindings by number.
    pub channels: AHashMap<u16, ChannelBinding>,
    /// Channel numbers by peer transport address.
    pub channel_by_peer: AHashMap<SocketAddr, u16>,
    /// The instant the server's timer for this allocation is set to.
    pub(crate) timer: Instant,
    /// Bandwidth budget client → peer, when a cap is configured.
    pub(crate) to_peer_budget: Option<TokenBucket>,
    /// Bandwidth budget peer → client, when a cap is configured.
    pub(crate) to_client_budget: Option<TokenBucket>,
    /// The RESERVATION-TOKEN of the first success response, repeated on a retransmission.
    pub(crate) reservation_token: Option<[u8; 8]>,
    /// The family refused with ADDRESS-ERROR-CODE in the first success response.
    pub(crate) refused_family: Option<super::stun::AddressFamily>,
}

impl Allocation {
    /// Whether a live permission exists for `ip` at `now`.
    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|&t| t > now)
    }

    /// The live channel binding for `channel` at `now`.
    pub fn channel(&self, channel: u16, now: Instant) -> Option<&ChannelBinding> {
        self.channels.get(&channel).filter(|b| b.expires > now)
    }

    /// The live channel bound to `peer` at `now`.
    pub fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        let ch = *self.channel_by_peer.get(&peer)?;
        self.channel(ch, now).map(|_| ch)
    }

    /// Removes permissions and channel bindings that have expired at `now`, reporting each
    /// to `expired`.
    pub fn purge(&mut self, now: Instant, mut expired: impl FnMut(Expired)) {
        self.permissions.retain(|&ip, &mut t| {
            let live = t > now;
            if !live {
                expired(Expired::Permission(ip));
            }
            live
        });
        let before = self.channels.len();
        self.channels.retain(|&number, b| {
            let live = b.expires > now;
            if !live {
                expired(Expired::Channel(number, b.peer));
            }
            live
        });
        if self.channels.len() != before {
            let channels = &self.channels;
            self.channel_by_peer.retain(|_, ch| channels.contains_key(ch));
        }
    }

    /// The earliest instant at which something in this allocation expires.
    pub fn next_deadline(&self) -> Instant {
        let p = self.permissions.values().copied();
        let c = self.channels.values().map(|b| b.expires);
        p.chain(c).fold(self.expires, Instant::min)
    }
}
