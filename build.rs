//! Compiles the XDP program (`xdp/turnpike.bpf.c`) into `$OUT_DIR/turnpike.bpf.o` when the
//! `xdp` feature is on; does nothing otherwise (the default build needs no clang). See
//! `xdp/compile.rs`.

include!("xdp/compile.rs");

fn main() {
    println!("cargo:rerun-if-changed=xdp/compile.rs");
    compile_bpf("xdp/turnpike.bpf.c", "turnpike.bpf.o");
}
