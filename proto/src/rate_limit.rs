//! Token buckets for abuse limits, driven by the `Instant`s passed in.
//!
//! [`PrefixLimiter`] keeps one bucket per hash slot of a source prefix (IPv4 /N, IPv6 /M) in
//! a table allocated once, so spoofed sources cannot make it grow: sources whose prefixes
//! share a slot share a bucket. [`TokenBucket`] is the per-allocation bandwidth cap.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Slots in a [`PrefixLimiter`] table (a power of two).
const SLOTS: usize = 16_384;

#[derive(Debug, Clone, Copy)]
struct Slot {
    tokens: f32,
    /// Milliseconds since the limiter's epoch at the last refill (64 bits: a `u32` saturated
    /// after 49.7 days of uptime and the buckets never refilled again).
    last_ms: u64,
}

/// A rate limit per source prefix: `rate` events/s with bursts of `burst`, in a fixed table.
#[derive(Debug, Clone)]
pub struct PrefixLimiter {
    rate: f32,
    burst: f32,
    v4_prefix: u8,
    v6_prefix: u8,
    epoch: Instant,
    slots: Vec<Slot>,
    seed: u64,
}

impl PrefixLimiter {
    /// A limiter of `rate` events per second and `burst` events at once per source prefix
    /// (`v4_prefix` bits of an IPv4 source, `v6_prefix` of an IPv6 one); `seed` keys the
    /// slot hash so that an attacker cannot aim at another source's slot.
    pub fn new(rate: u32, burst: u32, v4_prefix: u8, v6_prefix: u8, epoch: Instant, seed: u64) -> Self {
        let burst = burst.max(1) as f32;
        PrefixLimiter {
            rate: rate as f32,
            burst,
            v4_prefix: v4_prefix.min(32),
            v6_prefix: v6_prefix.min(128),
            epoch,
            slots: vec![
                Slot {
                    tokens: burst,
                    last_ms: 0
                };
                SLOTS
            ],
            seed,
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        let key: u128 = match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let masked = if self.v4_prefix == 0 {
                    0
                } else {
                    bits & (u32::MAX << (32 - self.v4_prefix))
                };
                masked as u128 | (4u128 << 120)
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                if self.v6_prefix == 0 {
                    6
                } else {
                    bits & (u128::MAX << (128 - self.v6_prefix))
                }
            }
        };
        // A keyed multiply-xorshift mix; not cryptographic, but unpredictable without the seed.
        let mut h = (key as u64) ^ ((key >> 64) as u64).rotate_left(29) ^ self.seed;
        h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        (h ^ (h >> 33)) as usize & (SLOTS - 1)
    }

    /// Takes one token for `ip` at `now`; `false` when its bucket is empty.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let now_ms = now
            .saturating_duration_since(self.epoch)
            .as_millis()
            .min(u64::MAX as u128) as u64;
        let i = self.slot(ip);
        let (rate, burst) = (self.rate, self.burst);
        let s = &mut self.slots[i];
        // Capped before the conversion: a bucket idle for days is simply full.
        let elapsed = now_ms.saturating_sub(s.last_ms).min(3_600_000) as f32 / 1000.0;
        s.tokens = (s.tokens + elapsed * rate).min(burst);
        s.last_ms = now_ms;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A byte-rate token bucket for one allocation (both directions together).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(burst_bytes: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst_bytes,
            last: now,
        }
    }

    /// Takes `bytes` at `now` from a bucket refilled at `rate` bytes/s up to `burst` bytes;
    /// `false` (nothing taken) when there are not enough.
    pub fn take(&mut self, bytes: usize, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// Burst allowance of a bandwidth cap: the bytes of `window` at the capped rate.
pub fn burst_for(rate_bytes_per_s: u64, window: Duration) -> f64 {
    (rate_bytes_per_s as f64 * window.as_secs_f64()).max(65_535.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_limiter_limits_a_prefix_and_refills() {
        let t0 = Instant::now();
        let mut l = PrefixLimiter::new(10, 20, 24, 64, t0, 7);
        let a: IpAddr = "203.0.113.5".parse().unwrap();
        let same_prefix: IpAddr = "203.0.113.77".parse().unwrap();
        let allowed = (0..100).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 20, "the burst");
        assert!(!l.allow(same_prefix, t0), "a /24 neighbour shares the bucket");
        // 1 s later: 10 more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| l.allow(a, t1)).count(), 10);
        // Another prefix is unaffected (unless it hashes to the same slot, which with 16k
        // slots and this seed it does not).
        assert!(l.allow("198.51.100.1".parse().unwrap(), t1));
        // IPv6 /64.
        let v6: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6_same: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!((0..30).filter(|_| l.allow(v6, t1)).count(), 20);
        assert!(!l.allow(v6_same, t1));
    }

    /// Defect 1 of the review: milliseconds since start were held in a `u32` that saturated
    /// after 49.7 days, after which no bucket refilled (no 401, Binding or Refresh answered
    /// until restart).
    #[test]
    fn regression_rate_limiter_refills_after_49_7_days() {
        let t0 = Instant::now();
        let mut l = PrefixLimiter::new(10, 20, 32, 64, t0, 7);
        let a: IpAddr = "203.0.113.5".parse().unwrap();
        for days in [1u64, 49, 50, 100] {
            let t = t0 + Duration::from_secs(days * 86_400);
            assert_eq!((0..100).filter(|_| l.allow(a, t)).count(), 20, "burst at day {days}");
            assert!(!l.allow(a, t), "empty at day {days}");
            let later = t + Duration::from_millis(500);
            assert_eq!(
                (0..100).filter(|_| l.allow(a, later)).count(),
                5,
                "refill at day {days}"
            );
        }
    }

    #[test]
    fn token_bucket_caps_bytes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, t0);
        assert!(b.take(600, t0, 1000.0, 1000.0));
        assert!(!b.take(600, t0, 1000.0, 1000.0), "only 400 left");
        assert!(b.take(400, t0, 1000.0, 1000.0));
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(500, t1, 1000.0, 1000.0), "refilled 500 in 0.5 s");
        assert!(!b.take(1, t1, 1000.0, 1000.0));
    }
}
