//! TLS certificates are re-read on SIGHUP: new connections get the new certificate, open
//! ones keep going, and a certificate file that does not load keeps the running one.
//! Certificates come from a test CA made with the `openssl` CLI at test time; the client is
//! rustls trusting only that CA.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

use crate::harness::{require, Server};

/// A scratch directory of this test, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and two server certificates for `localhost` and 127.0.0.1 with keys of their own:
/// `ca.pem`, `one.pem`/`one.key`, `two.pem`/`two.key`.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=turnpike test CA",
        ],
    );
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    for name in ["one", "two"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        );
    }
}

fn der_of(pem: &Path) -> CertificateDer<'static> {
    let bytes = std::fs::read(pem).unwrap();
    let der = rustls_pemfile::certs(&mut &bytes[..]).next().unwrap().unwrap();
    der.into_owned()
}

/// A TLS connection to the server trusting only the test CA; the certificate it was shown.
fn connect(
    port: u16,
    ca: &Path,
) -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der_of(ca)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"stun.turn".to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    assert_eq!(
        tls.conn.alpn_protocol(),
        Some(&b"stun.turn"[..]),
        "ALPN stun.turn (RFC 7443)"
    );
    let shown = tls.conn.peer_certificates().unwrap()[0].clone().into_owned();
    (tls, shown)
}

/// A STUN Binding over the stream; checks the success response's transaction ID.
fn binding(tls: &mut impl ReadWrite, n: u8) {
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(&[n; 12]);
    tls.write_all(&req).unwrap();
    let mut header = [0u8; 20];
    tls.read_exact(&mut header).expect("a Binding response");
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    let mut body = vec![0u8; len];
    tls.read_exact(&mut body).unwrap();
    assert_eq!(&header[..2], &[0x01, 0x01], "Binding success");
    assert_eq!(&header[8..20], &[n; 12]);
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[test]
fn tls_certificate_is_reloaded_on_sighup_without_dropping_connections() {
    require("openssl");
    let dir = Dir(std::env::temp_dir().join(format!("turnpike-tls-reload-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    make_pki(&dir.0);
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::copy(dir.0.join("one.pem"), &cert).unwrap();
    std::fs::copy(dir.0.join("one.key"), &key).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tls_listen = format!("127.0.0.1:{port}");
    let server = Server::start(&[
        "--tls-listen",
        &tls_listen,
        "--cert",
        cert.to_str().unwrap(),
        "--pkey",
        key.to_str().unwrap(),
    ]);
    let ca = dir.0.join("ca.pem");
    let (mut first, shown) = connect(port, &ca);
    assert_eq!(shown, der_of(&dir.0.join("one.pem")));
    binding(&mut first, 1);

    // New certificate and key, then SIGHUP.
    std::fs::copy(dir.0.join("two.pem"), &cert).unwrap();
    std::fs::copy(dir.0.join("two.key"), &key).unwrap();
    server.signal("HUP");
    assert!(
        server
            .wait_for_log("configuration reloaded", Duration::from_secs(5))
            .is_some(),
        "no reload"
    );
    // The open connection keeps working; a new one gets the new certificate.
    binding(&mut first, 2);
    let (mut second, shown) = connect(port, &ca);
    assert_eq!(shown, der_of(&dir.0.join("two.pem")));
    binding(&mut second, 3);

    // A key that does not match the certificate: the reload fails, the running one stays.
    std::fs::copy(dir.0.join("one.key"), &key).unwrap();
    server.signal("HUP");
    assert!(
        server.wait_for_log("reload failed", Duration::from_secs(5)).is_some(),
        "a mismatched key must fail the reload"
    );
    let (mut third, shown) = connect(port, &ca);
    assert_eq!(shown, der_of(&dir.0.join("two.pem")));
    binding(&mut third, 4);
    binding(&mut first, 5);
    server.stop();
}
