//! The portable backend: epoll for readiness, recvmmsg(2) to receive up to [`BATCH`]
//! datagrams per system call, sendmmsg(2) to send a batch's output per socket. Used where
//! io_uring is disabled (`kernel.io_uring_disabled`, container seccomp profiles).
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use super::{gso, Datagram, IoStats, SocketId, Verdict, HEADROOM, MAX_PAYLOAD};
use crate::sys::{self, RawAddr};

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 64;
/// Bytes per receive slot: headroom plus the largest payload accepted.
const SLOT: usize = HEADROOM + MAX_PAYLOAD;
/// Bytes per reply slot: a Data indication adds at most 48 bytes to a payload.
const REPLY_SLOT: usize = SLOT + 64;
/// recvmmsg rounds per ready socket before moving on (fairness between sockets).
const ROUNDS: usize = 4;
const WAKER: u64 = u64::MAX;
const WATCHED: u64 = u64::MAX - 1;

struct Pending {
    fd: RawFd,
    to: SocketAddr,
    src: Option<IpAddr>,
    addr: RawAddr,
    addr_len: libc::socklen_t,
    ptr: *const u8,
    len: usize,
}

/// epoll + recvmmsg/sendmmsg.
pub struct MmsgIo {
    epfd: RawFd,
    waker: RawFd,
    watch_fired: bool,
    fds: Vec<RawFd>,
    events: Vec<libc::epoll_event>,
    bufs: Vec<u8>,
    reply_bufs: Vec<u8>,
    addrs: Vec<RawAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    pending: Vec<Pending>,
    send_iovs: Vec<libc::iovec>,
    send_hdrs: Vec<libc::mmsghdr>,
    /// Per message of a sendmmsg: its first pending datagram and how many it carries.
    send_msgs: Vec<(usize, usize)>,
    /// Send runs of equal datagrams with UDP GSO.
    gso: bool,
    /// Control data received (the destination address on wildcard sockets).
    controls: Vec<sys::Control>,
    /// Control data sent (the source address on wildcard sockets).
    send_controls: Vec<sys::Control>,
    /// Counters.
    pub stats: IoStats,
}

// SAFETY: the raw pointers inside the iovec/mmsghdr/Pending buffers point into this
// struct's own buffers and are only written and read during one `wait` call on the thread
// that owns the value; between calls they are dead data.
unsafe impl Send for MmsgIo {}

fn zeroed_hdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct; all-zero (null pointers, zero lengths) is valid.
    unsafe { std::mem::zeroed() }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl MmsgIo {
    /// Creates the epoll instance and the wake-up eventfd; `gso` sends runs of equal
    /// datagrams with UDP GSO ([`gso`]).
    ///
    /// # Errors
    /// When the kernel refuses either.
    pub fn new(gso: bool) -> io::Result<Self> {
        // SAFETY: plain system call.
        let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let waker = sys::eventfd()?;
        let mut io = MmsgIo {
            epfd,
            waker,
            watch_fired: false,
            fds: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            bufs: vec![0u8; BATCH * SLOT],
            reply_bufs: vec![0u8; BATCH * REPLY_SLOT],
            addrs: vec![RawAddr::zeroed(); BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            hdrs: (0..BATCH).map(|_| zeroed_hdr()).collect(),
            pending: Vec::with_capacity(BATCH),
            send_iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            send_hdrs: (0..BATCH).map(|_| zeroed_hdr()).collect(),
            send_msgs: Vec::with_capacity(BATCH),
            gso,
            controls: vec![sys::Control::new(); BATCH],
            send_controls: vec![sys::Control::new(); BATCH],
            stats: IoStats::default(),
        };
        sys::prefault(&mut io.bufs);
        sys::prefault(&mut io.reply_bufs);
        io.epoll_add(waker, WAKER)?;
        Ok(io)
    }

    fn epoll_add(&mut self, fd: RawFd, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: `ev` is a valid epoll_event for the call.
        cvt(unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    /// Starts watching `fd` as socket `id`.
    ///
    /// # Errors
    /// When epoll refuses the descriptor.
    pub fn register(&mut self, id: SocketId, fd: RawFd) -> io::Result<()> {
        let i = id as usize;
        if self.fds.len() <= i {
            self.fds.resize(i + 1, -1);
        }
        self.fds[i] = fd;
        self.epoll_add(fd, id as u64)
    }

    /// Watches `fd` for readability (an epoll descriptor of the stream layer): its readiness
    /// ends a wait and sets the flag [`MmsgIo::take_watched`] returns.
    ///
    /// # Errors
    /// When epoll refuses the descriptor.
    pub fn watch(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll_add(fd, WATCHED)
    }

    /// Whether the watched descriptor was readable at the last wait.
    pub fn take_watched(&mut self) -> bool {
        std::mem::take(&mut self.watch_fired)
    }

    /// Stops watching socket `id` (descriptor `fd`).
    pub fn deregister(&mut self, id: SocketId, fd: RawFd) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer on current kernels; a valid one is
        // passed anyway for old ones.
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
        if let Some(slot) = self.fds.get_mut(id as usize) {
            *slot = -1;
        }
    }

    /// The wake-up eventfd.
    pub fn waker(&self) -> RawFd {
        self.waker
    }

    /// See [`super::Io::wait`].
    ///
    /// # Errors
    /// When epoll_wait fails other than by EINTR.
    pub fn wait<F>(&mut self, timeout: Option<Duration>, scratch: &mut Vec<u8>, mut handler: F) -> io::Result<()>
    where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        let ms = match timeout {
            None => -1,
            Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        };
        // SAFETY: `events` is a valid buffer of the length passed.
        let n = unsafe { libc::epoll_wait(self.epfd, self.events.as_mut_ptr(), self.events.len() as i32, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for e in 0..n as usize {
            let data = self.events[e].u64;
            if data == WAKER {
                sys::drain_eventfd(self.waker);
                continue;
            }
            if data == WATCHED {
                self.watch_fired = true;
                continue;
            }
            let id = data as SocketId;
            for _ in 0..ROUNDS {
                let Some(&fd) = self.fds.get(id as usize).filter(|fd| **fd >= 0) else {
                    break;
                };
                let got = self.recv_batch(fd);
                if got == 0 {
                    break;
                }
                self.handle_batch(id, got, scratch, &mut handler);
                self.flush();
                if got < BATCH {
                    break;
                }
            }
        }
        Ok(())
    }

    fn recv_batch(&mut self, fd: RawFd) -> usize {
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                // SAFETY: stays within `bufs` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT + HEADROOM) }.cast(),
                iov_len: MAX_PAYLOAD,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut RawAddr).cast();
            h.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.controls[i].0.as_mut_ptr().cast();
            h.msg_controllen = sys::PKTINFO_SPACE;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by `self` of the stated sizes.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            return 0;
        }
        self.stats.batches += 1;
        r as usize
    }

    fn handle_batch<F>(&mut self, id: SocketId, got: usize, scratch: &mut Vec<u8>, handler: &mut F)
    where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        for i in 0..got {
            self.stats.rx += 1;
            let hdr = &self.hdrs[i];
            if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.stats.truncated += 1;
                continue;
            }
            let len = hdr.msg_len as usize;
            let control_len = hdr.msg_hdr.msg_controllen.min(sys::PKTINFO_SPACE);
            let local = if control_len == 0 {
                None
            } else {
                sys::pktinfo_destination(&self.controls[i].0[..control_len])
            };
            let Some(from) = self.addrs[i].get() else { continue };
            let slot = &mut self.bufs[i * SLOT..(i + 1) * SLOT];
            let slot_ptr = slot.as_ptr();
            let verdict = handler(
                Datagram {
                    socket: id,
                    from,
                    local,
                    buf: slot,
                    len,
                },
                scratch,
            );
            let (socket, to, src, ptr, len) = match verdict {
                Verdict::Drop => continue,
                Verdict::Forward {
                    socket,
                    to,
                    src,
                    start,
                    end,
                } if start <= end && end <= SLOT => {
                    // SAFETY: start..end lies within this slot (checked above).
                    (socket, to, src, unsafe { slot_ptr.add(start) }, end - start)
                }
                Verdict::Forward { .. } => continue,
                Verdict::Reply { socket, to, src } => {
                    let n = scratch.len().min(REPLY_SLOT);
                    let dst = &mut self.reply_bufs[i * REPLY_SLOT..i * REPLY_SLOT + n];
                    dst.copy_from_slice(&scratch[..n]);
                    (socket, to, src, dst.as_ptr(), n)
                }
            };
            let Some(&fd) = self.fds.get(socket as usize).filter(|fd| **fd >= 0) else {
                self.stats.send_errors += 1;
                continue;
            };
            let mut addr = RawAddr::zeroed();
            let addr_len = addr.set(to);
            self.pending.push(Pending {
                fd,
                to,
                src,
                addr,
                addr_len,
                ptr,
                len,
            });
        }
    }

    /// Sends the pending datagrams, one sendmmsg per run of equal source sockets; within it,
    /// runs of equal datagrams to one destination as one GSO message each ([`gso`]).
    fn flush(&mut self) {
        let total = self.pending.len();
        let mut start = 0;
        while start < total {
            let fd = self.pending[start].fd;
            let mut end = start + 1;
            while end < total && self.pending[end].fd == fd {
                end += 1;
            }
            self.send_msgs.clear();
            let mut i = start;
            while i < end {
                let n = if self.gso {
                    gso::run(&self.pending[i..end], |p| (p.to, p.src, p.len))
                } else {
                    1
                };
                let k = self.send_msgs.len();
                // One iovec per datagram: at most BATCH in all, as pending entries are.
                for (d, p) in self.pending[i..i + n].iter().enumerate() {
                    self.send_iovs[i - start + d] = libc::iovec {
                        iov_base: p.ptr as *mut libc::c_void,
                        iov_len: p.len,
                    };
                }
                let p = &mut self.pending[i];
                let h = &mut self.send_hdrs[k].msg_hdr;
                h.msg_name = (&mut p.addr as *mut RawAddr).cast();
                h.msg_namelen = p.addr_len;
                h.msg_iov = &mut self.send_iovs[i - start];
                h.msg_iovlen = n;
                let control = &mut self.send_controls[k];
                let mut control_len = match p.src {
                    Some(ip) => sys::pktinfo_source(ip, control),
                    None => 0,
                };
                if n > 1 {
                    control_len = sys::udp_segment(p.len as u16, control, control_len);
                }
                if control_len == 0 {
                    h.msg_control = std::ptr::null_mut();
                } else {
                    h.msg_control = control.0.as_mut_ptr().cast();
                }
                h.msg_controllen = control_len;
                h.msg_flags = 0;
                self.send_msgs.push((i, n));
                i += n;
            }
            let count = self.send_msgs.len();
            let mut done = 0;
            while done < count {
                // SAFETY: headers `done..count` point at live pending entries and buffers.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.send_hdrs[done..].as_mut_ptr(),
                        (count - done) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    // The first remaining message failed (buffer full, unreachable, or GSO
                    // refused for this route): a GSO message goes again one by one, any
                    // other is dropped.
                    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    let (first, n) = self.send_msgs[done];
                    if n > 1 && errno != libc::EAGAIN {
                        self.stats.gso_fallbacks += 1;
                        self.send_one_by_one(first, n);
                    } else {
                        self.stats.send_errors += n as u64;
                        self.stats.last_send_errno = errno;
                    }
                    done += 1;
                } else {
                    for &(_, n) in &self.send_msgs[done..done + r as usize] {
                        self.stats.tx += n as u64;
                        if n > 1 {
                            self.stats.gso_sends += 1;
                            self.stats.gso_datagrams += n as u64;
                        }
                    }
                    done += r as usize;
                }
            }
            start = end;
        }
        self.pending.clear();
    }

    /// Sends pending datagrams `first..first + n` with one sendmsg each.
    fn send_one_by_one(&mut self, first: usize, n: usize) {
        for p in &self.pending[first..first + n] {
            // SAFETY: the pending entry points into this value's receive or reply buffers,
            // which are not written until the batch is flushed.
            let data = unsafe { std::slice::from_raw_parts(p.ptr, p.len) };
            match sys::send_from(p.fd, data, p.to, p.src) {
                Ok(_) => self.stats.tx += 1,
                Err(e) => {
                    self.stats.send_errors += 1;
                    self.stats.last_send_errno = e.raw_os_error().unwrap_or(0);
                }
            }
        }
    }
}

impl Drop for MmsgIo {
    fn drop(&mut self) {
        sys::close(self.epfd);
        sys::close(self.waker);
    }
}
