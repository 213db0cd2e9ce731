//! Long-term credentials (RFC 8489 §9.2), TURN REST API shared secrets, and stateless
//! HMAC nonces.
//!
//! Nothing here keeps per-client state: a nonce carries its own expiry and a MAC over the
//! expiry and the client's IP, so an unauthenticated request costs no memory.

use std::collections::HashMap;
use std::net::IpAddr;

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

/// Where long-term passwords come from: static users and TURN REST API secrets.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, String>,
    userhashes: HashMap<[u8; 32], String>,
    secrets: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
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
    /// rotation). `realm` is needed to index USERHASH values (RFC 8489 §14.4).
    pub fn new(users: impl IntoIterator<Item = (String, String)>, secrets: Vec<String>, realm: &str) -> Self {
        let users: HashMap<String, String> = users.into_iter().collect();
        let userhashes = users.keys().map(|u| (userhash(u, realm), u.clone())).collect();
        Credentials {
            users,
            userhashes,
            secrets,
        }
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
    /// the username has a REST API form whose expiry (unix seconds) is still ahead of `unix_now`.
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
        if !self.secrets.is_empty() && rest_api_expiry(username).is_some_and(|exp| exp > unix_now) {
            for secret in &self.secrets {
                let pw = rest_api_password(secret, username);
                keys.push(LongTermKey::derive(algorithm, username, realm, &pw));
            }
        }
        keys
    }
}

/// The expiry (unix seconds) of a TURN REST API username: `EXPIRY:NAME` as coturn's
/// use-auth-secret writes it, `NAME:EXPIRY`, or a bare `EXPIRY`. `None` when no
/// field is a number.
pub fn rest_api_expiry(username: &str) -> Option<u64> {
    let first = username.split(':').next()?;
    if let Ok(t) = first.parse() {
        return Some(t);
    }
    username.rsplit(':').next()?.parse().ok()
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

/// Issues and checks stateless nonces: `obMatJos2` + features + hex(expiry) + hex(MAC),
/// the MAC being HMAC-SHA256(secret, expiry || client IP) truncated to 12 bytes.
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

/// Length in characters of every nonce this server issues.
pub const NONCE_LEN: usize = NONCE_COOKIE.len() + NONCE_FEATURES.len() + 16 + 24;

impl NonceIssuer {
    /// A nonce issuer with a random `secret` (from the caller) and nonces valid for
    /// `lifetime_secs` seconds.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceIssuer { secret, lifetime_secs }
    }

    fn mac(&self, expiry: u64, ip: IpAddr) -> [u8; 12] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(&expiry.to_be_bytes());
        match ip {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 12];
        out.copy_from_slice(&full[..12]);
        out
    }

    /// A fresh nonce for `client_ip` at unix time `unix_now`.
    pub fn issue(&self, unix_now: u64, client_ip: IpAddr) -> String {
        // Saturating: a `--nonce-lifetime` near u64::MAX must not overflow (a panic in
        // debug builds, an already expired nonce in release builds).
        let expiry = unix_now.saturating_add(self.lifetime_secs);
        let mut s = String::with_capacity(NONCE_LEN);
        s.push_str(NONCE_COOKIE);
        s.push_str(NONCE_FEATURES);
        push_hex(&mut s, &expiry.to_be_bytes());
        push_hex(&mut s, &self.mac(expiry, client_ip));
        s
    }

    /// Checks a nonce presented by `client_ip` at unix time `unix_now`.
    ///
    /// # Errors
    /// [`NonceError::Invalid`] if not issued by this server for this IP,
    /// [`NonceError::Expired`] if issued but expired.
    pub fn check(&self, nonce: &str, unix_now: u64, client_ip: IpAddr) -> Result<(), NonceError> {
        let prefix = NONCE_COOKIE.len() + NONCE_FEATURES.len();
        if nonce.len() != NONCE_LEN || !nonce.starts_with(NONCE_COOKIE) || !nonce.is_ascii() {
            return Err(NonceError::Invalid);
        }
        let mut exp = [0u8; 8];
        let mut mac = [0u8; 12];
        if !parse_hex(&nonce[prefix..prefix + 16], &mut exp) || !parse_hex(&nonce[prefix + 16..], &mut mac) {
            return Err(NonceError::Invalid);
        }
        let expiry = u64::from_be_bytes(exp);
        let want = self.mac(expiry, client_ip);
        // Constant-time comparison.
        if want.iter().zip(mac.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
            return Err(NonceError::Invalid);
        }
        if unix_now >= expiry {
            return Err(NonceError::Expired);
        }
        Ok(())
    }
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
}

fn parse_hex(s: &str, out: &mut [u8]) -> bool {
    let b = s.as_bytes();
    if b.len() != out.len() * 2 {
        return false;
    }
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        match (nib(b[2 * i]), nib(b[2 * i + 1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_round_trip_expiry_and_binding_to_ip() {
        let n = NonceIssuer::new([7; 32], 600);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let nonce = n.issue(1_000, ip);
        assert_eq!(nonce.len(), NONCE_LEN);
        assert!(nonce.starts_with("obMatJos2gAAA"));
        assert_eq!(n.check(&nonce, 1_000, ip), Ok(()));
        assert_eq!(n.check(&nonce, 1_599, ip), Ok(()));
        assert_eq!(n.check(&nonce, 1_600, ip), Err(NonceError::Expired));
        assert_eq!(
            n.check(&nonce, 1_000, "192.0.2.2".parse().unwrap()),
            Err(NonceError::Invalid)
        );
        let other = NonceIssuer::new([8; 32], 600);
        assert_eq!(other.check(&nonce, 1_000, ip), Err(NonceError::Invalid));
        let mut tampered = nonce.clone().into_bytes();
        tampered[20] = if tampered[20] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            n.check(std::str::from_utf8(&tampered).unwrap(), 1_000, ip),
            Err(NonceError::Invalid)
        );
        assert_eq!(n.check("garbage", 1_000, ip), Err(NonceError::Invalid));
        assert_eq!(n.check(&"x".repeat(NONCE_LEN), 1_000, ip), Err(NonceError::Invalid));
    }

    /// Bug: `--nonce-lifetime 18446744073709551615` overflowed `unix_now + lifetime` on the
    /// first 401 and panicked the shard thread (debug builds); release builds wrapped to an
    /// expired nonce, so every request got 438.
    #[test]
    fn regression_nonce_lifetime_overflow() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for lifetime in [u64::MAX, u64::MAX - 1, u64::MAX / 2] {
            let n = NonceIssuer::new([7; 32], lifetime);
            let nonce = n.issue(1_700_000_000, ip);
            assert_eq!(nonce.len(), NONCE_LEN);
            assert_eq!(n.check(&nonce, 1_700_000_000, ip), Ok(()));
        }
    }

    #[test]
    fn rest_api_password_matches_coturn_scheme() {
        // base64(HMAC-SHA1("north", "1700000000:alice")), computed independently with
        // `printf %s 1700000000:alice | openssl dgst -sha1 -hmac north -binary | base64`.
        assert_eq!(
            rest_api_password("north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
        assert_eq!(rest_api_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_api_expiry("alice:1700000000"), Some(1_700_000_000));
        assert_eq!(rest_api_expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(rest_api_expiry("alice"), None);
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
