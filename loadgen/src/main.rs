//! `loadgen`: drives a TURN server with many allocations and channels (being built).
fn main() {
    eprintln!("loadgen: not built yet (issue 4)");
    std::process::exit(2);
}
