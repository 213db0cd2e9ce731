// Shared by the build scripts of turnpike (`build.rs`) and loadgen (`loadgen/build.rs`), which
// `include!` it: compiles one BPF C program into `$OUT_DIR` when the `xdp` feature is on.
//
// The compiler is `$TURNPIKE_BPF_CLANG`, else `clang` (Debian's clang 14 is known to work:
// `apt-get install clang llvm libbpf-dev`).

/// Compiles `src` (relative to the package) into `$OUT_DIR/<out>` when the `xdp` feature is
/// on; does nothing otherwise (the default build needs no clang).
fn compile_bpf(src: &str, out: &str) {
    use std::env;
    use std::path::PathBuf;
    use std::process::Command;

    println!("cargo:rerun-if-env-changed=TURNPIKE_BPF_CLANG");
    if env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join(out);
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
