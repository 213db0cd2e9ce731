//! The portable backend: epoll for readiness, recvmmsg(2) to receive up to [`BATCH`]
//! datagrams per system call, sendmmsg(2) to send a batch's output per socket. Used where
//! io_uring is disabled (`kernel.io_uring_disabled`, container seccomp profiles).
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use super::{gso, send_counted, Datagram, IoStats, SocketId, Verdict, HEADROOM, MAX_PAYLOAD};
use crate::sys::{self, RawAddr};

/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 64;
/// Bytes per receive slot: headroom plus the largest payload accepted.
const SLOT: usize = HEADROOM + MAX_PAYLOAD;
/// Bytes per reply slot: a Data indication adds at most 48 bytes to a payload.
const REPLY_SLOT: usize = SLOT + 64;
/// With UDP GRO, bytes after each receive slot for the rest of a coalesced datagram (the
/// kernel coalesces up to 64 datagrams, at most 64 KiB of payload).
const GRO_EXTRA: usize = (64 << 10) - MAX_PAYLOAD;
/// With UDP GRO, segment slots: datagrams split out of coalesced ones, waiting for the flush.
const SEGMENT_SLOTS: usize = 256;
/// Sends queued per flush at most: one per received datagram, plus one per segment slot.
const PENDING_MAX: usize = BATCH + SEGMENT_SLOTS;
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
    /// Receive coalesced datagrams (UDP GRO): `gro_extra` continues each receive slot, and
    /// each datagram of a coalesced one is copied into a slot of `segments` to be handled.
    gro: bool,
    gro_extra: Vec<u8>,
    segments: Vec<u8>,
    /// Segment slots in use since the last flush.
    segments_used: usize,
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
    /// datagrams with UDP GSO ([`gso`]); `gro` turns on UDP GRO on every socket registered
    /// and receives coalesced datagrams (4 MiB more address space, touched as coalesced
    /// datagrams arrive).
    ///
    /// # Errors
    /// When the kernel refuses either.
    pub fn new(gso: bool, gro: bool) -> io::Result<Self> {
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
                2 * BATCH
            ],
            hdrs: (0..BATCH).map(|_| zeroed_hdr()).collect(),
            pending: Vec::with_capacity(PENDING_MAX),
            send_iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                PENDING_MAX
            ],
            send_hdrs: (0..PENDING_MAX).map(|_| zeroed_hdr()).collect(),
            send_msgs: Vec::with_capacity(PENDING_MAX),
            gso,
            gro,
            gro_extra: if gro { vec![0u8; BATCH * GRO_EXTRA] } else { Vec::new() },
            segments_used: 0,
            segments: if gro {
                vec![0u8; SEGMENT_SLOTS * SLOT]
            } else {
                Vec::new()
            },
            controls: vec![sys::Control::new(); BATCH],
            send_controls: vec![sys::Control::new(); PENDING_MAX],
            stats: IoStats::default(),
        };
        sys::prefault(&mut io.bufs);
        sys::prefault(&mut io.reply_bufs);
        sys::prefault(&mut io.segments);
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

    /// Starts watching `fd` as socket `id` (with UDP GRO on when the backend receives
    /// coalesced datagrams).
    ///
    /// # Errors
    /// When epoll refuses the descriptor, or the kernel UDP_GRO.
    pub fn register(&mut self, id: SocketId, fd: RawFd) -> io::Result<()> {
        if self.gro {
            sys::set_udp_gro(fd)?;
        }
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
        let extra = self.gro_extra.as_mut_ptr();
        let iovs = if self.gro { 2 } else { 1 };
        for i in 0..BATCH {
            self.iovs[2 * i] = libc::iovec {
                // SAFETY: stays within `bufs` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT + HEADROOM) }.cast(),
                iov_len: MAX_PAYLOAD,
            };
            if self.gro {
                self.iovs[2 * i + 1] = libc::iovec {
                    // SAFETY: stays within `gro_extra` (BATCH * GRO_EXTRA bytes with GRO).
                    iov_base: unsafe { extra.add(i * GRO_EXTRA) }.cast(),
                    iov_len: GRO_EXTRA,
                };
            }
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut RawAddr).cast();
            h.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[2 * i];
            h.msg_iovlen = iovs;
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
            let hdr = &self.hdrs[i];
            let len = hdr.msg_len as usize;
            let control_len = hdr.msg_hdr.msg_controllen.min(sys::PKTINFO_SPACE);
            let control = &self.controls[i].0[..control_len];
            let segment = if self.gro { sys::gro_segment(control) } else { None };
            if let Some(segment) = segment.filter(|&n| n < len) {
                self.handle_coalesced(i, id, len, segment, scratch, handler);
                continue;
            }
            self.stats.rx += 1;
            if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > MAX_PAYLOAD {
                self.stats.truncated += 1;
                continue;
            }
            let local = if control_len == 0 {
                None
            } else {
                sys::pktinfo_destination(control)
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
            self.queue(socket, to, src, ptr, len);
        }
    }

    /// Queues `len` bytes at `ptr` (in a receive, reply or segment slot) for the flush.
    fn queue(&mut self, socket: SocketId, to: SocketAddr, src: Option<IpAddr>, ptr: *const u8, len: usize) {
        let Some(&fd) = self.fds.get(socket as usize).filter(|fd| **fd >= 0) else {
            self.stats.send_errors += 1;
            return;
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

    /// Handles received message `i`, `len` bytes coalesced by UDP GRO from datagrams of
    /// `segment` bytes (the last may be shorter): each is copied into a segment slot, with
    /// headroom, and handled as received. When the segment slots run short, the sends queued
    /// so far are flushed, which frees them; a reply is sent at once (the reply slot is per
    /// message).
    fn handle_coalesced<F>(
        &mut self,
        i: usize,
        id: SocketId,
        len: usize,
        segment: usize,
        scratch: &mut Vec<u8>,
        handler: &mut F,
    ) where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        self.stats.gro_receives += 1;
        let control_len = self.hdrs[i].msg_hdr.msg_controllen.min(sys::PKTINFO_SPACE);
        let local = sys::pktinfo_destination(&self.controls[i].0[..control_len]);
        let Some(from) = self.addrs[i].get() else { return };
        // The coalesced payload: the receive slot's payload area, then its GRO_EXTRA bytes.
        let head_len = len.min(MAX_PAYLOAD);
        let tail_len = len - head_len;
        if segment > MAX_PAYLOAD || tail_len > GRO_EXTRA {
            // Datagrams this long are dropped when they arrive alone too.
            let n = len.div_ceil(segment) as u64;
            self.stats.rx += n;
            self.stats.truncated += n;
            return;
        }
        if self.segments_used + len.div_ceil(segment) > SEGMENT_SLOTS {
            self.flush();
        }
        let mut off = 0;
        while off < len {
            let n = segment.min(len - off);
            if self.segments_used == SEGMENT_SLOTS {
                self.flush();
            }
            let k = self.segments_used;
            self.segments_used += 1;
            let slot = &mut self.segments[k * SLOT..(k + 1) * SLOT];
            let dst = &mut slot[HEADROOM..HEADROOM + n];
            // Bytes `off..off + n` of the payload, across the receive slot and its extra.
            let head = &self.bufs[i * SLOT + HEADROOM..i * SLOT + HEADROOM + head_len];
            let extra = &self.gro_extra[i * GRO_EXTRA..i * GRO_EXTRA + tail_len];
            let from_head = head_len.saturating_sub(off).min(n);
            if from_head > 0 {
                dst[..from_head].copy_from_slice(&head[off..off + from_head]);
            }
            if from_head < n {
                let at = off + from_head - head_len;
                dst[from_head..].copy_from_slice(&extra[at..at + n - from_head]);
            }
            self.stats.rx += 1;
            self.stats.gro_datagrams += 1;
            let slot_ptr = slot.as_ptr();
            let verdict = handler(
                Datagram {
                    socket: id,
                    from,
                    local,
                    buf: slot,
                    len: n,
                },
                scratch,
            );
            match verdict {
                Verdict::Drop => {}
                Verdict::Forward {
                    socket,
                    to,
                    src,
                    start,
                    end,
                } if start <= end && end <= SLOT => {
                    // SAFETY: start..end lies within this segment slot (checked above).
                    self.queue(socket, to, src, unsafe { slot_ptr.add(start) }, end - start);
                }
                Verdict::Forward { .. } => {}
                Verdict::Reply { socket, to, src } => match self.fds.get(socket as usize).filter(|fd| **fd >= 0) {
                    Some(&fd) => send_counted(&mut self.stats, fd, scratch, to, src),
                    None => self.stats.send_errors += 1,
                },
            }
            off += n;
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
                // One iovec per datagram: at most PENDING_MAX in all, as pending entries are.
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
        self.segments_used = 0;
    }

    /// Sends pending datagrams `first..first + n` with one sendmsg each.
    fn send_one_by_one(&mut self, first: usize, n: usize) {
        for p in &self.pending[first..first + n] {
            // SAFETY: the pending entry points into this value's receive or reply buffers,
            // which are not written until the batch is flushed.
            let data = unsafe { std::slice::from_raw_parts(p.ptr, p.len) };
            send_counted(&mut self.stats, p.fd, data, p.to, p.src);
        }
    }
}

impl Drop for MmsgIo {
    fn drop(&mut self) {
        sys::close(self.epfd);
        sys::close(self.waker);
    }
}
