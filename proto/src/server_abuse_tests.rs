//! Hostile input against the sans-IO server (issue 5), on the test client and harness of
//! `server_tests.rs` (this is its child module):
//!
//! - the peer-address matrix: every special-purpose range of DESIGN §5 at its first and last
//!   address, its neighbours outside, every IPv4-in-IPv6 spelling, Teredo, and the server's
//!   own addresses, through CreatePermission, ChannelBind, Send and inbound peer data;
//! - the Binding response size bound (no amplification beyond the XOR-MAPPED-ADDRESS);
//! - no server state before authentication;
//! - lifetime edge cases under virtual time;
//! - regressions for the bugs found here (named `regression_*`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::peer_policy::Cidr;

// ---------------------------------------------------------------------------------------
// The peer-address matrix
// ---------------------------------------------------------------------------------------

/// Special-purpose IPv4 ranges of DESIGN §5 (and RFC 6890), written out independently of
/// `PeerPolicy`'s own table: (name, first, last).
const SPECIAL_V4: &[(&str, &str, &str)] = &[
    ("this network 0/8", "0.0.0.0", "0.255.255.255"),
    ("private 10/8", "10.0.0.0", "10.255.255.255"),
    ("CGNAT 100.64/10", "100.64.0.0", "100.127.255.255"),
    ("loopback 127/8", "127.0.0.0", "127.255.255.255"),
    ("link-local 169.254/16", "169.254.0.0", "169.254.255.255"),
    ("private 172.16/12", "172.16.0.0", "172.31.255.255"),
    ("IETF protocol assignments 192.0.0/24", "192.0.0.0", "192.0.0.255"),
    ("TEST-NET-1 192.0.2/24", "192.0.2.0", "192.0.2.255"),
    ("6to4 relay anycast 192.88.99/24", "192.88.99.0", "192.88.99.255"),
    ("private 192.168/16", "192.168.0.0", "192.168.255.255"),
    ("benchmarking 198.18/15", "198.18.0.0", "198.19.255.255"),
    ("TEST-NET-2 198.51.100/24", "198.51.100.0", "198.51.100.255"),
    ("TEST-NET-3 203.0.113/24", "203.0.113.0", "203.0.113.255"),
    ("multicast 224/4", "224.0.0.0", "239.255.255.255"),
    ("reserved 240/4 and broadcast", "240.0.0.0", "255.255.255.255"),
];

/// Special-purpose IPv6 ranges of DESIGN §5: (name, first, last).
const SPECIAL_V6: &[(&str, &str, &str)] = &[
    ("unspecified ::", "::", "::"),
    ("loopback ::1", "::1", "::1"),
    ("NAT64 64:ff9b::/96", "64:ff9b::", "64:ff9b::ffff:ffff"),
    (
        "local NAT64 64:ff9b:1::/48",
        "64:ff9b:1::",
        "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
    ),
    ("discard 100::/64", "100::", "100::ffff:ffff:ffff:ffff"),
    ("Teredo 2001::/32", "2001::", "2001:0:ffff:ffff:ffff:ffff:ffff:ffff"),
    (
        "benchmarking 2001:2::/48",
        "2001:2::",
        "2001:2:0:ffff:ffff:ffff:ffff:ffff",
    ),
    (
        "IETF protocol assignments 2001::/23",
        "2001::",
        "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
    ),
    (
        "documentation 2001:db8::/32",
        "2001:db8::",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
    ),
    ("6to4 2002::/16", "2002::", "2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    (
        "documentation 3fff::/20",
        "3fff::",
        "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff",
    ),
    ("ULA fc00::/7", "fc00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    (
        "link-local fe80::/10",
        "fe80::",
        "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ),
    (
        "site-local fec0::/10",
        "fec0::",
        "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ),
    (
        "multicast ff00::/8",
        "ff00::",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ),
];

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn in_special_v4(a: Ipv4Addr) -> bool {
    SPECIAL_V4
        .iter()
        .any(|(_, f, l)| (v4(f).to_bits()..=v4(l).to_bits()).contains(&a.to_bits()))
}

fn in_special_v6(a: Ipv6Addr) -> bool {
    SPECIAL_V6
        .iter()
        .any(|(_, f, l)| (v6(f).to_bits()..=v6(l).to_bits()).contains(&a.to_bits()))
}

/// Every IPv6 spelling of an IPv4 address that some stack routes to it: IPv4-mapped,
/// IPv4-compatible, NAT64 (well-known and local-use prefix), 6to4 and Teredo (client
/// address obfuscated in the last 32 bits, RFC 4380).
fn spellings(a: Ipv4Addr) -> Vec<(&'static str, Ipv6Addr)> {
    let x = a.to_bits() as u128;
    vec![
        ("::ffff:a.b.c.d", Ipv6Addr::from_bits(0xffff_0000_0000 | x)),
        ("::a.b.c.d", Ipv6Addr::from_bits(x)),
        ("64:ff9b::a.b.c.d", Ipv6Addr::from_bits((0x64_ff9b << 96) | x)),
        ("64:ff9b:1::a.b.c.d", Ipv6Addr::from_bits((0x64_ff9b_0001 << 80) | x)),
        (
            "64:ff9b:1:abcd::a.b.c.d",
            Ipv6Addr::from_bits((0x64_ff9b_0001_abcd << 64) | x),
        ),
        (
            "2002:AABB:CCDD::1",
            Ipv6Addr::from_bits((0x2002 << 112) | (x << 80) | 1),
        ),
        (
            "Teredo 2001:0:server:flags:port:~client",
            Ipv6Addr::from_bits((0x2001_0000 << 96) | (0x4136_e378_8000_63bf << 32) | (!x & 0xffff_ffff)),
        ),
    ]
}

/// How the server treated one peer address on each path.
#[derive(Debug, PartialEq, Eq)]
struct Treatment {
    create_permission: Option<u16>,
    channel_bind: Option<u16>,
    send: &'static str,
    peer_data: &'static str,
}

/// A server with one IPv4 and one IPv6 allocation (public relayed addresses), for the matrix.
struct Matrix {
    h: Harness,
    c4: Client,
    c6: Client,
    relay4: SocketAddr,
    relay6: SocketAddr,
    next_channel: u16,
    seen: std::collections::HashSet<SocketAddr>,
}

const LISTEN4: &str = "45.33.32.1:3478";
const LISTEN6: &str = "[2600:3c00::1]:3478";
const RELAY4: &str = "45.33.32.2";
const RELAY6: &str = "2600:3c00::2";

impl Matrix {
    /// `allowed`: operator `--allowed-peer-ip` ranges; own IPs and listeners are the ones
    /// the binary would pass (`Config::peer_policy`): listen and relay IPs, the listeners.
    fn new(allowed: &[&str], listeners: &[&str]) -> Matrix {
        let listeners: Vec<SocketAddr> = listeners.iter().map(|s| sa(s)).collect();
        let mut own: Vec<IpAddr> = vec![RELAY4.parse().unwrap(), RELAY6.parse().unwrap()];
        own.extend(listeners.iter().map(|l| l.ip()));
        let policy = PeerPolicy::new(
            allowed.iter().map(|s| s.parse::<Cidr>().unwrap()).collect(),
            vec![],
            own,
            listeners,
        );
        let config = ServerConfig {
            max_permissions_per_allocation: 100_000,
            max_channels_per_allocation: 100_000,
            ..ServerConfig::default()
        };
        let mut h = Harness::with(config, policy);
        let now = h.t0;
        let relay4 = SocketAddr::new(RELAY4.parse().unwrap(), 50_000);
        let relay6 = SocketAddr::new(RELAY6.parse().unwrap(), 50_000);
        let mut c4 = Client::alice();
        h.allocate_ok(now, &mut c4, relay4);
        let mut c6 = Client::bob();
        let r = h.allocate_with(
            now,
            &mut c6,
            &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
            relay6,
        );
        assert_success(&r, Method::Allocate);
        Matrix {
            h,
            c4,
            c6,
            relay4,
            relay6,
            next_channel: 0x4000,
            seen: std::collections::HashSet::new(),
        }
    }

    /// Runs `peer` through all four paths on the allocation of `peer`'s family.
    fn treat(&mut self, peer: SocketAddr) -> Treatment {
        assert!(self.seen.insert(peer), "{peer} treated twice");
        let now = self.h.t0;
        let (c, relayed) = if peer.is_ipv4() {
            (&mut self.c4, self.relay4)
        } else {
            (&mut self.c6, self.relay6)
        };
        let cp = self.h.create_permission(now, c, &[peer]);
        c.verify(&cp);
        let channel = self.next_channel;
        self.next_channel = if channel == 0x7FFF { 0x4000 } else { channel + 1 };
        let cb = self.h.channel_bind(now, c, channel, peer);
        let send = match self.h.send(now, c.ft, &send_indication(peer, b"probe")) {
            Outcome::Relay {
                peer: p, relayed: r, ..
            } => {
                assert_eq!((p, r), (peer, relayed));
                "relayed"
            }
            Outcome::Drop(DropReason::PeerDenied) => "denied",
            other => panic!("Send to {peer}: {other:?}"),
        };
        let peer_data = match self.h.server.handle_peer(now, relayed, peer, 0) {
            PeerAction::Forward { .. } => "forwarded",
            PeerAction::Drop(DropReason::PeerDenied) => "denied",
            other => panic!("data from {peer}: {other:?}"),
        };
        Treatment {
            create_permission: err_code(&cp),
            channel_bind: err_code(&cb),
            send,
            peer_data,
        }
    }

    /// Checks that `peer` is refused on every path (403, 403, dropped, dropped) and left
    /// no permission behind.
    #[track_caller]
    fn assert_refused(&mut self, what: &str, peer: SocketAddr) {
        if self.seen.contains(&peer) {
            return; // the same address reached from two ranges' edges
        }
        let permission = |m: &Matrix| {
            let c = if peer.is_ipv4() { &m.c4 } else { &m.c6 };
            m.h.server.allocation(&c.ft).unwrap().permission(peer.ip())
        };
        let before = permission(self);
        let t = self.treat(peer);
        assert_eq!(
            t,
            Treatment {
                create_permission: Some(403),
                channel_bind: Some(403),
                send: "denied",
                peer_data: "denied",
            },
            "{what}: {peer}"
        );
        assert_eq!(permission(self), before, "{what}: permission for {peer}");
        let c = if peer.is_ipv4() { &self.c4 } else { &self.c6 };
        let a = self.h.server.allocation(&c.ft).unwrap();
        assert!(a.channel_of_peer(peer).is_none(), "{what}: channel for {peer}");
    }

    /// Checks that `peer` is accepted on every path.
    #[track_caller]
    fn assert_allowed(&mut self, what: &str, peer: SocketAddr) {
        if self.seen.contains(&peer) {
            return;
        }
        let t = self.treat(peer);
        assert_eq!(
            t,
            Treatment {
                create_permission: None,
                channel_bind: None,
                send: "relayed",
                peer_data: "forwarded",
            },
            "{what}: {peer}"
        );
    }
}

#[test]
fn peer_matrix_special_ipv4_ranges_first_last_and_neighbours() {
    let mut m = Matrix::new(&[], &[LISTEN4, LISTEN6]);
    let mut refused = 0;
    for (name, first, last) in SPECIAL_V4 {
        for addr in [v4(first), v4(last)] {
            m.assert_refused(name, SocketAddr::new(addr.into(), 5000));
            refused += 1;
        }
        // Just outside: allowed unless another special range starts there.
        let outside = [v4(first).to_bits().checked_sub(1), v4(last).to_bits().checked_add(1)];
        for n in outside.into_iter().flatten().map(Ipv4Addr::from_bits) {
            let peer = SocketAddr::new(n.into(), 5000);
            if in_special_v4(n) {
                m.assert_refused(name, peer);
            } else {
                m.assert_allowed(&format!("next to {name}"), peer);
            }
        }
    }
    assert_eq!(refused, 2 * SPECIAL_V4.len());
}

#[test]
fn peer_matrix_special_ipv6_ranges_first_last_and_neighbours() {
    let mut m = Matrix::new(&[], &[LISTEN4, LISTEN6]);
    for (name, first, last) in SPECIAL_V6 {
        for addr in [v6(first), v6(last)] {
            m.assert_refused(name, SocketAddr::new(addr.into(), 5000));
        }
        let outside = [v6(first).to_bits().checked_sub(1), v6(last).to_bits().checked_add(1)];
        for n in outside.into_iter().flatten().map(Ipv6Addr::from_bits) {
            let peer = SocketAddr::new(n.into(), 5000);
            // ::2 and up to ::ffff:ffff are IPv4-compatible spellings: judged as IPv4.
            let embedded_special = n.to_bits() >> 32 == 0 && in_special_v4(Ipv4Addr::from_bits(n.to_bits() as u32));
            if in_special_v6(n) || embedded_special {
                m.assert_refused(name, peer);
            } else {
                m.assert_allowed(&format!("next to {name}"), peer);
            }
        }
    }
}

#[test]
fn peer_matrix_ipv4_in_ipv6_spellings() {
    let mut m = Matrix::new(&[], &[LISTEN4, LISTEN6]);
    for (name, first, last) in SPECIAL_V4 {
        for addr in [v4(first), v4(last)] {
            for (form, spelled) in spellings(addr) {
                m.assert_refused(&format!("{name} as {form}"), SocketAddr::new(spelled.into(), 5000));
            }
        }
    }
    // A public IPv4 address: mapped and compatible spellings are the address itself and
    // allowed; NAT64, 6to4 and Teredo are translation ranges and refused (DESIGN §5).
    let public = v4("8.8.8.8");
    for (form, spelled) in spellings(public) {
        let peer = SocketAddr::new(spelled.into(), 5000);
        if form.starts_with("::") {
            m.assert_allowed(form, peer);
        } else {
            m.assert_refused(form, peer);
        }
    }
}

#[test]
fn peer_matrix_own_addresses() {
    let mut m = Matrix::new(&[], &[LISTEN4, LISTEN6]);
    let own4 = [sa(LISTEN4).ip(), RELAY4.parse().unwrap()];
    let own6 = [sa(LISTEN6).ip(), RELAY6.parse().unwrap()];
    for ip in own4 {
        let IpAddr::V4(a) = ip else { unreachable!() };
        for port in [3478, 50_000, 50_001, 9] {
            m.assert_refused("own IPv4 address", SocketAddr::new(ip, port));
            for (form, spelled) in spellings(a) {
                m.assert_refused(&format!("own address as {form}"), SocketAddr::new(spelled.into(), port));
            }
        }
    }
    for ip in own6 {
        for port in [3478, 50_000, 9] {
            m.assert_refused("own IPv6 address", SocketAddr::new(ip, port));
        }
    }
}

/// With the operator allowing the server's own network (and loopback), other ports on
/// those IPs become reachable peers (client-to-client through two relays), but the
/// listening transport addresses never are, in any spelling.
#[test]
fn peer_matrix_own_listeners_refused_even_when_allowed() {
    let mut m = Matrix::new(
        &["45.33.32.0/24", "2600:3c00::/64", "127.0.0.0/8", "::1/128"],
        &[LISTEN4, LISTEN6, "0.0.0.0:3479", "[::]:3480"],
    );
    m.assert_allowed("another relay on the own network", sa("45.33.32.2:50001"));
    m.assert_allowed("another relay on the own IPv6 network", sa("[2600:3c00::2]:50001"));
    for listener in [LISTEN4, LISTEN6] {
        m.assert_refused("own listener", sa(listener));
    }
    m.assert_refused("own listener, IPv4-mapped", sa("[::ffff:45.33.32.1]:3478"));
    m.assert_refused("own listener, IPv4-compatible", sa("[::45.33.32.1]:3478"));
    // Wildcard listeners: their port on loopback, unspecified and own IPs.
    for peer in [
        "127.0.0.1:3479",
        "127.1.2.3:3479",
        "0.0.0.0:3479",
        "45.33.32.2:3479",
        "[::ffff:127.0.0.1]:3479",
        "[::1]:3480",
        "[::ffff:127.0.0.1]:3480",
        "127.0.0.1:3480",
        "[2600:3c00::2]:3480",
    ] {
        m.assert_refused("wildcard listener", sa(peer));
    }
    m.assert_allowed("loopback, another port", sa("127.0.0.1:3481"));
}

/// A permission is per IP, the policy per transport address: with loopback allowed and a
/// permission for 127.0.0.1, data from (and Sends to) the listener's port stay refused.
#[test]
fn permission_for_an_allowed_ip_does_not_open_the_own_listener() {
    let listener = "127.0.0.1:3478";
    let policy = PeerPolicy::new(
        vec!["127.0.0.0/8".parse().unwrap()],
        vec![],
        vec![sa(listener).ip()],
        vec![sa(listener)],
    );
    let mut h = Harness::with(ServerConfig::default(), policy);
    let now = h.t0;
    let mut c = Client::alice();
    let relayed = sa("127.0.0.1:50000");
    h.allocate_ok(now, &mut c, relayed);
    assert_success(
        &h.create_permission(now, &mut c, &[sa("127.0.0.1:0")]),
        Method::CreatePermission,
    );
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa(listener), b"loop")),
        Outcome::Drop(DropReason::PeerDenied)
    ));
    assert_eq!(
        h.server.handle_peer(now, relayed, sa(listener), 0),
        PeerAction::Drop(DropReason::PeerDenied)
    );
    assert_error(
        &h.channel_bind(now, &mut c, 0x4000, sa(listener)),
        Method::ChannelBind,
        403,
    );
    assert!(matches!(
        h.send(now, c.ft, &send_indication(sa("127.0.0.1:3477"), b"ok")),
        Outcome::Relay { .. }
    ));
}

/// An IPv6 spelling on an IPv4 allocation (and the reverse) is refused with 443 before the
/// policy is even asked; either way nothing is installed or relayed.
#[test]
fn peer_matrix_cross_family_is_refused() {
    let mut m = Matrix::new(&[], &[LISTEN4]);
    let now = m.h.t0;
    for peer in ["[::ffff:127.0.0.1]:5000", "[::ffff:8.8.8.8]:5000", "[2606:4700::1]:53"] {
        let peer = sa(peer);
        assert_error(
            &m.h.create_permission(now, &mut m.c4, &[peer]),
            Method::CreatePermission,
            443,
        );
        assert_error(
            &m.h.channel_bind(now, &mut m.c4, 0x4000, peer),
            Method::ChannelBind,
            443,
        );
        assert!(matches!(
            m.h.send(now, m.c4.ft, &send_indication(peer, b"x")),
            Outcome::Drop(DropReason::FamilyMismatch)
        ));
    }
    assert_error(
        &m.h.create_permission(now, &mut m.c6, &[sa("127.0.0.1:5000")]),
        Method::CreatePermission,
        443,
    );
    assert!(m.h.server.allocation(&m.c4.ft).unwrap().permission_count() == 0);
}

/// One refused address among allowed ones in a single CreatePermission refuses the whole
/// request and installs nothing (RFC 8656 §10.2).
#[test]
fn one_refused_peer_refuses_the_whole_create_permission() {
    let mut m = Matrix::new(&[], &[LISTEN4]);
    let now = m.h.t0;
    let r = m.h.create_permission(
        now,
        &mut m.c4,
        &[sa("8.8.8.8:1"), sa("169.254.169.254:80"), sa("1.1.1.1:1")],
    );
    assert_error(&r, Method::CreatePermission, 403);
    assert!(m.h.server.allocation(&m.c4.ft).unwrap().permission_count() == 0);
}

// ---------------------------------------------------------------------------------------
// Binding responses never amplify
// ---------------------------------------------------------------------------------------

/// XOR-MAPPED-ADDRESS size for a client address.
fn xor_mapped_len(client: SocketAddr) -> usize {
    if client.is_ipv4() {
        12
    } else {
        24
    }
}

/// Bug: a Binding request with one unknown comprehension-required attribute (24 bytes)
/// was answered with a 420 of 56 bytes (ERROR-CODE with the reason phrase "Unknown
/// Attribute" plus UNKNOWN-ATTRIBUTES), more than the request plus an XOR-MAPPED-ADDRESS;
/// spoofed Bindings could reflect 2.3 times their size. Unauthenticated 420s now carry no
/// reason phrase.
#[test]
fn regression_binding_420_amplification() {
    let mut h = Harness::new();
    let ft = five_tuple("203.0.113.10:40000");
    for fingerprint in [false, true] {
        let req = build(Method::Binding, Class::Request, fresh_tid(), |b| {
            b.raw_attribute(0x7FF0, &[]);
            if fingerprint {
                b.fingerprint();
            }
        });
        let r = h.send(h.t0, ft, &req).response();
        assert_error(&r, Method::Binding, 420);
        assert_eq!(unknown_attributes_of(&r), vec![0x7FF0]);
        assert!(
            r.len() <= req.len() + 12,
            "{} bytes answered with {}",
            req.len(),
            r.len()
        );
    }
    // Authenticated 420s (after the integrity check) keep their reason phrase.
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    let r = h.respond(
        h.t0,
        &mut c,
        Method::Refresh,
        &[Attribute::Unknown {
            kind: 0x7FF0,
            value: &[],
        }],
    );
    assert_error(&r, Method::Refresh, 420);
    match get(&decode(&r), kind::ERROR_CODE) {
        Attribute::ErrorCode { reason, .. } => assert_eq!(reason, "Unknown Attribute"),
        a => panic!("{a:?}"),
    }
}

/// Bug: a Binding with a malformed CHANGE-REQUEST (24 bytes) was answered with a 400 of 40
/// bytes (the reason phrase "Bad Request"), more than the request plus an
/// XOR-MAPPED-ADDRESS. Found by `binding_response_never_larger_than_request_plus_xor_mapped_address`.
#[test]
fn regression_binding_400_amplification_on_malformed_change_request() {
    let mut h = Harness::new();
    let ft = five_tuple("203.0.113.10:40000");
    for value in [&[][..], &[0, 0], &[0, 0, 0, 4, 0, 0, 0, 0]] {
        let req = build(Method::Binding, Class::Request, fresh_tid(), |b| {
            b.raw_attribute(kind::CHANGE_REQUEST, value);
        });
        let r = h.send(h.t0, ft, &req).response();
        assert_error(&r, Method::Binding, 400);
        assert!(
            r.len() <= req.len() + 12,
            "{} bytes answered with {}",
            req.len(),
            r.len()
        );
    }
}

fn binding_attribute() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let kinds = prop_oneof![
        Just(kind::SOFTWARE),
        Just(kind::PRIORITY),
        Just(kind::USERNAME),
        Just(kind::PADDING),
        Just(kind::RESPONSE_PORT),
        Just(kind::CHANGE_REQUEST),
        Just(0x7FF0u16),
        Just(0x0002),
        0x0030u16..0x0040,
        0x8030u16..0x8040,
        any::<u16>(),
    ];
    (kinds, proptest::collection::vec(any::<u8>(), 0..12))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever a Binding request carries, its response is at most the request plus an
    /// XOR-MAPPED-ADDRESS, and carries no SOFTWARE by default.
    #[test]
    fn binding_response_never_larger_than_request_plus_xor_mapped_address(
        attrs in proptest::collection::vec(binding_attribute(), 0..6),
        fingerprint in any::<bool>(),
        ipv6 in any::<bool>(),
        ip4 in any::<u32>(),
        ip6 in any::<u128>(),
        port in any::<u16>(),
    ) {
        let mut h = Harness::new();
        let client = if ipv6 {
            SocketAddr::new(Ipv6Addr::from_bits(ip6).into(), port)
        } else {
            SocketAddr::new(Ipv4Addr::from_bits(ip4).into(), port)
        };
        let ft = FiveTuple::udp(client, sa(SERVER_ADDR));
        let req = build(Method::Binding, Class::Request, fresh_tid(), |b| {
            for (k, v) in &attrs {
                if *k != kind::FINGERPRINT && *k != kind::MESSAGE_INTEGRITY && *k != kind::MESSAGE_INTEGRITY_SHA256 {
                    b.raw_attribute(*k, v);
                }
            }
            if fingerprint {
                b.fingerprint();
            }
        });
        let r = match h.send(h.t0, ft, &req) {
            Outcome::Respond(r) => r,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert!(r.len() <= req.len() + xor_mapped_len(client), "{} -> {}", req.len(), r.len());
        prop_assert!(!has(&r, kind::SOFTWARE));
        prop_assert_eq!(h.server.table_sizes().total(), 0);
    }
}

#[test]
fn binding_success_is_exactly_request_plus_xor_mapped_address() {
    let mut h = Harness::new();
    for client in ["203.0.113.10:40000", "[2001:db8::7]:1234"] {
        let ft = five_tuple(client);
        for fingerprint in [false, true] {
            let req = build(Method::Binding, Class::Request, fresh_tid(), |b| {
                if fingerprint {
                    b.fingerprint();
                }
            });
            let r = h.send(h.t0, ft, &req).response();
            assert_success(&r, Method::Binding);
            assert_eq!(r.len(), req.len() + xor_mapped_len(sa(client)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// No state before authentication
// ---------------------------------------------------------------------------------------

/// Unauthenticated Allocates (no credentials, wrong password, stale or foreign nonce,
/// unknown user) from many 5-tuples leave the server's tables empty, and every answer
/// is a fixed-size 401/438 that does not grow with the number of sources.
#[test]
fn unauthenticated_allocates_from_many_sources_keep_no_state() {
    let mut h = Harness::new();
    let foreign = crate::auth::NonceIssuer::new([9; 32], 600);
    let mut sizes = std::collections::BTreeSet::new();
    for i in 0..5_000u32 {
        let ip = Ipv4Addr::from_bits(0x0b00_0000 + i * 7919);
        let client = SocketAddr::new(ip.into(), 1024 + (i % 60_000) as u16);
        let ft = FiveTuple::udp(client, sa(SERVER_ADDR));
        let mut c = Client::new(&client.to_string(), "alice", "wrong");
        let r = match i % 4 {
            0 => h.send(
                h.t0,
                ft,
                &c.unauthenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
            ),
            1 => {
                c.nonce = Some(h.server.nonces.issue(UNIX_NOW, client));
                h.send(
                    h.t0,
                    ft,
                    &c.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
                )
            }
            2 => {
                c.nonce = Some(foreign.issue(UNIX_NOW, client));
                h.send(
                    h.t0,
                    ft,
                    &c.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
                )
            }
            _ => {
                c.username = format!("nobody{i}");
                c.nonce = Some(h.server.nonces.issue(UNIX_NOW - 700, client));
                h.send(
                    h.t0,
                    ft,
                    &c.authenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]),
                )
            }
        };
        let r = r.response();
        let code = err_code(&r).unwrap();
        assert!(code == 401 || code == 438, "{code}");
        sizes.insert((code, r.len()));
        assert_eq!(h.server.table_sizes().total(), 0, "state after {i} requests");
    }
    assert_eq!(h.server.allocation_count(), 0);
    assert!(sizes.len() <= 2, "answer sizes {sizes:?}");
}

// ---------------------------------------------------------------------------------------
// Lifetimes under virtual time
// ---------------------------------------------------------------------------------------

const ONE_NS: Duration = Duration::from_nanos(1);

/// LIFETIME on Allocate: 0 and values below the default get the default (600 s), values
/// above the maximum the maximum (3600 s); the allocation lives exactly that long.
#[test]
fn lifetime_edges_on_allocate() {
    for (asked, granted) in [
        (0u32, 600u64),
        (1, 600),
        (599, 600),
        (600, 600),
        (3599, 3599),
        (3600, 3600),
        (3601, 3600),
        (u32::MAX, 3600),
    ] {
        let mut h = Harness::new();
        let mut c = Client::alice();
        let r = h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(asked)], relay(1));
        assert_success(&r, Method::Allocate);
        assert_eq!(lifetime_of(&r) as u64, granted, "asked {asked}");
        h.create_permission(h.t0, &mut c, &[sa(P1)]);
        h.refresh_permission_until(&mut c, granted);
        let end = h.at(granted);
        assert!(matches!(
            h.send(end - ONE_NS, c.ft, &send_indication(sa(P1), b"x")),
            Outcome::Relay { .. }
        ));
        h.server.handle_timeout(end - ONE_NS);
        assert_eq!(h.server.allocation_count(), 1, "asked {asked}: alive until the end");
        assert!(matches!(
            h.send(end, c.ft, &send_indication(sa(P1), b"x")),
            Outcome::Drop(DropReason::NoAllocation)
        ));
        h.server.handle_timeout(end);
        assert_eq!(h.server.allocation_count(), 0, "asked {asked}: gone at the end");
        assert_eq!(h.events().len(), 1);
    }
}

impl Harness {
    /// Keeps P1's permission alive (every 299 s) until `secs`.
    fn refresh_permission_until(&mut self, c: &mut Client, secs: u64) {
        let mut t = 299;
        while t < secs {
            let r = self.create_permission(self.at(t), c, &[sa(P1)]);
            assert_success(&r, Method::CreatePermission);
            t += 299;
        }
    }
}

/// LIFETIME on Refresh: 0 deletes, the rest is clamped like Allocate; the new expiry
/// counts from the Refresh.
#[test]
fn lifetime_edges_on_refresh() {
    for (asked, granted) in [
        (Some(0u32), 0u64),
        (Some(1), 600),
        (Some(3599), 3599),
        (Some(3600), 3600),
        (Some(3601), 3600),
        (Some(u32::MAX), 3600),
        (None, 600),
    ] {
        let mut h = Harness::new();
        let mut c = Client::alice();
        h.allocate_ok(h.t0, &mut c, relay(1));
        let r = h.refresh(h.at(100), &mut c, asked);
        assert_success(&r, Method::Refresh);
        assert_eq!(lifetime_of(&r) as u64, granted, "asked {asked:?}");
        if granted == 0 {
            assert_eq!(h.server.allocation_count(), 0);
            assert_eq!(h.events().len(), 1);
            continue;
        }
        assert_eq!(h.server.allocation(&c.ft).unwrap().expires, h.at(100 + granted));
        h.server.handle_timeout(h.at(100 + granted) - ONE_NS);
        assert_eq!(h.server.allocation_count(), 1);
        h.server.handle_timeout(h.at(100 + granted));
        assert_eq!(h.server.allocation_count(), 0, "asked {asked:?}");
    }
}

/// A Refresh that arrives exactly at the expiry instant is too late (437, the allocation
/// is closed once); one nanosecond earlier it extends the allocation.
#[test]
fn refresh_at_exactly_the_expiry_instant() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    let r = h.refresh(h.at(600) - ONE_NS, &mut c, Some(600));
    assert_success(&r, Method::Refresh);
    let expires = h.server.allocation(&c.ft).unwrap().expires;
    assert_eq!(expires, h.at(1200) - ONE_NS);

    // At exactly the new expiry, before any handle_timeout: gone.
    let r = h.refresh(expires, &mut c, Some(600));
    assert_error(&r, Method::Refresh, 437);
    assert_eq!(h.events().len(), 1, "closed once");
    h.server.handle_timeout(expires);
    assert!(h.events().is_empty());
    // LIFETIME 0 at the expiry instant: also 437, nothing left to delete.
    assert_error(&h.refresh(expires, &mut c, Some(0)), Method::Refresh, 437);
}

/// An operator maximum of u32::MAX seconds grants u32::MAX without overflowing the clock.
#[test]
fn lifetime_extreme_configurations() {
    let mut h = Harness::with_config(ServerConfig {
        max_lifetime: Duration::from_secs(u32::MAX as u64),
        ..ServerConfig::default()
    });
    let mut c = Client::alice();
    let r = h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(u32::MAX)], relay(1));
    assert_eq!(lifetime_of(&r), u32::MAX);
    let end = h.at(u32::MAX as u64);
    h.server.handle_timeout(end - ONE_NS);
    assert_eq!(h.server.allocation_count(), 1);
    h.server.handle_timeout(end);
    assert_eq!(h.server.allocation_count(), 0);
}

/// Bug: with a default lifetime above the maximum (`--default-lifetime 600
/// --max-lifetime 300`), Allocates and Refreshes without LIFETIME (or Allocates with
/// LIFETIME 0) were granted the default, beyond the operator's maximum. The maximum
/// now wins everywhere.
#[test]
fn regression_default_lifetime_above_max_lifetime() {
    let mut h = Harness::with_config(ServerConfig {
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(300),
        ..ServerConfig::default()
    });
    for (i, asked) in [None, Some(0), Some(1), Some(600), Some(u32::MAX)]
        .into_iter()
        .enumerate()
    {
        let attrs: Vec<Attribute<'_>> = asked.map(Attribute::Lifetime).into_iter().collect();
        let mut c = Client::new(&format!("203.0.113.10:{}", 41_000 + i), "alice", "alice-pw");
        let r = h.allocate_with(h.t0, &mut c, &attrs, relay(10 + i as u16));
        assert_eq!(lifetime_of(&r), 300, "asked {asked:?}");
    }
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(2));
    assert_eq!(lifetime_of(&h.refresh(h.at(1), &mut c, Some(1))), 300);
    assert_eq!(lifetime_of(&h.refresh(h.at(2), &mut c, None)), 300);
    assert_eq!(h.server.allocation(&c.ft).unwrap().expires, h.at(302));
}

/// Bug: configured lifetimes beyond 32 bits of seconds (`--default-lifetime` /
/// `--max-lifetime` 18446744073709551615) overflowed `now + lifetime` (a panic on every
/// Allocate without LIFETIME) and would have been reported truncated to 32 bits. They are
/// now capped at u32::MAX seconds, the largest LIFETIME on the wire.
#[test]
fn regression_lifetime_config_beyond_32_bits() {
    let mut h = Harness::with_config(ServerConfig {
        default_lifetime: Duration::from_secs(u64::MAX),
        max_lifetime: Duration::from_secs(u64::MAX),
        ..ServerConfig::default()
    });
    let mut c = Client::alice();
    let r = h.allocate_with(h.t0, &mut c, &[], relay(1));
    assert_success(&r, Method::Allocate);
    assert_eq!(lifetime_of(&r), u32::MAX);
    assert_eq!(lifetime_of(&h.refresh(h.at(1), &mut c, None)), u32::MAX);
    assert_eq!(lifetime_of(&h.refresh(h.at(2), &mut c, Some(5))), u32::MAX);
    let mut h = Harness::with_config(ServerConfig {
        default_lifetime: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(1 << 40),
        ..ServerConfig::default()
    });
    let mut c = Client::alice();
    let r = h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(u32::MAX)], relay(1));
    assert_eq!(lifetime_of(&r), u32::MAX);
}

/// RFC 8656 §12: a channel binding outlives its permission (600 s against 300 s). Once
/// the permission expires, ChannelData and peer data stop, yet the channel stays bound to
/// its peer (no rebinding to another peer, nor the peer to another number); a new
/// permission resumes the flow on the same channel; when the binding expires, peer data
/// falls back to Data indications and the number is free again.
#[test]
fn permission_expiry_while_the_channel_is_still_bound() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let r = h.allocate_with(h.t0, &mut c, &[Attribute::Lifetime(3600)], relay(1));
    assert_success(&r, Method::Allocate);
    let (p1, p2) = (sa(P1), sa(P2));
    assert_success(&h.channel_bind(h.t0, &mut c, 0x4000, p1), Method::ChannelBind);

    let t = h.at(300) - ONE_NS;
    assert!(matches!(
        h.send(t, c.ft, &channel_data(0x4000, b"x")),
        Outcome::Relay { .. }
    ));
    assert_eq!(
        h.server.handle_peer(t, relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4000)
        }
    );
    h.server.handle_timeout(t);

    let t = h.at(300);
    h.server.handle_timeout(t);
    assert!(matches!(
        h.send(t, c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoPermission)
    ));
    assert_eq!(
        h.server.handle_peer(t, relay(1), p1, 0),
        PeerAction::Drop(DropReason::NoPermission)
    );
    let a = h.server.allocation(&c.ft).unwrap();
    assert!(a.permission_count() == 0, "the permission was purged");
    assert_eq!(
        a.channel(0x4000, t).map(|b| b.peer),
        Some(p1),
        "the channel is still bound"
    );
    // Still bound: neither the number nor the peer can move.
    assert_error(&h.channel_bind(t, &mut c, 0x4000, p2), Method::ChannelBind, 400);
    assert_error(&h.channel_bind(t, &mut c, 0x4001, p1), Method::ChannelBind, 400);

    // A new permission resumes ChannelData on the same channel.
    let t = h.at(400);
    assert_success(&h.create_permission(t, &mut c, &[p1]), Method::CreatePermission);
    assert!(matches!(h.send(t, c.ft, &channel_data(0x4000, b"x")), Outcome::Relay { peer, .. } if peer == p1));
    assert_eq!(
        h.server.handle_peer(t, relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4000)
        }
    );

    // The binding expires at 600; the permission (until 700) still lets data through as
    // Data indications.
    let t = h.at(600);
    h.server.handle_timeout(t);
    assert!(matches!(
        h.send(t, c.ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoChannel)
    ));
    assert_eq!(
        h.server.handle_peer(t, relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: None
        }
    );
    // The number and the peer are free again.
    assert_success(&h.channel_bind(t, &mut c, 0x4000, p2), Method::ChannelBind);
    assert_success(&h.channel_bind(t, &mut c, 0x4001, p1), Method::ChannelBind);
    assert_eq!(
        h.server.handle_peer(t, relay(1), p1, 0),
        PeerAction::Forward {
            five_tuple: c.ft,
            channel: Some(0x4001)
        }
    );
    // Refreshing a binding at 899 also refreshes its permission, to 1199.
    let t = h.at(899);
    assert_success(&h.channel_bind(t, &mut c, 0x4001, p1), Method::ChannelBind);
    assert_eq!(
        h.server.allocation(&c.ft).unwrap().permission(p1.ip()),
        Some(h.at(1199))
    );
}

// ---------------------------------------------------------------------------------------
// Regressions: the timer heap
// ---------------------------------------------------------------------------------------

/// Bug: every request that moved an allocation's next deadline (a CreatePermission
/// refreshing the earliest permission, a Refresh, a ChannelBind) pushed a timer entry and
/// left the superseded one in the heap until its instant passed: an authenticated client
/// refreshing one permission N times in 300 s held N entries (88 bytes each) on the
/// server. The heap now drops superseded entries once they outnumber the allocations.
#[test]
fn regression_timer_heap_grows_with_refreshes() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate_ok(h.t0, &mut c, relay(1));
    for i in 0..3_000u64 {
        let now = h.t0 + Duration::from_millis(i);
        let method = i % 3;
        let r = match method {
            0 => h.create_permission(now, &mut c, &[sa(P1)]),
            1 => h.channel_bind(now, &mut c, 0x4000, sa(P1)),
            _ => h.refresh(now, &mut c, Some(600)),
        };
        assert_eq!(err_code(&r), None);
        let timers = h.server.table_sizes().timers;
        assert!(timers <= 2 + 65, "{timers} timer entries after {i} refreshes");
    }
    // Expiry still happens on time: the permission (last refreshed at 2.997 s).
    h.server.handle_timeout(h.at(303));
    assert!(h.server.allocation(&c.ft).unwrap().permission_count() == 0);
}

/// Bug: an allocation deleted by Refresh LIFETIME 0 left its timer entry in the heap until
/// its original expiry (600 s to an hour later): allocate/delete cycles grew the server by
/// one entry per cycle.
#[test]
fn regression_timer_heap_grows_with_allocate_delete_cycles() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    for i in 0..2_000u64 {
        let now = h.t0 + Duration::from_millis(i);
        h.allocate_ok(now, &mut c, relay((i % 7) as u16));
        let r = h.refresh(now, &mut c, Some(0));
        assert_success(&r, Method::Refresh);
        assert_eq!(h.events().len(), 1);
        let sizes = h.server.table_sizes();
        assert_eq!(sizes.allocations, 0);
        assert!(
            sizes.timers <= 2 + 65,
            "{} timer entries after {i} cycles",
            sizes.timers
        );
    }
}
