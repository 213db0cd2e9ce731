//! The only module with `unsafe`: thin wrappers over Linux system calls that std and
//! socket2 do not offer (recvmmsg, sendmmsg, level-triggered epoll with a nanosecond
//! timeout and write interest for streams, setrlimit, getrusage, timer slack). Every block states why it is sound.
//!
//! Everything is IPv4: loadgen drives servers on 127.0.0.0/8 (or 198.18.0.0/15 between
//! network namespaces, bench/xdp.sh).

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::time::Duration;

/// Largest batch for one recvmmsg/sendmmsg call, in datagrams.
pub const MAX_BATCH: usize = 64;

fn to_sockaddr(a: &SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

/// Receive buffers for one recvmmsg call: `MAX_BATCH` datagrams of up to `cap` bytes each.
pub struct RecvBatch {
    cap: usize,
    data: Vec<u8>,
    lens: [usize; MAX_BATCH],
    addrs: [SocketAddrV4; MAX_BATCH],
}

impl RecvBatch {
    /// Buffers for datagrams of up to `cap` bytes.
    pub fn new(cap: usize) -> Self {
        RecvBatch {
            cap,
            data: vec![0; cap * MAX_BATCH],
            lens: [0; MAX_BATCH],
            addrs: [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); MAX_BATCH],
        }
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] and its source address.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddrV4) {
        (&self.data[i * self.cap..i * self.cap + self.lens[i]], self.addrs[i])
    }

    /// Datagram `i` mutably (to echo it back in place).
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * self.cap..i * self.cap + self.lens[i]]
    }

    /// Receives up to `max` (at most [`MAX_BATCH`]) datagrams without blocking. Returns how
    /// many arrived; 0 when none was waiting.
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        self.recv_flags(fd, max, libc::MSG_DONTWAIT)
    }

    /// Like [`RecvBatch::recv`] but on a blocking socket waits for the first datagram
    /// (MSG_WAITFORONE; the socket's SO_RCVTIMEO bounds the wait, then 0 is returned).
    pub fn recv_wait(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        self.recv_flags(fd, max, libc::MSG_WAITFORONE)
    }

    fn recv_flags(&mut self, fd: RawFd, max: usize, flags: libc::c_int) -> io::Result<usize> {
        let max = max.min(MAX_BATCH);
        let mut iov: [MaybeUninit<libc::iovec>; MAX_BATCH] = [const { MaybeUninit::uninit() }; MAX_BATCH];
        let mut names: [MaybeUninit<libc::sockaddr_in>; MAX_BATCH] = [const { MaybeUninit::uninit() }; MAX_BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid value (null pointers, 0 lengths).
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let base = self.data.as_mut_ptr();
        for i in 0..max {
            iov[i].write(libc::iovec {
                // SAFETY: i * cap + cap <= data.len() by construction, so the pointer stays in bounds.
                iov_base: unsafe { base.add(i * self.cap) }.cast(),
                iov_len: self.cap,
            });
            hdrs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = names[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        // SAFETY: hdrs[..max] point at live iovecs, sockaddr storage and data buffers owned by
        // this function or `self`, which outlive the call; the kernel writes at most iov_len bytes
        // per buffer and msg_namelen bytes per name.
        let n = unsafe { libc::recvmmsg(fd, hdrs.as_mut_ptr(), max as libc::c_uint, flags, std::ptr::null_mut()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = (hdrs[i].msg_len as usize).min(self.cap);
            self.addrs[i] = if hdrs[i].msg_hdr.msg_namelen as usize >= std::mem::size_of::<libc::sockaddr_in>() {
                // SAFETY: the kernel filled a sockaddr_in of the length it reported (IPv4 sockets only).
                from_sockaddr(unsafe { names[i].assume_init_ref() })
            } else {
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
            };
        }
        Ok(n)
    }
}

/// Sends `msgs` (buffer, destination; `None` on a connected socket) with one sendmmsg call
/// per [`MAX_BATCH`]. Returns how many the kernel took; stops early on EAGAIN/ENOBUFS.
///
/// # Errors
/// Other send errors (e.g. ECONNREFUSED from an earlier ICMP error on a connected socket);
/// the caller counts them.
pub fn send_batch(fd: RawFd, msgs: &[(&[u8], Option<SocketAddrV4>)]) -> io::Result<usize> {
    let mut done = 0;
    while done < msgs.len() {
        let chunk = &msgs[done..(done + MAX_BATCH).min(msgs.len())];
        let mut iov: [MaybeUninit<libc::iovec>; MAX_BATCH] = [const { MaybeUninit::uninit() }; MAX_BATCH];
        let mut names: [MaybeUninit<libc::sockaddr_in>; MAX_BATCH] = [const { MaybeUninit::uninit() }; MAX_BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is valid.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, (buf, dst)) in chunk.iter().enumerate() {
            iov[i].write(libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            });
            hdrs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
            hdrs[i].msg_hdr.msg_iovlen = 1;
            if let Some(d) = dst {
                names[i].write(to_sockaddr(d));
                hdrs[i].msg_hdr.msg_name = names[i].as_mut_ptr().cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
        }
        // SAFETY: hdrs[..chunk.len()] point at iovecs and names on this stack frame and at the
        // caller's buffers, all alive for the call; the kernel only reads them (iov_base is cast
        // to *mut because the C type demands it).
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), chunk.len() as libc::c_uint, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if done > 0
                || matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR)
                )
            {
                return Ok(done);
            }
            return Err(e);
        }
        done += n as usize;
        if (n as usize) < chunk.len() {
            break;
        }
    }
    Ok(done)
}

/// A level-triggered epoll instance (one per worker thread).
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// A new epoll instance returning up to `capacity` events per wait.
    pub fn new(capacity: usize) -> io::Result<Self> {
        // SAFETY: plain system call with a valid flag.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity],
        })
    }

    /// Watches `fd` for readability (level-triggered), reporting `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for readability and, with `writable`, writability (level-triggered),
    /// reporting `token`: `add` when `fd` is new, else a change of what it is watched for.
    pub fn watch(&self, fd: RawFd, token: u64, writable: bool, add: bool) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | if writable { libc::EPOLLOUT } else { 0 }) as u32,
            u64: token,
        };
        let op = if add { libc::EPOLL_CTL_ADD } else { libc::EPOLL_CTL_MOD };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (before it is closed).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer on kernels after 2.6.9; a failure
        // (fd not registered) is harmless.
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Waits up to `timeout` (nanosecond resolution, epoll_pwait2) and returns the tokens of
    /// ready descriptors.
    pub fn wait(&mut self, timeout: Duration, tokens: &mut Vec<u64>) -> io::Result<()> {
        tokens.clear();
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` has room for `len` entries and `ts` lives across the call; a null
        // sigmask means "do not change it".
        let n = unsafe {
            libc::epoll_pwait2(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                &ts,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        tokens.extend(self.events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own fd and close it once.
        unsafe { libc::close(self.fd) };
    }
}

/// Raises RLIMIT_NOFILE to at least `want` descriptors (raising the hard limit too when
/// running as root, up to fs.nr_open). Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = want.min(nr_open);
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max.max(target),
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(target);
    }
    // Not allowed to raise the hard limit: take what the hard limit allows.
    let capped = libc::rlimit {
        rlim_cur: lim.rlim_max.min(target),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(capped.rlim_cur)
}

/// CPU time this process has used so far: (user, system), in seconds.
pub fn process_cpu_seconds() -> (f64, f64) {
    let mut ru = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct on success; on failure we return zeros without reading it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } < 0 {
        return (0.0, 0.0);
    }
    // SAFETY: initialised by the successful call above.
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

/// Sets this thread's timer slack to 1 ns so that short epoll timeouts (packet pacing) are
/// not rounded up by the default 50 µs.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// The kernel's clock ticks per second (USER_HZ) for /proc CPU times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
