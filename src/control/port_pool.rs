//! The pool of relay ports for one relay IP (RFC 8656 §7.2: the server picks the port of a
//! relayed transport address).

use std::collections::VecDeque;

/// Free relay ports in a random order, taken from the front and returned to the back, so a
/// released port is reused as late as possible. A port can also be taken out of order
/// (for EVEN-PORT reservations); the queue then keeps a stale entry that is skipped later,
/// so every operation is O(1) amortised.
#[derive(Debug, Clone)]
pub struct PortPool {
    min: u16,
    queue: VecDeque<u16>,
    free: Vec<bool>,
    in_use: usize,
}

impl PortPool {
    /// All ports in `min..=max`, shuffled with `seed`.
    pub fn new(min: u16, max: u16, seed: u64) -> Self {
        let mut ports: Vec<u16> = (min..=max).collect();
        let mut x = seed | 1;
        for i in (1..ports.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ports.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let free = vec![true; ports.len()];
        PortPool {
            min,
            queue: ports.into(),
            free,
            in_use: 0,
        }
    }

    fn slot(&self, port: u16) -> Option<usize> {
        let i = port.checked_sub(self.min)? as usize;
        (i < self.free.len()).then_some(i)
    }

    fn is_free(&self, port: u16) -> bool {
        self.slot(port).is_some_and(|i| self.free[i])
    }

    /// Takes `port` if it is free.
    pub fn take_specific(&mut self, port: u16) -> bool {
        match self.slot(port) {
            Some(i) if self.free[i] => {
                self.free[i] = false;
                self.in_use += 1;
                true
            }
            _ => false,
        }
    }

    /// Takes a free port (an even one when `even`; an even one whose successor is free too,
    /// taking both, when `pair`), looking at no more than `tries` candidates.
    pub fn take(&mut self, even: bool, pair: bool, tries: usize) -> Option<u16> {
        let mut looked = 0;
        while looked < tries {
            let p = self.queue.pop_front()?;
            if !self.is_free(p) {
                continue; // stale entry of a port taken out of order
            }
            looked += 1;
            let fits = if pair {
                p % 2 == 0 && p < u16::MAX && self.is_free(p + 1)
            } else {
                !even || p % 2 == 0
            };
            if fits {
                self.take_specific(p);
                if pair {
                    self.take_specific(p + 1);
                }
                return Some(p);
            }
            self.queue.push_back(p);
        }
        None
    }

    /// Returns a port to the pool. Ports outside the range or already free are ignored.
    pub fn put(&mut self, port: u16) {
        if let Some(i) = self.slot(port) {
            if !self.free[i] {
                self.free[i] = true;
                self.in_use -= 1;
                self.queue.push_back(port);
            }
        }
    }

    /// Ports currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Ports in the range.
    pub fn total(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_every_port_once_and_accounts() {
        let mut p = PortPool::new(50000, 50099, 42);
        let mut seen = std::collections::HashSet::new();
        while let Some(port) = p.take(false, false, 1) {
            assert!((50000..=50099).contains(&port));
            assert!(seen.insert(port), "port {port} handed out twice");
        }
        assert_eq!(seen.len(), 100);
        assert_eq!(p.in_use(), 100);
        for &port in &seen {
            p.put(port);
            p.put(port); // double release is ignored
        }
        assert_eq!(p.in_use(), 0);
        let e = p.take(true, false, 100).unwrap();
        assert_eq!(e % 2, 0);
    }

    #[test]
    fn pairs_and_out_of_order_takes_never_hand_out_a_port_twice() {
        let mut p = PortPool::new(40000, 40063, 7);
        let mut held = std::collections::HashSet::new();
        for round in 0..2000u32 {
            match round % 4 {
                0 => {
                    if let Some(a) = p.take(true, true, 64) {
                        assert_eq!(a % 2, 0);
                        assert!(held.insert(a) && held.insert(a + 1));
                    }
                }
                1 => {
                    if let Some(a) = p.take(false, false, 64) {
                        assert!(held.insert(a));
                    }
                }
                _ => {
                    if let Some(&a) = held.iter().nth(round as usize % held.len().max(1)) {
                        held.remove(&a);
                        p.put(a);
                    }
                }
            }
            assert_eq!(p.in_use(), held.len());
        }
        assert!(!p.take_specific(39999) && !p.take_specific(40064));
    }
}
