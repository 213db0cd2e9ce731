//! `xdp-gen` (feature `xdp`): NIC-like frames for a relay, from BPF_PROG_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES.
//!
//! It reads the flows that `loadgen --flows-out FILE --hold S` set up (and holds open), builds
//! one Ethernet + IPv4 + UDP frame per flow (the client's ChannelData, or the bare forwarder's
//! raw datagram; `--direction peer` the peer's datagram to the relayed address, `both`
//! alternates), and injects them on `--iface` with BPF_PROG_RUN in live-frames mode: its XDP
//! program (`loadgen/xdp/gen.bpf.c`) returns XDP_TX, which there transmits out of the ingress
//! interface, so over a veth the frames reach the relay's end as `xdp_frame`s, as a NIC driver
//! would hand them over (no skb, no copy). The program rotates the flows frame by frame
//! (per-flow header templates in a map) and paces them in the kernel (`--rate`: a token bucket
//! on the monotonic clock; frames ahead of schedule are dropped before they leave, so the
//! generator's CPU spins and the frames go out evenly spaced, or `--burst` at a time).
//!
//! A second program, attached (native mode) to `--iface` for the run, counts and drops what the
//! relay delivers back (loadgen payloads, as UDP payload or inside ChannelData) and passes
//! everything else, so that the allocations' refreshes go on. Output: offered and delivered
//! frames and rates, as a table or JSON (`--json`), with the run's CLOCK_MONOTONIC start and
//! end (for a CPU sampler).
//!
//! `--anchor IFACE`: an interface that carries no traffic (a veth pair left down), where the
//! generating program is attached too, so that each BPF_PROG_RUN call does not wait for two
//! RCU grace periods (~20 ms) to add the program to the kernel's XDP dispatcher and remove it.
//! Without it, calls are made ten times longer to keep that gap small.
//!
//! Run it in the network namespace of `--iface` (the ingress ifindex is looked up there), with
//! no other XDP program on `--iface`. Single-threaded: pin it with taskset.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use aya::EbpfLoader;
use clap::{Parser, ValueEnum};

use loadgen::cli::{parse_rate, Rate};
use loadgen::flows::FlowList;
use loadgen::frame;

/// The generating program.
const GEN: &str = "xdp_gen_tx";
/// The counting program.
const SINK: &str = "xdp_gen_sink";
/// Bytes of each flow's frame the program overwrites (`TMPL_LEN` in gen.bpf.c).
const TMPL_LEN: usize = 56;
/// Target wall time of one BPF_PROG_RUN call (its `repeat` adapts to it), with `--anchor`.
const CALL_TARGET: Duration = Duration::from_millis(20);
/// The same without `--anchor` (each call then also waits ~20 ms for the dispatcher).
const CALL_TARGET_UNANCHORED: Duration = Duration::from_millis(200);
/// Pacing backlog caught up at once, in frames.
const SLACK_FRAMES: u64 = 32;

/// The compiled programs (`loadgen/xdp/gen.bpf.c`, built by `loadgen/build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gen.bpf.o"));

/// Which frames to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Direction {
    /// Client → server (ChannelData, or the raw datagram to the bare forwarder).
    Client,
    /// Peer → relayed address.
    Peer,
    /// Both, alternating.
    Both,
}

/// NIC-like frames for a relay from BPF_PROG_RUN live frames (see the crate docs of
/// `xdp_gen`).
#[derive(Debug, Parser)]
#[command(name = "xdp-gen", version, about)]
struct Args {
    /// The flow list written by `loadgen --flows-out`.
    #[arg(long)]
    flows: PathBuf,
    /// The generator-side interface: frames leave through it, the sink is attached to it.
    #[arg(long)]
    iface: String,
    /// An interface without traffic (e.g. one end of a veth pair left down) where the
    /// generating program is attached for the run, which spares each call two RCU grace
    /// periods.
    #[arg(long)]
    anchor: Option<String>,
    /// Destination MAC of the frames (the relay's interface). Default: the ARP entry of the
    /// server's IP on `--iface` (/proc/net/arp; loadgen's setup created it).
    #[arg(long)]
    dst_mac: Option<String>,
    /// Offered frames/s, or `max`.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    rate: Rate,
    /// With `--rate`: frames sent back to back at a time (a NIC's interrupt coalescing hands
    /// a driver several); the bursts are spaced to keep the rate. 1: evenly spaced frames.
    #[arg(long, default_value_t = 1)]
    burst: u32,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The kernel's live-frames batch size (program runs before a flush; at most 256).
    #[arg(long, default_value_t = 64)]
    live_batch: u32,
    /// Which frames: client → server, peer → relayed address, or both (alternating calls of
    /// about 20 ms).
    #[arg(long, value_enum, default_value_t = Direction::Client)]
    direction: Direction,
    /// Payload bytes (default: the flow list's loadgen `--size`).
    #[arg(long)]
    size: Option<usize>,
    /// Use only the first N flows (default: all).
    #[arg(long)]
    max_flows: Option<usize>,
    /// Time after the last call to wait for frames still in flight, milliseconds.
    #[arg(long, default_value_t = 300)]
    drain_ms: u64,
    /// Keep the normal scheduling class. By default xdp-gen runs as SCHED_IDLE: paced, it
    /// spins in the kernel (frames ahead of schedule are dropped there), and the interface's
    /// NAPI thread on the same CPU (the sink) must preempt it at once, or the frames the relay
    /// sends back overflow the veth's ring and count as loss.
    #[arg(long)]
    normal_priority: bool,
    /// JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// The run's outcome (`--json`).
#[derive(Debug, serde::Serialize)]
struct Report {
    iface: String,
    mode: String,
    flows: usize,
    direction: Direction,
    /// Mean frame length, bytes (Ethernet header included).
    frame_bytes: f64,
    rate_requested_pps: Option<f64>,
    burst: u32,
    anchored: bool,
    live_batch: u32,
    /// Sending time, seconds (CLOCK_MONOTONIC `t_start` to `t_end`).
    seconds: f64,
    t_start: f64,
    t_end: f64,
    calls: u64,
    offered_frames: u64,
    offered_pps: f64,
    /// Frames the sink counted by the end of the drain time.
    delivered_frames: u64,
    /// Of those, plain UDP (to peers, or the bare forwarder's output) and ChannelData (to
    /// clients).
    delivered_raw: u64,
    delivered_channel_data: u64,
    /// `delivered_frames / seconds`.
    delivered_pps: f64,
    /// `1 - delivered / offered` (frames the relay did not deliver, or that a ring dropped).
    loss_ratio: f64,
    /// Program runs per second (frames sent plus frames held back by the pacing).
    generator_runs_per_s: f64,
    /// This process's CPU time during sending over wall time (1.0 = one core).
    generator_cpu_utilization: f64,
}

fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC {s:?}: six hex bytes separated by ':'");
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).with_context(|| format!("MAC {s:?}"))?;
    }
    Ok(m)
}

/// The interface's index and MAC address in this network namespace.
fn interface(name: &str) -> Result<(u32, [u8; 6])> {
    let c = CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!(
            "no interface {name:?} here: {} (run xdp-gen in its network namespace)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a plain socket, closed below; the ifreq is zeroed and its name NUL-terminated
    // (shorter than IFNAMSIZ, checked); SIOCGIFHWADDR fills ifru_hwaddr.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        let bytes = name.as_bytes();
        if bytes.len() >= req.ifr_name.len() {
            libc::close(fd);
            bail!("interface name {name:?} too long");
        }
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            bail!("SIOCGIFHWADDR {name}: {err}");
        }
        let sa = req.ifr_ifru.ifru_hwaddr.sa_data;
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.iter()) {
            *d = *s as u8;
        }
        Ok((index, mac))
    }
}

/// The MAC of `ip` on `iface` from the ARP table (complete entries only).
fn arp_lookup(ip: Ipv4Addr, iface: &str) -> Result<[u8; 6]> {
    let t = std::fs::read_to_string("/proc/net/arp").context("reading /proc/net/arp")?;
    for line in t.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[0] == ip.to_string() && f[5] == iface && f[2] == "0x2" {
            return parse_mac(f[3]);
        }
    }
    bail!("no ARP entry for {ip} on {iface}: pass --dst-mac")
}

/// `struct gen_cfg` of gen.bpf.c.
fn gen_cfg(interval_ns: u64, slack_ns: u64, base: u32, count: u32, burst: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(&interval_ns.to_ne_bytes());
    b[8..16].copy_from_slice(&slack_ns.to_ne_bytes());
    b[16..20].copy_from_slice(&base.to_ne_bytes());
    b[20..24].copy_from_slice(&count.to_ne_bytes());
    b[24..28].copy_from_slice(&burst.to_ne_bytes());
    b
}

/// The generator's counters summed over CPUs (`struct gen_state`): (frames sent, frames held
/// back by the pacing).
fn generated(state: &PerCpuArray<MapData, [u64; 5]>) -> Result<(u64, u64)> {
    let v = state.get(&0, 0)?;
    Ok((v.iter().map(|s| s[2]).sum(), v.iter().map(|s| s[3]).sum()))
}

/// Reads the sink's counters (`gen.bpf.c`: slots raw packets, raw bytes, ChannelData
/// packets, ChannelData bytes), summed over CPUs: (raw packets, ChannelData packets).
fn delivered(counts: &PerCpuArray<MapData, u64>) -> Result<(u64, u64)> {
    let sum = |i: u32| -> Result<u64> { Ok(counts.get(&i, 0)?.iter().sum()) };
    Ok((sum(0)?, sum(2)?))
}

/// The `struct xdp_md` for BPF_PROG_RUN: data 0, data_end = frame length, data_meta 0,
/// ingress_ifindex, rx_queue_index 0, egress_ifindex 0 (native endian u32s).
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    b[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    b
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        bail!("--duration must be in (0, 3600] seconds");
    }
    if args.live_batch == 0 || args.live_batch > 256 {
        bail!("--live-batch must be 1-256");
    }
    if args.burst == 0 || args.burst > 4096 {
        bail!("--burst must be 1-4096");
    }
    let list = FlowList::read(&args.flows)?;
    let mut flows = list.flows.clone();
    if let Some(n) = args.max_flows {
        flows.truncate(n);
    }
    if flows.is_empty() || flows.len() > 1 << 20 {
        bail!("{} lists no flow, or more than 2^20", args.flows.display());
    }
    for f in &flows {
        for ip in [f.client.ip(), f.peer.ip(), f.relayed.ip(), list.server.ip()] {
            if !loadgen::cli::is_lab_address(*ip) {
                bail!("{ip} is not a loopback or benchmarking address (198.18.0.0/15)");
            }
        }
    }
    let size = args.size.unwrap_or(list.size);
    // One frame within a 1500-byte MTU, ChannelData header included.
    if size > 1468 {
        bail!("payload of {size} bytes: at most 1468 (a 1500-byte MTU with the ChannelData header)");
    }
    let (ifindex, src_mac) = interface(&args.iface)?;
    let dst_mac = match &args.dst_mac {
        Some(m) => parse_mac(m)?,
        None => arp_lookup(*list.server.ip(), &args.iface)?,
    };
    // Templates: the client frames at 0..n, the peer frames at n..2n.
    let n = flows.len();
    let client: Vec<Vec<u8>> = flows
        .iter()
        .map(|f| frame::client_frame(&list, f, src_mac, dst_mac, size))
        .collect();
    let peer: Vec<Vec<u8>> = flows
        .iter()
        .map(|f| frame::peer_frame(f, src_mac, dst_mac, size))
        .collect();
    // (base template, frame handed to the kernel, its xdp_md) of each kind of call.
    let mut kinds = Vec::new();
    if args.direction != Direction::Peer {
        kinds.push((0u32, client[0].clone(), xdp_md(client[0].len(), ifindex)));
    }
    if args.direction != Direction::Client {
        kinds.push((n as u32, peer[0].clone(), xdp_md(peer[0].len(), ifindex)));
    }
    let frame_bytes = kinds.iter().map(|k| k.1.len()).sum::<usize>() as f64 / kinds.len() as f64;

    let mut ebpf = EbpfLoader::new()
        .map_max_entries("templates", 2 * n as u32)
        .load(OBJECT)
        .context("loading gen.bpf.o")?;
    let mut templates: Array<MapData, [u8; TMPL_LEN]> = Array::try_from(
        ebpf.take_map("templates")
            .ok_or_else(|| anyhow!("map templates missing"))?,
    )?;
    for (i, f) in client.iter().chain(&peer).enumerate() {
        let mut t = [0u8; TMPL_LEN];
        t.copy_from_slice(&f[..TMPL_LEN]);
        templates.set(i as u32, t, 0)?;
    }
    let mut cfg: Array<MapData, [u8; 32]> =
        Array::try_from(ebpf.take_map("gen_cfg").ok_or_else(|| anyhow!("map gen_cfg missing"))?)?;
    let state: PerCpuArray<MapData, [u64; 5]> = PerCpuArray::try_from(
        ebpf.take_map("gen_state")
            .ok_or_else(|| anyhow!("map gen_state missing"))?,
    )?;
    let counts: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        ebpf.take_map("sink_count")
            .ok_or_else(|| anyhow!("map sink_count missing"))?,
    )?;
    let sink: &mut Xdp = ebpf
        .program_mut(SINK)
        .ok_or_else(|| anyhow!("program {SINK} missing from the object"))?
        .try_into()?;
    sink.load().context("loading the sink program")?;
    sink.attach(&args.iface, XdpMode::Driver).with_context(|| {
        format!(
            "attaching the sink program to {} in native mode (another XDP program there?)",
            args.iface
        )
    })?;
    let prog: &mut Xdp = ebpf
        .program_mut(GEN)
        .ok_or_else(|| anyhow!("program {GEN} missing from the object"))?
        .try_into()?;
    prog.load().context("loading the generating program")?;
    if let Some(anchor) = &args.anchor {
        prog.attach(anchor, XdpMode::Driver)
            .with_context(|| format!("attaching the generating program to --anchor {anchor} in native mode"))?;
    }
    let call_target = if args.anchor.is_some() {
        CALL_TARGET
    } else {
        CALL_TARGET_UNANCHORED
    };

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    if !args.normal_priority {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: this thread, a valid sched_param.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            bail!("sched_setscheduler(SCHED_IDLE): {}", std::io::Error::last_os_error());
        }
    }
    let (interval_ns, slack_ns) = match args.rate {
        Rate::Pps(r) => {
            // One burst every `burst` frame intervals; the backlog caught up at once is at least
            // one burst and SLACK_FRAMES frames.
            let i = (f64::from(args.burst) * 1e9 / r).round().max(1.0) as u64;
            (i, i * SLACK_FRAMES.div_ceil(u64::from(args.burst)))
        }
        Rate::Max => (0, 0),
    };
    let base = delivered(&counts)?;
    let gen0 = generated(&state)?;
    let (u0, s0) = loadgen::sys::process_cpu_seconds();
    let t_start = monotonic();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let mut calls = 0u64;
    let mut repeat: u32 = 4096;
    let mut k = 0usize;
    // Bounded by --duration (each call about CALL_TARGET) and SIGINT/SIGTERM.
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let (tbase, data, ctx) = &kinds[k];
        if calls == 0 || kinds.len() > 1 {
            cfg.set(0, gen_cfg(interval_ns, slack_ns, *tbase, n as u32, args.burst), 0)?;
        }
        let t = Instant::now();
        let r = prog.test_run(TestRunOptions {
            data_in: Some(data),
            ctx_in: Some(ctx),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(args.live_batch),
            ..TestRunOptions::default()
        });
        if let Err(e) = r {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            return Err(e).context("BPF_PROG_RUN (live frames)");
        }
        calls += 1;
        let took = t.elapsed().max(Duration::from_micros(1));
        let scaled = f64::from(repeat) * call_target.as_secs_f64() / took.as_secs_f64();
        repeat = scaled.clamp(64.0, f64::from(1u32 << 24)) as u32;
        k = (k + 1) % kinds.len();
    }
    let t_end = monotonic();
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    let (u1, s1) = loadgen::sys::process_cpu_seconds();
    let gen1 = generated(&state)?;
    std::thread::sleep(Duration::from_millis(args.drain_ms));
    let after = delivered(&counts)?;
    let (raw, cd) = (after.0 - base.0, after.1 - base.1);
    let total = raw + cd;
    let offered = gen1.0 - gen0.0;
    let runs = offered + (gen1.1 - gen0.1);
    let report = Report {
        iface: args.iface.clone(),
        mode: list.mode.clone(),
        flows: n,
        direction: args.direction,
        frame_bytes,
        rate_requested_pps: match args.rate {
            Rate::Pps(r) => Some(r),
            Rate::Max => None,
        },
        burst: args.burst,
        anchored: args.anchor.is_some(),
        live_batch: args.live_batch,
        seconds,
        t_start,
        t_end,
        calls,
        offered_frames: offered,
        offered_pps: offered as f64 / seconds,
        delivered_frames: total,
        delivered_raw: raw,
        delivered_channel_data: cd,
        delivered_pps: total as f64 / seconds,
        loss_ratio: if offered > 0 {
            1.0 - (total as f64 / offered as f64).min(1.0)
        } else {
            0.0
        },
        generator_runs_per_s: runs as f64 / seconds,
        generator_cpu_utilization: ((u1 - u0) + (s1 - s0)) / seconds,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "xdp-gen on {}: {} flows ({:?}), {:.0}-byte frames, {:.2} s, {} calls\n  offered   {:>12} frames {:>12.0} /s\n  delivered {:>12} frames {:>12.0} /s (raw {}, ChannelData {}), loss {:.4}\n  program runs {:.0} /s, generator CPU {:.0} %",
            report.iface,
            report.flows,
            report.direction,
            report.frame_bytes,
            report.seconds,
            report.calls,
            report.offered_frames,
            report.offered_pps,
            report.delivered_frames,
            report.delivered_pps,
            raw,
            cd,
            report.loss_ratio,
            report.generator_runs_per_s,
            report.generator_cpu_utilization * 100.0,
        );
    }
    Ok(())
}
