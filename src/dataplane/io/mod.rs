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

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

/// Free bytes in front of every received payload: room for a ChannelData header (4 bytes).
pub const HEADROOM: usize = 4;
/// Bytes of payload a receive buffer holds; longer datagrams are dropped as truncated.
pub const MAX_PAYLOAD: usize = 4096 - HEADROOM;

/// A shard-local socket number.
pub type SocketId = u32;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram<'a> {
    /// The socket it arrived on.
    pub socket: SocketId,
    /// The sender's transport address.
    pub from: SocketAddr,
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
    },
}

/// Counters a backend keeps.
#[derive(Debug, Default, Clone, Copy)]
pub struct IoStats {
    /// Datagrams received.
    pub rx: u64,
    /// Datagrams handed to the kernel for sending.
    pub tx: u64,
    /// Sends the kernel refused (buffer full, unreachable, ...).
    pub send_errors: u64,
    /// The errno of the last refused send (0 if none), to tell the causes apart.
    pub last_send_errno: i32,
    /// Sends made with a plain sendto(2) because every io_uring send slot was in flight.
    pub sync_sends: u64,
    /// Datagrams longer than [`MAX_PAYLOAD`], dropped.
    pub truncated: u64,
    /// Receive or send batches submitted.
    pub batches: u64,
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
    /// Creates a backend of `kind` with a wake-up eventfd (see [`Io::waker`]).
    ///
    /// # Errors
    /// When the kernel refuses the ring, epoll or eventfd.
    pub fn new(kind: BackendKind, ring_entries: u32) -> io::Result<Io> {
        Ok(match kind {
            BackendKind::IoUring => Io::Uring(Box::new(uring::UringIo::new(ring_entries)?)),
            BackendKind::Mmsg => Io::Mmsg(Box::new(mmsg::MmsgIo::new()?)),
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
    /// as an Allocate finished by the control thread).
    pub fn send_now(&mut self, fd: RawFd, data: &[u8], to: SocketAddr) {
        let stats = self.stats_mut();
        if sys::send_to(fd, data, to).is_ok() {
            stats.tx += 1;
        } else {
            stats.send_errors += 1;
        }
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

/// Small safe wrappers over the system calls the backends and the binary need.
pub mod sys {
    #![allow(unsafe_code)]

    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::RawFd;

    /// A socket address in the kernel's layout.
    #[derive(Clone, Copy)]
    #[repr(C)]
    pub union RawAddr {
        /// IPv4.
        pub v4: libc::sockaddr_in,
        /// IPv6.
        pub v6: libc::sockaddr_in6,
    }

    impl RawAddr {
        /// All zero (no family).
        pub const fn zeroed() -> Self {
            // SAFETY: both members are plain C structs for which all-zero bytes are valid.
            unsafe { std::mem::zeroed() }
        }

        /// Writes `addr`; returns the length to pass to the kernel.
        pub fn set(&mut self, addr: SocketAddr) -> libc::socklen_t {
            match addr {
                SocketAddr::V4(a) => {
                    self.v4 = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: a.port().to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(a.ip().octets()),
                        },
                        sin_zero: [0; 8],
                    };
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
                }
                SocketAddr::V6(a) => {
                    self.v6 = libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: a.port().to_be(),
                        sin6_flowinfo: a.flowinfo(),
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.ip().octets(),
                        },
                        sin6_scope_id: a.scope_id(),
                    };
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
                }
            }
        }

        /// Reads the address back; `None` for another family.
        pub fn get(&self) -> Option<SocketAddr> {
            // SAFETY: the family field sits at the same offset in both members, and the
            // member it names is the one the kernel (or `set`) wrote.
            unsafe {
                match self.v4.sin_family as libc::c_int {
                    libc::AF_INET => {
                        let a = self.v4;
                        Some(SocketAddr::V4(SocketAddrV4::new(
                            Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                            u16::from_be(a.sin_port),
                        )))
                    }
                    libc::AF_INET6 => {
                        let a = self.v6;
                        Some(SocketAddr::V6(SocketAddrV6::new(
                            Ipv6Addr::from(a.sin6_addr.s6_addr),
                            u16::from_be(a.sin6_port),
                            a.sin6_flowinfo,
                            a.sin6_scope_id,
                        )))
                    }
                    _ => None,
                }
            }
        }
    }

    /// Parses a sockaddr the kernel wrote into raw bytes (io_uring's recvmsg output).
    pub fn addr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
        if b.len() < 2 {
            return None;
        }
        let family = u16::from_ne_bytes([b[0], b[1]]) as libc::c_int;
        let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
        match family {
            libc::AF_INET if b.len() >= 8 => {
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7])), port))
            }
            libc::AF_INET6 if b.len() >= 28 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[8..24]);
                let scope = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
                let flow = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
                Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope)))
            }
            _ => None,
        }
    }

    /// sendto(2).
    ///
    /// # Errors
    /// The kernel's error.
    pub fn send_to(fd: RawFd, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let mut raw = RawAddr::zeroed();
        let len = raw.set(to);
        // SAFETY: `data` and `raw` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                fd,
                data.as_ptr().cast(),
                data.len(),
                0,
                (&raw as *const RawAddr).cast(),
                len,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// A non-blocking eventfd.
    ///
    /// # Errors
    /// The kernel's error.
    pub fn eventfd() -> io::Result<RawFd> {
        // SAFETY: plain system call without pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(fd)
        }
    }

    /// Adds 1 to an eventfd (wakes its reader).
    pub fn wake(fd: RawFd) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }

    /// Resets an eventfd's counter.
    pub fn drain_eventfd(fd: RawFd) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }

    /// Writes one byte per page of `buf` so the kernel backs it now: a backend's fixed
    /// buffers are then part of the resident memory from the start instead of growing it
    /// during the first burst that reaches them.
    pub fn prefault(buf: &mut [u8]) {
        for i in (0..buf.len()).step_by(4096) {
            // SAFETY: `i` is in bounds; volatile so the write is not elided for zeroed memory.
            unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(i), 0) };
        }
    }

    /// close(2).
    pub fn close(fd: RawFd) {
        // SAFETY: the caller owns `fd`.
        unsafe { libc::close(fd) };
    }

    /// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit.
    pub fn raise_nofile_limit() -> u64 {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for both calls.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return 0;
            }
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur
    }
}
