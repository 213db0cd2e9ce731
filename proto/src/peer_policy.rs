//! Peer address policy (DESIGN §5; RFC 8656 §21.2.2: TURN servers "are allowed to arbitrarily
//! restrict the range of addresses of peers that they will relay to").
//!
//! Every peer transport address (CreatePermission, ChannelBind, Send indications and
//! every inbound peer datagram) goes through [`PeerPolicy::check`], so the relay can never
//! be used as a proxy into loopback, private, link-local or otherwise special-purpose
//! networks, nor into itself. IPv4 addresses spelled in IPv6 form (IPv4-mapped,
//! IPv4-compatible, NAT64, 6to4, Teredo) are canonicalised with [`canonicalize`] before
//! any decision, which closes the `0.0.0.0` / `::ffff:127.0.0.1` / 6to4 bypasses known
//! from coturn (CVE-2020-26262, CVE-2026-27624).
//!
//! The default deny list is [`PeerPolicy::default_denied_ranges`]; operators can widen it
//! with allowed ranges and narrow it with denied ranges, which beat everything else.
//! [`PeerPolicy::check`] allocates nothing: it scans small precomputed tables of integer
//! network/mask pairs.

use std::error::Error;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An IP network in CIDR notation, e.g. `"10.0.0.0/8"`, `"fe80::/10"`, or a bare address
/// meaning `/32` or `/128`.
///
/// The stored address is always the network address: host bits are masked off on
/// construction, so `"10.1.2.3/8"` becomes `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Network mask for an IPv4 prefix length (`prefix_len <= 32`).
const fn mask_v4(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - prefix_len as u32)
    }
}

/// Network mask for an IPv6 prefix length (`prefix_len <= 128`).
const fn mask_v6(prefix_len: u8) -> u128 {
    if prefix_len == 0 {
        0
    } else {
        u128::MAX << (128 - prefix_len as u32)
    }
}

/// Const constructor for the built-in tables; the caller guarantees a valid, masked input.
const fn v4_net(a: u8, b: u8, c: u8, d: u8, prefix_len: u8) -> Cidr {
    Cidr {
        addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        prefix_len,
    }
}

/// Const constructor for the built-in tables; the caller guarantees a valid, masked input.
const fn v6_net(s: [u16; 8], prefix_len: u8) -> Cidr {
    Cidr {
        addr: IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])),
        prefix_len,
    }
}

impl Cidr {
    /// Builds a network from an address and a prefix length.
    ///
    /// Host bits of `addr` are masked off. Fails with [`CidrError::PrefixTooLong`] if
    /// `prefix_len` exceeds 32 (IPv4) or 128 (IPv6).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, CidrError> {
        match addr {
            IpAddr::V4(a) => {
                if prefix_len > 32 {
                    return Err(CidrError::PrefixTooLong {
                        input: format!("{addr}/{prefix_len}"),
                        prefix_len: u32::from(prefix_len),
                        max: 32,
                    });
                }
                let bits = a.to_bits() & mask_v4(prefix_len);
                Ok(Cidr {
                    addr: IpAddr::V4(Ipv4Addr::from_bits(bits)),
                    prefix_len,
                })
            }
            IpAddr::V6(a) => {
                if prefix_len > 128 {
                    return Err(CidrError::PrefixTooLong {
                        input: format!("{addr}/{prefix_len}"),
                        prefix_len: u32::from(prefix_len),
                        max: 128,
                    });
                }
                let bits = a.to_bits() & mask_v6(prefix_len);
                Ok(Cidr {
                    addr: IpAddr::V6(Ipv6Addr::from_bits(bits)),
                    prefix_len,
                })
            }
        }
    }

    /// The network address (host bits are zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies inside this network.
    ///
    /// Only addresses of the same family match, and no canonicalisation is done:
    /// `::ffff:10.0.0.1` is not inside `10.0.0.0/8` (use [`canonicalize`] first if wanted).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => ip.to_bits() & mask_v4(self.prefix_len) == net.to_bits(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => ip.to_bits() & mask_v6(self.prefix_len) == net.to_bits(),
            _ => false,
        }
    }

    /// Appends this network's `(network, mask)` pair to the matching family table.
    fn push_into(&self, v4: &mut Vec<(u32, u32)>, v6: &mut Vec<(u128, u128)>) {
        match self.addr {
            IpAddr::V4(a) => v4.push((a.to_bits(), mask_v4(self.prefix_len))),
            IpAddr::V6(a) => v6.push((a.to_bits(), mask_v6(self.prefix_len))),
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `"ADDR/LEN"` or a bare `"ADDR"` (meaning `/32` or `/128`).
    ///
    /// The prefix length must be plain decimal digits without a sign or leading zeros
    /// (`"/0"` is fine, `"/08"` is rejected). Whitespace anywhere is rejected. Host bits
    /// are masked off, as in [`Cidr::new`].
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr_str, prefix_str) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_str
            .parse()
            .map_err(|_| CidrError::InvalidAddress { input: s.to_owned() })?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_str {
            None => max,
            Some(p) => {
                let well_formed = !p.is_empty()
                    && p.len() <= 3
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && !(p.len() > 1 && p.starts_with('0'));
                if !well_formed {
                    return Err(CidrError::InvalidPrefix { input: s.to_owned() });
                }
                // At most three ASCII digits: always fits in u32.
                let n: u32 = p
                    .parse()
                    .map_err(|_| CidrError::InvalidPrefix { input: s.to_owned() })?;
                if n > u32::from(max) {
                    return Err(CidrError::PrefixTooLong {
                        input: s.to_owned(),
                        prefix_len: n,
                        max,
                    });
                }
                n as u8
            }
        };
        Cidr::new(addr, prefix_len)
    }
}

impl fmt::Display for Cidr {
    /// Formats as `"10.0.0.0/8"`; the prefix length is always written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Why a [`Cidr`] string (or address/prefix pair) was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrError {
    /// The address part is not a valid IPv4 or IPv6 address (includes empty input,
    /// surrounding whitespace and zone identifiers).
    InvalidAddress {
        /// The rejected input.
        input: String,
    },
    /// The prefix length after `/` is empty, not decimal, or has leading zeros.
    InvalidPrefix {
        /// The rejected input.
        input: String,
    },
    /// The prefix length exceeds the address family's width.
    PrefixTooLong {
        /// The rejected input.
        input: String,
        /// The prefix length given.
        prefix_len: u32,
        /// The largest allowed prefix length (32 or 128).
        max: u8,
    },
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrError::InvalidAddress { input } => {
                write!(f, "invalid CIDR {input:?}: not a valid IP address")
            }
            CidrError::InvalidPrefix { input } => write!(
                f,
                "invalid CIDR {input:?}: prefix length must be a decimal number without leading zeros"
            ),
            CidrError::PrefixTooLong { input, prefix_len, max } => {
                write!(f, "invalid CIDR {input:?}: prefix length {prefix_len} exceeds {max}")
            }
        }
    }
}

impl Error for CidrError {}

/// How an IPv4 address is embedded in an IPv6 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedding {
    /// A pure re-spelling of the IPv4 address (IPv4-mapped, IPv4-compatible): only the
    /// IPv4 address matters for the default policy.
    Alias,
    /// A translation/tunnelling mechanism (NAT64, 6to4, Teredo): both the embedded IPv4
    /// address and the IPv6 range are checked.
    Translated,
}

/// Extracts the IPv4 address embedded in an IPv6 address, if any.
#[inline]
fn embedded_v4(bits: u128) -> Option<(u32, Embedding)> {
    let low = bits as u32;
    if bits >> 32 == 0xffff {
        // ::ffff:a.b.c.d (IPv4-mapped).
        Some((low, Embedding::Alias))
    } else if bits >> 32 == 0 {
        // ::a.b.c.d (IPv4-compatible), but :: and ::1 stay IPv6.
        if bits > 1 {
            Some((low, Embedding::Alias))
        } else {
            None
        }
    } else if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        // 64:ff9b::/96, NAT64 well-known prefix (RFC 6052).
        Some((low, Embedding::Translated))
    } else if bits >> 80 == 0x0064_ff9b_0001 {
        // 64:ff9b:1::/48, local-use NAT64 prefix (RFC 8215); IPv4 in the last 32 bits.
        Some((low, Embedding::Translated))
    } else if bits >> 112 == 0x2002 {
        // 2002::/16, 6to4 (RFC 3056); IPv4 in bits 16..48.
        Some(((bits >> 80) as u32, Embedding::Translated))
    } else if bits >> 96 == 0x2001_0000 {
        // 2001::/32, Teredo (RFC 4380); obfuscated client IPv4 in the last 32 bits.
        Some((!low, Embedding::Translated))
    } else {
        None
    }
}

/// Canonicalises IPv4 addresses written in IPv6 form, before any policy decision.
///
/// * IPv4-mapped `::ffff:a.b.c.d` and IPv4-compatible `::a.b.c.d` give `a.b.c.d`
///   (but `::` and `::1` stay IPv6);
/// * NAT64 `64:ff9b::/96` (RFC 6052) and local-use `64:ff9b:1::/48` (RFC 8215) give the
///   last 32 bits;
/// * 6to4 `2002::/16` (RFC 3056) gives bits 16..48 (`2002:AABB:CCDD::` gives
///   `0xAA.0xBB.0xCC.0xDD`);
/// * Teredo `2001:0::/32` (RFC 4380) gives the client's public IPv4, i.e. the last
///   32 bits inverted.
///
/// Everything else, and any IPv4 input, is returned unchanged.
pub fn canonicalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => match embedded_v4(a.to_bits()) {
            Some((v4, _)) => IpAddr::V4(Ipv4Addr::from_bits(v4)),
            None => ip,
        },
    }
}

/// Why a peer address was refused. Maps to STUN error 403 (Forbidden) in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerDenied {
    /// The (canonical) address is in a special-purpose range denied by default
    /// (also used for port 0).
    SpecialPurpose,
    /// The address is one of the server's own addresses (listen or relay IPs).
    OwnAddress,
    /// The address matched an operator-configured denied range.
    OperatorDenied,
    /// The transport address is one of the server's own listening transport addresses
    /// (IP and port), denied even when the IP range is allowed (relaying into our own
    /// listener would loop).
    OwnListener,
}

impl fmt::Display for PeerDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerDenied::SpecialPurpose => "peer address is in a special-purpose range denied by default",
            PeerDenied::OwnAddress => "peer address is one of the server's own addresses",
            PeerDenied::OperatorDenied => "peer address is in an operator-denied range",
            PeerDenied::OwnListener => "peer transport address is one of the server's own listeners",
        })
    }
}

impl Error for PeerDenied {}

/// Default IPv4 special-purpose ranges, checked against the canonical IPv4 address.
const DEFAULT_V4: [Cidr; 15] = [
    v4_net(0, 0, 0, 0, 8),
    v4_net(10, 0, 0, 0, 8),
    v4_net(100, 64, 0, 0, 10),
    v4_net(127, 0, 0, 0, 8),
    v4_net(169, 254, 0, 0, 16),
    v4_net(172, 16, 0, 0, 12),
    v4_net(192, 0, 0, 0, 24),
    v4_net(192, 0, 2, 0, 24),
    v4_net(192, 88, 99, 0, 24),
    v4_net(192, 168, 0, 0, 16),
    v4_net(198, 18, 0, 0, 15),
    v4_net(198, 51, 100, 0, 24),
    v4_net(203, 0, 113, 0, 24),
    v4_net(224, 0, 0, 0, 4),
    v4_net(240, 0, 0, 0, 4),
];

/// Default IPv6 special-purpose ranges, checked against the original IPv6 address
/// (unless it is a mere IPv4-mapped/compatible spelling).
const DEFAULT_V6: [Cidr; 14] = [
    v6_net([0, 0, 0, 0, 0, 0, 0, 0], 128),
    v6_net([0, 0, 0, 0, 0, 0, 0, 1], 128),
    v6_net([0, 0, 0, 0, 0, 0xffff, 0, 0], 96),
    v6_net([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
    v6_net([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
    v6_net([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
    v6_net([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
    v6_net([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
    v6_net([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
    v6_net([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
    v6_net([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    v6_net([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    v6_net([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    v6_net([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
];

/// All default ranges, IPv4 first (returned by [`PeerPolicy::default_denied_ranges`]).
static DEFAULT_DENIED: [Cidr; 29] = {
    let mut out = [v4_net(0, 0, 0, 0, 0); 29];
    let mut i = 0;
    while i < DEFAULT_V4.len() {
        out[i] = DEFAULT_V4[i];
        i += 1;
    }
    let mut j = 0;
    while j < DEFAULT_V6.len() {
        out[i + j] = DEFAULT_V6[j];
        j += 1;
    }
    out
};

/// `(network, mask)` pairs of [`DEFAULT_V4`], computed at compile time.
static DEFAULT_V4_MASKS: [(u32, u32); 15] = {
    let mut out = [(0u32, 0u32); 15];
    let mut i = 0;
    while i < DEFAULT_V4.len() {
        if let IpAddr::V4(a) = DEFAULT_V4[i].addr {
            let mask = mask_v4(DEFAULT_V4[i].prefix_len);
            out[i] = (a.to_bits() & mask, mask);
        } else {
            panic!("IPv6 entry in DEFAULT_V4");
        }
        i += 1;
    }
    out
};

/// `(network, mask)` pairs of [`DEFAULT_V6`], computed at compile time.
static DEFAULT_V6_MASKS: [(u128, u128); 14] = {
    let mut out = [(0u128, 0u128); 14];
    let mut i = 0;
    while i < DEFAULT_V6.len() {
        if let IpAddr::V6(a) = DEFAULT_V6[i].addr {
            let mask = mask_v6(DEFAULT_V6[i].prefix_len);
            out[i] = (a.to_bits() & mask, mask);
        } else {
            panic!("IPv4 entry in DEFAULT_V6");
        }
        i += 1;
    }
    out
};

#[inline]
fn hit_v4(table: &[(u32, u32)], ip: Option<u32>) -> bool {
    match ip {
        Some(ip) => table.iter().any(|&(net, mask)| ip & mask == net),
        None => false,
    }
}

#[inline]
fn hit_v6(table: &[(u128, u128)], ip: Option<u128>) -> bool {
    match ip {
        Some(ip) => table.iter().any(|&(net, mask)| ip & mask == net),
        None => false,
    }
}

/// The forms of a peer IP that the policy looks at.
#[derive(Clone, Copy)]
struct PeerForms {
    /// The canonical IPv4 address, if the peer is IPv4 or embeds one.
    v4: Option<u32>,
    /// The original IPv6 address, if the peer was given in IPv6 form.
    v6: Option<u128>,
    /// Whether `v6` is a mere re-spelling of `v4` (IPv4-mapped or IPv4-compatible).
    alias: bool,
}

impl PeerForms {
    #[inline]
    fn of(ip: IpAddr) -> PeerForms {
        match ip {
            IpAddr::V4(a) => PeerForms {
                v4: Some(a.to_bits()),
                v6: None,
                alias: false,
            },
            IpAddr::V6(a) => {
                let bits = a.to_bits();
                match embedded_v4(bits) {
                    Some((v4, e)) => PeerForms {
                        v4: Some(v4),
                        v6: Some(bits),
                        alias: e == Embedding::Alias,
                    },
                    None => PeerForms {
                        v4: None,
                        v6: Some(bits),
                        alias: false,
                    },
                }
            }
        }
    }
}

/// The peer address policy of DESIGN §5.
///
/// Built once from configuration; [`check`](PeerPolicy::check) is allocation-free and
/// only scans small integer tables.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed_v4: Vec<(u32, u32)>,
    allowed_v6: Vec<(u128, u128)>,
    denied_v4: Vec<(u32, u32)>,
    denied_v6: Vec<(u128, u128)>,
    /// Own IPv4 addresses (including IPv4 given as mapped/compatible IPv6).
    own_v4: Vec<u32>,
    /// Own IPv6 addresses that are not mere IPv4 re-spellings.
    own_v6: Vec<u128>,
    /// Specific IPv4 listeners (canonical IP, port).
    listeners_v4: Vec<(u32, u16)>,
    /// Specific IPv6 listeners (IP, port).
    listeners_v6: Vec<(u128, u16)>,
    /// Ports of listeners bound to an unspecified IP (either family).
    wildcard_ports: Vec<u16>,
}

impl Default for PeerPolicy {
    /// The default policy: no operator ranges, no own addresses, no listeners.
    fn default() -> PeerPolicy {
        PeerPolicy::new(vec![], vec![], vec![], vec![])
    }
}

/// Splits an IP into the own-address tables: IPv4 (or IPv4-mapped/compatible) goes to the
/// IPv4 table, anything else stays IPv6 (so `2002:cb00:7207::1` is not the same as
/// `203.0.114.7`). Returns `None` for unspecified addresses.
fn own_form(ip: IpAddr) -> Option<Result<u32, u128>> {
    let form = match ip {
        IpAddr::V4(a) => Ok(a.to_bits()),
        IpAddr::V6(a) => {
            let bits = a.to_bits();
            match embedded_v4(bits) {
                Some((v4, Embedding::Alias)) => Ok(v4),
                _ => Err(bits),
            }
        }
    };
    match form {
        Ok(0) | Err(0) => None,
        f => Some(f),
    }
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

impl PeerPolicy {
    /// Builds a policy.
    ///
    /// * `allowed`: the operator's `--allowed-peer-ip` ranges; they override the default
    ///   deny list and the own-address check (not [`PeerDenied::OwnListener`]). A range
    ///   matches if it contains either the canonical or the original peer address, so
    ///   e.g. allowing `2002::/16` allows every 6to4 address.
    /// * `denied`: the operator's `--denied-peer-ip` ranges; checked before `allowed`,
    ///   they beat everything. Matched against both the original and canonical address.
    /// * `own_ips`: the server's own IPs (listen and relay addresses); unspecified
    ///   `0.0.0.0` / `::` entries are ignored.
    /// * `own_listeners`: the server's listening transport addresses. A listener with an
    ///   unspecified IP (`0.0.0.0:3478` or `[::]:3478`) means "this port on every local
    ///   address": any peer with that port whose canonical IP is loopback (`127.0.0.0/8`,
    ///   `::1`), unspecified (`0.0.0.0/8`, `::`) or one of `own_ips` is then refused.
    pub fn new(
        allowed: Vec<Cidr>,
        denied: Vec<Cidr>,
        own_ips: Vec<IpAddr>,
        own_listeners: Vec<SocketAddr>,
    ) -> PeerPolicy {
        let mut p = PeerPolicy {
            allowed_v4: Vec::new(),
            allowed_v6: Vec::new(),
            denied_v4: Vec::new(),
            denied_v6: Vec::new(),
            own_v4: Vec::new(),
            own_v6: Vec::new(),
            listeners_v4: Vec::new(),
            listeners_v6: Vec::new(),
            wildcard_ports: Vec::new(),
        };
        for c in &allowed {
            c.push_into(&mut p.allowed_v4, &mut p.allowed_v6);
        }
        for c in &denied {
            c.push_into(&mut p.denied_v4, &mut p.denied_v6);
        }
        for ip in own_ips {
            match own_form(ip) {
                Some(Ok(v4)) => push_unique(&mut p.own_v4, v4),
                Some(Err(v6)) => push_unique(&mut p.own_v6, v6),
                None => {}
            }
        }
        for l in own_listeners {
            match own_form(l.ip()) {
                Some(Ok(v4)) => push_unique(&mut p.listeners_v4, (v4, l.port())),
                Some(Err(v6)) => push_unique(&mut p.listeners_v6, (v6, l.port())),
                None => push_unique(&mut p.wildcard_ports, l.port()),
            }
        }
        p
    }

    /// Whether the peer is one of our own IPs (canonical IPv4 or original IPv6).
    #[inline]
    fn is_own(&self, f: PeerForms) -> bool {
        f.v4.is_some_and(|v4| self.own_v4.contains(&v4)) || f.v6.is_some_and(|v6| self.own_v6.contains(&v6))
    }

    /// The [`PeerDenied::OwnListener`] check.
    #[inline]
    fn is_own_listener(&self, f: PeerForms, port: u16) -> bool {
        if let Some(v4) = f.v4 {
            if self.listeners_v4.contains(&(v4, port)) {
                return true;
            }
        }
        if let Some(v6) = f.v6 {
            if self.listeners_v6.contains(&(v6, port)) {
                return true;
            }
        }
        if self.wildcard_ports.contains(&port) {
            let local_v4 = f.v4.is_some_and(|v4| {
                let first = v4 >> 24;
                first == 127 || first == 0
            });
            // Canonical IPv6 loopback/unspecified (:: and ::1 are never re-spellings).
            let local_v6 = f.v4.is_none() && matches!(f.v6, Some(0) | Some(1));
            return local_v4 || local_v6 || self.is_own(f);
        }
        false
    }

    /// Whether the peer is an unspecified address (`0.0.0.0/8`, `::`, in any spelling) with
    /// the port of one of our listeners.
    fn is_unspecified_to_listener(&self, f: PeerForms, port: u16) -> bool {
        let unspecified = f.v4.is_some_and(|v4| v4 >> 24 == 0) || (f.v4.is_none() && f.v6 == Some(0));
        unspecified
            && (self.listeners_v4.iter().any(|&(_, p)| p == port)
                || self.listeners_v6.iter().any(|&(_, p)| p == port)
                || self.wildcard_ports.contains(&port))
    }

    /// Decides for a peer transport address.
    ///
    /// Order: port 0 is refused ([`PeerDenied::SpecialPurpose`]); the IP is
    /// canonicalised; own listeners ([`PeerDenied::OwnListener`], not overridable);
    /// operator-denied ranges against the original and canonical IP
    /// ([`PeerDenied::OperatorDenied`]); operator-allowed ranges containing the
    /// canonical or original IP give `Ok`; own IPs ([`PeerDenied::OwnAddress`]); the
    /// default special-purpose list ([`PeerDenied::SpecialPurpose`]: canonical IPv4
    /// against the IPv4 list and, unless the IPv6 form is a mere IPv4-mapped/compatible
    /// spelling, the original IPv6 against the IPv6 list); otherwise `Ok`.
    ///
    /// Allocation-free; cost is linear in the (small) configured table sizes.
    pub fn check(&self, peer: SocketAddr) -> Result<(), PeerDenied> {
        let port = peer.port();
        if port == 0 {
            return Err(PeerDenied::SpecialPurpose);
        }
        let f = PeerForms::of(peer.ip());
        if self.is_own_listener(f, port) {
            return Err(PeerDenied::OwnListener);
        }
        if hit_v4(&self.denied_v4, f.v4) || hit_v6(&self.denied_v6, f.v6) {
            return Err(PeerDenied::OperatorDenied);
        }
        if hit_v4(&self.allowed_v4, f.v4) || hit_v6(&self.allowed_v6, f.v6) {
            // `0.0.0.0` (and `::`) as a destination means this host: `0.0.0.0:3478` reaches a
            // listener on any local address, whatever IP it is bound to (coturn's
            // CVE-2020-26262). The default list refuses them; an allowed range must not open
            // our listeners through them. Checked here, off the common path.
            if self.is_unspecified_to_listener(f, port) {
                return Err(PeerDenied::OwnListener);
            }
            return Ok(());
        }
        if self.is_own(f) {
            return Err(PeerDenied::OwnAddress);
        }
        if hit_v4(&DEFAULT_V4_MASKS, f.v4) || (!f.alias && hit_v6(&DEFAULT_V6_MASKS, f.v6)) {
            return Err(PeerDenied::SpecialPurpose);
        }
        Ok(())
    }

    /// The default special-purpose ranges (IPv4 first, then IPv6), for docs and tests.
    ///
    /// IPv4 ranges are matched against the canonical IPv4 address (see [`canonicalize`]);
    /// IPv6 ranges against the original IPv6 address, except for IPv4-mapped and
    /// IPv4-compatible spellings, which are judged by their IPv4 address only.
    pub fn default_denied_ranges() -> &'static [Cidr] {
        &DEFAULT_DENIED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip(s), port)
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn check(p: &PeerPolicy, s: &str) -> Result<(), PeerDenied> {
        p.check(sa(s, 5000))
    }

    const EXPECTED_DEFAULTS: [&str; 29] = [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "::ffff:0.0.0.0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "2002::/16",
        "3fff::/20",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ];

    #[test]
    fn default_table_matches_spec() {
        let got: Vec<String> = PeerPolicy::default_denied_ranges()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(got, EXPECTED_DEFAULTS);
        for (c, s) in PeerPolicy::default_denied_ranges().iter().zip(EXPECTED_DEFAULTS) {
            // Built-in entries are already masked, i.e. equal to the parsed form.
            assert_eq!(*c, cidr(s));
        }
        for (i, c) in DEFAULT_V4.iter().enumerate() {
            let IpAddr::V4(a) = c.addr() else { panic!() };
            assert_eq!(DEFAULT_V4_MASKS[i], (a.to_bits(), mask_v4(c.prefix_len())));
        }
        for (i, c) in DEFAULT_V6.iter().enumerate() {
            let IpAddr::V6(a) = c.addr() else { panic!() };
            assert_eq!(DEFAULT_V6_MASKS[i], (a.to_bits(), mask_v6(c.prefix_len())));
        }
    }

    #[test]
    fn default_refuses_listed_addresses() {
        let p = PeerPolicy::default();
        for s in [
            "127.0.0.1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::7f00:1",
            "2002:7f00:1::1",
            "169.254.169.254",
            "fe80::1",
            "fd00::1",
            "::1",
            "::",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "2001:db8::1",
            "ff02::1",
            "fec0::1",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "100::1",
            "3fff::1",
            "2001:2::1",
            "::ffff:169.254.169.254",
            "::ffff:255.255.255.255",
        ] {
            assert_eq!(check(&p, s), Err(PeerDenied::SpecialPurpose), "{s} must be refused");
        }
    }

    #[test]
    fn translated_public_v4_still_denied_by_v6_range() {
        let p = PeerPolicy::default();
        // Embedded IPv4 is public (8.8.8.8), but the IPv6 ranges deny them.
        for s in [
            "64:ff9b::808:808",
            "64:ff9b:1::808:808",
            "2002:808:808::1",
            // Teredo with client 8.8.8.8: last 32 bits = !0x08080808.
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
        ] {
            assert_eq!(canonicalize(ip(s)), ip("8.8.8.8"), "{s}");
            assert_eq!(check(&p, s), Err(PeerDenied::SpecialPurpose), "{s}");
        }
    }

    #[test]
    fn canonicalize_cases() {
        let cases = [
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::127.0.0.1", "127.0.0.1"),
            ("::2", "0.0.0.2"),
            ("::", "::"),
            ("::1", "::1"),
            ("64:ff9b::7f00:1", "127.0.0.1"),
            ("64:ff9b:1::7f00:1", "127.0.0.1"),
            ("64:ff9b:1:abcd::a00:1", "10.0.0.1"),
            ("2002:7f00:1::1", "127.0.0.1"),
            ("2002:c000:0201:1234::5", "192.0.2.1"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),
            ("2001:1::1", "2001:1::1"),
            ("2606:4700::1111", "2606:4700::1111"),
            ("64:ff9b:2::7f00:1", "64:ff9b:2::7f00:1"),
            ("::ffff:0:7f00:1", "::ffff:0:7f00:1"),
            ("8.8.8.8", "8.8.8.8"),
            ("127.0.0.1", "127.0.0.1"),
        ];
        for (input, want) in cases {
            assert_eq!(canonicalize(ip(input)), ip(want), "{input}");
        }
    }

    #[test]
    fn v4_range_edges() {
        let p = PeerPolicy::default();
        for c in &DEFAULT_V4 {
            let IpAddr::V4(net) = c.addr() else { panic!() };
            let first = net.to_bits();
            let last = first | !mask_v4(c.prefix_len());
            for a in [first, last] {
                let v4 = Ipv4Addr::from_bits(a);
                assert_eq!(
                    p.check(SocketAddr::new(v4.into(), 5000)),
                    Err(PeerDenied::SpecialPurpose),
                    "{v4} in {c}"
                );
                let mapped = v4.to_ipv6_mapped();
                assert_eq!(
                    p.check(SocketAddr::new(mapped.into(), 5000)),
                    Err(PeerDenied::SpecialPurpose),
                    "{mapped} in {c}"
                );
            }
        }
        for s in [
            "11.0.0.0",
            "9.255.255.255",
            "172.32.0.0",
            "172.15.255.255",
            "100.128.0.0",
            "100.63.255.255",
            "1.0.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
        ] {
            assert_eq!(check(&p, s), Ok(()), "{s} must be allowed");
        }
    }

    #[test]
    fn v6_range_edges() {
        let p = PeerPolicy::default();
        for c in &DEFAULT_V6 {
            let IpAddr::V6(net) = c.addr() else { panic!() };
            let first = net.to_bits();
            let last = first | !mask_v6(c.prefix_len());
            for a in [first, last] {
                let v6 = Ipv6Addr::from_bits(a);
                // IPv4-mapped addresses are judged by their IPv4 form; the others by
                // the IPv6 range itself.
                if let Some((_, Embedding::Alias)) = embedded_v4(a) {
                    continue;
                }
                assert_eq!(
                    p.check(SocketAddr::new(v6.into(), 5000)),
                    Err(PeerDenied::SpecialPurpose),
                    "{v6} in {c}"
                );
            }
        }
        for s in [
            "2001:200::1",
            "2001:4860:4860::8888",
            "2003::1",
            "3fff:1000::1",
            "fbff:ffff::1",
            "fe00::1",
            "100:0:0:1::1",
            "64:ff9b:2::1",
            "2606:4700::1111",
        ] {
            assert_eq!(check(&p, s), Ok(()), "{s} must be allowed");
        }
    }

    #[test]
    fn public_addresses_allowed() {
        let p = PeerPolicy::default();
        for s in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "::8.8.8.8"] {
            assert_eq!(check(&p, s), Ok(()), "{s} must be allowed");
        }
    }

    #[test]
    fn exhaustive_ish_v4_ranges() {
        let p = PeerPolicy::default();
        for c in &DEFAULT_V4 {
            let IpAddr::V4(net) = c.addr() else { panic!() };
            let first = u64::from(net.to_bits());
            let span = u64::from(!mask_v4(c.prefix_len())); // size - 1
            for i in 0..1000u64 {
                let a = (first + i * span / 999) as u32;
                let v4 = Ipv4Addr::from_bits(a);
                assert!(c.contains(v4.into()));
                for form in [IpAddr::V4(v4), IpAddr::V6(v4.to_ipv6_mapped())] {
                    assert_eq!(
                        p.check(SocketAddr::new(form, 5000)),
                        Err(PeerDenied::SpecialPurpose),
                        "{form} in {c}"
                    );
                }
                // Also the NAT64 and 6to4 spellings.
                let nat64 = Ipv6Addr::from_bits((0x0064_ff9b_u128 << 96) | u128::from(a));
                let six4 = Ipv6Addr::from_bits((0x2002_u128 << 112) | (u128::from(a) << 80));
                for form in [nat64, six4] {
                    assert_eq!(
                        p.check(SocketAddr::new(form.into(), 5000)),
                        Err(PeerDenied::SpecialPurpose),
                        "{form} in {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn allowed_loopback() {
        let p = PeerPolicy::new(vec![cidr("127.0.0.0/8")], vec![], vec![], vec![]);
        for s in ["127.0.0.1", "::ffff:127.0.0.1", "127.255.255.254"] {
            assert_eq!(check(&p, s), Ok(()), "{s}");
        }
        assert_eq!(check(&p, "10.0.0.1"), Err(PeerDenied::SpecialPurpose));
        assert_eq!(check(&p, "::1"), Err(PeerDenied::SpecialPurpose));
        assert_eq!(check(&p, "::"), Err(PeerDenied::SpecialPurpose));
    }

    #[test]
    fn allowed_v6_original_form() {
        // Allowing the NAT64 prefix allows the translated addresses of public hosts.
        let p = PeerPolicy::new(vec![cidr("64:ff9b::/96")], vec![], vec![], vec![]);
        assert_eq!(check(&p, "64:ff9b::808:808"), Ok(()));
        // Operator-denied still beats it, matched on the canonical form too.
        let p = PeerPolicy::new(vec![cidr("64:ff9b::/96")], vec![cidr("127.0.0.0/8")], vec![], vec![]);
        assert_eq!(check(&p, "64:ff9b::7f00:1"), Err(PeerDenied::OperatorDenied));
    }

    #[test]
    fn operator_denied_beats_allowed() {
        let p = PeerPolicy::new(vec![cidr("0.0.0.0/0")], vec![cidr("8.8.8.0/24")], vec![], vec![]);
        assert_eq!(check(&p, "8.8.8.8"), Err(PeerDenied::OperatorDenied));
        assert_eq!(check(&p, "::ffff:8.8.8.8"), Err(PeerDenied::OperatorDenied));
        assert_eq!(check(&p, "2002:808:808::1"), Err(PeerDenied::OperatorDenied));
        assert_eq!(check(&p, "8.8.4.4"), Ok(()));
        assert_eq!(check(&p, "10.0.0.1"), Ok(()));
        // Default policy plus a denied public range.
        let p = PeerPolicy::new(vec![], vec![cidr("2606:4700::/32")], vec![], vec![]);
        assert_eq!(check(&p, "2606:4700::1111"), Err(PeerDenied::OperatorDenied));
        assert_eq!(check(&p, "2606:4800::1"), Ok(()));
    }

    #[test]
    fn own_address() {
        let own = vec![ip("203.0.114.7"), ip("0.0.0.0"), ip("::")];
        let p = PeerPolicy::new(vec![], vec![], own.clone(), vec![]);
        assert_eq!(check(&p, "203.0.114.7"), Err(PeerDenied::OwnAddress));
        assert_eq!(check(&p, "::ffff:203.0.114.7"), Err(PeerDenied::OwnAddress));
        assert_eq!(check(&p, "203.0.114.8"), Ok(()));
        // Unspecified own IPs are ignored: :: is still SpecialPurpose, not OwnAddress.
        assert_eq!(check(&p, "::"), Err(PeerDenied::SpecialPurpose));
        let p = PeerPolicy::new(vec![cidr("203.0.114.7")], vec![], own, vec![]);
        assert_eq!(check(&p, "203.0.114.7"), Ok(()));

        let p = PeerPolicy::new(vec![], vec![], vec![ip("2606:4700::1")], vec![]);
        assert_eq!(check(&p, "2606:4700::1"), Err(PeerDenied::OwnAddress));
        assert_eq!(check(&p, "2606:4700::2"), Ok(()));
        // An own IPv4 given in mapped form is the IPv4 address.
        let p = PeerPolicy::new(vec![], vec![], vec![ip("::ffff:203.0.114.7")], vec![]);
        assert_eq!(check(&p, "203.0.114.7"), Err(PeerDenied::OwnAddress));
    }

    #[test]
    fn own_listener() {
        let p = PeerPolicy::new(vec![cidr("127.0.0.0/8")], vec![], vec![], vec![sa("127.0.0.1", 3478)]);
        assert_eq!(p.check(sa("127.0.0.1", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("::ffff:127.0.0.1", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("127.0.0.1", 3479)), Ok(()));
        assert_eq!(p.check(sa("127.0.0.2", 3478)), Ok(()));

        let p = PeerPolicy::new(
            vec![cidr("0.0.0.0/0"), cidr("::/0")],
            vec![],
            vec![ip("198.51.100.9")],
            vec![sa("0.0.0.0", 3478)],
        );
        assert_eq!(p.check(sa("127.0.0.5", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("0.0.0.0", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("::1", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("::", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("198.51.100.9", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("::ffff:127.0.0.5", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("127.0.0.5", 3479)), Ok(()));
        assert_eq!(p.check(sa("8.8.8.8", 3478)), Ok(()));
        assert_eq!(p.check(sa("198.51.100.9", 3479)), Ok(()));

        // Default policy, wildcard IPv6 listener: a non-loopback peer on that port is fine.
        let p = PeerPolicy::new(vec![], vec![], vec![], vec![sa("::", 3478)]);
        assert_eq!(p.check(sa("127.0.0.5", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("8.8.8.8", 3478)), Ok(()));

        // Specific IPv6 listener.
        let p = PeerPolicy::new(vec![], vec![], vec![], vec![sa("2606:4700::1", 3478)]);
        assert_eq!(p.check(sa("2606:4700::1", 3478)), Err(PeerDenied::OwnListener));
        assert_eq!(p.check(sa("2606:4700::1", 3479)), Ok(()));
    }

    /// Defect 9 of the review: with `0.0.0.0/0` allowed, `0.0.0.0:<listen port>` reached a
    /// listener bound to a specific IP (sending to 0.0.0.0 delivers to this host), the
    /// mechanism of coturn's CVE-2020-26262.
    #[test]
    fn regression_unspecified_peer_reaches_own_listener() {
        let p = PeerPolicy::new(
            vec![cidr("0.0.0.0/0"), cidr("::/0")],
            vec![],
            vec![],
            vec![sa("203.0.113.10", 3478), sa("2001:db8::10", 5349)],
        );
        for peer in [
            sa("0.0.0.0", 3478),
            sa("0.1.2.3", 3478),
            sa("::ffff:0.0.0.0", 3478),
            sa("::", 3478),
            sa("::", 5349),
            sa("0.0.0.0", 5349),
        ] {
            assert_eq!(p.check(peer), Err(PeerDenied::OwnListener), "{peer}");
        }
        assert_eq!(
            p.check(sa("0.0.0.0", 3479)),
            Ok(()),
            "allowed by the operator, not a listener"
        );
    }

    #[test]
    fn port_zero_refused() {
        let p = PeerPolicy::new(vec![cidr("0.0.0.0/0")], vec![], vec![], vec![]);
        assert_eq!(p.check(sa("8.8.8.8", 0)), Err(PeerDenied::SpecialPurpose));
        assert_eq!(
            PeerPolicy::default().check(sa("2606:4700::1111", 0)),
            Err(PeerDenied::SpecialPurpose)
        );
    }

    #[test]
    fn cidr_round_trips() {
        for s in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "1.2.3.4/32",
            "::/0",
            "::1/128",
            "fe80::/10",
            "2001:db8::/32",
            "::ffff:0.0.0.0/96",
        ] {
            assert_eq!(cidr(s).to_string(), s);
        }
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("127.0.0.1").prefix_len(), 32);
        assert_eq!(cidr("::1").prefix_len(), 128);
        // Host bits are masked off.
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3/8"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("fe80::1234/10").addr(), ip("fe80::"));
        assert_eq!(cidr("1.2.3.4/0").addr(), ip("0.0.0.0"));
        assert_eq!(Cidr::new(ip("192.168.77.1"), 16).unwrap().to_string(), "192.168.0.0/16");
        assert_eq!(cidr("1.2.3.0/24").addr(), ip("1.2.3.0"));
    }

    #[test]
    fn cidr_errors() {
        for s in [
            "",
            "garbage",
            "/8",
            " 1.2.3.4",
            "1.2.3.4 ",
            "1.2.3",
            "1.2.3.4.5",
            "256.0.0.0/8",
            "01.2.3.4",
            "fe80::1%eth0",
            ":::/0",
        ] {
            assert!(
                matches!(s.parse::<Cidr>(), Err(CidrError::InvalidAddress { .. })),
                "{s:?} should be an invalid address"
            );
        }
        for s in [
            "1.2.3.4/",
            "1.2.3.4/08",
            "1.2.3.4/00",
            "1.2.3.4/+8",
            "1.2.3.4/-1",
            "1.2.3.4/ 8",
            "1.2.3.4/8 ",
            "1.2.3.4/x",
            "1.2.3.4/1000",
            "::/0128",
            "1.2.3.4/8/8",
        ] {
            assert!(
                matches!(s.parse::<Cidr>(), Err(CidrError::InvalidPrefix { .. })),
                "{s:?} should be an invalid prefix"
            );
        }
        assert_eq!(
            "1.2.3.4/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong {
                input: "1.2.3.4/33".into(),
                prefix_len: 33,
                max: 32
            })
        );
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            "::/999".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { prefix_len: 999, .. })
        ));
        assert_eq!(
            "1.2.3.4/33".parse::<Cidr>().unwrap_err().to_string(),
            r#"invalid CIDR "1.2.3.4/33": prefix length 33 exceeds 32"#
        );
        let msg = "junk".parse::<Cidr>().unwrap_err().to_string();
        assert!(msg.contains("\"junk\""), "{msg}");
        let msg = "1.2.3.4/08".parse::<Cidr>().unwrap_err().to_string();
        assert!(msg.contains("\"1.2.3.4/08\""), "{msg}");
        assert!(Cidr::new(ip("1.2.3.4"), 33).is_err());
        assert!(Cidr::new(ip("::"), 129).is_err());
        assert_eq!(
            Cidr::new(ip("1.2.3.4"), 33).unwrap_err().to_string(),
            r#"invalid CIDR "1.2.3.4/33": prefix length 33 exceeds 32"#
        );
        assert!(Cidr::new(ip("::"), 128).is_ok());
        let e: Box<dyn Error> = Box::new("x".parse::<Cidr>().unwrap_err());
        assert!(!e.to_string().is_empty());
    }

    #[test]
    fn cidr_contains_edges() {
        let all4 = cidr("0.0.0.0/0");
        assert!(all4.contains(ip("0.0.0.0")));
        assert!(all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("::")));
        assert!(!all4.contains(ip("::ffff:1.2.3.4")));
        let all6 = cidr("::/0");
        assert!(all6.contains(ip("::")));
        assert!(all6.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!all6.contains(ip("1.2.3.4")));
        let host4 = cidr("1.2.3.4/32");
        assert!(host4.contains(ip("1.2.3.4")));
        assert!(!host4.contains(ip("1.2.3.5")));
        assert!(!host4.contains(ip("1.2.3.3")));
        let host6 = cidr("2001:db8::1/128");
        assert!(host6.contains(ip("2001:db8::1")));
        assert!(!host6.contains(ip("2001:db8::2")));
        assert!(!host6.contains(ip("2001:db8::")));
        let masked = cidr("10.200.3.4/8");
        assert!(masked.contains(ip("10.0.0.0")));
        assert!(masked.contains(ip("10.255.255.255")));
        assert!(!masked.contains(ip("11.0.0.0")));
        assert!(!masked.contains(ip("9.255.255.255")));
        // No canonicalisation inside contains().
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        let odd = cidr("172.16.0.0/12");
        assert!(odd.contains(ip("172.31.255.255")));
        assert!(!odd.contains(ip("172.32.0.0")));
        let v6 = cidr("fe80::/10");
        assert!(v6.contains(ip("febf:ffff::1")));
        assert!(!v6.contains(ip("fec0::")));
    }

    #[test]
    fn errors_display() {
        for d in [
            PeerDenied::SpecialPurpose,
            PeerDenied::OwnAddress,
            PeerDenied::OperatorDenied,
            PeerDenied::OwnListener,
        ] {
            let e: &dyn Error = &d;
            assert!(!e.to_string().is_empty());
        }
    }
}
