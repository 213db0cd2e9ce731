//! Compiles `xdp-gen`'s programs (`xdp/gen.bpf.c`) into `$OUT_DIR/gen.bpf.o` when the `xdp`
//! feature is on; does nothing otherwise (the default build needs no clang).
//!
//! The compiler is `$TURNPIKE_BPF_CLANG`, else `clang` (as for turnpike's own program).
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TURNPIKE_BPF_CLANG");
    if env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    let src = "xdp/gen.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("gen.bpf.o");
    let clang = env::var("TURNPIKE_BPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    // <asm/types.h> and friends live under Debian's multiarch include directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_string());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed on {src} ({s}); the xdp feature needs clang, llvm and libbpf-dev"),
        Err(e) => panic!("cannot run {clang} ({e}); the xdp feature needs clang, llvm and libbpf-dev"),
    }
}
