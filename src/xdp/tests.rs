//! The program in the kernel without an interface (BPF_PROG_TEST_RUN): for each case, a
//! frame built here goes in, and the verdict and the exact frame that comes out are checked;
//! IP and UDP checksums of the output are verified from scratch by this file's own code.
//! The maps are filled through [`XdpOffload::on_event`] with the server's events, so the
//! user-space side is tested with the program. Tests skip (with a printed reason) when the
//! kernel refuses the `bpf()` syscall; CI runs as root, where they run.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions};

use super::*;

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Loads the program, or says why the test is skipped.
fn load(force_tail_grow: bool) -> Option<XdpProgram> {
    match XdpProgram::load_with(LoadOptions {
        max_channels: 1024,
        force_tail_grow,
    }) {
        Ok(p) => Some(p),
        Err(e) if e.is_refused() => {
            eprintln!("skipped: the kernel refused the bpf() syscall ({e}); run as root");
            None
        }
        Err(e) => panic!("loading the XDP program failed: {e:?}"),
    }
}

/// Runs the program once on `frame`: (verdict, output frame).
fn run(p: &mut XdpProgram, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let prog = program(&mut p.ebpf).expect("program");
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

#[test]
fn xdp_program_loads() {
    let Some(_p) = load(false) else { return };
    let Some(_p) = load(true) else { return };
}
