//! One client's TCP or TLS connection to the server (RFC 8656 §3.1): a non-blocking socket,
//! the rustls client state for TLS, and the bytes not yet written.
//!
//! Writing: [`Conn::queue`] appends a message to the connection's output (over TLS, encrypted
//! as a record of its own, as a browser's TLS stack writes each TURN message), and
//! [`Conn::flush`] writes as much of it as the socket takes; the worker watches the socket
//! for writability while bytes remain ([`Conn::pending`]). Reading: [`Conn::read`] returns
//! the next plaintext bytes; the worker frames them into messages with
//! `turnpike::proto::framing` (a read may hold several messages or part of one).
//!
//! Every loop here is bounded in iterations; the worker's level-triggered epoll comes back
//! for whatever is left.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use socket2::{Domain, Protocol, Socket, Type};

/// Most `write` calls in one [`Conn::flush`].
const FLUSH_WRITES: usize = 16;
/// Most `read_tls` rounds in one [`Conn::read`].
const TLS_READS: usize = 8;
/// Most `write_tls` rounds when moving records out of rustls.
const TLS_WRITES: usize = 16;

/// What [`Conn::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// This many plaintext bytes were written to the front of the buffer.
    Data(usize),
    /// Nothing more for now.
    WouldBlock,
    /// The server closed the connection (FIN, or TLS close_notify).
    Eof,
}

/// What a finished TLS handshake negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// TLS 1.3 (else 1.2).
    pub tls13: bool,
    /// The server selected ALPN `stun.turn`.
    pub alpn_stun_turn: bool,
}

/// A client connection, TCP or TLS over TCP.
pub struct Conn {
    sock: Socket,
    tls: Option<Box<ClientConnection>>,
    tx: Vec<u8>,
    tx_off: usize,
    /// Bytes of an incomplete message, kept for the next read (empty when the last read
    /// ended on a message boundary, the usual case).
    pub partial: Vec<u8>,
    /// The worker's epoll also waits for writability (set while bytes are pending).
    pub watching_out: bool,
    handshake_reported: bool,
}

impl Conn {
    /// A non-blocking TCP socket bound to `ip` (ephemeral port), TCP_NODELAY, connecting to
    /// `server`; with `tls`, a TLS client for that name whose ClientHello is queued at once.
    ///
    /// # Errors
    /// Socket, bind or connect failures other than EINPROGRESS; a TLS name rustls refuses.
    pub fn connect(
        ip: Ipv4Addr,
        server: SocketAddrV4,
        tls: Option<&(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    ) -> io::Result<Conn> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_cloexec(true)?;
        // Messages are small and latency is measured: no Nagle delay.
        sock.set_tcp_nodelay(true)?;
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
        match sock.connect(&SocketAddr::V4(server).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let tls = match tls {
            Some((config, name)) => Some(Box::new(
                ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?,
            )),
            None => None,
        };
        let mut c = Conn {
            sock,
            tls,
            tx: Vec::new(),
            tx_off: 0,
            partial: Vec::new(),
            watching_out: false,
            handshake_reported: false,
        };
        c.pump_tls_out()?;
        Ok(c)
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Bytes queued but not yet taken by the kernel.
    pub fn pending(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    /// Moves the TLS records rustls has ready into the output.
    fn pump_tls_out(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            for _ in 0..TLS_WRITES {
                if !tls.wants_write() {
                    break;
                }
                tls.write_tls(&mut self.tx)?;
            }
        }
        Ok(())
    }

    /// Queues one message (STUN or ChannelData, already padded); over TLS it becomes one
    /// record (or is held by rustls until the handshake is done).
    ///
    /// # Errors
    /// rustls refused the plaintext (its buffer before the handshake is full).
    pub fn queue(&mut self, msg: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => {
                self.tx.extend_from_slice(msg);
                Ok(())
            }
            Some(tls) => {
                tls.writer().write_all(msg)?;
                self.pump_tls_out()
            }
        }
    }

    /// Writes queued bytes until the socket refuses more (or `FLUSH_WRITES` calls).
    ///
    /// # Errors
    /// The connection failed (refused, reset, broken pipe).
    pub fn flush(&mut self) -> io::Result<()> {
        for _ in 0..FLUSH_WRITES {
            if self.tx_off == self.tx.len() {
                break;
            }
            match (&self.sock).write(&self.tx[self.tx_off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        } else if self.tx_off >= 64 * 1024 {
            self.tx.drain(..self.tx_off);
            self.tx_off = 0;
        }
        Ok(())
    }

    /// Reads the next plaintext bytes into the front of `buf`. Over TLS, at most one
    /// `read_tls` per call, whose plaintext (at most one read's worth of records, below
    /// 20 KiB) is returned whole when `buf` is larger than that: nothing is left inside
    /// rustls that epoll would not announce.
    ///
    /// # Errors
    /// The connection failed, or TLS failed (bad certificate, alert, garbage).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Input> {
        let Some(tls) = &mut self.tls else {
            for _ in 0..2 {
                match (&self.sock).read(buf) {
                    Ok(0) => return Ok(Input::Eof),
                    Ok(n) => return Ok(Input::Data(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Input::WouldBlock),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(Input::WouldBlock);
        };
        for _ in 0..TLS_READS {
            match tls.reader().read(buf) {
                Ok(0) => return Ok(Input::Eof),
                Ok(n) => return Ok(Input::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Input::Eof),
                Err(e) => return Err(e),
            }
            let got = match tls.read_tls(&mut &self.sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Input::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let state = tls.process_new_packets().map_err(|e| {
                // The alert rustls queued (bad certificate, ...) still goes out.
                let _ = tls.write_tls(&mut self.tx);
                io::Error::new(io::ErrorKind::InvalidData, e)
            })?;
            let closed = got == 0 || state.peer_has_closed();
            if state.plaintext_bytes_to_read() == 0 && closed {
                return Ok(Input::Eof);
            }
            // Handshake messages, key updates.
            self.pump_tls_out()?;
            return self.read_plaintext(buf);
        }
        Ok(Input::WouldBlock)
    }

    fn read_plaintext(&mut self, buf: &mut [u8]) -> io::Result<Input> {
        let tls = self.tls.as_mut().expect("TLS connection");
        match tls.reader().read(buf) {
            Ok(0) => Ok(Input::Eof),
            Ok(n) => Ok(Input::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Input::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Input::Eof),
            Err(e) => Err(e),
        }
    }

    /// What the TLS handshake negotiated, once, when it has finished.
    pub fn take_handshake(&mut self) -> Option<Handshake> {
        let tls = self.tls.as_ref()?;
        if self.handshake_reported || tls.is_handshaking() {
            return None;
        }
        self.handshake_reported = true;
        Some(Handshake {
            tls13: tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
            alpn_stun_turn: tls.alpn_protocol() == Some(crate::cli::ALPN_STUN_TURN),
        })
    }

    /// Ends the connection politely: TLS close_notify, one flush attempt. The socket closes
    /// when the `Conn` is dropped.
    pub fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
        }
        if self.pump_tls_out().is_ok() {
            let _ = self.flush();
        }
    }
}
