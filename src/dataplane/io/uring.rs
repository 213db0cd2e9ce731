//! The io_uring backend.
//!
//! Every socket has one multishot RecvMsg (kernel ≥ 6.0) drawing buffers from a provided
//! buffer ring. A completion's buffer holds the kernel's `io_uring_recvmsg_out` header, the
//! source address and the payload; the bytes just before the payload serve as headroom for a
//! ChannelData header. Sends are SendMsg SQEs that point into that same buffer (forwarded
//! payloads) or into a reply slot (responses, Data indications); all SQEs of a batch go to
//! the kernel in one `io_uring_enter`, which also waits for the next completions. A buffer
//! goes back to the ring when its send completes.
#![allow(unsafe_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

use super::{gso, send_counted, Datagram, IoStats, SocketId, Verdict, HEADROOM, MAX_PAYLOAD};
use crate::sys::{self, RawAddr};

/// Provided buffers per shard (a power of two, at most 32768).
const BUFFERS: u16 = 2048;
/// Bytes per provided buffer: recvmsg_out header (16) + name (28) + control (PKTINFO) +
/// payload.
const BUF_SIZE: usize = 16 + std::mem::size_of::<RawAddr>() + sys::PKTINFO_SPACE + MAX_PAYLOAD;
/// Bytes per reply slot.
const REPLY_SLOT: usize = MAX_PAYLOAD + HEADROOM + 64;
/// Sends in flight at most.
const SEND_SLOTS: usize = 1024;
/// Completions processed per wait at most.
const CQE_BATCH: usize = 1024;
const BGID: u16 = 0;

const TAG_RECV: u64 = 1 << 56;
const TAG_SEND: u64 = 2 << 56;
const TAG_WAKE: u64 = 3 << 56;
const TAG_CANCEL: u64 = 4 << 56;
const TAG_WATCH: u64 = 5 << 56;
const TAG_MASK: u64 = 0xff << 56;

#[derive(Clone, Copy, PartialEq, Eq)]
enum SockState {
    Unused,
    /// A multishot receive is (or is about to be) armed.
    Armed(RawFd),
    /// Its multishot receive ended (no buffers, error); re-arm it.
    NeedsArm(RawFd),
    /// Deregistered; waiting for the receive to finish.
    Closing,
    /// Deregistered and the kernel no longer uses it.
    Released,
}

struct SendSlot {
    hdr: libc::msghdr,
    socket: SocketId,
    fd: RawFd,
    to: SocketAddr,
    src: Option<IpAddr>,
    addr: RawAddr,
    /// IP_PKTINFO choosing the source address (sockets bound to a wildcard address), and
    /// UDP_SEGMENT for a GSO send.
    control: sys::Control,
    /// Datagrams in the send: its iovecs are `iovs[slot * gso::MAX_SEGMENTS..][..count]`.
    count: usize,
    /// Whether `buffers[slot * gso::MAX_SEGMENTS..][..count]` are provided buffers to return
    /// when the send completes (forwards), or the data is in a reply slot.
    provided: bool,
}

/// The forwards of a batch being gathered into one send ([`gso`]): same socket, same
/// destination and source, equal lengths.
struct Run {
    slot: u16,
    socket: SocketId,
    /// Destination, source IP and segment length.
    key: gso::Key,
    /// Ended by a shorter datagram.
    closed: bool,
}

/// io_uring with a provided buffer ring.
pub struct UringIo {
    ring: IoUring,
    waker: RawFd,
    watched: Option<RawFd>,
    watch_fired: bool,
    ring_mem: *mut BufRingEntry,
    ring_layout: Layout,
    tail: u16,
    bufs: Vec<u8>,
    recv_hdr: Box<libc::msghdr>,
    sockets: Vec<SockState>,
    slots: Vec<SendSlot>,
    /// Per send slot, `gso::MAX_SEGMENTS` iovecs and provided buffer ids.
    iovs: Vec<libc::iovec>,
    buffers: Vec<u16>,
    free_slots: Vec<u16>,
    /// Send runs of equal datagrams with UDP GSO.
    gso: bool,
    /// The open run of forwards, sent when the next forward does not join it or the batch
    /// ends.
    run: Option<Run>,
    replies: Vec<u8>,
    cqes: Vec<(u64, i32, u32)>,
    /// Counters.
    pub stats: IoStats,
}

// SAFETY: the raw pointers (buffer ring memory, msghdr/iovec pointers into this struct's
// own buffers) are owned by this value and used only by the thread that owns it.
unsafe impl Send for UringIo {}

/// Checks that this kernel runs the backend: a multishot receive on a loopback socket gets
/// a datagram sent to it.
pub fn probe() -> Result<(), String> {
    let mut io = UringIo::new(64, false).map_err(|e| format!("io_uring setup failed: {e}"))?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = sock.local_addr().map_err(|e| e.to_string())?;
    use std::os::fd::AsRawFd;
    io.register(0, sock.as_raw_fd())
        .map_err(|e| format!("multishot recvmsg refused: {e}"))?;
    let mut scratch = Vec::new();
    let mut got = false;
    for _ in 0..20 {
        let _ = sys::send_to(sock.as_raw_fd(), b"turnpike-probe", addr);
        io.wait(Some(Duration::from_millis(10)), &mut scratch, |d, _| {
            got |= &d.buf[HEADROOM..HEADROOM + d.len] == b"turnpike-probe";
            Verdict::Drop
        })
        .map_err(|e| format!("io_uring wait failed: {e}"))?;
        if got {
            return Ok(());
        }
    }
    Err("multishot recvmsg with a provided buffer ring delivered nothing".into())
}

impl UringIo {
    /// Creates a ring of `entries` submission entries, its buffer ring and wake-up eventfd;
    /// `gso` sends runs of equal datagrams with UDP GSO ([`gso`]).
    ///
    /// # Errors
    /// When the kernel refuses the ring or the buffer ring.
    pub fn new(entries: u32, gso: bool) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(4))
            .setup_coop_taskrun()
            .build(entries)?;
        let ring_layout = Layout::from_size_align(BUFFERS as usize * std::mem::size_of::<BufRingEntry>(), 4096)
            .map_err(|_| io::Error::other("buffer ring layout"))?;
        // SAFETY: the layout has a non-zero size.
        let ring_mem = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        if ring_mem.is_null() {
            return Err(io::Error::other("out of memory for the buffer ring"));
        }
        // SAFETY: `ring_mem` is page aligned, BUFFERS entries long, and lives until Drop,
        // which unregisters it first.
        if let Err(e) = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_mem as u64, BUFFERS, BGID, 0)
        } {
            // SAFETY: allocated above with this layout and not registered.
            unsafe { dealloc(ring_mem.cast(), ring_layout) };
            return Err(e);
        }
        let waker = sys::eventfd()?;
        // SAFETY: msghdr is a plain C struct; zero is a valid value.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_hdr.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
        // Room for the destination address of sockets bound to a wildcard address.
        recv_hdr.msg_controllen = sys::PKTINFO_SPACE;
        let mut io = UringIo {
            ring,
            waker,
            watched: None,
            watch_fired: false,
            ring_mem,
            ring_layout,
            tail: 0,
            bufs: vec![0u8; BUFFERS as usize * BUF_SIZE],
            recv_hdr,
            sockets: Vec::new(),
            slots: (0..SEND_SLOTS)
                .map(|_| SendSlot {
                    // SAFETY: plain C struct; zero is valid.
                    hdr: unsafe { std::mem::zeroed() },
                    socket: 0,
                    fd: -1,
                    to: SocketAddr::from(([0, 0, 0, 0], 0)),
                    src: None,
                    addr: RawAddr::zeroed(),
                    control: sys::Control::new(),
                    count: 0,
                    provided: false,
                })
                .collect(),
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                SEND_SLOTS * gso::MAX_SEGMENTS
            ],
            buffers: vec![0; SEND_SLOTS * gso::MAX_SEGMENTS],
            free_slots: (0..SEND_SLOTS as u16).rev().collect(),
            gso,
            run: None,
            replies: vec![0u8; SEND_SLOTS * REPLY_SLOT],
            cqes: Vec::with_capacity(CQE_BATCH),
            stats: IoStats::default(),
        };
        sys::prefault(&mut io.bufs);
        sys::prefault(&mut io.replies);
        for bid in 0..BUFFERS {
            io.give_back(bid);
        }
        io.publish_tail();
        io.arm_waker();
        Ok(io)
    }

    /// Puts buffer `bid` at the ring's tail (published by [`UringIo::publish_tail`]).
    fn give_back(&mut self, bid: u16) {
        let idx = (self.tail & (BUFFERS - 1)) as usize;
        // SAFETY: idx < BUFFERS, within the ring memory.
        let entry = unsafe { &mut *self.ring_mem.add(idx) };
        // SAFETY: bid < BUFFERS, so the address is inside `bufs`.
        entry.set_addr(unsafe { self.bufs.as_mut_ptr().add(bid as usize * BUF_SIZE) } as u64);
        entry.set_len(BUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish_tail(&mut self) {
        // SAFETY: the tail field of the first entry, which the kernel reads atomically.
        let tail = unsafe { &*(BufRingEntry::tail(self.ring_mem).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry pushed points at memory owned by `self` that stays valid
            // until its completion (msghdrs in `slots`/`recv_hdr`, buffers in `bufs`/`replies`).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Queue full: hand what is there to the kernel and retry.
            let _ = self.ring.submit();
        }
    }

    fn arm_waker(&mut self) {
        let e = opcode::PollAdd::new(Fd(self.waker), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(TAG_WAKE);
        self.push(e);
    }

    fn arm_watch(&mut self) {
        if let Some(fd) = self.watched {
            let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(TAG_WATCH);
            self.push(e);
        }
    }

    /// Watches `fd` for readability (an epoll descriptor of the stream layer): its readiness
    /// ends a wait and sets the flag [`UringIo::take_watched`] returns.
    ///
    /// # Errors
    /// When the ring refuses the submission.
    pub fn watch(&mut self, fd: RawFd) -> io::Result<()> {
        self.watched = Some(fd);
        self.arm_watch();
        self.ring.submit()?;
        Ok(())
    }

    /// Whether the watched descriptor became readable since the last call.
    pub fn take_watched(&mut self) -> bool {
        std::mem::take(&mut self.watch_fired)
    }

    fn arm(&mut self, id: SocketId, fd: RawFd) {
        let e = opcode::RecvMsgMulti::new(Fd(fd), &*self.recv_hdr, BGID)
            .build()
            .user_data(TAG_RECV | id as u64);
        self.push(e);
        self.sockets[id as usize] = SockState::Armed(fd);
    }

    /// Starts a multishot receive on `fd` as socket `id`.
    ///
    /// # Errors
    /// Never at this point; the kernel reports errors through completions.
    pub fn register(&mut self, id: SocketId, fd: RawFd) -> io::Result<()> {
        let i = id as usize;
        if self.sockets.len() <= i {
            self.sockets.resize(i + 1, SockState::Unused);
        }
        self.arm(id, fd);
        self.ring.submit()?;
        Ok(())
    }

    /// Cancels socket `id`'s receive; [`UringIo::is_released`] turns true once the kernel
    /// has finished with it.
    pub fn deregister(&mut self, id: SocketId) {
        match self.sockets.get(id as usize).copied() {
            Some(SockState::Armed(_)) => {
                self.sockets[id as usize] = SockState::Closing;
                let e = opcode::AsyncCancel::new(TAG_RECV | id as u64)
                    .build()
                    .user_data(TAG_CANCEL | id as u64);
                self.push(e);
                let _ = self.ring.submit();
            }
            Some(_) => self.sockets[id as usize] = SockState::Released,
            None => {}
        }
    }

    /// Whether the kernel no longer uses socket `id`.
    pub fn is_released(&self, id: SocketId) -> bool {
        matches!(
            self.sockets.get(id as usize),
            Some(SockState::Released) | Some(SockState::Unused) | None
        )
    }

    /// The wake-up eventfd.
    pub fn waker(&self) -> RawFd {
        self.waker
    }

    /// See [`super::Io::wait`].
    ///
    /// # Errors
    /// When io_uring_enter fails other than by timeout or interruption.
    pub fn wait<F>(&mut self, timeout: Option<Duration>, scratch: &mut Vec<u8>, mut handler: F) -> io::Result<()>
    where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        let ts = timeout.map(|d| Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos()));
        let result = match &ts {
            Some(ts) => self
                .ring
                .submitter()
                .submit_with_args(1, &SubmitArgs::new().timespec(ts)),
            None => self.ring.submit_and_wait(1),
        };
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                _ => return Err(e),
            }
        }
        self.stats.batches += 1;
        self.cqes.clear();
        for cqe in self.ring.completion().take(CQE_BATCH) {
            self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        for i in 0..self.cqes.len() {
            let (data, res, flags) = self.cqes[i];
            let id = (data & !TAG_MASK) as SocketId;
            match data & TAG_MASK {
                TAG_RECV => self.on_recv(id, res, flags, scratch, &mut handler),
                TAG_SEND => self.on_send(id as u16, res),
                TAG_WAKE => {
                    sys::drain_eventfd(self.waker);
                    if !cqueue::more(flags) {
                        self.arm_waker();
                    }
                }
                TAG_WATCH => {
                    self.watch_fired = true;
                    if !cqueue::more(flags) {
                        self.arm_watch();
                    }
                }
                // Nothing was left to cancel: the receive had already ended.
                TAG_CANCEL if res == -libc::ENOENT && self.sockets.get(id as usize) == Some(&SockState::Closing) => {
                    self.sockets[id as usize] = SockState::Released;
                }
                _ => {}
            }
        }
        self.end_run();
        // Re-arm receives that ended (buffers were short, or an error).
        for id in 0..self.sockets.len() {
            if let SockState::NeedsArm(fd) = self.sockets[id] {
                self.arm(id as SocketId, fd);
            }
        }
        self.publish_tail();
        self.ring.submit()?;
        Ok(())
    }

    fn on_recv<F>(&mut self, id: SocketId, res: i32, flags: u32, scratch: &mut Vec<u8>, handler: &mut F)
    where
        F: FnMut(Datagram<'_>, &mut Vec<u8>) -> Verdict,
    {
        let more = cqueue::more(flags);
        let state = self.sockets.get(id as usize).copied().unwrap_or(SockState::Unused);
        if !more {
            self.sockets[id as usize] = match state {
                SockState::Armed(fd) if res != -libc::ECANCELED => SockState::NeedsArm(fd),
                SockState::Closing | SockState::Armed(_) => SockState::Released,
                other => other,
            };
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            return;
        };
        if res < 0 || state == SockState::Closing {
            self.give_back(bid);
            return;
        }
        self.stats.rx += 1;
        let base = bid as usize * BUF_SIZE;
        let (from, local, payload_off, len, truncated) = {
            let buf = &self.bufs[base..base + res as usize];
            match RecvMsgOut::parse(buf, &self.recv_hdr) {
                Ok(out) => {
                    let from = sys::addr_from_bytes(out.name_data());
                    let local = if out.control_data().is_empty() {
                        None
                    } else {
                        sys::pktinfo_destination(out.control_data())
                    };
                    let off = out.payload_data().as_ptr() as usize - buf.as_ptr() as usize;
                    (from, local, off, out.payload_data().len(), out.is_payload_truncated())
                }
                Err(()) => (None, None, 0, 0, true),
            }
        };
        let Some(from) = from.filter(|_| !truncated && payload_off >= HEADROOM) else {
            self.stats.truncated += u64::from(truncated);
            self.give_back(bid);
            return;
        };
        let start = base + payload_off - HEADROOM;
        let buf = &mut self.bufs[start..base + BUF_SIZE];
        let verdict = handler(
            Datagram {
                socket: id,
                from,
                local,
                buf,
                len,
            },
            scratch,
        );
        match verdict {
            Verdict::Drop => self.give_back(bid),
            Verdict::Forward {
                socket,
                to,
                src,
                start: s,
                end,
            } if s <= end && start + end <= base + BUF_SIZE => {
                // SAFETY: within this buffer (checked above); the buffer stays out of the
                // ring until the send completes.
                let ptr = unsafe { self.bufs.as_ptr().add(start + s) };
                self.forward(socket, to, src, ptr, end - s, bid);
            }
            Verdict::Forward { .. } => self.give_back(bid),
            Verdict::Reply { socket, to, src } => {
                self.give_back(bid);
                self.queue_reply(socket, to, src, scratch);
            }
        }
    }

    fn queue_reply(&mut self, socket: SocketId, to: SocketAddr, src: Option<IpAddr>, data: &[u8]) {
        self.end_run();
        let Some(&slot) = self.free_slots.last() else {
            self.send_sync(socket, to, src, data);
            return;
        };
        let n = data.len().min(REPLY_SLOT);
        let off = slot as usize * REPLY_SLOT;
        self.replies[off..off + n].copy_from_slice(&data[..n]);
        let ptr = self.replies[off..].as_ptr();
        if let Some(slot) = self.prepare(socket, to, src, ptr, n, None) {
            self.submit(slot);
        }
    }

    /// Forwards `len` bytes at `ptr` in provided buffer `bid`: joins the open run of
    /// forwards or starts one (with GSO), else sends it alone.
    fn forward(&mut self, socket: SocketId, to: SocketAddr, src: Option<IpAddr>, ptr: *const u8, len: usize, bid: u16) {
        let key = (to, src, len);
        if let Some(run) = &mut self.run {
            let count = self.slots[run.slot as usize].count;
            if run.socket == socket && gso::joins(run.key, count, run.closed, key) {
                let i = run.slot as usize * gso::MAX_SEGMENTS + count;
                self.iovs[i] = libc::iovec {
                    iov_base: ptr as *mut libc::c_void,
                    iov_len: len,
                };
                self.buffers[i] = bid;
                self.slots[run.slot as usize].count += 1;
                run.closed = len < run.key.2;
                return;
            }
        }
        self.end_run();
        match self.prepare(socket, to, src, ptr, len, Some(bid)) {
            Some(slot) if self.gso && len != 0 && len <= gso::MAX_SEGMENT => {
                self.run = Some(Run {
                    slot,
                    socket,
                    key,
                    closed: false,
                })
            }
            Some(slot) => self.submit(slot),
            // Sent at once, or failed: the buffer is free again.
            None => self.give_back(bid),
        }
    }

    /// Submits the open run of forwards, if any.
    fn end_run(&mut self) {
        if let Some(run) = self.run.take() {
            self.submit(run.slot);
        }
    }

    /// Sends at once with sendto(2): the fallback when every send slot is in flight (a
    /// burst of more than [`SEND_SLOTS`] datagrams before their completions come back).
    fn send_sync(&mut self, socket: SocketId, to: SocketAddr, src: Option<IpAddr>, data: &[u8]) {
        let Some(fd) = self.fd_of(socket) else {
            self.stats.send_errors += 1;
            return;
        };
        self.stats.sync_sends += 1;
        send_counted(&mut self.stats, fd, data, to, src);
    }

    fn fd_of(&self, socket: SocketId) -> Option<RawFd> {
        match self.sockets.get(socket as usize) {
            Some(SockState::Armed(fd)) | Some(SockState::NeedsArm(fd)) => Some(*fd),
            _ => None,
        }
    }

    /// Takes a send slot for `len` bytes at `ptr` (in provided buffer `buffer`, or a reply
    /// slot), not yet submitted; or sends at once when no slot is free. `None` when the data
    /// is no longer needed (sent at once, or the socket is gone).
    fn prepare(
        &mut self,
        socket: SocketId,
        to: SocketAddr,
        src: Option<IpAddr>,
        ptr: *const u8,
        len: usize,
        buffer: Option<u16>,
    ) -> Option<u16> {
        let Some(fd) = self.fd_of(socket) else {
            self.stats.send_errors += 1;
            return None;
        };
        let Some(slot) = self.free_slots.pop() else {
            // SAFETY: `ptr..ptr+len` lies in `bufs` or `replies` (the callers' contract) and
            // is not written during this call.
            let data = unsafe { std::slice::from_raw_parts(ptr, len) };
            self.send_sync(socket, to, src, data);
            return None;
        };
        let base = slot as usize * gso::MAX_SEGMENTS;
        self.iovs[base] = libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        };
        self.buffers[base] = buffer.unwrap_or(0);
        let s = &mut self.slots[slot as usize];
        s.socket = socket;
        s.fd = fd;
        s.to = to;
        s.src = src;
        s.count = 1;
        s.provided = buffer.is_some();
        Some(slot)
    }

    /// Queues slot `slot`'s SendMsg: one datagram, or a GSO run of `count` (UDP_SEGMENT of
    /// the first datagram's length).
    fn submit(&mut self, slot: u16) {
        let base = slot as usize * gso::MAX_SEGMENTS;
        let s = &mut self.slots[slot as usize];
        let addr_len = s.addr.set(s.to);
        s.hdr.msg_name = (&mut s.addr as *mut RawAddr).cast();
        s.hdr.msg_namelen = addr_len;
        s.hdr.msg_iov = &mut self.iovs[base];
        s.hdr.msg_iovlen = s.count;
        let mut control_len = match s.src {
            Some(ip) => sys::pktinfo_source(ip, &mut s.control),
            None => 0,
        };
        if s.count > 1 {
            control_len = sys::udp_segment(self.iovs[base].iov_len as u16, &mut s.control, control_len);
        }
        if control_len == 0 {
            s.hdr.msg_control = std::ptr::null_mut();
        } else {
            s.hdr.msg_control = s.control.0.as_mut_ptr().cast();
        }
        s.hdr.msg_controllen = control_len;
        let e = opcode::SendMsg::new(Fd(s.fd), &s.hdr)
            .build()
            .user_data(TAG_SEND | slot as u64);
        self.push(e);
    }

    fn on_send(&mut self, slot: u16, res: i32) {
        let s = &self.slots[slot as usize];
        let (count, socket, fd, to, src, provided) = (s.count, s.socket, s.fd, s.to, s.src, s.provided);
        let base = slot as usize * gso::MAX_SEGMENTS;
        if res >= 0 {
            self.stats.tx += count as u64;
            if count > 1 {
                self.stats.gso_sends += 1;
                self.stats.gso_datagrams += count as u64;
            }
        } else if count > 1 && res != -libc::EAGAIN {
            // GSO refused for this route (a segment over the path MTU, ...): send the run
            // again one datagram at a time, from the same descriptor if it is still open.
            self.stats.gso_fallbacks += 1;
            let open = self.fd_of(socket) == Some(fd);
            for k in 0..count {
                let iov = self.iovs[base + k];
                // SAFETY: the iovec points into a provided buffer that stays out of the ring
                // until this completion returns it below.
                let data = unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
                if open {
                    send_counted(&mut self.stats, fd, data, to, src);
                } else {
                    self.stats.send_errors += 1;
                }
            }
        } else {
            self.stats.send_errors += count as u64;
            self.stats.last_send_errno = -res;
        }
        if provided {
            for k in 0..count {
                let bid = self.buffers[base + k];
                self.give_back(bid);
            }
        }
        self.free_slots.push(slot);
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
        // SAFETY: allocated in `new` with this layout; the kernel no longer uses it.
        unsafe { dealloc(self.ring_mem.cast(), self.ring_layout) };
        sys::close(self.waker);
    }
}
