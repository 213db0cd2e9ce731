//! The XDP fast path for bound channels over UDP (feature `xdp`): the program
//! `xdp/turnpike.bpf.c` (built by `build.rs` with clang) and the user-space side that loads
//! it, attaches it and keeps its maps in step with the sans-IO server's events.
//!
//! The program forwards, in the NIC's receive path and without entering the socket layer,
//! the two kinds of datagrams that are pure forwarding (RFC 8656 §12): ChannelData from a
//! client on a bound channel (header stripped, sent from the relayed address to the peer)
//! and UDP from a peer with a channel bound to it (ChannelData header prepended, sent from
//! the listening address to the client). Both leave through the interface they came in on
//! (XDP_TX). Everything else reaches the kernel unchanged and the user-space path, which
//! stays the reference behaviour: STUN, Send and Data indications, padded ChannelData,
//! unknown channels,
//! expired entries, bandwidth-capped allocations, IP fragments, IPv4 options, IPv6 extension
//! headers, VLAN tags, TTL/hop limit ≤ 1, peer datagrams too large for the MTU once framed,
//! and allocations whose client and relayed addresses differ in family.
//!
//! # Wiring (for the shard; not done here)
//!
//! 1. At start-up, when `--xdp IFACE` was given (repeatable): [`XdpProgram::load`] once, then
//!    [`XdpProgram::attach`] for each interface; log the returned [`AttachMode`]
//!    (`"xdp: attached to eth0 in native mode"`). Keep the [`XdpProgram`] alive for the
//!    process's life: dropping it detaches the program.
//!    Without privileges (CAP_BPF + CAP_NET_ADMIN, or root), without the feature, or on a
//!    kernel without XDP, `load`/`attach` return an error: log one line with it
//!    (`"xdp: {err}; relaying in user space"`) and go on without an offload. Nothing else
//!    changes: the user-space path handles every datagram as before.
//! 2. Give each shard its own [`XdpOffload`] from [`XdpProgram::offload`] (all share the
//!    kernel maps; each mirrors only its own server's allocations). Pass `true` when the
//!    server has a bandwidth cap (`max_bitrate` ≠ 0): nothing is offloaded then, the cap
//!    being enforced in user space only. On a reload that changes the cap, call
//!    [`XdpOffload::set_bandwidth_capped`].
//! 3. In `Core::drain_events`, for **every** event, before the `match` consumes it:
//!    `if let Some(x) = &mut self.xdp { if let Some(u) = x.on_event(self.now, &event) { ... } }`.
//!    The events that change the maps are `AllocationCreated`, `AllocationRefreshed`,
//!    `AllocationClosed`, `PermissionInstalled`, `PermissionExpired`, `ChannelBound`,
//!    `ChannelRebound` and `ChannelExpired`; the others are ignored, as are 5-tuples that
//!    are not `Transport::Udp`. `now` must be the `Instant` the server was given for the
//!    call that produced the event, or earlier (an earlier one only ends entries sooner).
//!    For `AllocationClosed` it returns what XDP relayed for that allocation: add it to the
//!    usage record's `usage` (the sans-IO server never saw those datagrams).
//! 4. Metrics (`datapath="xdp"`): [`XdpOffload::totals`] once a second (monotonic packet and
//!    byte counts, both directions, everything this shard's entries forwarded), and
//!    [`XdpOffload::counters`] per channel where needed (lifetime accounting: an allocation
//!    whose traffic flows only through XDP shows growing counters). Each costs two `bpf()`
//!    syscalls per installed channel.
//!
//! # Limits
//!
//! - Frames leave by XDP_TX with the Ethernet addresses swapped: right when clients and
//!   peers are reached through the same next hop on the interface the frame came in on (a
//!   router, or the test topology); a host with several uplinks, or peers on the same link as
//!   the relay, needs a FIB lookup and XDP_REDIRECT, which this program does not do. Attach
//!   it only where that holds.
//! - The MTU is read when attaching; re-attach after changing it.
//! - Counter increments that land between the read and the rewrite of an entry (a refresh:
//!   a few per channel every few minutes) are lost.
//!
//! # Maps
//!
//! Addresses are 16 bytes (IPv4 as IPv4-mapped IPv6), ports and channel numbers in network
//! byte order; the layouts are those of the C structs (`listen_key`, `chan_key`,
//! `chan_val`, `peer_key`, `peer_val`). An entry's expiry is
//! `min(channel expiry, permission expiry, allocation expiry)` as a `bpf_ktime_get_ns()`
//! deadline (CLOCK_MONOTONIC, which is what [`Instant`] uses on Linux), so an entry whose
//! deleting event is late is never used past its time.
use std::collections::HashMap as StdHashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Instant;

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::proto::allocation::{FiveTuple, Transport, Usage};
use crate::proto::server::Event;

#[cfg(test)]
mod tests;

/// The compiled program (`xdp/turnpike.bpf.c`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/turnpike.bpf.o"));

/// Name of the program in the object.
const PROGRAM: &str = "turnpike_xdp";

/// Entry flag: the allocation is bandwidth-capped; the program passes its datagrams. Such
/// entries are never inserted (the offload holds none while capped); the program checks it
/// all the same.
#[cfg_attr(not(test), allow(dead_code))]
const FLAG_BANDWIDTH_CAPPED: u32 = 1;
/// Entry flag: the entry's addresses are IPv6.
const FLAG_IPV6: u32 = 2;

/// Channel numbers the program handles: RFC 8656 §12's 0x4000 through 0x4FFF and RFC 5766's
/// 0x5000 through 0x7FFF, which the server binds unless `strict_channel_numbers` (deployed
/// clients use them: coturn's uclient picks from the whole range). Only numbers the server
/// bound reach the maps.
const CHANNELS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

type ListenKey = [u8; 20];
type ChanKey = [u8; 40];
type ChanVal = [u8; 64];
type PeerKey = [u8; 36];
type PeerVal = [u8; 64];

/// Why the XDP path could not be set up or changed.
#[derive(Debug)]
pub enum XdpError {
    /// Loading the object failed: the kernel refused to create a map (no CAP_BPF /
    /// CAP_SYS_ADMIN, `kernel.unprivileged_bpf_disabled`, no `bpf()` syscall) or the
    /// verifier rejected the program (its log is in the source error).
    Load(Box<EbpfError>),
    /// The program could not be loaded into the kernel (verifier) or looked up.
    Program(Box<ProgramError>),
    /// The interface could not take the program in native mode nor in generic mode.
    Attach {
        /// The interface name.
        interface: String,
        /// Why native (driver) mode failed.
        native: Box<ProgramError>,
        /// Why generic (skb) mode failed.
        generic: Box<ProgramError>,
    },
    /// Reading the interface's MTU or index from `/sys/class/net` failed.
    Interface {
        /// The interface name.
        interface: String,
        /// The read or parse error.
        error: std::io::Error,
    },
    /// A map operation failed.
    Map(Box<MapError>),
}

/// Writes `e` and its sources, `: `-separated, each unless the text so far already says it
/// (aya's errors keep the errno in a source, and some repeat their source's text).
fn chain(f: &mut fmt::Formatter<'_>, e: &dyn std::error::Error) -> fmt::Result {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        next = s.source();
    }
    f.write_str(&text)
}

impl fmt::Display for XdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XdpError::Load(e) => {
                f.write_str("loading the XDP object failed: ")?;
                chain(f, e.as_ref())
            }
            XdpError::Program(e) => {
                f.write_str("loading the XDP program failed: ")?;
                chain(f, e.as_ref())
            }
            XdpError::Attach {
                interface,
                native,
                generic,
            } => write!(
                f,
                "attaching XDP to {interface} failed in native mode ({native}) and in generic mode ({generic})"
            ),
            XdpError::Interface { interface, error } => {
                write!(f, "reading /sys/class/net/{interface} failed: {error}")
            }
            XdpError::Map(e) => {
                f.write_str("XDP map operation failed: ")?;
                chain(f, e.as_ref())
            }
        }
    }
}

impl std::error::Error for XdpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            XdpError::Load(e) => Some(e.as_ref()),
            XdpError::Program(e) => Some(e.as_ref()),
            XdpError::Attach { generic, .. } => Some(generic.as_ref()),
            XdpError::Interface { error, .. } => Some(error),
            XdpError::Map(e) => Some(e.as_ref()),
        }
    }
}

impl From<MapError> for XdpError {
    fn from(e: MapError) -> Self {
        XdpError::Map(Box::new(e))
    }
}

impl XdpError {
    /// Whether the kernel refused the `bpf()` syscall for want of privileges or support
    /// (EPERM, EACCES or ENOSYS when creating a map; EPERM when loading the program), as
    /// opposed to a program the verifier rejected (EACCES or EINVAL at load, with its log).
    pub fn is_refused(&self) -> bool {
        match self {
            XdpError::Load(e) => match e.as_ref() {
                EbpfError::MapError(MapError::CreateError { io_error, .. }) => matches!(
                    io_error.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOSYS)
                ),
                _ => false,
            },
            XdpError::Program(e) => match e.as_ref() {
                ProgramError::LoadError { io_error, .. } => io_error.raw_os_error() == Some(libc::EPERM),
                _ => false,
            },
            _ => false,
        }
    }
}

/// How the program runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): before any socket buffer is allocated.
    Native,
    /// In the kernel's generic path (`XDP_FLAGS_SKB_MODE`), for drivers without XDP
    /// support: correct, but each frame has been turned into a socket buffer first.
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic (skb)",
        })
    }
}

/// Options of [`XdpProgram::load_with`].
#[derive(Debug, Clone, Copy)]
struct LoadOptions {
    /// Capacity of the channel and peer maps (entries each).
    max_channels: u32,
    /// Take the tail-growing path on every peer datagram (tests only).
    force_tail_grow: bool,
}

/// The loaded XDP program and its maps. Dropping it detaches the program from every
/// interface and frees the maps once no [`XdpOffload`] holds them.
pub struct XdpProgram {
    ebpf: Ebpf,
    listen: MapData,
    channels: MapData,
    peers: MapData,
    mtu: HashMap<MapData, u32, u32>,
}

impl fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpProgram").finish_non_exhaustive()
    }
}

impl XdpProgram {
    /// Creates the maps (`max_channels` entries in each direction: one per bound channel
    /// that is offloaded; a full map leaves further channels in user space) and loads the
    /// program into the kernel.
    ///
    /// # Errors
    /// [`XdpError::Load`] when the kernel refuses (see [`XdpError::is_refused`]) or the
    /// verifier rejects the program; [`XdpError::Program`] if loading the program failed
    /// after the maps were created.
    pub fn load(max_channels: u32) -> Result<Self, XdpError> {
        Self::load_with(LoadOptions {
            max_channels,
            force_tail_grow: false,
        })
    }

    fn load_with(opts: LoadOptions) -> Result<Self, XdpError> {
        let force = u32::from(opts.force_tail_grow);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("channels", opts.max_channels.max(1))
            .map_max_entries("peers", opts.max_channels.max(1))
            .override_global("force_tail_grow", &force, true)
            .load(OBJECT)
            .map_err(|e| XdpError::Load(Box::new(e)))?;
        let prog: &mut Xdp = program(&mut ebpf)?;
        prog.load().map_err(|e| XdpError::Program(Box::new(e)))?;
        let listen = take(&mut ebpf, "listen")?;
        let channels = take(&mut ebpf, "channels")?;
        let peers = take(&mut ebpf, "peers")?;
        let mtu = HashMap::try_from(Map::HashMap(take(&mut ebpf, "mtu")?))?;
        Ok(XdpProgram {
            ebpf,
            listen,
            channels,
            peers,
            mtu,
        })
    }

    /// Attaches the program to `interface` in native mode, else in generic mode (one log
    /// line, target `turnpike::xdp`, says which and why native failed), and records
    /// the interface's MTU for the program (peer datagrams that would exceed it once framed
    /// as ChannelData are left to the kernel; re-attach after changing the MTU).
    ///
    /// # Errors
    /// [`XdpError::Interface`] if the interface does not exist; [`XdpError::Attach`] if
    /// neither mode works (no CAP_NET_ADMIN, another program already attached).
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, XdpError> {
        let ifindex = read_sys_u32(interface, "ifindex")?;
        let mtu = read_sys_u32(interface, "mtu")?;
        self.set_mtu(ifindex, mtu)?;
        let prog: &mut Xdp = program(&mut self.ebpf)?;
        let native = match prog.attach(interface, XdpMode::Driver) {
            Ok(_) => {
                tracing::info!(target: "turnpike::xdp", "xdp: attached to {interface} in native mode");
                return Ok(AttachMode::Native);
            }
            Err(e) => e,
        };
        match prog.attach(interface, XdpMode::Skb) {
            Ok(_) => {
                tracing::info!(
                    target: "turnpike::xdp",
                    "xdp: attached to {interface} in generic (skb) mode; native mode failed: {native}"
                );
                Ok(AttachMode::Generic)
            }
            Err(generic) => Err(XdpError::Attach {
                interface: interface.to_string(),
                native: Box::new(native),
                generic: Box::new(generic),
            }),
        }
    }

    /// Sets the L3 MTU the program assumes for frames received on `ifindex`.
    fn set_mtu(&mut self, ifindex: u32, mtu: u32) -> Result<(), XdpError> {
        self.mtu.insert(ifindex, mtu, 0)?;
        Ok(())
    }

    /// A handle on the maps for one shard's server (each shard mirrors its own allocations).
    /// With `bandwidth_capped` nothing is offloaded until
    /// [`XdpOffload::set_bandwidth_capped`]`(false)`.
    ///
    /// # Errors
    /// [`XdpError::Map`] when duplicating a map's file descriptor fails (EMFILE).
    pub fn offload(&self, bandwidth_capped: bool) -> Result<XdpOffload, XdpError> {
        Ok(XdpOffload {
            maps: Maps {
                listen: dup(&self.listen)?,
                channels: dup(&self.channels)?,
                peers: dup(&self.peers)?,
            },
            clock: MonoClock::new(),
            capped: bandwidth_capped,
            allocs: StdHashMap::new(),
            listening: Vec::new(),
            gone: Usage::default(),
            errors: 0,
        })
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let p = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| XdpError::Program(Box::new(ProgramError::UnexpectedProgramType)))?;
    p.try_into().map_err(|e| XdpError::Program(Box::new(e)))
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<MapData, XdpError> {
    match ebpf.take_map(name) {
        Some(Map::HashMap(md)) => Ok(md),
        _ => Err(MapError::InvalidName { name: name.to_string() }.into()),
    }
}

/// A second handle on the same kernel map (a duplicated file descriptor).
fn dup<K: aya::Pod, V: aya::Pod>(md: &MapData) -> Result<HashMap<MapData, K, V>, XdpError> {
    let fd = md
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }))?;
    Ok(HashMap::try_from(Map::HashMap(MapData::from_fd(fd)?))?)
}

fn read_sys_u32(interface: &str, what: &str) -> Result<u32, XdpError> {
    let err = |error| XdpError::Interface {
        interface: interface.to_string(),
        error,
    };
    if interface.contains('/') || interface.starts_with('.') {
        return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/{what}")).map_err(err)?;
    text.trim()
        .parse()
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// The three maps user space writes.
struct Maps {
    listen: HashMap<MapData, ListenKey, u32>,
    channels: HashMap<MapData, ChanKey, ChanVal>,
    peers: HashMap<MapData, PeerKey, PeerVal>,
}

/// Converts [`Instant`]s to `bpf_ktime_get_ns()` values. On Linux both are CLOCK_MONOTONIC;
/// the offset is taken once, between two `Instant::now()` calls (error well under 1 µs).
#[derive(Debug, Clone, Copy)]
struct MonoClock {
    base: Instant,
    base_ns: u64,
}

impl MonoClock {
    fn new() -> Self {
        let before = Instant::now();
        let ns = monotonic_ns();
        let after = Instant::now();
        MonoClock {
            base: before + (after - before) / 2,
            base_ns: ns,
        }
    }

    /// Nanoseconds on the kernel's monotonic clock at `t` (0 for a time before boot).
    fn ns(&self, t: Instant) -> u64 {
        if t >= self.base {
            let d = (t - self.base).as_nanos();
            self.base_ns.saturating_add(u64::try_from(d).unwrap_or(u64::MAX))
        } else {
            let d = (self.base - t).as_nanos();
            self.base_ns.saturating_sub(u64::try_from(d).unwrap_or(u64::MAX))
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
#[allow(unsafe_code)]
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one `timespec` through the pointer, which points to a
    // live, writable local of that type; CLOCK_MONOTONIC always exists on Linux. (std offers
    // no way to read an Instant's raw value, hence this one call.)
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the program forwarded on one channel, both directions (payload bytes: the
/// application data, without the ChannelData header; as in [`Usage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelCounters {
    /// The client 5-tuple of the allocation.
    pub five_tuple: FiveTuple,
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// The channel number.
    pub channel: u16,
    /// The peer it is bound to.
    pub peer: SocketAddr,
    /// Datagrams and payload bytes forwarded by XDP since the channel was first bound.
    pub usage: Usage,
}

/// One allocation as this shard's offload knows it.
#[derive(Debug)]
struct Alloc {
    five_tuple: FiveTuple,
    /// Unknown when the offload started after the allocation was created.
    expires: Option<Instant>,
    permissions: StdHashMap<IpAddr, Instant>,
    channels: StdHashMap<u16, Chan>,
    /// Counts of this allocation's kernel entries that were deleted.
    retired: Usage,
}

#[derive(Debug)]
struct Chan {
    peer: SocketAddr,
    expires: Instant,
    installed: bool,
    /// Counts of this channel's deleted kernel entries.
    retired: Usage,
}

/// One shard's view of the XDP maps: turns the sans-IO server's events into map entries and
/// reads the program's counters back. See the module documentation for the wiring.
///
/// Failed map operations are logged (target `turnpike::xdp`) and counted
/// ([`XdpOffload::errors`]); they never affect the user-space path. A failed insert leaves
/// the channel in user space; a failed delete leaves an entry that still ends at its stored
/// expiry.
pub struct XdpOffload {
    maps: Maps,
    clock: MonoClock,
    capped: bool,
    allocs: StdHashMap<SocketAddr, Alloc>,
    listening: Vec<SocketAddr>,
    /// Counts of allocations that closed.
    gone: Usage,
    errors: u64,
}

impl fmt::Debug for XdpOffload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpOffload")
            .field("allocations", &self.allocs.len())
            .field("installed", &self.installed())
            .field("capped", &self.capped)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

fn add_usage(a: &mut Usage, b: Usage) {
    a.to_peer_packets += b.to_peer_packets;
    a.to_peer_bytes += b.to_peer_bytes;
    a.to_client_packets += b.to_client_packets;
    a.to_client_bytes += b.to_client_bytes;
}

impl XdpOffload {
    /// Applies one server event to the maps (RFC 8656 §7-§12 state as the server reports
    /// it). `now` is the time the server was given when it produced the event (an earlier
    /// one is safe). Returns, for `AllocationClosed` of an allocation it knew, the datagrams
    /// and payload bytes XDP forwarded for it over its life; `None` otherwise.
    pub fn on_event(&mut self, now: Instant, event: &Event) -> Option<Usage> {
        match *event {
            Event::AllocationCreated {
                five_tuple,
                relayed,
                additional,
                lifetime,
            }
            | Event::AllocationRefreshed {
                five_tuple,
                relayed,
                additional,
                lifetime,
            } => {
                // A dual allocation's second relayed address lives as long as the first.
                for relayed in std::iter::once(relayed).chain(additional) {
                    self.alloc(five_tuple, relayed).expires = Some(now + lifetime);
                    self.sync_where(now, relayed, |_| true);
                }
                None
            }
            Event::AllocationClosed {
                relayed, additional, ..
            } => {
                let mut usage = self.close_relayed(relayed);
                if let Some(a) = additional {
                    if let Some(u) = self.close_relayed(a) {
                        let total = usage.get_or_insert_with(Usage::default);
                        add_usage(total, u);
                    }
                }
                if let Some(u) = usage {
                    add_usage(&mut self.gone, u);
                }
                usage
            }
            Event::PermissionInstalled {
                five_tuple,
                relayed,
                peer,
                expires,
            } => {
                self.alloc(five_tuple, relayed).permissions.insert(peer, expires);
                self.sync_where(now, relayed, |c| c.peer.ip() == peer);
                None
            }
            Event::PermissionExpired { relayed, peer, .. } => {
                if let Some(a) = self.allocs.get_mut(&relayed) {
                    a.permissions.remove(&peer);
                    self.sync_where(now, relayed, |c| c.peer.ip() == peer);
                }
                None
            }
            Event::ChannelBound {
                five_tuple,
                relayed,
                channel,
                peer,
                expires,
            }
            | Event::ChannelRebound {
                five_tuple,
                relayed,
                channel,
                peer,
                expires,
            } => {
                let alloc = self.alloc(five_tuple, relayed);
                let ft = alloc.five_tuple;
                let mut old = alloc.channels.remove(&channel);
                let retired = match &mut old {
                    // Bound to another peer before: its entries go first.
                    Some(c) if c.peer != peer => {
                        self.remove_entries(&ft, relayed, channel, c);
                        c.retired
                    }
                    Some(c) => c.retired,
                    None => Usage::default(),
                };
                let installed = old.as_ref().is_some_and(|c| c.peer == peer && c.installed);
                let alloc = self.allocs.get_mut(&relayed).expect("just inserted");
                alloc.channels.insert(
                    channel,
                    Chan {
                        peer,
                        expires,
                        installed,
                        retired,
                    },
                );
                self.sync(now, relayed, channel);
                None
            }
            // RFC 6062 TCP relaying stays in user space.
            Event::ConnectionBound { .. } | Event::PeerConnectionClosed { .. } => None,
            Event::ChannelExpired { relayed, channel, .. } => {
                if let Some(alloc) = self.allocs.get_mut(&relayed) {
                    if let Some(mut chan) = alloc.channels.remove(&channel) {
                        let ft = alloc.five_tuple;
                        self.remove_entries(&ft, relayed, channel, &mut chan);
                        let alloc = self.allocs.get_mut(&relayed).expect("present");
                        add_usage(&mut alloc.retired, chan.retired);
                    }
                }
                None
            }
        }
    }

    /// Forgets the allocation state of `relayed` and deletes its kernel entries; returns
    /// what XDP forwarded for it, if it was known.
    fn close_relayed(&mut self, relayed: SocketAddr) -> Option<Usage> {
        let mut alloc = self.allocs.remove(&relayed)?;
        let mut usage = alloc.retired;
        let channels: Vec<u16> = alloc.channels.keys().copied().collect();
        for channel in channels {
            let chan = alloc.channels.get_mut(&channel).expect("listed");
            self.remove_entries(&alloc.five_tuple, relayed, channel, chan);
            add_usage(&mut usage, chan.retired);
        }
        Some(usage)
    }

    /// Turns the offload off (`true`: every entry is deleted and none is inserted, for a
    /// server with a bandwidth cap, which only user space enforces) or back on (`false`:
    /// live channels are installed again).
    pub fn set_bandwidth_capped(&mut self, now: Instant, capped: bool) {
        self.capped = capped;
        let relays: Vec<SocketAddr> = self.allocs.keys().copied().collect();
        for relayed in relays {
            self.sync_where(now, relayed, |_| true);
        }
    }

    /// Per-channel counters of the channels known to this offload (installed or not), read
    /// from the kernel maps (two `bpf()` calls per installed channel).
    pub fn counters(&self) -> Vec<ChannelCounters> {
        let mut out = Vec::new();
        for (&relayed, alloc) in &self.allocs {
            for (&channel, chan) in &alloc.channels {
                let mut usage = chan.retired;
                if chan.installed {
                    add_usage(&mut usage, self.read_entries(&alloc.five_tuple, relayed, channel, chan));
                }
                out.push(ChannelCounters {
                    five_tuple: alloc.five_tuple,
                    relayed,
                    channel,
                    peer: chan.peer,
                    usage,
                });
            }
        }
        out
    }

    /// Everything this offload's entries forwarded since it was created, closed allocations
    /// included: monotonic, for counters with `datapath="xdp"`.
    pub fn totals(&self) -> Usage {
        let mut total = self.gone;
        for alloc in self.allocs.values() {
            add_usage(&mut total, alloc.retired);
        }
        for c in self.counters() {
            add_usage(&mut total, c.usage);
        }
        total
    }

    /// Channels with entries in the kernel maps now.
    pub fn installed(&self) -> usize {
        self.allocs
            .values()
            .map(|a| a.channels.values().filter(|c| c.installed).count())
            .sum()
    }

    /// Map operations that failed so far (each also logged).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    fn alloc(&mut self, five_tuple: FiveTuple, relayed: SocketAddr) -> &mut Alloc {
        self.allocs.entry(relayed).or_insert_with(|| Alloc {
            five_tuple,
            expires: None,
            permissions: StdHashMap::new(),
            channels: StdHashMap::new(),
            retired: Usage::default(),
        })
    }

    fn sync_where(&mut self, now: Instant, relayed: SocketAddr, pick: impl Fn(&Chan) -> bool) {
        let Some(alloc) = self.allocs.get(&relayed) else { return };
        let channels: Vec<u16> = alloc
            .channels
            .iter()
            .filter(|(_, c)| pick(c))
            .map(|(&n, _)| n)
            .collect();
        for channel in channels {
            self.sync(now, relayed, channel);
        }
    }

    /// The deadline an entry for this channel gets, or `None` when it must not have one.
    fn deadline(&self, now: Instant, alloc: &Alloc, relayed: SocketAddr, channel: u16, chan: &Chan) -> Option<Instant> {
        let ft = &alloc.five_tuple;
        let same_family = ft.client.is_ipv4() == ft.server.is_ipv4()
            && relayed.is_ipv4() == chan.peer.is_ipv4()
            && ft.client.is_ipv4() == relayed.is_ipv4();
        if self.capped || ft.transport != Transport::Udp || !CHANNELS.contains(&channel) || !same_family {
            return None;
        }
        let permission = *alloc.permissions.get(&chan.peer.ip())?;
        let mut deadline = chan.expires.min(permission);
        if let Some(e) = alloc.expires {
            deadline = deadline.min(e);
        }
        (deadline > now).then_some(deadline)
    }

    /// Brings one channel's kernel entries in line with what is known about it.
    fn sync(&mut self, now: Instant, relayed: SocketAddr, channel: u16) {
        let Some(alloc) = self.allocs.get_mut(&relayed) else {
            return;
        };
        let Some(mut chan) = alloc.channels.remove(&channel) else {
            return;
        };
        let alloc = &self.allocs[&relayed];
        let ft = alloc.five_tuple;
        match self.deadline(now, alloc, relayed, channel, &chan) {
            Some(deadline) => {
                let expires_ns = self.clock.ns(deadline);
                let carried = if chan.installed {
                    self.read_entries(&ft, relayed, channel, &chan)
                } else {
                    Usage::default()
                };
                self.listen(ft.server);
                let (ck, cv) = chan_entry(&ft, relayed, channel, chan.peer, expires_ns, 0, carried);
                let (pk, pv) = peer_entry(&ft, relayed, channel, chan.peer, expires_ns, 0, carried);
                let a = self.maps.channels.insert(ck, cv, 0);
                let mut ok = self.note(a, "insert channel");
                if ok {
                    let b = self.maps.peers.insert(pk, pv, 0);
                    ok = self.note(b, "insert peer");
                }
                chan.installed = true;
                if !ok {
                    // Half-installed: take both out so that neither direction is offloaded.
                    self.remove_entries(&ft, relayed, channel, &mut chan);
                }
            }
            None => self.remove_entries(&ft, relayed, channel, &mut chan),
        }
        if let Some(alloc) = self.allocs.get_mut(&relayed) {
            alloc.channels.insert(channel, chan);
        }
    }

    /// Makes sure the program knows `server` as a listening address (never removed: the
    /// listening addresses do not change while the process runs).
    fn listen(&mut self, server: SocketAddr) {
        if self.listening.contains(&server) {
            return;
        }
        let r = self.maps.listen.insert(listen_key(server), 1, 0);
        if self.note(r, "insert listening address") {
            self.listening.push(server);
        }
    }

    /// Reads the counters of a channel's two entries.
    fn read_entries(&self, ft: &FiveTuple, relayed: SocketAddr, channel: u16, chan: &Chan) -> Usage {
        let (ck, _) = chan_entry(ft, relayed, channel, chan.peer, 0, 0, Usage::default());
        let (pk, _) = peer_entry(ft, relayed, channel, chan.peer, 0, 0, Usage::default());
        let mut usage = Usage::default();
        if let Ok(v) = self.maps.channels.get(&ck, 0) {
            usage.to_peer_packets = u64_at(&v, 48);
            usage.to_peer_bytes = u64_at(&v, 56);
        }
        if let Ok(v) = self.maps.peers.get(&pk, 0) {
            usage.to_client_packets = u64_at(&v, 48);
            usage.to_client_bytes = u64_at(&v, 56);
        }
        usage
    }

    /// Deletes a channel's two entries, keeping their final counts in `chan.retired`.
    fn remove_entries(&mut self, ft: &FiveTuple, relayed: SocketAddr, channel: u16, chan: &mut Chan) {
        if !chan.installed {
            return;
        }
        let usage = self.read_entries(ft, relayed, channel, chan);
        add_usage(&mut chan.retired, usage);
        let (ck, _) = chan_entry(ft, relayed, channel, chan.peer, 0, 0, Usage::default());
        let (pk, _) = peer_entry(ft, relayed, channel, chan.peer, 0, 0, Usage::default());
        let a = self.maps.channels.remove(&ck);
        let b = self.maps.peers.remove(&pk);
        self.note_remove(a, "delete channel");
        self.note_remove(b, "delete peer");
        chan.installed = false;
    }

    fn note(&mut self, r: Result<(), MapError>, what: &str) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.errors += 1;
                tracing::warn!(target: "turnpike::xdp", "xdp: {what} failed: {e}; the channel stays in user space");
                false
            }
        }
    }

    fn note_remove(&mut self, r: Result<(), MapError>, what: &str) {
        match r {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => {
                self.errors += 1;
                tracing::warn!(target: "turnpike::xdp", "xdp: {what} failed: {e}; the entry ends at its stored expiry");
            }
        }
    }
}

/// A transport address as 16 bytes (IPv4 as IPv4-mapped IPv6) and a port in network order.
fn addr16(a: SocketAddr) -> ([u8; 16], [u8; 2]) {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    (ip, a.port().to_be_bytes())
}

fn listen_key(server: SocketAddr) -> ListenKey {
    let mut k = [0u8; 20];
    let (ip, port) = addr16(server);
    k[..16].copy_from_slice(&ip);
    k[16..18].copy_from_slice(&port);
    k
}

fn u64_at(v: &[u8; 64], at: usize) -> u64 {
    u64::from_ne_bytes(v[at..at + 8].try_into().expect("8 bytes"))
}

fn put_tail(v: &mut [u8; 64], expires_ns: u64, usage: (u64, u64)) {
    v[40..48].copy_from_slice(&expires_ns.to_ne_bytes());
    v[48..56].copy_from_slice(&usage.0.to_ne_bytes());
    v[56..64].copy_from_slice(&usage.1.to_ne_bytes());
}

fn family_flag(a: SocketAddr) -> u32 {
    if a.is_ipv6() {
        FLAG_IPV6
    } else {
        0
    }
}

/// The client → peer entry (`chan_key`, `chan_val`).
fn chan_entry(
    ft: &FiveTuple,
    relayed: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    expires_ns: u64,
    flags: u32,
    carried: Usage,
) -> (ChanKey, ChanVal) {
    let mut k = [0u8; 40];
    let (client, client_port) = addr16(ft.client);
    let (server, server_port) = addr16(ft.server);
    k[..16].copy_from_slice(&client);
    k[16..32].copy_from_slice(&server);
    k[32..34].copy_from_slice(&client_port);
    k[34..36].copy_from_slice(&server_port);
    k[36..38].copy_from_slice(&channel.to_be_bytes());
    let mut v = [0u8; 64];
    let (r, r_port) = addr16(relayed);
    let (p, p_port) = addr16(peer);
    v[..16].copy_from_slice(&r);
    v[16..32].copy_from_slice(&p);
    v[32..34].copy_from_slice(&r_port);
    v[34..36].copy_from_slice(&p_port);
    v[36..40].copy_from_slice(&(flags | family_flag(relayed)).to_ne_bytes());
    put_tail(&mut v, expires_ns, (carried.to_peer_packets, carried.to_peer_bytes));
    (k, v)
}

/// The peer → client entry (`peer_key`, `peer_val`).
fn peer_entry(
    ft: &FiveTuple,
    relayed: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    expires_ns: u64,
    flags: u32,
    carried: Usage,
) -> (PeerKey, PeerVal) {
    let mut k = [0u8; 36];
    let (r, r_port) = addr16(relayed);
    let (p, p_port) = addr16(peer);
    k[..16].copy_from_slice(&r);
    k[16..32].copy_from_slice(&p);
    k[32..34].copy_from_slice(&r_port);
    k[34..36].copy_from_slice(&p_port);
    let mut v = [0u8; 64];
    let (client, client_port) = addr16(ft.client);
    let (server, server_port) = addr16(ft.server);
    v[..16].copy_from_slice(&client);
    v[16..32].copy_from_slice(&server);
    v[32..34].copy_from_slice(&client_port);
    v[34..36].copy_from_slice(&server_port);
    v[36..38].copy_from_slice(&channel.to_be_bytes());
    let f = u16::try_from(flags | family_flag(ft.client)).expect("flags fit in 16 bits");
    v[38..40].copy_from_slice(&f.to_ne_bytes());
    put_tail(&mut v, expires_ns, (carried.to_client_packets, carried.to_client_bytes));
    (k, v)
}
