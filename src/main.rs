//! The `turnpike` server binary.

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use turnpike::config::{Config, Settings};

fn main() -> Result<()> {
    let settings = Settings::load(Settings::parse())?;
    let config = Config::resolve(settings)?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let listen: Vec<String> = config.listen.iter().map(|a| a.to_string()).collect();
    let relays: Vec<String> = config.relay_ips.iter().map(|a| a.to_string()).collect();
    tracing::info!(
        "turnpike {} listening on udp {} (relay {} ports {}-{}), realm {:?}",
        env!("CARGO_PKG_VERSION"),
        listen.join(", "),
        relays.join(", "),
        config.ports.0,
        config.ports.1,
        config.server.realm
    );
    if config.user_count == 0 && config.secret_count == 0 {
        tracing::info!(
            "no credentials configured: STUN Binding works, TURN Allocate needs --user NAME:PASSWORD or --static-auth-secret SECRET"
        );
    } else {
        tracing::info!("{} static user(s), {} REST API secret(s)", config.user_count, config.secret_count);
    }
    let stats = turnpike::dataplane::run(config)?;
    tracing::info!(
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
