//! Integration tests: the real `turnpike` binary on loopback, driven by independent
//! clients (coturn's turnutils_uclient, aioice) and by a client on turnpike's own codec.
//! One test binary with `#[path]` modules, so it links once.

#[path = "it/harness.rs"]
mod harness;

#[path = "it/client.rs"]
mod client;

#[path = "it/real_clients.rs"]
mod real_clients;

#[path = "it/own_client.rs"]
mod own_client;

#[path = "it/cli.rs"]
mod cli;

#[path = "it/browser.rs"]
mod browser;

#[path = "it/natlab.rs"]
mod natlab;

#[path = "it/dataplane.rs"]
mod dataplane;

#[path = "it/nat_discovery.rs"]
mod nat_discovery;

#[path = "it/abuse_cli.rs"]
mod abuse_cli;

#[path = "it/floods.rs"]
mod floods;

#[path = "it/metrics.rs"]
mod metrics;

#[path = "it/wildcard.rs"]
mod wildcard;

#[path = "it/tls_reload.rs"]
mod tls_reload;

#[path = "it/transport_support.rs"]
mod transport_support;

#[path = "it/transports.rs"]
mod transports;

#[path = "it/tcp_relay.rs"]
mod tcp_relay;

#[cfg(feature = "xdp")]
#[path = "it/xdp_lab.rs"]
mod xdp_lab;

#[path = "it/ipv6.rs"]
mod ipv6;

#[path = "it/gso_gro.rs"]
mod gso_gro;
