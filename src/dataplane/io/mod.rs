//! Batched UDP I/O backends for a shard: io_uring ([`uring`]) and recvmmsg/sendmmsg with
//! epoll ([`mmsg`]). Chosen at start by probing ([`probe_uring`]), overridable with
//! `--io-backend`.
//!
//! A backend owns the receive buffers. For each datagram it calls the shard's handler with
//! a [`Datagram`] whose buffer keeps [`HEADROOM`] free bytes in front of the payload; the
//! handler answers with a [`Verdict`]. `Forward` sends a range of that same buffer (the
//! payload as received, or with a ChannelData header written into the headroom), so relayed
//! payloads are never copied; `Reply` sends what the handler wrote into the scratch buffer
//! (responses, Data indications). Sends are collected during a batch and submitted once.

pub mod mmsg;
pub mod uring;

pub use crate::stats::IoStats;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use crate::sys;

/// Free bytes in front of every received payload: room for a ChannelData header (4 bytes).
pub const HEADROOM: usize = 4;
/// Bytes of payload a receive buffer holds; longer datagrams are dropped as truncated.
pub const MAX_PAYLOAD: usize = 4096 - HEADROOM;

/// UDP GSO (UDP_SEGMENT, `--no-udp-gso` turns it off): consecutive forwards of a batch from
/// one socket to one destination, of equal length (the last may be shorter), leave in one
/// sendmsg whose payload the kernel cuts back into the same datagrams: one trip through the
/// socket and IP layers for the run instead of one per datagram. A video frame relayed over
/// a channel is such a run. On the wire nothing changes.
pub mod gso {
    use std::net::{IpAddr, SocketAddr};

    /// Datagrams in one GSO send at most (the kernel's UDP_MAX_SEGMENTS is 64 before
    /// Linux 6.2, 128 since).
    pub const MAX_SEGMENTS: usize = 64;
    /// Longest datagram sent with GSO, bytes: segments must fit the path MTU (the kernel
    /// refuses, EMSGSIZE, otherwise), and IPv6 + UDP + 1,400 bytes fit a 1,500-byte MTU.
    /// Longer datagrams go one by one, fragmented by IP as before.
    pub const MAX_SEGMENT: usize = 1400;
    /// Payload bytes in one GSO send at most (one IP datagram's worth).
    pub const MAX_BYTES: usize = 65_000;

    /// One datagram waiting to be sent: destination, source IP (IP_PKTINFO) and length.
    pub type Key = (SocketAddr, Option<IpAddr>, usize);

    /// How many of `items` (all from one socket, in order) leave in the first send: the
    /// first datagram and the ones after it that go to the same destination from the same
    /// source with the same length, ended by a shorter one or the limits above. 1 when GSO
    /// does not apply.
    pub fn run<T>(items: &[T], key: impl Fn(&T) -> Key) -> usize {
        let Some(first) = items.first() else { return 0 };
        let (to, src, seg) = key(first);
        if seg == 0 || seg > MAX_SEGMENT {
            return 1;
        }
        let max = MAX_SEGMENTS.min(MAX_BYTES / seg).min(items.len());
        let mut n = 1;
        while n < max {
            let (t, s, len) = key(&items[n]);
            if t != to || s != src || len == 0 || len > seg {
                break;
            }
            n += 1;
            if len < seg {
                break;
            }
        }
        n
    }

    /// Whether a datagram (`to`, `src`, `len`) joins an open run of `count` datagrams of
    /// `seg` bytes to `run_to` from `run_src` (the run is closed by a shorter datagram).
    pub fn joins(run: Key, count: usize, closed: bool, next: Key) -> bool {
        let (run_to, run_src, seg) = run;
        let (to, src, len) = next;
        !closed
            && to == run_to
            && src == run_src
            && len != 0
            && len <= seg
            && count < MAX_SEGMENTS.min(MAX_BYTES / seg.max(1))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn k(port: u16, len: usize) -> Key {
            (SocketAddr::from(([127, 0, 0, 1], port)), None, len)
        }

        #[test]
        fn runs_of_equal_datagrams_to_one_destination() {
            let id = |x: &Key| *x;
            assert_eq!(run::<Key>(&[], id), 0);
            assert_eq!(run(&[k(1, 100)], id), 1);
            assert_eq!(run(&[k(1, 100), k(1, 100), k(1, 100), k(2, 100)], id), 3);
            // A shorter datagram ends the run and belongs to it; a longer one does not.
            assert_eq!(run(&[k(1, 100), k(1, 100), k(1, 60), k(1, 60)], id), 3);
            assert_eq!(run(&[k(1, 100), k(1, 120)], id), 1);
            // Another source IP is another run.
            let other = (k(1, 100).0, Some("127.0.0.2".parse().unwrap()), 100);
            assert_eq!(run(&[k(1, 100), other], id), 1);
            // Empty and over-long datagrams are sent alone.
            assert_eq!(run(&[k(1, 0), k(1, 0)], id), 1);
            assert_eq!(run(&[k(1, MAX_SEGMENT + 1), k(1, MAX_SEGMENT + 1)], id), 1);
            // At most MAX_SEGMENTS, and at most MAX_BYTES.
            let many = vec![k(1, 10); 100];
            assert_eq!(run(&many, id), MAX_SEGMENTS);
            let big = vec![k(1, MAX_SEGMENT); 100];
            assert_eq!(run(&big, id), MAX_BYTES / MAX_SEGMENT);
        }

        #[test]
        fn joining_an_open_run() {
            assert!(joins(k(1, 100), 1, false, k(1, 100)));
            assert!(joins(k(1, 100), 1, false, k(1, 99)));
            assert!(!joins(k(1, 100), 1, true, k(1, 100)));
            assert!(!joins(k(1, 100), 1, false, k(1, 101)));
            assert!(!joins(k(1, 100), 1, false, k(2, 100)));
            assert!(!joins(k(1, 100), MAX_SEGMENTS, false, k(1, 100)));
        }
    }
}

/// A shard-local socket number.
pub type SocketId = u32;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// The socket it arrived on.
    pub socket: SocketId,
    /// The sender's transport address.
    pub from: SocketAddr,
    /// The address the datagram was sent to, on a socket bound to a wildcard address
    /// (IP_PKTINFO / IPV6_PKTINFO); `None` on other sockets.
    pub local: Option<IpAddr>,
    /// `HEADROOM` free bytes, then the payload, then free space.
    pub buf: &'a mut [u8],
    /// Payload length in bytes.
    pub len: usize,
}

/// What to do with a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to send.
    Drop,
    /// Send `buf[start..end]` of the received buffer from `socket` to `to`.
    Forward {
        /// Socket to send from.
        socket: SocketId,
        /// Destination.
        to: SocketAddr,
        /// Source IP to send from (IP_PKTINFO), for a socket bound to a wildcard address.
        src: Option<IpAddr>,
        /// Start offset in the datagram's buffer.
        start: usize,
        /// End offset in the datagram's buffer.
        end: usize,
    },
    /// Send the handler's scratch output from `socket` to `to`.
    Reply {
        /// Socket to send from.
        socket: SocketId,
        /// Destination.
        to: SocketAddr,
        /// Source IP to send from (IP_PKTINFO), for a socket bound to a wildcard address.
        src: Option<IpAddr>,
    },
}

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring: multishot RecvMsg with a provided buffer ring, batched SendMsg.
    IoUring,
    /// epoll with recvmmsg/sendmmsg.
    Mmsg,
}

impl BackendKind {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::IoUring => "io-uring",
            BackendKind::Mmsg => "mmsg",
        }
    }
}

/// Checks whether this kernel and process may use io_uring with the opcodes the uring
/// backend needs. `Err` says why not (for the one log line at start).
pub fn probe_uring() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err("io_uring is disabled (kernel.io_uring_disabled=2)".into());
        }
    }
    uring::probe()
}

/// A shard's I/O backend.
pub enum Io {
    /// io_uring.
    Uring(Box<uring::UringIo>),
    /// epoll + recvmmsg/sendmmsg.
    Mmsg(Box<mmsg::MmsgIo>),
}

impl Io {
    /// Creates a backend of `kind` with a wake-up eventfd (see [`Io::waker`]); `gso` sends
    /// runs of equal datagrams with UDP GSO (see [`gso`]); `gro` receives coalesced
    /// datagrams with UDP GRO (mmsg only: io_uring's provided buffers, 4 KiB each, cannot
    /// hold a coalesced datagram of up to 64 KiB).
    ///
    /// # Errors
    /// When the kernel refuses the ring, epoll or eventfd; `gro` with io_uring.
    pub fn new(kind: BackendKind, ring_entries: u32, gso: bool, gro: bool) -> io::Result<Io> {
        if gro && kind == BackendKind::IoUring {
            return Err(io::Error::other("UDP GRO needs the mmsg backend"));
        }
        Ok(match kind {
            BackendKind::IoUring => Io::Uring(Box::new(uring::UringIo::new(ring_entries, gso)?)),
            BackendKind::Mmsg => Io::Mmsg(Box::new(mmsg::MmsgIo::new(gso, gro)?)),
        })
    }

    /// Starts receiving on `fd` as socket `id`.
    ///
    /// # Errors
    /// When the kernel refuses.
    pub fn register(&mut self, id: SocketId, fd: RawFd) -> io::Result<()> {
        match self {
            Io::Uring(u) => u.register(id, fd),
            Io::Mmsg(m) => m.register(id, fd),
        }
    }

    /// Watches `fd` (one descriptor per backend: the stream layer's epoll) for readability:
    /// it ends [`Io::wait`], and [`Io::take_watched`] then says so.
    ///
    /// # Errors
    /// When the kernel refuses.
    pub fn watch(&mut self, fd: RawFd) -> io::Result<()> {
        match self {
            Io::Uring(u) => u.watch(fd),
            Io::Mmsg(m) => m.watch(fd),
        }
    }

    /// Whether the watched descriptor became readable since the last call.
    pub fn take_watched(&mut self) -> bool {
        match self {
            Io::Uring(u) => u.take_watched(),
            Io::Mmsg(m) => m.take_watched(),
        }
    }

    /// Stops receiving on socket `id`. The caller may close the socket only once
    /// [`Io::is_released`] says so (io_uring finishes cancelled operations asynchronously).
    pub fn deregister(&mut self, id: SocketId, fd: RawFd) {
        match self {
            Io::Uring(u) => u.deregister(id),
            Io::Mmsg(m) => m.deregister(id, fd),
        }
    }

    /// Whether the backend no longer uses socket `id` after [`Io::deregister`].
    pub fn is_released(&self, id: SocketId) -> bool {
        match self {
            Io::Uring(u) => u.is_released(id),
            Io::Mmsg(_) => true,
        }
    }

    /// The eventfd that wakes [`Io::wait`]; write 8 bytes to it from another thread.
    pub fn waker(&self) -> RawFd {
        match self {
            Io::Uring(u) => u.waker(),
            Io::Mmsg(m) => m.waker(),
        }
    }

    /// Waits up to `timeout` for datagrams (or a wake-up), calls `handler` for each one
    /// received, then submits the sends it asked for.
    ///
    /// # Errors
    /// Only when waiting itself fails.
    pub fn wait<F>(&mut self, timeout: Option<Duration>, scratch: &mut Vec<u8>, handler: F) -> io::Result<()>
    where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        match self {
            Io::Uring(u) => u.wait(timeout, scratch, handler),
            Io::Mmsg(m) => m.wait(timeout, scratch, handler),
        }
    }

    /// Sends `data` from `fd` to `to` outside a batch (responses that complete later, such
    /// as an Allocate finished by the control thread), from source IP `src` when given.
    pub fn send_now(&mut self, fd: RawFd, data: &[u8], to: SocketAddr, src: Option<IpAddr>) {
        send_counted(self.stats_mut(), fd, data, to, src);
    }

    fn stats_mut(&mut self) -> &mut IoStats {
        match self {
            Io::Uring(u) => &mut u.stats,
            Io::Mmsg(m) => &mut m.stats,
        }
    }

    /// The counters.
    pub fn stats(&self) -> IoStats {
        match self {
            Io::Uring(u) => u.stats,
            Io::Mmsg(m) => m.stats,
        }
    }
}

/// Sends one datagram with its own sendmsg, outside a batch, and counts it in `stats` (sent,
/// or refused with its errno).
fn send_counted(stats: &mut IoStats, fd: RawFd, data: &[u8], to: SocketAddr, src: Option<IpAddr>) {
    match sys::send_from(fd, data, to, src) {
        Ok(_) => stats.tx += 1,
        Err(e) => {
            stats.send_errors += 1;
            stats.last_send_errno = e.raw_os_error().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests;
