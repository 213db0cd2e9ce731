//! Configured limits of issue 5 under virtual time, on the harness of `server_tests.rs`:
//! the 401/438 challenge rate and the request rate per source prefix, and the bandwidth cap
//! per allocation and direction.

use super::*;

/// An unauthenticated Allocate from `client`.
fn bare_allocate(client: &str) -> (FiveTuple, Vec<u8>) {
    let c = Client::new(client, "alice", "alice-pw");
    let msg = c.unauthenticated(Method::Allocate, fresh_tid(), &[Attribute::RequestedTransport(17)]);
    (c.ft, msg)
}

#[test]
fn challenges_are_rate_limited_per_source_prefix() {
    let mut h = Harness::with_config(ServerConfig {
        challenge_rate: 10,
        request_rate: 0,
        ..ServerConfig::default()
    });
    let t0 = h.at(0);
    let (ft, msg) = bare_allocate("198.51.100.7:4000");
    let mut answered = 0;
    let mut dropped = 0;
    for _ in 0..100 {
        match h.send(t0, ft, &msg) {
            Outcome::Respond(r) => {
                assert_error(&r, Method::Allocate, 401);
                answered += 1;
            }
            Outcome::Drop(DropReason::RateLimited) => dropped += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((answered, dropped), (20, 80), "a burst of 2 x rate, then silence");
    // Another port of the same address shares the /32 bucket; another address does not.
    let (ft2, msg2) = bare_allocate("198.51.100.7:4001");
    assert!(matches!(h.send(t0, ft2, &msg2), Outcome::Drop(DropReason::RateLimited)));
    let (ft3, msg3) = bare_allocate("198.51.100.8:4000");
    assert!(matches!(h.send(t0, ft3, &msg3), Outcome::Respond(_)));
    // One second later, 10 more.
    let t1 = h.at(1);
    let answered = (0..100)
        .filter(|_| matches!(h.send(t1, ft, &msg), Outcome::Respond(_)))
        .count();
    assert_eq!(answered, 10);
    // Authenticated clients are not held back by the challenge limit of their prefix once
    // they have a nonce: a rate-limited source still gets its Allocate through.
    let mut c = Client::new("198.51.100.9:5000", "alice", "alice-pw");
    h.allocate_ok(t1, &mut c, relay(1));
}

#[test]
fn challenge_rate_groups_sources_by_configured_prefix() {
    let mut h = Harness::with_config(ServerConfig {
        challenge_rate: 5,
        request_rate: 0,
        rate_limit_v4_prefix: 24,
        ..ServerConfig::default()
    });
    let t0 = h.at(0);
    let answered = (0..40)
        .filter(|i| {
            let (ft, msg) = bare_allocate(&format!("198.51.100.{}:4000", i % 200 + 1));
            matches!(h.send(t0, ft, &msg), Outcome::Respond(_))
        })
        .count();
    assert_eq!(answered, 10, "the whole /24 shares one bucket of 2 x 5");
}

#[test]
fn requests_are_rate_limited_per_source() {
    let mut h = Harness::with_config(ServerConfig {
        request_rate: 5,
        challenge_rate: 0,
        ..ServerConfig::default()
    });
    let t0 = h.at(0);
    let ft = five_tuple("203.0.113.50:7000");
    let binding = build(Method::Binding, Class::Request, fresh_tid(), |_| {});
    let answered = (0..50)
        .filter(|_| matches!(h.send(t0, ft, &binding), Outcome::Respond(_)))
        .count();
    assert_eq!(answered, 10);
    assert!(matches!(
        h.send(t0, ft, &binding),
        Outcome::Drop(DropReason::RateLimited)
    ));
    // Indications and ChannelData are not requests: they are not counted here.
    assert!(matches!(
        h.send(t0, ft, &channel_data(0x4000, b"x")),
        Outcome::Drop(DropReason::NoAllocation)
    ));
    let later = h.at(2);
    assert!(matches!(h.send(later, ft, &binding), Outcome::Respond(_)));
}

#[test]
fn bandwidth_cap_drops_and_refills_per_direction() {
    // 1 Mbit/s = 125,000 bytes/s; the bucket holds 100 ms of it, at least 65,535 bytes.
    let mut h = Harness::with_config(ServerConfig {
        max_bitrate: 1_000_000,
        ..ServerConfig::default()
    });
    let t0 = h.at(0);
    let mut c = Client::alice();
    let relayed = relay(7);
    h.allocate_ok(t0, &mut c, relayed);
    let peer = sa("8.8.8.8:4000");
    assert_success(&h.channel_bind(t0, &mut c, 0x4000, peer), Method::ChannelBind);
    let payload = vec![0u8; 1000];
    let cd = channel_data(0x4000, &payload);
    let relayed_count = (0..100)
        .filter(|_| matches!(h.send(t0, c.ft, &cd), Outcome::Relay { .. }))
        .count();
    assert_eq!(relayed_count, 65, "65,535 bytes of burst pass, then the cap drops");
    assert!(matches!(
        h.send(t0, c.ft, &cd),
        Outcome::Drop(DropReason::BandwidthExceeded)
    ));
    // The other direction has its own budget.
    let mut to_client = 0;
    for _ in 0..100 {
        if matches!(
            h.server.handle_peer(t0, relayed, peer, 1000),
            PeerAction::Forward { .. }
        ) {
            to_client += 1;
        }
    }
    assert_eq!(to_client, 65);
    // 100 ms later, 12,500 bytes more on top of the 535 left: 13 datagrams of 1000 bytes.
    let t1 = t0 + Duration::from_millis(100);
    let more = (0..100)
        .filter(|_| matches!(h.send(t1, c.ft, &cd), Outcome::Relay { .. }))
        .count();
    assert_eq!(more, 13);
}

#[test]
fn no_cap_by_default() {
    let mut h = Harness::new();
    let t0 = h.at(0);
    let mut c = Client::alice();
    h.allocate_ok(t0, &mut c, relay(8));
    let peer = sa("8.8.8.8:4000");
    assert_success(&h.channel_bind(t0, &mut c, 0x4000, peer), Method::ChannelBind);
    let cd = channel_data(0x4000, &vec![0u8; 1400]);
    assert!((0..2000).all(|_| matches!(h.send(t0, c.ft, &cd), Outcome::Relay { .. })));
}
