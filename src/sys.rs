//! Small safe wrappers over the system calls the backends, the control thread and the binary
//! need.
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
        libc::AF_INET if b.len() >= 8 => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7])), port)),
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

/// The calling thread's Linux thread ID (gettid(2)).
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Clock ticks per second of the CPU times in /proc (sysconf(_SC_CLK_TCK)), 100 if unknown.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// A new epoll instance (close-on-exec), owned.
///
/// # Errors
/// When the kernel refuses (descriptor limit).
pub fn epoll_create() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `epoll_ctl(epfd, op, fd)` with `events` and the 64-bit `token`.
///
/// # Errors
/// What the kernel says (EEXIST, ENOENT, ...).
pub fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `epoll_wait` without waiting: fills `events` and returns how many are ready (0 on error).
pub fn epoll_poll(epfd: RawFd, events: &mut [libc::epoll_event]) -> usize {
    let len = events.len().min(i32::MAX as usize) as i32;
    // SAFETY: `events` is a valid buffer of the length passed.
    let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), len, 0) };
    n.max(0) as usize
}
