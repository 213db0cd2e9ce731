//! Long-term credentials (RFC 8489 §9.2), TURN REST API shared secrets, and stateless
//! HMAC nonces.
//!
//! Nothing here keeps per-client state: a nonce carries its own expiry and a MAC over the
//! expiry and the client's IP, so an unauthenticated request costs no memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::stun::integrity::{userhash, LongTermKey};
use super::stun::PasswordAlgorithm;

/// The nonce cookie that announces a security feature set (RFC 8489 §9.2).
pub const NONCE_COOKIE: &str = "obMatJos2";
/// The encoded security feature set this server announces: "Password algorithms" (bit 0).
pub const NONCE_FEATURES: &str = "gAAA";

/// Where a TURN REST API username carries its expiry (unix seconds).
///
/// coturn's `use-auth-secret` and the REST API draft put the timestamp first
/// (`EXPIRY:NAME`), the default. Issuers that write `NAME:EXPIRY` must say so: guessing
/// per username is ambiguous (`<far future>:evil:<past>` signed by a `NAME:EXPIRY` issuer
/// would never expire if the first numeric field were taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestUsernameOrder {
    /// `EXPIRY` or `EXPIRY:NAME`: the field before the first `:`.
    #[default]
    ExpiryFirst,
    /// `EXPIRY` or `NAME:EXPIRY`: the field after the last `:`.
    ExpiryLast,
}

/// How TURN REST API usernames are read: where the expiry is, and how far ahead of now it
/// may lie (a sanity cap: an expiry of 2^64-1 is a credential that never expires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestPolicy {
    /// Where the expiry is.
    pub order: RestUsernameOrder,
    /// Longest accepted time between now and the expiry, seconds; later expiries are
    /// refused like expired ones (401).
    pub max_ahead_secs: u64,
}

/// Default [`RestPolicy::max_ahead_secs`]: 7 days (issuers hand out 1-day credentials).
pub const DEFAULT_REST_MAX_AHEAD_SECS: u64 = 7 * 86_400;

impl Default for RestPolicy {
    fn default() -> Self {
        RestPolicy {
            order: RestUsernameOrder::ExpiryFirst,
            max_ahead_secs: DEFAULT_REST_MAX_AHEAD_SECS,
        }
    }
}

impl RestPolicy {
    /// The expiry (unix seconds) of a TURN REST API username under this policy; `None`
    /// when the field is not a decimal number.
    pub fn expiry(&self, username: &str) -> Option<u64> {
        let field = match self.order {
            RestUsernameOrder::ExpiryFirst => username.split(':').next()?,
            RestUsernameOrder::ExpiryLast => username.rsplit(':').next()?,
        };
        if field.is_empty() || field.len() > 20 || !field.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        field.parse().ok()
    }

    /// Whether a username with this expiry is valid at `unix_now`: not expired, and not
    /// further ahead than [`RestPolicy::max_ahead_secs`].
    pub fn accepts(&self, username: &str, unix_now: u64) -> bool {
        self.expiry(username)
            .is_some_and(|exp| exp > unix_now && exp - unix_now <= self.max_ahead_secs)
    }
}

/// Where long-term passwords come from: static users and TURN REST API secrets.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, String>,
    userhashes: HashMap<[u8; 32], String>,
    secrets: Vec<String>,
    rest: RestPolicy,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
            .field("rest", &self.rest)
            .finish()
    }
}

/// A user whose credentials checked out, with the key that verified the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The USERNAME (for USERHASH requests, the name it resolved to).
    pub username: String,
    /// The long-term key; responses are protected with it.
    pub key: LongTermKey,
}

impl Credentials {
    /// Static users (`name`, `password`) and REST API shared secrets (all accepted, for
    /// rotation), with the default [`RestPolicy`]. `realm` is needed to index USERHASH
    /// values (RFC 8489 §14.4).
    pub fn new(users: impl IntoIterator<Item = (String, String)>, secrets: Vec<String>, realm: &str) -> Self {
        let users: HashMap<String, String> = users.into_iter().collect();
        let userhashes = users.keys().map(|u| (userhash(u, realm), u.clone())).collect();
        Credentials {
            users,
            userhashes,
            secrets,
            rest: RestPolicy::default(),
        }
    }

    /// The same credentials reading REST API usernames with `policy`.
    pub fn with_rest_policy(mut self, policy: RestPolicy) -> Self {
        self.rest = policy;
        self
    }

    /// Whether no user and no secret is configured (every Allocate then fails with 401).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.secrets.is_empty()
    }

    /// The user name behind a USERHASH, static users only.
    pub fn username_for_hash(&self, hash: &[u8; 32]) -> Option<&str> {
        self.userhashes.get(hash).map(String::as_str)
    }

    /// The candidate keys for `username`: the static user's, then one per REST secret when
    /// the username's expiry (read by the [`RestPolicy`]) is valid at `unix_now`.
    pub fn candidate_keys(
        &self,
        username: &str,
        realm: &str,
        algorithm: PasswordAlgorithm,
        unix_now: u64,
    ) -> Vec<LongTermKey> {
        let mut keys = Vec::new();
        if let Some(pw) = self.users.get(username) {
            keys.push(LongTermKey::derive(algorithm, username, realm, pw));
        }
        if !self.secrets.is_empty() && self.rest.accepts(username, unix_now) {
            for secret in &self.secrets {
                let pw = rest_api_password(secret, username);
                keys.push(LongTermKey::derive(algorithm, username, realm, &pw));
            }
        }
        keys
    }
}

/// The TURN REST API password for `username`: base64(HMAC-SHA1(secret, username)).
pub fn rest_api_password(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Why a nonce was refused. Both answer 438 Stale Nonce with a fresh nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    /// Well-formed and ours, but past its expiry.
    Expired,
    /// Not a nonce this server issued to this client IP.
    Invalid,
}

/// Issues and checks stateless nonces: `obMatJos2` + features + base64url(expiry || MAC), the
/// expiry as 32-bit unix seconds, the MAC being HMAC-SHA256(secret, expiry || client IP ||
/// client port) truncated to 8 bytes (forging one takes ~2^63 online guesses, each answered
/// at most at the challenge rate). 29 characters: short, because the 401 that carries it goes
/// to unauthenticated senders (amplification).
///
/// RFC 8489 §9.2.4: "The server MUST NOT choose the same NONCE for two requests unless they
/// have the same source IP address and port." The MAC covers both, so a request captured on
/// one port and replayed from another gets 438.
#[derive(Clone)]
pub struct NonceIssuer {
    secret: [u8; 32],
    lifetime_secs: u64,
}

impl std::fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

/// Bytes of the nonce MAC.
const NONCE_MAC_LEN: usize = 8;

/// Length in characters of every nonce this server issues (29: with the 4-byte attribute
/// header and 3 bytes of padding a NONCE attribute is 36 bytes).
pub const NONCE_LEN: usize = NONCE_COOKIE.len() + NONCE_FEATURES.len() + 16;

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

impl NonceIssuer {
    /// A nonce issuer with a random `secret` (from the caller) and nonces valid for
    /// `lifetime_secs` seconds.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceIssuer { secret, lifetime_secs }
    }

    fn mac(&self, expiry: u32, client: SocketAddr) -> [u8; NONCE_MAC_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(&expiry.to_be_bytes());
        match client.ip() {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; NONCE_MAC_LEN];
        out.copy_from_slice(&full[..NONCE_MAC_LEN]);
        out
    }

    /// A fresh nonce for the client transport address `client` at unix time `unix_now`.
    pub fn issue(&self, unix_now: u64, client: SocketAddr) -> String {
        // Saturating: a `--nonce-lifetime` near u64::MAX must not overflow (a panic in
        // debug builds, an already expired nonce in release builds). The expiry has 32 bits
        // (unix seconds, good until 2106).
        let expiry = unix_now.saturating_add(self.lifetime_secs).min(u32::MAX as u64) as u32;
        let mut s = String::with_capacity(NONCE_LEN);
        s.push_str(NONCE_COOKIE);
        s.push_str(NONCE_FEATURES);
        let mut blob = [0u8; 12];
        blob[..4].copy_from_slice(&expiry.to_be_bytes());
        blob[4..].copy_from_slice(&self.mac(expiry, client));
        push_b64(&mut s, &blob);
        s
    }

    /// Checks a nonce presented by the client transport address `client` at unix time
    /// `unix_now`.
    ///
    /// # Errors
    /// [`NonceError::Invalid`] if not issued by this server for this IP and port,
    /// [`NonceError::Expired`] if issued but expired.
    pub fn check(&self, nonce: &str, unix_now: u64, client: SocketAddr) -> Result<(), NonceError> {
        let prefix = NONCE_COOKIE.len() + NONCE_FEATURES.len();
        if nonce.len() != NONCE_LEN || !nonce.starts_with(NONCE_COOKIE) || !nonce.is_ascii() {
            return Err(NonceError::Invalid);
        }
        let mut blob = [0u8; 12];
        if !parse_b64(&nonce[prefix..], &mut blob) {
            return Err(NonceError::Invalid);
        }
        let expiry = u32::from_be_bytes(blob[..4].try_into().expect("4 bytes"));
        let mac = &blob[4..];
        let want = self.mac(expiry, client);
        // Constant-time comparison.
        if want.iter().zip(mac.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
            return Err(NonceError::Invalid);
        }
        if unix_now >= expiry as u64 {
            return Err(NonceError::Expired);
        }
        Ok(())
    }
}

/// Appends base64url (no padding) of `bytes`, whose length is a multiple of 3.
fn push_b64(s: &mut String, bytes: &[u8]) {
    for c in bytes.chunks_exact(3) {
        let n = (c[0] as u32) << 16 | (c[1] as u32) << 8 | c[2] as u32;
        for shift in [18, 12, 6, 0] {
            s.push(B64URL[(n >> shift) as usize & 63] as char);
        }
    }
}

/// Parses base64url (no padding) into `out`, whose length is a multiple of 3.
fn parse_b64(s: &str, out: &mut [u8]) -> bool {
    let b = s.as_bytes();
    if b.len() != out.len() / 3 * 4 {
        return false;
    }
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some((c - b'A') as u32),
            b'a'..=b'z' => Some((c - b'a') as u32 + 26),
            b'0'..=b'9' => Some((c - b'0') as u32 + 52),
            b'-' => Some(62),
            b'_' => Some(63),
            _ => None,
        }
    }
    for (chunk, o) in b.chunks_exact(4).zip(out.chunks_exact_mut(3)) {
        let mut n = 0u32;
        for &c in chunk {
            match val(c) {
                Some(v) => n = n << 6 | v,
                None => return false,
            }
        }
        o.copy_from_slice(&n.to_be_bytes()[1..]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nonce_round_trip_expiry_and_binding_to_ip() {
        let n = NonceIssuer::new([7; 32], 600);
        let client = addr("192.0.2.1:5000");
        let nonce = n.issue(1_000, client);
        assert_eq!(nonce.len(), NONCE_LEN);
        assert!(nonce.starts_with("obMatJos2gAAA"));
        assert_eq!(n.check(&nonce, 1_000, client), Ok(()));
        assert_eq!(n.check(&nonce, 1_599, client), Ok(()));
        assert_eq!(n.check(&nonce, 1_600, client), Err(NonceError::Expired));
        assert_eq!(n.check(&nonce, 1_000, addr("192.0.2.2:5000")), Err(NonceError::Invalid));
        let other = NonceIssuer::new([8; 32], 600);
        assert_eq!(other.check(&nonce, 1_000, client), Err(NonceError::Invalid));
        for i in 13..NONCE_LEN {
            let mut tampered = nonce.clone().into_bytes();
            tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(
                n.check(std::str::from_utf8(&tampered).unwrap(), 1_000, client),
                Err(NonceError::Invalid),
                "byte {i}"
            );
        }
        assert_eq!(n.check("garbage", 1_000, client), Err(NonceError::Invalid));
        assert_eq!(n.check(&"x".repeat(NONCE_LEN), 1_000, client), Err(NonceError::Invalid));
    }

    /// Defect 2 of the review: the nonce was bound to the client IP only, so two source
    /// ports got the same NONCE (RFC 8489 §9.2.4: "The server MUST NOT choose the same
    /// NONCE for two requests unless they have the same source IP address and port").
    #[test]
    fn regression_nonce_bound_to_ip_and_port() {
        let n = NonceIssuer::new([7; 32], 600);
        let a = addr("192.0.2.1:5000");
        let b = addr("192.0.2.1:5001");
        assert_ne!(n.issue(1_000, a), n.issue(1_000, b));
        assert_eq!(n.check(&n.issue(1_000, a), 1_000, b), Err(NonceError::Invalid));
        let v6 = addr("[2001:db8::1]:5000");
        let v6b = addr("[2001:db8::1]:5001");
        assert_eq!(n.check(&n.issue(1_000, v6), 1_000, v6b), Err(NonceError::Invalid));
        assert_eq!(n.check(&n.issue(1_000, v6), 1_000, v6), Ok(()));
    }

    /// Bug: `--nonce-lifetime 18446744073709551615` overflowed `unix_now + lifetime` on the
    /// first 401 and panicked the shard thread (debug builds); release builds wrapped to an
    /// expired nonce, so every request got 438.
    #[test]
    fn regression_nonce_lifetime_overflow() {
        let client = addr("192.0.2.1:5000");
        for lifetime in [u64::MAX, u64::MAX - 1, u64::MAX / 2] {
            let n = NonceIssuer::new([7; 32], lifetime);
            let nonce = n.issue(1_700_000_000, client);
            assert_eq!(nonce.len(), NONCE_LEN);
            assert_eq!(n.check(&nonce, 1_700_000_000, client), Ok(()));
        }
    }

    /// Defect 7 of the review: the first numeric `:` field was taken as the expiry, so
    /// `<far future>:evil:<past>` signed by a `NAME:EXPIRY` issuer never expired, and an
    /// expiry of 2^64-1 was honoured.
    #[test]
    fn regression_rest_username_unambiguous_and_capped() {
        let now = 1_700_000_000u64;
        let first = RestPolicy::default();
        let last = RestPolicy {
            order: RestUsernameOrder::ExpiryLast,
            ..RestPolicy::default()
        };
        let evil = format!("{}:evil:{}", now + 86_400, now - 10);
        assert!(
            !last.accepts(&evil, now),
            "a NAME:EXPIRY issuer's expiry is the last field"
        );
        assert_eq!(last.expiry(&evil), Some(now - 10));
        assert_eq!(first.expiry(&evil), Some(now + 86_400));
        // NAME:EXPIRY is not read by the default (timestamp first) policy.
        assert_eq!(first.expiry(&format!("alice:{}", now + 60)), None);
        assert!(first.accepts(&format!("{}:alice", now + 60), now));
        // Far-future and absurd expiries are refused.
        assert!(!first.accepts(&format!("{}:alice", u64::MAX), now));
        assert!(!first.accepts(&format!("{}:alice", now + 8 * 86_400), now));
        assert!(first.accepts(&format!("{}:alice", now + 7 * 86_400), now));
        assert_eq!(first.expiry("+5:alice"), None, "digits only");
        assert_eq!(first.expiry(":alice"), None);
        let c = Credentials::new(vec![], vec!["s".into()], "realm");
        assert!(c
            .candidate_keys(&format!("{}:bob", u64::MAX), "realm", PasswordAlgorithm::Md5, now)
            .is_empty());
    }

    #[test]
    fn rest_api_password_matches_coturn_scheme() {
        // base64(HMAC-SHA1("north", "1700000000:alice")), computed independently with
        // `printf %s 1700000000:alice | openssl dgst -sha1 -hmac north -binary | base64`.
        assert_eq!(
            rest_api_password("north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
        let p = RestPolicy::default();
        assert_eq!(p.expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(p.expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(p.expiry("alice"), None);
    }

    #[test]
    fn candidate_keys_static_and_rest() {
        let c = Credentials::new(
            [("alice".to_string(), "pw".to_string())],
            vec!["s1".into(), "s2".into()],
            "realm",
        );
        assert_eq!(c.candidate_keys("alice", "realm", PasswordAlgorithm::Md5, 0).len(), 1);
        assert_eq!(
            c.candidate_keys("2000:bob", "realm", PasswordAlgorithm::Md5, 1_000)
                .len(),
            2
        );
        assert!(c
            .candidate_keys("2000:bob", "realm", PasswordAlgorithm::Md5, 2_000)
            .is_empty());
        assert!(c
            .candidate_keys("mallory", "realm", PasswordAlgorithm::Md5, 0)
            .is_empty());
        assert_eq!(c.username_for_hash(&userhash("alice", "realm")), Some("alice"));
    }
}
