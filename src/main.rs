//! The `turnpike` server binary.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use turnpike::config::{Command, Config, Settings};
use turnpike::dataplane::Runtime;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Settings::parse();
    if let Some(Command::Probe {
        server,
        local,
        rto_ms,
        tries,
    }) = &cli.command
    {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(server.as_str())
            .with_context(|| format!("resolving {server}"))?
            .find(|a| a.is_ipv4() == local.is_ipv4())
            .with_context(|| format!("{server} has no address of the local address's family"))?;
        let report = turnpike::probe::run(addr, *local, Duration::from_millis(*rto_ms), *tries)?;
        println!("{report}");
        return Ok(());
    }
    let settings = Settings::load(cli.clone())?;
    let config = Config::resolve(settings)?;
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
    // The log level is reloadable (SIGHUP).
    let set_level: Box<dyn Fn(&str) + Send> = if config.log_json {
        let logs = logs.json().with_env_filter(filter).with_filter_reloading();
        let handle = logs.reload_handle();
        logs.init();
        Box::new(move |level| {
            if let Ok(f) = EnvFilter::try_new(level) {
                let _ = handle.reload(f);
            }
        })
    } else {
        let logs = logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = logs.reload_handle();
        logs.init();
        Box::new(move |level| {
            if let Ok(f) = EnvFilter::try_new(level) {
                let _ = handle.reload(f);
            }
        })
    };
    let nofile = turnpike::sys::raise_nofile_limit();
    let (user_count, secret_count) = (config.user_count, config.secret_count);
    let (realm, ports) = (config.server.realm.clone(), config.ports);
    let relays: Vec<String> = config.relay_ips.iter().map(|a| a.to_string()).collect();
    let metrics_listen = config.metrics_listen;
    let mut runtime = Runtime::new(config)?;
    // Signals are set up before the "listening" line: a supervisor (or a test) that signals as
    // soon as it sees that line must not meet the default action (termination).
    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, shutdown.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, shutdown.clone())?;
    // SIGUSR1: drain (graceful scale-in and upgrade), then exit 0.
    let drain = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, drain.clone())?;
    runtime.drain_on(drain);
    // SIGHUP: re-read the configuration file (the command line still overrides it).
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
    runtime.reload_on(
        reload,
        Box::new(move || {
            let config = Config::resolve(Settings::load(cli.clone())?)?;
            set_level(&config.log_level);
            Ok(config)
        }),
    );
    let _endpoint = match (metrics_listen, runtime.take_metrics()) {
        (Some(addr), Some(metrics)) => {
            let endpoint = turnpike::metrics::Endpoint::start(addr, metrics)?;
            tracing::info!("metrics on http://{}/metrics", endpoint.addr());
            Some(endpoint)
        }
        _ => None,
    };
    let streams: Vec<String> = runtime
        .stream_listen_addrs()
        .iter()
        .map(|(a, t)| format!("{} {a}", t.name()))
        .collect();
    if !streams.is_empty() {
        // Before the "listening on udp" line, which supervisors and tests wait for.
        tracing::info!("listening on {}", streams.join(", "));
    }
    let listen: Vec<String> = runtime.listen_addrs().iter().map(|a| a.to_string()).collect();
    let (backend, why) = runtime.backend();
    tracing::info!(
        "turnpike {} listening on udp {} (relay {} ports {}-{}), realm {:?}",
        env!("CARGO_PKG_VERSION"),
        listen.join(", "),
        relays.join(", "),
        ports.0,
        ports.1,
        realm
    );
    tracing::info!(
        "{} shard(s), I/O backend {} ({why}), file limit {nofile}",
        runtime.shard_count(),
        backend.name()
    );
    if user_count == 0 && secret_count == 0 {
        tracing::info!(
            "no credentials configured: STUN Binding works, TURN Allocate needs --user NAME:PASSWORD or --static-auth-secret SECRET"
        );
    } else {
        tracing::info!("{user_count} static user(s), {secret_count} REST API secret(s)");
    }
    let report = runtime.run(shutdown)?;
    let s = &report.stats;
    let stream_closes: Vec<String> = turnpike::stats::STREAM_CLOSES
        .iter()
        .zip(s.streams.closed)
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{reason}:{n}"))
        .collect();
    tracing::info!(
        allocations = report.control.allocations,
        relay_ports_in_use = report.control.relay_ports_in_use,
        reservations = report.control.reservations,
        client_rx = s.client_rx,
        peer_rx = s.peer_rx,
        to_peer = s.to_peer,
        to_client = s.to_client,
        responses = s.responses_sent(),
        send_errors = s.io.send_errors,
        last_send_errno = s.io.last_send_errno,
        sync_sends = s.io.sync_sends,
        gso_sends = s.io.gso_sends,
        gso_datagrams = s.io.gso_datagrams,
        gso_fallbacks = s.io.gso_fallbacks,
        gro_receives = s.io.gro_receives,
        gro_datagrams = s.io.gro_datagrams,
        truncated = s.io.truncated,
        handovers = s.handovers,
        streams_accepted = s.streams.accepted.iter().sum::<u64>(),
        streams_closed = s.streams.closed_total(),
        streams_refused = s.streams.closed[turnpike::stats::StreamClose::Refused as usize],
        stream_messages = s.streams.messages,
        stream_backpressure_drops = s.streams.backpressure_drops,
        stream_closes = %stream_closes.join(","),
        xdp_to_peer = s.xdp.to_peer_packets,
        xdp_to_client = s.xdp.to_client_packets,
        tcp_relay_connections = s.streams.peer_connections,
        tcp_relayed_bytes = s.streams.relayed_bytes,
        control_overflow = s.control_overflow,
        quota_refusals = report.control.quota_refusals,
        port_refusals = report.control.port_refusals,
        kernel_rcvbuf_errors = report.kernel_rcvbuf_errors,
        kernel_sndbuf_errors = report.kernel_sndbuf_errors,
        drops = ?report.drops,
        "shut down"
    );
    Ok(())
}
