//! `bare-forwarder`: the kernel path's limit for the benchmark. One UDP socket,
//! recvmmsg/sendmmsg in batches of 64, no TURN logic: each datagram goes out unchanged to
//! the other end of its route. A route (client ↔ echo peer) is registered by the client's
//! first datagram (`loadgen --mode raw` sends it); afterwards the first four bytes of a
//! payload (loadgen's channel index) pick the route, and the source address picks the
//! direction. Single-threaded: pin it with taskset.

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};

use loadgen::payload;
use loadgen::sys::{self, RecvBatch, MAX_BATCH};

/// A bare recvmmsg/sendmmsg UDP forwarder for `loadgen --mode raw`.
#[derive(Debug, Parser)]
#[command(name = "bare-forwarder", version, about)]
struct Args {
    /// UDP address to listen on (loopback, or 198.18.0.0/15 in bench/xdp.sh's namespaces).
    #[arg(long, default_value = "127.0.0.1:3479")]
    listen: SocketAddrV4,
    /// Most routes (channel indices) accepted.
    #[arg(long, default_value_t = 1 << 20)]
    max_routes: usize,
    /// SO_RCVBUF/SO_SNDBUF in bytes (forced past net.core.rmem_max when root).
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !loadgen::cli::is_lab_address(*args.listen.ip()) {
        bail!("--listen must be on 127.0.0.0/8 or 198.18.0.0/15");
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(args.socket_buffer);
    let _ = s.set_send_buffer_size(args.socket_buffer);
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.bind(&SocketAddr::V4(args.listen).into())?;
    let addr = s.local_addr()?.as_socket().expect("inet socket");
    eprintln!("bare-forwarder listening on udp {addr}");
    let fd = s.as_raw_fd();
    let mut routes: Vec<Option<(SocketAddrV4, SocketAddrV4)>> = Vec::new();
    let mut rb = RecvBatch::new(2048);
    let (mut forwarded, mut dropped, mut registered, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut acks = [[0u8; payload::ACK_LEN]; MAX_BATCH];
    while !stop.load(Ordering::Relaxed) {
        let n = match rb.recv_wait(fd, MAX_BATCH) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("recvmmsg: {e}");
                continue;
            }
        };
        if n == 0 {
            continue;
        }
        // First pass: registrations (they write routes and acks).
        let mut is_ack = [false; MAX_BATCH];
        for (i, flag) in is_ack.iter_mut().enumerate().take(n) {
            let (d, src) = rb.get(i);
            if d.len() == payload::REG_LEN {
                if let Some((id, peer)) = payload::parse_registration(d) {
                    let id = id as usize;
                    if id < args.max_routes {
                        if routes.len() <= id {
                            routes.resize(id + 1, None);
                        }
                        routes[id] = Some((src, peer));
                        registered += 1;
                        acks[i] = payload::ack(id as u32);
                        *flag = true;
                    }
                }
            }
        }
        let mut out: [(&[u8], Option<SocketAddrV4>); MAX_BATCH] = [(&[], None); MAX_BATCH];
        let mut m = 0;
        for i in 0..n {
            let (d, src) = rb.get(i);
            if is_ack[i] {
                out[m] = (&acks[i][..], Some(src));
                m += 1;
                continue;
            }
            let dst = payload::route_id(d)
                .and_then(|id| routes.get(id as usize).copied().flatten())
                .and_then(|(client, peer)| {
                    if src == client {
                        Some(peer)
                    } else if src == peer {
                        Some(client)
                    } else {
                        None
                    }
                });
            match dst {
                Some(dst) => {
                    out[m] = (d, Some(dst));
                    m += 1;
                }
                None => dropped += 1,
            }
        }
        let acked = is_ack[..n].iter().filter(|a| **a).count();
        match sys::send_batch(fd, &out[..m]) {
            Ok(k) => {
                forwarded += k.saturating_sub(acked) as u64;
                refused += (m - k) as u64;
            }
            Err(_) => refused += m as u64,
        }
    }
    eprintln!(
        "bare-forwarder shut down: forwarded={forwarded} registered={registered} dropped={dropped} send_refused={refused} routes={}",
        routes.iter().filter(|r| r.is_some()).count()
    );
    Ok(())
}
