//! `loadgen`: a load generator for any TURN server (RFC 8656) over UDP, TCP or TLS, on
//! turnpike's own sans-IO codec and stream framing (`turnpike::proto`), plus the pieces of
//! the side-by-side benchmark.
//!
//! A run has phases, steered by the main thread ([`run`]) and carried out by worker
//! threads ([`worker::Worker`]): set up N allocations (each a distinct client 5-tuple) with
//! their channels at a bounded rate; send timestamped payloads client → relay → echo peer →
//! relay → client at a fixed or maximal rate; drain; release every allocation
//! (Refresh LIFETIME 0). The [`report::Report`] gives setup rate, packets per direction,
//! loss, delivered packets/s and Gbit/s, RTT percentiles, errors by STUN code and, with
//! `--server-pid`, the server's CPU seconds and memory per allocation.

pub mod cli;
pub mod flows;
pub mod frame;
pub mod payload;
pub mod report;
pub mod stream;
pub mod sys;
pub mod worker;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use socket2::{Domain, Protocol, Socket, Type};

use cli::{Mode, Plan, Rate};
use report::{Direction, Report, Rtt, ServerProcess, Setup, Stun, Tls, Traffic};
use worker::{Counters, Progress, Shared, Worker};

/// Socket buffer asked for on echo peer sockets, bytes.
pub const PEER_SOCKET_BUFFER: usize = 4 << 20;

/// CPU seconds (user + system) and resident memory (KiB) of process `pid`, from /proc.
pub fn proc_sample(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime) are the 12th and 13th after the comm.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((ticks as f64 / sys::clock_ticks(), rss))
}

/// Per-thread scheduler statistics of process `pid` (`None`: this process): thread id →
/// (ns on a CPU, ns runnable but waiting for a CPU), from /proc/PID/task/*/schedstat.
pub fn thread_schedstats(pid: Option<u32>) -> std::collections::HashMap<String, (u64, u64)> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_string(),
    };
    let mut out = std::collections::HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
            let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
            out.insert(e.file_name().to_string_lossy().into_owned(), (run, wait));
        }
    }
    out
}

/// Of the threads in both samples, the one that ran most between them: its time waiting
/// for a CPU in between, seconds. This is how long the busiest thread (a server's relay
/// thread, loadgen's worker) was held up by other processes on its core.
pub fn busiest_thread_wait(
    before: &std::collections::HashMap<String, (u64, u64)>,
    after: &std::collections::HashMap<String, (u64, u64)>,
) -> Option<f64> {
    after
        .iter()
        .filter_map(|(tid, (run1, wait1))| {
            let (run0, wait0) = before.get(tid)?;
            Some((run1.saturating_sub(*run0), wait1.saturating_sub(*wait0)))
        })
        .max_by_key(|(run, _)| *run)
        .map(|(_, wait)| wait as f64 / 1e9)
}

fn open_peer(ip: std::net::Ipv4Addr) -> Result<(UdpSocket, SocketAddrV4)> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(PEER_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(PEER_SOCKET_BUFFER);
    s.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())
        .with_context(|| format!("bind echo peer on {ip}"))?;
    let u: UdpSocket = s.into();
    let addr = match u.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => bail!("IPv6 peer address"),
    };
    Ok((u, addr))
}

fn bar(quiet: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        None,
        if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr_with_hz(5)
        },
    );
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    pb
}

/// Runs loadgen as planned. `interrupt` (set by Ctrl-C) ends setup or traffic early and
/// goes straight to releasing the allocations. `quiet` hides the progress bar.
///
/// # Errors
/// Socket, thread or file-limit failures before traffic; per-packet and per-transaction
/// errors are counted in the report instead.
pub fn run(plan: Plan, command: String, interrupt: Arc<AtomicBool>, quiet: bool) -> Result<Report> {
    let plan = Arc::new(plan);
    let fds = (plan.allocations + plan.peers + 256) as u64;
    let limit = sys::raise_nofile(fds + 1024).context("raising RLIMIT_NOFILE")?;
    if limit < fds {
        bail!(
            "RLIMIT_NOFILE is {limit} but {fds} descriptors are needed: run as root or raise the hard limit (ulimit -Hn)"
        );
    }
    let mut peer_socks = Vec::new();
    let mut peer_addrs = Vec::new();
    for i in 0..plan.peers {
        let (s, a) = open_peer(plan.peer_ips[i % plan.peer_ips.len()])?;
        peer_socks.push(Some(s));
        peer_addrs.push(a);
    }
    let peer_addrs = Arc::new(peer_addrs);
    let threads = plan.threads;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        phase: AtomicU8::new(worker::PH_SETUP),
        traffic_start_ns: AtomicU64::new(u64::MAX),
        traffic_end_ns: AtomicU64::new(0),
        progress: (0..threads).map(|_| Progress::default()).collect(),
    });
    let rss_before = plan.server_pid.and_then(proc_sample).map(|s| s.1);
    let mut handles = Vec::new();
    for w in 0..threads {
        let first = w * plan.allocations / threads;
        let count = (w + 1) * plan.allocations / threads - first;
        let peers: Vec<UdpSocket> = (0..plan.peers)
            .filter(|i| i % threads == w)
            .filter_map(|i| peer_socks[i].take())
            .collect();
        let wk = Worker::new(w, plan.clone(), shared.clone(), peer_addrs.clone(), first, count, peers)?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{w}"))
                .spawn(move || wk.run())?,
        );
    }
    let sum = |f: &dyn Fn(&Progress) -> u64| shared.progress.iter().map(f).sum::<u64>();
    let all = |f: &dyn Fn(&Progress) -> bool| shared.progress.iter().all(f);

    // Setup.
    let pb = bar(quiet);
    pb.set_prefix("setup");
    pb.set_length(plan.allocations as u64);
    let t_setup = Instant::now();
    while !all(&|p| p.setup_settled.load(Relaxed)) {
        if interrupt.load(Relaxed) || t_setup.elapsed() > plan.setup_timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let ok = sum(&|p| p.setup_ok.load(Relaxed));
        let failed = sum(&|p| p.setup_failed.load(Relaxed));
        pb.set_position(ok + failed);
        pb.set_message(format!("{failed} failed"));
    }
    let setup_secs = if all(&|p| p.setup_settled.load(Relaxed)) {
        // Exact: from the clock base (workers start at once) to the last worker settling.
        let last = shared
            .progress
            .iter()
            .map(|p| p.setup_settled_ns.load(Relaxed))
            .max()
            .unwrap_or(0);
        last as f64 / 1e9
    } else {
        t_setup.elapsed().as_secs_f64()
    };
    pb.finish_and_clear();
    shared.phase.store(worker::PH_IDLE, Relaxed);
    let rss_after = plan.server_pid.and_then(proc_sample).map(|s| s.1);
    let exported = after_setup(&plan, &shared, &interrupt);

    // Traffic.
    let mut traffic_secs = 0.0;
    let mut server_cpu = None;
    let mut loadgen_cpu = 0.0;
    let mut waits: (Option<f64>, Option<f64>) = (None, None);
    if !interrupt.load(Relaxed) && !plan.duration.is_zero() {
        let pb = bar(quiet);
        pb.set_prefix("traffic");
        pb.set_length(plan.duration.as_millis() as u64);
        let start = Instant::now() + Duration::from_millis(2);
        let start_ns = (start - shared.base).as_nanos() as u64;
        shared.traffic_start_ns.store(start_ns, Relaxed);
        shared
            .traffic_end_ns
            .store(start_ns + plan.duration.as_nanos() as u64, Relaxed);
        let cpu0 = plan.server_pid.and_then(proc_sample).map(|s| s.0);
        let sched0 = (
            thread_schedstats(None),
            plan.server_pid.map(|p| thread_schedstats(Some(p))),
        );
        let (u0, s0) = sys::process_cpu_seconds();
        shared.phase.store(worker::PH_TRAFFIC, Relaxed);
        let end = start + plan.duration;
        let mut last = (Instant::now(), 0u64);
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if interrupt.load(Relaxed) {
                let now_ns = (now - shared.base).as_nanos() as u64;
                shared.traffic_end_ns.store(now_ns, Relaxed);
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(100)));
            let rx = sum(&|p| p.received.load(Relaxed));
            let dt = last.0.elapsed().as_secs_f64().max(1e-6);
            pb.set_position(start.elapsed().as_millis().min(plan.duration.as_millis()) as u64);
            pb.set_message(format!(
                "sent {} rx {} ({:.0} round trips/s)",
                sum(&|p| p.sent.load(Relaxed)),
                rx,
                (rx - last.1) as f64 / dt
            ));
            last = (Instant::now(), rx);
        }
        let stop = Instant::now().min(end);
        traffic_secs = stop.saturating_duration_since(start).as_secs_f64();
        let (u1, s1) = sys::process_cpu_seconds();
        loadgen_cpu = (u1 - u0) + (s1 - s0);
        let sched1 = (
            thread_schedstats(None),
            plan.server_pid.map(|p| thread_schedstats(Some(p))),
        );
        waits = (
            busiest_thread_wait(&sched0.0, &sched1.0),
            sched0.1.zip(sched1.1).and_then(|(a, b)| busiest_thread_wait(&a, &b)),
        );
        let cpu1 = plan.server_pid.and_then(proc_sample).map(|s| s.0);
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            server_cpu = Some(b - a);
        }
        pb.finish_and_clear();
        shared.phase.store(worker::PH_DRAIN, Relaxed);
        std::thread::sleep(plan.drain);
    }

    // Release.
    shared.phase.store(worker::PH_RELEASE, Relaxed);
    let release_deadline = Instant::now()
        + Duration::from_secs(10)
        + Duration::from_secs_f64(plan.allocations as f64 / (plan.setup_rate * 2.0));
    while !all(&|p| p.release_settled.load(Relaxed)) && Instant::now() < release_deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    shared.phase.store(worker::PH_DONE, Relaxed);

    let mut c = Counters::default();
    let mut rtt = worker::new_histogram();
    let mut stun_rtt = worker::new_histogram();
    for h in handles {
        let out = h.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
        c.merge(&out.counters);
        rtt.add(&out.rtt).context("merging histograms")?;
        stun_rtt.add(&out.stun_rtt).context("merging histograms")?;
    }
    exported?;
    Ok(build_report(
        &plan,
        command,
        interrupt.load(Relaxed),
        setup_secs,
        traffic_secs,
        loadgen_cpu,
        server_cpu,
        waits,
        (rss_before, rss_after),
        c,
        &rtt,
        &stun_rtt,
    ))
}

/// After setup: `--flows-out` (the flows of the allocations set up, from every worker) and
/// `--hold` (idle with the allocations open until the time is up or `interrupt`). A file that
/// cannot be written sets `interrupt` (the run goes straight to the release) and is the error.
fn after_setup(plan: &Plan, shared: &Shared, interrupt: &AtomicBool) -> Result<()> {
    if let Some(path) = &plan.flows_out {
        let mut flows: Vec<flows::Flow> = shared
            .progress
            .iter()
            .flat_map(|p| p.flows.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        flows.sort_by_key(|f| f.index);
        let list = flows::FlowList {
            mode: match plan.mode {
                Mode::Turn => "turn".into(),
                Mode::Raw => "raw".into(),
            },
            server: plan.server,
            size: plan.size,
            flows,
        };
        if let Err(e) = list.write(path) {
            interrupt.store(true, Relaxed);
            return Err(e);
        }
    }
    let end = Instant::now() + plan.hold;
    // Bounded by --hold (at most a day), 50 ms per turn.
    while !interrupt.load(Relaxed) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    plan: &Plan,
    command: String,
    interrupted: bool,
    setup_secs: f64,
    traffic_secs: f64,
    loadgen_cpu: f64,
    server_cpu: Option<f64>,
    waits: (Option<f64>, Option<f64>),
    rss: (Option<u64>, Option<u64>),
    c: Counters,
    rtt: &hdrhistogram::Histogram<u64>,
    stun_rtt: &hdrhistogram::Histogram<u64>,
) -> Report {
    let secs = traffic_secs.max(1e-9);
    let c2p = Direction::new(c.client_tx, c.peer_rx);
    let p2c = Direction::new(c.peer_tx, c.client_rx);
    let delivered = c.peer_rx + c.client_rx;
    let relayed_pps = if traffic_secs > 0.0 {
        delivered as f64 / secs
    } else {
        0.0
    };
    let requested = match plan.rate {
        Rate::Pps(r) => Some(r),
        Rate::Max => None,
    };
    let rate_kept = match requested {
        Some(r) => traffic_secs == 0.0 || c.client_tx as f64 >= 0.97 * r * traffic_secs,
        None => true,
    };
    let lg_util = if traffic_secs > 0.0 { loadgen_cpu / secs } else { 0.0 };
    let sent_total = c2p.sent + p2c.sent;
    let server_process = plan.server_pid.map(|pid| {
        let cpu = server_cpu.unwrap_or(0.0);
        let (before, after) = (rss.0.unwrap_or(0), rss.1.unwrap_or(0));
        ServerProcess {
            pid,
            cpu_seconds: cpu,
            cpu_utilization: if traffic_secs > 0.0 { cpu / secs } else { 0.0 },
            run_queue_wait_fraction: waits.1.map(|w| w / secs).unwrap_or(0.0),
            relayed_per_cpu_second: if cpu > 0.0 { delivered as f64 / cpu } else { 0.0 },
            rss_before_kib: before,
            rss_after_setup_kib: after,
            rss_per_allocation_bytes: if c.setup_ok > 0 {
                (after.saturating_sub(before) as f64 * 1024.0) / c.setup_ok as f64
            } else {
                0.0
            },
        }
    });
    Report {
        command,
        mode: match plan.mode {
            Mode::Turn => "turn".into(),
            Mode::Raw => "raw".into(),
        },
        server: plan.server.to_string(),
        transport: plan.transport.name().into(),
        tls: (plan.transport == cli::Transport::Tls).then_some(Tls {
            handshakes: c.tls_handshakes,
            tls13: c.tls13,
            alpn_stun_turn: c.alpn_stun_turn,
        }),
        channels: plan.allocations * plan.per_alloc,
        allocations: plan.allocations,
        channels_per_allocation: plan.per_alloc,
        encapsulation: match (plan.mode, plan.send_indications) {
            (Mode::Raw, _) => "raw".into(),
            (Mode::Turn, false) => "channel-data".into(),
            (Mode::Turn, true) => "send-indication".into(),
        },
        size_bytes: plan.size,
        threads: plan.threads,
        rate_requested_pps: requested,
        window: requested.is_none().then_some(plan.window),
        burst: plan.burst,
        interrupted,
        setup: Setup {
            seconds: setup_secs,
            allocations_ok: c.setup_ok,
            allocations_failed: c.setup_failed,
            allocations_per_s: c.setup_ok as f64 / setup_secs.max(1e-9),
            channels_ready: c.channels_ready,
        },
        traffic: Traffic {
            seconds: traffic_secs,
            loss_ratio: if sent_total > 0 {
                (c2p.lost + p2c.lost) as f64 / sent_total as f64
            } else {
                0.0
            },
            client_to_peer: c2p,
            peer_to_client: p2c,
            round_trips_per_s: if traffic_secs > 0.0 {
                c.client_rx as f64 / secs
            } else {
                0.0
            },
            relayed_pps,
            relayed_gbit_s: relayed_pps * plan.size as f64 * 8.0 / 1e9,
            send_rate_pps: if traffic_secs > 0.0 {
                c.client_tx as f64 / secs
            } else {
                0.0
            },
            rate_kept,
            max_lag_ms: c.max_lag_ns as f64 / 1e6,
            send_failures: c.send_failures,
            reordered: c.reordered,
            garbage: c.garbage,
            window_stalls: c.window_stalls,
            loadgen_cpu_utilization: lg_util,
            loadgen_run_queue_wait_fraction: waits.0.map(|w| w / secs).unwrap_or(0.0),
            loadgen_saturated: !rate_kept || lg_util >= 0.95 * plan.threads as f64,
        },
        rtt_us: Rtt::from_histogram(rtt),
        errors: c.errors,
        stun: Stun {
            retransmits: c.retransmits,
            nonce_retries: c.nonce_retries,
            stray_responses: c.stray_responses,
            refresh_ok: c.refresh_ok,
            refresh_failed: c.refresh_failed,
            released: c.released,
            release_failed: c.release_failed,
            transaction_us: Rtt::from_histogram(stun_rtt),
        },
        server_process,
    }
}
