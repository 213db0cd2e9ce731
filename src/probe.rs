//! `turnpike probe`: RFC 5780 NAT behaviour discovery from the client side.
//!
//! Runs the mapping tests (§4.3: Binding to the primary address, to the alternate IP, to
//! the alternate IP and port) and the filtering tests (§4.4: responses asked to come from
//! the other IP and port, then from the other port only), checks hairpinning (§4.5), and
//! names the result in RFC 3489's classic terms with a verdict on direct P2P. The server
//! must run with two addresses (`turnpike --listen IP1:P1 --alt-listen IP2:P2`); without
//! OTHER-ADDRESS only the mapped address is reported.

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proto::client::{Client, Reply};
use crate::proto::stun::attribute::kind;
use crate::proto::stun::{Attribute, Message, Method, TransactionId};

/// Mapping or filtering behaviour (RFC 4787 §4.1, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// No NAT: the mapped address is the local address.
    NoNat,
    /// Endpoint-independent.
    EndpointIndependent,
    /// Address-dependent.
    AddressDependent,
    /// Address-and-port-dependent.
    AddressAndPortDependent,
}

impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Behaviour::NoNat => "none (no NAT)",
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

/// What the probe found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The local transport address used.
    pub local: SocketAddr,
    /// The server-reflexive address from the primary server address.
    pub mapped: SocketAddr,
    /// The server's OTHER-ADDRESS, if it offers NAT discovery.
    pub other: Option<SocketAddr>,
    /// Mapping behaviour, when the server offers NAT discovery.
    pub mapping: Option<Behaviour>,
    /// Filtering behaviour, when the server offers NAT discovery.
    pub filtering: Option<Behaviour>,
    /// Whether a datagram to our own mapped address came back to us (hairpinning).
    pub hairpinning: bool,
}

impl Report {
    /// The RFC 3489 name: open internet, full cone, restricted cone, port-restricted cone,
    /// or symmetric.
    pub fn classic_name(&self) -> &'static str {
        match (self.mapping, self.filtering) {
            (Some(Behaviour::NoNat), Some(Behaviour::EndpointIndependent)) => "open internet",
            (Some(Behaviour::NoNat), _) => "no NAT, firewalled",
            (Some(Behaviour::EndpointIndependent), Some(Behaviour::EndpointIndependent)) => "full cone",
            (Some(Behaviour::EndpointIndependent), Some(Behaviour::AddressDependent)) => "restricted cone",
            (Some(Behaviour::EndpointIndependent), Some(_)) => "port-restricted cone",
            (Some(_), Some(_)) => "symmetric",
            _ => "unknown (the server offers no NAT discovery)",
        }
    }

    /// A one-line verdict on direct P2P (NAT-TRAVERSAL.md: hole punching fails between
    /// symmetric and port-restricted or symmetric NATs).
    pub fn verdict(&self) -> &'static str {
        match (self.mapping, self.filtering) {
            (Some(Behaviour::NoNat | Behaviour::EndpointIndependent), Some(Behaviour::EndpointIndependent)) => {
                "direct P2P likely with any peer"
            }
            (Some(Behaviour::NoNat | Behaviour::EndpointIndependent), Some(_)) => {
                "direct P2P likely, except with a peer behind a symmetric NAT: keep a TURN relay"
            }
            (Some(_), Some(Behaviour::EndpointIndependent | Behaviour::AddressDependent)) => {
                "symmetric NAT: direct P2P only with full-cone or restricted-cone peers; a TURN relay will often be needed"
            }
            (Some(_), Some(_)) => "symmetric NAT: direct P2P fails with most peers; a TURN relay will be needed",
            _ => "unknown: run against a server with --alt-listen",
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "local address        {}", self.local)?;
        writeln!(f, "mapped address       {}", self.mapped)?;
        match self.other {
            Some(o) => writeln!(f, "server other address {o}")?,
            None => writeln!(f, "server other address none (no RFC 5780 support)")?,
        }
        let show = |b: Option<Behaviour>| b.map(|b| b.to_string()).unwrap_or_else(|| "unknown".into());
        writeln!(f, "mapping behaviour    {}", show(self.mapping))?;
        writeln!(f, "filtering behaviour  {}", show(self.filtering))?;
        writeln!(
            f,
            "hairpinning          {}",
            if self.hairpinning { "yes" } else { "no" }
        )?;
        writeln!(f, "NAT type             {}", self.classic_name())?;
        write!(f, "verdict              {}", self.verdict())
    }
}

/// A Binding response: mapped address, OTHER-ADDRESS, and where it came from.
struct Answer {
    mapped: SocketAddr,
    other: Option<SocketAddr>,
    from: SocketAddr,
}

/// The probe: one UDP socket, the sans-IO client (anonymous: Binding only) and a
/// transaction counter.
struct Prober {
    sock: UdpSocket,
    client: Client,
    rto: Duration,
    tries: u32,
    counter: u64,
}

impl Prober {
    /// One Binding transaction: `tries` sends, `rto` apart. No answer is a result (the NAT
    /// or the server's CHANGE-REQUEST behaviour), not an error.
    fn binding(&mut self, to: SocketAddr, change: u32) -> Result<Option<Answer>> {
        self.transaction(to, change, self.tries, false)
    }

    /// Like [`Prober::binding`], with `backoff` doubling the wait after each send (RFC 8489
    /// §6.2.1), for the first Binding: no answer there ends the probe, and a server that is
    /// slow to answer at first (just started, a loaded host) costs nothing to wait for.
    fn transaction(&mut self, to: SocketAddr, change: u32, tries: u32, backoff: bool) -> Result<Option<Answer>> {
        self.counter += 1;
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.counter.to_be_bytes());
        t[8..].copy_from_slice(&std::process::id().to_be_bytes());
        let tid = TransactionId(t);
        let mut out = Vec::new();
        let change_request = [Attribute::ChangeRequest(change)];
        let attrs: &[Attribute<'_>] = if change != 0 { &change_request } else { &[] };
        self.client.encode_request(Method::Binding, tid, attrs, &mut out);
        let mut buf = [0u8; 1500];
        let mut rto = self.rto;
        for _ in 0..tries {
            self.sock.send_to(&out, to)?;
            let deadline = Instant::now() + rto;
            if backoff {
                rto *= 2;
            }
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                    break;
                };
                let Ok(m) = Message::decode(&buf[..n]) else { continue };
                if m.transaction_id() != tid {
                    continue;
                }
                match self.client.handle_response(&m, false) {
                    Reply::Success => {}
                    Reply::Error(code) => bail!("{to} answered the Binding with error {}", code.0),
                    other => bail!("{to} answered the Binding with {other:?}"),
                }
                let mapped = match m.get(kind::XOR_MAPPED_ADDRESS) {
                    Some(Ok(Attribute::XorMappedAddress(a))) => a,
                    _ => match m.get(kind::MAPPED_ADDRESS) {
                        Some(Ok(Attribute::MappedAddress(a))) => a,
                        _ => bail!("{to} answered without a mapped address"),
                    },
                };
                let other = match m.get(kind::OTHER_ADDRESS) {
                    Some(Ok(Attribute::OtherAddress(a))) => Some(a),
                    _ => None,
                };
                return Ok(Some(Answer { mapped, other, from }));
            }
        }
        Ok(None)
    }
}

/// Runs the probe against `server` (its primary address), from `local` (e.g.
/// `0.0.0.0:0`). Each transaction is tried `tries` times, `rto` apart.
///
/// # Errors
/// When the socket fails, the server does not answer the first Binding, or answers with
/// an error.
pub fn run(server: SocketAddr, local: SocketAddr, rto: Duration, tries: u32) -> Result<Report> {
    // Learn the source address the kernel uses towards the server, then bind to it, so the
    // local address can be compared with the mapped one.
    let local = if local.ip().is_unspecified() {
        let s = UdpSocket::bind(local).context("binding the probe socket")?;
        s.connect(server).context("no route to the server")?;
        SocketAddr::new(s.local_addr()?.ip(), local.port())
    } else {
        local
    };
    let sock = UdpSocket::bind(local).context("binding the probe socket")?;
    let local = sock.local_addr()?;
    let mut p = Prober {
        sock,
        client: Client::anonymous(),
        rto,
        tries,
        counter: 0,
    };
    // The connectivity test: patient (RTO, 2 RTO, 4 RTO, ...: 9.3 s with the defaults).
    let Some(first) = p.transaction(server, 0, tries + 2, true)? else {
        bail!("no answer from {server}");
    };
    let mut report = Report {
        local,
        mapped: first.mapped,
        other: first.other,
        mapping: None,
        filtering: None,
        hairpinning: false,
    };
    if let Some(other) = first.other {
        // Mapping (RFC 5780 §4.3).
        report.mapping = Some(if first.mapped == local {
            Behaviour::NoNat
        } else {
            let alt_ip = SocketAddr::new(other.ip(), server.port());
            match p.binding(alt_ip, 0)? {
                Some(a) if a.mapped == first.mapped => Behaviour::EndpointIndependent,
                Some(a2) => match p.binding(other, 0)? {
                    Some(a3) if a3.mapped == a2.mapped => Behaviour::AddressDependent,
                    _ => Behaviour::AddressAndPortDependent,
                },
                None => bail!("no answer from the alternate address {alt_ip}"),
            }
        });
        // Filtering (RFC 5780 §4.4): answers from the other IP and port, then the other port.
        // "These tests are sensitive to prior state on the NAT": the mapping tests above have
        // sent to the other IP, which an address-dependent filter then admits from any port
        // (a restricted cone would pass for a full cone). So they run on a fresh socket, a
        // fresh mapping that has only ever sent to the primary address (test I).
        let mut f = Prober {
            sock: UdpSocket::bind(SocketAddr::new(local.ip(), 0)).context("binding the probe socket")?,
            client: Client::anonymous(),
            rto,
            tries,
            counter: p.counter,
        };
        if f.binding(server, 0)?.is_none() {
            bail!("no answer from {server} to the filtering test's first Binding");
        }
        let changed_both = f.binding(server, 0x6)?.filter(|a| a.from == other);
        report.filtering = Some(if changed_both.is_some() {
            Behaviour::EndpointIndependent
        } else {
            let port_only = SocketAddr::new(server.ip(), other.port());
            match f.binding(server, 0x2)?.filter(|a| a.from == port_only) {
                Some(_) => Behaviour::AddressDependent,
                None => Behaviour::AddressAndPortDependent,
            }
        });
        p.counter = f.counter;
    }
    // Hairpinning (RFC 5780 §4.5): a second socket sends to our mapped address.
    let other_sock = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
    // Refresh the mapping of the first socket right before (some NATs time out fast).
    let _ = p.binding(server, 0)?;
    for _ in 0..tries {
        other_sock.send_to(b"turnpike-hairpin", report.mapped)?;
        p.sock.set_read_timeout(Some(rto))?;
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = p.sock.recv_from(&mut buf) {
            if &buf[..n] == b"turnpike-hairpin" {
                report.hairpinning = true;
                break;
            }
        }
    }
    Ok(report)
}
