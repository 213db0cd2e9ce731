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

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message, bytes.
pub const PKTINFO_SPACE: usize = 64;

/// A control (ancillary data) buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Control(pub [u8; PKTINFO_SPACE]);

impl Control {
    /// All zero.
    pub const fn new() -> Control {
        Control([0; PKTINFO_SPACE])
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new()
    }
}

/// Asks the kernel to report each datagram's destination address (IP_PKTINFO, or
/// IPV6_RECVPKTINFO for an IPv6 socket): for sockets bound to a wildcard address.
///
/// # Errors
/// The kernel's error.
pub fn enable_pktinfo(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    // SAFETY: `on` is a valid c_int for the length given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();

fn cmsg_align(n: usize) -> usize {
    n.div_ceil(std::mem::size_of::<usize>()) * std::mem::size_of::<usize>()
}

/// The destination address of a received datagram, from the IP_PKTINFO or IPV6_PKTINFO
/// control message the kernel wrote into `control` (`None` when there is none).
pub fn pktinfo_destination(control: &[u8]) -> Option<IpAddr> {
    cmsgs(control).find_map(|(level, kind, data)| {
        // in_pktinfo { ipi_ifindex: i32, ipi_spec_dst: in_addr, ipi_addr: in_addr }: the
        // header's destination is ipi_addr.
        if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO && data.len() >= 12 {
            return Some(IpAddr::V4(Ipv4Addr::new(data[8], data[9], data[10], data[11])));
        }
        // in6_pktinfo { ipi6_addr: in6_addr, ipi6_ifindex: u32 }.
        if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO && data.len() >= 16 {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&data[..16]);
            return Some(IpAddr::V6(Ipv6Addr::from(ip)));
        }
        None
    })
}

/// The segment size of a datagram received coalesced by UDP GRO (the UDP_GRO control
/// message, an int, bytes): the payload is datagrams of that size, the last possibly
/// shorter. `None` for a datagram received as sent.
pub fn gro_segment(control: &[u8]) -> Option<usize> {
    cmsgs(control).find_map(|(level, kind, data)| {
        (level == libc::SOL_UDP && kind == libc::UDP_GRO && data.len() >= 4)
            .then(|| i32::from_ne_bytes([data[0], data[1], data[2], data[3]]))
            .filter(|&n| n > 0)
            .map(|n| n as usize)
    })
}

/// The control messages in `control`: (level, type, data). Stops at a malformed header.
fn cmsgs(control: &[u8]) -> impl Iterator<Item = (i32, i32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + CMSG_HDR > control.len() {
            return None;
        }
        let h = &control[at..];
        let len = usize::from_ne_bytes(h[..std::mem::size_of::<usize>()].try_into().ok()?);
        let level = i32::from_ne_bytes(h[8..12].try_into().ok()?);
        let kind = i32::from_ne_bytes(h[12..16].try_into().ok()?);
        if len < CMSG_HDR || at + len > control.len() {
            return None;
        }
        at += cmsg_align(len);
        Some((level, kind, &h[CMSG_HDR..len]))
    })
}

/// Turns on UDP GRO (UDP_GRO, Linux ≥ 5.0) for `fd`: datagrams of one flow that arrive
/// together may be read as one, with [`gro_segment`] telling their size.
///
/// # Errors
/// When the kernel refuses the option.
pub fn set_udp_gro(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid int for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes into `control` the IP_PKTINFO or IPV6_PKTINFO message that makes a datagram
/// leave from source address `src`; returns the control length to pass to the kernel.
pub fn pktinfo_source(src: IpAddr, control: &mut Control) -> usize {
    let c = &mut control.0;
    c.fill(0);
    let (level, kind, data_len) = match src {
        IpAddr::V4(ip) => {
            // ipi_spec_dst selects the source address; ifindex 0 lets routing pick the device.
            c[CMSG_HDR + 4..CMSG_HDR + 8].copy_from_slice(&ip.octets());
            (libc::IPPROTO_IP, libc::IP_PKTINFO, 12)
        }
        IpAddr::V6(ip) => {
            c[CMSG_HDR..CMSG_HDR + 16].copy_from_slice(&ip.octets());
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, 20)
        }
    };
    let len = CMSG_HDR + data_len;
    c[..std::mem::size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    c[8..12].copy_from_slice(&level.to_ne_bytes());
    c[12..16].copy_from_slice(&kind.to_ne_bytes());
    cmsg_align(len)
}

/// Appends a UDP_SEGMENT control message (UDP GSO, Linux ≥ 4.18) at byte `at` of
/// `control` (after an IP_PKTINFO message, or 0): the kernel cuts the datagram's payload into
/// datagrams of `segment` bytes (the last may be shorter), all to the same destination.
/// Returns the control length in bytes including it.
pub fn udp_segment(segment: u16, control: &mut Control, at: usize) -> usize {
    let c = &mut control.0[at..];
    c[..CMSG_HDR + 8].fill(0);
    let len = CMSG_HDR + 2;
    c[..std::mem::size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    c[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
    c[12..16].copy_from_slice(&libc::UDP_SEGMENT.to_ne_bytes());
    c[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&segment.to_ne_bytes());
    at + cmsg_align(len)
}

/// sendmsg(2) of `data` to `to`, from source address `src` when given (IP_PKTINFO), else
/// as the kernel routes it.
///
/// # Errors
/// The kernel's error.
pub fn send_from(fd: RawFd, data: &[u8], to: SocketAddr, src: Option<IpAddr>) -> io::Result<usize> {
    let Some(src) = src else {
        return send_to(fd, data, to);
    };
    let mut raw = RawAddr::zeroed();
    let name_len = raw.set(to);
    let mut control = Control::new();
    let control_len = pktinfo_source(src, &mut control);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct; zero is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = (&mut raw as *mut RawAddr).cast();
    hdr.msg_namelen = name_len;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = control_len;
    // SAFETY: every pointer in `hdr` refers to a live local for the whole call, and the
    // kernel only reads the iovec's buffer.
    let n = unsafe { libc::sendmsg(fd, &hdr, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A non-blocking TCP listener on `addr` with SO_REUSEADDR and SO_REUSEPORT (IPv6 sockets
/// IPv6-only): the shards' listeners on one address, and RFC 6062 relay listeners (whose
/// address:port outgoing Connects bind too).
///
/// # Errors
/// When the socket cannot be made, bound or put to listen.
pub fn tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

#[cfg(test)]
mod pktinfo_tests {
    use super::*;

    #[test]
    fn source_control_message_parses_back_as_destination_layout() {
        // The kernel writes in_pktinfo's ipi_addr for the destination; the sender fills
        // ipi_spec_dst. Check the header fields and lengths against libc's macros.
        let mut c = Control::new();
        let n = pktinfo_source("192.0.2.7".parse().unwrap(), &mut c);
        // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic.
        let (space, len) = unsafe { (libc::CMSG_SPACE(12) as usize, libc::CMSG_LEN(12) as usize) };
        assert_eq!(n, space);
        assert_eq!(usize::from_ne_bytes(c.0[..8].try_into().unwrap()), len);
        assert_eq!(&c.0[CMSG_HDR + 4..CMSG_HDR + 8], &[192, 0, 2, 7]);
        let n6 = pktinfo_source("2001:db8::5".parse().unwrap(), &mut c);
        // SAFETY: as above.
        assert_eq!(n6, unsafe { libc::CMSG_SPACE(20) } as usize);
        // An IPv6 PKTINFO message is read back as the destination.
        assert_eq!(pktinfo_destination(&c.0[..n6]), Some("2001:db8::5".parse().unwrap()));
        // Garbage and empty control data give nothing, never a panic.
        assert_eq!(pktinfo_destination(&[]), None);
        assert_eq!(pktinfo_destination(&[0xFF; 40]), None);
    }
}
