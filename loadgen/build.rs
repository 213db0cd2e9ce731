//! Compiles `xdp-gen`'s programs (`xdp/gen.bpf.c`) into `$OUT_DIR/gen.bpf.o` when the `xdp`
//! feature is on; does nothing otherwise (the default build needs no clang). See
//! `../xdp/compile.rs`, shared with turnpike's build script.

include!("../xdp/compile.rs");

fn main() {
    println!("cargo:rerun-if-changed=../xdp/compile.rs");
    compile_bpf("xdp/gen.bpf.c", "gen.bpf.o");
}
