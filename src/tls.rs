//! TLS for TURN over TLS (RFC 8656 §3.1), with rustls: the certificate chain and key from
//! PEM files, TLS 1.2 and 1.3, and ALPN `stun.turn` (RFC 7443).
//!
//! RFC 7443 defines the ALPN label `stun.turn` for TURN over (D)TLS. A client that offers it
//! gets it back; a client that offers only other labels, or none, is served without ALPN
//! rather than refused (rustls alone would abort such a handshake with
//! `no_application_protocol`; deployed clients send what their platform's TLS stack does).
//! [`TlsConfig::for_client_hello`] picks the configuration from the ClientHello.
//!
//! Loaded at start and again on SIGHUP: a connection keeps the configuration it was accepted
//! with, so replacing the certificate drops none.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The ALPN protocol ID of TURN (RFC 7443 §3).
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";

/// The server's TLS configurations: one offering ALPN `stun.turn`, one without ALPN.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    with_alpn: Arc<ServerConfig>,
    without_alpn: Arc<ServerConfig>,
    /// The subject names of the leaf certificate are not parsed; this is the number of
    /// certificates in the chain, for the log line.
    pub chain_len: usize,
}

impl TlsConfig {
    /// Loads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1).
    ///
    /// # Errors
    /// When a file cannot be read, holds no certificate or no key, or the key does not match
    /// the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsConfig> {
        let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing certificates in {}", cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no PEM certificate", cert.display());
        }
        let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &pem[..])
            .with_context(|| format!("parsing the private key in {}", key.display()))?
            .ok_or_else(|| anyhow!("{} holds no PEM private key", key.display()))?;
        let build = |alpn: bool| -> Result<Arc<ServerConfig>> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .context("TLS versions")?
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key.clone_key())
                .context("the certificate and key do not form a usable pair")?;
            if alpn {
                config.alpn_protocols = vec![ALPN_STUN_TURN.to_vec()];
            }
            // Plaintext queued before the handshake ends and TLS records not yet written are
            // bounded by the connection's own write budget (the stream layer), not here.
            config.send_half_rtt_data = false;
            Ok(Arc::new(config))
        };
        Ok(TlsConfig {
            with_alpn: build(true)?,
            without_alpn: build(false)?,
            chain_len: chain.len(),
        })
    }

    /// The configuration for a ClientHello offering the ALPN labels `offered` (`None`: no
    /// ALPN extension): with ALPN when the client offers `stun.turn`, else without.
    pub fn for_client_hello<'a>(&self, offered: Option<impl Iterator<Item = &'a [u8]>>) -> Arc<ServerConfig> {
        let wants_turn = offered.is_some_and(|mut labels| labels.any(|l| l == ALPN_STUN_TURN));
        if wants_turn {
            self.with_alpn.clone()
        } else {
            self.without_alpn.clone()
        }
    }
}
