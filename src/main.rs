//! The `turnpike` server binary.

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use turnpike::config::{Config, Settings};
use turnpike::dataplane::Runtime;

fn main() -> Result<()> {
    let settings = Settings::load(Settings::parse())?;
    let config = Config::resolve(settings)?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (user_count, secret_count) = (config.user_count, config.secret_count);
    let (realm, ports) = (config.server.realm.clone(), config.ports);
    let mut runtime = Runtime::new(config.clone())?;
    let listen: Vec<String> = runtime.listen_addrs().iter().map(|a| a.to_string()).collect();
    let relays: Vec<String> = config.relay_ips.iter().map(|a| a.to_string()).collect();
    tracing::info!(
        "turnpike {} listening on udp {} (relay {} ports {}-{}), realm {:?}",
        env!("CARGO_PKG_VERSION"),
        listen.join(", "),
        relays.join(", "),
        ports.0,
        ports.1,
        realm
    );
    if user_count == 0 && secret_count == 0 {
        tracing::info!(
            "no credentials configured: STUN Binding works, TURN Allocate needs --user NAME:PASSWORD or --static-auth-secret SECRET"
        );
    } else {
        tracing::info!("{user_count} static user(s), {secret_count} REST API secret(s)");
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, shutdown.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, shutdown.clone())?;
    runtime.run(&shutdown)?;
    let stats = runtime.stats();
    let (allocations, relay_ports_in_use) = runtime.allocations();
    tracing::info!(
        allocations,
        relay_ports_in_use,
        client_rx = stats.client_rx,
        peer_rx = stats.peer_rx,
        to_peer = stats.to_peer,
        to_client = stats.to_client,
        responses = stats.responses,
        send_errors = stats.send_errors,
        drops = ?stats.drops,
        "shut down"
    );
    Ok(())
}
