//! The relay allocator: who holds which relayed transport address, what the quotas allow,
//! and which ports are reserved for whom (RFC 8656 §7.2), without sockets or clocks.
//!
//! [`RelayAllocator`] is sans-IO. The control thread ([`super::Control`]) passes in the time
//! (`Instant` arguments only), gives it a source of random RESERVATION-TOKENs, and hands each
//! [`RelayAllocator::allocate`] a closure that binds a candidate port; the allocator answers
//! with the socket to hand to the shard and how the 5-tuple routes change. It keeps:
//! - one [`PortPool`] per relay IP, with bind retries: a port another process holds goes to
//!   the back of its pool and the next candidate is tried ([`BIND_TRIES`] per Allocate);
//! - the quotas, counted in units: one per allocation and one per unredeemed reservation,
//!   per user and in total (one implementation; the per-shard servers run without quotas);
//! - the reservations of EVEN-PORT's R bit: the next port's socket, held under an
//!   unpredictable token bound to the user that obtained it, until it is redeemed, its
//!   allocation ends, or [`RESERVATION_LIFETIME`] passes;
//! - the owner of each 5-tuple's route: the oldest live grant for that 5-tuple, so that
//!   releasing a second grant for the same 5-tuple never removes the first one's route.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::port_pool::PortPool;
use super::ControlReport;
use crate::proto::allocation::FiveTuple;
use crate::proto::server::{AllocateRequest, RelayError};
use crate::proto::stun::AddressFamily;

/// How long a port reserved by EVEN-PORT's R bit stays reserved: 30 s.
///
/// RFC 8656 §7.2: "The server MUST hold this reservation for at least 30 seconds and MAY
/// choose to hold longer (e.g., until the allocation with port N expires)." turnpike holds it
/// 30 s unless the allocation that created it ends first, and departs from that MUST on
/// purpose there: the reservation ends with its allocation (port, socket and quota unit are
/// freed at once), so a deleted allocation leaves nothing behind and the user's next R-bit
/// Allocate is not refused for quota. A client that deletes its own allocation within 30 s
/// thus loses its reservation early. Tests: `reservation_expires_at_exactly_30_s` (the 30 s)
/// and `regression_reservation_released_with_its_allocation` (the deviation).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// Candidate ports tried per relay IP and Allocate before answering 508.
pub const BIND_TRIES: usize = 64;

/// Draws from the token source before an R-bit Allocate is refused for want of a token
/// that is not already in use.
const TOKEN_DRAWS: usize = 4;

/// A source of RESERVATION-TOKENs: 8 bytes from a cryptographically secure generator
/// (the OS CSPRNG in production), `None` when it fails.
pub type TokenSource = Box<dyn FnMut() -> Option<[u8; 8]> + Send>;

/// Settings of a [`RelayAllocator`].
#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    /// Relay IPs, tried round-robin among those of the requested family.
    pub relay_ips: Vec<IpAddr>,
    /// Relay port range, inclusive.
    pub ports: (u16, u16),
    /// Units (allocations plus unredeemed reservations) per user, 0 for no limit.
    pub user_quota: usize,
    /// Units (allocations plus unredeemed reservations) in total, 0 for no limit.
    pub total_quota: usize,
    /// Seed for shuffling the port pools (not for tokens: those come from the
    /// [`TokenSource`]).
    pub seed: u64,
}

/// What an Allocate asks of the allocator: the parts of an authenticated
/// [`AllocateRequest`] that choose the relayed transport address.
#[derive(Debug, Clone, Copy)]
pub struct Ticket<'a> {
    /// The authenticated user, whose quota the allocation counts against.
    pub user: &'a str,
    /// The client 5-tuple.
    pub five_tuple: FiveTuple,
    /// The shard that owns the 5-tuple (the route target).
    pub shard: usize,
    /// The address family of the relayed transport address.
    pub family: AddressFamily,
    /// EVEN-PORT: the port must be even (RFC 8656 §7.2).
    pub even_port: bool,
    /// EVEN-PORT's R bit: also reserve the next higher port under a RESERVATION-TOKEN.
    pub reserve_next: bool,
    /// A RESERVATION-TOKEN presented by the client (RFC 8656 §18.10): the allocation gets
    /// the port reserved under it.
    pub reservation_token: Option<[u8; 8]>,
}

impl<'a> Ticket<'a> {
    /// The ticket for `request`, sent by `shard`.
    pub fn new(shard: usize, request: &'a AllocateRequest) -> Self {
        Ticket {
            user: request.username(),
            five_tuple: request.five_tuple,
            shard,
            family: request.family,
            even_port: request.even_port,
            reserve_next: request.reserve_next,
            reservation_token: request.reservation_token,
        }
    }
}

/// A change the shell must make to the shared 5-tuple → shard routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteChange {
    /// Route `five_tuple` to `shard` (insert or overwrite).
    Set {
        /// The client 5-tuple.
        five_tuple: FiveTuple,
        /// The shard owning its allocation.
        shard: usize,
    },
    /// The 5-tuple has no allocation left: remove its route.
    Remove(FiveTuple),
}

/// A granted relayed transport address, from [`RelayAllocator::allocate`].
#[derive(Debug)]
pub struct Granted<S> {
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// Its bound socket (freshly bound, or the one held for the redeemed reservation).
    pub socket: S,
    /// The RESERVATION-TOKEN of the port reserved by the R bit, for the success response
    /// ([`AllocateRequest::grant_reservation`]).
    pub token: Option<[u8; 8]>,
    /// How the routes change (`None` when another grant for the 5-tuple owns the route).
    pub route: Option<RouteChange>,
}

/// What the shell must do after [`RelayAllocator::release`].
#[derive(Debug)]
pub struct Released<S> {
    /// How the routes change (`None` when the released address did not own the route).
    pub route: Option<RouteChange>,
    /// The socket of the allocation's unredeemed reservation, to close.
    pub reservation: Option<S>,
}

struct Allocation {
    user: String,
    five_tuple: FiveTuple,
    shard: usize,
    /// The token of the reservation this allocation's R bit created, until redeemed.
    reservation: Option<[u8; 8]>,
}

struct Reservation<S> {
    socket: S,
    addr: SocketAddr,
    user: String,
    /// The relayed address of the allocation that created it.
    parent: SocketAddr,
    expires: Instant,
}

struct RelayIp {
    ip: IpAddr,
    pool: PortPool,
}

/// The relay allocator (see the [module documentation](self)). `S` is what the shell holds
/// for a bound port: a `UdpSocket` in production, anything in tests.
pub struct RelayAllocator<S> {
    config: AllocatorConfig,
    relay_ips: Vec<RelayIp>,
    next_relay_ip: usize,
    allocations: HashMap<SocketAddr, Allocation>,
    reservations: HashMap<[u8; 8], Reservation<S>>,
    /// (expiry, token) of every reservation, earliest first.
    expiry: BTreeSet<(Instant, [u8; 8])>,
    /// Units per user; users holding none are absent.
    units: HashMap<String, usize>,
    total_units: usize,
    /// Live grants per 5-tuple, oldest first; the first owns the route.
    routes: HashMap<FiveTuple, Vec<SocketAddr>>,
    tokens: TokenSource,
    user_quota_refusals: u64,
    total_quota_refusals: u64,
    token_refusals: u64,
    port_refusals: u64,
}

impl<S> RelayAllocator<S> {
    /// An allocator with every port free, drawing RESERVATION-TOKENs from `tokens`.
    pub fn new(config: AllocatorConfig, tokens: TokenSource) -> Self {
        let relay_ips = config
            .relay_ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| RelayIp {
                ip,
                pool: PortPool::new(config.ports.0, config.ports.1, config.seed ^ i as u64),
            })
            .collect();
        RelayAllocator {
            config,
            relay_ips,
            next_relay_ip: 0,
            allocations: HashMap::new(),
            reservations: HashMap::new(),
            expiry: BTreeSet::new(),
            units: HashMap::new(),
            total_units: 0,
            routes: HashMap::new(),
            tokens,
            user_quota_refusals: 0,
            total_quota_refusals: 0,
            token_refusals: 0,
            port_refusals: 0,
        }
    }

    /// Grants a relayed transport address for `ticket` at `now` (RFC 8656 §7.2).
    ///
    /// With a RESERVATION-TOKEN, the address is the one reserved under it, and the
    /// reservation's quota unit becomes the allocation's. Otherwise the ticket needs room
    /// for one unit (two with the R bit) in the user and the total quota; `bind(port,
    /// next)` is then called for candidate ports until it succeeds: it must bind `port`,
    /// and `next` (port + 1) too when given, returning both sockets. A failed bind puts
    /// the candidate ports back at the end of their pool.
    ///
    /// # Errors
    /// - [`RelayError::BadReservationToken`] (508): the token is unknown, expired, or was
    ///   obtained by another user;
    /// - [`RelayError::UserQuota`] (486) and [`RelayError::TotalQuota`] (508): no room;
    /// - [`RelayError::FamilyNotSupported`] (440): no relay IP of the family;
    /// - [`RelayError::Exhausted`] (508): no port could be bound in [`BIND_TRIES`]
    ///   candidates per relay IP, or no fresh token could be drawn.
    pub fn allocate(
        &mut self,
        ticket: &Ticket<'_>,
        now: Instant,
        bind: impl FnMut(SocketAddr, Option<SocketAddr>) -> io::Result<(S, Option<S>)>,
    ) -> Result<Granted<S>, RelayError> {
        let (relayed, socket, token) = match ticket.reservation_token {
            Some(token) => self.redeem(ticket.user, token, now)?,
            None => self.open(ticket, now, bind)?,
        };
        self.allocations.insert(
            relayed,
            Allocation {
                user: ticket.user.to_owned(),
                five_tuple: ticket.five_tuple,
                shard: ticket.shard,
                reservation: token,
            },
        );
        let owners = self.routes.entry(ticket.five_tuple).or_default();
        owners.push(relayed);
        let route = (owners.len() == 1).then_some(RouteChange::Set {
            five_tuple: ticket.five_tuple,
            shard: ticket.shard,
        });
        Ok(Granted {
            relayed,
            socket,
            token,
            route,
        })
    }

    /// Ends the allocation on `relayed` (its socket is closed or about to be): its port
    /// returns to the pool and its quota unit is freed at once, and so are those of its
    /// unredeemed reservation. An address that holds no allocation (unknown, already
    /// released, or a reservation not yet redeemed) changes nothing.
    pub fn release(&mut self, relayed: SocketAddr) -> Released<S> {
        let Some(a) = self.allocations.remove(&relayed) else {
            return Released {
                route: None,
                reservation: None,
            };
        };
        self.put_port(relayed);
        self.give_units(&a.user, 1);
        let reservation = a.reservation.and_then(|token| self.remove_reservation(token));
        Released {
            route: self.remove_route(a.five_tuple, relayed),
            reservation,
        }
    }

    /// When the earliest reservation expires: call [`RelayAllocator::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiry.first().map(|&(t, _)| t)
    }

    /// Ends the reservations whose [`RESERVATION_LIFETIME`] has passed at `now` (expiry
    /// ≤ `now`): their ports return to the pool and their quota units are freed. Returns
    /// their sockets, to close.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<S> {
        let mut expired = Vec::new();
        while self.expiry.first().is_some_and(|&(t, _)| t <= now) {
            if let Some((_, token)) = self.expiry.pop_first() {
                expired.extend(self.remove_reservation(token));
            }
        }
        expired
    }

    /// The current accounting.
    pub fn report(&self) -> ControlReport {
        ControlReport {
            allocations: self.allocations.len(),
            reservations: self.reservations.len(),
            relay_ports_in_use: self.relay_ips.iter().map(|r| r.pool.in_use()).sum(),
            quota_refusals: self.user_quota_refusals + self.total_quota_refusals,
            port_refusals: self.port_refusals,
        }
    }

    /// New quotas (SIGHUP). Allocations held beyond a lowered quota stay; new ones are
    /// refused until the user (or the server) is below it again.
    pub fn set_quotas(&mut self, user_quota: usize, total_quota: usize) {
        self.config.user_quota = user_quota;
        self.config.total_quota = total_quota;
    }

    /// What the metrics report: ports per relay IP and refusals by reason.
    pub fn published(&self) -> crate::stats::ControlPublished {
        crate::stats::ControlPublished {
            relay_ports: self
                .relay_ips
                .iter()
                .map(|r| (r.ip, r.pool.in_use(), r.pool.total() - r.pool.in_use()))
                .collect(),
            reservations: self.reservations.len(),
            user_quota_refusals: self.user_quota_refusals,
            total_quota_refusals: self.total_quota_refusals,
            port_refusals: self.port_refusals,
            token_refusals: self.token_refusals,
        }
    }

    /// Takes the reservation under `token` for `user`.
    fn redeem(
        &mut self,
        user: &str,
        token: [u8; 8],
        now: Instant,
    ) -> Result<(SocketAddr, S, Option<[u8; 8]>), RelayError> {
        // Checked before it is taken out: another user's attempt leaves the owner's reservation.
        let r = match self.reservations.entry(token) {
            Entry::Occupied(r) if r.get().user == user && now < r.get().expires => r.remove(),
            _ => {
                self.token_refusals += 1;
                return Err(RelayError::BadReservationToken);
            }
        };
        self.expiry.remove(&(r.expires, token));
        if let Some(parent) = self.allocations.get_mut(&r.parent) {
            parent.reservation = None;
        }
        Ok((r.addr, r.socket, None))
    }

    /// Checks the quotas, binds a fresh relay port (and the next one for the R bit, held
    /// under a fresh token) and takes the units.
    fn open(
        &mut self,
        ticket: &Ticket<'_>,
        now: Instant,
        bind: impl FnMut(SocketAddr, Option<SocketAddr>) -> io::Result<(S, Option<S>)>,
    ) -> Result<(SocketAddr, S, Option<[u8; 8]>), RelayError> {
        let need = 1 + usize::from(ticket.reserve_next);
        let held = self.units.get(ticket.user).copied().unwrap_or(0);
        if self.config.user_quota != 0 && held + need > self.config.user_quota {
            self.user_quota_refusals += 1;
            return Err(RelayError::UserQuota);
        }
        if self.config.total_quota != 0 && self.total_units + need > self.config.total_quota {
            self.total_quota_refusals += 1;
            return Err(RelayError::TotalQuota);
        }
        let (relayed, socket, reserved) = self.bind_relay(ticket, bind)?;
        let token = match reserved {
            None => None,
            Some(reserved) => {
                let next = SocketAddr::new(relayed.ip(), relayed.port() + 1);
                let Some(token) = self.fresh_token() else {
                    self.put_port(relayed);
                    self.put_port(next);
                    return Err(RelayError::Exhausted);
                };
                let expires = now + RESERVATION_LIFETIME;
                self.reservations.insert(
                    token,
                    Reservation {
                        socket: reserved,
                        addr: next,
                        user: ticket.user.to_owned(),
                        parent: relayed,
                        expires,
                    },
                );
                self.expiry.insert((expires, token));
                Some(token)
            }
        };
        *self.units.entry(ticket.user.to_owned()).or_insert(0) += need;
        self.total_units += need;
        Ok((relayed, socket, token))
    }

    /// A token from the source that no live reservation uses.
    fn fresh_token(&mut self) -> Option<[u8; 8]> {
        (0..TOKEN_DRAWS).find_map(|_| (self.tokens)().filter(|t| !self.reservations.contains_key(t)))
    }

    /// Binds a port of the next relay IP of the family (an even one if asked; with the R
    /// bit, an even one whose successor is bound too).
    fn bind_relay(
        &mut self,
        ticket: &Ticket<'_>,
        mut bind: impl FnMut(SocketAddr, Option<SocketAddr>) -> io::Result<(S, Option<S>)>,
    ) -> Result<(SocketAddr, S, Option<S>), RelayError> {
        let pair = ticket.reserve_next;
        let n = self.relay_ips.len();
        let candidates: Vec<usize> = (0..n)
            .map(|i| (self.next_relay_ip + i) % n)
            .filter(|&i| AddressFamily::of(&self.relay_ips[i].ip) == ticket.family)
            .collect();
        // RFC 8656 §7.2: "If the server does not support the address family requested by the
        // client in REQUESTED-ADDRESS-FAMILY, or if the allocation of the requested address
        // family is disabled by local policy, it MUST generate an Allocate error response, and
        // it MUST include an ERROR-CODE attribute with the 440 (Address Family not Supported)
        // response code." The same holds for IPv4 (the family of an Allocate without the
        // attribute) when no IPv4 relay IP is configured (test
        // family_without_relay_ip_is_refused_with_440).
        if candidates.is_empty() {
            return Err(RelayError::FamilyNotSupported);
        }
        self.next_relay_ip = (self.next_relay_ip + 1) % n;
        for i in candidates {
            for _ in 0..BIND_TRIES {
                let relay = &mut self.relay_ips[i];
                let Some(port) = relay.pool.take(ticket.even_port, pair, BIND_TRIES) else {
                    break;
                };
                let addr = SocketAddr::new(relay.ip, port);
                let next = pair.then(|| SocketAddr::new(relay.ip, port + 1));
                match bind(addr, next) {
                    Ok((socket, reserved)) if reserved.is_some() == pair => return Ok((addr, socket, reserved)),
                    // In use by another process: back to the end of the pool, try another.
                    _ => {
                        relay.pool.put(port);
                        if pair {
                            relay.pool.put(port + 1);
                        }
                    }
                }
            }
        }
        self.port_refusals += 1;
        Err(RelayError::Exhausted)
    }

    /// Ends the reservation under `token`: port back to the pool, quota unit freed.
    /// Returns its socket, to close.
    fn remove_reservation(&mut self, token: [u8; 8]) -> Option<S> {
        let r = self.reservations.remove(&token)?;
        self.expiry.remove(&(r.expires, token));
        if let Some(parent) = self.allocations.get_mut(&r.parent) {
            parent.reservation = None;
        }
        self.put_port(r.addr);
        self.give_units(&r.user, 1);
        Some(r.socket)
    }

    fn put_port(&mut self, addr: SocketAddr) {
        if let Some(r) = self.relay_ips.iter_mut().find(|r| r.ip == addr.ip()) {
            r.pool.put(addr.port());
        }
    }

    fn give_units(&mut self, user: &str, n: usize) {
        if let Some(held) = self.units.get_mut(user) {
            *held -= n;
            if *held == 0 {
                self.units.remove(user);
            }
        }
        self.total_units -= n;
    }

    /// Forgets the grant of `relayed` for `five_tuple`; the route changes only when it was
    /// the route's owner (to the next oldest grant, or removed when none is left).
    fn remove_route(&mut self, five_tuple: FiveTuple, relayed: SocketAddr) -> Option<RouteChange> {
        let owners = self.routes.get_mut(&five_tuple)?;
        let i = owners.iter().position(|&r| r == relayed)?;
        owners.remove(i);
        if i != 0 {
            return None;
        }
        match owners.first() {
            None => {
                self.routes.remove(&five_tuple);
                Some(RouteChange::Remove(five_tuple))
            }
            Some(next) => self.allocations.get(next).map(|a| RouteChange::Set {
                five_tuple,
                shard: a.shard,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    /// In these tests a "socket" is the address it was bound to, so that a test can tell
    /// which one it got back.
    type Alloc = RelayAllocator<SocketAddr>;

    fn counter_tokens() -> TokenSource {
        let mut n = 0u64;
        Box::new(move || {
            n += 1;
            Some(n.to_be_bytes())
        })
    }

    fn allocator(ports: (u16, u16), user_quota: usize, total_quota: usize) -> Alloc {
        let config = AllocatorConfig {
            relay_ips: vec![IP],
            ports,
            user_quota,
            total_quota,
            seed: 1,
        };
        RelayAllocator::new(config, counter_tokens())
    }

    fn bound(addr: SocketAddr, next: Option<SocketAddr>) -> io::Result<(SocketAddr, Option<SocketAddr>)> {
        Ok((addr, next))
    }

    fn five_tuple(client_port: u16) -> FiveTuple {
        FiveTuple::udp(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), client_port),
            SocketAddr::new(IP, 3478),
        )
    }

    fn ticket(user: &str, client_port: u16) -> Ticket<'_> {
        Ticket {
            user,
            five_tuple: five_tuple(client_port),
            shard: 0,
            family: AddressFamily::V4,
            even_port: false,
            reserve_next: false,
            reservation_token: None,
        }
    }

    fn with_r_bit(user: &str, client_port: u16) -> Ticket<'_> {
        Ticket {
            even_port: true,
            reserve_next: true,
            ..ticket(user, client_port)
        }
    }

    fn redeeming(user: &str, client_port: u16, token: [u8; 8]) -> Ticket<'_> {
        Ticket {
            reservation_token: Some(token),
            ..ticket(user, client_port)
        }
    }

    fn err(r: Result<Granted<SocketAddr>, RelayError>) -> RelayError {
        r.expect_err("refused")
    }

    #[test]
    fn user_quota_refuses_with_user_quota_486() {
        let mut a = allocator((50000, 50099), 2, 0);
        let now = Instant::now();
        a.allocate(&ticket("alice", 1), now, bound).unwrap();
        a.allocate(&ticket("alice", 2), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("alice", 3), now, bound)), RelayError::UserQuota);
        a.allocate(&ticket("bob", 4), now, bound).unwrap();
        let r = a.report();
        assert_eq!((r.allocations, r.relay_ports_in_use, r.quota_refusals), (3, 3, 1));
    }

    #[test]
    fn total_quota_refuses_with_total_quota_508() {
        let mut a = allocator((50000, 50099), 0, 2);
        let now = Instant::now();
        a.allocate(&ticket("alice", 1), now, bound).unwrap();
        a.allocate(&ticket("bob", 2), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("carol", 3), now, bound)), RelayError::TotalQuota);
        assert_eq!(a.report().quota_refusals, 1);
    }

    /// Defect 13: a Release frees the user and total quota at once, so the same user's
    /// next Allocate (from another 5-tuple, on another shard) is granted.
    #[test]
    fn allocate_release_allocate_under_quota_1() {
        let mut a = allocator((50000, 50099), 1, 1);
        let now = Instant::now();
        let first = a.allocate(&ticket("alice", 1), now, bound).unwrap();
        let other_shard = Ticket {
            shard: 1,
            ..ticket("alice", 2)
        };
        assert_eq!(err(a.allocate(&other_shard, now, bound)), RelayError::UserQuota);
        a.release(first.relayed);
        let second = a.allocate(&other_shard, now, bound).unwrap();
        assert_eq!(
            second.route,
            Some(RouteChange::Set {
                five_tuple: five_tuple(2),
                shard: 1
            })
        );
        assert_eq!(a.report().allocations, 1);
    }

    /// Defect 3: a reservation is a quota unit until redeemed (then it is the allocation's
    /// unit), released or expired. Before, an R-bit Allocate needed room for one only.
    #[test]
    fn regression_reservations_count_against_quota() {
        let now = Instant::now();
        let mut a = allocator((50000, 50099), 1, 0);
        assert_eq!(
            err(a.allocate(&with_r_bit("alice", 1), now, bound)),
            RelayError::UserQuota
        );
        assert_eq!(a.report().relay_ports_in_use, 0);

        let mut a = allocator((50000, 50099), 2, 0);
        let granted = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        let token = granted.token.expect("a token for the R bit");
        assert_eq!(err(a.allocate(&ticket("alice", 2), now, bound)), RelayError::UserQuota);
        // Redeeming needs no room: the reservation's unit becomes the allocation's.
        a.allocate(&redeeming("alice", 2, token), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("alice", 3), now, bound)), RelayError::UserQuota);

        // An expired reservation frees its unit.
        let mut a = allocator((50000, 50099), 2, 0);
        a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("alice", 2), now, bound)), RelayError::UserQuota);
        assert_eq!(a.handle_timeout(now + RESERVATION_LIFETIME).len(), 1);
        a.allocate(&ticket("alice", 2), now + RESERVATION_LIFETIME, bound)
            .unwrap();

        // The total quota counts reservations too.
        let mut a = allocator((50000, 50099), 0, 2);
        a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("bob", 2), now, bound)), RelayError::TotalQuota);
        let mut a = allocator((50000, 50099), 0, 1);
        assert_eq!(
            err(a.allocate(&with_r_bit("alice", 1), now, bound)),
            RelayError::TotalQuota
        );
    }

    /// Defect 3: a token is redeemable only by the user that obtained it, once, and gives
    /// exactly the reserved port (with the socket held for it).
    #[test]
    fn regression_reservation_token_bound_to_user() {
        let mut a = allocator((50000, 50099), 0, 0);
        let now = Instant::now();
        let granted = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        assert_eq!(granted.relayed.port() % 2, 0);
        let reserved = SocketAddr::new(IP, granted.relayed.port() + 1);
        let token = granted.token.unwrap();
        assert_eq!(
            err(a.allocate(&redeeming("mallory", 2, token), now, bound)),
            RelayError::BadReservationToken
        );
        let redeemed = a.allocate(&redeeming("alice", 2, token), now, bound).unwrap();
        assert_eq!(
            (redeemed.relayed, redeemed.socket, redeemed.token),
            (reserved, reserved, None)
        );
        assert_eq!(
            err(a.allocate(&redeeming("alice", 3, token), now, bound)),
            RelayError::BadReservationToken
        );
        let r = a.report();
        assert_eq!((r.allocations, r.reservations, r.relay_ports_in_use), (2, 0, 2));
    }

    /// Defect 3: releasing the allocation that created a reservation releases the
    /// reservation too (port, socket, quota unit). Before, it lived on for 30 s.
    #[test]
    fn regression_reservation_released_with_its_allocation() {
        let mut a = allocator((50000, 50099), 2, 0);
        let now = Instant::now();
        let granted = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        let reserved = SocketAddr::new(IP, granted.relayed.port() + 1);
        let released = a.release(granted.relayed);
        assert_eq!(released.reservation, Some(reserved));
        assert_eq!(released.route, Some(RouteChange::Remove(five_tuple(1))));
        let r = a.report();
        assert_eq!((r.allocations, r.reservations, r.relay_ports_in_use), (0, 0, 0));
        assert_eq!(a.poll_timeout(), None);
        assert_eq!(
            err(a.allocate(&redeeming("alice", 2, granted.token.unwrap()), now, bound)),
            RelayError::BadReservationToken
        );
        // Both units are free again.
        a.allocate(&with_r_bit("alice", 3), now, bound).unwrap();
    }

    #[test]
    fn redeemed_reservation_stays_when_its_creator_is_released() {
        let mut a = allocator((50000, 50099), 0, 0);
        let now = Instant::now();
        let granted = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        let redeemed = a
            .allocate(&redeeming("alice", 2, granted.token.unwrap()), now, bound)
            .unwrap();
        assert_eq!(a.release(granted.relayed).reservation, None);
        let r = a.report();
        assert_eq!((r.allocations, r.relay_ports_in_use), (1, 1));
        assert_eq!(
            a.release(redeemed.relayed).route,
            Some(RouteChange::Remove(five_tuple(2)))
        );
        assert_eq!(a.report().relay_ports_in_use, 0);
    }

    #[test]
    fn reservation_expires_at_exactly_30_s() {
        let mut a = allocator((50000, 50099), 0, 0);
        let t0 = Instant::now();
        let granted = a.allocate(&with_r_bit("alice", 1), t0, bound).unwrap();
        let token = granted.token.unwrap();
        let reserved = SocketAddr::new(IP, granted.relayed.port() + 1);
        let expiry = t0 + Duration::from_secs(30);
        assert_eq!(a.poll_timeout(), Some(expiry));
        let just_before = expiry - Duration::from_nanos(1);
        assert!(a.handle_timeout(just_before).is_empty());
        assert_eq!(a.report().reservations, 1);
        // Not redeemable at 30 s, even before the timeout is handled.
        assert_eq!(
            err(a.allocate(&redeeming("alice", 2, token), expiry, bound)),
            RelayError::BadReservationToken
        );
        assert_eq!(a.handle_timeout(expiry), vec![reserved]);
        assert_eq!(a.poll_timeout(), None);
        let r = a.report();
        assert_eq!((r.allocations, r.reservations, r.relay_ports_in_use), (1, 0, 1));
        // The expired reservation no longer goes with its allocation.
        assert_eq!(a.release(granted.relayed).reservation, None);

        let granted = a.allocate(&with_r_bit("alice", 3), t0, bound).unwrap();
        a.allocate(&redeeming("alice", 4, granted.token.unwrap()), just_before, bound)
            .unwrap();
    }

    /// Defect 3: tokens are whatever the injected CSPRNG gives (before, each was an
    /// xorshift of the previous one); one already in use is drawn again.
    #[test]
    fn tokens_come_from_the_injected_source() {
        let script = [[7u8; 8], [7u8; 8], [0x42, 1, 2, 3, 4, 5, 6, 7]];
        let mut draws = script.into_iter();
        let config = AllocatorConfig {
            relay_ips: vec![IP],
            ports: (50000, 50099),
            user_quota: 0,
            total_quota: 0,
            seed: 1,
        };
        let mut a: Alloc = RelayAllocator::new(config.clone(), Box::new(move || draws.next()));
        let now = Instant::now();
        let first = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        let second = a.allocate(&with_r_bit("alice", 2), now, bound).unwrap();
        assert_eq!(first.token, Some([7; 8]));
        assert_eq!(second.token, Some([0x42, 1, 2, 3, 4, 5, 6, 7]));

        // A failing source: 508, and nothing is held.
        let mut a: Alloc = RelayAllocator::new(config, Box::new(|| None));
        assert_eq!(
            err(a.allocate(&with_r_bit("alice", 1), now, bound)),
            RelayError::Exhausted
        );
        let r = a.report();
        assert_eq!((r.allocations, r.reservations, r.relay_ports_in_use), (0, 0, 0));
        a.allocate(&ticket("alice", 1), now, bound).unwrap();
    }

    /// Defect 14: releasing a second grant for the same 5-tuple (a duplicate ticket) leaves
    /// the live allocation's route alone. Before, it removed it.
    #[test]
    fn regression_duplicate_release_keeps_route() {
        let mut a = allocator((50000, 50099), 0, 0);
        let now = Instant::now();
        let first = a.allocate(&ticket("alice", 1), now, bound).unwrap();
        assert_eq!(
            first.route,
            Some(RouteChange::Set {
                five_tuple: five_tuple(1),
                shard: 0
            })
        );
        let duplicate = a.allocate(&ticket("alice", 1), now, bound).unwrap();
        assert_eq!(duplicate.route, None);
        assert_eq!(a.release(duplicate.relayed).route, None);
        assert_eq!(a.release(first.relayed).route, Some(RouteChange::Remove(five_tuple(1))));
    }

    #[test]
    fn route_passes_to_the_remaining_grant_when_its_owner_is_released() {
        let mut a = allocator((50000, 50099), 0, 0);
        let now = Instant::now();
        let first = a.allocate(&ticket("alice", 1), now, bound).unwrap();
        let on_shard_1 = Ticket {
            shard: 1,
            ..ticket("alice", 1)
        };
        let second = a.allocate(&on_shard_1, now, bound).unwrap();
        assert_eq!(
            a.release(first.relayed).route,
            Some(RouteChange::Set {
                five_tuple: five_tuple(1),
                shard: 1
            })
        );
        assert_eq!(
            a.release(second.relayed).route,
            Some(RouteChange::Remove(five_tuple(1)))
        );
    }

    /// Releasing an unknown address, an address twice, or a reserved (unredeemed) address
    /// frees nothing. Before, the reserved port went back to the pool while still reserved.
    #[test]
    fn release_of_unknown_twice_or_reserved_address_is_harmless() {
        let mut a = allocator((50000, 50099), 2, 0);
        let now = Instant::now();
        let unknown = a.release(SocketAddr::new(IP, 50000));
        assert_eq!((unknown.route, unknown.reservation), (None, None));
        let granted = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        let reserved = SocketAddr::new(IP, granted.relayed.port() + 1);
        let r = a.release(reserved);
        assert_eq!((r.route, r.reservation), (None, None));
        assert_eq!(a.report().relay_ports_in_use, 2);
        let redeemed = a
            .allocate(&redeeming("alice", 2, granted.token.unwrap()), now, bound)
            .unwrap();
        assert_eq!(redeemed.relayed, reserved);

        a.release(granted.relayed);
        a.release(granted.relayed);
        // One unit is held (the redeemed allocation): one more fits, not two.
        a.allocate(&ticket("alice", 3), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("alice", 4), now, bound)), RelayError::UserQuota);
        assert_eq!(a.report().relay_ports_in_use, 2);
    }

    #[test]
    fn released_port_returns_to_the_pool() {
        let mut a = allocator((50000, 50001), 0, 0);
        let now = Instant::now();
        let first = a.allocate(&ticket("alice", 1), now, bound).unwrap();
        a.allocate(&ticket("alice", 2), now, bound).unwrap();
        assert_eq!(err(a.allocate(&ticket("alice", 3), now, bound)), RelayError::Exhausted);
        assert_eq!(a.report().port_refusals, 1);
        a.release(first.relayed);
        assert_eq!(
            a.allocate(&ticket("alice", 3), now, bound).unwrap().relayed,
            first.relayed
        );
    }

    /// A port another process holds goes back to the end of the pool and the next one is
    /// tried; when none can be bound, 508 and nothing is held.
    #[test]
    fn bind_failures_are_retried_and_ports_put_back() {
        let mut a = allocator((50000, 50003), 0, 0);
        let now = Instant::now();
        let busy = SocketAddr::new(IP, 50002);
        let mut tried = Vec::new();
        let mut bind = |addr: SocketAddr, next: Option<SocketAddr>| {
            tried.push(addr);
            if addr == busy || next == Some(busy) {
                return Err(io::Error::from(io::ErrorKind::AddrInUse));
            }
            Ok((addr, next))
        };
        let granted: Vec<SocketAddr> = (0..3)
            .map(|i| a.allocate(&ticket("alice", i), now, &mut bind).unwrap().relayed)
            .collect();
        assert!(!granted.contains(&busy));
        assert_eq!(
            err(a.allocate(&ticket("alice", 3), now, &mut bind)),
            RelayError::Exhausted
        );
        assert_eq!(a.report().relay_ports_in_use, 3);
        assert!(tried.contains(&busy));

        // Pairs whose second port is busy: both ports go back.
        let mut a = allocator((50000, 50003), 0, 0);
        let second_busy = |addr: SocketAddr, next: Option<SocketAddr>| match next {
            Some(_) => Err(io::Error::from(io::ErrorKind::AddrInUse)),
            None => Ok((addr, next)),
        };
        assert_eq!(
            err(a.allocate(&with_r_bit("alice", 1), now, second_busy)),
            RelayError::Exhausted
        );
        assert_eq!(a.report().relay_ports_in_use, 0);
        let granted = a.allocate(&with_r_bit("alice", 1), now, bound).unwrap();
        assert_eq!(granted.relayed.port() % 2, 0);

        // Nothing can be bound: 508, every port back in the pool.
        let mut a = allocator((50000, 50003), 0, 0);
        let mut attempts = 0;
        let failing = |_: SocketAddr, _: Option<SocketAddr>| -> io::Result<(SocketAddr, Option<SocketAddr>)> {
            attempts += 1;
            Err(io::Error::from(io::ErrorKind::AddrInUse))
        };
        assert_eq!(
            err(a.allocate(&ticket("alice", 1), now, failing)),
            RelayError::Exhausted
        );
        assert_eq!(attempts, BIND_TRIES);
        assert_eq!(a.report().relay_ports_in_use, 0);
        a.allocate(&ticket("alice", 1), now, bound).unwrap();
    }

    #[test]
    fn family_without_relay_ip_is_refused_with_440() {
        let mut a = allocator((50000, 50099), 0, 0);
        let v6 = Ticket {
            family: AddressFamily::V6,
            ..ticket("alice", 1)
        };
        assert_eq!(
            err(a.allocate(&v6, Instant::now(), bound)),
            RelayError::FamilyNotSupported
        );
    }
}
